//! The fixed cost of a dispatch in a recorded step on one device: `cargo run --release
//! --example dispatch_bench [DEVICE]`. Times (GPU timestamps, REPS of each in one command
//! buffer, best of 5 submits) an empty dispatch of one and of 1,024 workgroups with and
//! without the barrier the model puts between ops, and a latency-bound one-workgroup
//! copy. Every case runs twice and the second pass is printed: the first finds the GPU
//! at idle clocks (on the H100 it reads ~3x slower).
//!
//! Then chains of dispatches that each read a region of a large buffer (`CHAIN_MB`:
//! region sizes in MiB, default 4,24,96; regions taken in turn from `CHAIN_TOTAL_MB`,
//! default 768, so that the L2 cache does not hold them; 16 KiB per workgroup), ordered
//! by pipeline barriers, by nothing (the lower bound, not a valid order), or by counters
//! (`chain.comp`: each workgroup waits for the dispatch before to count all its
//! workgroups done, polling with a backoff, optionally after issuing its first loads).

use caldera_vulkan::{Context, Kernel, MemoryKind, Recorder, Recording};

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
            let best = best_of_5(&ctx, &rec, None)?;
            if pass == 1 {
                println!("{label:42} {:8.2} us each", best / 1e3 / REPS as f64);
            }
        }
    }
    chains(&ctx)?;
    cold(&ctx)?;
    Ok(())
}

/// Small dependent dispatches between weight streams, as a decode step runs them:
/// `COLD_MB` (default 96) MiB streamed (`chain.comp`, a fresh region of 8 in turn) after
/// each of an empty one-workgroup dispatch, the one-workgroup 64 KiB copy and the MoE
/// routing of 128 logits (`moe_route.comp`, top 8). Each small op's cost is the chain's
/// time per unit less the stream's alone; beside it, the same op repeated without streams.
fn cold(ctx: &Context) -> Result<(), Box<dyn std::error::Error>> {
    const N: u32 = 40;
    let mb: u64 = std::env::var("COLD_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    let total = 8 * mb;
    let w = ctx.create_buffer(total << 20, MemoryKind::Device)?;
    let out = ctx.create_buffer(1 << 20, MemoryKind::Device)?;
    let cnt = ctx.create_buffer(4 * (N as u64 + 1), MemoryKind::Device)?;
    let stream = ctx.bind(Kernel::Chain, &[&w, &out, &cnt])?;
    let a = ctx.create_buffer(1 << 20, MemoryKind::Device)?;
    let b = ctx.create_buffer(1 << 20, MemoryKind::Device)?;
    let copy = ctx.bind(Kernel::Copy, &[&a, &b])?;
    let logits: Vec<u8> = (0..128u32)
        .flat_map(|i| ((i * 37 % 128) as f32 * 0.01).to_le_bytes())
        .collect();
    let logits = ctx.upload(&logits)?;
    let ids = ctx.create_buffer(64, MemoryKind::Device)?;
    let wts = ctx.create_buffer(64, MemoryKind::Device)?;
    let one = ctx.upload(&1u32.to_le_bytes())?;
    let route = ctx.bind(
        Kernel::MoeRoute,
        &[&logits, &logits, &logits, &ids, &wts, &one],
    )?;
    // moe_route's push constant: n, k, kind (softmax), flags (renormalize), scale, ld.
    let route_push = le_words(&[128, 8, 0, 1, 1f32.to_bits(), 128]);
    let per_wg: u64 = 1024;
    let words = (mb << 20) / 16;
    let groups = words / per_wg;
    let regions = (total / mb).max(1);
    type Op<'a> = Option<Box<dyn Fn(&mut Recorder<'_>) -> caldera_vulkan::Result<()> + 'a>>;
    let ops: Vec<(&str, Op<'_>)> = vec![
        ("nothing", None),
        (
            "empty, 1 workgroup",
            Some(Box::new(|r| r.dispatch(&copy, &0u32.to_le_bytes(), 1))),
        ),
        (
            "copy of 16 B by 1 workgroup",
            Some(Box::new(|r| r.dispatch(&copy, &1u32.to_le_bytes(), 1))),
        ),
        (
            "copy of 64 KiB by 1 workgroup",
            Some(Box::new(|r| {
                r.dispatch(&copy, &((64u32 << 10) / 16).to_le_bytes(), 1)
            })),
        ),
        (
            "moe_route, 128 logits, top 8",
            Some(Box::new(|r| r.dispatch(&route, &route_push, 1))),
        ),
    ];
    for pass in 0..2 {
        for (label, op) in &ops {
            for streams in [true, false] {
                if op.is_none() && !streams {
                    continue;
                }
                let rec = ctx.record_with(true, |r| {
                    for j in 0..N {
                        if let Some(op) = op {
                            op(r)?;
                            r.barrier();
                        }
                        if streams {
                            let base = (j as u64 % regions) * words;
                            let push =
                                le_words(&[base as u32, per_wg as u32, 0, j, groups as u32, 0]);
                            r.dispatch(&stream, &push, groups)?;
                            r.barrier();
                        }
                    }
                    r.mark("cold");
                    Ok(())
                })?;
                let best = best_of_5(ctx, &rec, Some("cold"))?;
                if pass == 1 {
                    let what = if streams { "+ stream" } else { "alone" };
                    println!(
                        "cold {mb:4} MiB: {label:32} {what:9} {:8.2} us per unit",
                        best / 1e3 / N as f64
                    );
                }
            }
        }
    }
    Ok(())
}

fn chains(ctx: &Context) -> Result<(), Box<dyn std::error::Error>> {
    const N: u32 = 60;
    let mib = |v: &str| -> Vec<u64> { v.split(',').filter_map(|x| x.parse().ok()).collect() };
    let sizes = mib(&std::env::var("CHAIN_MB").unwrap_or_else(|_| "4,24,96".into()));
    let total: u64 = std::env::var("CHAIN_TOTAL_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(768);
    let w = ctx.create_buffer(total << 20, MemoryKind::Device)?;
    let out = ctx.create_buffer(1 << 20, MemoryKind::Device)?;
    let cnt = ctx.create_buffer(4 * (N as u64 + 1), MemoryKind::Device)?;
    let zeros = ctx.upload(&vec![0u8; 4 * (N as usize + 1)])?;
    let b = ctx.bind(Kernel::Chain, &[&w, &out, &cnt])?;
    let per_wg: u64 = 1024; // 16-byte words: 16 KiB per workgroup
                            // (label, flags, backoff, barrier)
    let modes: [(&str, u32, u32, bool); 6] = [
        ("barriers", 0, 0, true),
        ("nothing (lower bound)", 0, 0, false),
        ("counters", 1, 0, false),
        ("counters, backoff 64", 1, 64, false),
        ("counters, backoff 64, loads first", 3, 64, false),
        ("counters, backoff 512, loads first", 3, 512, false),
    ];
    for &mb in &sizes {
        let words = (mb << 20) / 16;
        let groups = words / per_wg;
        let regions = (total / mb).max(1);
        for pass in 0..2 {
            for (label, flags, backoff, barrier) in modes {
                let rec = ctx.record_with(true, |r| {
                    r.copy(&zeros, &cnt, 4 * (N as u64 + 1))?;
                    r.mark("reset");
                    for j in 0..N {
                        let base = (j as u64 % regions) * words;
                        let push = le_words(&[
                            base as u32,
                            per_wg as u32,
                            flags,
                            j,
                            groups as u32,
                            backoff,
                        ]);
                        r.dispatch(&b, &push, groups)?;
                        if barrier {
                            r.barrier();
                        }
                    }
                    r.barrier();
                    r.mark("chain");
                    Ok(())
                })?;
                let best = best_of_5(ctx, &rec, Some("chain"))?;
                if pass == 1 {
                    let us = best / 1e3 / N as f64;
                    let gbs = (mb << 20) as f64 / (us * 1e3);
                    println!(
                        "chain {mb:4} MiB x {groups:5} wg, {label:36} {us:8.2} us each, {gbs:6.0} GB/s"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The best of 5 submits of a profiled recording: nanoseconds between its marks, all of
/// them or only those labelled `only`.
fn best_of_5(
    ctx: &Context,
    rec: &Recording,
    only: Option<&str>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        ctx.submit(rec)?;
        if let Some(p) = rec.profile()? {
            let t: f64 = p
                .iter()
                .filter(|(l, _)| only.is_none_or(|o| *l == o))
                .map(|(_, ns)| ns)
                .sum();
            best = best.min(t);
        }
    }
    Ok(best)
}

/// Push-constant bytes of `v`.
fn le_words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
