//! The int8-activation decode mat-vecs (`quant_x` + `mvq_*` / `mvqg_*`: Q4_0, Q8_0,
//! Q4_K, Q6_K) and their fused modes (input norm in quant_x, residual add, gate/up GLU,
//! softcap) against a CPU twin that quantizes x the same way, on fresh random inputs
//! with odd sizes, with int8 dot products and with their emulation, under several
//! launch shapes and both reduction paths, on the test device (lavapipe by default). Skips without a Vulkan device unless
//! `CALDERA_REQUIRE_VULKAN=1`. `CALDERA_TEST_SEED=N` replays a seed.

mod common;

use std::sync::OnceLock;

use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{mvq_host, MvMode};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions};
use common::{modes, random_vec, rng};
use rand::rngs::StdRng;

/// Launch shapes: the default, and (workgroup, outputs per group, shared-memory reduce)
/// variants that leave partial groups and partial block slots.
fn contexts() -> &'static [Context] {
    static CTX: OnceLock<Vec<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let mut v = Vec::new();
        // The last three: a subgroup per output (`MV_SG`), with more outputs than
        // subgroups, fewer, and as many (lavapipe's subgroups are 8 wide).
        // (workgroup, outputs per group, shared-memory reduce, no int8 dot, MV_SG)
        type Shape = (Option<u32>, Option<u32>, bool, bool, bool);
        let shapes: [Shape; 7] = [
            (None, None, false, false, false),
            // The GPUs' default shape (CPU drivers default to 16 x 4).
            (Some(128), Some(2), false, true, false),
            (Some(16), Some(1), true, false, false),
            (Some(32), Some(3), false, true, false),
            (Some(16), Some(4), false, false, true),
            (Some(64), Some(3), false, true, true),
            (Some(32), Some(4), false, false, true),
        ];
        for (wg, rows, shared, no_dot, sg) in shapes {
            let opts = ContextOptions {
                mv_workgroup_size: wg,
                mv_rows: rows,
                force_shared_reduce: shared,
                force_no_int8_dot: no_dot,
                mv_subgroup_rows: Some(sg),
                ..Default::default()
            };
            match test_context("vulkan mvq kernels", &opts) {
                Some(c) => v.push(c),
                None => break,
            }
        }
        v
    })
}

/// x as quant_x makes it: (norm,) blocks of 32 to int8 with d = max|v| / 127, back to
/// f64.
fn quantized_input(x: &[f32], gam: &[f32], mode: MvMode) -> Vec<f64> {
    let k = x.len();
    let v: Vec<f32> = if mode.norm {
        let ss = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
        let inv = (1.0 / (ss + mode.eps as f64).sqrt()) as f32;
        (0..k).map(|c| x[c] * inv * gam[c]).collect()
    } else {
        x.to_vec()
    };
    let mut out = Vec::with_capacity(k);
    for b in v.chunks(32) {
        let amax = b.iter().fold(0f32, |m, &t| m.max(t.abs()));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let d = amax / 127.0;
        for &t in b {
            let q = (t * id).round_ties_even().clamp(-127.0, 127.0);
            out.push(q as f64 * d as f64);
        }
    }
    out
}

fn check(ctx: &Context, rng: &mut StdRng, ty: GgmlType, outs: usize, k: usize, mode: MvMode) {
    let run = |ctx: &Context, w: &[u8], x: &[f32], gam: &[f32], y0: &[f32]| {
        mvq_host(ctx, ty, w, k, x, Some(gam), Some(y0), mode).unwrap()
    };
    // A value at a rounding tie may land one int8 step apart on the two sides.
    common::check(
        ctx,
        rng,
        ty,
        outs,
        k,
        mode,
        run,
        quantized_input,
        (1e-4, 1e-5),
    );
}

fn case(ty: GgmlType) {
    let ctxs = contexts();
    if ctxs.is_empty() {
        return;
    }
    let mut rng = rng(&format!("mvq {ty}"));
    let bs = ty.block_size();
    let ks = [bs, 3 * bs, 4096 + bs];
    for (ci, ctx) in ctxs.iter().enumerate() {
        for (mi, mode) in modes().into_iter().enumerate() {
            for (ki, &k) in ks.iter().enumerate() {
                // Every size on the default shapes; a rotating subset on the others.
                if ci > 1 && (mi + ki + ci) % 3 != 0 {
                    continue;
                }
                for outs in [1usize, 7, 333] {
                    check(ctx, &mut rng, ty, outs, k, mode);
                }
            }
        }
    }
}

#[test]
fn mvq_q4_0() {
    case(GgmlType::Q4_0);
}
#[test]
fn mvq_q8_0() {
    case(GgmlType::Q8_0);
}
#[test]
fn mvq_q4_k() {
    case(GgmlType::Q4_K);
}
#[test]
fn mvq_q6_k() {
    case(GgmlType::Q6_K);
}

/// Weights split over several buffers (pieces of whole gate/up pairs): one dispatch per
/// piece, same results.
#[test]
fn mvq_split_weights() {
    let opts = ContextOptions {
        max_buffer_bytes: Some(4096),
        ..Default::default()
    };
    let Some(ctx) = test_context("mvq split", &opts) else {
        return;
    };
    let mut rng = rng("mvq split");
    for ty in [GgmlType::Q4_0, GgmlType::Q6_K] {
        for mode in modes() {
            check(&ctx, &mut rng, ty, 45, 256, mode);
        }
    }
}

/// `MV_TAIL`: the workgroup completing each block of 32 outputs quantizes it for the
/// next mat-vec (times the next norm's weights, with the block's sum of squares), over
/// several pieces and launch shapes, through the atomic count and inside a workgroup
/// (`MV_BLK`); then `MV_XNORM`: the next mat-vec, reading those
/// sums, equals the one on the quant_x-normed input.
#[test]
fn mvq_tail_quantizes_the_output() {
    use caldera_vulkan::ops::{MvTail, Mvq, Q8Acts, QuantX};
    use caldera_vulkan::MemoryKind;
    let mut rng = rng("mvq tail");
    // Beyond the launch shapes: weights split into pieces (some not starting on a block
    // of 32 outputs), with the subgroup-per-output layout too; and that layout's block
    // tails (`MV_BLK`): off (the atomic count per output), counted per workgroup of one
    // subgroup and of 4, and wide (32 subgroups quantizing their block themselves).
    let sg = |block: Option<u32>, wide: u32, split: bool| ContextOptions {
        max_buffer_bytes: split.then_some(64 * 1024),
        mv_subgroup_rows: Some(true),
        mv_block: block,
        mv_wide: Some(wide),
        ..Default::default()
    };
    let split = ContextOptions {
        max_buffer_bytes: Some(64 * 1024),
        ..Default::default()
    };
    let extra: Vec<Context> = [
        split,
        sg(None, 0, true),
        sg(Some(0), 0, false),
        sg(Some(1), 0, false),
        sg(Some(4), 0, true),
        sg(None, 2, false),
        sg(None, 2, true),
    ]
    .iter()
    .filter_map(|o| test_context("mvq tail shapes", o))
    .collect();
    let mut ctxs: Vec<&Context> = contexts().iter().collect();
    ctxs.extend(extra.iter());
    for ctx in ctxs {
        let t = ctx.tuning();
        for (norm, add, glu, rows) in [
            (true, true, false, 1024usize),
            (false, false, true, 352),
            (true, false, false, 96),
            (true, false, true, 160),
        ] {
            let (ty, k) = (GgmlType::Q4_K, 512usize);
            let wrows = if glu { 2 * rows } else { rows };
            let w = quantize(ty, &random_vec(&mut rng, wrows * k, 1.0)).unwrap();
            let wt = ctx
                .upload_rows_grouped(&[&w], ty.row_bytes(k as u64).unwrap(), 1 + glu as u64)
                .unwrap();
            let x = random_vec(&mut rng, k, 2.0);
            let y0 = random_vec(&mut rng, rows, 1.0);
            let gam = random_vec(&mut rng, rows, 1.5);
            let xb = ctx.upload_f32(&x).unwrap();
            let yb = ctx.upload_f32(&y0).unwrap();
            let gb = ctx.upload_f32(&gam).unwrap();
            let dev = |n: usize| ctx.create_buffer(n as u64, MemoryKind::Device).unwrap();
            let (q_in, d_in) = (dev(k), dev(k / 8));
            let (q_out, d_out, ss_out) = (dev(rows), dev(rows / 8), dev(rows / 8));
            let count = ctx.upload(&vec![0u8; rows / 8]).unwrap();
            let acts = Q8Acts {
                q: &q_in,
                d: &d_in,
                ss: None,
            };
            let qx = QuantX::new(ctx, k as u64, &xb, None, 0.0, &acts).unwrap();
            let tail = MvTail {
                count: &count,
                out: Q8Acts {
                    q: &q_out,
                    d: &d_out,
                    ss: norm.then_some(&ss_out),
                },
                gam: norm.then_some(&gb),
                n: rows as u64,
            };
            let mode = MvMode {
                add,
                glu: glu.then_some(caldera_vulkan::ops::GluAct::Silu),
                ..Default::default()
            };
            let op =
                Mvq::with_tail(ctx, ty, &wt, k as u64, &acts, &yb, 0, mode, Some(&tail)).unwrap();
            // The next mat-vec (Q8_0, rows -> 37 outputs) on the tail's output.
            let (ty2, outs2) = (GgmlType::Q8_0, 37usize);
            let w2 = quantize(ty2, &random_vec(&mut rng, outs2 * rows, 1.0)).unwrap();
            let wt2 = ctx
                .upload_rows(&w2, ty2.row_bytes(rows as u64).unwrap())
                .unwrap();
            let y2 = dev(outs2 * 4);
            let acts2 = Q8Acts {
                q: &q_out,
                d: &d_out,
                ss: norm.then_some(&ss_out),
            };
            let mode2 = MvMode {
                eps: 1e-6,
                ..Default::default()
            };
            let op2 = Mvq::new(ctx, ty2, &wt2, rows as u64, &acts2, &y2, 0, mode2).unwrap();
            let rec = ctx
                .record(|r| {
                    qx.record(r)?;
                    r.barrier();
                    op.record(r)?;
                    r.barrier();
                    op2.record(r)
                })
                .unwrap();
            ctx.submit(&rec).unwrap();
            let y = ctx.read_f32(&yb, rows).unwrap();
            let q = ctx.read_buffer(&q_out, 0, rows as u64).unwrap();
            let d = ctx.read_f32(&d_out, rows / 32).unwrap();
            let cnt = ctx.read_buffer(&count, 0, (rows / 8) as u64).unwrap();
            assert!(cnt.iter().all(|&c| c == 0), "counts not reset");
            let scaled: Vec<f32> = if norm {
                y.iter().zip(&gam).map(|(a, b)| a * b).collect()
            } else {
                y.clone()
            };
            let want = quantized_input(&scaled, &gam, MvMode::default());
            for i in 0..rows {
                let got = q[i] as i8 as f64 * d[i / 32] as f64;
                assert!(
                    (got - want[i]).abs() <= 1.01 * d[i / 32] as f64 + 1e-6,
                    "norm {norm} glu {glu} rows {rows} (wg {}, rows {}, block {}, wide {}): \
                     [{i}] got {got}, want {}",
                    t.mv_workgroup_size,
                    t.mv_rows,
                    t.mv_block,
                    t.mv_wide,
                    want[i]
                );
            }
            if norm {
                let ss = ctx.read_f32(&ss_out, rows / 32).unwrap();
                for (b, blk) in y.chunks(32).enumerate() {
                    let want: f64 = blk.iter().map(|&v| v as f64 * v as f64).sum();
                    assert!(
                        (ss[b] as f64 - want).abs() <= 1e-5 * want + 1e-6,
                        "block {b}: sum of squares {} want {want}",
                        ss[b]
                    );
                }
            }
            // The consumer equals a mat-vec on the quant_x-normed input.
            let mode_in = MvMode {
                norm,
                eps: 1e-6,
                ..Default::default()
            };
            let input = quantized_input(&y, &gam, mode_in);
            let (want2, mag2) = common::cpu_mv(ty2, &w2, &input, &[0.0; 37], MvMode::default());
            let got2 = ctx.read_f32(&y2, outs2).unwrap();
            for i in 0..outs2 {
                assert!(
                    (got2[i] as f64 - want2[i]).abs() <= 2e-3 * mag2[i] + 1e-5,
                    "next mat-vec, norm {norm} rows {rows}: [{i}] got {} want {}",
                    got2[i],
                    want2[i]
                );
            }
        }
    }
}
