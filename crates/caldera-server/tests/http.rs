//! End-to-end tests against a real server on 127.0.0.1 (ephemeral port) running
//! SmolLM2-135M-Instruct on the CPU. Skipped when the model file is absent.
//!
//! The runner is wrapped by the tests: it counts forward calls, can sleep per call (to
//! make a generation slow enough to cancel) and can be told to panic once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caldera_cpu::{CpuBackend, CpuRunner, KvConfig, KvPool};
use caldera_model::{Logits, Model, ModelFile, RunError, Runner, TokenizerSource};
use caldera_server::{Engine, KvPlan, PoolCounts, Server, ServerConfig};
use caldera_tokenizer::{ChatTemplate, Tokenizer};
use serde_json::{json, Value};

const CTX: usize = 512;

fn model_path() -> Option<PathBuf> {
    let dir = std::env::var("CALDERA_MODELS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models").into());
    let p = PathBuf::from(dir).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skip: {} not found", p.display());
        None
    }
}

#[derive(Default)]
struct Hooks {
    forwards: AtomicUsize,
    delay_ms: AtomicUsize,
    panic_once: AtomicBool,
}

struct TestRunner {
    inner: CpuRunner,
    hooks: Arc<Hooks>,
}

impl Runner for TestRunner {
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn truncate(&mut self, n: usize) -> bool {
        self.inner.truncate(n)
    }
    fn reuse_prefix(&mut self, t: &[u32], limit: usize) -> usize {
        self.inner.reuse_prefix(t, limit)
    }
    fn shares_prefixes(&self) -> bool {
        self.inner.shares_prefixes()
    }
    fn checkpoint(&mut self) {
        self.inner.checkpoint()
    }
    fn kv_pages(&self) -> Option<usize> {
        self.inner.kv_pages()
    }
    fn forward(&mut self, t: &[u32], l: Logits, out: &mut Vec<f32>) -> Result<(), RunError> {
        self.hooks.forwards.fetch_add(1, Ordering::SeqCst);
        if self.hooks.panic_once.swap(false, Ordering::SeqCst) {
            panic!("injected test panic");
        }
        let d = self.hooks.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d as u64));
        }
        self.inner.forward(t, l, out)
    }
    fn describe(&self) -> String {
        "test".into()
    }
}

struct Fixture {
    server: Server,
    hooks: Arc<Hooks>,
    pool: Arc<KvPool>,
}

fn start(cfg: ServerConfig) -> Option<Fixture> {
    start_with(cfg, None)
}

/// A server whose chat template is `template` instead of the model's.
fn start_with(cfg: ServerConfig, template: Option<&str>) -> Option<Fixture> {
    let pages = cfg.slots * CTX.div_ceil(16);
    start_kv(cfg, template, pages, true)
}

/// A server whose CPU backend has a pool of `pages` KV pages of 16 tokens.
fn start_kv(
    cfg: ServerConfig,
    template: Option<&str>,
    pages: usize,
    prefix_cache: bool,
) -> Option<Fixture> {
    let path = model_path()?;
    let file = ModelFile::open(&path).expect("open model");
    let model = Arc::new(Model::from_file(&file).expect("model"));
    let tok = match &file.tokenizer {
        TokenizerSource::Gguf(g) => Tokenizer::from_gguf(g).expect("tokenizer"),
        _ => panic!("no tokenizer"),
    };
    let bos = tok.bos_text().unwrap_or("").to_owned();
    let eos = tok.eos_text().unwrap_or("").to_owned();
    let template = template
        .or(file.chat_template.as_deref())
        .map(|s| ChatTemplate::new(s, &bos, &eos).expect("template"));
    let hooks = Arc::new(Hooks::default());
    let kv = KvConfig {
        page_tokens: 16,
        max_pages: Some(pages),
        prefix_cache,
        snapshots: 0,
    };
    let be = Arc::new(CpuBackend::with_kv(model, 2, &kv));
    let pool = be.kv_pool().clone();
    let probe = pool.clone();
    let h = hooks.clone();
    let engine = Engine {
        tokenizer: tok,
        template,
        arch: "llama".into(),
        new_runner: Box::new(move || {
            Ok(Box::new(TestRunner {
                inner: CpuRunner::new(be.clone(), CTX)?,
                hooks: h.clone(),
            }) as Box<dyn Runner>)
        }),
        kv: Some(KvPlan {
            page_tokens: 16,
            pages,
            probe: Some(Box::new(move || {
                let s = probe.stats();
                PoolCounts {
                    in_use: s.in_use,
                    cached: s.cached,
                }
            })),
        }),
        stepper: Box::new(caldera_model::SerialStepper),
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = Server::start(engine, cfg, listener).expect("start");
    Some(Fixture {
        server,
        hooks,
        pool,
    })
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn send_head(s: &mut TcpStream, method: &str, path: &str, extra: &[(&str, &str)], len: usize) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n"
    );
    if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str("Host: localhost\r\n");
    }
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write head");
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&b[..eol]).unwrap().trim();
        let n = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

fn parse(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    send_head(&mut s, method, path, extra, body.len());
    // The server may answer (413) before reading everything; a failed write is fine.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse(&raw)
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, &[], body.to_string().as_bytes())
}

fn chat_body(max_tokens: usize) -> Value {
    json!({
        "model": "x",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data:").map(|d| d.trim_start().to_owned()))
        })
        .collect()
}

fn assert_error(r: &Resp, status: u16, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text());
    let j = r.json();
    let e = &j["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
    assert!(e["type"].is_string(), "{j}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{j}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{j}");
    }
}

#[test]
fn chat_non_streaming_and_streaming_agree() {
    let Some(f) = start(ServerConfig::default()) else {
        return;
    };
    let addr = f.server.addr();

    let r = post(addr, "/v1/chat/completions", &chat_body(12));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(j["object"], "chat.completion");
    assert!(j["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(j["model"], "caldera");
    let c = &j["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    let text = c["message"]["content"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());
    assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
    let u = &j["usage"];
    let (p, n) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5 && (1..=12).contains(&n), "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + n);
    if c["finish_reason"] == "length" {
        assert_eq!(n, 12);
    }
    eprintln!("answer: {text:?}");

    // The same request streamed (greedy): same text, chunks in OpenAI's shape.
    let mut body = chat_body(12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let data = sse_data(&r.text());
    assert_eq!(data.last().unwrap(), "[DONE]", "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finish = None;
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk");
        assert_eq!(ch["id"], id);
        if let Some(c) = ch["choices"].get(0) {
            if let Some(t) = c["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if !c["finish_reason"].is_null() {
                finish = Some(c["finish_reason"].clone());
            }
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish.as_ref(), Some(&c["finish_reason"]));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], *u);

    // Completions, a stop string, models, health.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0, "stop": ["7"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["object"], "text_completion");
    let t = j["choices"][0]["text"].as_str().unwrap();
    assert!(!t.contains('7'), "{t:?}");
    eprintln!("completion: {t:?} ({})", j["choices"][0]["finish_reason"]);

    let r = request(addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "caldera");
    let r = request(addr, "GET", "/health", &[], b"");
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("ok")));
    assert!(r.header("access-control-allow-origin").is_none());
    f.server.shutdown().unwrap();
}

#[test]
fn bad_requests_get_400() {
    let Some(f) = start(ServerConfig::default()) else {
        return;
    };
    let addr = f.server.addr();
    let path = "/v1/chat/completions";
    let r = request(addr, "POST", path, &[], b"{\"messages\": [");
    assert_error(&r, 400, None);
    let r = request(addr, "POST", path, &[], b"not json at all");
    assert_error(&r, 400, None);
    for (field, value) in [
        ("max_tokens", json!(0)),
        ("max_tokens", json!(CTX + 1)),
        ("max_tokens", json!("12")),
        ("max_completion_tokens", json!(-3)),
        ("temperature", json!(-0.5)),
        ("temperature", json!(2.5)),
        ("top_p", json!(1.5)),
        ("n", json!(2)),
        ("presence_penalty", json!(2.01)),
        ("frequency_penalty", json!("a lot")),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("stop", json!(42)),
        ("seed", json!(1.5)),
        ("stream", json!(1)),
        ("messages", json!("hello")),
        ("messages", json!([])),
    ] {
        let mut b = chat_body(4);
        b[field] = value.clone();
        let r = post(addr, path, &b);
        assert_error(&r, 400, Some(field));
        eprintln!("{field}={value}: {}", r.json()["error"]["message"]);
    }
    // Boundary values that are allowed.
    let mut b = chat_body(1);
    b["temperature"] = json!(2);
    b["top_p"] = json!(1);
    b["presence_penalty"] = json!(-2);
    b["seed"] = json!(u64::MAX);
    b["stop"] = json!("x");
    let r = post(addr, path, &b);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 1);

    // A prompt longer than the context: 400 with the token counts, nothing run.
    let before = f.hooks.forwards.load(Ordering::SeqCst);
    let long = "word ".repeat(CTX * 2);
    let mut b = chat_body(4);
    b["messages"][0]["content"] = json!(long);
    let r = post(addr, path, &b);
    assert_error(&r, 400, Some("messages"));
    let j = r.json();
    assert_eq!(j["error"]["code"], "context_length_exceeded");
    assert!(j["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&CTX.to_string()));
    let r = post(addr, "/v1/completions", &json!({"prompt": long}));
    assert_error(&r, 400, Some("prompt"));
    assert_eq!(f.hooks.forwards.load(Ordering::SeqCst), before);

    // Without a key, a request addressed to another name (DNS rebinding) is refused.
    let r = request(
        addr,
        "GET",
        "/v1/models",
        &[("Host", "evil.example:8080")],
        b"",
    );
    assert_error(&r, 403, None);

    // Unknown route: JSON 404.
    let r = request(addr, "GET", "/v1/nope", &[], b"");
    assert_error(&r, 404, None);
    f.server.shutdown().unwrap();
}

#[test]
fn auth_and_body_cap() {
    let Some(f) = start(ServerConfig {
        api_key: Some("s3cret-key".into()),
        max_body_bytes: 64 << 10,
        header_timeout: Duration::from_millis(300),
        max_header_bytes: 16 << 10,
        ..ServerConfig::default()
    }) else {
        return;
    };
    let addr = f.server.addr();
    let body = chat_body(2).to_string();
    let path = "/v1/chat/completions";
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "Bearer s3cret-ke")],
        vec![("Authorization", "Bearer s3cret-key2")],
        vec![("Authorization", "s3cret-key")],
    ] {
        let r = request(addr, "POST", path, &headers, body.as_bytes());
        assert_error(&r, 401, None);
        let r = request(addr, "GET", "/v1/models", &headers, b"");
        assert_eq!(r.status, 401);
        let r = request(addr, "GET", "//v1/models", &headers, b"");
        assert_eq!(r.status, 401);
        for path in ["/slots", "/metrics"] {
            let r = request(addr, "GET", path, &headers, b"");
            assert_eq!(r.status, 401, "{path}");
        }
    }
    let ok = [("Authorization", "Bearer s3cret-key")];
    let r = request(addr, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200);
    let r = request(addr, "GET", "/v1/models", &ok, b"");
    assert_eq!(r.status, 200);
    let r = request(addr, "GET", "/slots", &ok, b"");
    assert_eq!(r.status, 200);
    let r = request(addr, "GET", "/metrics", &ok, b"");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("# TYPE caldera_queue_depth gauge"));
    let r = request(addr, "POST", path, &ok, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());

    let mut huge = chat_body(2);
    huge["messages"][0]["content"] = json!("a".repeat(200 << 10));
    let r = request(addr, "POST", path, &ok, huge.to_string().as_bytes());
    assert_error(&r, 413, None);

    // Header cap: 431.
    let big = "a".repeat(20 << 10);
    let r = request(addr, "GET", "/health", &[("X-Big", &big)], b"");
    assert_eq!(r.status, 431);

    // A client that never finishes its header is disconnected.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
    f.server.shutdown().unwrap();
}

fn wait_idle(addr: SocketAddr, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let h = request(addr, "GET", "/health", &[], b"").json();
        if h["busy"] == false && h["queued"] == 0 {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "the worker stayed busy: {h}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn disconnect_cancels_and_panic_fails_one_request() {
    let Some(f) = start(ServerConfig::default()) else {
        return;
    };
    let addr = f.server.addr();
    // 50 ms per token: 200 tokens would take 10 s.
    f.hooks.delay_ms.store(50, Ordering::SeqCst);
    let mut b =
        json!({"prompt": "1, 2, 3, 4,", "max_tokens": 200, "temperature": 0, "stream": true});
    let body = b.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    send_head(&mut s, "POST", "/v1/completions", &[], body.len());
    s.write_all(body.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until some text chunks have come, then hang up.
    while got.windows(5).filter(|w| w == b"data:").count() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let start_forwards = f.hooks.forwards.load(Ordering::SeqCst);
    drop(s);
    let took = wait_idle(addr, Duration::from_secs(5));
    let ran = f.hooks.forwards.load(Ordering::SeqCst) - start_forwards;
    eprintln!("cancelled within {took:?}, {ran} more forward calls");
    assert!(ran < 20, "{ran} tokens ran after the disconnect");

    // A non-streaming client that hangs up cancels too.
    b["stream"] = json!(false);
    let body = b.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    send_head(&mut s, "POST", "/v1/completions", &[], body.len());
    s.write_all(body.as_bytes()).unwrap();
    let t = Instant::now();
    while f.hooks.forwards.load(Ordering::SeqCst) < start_forwards + ran + 3 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the job did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(s);
    let took = wait_idle(addr, Duration::from_secs(5));
    eprintln!("non-streaming request cancelled within {took:?}");

    // The worker is free: a following request completes.
    f.hooks.delay_ms.store(0, Ordering::SeqCst);
    b["stream"] = json!(false);
    b["max_tokens"] = json!(3);
    let r = post(addr, "/v1/completions", &b);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);

    // A panic inside generation fails that request only.
    f.hooks.panic_once.store(true, Ordering::SeqCst);
    let r = post(addr, "/v1/chat/completions", &chat_body(3));
    assert_error(&r, 500, None);
    assert!(r.text().contains("injected test panic"), "{}", r.text());
    let r = post(addr, "/v1/chat/completions", &chat_body(3));
    assert_eq!(r.status, 200, "{}", r.text());
    // Streamed, a panic ends the stream with an error event.
    f.hooks.panic_once.store(true, Ordering::SeqCst);
    let mut sb = chat_body(3);
    sb["stream"] = json!(true);
    let r = post(addr, "/v1/chat/completions", &sb);
    let data = sse_data(&r.text());
    assert!(data.last().unwrap().contains("\"error\""), "{data:?}");
    let r = post(addr, "/v1/chat/completions", &chat_body(3));
    assert_eq!(r.status, 200, "{}", r.text());
    let h = request(addr, "GET", "/health", &[], b"");
    assert_eq!(h.status, 200);
    f.server.shutdown().unwrap();
}

#[test]
fn full_queue_gets_503() {
    let Some(f) = start(ServerConfig {
        max_queue: 1,
        ..ServerConfig::default()
    }) else {
        return;
    };
    let addr = f.server.addr();
    f.hooks.delay_ms.store(100, Ordering::SeqCst);
    // One running, one queued, the third refused.
    let slow = json!({"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0});
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let b = slow.clone();
            std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 400 }));
            std::thread::spawn(move || post(addr, "/v1/completions", &b).status)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let r = post(addr, "/v1/completions", &slow);
    assert_error(&r, 503, None);
    assert_eq!(r.header("retry-after"), Some("1"));
    f.hooks.delay_ms.store(0, Ordering::SeqCst);
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    f.server.shutdown().unwrap();
}

fn get_json(addr: SocketAddr, path: &str) -> Value {
    let r = request(addr, "GET", path, &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn states(addr: SocketAddr) -> Vec<String> {
    get_json(addr, "/slots")
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_owned())
        .collect()
}

fn wait_all_idle(addr: SocketAddr, limit: Duration) {
    let t = Instant::now();
    while states(addr).iter().any(|s| s != "idle") {
        assert!(t.elapsed() < limit, "slots stayed busy: {:?}", states(addr));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn slots_run_together_cancel_and_fail_alone() {
    let Some(f) = start(ServerConfig {
        slots: 3,
        max_queue: 1,
        prefill_chunk: 8,
        ..ServerConfig::default()
    }) else {
        return;
    };
    let addr = f.server.addr();
    let s = get_json(addr, "/slots");
    assert_eq!(s.as_array().unwrap().len(), 3);
    assert_eq!(s[2]["context_capacity"], CTX);

    // Three requests at once run together: the slots are seen decoding side by side.
    f.hooks.delay_ms.store(15, Ordering::SeqCst);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0});
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let b = body.clone();
            std::thread::spawn(move || post(addr, "/v1/completions", &b))
        })
        .collect();
    let t = Instant::now();
    let mut most = 0;
    while most < 3 && t.elapsed() < Duration::from_secs(20) {
        most = most.max(states(addr).iter().filter(|s| *s == "decode").count());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(most, 3, "the slots did not decode together");
    let texts: Vec<String> = handles
        .into_iter()
        .map(|h| {
            let r = h.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["choices"][0]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    // Greedy and the same prompt: the same text on every slot.
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    wait_all_idle(addr, Duration::from_secs(5));
    let s = get_json(addr, "/slots");
    for slot in s.as_array().unwrap() {
        assert_eq!(slot["requests"], 1, "{s}");
        assert_eq!(slot["generated_tokens"], 24, "{s}");
        // The finished sequence went to the shared prefix cache: the slot holds nothing.
        assert_eq!(slot["context_used"], 0, "{s}");
        assert_eq!(slot["kv_pages"], 0, "{s}");
    }

    // 3 running + 1 queued; the fifth is refused.
    f.hooks.delay_ms.store(40, Ordering::SeqCst);
    let long = json!({"prompt": "1, 2, 3,", "max_tokens": 200, "temperature": 0, "stream": true});
    let mut streams: Vec<TcpStream> = (0..3)
        .map(|_| {
            let b = long.to_string();
            let mut s = TcpStream::connect(addr).unwrap();
            send_head(&mut s, "POST", "/v1/completions", &[], b.len());
            s.write_all(b.as_bytes()).unwrap();
            s
        })
        .collect();
    let t = Instant::now();
    while states(addr).iter().filter(|s| *s != "idle").count() < 3 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let queued = std::thread::spawn(move || {
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "Hi", "max_tokens": 2}),
        )
    });
    let t = Instant::now();
    while get_json(addr, "/health")["queued"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    );
    assert_error(&r, 503, None);
    assert_eq!(r.header("retry-after"), Some("1"));
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_queue_depth"), 1.0);
    assert_eq!(metric(&m, "caldera_slots_busy"), 3.0);

    // Hanging up frees a slot within a step: the queued request gets it and finishes.
    let hung = streams.pop().unwrap();
    let before = f.hooks.forwards.load(Ordering::SeqCst);
    drop(hung);
    let r = queued.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let ran = f.hooks.forwards.load(Ordering::SeqCst) - before;
    eprintln!("{ran} forward calls between the hang-up and the queued request's end");

    // A panic in one slot fails that request only; the other stream goes on.
    f.hooks.panic_once.store(true, Ordering::SeqCst);
    let t = Instant::now();
    while f.hooks.panic_once.load(Ordering::SeqCst) {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    f.hooks.delay_ms.store(0, Ordering::SeqCst);
    let mut ends = Vec::new();
    for mut s in streams {
        let mut raw = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&parse(&raw).body).into_owned();
        ends.push(sse_data(&text).last().cloned().unwrap_or_default());
    }
    ends.sort();
    assert_eq!(ends[0], "[DONE]", "{ends:?}");
    assert!(ends[1].contains("injected test panic"), "{ends:?}");
    wait_all_idle(addr, Duration::from_secs(5));
    let r = post(addr, "/v1/chat/completions", &chat_body(3));
    assert_eq!(r.status, 200, "{}", r.text());
    // /slots is refreshed after the step that answered.
    wait_all_idle(addr, Duration::from_secs(5));
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_slot_restarts_total"), 1.0);
    assert_eq!(metric(&m, "caldera_generations_cancelled_total"), 1.0);
    assert_eq!(metric(&m, "caldera_generations_failed_total"), 1.0);
    assert_eq!(metric(&m, "caldera_queue_depth"), 0.0);
    assert_eq!(
        metric(
            &m,
            "caldera_requests_total{route=\"completions\",status=\"503\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            "caldera_requests_total{route=\"completions\",status=\"200\"}"
        ) >= 4.0
    );
    assert_eq!(
        metric(&m, "caldera_slot_state{slot=\"0\",state=\"idle\"}"),
        1.0
    );
    f.server.shutdown().unwrap();
}

#[test]
fn prefix_reuse_is_counted() {
    let Some(f) = start(ServerConfig {
        slots: 2,
        ..ServerConfig::default()
    }) else {
        return;
    };
    let addr = f.server.addr();
    let mut b = chat_body(4);
    let r = post(addr, "/v1/chat/completions", &b);
    assert_eq!(r.status, 200);
    let answer = r.json()["choices"][0]["message"]["content"].clone();
    // The next turn of the same conversation goes to the least recently used slot (both
    // are empty: their pages are in the shared prefix cache) and reuses the first
    // turn's pages from there.
    b["messages"].as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": answer}),
        json!({"role": "user", "content": "And of Spain?"}),
    ]);
    let r = post(addr, "/v1/chat/completions", &b);
    assert_eq!(r.status, 200);
    // /slots is refreshed after the step that answered.
    wait_all_idle(addr, Duration::from_secs(5));
    let s = get_json(addr, "/slots");
    assert_eq!(
        (s[0]["requests"].clone(), s[1]["requests"].clone()),
        (json!(1), json!(1)),
        "{s}"
    );
    assert!(s[1]["reused_tokens"].as_u64().unwrap() > 10, "{s}");
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_prefix_cache_hits_total"), 1.0);
    f.server.shutdown().unwrap();
}

fn weather_tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city"}},
                "required": ["city"],
            },
        },
    }])
}

#[test]
fn tool_call_round_trip() {
    let Some(f) = start(ServerConfig::default()) else {
        return;
    };
    let addr = f.server.addr();
    assert_eq!(f.server.tool_format().name(), "hermes");
    let path = "/v1/chat/completions";
    let user = json!({"role": "user", "content": "What is the weather in Paris?"});
    // A named tool_choice: the answer is a call of that function (SmolLM2's skill is
    // weak, so only the protocol is checked, not the arguments' values).
    let body = json!({
        "messages": [user],
        "tools": weather_tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 40,
        "temperature": 0,
    });
    let r = post(addr, path, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    eprintln!("{j}");
    let c = &j["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    let call = &calls[0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object());
    let content = c["message"]["content"].as_str().unwrap_or("");
    assert!(!content.contains("<tool_call>"), "{content}");

    // Streamed: tool-call deltas (id and name first, then arguments), no raw markup.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = post(addr, path, &sb);
    let data = sse_data(&r.text());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let (mut name, mut args_text, mut finish, mut text) =
        (String::new(), String::new(), Value::Null, String::new());
    for d in &data[..data.len() - 1] {
        let ch: Value = serde_json::from_str(d).unwrap();
        let Some(c) = ch["choices"].get(0) else {
            continue;
        };
        if let Some(t) = c["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(tc) = c["delta"]["tool_calls"].get(0) {
            assert_eq!(tc["index"], 0);
            if let Some(n) = tc["function"]["name"].as_str() {
                assert!(tc["id"].is_string());
                name.push_str(n);
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                args_text.push_str(a);
            }
        }
        if !c["finish_reason"].is_null() {
            finish = c["finish_reason"].clone();
        }
    }
    assert_eq!(
        (name.as_str(), finish),
        ("get_weather", json!("tool_calls"))
    );
    assert_eq!(args_text, call["function"]["arguments"].as_str().unwrap());
    assert!(!text.contains("<tool_call>"), "{text}");

    // The result goes back through the template; the model answers (anything).
    let body = json!({
        "messages": [
            user,
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature_c\": 21, \"sky\": \"sunny\"}"},
        ],
        "tools": weather_tools(),
        "max_tokens": 16,
        "temperature": 0,
    });
    let r = post(addr, path, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    eprintln!("{j}");
    assert!(j["usage"]["prompt_tokens"].as_u64().unwrap() > 50);
    let reason = j["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        ["stop", "length", "tool_calls"].contains(&reason),
        "{reason}"
    );

    // tool_choice none: plain content, no calls.
    let body = json!({
        "messages": [{"role": "user", "content": "Say hello."}],
        "tools": weather_tools(),
        "tool_choice": "none",
        "max_tokens": 8,
        "temperature": 0,
    });
    let r = post(addr, path, &body);
    let j = r.json();
    assert!(
        j["choices"][0]["message"].get("tool_calls").is_none(),
        "{j}"
    );
    assert_ne!(j["choices"][0]["finish_reason"], "tool_calls");

    // Bad tool definitions are 400s.
    let mut bad = body.clone();
    bad["tools"] = json!([{"type": "function", "function": {"name": "has space"}}]);
    assert_error(&post(addr, path, &bad), 400, Some("tools"));
    bad["tools"] = weather_tools();
    bad["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}});
    assert_error(&post(addr, path, &bad), 400, Some("tool_choice"));
    f.server.shutdown().unwrap();
}

#[test]
fn long_prompt_prefills_between_decode_steps() {
    let Some(f) = start(ServerConfig {
        slots: 2,
        prefill_chunk: 16,
        ..ServerConfig::default()
    }) else {
        return;
    };
    let addr = f.server.addr();
    f.hooks.delay_ms.store(10, Ordering::SeqCst);
    let a = std::thread::spawn(move || {
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "1, 2, 3,", "max_tokens": 120, "temperature": 0}),
        )
    });
    let t = Instant::now();
    while states(addr) != ["decode", "idle"] {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", states(addr));
        std::thread::sleep(Duration::from_millis(5));
    }
    // ~300 prompt tokens in chunks of 16: while they go in, the first stream still gains
    // tokens step after step.
    let b = std::thread::spawn(move || {
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "the cat sat on the mat ".repeat(50), "max_tokens": 2}),
        )
    });
    let mut seen: Vec<u64> = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        let s = get_json(addr, "/slots");
        if s[1]["state"] == "prefill" && s[0]["state"] == "decode" {
            seen.push(s[0]["generated_tokens"].as_u64().unwrap());
        } else if !seen.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    seen.dedup();
    assert!(
        seen.len() >= 3,
        "decode did not advance during the prefill: {seen:?}"
    );
    assert_eq!(b.join().unwrap().status, 200);
    f.hooks.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(a.join().unwrap().status, 200);
    f.server.shutdown().unwrap();
}

/// A ChatML template that renders `tools` and past tool calls itself (as Qwen's do).
const NATIVE_TOOLS_TEMPLATE: &str = "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }}: {{ t.function.parameters | tojson }}\n{% endfor %}</tools><|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{\"name\": {{ c.function.name | tojson }}, \"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[test]
fn native_template_renders_tools() {
    let Some(f) = start_with(ServerConfig::default(), Some(NATIVE_TOOLS_TEMPLATE)) else {
        return;
    };
    let addr = f.server.addr();
    assert_eq!(f.server.tool_format().name(), "hermes");
    let path = "/v1/chat/completions";
    let prompt_tokens = |extra: Value| {
        let mut b = chat_body(1);
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = post(addr, path, &b);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let plain = prompt_tokens(json!({}));
    let with_tools = prompt_tokens(json!({"tools": weather_tools()}));
    let none = prompt_tokens(json!({"tools": weather_tools(), "tool_choice": "none"}));
    eprintln!("prompt tokens: plain {plain}, tools {with_tools}, none {none}");
    // The template got the tools, and only when they are offered.
    assert!(with_tools > plain + 10);
    assert_eq!(none, plain);
    // A past call and its result render through the template.
    let history = json!({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ], "tools": weather_tools(), "max_tokens": 4});
    let r = post(addr, path, &history);
    assert_eq!(r.status, 200, "{}", r.text());
    f.server.shutdown().unwrap();
}

/// A request whose pages (prompt + max_tokens) cannot be reserved next to a running one
/// waits in the queue although a slot is free, then runs once the first is cancelled;
/// every page comes back.
#[test]
fn admission_waits_for_pages_and_cancel_returns_them() {
    // Two slots of 512 tokens over 40 pages (640 tokens): one request of ~410 tokens
    // (26 pages) at a time.
    let Some(f) = start_kv(
        ServerConfig {
            slots: 2,
            ..ServerConfig::default()
        },
        None,
        40,
        true,
    ) else {
        return;
    };
    let addr = f.server.addr();
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_kv_pages_total"), 40.0);
    assert_eq!(metric(&m, "caldera_kv_pages_free"), 40.0);
    f.hooks.delay_ms.store(40, Ordering::SeqCst);
    let body =
        json!({"prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0, "stream": true})
            .to_string();
    let mut a = TcpStream::connect(addr).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    send_head(&mut a, "POST", "/v1/completions", &[], body.len());
    a.write_all(body.as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let _ = a.read(&mut buf).unwrap();
    let t = Instant::now();
    while !states(addr).contains(&"decode".to_string()) {
        assert!(t.elapsed() < Duration::from_secs(20), "A never decoded");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = std::thread::spawn(move || {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                          "stop": [" "]});
        post(addr, "/v1/completions", &body)
    });
    // B waits: one slot busy, one idle, one request queued, A's pages reserved.
    let t = Instant::now();
    loop {
        let h = get_json(addr, "/health");
        if h["queued"] == 1 {
            assert_eq!(h["slots_busy"], 1, "{h}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "B never queued: {h}");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get_json(addr, "/health")["queued"], 1);
    let s = get_json(addr, "/slots");
    let reserved: u64 = s
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kv_pages_reserved"].as_u64().unwrap())
        .sum();
    assert_eq!(reserved, 26, "{s}");
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_kv_pages_reserved"), 26.0);
    assert!(metric(&m, "caldera_kv_pages_free") < 40.0);
    assert_eq!(metric(&m, "caldera_kv_admission_waits_total"), 1.0);
    // A's client hangs up: its slot and pages go, B runs.
    f.hooks.delay_ms.store(0, Ordering::SeqCst);
    drop(a);
    let r = b.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    wait_idle(addr, Duration::from_secs(10));
    wait_all_idle(addr, Duration::from_secs(5));
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_kv_pages_free"), 40.0, "{m}");
    assert_eq!(metric(&m, "caldera_kv_pages_reserved"), 0.0);
    assert_eq!(metric(&m, "caldera_generations_cancelled_total"), 1.0);
    assert_eq!(f.pool.stats().in_use, 0);
    f.server.shutdown().unwrap();
}

/// Requests sharing a long system prompt reuse its pages whatever slot computed them; a
/// warm answer equals the cold one (greedy); pages all come back.
#[test]
fn shared_prefix_is_reused_across_requests() {
    let Some(f) = start(ServerConfig {
        slots: 2,
        ..ServerConfig::default()
    }) else {
        return;
    };
    let addr = f.server.addr();
    let system = "You are a meticulous assistant for a shipping company. Answer in one short \
        sentence, in plain English, without lists, and say so when you do not know. The \
        company runs ferries between three islands and a mainland port.";
    let ask = |q: &str| {
        let b = json!({
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "max_tokens": 6,
            "temperature": 0,
        });
        let r = post(addr, "/v1/chat/completions", &b);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let cold = ask("How many islands are there?");
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_prefix_cache_misses_total"), 1.0);
    assert!(metric(&m, "caldera_kv_pages_cached") >= 3.0, "{m}");
    ask("What do the ferries carry?");
    let warm = ask("How many islands are there?");
    assert_eq!(warm, cold);
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_prefix_cache_hits_total"), 2.0, "{m}");
    let reused = metric(&m, "caldera_prefix_cache_reused_tokens_total");
    assert!(reused >= 2.0 * 48.0 && reused % 16.0 == 0.0, "{m}");
    wait_all_idle(addr, Duration::from_secs(5));
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(
        metric(&m, "caldera_kv_pages_free"),
        metric(&m, "caldera_kv_pages_total")
    );
    f.server.shutdown().unwrap();
}

/// Without a shared prefix cache, idle slots keep their sequence (per-slot reuse) until
/// a request needs their pages: then the idle slot gives them back instead of the
/// request waiting for ever.
#[test]
fn idle_slots_give_back_pages_when_needed() {
    let Some(f) = start_kv(
        ServerConfig {
            slots: 2,
            ..ServerConfig::default()
        },
        None,
        40,
        false,
    ) else {
        return;
    };
    let addr = f.server.addr();
    f.hooks.delay_ms.store(30, Ordering::SeqCst);
    let long =
        |w: &str| json!({"prompt": format!("{w} ").repeat(260), "max_tokens": 1, "temperature": 0});
    let handles: Vec<_> = ["apple", "river"]
        .into_iter()
        .map(|w| {
            let b = long(w);
            std::thread::spawn(move || post(addr, "/v1/completions", &b).status)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    f.hooks.delay_ms.store(0, Ordering::SeqCst);
    wait_all_idle(addr, Duration::from_secs(5));
    let s = get_json(addr, "/slots");
    let held: Vec<u64> = (0..2).map(|i| s[i]["kv_pages"].as_u64().unwrap()).collect();
    assert!(
        held.iter().all(|&p| p >= 16),
        "both slots keep their sequence: {s}"
    );
    // 26 pages next to 2 x 16+ held: one idle slot must give its pages back.
    let b =
        json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stop": [" "]});
    let r = post(addr, "/v1/completions", &b);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_all_idle(addr, Duration::from_secs(5));
    let s = get_json(addr, "/slots");
    let held: u64 = (0..2).map(|i| s[i]["kv_pages"].as_u64().unwrap()).sum();
    assert!(held < 16 + 16, "{s}");
    assert!(
        (0..2).any(|i| s[i]["context_used"] == 0),
        "one slot was emptied: {s}"
    );
    let m = request(addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(metric(&m, "caldera_kv_pages_reserved"), 0.0);
    assert_eq!(
        metric(&m, "caldera_kv_pages_free"),
        40.0 - held as f64,
        "{m}"
    );
    f.server.shutdown().unwrap();
}
