//! `caldera bench`: prefill and decode speed on synthetic prompts, like llama-bench.
//!
//! The prompt is `-p` token ids drawn from the vocabulary with a fixed seed; decode
//! then feeds its own greedy picks for `-n` steps. Each is repeated `-r` times and the
//! median reported. Weight bytes per decoded token are the bytes of every matrix a
//! decode step reads (each layer's projections and the output head; the embedding row
//! is negligible).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use caldera_model::Logits;
use clap::Args;
use serde_json::json;

use crate::backend::{open_runner, BackendArgs};
use crate::load;

#[derive(Args)]
pub struct BenchArgs {
    pub model: PathBuf,
    /// Prompt tokens.
    #[arg(short = 'p', long, default_value_t = 512)]
    pub prompt: usize,
    /// Decoded tokens.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub gen: usize,
    /// Repetitions (the median is reported).
    #[arg(short = 'r', long, default_value_t = 3)]
    pub reps: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process in bytes (Linux), if known.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    let loaded = load::open_model(&a.model)?;
    let model = loaded.model.clone();
    let cfg = &model.config;
    let vocab = cfg.vocab_size as u64;
    // A fixed-seed LCG: the same prompt on every run and machine.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let prompt: Vec<u32> = (0..a.prompt)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab) as u32
        })
        .collect();
    let reps = a.reps.max(1);
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let mut logits = Vec::new();
    let mut desc = String::new();
    let mut bandwidth = None;
    let mut stats = caldera_model::RunnerStats::default();
    let mut cpu_us = Vec::new();
    for rep in 0..reps {
        let mut r = open_runner(&a.backend, model.clone(), a.prompt + a.gen + 1)?;
        if rep == 0 {
            desc = r.describe();
            bandwidth = r.measure_bandwidth();
        }
        if a.prompt > 0 {
            let t = Instant::now();
            r.forward(&prompt, Logits::Last, &mut logits)
                .map_err(|e| anyhow::anyhow!(e))?;
            pp.push(a.prompt as f64 / t.elapsed().as_secs_f64());
        }
        if a.gen > 0 {
            let mut next = prompt.last().copied().unwrap_or(0);
            let t = Instant::now();
            let c = process_cpu_ns();
            for _ in 0..a.gen {
                r.forward(&[next], Logits::Last, &mut logits)
                    .map_err(|e| anyhow::anyhow!(e))?;
                next = argmax(&logits);
            }
            tg.push(a.gen as f64 / t.elapsed().as_secs_f64());
            cpu_us.push((process_cpu_ns() - c) as f64 / 1e3 / a.gen as f64);
        }
        stats = r.stats();
    }
    let per_token = bytes_per_token(&loaded.file, &model);
    let pp_tps = (!pp.is_empty()).then(|| median(pp));
    let tg_tps = (!tg.is_empty()).then(|| median(tg));
    let rss = peak_rss();
    let cpu_us = (!cpu_us.is_empty()).then(|| median(cpu_us));
    let gbs = tg_tps.map(|t| t * per_token as f64 / 1e9);
    let share = gbs.zip(bandwidth).map(|(g, b)| g * 1e9 / b);
    let floor = bandwidth.map(|b| b / per_token as f64);
    let per_layer = stats
        .decode_dispatches
        .map(|d| d as f64 / stats.layers.max(1) as f64);
    if a.json {
        println!(
            "{}",
            json!({
                "model": a.model.display().to_string(),
                "arch": cfg.arch,
                "backend": desc,
                "prompt_tokens": a.prompt,
                "gen_tokens": a.gen,
                "prefill_tok_s": pp_tps,
                "decode_tok_s": tg_tps,
                "decode_ms_per_token": tg_tps.map(|t| 1000.0 / t),
                "weight_bytes_per_token": per_token,
                "decode_gb_s": gbs,
                "device_copy_gb_s": bandwidth.map(|b| b / 1e9),
                "bandwidth_share": share,
                "floor_tok_s": floor,
                "decode_dispatches_per_token": stats.decode_dispatches,
                "dispatches_per_layer": per_layer,
                "submits_per_token": stats.decode_submits,
                "host_cpu_us_per_token": cpu_us,
                "profile_us_per_token": stats.profile,
                "peak_rss_bytes": rss,
            })
        );
    } else {
        println!(
            "{} ({}), {}, {} reps",
            a.model.display(),
            cfg.arch,
            desc,
            reps
        );
        if let Some(t) = pp_tps {
            println!("  pp{:<5} {:>9.1} tok/s", a.prompt, t);
        }
        if let Some(t) = tg_tps {
            println!(
                "  tg{:<5} {:>9.1} tok/s  {:.2} ms/token  {:.1} MB weights/token  {:.1} GB/s",
                a.gen,
                t,
                1000.0 / t,
                per_token as f64 / 1e6,
                t * per_token as f64 / 1e9
            );
        }
        if let Some(b) = bandwidth {
            println!(
                "  device copy {:.0} GB/s: floor {:.1} tok/s{}",
                b / 1e9,
                b / per_token as f64,
                share.map_or(String::new(), |s| format!(
                    ", decode at {:.0}% of it",
                    100.0 * s
                ))
            );
        }
        if let (Some(d), Some(s)) = (stats.decode_dispatches, stats.decode_submits) {
            println!(
                "  decode: {d} dispatches ({:.2} per layer), {s} submit(s) per token",
                per_layer.unwrap_or(0.0)
            );
        }
        if let Some(c) = cpu_us {
            println!("  host CPU {c:.0} us per decoded token");
        }
        if !stats.profile.is_empty() {
            let total: f64 = stats.profile.iter().map(|p| p.1).sum();
            println!("  device time per decode step {total:.0} us:");
            for (k, us) in &stats.profile {
                println!("    {k:<10} {us:>9.1} us  {:>5.1}%", 100.0 * us / total);
            }
        }
        if let Some(r) = rss {
            println!("  peak RSS {:.1} MiB", r as f64 / (1 << 20) as f64);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Weight bytes one decode step reads: every tensor but the embedding table (unless it
/// doubles as the output head), with stacked expert tensors counted for the experts a
/// token uses (`n_used / n_experts` of them).
fn bytes_per_token(file: &caldera_model::ModelFile, model: &caldera_model::Model) -> usize {
    let tied = file.tensor("output.weight").is_none();
    let mut total = 0f64;
    for t in file.tensors() {
        let n = t.data.len() as f64;
        if t.name == "token_embd.weight" && !tied {
            continue;
        }
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let share = match (
            layer.and_then(|i| model.config.layers.get(i)),
            t.name.contains("_exps"),
        ) {
            (Some(l), true) => match &l.ffn {
                Some(caldera_model::FfnSpec::Moe(m)) => m.n_used as f64 / m.n_experts.max(1) as f64,
                _ => 1.0,
            },
            _ => 1.0,
        };
        total += n * share;
    }
    total as usize
}

/// CPU time this process has used (every thread), in nanoseconds.
fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
