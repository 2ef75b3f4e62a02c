//! Rough decode mat-vec throughput on one device: `cargo run --release --example
//! matvec_bench [DEVICE] [ROWS] [K]`. Records REPS mat-vecs (with the barrier the model
//! puts between ops) into one command buffer, submits it, and reports weight bytes read
//! per second (host wall time around the submit) beside the device's copy bandwidth.
//! `CALDERA_VK_MV_WG` / `CALDERA_VK_MV_ROWS` pick the launch shape; `MV_GLU=1` times the
//! gate/up form (input norm, row pairs, SiLU). Pick shapes larger than the GPU's L2.

use std::time::Instant;

use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{GluAct, Mv, MvMode};
use caldera_vulkan::{Context, MemoryKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, d: usize| std::env::args().nth(i).map_or(Ok(d), |s| s.parse());
    let dev = arg(1, 0)?;
    let (rows, k, reps) = (arg(2, 16384)?, arg(3, 4096)?, 50u32);
    let ctx = Context::new(dev)?;
    println!("{} {:?}", ctx.info().name, ctx.tuning());
    println!(
        "device copy: {:.0} GB/s",
        ctx.measure_copy_bandwidth()? / 1e9
    );
    // 64 quantized rows, repeated: quantizing the whole matrix would take longer than
    // the measurement.
    let vals: Vec<f32> = (0..64 * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
        .collect();
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let block = quantize(ty, &vals)?;
        let w: Vec<u8> = block
            .iter()
            .copied()
            .cycle()
            .take(block.len() / 64 * rows)
            .collect();
        let wt = ctx.upload_rows(&w, ty.row_bytes(k as u64).ok_or("k")?)?;
        let x = ctx.upload_f32(&vec![0.5; k])?;
        let y = ctx.create_buffer(rows as u64 * 4, MemoryKind::Device)?;
        // MV_GLU=1: the gate/up form (rows are pairs, input norm, SiLU).
        let glu = std::env::var("MV_GLU").is_ok_and(|v| v == "1");
        let mode = MvMode {
            norm: glu,
            glu: glu.then_some(GluAct::Silu),
            eps: 1e-6,
            ..Default::default()
        };
        let mv = Mv::new(&ctx, ty, &wt, k as u64, &x, &y, 0, Some(&x), mode)?;
        let rec = ctx.record(|r| {
            for _ in 0..reps {
                mv.record(r)?;
                r.barrier();
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
