//! Model parts some architectures add around the standard layer (Gemma 4): per-layer
//! input embeddings, attention with v-norm and KV sharing, and the layer output scale.
//! See `caldera_model::weights::{PerLayerInputs, LayerExtras}` for the math.

use std::cell::RefCell;

use caldera_format::quant;
use caldera_model::weights::{LayerExtras, PerLayerBlock, PerLayerInputs};
use caldera_model::{AttnSpec, AttnWeights};

use crate::ctx::Ctx;
use crate::forward::CpuError;
use crate::ops;
use crate::paged::{KvPages, LayerKv};
use crate::pool::SyncPtr;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The per-layer inputs of `m` tokens: `out[(j * n_layers + l) * d ..][..d]` is token
/// `j`'s input to layer `l`. `x` holds the tokens' scaled embeddings (`m × d_model`).
#[allow(clippy::too_many_arguments)]
pub fn inputs(
    ctx: &mut Ctx,
    pl: &PerLayerInputs,
    tokens: &[u32],
    x: &[f32],
    m: usize,
    n_layers: usize,
    eps: f32,
    out: &mut Vec<f32>,
) -> Result<(), CpuError> {
    let row = n_layers * pl.d;
    out.clear();
    out.resize(m * row, 0.0);
    ctx.matmul(&pl.model_proj, x, m, out)?;
    for v in out.iter_mut() {
        *v *= pl.proj_scale;
    }
    ops::rms_norm_inplace(out, &pl.proj_norm, eps);
    let mut e = vec![0f32; row];
    for (j, &t) in tokens.iter().enumerate() {
        let w = &pl.tok_embd;
        if t as usize >= w.rows {
            return Err(CpuError::TokenOutOfRange {
                id: t,
                vocab: w.rows,
            });
        }
        quant::dequantize(w.ty, w.row(t as usize), &mut e).map_err(|err| CpuError::Weight {
            name: w.name.clone(),
            msg: err.to_string(),
        })?;
        for (o, &ev) in out[j * row..(j + 1) * row].iter_mut().zip(&e) {
            *o = (*o + ev * pl.tok_scale) * pl.input_scale;
        }
    }
    Ok(())
}

/// After layer `li`: `x += rmsnorm(proj(gelu_tanh(gate x) * input_l)) * post_norm`.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    ctx: &mut Ctx,
    b: &PerLayerBlock,
    pli: &[f32],
    li: usize,
    n_layers: usize,
    x: &mut [f32],
    m: usize,
    eps: f32,
) -> Result<(), CpuError> {
    let d = b.gate.rows;
    let dm = b.proj.rows;
    let mut g = vec![0f32; m * d];
    ctx.matmul(&b.gate, x, m, &mut g)?;
    for j in 0..m {
        let inp = &pli[(j * n_layers + li) * d..][..d];
        for (gv, &iv) in g[j * d..(j + 1) * d].iter_mut().zip(inp) {
            *gv = ops::gelu_tanh(*gv) * iv;
        }
    }
    let mut p = vec![0f32; m * dm];
    ctx.matmul(&b.proj, &g, m, &mut p)?;
    ops::rms_norm_inplace(&mut p, &b.post_norm, eps);
    x.iter_mut().zip(&p).for_each(|(x, p)| *x += p);
    Ok(())
}

/// Unscaled RMSNorm of each `hd`-sized chunk.
fn rms_norm_plain(x: &mut [f32], hd: usize, eps: f32) {
    for c in x.chunks_exact_mut(hd) {
        let ss: f32 = c.iter().map(|v| v * v).sum::<f32>() / hd as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        c.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Attention of layer `li` with its [`LayerExtras`]: like `attention::forward`, plus an
/// unscaled per-head RMSNorm of v (`v_norm`), and, for a kv-shared layer, no k/v of its
/// own: it attends over the cache of layer `kv_from` (already holding this chunk).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    ctx: &mut Ctx,
    a: &AttnSpec,
    w: &AttnWeights,
    ex: &LayerExtras,
    kv: &mut KvPages,
    li: usize,
    h: &[f32],
    m: usize,
    p0: usize,
    eps: f32,
    out: &mut [f32],
) -> Result<(), CpuError> {
    if a.q_gate || a.sinks {
        return Err(CpuError::Unsupported(format!(
            "layer {li}: gated or sink attention with layer extras"
        )));
    }
    let hd = a.head_dim;
    let nh = a.n_heads;
    let qd = nh * hd;
    let kvd = a.n_kv_heads * hd;
    let mut q = vec![0f32; m * qd];
    ctx.matmul(&w.q, h, m, &mut q)?;
    if let Some(qn) = &w.q_norm {
        ops::rms_norm_inplace(&mut q, qn, eps);
    }
    let mut ang = Vec::new();
    if let Some(rope) = &a.rope {
        for j in 0..m {
            ops::rope_angles(rope, p0 + j, &mut ang);
            for hq in q[j * qd..(j + 1) * qd].chunks_exact_mut(hd) {
                ops::rope_apply(rope.style, &ang, &mut hq[..rope.n_dims]);
            }
        }
    }
    let src = match ex.kv_from {
        Some(src) => src,
        None => {
            let mut k = vec![0f32; m * kvd];
            let mut v = vec![0f32; m * kvd];
            ctx.matmul(&w.k, h, m, &mut k)?;
            ctx.matmul(&w.v, h, m, &mut v)?;
            if let Some(kn) = &w.k_norm {
                ops::rms_norm_inplace(&mut k, kn, eps);
            }
            if ex.v_norm {
                rms_norm_plain(&mut v, hd, eps);
            }
            if let Some(rope) = &a.rope {
                for j in 0..m {
                    ops::rope_angles(rope, p0 + j, &mut ang);
                    for hk in k[j * kvd..(j + 1) * kvd].chunks_exact_mut(hd) {
                        ops::rope_apply(rope.style, &ang, &mut hk[..rope.n_dims]);
                    }
                }
            }
            kv.write(li, p0, &k, &v)?;
            li
        }
    };
    let Some(cache) = kv.layer(src) else {
        return Err(CpuError::Unsupported(format!(
            "layer {li}: kv source layer {src} has no KV cache"
        )));
    };
    if cache.kvd() != kvd || cache.positions() < p0 + m {
        return Err(CpuError::Unsupported(format!(
            "layer {li}: kv source layer {src} has another kv size"
        )));
    }
    let mut att = vec![0f32; m * qd];
    attend(ctx, a, cache, &q, m, p0, &mut att);
    ctx.matmul(&w.o, &att, m, out)
}

/// Causal (optionally windowed) softmax attention of `m` query rows at positions
/// `p0..` over `cache`, grouped kv heads; writes `m × n_heads × head_dim` values.
fn attend(
    ctx: &Ctx,
    a: &AttnSpec,
    cache: LayerKv<'_>,
    q: &[f32],
    m: usize,
    p0: usize,
    att: &mut [f32],
) {
    let hd = a.head_dim;
    let nh = a.n_heads;
    let qd = nh * hd;
    let kvd = a.n_kv_heads * hd;
    let group = nh / a.n_kv_heads;
    let ptr = SyncPtr(att.as_mut_ptr());
    ctx.pool.run(m * nh, |t| {
        let (j, hi) = (t / nh, t % nh);
        let p = p0 + j;
        let lo = a.window.map_or(0, |win| (p + 1).saturating_sub(win));
        let g = hi / group;
        let qv = &q[j * qd + hi * hd..][..hd];
        // SAFETY: task (j, hi) writes only its own head slice of `att`.
        let ov = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(j * qd + hi * hd), hd) };
        SCORES.with(|sbuf| {
            let mut s = sbuf.borrow_mut();
            let n = p + 1 - lo;
            s.resize(n, 0.0);
            let mut i = 0;
            cache.runs(lo, p + 1, |kr, _, cnt| {
                for r in 0..cnt {
                    let kp = &kr[r * kvd + g * hd..][..hd];
                    let mut x = ops::dot(qv, kp) * a.scale;
                    if let Some(cap) = a.softcap {
                        x = cap * (x / cap).tanh();
                    }
                    s[i] = x;
                    i += 1;
                }
            });
            ops::softmax(&mut s[..n]);
            ov.fill(0.0);
            let mut i = 0;
            cache.runs(lo, p + 1, |_, vr, cnt| {
                for r in 0..cnt {
                    let vp = &vr[r * kvd + g * hd..][..hd];
                    ops::axpy(s[i], vp, ov);
                    i += 1;
                }
            });
        });
    });
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use caldera_format::gguf::{GgufArray, GgufValue, GgufValueType};
    use caldera_format::{GgmlType, TensorBytes};
    use caldera_model::file::RawTensor;
    use caldera_model::{Model, ModelFile};

    use crate::{CpuBackend, Logits};

    const D: usize = 16;
    const HD_FULL: usize = 16;
    const HD_SWA: usize = 8;
    const NH: usize = 2;
    const NKV: usize = 1;
    const FF: usize = 32;
    const DPL: usize = 4;
    const VOCAB: usize = 20;
    const N_LAYERS: usize = 3;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    fn tensor(name: &str, dims: &[usize], v: &[f32]) -> RawTensor {
        RawTensor {
            name: name.into(),
            ty: GgmlType::F32,
            dims: dims.iter().map(|&d| d as u64).collect(),
            data: TensorBytes::from_vec(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        }
    }

    /// GGUF-convention tensors of a 3-layer Gemma-4-like model (layer 0 full, 1-2
    /// sliding) whose layer 1 adds nothing to the residual stream (zero o, down and
    /// per-layer projections; its output scale changes only the stream's size, which the
    /// next RMSNorm removes).
    fn tensors(rng: &mut Rng) -> Vec<RawTensor> {
        let mut r = |n: usize, s: f32| (0..n).map(|_| rng.next() * s).collect::<Vec<f32>>();
        let mut t = vec![
            tensor("token_embd.weight", &[D, VOCAB], &r(D * VOCAB, 1.0)),
            tensor("output_norm.weight", &[D], &r(D, 0.5)),
            tensor(
                "per_layer_token_embd.weight",
                &[N_LAYERS * DPL, VOCAB],
                &r(N_LAYERS * DPL * VOCAB, 1.0),
            ),
            tensor(
                "per_layer_model_proj.weight",
                &[D, N_LAYERS * DPL],
                &r(D * N_LAYERS * DPL, 1.0),
            ),
            tensor("per_layer_proj_norm.weight", &[DPL], &r(DPL, 1.0)),
        ];
        let mut ff = vec![1.0f32; HD_FULL / 2];
        ff[2..].fill(1e30);
        t.push(tensor("rope_freqs.weight", &[HD_FULL / 2], &ff));
        for i in 0..N_LAYERS {
            let hd = if i == 0 { HD_FULL } else { HD_SWA };
            let quiet = if i == 1 { 0.0 } else { 1.0 };
            let p = |s: &str| format!("blk.{i}.{s}");
            let ones = |n: usize| vec![1.0f32; n];
            t.push(tensor(&p("attn_norm.weight"), &[D], &r(D, 2.0)));
            t.push(tensor(
                &p("attn_q.weight"),
                &[D, NH * hd],
                &r(D * NH * hd, 0.6),
            ));
            t.push(tensor(&p("attn_q_norm.weight"), &[hd], &r(hd, 2.0)));
            if i != 2 {
                t.push(tensor(
                    &p("attn_k.weight"),
                    &[D, NKV * hd],
                    &r(D * NKV * hd, 0.6),
                ));
                t.push(tensor(
                    &p("attn_v.weight"),
                    &[D, NKV * hd],
                    &r(D * NKV * hd, 0.6),
                ));
                t.push(tensor(&p("attn_k_norm.weight"), &[hd], &r(hd, 2.0)));
            }
            let o: Vec<f32> = r(NH * hd * D, 0.6).iter().map(|v| v * quiet).collect();
            t.push(tensor(&p("attn_output.weight"), &[NH * hd, D], &o));
            t.push(tensor(&p("post_attention_norm.weight"), &[D], &r(D, 2.0)));
            t.push(tensor(&p("ffn_norm.weight"), &[D], &r(D, 2.0)));
            t.push(tensor(&p("ffn_gate.weight"), &[D, FF], &r(D * FF, 0.6)));
            t.push(tensor(&p("ffn_up.weight"), &[D, FF], &r(D * FF, 0.6)));
            let down: Vec<f32> = r(FF * D, 0.6).iter().map(|v| v * quiet).collect();
            t.push(tensor(&p("ffn_down.weight"), &[FF, D], &down));
            t.push(tensor(&p("post_ffw_norm.weight"), &[D], &r(D, 2.0)));
            t.push(tensor(&p("inp_gate.weight"), &[D, DPL], &r(D * DPL, 0.6)));
            let proj: Vec<f32> = r(DPL * D, 0.6).iter().map(|v| v * quiet).collect();
            t.push(tensor(&p("proj.weight"), &[DPL, D], &proj));
            t.push(tensor(&p("post_norm.weight"), &[D], &ones(D)));
            t.push(tensor(&p("layer_output_scale.weight"), &[1], &[0.75]));
        }
        t
    }

    fn meta(shared: u32) -> Vec<(String, GgufValue)> {
        let k = |s: &str| format!("gemma4.{s}");
        let pattern = [false, true, true]
            .iter()
            .map(|&b| GgufValue::Bool(b))
            .collect();
        vec![
            ("general.architecture".into(), GgufValue::string("gemma4")),
            (k("block_count"), GgufValue::U32(N_LAYERS as u32)),
            (k("embedding_length"), GgufValue::U32(D as u32)),
            (k("feed_forward_length"), GgufValue::U32(FF as u32)),
            (k("attention.head_count"), GgufValue::U32(NH as u32)),
            (k("attention.head_count_kv"), GgufValue::U32(NKV as u32)),
            (k("attention.key_length"), GgufValue::U32(HD_FULL as u32)),
            (k("attention.key_length_swa"), GgufValue::U32(HD_SWA as u32)),
            (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-6)),
            (k("attention.sliding_window"), GgufValue::U32(4)),
            (
                k("attention.sliding_window_pattern"),
                GgufValue::Array(GgufArray::new(GgufValueType::Bool, pattern)),
            ),
            (k("rope.freq_base"), GgufValue::F32(1e6)),
            (k("rope.freq_base_swa"), GgufValue::F32(1e4)),
            (k("attention.shared_kv_layers"), GgufValue::U32(shared)),
            (
                k("embedding_length_per_layer_input"),
                GgufValue::U32(DPL as u32),
            ),
            (k("final_logit_softcapping"), GgufValue::F32(30.0)),
        ]
    }

    fn logits(model: Model, tokens: &[u32], one_by_one: bool) -> Vec<f32> {
        let b = CpuBackend::new(Arc::new(model), 2);
        let mut s = b.new_session(64).unwrap();
        let mut out = Vec::new();
        if one_by_one {
            let mut row = Vec::new();
            for &t in tokens {
                b.forward(&mut s, &[t], Logits::Last, &mut row).unwrap();
                out.extend_from_slice(&row);
            }
        } else {
            b.forward(&mut s, tokens, Logits::All, &mut out).unwrap();
        }
        out
    }

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    /// A kv-shared layer attending over its source's cache equals a layer that computes
    /// the same k/v itself from the same input; prefill equals token-by-token decoding.
    #[test]
    fn kv_sharing_matches_own_kv() {
        let mut base = tensors(&mut Rng(7));
        // Layer 2 normalizes its input as layer 1 does.
        let n1 = base
            .iter()
            .find(|t| t.name == "blk.1.attn_norm.weight")
            .unwrap()
            .data
            .clone();
        for t in base
            .iter_mut()
            .filter(|t| t.name == "blk.2.attn_norm.weight")
        {
            t.data = n1.clone();
        }
        let shared_file = ModelFile::new(Path::new("mem"), "gguf", meta(1), base.clone()).unwrap();
        let mut own = base;
        for s in ["attn_k.weight", "attn_v.weight", "attn_k_norm.weight"] {
            let mut t = own
                .iter()
                .find(|t| t.name == format!("blk.1.{s}"))
                .unwrap()
                .clone();
            t.name = format!("blk.2.{s}");
            own.push(t);
        }
        let own_file = ModelFile::new(Path::new("mem"), "gguf", meta(0), own).unwrap();
        let shared = Model::from_file(&shared_file).unwrap();
        assert_eq!(shared.extras.layers[2].kv_from, Some(1));
        let tokens: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
        let a = logits(shared, &tokens, false);
        let b = logits(Model::from_file(&own_file).unwrap(), &tokens, false);
        assert!(
            rel_err(&a, &b) < 1e-5,
            "shared vs own kv: {}",
            rel_err(&a, &b)
        );
        let c = logits(Model::from_file(&shared_file).unwrap(), &tokens, true);
        assert!(
            rel_err(&c, &a) < 1e-5,
            "decode vs prefill: {}",
            rel_err(&c, &a)
        );
    }
}
