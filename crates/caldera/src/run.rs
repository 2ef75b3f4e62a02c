//! `caldera run`: one prompt, or an interactive chat.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use caldera_engine::{GenParams, GenStats, Generator, SamplerConfig};
use caldera_tokenizer::{ChatTemplate, Tokenizer};
use clap::Args;
use serde_json::json;

use crate::backend::{open_runner, BackendArgs};
use crate::load;

#[derive(Args)]
pub struct RunArgs {
    /// A .gguf file or an HF model folder.
    pub model: PathBuf,
    /// The prompt; without it, an interactive chat on stdin.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print the prompt as rendered and its token ids to stderr.
    #[arg(long)]
    pub verbose_prompt: bool,
}

pub fn run(a: RunArgs) -> Result<ExitCode> {
    let loaded = load::open_model(&a.model)?;
    let tok = load::tokenizer(&loaded.file)?;
    let template = if a.raw {
        None
    } else {
        load::chat_template(&loaded.file, &tok)?
    };
    if !a.raw && template.is_none() {
        eprintln!("note: the model has no chat template; the prompt is used as raw text");
    }
    let ctx = a
        .ctx
        .unwrap_or_else(|| loaded.model.config.context_length.min(4096))
        .max(1);
    let runner = open_runner(&a.backend, loaded.model.clone(), ctx)?;
    eprintln!(
        "caldera: {} ({}), {} layers, {}, context {}",
        a.model.display(),
        loaded.model.config.arch,
        loaded.model.config.n_layers(),
        runner.describe(),
        ctx
    );
    let sampler = SamplerConfig {
        temperature: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
        ..SamplerConfig::default()
    };
    sampler
        .validate()
        .map_err(|e| anyhow::anyhow!("sampling options: {e}"))?;
    let params = GenParams::new(a.max_tokens, sampler, a.stop.clone());
    let mut gen = Generator::new(runner);

    let mut messages = Vec::new();
    if let Some(sys) = &a.system {
        messages.push(json!({"role": "system", "content": sys}));
    }
    match &a.prompt {
        Some(p) => {
            let ids = match &template {
                Some(t) => {
                    messages.push(json!({"role": "user", "content": p}));
                    encode_chat(&tok, t, &messages)?
                }
                None => tok.encode(p, tok.adds_bos(), false)?,
            };
            if a.verbose_prompt {
                let shown: Vec<String> = ids
                    .iter()
                    .map(|&i| format!("{i}:{:?}", tok.token_text(i).unwrap_or("?")))
                    .collect();
                eprintln!("prompt: {} tokens: {}", ids.len(), shown.join(" "));
            }
            let stats = generate(&mut gen, &tok, &ids, &params)?;
            report(&stats);
        }
        None => chat(&mut gen, &tok, template.as_ref(), messages, &params)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn encode_chat(
    tok: &Tokenizer,
    t: &ChatTemplate,
    messages: &[serde_json::Value],
) -> Result<Vec<u32>> {
    let text = t.render(
        &serde_json::Value::Array(messages.to_vec()),
        None,
        true,
        None,
    )?;
    // Templates usually write the BOS text themselves; never add a second one.
    let bos_in_text = tok
        .bos_id()
        .and_then(|b| tok.token_text(b))
        .is_some_and(|b| !b.is_empty() && text.starts_with(b));
    Ok(tok.encode(&text, tok.adds_bos() && !bos_in_text, true)?)
}

fn generate(
    gen: &mut Generator,
    tok: &Tokenizer,
    ids: &[u32],
    params: &GenParams,
) -> Result<(GenStats, String)> {
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    let stats = gen
        .generate(tok, ids, params, |piece| {
            text.push_str(piece);
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })
        .map_err(|e| anyhow::anyhow!(e))?;
    let _ = writeln!(out);
    Ok((stats, text))
}

fn report((stats, _): &(GenStats, String)) {
    eprintln!(
        "[prefill {} tokens ({} reused) at {:.1} tok/s | decode {} tokens at {:.1} tok/s | finish: {:?}]",
        stats.prompt_tokens,
        stats.reused_tokens,
        stats.prefill_tps(),
        stats.generated_tokens,
        stats.decode_tps(),
        stats.finish
    );
}

fn chat(
    gen: &mut Generator,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    mut messages: Vec<serde_json::Value>,
    params: &GenParams,
) -> Result<()> {
    let stdin = std::io::stdin();
    let mut transcript: Vec<u32> = Vec::new();
    eprintln!("(interactive chat: type a message and press Enter; Ctrl-D ends)");
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            continue;
        }
        let ids = match template {
            Some(t) => {
                messages.push(json!({"role": "user", "content": line}));
                encode_chat(tok, t, &messages)?
            }
            None => {
                let add_bos = transcript.is_empty() && tok.adds_bos();
                transcript.extend(tok.encode(line, add_bos, false)?);
                transcript.clone()
            }
        };
        if ids.len() >= gen.context_size() {
            eprintln!(
                "the conversation ({} tokens) no longer fits the context ({}); start again with a larger --ctx",
                ids.len(),
                gen.context_size()
            );
            return Ok(());
        }
        let r = generate(gen, tok, &ids, params)?;
        report(&r);
        if template.is_some() {
            messages.push(json!({"role": "assistant", "content": r.1}));
        } else {
            transcript = ids;
            transcript.extend(tok.encode(&r.1, false, false)?);
        }
    }
}
