//! The fixed cost of a dispatch in a recorded step on one device: `cargo run --release
//! --example dispatch_bench [DEVICE]`. Times (GPU timestamps, REPS of each in one command
//! buffer, best of 5 submits) an empty dispatch of one and of 1,024 workgroups with and
//! without the barrier the model puts between ops, and a latency-bound one-workgroup
//! copy. Every case runs twice and the second pass is printed: the first finds the GPU
//! at idle clocks (on the H100 it reads ~3x slower).

use caldera_vulkan::{Context, Kernel, MemoryKind, Recorder};

const REPS: u32 = 100;

type Body<'a> = Box<dyn Fn(&mut Recorder<'_>) -> caldera_vulkan::Result<()> + 'a>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = std::env::args().nth(1).map_or(Ok(0), |s| s.parse())?;
    let ctx = Context::new(dev)?;
    println!("{} {:?}", ctx.info().name, ctx.tuning());
    let a = ctx.create_buffer(1 << 20, MemoryKind::Device)?;
    let b = ctx.create_buffer(1 << 20, MemoryKind::Device)?;
    let copy = ctx.bind(Kernel::Copy, &[&a, &b])?;
    // copy.comp's push constant: 16-byte words to copy (0: an empty dispatch).
    let words = |bytes: u32| (bytes / 16).to_le_bytes();
    let cases: Vec<(&str, Body<'_>)> = vec![
        (
            "empty, 1 workgroup + barrier",
            Box::new(|r| {
                r.dispatch(&copy, &words(0), 1)?;
                r.barrier();
                Ok(())
            }),
        ),
        (
            "empty, 1 workgroup, no barrier",
            Box::new(|r| r.dispatch(&copy, &words(0), 1)),
        ),
        (
            "empty, 1,024 workgroups + barrier",
            Box::new(|r| {
                r.dispatch(&copy, &words(0), 1024)?;
                r.barrier();
                Ok(())
            }),
        ),
        (
            "copy of 64 KiB by 1 workgroup + barrier",
            Box::new(|r| {
                r.dispatch(&copy, &words(64 << 10), 1)?;
                r.barrier();
                Ok(())
            }),
        ),
    ];
    for pass in 0..2 {
        for (label, body) in &cases {
            let rec = ctx.record_with(true, |r| {
                for _ in 0..REPS {
                    body(r)?;
                }
                r.mark("case");
                Ok(())
            })?;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                ctx.submit(&rec)?;
                if let Some(p) = rec.profile()? {
                    best = best.min(p.iter().map(|(_, ns)| ns).sum::<f64>());
                }
            }
            if pass == 1 {
                println!("{label:42} {:8.2} us each", best / 1e3 / REPS as f64);
            }
        }
    }
    Ok(())
}
