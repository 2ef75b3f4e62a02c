//! `caldera verify`: compare a backend's logits with a transformers fixture.
//!
//! The fixture folder holds `reference.safetensors` with `input_ids` [T], `prefill_logits`
//! [T, V], `greedy_ids` [N] and `decode_logits` [N, V] (shared/fixtures/README.md).
//! `input_ids` run as one prefill; then `greedy_ids[..N-1]` are fed one at a time
//! (teacher forcing). Decode row 0 is the prefill's last row; row i+1 follows
//! `greedy_ids[i]`. Each row's relative L2 error must be ≤ tol, and its argmax must match
//! wherever the reference's top-1/top-2 margin is at least 0.05 × the row's std.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use caldera_format::hf::open_safetensors;
use caldera_model::Logits;
use clap::Args;

use crate::backend::{open_runner, BackendArgs};
use crate::load;

#[derive(Args)]
pub struct VerifyArgs {
    /// A fixture folder (config.json, model.safetensors, reference.safetensors).
    pub fixture: PathBuf,
    /// Run this model file instead of the folder's own weights (e.g. a converted GGUF).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Largest relative L2 error allowed per logits row.
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// Print every row's error and argmax agreement.
    #[arg(long)]
    pub rows: bool,
}

struct Reference {
    input_ids: Vec<u32>,
    prefill: Vec<f32>,
    greedy_ids: Vec<u32>,
    decode: Vec<f32>,
    vocab: usize,
}

fn read_reference(dir: &std::path::Path) -> Result<Reference> {
    let path = dir.join("reference.safetensors");
    let tensors =
        open_safetensors(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let find = |name: &str| {
        tensors
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("{}: no tensor '{name}'", path.display()))
    };
    let ids = |name: &str| -> Result<Vec<u32>> {
        find(name)?
            .to_i64_vec()?
            .into_iter()
            .map(|v| u32::try_from(v).with_context(|| format!("{name}: bad token id {v}")))
            .collect()
    };
    let input_ids = ids("input_ids")?;
    let greedy_ids = ids("greedy_ids")?;
    let pre = find("prefill_logits")?;
    let dec = find("decode_logits")?;
    let vocab = *pre.shape.last().context("prefill_logits has no shape")?;
    if pre.shape != [input_ids.len(), vocab] || dec.shape != [greedy_ids.len(), vocab] {
        bail!(
            "{}: inconsistent shapes: input_ids {}, prefill_logits {:?}, greedy_ids {}, decode_logits {:?}",
            path.display(),
            input_ids.len(),
            pre.shape,
            greedy_ids.len(),
            dec.shape
        );
    }
    Ok(Reference {
        input_ids,
        prefill: pre.to_f32_vec()?,
        greedy_ids,
        decode: dec.to_f32_vec()?,
        vocab,
    })
}

/// Relative L2 error of `ours` against `reference`.
pub fn rel_l2(ours: &[f32], reference: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        let d = a as f64 - b as f64;
        num += d * d;
        den += b as f64 * b as f64;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Whether the reference row's top-1 beats its top-2 by at least 0.05 × its std.
fn clear_margin(r: &[f32]) -> bool {
    let n = r.len() as f64;
    let mean = r.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = r.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let (mut t1, mut t2) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &x in r {
        let x = x as f64;
        if x > t1 {
            t2 = t1;
            t1 = x;
        } else if x > t2 {
            t2 = x;
        }
    }
    t1 - t2 >= 0.05 * var.sqrt()
}

#[derive(Default)]
struct RowStats {
    /// Print each row as it is added.
    verbose: Option<&'static str>,
    worst: f64,
    worst_row: usize,
    over_tol: usize,
    checked: usize,
    mismatched: Vec<usize>,
}

impl RowStats {
    fn add(&mut self, row: usize, ours: &[f32], reference: &[f32], tol: f64) {
        let e = rel_l2(ours, reference);
        if let Some(what) = self.verbose {
            println!(
                "  {what} row {row:4}: error {e:.3e}, argmax {} / reference {}{}",
                argmax(ours),
                argmax(reference),
                if clear_margin(reference) {
                    ""
                } else {
                    " (near-tie)"
                }
            );
        }
        if e > self.worst || e.is_nan() {
            self.worst = e;
            self.worst_row = row;
        }
        if e > tol || e.is_nan() {
            self.over_tol += 1;
        }
        if clear_margin(reference) {
            self.checked += 1;
            if argmax(ours) != argmax(reference) {
                self.mismatched.push(row);
            }
        }
    }
}

pub fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let reference = read_reference(&a.fixture)?;
    let model_path = a.model.clone().unwrap_or_else(|| a.fixture.clone());
    let loaded = load::open_model(&model_path)?;
    let cfg = &loaded.model.config;
    if cfg.vocab_size != reference.vocab {
        bail!(
            "model vocabulary {} differs from the reference's {}",
            cfg.vocab_size,
            reference.vocab
        );
    }
    let v = reference.vocab;
    let t = reference.input_ids.len();
    let n = reference.greedy_ids.len();
    let mut runner = open_runner(&a.backend, loaded.model.clone(), t + n)?;
    let mut logits = Vec::new();
    runner
        .forward(&reference.input_ids, Logits::All, &mut logits)
        .map_err(|e| anyhow::anyhow!(e))?;

    let mut pre = RowStats {
        verbose: a.rows.then_some("prefill"),
        ..Default::default()
    };
    for i in 0..t {
        pre.add(
            i,
            &logits[i * v..(i + 1) * v],
            &reference.prefill[i * v..(i + 1) * v],
            a.tol,
        );
    }
    let mut dec = RowStats {
        verbose: a.rows.then_some("decode"),
        ..Default::default()
    };
    let mut row = logits[(t - 1) * v..t * v].to_vec();
    for i in 0..n {
        if i > 0 {
            runner
                .forward(&[reference.greedy_ids[i - 1]], Logits::Last, &mut row)
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        dec.add(i, &row, &reference.decode[i * v..(i + 1) * v], a.tol);
    }

    println!(
        "verify {} ({}, {}, model {})",
        a.fixture.display(),
        cfg.arch,
        runner.describe(),
        model_path.display()
    );
    println!(
        "  prefill: {t} rows, worst relative L2 error {:.3e} (row {}), {} over tol {:.0e}; argmax agrees on {}/{} clear rows",
        pre.worst, pre.worst_row, pre.over_tol, a.tol, pre.checked - pre.mismatched.len(), pre.checked
    );
    println!(
        "  decode:  {n} rows, worst relative L2 error {:.3e} (row {}), {} over tol {:.0e}; greedy ids agree on {}/{} clear rows",
        dec.worst, dec.worst_row, dec.over_tol, a.tol, dec.checked - dec.mismatched.len(), dec.checked
    );
    let ok = pre.over_tol == 0
        && dec.over_tol == 0
        && pre.mismatched.is_empty()
        && dec.mismatched.is_empty();
    if !pre.mismatched.is_empty() {
        println!("  prefill argmax differs on rows {:?}", pre.mismatched);
    }
    if !dec.mismatched.is_empty() {
        println!("  greedy id differs on decode rows {:?}", dec.mismatched);
    }
    println!("{}", if ok { "PASS" } else { "FAIL" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
