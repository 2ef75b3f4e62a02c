//! `caldera bench`: prefill and decode speed on synthetic prompts, like llama-bench.
//!
//! The prompt is `-p` token ids drawn from the vocabulary with a fixed seed; decode
//! then feeds its own greedy picks for `-n` steps, after one untimed decode step (which
//! records the decode step and creates its pipelines, once per runner, as a server does
//! at its first token). Each is repeated `-r` times and the median reported. Weight
//! bytes per decoded token are the bytes of every matrix a decode step reads (each
//! layer's projections and the output head; the embedding row is negligible).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use caldera_engine::sampler::argmax;
use caldera_model::{BatchItem, Logits, StepOutcome};
use clap::Args;
use serde_json::json;

use crate::backend::{open_runner, slot_runners, BackendArgs};
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
    /// Batched decode: for each N of the list (e.g. `1,2,4,8,16`), N sequences each
    /// prefilled with -p tokens (not timed) then decoding -n tokens together, stepped
    /// as `serve` steps its slots (Vulkan: one batched step for all; CPU: one after
    /// another). Reports aggregate and per-sequence decode tokens/s, ms per step and the
    /// aggregate's ratio to N = 1.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=256))]
    pub batch: Vec<u64>,
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

/// `len` token ids below `vocab` from a fixed-seed LCG (`seq` picks the sequence): the
/// same prompt on every run and machine.
fn synthetic_prompt(len: usize, vocab: u64, seq: u64) -> Vec<u32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64.wrapping_add(seq.wrapping_mul(0x2545_F491_4F6C_DD1D));
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab) as u32
        })
        .collect()
}

pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    let loaded = load::open_model(&a.model)?;
    if !a.batch.is_empty() {
        return bench_batch(&a, &loaded);
    }
    let model = loaded.model.clone();
    let cfg = &model.config;
    let vocab = cfg.vocab_size as u64;
    let prompt = synthetic_prompt(a.prompt, vocab, 0);
    let reps = a.reps.max(1);
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let mut logits = Vec::new();
    let mut desc = String::new();
    let mut bandwidth = None;
    let mut stats = caldera_model::RunnerStats::default();
    let mut cpu_us = Vec::new();
    if a.prompt > 0 {
        // Untimed warm-up (as llama-bench's): the prefill's pipelines are created on
        // their first use, once per device.
        let mut r = open_runner(&a.backend, model.clone(), a.prompt + 1)?;
        r.forward(&prompt, Logits::Last, &mut logits)
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    for rep in 0..reps {
        // The prompt, the untimed first decode step and `-n` timed ones.
        let mut r = open_runner(&a.backend, model.clone(), a.prompt + a.gen + 2)?;
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
            let mut step = |r: &mut Box<dyn caldera_model::Runner>, next: &mut u32| {
                // Greedy: the argmax on the device where the backend finds it there.
                match r.forward_argmax(&[*next]).map_err(|e| anyhow::anyhow!(e))? {
                    Some(id) => *next = id,
                    None => {
                        r.forward(&[*next], Logits::Last, &mut logits)
                            .map_err(|e| anyhow::anyhow!(e))?;
                        *next = argmax(&logits);
                    }
                }
                anyhow::Ok(())
            };
            // Untimed: the first decode step records the step (and, on Vulkan, creates
            // the pipelines it binds).
            step(&mut r, &mut next)?;
            let t = Instant::now();
            let c = process_cpu_ns();
            for _ in 0..a.gen {
                step(&mut r, &mut next)?;
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

/// `bench --batch`: for each N, N sequences prefilled alone, then one untimed step and
/// `-n` timed steps of all N through the backend's stepper (what `serve` runs); the
/// median over `-r` repetitions.
fn bench_batch(a: &BenchArgs, loaded: &load::Loaded) -> Result<ExitCode> {
    let model = loaded.model.clone();
    let cfg = &model.config;
    let vocab = cfg.vocab_size as u64;
    let reps = a.reps.max(1);
    let gen = a.gen.max(1);
    // The prompt, one warm-up step, the timed steps.
    let ctx = a.prompt + gen + 1;
    let per_token = bytes_per_token(&loaded.file, &model);
    let mut desc = String::new();
    // (N, median seconds of the decode loop)
    let mut rows: Vec<(usize, f64)> = Vec::new();
    let trace = std::env::var_os("CALDERA_VK_TRACE").is_some();
    for &n in &a.batch {
        let n = n as usize;
        let kv = caldera_cpu::KvConfig::default();
        let mut sr = slot_runners(&a.backend, model.clone(), ctx, n, &kv)?;
        if desc.is_empty() {
            desc = sr.desc.clone();
        }
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            // Made per repetition (and dropped before the next): a pool's slots are
            // taken by live runners.
            let mut runners = Vec::with_capacity(n);
            for _ in 0..n {
                runners.push((sr.make)()?);
            }
            let mut logits = vec![Vec::new(); n];
            let mut next = vec![0u32; n];
            for (i, r) in runners.iter_mut().enumerate() {
                let prompt = synthetic_prompt(a.prompt, vocab, i as u64);
                if !prompt.is_empty() {
                    r.forward(&prompt, Logits::Last, &mut logits[i])
                        .map_err(|e| anyhow::anyhow!(e))?;
                    next[i] = argmax(&logits[i]);
                }
            }
            // One untimed step first: it records the step's shape (once per bucket).
            let mut t = Instant::now();
            for step in 0..=gen {
                if step == 1 {
                    t = Instant::now();
                }
                let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                let mut ids: Vec<Option<u32>> = vec![None; n];
                let mut items: Vec<BatchItem> = runners
                    .iter_mut()
                    .zip(&toks)
                    .zip(logits.iter_mut())
                    .zip(ids.iter_mut())
                    .map(|(((r, t), l), id)| BatchItem {
                        runner: &mut **r,
                        tokens: t,
                        logits: l,
                        argmax: Some(id),
                        outcome: StepOutcome::Pending,
                    })
                    .collect();
                let ts = Instant::now();
                sr.stepper.step_batch(&mut items);
                if trace {
                    eprintln!("bench: step_batch of {n} took {:?}", ts.elapsed());
                }
                for it in items.drain(..) {
                    match it.outcome {
                        StepOutcome::Done => {}
                        StepOutcome::Failed(e) => anyhow::bail!("a decode step failed: {e}"),
                        StepOutcome::Panicked(m) => anyhow::bail!("a decode step panicked: {m}"),
                        StepOutcome::Pending => anyhow::bail!("a decode step did not run"),
                    }
                }
                let ts = Instant::now();
                drop(items);
                for ((nx, l), id) in next.iter_mut().zip(&logits).zip(&ids) {
                    *nx = id.unwrap_or_else(|| argmax(l));
                }
                if trace {
                    eprintln!("bench: argmax of {n} rows took {:?}", ts.elapsed());
                }
            }
            times.push(t.elapsed().as_secs_f64());
        }
        rows.push((n, median(times)));
    }
    let base = rows
        .iter()
        .find(|r| r.0 == 1)
        .map(|&(_, secs)| gen as f64 / secs);
    let stats: Vec<serde_json::Value> = rows
        .iter()
        .map(|&(n, secs)| {
            let agg = (n * gen) as f64 / secs;
            let ms = 1e3 * secs / gen as f64;
            json!({
                "sequences": n,
                "decode_tok_s": agg,
                "per_sequence_tok_s": gen as f64 / secs,
                "ms_per_step": ms,
                "ratio_to_1": base.map(|b| agg / b),
                "weight_gb_s": per_token as f64 / ms / 1e6,
            })
        })
        .collect();
    if a.json {
        println!(
            "{}",
            json!({
                "model": a.model.display().to_string(),
                "arch": cfg.arch,
                "backend": desc,
                "prompt_tokens": a.prompt,
                "gen_tokens": gen,
                "reps": reps,
                "weight_bytes_per_step": per_token,
                "batch": stats,
                "peak_rss_bytes": peak_rss(),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} ({}), {}, {} reps, p{} n{}",
        a.model.display(),
        cfg.arch,
        desc,
        reps,
        a.prompt,
        gen
    );
    println!("  seqs   agg tok/s   per-seq tok/s   ms/step   x N=1   weights GB/s");
    for v in &stats {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:>4} {:>11.1} {:>15.1} {:>9.2} {:>7} {:>14.1}",
            v["sequences"],
            f("decode_tok_s"),
            f("per_sequence_tok_s"),
            f("ms_per_step"),
            v["ratio_to_1"]
                .as_f64()
                .map_or("-".to_owned(), |r| format!("{r:.2}")),
            f("weight_gb_s")
        );
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
