//! The batched mat-vec kernels (`mm_*`, every weight type the models use) and the
//! fused modes of each against their CPU twins on fresh random inputs with odd sizes, on
//! the test device (lavapipe by default), with the tiled matmul switched off (its own
//! twins are in `mmt.rs`). Skips without a Vulkan device unless
//! `CALDERA_REQUIRE_VULKAN=1`. `CALDERA_TEST_SEED=N` replays a seed.

mod common;

use std::sync::OnceLock;

use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{mm_host, GluAct, MmMode};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions};
use common::{cpu_mm, random_vec, rng};
use rand::rngs::StdRng;

fn ctx() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    let opts = ContextOptions {
        force_no_tiled_mm: true,
        ..Default::default()
    };
    CTX.get_or_init(|| test_context("vulkan model kernels", &opts))
        .as_ref()
}

#[allow(clippy::too_many_arguments)]
fn check(
    ctx: &Context,
    rng: &mut StdRng,
    ty: GgmlType,
    rows: usize,
    k: usize,
    m: usize,
    mode: MmMode,
) {
    let w = quantize(ty, &random_vec(rng, rows * k, 1.0)).unwrap();
    let width = if mode.glu.is_some() { 2 * k } else { k };
    let x = random_vec(rng, m * width, 2.0);
    let gam = random_vec(rng, k, 1.5);
    let y0 = random_vec(rng, m * rows, 1.0);
    let got = mm_host(ctx, ty, &w, k, &x, m, Some(&gam), Some(&y0), mode).unwrap();
    let (want, mag) = cpu_mm(ty, &w, k, &x, m, Some(&gam), Some(&y0), mode);
    assert_eq!(got.len(), m * rows);
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i]).abs();
        assert!(
            err <= 2e-5 * mag[i] + 1e-6,
            "{ty} {rows}x{k}, {m} tokens, {mode:?}: [{}][{}] got {}, want {} (scale {})",
            i / rows,
            i % rows,
            got[i],
            want[i],
            mag[i]
        );
    }
}

fn case(ty: GgmlType) {
    let Some(ctx) = ctx() else { return };
    let mut rng = rng(&format!("mm {ty}"));
    let bs = ty.block_size();
    // (F32 with k a multiple of 4 and 2-16 tokens takes mm.glsl's rows_f32: the last k,
    // which the fused modes below use, and the 11- and 16-token shapes; 17 tokens and
    // the odd k the general path.)
    let ks: Vec<usize> = if bs == 1 {
        vec![1, 37, 96 + 5, 100]
    } else if bs == 32 {
        vec![32, 96 + 32 * 3]
    } else {
        vec![256, 768]
    };
    for &k in &ks {
        for &(rows, m) in &[(1usize, 1usize), (37, 1), (13, 11)] {
            check(ctx, &mut rng, ty, rows, k, m, MmMode::default());
        }
        if bs == 1 {
            for &(rows, m) in &[(3usize, 2usize), (7, 16), (5, 17)] {
                check(ctx, &mut rng, ty, rows, k, m, MmMode::default());
            }
        }
    }
    // Each fused mode once, on an odd shape with a partial token tile.
    let k = ks[ks.len() - 1];
    let eps = 1e-5;
    for mode in [
        MmMode {
            norm: true,
            eps,
            ..Default::default()
        },
        MmMode {
            add: true,
            glu: Some(GluAct::Silu),
            ..Default::default()
        },
        MmMode {
            glu: Some(GluAct::GeluTanh),
            ..Default::default()
        },
        MmMode {
            norm: true,
            softcap: Some(3.0),
            eps,
            ..Default::default()
        },
    ] {
        check(ctx, &mut rng, ty, 19, k, 9, mode);
    }
}

#[test]
fn mm_f32() {
    case(GgmlType::F32);
}
#[test]
fn mm_f16() {
    case(GgmlType::F16);
}
#[test]
fn mm_bf16() {
    case(GgmlType::BF16);
}
#[test]
fn mm_q4_0() {
    case(GgmlType::Q4_0);
}
#[test]
fn mm_q4_1() {
    case(GgmlType::Q4_1);
}
#[test]
fn mm_q5_0() {
    case(GgmlType::Q5_0);
}
#[test]
fn mm_q5_1() {
    case(GgmlType::Q5_1);
}
#[test]
fn mm_q8_0() {
    case(GgmlType::Q8_0);
}
#[test]
fn mm_q4_k() {
    case(GgmlType::Q4_K);
}
#[test]
fn mm_q5_k() {
    case(GgmlType::Q5_K);
}
#[test]
fn mm_q6_k() {
    case(GgmlType::Q6_K);
}
#[test]
fn mm_iq4_xs() {
    case(GgmlType::IQ4_XS);
}
