//! The prefill-side kernels against CPU twins on fresh random inputs: `rope_kv` (q/k norm,
//! RoPE, KV write for every token of a step) followed by the prefill attention (causal,
//! windowed, soft-capped, grouped heads over the cache, Gemma 4's v norm and heads of
//! 512, gpt-oss's sinks; both `attn_flash` and `attention`; f16, f32 and q8_0 caches:
//! the written rows within the type's rounding of the exact k / v, the attention against
//! the CPU over the cache read back and over the CPU's own rounding), and `add_norm`
//! (Gemma's post-norms), with both reduction variants. The cache is a pool of pages named
//! by a scrambled page table. Skips without a Vulkan device
//! unless `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use caldera_vulkan::ops::{AttnIo, AttnShape, PrefillAttention};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Buffer, Context, ContextOptions, Kernel, KvType};
use common::{
    kv_round_row, kv_row_mismatch, random_vec, read_kv, rms, rng, rope, rope_table, upload_kv,
    words, Pages, PAGE,
};
use rand::rngs::StdRng;

fn contexts() -> Vec<Context> {
    let mut v = Vec::new();
    // Reductions x prefill attention kernels x f16, f32 and q8_0 KV caches.
    for (shared, no_flash, kv) in [
        (false, false, KvType::F16),
        (true, false, KvType::F32),
        (false, true, KvType::F32),
        (true, true, KvType::F16),
        (false, false, KvType::Q8_0),
        (true, true, KvType::Q8_0),
    ] {
        let opts = ContextOptions {
            force_shared_reduce: shared,
            force_no_flash_attn: no_flash,
            kv_type: Some(kv),
            ..Default::default()
        };
        if let Some(c) = test_context("prefill kernels", &opts) {
            v.push(c);
        }
    }
    v
}

fn step_buf(ctx: &Context, m: usize, pos: usize) -> Buffer {
    ctx.upload(&words(&[m as u32, pos as u32, 0, m as u32]))
        .unwrap()
}

#[allow(clippy::too_many_arguments)]
fn rope_attention_case(
    ctx: &Context,
    rng: &mut StdRng,
    (nh, nkv, hd): (usize, usize, usize),
    m: usize,
    p0: usize,
    window: usize,
    softcap: f32,
    interleaved: bool,
    (v_norm, with_sinks): (bool, bool),
) {
    let cap = p0 + m;
    let kvd = nkv * hd;
    let ld = (nh + 2 * nkv) * hd;
    let (n_rot, eps) = (hd, 1e-6f32);
    let scale = 1.0 / (hd as f32).sqrt();
    let qkv = random_vec(rng, m * ld, 1.0);
    // The cache in pages of a scrambled table (and spare pages), in the context's format
    // (f16 / q8_0 round what the CPU twin reads too).
    let pages = Pages::scrambled(rng, 1, cap, 2);
    let logical = random_vec(rng, cap * kvd, 1.0);
    let mut kpool = pages.scatter(rng, &[logical], kvd);
    let logical = random_vec(rng, cap * kvd, 1.0);
    let mut vpool = pages.scatter(rng, &[logical], kvd);
    let (kc_b, vc_b) = (upload_kv(ctx, &mut kpool), upload_kv(ctx, &mut vpool));
    let kc = pages.gather(&kpool, 0, cap, kvd);
    let vc = pages.gather(&vpool, 0, cap, kvd);
    let table_b = ctx.upload(&pages.table_bytes(cap.div_ceil(PAGE))).unwrap();
    let (qn, kn) = (random_vec(rng, hd, 1.5), random_vec(rng, hd, 1.5));
    let table = rope_table(cap, n_rot);
    let sinks = random_vec(rng, nh, 3.0);
    // CPU twin: the cache after the step, then attention for every token.
    let mut kcw: Vec<f64> = kc.iter().map(|&v| v as f64).collect();
    let mut vcw: Vec<f64> = vc.iter().map(|&v| v as f64).collect();
    // The step's exact k / v rows, [token][kv head].
    let mut kv_rows = Vec::new();
    let mut qs = Vec::new();
    for t in 0..m {
        let row = &qkv[t * ld..(t + 1) * ld];
        for g in 0..nkv {
            let mut k: Vec<f64> = (0..hd).map(|i| row[nh * hd + g * hd + i] as f64).collect();
            rms(&mut k, &kn, eps as f64);
            rope(&mut k, &table, n_rot, interleaved, p0 + t);
            let mut v: Vec<f64> = (0..hd)
                .map(|i| row[nh * hd + kvd + g * hd + i] as f64)
                .collect();
            if v_norm {
                rms(&mut v, &vec![1.0; hd], eps as f64);
            }
            let at = (p0 + t) * kvd + g * hd;
            kcw[at..at + hd].copy_from_slice(&kv_round_row(ctx, &k));
            vcw[at..at + hd].copy_from_slice(&kv_round_row(ctx, &v));
            kv_rows.push((k, v));
        }
        for h in 0..nh {
            let mut q: Vec<f64> = (0..hd).map(|i| row[h * hd + i] as f64).collect();
            rms(&mut q, &qn, eps as f64);
            rope(&mut q, &table, n_rot, interleaved, p0 + t);
            qs.push(q);
        }
    }
    let gsize = nh / nkv;
    // Attention for every token over caches kcw / vcw.
    let attend = |kcw: &[f64], vcw: &[f64]| -> Vec<f64> {
        let mut want = vec![0f64; m * nh * hd];
        for t in 0..m {
            let pos = p0 + t;
            let lo = if window > 0 && pos + 1 > window {
                pos + 1 - window
            } else {
                0
            };
            for h in 0..nh {
                let g = h / gsize;
                let q = &qs[t * nh + h];
                let s: Vec<f64> = (lo..=pos)
                    .map(|p| {
                        let x = (0..hd)
                            .map(|i| q[i] * kcw[p * kvd + g * hd + i])
                            .sum::<f64>()
                            * scale as f64;
                        if softcap > 0.0 {
                            softcap as f64 * (x / softcap as f64).tanh()
                        } else {
                            x
                        }
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let mut l: f64 = e.iter().sum();
                if with_sinks {
                    l += (sinks[h] as f64 - mx).exp();
                }
                for (j, p) in (lo..=pos).enumerate() {
                    for i in 0..hd {
                        want[(t * nh + h) * hd + i] += e[j] / l * vcw[p * kvd + g * hd + i];
                    }
                }
            }
        }
        want
    };
    let want = attend(&kcw, &vcw);
    // Device: rope_kv, barrier, attention.
    let up = |v: &[f32]| ctx.upload_f32(v).unwrap();
    let (qkv_b, qn_b, kn_b, rope_b) = (up(&qkv), up(&qn), up(&kn), up(&table));
    let sinks_b = up(&sinks);
    let out = ctx
        .create_buffer((m * nh * hd * 4) as u64, caldera_vulkan::MemoryKind::Device)
        .unwrap();
    let step = step_buf(ctx, m, p0);
    let rk = ctx
        .bind(
            Kernel::RopeKv,
            &[&qkv_b, &kc_b, &vc_b, &qn_b, &kn_b, &rope_b, &step, &table_b],
        )
        .unwrap();
    let flags = 1 | 2 | 4 | if interleaved { 8 } else { 0 } | if v_norm { 64 } else { 0 };
    let rk_push = words(&[
        nh as u32,
        nkv as u32,
        hd as u32,
        n_rot as u32,
        flags,
        ld as u32,
        eps.to_bits(),
    ]);
    let shape = AttnShape {
        n_heads: nh,
        n_kv: nkv,
        head_dim: hd,
        window,
        scale,
        softcap: (softcap > 0.0).then_some(softcap),
    };
    let io = AttnIo {
        qkv: &qkv_b,
        ld_qkv: ld as u64,
        k_cache: &kc_b,
        v_cache: &vc_b,
        table: &table_b,
        out: &out,
        step: &step,
        max_tokens: m as u64,
        sinks: with_sinks.then_some(&sinks_b),
    };
    let at = PrefillAttention::new(ctx, &shape, &io).unwrap();
    assert_eq!(at.flash(), ctx.tuning().flash_attn);
    let rec = ctx
        .record(|r| {
            r.dispatch(&rk, &rk_push, (m * (nh + nkv)) as u64)?;
            r.barrier();
            at.record(r)
        })
        .unwrap();
    ctx.submit(&rec).unwrap();
    let got = ctx.read_f32(&out, m * nh * hd).unwrap();
    let what = format!(
        "{nh}/{nkv} heads of {hd}, {m} tokens at {p0}, window {window}, softcap {softcap}, \
         interleaved {interleaved}, v norm {v_norm}, sinks {with_sinks} (subgroup {}, flash {}, \
         kv {})",
        ctx.tuning().subgroup_reduce,
        ctx.tuning().flash_attn,
        ctx.tuning().kv,
    );
    // rope_kv's rows in the caches: the step's k / v in the cache's rounding.
    let n_pool = pages.n_pages * PAGE * kvd;
    let kc_got = pages.gather(&read_kv(ctx, &kc_b, n_pool), 0, cap, kvd);
    let vc_got = pages.gather(&read_kv(ctx, &vc_b, n_pool), 0, cap, kvd);
    for (r, (k, v)) in kv_rows.iter().enumerate() {
        let (t, g) = (r / nkv, r % nkv);
        let at = (p0 + t) * kvd + g * hd;
        for (name, cache, want) in [("k", &kc_got, k), ("v", &vc_got, v)] {
            let row = &cache[at..at + hd];
            if let Some(i) = kv_row_mismatch(ctx, row, want) {
                panic!(
                    "{what}: {name} cache of token {t} [{g}][{i}] = {}, want {}",
                    row[i], want[i]
                );
            }
        }
    }
    // The attention over what the cache holds, to float rounding; and over our own
    // rounding of the step's k / v: f16 or q8_0 caches may round a value to a
    // neighbouring step where the device's f32 k differs from ours near a tie (q8_0:
    // one step is amax / 127 of a block, so the bound is looser).
    let as_f64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let want_dev = attend(&as_f64(&kc_got), &as_f64(&vc_got));
    let tol = match ctx.tuning().kv {
        KvType::F32 => 1e-4,
        KvType::F16 => 2e-3,
        KvType::Q8_0 => 2e-2,
    };
    for i in 0..got.len() {
        let g = got[i] as f64;
        assert!(
            (g - want_dev[i]).abs() <= 1e-4,
            "{what}: out[{i}] = {g}, want {} (over the device's cache)",
            want_dev[i]
        );
        assert!(
            (g - want[i]).abs() <= tol,
            "{what}: out[{i}] = {g}, want {}",
            want[i]
        );
    }
}

#[test]
fn rope_kv_and_attention_match_cpu() {
    let mut rng = rng("rope_kv + attention");
    for ctx in &contexts() {
        for heads in [
            (8, 2, 64),
            (6, 6, 32),
            (18, 2, 48),
            (4, 1, 128),
            (2, 1, 256),
            (6, 2, 512),
        ] {
            if ctx.tuning().kv.unsupported_head(heads.2).is_some() {
                continue; // q8_0: heads of multiples of 32 only
            }
            // (tokens, first position, window, softcap, interleaved, (v norm, sinks))
            for (m, p0, window, softcap, il, extra) in [
                (1, 0, 0, 0.0, false, (false, false)),
                (13, 0, 0, 0.0, true, (true, true)),
                (9, 70, 0, 25.0, false, (false, true)),
                (32, 40, 21, 0.0, true, (true, false)),
                (71, 45, 0, 0.0, false, (false, false)),
                (67, 3, 40, 30.0, true, (true, true)),
            ] {
                rope_attention_case(ctx, &mut rng, heads, m, p0, window, softcap, il, extra);
            }
        }
    }
}

#[test]
fn add_norm_matches_cpu() {
    let mut rng = rng("add_norm");
    for ctx in &contexts() {
        for (n, m) in [(1usize, 1usize), (37, 3), (640, 5), (2051, 2)] {
            let x = random_vec(&mut rng, m * n, 1.0);
            let r = random_vec(&mut rng, m * n, 3.0);
            let w = random_vec(&mut rng, n, 1.5);
            let eps = 1e-6f32;
            let (xb, rb, wb) = (
                ctx.upload_f32(&x).unwrap(),
                ctx.upload_f32(&r).unwrap(),
                ctx.upload_f32(&w).unwrap(),
            );
            let step = step_buf(ctx, m, 0);
            let b = ctx.bind(Kernel::AddNorm, &[&xb, &rb, &wb, &step]).unwrap();
            let push = words(&[n as u32, eps.to_bits()]);
            let rec = ctx.record(|rc| rc.dispatch(&b, &push, m as u64)).unwrap();
            ctx.submit(&rec).unwrap();
            let got = ctx.read_f32(&xb, m * n).unwrap();
            for t in 0..m {
                let mut v: Vec<f64> = r[t * n..(t + 1) * n].iter().map(|&a| a as f64).collect();
                rms(&mut v, &w, eps as f64);
                for i in 0..n {
                    let want = x[t * n + i] as f64 + v[i];
                    let g = got[t * n + i] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5,
                        "add_norm n {n} [{t}][{i}]: {g} vs {want}"
                    );
                }
            }
        }
    }
}
