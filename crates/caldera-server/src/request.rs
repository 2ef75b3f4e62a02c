//! Request bodies: parsing and validation of the OpenAI fields, and the error type every
//! route answers with.
//!
//! Field bounds (a value outside them, or of the wrong JSON type, is a 400 naming the
//! field in `param`; `null` counts as absent):
//!
//! | field | type | bounds | default |
//! |---|---|---|---|
//! | `max_completion_tokens`, `max_tokens` | integer | 1 ..= context size | the rest of the context |
//! | `temperature` | number | 0 ..= 2 (0 = greedy) | 0.8 |
//! | `top_p` | number | 0 ..= 1 (0 = greedy) | 0.95 |
//! | `top_k` (extension) | integer | 0 ..= 1 048 576 (0 = off) | 40 |
//! | `min_p` (extension) | number | 0 ..= 1 | 0.05 |
//! | `presence_penalty`, `frequency_penalty` | number | −2 ..= 2 | 0 |
//! | `seed` | integer | −2^63 ..= 2^64 − 1 (negatives taken as their 64-bit pattern) | random |
//! | `stop` | string or array of strings | at most 4 strings, each 1 ..= 256 bytes | none |
//! | `n` | integer | 1 | 1 |
//! | `stream` | boolean | | false |
//! | `stream_options.include_usage` | boolean | only with `stream` | false |
//! | `logprobs` | boolean | false | false |
//! | `tools` (chat) | array of `{"type": "function", "function": {"name", "description", "parameters"}}` | at most 128 tools; names 1 ..= 64 of `[A-Za-z0-9_.-]`, unique | none |
//! | `tool_choice` (chat) | `"none"`, `"auto"`, `"required"`, or `{"type": "function", "function": {"name"}}` naming a tool | `"auto"` with tools, else `"none"` |
//! | `parallel_tool_calls` (chat) | boolean | | true |
//! | `messages` (chat) | array of messages | 1 ..= 4096 messages | required |
//! | `prompt` (completions) | string, array of one string, or array of token ids | non-empty | required |
//!
//! When both `max_completion_tokens` and `max_tokens` are given, `max_completion_tokens`
//! wins. A prompt plus `max_tokens` may exceed the context: generation then stops when the
//! context is full, with `finish_reason: "length"`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use caldera_engine::SamplerConfig;
use serde_json::{json, Map, Value};

use crate::tools::ToolChoice;

/// Most stop strings a request may give.
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Most messages in a chat request.
pub const MAX_MESSAGES: usize = 4096;
/// Largest `top_k`.
pub const MAX_TOP_K: u64 = 1 << 20;
/// Most tools a request may offer.
pub const MAX_TOOLS: usize = 128;
/// Longest tool name.
pub const MAX_TOOL_NAME: usize = 64;

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(s as u64));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// What the model is asked to continue.
#[derive(Debug, Clone)]
pub enum Input {
    /// Chat messages, normalized, for the chat template.
    Messages(Value),
    /// Raw text.
    Text(String),
    /// Token ids given directly.
    Tokens(Vec<u32>),
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub input: Input,
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// The request's tools (chat), validated; empty when none.
    pub tools: Vec<Value>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
}

fn field<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

/// A number in `[lo, hi]`.
fn number(o: &Map<String, Value>, name: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    let Some(v) = field(o, name) else {
        return Ok(None);
    };
    let x = v
        .as_f64()
        .ok_or_else(|| ApiError::invalid(Some(name), format!("`{name}` must be a number")))?;
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            Some(name),
            format!("`{name}` must be in [{lo}, {hi}], got {x}"),
        ));
    }
    Ok(Some(x as f32))
}

/// An integer in `[lo, hi]` (a float with no fraction counts as an integer).
fn integer(o: &Map<String, Value>, name: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
    let Some(v) = field(o, name) else {
        return Ok(None);
    };
    let wrong = || ApiError::invalid(Some(name), format!("`{name}` must be an integer"));
    let x = match v.as_u64() {
        Some(x) => x,
        None if v.as_i64().is_some() => {
            return Err(ApiError::invalid(
                Some(name),
                format!("`{name}` must be in [{lo}, {hi}], got {v}"),
            ))
        }
        None => {
            let f = v.as_f64().ok_or_else(wrong)?;
            if f.fract() != 0.0 || f < 0.0 || f > u64::MAX as f64 {
                return Err(wrong());
            }
            f as u64
        }
    };
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            Some(name),
            format!("`{name}` must be in [{lo}, {hi}], got {x}"),
        ));
    }
    Ok(Some(x))
}

fn boolean(o: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(o, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(
            Some(name),
            format!("`{name}` must be a boolean"),
        )),
    }
}

fn stops(o: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("stop"), m);
    let list: Vec<&Value> = match field(o, "stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(_)) => vec![&o["stop"]],
        Some(Value::Array(a)) => a.iter().collect(),
        Some(_) => return Err(bad("`stop` must be a string or an array of strings".into())),
    };
    if list.len() > MAX_STOP {
        return Err(bad(format!(
            "`stop` holds at most {MAX_STOP} strings, got {}",
            list.len()
        )));
    }
    list.into_iter()
        .map(|v| {
            let s = v
                .as_str()
                .ok_or_else(|| bad("`stop` must be a string or an array of strings".into()))?;
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return Err(bad(format!(
                    "each stop string must be 1 to {MAX_STOP_BYTES} bytes long, got {}",
                    s.len()
                )));
            }
            Ok(s.to_owned())
        })
        .collect()
}

/// The fields chat and completions share. `context` bounds `max_tokens`.
fn common(o: &Map<String, Value>, context: usize, input: Input) -> Result<Parsed, ApiError> {
    let ctx = context as u64;
    let max_tokens = match integer(o, "max_completion_tokens", 1, ctx)? {
        Some(n) => Some(n),
        None => integer(o, "max_tokens", 1, ctx)?,
    };
    let mut sampler = SamplerConfig::default();
    if let Some(t) = number(o, "temperature", 0.0, 2.0)? {
        sampler.temperature = t;
    }
    if let Some(p) = number(o, "top_p", 0.0, 1.0)? {
        if p == 0.0 {
            sampler.temperature = 0.0;
        } else {
            sampler.top_p = p;
        }
    }
    if let Some(k) = integer(o, "top_k", 0, MAX_TOP_K)? {
        sampler.top_k = k as usize;
    }
    if let Some(m) = number(o, "min_p", 0.0, 1.0)? {
        sampler.min_p = m;
    }
    if let Some(p) = number(o, "presence_penalty", -2.0, 2.0)? {
        sampler.presence_penalty = p;
    }
    if let Some(p) = number(o, "frequency_penalty", -2.0, 2.0)? {
        sampler.frequency_penalty = p;
    }
    if let Some(v) = field(o, "seed") {
        let seed = v
            .as_u64()
            .or_else(|| v.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::invalid(Some("seed"), "`seed` must be an integer"))?;
        sampler.seed = Some(seed);
    }
    sampler.validate().map_err(|e| ApiError::invalid(None, e))?;
    integer(o, "n", 1, 1)?;
    if boolean(o, "logprobs")? == Some(true) {
        return Err(ApiError::invalid(
            Some("logprobs"),
            "`logprobs` is not supported",
        ));
    }
    let stream = boolean(o, "stream")?.unwrap_or(false);
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => {
            if !stream {
                return Err(ApiError::invalid(
                    Some("stream_options"),
                    "`stream_options` is only allowed with `stream: true`",
                ));
            }
            boolean(so, "include_usage")
                .map_err(|_| {
                    ApiError::invalid(
                        Some("stream_options.include_usage"),
                        "`stream_options.include_usage` must be a boolean",
                    )
                })?
                .unwrap_or(false)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "`stream_options` must be an object",
            ))
        }
    };
    Ok(Parsed {
        input,
        max_tokens: max_tokens.map(|n| n as usize),
        sampler,
        stop: stops(o)?,
        stream,
        include_usage,
        tools: Vec::new(),
        tool_choice: ToolChoice::None,
        parallel_tool_calls: true,
    })
}

fn valid_tool_name(name: &str) -> bool {
    (1..=MAX_TOOL_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `tools`, `tool_choice` and `parallel_tool_calls` of a chat request.
fn tools(o: &Map<String, Value>) -> Result<(Vec<Value>, ToolChoice, bool), ApiError> {
    let p = Some("tools");
    let list = match field(o, "tools") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(ApiError::invalid(p, "`tools` must be an array")),
    };
    if list.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            p,
            format!(
                "`tools` holds at most {MAX_TOOLS} tools, got {}",
                list.len()
            ),
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let bad = |m: &str| ApiError::invalid(p, format!("tools[{i}]: {m}"));
        let t = t.as_object().ok_or_else(|| bad("must be an object"))?;
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("`type` must be \"function\""));
        }
        let f = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("`function` must be an object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`function.name` must be a string"))?;
        if !valid_tool_name(name) {
            return Err(bad(&format!(
                "`function.name` must be 1 to {MAX_TOOL_NAME} letters, digits, `_`, `-` or `.`"
            )));
        }
        if names.iter().any(|n| n == name) {
            return Err(bad(&format!("the tool name `{name}` is used twice")));
        }
        if !matches!(
            f.get("description"),
            None | Some(Value::Null) | Some(Value::String(_))
        ) {
            return Err(bad("`function.description` must be a string"));
        }
        if !matches!(
            f.get("parameters"),
            None | Some(Value::Null) | Some(Value::Object(_))
        ) {
            return Err(bad("`function.parameters` must be a JSON schema object"));
        }
        names.push(name.to_owned());
    }
    let cp = Some("tool_choice");
    let choice = match field(o, "tool_choice") {
        None if list.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(ApiError::invalid(
                    cp,
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or a function",
                ))
            }
        },
        Some(Value::Object(c)) => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| c.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        cp,
                        "`tool_choice` as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !names.iter().any(|n| n == name) {
                return Err(ApiError::invalid(
                    cp,
                    format!("`tool_choice` names `{name}`, which is not in `tools`"),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                cp,
                "`tool_choice` must be a string or an object",
            ))
        }
    };
    if list.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(ApiError::invalid(
            cp,
            "`tool_choice` asks for a tool call, but `tools` is empty",
        ));
    }
    let parallel = boolean(o, "parallel_tool_calls")?.unwrap_or(true);
    Ok((list, choice, parallel))
}

/// An assistant message's `tool_calls`: `[{"id", "type": "function", "function": {"name",
/// "arguments"}}]`.
fn check_tool_calls(i: usize, calls: &Value) -> Result<(), ApiError> {
    let param = format!("messages[{i}].tool_calls");
    let bad = |m: String| ApiError::invalid(Some(&param), m);
    let Value::Array(calls) = calls else {
        return Err(bad(format!("{param} must be an array")));
    };
    for (j, c) in calls.iter().enumerate() {
        let f = c.get("function").and_then(Value::as_object);
        let ok = c.get("type").is_none_or(|t| t == "function")
            && f.is_some_and(|f| {
                f.get("name").is_some_and(Value::is_string)
                    && matches!(
                        f.get("arguments"),
                        None | Some(Value::String(_)) | Some(Value::Object(_))
                    )
            })
            && c.get("id").is_none_or(Value::is_string);
        if !ok {
            return Err(bad(format!(
                "{param}[{j}] must be {{\"id\": string, \"type\": \"function\", \"function\": {{\"name\": string, \"arguments\": string}}}}"
            )));
        }
    }
    Ok(())
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::invalid(None, "the body must be a JSON object")),
    }
}

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8], context: usize) -> Result<Parsed, ApiError> {
    let o = object(body)?;
    let p = Some("messages");
    let msgs = match field(&o, "messages") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid(p, "`messages` must be an array")),
        None => return Err(ApiError::invalid(p, "`messages` is required")),
    };
    if msgs.is_empty() || msgs.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            p,
            format!(
                "`messages` must hold 1 to {MAX_MESSAGES} messages, got {}",
                msgs.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let at = |what: &str| ApiError::invalid(Some(&format!("messages[{i}]{what}")), "");
        let Value::Object(m) = m else {
            let mut e = at("");
            e.message = format!("messages[{i}] must be an object");
            return Err(e);
        };
        let mut m = m.clone();
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r.to_owned(),
            Some("developer") => "system".to_owned(),
            _ => {
                let mut e = at(".role");
                e.message = format!(
                    "messages[{i}].role must be one of system, developer, user, assistant, tool"
                );
                return Err(e);
            }
        };
        m.insert("role".into(), Value::String(role));
        match m.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let ok = part.get("type").and_then(Value::as_str) == Some("text")
                        && part.get("text").is_some_and(Value::is_string);
                    if !ok {
                        let mut e = at(&format!(".content[{j}]"));
                        e.message = format!(
                            "messages[{i}].content[{j}] must be a text part ({{\"type\": \"text\", \"text\": ...}}); other parts are not supported"
                        );
                        return Err(e);
                    }
                }
            }
            Some(_) => {
                let mut e = at(".content");
                e.message = format!("messages[{i}].content must be a string or an array of parts");
                return Err(e);
            }
        }
        if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
            if m["role"] != "assistant" {
                let mut e = at(".tool_calls");
                e.message =
                    format!("messages[{i}].tool_calls is only allowed on assistant messages");
                return Err(e);
            }
            check_tool_calls(i, calls)?;
        }
        if !matches!(
            m.get("tool_call_id"),
            None | Some(Value::Null) | Some(Value::String(_))
        ) {
            let mut e = at(".tool_call_id");
            e.message = format!("messages[{i}].tool_call_id must be a string");
            return Err(e);
        }
        out.push(Value::Object(m));
    }
    let (tools, tool_choice, parallel_tool_calls) = tools(&o)?;
    let mut parsed = common(&o, context, Input::Messages(Value::Array(out)))?;
    parsed.tools = tools;
    parsed.tool_choice = tool_choice;
    parsed.parallel_tool_calls = parallel_tool_calls;
    Ok(parsed)
}

/// Parses a `/v1/completions` body. `vocab` bounds token ids given as the prompt.
pub fn parse_completion(body: &[u8], context: usize, vocab: usize) -> Result<Parsed, ApiError> {
    let o = object(body)?;
    let p = Some("prompt");
    let shape = "`prompt` must be a string, an array of one string, or an array of token ids";
    let input = match field(&o, "prompt") {
        None => return Err(ApiError::invalid(p, "`prompt` is required")),
        Some(Value::String(s)) => Input::Text(s.clone()),
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::String(s)] => Input::Text(s.clone()),
            [] => return Err(ApiError::invalid(p, "`prompt` is empty")),
            items => {
                let mut ids = Vec::with_capacity(items.len());
                for v in items {
                    let id = v.as_u64().ok_or_else(|| ApiError::invalid(p, shape))?;
                    if id >= vocab as u64 {
                        return Err(ApiError::invalid(
                            p,
                            format!("token id {id} is outside the vocabulary of {vocab}"),
                        ));
                    }
                    ids.push(id as u32);
                }
                Input::Tokens(ids)
            }
        },
        Some(_) => return Err(ApiError::invalid(p, shape)),
    };
    if boolean(&o, "echo")? == Some(true) {
        return Err(ApiError::invalid(Some("echo"), "`echo` is not supported"));
    }
    if field(&o, "suffix").is_some() {
        return Err(ApiError::invalid(
            Some("suffix"),
            "`suffix` is not supported",
        ));
    }
    integer(&o, "best_of", 1, 1)?;
    if field(&o, "tools").is_some() {
        return Err(ApiError::invalid(
            Some("tools"),
            "`tools` belongs to /v1/chat/completions",
        ));
    }
    common(&o, context, input)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Parsed, ApiError> {
        parse_chat(body.as_bytes(), 100)
    }

    const M: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

    #[test]
    fn bounds_and_types() {
        let ok = chat(&format!(r#"{{{M},"max_tokens":100,"temperature":2,"top_p":1,"seed":-1,"stop":["a","b"],"n":1,"presence_penalty":-2}}"#)).unwrap();
        assert_eq!(ok.max_tokens, Some(100));
        assert_eq!(ok.sampler.seed, Some(u64::MAX));
        assert_eq!(ok.stop, ["a", "b"]);
        for (extra, param) in [
            (r#""max_tokens":0"#, Some("max_tokens")),
            (r#""max_tokens":101"#, Some("max_tokens")),
            (r#""max_tokens":-1"#, Some("max_tokens")),
            (r#""max_tokens":1.5"#, Some("max_tokens")),
            (r#""max_tokens":"5""#, Some("max_tokens")),
            (
                r#""max_completion_tokens":0"#,
                Some("max_completion_tokens"),
            ),
            (r#""temperature":2.01"#, Some("temperature")),
            (r#""temperature":"hot""#, Some("temperature")),
            (r#""top_p":-0.1"#, Some("top_p")),
            (r#""n":2"#, Some("n")),
            (r#""stop":5"#, Some("stop")),
            (r#""stop":["a","b","c","d","e"]"#, Some("stop")),
            (r##""stop":"""##, Some("stop")),
            (r#""frequency_penalty":3"#, Some("frequency_penalty")),
            (r#""stream":"yes""#, Some("stream")),
            (
                r#""stream_options":{"include_usage":true}"#,
                Some("stream_options"),
            ),
            (r#""seed":"x""#, Some("seed")),
            (r#""tools":[{"type":"function"}]"#, Some("tools")),
            (r#""tools":{}"#, Some("tools")),
            (
                r#""tools":[{"type":"function","function":{"name":"a b"}}]"#,
                Some("tools"),
            ),
            (r#""tool_choice":"required""#, Some("tool_choice")),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}"#,
                Some("tool_choice"),
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"sometimes""#,
                Some("tool_choice"),
            ),
        ] {
            let e = chat(&format!("{{{M},{extra}}}")).unwrap_err();
            assert_eq!(e.param.as_deref(), param, "{extra}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
        assert!(chat(r#"{"messages":[]}"#).is_err());
        assert!(chat(r#"{"messages":[{"role":"bot","content":"x"}]}"#).is_err());
        assert!(chat(r#"{"messages":[{"role":"user","content":5}]}"#).is_err());
        assert!(chat("[1]").is_err());
        let t = chat(&format!(
            r#"{{{M},"tools":[{{"type":"function","function":{{"name":"get_weather","parameters":{{"type":"object"}}}}}}]}}"#
        ))
        .unwrap();
        assert_eq!((t.tools.len(), t.tool_choice), (1, ToolChoice::Auto));
        let t = chat(&format!(
            r#"{{{M},"tools":[{{"type":"function","function":{{"name":"f"}}}}],"tool_choice":{{"type":"function","function":{{"name":"f"}}}}}}"#
        ))
        .unwrap();
        assert_eq!(t.tool_choice, ToolChoice::Named("f".into()));
        let e = chat(r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"a","type":"function","function":{"name":5}}]}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_calls"));
        let ok = chat(
            r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"a","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"a","content":"1"}]}"#,
        );
        assert!(ok.is_ok());
        assert!(chat("{").is_err());
        let e = parse_completion(br#"{"prompt":[1,99]}"#, 100, 50).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(matches!(
            parse_completion(br#"{"prompt":[1,2]}"#, 100, 50)
                .unwrap()
                .input,
            Input::Tokens(_)
        ));
    }
}
