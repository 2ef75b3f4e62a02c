//! The tiled prefill matmul (`mmt_*`, every weight type the models use) against its CPU
//! twin (`dequantize` + f64 sums, `common::cpu_mm`) on fresh random inputs with odd
//! sizes: rows not a multiple of the 128-row tile, token counts not a multiple of the
//! 64-token tile, k over several blocks (and, for float weights, not whole groups of
//! 32), each fused mode; plus strided x / y, output offsets, logits-row selection and
//! weights split in pieces. Every case runs on `mmt.glsl` (f32 FMA) and, where the
//! device multiplies cooperative matrices, on `mmc.glsl` with and without its
//! prefetch (skipped with a note
//! elsewhere, a failure under `CALDERA_REQUIRE_COOPMAT=1`). Skips without a Vulkan
//! device unless `CALDERA_REQUIRE_VULKAN=1`. `CALDERA_TEST_SEED=N` replays a seed.

mod common;

use std::sync::OnceLock;

use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{GluAct, Mm, MmIo, MmMode};
use caldera_vulkan::testing::{coopmat_context, test_context};
use caldera_vulkan::{Context, ContextOptions, MemoryKind};
use common::{cpu_mm, random_vec, rng, words};
use rand::rngs::StdRng;

/// The `mmt.glsl` context (cooperative matrices off).
fn ctx() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| test_context("tiled matmul", &mmt_opts()))
        .as_ref()
}

fn mmt_opts() -> ContextOptions {
    ContextOptions {
        force_no_coopmat: true,
        ..Default::default()
    }
}

/// The `mmc.glsl` context, where the device has cooperative matrices.
fn coop_ctx() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let opts = ContextOptions {
            coopmat_prefetch: Some(false),
            ..Default::default()
        };
        coopmat_context("coopmat tiled matmul", &opts)
    })
    .as_ref()
}

/// The `mmc.glsl` context loading the next step before the products.
fn coop_prefetch_ctx() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let opts = ContextOptions {
            coopmat_prefetch: Some(true),
            ..Default::default()
        };
        coopmat_context("coopmat tiled matmul, prefetch", &opts)
    })
    .as_ref()
}

/// The contexts that exist.
fn contexts() -> Vec<&'static Context> {
    ctx()
        .into_iter()
        .chain(coop_ctx())
        .chain(coop_prefetch_ctx())
        .collect()
}

/// The error bound of an output of error scale `mag` (sum of |w x| and of |y0|), `k`
/// products. `mmt.glsl` sums f32 products of f32 values. `mmc.glsl` rounds both factors
/// to f16 (2^-11 relative each, so 2^-10 of the product), doubled for the f32 sums of
/// the matrix units, whose order and rounding are the device's; plus f16's subnormals
/// (under 2^-14, absolute error up to 2^-25 per factor, times the other factor: the
/// test's are under 4) on each of the k products.
fn tolerance(coop: bool, mag: f64, k: usize) -> f64 {
    if coop {
        2.0 * mag / 1024.0 + k as f64 * 4.0 * 2f64.powi(-25) + 1e-6
    } else {
        2e-5 * mag + 1e-6
    }
}

/// Where the case puts its tokens: x rows `ld_x` apart (at least the input width), y
/// rows `ld_y` apart with the weight's row 0 at `y_offset`, and the tokens the kernel
/// runs over: `first .. first + count` of `m` (logits-row selection) or all of them.
#[derive(Clone, Copy)]
struct Layout {
    pad_x: usize,
    pad_y: usize,
    y_offset: usize,
    select: Option<(usize, usize)>,
}

const PLAIN: Layout = Layout {
    pad_x: 0,
    pad_y: 0,
    y_offset: 0,
    select: None,
};

#[allow(clippy::too_many_arguments)]
fn check(
    ctx: &Context,
    rng: &mut StdRng,
    ty: GgmlType,
    rows: usize,
    k: usize,
    m: usize,
    mode: MmMode,
    lay: Layout,
) {
    let w = quantize(ty, &random_vec(rng, rows * k, 1.0)).unwrap();
    let width = if mode.glu.is_some() { 2 * k } else { k };
    let (ld_x, ld_y) = (width + lay.pad_x, lay.y_offset + rows + lay.pad_y);
    let x = random_vec(rng, m * ld_x, 2.0);
    let gam = random_vec(rng, k, 1.5);
    let y0 = random_vec(rng, m * ld_y, 1.0);
    let (first, count) = lay.select.unwrap_or((0, m));

    let wt = ctx
        .upload_rows(&w, ty.row_bytes(k as u64).unwrap())
        .unwrap();
    let xb = ctx.upload_f32(&x).unwrap();
    let yb = ctx.upload_f32(&y0).unwrap();
    let gb = ctx.upload_f32(&gam).unwrap();
    let step = ctx.create_buffer(16, MemoryKind::Upload).unwrap();
    let vals = [m as u32, 0, first as u32, count as u32];
    ctx.write_mapped(&step, 0, &words(&vals)).unwrap();
    let io = MmIo {
        x: &xb,
        ld_x: ld_x as u64,
        y: &yb,
        ld_y: ld_y as u64,
        y_offset: lay.y_offset as u64,
        gam: mode.norm.then_some(&gb),
        step: &step,
        max_tokens: m as u64,
    };
    let mode = MmMode {
        token_select: lay.select.is_some(),
        ..mode
    };
    let op = Mm::new(ctx, ty, &wt, k as u64, &io, mode).unwrap();
    assert!(op.tiled(), "{ty}: {m} tokens should run the tiled matmul");
    let coop = op.coopmat();
    assert_eq!(coop, ctx.tuning().coopmat_mm.is_some());
    let rec = ctx.record(|r| op.record(r)).unwrap();
    ctx.submit(&rec).unwrap();
    let got = ctx.read_f32(&yb, m * ld_y).unwrap();

    // The twin on the selected tokens, packed; output row j is token first + j.
    let xs: Vec<f32> = (first..first + count)
        .flat_map(|t| x[t * ld_x..t * ld_x + width].iter().copied())
        .collect();
    let y0s: Vec<f32> = (0..count)
        .flat_map(|j| {
            let b = j * ld_y + lay.y_offset;
            y0[b..b + rows].iter().copied()
        })
        .collect();
    let (want, mag) = cpu_mm(ty, &w, k, &xs, count, Some(&gam), Some(&y0s), mode);
    let what = format!(
        "{} {ty} {rows}x{k}, {m} tokens ({first}+{count}), ld {ld_x}/{ld_y}, offset {}, \
         {} pieces, {mode:?}",
        if coop { "mmc" } else { "mmt" },
        lay.y_offset,
        wt.pieces.len()
    );
    for t in 0..m {
        for i in 0..ld_y {
            let g = got[t * ld_y + i] as f64;
            let r = i.wrapping_sub(lay.y_offset);
            if t < count && r < rows {
                let (want, mag) = (want[t * rows + r], mag[t * rows + r]);
                assert!(
                    (g - want).abs() <= tolerance(coop, mag, k),
                    "{what}: [{t}][{r}] got {g}, want {want} (scale {mag})"
                );
            } else {
                assert_eq!(g, y0[t * ld_y + i] as f64, "{what}: [{t}][{i}] was written");
            }
        }
    }
}

fn modes() -> Vec<MmMode> {
    let eps = 1e-5;
    vec![
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
            add: true,
            eps,
            ..Default::default()
        },
    ]
}

fn case(ty: GgmlType) {
    for ctx in contexts() {
        case_on(ctx, ty);
    }
}

fn case_on(ctx: &Context, ty: GgmlType) {
    if !ctx.tuning().tiled_mm {
        eprintln!(
            "skipping tiled matmul {ty}: {} cannot run it",
            ctx.info().name
        );
        return;
    }
    let mut rng = rng(&format!("mmt {ty}"));
    let k = match ty.block_size() {
        1 => 101,
        32 => 32 * 5,
        _ => 256 * 3,
    };
    // One partial row tile, two (the second partial); one partial token tile, two.
    for &(rows, m) in &[(37usize, 5usize), (131, 70), (128, 64)] {
        check(ctx, &mut rng, ty, rows, k, m, MmMode::default(), PLAIN);
    }
    for mode in modes() {
        check(ctx, &mut rng, ty, 133, k, 67, mode, PLAIN);
    }
    if ty.block_size() == 1 {
        check(ctx, &mut rng, ty, 19, 37, 3, MmMode::default(), PLAIN);
    }
}

#[test]
fn mmt_f32() {
    case(GgmlType::F32);
}
#[test]
fn mmt_f16() {
    case(GgmlType::F16);
}
#[test]
fn mmt_bf16() {
    case(GgmlType::BF16);
}
#[test]
fn mmt_q4_0() {
    case(GgmlType::Q4_0);
}
#[test]
fn mmt_q4_1() {
    case(GgmlType::Q4_1);
}
#[test]
fn mmt_q5_0() {
    case(GgmlType::Q5_0);
}
#[test]
fn mmt_q5_1() {
    case(GgmlType::Q5_1);
}
#[test]
fn mmt_q8_0() {
    case(GgmlType::Q8_0);
}
#[test]
fn mmt_q4_k() {
    case(GgmlType::Q4_K);
}
#[test]
fn mmt_q5_k() {
    case(GgmlType::Q5_K);
}
#[test]
fn mmt_q6_k() {
    case(GgmlType::Q6_K);
}
#[test]
fn mmt_iq4_xs() {
    case(GgmlType::IQ4_XS);
}

/// Strides past the input width and output rows, an output offset, the logits-row
/// selection (a window of tokens past the first), and a weight split into pieces by a
/// small buffer limit (each piece one dispatch at its own output offset).
#[test]
fn mmt_layouts_and_pieces() {
    if let Some(base) = ctx() {
        layouts_and_pieces(base, mmt_opts());
    }
    if let Some(base) = coop_ctx() {
        layouts_and_pieces(base, ContextOptions::default());
    }
}

fn layouts_and_pieces(base: &Context, opts: ContextOptions) {
    if !base.tuning().tiled_mm {
        return;
    }
    let mut rng = rng("mmt layouts");
    let lay = Layout {
        pad_x: 7,
        pad_y: 5,
        y_offset: 11,
        select: None,
    };
    let sel = Layout {
        select: Some((3, 66)),
        ..lay
    };
    let eps = 1e-5;
    let norm = MmMode {
        norm: true,
        eps,
        ..Default::default()
    };
    for ty in [GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::F16] {
        check(base, &mut rng, ty, 150, 512, 70, MmMode::default(), lay);
        check(base, &mut rng, ty, 150, 512, 70, norm, sel);
    }
    // Buffers of at most 32 KiB: Q8_0 rows of 512 are 544 bytes, about 60 rows a piece.
    let small = test_context(
        "tiled matmul pieces",
        &ContextOptions {
            max_buffer_bytes: Some(32 << 10),
            ..opts
        },
    )
    .unwrap();
    for ty in [GgmlType::Q8_0, GgmlType::Q6_K] {
        check(&small, &mut rng, ty, 150, 512, 9, norm, lay);
    }
}
