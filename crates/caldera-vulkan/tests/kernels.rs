//! Every kernel against its CPU twin on fresh random inputs with odd sizes, on the test
//! device (lavapipe by default; `CALDERA_VK_DEVICE=N` picks another). Without a Vulkan
//! device the tests print a skip message and pass, unless `CALDERA_REQUIRE_VULKAN=1`.
//!
//! Each test runs twice over: with subgroup-arithmetic reductions (where the device has
//! them) and with the shared-memory fallback. `CALDERA_TEST_SEED=N` replays a seed.

mod common;

use std::sync::OnceLock;

use caldera_format::quant::{dequantize, quantize};
use caldera_format::GgmlType;
use caldera_vulkan::ops::{matvec_host, rms_norm_host, MatVec};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions, MemoryKind, VkError, KERNELS};
use common::rng;
use rand::rngs::StdRng;
use rand::Rng;

/// The two reduction variants (subgroup where supported, shared memory), opened once.
fn contexts() -> &'static [Context] {
    static CTX: OnceLock<Vec<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let mut v = Vec::new();
        if let Some(c) = test_context("vulkan kernel tests", &ContextOptions::default()) {
            let info = c.info();
            eprintln!(
                "testing on {:?} ({}, {}), tuning {:?}",
                info.name,
                info.device_type.name(),
                info.driver_info,
                c.tuning()
            );
            let has_sg = c.tuning().subgroup_reduce;
            v.push(c);
            if has_sg {
                let opts = ContextOptions {
                    force_shared_reduce: true,
                    ..Default::default()
                };
                if let Some(c) = test_context("vulkan kernel tests (shared reduce)", &opts) {
                    v.push(c);
                }
            }
        }
        v
    })
}

fn random_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// CPU twin: dequantize each row and dot with x in f64. Returns (y, Σ|w x| per row).
fn cpu_matvec(ty: GgmlType, w: &[u8], k: usize, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let row_bytes = ty.row_bytes(k as u64).unwrap() as usize;
    let mut deq = vec![0f32; k];
    let mut y = Vec::new();
    let mut mag = Vec::new();
    for row in w.chunks_exact(row_bytes) {
        dequantize(ty, row, &mut deq).unwrap();
        let (mut s, mut m) = (0f64, 0f64);
        for (&a, &b) in deq.iter().zip(x) {
            s += a as f64 * b as f64;
            m += (a as f64 * b as f64).abs();
        }
        y.push(s);
        mag.push(m);
    }
    (y, mag)
}

fn check_matvec(ctx: &Context, rng: &mut StdRng, ty: GgmlType, rows: usize, k: usize, tol: f64) {
    let w = quantize(ty, &random_vec(rng, rows * k)).unwrap();
    let x = random_vec(rng, k);
    let got = matvec_host(ctx, ty, &w, k, &x).unwrap();
    let (want, mag) = cpu_matvec(ty, &w, k, &x);
    assert_eq!(got.len(), rows);
    for (i, ((&g, &r), &m)) in got.iter().zip(&want).zip(&mag).enumerate() {
        let err = (g as f64 - r).abs();
        assert!(
            err <= tol * m + 1e-30,
            "{ty} {rows}x{k} (reduce {}): row {i}: got {g}, want {r} (|err| {err:e}, scale {m:e})",
            if ctx.tuning().subgroup_reduce {
                "subgroup"
            } else {
                "shared"
            }
        );
    }
}

fn matvec_sizes(ty: GgmlType) -> Vec<(usize, usize)> {
    let ks: &[usize] = if ty.block_size() == 256 {
        &[256, 768, 4096 + 256]
    } else if ty == GgmlType::F16 {
        &[1, 33, 96, 4096 + 32]
    } else {
        &[32, 96, 4096 + 32]
    };
    let mut v = Vec::new();
    for &rows in &[1usize, 7, 333] {
        for &k in ks {
            v.push((rows, k));
        }
    }
    v.push((4097, 96.max(ty.block_size())));
    v
}

fn matvec_case(ty: GgmlType) {
    let mut rng = rng(&format!("matvec {ty}"));
    for ctx in contexts() {
        for (rows, k) in matvec_sizes(ty) {
            check_matvec(ctx, &mut rng, ty, rows, k, 1e-5);
        }
    }
}

#[test]
fn matvec_f16() {
    matvec_case(GgmlType::F16);
}

#[test]
fn matvec_q8_0() {
    matvec_case(GgmlType::Q8_0);
}

#[test]
fn matvec_q4_0() {
    matvec_case(GgmlType::Q4_0);
}

#[test]
fn matvec_q4_k() {
    matvec_case(GgmlType::Q4_K);
}

#[test]
fn matvec_q6_k() {
    matvec_case(GgmlType::Q6_K);
}

/// Other launch shapes: workgroup sizes and rows per workgroup that leave partial groups.
#[test]
fn matvec_other_tunings() {
    let mut rng = rng("matvec tunings");
    for (wg, rpg, shared) in [
        (16, 1, true),
        (32, 3, false),
        (64, 4, true),
        (256, 1, false),
    ] {
        let opts = ContextOptions {
            mv_workgroup_size: Some(wg),
            mv_rows: Some(rpg),
            force_shared_reduce: shared,
            ..Default::default()
        };
        let Some(ctx) = test_context("matvec tunings", &opts) else {
            return;
        };
        for ty in [GgmlType::Q4_0, GgmlType::Q6_K] {
            check_matvec(&ctx, &mut rng, ty, 37, 512, 1e-5);
        }
    }
}

/// A weight larger than the buffer limit is split between rows into several buffers,
/// one dispatch each, with the same result.
#[test]
fn matvec_split_weights() {
    let opts = ContextOptions {
        max_buffer_bytes: Some(4096),
        ..Default::default()
    };
    let Some(ctx) = test_context("matvec split", &opts) else {
        return;
    };
    assert_eq!(ctx.max_buffer_bytes(), 4096);
    let mut rng = rng("matvec split");
    let (ty, rows, k) = (GgmlType::Q4_0, 333, 96);
    check_matvec(&ctx, &mut rng, ty, rows, k, 1e-5);

    let w = quantize(ty, &random_vec(&mut rng, rows * k)).unwrap();
    let wt = ctx.upload_rows(&w, 54).unwrap();
    // (4096 - 16) / 54 = 75 rows a piece: 5 pieces, none over the limit.
    assert_eq!(wt.pieces.len(), 5);
    assert!(wt.pieces.iter().all(|p| p.buffer.size() <= 4096));
    let x = ctx.upload_f32(&random_vec(&mut rng, k)).unwrap();
    let y = ctx
        .create_buffer(rows as u64 * 4, MemoryKind::Device)
        .unwrap();
    let mv = MatVec::new(&ctx, ty, &wt, k as u64, &x, &y).unwrap();
    let rec = ctx.record(|r| mv.record(r)).unwrap();
    assert_eq!(rec.dispatches(), 5);

    // Buffers over the limit and rows that fit no buffer are errors, not panics.
    assert!(matches!(
        ctx.create_buffer(8192, MemoryKind::Device),
        Err(VkError::Invalid(_))
    ));
    assert!(matches!(
        ctx.upload_rows(&[0u8; 10_000], 5000),
        Err(VkError::Invalid(_))
    ));
}

/// A recording is made once and replayed with new inputs written into its buffers.
#[test]
fn recording_replays_with_new_inputs() {
    let mut rng = rng("replay");
    for ctx in contexts() {
        let (ty, rows, k) = (GgmlType::Q8_0, 65, 320);
        let w = quantize(ty, &random_vec(&mut rng, rows * k)).unwrap();
        let wt = ctx
            .upload_rows(&w, ty.row_bytes(k as u64).unwrap())
            .unwrap();
        let xb = ctx.create_buffer(k as u64 * 4, MemoryKind::Device).unwrap();
        let yb = ctx
            .create_buffer(rows as u64 * 4, MemoryKind::Device)
            .unwrap();
        let mv = MatVec::new(ctx, ty, &wt, k as u64, &xb, &yb).unwrap();
        let rec = ctx.record(|r| mv.record(r)).unwrap();
        for _ in 0..3 {
            let x = random_vec(&mut rng, k);
            let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            ctx.write_buffer(&xb, 0, &bytes).unwrap();
            ctx.submit(&rec).unwrap();
            let got = ctx.read_f32(&yb, rows).unwrap();
            let (want, mag) = cpu_matvec(ty, &w, k, &x);
            for i in 0..rows {
                assert!((got[i] as f64 - want[i]).abs() <= 1e-5 * mag[i]);
            }
        }
    }
}

#[test]
fn rms_norm() {
    let mut rng = rng("rms_norm");
    for ctx in contexts() {
        for &rows in &[1usize, 7, 33] {
            for &n in &[1usize, 7, 576, 4097] {
                let x: Vec<f32> = random_vec(&mut rng, rows * n)
                    .iter()
                    .map(|v| v * 3.0)
                    .collect();
                let w = random_vec(&mut rng, n);
                let eps = 1e-6f32;
                let got = rms_norm_host(ctx, &x, &w, eps).unwrap();
                for (r, (xr, gr)) in x.chunks(n).zip(got.chunks(n)).enumerate() {
                    let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                    let scale = 1.0 / (ms + eps as f64).sqrt();
                    for i in 0..n {
                        let want = xr[i] as f64 * scale * w[i] as f64;
                        let err = (gr[i] as f64 - want).abs();
                        assert!(
                            err <= 1e-5 * (want.abs() + scale * 1e-3),
                            "rms_norm {rows}x{n} row {r} [{i}]: got {}, want {want}",
                            gr[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn buffers_round_trip() {
    let mut rng = rng("round trip");
    for ctx in contexts().iter().take(1) {
        // Larger than one staging chunk, odd length, odd offset.
        let n = (17 << 20) + 3;
        let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        let b = ctx.create_buffer(n as u64 + 5, MemoryKind::Device).unwrap();
        ctx.write_buffer(&b, 5, &data).unwrap();
        assert_eq!(ctx.read_buffer(&b, 5, n as u64).unwrap(), data);
        assert!(ctx.write_buffer(&b, 6, &data).is_err());
        assert!(ctx.read_buffer(&b, u64::MAX, 2).is_err());
    }
}

#[test]
fn kernel_table_is_consistent() {
    for (i, k) in KERNELS.iter().enumerate() {
        assert_eq!(k.kernel as usize, i, "{}", k.name);
        for spv in [k.spirv_subgroup, k.spirv_shared] {
            assert!(spv.len() >= 20 && spv.len() % 4 == 0, "{}", k.name);
            assert_eq!(&spv[..4], &0x0723_0203u32.to_le_bytes(), "{}", k.name);
        }
    }
}

#[test]
fn device_list_describes_the_test_device() {
    let Some(ctx) = contexts().first() else {
        return;
    };
    let info = ctx.info();
    assert!(!info.name.is_empty());
    assert!(info.max_buffer_bytes() >= ctx.max_buffer_bytes());
    assert!(info.max_memory_allocation_size > 0);
    assert!(info.subgroup_min <= info.subgroup_size && info.subgroup_size <= info.subgroup_max);
    let all = caldera_vulkan::list_devices().unwrap();
    assert_eq!(all[info.index].name, info.name);
}

/// The `copy` kernel (`bench`'s bandwidth probe) copies every 16-byte unit, for sizes
/// that leave partial workgroups and grid-stride rounds.
#[test]
fn copy_kernel_copies() {
    let mut rng = rng("copy");
    for ctx in contexts() {
        for units in [1usize, 7, 1000, 70_001] {
            let src: Vec<f32> = random_vec(&mut rng, units * 4);
            let a = ctx.upload_f32(&src).unwrap();
            let b = ctx
                .create_buffer((units * 16) as u64, MemoryKind::Device)
                .unwrap();
            let binding = ctx.bind(caldera_vulkan::Kernel::Copy, &[&a, &b]).unwrap();
            let wg = ctx.tuning().workgroup_size as u64;
            let groups = (units as u64 / wg / 4).max(1);
            let push = (units as u32).to_le_bytes();
            let rec = ctx.record(|r| r.dispatch(&binding, &push, groups)).unwrap();
            ctx.submit(&rec).unwrap();
            assert_eq!(ctx.read_f32(&b, units * 4).unwrap(), src, "{units} units");
        }
    }
}

/// The rule `argmax.comp` follows (caldera_engine::sampler::argmax's), written plainly:
/// the first index of the largest value, NaN ignored; every value NaN: 0.
fn argmax_twin(row: &[f32]) -> u32 {
    let mut best: Option<(f32, usize)> = None;
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(b, _)| v > b) {
            best = Some((v, i));
        }
    }
    best.map_or(0, |(_, i)| i as u32)
}

/// Greedy sampling on the device: rows of odd lengths (one workgroup's span and several),
/// with ties (the first wins), NaN, -inf rows, all-NaN rows and rows whose maximum sits
/// in the last partial span; replayed so the per-row counts are seen to reset.
#[test]
fn argmax_kernel_matches_its_twin() {
    use caldera_vulkan::sample::Argmax;
    let mut rng = rng("argmax");
    for ctx in contexts() {
        for &(n, rows) in &[(1usize, 1usize), (7, 3), (4096, 2), (4097, 5), (151_937, 3)] {
            let ld = n + 5;
            let ids = ctx
                .create_buffer(rows as u64 * 4, MemoryKind::Device)
                .unwrap();
            let lb = ctx
                .create_buffer((rows * ld) as u64 * 4, MemoryKind::Device)
                .unwrap();
            let op = Argmax::new(ctx, &lb, &ids, n as u64, ld as u64, rows as u64).unwrap();
            let rec = ctx.record(|r| op.record(r)).unwrap();
            for round in 0..3 {
                let mut all = vec![f32::NAN; rows * ld];
                for r in 0..rows {
                    let row = &mut all[r * ld..r * ld + n];
                    for v in row.iter_mut() {
                        *v = rng.gen_range(-30.0f32..30.0);
                    }
                    match (r + round) % 5 {
                        // A tie between two positions, the later in another span.
                        1 if n > 2 => {
                            let (a, b) = (rng.gen_range(0..n / 2), rng.gen_range(n / 2..n));
                            row[a] = 99.0;
                            row[b] = 99.0;
                        }
                        // NaN everywhere but a few values, all -inf.
                        2 => {
                            for v in row.iter_mut() {
                                *v = f32::NAN;
                            }
                            for _ in 0..3.min(n) {
                                let i = rng.gen_range(0..n);
                                row[i] = f32::NEG_INFINITY;
                            }
                        }
                        // Every value NaN.
                        3 => {
                            for v in row.iter_mut() {
                                *v = f32::NAN;
                            }
                        }
                        // The maximum in the last value, NaN sprinkled before it.
                        4 => {
                            for _ in 0..(n / 7) {
                                let i = rng.gen_range(0..n);
                                row[i] = f32::NAN;
                            }
                            row[n - 1] = 1e30;
                        }
                        _ => {}
                    }
                }
                let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
                ctx.write_buffer(&lb, 0, &bytes).unwrap();
                ctx.submit(&rec).unwrap();
                let got = ctx.read_buffer(&ids, 0, rows as u64 * 4).unwrap();
                for r in 0..rows {
                    let g = u32::from_le_bytes(got[4 * r..4 * r + 4].try_into().unwrap());
                    let want = argmax_twin(&all[r * ld..r * ld + n]);
                    assert_eq!(g, want, "argmax of row {r} of {rows} x {n}, round {round}");
                }
            }
        }
    }
}

/// Pipelines are created on a kernel's first binding; every one this device can run
/// builds (both reduction variants), so a kernel no test binds still compiles here.
/// A kernel the context cannot run (lavapipe 22.3: the cooperative-matrix ones) is
/// refused with an error when bound.
#[test]
fn every_pipeline_builds() {
    for ctx in contexts() {
        ctx.create_all_pipelines()
            .unwrap_or_else(|e| panic!("{}: {e}", ctx.info().name));
        let buf = ctx.create_buffer(256, MemoryKind::Device).unwrap();
        for desc in KERNELS.iter().filter(|d| !ctx.runs(d.kernel)) {
            let bufs = vec![&buf; desc.bindings as usize];
            assert!(
                ctx.bind(desc.kernel, &bufs).is_err(),
                "{} bound on a context that cannot run it",
                desc.name
            );
        }
    }
}
