//! Rough mat-vec throughput on one device: `cargo run --release --example matvec_bench
//! [DEVICE]`. Records REPS mat-vecs into one command buffer, submits it, and reports
//! weight bytes read per second (host wall time around the submit).

use std::time::Instant;

use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::MatVec;
use caldera_vulkan::{Context, MemoryKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev: usize = std::env::args().nth(1).map_or(Ok(0), |s| s.parse())?;
    let ctx = Context::new(dev)?;
    println!("{} {:?}", ctx.info().name, ctx.tuning());
    let (rows, k, reps) = (16384usize, 4096usize, 50u32);
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
        let x = ctx.upload_f32(&vec![0.5; k])?;
        let y = ctx.create_buffer(rows as u64 * 4, MemoryKind::Device)?;
        let mv = MatVec::new(&ctx, ty, &wt, k as u64, &x, &y)?;
        let rec = ctx.record(|r| {
            for _ in 0..reps {
                mv.record(r)?;
            }
            Ok(())
        })?;
        ctx.submit(&rec)?; // warm-up
        let t = Instant::now();
        ctx.submit(&rec)?;
        let s = t.elapsed().as_secs_f64();
        let bytes = w.len() as f64 * reps as f64;
        println!(
            "{ty:>5} {rows}x{k}: {:8.1} us per mat-vec, {:7.1} GB/s of weights",
            s * 1e6 / reps as f64,
            bytes / s / 1e9
        );
    }
    Ok(())
}
