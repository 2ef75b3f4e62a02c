//! Tool calling: which format a model writes its calls in, how the tools reach the
//! prompt, and a streaming parser that turns the model's output into text and OpenAI
//! `tool_calls`.
//!
//! Formats ([`ToolFormat`], chosen from the chat template, else the architecture):
//! - `Hermes`: `<tool_call>{"name": .., "arguments": {..}}</tool_call>` (Qwen2.5/Qwen3,
//!   Hermes, and the fallback for templates without tool support; a JSON array of calls
//!   inside one tag, as SmolLM2 was trained to write, is accepted too).
//! - `QwenXml`: `<tool_call><function=NAME><parameter=P>V</parameter></function></tool_call>`
//!   (Qwen3-Coder, Qwen3.5); values are typed from the tool's JSON schema.
//! - `Llama3Json`: a bare `{"name": .., "parameters": {..}}` (several separated by `;`),
//!   optionally after `<|python_tag|>` (Llama 3.1+).
//! - `Harmony`: gpt-oss channels; `<|channel|>commentary to=functions.NAME <|constrain|>json
//!   <|message|>{..}<|call|>` is a call, the `final` channel is the content, `analysis` is
//!   reasoning.
//! - `Lfm2`: `<|tool_call_start|>[name(arg="v", n=1)]<|tool_call_end|>` (Python call syntax).
//! - `Nemotron`: `<TOOLCALL>[{"name": .., "arguments": {..}}]</TOOLCALL>`.
//!
//! A call that does not parse is passed through as plain content, never lost. Markers
//! may arrive as special tokens ([`ToolParser::push_special`]) or as text; text that
//! might be the start of a marker is held back until it is known not to be one, so a
//! raw `<tool_call>` never reaches `content`.
//!
//! Templates that do not mention `tools` get them through a system message in Hermes
//! style, and past `tool_calls` / `tool` messages are rewritten into text the template
//! can render ([`fallback_messages`]).

use serde_json::{json, Map, Value};

/// How a model writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    QwenXml,
    Llama3Json,
    Harmony,
    Lfm2,
    Nemotron,
}

/// What `tool_choice` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// One parsed call; `arguments` is JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// What the parser makes of the model's output, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    Content(String),
    Reasoning(String),
    Call(ToolCall),
}

impl ToolFormat {
    /// The format the model's template (else its architecture) implies.
    pub fn detect(template: Option<&str>, arch: &str) -> ToolFormat {
        let t = template.unwrap_or("");
        if t.contains("<|channel|>") || arch == "gpt-oss" {
            ToolFormat::Harmony
        } else if t.contains("<function=") {
            ToolFormat::QwenXml
        } else if t.contains("<|tool_call_start|>") || arch.starts_with("lfm2") {
            ToolFormat::Lfm2
        } else if t.contains("<TOOLCALL>") {
            ToolFormat::Nemotron
        } else if t.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if t.contains("<|python_tag|>")
            || (t.contains("<|start_header_id|>") && t.contains("tools"))
        {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Hermes
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::QwenXml => "qwen-xml",
            ToolFormat::Llama3Json => "llama3-json",
            ToolFormat::Harmony => "harmony",
            ToolFormat::Lfm2 => "lfm2",
            ToolFormat::Nemotron => "nemotron",
        }
    }

    /// The start and end markers of a call, for the tag-delimited formats.
    fn markers(self) -> Option<(&'static str, &'static str)> {
        match self {
            ToolFormat::Hermes | ToolFormat::QwenXml => Some(("<tool_call>", "</tool_call>")),
            ToolFormat::Lfm2 => Some(("<|tool_call_start|>", "<|tool_call_end|>")),
            ToolFormat::Nemotron => Some(("<TOOLCALL>", "</TOOLCALL>")),
            ToolFormat::Llama3Json | ToolFormat::Harmony => None,
        }
    }

    /// Text appended after the generation prompt so that the model's answer starts
    /// inside a call (`required`) or inside a call of one function (named); empty for
    /// `none` / `auto`.
    pub fn forced_prefix(self, choice: &ToolChoice) -> String {
        let named = match choice {
            ToolChoice::None | ToolChoice::Auto => return String::new(),
            ToolChoice::Required => None,
            ToolChoice::Named(n) => Some(n.as_str()),
        };
        match (self, named) {
            (ToolFormat::Hermes, None) => "<tool_call>\n{\"name\": \"".into(),
            (ToolFormat::Hermes, Some(n)) => {
                format!("<tool_call>\n{{\"name\": {}, \"arguments\": ", json!(n))
            }
            (ToolFormat::QwenXml, None) => "<tool_call>\n<function=".into(),
            (ToolFormat::QwenXml, Some(n)) => format!("<tool_call>\n<function={n}>\n"),
            (ToolFormat::Llama3Json, None) => "{\"name\": \"".into(),
            (ToolFormat::Llama3Json, Some(n)) => {
                format!("{{\"name\": {}, \"parameters\": ", json!(n))
            }
            (ToolFormat::Harmony, None) => "<|channel|>commentary to=functions.".into(),
            (ToolFormat::Harmony, Some(n)) => {
                format!("<|channel|>commentary to=functions.{n} <|constrain|>json<|message|>")
            }
            (ToolFormat::Lfm2, None) => "<|tool_call_start|>[".into(),
            (ToolFormat::Lfm2, Some(n)) => format!("<|tool_call_start|>[{n}("),
            (ToolFormat::Nemotron, None) => "<TOOLCALL>[{\"name\": \"".into(),
            (ToolFormat::Nemotron, Some(n)) => {
                format!("<TOOLCALL>[{{\"name\": {}, \"arguments\": ", json!(n))
            }
        }
    }
}

/// Whether a chat template renders `tools` itself.
pub fn template_handles_tools(template: &str) -> bool {
    template.contains("tools")
}

/// The system text that offers `tools` to a model whose template has no tool support
/// (Hermes style).
pub fn fallback_system_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "You are a function calling AI model. You may call one or more functions to assist \
         with the user query. Don't make assumptions about what values to plug into \
         functions. Here are the available tools:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nFor each function call, return a JSON object with the function name and \
         arguments within <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": \
         <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// The text of a message's `content` (a string, text parts joined, or empty).
fn content_text(m: &Map<String, Value>) -> String {
    match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Rewrites `messages` for a template without tool support: the tools (when given) join
/// the system message, an assistant's `tool_calls` become `<tool_call>` text, and `tool`
/// results become a user message of `<tool_response>` blocks.
pub fn fallback_messages(messages: &[Value], tools: Option<&[Value]>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(messages.len() + 1);
    if let Some(tools) = tools.filter(|t| !t.is_empty()) {
        let sys = fallback_system_prompt(tools);
        match messages.first().and_then(Value::as_object) {
            Some(m) if m.get("role").and_then(Value::as_str) == Some("system") => {
                let text = content_text(m);
                out.push(json!({"role": "system", "content": format!("{text}\n\n{sys}")}));
            }
            _ => out.push(json!({"role": "system", "content": sys})),
        }
    }
    let skip_first = !out.is_empty()
        && messages
            .first()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("system");
    for (i, m) in messages.iter().enumerate() {
        if i == 0 && skip_first {
            continue;
        }
        let Some(o) = m.as_object() else { continue };
        let role = o.get("role").and_then(Value::as_str).unwrap_or("user");
        match role {
            "tool" => {
                let block = format!("<tool_response>\n{}\n</tool_response>", content_text(o));
                let merge = out.last().and_then(|l| l.get("tool_merge")).is_some();
                if merge {
                    let last = out.last_mut().and_then(Value::as_object_mut);
                    if let Some(last) = last {
                        let prev = content_text(last);
                        last.insert("content".into(), format!("{prev}\n{block}").into());
                    }
                } else {
                    out.push(json!({"role": "user", "content": block, "tool_merge": true}));
                }
            }
            "assistant" if o.get("tool_calls").is_some_and(|c| c.is_array()) => {
                let mut text = content_text(o);
                for c in o["tool_calls"].as_array().into_iter().flatten() {
                    let f = &c["function"];
                    let args = match &f["arguments"] {
                        Value::String(s) => {
                            serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
                        }
                        Value::Null => json!({}),
                        v => v.clone(),
                    };
                    let call = json!({"name": f["name"], "arguments": args});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
                }
                out.push(json!({"role": "assistant", "content": text}));
            }
            _ => {
                let mut o = o.clone();
                if !matches!(
                    o.get("content"),
                    Some(Value::String(_)) | Some(Value::Array(_))
                ) {
                    o.insert("content".into(), "".into());
                }
                out.push(Value::Object(o));
            }
        }
    }
    for m in &mut out {
        if let Some(o) = m.as_object_mut() {
            o.remove("tool_merge");
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Parsing

/// Streaming parser of one response.
pub struct ToolParser {
    format: ToolFormat,
    /// `parameters` schemas by tool name (typing Qwen XML values).
    schemas: Map<String, Value>,
    state: State,
    /// Content seen so far has been only whitespace (Llama 3 JSON detection).
    at_start: bool,
    /// Harmony: the current message's header text and kind.
    harmony: Harmony,
    /// The prompt forced a call ([`ToolParser::prime`]): an unclosed JSON call is
    /// completed (its missing closing brackets added) rather than given up.
    forced: bool,
}

#[derive(Debug)]
enum State {
    /// Passing content through, holding back a possible marker prefix.
    Content(String),
    /// Inside a call; the body so far.
    Call(String),
    /// Llama 3 JSON: everything held until the end.
    Hold(String),
}

#[derive(Debug, Default)]
struct Harmony {
    header: String,
    /// `Some` while inside a message's body.
    body: Option<(HKind, String)>,
}

#[derive(Debug, Clone, PartialEq)]
enum HKind {
    Content,
    Reasoning,
    Call(String),
}

impl ToolParser {
    /// A parser for `format`; `tools` is the request's tools array (may be empty).
    pub fn new(format: ToolFormat, tools: &[Value]) -> ToolParser {
        let mut schemas = Map::new();
        for t in tools {
            let f = &t["function"];
            if let Some(name) = f["name"].as_str() {
                schemas.insert(name.to_owned(), f["parameters"].clone());
            }
        }
        ToolParser {
            format,
            schemas,
            state: State::Content(String::new()),
            at_start: true,
            harmony: Harmony::default(),
            forced: false,
        }
    }

    /// Feeds the text the prompt already put at the start of the answer (a forced
    /// call's prefix); `<|...|>` markers in it count as special tokens.
    pub fn prime(&mut self, prefix: &str) -> Vec<Out> {
        self.forced |= !prefix.is_empty();
        let mut out = Vec::new();
        let mut rest = prefix;
        while let Some(start) = rest.find("<|") {
            let Some(len) = rest[start..].find("|>") else {
                break;
            };
            out.extend(self.push_text(&rest[..start]));
            out.extend(self.push_special(&rest[start..start + len + 2]));
            rest = &rest[start + len + 2..];
        }
        out.extend(self.push_text(rest));
        out
    }

    /// Feeds generated text.
    pub fn push_text(&mut self, text: &str) -> Vec<Out> {
        if self.format == ToolFormat::Harmony {
            return self.harmony_text(text);
        }
        let mut out = Vec::new();
        if text.is_empty() {
            return out;
        }
        match &mut self.state {
            State::Hold(buf) => {
                buf.push_str(text);
                return out;
            }
            State::Content(buf) => buf.push_str(text),
            State::Call(buf) => buf.push_str(text),
        }
        if self.format == ToolFormat::Llama3Json {
            if let State::Content(buf) = &mut self.state {
                if self.at_start {
                    let t = buf.trim_start();
                    if t.is_empty() {
                        return out;
                    }
                    if t.starts_with('{') || t.starts_with('[') {
                        self.state = State::Hold(std::mem::take(buf));
                        return out;
                    }
                    self.at_start = false;
                }
                out.push(Out::Content(std::mem::take(buf)));
            }
            return out;
        }
        self.scan(&mut out);
        out
    }

    /// Feeds a special token's text.
    pub fn push_special(&mut self, special: &str) -> Vec<Out> {
        if self.format == ToolFormat::Harmony {
            return self.harmony_special(special);
        }
        let mut out = Vec::new();
        if self.format == ToolFormat::Llama3Json {
            if special == "<|python_tag|>" {
                if let State::Content(buf) = &mut self.state {
                    if !buf.is_empty() {
                        out.push(Out::Content(std::mem::take(buf)));
                    }
                    self.state = State::Hold(String::new());
                }
            }
            return out;
        }
        let Some((start, end)) = self.format.markers() else {
            return out;
        };
        match &mut self.state {
            State::Content(buf) if special == start => {
                if !buf.is_empty() {
                    out.push(Out::Content(std::mem::take(buf)));
                }
                self.state = State::Call(String::new());
            }
            State::Call(body) if special == end => {
                let body = std::mem::take(body);
                self.state = State::Content(String::new());
                out.extend(self.close_call(&body, true));
            }
            // Other special tokens carry no text.
            _ => {}
        }
        out
    }

    /// Ends the output: flushes held text, and parses an unclosed call.
    pub fn finish(&mut self) -> Vec<Out> {
        if self.format == ToolFormat::Harmony {
            return self.harmony_finish();
        }
        let mut out = Vec::new();
        match std::mem::replace(&mut self.state, State::Content(String::new())) {
            State::Content(buf) => {
                if !buf.is_empty() {
                    out.push(Out::Content(buf));
                }
            }
            State::Call(body) => out.extend(self.close_call(&body, false)),
            State::Hold(buf) => match parse_json_calls(buf.trim()).or_else(|| {
                self.forced
                    .then(|| heal_json(buf.trim()))
                    .flatten()
                    .and_then(|b| parse_json_calls(&b))
            }) {
                Some(calls) if !calls.is_empty() => out.extend(calls.into_iter().map(Out::Call)),
                _ => {
                    if !buf.is_empty() {
                        out.push(Out::Content(buf));
                    }
                }
            },
        }
        out
    }

    /// Moves complete content and calls out of the buffers (tag-delimited formats).
    fn scan(&mut self, out: &mut Vec<Out>) {
        let Some((start, end)) = self.format.markers() else {
            return;
        };
        loop {
            match &mut self.state {
                State::Content(buf) => {
                    if let Some(p) = buf.find(start) {
                        if p > 0 {
                            out.push(Out::Content(buf[..p].to_owned()));
                        }
                        let rest = buf[p + start.len()..].to_owned();
                        self.state = State::Call(rest);
                        continue;
                    }
                    let keep = partial_suffix(buf, start);
                    let emit = buf.len() - keep;
                    if emit > 0 {
                        out.push(Out::Content(buf[..emit].to_owned()));
                        buf.drain(..emit);
                    }
                    return;
                }
                State::Call(body) => {
                    let Some(p) = body.find(end) else { return };
                    let inner = body[..p].to_owned();
                    let rest = body[p + end.len()..].to_owned();
                    self.state = State::Content(rest);
                    out.extend(self.close_call(&inner, true));
                }
                State::Hold(_) => return,
            }
        }
    }

    /// The outputs of one call's body: its calls, or the raw text when it does not parse.
    fn close_call(&self, body: &str, closed: bool) -> Vec<Out> {
        let calls = match self.format {
            ToolFormat::Hermes | ToolFormat::Nemotron if self.forced => {
                parse_json_calls(body.trim())
                    .or_else(|| heal_json(body.trim()).and_then(|b| parse_json_calls(&b)))
            }
            ToolFormat::Hermes | ToolFormat::Nemotron if closed => parse_json_calls(body.trim()),
            // The output ended inside the call: take the complete calls it holds.
            ToolFormat::Hermes | ToolFormat::Nemotron => leading_json_calls(body.trim()),
            ToolFormat::QwenXml => parse_xml_calls(body, &self.schemas),
            ToolFormat::Lfm2 => parse_python_calls(body.trim()),
            ToolFormat::Llama3Json | ToolFormat::Harmony => None,
        };
        match calls {
            Some(calls) => calls.into_iter().map(Out::Call).collect(),
            None => {
                let (start, end) = self.format.markers().unwrap_or(("", ""));
                let mut raw = format!("{start}{body}");
                if closed {
                    raw.push_str(end);
                }
                vec![Out::Content(raw)]
            }
        }
    }

    fn harmony_text(&mut self, text: &str) -> Vec<Out> {
        let h = &mut self.harmony;
        match &mut h.body {
            None => {
                h.header.push_str(text);
                Vec::new()
            }
            Some((HKind::Call(_), buf)) => {
                buf.push_str(text);
                Vec::new()
            }
            Some((HKind::Content, _)) if !text.is_empty() => vec![Out::Content(text.to_owned())],
            Some((HKind::Reasoning, _)) if !text.is_empty() => {
                vec![Out::Reasoning(text.to_owned())]
            }
            Some(_) => Vec::new(),
        }
    }

    fn harmony_special(&mut self, special: &str) -> Vec<Out> {
        match special {
            "<|message|>" if self.harmony.body.is_none() => {
                let header = std::mem::take(&mut self.harmony.header);
                let kind = harmony_kind(&header);
                self.harmony.body = Some((kind, String::new()));
                Vec::new()
            }
            "<|end|>" | "<|call|>" | "<|return|>" => self.harmony_close(),
            "<|start|>" => {
                let out = self.harmony_close();
                self.harmony.header.clear();
                out
            }
            _ => {
                if self.harmony.body.is_none() {
                    self.harmony.header.push_str(special);
                }
                Vec::new()
            }
        }
    }

    fn harmony_close(&mut self) -> Vec<Out> {
        match self.harmony.body.take() {
            Some((HKind::Call(name), args)) => match normalize_args(args.trim()) {
                Some(arguments) => vec![Out::Call(ToolCall { name, arguments })],
                None => vec![Out::Content(args)],
            },
            _ => Vec::new(),
        }
    }

    fn harmony_finish(&mut self) -> Vec<Out> {
        if self.harmony.body.is_some() {
            return self.harmony_close();
        }
        // Text outside any message: the model ignored the format; keep it as content.
        let header = std::mem::take(&mut self.harmony.header);
        let text = strip_specials(&header);
        if text.trim().is_empty() {
            Vec::new()
        } else {
            vec![Out::Content(text)]
        }
    }
}

/// The kind of a Harmony message from its header (`<|channel|>final`,
/// `<|channel|>commentary to=functions.f <|constrain|>json`, `to=functions.f<|channel|>...`).
fn harmony_kind(header: &str) -> HKind {
    if let Some(p) = header.find("to=functions.") {
        let name: String = header[p + "to=functions.".len()..]
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '<')
            .collect();
        if !name.is_empty() {
            return HKind::Call(name);
        }
    }
    let channel = header
        .rsplit("<|channel|>")
        .next()
        .unwrap_or("")
        .split(|c: char| c.is_whitespace() || c == '<')
        .next()
        .unwrap_or("");
    if channel == "analysis" {
        HKind::Reasoning
    } else {
        HKind::Content
    }
}

/// `text` without `<|...|>` markers.
fn strip_specials(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(s) = rest.find("<|") {
        let Some(e) = rest[s..].find("|>") else { break };
        out.push_str(&rest[..s]);
        rest = &rest[s + e + 2..];
    }
    out.push_str(rest);
    out
}

/// The length of the longest suffix of `buf` that is a proper prefix of `marker`.
fn partial_suffix(buf: &str, marker: &str) -> usize {
    let max = buf.len().min(marker.len() - 1);
    (1..=max)
        .rev()
        .find(|&k| buf.is_char_boundary(buf.len() - k) && marker.starts_with(&buf[buf.len() - k..]))
        .unwrap_or(0)
}

/// Arguments as compact JSON text: an object as is, a string holding JSON parsed first.
fn normalize_args(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    args_value(&v)
}

fn args_value(v: &Value) -> Option<String> {
    match v {
        Value::Object(_) => Some(v.to_string()),
        Value::Null => Some("{}".into()),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(inner @ Value::Object(_)) => Some(inner.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// One call object: `{"name": .., "arguments"|"parameters": {..}}` (or OpenAI's
/// `{"function": {"name", "arguments"}}`).
fn json_call(v: &Value) -> Option<ToolCall> {
    let o = v.as_object()?;
    if let Some(f) = o.get("function").and_then(Value::as_object) {
        if f.contains_key("name") {
            return json_call(&Value::Object(f.clone()));
        }
    }
    let name = o.get("name")?.as_str()?.trim();
    if name.is_empty() {
        return None;
    }
    let args = o
        .get("arguments")
        .or_else(|| o.get("parameters"))
        .unwrap_or(&Value::Null);
    Some(ToolCall {
        name: name.to_owned(),
        arguments: args_value(args)?,
    })
}

/// Calls written as JSON: one object, an array of objects, or objects one after another
/// (separated by whitespace, `;` or `,`). `None` when anything does not parse.
pub fn parse_json_calls(text: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let mut it = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = it.next()?.ok()?;
        let used = it.byte_offset();
        match &v {
            Value::Array(items) => {
                for item in items {
                    calls.push(json_call(item)?);
                }
            }
            _ => calls.push(json_call(&v)?),
        }
        rest = rest[used..].trim_start_matches(|c: char| c.is_whitespace() || c == ';' || c == ',');
    }
    if text.trim().is_empty() {
        return None;
    }
    Some(calls)
}

/// `text` with its unclosed string, arrays and objects closed (a call the model did not
/// finish); `None` when nothing was open or the brackets do not match.
fn heal_json(text: &str) -> Option<String> {
    let mut stack = Vec::new();
    let (mut in_str, mut esc) = (false, false);
    for c in text.chars() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => stack.push('}'),
            '[' => stack.push(']'),
            '}' | ']' if stack.pop() != Some(c) => return None,
            _ => {}
        }
    }
    if stack.is_empty() && !in_str {
        return None;
    }
    let mut out = text.trim_end().trim_end_matches(',').to_owned();
    if in_str {
        out.push('"');
    }
    out.extend(stack.iter().rev());
    Some(out)
}

/// The calls at the start of `text`, ignoring whatever follows the last complete one
/// (an output that ended inside a call); `None` when there is none.
fn leading_json_calls(text: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut it = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    while let Some(Ok(v)) = it.next() {
        match &v {
            Value::Array(items) => {
                for item in items {
                    calls.push(json_call(item)?);
                }
            }
            _ => match json_call(&v) {
                Some(c) => calls.push(c),
                None => break,
            },
        }
    }
    if calls.is_empty() {
        None
    } else {
        Some(calls)
    }
}

/// Qwen3-Coder / Qwen3.5 calls: `<function=NAME>` then `<parameter=P>value</parameter>`s.
pub fn parse_xml_calls(body: &str, schemas: &Map<String, Value>) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = body;
    loop {
        let trimmed = rest.trim();
        if trimmed.is_empty() {
            break;
        }
        let after = trimmed.strip_prefix("<function=")?;
        let gt = after.find('>')?;
        let name = after[..gt].trim();
        if name.is_empty() || name.contains('<') {
            return None;
        }
        let inner_all = &after[gt + 1..];
        let (inner, next) = match inner_all.find("</function>") {
            Some(e) => (&inner_all[..e], &inner_all[e + "</function>".len()..]),
            None => (inner_all, ""),
        };
        let schema = schemas.get(name);
        let mut args = Map::new();
        let mut p = inner;
        loop {
            let t = p.trim_start();
            if t.is_empty() {
                break;
            }
            let a = t.strip_prefix("<parameter=")?;
            let gt = a.find('>')?;
            let pname = a[..gt].trim();
            if pname.is_empty() {
                return None;
            }
            let v = &a[gt + 1..];
            let (raw, after) = match v.find("</parameter>") {
                Some(e) => (&v[..e], &v[e + "</parameter>".len()..]),
                None => match v.find("<parameter=") {
                    Some(e) => (&v[..e], &v[e..]),
                    None => (v, ""),
                },
            };
            let raw = raw.strip_prefix('\n').unwrap_or(raw);
            let raw = raw.strip_suffix('\n').unwrap_or(raw);
            args.insert(pname.to_owned(), typed_value(raw, schema, pname));
            p = after;
        }
        calls.push(ToolCall {
            name: name.to_owned(),
            arguments: Value::Object(args).to_string(),
        });
        rest = next;
    }
    if calls.is_empty() {
        return None;
    }
    Some(calls)
}

/// A parameter value from XML text: a string where the schema says string (or nothing
/// else fits), else the JSON value it spells.
fn typed_value(raw: &str, schema: Option<&Value>, name: &str) -> Value {
    let ty = schema
        .and_then(|s| s.get("properties"))
        .and_then(|p| p.get(name))
        .and_then(|p| p.get("type"));
    let is_string = match ty {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "string") && ts.len() == 1,
        _ => false,
    };
    if is_string {
        return Value::String(raw.to_owned());
    }
    serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

/// LFM2 calls in Python syntax: `[f(a="x", b=1), g()]` (the brackets optional).
pub fn parse_python_calls(text: &str) -> Option<Vec<ToolCall>> {
    let mut p = Py {
        s: text.as_bytes(),
        i: 0,
        depth: 0,
    };
    p.ws();
    let bracketed = p.eat(b'[');
    let mut calls = Vec::new();
    loop {
        p.ws();
        if bracketed && p.eat(b']') {
            break;
        }
        if !bracketed && p.i >= p.s.len() {
            break;
        }
        calls.push(p.call()?);
        p.ws();
        if !p.eat(b',') {
            if bracketed && !p.eat(b']') {
                return None;
            }
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() || calls.is_empty() {
        return None;
    }
    Some(calls)
}

/// A small parser of Python call syntax and literals.
struct Py<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

const MAX_PY_DEPTH: usize = 64;

impl Py<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Option<String> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric()
                || matches!(self.s[self.i], b'_' | b'.' | b'-'))
        {
            self.i += 1;
        }
        if self.i == start {
            return None;
        }
        Some(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn call(&mut self) -> Option<ToolCall> {
        let name = self.ident()?;
        if !self.eat(b'(') {
            return None;
        }
        let mut args = Map::new();
        loop {
            if self.eat(b')') {
                break;
            }
            let key = self.ident()?;
            if !self.eat(b'=') {
                return None;
            }
            let v = self.value()?;
            args.insert(key, v);
            if !self.eat(b',') {
                if !self.eat(b')') {
                    return None;
                }
                break;
            }
        }
        Some(ToolCall {
            name,
            arguments: Value::Object(args).to_string(),
        })
    }

    fn value(&mut self) -> Option<Value> {
        self.ws();
        self.depth += 1;
        if self.depth > MAX_PY_DEPTH {
            return None;
        }
        let c = *self.s.get(self.i)?;
        let v = match c {
            b'"' | b'\'' => Value::String(self.string(c)?),
            b'[' | b'(' => {
                self.i += 1;
                let close = if c == b'[' { b']' } else { b')' };
                let mut items = Vec::new();
                loop {
                    if self.eat(close) {
                        break;
                    }
                    items.push(self.value()?);
                    if !self.eat(b',') {
                        if !self.eat(close) {
                            return None;
                        }
                        break;
                    }
                }
                Value::Array(items)
            }
            b'{' => {
                self.i += 1;
                let mut m = Map::new();
                loop {
                    if self.eat(b'}') {
                        break;
                    }
                    let k = match self.value()? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    if !self.eat(b':') {
                        return None;
                    }
                    let v = self.value()?;
                    m.insert(k, v);
                    if !self.eat(b',') {
                        if !self.eat(b'}') {
                            return None;
                        }
                        break;
                    }
                }
                Value::Object(m)
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_alphanumeric()
                        || matches!(self.s[self.i], b'-' | b'+' | b'.' | b'_'))
                {
                    self.i += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                match word {
                    "True" | "true" => Value::Bool(true),
                    "False" | "false" => Value::Bool(false),
                    "None" | "null" => Value::Null,
                    _ => serde_json::from_str::<serde_json::Number>(word)
                        .ok()
                        .map(Value::Number)?,
                }
            }
        };
        self.depth -= 1;
        Some(v)
    }

    fn string(&mut self, quote: u8) -> Option<String> {
        self.i += 1;
        let mut out = Vec::new();
        while self.i < self.s.len() {
            let c = self.s[self.i];
            self.i += 1;
            if c == quote {
                return String::from_utf8(out).ok();
            }
            if c == b'\\' {
                let e = *self.s.get(self.i)?;
                self.i += 1;
                match e {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'u' => {
                        let hex = std::str::from_utf8(self.s.get(self.i..self.i + 4)?).ok()?;
                        let ch = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
                        self.i += 4;
                        let mut b = [0u8; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                    }
                    other => out.push(other),
                }
            } else {
                out.push(c);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A piece of scripted model output: text, or a special token.
    #[derive(Clone, Copy)]
    enum P<'a> {
        T(&'a str),
        S(&'a str),
    }

    /// Feeds `pieces` (text split every `step` characters) and merges adjacent outputs
    /// of one kind, checking that no content ever holds a marker.
    fn run(
        format: ToolFormat,
        tools: &[Value],
        prefix: &str,
        pieces: &[P],
        step: usize,
    ) -> Vec<Out> {
        let mut p = ToolParser::new(format, tools);
        let mut outs = p.prime(prefix);
        for piece in pieces {
            match *piece {
                P::S(s) => outs.extend(p.push_special(s)),
                P::T(t) => {
                    let chars: Vec<char> = t.chars().collect();
                    for c in chars.chunks(step) {
                        let s: String = c.iter().collect();
                        let got = p.push_text(&s);
                        outs.extend(got);
                    }
                }
            }
        }
        outs.extend(p.finish());
        let mut merged: Vec<Out> = Vec::new();
        for o in outs {
            match (merged.last_mut(), o) {
                (Some(Out::Content(a)), Out::Content(b)) => a.push_str(&b),
                (Some(Out::Reasoning(a)), Out::Reasoning(b)) => a.push_str(&b),
                (_, o) => merged.push(o),
            }
        }
        merged
    }

    /// `run` at several split sizes, all giving `want`.
    fn check(format: ToolFormat, tools: &[Value], prefix: &str, pieces: &[P], want: &[Out]) {
        for step in [1, 2, 3, 7, 1000] {
            let got = run(format, tools, prefix, pieces, step);
            assert_eq!(got, want, "{format:?}, split every {step}");
        }
    }

    fn call(name: &str, args: &str) -> Out {
        let v: Value = serde_json::from_str(args).unwrap();
        Out::Call(ToolCall {
            name: name.into(),
            arguments: v.to_string(),
        })
    }

    fn content(s: &str) -> Out {
        Out::Content(s.into())
    }

    fn weather_tool() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "hourly": {"type": "boolean"}},
            }}}),
        ]
    }

    #[test]
    fn detects_formats() {
        use ToolFormat::*;
        for (t, arch, want) in [
            (
                "{{ '<|im_start|>' }}{% if tools %}<tool_call>{% endif %}",
                "qwen3",
                Hermes,
            ),
            ("<tool_call>\n<function=name>", "qwen35", QwenXml),
            (
                "<|start_header_id|>ipython {% if tools %}<|python_tag|>",
                "llama",
                Llama3Json,
            ),
            ("<|start|>{{ m }}<|channel|>", "x", Harmony),
            ("", "gpt-oss", Harmony),
            ("<|tool_call_start|>", "lfm2", Lfm2),
            ("", "lfm2moe", Lfm2),
            ("<TOOLCALL>{{ tools }}</TOOLCALL>", "nemotron_h", Nemotron),
            (
                "{% for m in messages %}{{ m.content }}{% endfor %}",
                "llama",
                Hermes,
            ),
        ] {
            assert_eq!(ToolFormat::detect(Some(t), arch), want, "{t}");
        }
    }

    #[test]
    fn hermes() {
        let f = ToolFormat::Hermes;
        let tools = weather_tool();
        check(
            f,
            &tools,
            "",
            &[P::T("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>")],
            &[content("Let me check.\n"), call("get_weather", r#"{"city":"Paris"}"#)],
        );
        // Parallel calls, a JSON array in one tag (SmolLM2), text after.
        check(
            f,
            &tools,
            "",
            &[P::T("<tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call>\n<tool_call>[{\"name\":\"b\",\"arguments\":{\"x\":1}},{\"name\":\"c\",\"parameters\":{}}]</tool_call> done")],
            &[call("a", "{}"), content("\n"), call("b", r#"{"x":1}"#), call("c", "{}"), content(" done")],
        );
        // Arguments given as a JSON string.
        check(
            f,
            &tools,
            "",
            &[P::T(
                r#"<tool_call>{"name": "f", "arguments": "{\"a\": 2}"}</tool_call>"#,
            )],
            &[call("f", r#"{"a":2}"#)],
        );
        // The marker as a special token.
        check(
            f,
            &tools,
            "",
            &[
                P::T("hi "),
                P::S("<tool_call>"),
                P::T(r#"{"name":"f","arguments":{}}"#),
                P::S("</tool_call>"),
            ],
            &[content("hi "), call("f", "{}")],
        );
        // Text that only looks like the start of a marker is content.
        check(
            f,
            &tools,
            "",
            &[P::T("a <tool b <tool_cal")],
            &[content("a <tool b <tool_cal")],
        );
        check(f, &tools, "", &[P::T("x < y")], &[content("x < y")]);
    }

    #[test]
    fn malformed_calls_are_content() {
        let tools = weather_tool();
        for (f, text) in [
            (
                ToolFormat::Hermes,
                "<tool_call>{\"name\": \"f\", \"arguments\": {</tool_call>",
            ),
            (ToolFormat::Hermes, "<tool_call>not json</tool_call>"),
            (
                ToolFormat::Hermes,
                "<tool_call>{\"arguments\": {}}</tool_call>",
            ),
            (
                ToolFormat::Hermes,
                "<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>",
            ),
            (ToolFormat::Hermes, "<tool_call>\n{\"name\": \"f\", \"argu"),
            (
                ToolFormat::QwenXml,
                "<tool_call><parameter=x>1</parameter></tool_call>",
            ),
            (
                ToolFormat::QwenXml,
                "<tool_call><function=>x</function></tool_call>",
            ),
            (ToolFormat::Nemotron, "<TOOLCALL>[{\"name\": 5}]</TOOLCALL>"),
            (ToolFormat::Llama3Json, "{\"name\": \"f\", \"parameters\": "),
            (ToolFormat::Llama3Json, "{\"not\": \"a call\"}"),
        ] {
            check(f, &tools, "", &[P::T(text)], &[content(text)]);
        }
        // LFM2's markers are special tokens; the body comes back between them as text.
        check(
            ToolFormat::Lfm2,
            &tools,
            "",
            &[
                P::S("<|tool_call_start|>"),
                P::T("[f(1)]"),
                P::S("<|tool_call_end|>"),
            ],
            &[content("<|tool_call_start|>[f(1)]<|tool_call_end|>")],
        );
    }

    #[test]
    fn unclosed_call_at_the_end() {
        // The model stopped (end of turn) before the closing tag: complete calls count.
        check(
            ToolFormat::Hermes,
            &[],
            "",
            &[P::T(
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n",
            )],
            &[call("f", r#"{"a":1}"#)],
        );
    }

    #[test]
    fn qwen_xml() {
        let tools = weather_tool();
        let text = "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=hourly>\ntrue\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=other>\n<parameter=q>\n{\"k\": [1, 2]}\n</parameter>\n<parameter=s>\nmulti\nline\n</parameter>\n</function>\n</tool_call>";
        check(
            ToolFormat::QwenXml,
            &tools,
            "",
            &[P::T(text)],
            &[
                content("I'll look.\n"),
                call(
                    "get_weather",
                    r#"{"city":"San Francisco","days":3,"hourly":true}"#,
                ),
                content("\n"),
                call("other", r#"{"q":{"k":[1,2]},"s":"multi\nline"}"#),
            ],
        );
        // A string parameter stays a string even when it looks like a number.
        check(
            ToolFormat::QwenXml,
            &tools,
            "",
            &[P::T("<tool_call><function=get_weather><parameter=city>1234</parameter></function></tool_call>")],
            &[call("get_weather", r#"{"city":"1234"}"#)],
        );
    }

    #[test]
    fn llama3_json() {
        let f = ToolFormat::Llama3Json;
        check(
            f,
            &[],
            "",
            &[P::T(
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            )],
            &[call("get_weather", r#"{"city":"Oslo"}"#)],
        );
        check(
            f,
            &[],
            "",
            &[P::S("<|python_tag|>"), P::T("{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": true}}")],
            &[call("a", "{}"), call("b", r#"{"x":true}"#)],
        );
        check(
            f,
            &[],
            "",
            &[P::T("  The answer is {42}.")],
            &[content("  The answer is {42}.")],
        );
    }

    #[test]
    fn harmony() {
        let f = ToolFormat::Harmony;
        check(
            f,
            &[],
            "",
            &[
                P::S("<|channel|>"),
                P::T("analysis"),
                P::S("<|message|>"),
                P::T("Need weather."),
                P::S("<|end|>"),
                P::S("<|start|>"),
                P::T("assistant"),
                P::S("<|channel|>"),
                P::T("commentary to=functions.get_weather "),
                P::S("<|constrain|>"),
                P::T("json"),
                P::S("<|message|>"),
                P::T("{\"city\": \"Paris\"}"),
                P::S("<|call|>"),
            ],
            &[
                Out::Reasoning("Need weather.".into()),
                call("get_weather", r#"{"city":"Paris"}"#),
            ],
        );
        // The final channel is the content; the call's recipient may precede the channel.
        check(
            f,
            &[],
            "",
            &[
                P::S("<|channel|>"),
                P::T("final"),
                P::S("<|message|>"),
                P::T("It is sunny."),
                P::S("<|return|>"),
            ],
            &[content("It is sunny.")],
        );
        check(
            f,
            &[],
            "",
            &[
                P::T(" to=functions.lookup"),
                P::S("<|channel|>"),
                P::T("commentary json"),
                P::S("<|message|>"),
                P::T("{}"),
            ],
            &[call("lookup", "{}")],
        );
        check(
            f,
            &[],
            "",
            &[
                P::S("<|channel|>"),
                P::T("commentary to=functions.f"),
                P::S("<|message|>"),
                P::T("{oops"),
            ],
            &[content("{oops")],
        );
    }

    #[test]
    fn lfm2_and_nemotron() {
        check(
            ToolFormat::Lfm2,
            &[],
            "",
            &[
                P::T("Checking. "),
                P::S("<|tool_call_start|>"),
                P::T("[get_weather(city=\"Paris\", days=3, hourly=True, tags=['a', \"b\"], opts={'x': None}), noop()]"),
                P::S("<|tool_call_end|>"),
                P::T("Done."),
            ],
            &[
                content("Checking. "),
                call("get_weather", r#"{"city":"Paris","days":3,"hourly":true,"tags":["a","b"],"opts":{"x":null}}"#),
                call("noop", "{}"),
                content("Done."),
            ],
        );
        check(
            ToolFormat::Nemotron,
            &[],
            "",
            &[P::T("<TOOLCALL>[{\"name\": \"a\", \"arguments\": {\"q\": \"x\"}}, {\"name\": \"b\", \"arguments\": {}}]</TOOLCALL>")],
            &[call("a", r#"{"q":"x"}"#), call("b", "{}")],
        );
    }

    #[test]
    fn forced_prefixes_prime_the_parser() {
        let tools = weather_tool();
        let named = ToolChoice::Named("get_weather".into());
        // Hermes, named: the model writes only the arguments (and forgets a brace).
        let prefix = ToolFormat::Hermes.forced_prefix(&named);
        check(
            ToolFormat::Hermes,
            &tools,
            &prefix,
            &[P::T("{\"city\": \"Paris\"}\n</tool_call>")],
            &[call("get_weather", r#"{"city":"Paris"}"#)],
        );
        let prefix = ToolFormat::Hermes.forced_prefix(&ToolChoice::Required);
        check(
            ToolFormat::Hermes,
            &tools,
            &prefix,
            &[P::T(
                "get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>",
            )],
            &[call("get_weather", r#"{"city":"Rome"}"#)],
        );
        let prefix = ToolFormat::QwenXml.forced_prefix(&named);
        check(
            ToolFormat::QwenXml,
            &tools,
            &prefix,
            &[P::T(
                "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>",
            )],
            &[call("get_weather", r#"{"city":"Oslo"}"#)],
        );
        let prefix = ToolFormat::Harmony.forced_prefix(&named);
        check(
            ToolFormat::Harmony,
            &tools,
            &prefix,
            &[P::T("{\"city\": \"Lima\"}")],
            &[call("get_weather", r#"{"city":"Lima"}"#)],
        );
        let prefix = ToolFormat::Llama3Json.forced_prefix(&named);
        check(
            ToolFormat::Llama3Json,
            &tools,
            &prefix,
            &[P::T("{\"city\": \"Kyiv\"}}")],
            &[call("get_weather", r#"{"city":"Kyiv"}"#)],
        );
        let prefix = ToolFormat::Lfm2.forced_prefix(&named);
        check(
            ToolFormat::Lfm2,
            &tools,
            &prefix,
            &[P::T("city=\"Baku\")]"), P::S("<|tool_call_end|>")],
            &[call("get_weather", r#"{"city":"Baku"}"#)],
        );
        assert_eq!(ToolFormat::Nemotron.forced_prefix(&ToolChoice::Auto), "");
    }

    #[test]
    fn fallback_rewrites_tool_turns() {
        let msgs = vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "Weather in Paris and Rome?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
            ]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}),
            json!({"role": "tool", "tool_call_id": "c2", "content": "rain"}),
        ];
        let tools = weather_tool();
        let out = fallback_messages(&msgs, Some(&tools));
        assert_eq!(out.len(), 4, "{out:?}");
        let sys = out[0]["content"].as_str().unwrap();
        assert!(
            sys.starts_with("Be brief.\n\n") && sys.contains("\"get_weather\""),
            "{sys}"
        );
        assert_eq!(out[1]["role"], "user");
        let a = out[2]["content"].as_str().unwrap();
        assert_eq!(a.matches("<tool_call>").count(), 2, "{a}");
        assert!(
            a.contains(r#"{"name":"get_weather","arguments":{"city":"Paris"}}"#),
            "{a}"
        );
        assert!(out[2].get("tool_calls").is_none());
        assert_eq!(out[3]["role"], "user");
        assert_eq!(
            out[3]["content"],
            "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        );
        // Without tools: only the rewriting.
        let out = fallback_messages(&msgs[1..], None);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0]["content"], "Weather in Paris and Rome?");
    }

    #[test]
    fn python_literals() {
        assert!(parse_python_calls("f(a=").is_none());
        assert!(parse_python_calls("[f(a=1)").is_none());
        assert!(parse_python_calls("f(1)").is_none());
        assert!(parse_python_calls("").is_none());
        let deep = format!("f(a={}1{})", "[".repeat(100), "]".repeat(100));
        assert!(parse_python_calls(&deep).is_none());
        let c = parse_python_calls(r#"f(s='it\'s', u="\u00e9", n=-1.5e3)"#).unwrap();
        assert_eq!(c[0].arguments, r#"{"s":"it's","u":"é","n":-1500.0}"#);
    }
}
