//! `caldera serve`: the OpenAI-compatible HTTP server over the model's slots.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use caldera_model::{RunError, Runner};
use caldera_server::{check_bind, Engine, KvPlan, PoolCounts, Server, ServerConfig};
use clap::Args;

use crate::backend::{sequence_state_bytes, slot_runners, BackendArgs, SlotRunners};
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
    /// Sequences served at once (slots), each of at most --ctx tokens; on the CPU their
    /// KV cache is one pool of pages (--kv-pages) with a shared prefix cache; more
    /// requests wait in the queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub slots: u64,
    /// Context size in tokens of EACH slot (default: the model's, at most 4096): the most
    /// one request can hold. The KV pool is slots x ctx tokens unless --kv-pages says
    /// otherwise.
    #[arg(long)]
    pub ctx: Option<usize>,
    /// KV pages (of 16 tokens) shared by all slots: the CPU backend's pool, and on Vulkan
    /// the batched slots' page pool (default: enough for every slot's whole context).
    /// Fewer pages than that make requests wait for pages (admission by prompt +
    /// max_tokens), so 8 slots of 16k context can share the memory of fewer tokens;
    /// cached prefixes use the pages nobody holds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=(1 << 24)))]
    pub kv_pages: Option<u64>,
    /// Most prompt tokens prefilled per scheduler step (over all slots), so streams that
    /// are decoding keep flowing while a long prompt comes in.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub prefill_chunk: u64,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (first line), keeping it out of the process list.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Requests that may wait while every slot is busy; more get 503 with Retry-After.
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
    let slots = a.slots as usize;
    let page_tokens = caldera_cpu::paged::DEFAULT_PAGE_TOKENS;
    let pages = match a.kv_pages {
        Some(p) => p as usize,
        None => slots * ctx.div_ceil(page_tokens),
    };
    let kv = caldera_cpu::KvConfig {
        page_tokens,
        max_pages: Some(pages),
        prefix_cache: true,
        // Models with recurrent layers: one prompt snapshot per slot.
        snapshots: slots,
    };
    let SlotRunners {
        mut make,
        desc: backend_desc,
        pool,
        vk_batch,
        kv_token_bytes: kv_token,
        stepper,
    } = slot_runners(&a.backend, loaded.model.clone(), ctx, slots, &kv)?;
    let weights: u64 = loaded
        .file
        .tensors()
        .iter()
        .map(|t| t.data.len() as u64)
        .sum();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let state = sequence_state_bytes(&loaded.model, 0);
    let (kv_bytes, kv_desc) = match (&pool, &vk_batch) {
        (_, Some(b)) => {
            let vk_pages = b.pages();
            let page = caldera_vulkan::KV_PAGE;
            (
                kv_token * (vk_pages * page) as u64,
                format!(
                    "Vulkan KV pool {vk_pages} pages x {page} tokens = {} tokens shared by the slots (at most {ctx} per slot; {})",
                    vk_pages * page,
                    match b.snapshots() {
                        0 => "attention-only models share prompt prefixes as pages".to_string(),
                        n => format!("recurrent layers: pages shared with up to {n} prompt snapshots"),
                    }
                ),
            )
        }
        (Some(p), None) => (
            (pages * p.page_bytes()) as u64,
            format!(
                "KV pool {pages} pages x {page_tokens} tokens = {} tokens shared by the slots (at most {ctx} per slot; {})",
                pages * page_tokens,
                if p.prefix_cache() {
                    "prefix cache of pages".to_string()
                } else {
                    format!("recurrent layers: no page sharing, up to {slots} prompt snapshots")
                }
            ),
        ),
        (None, None) => (
            kv_token * (ctx * slots) as u64,
            format!(
                "KV cache {ctx} tokens per slot at {kv_token} bytes per token, each runner its own (admission budget {pages} pages x {page_tokens} tokens)"
            ),
        ),
    };
    // A hybrid model also keeps one snapshot's recurrent state per slot (on Vulkan in
    // regions of the batch's state pools, allocated up front).
    let states = match (&pool, &vk_batch) {
        (Some(_), _) => 2 * slots,
        (None, Some(b)) => slots + b.snapshots(),
        (None, None) => slots,
    } as u64;
    let total = weights + kv_bytes + state * states;
    eprintln!(
        "caldera: memory plan: weights {:.1} MiB; {kv_desc}: {:.1} MiB; recurrent state {:.1} MiB x {states}; total {:.1} MiB",
        mib(weights),
        mib(kv_bytes),
        mib(state),
        mib(total),
    );
    let probe = match (pool, vk_batch) {
        (Some(p), _) => Some(Box::new(move || {
            let s = p.stats();
            PoolCounts {
                in_use: s.in_use,
                cached: s.cached,
            }
        }) as caldera_server::PoolProbe),
        // The batch's pages are the server's when they are the same size.
        (None, Some(b)) if page_tokens == caldera_vulkan::KV_PAGE => Some(Box::new(move || {
            let (in_use, cached) = b.page_counts();
            PoolCounts { in_use, cached }
        })
            as caldera_server::PoolProbe),
        _ => None,
    };
    let kv_plan = KvPlan {
        page_tokens,
        pages,
        probe,
    };
    let engine = Engine {
        tokenizer,
        template,
        arch: loaded.model.config.arch.clone(),
        new_runner: Box::new(move || -> Result<Box<dyn Runner>, RunError> {
            make().map_err(Into::into)
        }),
        kv: Some(kv_plan),
        stepper,
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
        slots,
        prefill_chunk: a.prefill_chunk as usize,
        max_queue: a.max_queue,
        max_body_bytes: a.max_body,
        api_key,
        handle_signals: true,
        ..ServerConfig::default()
    };
    let server = Server::start(engine, cfg, listener).map_err(anyhow::Error::msg)?;
    eprintln!(
        "caldera: serving {name} ({}, {} layers) on {backend_desc}: {slots} slot{} of {} tokens each (--ctx is per slot), {pages} KV pages, queue {}, tool calls as {}, on http://{}{}",
        loaded.model.config.arch,
        loaded.model.config.n_layers(),
        if slots == 1 { "" } else { "s" },
        server.context(),
        a.max_queue,
        server.tool_format().name(),
        server.addr(),
        if a.api_key.is_some() || a.api_key_file.is_some() {
            " (API key required)"
        } else {
            ""
        }
    );
    eprintln!(
        "caldera: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /slots, GET /metrics; Ctrl-C stops"
    );
    server.wait().context("the HTTP server failed")?;
    eprintln!("caldera: stopped");
    Ok(ExitCode::SUCCESS)
}
