//! Chat templates: Jinja templates (as shipped in GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`) rendered with minijinja inside a sandbox.
//!
//! Rendering follows the conventions of Hugging Face `apply_chat_template`:
//! `trim_blocks` and `lstrip_blocks` on, the trailing newline of the template dropped,
//! loop controls (`break`, `continue`), Python string/dict methods (`.strip()`,
//! `.split()`, `.items()`, `.get()`, ...), `raise_exception(msg)`, `strftime_now(fmt)`,
//! `namespace(...)`, `dict(...)`, and a `tojson` filter that writes exactly what Python's
//! `json.dumps(x, ensure_ascii=False)` writes (`", "` and `": "` separators, non-ASCII
//! kept, Python float formatting, optional `indent`, `separators`, `sort_keys`,
//! `ensure_ascii`).
//!
//! Sandbox: templates have no loader (no `include`/`import`/`extends` of other files), every
//! render has an instruction budget (`fuel`), a recursion limit, an output-size cap and a
//! wall-clock deadline checked on every write; the filters and methods that can build
//! large values from small inputs (`indent`, `replace`, `join`, `format`, `batch`, `slice`,
//! `tojson`, ...) check their arguments and results against the same size cap.
//!
//! Not bounded: memory held by intermediate values. minijinja offers no hook on `~`, `+`
//! or namespace assignment, so a template that doubles a string through
//! `{% set ns.s = ns.s ~ ns.s %}` in a loop (a few dozen instructions) can exhaust memory
//! and abort the process. Render untrusted templates only in a process with a memory limit.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use minijinja::value::{Rest, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};

/// Name under which the template is stored in its private environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Most elements a filter accepts in one sequence argument.
const MAX_FILTER_ITEMS: usize = 1_000_000;

/// Largest width/precision/indent number a formatting filter accepts.
const MAX_FORMAT_WIDTH: usize = 10_000;

/// Deepest nesting `tojson` writes.
const MAX_JSON_DEPTH: usize = 128;

/// Errors from compiling or rendering a chat template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse; the message names the line.
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    /// Rendering failed (undefined variable use, type error, bad filter argument, ...).
    #[error("chat template render error: {0}")]
    Render(String),
    /// The template called `raise_exception(message)`; holds the message verbatim.
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    /// A sandbox limit was hit (fuel, recursion, output size, timeout).
    #[error("chat template exceeded a limit: {0}")]
    Limit(String),
    /// The messages, tools or extra variables have the wrong shape.
    #[error("invalid chat template input: {0}")]
    InvalidInput(String),
}

/// Resource limits applied to every render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateLimits {
    /// Template instructions one render may execute.
    pub fuel: u64,
    /// Largest rendered output, and largest string a filter may build, in bytes.
    pub max_output_bytes: usize,
    /// Deepest nesting of macro calls, loops and blocks (capped by minijinja at 500).
    pub max_recursion: usize,
    /// Wall-clock budget of one render, checked whenever output is written.
    pub timeout: Option<Duration>,
}

impl Default for TemplateLimits {
    /// 2 M instructions (about 25 000 messages through a typical template; ~0.1 s of
    /// looping), 16 MiB of output, recursion 100, 1 s.
    fn default() -> Self {
        TemplateLimits {
            fuel: 2_000_000,
            max_output_bytes: 16 << 20,
            max_recursion: 100,
            timeout: Some(Duration::from_secs(1)),
        }
    }
}

/// A compiled chat template. Compiled once, rendered from any thread.
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    limits: TemplateLimits,
    /// Shared with the guarded filters: the current `max_output_bytes`.
    size_cap: Arc<AtomicUsize>,
    /// Whether the template iterates over `message.content` itself (then list
    /// contents are passed through; otherwise text parts are joined into a string).
    iterates_content: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("limits", &self.limits)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are exposed to the template under those
    /// names.
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, TemplateError> {
        let limits = TemplateLimits::default();
        let size_cap = Arc::new(AtomicUsize::new(limits.max_output_bytes));
        let mut env = Environment::new();
        configure_env(&mut env, &size_cap);
        apply_limits(&mut env, &limits);
        let prepared = strip_generation_tags(source);
        env.add_template_owned(TEMPLATE_NAME, prepared)
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            source: source.to_owned(),
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            limits,
            size_cap,
            iterates_content: iterates_content(source),
        })
    }

    /// Replaces the sandbox limits.
    pub fn with_limits(mut self, limits: TemplateLimits) -> Self {
        apply_limits(&mut self.env, &limits);
        self.size_cap
            .store(limits.max_output_bytes, Ordering::Relaxed);
        self.limits = limits;
        self
    }

    /// The limits in force.
    pub fn limits(&self) -> &TemplateLimits {
        &self.limits
    }

    /// The template text as given to [`ChatTemplate::new`].
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the prompt.
    ///
    /// `messages`: a JSON array of OpenAI-style messages (`role`, `content` as a string or
    /// an array of parts, `tool_calls`, `tool_call_id`, `name`, `reasoning_content`).
    /// Tool-call `arguments` given as a JSON string holding an object are parsed into that
    /// object (templates expect a mapping); `reasoning_content`, `reasoning` and `thinking`
    /// are aliased to each other. When the template does not iterate over message content,
    /// an array of text parts is joined with `"\n"` into one string.
    /// `tools`: an OpenAI tools array, or `None` (the template then sees `tools` as none).
    /// `extra`: a JSON object of additional variables (e.g. `enable_thinking`); it may
    /// override `bos_token`/`eos_token` but not `messages`, `tools` or
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let messages = normalize_messages(messages, self.iterates_content)?;
        if let Some(t) = tools {
            if !t.is_array() && !t.is_null() {
                return Err(TemplateError::InvalidInput(
                    "`tools` must be a JSON array".into(),
                ));
            }
        }
        let mut ctx = serde_json::Map::new();
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        if let Some(extra) = extra {
            let obj = extra.as_object().ok_or_else(|| {
                TemplateError::InvalidInput("extra template variables must be a JSON object".into())
            })?;
            for (k, v) in obj {
                if matches!(k.as_str(), "messages" | "tools" | "add_generation_prompt") {
                    return Err(TemplateError::InvalidInput(format!(
                        "extra template variable `{k}` conflicts with a built-in variable"
                    )));
                }
                ctx.insert(k.clone(), v.clone());
            }
        }
        ctx.insert("messages".into(), messages);
        ctx.insert(
            "tools".into(),
            tools.cloned().unwrap_or(serde_json::Value::Null),
        );
        ctx.entry("documents").or_insert(serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        let ctx = Value::from_serialize(serde_json::Value::Object(ctx));

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        let mut out = CappedWriter {
            buf: Vec::new(),
            max: self.limits.max_output_bytes,
            deadline: self.limits.timeout.map(|t| (Instant::now() + t, t)),
            hit: None,
        };
        let result = template.render_captured_to(ctx, &mut out).map(drop);
        if let Some(hit) = out.hit.take() {
            return Err(TemplateError::Limit(hit));
        }
        result.map_err(|e| classify(&e))?;
        String::from_utf8(out.buf)
            .map_err(|_| TemplateError::Render("rendered output is not valid UTF-8".into()))
    }
}

// ---------------------------------------------------------------------------
// Environment setup

fn apply_limits(env: &mut Environment<'static>, limits: &TemplateLimits) {
    env.set_fuel(Some(limits.fuel));
    env.set_recursion_limit(limits.max_recursion);
}

fn configure_env(env: &mut Environment<'static>, size_cap: &Arc<AtomicUsize>) {
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);

    let cap = size_cap.clone();
    env.set_unknown_method_callback(move |state, value, method, args| {
        guard_method(value, method, args, cap.load(Ordering::Relaxed))?;
        let rv = minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)?;
        check_result(&rv, cap.load(Ordering::Relaxed))?;
        Ok(rv)
    });

    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_function("dict", make_dict);

    let cap = size_cap.clone();
    env.add_filter("tojson", move |value: &Value, args: Rest<Value>| {
        tojson_filter(value, &args, cap.load(Ordering::Relaxed))
    });

    use minijinja::filters as f;
    macro_rules! guarded {
        ($($name:literal => $func:expr),* $(,)?) => {
            $(
                let orig = Value::from_function($func);
                let cap = size_cap.clone();
                env.add_filter($name, move |state: &State, args: Rest<Value>| {
                    let cap = cap.load(Ordering::Relaxed);
                    guard_filter($name, &args, cap)?;
                    let rv = orig.call(state, &args)?;
                    check_result(&rv, cap)?;
                    Ok(rv)
                });
            )*
        };
    }
    guarded! {
        "join" => f::join,
        "list" => f::list,
        "sort" => f::sort,
        "reverse" => f::reverse,
        "unique" => f::unique,
        "sum" => f::sum,
        "min" => f::min,
        "max" => f::max,
        "map" => f::map,
        "select" => f::select,
        "reject" => f::reject,
        "selectattr" => f::selectattr,
        "rejectattr" => f::rejectattr,
        "groupby" => f::groupby,
        "batch" => f::batch,
        "slice" => f::slice,
        "items" => f::items,
        "dictsort" => f::dictsort,
        "replace" => f::replace,
        "indent" => f::indent,
        "format" => f::format,
        "string" => f::string,
        "pprint" => f::pprint,
        "last" => f::last,
        "first" => f::first,
        "chain" => f::chain,
        "zip" => f::zip,
    }
}

/// Marker error carried as the source of the minijinja error `raise_exception` returns.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

fn raise_exception(message: Value) -> Result<Value, minijinja::Error> {
    let msg = match message.as_str() {
        Some(s) => s.to_owned(),
        None => message.to_string(),
    };
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone())
            .with_source(RaisedByTemplate(msg)),
    )
}

fn make_dict(args: Rest<Value>) -> Result<Value, minijinja::Error> {
    let mut map = indexmap_like::OrderedMap::default();
    for arg in args.iter() {
        if arg.kind() == ValueKind::Map {
            for key in arg.try_iter()? {
                let v = arg.get_item(&key)?;
                map.insert(key, v);
            }
        } else {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "dict() takes keyword arguments or mappings",
            ));
        }
    }
    Ok(map.into_value())
}

/// A tiny insertion-ordered map builder (minijinja's own map keeps order with
/// `preserve_order`).
mod indexmap_like {
    use minijinja::value::Value;

    #[derive(Default)]
    pub struct OrderedMap(Vec<(Value, Value)>);

    impl OrderedMap {
        pub fn insert(&mut self, k: Value, v: Value) {
            if let Some(slot) = self.0.iter_mut().find(|(key, _)| *key == k) {
                slot.1 = v;
            } else {
                self.0.push((k, v));
            }
        }

        pub fn into_value(self) -> Value {
            self.0.into_iter().collect()
        }
    }
}

// ---------------------------------------------------------------------------
// Errors

fn describe(e: &minijinja::Error) -> String {
    let mut msg = match e.detail() {
        Some(d) => d.to_owned(),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        let _ = write!(msg, " (line {line})");
    }
    msg
}

fn find_source<T: std::error::Error + 'static>(e: &minijinja::Error) -> Option<&T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

fn classify(e: &minijinja::Error) -> TemplateError {
    if let Some(raised) = find_source::<RaisedByTemplate>(e) {
        return TemplateError::Raised(raised.0.clone());
    }
    if let Some(limit) = find_source::<LimitHit>(e) {
        return TemplateError::Limit(with_line(&limit.0, e));
    }
    match e.kind() {
        ErrorKind::OutOfFuel => TemplateError::Limit(with_line(
            "instruction budget (fuel) exhausted; the template loops too long",
            e,
        )),
        ErrorKind::SyntaxError | ErrorKind::BadEscape => TemplateError::Syntax(describe(e)),
        ErrorKind::InvalidOperation
            if e.detail().is_some_and(|d| {
                d.contains("recursion limit")
                    || d.contains("too many elements")
                    || d.contains("too large")
            }) =>
        {
            TemplateError::Limit(describe(e))
        }
        ErrorKind::TemplateNotFound => TemplateError::Render(format!(
            "templates cannot include, import or extend other templates ({})",
            describe(e)
        )),
        _ => TemplateError::Render(describe(e)),
    }
}

fn with_line(msg: &str, e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) => format!("{msg} (line {line})"),
        None => msg.to_owned(),
    }
}

/// Marker error for a size cap hit inside a filter or method.
#[derive(Debug)]
struct LimitHit(String);

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitHit {}

fn limit_error(msg: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(LimitHit(msg))
}

// ---------------------------------------------------------------------------
// Output

/// Collects the rendered output; refuses writes past `max` bytes or past the deadline.
struct CappedWriter {
    buf: Vec<u8>,
    max: usize,
    deadline: Option<(Instant, Duration)>,
    hit: Option<String>,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.max {
            self.hit = Some(format!("rendered output exceeds {} bytes", self.max));
            return Err(std::io::Error::other("output limit"));
        }
        if let Some((deadline, budget)) = self.deadline {
            if Instant::now() > deadline {
                self.hit = Some(format!("rendering took longer than {budget:?}"));
                return Err(std::io::Error::other("timeout"));
            }
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Guards for filters and methods

/// Bytes `v` occupies when printed, if cheaply known (strings only).
fn str_len(v: &Value) -> Option<usize> {
    v.as_str().map(str::len)
}

fn check_size(v: &Value, cap: usize, what: &str) -> Result<(), minijinja::Error> {
    if let Some(n) = str_len(v) {
        if n > cap {
            return Err(limit_error(format!(
                "{what}: string of {n} bytes exceeds the {cap}-byte limit"
            )));
        }
    } else if matches!(
        v.kind(),
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map
    ) {
        if let Some(n) = v.len() {
            if n > MAX_FILTER_ITEMS {
                return Err(limit_error(format!(
                    "{what}: {n} items exceed the limit of {MAX_FILTER_ITEMS}"
                )));
            }
        }
    }
    Ok(())
}

fn check_result(v: &Value, cap: usize) -> Result<(), minijinja::Error> {
    check_size(v, cap, "result")
}

fn usize_arg(v: Option<&Value>) -> Option<usize> {
    v.and_then(|v| {
        if v.is_integer() {
            i128::try_from(v.clone())
                .ok()
                .map(|n| n.clamp(0, usize::MAX as i128) as usize)
        } else {
            None
        }
    })
}

fn kwarg(args: &[Value], name: &str) -> Option<Value> {
    args.last()
        .filter(|v| v.is_kwargs())
        .and_then(|kw| kw.get_attr(name).ok())
        .filter(|v| !v.is_undefined())
}

fn positional(args: &[Value]) -> &[Value] {
    match args.last() {
        Some(v) if v.is_kwargs() => &args[..args.len() - 1],
        _ => args,
    }
}

fn guard_filter(name: &str, args: &[Value], cap: usize) -> Result<(), minijinja::Error> {
    for a in args {
        check_size(a, cap, name)?;
    }
    let pos = positional(args);
    let input = pos.first();
    let input_len = input.and_then(str_len).unwrap_or(0);
    match name {
        "indent" => {
            let width = usize_arg(pos.get(1)).or_else(|| usize_arg(kwarg(args, "width").as_ref()));
            if let Some(w) = width {
                let lines = input
                    .and_then(|v| v.as_str())
                    .map(|s| s.bytes().filter(|&b| b == b'\n').count() + 1)
                    .unwrap_or(1);
                let total = w.saturating_mul(lines).saturating_add(input_len);
                if w > MAX_FORMAT_WIDTH || total > cap {
                    return Err(limit_error(format!("indent width {w} is too large")));
                }
            }
        }
        "replace" => check_replace(input, pos.get(1), pos.get(2), pos.get(3), cap)?,
        "join" => check_join(input, pos.get(1), cap)?,
        "format" => check_format(input, &pos[1.min(pos.len())..])?,
        "batch" | "slice" => {
            if let Some(n) = usize_arg(pos.get(1)) {
                if n > MAX_FILTER_ITEMS {
                    return Err(limit_error(format!("{name} count {n} is too large")));
                }
            }
            if name == "batch" && pos.get(2).is_some() {
                if let Some(n) = usize_arg(pos.get(1)) {
                    if n > MAX_FORMAT_WIDTH {
                        return Err(limit_error(format!(
                            "batch size {n} with fill value is too large"
                        )));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn guard_method(
    value: &Value,
    method: &str,
    args: &[Value],
    cap: usize,
) -> Result<(), minijinja::Error> {
    for a in args {
        check_size(a, cap, method)?;
    }
    if value.kind() != ValueKind::String {
        return Ok(());
    }
    match method {
        "replace" => check_replace(Some(value), args.first(), args.get(1), args.get(2), cap),
        "join" => check_join(args.first(), Some(value), cap),
        "format" => check_format(Some(value), args),
        _ => Ok(()),
    }
}

fn check_replace(
    input: Option<&Value>,
    old: Option<&Value>,
    new: Option<&Value>,
    count: Option<&Value>,
    cap: usize,
) -> Result<(), minijinja::Error> {
    let (Some(s), Some(old), Some(new)) = (
        input.and_then(|v| v.as_str()),
        old.and_then(|v| v.as_str()),
        new.and_then(|v| v.as_str()),
    ) else {
        return Ok(());
    };
    if new.len() <= old.len() {
        return Ok(());
    }
    let mut hits = if old.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(old).count()
    };
    if let Some(c) = count.and_then(|c| i64::try_from(c.clone()).ok()) {
        if c >= 0 {
            hits = hits.min(c as usize);
        }
    }
    let total = hits
        .saturating_mul(new.len() - old.len())
        .saturating_add(s.len());
    if total > cap {
        return Err(limit_error(format!(
            "replace would build a string of {total} bytes, over the {cap}-byte limit"
        )));
    }
    Ok(())
}

fn check_join(
    items: Option<&Value>,
    sep: Option<&Value>,
    cap: usize,
) -> Result<(), minijinja::Error> {
    let sep_len = sep.and_then(str_len).unwrap_or(0);
    if let Some(n) = items.and_then(|v| v.len()) {
        if n.saturating_sub(1).saturating_mul(sep_len) > cap {
            return Err(limit_error(format!(
                "join would build more than {cap} bytes"
            )));
        }
    }
    Ok(())
}

/// Rejects width/precision numbers above [`MAX_FORMAT_WIDTH`] in printf- and
/// `str.format`-style format strings (`%9999999s`, `{:>9999999}`, `%*s` with a huge
/// argument).
fn check_format(fmt: Option<&Value>, args: &[Value]) -> Result<(), minijinja::Error> {
    let Some(s) = fmt.and_then(|v| v.as_str()) else {
        return Ok(());
    };
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let prev = bytes[..start].iter().rev().find(|b| {
                !matches!(
                    b,
                    b'-' | b'+' | b' ' | b'#' | b'0' | b'<' | b'>' | b'^' | b'=' | b',' | b'_'
                )
            });
            if matches!(prev, Some(b'%' | b':' | b'.')) {
                let n: Option<usize> = s[start..i].parse().ok();
                if n.is_none_or(|n| n > MAX_FORMAT_WIDTH) {
                    return Err(limit_error(format!(
                        "format width `{}` is larger than {MAX_FORMAT_WIDTH}",
                        &s[start..i]
                    )));
                }
            }
        } else {
            i += 1;
        }
    }
    if s.contains('*') {
        for a in args {
            if usize_arg(Some(a)).is_some_and(|n| n > MAX_FORMAT_WIDTH) {
                return Err(limit_error("format `*` width is too large".into()));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Input normalisation

/// Whether the template loops over a message's content parts itself: some `{% for %}` tag
/// iterates over `message['content']`, `message.content` or `content`.
fn iterates_content(source: &str) -> bool {
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        let after = &rest[pos + 2..];
        let Some(end) = after.find("%}") else { break };
        let inner = after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if inner.starts_with("for ") {
            let compact: String = inner.chars().filter(|c| !c.is_whitespace()).collect();
            let loops_content = [
                "inmessage['content']",
                "inmessage[\"content\"]",
                "inmessage.content",
            ]
            .iter()
            .any(|p| compact.contains(p))
                || compact.ends_with("incontent");
            if loops_content {
                return true;
            }
        }
        rest = &after[end + 2..];
    }
    false
}

fn normalize_messages(
    messages: &serde_json::Value,
    iterates_content: bool,
) -> Result<serde_json::Value, TemplateError> {
    let list = messages
        .as_array()
        .ok_or_else(|| TemplateError::InvalidInput("`messages` must be a JSON array".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let obj = m.as_object().ok_or_else(|| {
            TemplateError::InvalidInput(format!("message {i} is not a JSON object"))
        })?;
        if !obj.get("role").is_some_and(|r| r.is_string()) {
            return Err(TemplateError::InvalidInput(format!(
                "message {i} has no string `role`"
            )));
        }
        let mut msg = serde_json::Map::new();
        // Reasoning aliases, as transformers does: `thinking` first, `reasoning_content` set.
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|k| obj.get(*k).filter(|v| !v.is_null()))
            .cloned();
        if let Some(r) = &reasoning {
            msg.insert("thinking".into(), r.clone());
        }
        for (k, v) in obj {
            let v = match k.as_str() {
                "content" if !iterates_content => flatten_content(v, i)?,
                "tool_calls" => parse_tool_call_arguments(v),
                "thinking" if reasoning.is_some() => continue,
                _ => v.clone(),
            };
            msg.insert(k.clone(), v);
        }
        if let Some(r) = reasoning {
            msg.insert("reasoning_content".into(), r);
        }
        out.push(serde_json::Value::Object(msg));
    }
    Ok(serde_json::Value::Array(out))
}

fn flatten_content(v: &serde_json::Value, i: usize) -> Result<serde_json::Value, TemplateError> {
    let Some(parts) = v.as_array() else {
        return Ok(v.clone());
    };
    let mut texts = Vec::with_capacity(parts.len());
    for p in parts {
        let kind = p.get("type").and_then(|t| t.as_str()).unwrap_or("");
        match (kind, p.get("text").and_then(|t| t.as_str())) {
            ("text", Some(t)) => texts.push(t),
            _ => {
                let msg = format!("message {i}: content part of type `{kind}` is not supported");
                return Err(TemplateError::InvalidInput(msg));
            }
        }
    }
    Ok(serde_json::Value::String(texts.join("\n")))
}

/// Parses `function.arguments` strings holding a JSON object into that object.
fn parse_tool_call_arguments(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    if let Some(calls) = v.as_array_mut() {
        for call in calls {
            if let Some(args) = call
                .get_mut("function")
                .and_then(|f| f.get_mut("arguments"))
            {
                if let Some(s) = args.as_str() {
                    if let Ok(parsed @ serde_json::Value::Object(_)) = serde_json::from_str(s) {
                        *args = parsed;
                    }
                }
            }
        }
    }
    v
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` markers (used for
/// assistant-mask training); they render nothing.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        let after = &rest[pos + 2..];
        let Some(end) = after.find("%}") else { break };
        let inner = after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..pos]);
        if inner == "generation" || inner == "endgeneration" {
            // Keep whitespace-control semantics by emitting an empty comment-like tag.
            let open_ws = if after.starts_with('-') { "-" } else { "" };
            let close_ws = if after[..end].ends_with('-') { "-" } else { "" };
            let _ = write!(
                out,
                "{{%{open_ws} if true {close_ws}%}}{{%{open_ws} endif {close_ws}%}}"
            );
        } else {
            out.push_str(&rest[pos..pos + 2 + end + 2]);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------
// tojson (Python json.dumps)

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    cap: usize,
}

fn tojson_filter(value: &Value, args: &[Value], cap: usize) -> Result<Value, minijinja::Error> {
    // transformers' signature: tojson(x, ensure_ascii=False, indent=None, separators=None,
    // sort_keys=False).
    let pos = positional(args);
    let get = |i: usize, name: &str| pos.get(i).cloned().or_else(|| kwarg(args, name));
    let ensure_ascii = get(0, "ensure_ascii").is_some_and(|v| v.is_true());
    let indent = match get(1, "indent") {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.is_integer() => {
            let n = i64::try_from(v.clone()).unwrap_or(i64::MAX);
            if n > MAX_FORMAT_WIDTH as i64 {
                return Err(limit_error(format!("tojson indent {n} is too large")));
            }
            Some(" ".repeat(n.max(0) as usize))
        }
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson indent must be an integer or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match get(2, "separators") {
        Some(v) if !v.is_none() => {
            let a = v
                .get_item_by_index(0)
                .ok()
                .and_then(|x| x.as_str().map(str::to_owned));
            let b = v
                .get_item_by_index(1)
                .ok()
                .and_then(|x| x.as_str().map(str::to_owned));
            match (a, b) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be a pair of strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = get(3, "sort_keys").is_some_and(|v| v.is_true());
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
        cap,
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

fn write_json(
    v: &Value,
    o: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    if out.len() > o.cap {
        return Err(limit_error(format!(
            "tojson output exceeds {} bytes",
            o.cap
        )));
    }
    if depth > MAX_JSON_DEPTH {
        return Err(limit_error(format!(
            "tojson: nesting deeper than {MAX_JSON_DEPTH}"
        )));
    }
    match v.kind() {
        ValueKind::Undefined => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: value is undefined (not JSON serializable)",
            ))
        }
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(v, out),
        ValueKind::String => write_json_str(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            let mut entries = Vec::with_capacity(keys.len());
            for k in keys.drain(..) {
                let val = v.get_item(&k)?;
                entries.push((json_key(&k)?, val));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (k, val)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline_indent(o, depth + 1, out);
                write_json_str(k, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                write_json(val, o, depth + 1, out)?;
            }
            newline_indent(o, depth, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let mut first = true;
            out.push('[');
            for item in v.try_iter()? {
                if !first {
                    out.push_str(&o.item_sep);
                }
                first = false;
                newline_indent(o, depth + 1, out);
                write_json(&item, o, depth + 1, out)?;
            }
            if !first {
                newline_indent(o, depth, out);
            }
            out.push(']');
        }
        _ => write_json_str(&v.to_string(), o.ensure_ascii, out),
    }
    Ok(())
}

fn newline_indent(o: &JsonOpts, depth: usize, out: &mut String) {
    if let Some(ind) = &o.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

/// Map keys as Python's json.dumps converts them: strings as is, numbers, booleans and
/// none to their JSON text.
fn json_key(k: &Value) -> Result<String, minijinja::Error> {
    match k.kind() {
        ValueKind::String => Ok(k.as_str().unwrap_or_default().to_owned()),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(k, &mut s);
            Ok(s)
        }
        ValueKind::Bool => Ok(if k.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        _ => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "tojson: keys must be str, int, float, bool or None, not {}",
                k.kind()
            ),
        )),
    }
}

fn write_number(v: &Value, out: &mut String) {
    if v.is_integer() {
        let _ = write!(out, "{v}");
    } else {
        match f64::try_from(v.clone()) {
            Ok(f) => out.push_str(&python_float_repr(f)),
            Err(_) => {
                let _ = write!(out, "{v}");
            }
        }
    }
}

/// `repr(float)` as Python writes it (which is what json.dumps uses): shortest round-trip
/// digits, scientific notation when the decimal exponent is < -4 or >= 16, a two-digit
/// minimum signed exponent, and `.0` on integral values; `NaN`, `Infinity`, `-Infinity`.
pub(crate) fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // `{:e}` yields the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{:e}", f);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    if !(-4..16).contains(&exp) {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let _ = write!(s, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp < 0 {
        s.push_str("0.");
        for _ in 0..(-exp - 1) {
            s.push('0');
        }
        s.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            s.push_str(&digits);
            for _ in digits.len()..int_len {
                s.push('0');
            }
            s.push_str(".0");
        } else {
            s.push_str(&digits[..int_len]);
            s.push('.');
            s.push_str(&digits[int_len..]);
        }
    }
    s
}

/// A JSON string literal as Python's json.dumps writes it.
fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------
// strftime_now

fn strftime_now(fmt: &str) -> Result<Value, minijinja::Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_time(fmt, secs).map(Value::from)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Civil date (year, month 1..=12, day 1..=31) of a day count since 1970-01-01
/// (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Formats a UTC instant (seconds since the Unix epoch) with Python `strftime`
/// directives: `%Y %y %m %d %e %B %b %h %A %a %H %I %M %S %p %j %w %u %F %T %D %%`, and the
/// glibc `%-d`-style no-padding flag. Unknown directives are an error.
pub(crate) fn format_time(fmt: &str, unix_secs: i64) -> Result<String, minijinja::Error> {
    if fmt.len() > 1024 {
        return Err(limit_error(
            "strftime_now format is longer than 1024 bytes".into(),
        ));
    }
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let wd = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday.
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + u32::from(m > 2 && is_leap(y));
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let pad = if spec == Some('-') {
            spec = chars.next();
            false
        } else {
            true
        };
        let num = |out: &mut String, n: i64, w: usize| {
            if pad {
                let _ = write!(out, "{n:0w$}");
            } else {
                let _ = write!(out, "{n}");
            }
        };
        match spec {
            Some('Y') => {
                let _ = write!(out, "{y}");
            }
            Some('y') => num(&mut out, y.rem_euclid(100), 2),
            Some('m') => num(&mut out, i64::from(m), 2),
            Some('d') => num(&mut out, i64::from(d), 2),
            Some('e') => {
                let _ = write!(out, "{d:>2}");
            }
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[wd]),
            Some('a') => out.push_str(&WEEKDAYS[wd][..3]),
            Some('H') => num(&mut out, hh, 2),
            Some('I') => num(&mut out, h12, 2),
            Some('M') => num(&mut out, mm, 2),
            Some('S') => num(&mut out, ss, 2),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => num(&mut out, i64::from(yday), 3),
            Some('w') => num(&mut out, ((wd + 1) % 7) as i64, 1),
            Some('u') => num(&mut out, wd as i64 + 1, 1),
            Some('F') => {
                let _ = write!(out, "{y}-{m:02}-{d:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hh:02}:{mm:02}:{ss:02}");
            }
            Some('D') => {
                let _ = write!(out, "{m:02}/{d:02}/{:02}", y.rem_euclid(100));
            }
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (123.456, "123.456"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1e100, "1e+100"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (100.0, "100.0"),
            (1.1234567890123457, "1.1234567890123457"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn strftime_directives() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(format_time("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            format_time("%A %a %B %m %H:%M:%S", t).unwrap(),
            "Friday Fri July 07 13:05:09"
        );
        assert_eq!(
            format_time("%-d %I%p %j %y %%", t).unwrap(),
            "26 01PM 208 24 %"
        );
        assert_eq!(format_time("%F %T", 0).unwrap(), "1970-01-01 00:00:00");
        assert_eq!(format_time("%A", 0).unwrap(), "Thursday");
        assert!(format_time("%Q", t).is_err());
    }

    #[test]
    fn generation_tags_removed() {
        let s =
            strip_generation_tags("a{% generation %}b{%- endgeneration -%} c{% if x %}{% endif %}");
        assert_eq!(
            s,
            "a{% if true %}{% endif %}b{%- if true -%}{%- endif -%} c{% if x %}{% endif %}"
        );
    }
}
