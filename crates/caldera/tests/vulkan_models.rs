//! Whole models on the Vulkan backend, through the binary: `verify` on the `llama`,
//! `qwen3`, `gemma4` and hybrid / MoE fixtures, SmolLM2 answering "Paris", gemma-3-270m continuing
//! the story; the hybrids' chunked prefill against their own token-by-token decode. They
//! run on the test device (lavapipe by default; `CALDERA_VK_DEVICE=N` picks another) and
//! skip without a Vulkan device unless `CALDERA_REQUIRE_VULKAN=1`. lavapipe is slow:
//! each test runs only what it checks.

mod common;

use common::{assert_pass, bin, fixtures, model, rel_l2, text, TempDir};

/// The `--device` index for the tests, or `None` (with a message) to skip.
fn device() -> Option<String> {
    let required = std::env::var(caldera_vulkan::testing::ENV_REQUIRE).is_ok_and(|v| v == "1");
    let picked =
        caldera_vulkan::list_devices().and_then(|d| caldera_vulkan::testing::pick_test_device(&d));
    match picked {
        Ok(i) => Some(i.to_string()),
        Err(e) if !required => {
            eprintln!("skipping: no Vulkan device ({e})");
            None
        }
        Err(e) => panic!("no Vulkan device (CALDERA_REQUIRE_VULKAN=1): {e}"),
    }
}

fn verify(arch: &str) {
    verify_env(arch, &[]);
}

/// [`verify`] with environment variables set for the `caldera` process.
fn verify_env(arch: &str, env: &[(&str, &str)]) {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let o = bin()
        .envs(env.iter().copied())
        .args([
            "verify",
            "--backend",
            "vulkan",
            "--device",
            &dev,
            "--tol",
            "1e-2",
        ])
        .arg(fx.join(arch))
        .output()
        .expect("running caldera");
    assert_pass(&o);
}

#[test]
fn vulkan_verifies_llama() {
    verify("llama");
}

#[test]
fn vulkan_verifies_qwen3() {
    verify("qwen3");
}

/// Short conv + attention with q/k norms.
#[test]
fn vulkan_verifies_lfm2() {
    verify("lfm2");
}

/// Mamba2, attention without RoPE, relu² MLP, a sigmoid-routed MoE with a shared expert,
/// each a one-block layer.
#[test]
fn vulkan_verifies_nemotron_h() {
    verify("nemotron_h");
}

/// GatedDeltaNet + gated attention with partial RoPE.
#[test]
fn vulkan_verifies_qwen3_5() {
    verify("qwen3_5");
}

/// Softmax-routed MoE (renormed top-2 of 8).
#[test]
fn vulkan_verifies_qwen3_moe() {
    verify("qwen3_moe");
}

/// The same with prefill's experts per (token, slot) pair instead of grouped by expert
/// (`CALDERA_VK_MOE_PAIRS=1`, the A/B switch).
#[test]
fn vulkan_verifies_qwen3_moe_pairs() {
    verify_env("qwen3_moe", &[("CALDERA_VK_MOE_PAIRS", "1")]);
}

/// Short conv + MoE after a dense first layer.
#[test]
fn vulkan_verifies_lfm2_moe() {
    verify("lfm2_moe");
}

/// GatedDeltaNet + gated attention + MoE with a sigmoid-gated shared expert.
#[test]
fn vulkan_verifies_qwen3_5_moe() {
    verify("qwen3_5_moe");
}

/// Qwen3-Next: GatedDeltaNet + gated attention + MoE with a gated shared expert.
#[test]
fn vulkan_verifies_qwen3_next() {
    verify("qwen3_next");
}

/// gpt-oss: attention sinks, biased q/k/v/o, alternating sliding windows, YaRN RoPE,
/// top-k-then-softmax routing with router and expert biases, clamped SwiGLU. With an f32
/// KV cache: with the default f16 cache the first prefill row (which attends only to
/// itself) lands 5e-2 off (every other row within 1e-3; with f32, 2e-6 everywhere).
/// Without the MoE layers that row is 3e-4 off with the f16 cache, like the others: the
/// MoE turns a tiny change into a large one, as a near-tie in its expert choice flipping
/// would.
#[test]
fn vulkan_verifies_gpt_oss() {
    verify_env("gpt_oss", &[("CALDERA_VK_KV_F32", "1")]);
}

/// Gemma 4: sliding (head 32) and global (head 64, partial RoPE) layers, per-layer
/// inputs, v norm, layer output scales, final logit softcap.
#[test]
fn vulkan_verifies_gemma4() {
    verify("gemma4");
}

/// A prefill of 40 tokens (every row's logits), then 30 tokens one at a time (several
/// attention splits, past the fixtures' window of 16), through the CPU and Vulkan (f32 KV
/// cache) runners of `model`: every row within `tol` (relative L2).
fn runners_agree(dev: &str, what: &str, model: caldera_model::Model, tol: f32) {
    use caldera_model::{Logits, Runner};
    use std::sync::Arc;
    let model = Arc::new(model);
    let vocab = model.config.vocab_size;
    let tokens: Vec<u32> = (0..70).map(|i| (i * 7919 % vocab) as u32).collect();
    let cap = 128;
    let cpu = Arc::new(caldera_cpu::CpuBackend::new(model.clone(), 2));
    let mut c = caldera_cpu::CpuRunner::new(cpu, cap).expect("cpu runner");
    let opts = caldera_vulkan::ContextOptions {
        force_kv_f32: true,
        ..Default::default()
    };
    let ctx = caldera_vulkan::Context::with_options(dev.parse().unwrap(), &opts).expect("device");
    let vk = Arc::new(caldera_vulkan::VkModel::new(ctx, model.clone()).expect("upload"));
    let mut g = caldera_vulkan::VkRunner::new(vk, cap).expect("vulkan runner");
    let (mut lc, mut lg) = (Vec::new(), Vec::new());
    c.forward(&tokens[..40], Logits::All, &mut lc).unwrap();
    g.forward(&tokens[..40], Logits::All, &mut lg).unwrap();
    let mut rows: Vec<(Vec<f32>, Vec<f32>)> = lc
        .chunks(vocab)
        .zip(lg.chunks(vocab))
        .map(|(a, b)| (a.to_vec(), b.to_vec()))
        .collect();
    for t in &tokens[40..] {
        c.forward(&[*t], Logits::Last, &mut lc).unwrap();
        g.forward(&[*t], Logits::Last, &mut lg).unwrap();
        rows.push((lc.clone(), lg.clone()));
    }
    assert_eq!(rows.len(), tokens.len());
    for (i, (a, b)) in rows.iter().enumerate() {
        let err = rel_l2(a, b);
        assert!(err < tol, "{what}: token {i}: relative L2 {err:e}");
    }
}

/// Gemma 4 with a KV-shared layer (layer 2 reads layer 1's cache: both sliding, heads of
/// 32) and gpt-oss's attention side (sinks, biased q/k/v/o, a sliding window on
/// alternate layers, YaRN RoPE) without its MoE (the layers' FFNs dropped): Vulkan
/// against the CPU runner, prefill and decode.
#[test]
fn vulkan_kv_sharing_and_sinks_match_cpu() {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let (_file, mut model) = caldera_model::Model::open(&fx.join("gemma4")).expect("model");
    model.extras.layers[2].kv_from = Some(1);
    runners_agree(&dev, "gemma4 sharing KV", model, 1e-4);
    let (_file, mut model) = caldera_model::Model::open(&fx.join("gpt_oss")).expect("model");
    for (spec, w) in model
        .config
        .layers
        .iter_mut()
        .zip(&mut model.weights.layers)
    {
        spec.ffn = None;
        w.ffn = None;
    }
    runners_agree(&dev, "gpt-oss attention", model, 1e-4);
}

/// The hybrid fixtures' 80 prompt tokens as one GPU prefill (chunks of 32 with every
/// row's logits: the recurrent mixers' prefill ops) give the logits of feeding them one
/// at a time (the decode ops), and the recurrent runner refuses to rewind but starts
/// over at 0.
#[test]
fn vulkan_hybrid_prefill_matches_decode() {
    use caldera_model::{Logits, Runner};
    use std::sync::Arc;
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    for arch in ["lfm2", "nemotron_h", "qwen3_5"] {
        let (_file, model) = caldera_model::Model::open(&fx.join(arch)).expect("model");
        let model = Arc::new(model);
        let vocab = model.config.vocab_size;
        let tokens: Vec<u32> = (0..80).map(|i| (i * 7919 % vocab) as u32).collect();
        // An f32 KV cache: with f16, prefill reads even the token's own k / v rounded
        // from the cache while decode takes them in f32 (~2e-4 apart here).
        let opts = caldera_vulkan::ContextOptions {
            force_kv_f32: true,
            ..Default::default()
        };
        let ctx =
            caldera_vulkan::Context::with_options(dev.parse().unwrap(), &opts).expect("device");
        let vk = Arc::new(caldera_vulkan::VkModel::new(ctx, model.clone()).expect("upload"));
        let mut g = caldera_vulkan::VkRunner::new(vk, 128).expect("vulkan runner");
        let mut all = Vec::new();
        g.forward(&tokens, Logits::All, &mut all).unwrap();
        assert_eq!(all.len(), tokens.len() * vocab);
        assert!(!g.truncate(5), "{arch}: a recurrent runner rewound");
        assert!(
            g.truncate(0),
            "{arch}: a recurrent runner did not start over"
        );
        let mut row = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            g.forward(&[*t], Logits::Last, &mut row).unwrap();
            let want = &all[i * vocab..(i + 1) * vocab];
            let err = rel_l2(want, &row);
            assert!(err < 1e-4, "{arch}: token {i}: relative L2 {err:e}");
        }
    }
}

/// Mamba2's chunked prefill (`mamba2_chunk`) over a long prompt of the nemotron_h fixture,
/// against the CPU runner (f32 KV cache, as above): 600 tokens (two prefill steps, 512 +
/// 88, so the SSM state passes from one step's chunks to the next), then 35 tokens one at
/// a time (the decode kernel continuing from the chunked prefill's state), then a prefill
/// of 35 more with every row's logits (continuing from the decode kernel's state).
#[test]
fn vulkan_mamba2_long_prefill_matches_cpu() {
    use caldera_model::{Logits, Runner};
    use std::sync::Arc;
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let (_file, model) = caldera_model::Model::open(&fx.join("nemotron_h")).expect("model");
    let model = Arc::new(model);
    let vocab = model.config.vocab_size;
    let tokens: Vec<u32> = (0..670).map(|i| (i * 7919 % vocab) as u32).collect();
    let cap = 700;
    // Rows: token 599, then 600..670.
    let cpu = Arc::new(caldera_cpu::CpuBackend::new(model.clone(), 2));
    let mut c = caldera_cpu::CpuRunner::new(cpu, cap).expect("cpu runner");
    let mut want = Vec::new();
    c.forward(&tokens[..600], Logits::Last, &mut want).unwrap();
    let mut rest = Vec::new();
    c.forward(&tokens[600..], Logits::All, &mut rest).unwrap();
    want.extend(rest);

    let opts = caldera_vulkan::ContextOptions {
        force_kv_f32: true,
        ..Default::default()
    };
    let ctx = caldera_vulkan::Context::with_options(dev.parse().unwrap(), &opts).expect("device");
    assert!(
        ctx.tuning().mamba2_chunk,
        "mamba2_chunk does not fit the device"
    );
    let vk = Arc::new(caldera_vulkan::VkModel::new(ctx, model.clone()).expect("upload"));
    let mut g = caldera_vulkan::VkRunner::new(vk, cap).expect("vulkan runner");
    let mut got = Vec::new();
    g.forward(&tokens[..600], Logits::Last, &mut got).unwrap();
    let mut row = Vec::new();
    for t in &tokens[600..635] {
        g.forward(&[*t], Logits::Last, &mut row).unwrap();
        got.extend_from_slice(&row);
    }
    g.forward(&tokens[635..], Logits::All, &mut row).unwrap();
    got.extend(row);
    assert_eq!((want.len(), got.len()), (71 * vocab, 71 * vocab));
    for (r, (a, b)) in want.chunks(vocab).zip(got.chunks(vocab)).enumerate() {
        let err = rel_l2(a, b);
        assert!(err < 1e-4, "token {}: relative L2 {err:e}", 599 + r);
    }
}

/// SmolLM2's greedy answer to "What is the capital of France?" through its chat
/// template on Vulkan, with `extra` arguments to `run`; asserts it contains `want`.
fn smollm2_answers(extra: &[&str], want: &str) {
    let (Some(dev), Some(m)) = (device(), model("SmolLM2-135M-Instruct.Q4_1.gguf")) else {
        return;
    };
    let o = bin()
        .args(["run", "--backend", "vulkan", "--device", &dev])
        .args(extra)
        .arg(&m)
        .args([
            "-p",
            "What is the capital of France?",
            "-n",
            "16",
            "--temp",
            "0",
        ])
        .args(["--system", "You are a helpful assistant."])
        .output()
        .expect("running caldera");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(want),
        "{}",
        text(&o)
    );
}

#[test]
fn vulkan_smollm2_answers_paris() {
    smollm2_answers(&[], "Paris");
}

#[test]
fn vulkan_gemma3_continues_the_story() {
    let (Some(dev), Some(m)) = (device(), model("gemma-3-270m-q4_k_m.gguf")) else {
        return;
    };
    let o = bin()
        .args(["run", "--backend", "vulkan", "--device", &dev])
        .arg(&m)
        .args(["--raw", "-p", "Once upon a time, there was a little"])
        .args(["-n", "4", "--temp", "0", "--ctx", "256"])
        .output()
        .expect("running caldera");
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with(" girl named Lily"), "{}", text(&o));
}

/// Feeds `path` (a fixture folder or a GGUF) 300 tokens one at a time, then 8 greedy
/// ones, through the CPU and Vulkan runners (so every step is a decode step on both, and
/// both caches and states are filled by decode), the KV cache in f32 when `kv32`;
/// returns the relative L2 error of the Vulkan logits against the CPU's at every step.
fn decode_errors(dev: &str, path: &std::path::Path, kv32: bool) -> Vec<f32> {
    let opts = caldera_vulkan::ContextOptions {
        force_kv_f32: kv32,
        ..Default::default()
    };
    decode_errors_with(dev, path, &opts)
}

/// [`decode_errors`] on a Vulkan context made with `opts`.
fn decode_errors_with(
    dev: &str,
    path: &std::path::Path,
    opts: &caldera_vulkan::ContextOptions,
) -> Vec<f32> {
    use caldera_model::{Logits, Runner};
    use std::sync::Arc;
    let (_file, model) = caldera_model::Model::open(path).expect("model");
    let model = Arc::new(model);
    let vocab = model.config.vocab_size;
    let mut tokens: Vec<u32> = (0..300).map(|i| (i * 7919 % vocab) as u32).collect();
    let cap = 320;
    let cpu = Arc::new(caldera_cpu::CpuBackend::new(model.clone(), 2));
    let mut c = caldera_cpu::CpuRunner::new(cpu, cap).expect("cpu runner");
    let ctx = caldera_vulkan::Context::with_options(dev.parse().unwrap(), opts).expect("device");
    let vk = Arc::new(caldera_vulkan::VkModel::new(ctx, model.clone()).expect("upload"));
    let mut g = caldera_vulkan::VkRunner::new(vk, cap).expect("vulkan runner");
    let (mut lc, mut lg) = (Vec::new(), Vec::new());
    let mut errs = Vec::with_capacity(308);
    for step in 0..308 {
        lc.clear();
        lg.clear();
        c.forward(&tokens[step..step + 1], Logits::Last, &mut lc)
            .unwrap();
        g.forward(&tokens[step..step + 1], Logits::Last, &mut lg)
            .unwrap();
        errs.push(rel_l2(&lc, &lg));
        if step >= 299 {
            let next = lc
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap();
            tokens.push(next);
        }
    }
    errs
}

/// [`decode_errors`] within `tol0` at the first position, then `tol` at every 50th step
/// and at each of the last 8.
fn decode_matches_cpu(dev: &str, path: &std::path::Path, kv32: bool, tol0: f32, tol: f32) {
    for (step, err) in decode_errors(dev, path, kv32).into_iter().enumerate() {
        if step % 50 == 0 || step >= 299 {
            let t = if step == 0 { tol0 } else { tol };
            assert!(
                err < t,
                "{}: position {step}: relative L2 {err:e}",
                path.display()
            );
        }
    }
}

/// Decode past several attention splits (positions 300..): the Vulkan runner's logits
/// match the CPU runner's on the qwen3 fixture (q/k norms, GQA; f32 weights, so the
/// f32-activation mat-vecs).
#[test]
fn vulkan_long_context_decode_matches_cpu() {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    // f32 cache: as exact as the CPU; f16 cache (the default): the first position reads
    // only its own f32 k/v, later ones the rounded cache.
    decode_matches_cpu(&dev, &fx.join("qwen3"), true, 1e-4, 1e-4);
    decode_matches_cpu(&dev, &fx.join("qwen3"), false, 1e-4, 1e-2);
}

/// The same on Q8_0 and Q4_0 conversions of the fixture: the int8-activation decode path
/// (quant_x, mvq, the quantizing tails of o / gate|up / down, attn_decode's int8 output)
/// against the CPU's own Q8 activations. Both quantize activations to the same blocks,
/// so the first position (attention over itself) agrees to float rounding (measured
/// ~1e-7); later positions differ by ~2-3% on this random tiny model (measured): the two
/// sum attention in different orders, a value near a rounding boundary then lands one
/// int8 step apart, and the random weights amplify it. So a loose bound there, which
/// still catches a wrong kernel.
#[test]
fn vulkan_quantized_decode_matches_cpu() {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let tmp = TempDir::new("vk-quant-decode");
    for ty in ["q8_0", "q4_0"] {
        let out = tmp.0.join(format!("qwen3-{ty}.gguf"));
        let o = bin()
            .arg("convert")
            .arg(fx.join("qwen3"))
            .arg(&out)
            .args(["--type", ty])
            .output()
            .expect("running caldera convert");
        assert!(o.status.success(), "convert {ty}: {}", text(&o));
        decode_matches_cpu(&dev, &out, false, 1e-4, 0.1);
    }
}

/// Prefill in steps of many tokens (the tiled matmul, flash attention): a 600-token
/// prompt (two steps: a full one and a partial one reading the first's cache) and then
/// 70 more tokens with every row's logits, on the Vulkan and CPU runners of the qwen3
/// fixture (f32 weights); the logits agree to 1e-4 (relative L2 per row; measured ~1e-6),
/// 5e-3 with the matmul on cooperative matrices (scripts/test.sh runs it so through the
/// newer lavapipe).
#[test]
fn vulkan_prefill_matches_cpu() {
    use caldera_model::{Logits, Runner};
    use std::sync::Arc;
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let (_file, model) = caldera_model::Model::open(&fx.join("qwen3")).expect("model");
    let model = Arc::new(model);
    let vocab = model.config.vocab_size;
    let tokens: Vec<u32> = (0..670).map(|i| (i * 7919 % vocab) as u32).collect();
    let cap = 700;
    let cpu = Arc::new(caldera_cpu::CpuBackend::new(model.clone(), 2));
    let mut c = caldera_cpu::CpuRunner::new(cpu, cap).expect("cpu runner");
    let steps = [(0..600, Logits::Last), (600..670, Logits::All)];
    let cpu_logits: Vec<Vec<f32>> = steps
        .iter()
        .map(|(range, logits)| {
            let mut lc = Vec::new();
            c.forward(&tokens[range.clone()], *logits, &mut lc).unwrap();
            lc
        })
        .collect();
    // f32 cache within 1e-4; f16 cache (the default) within 1e-2 (measured 5e-4); q8_0
    // within 5e-2 (measured 1.1e-2: its rounding is ~20x f16's).
    use caldera_vulkan::KvType;
    for (kv, tol) in [
        (KvType::F32, 1e-4f32),
        (KvType::F16, 1e-2),
        (KvType::Q8_0, 5e-2),
    ] {
        let opts = caldera_vulkan::ContextOptions {
            kv_type: Some(kv),
            ..Default::default()
        };
        let ctx =
            caldera_vulkan::Context::with_options(dev.parse().unwrap(), &opts).expect("device");
        // The matmul on cooperative matrices (f16 products) where the device has them:
        // within 5e-3 (measured 5.2e-4 with the f32 cache on lavapipe 26.1).
        let coop = ctx.tuning().coopmat_mm.is_some();
        let required =
            std::env::var(caldera_vulkan::testing::ENV_REQUIRE_COOPMAT).is_ok_and(|v| v == "1");
        assert!(
            coop || !required,
            "no cooperative matrices (CALDERA_REQUIRE_COOPMAT=1)"
        );
        let tol = if coop { tol.max(5e-3) } else { tol };
        let vk = Arc::new(caldera_vulkan::VkModel::new(ctx, model.clone()).expect("upload"));
        let mut g = caldera_vulkan::VkRunner::new(vk, cap).expect("vulkan runner");
        let mut lg = Vec::new();
        for ((range, logits), lc) in steps.iter().zip(&cpu_logits) {
            let (range, logits) = (range.clone(), *logits);
            let rows = if logits == Logits::All {
                range.len()
            } else {
                1
            };
            g.forward(&tokens[range.clone()], logits, &mut lg).unwrap();
            assert_eq!((lc.len(), lg.len()), (rows * vocab, rows * vocab));
            for (r, (a, b)) in lc.chunks(vocab).zip(lg.chunks(vocab)).enumerate() {
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).powi(2))
                    .sum::<f32>()
                    .sqrt()
                    / a.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!(
                    err < tol,
                    "kv {kv}, tokens {range:?}, row {r}: relative L2 {err:e}"
                );
            }
        }
    }
}

/// The same on Q8_0 conversions of the hybrid fixtures: the int8-activation decode path
/// through the recurrent mixers (GatedDeltaNet's and Mamba2's int8 outputs, the short
/// conv's quant_x), the relu² up projection's quantizing tail, a MoE's shared quant_x.
/// lfm2 and qwen3_5 agree at the first position to float rounding (measured ~2e-7).
/// nemotron_h does not (measured 2e-2): its first layer's input, a Q8_0 embedding row
/// times bf16 norm weights, has a value exactly half-way between two int8 steps, which
/// `quant_x` (v * 127 / amax) and the CPU (v / (amax / 127)) round to different sides.
/// Later such one-step differences (attention sums in another order) persist in the
/// recurrent states, and these random tiny models amplify them: measured medians over the
/// 308 steps 0.7-1.7e-2, single steps up to 0.5 (quantizing activations at all moves
/// qwen3_5's logits by a median 6e-2). So the bounds are on the median and the worst
/// step, which a wrong kernel (errors of order 1 throughout) still fails.
#[test]
fn vulkan_quantized_hybrid_decode_matches_cpu() {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let tmp = TempDir::new("vk-quant-hybrid");
    for (arch, tol0) in [("lfm2", 1e-4), ("nemotron_h", 0.1), ("qwen3_5", 1e-4)] {
        let out = tmp.0.join(format!("{arch}-q8_0.gguf"));
        let o = bin()
            .arg("convert")
            .arg(fx.join(arch))
            .arg(&out)
            .args(["--type", "q8_0"])
            .output()
            .expect("running caldera convert");
        assert!(o.status.success(), "convert {arch}: {}", text(&o));
        let mut errs = decode_errors(&dev, &out, false);
        assert!(
            errs[0] < tol0,
            "{arch}: position 0: relative L2 {:e}",
            errs[0]
        );
        errs.sort_by(f32::total_cmp);
        let (median, worst) = (errs[errs.len() / 2], errs[errs.len() - 1]);
        assert!(
            median < 0.05 && worst < 1.0,
            "{arch}: relative L2 median {median:e}, worst {worst:e}"
        );
    }
}

/// `caldera verify` with a q8_0 KV cache on the `llama` and `qwen3` fixtures: within
/// 3e-2 (measured on lavapipe: worst rows 1.5e-2 and 1.8e-2 against the f16 cache's
/// 6e-4; it passes at 2e-2), the greedy ids and prefill argmaxes agree.
#[test]
fn vulkan_verifies_with_q8_0_kv() {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    for arch in ["llama", "qwen3"] {
        let o = bin()
            .args(["verify", "--backend", "vulkan", "--device", &dev])
            .args(["--kv-type", "q8_0", "--tol", "3e-2"])
            .arg(fx.join(arch))
            .output()
            .expect("running caldera");
        assert_pass(&o);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("q8_0 KV cache"),
            "{}",
            text(&o)
        );
    }
}

/// `caldera verify` on the `llama` and `qwen3` fixtures with the prefill matmul on
/// cooperative matrices (`mmc.glsl`, f16 products), at [`verify`]'s tolerance (measured
/// on lavapipe 26.1: worst rows 1.4e-3 on both, against `mmt.glsl`'s 6.2e-4). Runs where
/// the test device has them: skips elsewhere, fails under `CALDERA_REQUIRE_COOPMAT=1`.
/// The binary runs through the launcher `CALDERA_LAVAPIPE_NEXT` names when set
/// (`scripts/lavapipe-next.sh`: a subprocess would otherwise load the system's
/// libraries and driver); its description must name the coopmat shape.
#[test]
fn vulkan_verifies_with_coopmat() {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    if caldera_vulkan::testing::coopmat_context("verify with coopmat", &Default::default())
        .is_none()
    {
        return;
    }
    for arch in ["llama", "qwen3"] {
        let mut cmd = match std::env::var_os("CALDERA_LAVAPIPE_NEXT") {
            Some(run) => {
                let mut c = std::process::Command::new(run);
                c.arg(env!("CARGO_BIN_EXE_caldera"));
                c
            }
            None => bin(),
        };
        let o = cmd
            .args(["verify", "--backend", "vulkan", "--device", &dev])
            .args(["--tol", "1e-2"])
            .arg(fx.join(arch))
            .output()
            .expect("running caldera");
        assert_pass(&o);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("coopmat"),
            "{arch}: the caldera process has no cooperative matrices (set \
             CALDERA_LAVAPIPE_NEXT to the launcher the tests run under): {}",
            text(&o)
        );
    }
}

/// SmolLM2 through its chat template still answers with a q8_0 KV cache.
#[test]
fn vulkan_smollm2_answers_paris_with_q8_0_kv() {
    smollm2_answers(&["--kv-type", "q8_0"], "The capital of France is Paris.");
}

/// Decode with a q8_0 KV cache past several attention splits (positions 300..) against
/// the CPU runner (f32 cache) on the qwen3 fixture: the first position (attention over
/// its own f32 k / v only) to float rounding (measured 6e-7), every later one within
/// 5e-2 (measured: median 1.0e-2, worst 1.9e-2).
#[test]
fn vulkan_q8_0_kv_decode_matches_cpu() {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let opts = caldera_vulkan::ContextOptions {
        kv_type: Some(caldera_vulkan::KvType::Q8_0),
        ..Default::default()
    };
    let errs = decode_errors_with(&dev, &fx.join("qwen3"), &opts);
    for (step, err) in errs.into_iter().enumerate() {
        let tol = if step == 0 { 1e-4 } else { 5e-2 };
        assert!(err < tol, "position {step}: relative L2 {err:e}");
    }
}

/// A q8_0 KV cache needs heads of multiples of 32: the `llama` fixture's attention split
/// into heads of 16 (8 query and 4 kv heads: the same weights) is refused with a
/// message naming the way out, and runs with an f16 cache.
#[test]
fn vulkan_q8_0_kv_refuses_heads_of_16() {
    use std::sync::Arc;
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let (_file, mut model) = caldera_model::Model::open(&fx.join("llama")).expect("model");
    for l in &mut model.config.layers {
        if let Some(caldera_model::Mixer::Attention(a)) = &mut l.mixer {
            assert_eq!(a.head_dim, 32);
            a.n_heads *= 2;
            a.n_kv_heads *= 2;
            a.head_dim = 16;
            a.scale = 0.25;
            if let Some(r) = &mut a.rope {
                r.n_dims = 16;
            }
        }
    }
    let model = Arc::new(model);
    let open = |kv| {
        let opts = caldera_vulkan::ContextOptions {
            kv_type: Some(kv),
            ..Default::default()
        };
        let ctx =
            caldera_vulkan::Context::with_options(dev.parse().unwrap(), &opts).expect("device");
        caldera_vulkan::VkModel::new(ctx, model.clone())
    };
    let err = open(caldera_vulkan::KvType::Q8_0)
        .err()
        .expect("q8_0 KV with heads of 16")
        .to_string();
    assert!(
        err.contains("multiples of 32") && err.contains("--kv-type f16"),
        "{err}"
    );
    open(caldera_vulkan::KvType::F16).expect("f16 KV with heads of 16");
}
