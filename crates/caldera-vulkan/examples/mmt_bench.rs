//! Prefill matmul speed on one device: `cargo run --release --example mmt_bench [DEVICE]
//! [ROWS] [K] [TOKENS] [TYPE...]` (default: 12288 rows of 4096, 256 tokens, Q4_K Q6_K
//! Q8_0 F16 — the shape of an 8B model's fused q|k|v at twice its width, a prefill
//! chunk). For each weight type, records REPS matmuls (`Mm`, the tiled `mmt.glsl`
//! kernel; with `CALDERA_BENCH_OLD=1` also the batched mat-vec `mm.glsl` it replaces)
//! into one command buffer, runs it for a second to raise the clocks, and reports the
//! best device time per matmul of 5 runs (GPU timestamps), GFLOP/s (2 rows k tokens per
//! matmul) and weight GB/s. lavapipe's numbers say nothing about a GPU.

use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{Mm, MmIo, MmMode};
use caldera_vulkan::{Context, ContextOptions, MemoryKind};

const REPS: u32 = 10;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).map_or(Ok(d), |s| s.parse::<usize>());
    let dev = num(0, 0)?;
    let (rows, k, m) = (num(1, 12288)?, num(2, 4096)?, num(3, 256)?);
    let types: Vec<GgmlType> = if args.len() > 4 {
        args[4..]
            .iter()
            .map(|s| GgmlType::from_name(s).ok_or(format!("unknown type {s}")))
            .collect::<Result<_, _>>()?
    } else {
        vec![
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::F16,
        ]
    };
    let tiled = Context::new(dev)?;
    let old = std::env::var("CALDERA_BENCH_OLD").is_ok_and(|v| v == "1");
    let plain = if old {
        Some(Context::with_options(
            dev,
            &ContextOptions {
                force_no_tiled_mm: true,
                ..Default::default()
            },
        )?)
    } else {
        None
    };
    println!("{} {:?}", tiled.info().name, tiled.tuning());
    let vals: Vec<f32> = (0..rows * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
        .collect();
    let flop = 2.0 * rows as f64 * k as f64 * m as f64;
    for ty in types {
        let w = quantize(ty, &vals)?;
        let row_bytes = ty.row_bytes(k as u64).ok_or("k is not whole blocks")?;
        let mut runs = vec![("mmt (tiled)", &tiled)];
        if let Some(p) = &plain {
            runs.push(("mm (batched mat-vec)", p));
        }
        for (label, ctx) in runs {
            let wt = ctx.upload_rows(&w, row_bytes)?;
            let x = ctx.upload_f32(&vec![0.5; k * m])?;
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
            let warm = std::time::Instant::now();
            while warm.elapsed().as_secs_f64() < 1.0 {
                ctx.submit(&rec)?;
            }
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                ctx.submit(&rec)?;
                let times = rec.profile()?.ok_or("no GPU timestamps")?;
                let ns: f64 = times.iter().map(|(_, ns)| ns).sum();
                best = best.min(ns / REPS as f64);
            }
            let s = best * 1e-9;
            println!(
                "{ty:>6} {rows}x{k} x {m} tokens, {label:<21}: {:9.1} us, {:8.1} GFLOP/s, \
                 {:7.1} GB/s of weights",
                s * 1e6,
                flop / s / 1e9,
                w.len() as f64 / s / 1e9
            );
        }
    }
    Ok(())
}
