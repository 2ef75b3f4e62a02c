//! The decode mat-vec kernels (`mv_*` / `mvg_*`, every weight type) and their fused
//! modes (input norm, residual add, gate/up GLU, softcap) against a CPU twin on fresh
//! random inputs with odd sizes, under several launch shapes and both reduction paths,
//! on the test device (lavapipe by default). Skips without a Vulkan device unless
//! `CALDERA_REQUIRE_VULKAN=1`. `CALDERA_TEST_SEED=N` replays a seed.

mod common;

use std::sync::OnceLock;

use caldera_format::GgmlType;
use caldera_vulkan::ops::{mv_host, MvMode};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions};
use common::{f32_input, modes, rng};
use rand::rngs::StdRng;

/// Launch shapes: the default, and (workgroup, outputs per group, shared-memory reduce)
/// variants that leave partial groups and partial block slots.
fn contexts() -> &'static [Context] {
    static CTX: OnceLock<Vec<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let mut v = Vec::new();
        let shapes: [(Option<u32>, Option<u32>, bool); 4] = [
            (None, None, false),
            (Some(16), Some(1), true),
            (Some(32), Some(3), false),
            (Some(256), Some(4), true),
        ];
        for (wg, rows, shared) in shapes {
            let opts = ContextOptions {
                mv_workgroup_size: wg,
                mv_rows: rows,
                force_shared_reduce: shared,
                ..Default::default()
            };
            match test_context("vulkan mv kernels", &opts) {
                Some(c) => v.push(c),
                None => break,
            }
        }
        v
    })
}

fn check(ctx: &Context, rng: &mut StdRng, ty: GgmlType, outs: usize, k: usize, mode: MvMode) {
    let run = |ctx: &Context, w: &[u8], x: &[f32], gam: &[f32], y0: &[f32]| {
        mv_host(ctx, ty, w, k, x, Some(gam), Some(y0), mode).unwrap()
    };
    common::check(ctx, rng, ty, outs, k, mode, run, f32_input, (2e-5, 1e-6));
}

fn case(ty: GgmlType) {
    let ctxs = contexts();
    if ctxs.is_empty() {
        return;
    }
    let mut rng = rng(&format!("mv {ty}"));
    let bs = ty.block_size();
    let ks: Vec<usize> = if bs == 1 {
        vec![1, 35, 4099]
    } else {
        vec![bs, 3 * bs, 4096 + bs]
    };
    for (ci, ctx) in ctxs.iter().enumerate() {
        for (mi, mode) in modes().into_iter().enumerate() {
            for (ki, &k) in ks.iter().enumerate() {
                // Every size on the default shape; a rotating subset on the others.
                if ci > 0 && (mi + ki + ci) % 3 != 0 {
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
fn mv_f32() {
    case(GgmlType::F32);
}
#[test]
fn mv_f16() {
    case(GgmlType::F16);
}
#[test]
fn mv_bf16() {
    case(GgmlType::BF16);
}
#[test]
fn mv_q4_0() {
    case(GgmlType::Q4_0);
}
#[test]
fn mv_q4_1() {
    case(GgmlType::Q4_1);
}
#[test]
fn mv_q5_0() {
    case(GgmlType::Q5_0);
}
#[test]
fn mv_q5_1() {
    case(GgmlType::Q5_1);
}
#[test]
fn mv_q8_0() {
    case(GgmlType::Q8_0);
}
#[test]
fn mv_q4_k() {
    case(GgmlType::Q4_K);
}
#[test]
fn mv_q5_k() {
    case(GgmlType::Q5_K);
}
#[test]
fn mv_q6_k() {
    case(GgmlType::Q6_K);
}
#[test]
fn mv_iq4_xs() {
    case(GgmlType::IQ4_XS);
}

/// Weights split over several buffers (pieces of whole gate/up pairs): one dispatch per
/// piece, same results.
#[test]
fn mv_split_weights() {
    let opts = ContextOptions {
        max_buffer_bytes: Some(4096),
        ..Default::default()
    };
    let Some(ctx) = test_context("mv split", &opts) else {
        return;
    };
    let mut rng = rng("mv split");
    for ty in [GgmlType::Q4_0, GgmlType::Q6_K] {
        for mode in modes() {
            check(&ctx, &mut rng, ty, 45, 256, mode);
        }
    }
}
