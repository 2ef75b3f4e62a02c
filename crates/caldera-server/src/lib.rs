//! An OpenAI-compatible HTTP server over one model sequence.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both streaming as
//! server-sent events ending with `data: [DONE]`, or not), `GET /v1/models`,
//! `GET /health`. Request fields and their bounds are listed in [`request`].
//!
//! Threads: the HTTP side runs on a small tokio runtime and never touches the model; a
//! single worker thread ([`worker`]) owns the generator and serves jobs one at a time from
//! a bounded queue (full queue: 503 with `Retry-After`). Prompts are rendered and
//! tokenized on tokio's blocking pool before they are queued, so an over-long prompt is
//! refused (400 with the token counts) before it reaches the model.
//!
//! Safety rails: caps on the header block (431) and the body (413), a header-read
//! deadline, bearer-key auth on every route but `/health` with a constant-time compare;
//! without a key, only requests whose `Host` names localhost are answered (403
//! otherwise: DNS rebinding); no CORS headers; cancellation of a job whose client went
//! away (checked before every token); a panic inside one generation fails only that
//! request; graceful shutdown (in-flight requests finish, up to 30 s).

pub mod request;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
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
use caldera_tokenizer::{ChatTemplate, Tokenizer};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use request::ApiError;
use request::{Input, Parsed};
pub use worker::RunnerFactory;
use worker::{Event, Job, WorkerState};

/// What the server runs: the tokenizer, the chat template, and a way to make runners
/// (one at start-up, another after a generation panicked).
pub struct Engine {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub new_runner: RunnerFactory,
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The id `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Requests that may wait while one runs; beyond it, 503.
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
    context: usize,
    jobs: mpsc::SyncSender<Job>,
    worker: Arc<WorkerState>,
    created: u64,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    worker: Option<std::thread::JoinHandle<()>>,
    context: usize,
}

impl Server {
    /// Starts serving on `listener` (already bound). Makes the first runner now, so a
    /// model that cannot run fails here.
    pub fn start(
        engine: Engine,
        cfg: ServerConfig,
        listener: std::net::TcpListener,
    ) -> Result<Server, String> {
        let Engine {
            tokenizer,
            template,
            mut new_runner,
        } = engine;
        let first = new_runner().map_err(|e| format!("cannot open the model: {e}"))?;
        let context = first.capacity();
        let tok = Arc::new(tokenizer);
        let (jobs, rx) = mpsc::sync_channel(cfg.max_queue);
        let wstate = Arc::new(WorkerState::default());
        wstate.alive.store(true, Ordering::SeqCst);
        let worker = {
            let (tok, ws) = (tok.clone(), wstate.clone());
            std::thread::Builder::new()
                .name("caldera-worker".into())
                .spawn(move || worker::run(rx, tok, new_runner, first, ws))
                .map_err(|e| format!("cannot start the worker thread: {e}"))?
        };
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let state = Arc::new(AppState {
            cfg: cfg.clone(),
            tok,
            template: template.map(Arc::new),
            context,
            jobs,
            worker: wstate,
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
            context,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Tokens the sequence holds.
    pub fn context(&self) -> usize {
        self.context
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
        // The router (and with it the job sender) is gone: the worker drains and ends.
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

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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
    let alive = st.worker.alive.load(Ordering::SeqCst);
    let body = json!({
        "status": if alive { "ok" } else { "error" },
        "busy": st.worker.busy.load(Ordering::SeqCst),
        "queued": st.worker.queued.load(Ordering::SeqCst),
    });
    let code = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
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

fn encode(st: &AppState, input: Input) -> Result<Vec<u32>, ApiError> {
    let tok = &st.tok;
    let bad = |e: String| ApiError::invalid(Some("prompt"), e);
    match input {
        Input::Tokens(t) => Ok(t),
        Input::Text(s) => tok
            .encode(&s, tok.adds_bos(), false)
            .map_err(|e| bad(format!("cannot tokenize the prompt: {e}"))),
        Input::Messages(m) => {
            let t = st.template.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    Some("messages"),
                    "the model has no chat template: use /v1/completions",
                )
            })?;
            let text = t
                .render(&m, None, true, None)
                .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
            // Templates usually write the BOS text themselves; never add a second one.
            let bos_in_text = tok
                .bos_text()
                .is_some_and(|b| !b.is_empty() && text.starts_with(b));
            tok.encode(&text, tok.adds_bos() && !bos_in_text, true)
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
    } = parsed;
    let st2 = st.clone();
    let prompt = tokio::task::spawn_blocking(move || encode(&st2, input))
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
                "the prompt is {} tokens, but the context holds {} tokens (the prompt must leave room for at least one new token)",
                prompt.len(),
                st.context
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let prompt_tokens = prompt.len();
    let params = GenParams::new(
        max_tokens.unwrap_or(st.context - prompt_tokens),
        sampler,
        stop,
    );
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt,
        params,
        events: tx,
        cancel: cancel.clone(),
    };
    st.worker.queued.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = st.jobs.try_send(job) {
        st.worker.queued.fetch_sub(1, Ordering::SeqCst);
        let mut err = match e {
            mpsc::TrySendError::Full(_) => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!(
                    "the server is busy: {} requests are already waiting; retry later",
                    st.cfg.max_queue
                ),
            ),
            mpsc::TrySendError::Disconnected(_) => ApiError::status(
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
    let guard = CancelOnDrop(cancel);
    if stream {
        Ok(stream_response(meta, rx, guard, include_usage))
    } else {
        collect_response(meta, rx, guard).await
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

async fn collect_response(
    meta: Meta,
    mut rx: UnboundedReceiver<Event>,
    _guard: CancelOnDrop,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Error(e)) => return Err(internal(e)),
            None => return Err(internal("the generation ended without a result".into())),
            Some(Event::Done {
                prompt_tokens,
                completion_tokens,
                finish,
            }) => {
                let choice = match meta.kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish_str(finish),
                    }),
                    Kind::Completion => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": null,
                        "finish_reason": finish_str(finish),
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
}

fn sse(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn stream_response(
    meta: Meta,
    mut rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    include_usage: bool,
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
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = out.closed() => return,
            };
            let msg = match ev {
                Some(Event::Text(t)) => {
                    sse(&meta.chunk(Some(meta.delta(Some(&t), false, None)), None))
                }
                Some(Event::Done {
                    prompt_tokens,
                    completion_tokens,
                    finish,
                }) => {
                    let last = meta.chunk(
                        Some(meta.delta(None, false, Some(finish_str(finish)))),
                        None,
                    );
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
            if out.send(msg).await.is_err() {
                return;
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
