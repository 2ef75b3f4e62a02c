//! Reading `tokenizer.ggml.*` metadata into a [`VocabSpec`].

use caldera_format::gguf::GgufFile;

use super::{ModelSpec, TokenType, TokenizerError, VocabSpec};

const K_MODEL: &str = "tokenizer.ggml.model";
const K_PRE: &str = "tokenizer.ggml.pre";
const K_TOKENS: &str = "tokenizer.ggml.tokens";
const K_TYPES: &str = "tokenizer.ggml.token_type";
const K_SCORES: &str = "tokenizer.ggml.scores";
const K_MERGES: &str = "tokenizer.ggml.merges";

fn bad(key: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::BadMetadata {
        key: key.into(),
        reason: reason.into(),
    }
}

/// An optional token id key: absent is `None`; present must be a non-negative integer
/// (range against the vocabulary is checked later).
fn id_key(f: &GgufFile, key: &str) -> Result<Option<u32>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            // llama.cpp writes -1 (as i32 or u32::MAX) for "none" in some files.
            Some(-1) | Some(0xFFFF_FFFF) => Ok(None),
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| bad(key, format!("{x} is not a token id"))),
            None => Err(bad(key, "expected an integer token id")),
        },
    }
}

fn bool_key(f: &GgufFile, key: &str) -> Result<Option<bool>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad(key, "expected a boolean")),
    }
}

pub(crate) fn spec_from_gguf(f: &GgufFile) -> Result<VocabSpec, TokenizerError> {
    let model = match f.get(K_MODEL) {
        None => return Err(TokenizerError::MissingKey(K_MODEL.into())),
        Some(v) => v
            .as_str()
            .ok_or_else(|| bad(K_MODEL, "expected a string"))?,
    };
    let tokens: Vec<String> = f
        .get(K_TOKENS)
        .ok_or_else(|| TokenizerError::MissingKey(K_TOKENS.into()))?
        .as_str_array()
        .ok_or_else(|| bad(K_TOKENS, "expected an array of strings"))?
        .into_iter()
        .map(str::to_owned)
        .collect();
    let n = tokens.len();
    let types = match f.get(K_TYPES) {
        None => vec![TokenType::Normal; n],
        Some(v) => {
            let raw = v
                .as_i64_array()
                .ok_or_else(|| bad(K_TYPES, "expected an array of integers"))?;
            if raw.len() != n {
                return Err(bad(
                    K_TYPES,
                    format!("{} entries for {n} tokens", raw.len()),
                ));
            }
            raw.iter()
                .enumerate()
                .map(|(i, &t)| {
                    TokenType::from_gguf(t)
                        .ok_or_else(|| bad(K_TYPES, format!("token {i} has unknown type {t}")))
                })
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let pre = match f.get(K_PRE) {
        None => "default".to_owned(),
        Some(v) => v
            .as_str()
            .ok_or_else(|| bad(K_PRE, "expected a string"))?
            .to_owned(),
    };
    let (model_spec, default_bos, default_eos, default_unk, default_add_bos, default_space) = match model {
        "gpt2" => {
            let merges: Vec<String> = f
                .get(K_MERGES)
                .ok_or_else(|| TokenizerError::MissingKey(K_MERGES.into()))?
                .as_str_array()
                .ok_or_else(|| bad(K_MERGES, "expected an array of strings"))?
                .into_iter()
                .map(str::to_owned)
                .collect();
            (ModelSpec::ByteLevelBpe { merges, pre }, Some(11), Some(11), None, false, false)
        }
        "llama" => {
            let scores = match f.get(K_SCORES) {
                None => return Err(TokenizerError::MissingKey(K_SCORES.into())),
                Some(v) => v.as_f32_array().ok_or_else(|| bad(K_SCORES, "expected an array of numbers"))?,
            };
            if scores.len() != n {
                return Err(bad(K_SCORES, format!("{} entries for {n} tokens", scores.len())));
            }
            (ModelSpec::Spm { scores }, Some(1), Some(2), Some(0), true, true)
        }
        other => {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer model `{other}` ({K_MODEL}); caldera reads \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece)"
            )))
        }
    };
    let or_default =
        |v: Option<u32>, d: Option<u32>| v.or(d).filter(|&id| (id as usize) < n || v.is_some());
    let bos = or_default(id_key(f, "tokenizer.ggml.bos_token_id")?, default_bos);
    let eos = or_default(id_key(f, "tokenizer.ggml.eos_token_id")?, default_eos);
    let unk = or_default(id_key(f, "tokenizer.ggml.unknown_token_id")?, default_unk);
    let eot = id_key(f, "tokenizer.ggml.eot_token_id")?;
    let eom = id_key(f, "tokenizer.ggml.eom_token_id")?;
    let add_bos =
        bool_key(f, "tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos) && bos.is_some();
    let add_space_prefix = bool_key(f, "tokenizer.ggml.add_space_prefix")?.unwrap_or(default_space);
    Ok(VocabSpec {
        tokens,
        types,
        model: model_spec,
        bos,
        eos,
        eot,
        eom,
        unk,
        add_bos,
        add_space_prefix,
    })
}
