//! Feed-forward blocks on the CPU: dense gated MLPs and mixtures of experts.

use caldera_model::blocks::moe::{MoeSpec, MoeWeights, RouterKind};
use caldera_model::{Activation, DenseFfn};

use crate::ctx::Ctx;
use crate::forward::CpuError;
use crate::ops;

/// `act(gate, up)` elementwise into `gate` (or into `up` for ungated activations, then
/// copied): returns the activated hidden rows.
fn activate(act: Activation, gate: Option<&[f32]>, up: &[f32]) -> Vec<f32> {
    match (act, gate) {
        (Activation::SwiGlu, Some(g)) => {
            g.iter().zip(up).map(|(&g, &u)| ops::silu(g) * u).collect()
        }
        (Activation::GeluTanhGlu, Some(g)) => g
            .iter()
            .zip(up)
            .map(|(&g, &u)| ops::gelu_tanh(g) * u)
            .collect(),
        (Activation::ClampedSwiGlu { alpha, limit }, Some(g)) => g
            .iter()
            .zip(up)
            .map(|(&g, &u)| {
                let g = g.min(limit);
                let u = u.clamp(-limit, limit);
                (u + 1.0) * g / (1.0 + (-alpha * g).exp())
            })
            .collect(),
        (Activation::Relu2, _) => up.iter().map(|&u| u.max(0.0) * u.max(0.0)).collect(),
        (_, None) => up.to_vec(),
    }
}

/// `out[m × d]` = dense MLP of `h[m × d]`.
pub fn dense(
    ctx: &mut Ctx,
    w: &DenseFfn,
    act: Activation,
    h: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<(), CpuError> {
    let ff = w.up.rows;
    let mut up = vec![0f32; m * ff];
    ctx.matmul(&w.up, h, m, &mut up)?;
    let gate = match &w.gate {
        Some(g) => {
            let mut gv = vec![0f32; m * ff];
            ctx.matmul(g, h, m, &mut gv)?;
            Some(gv)
        }
        None => None,
    };
    let a = activate(act, gate.as_deref(), &up);
    ctx.matmul(&w.down, &a, m, out)
}

/// The experts chosen for one token and their mixing weights.
pub fn route(spec: &MoeSpec, logits: &[f32], selection_bias: Option<&[f32]>) -> Vec<(usize, f32)> {
    let n = logits.len();
    let k = spec.n_used.min(n);
    let by_desc = |v: &[f32]| {
        let mut idx: Vec<usize> = (0..n).collect();
        // Stable: ties keep the lower expert id first, as torch.topk does on CPU.
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx
    };
    let mut chosen: Vec<(usize, f32)> = match spec.router {
        RouterKind::Softmax { renorm } => {
            let mut p = logits.to_vec();
            ops::softmax(&mut p);
            let top = by_desc(&p);
            let mut c: Vec<(usize, f32)> = top.into_iter().map(|e| (e, p[e])).collect();
            if renorm {
                let s: f32 = c.iter().map(|x| x.1).sum();
                c.iter_mut().for_each(|x| x.1 /= s);
            }
            c
        }
        RouterKind::TopKSoftmax => {
            let top = by_desc(logits);
            let mut w: Vec<f32> = top.iter().map(|&e| logits[e]).collect();
            ops::softmax(&mut w);
            top.into_iter().zip(w).collect()
        }
        RouterKind::Sigmoid { renorm } => {
            let s: Vec<f32> = logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
            let sel: Vec<f32> = match selection_bias {
                Some(b) => s.iter().zip(b).map(|(a, b)| a + b).collect(),
                None => s.clone(),
            };
            let top = by_desc(&sel);
            let mut c: Vec<(usize, f32)> = top.into_iter().map(|e| (e, s[e])).collect();
            if renorm {
                let t: f32 = c.iter().map(|x| x.1).sum::<f32>() + 1e-20;
                c.iter_mut().for_each(|x| x.1 /= t);
            }
            c
        }
    };
    chosen.iter_mut().for_each(|x| x.1 *= spec.weights_scale);
    chosen
}

/// `out[m × d]` = mixture of experts over `h[m × d]` (plus the shared expert).
pub fn moe(
    ctx: &mut Ctx,
    spec: &MoeSpec,
    w: &MoeWeights,
    h: &[f32],
    m: usize,
    out: &mut [f32],
) -> Result<(), CpuError> {
    let d = w.router.cols;
    let n = spec.n_experts;
    let mut logits = vec![0f32; m * n];
    ctx.matmul(&w.router, h, m, &mut logits)?;
    out.fill(0.0);
    // Group tokens by expert so each expert's weights are read once per chunk.
    let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
    for j in 0..m {
        for (e, wt) in route(
            spec,
            &logits[j * n..(j + 1) * n],
            w.selection_bias.as_deref(),
        ) {
            per_expert[e].push((j, wt));
        }
    }
    for (e, toks) in per_expert.iter().enumerate() {
        if toks.is_empty() {
            continue;
        }
        let k = toks.len();
        let mut x = vec![0f32; k * d];
        for (i, &(j, _)) in toks.iter().enumerate() {
            x[i * d..(i + 1) * d].copy_from_slice(&h[j * d..(j + 1) * d]);
        }
        let ffn = DenseFfn {
            gate: w.gate.as_ref().map(|g| g.expert(e)),
            up: w.up.expert(e),
            down: w.down.expert(e),
        };
        let mut y = vec![0f32; k * d];
        dense(ctx, &ffn, spec.act, &x, k, &mut y)?;
        for (i, &(j, wt)) in toks.iter().enumerate() {
            ops::axpy(wt, &y[i * d..(i + 1) * d], &mut out[j * d..(j + 1) * d]);
        }
    }
    if let Some(sh) = &w.shared {
        let act = match spec.act {
            Activation::Relu2 => Activation::Relu2,
            _ => Activation::SwiGlu,
        };
        let mut y = vec![0f32; m * d];
        dense(ctx, sh, act, h, m, &mut y)?;
        if let Some(g) = &w.shared_gate {
            let mut gl = vec![0f32; m];
            ctx.matmul(g, h, m, &mut gl)?;
            for j in 0..m {
                let s = 1.0 / (1.0 + (-gl[j]).exp());
                y[j * d..(j + 1) * d].iter_mut().for_each(|v| *v *= s);
            }
        }
        out.iter_mut().zip(&y).for_each(|(o, v)| *o += v);
    }
    Ok(())
}
