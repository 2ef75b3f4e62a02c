//! The tiled prefill matmul on f32 FMA (`mmt.glsl`) against the cooperative-matrix one
//! (`mmc.glsl`, without and with `CoopLayout::prefetch`): `cargo run --release --example
//! mm_bench [TYPE ROWS K TOKENS]`; without arguments, the prefill shapes of qwen3 8B and
//! 32B at Q4_K_M (512 tokens: 4096 x 4096, q|k|v, gate|up, down as Q6_K and Q4_K).
//! `CALDERA_VK_DEVICE=N` picks the device. For each shape and kernel, records REPS
//! matmuls (`Mm`, plain mode) into one command buffer, runs it for half a second to raise
//! the clocks, and
//! reports the best device time per matmul of 5 runs (GPU timestamps) in us and TFLOP/s
//! (2 rows k tokens per matmul). mmc is skipped where the device has no
//! cooperative-matrix layout. lavapipe's numbers say nothing about a GPU.
use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{Mm, MmIo, MmMode};
use caldera_vulkan::{Context, ContextOptions, MemoryKind};

const REPS: u32 = 10;

/// (type, rows, k, tokens).
type Shape = (GgmlType, usize, usize, usize);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shapes: Vec<Shape> = if args.len() >= 4 {
        let n = |i: usize| args[i].parse::<usize>();
        let ty = GgmlType::from_name(&args[0]).ok_or(format!("unknown type {}", args[0]))?;
        vec![(ty, n(1)?, n(2)?, n(3)?)]
    } else if args.is_empty() {
        use GgmlType::{Q4_K, Q6_K};
        vec![
            (Q4_K, 4096, 4096, 512),
            // qwen3 8B: q|k|v, gate|up, down.
            (Q4_K, 6144, 4096, 512),
            (Q4_K, 24576, 4096, 512),
            (Q6_K, 4096, 12288, 512),
            (Q4_K, 4096, 12288, 512),
            // qwen3 32B.
            (Q4_K, 10240, 5120, 512),
            (Q4_K, 51200, 5120, 512),
            (Q6_K, 5120, 25600, 512),
        ]
    } else {
        return Err("usage: mm_bench [TYPE ROWS K TOKENS]".into());
    };
    let dev = std::env::var("CALDERA_VK_DEVICE").map_or(Ok(0), |v| v.parse::<usize>())?;
    let mmt = Context::with_options(
        dev,
        &ContextOptions {
            force_no_coopmat: true,
            ..Default::default()
        },
    )?;
    let mmc = Context::with_options(
        dev,
        &ContextOptions {
            coopmat_prefetch: Some(false),
            ..Default::default()
        },
    )?;
    let mmc_pf = Context::with_options(
        dev,
        &ContextOptions {
            coopmat_prefetch: Some(true),
            ..Default::default()
        },
    )?;
    println!(
        "{}: coopmat layout {:?}",
        mmc.info().name,
        mmc.tuning().coopmat_mm
    );
    for (ty, rows, k, m) in shapes {
        let vals: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect();
        let w = quantize(ty, &vals)?;
        let row_bytes = ty.row_bytes(k as u64).ok_or("k is not whole blocks")?;
        let flop = 2.0 * rows as f64 * k as f64 * m as f64;
        let mut line = format!("{ty:>6} {rows:>6} x {k:>6} x {m:>4} tokens:");
        for (label, ctx) in [("mmt", &mmt), ("mmc", &mmc), ("mmc+prefetch", &mmc_pf)] {
            if label != "mmt" && ctx.tuning().coopmat_mm.is_none() {
                line += &format!("  {label}: none");
                continue;
            }
            let us = time_mm(ctx, ty, &w, row_bytes, rows, k, m)?;
            line += &format!("  {label} {us:9.1} us {:7.2} TFLOP/s", flop / us / 1e6);
        }
        println!("{line}");
    }
    Ok(())
}

/// Best microseconds per matmul of `rows` x `k` weights `w` over `m` tokens on `ctx`.
fn time_mm(
    ctx: &Context,
    ty: GgmlType,
    w: &[u8],
    row_bytes: u64,
    rows: usize,
    k: usize,
    m: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let wt = ctx.upload_rows(w, row_bytes)?;
    let xs: Vec<f32> = (0..k * m).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let x = ctx.upload_f32(&xs)?;
    let y = ctx.create_buffer((rows * m) as u64 * 4, MemoryKind::Device)?;
    let step = ctx.create_buffer(16, MemoryKind::Upload)?;
    let sv: Vec<u8> = [m as u32, 0, 0, m as u32]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    ctx.write_mapped(&step, 0, &sv)?;
    let io = MmIo {
        x: &x,
        ld_x: k as u64,
        y: &y,
        ld_y: rows as u64,
        y_offset: 0,
        gam: None,
        step: &step,
        max_tokens: m as u64,
    };
    let mm = Mm::new(ctx, ty, &wt, k as u64, &io, MmMode::default())?;
    let rec = ctx.record_with(true, |r| {
        r.mark("start");
        for _ in 0..REPS {
            mm.record(r)?;
            r.barrier();
            r.mark("mm");
        }
        Ok(())
    })?;
    // Half a second of the same work first: a GPU at idle clocks reads ~3x slower.
    let warm = std::time::Instant::now();
    while warm.elapsed().as_secs_f64() < 0.5 {
        ctx.submit(&rec)?;
    }
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        ctx.submit(&rec)?;
        let times = rec.profile()?.ok_or("no GPU timestamps")?;
        let ns: f64 = times.iter().map(|(_, ns)| ns).sum();
        best = best.min(ns / REPS as f64);
    }
    Ok(best / 1e3)
}
