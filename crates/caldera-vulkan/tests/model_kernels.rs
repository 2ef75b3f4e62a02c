//! The batched mat-vec kernels (`mm_*`, every weight type the models use) and the
//! fused modes of each against their CPU twins on fresh random inputs with odd sizes, on
//! the test device (lavapipe by default). Skips without a Vulkan device unless
//! `CALDERA_REQUIRE_VULKAN=1`. `CALDERA_TEST_SEED=N` replays a seed.

mod common;

use std::sync::OnceLock;

use caldera_format::quant::{dequantize, quantize};
use caldera_format::GgmlType;
use caldera_vulkan::ops::{mm_host, GluAct, MmMode};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions};
use common::{gelu_tanh, random_vec, rng, silu};
use rand::rngs::StdRng;

fn ctx() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| test_context("vulkan model kernels", &ContextOptions::default()))
        .as_ref()
}

/// CPU twin of `mm_host`: dequantized rows, f64 sums. Returns (y, scale of each y).
#[allow(clippy::too_many_arguments)]
fn cpu_mm(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    gam: Option<&[f32]>,
    y0: Option<&[f32]>,
    mode: MmMode,
) -> (Vec<f64>, Vec<f64>) {
    let row_bytes = ty.row_bytes(k as u64).unwrap() as usize;
    let rows = w.len() / row_bytes;
    let width = if mode.glu.is_some() { 2 * k } else { k };
    let mut deq = vec![0f32; k];
    let mut y = vec![0f64; m * rows];
    let mut mag = vec![0f64; m * rows];
    for t in 0..m {
        let xr = &x[t * width..(t + 1) * width];
        let input: Vec<f64> = match (mode.norm, mode.glu) {
            (true, _) => {
                let ss = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
                let inv = 1.0 / (ss + mode.eps as f64).sqrt();
                (0..k)
                    .map(|c| xr[c] as f64 * inv * gam.unwrap()[c] as f64)
                    .collect()
            }
            (false, Some(GluAct::Silu)) => (0..k)
                .map(|c| silu(xr[2 * c] as f64) * xr[2 * c + 1] as f64)
                .collect(),
            (false, Some(GluAct::GeluTanh)) => (0..k)
                .map(|c| gelu_tanh(xr[2 * c] as f64) * xr[2 * c + 1] as f64)
                .collect(),
            (false, None) => xr.iter().map(|&v| v as f64).collect(),
        };
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            dequantize(ty, row, &mut deq).unwrap();
            let (mut s, mut a) = (0f64, 0f64);
            for c in 0..k {
                s += deq[c] as f64 * input[c];
                a += (deq[c] as f64 * input[c]).abs();
            }
            if let Some(cap) = mode.softcap {
                s = cap as f64 * (s / cap as f64).tanh();
            }
            if mode.add {
                let b = y0.unwrap()[t * rows + r] as f64;
                s += b;
                a += b.abs();
            }
            y[t * rows + r] = s;
            mag[t * rows + r] = a;
        }
    }
    (y, mag)
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
    let ks: Vec<usize> = if bs == 1 {
        vec![1, 37, 96 + 5]
    } else if bs == 32 {
        vec![32, 96 + 32 * 3]
    } else {
        vec![256, 768]
    };
    for &k in &ks {
        for &(rows, m) in &[(1usize, 1usize), (37, 1), (13, 11)] {
            check(ctx, &mut rng, ty, rows, k, m, MmMode::default());
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
