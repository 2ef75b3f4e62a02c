//! The batched decode mat-vec on int8 activations (`quant_rows` + `mvqm_*`, and the old
//! `mvqn_*`: Q4_0, Q8_0, Q4_K, Q6_K) against a CPU twin that quantizes each column the
//! same way, on fresh random inputs: 1, 3, 8, 9 and 16 columns (every count 1..=16 on
//! one size) dispatched over their bucket (the padding columns must write nothing), odd
//! row counts, strided and offset outputs, the input norm or the GLU input in
//! `quant_rows`, with and without its block sums, the residual add and softcap,
//! weights split over several buffers, with int8 dot products and with their
//! emulation, both reductions, all kernels (`mvqm_*` with 4 and 8 rows per workgroup,
//! `mvqn_*`).
//! Skips without a Vulkan device unless `CALDERA_REQUIRE_VULKAN=1`.
//! `CALDERA_TEST_SEED=N` replays a seed.

mod common;

use caldera_format::quant::{dequantize, quantize};
use caldera_format::GgmlType;
use caldera_vulkan::ops::{GluAct, Mvqn, Q8Acts, QuantRows};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions, MemoryKind};
use common::{batch_input, random_vec, rng, words};
use rand::rngs::StdRng;

#[derive(Clone, Copy, Debug)]
struct Mode {
    norm: bool,
    glu: Option<GluAct>,
    add: bool,
    softcap: Option<f32>,
}

/// Column x (k values, or k (gate, up) pairs with `glu`) as quant_rows makes it: (norm
/// or GLU,) blocks of 32 to int8 with d = max|v| / 127, back to f64; and the largest d.
fn quantized(x: &[f32], gam: &[f32], k: usize, mode: Mode) -> (Vec<f64>, f64) {
    let v = batch_input(x, gam, k, mode.norm, mode.glu);
    let mut out = Vec::with_capacity(k);
    let mut dmax = 0f64;
    for b in v.chunks(32) {
        let amax = b.iter().fold(0f32, |m, &t| m.max(t.abs()));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let d = amax / 127.0;
        dmax = dmax.max(d as f64);
        for &t in b {
            let q = (t * id).round_ties_even().clamp(-127.0, 127.0);
            out.push(q as f64 * d as f64);
        }
    }
    (out, dmax)
}

#[allow(clippy::too_many_arguments)]
fn run(
    ctx: &Context,
    rng: &mut StdRng,
    ty: GgmlType,
    rows: usize,
    k: usize,
    cols: usize,
    mode: Mode,
) {
    let bucket = cols.next_power_of_two();
    let width = if mode.glu.is_some() { 2 * k } else { k };
    let ld_x = width + 4;
    let (y_off, ld_y) = (3usize, rows + 5);
    let wf = random_vec(rng, rows * k, 1.0);
    let w = quantize(ty, &wf).unwrap();
    let mut wd = vec![0f32; rows * k];
    dequantize(ty, &w, &mut wd).unwrap();
    let wt = ctx
        .upload_rows(&w, ty.row_bytes(k as u64).unwrap())
        .unwrap();
    let x = random_vec(rng, bucket * ld_x, 2.0);
    let gam = random_vec(rng, k, 1.5);
    let y0 = random_vec(rng, bucket * ld_y, 1.0);
    let xb = ctx.upload_f32(&x).unwrap();
    let gb = ctx.upload_f32(&gam).unwrap();
    let yb = ctx.upload_f32(&y0).unwrap();
    let dev = |n: usize| ctx.create_buffer(n as u64, MemoryKind::Device).unwrap();
    let (q, d) = (dev(bucket * k), dev(bucket * k / 8));
    // quant_rows' block sums for the grouped kernels on every other column count.
    let sums = cols.is_multiple_of(2).then(|| dev(bucket * k / 8));
    let acts = Q8Acts {
        q: &q,
        d: &d,
        ss: None,
    };
    let step = ctx
        .upload(&words(&[cols as u32, 0, 0, cols as u32]))
        .unwrap();
    let b = bucket as u64;
    let gam_arg = mode.norm.then_some(&gb);
    let qr = QuantRows::new(
        ctx,
        k as u64,
        &xb,
        ld_x as u64,
        gam_arg,
        mode.glu,
        1e-6,
        &acts,
        sums.as_ref(),
        &step,
        b,
    )
    .unwrap();
    let mv = Mvqn::new(
        ctx,
        ty,
        &wt,
        k as u64,
        &acts,
        sums.as_ref(),
        &yb,
        ld_y as u64,
        y_off as u64,
        mode.add,
        mode.softcap,
        &step,
        b,
    )
    .unwrap();
    let rec = ctx
        .record(|r| {
            qr.record(r)?;
            r.barrier();
            mv.record(r)
        })
        .unwrap();
    ctx.submit(&rec).unwrap();
    let got = ctx.read_f32(&yb, bucket * ld_y).unwrap();
    if rows * ty.row_bytes(k as u64).unwrap() as usize > 64 * 1024 {
        assert!(
            ctx.max_buffer_bytes() > 64 * 1024 || wt.pieces.len() > 1,
            "the weights were not split"
        );
    }
    let what = format!(
        "{ty}: {rows} x {k}, {cols} columns, {mode:?} (subgroup {}, int8 dot {}, old {}, \
         kernel {:?}, sums {}, pieces {})",
        ctx.tuning().subgroup_reduce,
        ctx.tuning().int8_dot,
        ctx.tuning().mvqn_old,
        ctx.tuning().mvqn_variant(),
        sums.is_some(),
        wt.pieces.len()
    );
    for c in 0..bucket {
        let xq = (c < cols).then(|| quantized(&x[c * ld_x..], &gam, k, mode));
        for i in 0..ld_y {
            let at = c * ld_y + i;
            let in_rows = i >= y_off && i < y_off + rows;
            let Some((xq, dmax)) = xq.as_ref().filter(|_| in_rows) else {
                // Padding columns and the stride's gaps: untouched.
                assert_eq!(got[at], y0[at], "{what}: y[{c}][{i}] was written");
                continue;
            };
            let r = i - y_off;
            let row = &wd[r * k..(r + 1) * k];
            let dot: f64 = row.iter().zip(xq).map(|(&a, &b)| a as f64 * b).sum();
            let mag: f64 = row
                .iter()
                .zip(xq)
                .map(|(&a, &b)| (a as f64 * b).abs())
                .sum();
            let mut want = dot;
            if let Some(cap) = mode.softcap {
                want = cap as f64 * (want / cap as f64).tanh();
            }
            if mode.add {
                want += y0[at] as f64;
            }
            // The input norm or GLU in f32 (device) and f64 (here): a value at a
            // rounding tie may land one int8 step apart (one step of one element).
            let wmax = row.iter().fold(0f64, |m, &a| m.max((a as f64).abs()));
            let tol = 1e-4 * mag + 1.01 * dmax * wmax + 1e-5;
            assert!(
                (got[at] as f64 - want).abs() <= tol,
                "{what}: y[{c}][{i}] = {}, want {want}",
                got[at]
            );
        }
    }
}

fn contexts() -> Vec<Context> {
    let mut v = Vec::new();
    for (shared, no_dot, old, rows) in [
        (false, false, false, 4),
        (true, true, false, 4),
        (false, true, false, 4),
        (false, false, true, 4),
        (true, true, true, 4),
        (false, false, false, 8),
        (true, true, false, 8),
    ] {
        let opts = ContextOptions {
            force_shared_reduce: shared,
            force_no_int8_dot: no_dot,
            force_old_mvqn: old,
            mvqm_rows: Some(rows),
            ..Default::default()
        };
        match test_context("mvqn", &opts) {
            Some(c) => v.push(c),
            None => break,
        }
    }
    v
}

fn case(ty: GgmlType) {
    let ctxs = contexts();
    let mut rng = rng(&format!("mvqn {ty}"));
    let bs = ty.block_size();
    let modes = [
        Mode {
            norm: true,
            glu: None,
            add: false,
            softcap: None,
        },
        Mode {
            norm: false,
            glu: None,
            add: true,
            softcap: None,
        },
        Mode {
            norm: false,
            glu: Some(GluAct::Silu),
            add: true,
            softcap: None,
        },
        Mode {
            norm: false,
            glu: Some(GluAct::GeluTanh),
            add: false,
            softcap: Some(3.0),
        },
    ];
    for (ci, ctx) in ctxs.iter().enumerate() {
        for (mi, &mode) in modes.iter().enumerate() {
            for cols in [1usize, 3, 8, 9, 16] {
                // 70 blocks: several rounds of a workgroup's blocks, the last partial.
                for (rows, k) in [(1usize, bs), (7, 3 * bs), (333, 2 * bs), (5, 70 * bs)] {
                    // Every size on the default context; a rotating subset on the others.
                    if ci > 0 && (mi + cols + rows) % 3 != 0 {
                        continue;
                    }
                    run(ctx, &mut rng, ty, rows, k, cols, mode);
                }
            }
        }
        // Every column count, one size.
        for cols in 1..=16usize {
            if ci > 0 && cols % 5 != ci % 5 {
                continue;
            }
            run(ctx, &mut rng, ty, 45, 2 * bs, cols, modes[cols % 4]);
        }
    }
}

#[test]
fn mvqn_q4_0() {
    case(GgmlType::Q4_0);
}
#[test]
fn mvqn_q8_0() {
    case(GgmlType::Q8_0);
}
#[test]
fn mvqn_q4_k() {
    case(GgmlType::Q4_K);
}
#[test]
fn mvqn_q6_k() {
    case(GgmlType::Q6_K);
}

/// Weights split over several buffers: one dispatch per piece, same results.
#[test]
fn mvqn_split_weights() {
    let opts = ContextOptions {
        max_buffer_bytes: Some(64 * 1024),
        ..Default::default()
    };
    let Some(ctx) = test_context("mvqn split", &opts) else {
        return;
    };
    let mut rng = rng("mvqn split");
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0] {
        for cols in [3usize, 16] {
            for (norm, add) in [(true, false), (false, true)] {
                let mode = Mode {
                    norm,
                    glu: None,
                    add,
                    softcap: None,
                };
                run(&ctx, &mut rng, ty, 333, 512, cols, mode);
            }
        }
    }
}
