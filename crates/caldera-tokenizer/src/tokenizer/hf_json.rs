//! Hugging Face `tokenizer.json` (model type BPE) into tokenizer parts.
//!
//! Supported: byte-level BPE (`ByteLevel` pre-tokenizer or decoder, optionally after
//! `Split` regexes and `Digits`) and SentencePiece-converted BPE (`byte_fallback`, `▁` for
//! space through a `Replace`/`Prepend` normalizer or a `Metaspace` pre-tokenizer). Other
//! models and components are refused with an error naming them.

use serde_json::Value;

use super::bpe::{Bpe, BpeOptions};
use super::pretok::{
    self, Behavior, NormOp, Normalizer, Pattern, PreStep, PreTokenizer, PrependScheme,
};
use super::{build_piece, parse_byte_token, Model, Parts, TokenEntry, TokenType, TokenizerError};

/// Ids may leave gaps (filled with unused entries), but not more than this many.
const MAX_ID_GAP: usize = 1 << 16;

pub(super) fn unsupported(what: impl Into<String>) -> TokenizerError {
    TokenizerError::Unsupported(what.into())
}

pub(super) fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("")
}

/// A token named in tokenizer_config.json: a string or `{"content": ...}`.
pub(super) fn config_token(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

pub(crate) fn parts_from_hf_json(
    json: &str,
    config: Option<&Value>,
) -> Result<Parts, TokenizerError> {
    let root: Value =
        serde_json::from_str(json).map_err(|e| TokenizerError::Json(e.to_string()))?;
    let model = root
        .get("model")
        .ok_or_else(|| TokenizerError::Json("no `model` section".into()))?;
    let mtype = type_of(model);
    if !(mtype == "BPE" || (mtype.is_empty() && model.get("merges").is_some())) {
        return Err(unsupported(format!(
            "tokenizer.json model type `{mtype}`; caldera reads BPE models only"
        )));
    }

    // Vocabulary: model.vocab plus added_tokens.
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| TokenizerError::Json("model.vocab is not an object".into()))?;
    let mut entries: Vec<(usize, String, TokenType)> = Vec::with_capacity(vocab.len() + 64);
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| {
                TokenizerError::InvalidVocab(format!("token {text:?} has a non-integer id"))
            })?;
        entries.push((id, text.clone(), TokenType::Normal));
    }
    let mut added: Vec<(usize, String, TokenType)> = Vec::new();
    if let Some(list) = root.get("added_tokens").and_then(Value::as_array) {
        for t in list {
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|i| usize::try_from(i).ok());
            let content = t.get("content").and_then(Value::as_str);
            let (Some(id), Some(content)) = (id, content) else {
                return Err(TokenizerError::InvalidVocab(format!(
                    "malformed added token {t}"
                )));
            };
            let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
            let kind = if special {
                TokenType::Control
            } else {
                TokenType::UserDefined
            };
            added.push((id, content.to_owned(), kind));
        }
    }
    let count = entries.len() + added.len();
    let n = entries
        .iter()
        .chain(&added)
        .map(|e| e.0)
        .max()
        .map_or(0, |m| m + 1);
    if n == 0 {
        return Err(TokenizerError::InvalidVocab(
            "the vocabulary is empty".into(),
        ));
    }
    if n > count.saturating_add(MAX_ID_GAP) || u32::try_from(n).is_err() {
        return Err(TokenizerError::InvalidVocab(format!(
            "token ids reach {} but only {count} tokens are defined",
            n - 1
        )));
    }
    let mut slots: Vec<Option<(String, TokenType)>> = vec![None; n];
    for (id, text, kind) in entries {
        if slots[id].is_some() {
            return Err(TokenizerError::InvalidVocab(format!(
                "token id {id} is used twice"
            )));
        }
        slots[id] = Some((text, kind));
    }
    // Added tokens override the model's entry of the same id (usually the same text).
    for (id, text, kind) in added {
        slots[id] = Some((text, kind));
    }

    let pre = root.get("pre_tokenizer").filter(|v| !v.is_null());
    let decoder = root.get("decoder").filter(|v| !v.is_null());
    let byte_level = contains_type(pre, "ByteLevel") || contains_type(decoder, "ByteLevel");
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ignore_merges = model
        .get("ignore_merges")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let mut tokens = Vec::with_capacity(n);
    for (id, slot) in slots.into_iter().enumerate() {
        let (text, mut kind) = slot.unwrap_or((String::new(), TokenType::Unused));
        if kind == TokenType::Normal && !byte_level && parse_byte_token(&text).is_some() {
            kind = TokenType::Byte;
        }
        let piece = build_piece(&text, kind, byte_level)
            .map_err(|e| TokenizerError::InvalidVocab(format!("token {id} ({text:?}): {e}")))?;
        tokens.push(TokenEntry {
            text,
            kind,
            score: 0.0,
            piece,
        });
    }

    let mut normalizer = Normalizer::default();
    if let Some(nv) = root.get("normalizer").filter(|v| !v.is_null()) {
        parse_normalizer(nv, &mut normalizer)?;
    }
    let mut pretok = PreTokenizer::default();
    if let Some(p) = pre {
        parse_pretok(p, &mut normalizer, &mut pretok)?;
    }
    let strip_leading_space = !byte_level && decoder_strips_space(decoder);

    // Merges: "a b" strings or ["a", "b"] pairs.
    let merges = match model.get("merges") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(TokenizerError::Json("model.merges is not an array".into())),
    };
    let pairs = merges.iter().map(|m| match m {
        Value::String(s) => {
            let first = s.chars().next().map_or(0, char::len_utf8);
            match s[first..].find(' ') {
                Some(i) => (&s[..first + i], Some(&s[first + i + 1..])),
                None => (s.as_str(), None),
            }
        }
        Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
            (Some(a), Some(b)) => (a, Some(b)),
            _ => ("", None),
        },
        _ => ("", None),
    });
    let bpe = Bpe::from_pairs(
        &tokens,
        pairs,
        merges.len(),
        BpeOptions {
            byte_level,
            byte_fallback,
            ignore_merges,
            normalizer,
            pretok,
        },
    )?;

    let find = |text: &str| tokens.iter().position(|t| t.text == text).map(|i| i as u32);
    let unk = model
        .get("unk_token")
        .and_then(Value::as_str)
        .and_then(find);

    // BOS from the post-processor template; config overrides.
    let mut post_bos = None;
    if let Some(pp) = root.get("post_processor").filter(|v| !v.is_null()) {
        post_bos = template_leading_special(pp, &find);
    }
    let cfg_bos = config
        .and_then(|c| config_token(c.get("bos_token")))
        .and_then(find);
    let cfg_eos = config
        .and_then(|c| config_token(c.get("eos_token")))
        .and_then(find);
    let cfg_add_bos = config
        .and_then(|c| c.get("add_bos_token"))
        .and_then(Value::as_bool);
    let bos = cfg_bos.or(post_bos);
    let add_bos = match cfg_add_bos {
        Some(b) => b && bos.is_some(),
        None => post_bos.is_some(),
    };
    Ok(Parts {
        tokens,
        model: Model::Bpe(Box::new(bpe)),
        bos,
        eos: cfg_eos,
        extra_eog: Vec::new(),
        unk,
        add_bos,
        strip_leading_space,
    })
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

fn decoder_strips_space(d: Option<&Value>) -> bool {
    let Some(d) = d else { return false };
    match type_of(d) {
        "Strip" => {
            d.get("content").and_then(Value::as_str) == Some(" ")
                && d.get("start").and_then(Value::as_u64).unwrap_or(0) >= 1
        }
        "Metaspace" => match d.get("prepend_scheme").and_then(Value::as_str) {
            Some(s) => s != "never",
            None => d
                .get("add_prefix_space")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        },
        "Sequence" => d
            .get("decoders")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| decoder_strips_space(Some(x)))),
        _ => false,
    }
}

fn string_pattern(v: &Value) -> Result<Pattern, TokenizerError> {
    if let Some(s) = v.get("String").and_then(Value::as_str) {
        return Ok(Pattern::Literal(s.to_owned()));
    }
    if let Some(r) = v.get("Regex").and_then(Value::as_str) {
        return pretok::compile(r);
    }
    Err(TokenizerError::Json(format!("unreadable pattern {v}")))
}

fn parse_normalizer(v: &Value, n: &mut Normalizer) -> Result<(), TokenizerError> {
    match type_of(v) {
        "Sequence" => {
            for c in v
                .get("normalizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                parse_normalizer(c, n)?;
            }
        }
        "NFC" => n.ops.push(NormOp::Nfc),
        "NFD" => n.ops.push(NormOp::Nfd),
        "NFKC" => n.ops.push(NormOp::Nfkc),
        "NFKD" => n.ops.push(NormOp::Nfkd),
        "Lowercase" => n.ops.push(NormOp::Lowercase),
        "Prepend" => {
            let p = v.get("prepend").and_then(Value::as_str).unwrap_or("");
            n.ops.push(NormOp::Prepend(p.to_owned()));
        }
        "Replace" => {
            let content = v
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            match v.get("pattern").map(string_pattern).transpose()? {
                Some(Pattern::Literal(s)) => n.ops.push(NormOp::Replace(s, content)),
                _ => {
                    return Err(unsupported(
                        "tokenizer.json normalizer Replace with a regex pattern",
                    ))
                }
            }
        }
        other => return Err(unsupported(format!("tokenizer.json normalizer `{other}`"))),
    }
    Ok(())
}

fn parse_behavior(v: &Value) -> Result<Behavior, TokenizerError> {
    Ok(
        match v
            .get("behavior")
            .and_then(Value::as_str)
            .unwrap_or("Isolated")
        {
            "Isolated" => Behavior::Isolated,
            "Removed" => Behavior::Removed,
            "MergedWithPrevious" => Behavior::MergedWithPrevious,
            "MergedWithNext" => Behavior::MergedWithNext,
            "Contiguous" => Behavior::Contiguous,
            other => {
                return Err(unsupported(format!(
                    "tokenizer.json split behavior `{other}`"
                )))
            }
        },
    )
}

fn parse_pretok(v: &Value, n: &mut Normalizer, p: &mut PreTokenizer) -> Result<(), TokenizerError> {
    match type_of(v) {
        "Sequence" => {
            for c in v
                .get("pretokenizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                parse_pretok(c, n, p)?;
            }
        }
        "ByteLevel" => {
            if v.get("add_prefix_space")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                n.ops.push(NormOp::PrefixUnlessPresent(
                    " ".into(),
                    PrependScheme::Always,
                ));
            }
            if v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) {
                p.steps.push(PreStep::Split {
                    pattern: pretok::compile(pretok::GPT2)?,
                    behavior: Behavior::Isolated,
                });
            }
        }
        "Split" => {
            if v.get("invert").and_then(Value::as_bool).unwrap_or(false) {
                return Err(unsupported("tokenizer.json Split with invert = true"));
            }
            let pattern = string_pattern(v.get("pattern").unwrap_or(&Value::Null))?;
            p.steps.push(PreStep::Split {
                pattern,
                behavior: parse_behavior(v)?,
            });
        }
        "Digits" => {
            let single = v
                .get("individual_digits")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let re = if single { r"\p{N}" } else { r"\p{N}+" };
            p.steps.push(PreStep::Split {
                pattern: pretok::compile(re)?,
                behavior: Behavior::Isolated,
            });
        }
        "Metaspace" => {
            let repl = v
                .get("replacement")
                .and_then(Value::as_str)
                .unwrap_or("\u{2581}")
                .to_owned();
            let scheme = match v.get("prepend_scheme").and_then(Value::as_str) {
                Some("always") => Some(PrependScheme::Always),
                Some("first") => Some(PrependScheme::First),
                Some(_) => None,
                None => v
                    .get("add_prefix_space")
                    .and_then(Value::as_bool)
                    .unwrap_or(true)
                    .then_some(PrependScheme::Always),
            };
            n.ops.push(NormOp::Replace(" ".into(), repl.clone()));
            if let Some(s) = scheme {
                n.ops.push(NormOp::PrefixUnlessPresent(repl.clone(), s));
            }
            if v.get("split").and_then(Value::as_bool).unwrap_or(true) {
                p.steps.push(PreStep::Split {
                    pattern: Pattern::Literal(repl),
                    behavior: Behavior::MergedWithNext,
                });
            }
        }
        other => {
            return Err(unsupported(format!(
                "tokenizer.json pre-tokenizer `{other}`"
            )))
        }
    }
    Ok(())
}

/// BOS added by a `TemplateProcessing` post-processor: the id of the special token that
/// starts its `single` template, if any.
fn template_leading_special(pp: &Value, find: &dyn Fn(&str) -> Option<u32>) -> Option<u32> {
    match type_of(pp) {
        "TemplateProcessing" => {
            let first = pp.get("single")?.as_array()?.first()?;
            let name = first.get("SpecialToken")?.get("id")?.as_str()?;
            let by_map = pp
                .get("special_tokens")
                .and_then(|m| m.get(name))
                .and_then(|t| t.get("ids"))
                .and_then(Value::as_array)
                .and_then(|ids| ids.first())
                .and_then(Value::as_u64)
                .and_then(|i| u32::try_from(i).ok());
            by_map.or_else(|| find(name))
        }
        "Sequence" => pp
            .get("processors")?
            .as_array()?
            .iter()
            .find_map(|c| template_leading_special(c, find)),
        _ => None,
    }
}
