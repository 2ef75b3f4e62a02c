//! The mixture-of-experts kernels (`moe_route`, `moe_combine`) and `rows_act` against
//! CPU twins on fresh random inputs: caldera-cpu's `ffn::route` for every router kind
//! (with and without renorm, selection bias, scale), odd expert counts, several tokens of
//! a step with rows past the step's tokens left alone; each with subgroup and
//! shared-memory reductions. Skips without a Vulkan device unless
//! `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use caldera_model::blocks::moe::{MoeSpec, RouterKind};
use caldera_model::Activation;
use caldera_vulkan::moe_dense::{MoeCombine, MoeMix};
use caldera_vulkan::ops::{RowAct, RowsAct};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions};
use common::{random_vec, rng, words};
use rand::Rng;

fn contexts(test: &str) -> Vec<Context> {
    let mut v = Vec::new();
    for (shared, wg) in [(false, None), (true, None), (false, Some(16))] {
        let opts = ContextOptions {
            force_shared_reduce: shared,
            workgroup_size: wg,
            ..Default::default()
        };
        match test_context(test, &opts) {
            Some(c) => v.push(c),
            None => return Vec::new(),
        }
    }
    v
}

/// A step of `m` tokens (of buffers holding `max_t`).
fn step(ctx: &Context, m: usize) -> caldera_vulkan::Buffer {
    ctx.upload(&words(&[m as u32, 0, 0, m as u32])).unwrap()
}

#[test]
fn moe_route_matches_cpu() {
    let mut rng = rng("moe_route");
    let kinds = [
        RouterKind::Softmax { renorm: false },
        RouterKind::Softmax { renorm: true },
        RouterKind::TopKSoftmax,
        RouterKind::Sigmoid { renorm: false },
        RouterKind::Sigmoid { renorm: true },
    ];
    for ctx in contexts("moe_route") {
        for (n, k) in [(4, 2), (37, 5), (128, 8), (300, 1)] {
            for kind in kinds {
                let biases: &[bool] = match kind {
                    RouterKind::Sigmoid { .. } => &[false, true],
                    _ => &[false],
                };
                for &bias in biases {
                    let spec = MoeSpec {
                        n_experts: n,
                        n_used: k,
                        d_ff: 8,
                        act: Activation::SwiGlu,
                        router: kind,
                        weights_scale: if bias { 2.5 } else { 1.0 },
                        shared_d_ff: None,
                    };
                    let (max_t, m) = (5, 3);
                    let logits = random_vec(&mut rng, max_t * n, 4.0);
                    let sel = random_vec(&mut rng, n, 0.5);
                    let lb = ctx.upload_f32(&logits).unwrap();
                    let bb = ctx.upload_f32(&sel).unwrap();
                    let wb = ctx.upload_f32(&vec![-7.0; max_t * n]).unwrap();
                    let sb = step(&ctx, m);
                    let op = MoeMix::new(
                        &ctx,
                        &spec,
                        &lb,
                        bias.then_some(&bb),
                        &wb,
                        &sb,
                        max_t as u64,
                    )
                    .unwrap();
                    let rec = ctx.record(|r| op.record(r)).unwrap();
                    ctx.submit(&rec).unwrap();
                    let got = ctx.read_f32(&wb, max_t * n).unwrap();
                    for t in 0..max_t {
                        let row = &got[t * n..(t + 1) * n];
                        if t >= m {
                            assert!(row.iter().all(|&v| v == -7.0), "row {t} past the step");
                            continue;
                        }
                        let mut want = vec![0f32; n];
                        let b = bias.then_some(sel.as_slice());
                        for (e, w) in caldera_cpu::ffn::route(&spec, &logits[t * n..][..n], b) {
                            want[e] = w;
                        }
                        for e in 0..n {
                            assert!(
                                (row[e] - want[e]).abs() <= 1e-5 * (1.0 + want[e].abs()),
                                "{kind:?} {k} of {n}, bias {bias}, token {t}: w[{e}] = {}, want {}",
                                row[e],
                                want[e]
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn moe_combine_matches_cpu() {
    let mut rng = rng("moe_combine");
    for ctx in contexts("moe_combine") {
        for (d, n, slots) in [(64, 4, 5), (37, 3, 3), (300, 8, 9)] {
            let (max_t, m) = (4, 3);
            let x = random_vec(&mut rng, max_t * d, 1.0);
            let y = random_vec(&mut rng, max_t * slots * d, 1.0);
            let mut w = random_vec(&mut rng, max_t * n, 1.0);
            for v in w.iter_mut() {
                if rng.gen_bool(0.5) {
                    *v = 0.0;
                }
            }
            let (xb, yb, wb) = (
                ctx.upload_f32(&x).unwrap(),
                ctx.upload_f32(&y).unwrap(),
                ctx.upload_f32(&w).unwrap(),
            );
            let sb = step(&ctx, m);
            let op = MoeCombine::new(&ctx, d, n, slots, &xb, &yb, &wb, &sb, max_t as u64).unwrap();
            let rec = ctx.record(|r| op.record(r)).unwrap();
            ctx.submit(&rec).unwrap();
            let got = ctx.read_f32(&xb, max_t * d).unwrap();
            for t in 0..max_t {
                for i in 0..d {
                    let mut want = x[t * d + i] as f64;
                    if t < m {
                        for e in 0..slots {
                            let wt = if e < n { w[t * n + e] as f64 } else { 1.0 };
                            want += wt * y[(t * slots + e) * d + i] as f64;
                        }
                    }
                    let g = got[t * d + i] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5,
                        "{slots} slots of {d}: x[{t}][{i}] = {g}, want {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn rows_act_matches_cpu() {
    let mut rng = rng("rows_act");
    for ctx in contexts("rows_act") {
        for (n, ld_y) in [(1usize, 1usize), (64, 70), (333, 333)] {
            let (max_t, m) = (5, 4);
            let y = random_vec(&mut rng, max_t * ld_y, 2.0);
            let (ld_src, src_off) = (n + 11, 7);
            let src = random_vec(&mut rng, max_t * ld_src, 3.0);
            let sb = step(&ctx, m);
            for act in [
                RowAct::Relu2,
                RowAct::Gate {
                    ld_src: ld_src as u64,
                    src_off: src_off as u64,
                },
            ] {
                let yb = ctx.upload_f32(&y).unwrap();
                let srcb = ctx.upload_f32(&src).unwrap();
                let op = RowsAct::new(
                    &ctx,
                    act,
                    n as u64,
                    &yb,
                    ld_y as u64,
                    &srcb,
                    &sb,
                    max_t as u64,
                )
                .unwrap();
                let rec = ctx.record(|r| op.record(r)).unwrap();
                ctx.submit(&rec).unwrap();
                let got = ctx.read_f32(&yb, max_t * ld_y).unwrap();
                for t in 0..max_t {
                    for i in 0..ld_y {
                        let v = y[t * ld_y + i] as f64;
                        let want = if t >= m || i >= n {
                            v
                        } else if act == RowAct::Relu2 {
                            v.max(0.0).powi(2)
                        } else {
                            let g = src[t * ld_src + src_off + i] as f64;
                            v / (1.0 + (-g).exp())
                        };
                        let g = got[t * ld_y + i] as f64;
                        assert!(
                            (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                            "{act:?} {n} of {ld_y}: y[{t}][{i}] = {g}, want {want}"
                        );
                    }
                }
            }
        }
    }
}
