//! Int8-activation decode mat-vec throughput (`mvq.glsl`) on one device: `cargo run
//! --release --example mvq_bench [DEVICE] [OUTPUTS] [K]`. Records REPS mat-vecs (with
//! the barrier the model puts between ops) into one command buffer and reports weight
//! bytes read per second beside the device's copy bandwidth, for Q4_0, Q8_0, Q4_K and
//! Q6_K, plain and with the fused next-input quantization (`MV_TAIL`); `MV_GLU=1` times
//! the gate/up form (row pairs, SiLU). `CALDERA_VK_MV_WG` / `CALDERA_VK_MV_ROWS` pick the
//! launch shape, `CALDERA_VK_MV_SG=1` the subgroup-per-output layout, `MV_TYPES=Q4_K,Q6_K`
//! the types, `MV_COPIES=N` N copies of the weights taken in turn (to beat the L2
//! cache with small shapes).

use std::time::Instant;

use caldera_format::quant::quantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{GluAct, MvMode, MvTail, Mvq, Q8Acts, QuantX};
use caldera_vulkan::{Context, MemoryKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, d: usize| std::env::args().nth(i).map_or(Ok(d), |s| s.parse());
    let dev = arg(1, 0)?;
    let (outs, k, reps) = (arg(2, 25600)?, arg(3, 5120)?, 50u32);
    let glu = std::env::var("MV_GLU").is_ok_and(|v| v == "1");
    let rows = if glu { 2 * outs } else { outs };
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
    let x = ctx.upload_f32(&vec![0.5; k])?;
    let dev_buf = |n: usize| ctx.create_buffer(n.max(4) as u64, MemoryKind::Device);
    let (q, d) = (dev_buf(k)?, dev_buf(k / 8)?);
    let (nq, nd, ns) = (dev_buf(outs)?, dev_buf(outs / 8)?, dev_buf(outs / 8)?);
    let gam = ctx.upload_f32(&vec![1.0; outs])?;
    let count = ctx.upload(&vec![0u8; outs.div_ceil(32) * 4])?;
    let acts = Q8Acts {
        q: &q,
        d: &d,
        ss: None,
    };
    let qx = QuantX::new(&ctx, k as u64, &x, None, 1e-6, &acts)?;
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        // MV_TYPES=Q4_K,Q6_K: only those types.
        if let Ok(only) = std::env::var("MV_TYPES") {
            if !only.split(',').any(|t| t == format!("{ty:?}")) {
                continue;
            }
        }
        let block = quantize(ty, &vals)?;
        let w: Vec<u8> = block
            .iter()
            .copied()
            .cycle()
            .take(block.len() / 64 * rows)
            .collect();
        let group = if glu { 2 } else { 1 };
        // MV_COPIES=N: N copies of the weights, taken in turn, so that a matrix smaller
        // than the L2 cache is still read from memory each time, as in a model.
        let copies = std::env::var("MV_COPIES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        let row_bytes = ty.row_bytes(k as u64).ok_or("k")?;
        let wts = (0..copies)
            .map(|_| ctx.upload_rows_grouped(&[&w], row_bytes, group))
            .collect::<Result<Vec<_>, _>>()?;
        let y = ctx.create_buffer(outs as u64 * 4, MemoryKind::Device)?;
        let mode = MvMode {
            glu: glu.then_some(GluAct::Silu),
            eps: 1e-6,
            ..Default::default()
        };
        for tailed in [false, true] {
            let tail = MvTail {
                count: &count,
                out: Q8Acts {
                    q: &nq,
                    d: &nd,
                    ss: Some(&ns),
                },
                gam: Some(&gam),
                n: outs as u64,
            };
            let tail = (tailed && outs % 32 == 0).then_some(&tail);
            let mvs = match wts
                .iter()
                .map(|wt| Mvq::with_tail(&ctx, ty, wt, k as u64, &acts, &y, 0, mode, tail))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(mv) => mv,
                Err(e) => {
                    println!("{ty:>5}: {e}");
                    continue;
                }
            };
            let rec = ctx.record(|r| {
                qx.record(r)?;
                r.barrier();
                for i in 0..reps as usize {
                    mvs[i % mvs.len()].record(r)?;
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
                "{ty:>5} {rows}x{k}{}{}: {:8.1} us per mat-vec, {:7.1} GB/s of weights",
                if glu { " glu" } else { "" },
                if tail.is_some() { " tail" } else { "" },
                s * 1e6 / reps as f64,
                bytes / s / 1e9
            );
        }
    }
    Ok(())
}
