//! The batched decode mat-vec on cooperative matrices (`half_rows` + `mvc_*`, every
//! weight type) against a CPU twin that rounds each column's input and each weight to
//! f16 as the kernel does, on fresh random inputs: 1, 3, 8, 9 and 16 columns (every
//! count 1..=16 on one size) dispatched over their bucket (the padding columns must
//! write nothing), odd row counts (a partial last tile of 32), k of one to several
//! rounds of 64 per subgroup (so some subgroups run a round past their last), strided
//! and offset outputs, the input norm or the GLU input in `half_rows`, the residual add
//! and softcap, weights split over several buffers.
//! Runs where the device has cooperative matrices (`CALDERA_REQUIRE_COOPMAT=1` makes
//! their absence a failure: CI runs it through a lavapipe that has them); skips without
//! a Vulkan device unless `CALDERA_REQUIRE_VULKAN=1`. `CALDERA_TEST_SEED=N` replays a
//! seed.

mod common;

use caldera_format::quant::{dequantize, quantize};
use caldera_format::GgmlType;
use caldera_vulkan::ops::{GluAct, HalfRows, Mvc};
use caldera_vulkan::testing::{coopmat_context, ENV_REQUIRE_COOPMAT};
use caldera_vulkan::{Context, ContextOptions, MemoryKind};
use common::{batch_input, random_vec, rng, words};
use half::f16;
use rand::rngs::StdRng;

#[derive(Clone, Copy, Debug)]
struct Mode {
    norm: bool,
    glu: Option<GluAct>,
    add: bool,
    softcap: Option<f32>,
}

fn round16(v: f32) -> f64 {
    f16::from_f32(v).to_f64()
}

/// Column x (k values, or k (gate, up) pairs with `glu`) as half_rows makes it: norm or
/// GLU in f32, then rounded to f16.
fn halved(x: &[f32], gam: &[f32], k: usize, mode: Mode) -> Vec<f64> {
    let v = batch_input(x, gam, k, mode.norm, mode.glu);
    v.into_iter().map(round16).collect()
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
    // The halves of all 16 columns (the kernel reads the dead ones too).
    let xh = ctx
        .create_buffer((Mvc::MAX_COLS as usize * k * 2) as u64, MemoryKind::Device)
        .unwrap();
    let step = ctx
        .upload(&words(&[cols as u32, 0, 0, cols as u32]))
        .unwrap();
    let b = bucket as u64;
    let hr = HalfRows::new(
        ctx,
        k as u64,
        &xb,
        ld_x as u64,
        mode.norm.then_some(&gb),
        mode.glu,
        1e-6,
        &xh,
        &step,
        b,
    )
    .unwrap();
    let mv = Mvc::new(
        ctx,
        ty,
        &wt,
        k as u64,
        &xh,
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
            hr.record(r)?;
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
        "{ty}: {rows} x {k}, {cols} columns, {mode:?} (shape {:?}, subgroup size {:?}, \
         pieces {})",
        ctx.tuning().coopmat_mm,
        ctx.tuning().mvc,
        wt.pieces.len()
    );
    let wh: Vec<f64> = wd.iter().map(|&v| round16(v)).collect();
    for c in 0..bucket {
        let xv = (c < cols).then(|| halved(&x[c * ld_x..], &gam, k, mode));
        for i in 0..ld_y {
            let at = c * ld_y + i;
            let in_rows = i >= y_off && i < y_off + rows;
            let Some(xv) = xv.as_ref().filter(|_| in_rows) else {
                // Padding columns and the stride's gaps: untouched.
                assert_eq!(got[at], y0[at], "{what}: y[{c}][{i}] was written");
                continue;
            };
            let r = i - y_off;
            let row = &wh[r * k..(r + 1) * k];
            let dot: f64 = row.iter().zip(xv).map(|(&a, &b)| a * b).sum();
            let mag: f64 = row.iter().zip(xv).map(|(&a, &b)| (a * b).abs()).sum();
            let mut want = dot;
            if let Some(cap) = mode.softcap {
                want = cap as f64 * (want / cap as f64).tanh();
            }
            if mode.add {
                want += y0[at] as f64;
            }
            // f32 sums on the device; a value at an f16 rounding tie (the norm and the
            // dequantization in f32 there, f64 / the CPU's order here) may land one f16
            // step apart: 2^-11 of one product.
            let tol = 1e-3 * mag + 1e-5;
            assert!(
                (got[at] as f64 - want).abs() <= tol,
                "{what}: y[{c}][{i}] = {}, want {want}",
                got[at]
            );
        }
    }
}

/// The context with the cooperative-matrix mat-vec, or `None` (skip) where the device
/// has none (a failure under `CALDERA_REQUIRE_COOPMAT=1`).
fn context(test: &str, opts: &ContextOptions) -> Option<Context> {
    let ctx = coopmat_context(test, opts)?;
    if ctx.tuning().mvc.is_none() {
        let required = std::env::var(ENV_REQUIRE_COOPMAT).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{test}: the device's cooperative matrices do not fit mvc.glsl ({:?})",
            ctx.tuning().coopmat_mm
        );
        eprintln!("{test}: no cooperative-matrix mat-vec on this device, skipping");
        return None;
    }
    Some(ctx)
}

const MODES: [Mode; 4] = [
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

/// Every type on one context: the sizes and modes rotate over the types, so each type
/// meets 1, several and many rounds, a partial row tile and several column counts.
#[test]
fn mvc_every_type() {
    let Some(ctx) = context("mvc", &ContextOptions::default()) else {
        return;
    };
    let mut rng = rng("mvc every type");
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_XS,
    ];
    for (ti, &ty) in types.iter().enumerate() {
        // k: whole blocks and whole rounds of 64.
        let unit = ty.block_size().max(64);
        for (si, (rows, k)) in [(1usize, unit), (33, 3 * unit), (77, 5 * unit)]
            .into_iter()
            .enumerate()
        {
            // One of the column counts 1, 3, 8, 9, 16 per size, rotating.
            let ci = ti + 2 * si;
            let cols = [1usize, 3, 8, 9, 16][ci % 5];
            run(&ctx, &mut rng, ty, rows, k, cols, MODES[ci % 4]);
        }
    }
}

/// Every column count on Q5_K (the most common type without an int8 mat-vec, which
/// batched steps run here), a quarter of them on three other types; every mode.
#[test]
fn mvc_every_column_count() {
    let Some(ctx) = context("mvc columns", &ContextOptions::default()) else {
        return;
    };
    let mut rng = rng("mvc columns");
    for (ti, ty) in [
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
        GgmlType::Q5_0,
    ]
    .into_iter()
    .enumerate()
    {
        let unit = ty.block_size().max(64);
        for cols in 1..=16usize {
            // Q5_K every count, the others a quarter of them each.
            if ti == 0 || cols % 4 == ti {
                run(&ctx, &mut rng, ty, 45, 2 * unit, cols, MODES[cols % 4]);
            }
        }
    }
}

/// Weights split over several buffers: one dispatch per piece, same results.
#[test]
fn mvc_split_weights() {
    let opts = ContextOptions {
        max_buffer_bytes: Some(64 * 1024),
        ..Default::default()
    };
    let Some(ctx) = context("mvc split", &opts) else {
        return;
    };
    let mut rng = rng("mvc split");
    for (ty, cols, mode) in [
        (GgmlType::Q4_K, 3usize, MODES[2]),
        (GgmlType::Q6_K, 16, MODES[0]),
        (GgmlType::Q8_0, 9, MODES[1]),
    ] {
        run(&ctx, &mut rng, ty, 333, 512, cols, mode);
    }
}
