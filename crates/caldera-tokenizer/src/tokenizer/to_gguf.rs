//! A Hugging Face `tokenizer.json` (with `tokenizer_config.json`) as the `tokenizer.ggml.*`
//! metadata of a GGUF file.
//!
//! The keys are those llama.cpp's converter writes, chosen so that
//! [`Tokenizer::from_gguf`](super::Tokenizer::from_gguf) over them encodes as
//! [`Tokenizer::from_hf_json`](super::Tokenizer::from_hf_json) does over the source file.
//! Two shapes convert:
//! - **byte-level BPE** → `model = "gpt2"`; `pre` is the llama.cpp pre-tokenizer whose split
//!   patterns (and `ignore_merges`) equal the file's; merges as `"left right"` strings. An
//!   `NFC` normalizer is accepted and dropped (llama.cpp normalizes nothing), so the two
//!   tokenizers agree on NFC text.
//! - **SentencePiece-converted BPE** (`byte_fallback`, spaces replaced by `▁`) →
//!   `model = "llama"` with `scores`. The token that merge rank `r` makes first scores `-r`;
//!   every other token scores below all merges. Merging by score then follows merge-rank
//!   order, and differs from BPE only where two adjacent pieces join into a vocabulary entry
//!   that no listed merge of exactly that pair makes (files converted from a SentencePiece
//!   model list every such merge). llama.cpp's own converter writes `-1000` for every
//!   score instead. A `Metaspace` pre-tokenizer that prepends becomes
//!   `add_space_prefix = true`, which always puts `▁` in front of a text span, where
//!   Metaspace skips spans that already start with a space and, with `prepend_scheme =
//!   "first"`, spans after a special token; its `split` (at each `▁`) is not kept.
//!
//! Token ids that the file leaves unused become `"[PAD{id}]"` of type unused (5).

use std::collections::HashMap;

use caldera_format::gguf::{GgufValue, GgufValueType};
use serde_json::Value;

use super::pretok::{self, PreTokenizer};
use super::{hf_json, TokenEntry, TokenType, TokenizerError};

use hf_json::{config_token, type_of, unsupported};

/// The `tokenizer.ggml.token_type` number of a token type.
fn gguf_token_type(t: TokenType) -> i32 {
    match t {
        TokenType::Normal => 1,
        TokenType::Unknown => 2,
        TokenType::Control => 3,
        TokenType::UserDefined => 4,
        TokenType::Unused => 5,
        TokenType::Byte => 6,
    }
}

/// Builds the `tokenizer.ggml.*` (and `tokenizer.chat_template*`) metadata for a BPE
/// `tokenizer.json`; `tokenizer_config` supplies `bos_token`, `eos_token`, `unk_token`,
/// `pad_token`, `add_bos_token`, `add_eos_token` and `chat_template` (a string, or a list of
/// `{name, template}` where `"default"` becomes `tokenizer.chat_template` and the others
/// `tokenizer.chat_template.{name}`, listed in `tokenizer.chat_templates`).
///
/// Errors name what has no GGUF equivalent: other model types (Unigram, WordPiece,
/// WordLevel), pre-tokenizer patterns llama.cpp does not know, normalizers other than NFC
/// (byte-level) or the `▁` rewrites (SentencePiece style).
pub fn gguf_metadata_from_hf(
    tokenizer_json: &str,
    tokenizer_config: Option<&Value>,
) -> Result<Vec<(String, GgufValue)>, TokenizerError> {
    let root: Value =
        serde_json::from_str(tokenizer_json).map_err(|e| TokenizerError::Json(e.to_string()))?;
    let model = root
        .get("model")
        .ok_or_else(|| TokenizerError::Json("no `model` section".into()))?;
    let mtype = type_of(model);
    if !(mtype == "BPE" || (mtype.is_empty() && model.get("merges").is_some())) {
        return Err(unsupported(format!(
            "tokenizer.json model type `{mtype}`; only BPE models convert to GGUF"
        )));
    }
    // Validates the whole file the way loading it does, and gives the vocabulary, token
    // types and special ids exactly as `Tokenizer::from_hf_json` sees them.
    let parts = hf_json::parts_from_hf_json(tokenizer_json, tokenizer_config)?;
    let pre = root.get("pre_tokenizer").filter(|v| !v.is_null());
    let decoder = root.get("decoder").filter(|v| !v.is_null());
    let byte_level = contains_type(pre, "ByteLevel") || contains_type(decoder, "ByteLevel");
    let merges = parse_merges(model)?;

    let tokens: Vec<String> = parts
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.kind == TokenType::Unused && t.text.is_empty() {
                format!("[PAD{i}]")
            } else {
                t.text.clone()
            }
        })
        .collect();
    let types: Vec<i32> = parts
        .tokens
        .iter()
        .map(|t| gguf_token_type(t.kind))
        .collect();

    let mut out: Vec<(String, GgufValue)> = Vec::new();
    let mut put = |k: &str, v: GgufValue| out.push((k.to_owned(), v));
    if byte_level {
        let ignore_merges = model
            .get("ignore_merges")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let name = byte_level_pre_name(&root, pre, ignore_merges)?;
        let merge_strings = merges
            .iter()
            .map(|(a, b)| merge_string(a, b))
            .collect::<Result<Vec<_>, _>>()?;
        put("tokenizer.ggml.model", GgufValue::string("gpt2"));
        put("tokenizer.ggml.pre", GgufValue::string(name));
        put("tokenizer.ggml.tokens", GgufValue::str_array(&tokens));
        put("tokenizer.ggml.token_type", GgufValue::i32_array(&types));
        put(
            "tokenizer.ggml.merges",
            GgufValue::str_array(&merge_strings),
        );
    } else {
        let space_prefix = spm_space_prefix(&root, model, pre)?;
        let scores = spm_scores(&parts.tokens, &merges)?;
        put("tokenizer.ggml.model", GgufValue::string("llama"));
        put("tokenizer.ggml.pre", GgufValue::string("default"));
        put("tokenizer.ggml.tokens", GgufValue::str_array(&tokens));
        put("tokenizer.ggml.scores", GgufValue::f32_array(&scores));
        put("tokenizer.ggml.token_type", GgufValue::i32_array(&types));
        put(
            "tokenizer.ggml.add_space_prefix",
            GgufValue::Bool(space_prefix),
        );
    }

    let find = |text: &str| {
        tokens
            .iter()
            .position(|t| t == text)
            .and_then(|i| u32::try_from(i).ok())
    };
    let cfg_token = |key: &str| {
        tokenizer_config
            .and_then(|c| config_token(c.get(key)))
            .and_then(find)
    };
    let unk = parts.unk.or_else(|| cfg_token("unk_token"));
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", parts.bos),
        ("tokenizer.ggml.eos_token_id", parts.eos),
        ("tokenizer.ggml.unknown_token_id", unk),
        ("tokenizer.ggml.padding_token_id", cfg_token("pad_token")),
    ] {
        if let Some(id) = id {
            put(key, GgufValue::U32(id));
        }
    }
    let add_eos = match tokenizer_config
        .and_then(|c| c.get("add_eos_token"))
        .and_then(Value::as_bool)
    {
        Some(b) => b && parts.eos.is_some(),
        None => root
            .get("post_processor")
            .is_some_and(template_ends_with_special),
    };
    put(
        "tokenizer.ggml.add_bos_token",
        GgufValue::Bool(parts.add_bos),
    );
    put("tokenizer.ggml.add_eos_token", GgufValue::Bool(add_eos));
    if let Some(t) = tokenizer_config.and_then(|c| c.get("chat_template")) {
        chat_template_keys(t, &mut put)?;
    }
    Ok(out)
}

/// Whether `v` is, or is a sequence containing, a component of type `ty`.
fn contains_type(v: Option<&Value>, ty: &str) -> bool {
    let Some(v) = v else { return false };
    if type_of(v) == ty {
        return true;
    }
    ["pretokenizers", "decoders", "normalizers", "processors"]
        .iter()
        .filter_map(|k| v.get(*k).and_then(Value::as_array))
        .flatten()
        .any(|c| contains_type(Some(c), ty))
}

/// `model.merges` as (left, right) pairs: `"a b"` strings split at the first space after
/// the first character, or `["a", "b"]` pairs.
fn parse_merges(model: &Value) -> Result<Vec<(String, String)>, TokenizerError> {
    let list = match model.get("merges") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(TokenizerError::Json("model.merges is not an array".into())),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                Value::String(s) => {
                    let first = s.chars().next().map_or(0, char::len_utf8);
                    s[first..]
                        .find(' ')
                        .map(|j| (&s[..first + j], &s[first + j + 1..]))
                }
                Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => None,
                },
                _ => None,
            };
            match pair {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
                _ => Err(TokenizerError::InvalidVocab(format!(
                    "merge {i} ({m}) is not a pair of tokens"
                ))),
            }
        })
        .collect()
}

/// `"a b"`, refused where reading it back (split at the first space after the first
/// character) would give another pair.
fn merge_string(a: &str, b: &str) -> Result<String, TokenizerError> {
    let first = a.chars().next().map_or(0, char::len_utf8);
    if a[first..].contains(' ') {
        return Err(TokenizerError::InvalidVocab(format!(
            "merge ({a:?}, {b:?}) cannot be written as a GGUF \"left right\" string"
        )));
    }
    Ok(format!("{a} {b}"))
}

/// A regex with the case-insensitive contraction group written out by case, the form
/// llama.cpp (and `pretok`) use.
fn canonical_regex(r: &str) -> String {
    r.replace(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
    )
}

/// llama.cpp pre-tokenizer names: the isolated splits applied in order (canonical regexes,
/// those of [`PreTokenizer::for_gguf_pre`]) and whether merges are skipped for words in the
/// vocabulary. The first entry that fits is written.
const PRE_NAMES: &[(&str, &[&str], bool)] = &[
    ("gpt2", &[pretok::GPT2], false),
    ("llama-bpe", &[pretok::LLAMA3], true),
    ("smaug-bpe", &[pretok::LLAMA3], false),
    ("qwen2", &[pretok::QWEN2], false),
    ("qwen35", &[pretok::QWEN35], false),
    ("gpt-4o", &[pretok::GPT4O], false),
    ("smollm", &[r"\p{N}", pretok::GPT2], false),
    (
        "default",
        &[
            r"[\p{P}\$\+<=>\^~\|]+",
            pretok::GPT2,
            r"\p{N}+",
            "[0-9][0-9][0-9]",
        ],
        false,
    ),
];

/// The `tokenizer.ggml.pre` name for a byte-level file's pre-tokenizer.
fn byte_level_pre_name(
    root: &Value,
    pre: Option<&Value>,
    ignore_merges: bool,
) -> Result<&'static str, TokenizerError> {
    if let Some(n) = root.get("normalizer").filter(|v| !v.is_null()) {
        check_byte_level_normalizer(n)?;
    }
    let mut splits = Vec::new();
    let mut byte_level = false;
    if let Some(p) = pre {
        collect_splits(p, &mut splits, &mut byte_level)?;
    }
    if !byte_level {
        return Err(unsupported(
            "a byte-level decoder without a ByteLevel pre-tokenizer has no GGUF equivalent",
        ));
    }
    let same = |pats: &[&str]| {
        pats.len() == splits.len()
            && pats
                .iter()
                .zip(&splits)
                .all(|(p, s)| canonical_regex(p) == *s)
    };
    let mut pattern_match = None;
    for &(name, pats, ignores) in PRE_NAMES {
        if same(pats) {
            if ignores == ignore_merges {
                // llama.cpp spells GPT-2's split `gpt-2`; written so where our loader reads it.
                if name == "gpt2" && PreTokenizer::for_gguf_pre("gpt-2").is_ok() {
                    return Ok("gpt-2");
                }
                return Ok(name);
            }
            pattern_match.get_or_insert(name);
        }
    }
    Err(unsupported(match pattern_match {
        Some(name) => format!(
            "the pre-tokenizer splits as llama.cpp's `{name}`, but tokenizer.json sets \
             ignore_merges = {ignore_merges}, which `{name}` does not"
        ),
        None => format!(
            "byte-level pre-tokenizer splits [{}] match no llama.cpp pre-tokenizer",
            splits
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }))
}

fn check_byte_level_normalizer(n: &Value) -> Result<(), TokenizerError> {
    match type_of(n) {
        "NFC" => Ok(()),
        "Sequence" => n
            .get("normalizers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .try_for_each(check_byte_level_normalizer),
        other => Err(unsupported(format!(
            "tokenizer.json normalizer `{other}` on a byte-level tokenizer (llama.cpp applies none)"
        ))),
    }
}

/// Flattens a byte-level pre-tokenizer into isolated split regexes (canonical form).
/// `ByteLevel` must come last; its own regex (`use_regex`) is GPT-2's.
fn collect_splits(
    v: &Value,
    out: &mut Vec<String>,
    byte_level: &mut bool,
) -> Result<(), TokenizerError> {
    let ty = type_of(v);
    if *byte_level && ty != "Sequence" {
        return Err(unsupported(format!(
            "tokenizer.json pre-tokenizer `{ty}` after ByteLevel"
        )));
    }
    match ty {
        "Sequence" => {
            for c in v
                .get("pretokenizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                collect_splits(c, out, byte_level)?;
            }
        }
        "ByteLevel" => {
            if v.get("add_prefix_space")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                return Err(unsupported(
                    "ByteLevel pre-tokenizer with add_prefix_space (no llama.cpp pre-tokenizer adds a space)",
                ));
            }
            if v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) {
                out.push(canonical_regex(pretok::GPT2));
            }
            *byte_level = true;
        }
        "Split" => {
            if v.get("invert").and_then(Value::as_bool).unwrap_or(false) {
                return Err(unsupported("tokenizer.json Split with invert = true"));
            }
            let behavior = v
                .get("behavior")
                .and_then(Value::as_str)
                .unwrap_or("Isolated");
            if behavior != "Isolated" {
                return Err(unsupported(format!(
                    "tokenizer.json Split with behavior `{behavior}` (llama.cpp isolates matches)"
                )));
            }
            let pattern = v.get("pattern").unwrap_or(&Value::Null);
            match (
                pattern.get("Regex").and_then(Value::as_str),
                pattern.get("String").and_then(Value::as_str),
            ) {
                (Some(r), _) => out.push(canonical_regex(r)),
                (None, Some(s)) => {
                    return Err(unsupported(format!(
                        "tokenizer.json Split on the literal {s:?} in a byte-level tokenizer"
                    )))
                }
                (None, None) => {
                    return Err(TokenizerError::Json(format!(
                        "unreadable pattern {pattern}"
                    )))
                }
            }
        }
        "Digits" => {
            let single = v
                .get("individual_digits")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            out.push(if single { r"\p{N}" } else { r"\p{N}+" }.to_owned());
        }
        other => {
            return Err(unsupported(format!(
                "tokenizer.json pre-tokenizer `{other}` has no llama.cpp equivalent"
            )))
        }
    }
    Ok(())
}

/// For a SentencePiece-style file: checks that spaces become `▁` and nothing else rewrites
/// the text, and returns whether a `▁` is put in front (`add_space_prefix`).
fn spm_space_prefix(
    root: &Value,
    model: &Value,
    pre: Option<&Value>,
) -> Result<bool, TokenizerError> {
    if !model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Err(unsupported(
            "BPE without ByteLevel or byte_fallback; only byte-level and SentencePiece-style \
             (byte fallback) BPE convert to GGUF",
        ));
    }
    let mut replace = false;
    let mut prefix = false;
    if let Some(n) = root.get("normalizer").filter(|v| !v.is_null()) {
        spm_normalizer(n, &mut replace, &mut prefix)?;
    }
    if let Some(p) = pre {
        spm_pretok(p, &mut replace, &mut prefix)?;
    }
    if !replace {
        return Err(unsupported(
            "a non-byte-level BPE tokenizer that does not turn spaces into ▁ (SentencePiece \
             style) has no GGUF equivalent",
        ));
    }
    Ok(prefix)
}

fn spm_normalizer(n: &Value, replace: &mut bool, prefix: &mut bool) -> Result<(), TokenizerError> {
    match type_of(n) {
        "Sequence" => {
            for c in n
                .get("normalizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                spm_normalizer(c, replace, prefix)?;
            }
        }
        "Prepend" if n.get("prepend").and_then(Value::as_str) == Some("\u{2581}") => {
            *prefix = true;
        }
        "Replace"
            if n.get("pattern")
                .and_then(|p| p.get("String"))
                .and_then(Value::as_str)
                == Some(" ")
                && n.get("content").and_then(Value::as_str) == Some("\u{2581}") =>
        {
            *replace = true;
        }
        other => {
            return Err(unsupported(format!(
                "tokenizer.json normalizer `{other}` ({n}) in a SentencePiece-style tokenizer; \
                 only Prepend(▁) and Replace(' ' → ▁) convert to GGUF"
            )))
        }
    }
    Ok(())
}

fn spm_pretok(p: &Value, replace: &mut bool, prefix: &mut bool) -> Result<(), TokenizerError> {
    match type_of(p) {
        "Sequence" => {
            for c in p
                .get("pretokenizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                spm_pretok(c, replace, prefix)?;
            }
        }
        "Metaspace" => {
            let repl = p
                .get("replacement")
                .and_then(Value::as_str)
                .unwrap_or("\u{2581}");
            if repl != "\u{2581}" {
                return Err(unsupported(format!(
                    "Metaspace pre-tokenizer with replacement {repl:?}"
                )));
            }
            *replace = true;
            let adds = match p.get("prepend_scheme").and_then(Value::as_str) {
                Some(s) => s != "never",
                None => p
                    .get("add_prefix_space")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            };
            *prefix |= adds;
        }
        // Splitting at spaces once they are all `▁` splits nothing.
        "Split"
            if *replace
                && p.get("pattern")
                    .and_then(|v| v.get("String"))
                    .and_then(Value::as_str)
                    == Some(" ") => {}
        other => {
            return Err(unsupported(format!(
                "tokenizer.json pre-tokenizer `{other}` ({p}) in a SentencePiece-style tokenizer"
            )))
        }
    }
    Ok(())
}

/// Scores for merging by score in merge-rank order: the token first made by merge rank `r`
/// scores `-r`; all other tokens score `-(merges + 1)`. Ranks must stay exact in `f32`.
fn spm_scores(
    tokens: &[TokenEntry],
    merges: &[(String, String)],
) -> Result<Vec<f32>, TokenizerError> {
    const F32_EXACT: usize = 1 << 24;
    if merges.len() >= F32_EXACT {
        return Err(TokenizerError::InvalidVocab(format!(
            "{} merges are too many to rank exactly in f32 scores",
            merges.len()
        )));
    }
    let mut by_text: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if !(t.kind == TokenType::Unused && t.text.is_empty()) {
            by_text.entry(t.text.as_str()).or_insert(i);
        }
    }
    let floor = -(merges.len() as f32) - 1.0;
    let mut scores = vec![floor; tokens.len()];
    let mut made = vec![false; tokens.len()];
    let mut joined = String::new();
    for (rank, (a, b)) in merges.iter().enumerate() {
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        if let Some(&id) = by_text.get(joined.as_str()) {
            if !made[id] {
                made[id] = true;
                scores[id] = -(rank as f32);
            }
        }
    }
    Ok(scores)
}

/// Whether a `TemplateProcessing` post-processor ends its `single` template with a special
/// token (an EOS the tokenizer appends).
fn template_ends_with_special(pp: &Value) -> bool {
    match type_of(pp) {
        "TemplateProcessing" => pp
            .get("single")
            .and_then(Value::as_array)
            .and_then(|a| a.last())
            .is_some_and(|last| last.get("SpecialToken").is_some()),
        "Sequence" => pp
            .get("processors")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(template_ends_with_special)),
        _ => false,
    }
}

/// `tokenizer.chat_template` keys from tokenizer_config.json's `chat_template`.
fn chat_template_keys(
    t: &Value,
    put: &mut impl FnMut(&str, GgufValue),
) -> Result<(), TokenizerError> {
    let bad = |reason: String| TokenizerError::BadMetadata {
        key: "chat_template".into(),
        reason,
    };
    match t {
        Value::Null => {}
        Value::String(s) => put("tokenizer.chat_template", GgufValue::string(s.as_str())),
        Value::Array(list) => {
            let mut default = None;
            let mut names = Vec::new();
            for (i, e) in list.iter().enumerate() {
                let (Some(name), Some(template)) = (
                    e.get("name").and_then(Value::as_str),
                    e.get("template").and_then(Value::as_str),
                ) else {
                    return Err(bad(format!(
                        "entry {i} is not a {{\"name\", \"template\"}} object"
                    )));
                };
                // Key-safe name: ASCII letters and digits, anything else `_`.
                let name: String = name
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                if name == "default" {
                    default = Some(template);
                } else {
                    put(
                        &format!("tokenizer.chat_template.{name}"),
                        GgufValue::string(template),
                    );
                    names.push(name);
                }
            }
            if !names.is_empty() {
                put(
                    "tokenizer.chat_templates",
                    GgufValue::array(
                        GgufValueType::String,
                        names.into_iter().map(GgufValue::String).collect(),
                    ),
                );
            }
            if let Some(d) = default {
                put("tokenizer.chat_template", GgufValue::string(d));
            }
        }
        other => {
            return Err(bad(format!(
                "expected a string or a list of templates, found {other}"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each name in [`PRE_NAMES`] splits as the loader's pre-tokenizer of that name and
    /// agrees with it on `ignore_merges`.
    #[test]
    fn pre_names_match_the_loader() {
        let text =
            "Hello, world! I'll   pay $1234.50 (or 7 EUR) naïve ﬁ 日本語\n\n\tx  y\r\nz ǅa's DON'T";
        for &(name, pats, ignores) in PRE_NAMES {
            let loader = PreTokenizer::for_gguf_pre(name).expect(name);
            let ours = PreTokenizer {
                steps: pats
                    .iter()
                    .map(|p| pretok::PreStep::Split {
                        pattern: pretok::compile(p).expect("pattern"),
                        behavior: pretok::Behavior::Isolated,
                    })
                    .collect(),
            };
            assert_eq!(
                loader.split(text).unwrap(),
                ours.split(text).unwrap(),
                "{name}"
            );
            assert_eq!(pretok::gguf_pre_ignores_merges(name), ignores, "{name}");
        }
    }

    #[test]
    fn canonical_regex_expands_contractions() {
        let hf = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        assert_eq!(canonical_regex(hf), pretok::LLAMA3);
    }
}
