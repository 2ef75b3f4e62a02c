//! Text to token ids and back.
//!
//! Two model families are supported:
//! - **BPE** (merge ranks): byte-level (GPT-2 byte↔unicode alphabet, `tokenizer.ggml.model =
//!   "gpt2"` or a tokenizer.json with a `ByteLevel` pre-tokenizer), or over characters with
//!   byte fallback (SentencePiece converted to tokenizer.json, `▁` for space).
//! - **SentencePiece-style score merging** (`tokenizer.ggml.model = "llama"`): the adjacent pair
//!   whose concatenation is the vocabulary entry with the highest score is merged until none
//!   is left; characters outside the vocabulary become `<0xNN>` byte tokens.
//!
//! Encoding first cuts the text at special tokens (user-defined tokens always, control tokens
//! only when `parse_special`), longest token first; each remaining span of plain text goes
//! through the model. Decoding concatenates each token's bytes and converts to UTF-8 once, at
//! the end (invalid sequences become U+FFFD).

mod bpe;
mod gguf_load;
mod hf_json;
mod pretok;
mod special;
mod spm;
mod stream;
mod to_gguf;

use std::collections::HashMap;

pub use stream::StreamDecoder;
pub use to_gguf::gguf_metadata_from_hf;

use bpe::Bpe;
use special::{Fragment, SpecialMatcher};

/// Everything that can go wrong building or using a tokenizer. Messages are meant for users.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata is missing `{0}`")]
    MissingKey(String),
    #[error("tokenizer metadata `{key}` is malformed: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("invalid vocabulary: {0}")]
    InvalidVocab(String),
    #[error("tokenizer.json could not be read: {0}")]
    Json(String),
    #[error("token id {id} is out of range (the vocabulary has {vocab_size} tokens)")]
    IdOutOfRange { id: u32, vocab_size: usize },
    #[error("invalid pre-tokenizer pattern: {0}")]
    Regex(String),
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// What a vocabulary entry is, with the numbering of `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 1 (and 0, "undefined"): ordinary text produced by the model's merges.
    Normal,
    /// 2: the unknown-token placeholder.
    Unknown,
    /// 3: control tokens (`<bos>`, `<|im_start|>`); matched in text only with `parse_special`,
    /// skipped by `decode(.., skip_special = true)`.
    Control,
    /// 4: user-defined tokens, always matched literally in the text, decoded as their text.
    UserDefined,
    /// 5: unused slots; never produced by encoding, decoded as nothing.
    Unused,
    /// 6: `<0xNN>` byte tokens standing for one raw byte.
    Byte,
}

impl TokenType {
    /// Maps a `tokenizer.ggml.token_type` value; `None` for values outside 0..=6.
    pub fn from_gguf(v: i64) -> Option<TokenType> {
        Some(match v {
            0 | 1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }
}

/// How plain text is turned into tokens, as stored in GGUF metadata.
#[derive(Clone, Debug)]
pub enum ModelSpec {
    /// Byte-level BPE. `merges` are `"left right"` strings in the byte-level alphabet, rank =
    /// index. `pre` names the pre-tokenizer as in `tokenizer.ggml.pre` ("gpt2", "llama3",
    /// "qwen2", "qwen35", "smollm", "default", ...).
    ByteLevelBpe { merges: Vec<String>, pre: String },
    /// SentencePiece-style merging by score; `scores[i]` belongs to token `i`.
    Spm { scores: Vec<f32> },
}

/// A vocabulary in plain arrays: what [`Tokenizer::from_gguf`] reads from a file, and what
/// tests build by hand. `tokens` and `types` have one entry per token id.
#[derive(Clone, Debug)]
pub struct VocabSpec {
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    pub model: ModelSpec,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End of turn (`tokenizer.ggml.eot_token_id`), an extra end-of-generation token.
    pub eot: Option<u32>,
    /// End of message (`tokenizer.ggml.eom_token_id`), an extra end-of-generation token.
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    /// SentencePiece: put a space before the text (and after each special token).
    pub add_space_prefix: bool,
}

/// One vocabulary entry. `piece` is what the token decodes to (raw bytes).
#[derive(Clone, Debug)]
pub(crate) struct TokenEntry {
    pub text: String,
    pub kind: TokenType,
    pub score: f32,
    pub piece: Box<[u8]>,
}

#[derive(Debug)]
pub(crate) enum Model {
    Bpe(Box<Bpe>),
    Spm { add_space_prefix: bool },
}

/// A loaded tokenizer. Immutable after construction, so `Send + Sync`; share it by reference.
#[derive(Debug)]
pub struct Tokenizer {
    pub(crate) tokens: Vec<TokenEntry>,
    pub(crate) token_to_id: HashMap<String, u32>,
    pub(crate) model: Model,
    specials: SpecialMatcher,
    /// Token id of `<0xNN>` for each byte value, where the vocabulary has one.
    pub(crate) byte_tokens: [Option<u32>; 256],
    bos: Option<u32>,
    eos: Option<u32>,
    pub(crate) unk: Option<u32>,
    add_bos: bool,
    /// Drop one leading space from the decoded text (SentencePiece with a space prefix).
    pub(crate) strip_leading_space: bool,
    eog: Vec<u32>,
}

/// Texts of well-known end-of-turn control tokens; any present in the vocabulary (and not a
/// normal token) ends generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|return|>",
    "<|call|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|end▁of▁sentence|>",
];

/// Parses `<0xNN>` (exactly two uppercase or lowercase hex digits).
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Internal constructor input shared by the GGUF and tokenizer.json paths.
pub(crate) struct Parts {
    pub tokens: Vec<TokenEntry>,
    pub model: Model,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub extra_eog: Vec<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub strip_leading_space: bool,
}

impl Tokenizer {
    /// Builds a tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &caldera_format::gguf::GgufFile) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_spec(gguf_load::spec_from_gguf(f)?)
    }

    /// Builds a tokenizer from a Hugging Face `tokenizer.json` (BPE models only) and, when
    /// given, the parsed `tokenizer_config.json` (for `add_bos_token`, `bos_token`,
    /// `eos_token`).
    pub fn from_hf_json(
        tokenizer_json: &str,
        tokenizer_config: Option<&serde_json::Value>,
    ) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_parts(hf_json::parts_from_hf_json(
            tokenizer_json,
            tokenizer_config,
        )?)
    }

    /// Builds a tokenizer from plain arrays, validating them (lengths, ids, byte tokens).
    pub fn from_spec(spec: VocabSpec) -> Result<Tokenizer, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::InvalidVocab(
                "the vocabulary is empty".into(),
            ));
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::InvalidVocab(format!(
                "{n} tokens is too many"
            )));
        }
        if spec.types.len() != n {
            return Err(TokenizerError::InvalidVocab(format!(
                "{n} tokens but {} token types",
                spec.types.len()
            )));
        }
        let scores: Vec<f32> = match &spec.model {
            ModelSpec::Spm { scores } => {
                if scores.len() != n {
                    return Err(TokenizerError::InvalidVocab(format!(
                        "{n} tokens but {} scores",
                        scores.len()
                    )));
                }
                if let Some(i) = scores.iter().position(|s| s.is_nan()) {
                    return Err(TokenizerError::InvalidVocab(format!(
                        "token {i} has a NaN score"
                    )));
                }
                scores.clone()
            }
            ModelSpec::ByteLevelBpe { .. } => vec![0.0; n],
        };
        let byte_level = matches!(spec.model, ModelSpec::ByteLevelBpe { .. });
        let mut tokens = Vec::with_capacity(n);
        for (i, ((text, kind), score)) in spec
            .tokens
            .into_iter()
            .zip(spec.types)
            .zip(scores)
            .enumerate()
        {
            let piece = build_piece(&text, kind, byte_level)
                .map_err(|e| TokenizerError::InvalidVocab(format!("token {i} ({text:?}): {e}")))?;
            tokens.push(TokenEntry {
                text,
                kind,
                score,
                piece,
            });
        }
        let model = match spec.model {
            ModelSpec::ByteLevelBpe { merges, pre } => {
                let pretok = pretok::PreTokenizer::for_gguf_pre(&pre)?;
                let ignore_merges = pretok::gguf_pre_ignores_merges(&pre);
                Model::Bpe(Box::new(Bpe::from_merge_strings(
                    &tokens,
                    &merges,
                    bpe::BpeOptions {
                        byte_level: true,
                        byte_fallback: false,
                        ignore_merges,
                        normalizer: pretok::Normalizer::default(),
                        pretok,
                    },
                )?))
            }
            ModelSpec::Spm { .. } => Model::Spm {
                add_space_prefix: spec.add_space_prefix,
            },
        };
        let mut extra_eog = Vec::new();
        extra_eog.extend(spec.eot);
        extra_eog.extend(spec.eom);
        let strip = matches!(
            model,
            Model::Spm {
                add_space_prefix: true
            }
        );
        Tokenizer::from_parts(Parts {
            tokens,
            model,
            bos: spec.bos,
            eos: spec.eos,
            extra_eog,
            unk: spec.unk,
            add_bos: spec.add_bos,
            strip_leading_space: strip,
        })
    }

    pub(crate) fn from_parts(p: Parts) -> Result<Tokenizer, TokenizerError> {
        let n = p.tokens.len();
        let check = |what: &str, id: Option<u32>| -> Result<(), TokenizerError> {
            match id {
                Some(id) if id as usize >= n => Err(TokenizerError::InvalidVocab(format!(
                    "{what} token id {id} is outside the vocabulary of {n} tokens"
                ))),
                _ => Ok(()),
            }
        };
        check("BOS", p.bos)?;
        check("EOS", p.eos)?;
        check("unknown", p.unk)?;
        for &e in &p.extra_eog {
            check("end-of-generation", Some(e))?;
        }
        if p.add_bos && p.bos.is_none() {
            return Err(TokenizerError::InvalidVocab(
                "the model asks for a BOS token but names none".into(),
            ));
        }
        let mut token_to_id = HashMap::with_capacity(n);
        let mut byte_tokens = [None; 256];
        for (i, t) in p.tokens.iter().enumerate() {
            let id = i as u32;
            if t.kind == TokenType::Byte {
                if let Some(b) = parse_byte_token(&t.text) {
                    byte_tokens[b as usize].get_or_insert(id);
                }
            }
            if t.kind == TokenType::Unused && t.text.is_empty() {
                continue;
            }
            // First occurrence wins for duplicated texts.
            token_to_id.entry(t.text.clone()).or_insert(id);
        }
        let specials = SpecialMatcher::new(&p.tokens);
        let mut eog: Vec<u32> = p
            .eos
            .into_iter()
            .chain(p.extra_eog.iter().copied())
            .collect();
        for name in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*name) {
                if p.tokens[id as usize].kind != TokenType::Normal {
                    eog.push(id);
                }
            }
        }
        eog.sort_unstable();
        eog.dedup();
        Ok(Tokenizer {
            tokens: p.tokens,
            token_to_id,
            model: p.model,
            specials,
            byte_tokens,
            bos: p.bos,
            eos: p.eos,
            unk: p.unk,
            add_bos: p.add_bos,
            strip_leading_space: p.strip_leading_space,
            eog,
        })
    }

    /// Text to token ids. `add_bos`: prepend BOS if the model asks for one ([`Self::adds_bos`]).
    /// `parse_special`: control-token texts such as `<|im_start|>` become those tokens
    /// (user-defined tokens are always matched).
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let frags = self.specials.partition(text, &self.tokens, parse_special);
        let mut prev_special = true;
        for frag in frags {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(r) => {
                    let first = r.start == 0;
                    let piece = &text[r];
                    match &self.model {
                        Model::Bpe(b) => b.encode(self, piece, first, &mut out)?,
                        Model::Spm { add_space_prefix } => {
                            spm::encode(self, piece, *add_space_prefix && prev_special, &mut out)
                        }
                    }
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// Token ids to text. `skip_special` leaves out control and unknown tokens. Bytes are
    /// joined first and converted to UTF-8 once (invalid sequences become U+FFFD).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut at_start = true;
        for &id in ids {
            let mut piece = self.piece_for_decode(id, skip_special)?;
            if at_start && !piece.is_empty() {
                if self.strip_leading_space && piece[0] == b' ' {
                    piece = &piece[1..];
                }
                at_start = false;
            }
            bytes.extend_from_slice(piece);
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The bytes `id` contributes to decoded text (empty for skipped tokens).
    pub(crate) fn piece_for_decode(
        &self,
        id: u32,
        skip_special: bool,
    ) -> Result<&[u8], TokenizerError> {
        let t = self
            .tokens
            .get(id as usize)
            .ok_or(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.tokens.len(),
            })?;
        if skip_special && matches!(t.kind, TokenType::Control | TokenType::Unknown) {
            return Ok(&[]);
        }
        Ok(&t.piece)
    }

    /// The raw bytes a token stands for (its text for control and user-defined tokens).
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.tokens.get(id as usize).map(|t| t.piece.to_vec())
    }

    /// The vocabulary string as stored (byte-level alphabet, `▁`, `<0xNN>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|t| t.text.as_str())
    }

    /// The id of the token whose stored string is `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.tokens.get(id as usize).map(|t| t.kind)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// BOS token text, for chat templates' `bos_token`.
    pub fn bos_text(&self) -> Option<&str> {
        self.bos.and_then(|id| self.token_text(id))
    }

    /// EOS token text, for chat templates' `eos_token`.
    pub fn eos_text(&self) -> Option<&str> {
        self.eos.and_then(|id| self.token_text(id))
    }

    /// Whether the model wants BOS at the start of a prompt.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// End of generation: EOS, EOT/EOM when named, and well-known end-of-turn tokens.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, ascending.
    pub fn eog_ids(&self) -> Vec<u32> {
        self.eog.clone()
    }

    /// Control and unknown tokens (those `skip_special` leaves out of decoded text).
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.token_type(id),
            Some(TokenType::Control | TokenType::Unknown)
        )
    }
}

/// What a token decodes to. Byte-level BPE maps each character back through the GPT-2
/// alphabet; SentencePiece turns `▁` into a space; byte tokens are one byte.
pub(crate) fn build_piece(
    text: &str,
    kind: TokenType,
    byte_level: bool,
) -> Result<Box<[u8]>, String> {
    Ok(match kind {
        TokenType::Byte => match parse_byte_token(text) {
            Some(b) => Box::new([b]),
            None => return Err("a byte token must look like <0xNN>".into()),
        },
        TokenType::Unused => Box::new([]),
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => text.as_bytes().into(),
        TokenType::Normal if byte_level => bpe::byte_level_decode(text).into(),
        TokenType::Normal => spm_piece(text).into_bytes().into(),
    })
}

/// `▁` (U+2581) to space.
pub(crate) fn spm_piece(text: &str) -> String {
    text.replace('\u{2581}', " ")
}
