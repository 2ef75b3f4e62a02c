//! An OpenAI-compatible HTTP server over a model's slots (parallel sequences).
//!
//! Routes: `POST /v1/chat/completions` (with tool calling: [`tools`]),
//! `POST /v1/completions` (both streaming as server-sent events ending with
//! `data: [DONE]`, or not), `GET /v1/models`, `GET /health`, `GET /slots` (JSON per
//! slot), `GET /metrics` (Prometheus text). Request fields and their bounds are listed in
//! [`request`].
//!
//! Threads: the HTTP side runs on a small tokio runtime and never touches the model; one
//! scheduler thread ([`scheduler`]) owns every slot and advances all active ones each step
//! (continuous batching; prefill in chunks between decode steps). Requests wait in a
//! bounded queue while every slot is busy or the KV pages they can need cannot be
//! reserved (full queue: 503 with `Retry-After`). Prompts
//! are rendered and tokenized on tokio's blocking pool before they are queued, so an
//! over-long prompt is refused (400 with the token counts) before it reaches the model.
//!
//! Safety rails: caps on the header block (431) and the body (413), a header-read
//! deadline, bearer-key auth on every route but `/health` with a constant-time compare;
//! without a key, only requests whose `Host` names localhost are answered (403
//! otherwise: DNS rebinding); no CORS headers; cancellation of a job whose client went
//! away (its slot is freed at the next step); a panic inside one slot's generation fails
//! only that request; graceful shutdown (in-flight requests finish, up to 30 s).

pub mod request;
pub mod scheduler;
pub mod tools;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use caldera_engine::{FinishReason, GenParams};
use caldera_model::BatchStepper;
#[cfg(doc)]
use caldera_model::SerialStepper;
use caldera_tokenizer::{ChatTemplate, Tokenizer};
use scheduler::{Event, Job, KvBudget, Refused, Settings, Shared};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tools::{Out, ToolCall, ToolChoice, ToolFormat, ToolParser};

pub use request::ApiError;
use request::{Input, Parsed};
pub use scheduler::{PoolCounts, PoolProbe, RunnerFactory};

/// Positions per KV page when the backend does not say.
pub const DEFAULT_PAGE_TOKENS: usize = 16;

/// The KV pages requests are admitted by.
pub struct KvPlan {
    pub page_tokens: usize,
    /// Pages shared by all slots.
    pub pages: usize,
    /// The backend pool's live counts (the CPU backend's paged cache); `None` where each
    /// runner keeps its own cache and the pages are an admission budget only.
    pub probe: Option<PoolProbe>,
}

/// What the server runs: the tokenizer, the chat template, the architecture name (for
/// the tool-call format), a way to make runners (one per slot at start-up, another
/// after a slot's generation panicked) and the stepper that runs a step of the slots
/// ([`SerialStepper`]: one runner after another; a backend with a batched decode gives
/// its own).
pub struct Engine {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub arch: String,
    pub new_runner: RunnerFactory,
    /// The KV pool; `None`: a budget of [`DEFAULT_PAGE_TOKENS`]-token pages covering every
    /// slot's whole context (admission is then by slots only).
    pub kv: Option<KvPlan>,
    pub stepper: Box<dyn BatchStepper>,
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The id `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Sequences served at once, each with its own runner and context.
    pub slots: usize,
    /// Most prompt tokens prefilled in one scheduler step (over all slots), so that
    /// running streams keep flowing while long prompts come in.
    pub prefill_chunk: usize,
    /// Requests that may wait while every slot is busy; beyond it, 503.
    pub max_queue: usize,
    /// Largest request body in bytes; beyond it, 413.
    pub max_body_bytes: usize,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Stop gracefully on SIGINT / SIGTERM.
    pub handle_signals: bool,
    /// A connection must send a request's whole header within this time, else it is
    /// closed (slow-header clients).
    pub header_timeout: Duration,
    /// Largest request header block in bytes (at least 8192); beyond it, 431.
    pub max_header_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_name: "caldera".into(),
            slots: 1,
            prefill_chunk: 256,
            max_queue: 16,
            max_body_bytes: 4 << 20,
            api_key: None,
            handle_signals: false,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
        }
    }
}

/// Whether `host` may be bound with this key: loopback always, anything else only with a
/// non-empty key.
pub fn check_bind(host: &str, api_key: Option<&str>) -> Result<(), String> {
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback || api_key.is_some_and(|k| !k.is_empty()) {
        Ok(())
    } else {
        Err(format!(
            "binding to {host} exposes the server beyond this machine: set --api-key (or bind 127.0.0.1)"
        ))
    }
}

/// Equality of two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

struct AppState {
    cfg: ServerConfig,
    tok: Arc<Tokenizer>,
    template: Option<Arc<ChatTemplate>>,
    /// Whether the template renders `tools` itself (else they go in a system message).
    template_tools: bool,
    tool_format: ToolFormat,
    /// Tokens of one slot.
    context: usize,
    shared: Arc<Shared>,
    /// Finished HTTP requests by (route, status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    created: u64,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    worker: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    context: usize,
    tool_format: ToolFormat,
}

impl Server {
    /// Starts serving on `listener` (already bound). Makes every slot's runner now, so a
    /// model that cannot run (or does not fit `slots` times) fails here.
    pub fn start(
        engine: Engine,
        cfg: ServerConfig,
        listener: std::net::TcpListener,
    ) -> Result<Server, String> {
        let Engine {
            tokenizer,
            template,
            arch,
            mut new_runner,
            kv,
            stepper,
        } = engine;
        if cfg.slots == 0 {
            return Err("the server needs at least one slot".into());
        }
        let mut runners = Vec::with_capacity(cfg.slots);
        for i in 0..cfg.slots {
            let r = new_runner().map_err(|e| {
                if i == 0 {
                    format!("cannot open the model: {e}")
                } else {
                    format!("cannot open slot {i} of {}: {e}", cfg.slots)
                }
            })?;
            runners.push(r);
        }
        let capacities: Vec<usize> = runners.iter().map(|r| r.capacity()).collect();
        let context = capacities.iter().copied().min().unwrap_or(0);
        let tok = Arc::new(tokenizer);
        let kv = kv.unwrap_or_else(|| KvPlan {
            page_tokens: DEFAULT_PAGE_TOKENS,
            pages: capacities
                .iter()
                .map(|c| c.div_ceil(DEFAULT_PAGE_TOKENS))
                .sum(),
            probe: None,
        });
        let page_tokens = kv.page_tokens.max(1);
        let largest = capacities.iter().copied().max().unwrap_or(0);
        if kv.pages < largest.div_ceil(page_tokens) {
            return Err(format!(
                "{} KV pages of {page_tokens} tokens cannot hold one slot's context of {largest} tokens (it needs {} pages)",
                kv.pages,
                largest.div_ceil(page_tokens)
            ));
        }
        let budget = KvBudget {
            page_tokens,
            total: kv.pages,
            reserved: std::sync::atomic::AtomicUsize::new(0),
            probe: kv.probe,
        };
        let shared = Arc::new(Shared::new(&capacities, cfg.max_queue, budget));
        let worker = {
            let (tok, sh) = (tok.clone(), shared.clone());
            let settings = Settings {
                prefill_chunk: cfg.prefill_chunk,
            };
            std::thread::Builder::new()
                .name("caldera-scheduler".into())
                .spawn(move || scheduler::run(tok, new_runner, runners, stepper, sh, settings))
                .map_err(|e| format!("cannot start the scheduler thread: {e}"))?
        };
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let tool_format = ToolFormat::detect(template.as_ref().map(|t| t.source()), &arch);
        let template_tools = template
            .as_ref()
            .is_some_and(|t| tools::template_handles_tools(t.source()));
        let state = Arc::new(AppState {
            cfg: cfg.clone(),
            tok,
            template: template.map(Arc::new),
            template_tools,
            tool_format,
            context,
            shared: shared.clone(),
            requests: Mutex::new(BTreeMap::new()),
            created: now(),
        });
        let app = router(state);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let signals = cfg.handle_signals;
        let limits = (cfg.header_timeout, cfg.max_header_bytes);
        let thread = std::thread::Builder::new()
            .name("caldera-http".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    accept_loop(listener, app, limits, shutdown(stopped, signals)).await;
                    Ok(())
                })
            })
            .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
            worker: Some(worker),
            shared,
            context,
            tool_format,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Tokens one slot holds.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The tool-call format chosen for the model.
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Asks the server to stop (in-flight requests finish) and waits for it.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join()
    }

    /// Waits until the server stops (a signal when `handle_signals`, or `shutdown`).
    pub fn wait(mut self) -> std::io::Result<()> {
        self.join()
    }

    fn join(&mut self) -> std::io::Result<()> {
        let r = match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the HTTP thread panicked")),
            None => Ok(()),
        };
        // The HTTP side is gone: the scheduler finishes what it holds and ends.
        self.shared.queue.close();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        r
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
            let _ = self.join();
        }
    }
}

async fn shutdown(stopped: tokio::sync::oneshot::Receiver<()>, signals: bool) {
    #[cfg(unix)]
    if signals {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            tokio::select! {
                _ = stopped => {}
                _ = int.recv() => eprintln!("caldera: SIGINT, finishing in-flight requests"),
                _ = term.recv() => eprintln!("caldera: SIGTERM, finishing in-flight requests"),
            }
            return;
        }
    }
    let _ = signals;
    let _ = stopped.await;
}

/// Accepts connections until `stop` resolves, then waits up to [`SHUTDOWN_GRACE`] for
/// the open ones to finish (idle keep-alive connections are closed at once). Each connection is HTTP/1.1 with a
/// header-read deadline and a header size cap.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    (header_timeout, max_header_bytes): (Duration, usize),
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = &mut stop => break,
        };
        let stream = match stream {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                eprintln!("caldera: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(max_header_bytes.max(8192));
        let conn = graceful.watch(b.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!(
            "caldera: requests still open after {} s; cancelling them",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

/// How long a graceful shutdown waits for open requests; the runtime is then dropped,
/// which cancels their generations.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/slots", get(slots))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Whether a `Host` header names this machine (`localhost`, `127.x.x.x`, `[::1]`, with
/// or without a port).
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The route label requests are counted under.
fn route_label(path: &str) -> Option<&'static str> {
    match path {
        "/v1/chat/completions" => Some("chat"),
        "/v1/completions" => Some("completions"),
        "/v1/models" => Some("models"),
        _ => None,
    }
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let label = route_label(req.uri().path());
    let resp = check_auth(&st, req, next).await;
    if let Some(l) = label {
        let mut m = st.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((l, resp.status().as_u16())).or_insert(0) += 1;
    }
    resp
}

async fn check_auth(st: &AppState, req: Request, next: Next) -> Response {
    // Without a key, only this machine may talk to the server: a web page that rebinds
    // its own name to 127.0.0.1 still sends its name as the Host.
    if st.cfg.api_key.is_none() {
        let host = req
            .headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !is_loopback_host(host) {
            return ApiError::status(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "without an API key the server only answers requests addressed to localhost",
            )
            .into_response();
        }
    }
    if let Some(key) = &st.cfg.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get("authorization")
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .unwrap_or(b"");
            if !constant_time_eq(given, key.as_bytes()) {
                let mut e = ApiError::status(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "missing or invalid API key (send `Authorization: Bearer <key>`)",
                );
                e.code = Some("invalid_api_key");
                return e.into_response();
            }
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let alive = st.shared.alive.load(Ordering::SeqCst);
    let q = &st.shared.queue;
    let body = json!({
        "status": if alive { "ok" } else { "error" },
        "busy": q.active() > 0,
        "slots": st.cfg.slots,
        "slots_busy": q.active(),
        "queued": q.len(),
        "kv_pages_free": st.shared.kv.free(&st.shared.slot_infos()),
    });
    let code = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn slots(State(st): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = st
        .shared
        .slot_infos()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "id": i,
                "state": s.state.as_str(),
                "context_used": s.context_used,
                "context_capacity": s.context_capacity,
                "prompt_tokens": s.prompt_tokens,
                "reused_tokens": s.reused_tokens,
                "generated_tokens": s.generated_tokens,
                "tokens_per_second": (s.tokens_per_second * 100.0).round() / 100.0,
                "requests": s.requests,
                "kv_pages": s.kv_pages,
                "kv_pages_reserved": s.kv_reserved,
            })
        })
        .collect();
    Json(Value::Array(list))
}

/// Prometheus text exposition (version 0.0.4).
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut o = String::new();
    let infos = st.shared.slot_infos();
    let name = "caldera_slot_state";
    let _ = writeln!(
        o,
        "# HELP {name} 1 for the state each slot is in (idle, prefill, decode).\n# TYPE {name} gauge"
    );
    for (i, s) in infos.iter().enumerate() {
        for state in ["idle", "prefill", "decode"] {
            let on = (s.state.as_str() == state) as u8;
            let _ = writeln!(o, "{name}{{slot=\"{i}\",state=\"{state}\"}} {on}");
        }
    }
    type Gauge = (&'static str, &'static str, fn(&scheduler::SlotInfo) -> f64);
    let per_slot: [Gauge; 5] = [
        (
            "caldera_slot_kv_pages",
            "KV pages the slot's sequence holds.",
            |s| s.kv_pages as f64,
        ),
        (
            "caldera_slot_tokens_per_second",
            "Decode speed of the slot's current request (0 when idle).",
            |s| s.tokens_per_second,
        ),
        (
            "caldera_slot_context_used_tokens",
            "Tokens the slot's sequence holds.",
            |s| s.context_used as f64,
        ),
        (
            "caldera_slot_context_capacity_tokens",
            "Tokens the slot's sequence can hold.",
            |s| s.context_capacity as f64,
        ),
        (
            "caldera_slot_generated_tokens",
            "Tokens generated for the slot's current (or last) request.",
            |s| s.generated_tokens as f64,
        ),
    ];
    for (name, help, get) in per_slot {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (i, s) in infos.iter().enumerate() {
            let _ = writeln!(o, "{name}{{slot=\"{i}\"}} {}", get(s));
        }
    }
    let q = &st.shared.queue;
    let c = &st.shared.counters;
    let kv = &st.shared.kv;
    let scalars: [(&str, &str, &str, u64); 19] = [
        (
            "caldera_kv_admission_waits_total",
            "counter",
            "Requests that waited in the queue for KV pages (a slot was free).",
            c.page_waits.load(Ordering::Relaxed),
        ),
        (
            "caldera_kv_page_tokens",
            "gauge",
            "Positions per KV page.",
            kv.page_tokens as u64,
        ),
        (
            "caldera_kv_pages_total",
            "gauge",
            "KV pages of the pool shared by the slots (or the admission budget).",
            kv.total as u64,
        ),
        (
            "caldera_kv_pages_free",
            "gauge",
            "KV pages no running or idle sequence holds (free or only cached).",
            kv.free(&infos) as u64,
        ),
        (
            "caldera_kv_pages_cached",
            "gauge",
            "KV pages in the shared prefix cache (evicted, least recently used first, when needed).",
            kv.cached() as u64,
        ),
        (
            "caldera_kv_pages_reserved",
            "gauge",
            "KV pages reserved for the running requests (prompt + max_tokens each).",
            kv.reserved.load(Ordering::Relaxed) as u64,
        ),
        (
            "caldera_prefix_cache_misses_total",
            "counter",
            "Requests that computed their whole prompt.",
            c.prefix_misses.load(Ordering::Relaxed),
        ),
        (
            "caldera_slots",
            "gauge",
            "Slots (parallel sequences).",
            infos.len() as u64,
        ),
        (
            "caldera_slots_busy",
            "gauge",
            "Slots holding a request.",
            q.active() as u64,
        ),
        (
            "caldera_queue_depth",
            "gauge",
            "Requests waiting for a slot.",
            q.len() as u64,
        ),
        (
            "caldera_queue_capacity",
            "gauge",
            "Most requests that may wait.",
            q.capacity() as u64,
        ),
        (
            "caldera_prefix_cache_hits_total",
            "counter",
            "Requests that reused part of their prompt (a slot's sequence or the shared prefix cache).",
            c.prefix_hits.load(Ordering::Relaxed),
        ),
        (
            "caldera_prefix_cache_reused_tokens_total",
            "counter",
            "Prompt tokens taken from caches instead of computed.",
            c.reused_tokens.load(Ordering::Relaxed),
        ),
        (
            "caldera_prompt_tokens_total",
            "counter",
            "Prompt tokens of requests started.",
            c.prompt_tokens.load(Ordering::Relaxed),
        ),
        (
            "caldera_generated_tokens_total",
            "counter",
            "Tokens generated by finished requests.",
            c.generated_tokens.load(Ordering::Relaxed),
        ),
        (
            "caldera_generations_finished_total",
            "counter",
            "Generations that ran to their end.",
            c.finished.load(Ordering::Relaxed),
        ),
        (
            "caldera_generations_cancelled_total",
            "counter",
            "Generations stopped because the client went away.",
            c.cancelled.load(Ordering::Relaxed),
        ),
        (
            "caldera_generations_failed_total",
            "counter",
            "Generations that ended with an error.",
            c.failed.load(Ordering::Relaxed),
        ),
        (
            "caldera_slot_restarts_total",
            "counter",
            "Slot runners replaced after a panic.",
            c.restarts.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, v) in scalars {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    let name = "caldera_requests_total";
    let _ = writeln!(
        o,
        "# HELP {name} Finished HTTP requests by route and status.\n# TYPE {name} counter"
    );
    let reqs = st
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for ((route, status), v) in reqs {
        let _ = writeln!(o, "{name}{{route=\"{route}\",status=\"{status}\"}} {v}");
    }
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        o,
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_name,
            "object": "model",
            "created": st.created,
            "owned_by": "caldera",
            "context_length": st.context,
        }],
    }))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A 24-hex-digit id, unique within the process.
fn new_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    format!("{prefix}-{z:016x}{:08x}", n as u32)
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eog | FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Context => "length",
    }
}

/// Sets the flag when dropped: a request whose handler or stream goes away cancels its job.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(st, body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(st, body, Kind::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The prompt's tokens, and the text the prompt put at the start of the answer (a
/// forced tool call's opening).
fn encode(
    st: &AppState,
    input: Input,
    tools: &[Value],
    choice: &ToolChoice,
) -> Result<(Vec<u32>, String), ApiError> {
    let tok = &st.tok;
    let bad = |e: String| ApiError::invalid(Some("prompt"), e);
    match input {
        Input::Tokens(t) => Ok((t, String::new())),
        Input::Text(s) => tok
            .encode(&s, tok.adds_bos(), false)
            .map(|t| (t, String::new()))
            .map_err(|e| bad(format!("cannot tokenize the prompt: {e}"))),
        Input::Messages(m) => {
            let t = st.template.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    Some("messages"),
                    "the model has no chat template: use /v1/completions",
                )
            })?;
            let offer = !tools.is_empty() && *choice != ToolChoice::None;
            let rendered = if st.template_tools {
                let list = Value::Array(tools.to_vec());
                t.render(&m, offer.then_some(&list), true, None)
            } else {
                let msgs = m.as_array().map_or(&[][..], Vec::as_slice);
                let msgs = tools::fallback_messages(msgs, offer.then_some(tools));
                t.render(&Value::Array(msgs), None, true, None)
            };
            let mut text =
                rendered.map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
            let prefix = if offer {
                st.tool_format.forced_prefix(choice)
            } else {
                String::new()
            };
            text.push_str(&prefix);
            // Templates usually write the BOS text themselves; never add a second one.
            let bos_in_text = tok
                .bos_text()
                .is_some_and(|b| !b.is_empty() && text.starts_with(b));
            tok.encode(&text, tok.adds_bos() && !bos_in_text, true)
                .map(|t| (t, prefix))
                .map_err(|e| ApiError::invalid(Some("messages"), format!("cannot tokenize: {e}")))
        }
    }
}

async fn handle(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body exceeds {} bytes", st.cfg.max_body_bytes),
            )
        } else {
            ApiError::invalid(None, format!("cannot read the body: {r}"))
        }
    })?;
    let parsed = match kind {
        Kind::Chat => request::parse_chat(&body, st.context)?,
        Kind::Completion => request::parse_completion(&body, st.context, st.tok.vocab_size())?,
    };
    let Parsed {
        input,
        max_tokens,
        sampler,
        stop,
        stream,
        include_usage,
        tools,
        tool_choice,
        parallel_tool_calls,
    } = parsed;
    let offered = !tools.is_empty() && tool_choice != ToolChoice::None;
    let st2 = st.clone();
    let (tools2, choice2) = (tools.clone(), tool_choice.clone());
    let (prompt, prefix) =
        tokio::task::spawn_blocking(move || encode(&st2, input, &tools2, &choice2))
            .await
            .map_err(|e| {
                ApiError::status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("prompt rendering failed: {e}"),
                )
            })??;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    if prompt.len() >= st.context {
        let param = if kind == Kind::Chat {
            "messages"
        } else {
            "prompt"
        };
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "the prompt is {} tokens, but a slot's context holds {} tokens (the prompt must leave room for at least one new token)",
                prompt.len(),
                st.context
            ),
        )
        .with_code("context_length_exceeded"));
    }
    // Chat answers go through a tool parser when tools are offered, and always for
    // Harmony models (their channels separate the answer from the reasoning).
    let parser =
        (kind == Kind::Chat && (offered || st.tool_format == ToolFormat::Harmony)).then(|| {
            let mut p = ToolParser::new(st.tool_format, if offered { &tools } else { &[] });
            p.prime(&prefix);
            p
        });
    let prompt_tokens = prompt.len();
    let mut params = GenParams::new(
        max_tokens.unwrap_or(st.context - prompt_tokens),
        sampler,
        stop,
    );
    params.specials = parser.is_some();
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt,
        params,
        events: tx,
        cancel: cancel.clone(),
        waited_for_pages: AtomicBool::new(false),
    };
    if let Err(why) = st.shared.queue.push(job) {
        let mut err = match why {
            Refused::Full => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!(
                    "the server is busy: {} requests are already waiting for one of the {} slots or for KV pages; retry later",
                    st.cfg.max_queue, st.cfg.slots
                ),
            ),
            Refused::Closed => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model worker has stopped",
            ),
        };
        err.retry_after = Some(1);
        return Err(err);
    }
    let meta = Meta {
        id: new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now(),
        model: st.cfg.model_name.clone(),
        kind,
    };
    let reader = Reader {
        parser,
        forced: offered && matches!(tool_choice, ToolChoice::Required | ToolChoice::Named(_)),
        parallel: parallel_tool_calls,
        calls: 0,
    };
    let guard = CancelOnDrop(cancel);
    if stream {
        Ok(stream_response(meta, rx, guard, include_usage, reader))
    } else {
        collect_response(meta, rx, guard, reader).await
    }
}

/// Reads a generation's events: through the tool parser when there is one.
struct Reader {
    parser: Option<ToolParser>,
    /// `tool_choice` asked for a call.
    forced: bool,
    /// Several calls allowed (`parallel_tool_calls`).
    parallel: bool,
    /// Calls passed on so far.
    calls: usize,
}

impl Reader {
    fn text(&mut self, t: String) -> Vec<Out> {
        let outs = match &mut self.parser {
            Some(p) => p.push_text(&t),
            None => vec![Out::Content(t)],
        };
        self.keep(outs)
    }

    fn special(&mut self, t: &str) -> Vec<Out> {
        let outs = match &mut self.parser {
            Some(p) => p.push_special(t),
            None => Vec::new(),
        };
        self.keep(outs)
    }

    fn finish(&mut self) -> Vec<Out> {
        let outs = match &mut self.parser {
            Some(p) => p.finish(),
            None => Vec::new(),
        };
        self.keep(outs)
    }

    /// Drops calls past the first without `parallel_tool_calls`, and empty text.
    fn keep(&mut self, outs: Vec<Out>) -> Vec<Out> {
        let mut kept = Vec::with_capacity(outs.len());
        for o in outs {
            match &o {
                Out::Call(_) if !self.parallel && self.calls > 0 => continue,
                Out::Call(_) => self.calls += 1,
                Out::Content(t) | Out::Reasoning(t) if t.is_empty() => continue,
                _ => {}
            }
            kept.push(o);
        }
        kept
    }

    /// The error when `tool_choice` required a call and none came.
    fn missing_call(&self, text: &str) -> Option<ApiError> {
        if !self.forced || self.calls > 0 {
            return None;
        }
        let mut shown: String = text.chars().take(200).collect();
        if shown.len() < text.len() {
            shown.push_str("...");
        }
        Some(
            ApiError::status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "server_error",
                format!("`tool_choice` asked for a tool call, but the model's output is not a valid call: {shown:?}"),
            )
            .with_code("tool_call_not_produced"),
        )
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

fn usage(p: usize, c: usize) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

fn internal(message: String) -> ApiError {
    ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
}

fn call_id() -> String {
    new_id("call").replacen('-', "_", 1)
}

fn call_json(c: &ToolCall, id: String) -> Value {
    json!({
        "id": id,
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    })
}

async fn collect_response(
    meta: Meta,
    mut rx: UnboundedReceiver<Event>,
    _guard: CancelOnDrop,
    mut reader: Reader,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    let mut raw = String::new();
    let mut take = |outs: Vec<Out>, text: &mut String| {
        for o in outs {
            match o {
                Out::Content(t) => text.push_str(&t),
                Out::Reasoning(t) => reasoning.push_str(&t),
                Out::Call(c) => calls.push(c),
            }
        }
    };
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => {
                raw.push_str(&t);
                let outs = reader.text(t);
                take(outs, &mut text);
            }
            Some(Event::Special(t)) => {
                let outs = reader.special(&t);
                take(outs, &mut text);
            }
            Some(Event::Error(e)) => return Err(internal(e)),
            None => return Err(internal("the generation ended without a result".into())),
            Some(Event::Done {
                prompt_tokens,
                completion_tokens,
                finish,
            }) => {
                let outs = reader.finish();
                take(outs, &mut text);
                if let Some(e) = reader.missing_call(&raw) {
                    return Err(e);
                }
                let finish = if calls.is_empty() {
                    finish_str(finish)
                } else {
                    "tool_calls"
                };
                let choice = match meta.kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": text});
                        if !calls.is_empty() {
                            if text.is_empty() {
                                message["content"] = Value::Null;
                            }
                            message["tool_calls"] =
                                calls.iter().map(|c| call_json(c, call_id())).collect();
                        }
                        if !reasoning.is_empty() {
                            message["reasoning_content"] = reasoning.clone().into();
                        }
                        json!({
                            "index": 0,
                            "message": message,
                            "logprobs": null,
                            "finish_reason": finish,
                        })
                    }
                    Kind::Completion => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": null,
                        "finish_reason": finish,
                    }),
                };
                let object = match meta.kind {
                    Kind::Chat => "chat.completion",
                    Kind::Completion => "text_completion",
                };
                return Ok(Json(json!({
                    "id": meta.id,
                    "object": object,
                    "created": meta.created,
                    "model": meta.model,
                    "choices": [choice],
                    "usage": usage(prompt_tokens, completion_tokens),
                }))
                .into_response());
            }
        }
    }
}

impl Meta {
    /// One streamed chunk around `choice` (or no choice, for the usage chunk).
    fn chunk(&self, choice: Option<Value>, usage: Option<Value>) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choice.map_or_else(Vec::new, |c| vec![c]),
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    fn delta(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }

    /// A chat chunk whose delta is `delta`.
    fn chat_delta(&self, delta: Value) -> SseEvent {
        sse(&self.chunk(
            Some(json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null})),
            None,
        ))
    }

    /// The chunks of parser outputs; `calls` counts the tool calls streamed so far.
    fn outs(&self, outs: Vec<Out>, calls: &mut usize) -> Vec<SseEvent> {
        let mut ev = Vec::new();
        for o in outs {
            match o {
                Out::Content(t) => ev.push(sse(
                    &self.chunk(Some(self.delta(Some(&t), false, None)), None)
                )),
                Out::Reasoning(t) => ev.push(self.chat_delta(json!({"reasoning_content": t}))),
                Out::Call(c) => {
                    let index = *calls;
                    *calls += 1;
                    // The call's id and name first, then its arguments (whole).
                    ev.push(self.chat_delta(json!({"tool_calls": [{
                        "index": index,
                        "id": call_id(),
                        "type": "function",
                        "function": {"name": c.name, "arguments": ""},
                    }]})));
                    ev.push(self.chat_delta(json!({"tool_calls": [{
                        "index": index,
                        "function": {"arguments": c.arguments},
                    }]})));
                }
            }
        }
        ev
    }
}

fn sse(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn stream_response(
    meta: Meta,
    mut rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    include_usage: bool,
    mut reader: Reader,
) -> Response {
    let (out, out_rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let _guard = guard;
        if meta.kind == Kind::Chat {
            let first = meta.chunk(Some(meta.delta(Some(""), true, None)), None);
            if out.send(sse(&first)).await.is_err() {
                return;
            }
        }
        let mut calls = 0usize;
        let mut raw = String::new();
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = out.closed() => return,
            };
            let msgs = match ev {
                Some(Event::Text(t)) => {
                    raw.push_str(&t);
                    let outs = reader.text(t);
                    meta.outs(outs, &mut calls)
                }
                Some(Event::Special(t)) => {
                    let outs = reader.special(&t);
                    meta.outs(outs, &mut calls)
                }
                Some(Event::Done {
                    prompt_tokens,
                    completion_tokens,
                    finish,
                }) => {
                    let outs = reader.finish();
                    for m in meta.outs(outs, &mut calls) {
                        if out.send(m).await.is_err() {
                            return;
                        }
                    }
                    if let Some(e) = reader.missing_call(&raw) {
                        let _ = out.send(sse(&e.body())).await;
                        return;
                    }
                    let finish = if calls > 0 {
                        "tool_calls"
                    } else {
                        finish_str(finish)
                    };
                    let last = meta.chunk(Some(meta.delta(None, false, Some(finish))), None);
                    if out.send(sse(&last)).await.is_err() {
                        return;
                    }
                    if include_usage {
                        let u = meta.chunk(None, Some(usage(prompt_tokens, completion_tokens)));
                        if out.send(sse(&u)).await.is_err() {
                            return;
                        }
                    }
                    let _ = out.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Some(Event::Error(e)) => {
                    let _ = out.send(sse(&internal(e).body())).await;
                    return;
                }
                None => {
                    let e = internal("the generation ended without a result".into());
                    let _ = out.send(sse(&e.body())).await;
                    return;
                }
            };
            for m in msgs {
                if out.send(m).await.is_err() {
                    return;
                }
            }
        }
    });
    let events = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_rules() {
        for h in [
            "127.0.0.1",
            "localhost",
            "LOCALHOST",
            "::1",
            "[::1]",
            "127.0.0.2",
        ] {
            assert!(check_bind(h, None).is_ok(), "{h}");
        }
        for h in ["0.0.0.0", "::", "192.168.1.5", "example.com"] {
            assert!(check_bind(h, None).is_err(), "{h}");
            assert!(check_bind(h, Some("")).is_err(), "{h}");
            assert!(check_bind(h, Some("k")).is_ok(), "{h}");
        }
    }

    #[test]
    fn hosts() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.evil:80",
            "[::2]:1",
            "10.0.0.1",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn key_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(constant_time_eq(b"", b""));
        for (a, b) in [
            (&b"abc"[..], &b"abd"[..]),
            (b"abc", b"ab"),
            (b"ab", b"abc"),
            (b"", b"a"),
        ] {
            assert!(!constant_time_eq(a, b));
        }
    }
}
