//! `caldera serve`: the OpenAI-compatible HTTP server over one model sequence.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use caldera_model::{RunError, Runner};
use caldera_server::{check_bind, Engine, Server, ServerConfig};
use clap::Args;

use crate::backend::{open_runner, BackendArgs};
use crate::load;

#[derive(Args)]
pub struct ServeArgs {
    /// A .gguf file or an HF model folder.
    pub model: PathBuf,
    /// Address to listen on; anything but a loopback address needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Context size in tokens of the (single) sequence (default: the model's, at most 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (first line), keeping it out of the process list.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Requests that may wait while one runs; more get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    /// The model id reported by /v1/models and in responses (default: the file's name).
    #[arg(long)]
    pub alias: Option<String>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

pub fn serve(a: ServeArgs) -> Result<ExitCode> {
    let api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(p)) => {
            let s = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the API key file {}", p.display()))?;
            Some(s.lines().next().unwrap_or("").trim().to_owned())
        }
        (None, None) => None,
    };
    if api_key.as_deref() == Some("") {
        anyhow::bail!("the API key is empty");
    }
    check_bind(&a.host, api_key.as_deref()).map_err(anyhow::Error::msg)?;

    let loaded = load::open_model(&a.model)?;
    let tokenizer = load::tokenizer(&loaded.file)?;
    let template = load::chat_template(&loaded.file, &tokenizer)?;
    if template.is_none() {
        eprintln!("note: the model has no chat template; /v1/chat/completions will answer 400");
    }
    let ctx = a
        .ctx
        .unwrap_or_else(|| loaded.model.config.context_length.min(4096))
        .max(1);
    let model = loaded.model.clone();
    let backend = a.backend.clone();
    let engine = Engine {
        tokenizer,
        template,
        new_runner: Box::new(move || -> Result<Box<dyn Runner>, RunError> {
            open_runner(&backend, model.clone(), ctx).map_err(Into::into)
        }),
    };
    let name = a.alias.clone().unwrap_or_else(|| {
        a.model
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
    let cfg = ServerConfig {
        model_name: name.clone(),
        max_queue: a.max_queue,
        max_body_bytes: a.max_body,
        api_key,
        handle_signals: true,
        ..ServerConfig::default()
    };
    let server = Server::start(engine, cfg, listener).map_err(anyhow::Error::msg)?;
    eprintln!(
        "caldera: serving {name} ({}, {} layers), 1 slot of {} tokens, queue {}, on http://{}{}",
        loaded.model.config.arch,
        loaded.model.config.n_layers(),
        server.context(),
        a.max_queue,
        server.addr(),
        if a.api_key.is_some() || a.api_key_file.is_some() {
            " (API key required)"
        } else {
            ""
        }
    );
    eprintln!(
        "caldera: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health; Ctrl-C stops"
    );
    server.wait().context("the HTTP server failed")?;
    eprintln!("caldera: stopped");
    Ok(ExitCode::SUCCESS)
}
