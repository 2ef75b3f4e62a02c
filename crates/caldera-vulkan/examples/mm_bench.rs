//! Rough batched mat-vec (`mm_*`) speed on one device: `cargo run --release --example
//! mm_bench [DEVICE] [ROWS] [K] [TOKENS]`. Records REPS mat-vecs into one command
//! buffer, submits it, and reports time per mat-vec and weight bytes read per second.

use std::time::Instant;

use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{Mm, MmIo, MmMode};
use caldera_vulkan::{Context, MemoryKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, d: usize| std::env::args().nth(i).map_or(Ok(d), |s| s.parse());
    let dev = arg(1, 0)?;
    let (rows, k, m) = (arg(2, 4096)?, arg(3, 4096)?, arg(4, 1)?);
    let reps = 20u32;
    let ctx = Context::new(dev)?;
    println!("{} {:?}", ctx.info().name, ctx.tuning());
    let vals: Vec<f32> = (0..rows * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
        .collect();
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let w = quantize(ty, &vals)?;
        let wt = ctx.upload_rows(&w, ty.row_bytes(k as u64).ok_or("k")?)?;
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
        let mm = Mm::new(&ctx, ty, &wt, k as u64, &io, MmMode::default())?;
        let rec = ctx.record(|r| {
            for _ in 0..reps {
                mm.record(r)?;
            }
            Ok(())
        })?;
        let old = caldera_vulkan::ops::MatVec::new(&ctx, ty, &wt, k as u64, &x, &y)?;
        let rec_old = ctx.record(|r| {
            for _ in 0..reps {
                old.record(r)?;
            }
            Ok(())
        })?;
        ctx.submit(&rec_old)?;
        let t = Instant::now();
        ctx.submit(&rec_old)?;
        println!(
            "  (one-token matvec kernel: {:9.1} us)",
            t.elapsed().as_secs_f64() * 1e6 / reps as f64
        );
        ctx.submit(&rec)?; // warm-up
        let t = Instant::now();
        ctx.submit(&rec)?;
        let s = t.elapsed().as_secs_f64();
        let bytes = w.len() as f64 * reps as f64;
        println!(
            "{ty:>5} {rows}x{k} x {m} tokens: {:9.1} us per mat-vec, {:7.1} GB/s of weights",
            s * 1e6 / reps as f64,
            bytes / s / 1e9
        );
    }
    Ok(())
}
