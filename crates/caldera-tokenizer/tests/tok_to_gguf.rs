//! tokenizer.json → `tokenizer.ggml.*` metadata: a GGUF written from the converted keys
//! (no tensors) must load into a tokenizer that encodes and decodes exactly as the
//! tokenizer.json does. Covers SmolLM2's vocabulary (rebuilt as a tokenizer.json from its
//! GGUF, also checked against llama.cpp's ids), small byte-level files for each known
//! pre-tokenizer, SentencePiece-style files, and the errors for what has no GGUF form.

use std::path::PathBuf;

use caldera_format::gguf::{GgufFile, GgufValue, GgufWriter};
use caldera_tokenizer::tokenizer::gguf_metadata_from_hf;
use caldera_tokenizer::{Tokenizer, TokenizerError};
use serde_json::{json, Value};

struct Case {
    text: &'static str,
    special: bool,
    bos: bool,
    ids: &'static [u32],
}

include!("tok_models_expected.in");

fn models_dir() -> PathBuf {
    match std::env::var_os("CALDERA_MODELS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")),
    }
}

type Keys = Vec<(String, GgufValue)>;

fn key<'a>(keys: &'a Keys, name: &str) -> Option<&'a GgufValue> {
    keys.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn key_str<'a>(keys: &'a Keys, name: &str) -> &'a str {
    key(keys, name)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("{name} missing or not a string"))
}

/// Writes the keys into a tensorless GGUF in the temp dir, reads it back and loads it.
fn load_through_gguf(keys: &Keys, tag: &str) -> (Tokenizer, GgufFile) {
    let mut w = GgufWriter::new();
    w.set("general.architecture", GgufValue::string("llama"));
    for (k, v) in keys {
        w.set(k, v.clone());
    }
    let path = std::env::temp_dir().join(format!(
        "caldera-tok-to-gguf-{}-{tag}.gguf",
        std::process::id()
    ));
    w.write_file(&path).expect("write gguf");
    let f = GgufFile::open(&path).expect("read gguf");
    let tok = Tokenizer::from_gguf(&f);
    let _ = std::fs::remove_file(&path);
    (tok.expect("load tokenizer from gguf"), f)
}

/// Both tokenizers agree on ids (every BOS / special combination), on decoding, and on
/// the special ids.
fn assert_same(hf: &Tokenizer, gg: &Tokenizer, texts: &[&str]) {
    assert_eq!(hf.vocab_size(), gg.vocab_size());
    assert_eq!((hf.bos_id(), hf.adds_bos()), (gg.bos_id(), gg.adds_bos()));
    // Without a named EOS, a "llama" GGUF falls back to id 2, as llama.cpp does.
    if hf.eos_id().is_some() {
        assert_eq!(hf.eos_id(), gg.eos_id());
    }
    let mut bad = Vec::new();
    for &t in texts {
        for (bos, special) in [(false, false), (true, true), (false, true)] {
            let a = hf.encode(t, bos, special).expect("hf encode");
            let b = gg.encode(t, bos, special).expect("gguf encode");
            if a != b {
                bad.push(format!(
                    "{t:?} bos={bos} special={special}:\n  json {a:?}\n  gguf {b:?}"
                ));
                continue;
            }
            for skip in [false, true] {
                assert_eq!(
                    hf.decode(&a, skip).unwrap(),
                    gg.decode(&b, skip).unwrap(),
                    "decode {t:?}"
                );
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

const EXTRA_TEXTS: &[&str] = &[
    "",
    " ",
    "Ünïcödé façade — “quotes” ‘single’ … ½ ² ①",
    "ἀρχὴ ἦν ὁ λόγος; Ελληνικά",
    "ภาษาไทย ไม่มีช่องว่าง and עברית",
    "🧑🏿‍🚀 🏳️‍🌈 a\u{00A0}b\u{2009}c\u{200B}d",
    "<|im_start|>system\nYou are<|im_end|><|endoftext|>tail",
    "<|im_start|><|im_start|> <|im_end|>x",
    "x<|endoftext|>",
    "It's 2024-01-02T03:04:05Z; ids: 0x7f, 1e-9, 3,141,592.65",
    "    def f(x):\n        return x ** 2\n\n\n",
    "ALL CAPS SHOUTING'S DON'T WON'T",
    "tabs\t\tand\r\rreturns\r\n\r\n",
];

/// SmolLM2's tokenizer.json layout (Digits(individual) then ByteLevel, control tokens as
/// special added tokens) rebuilt from its GGUF vocabulary.
fn smollm_json(f: &GgufFile) -> String {
    let tokens = f
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_str_array())
        .expect("tokens");
    let types = f
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_i64_array())
        .expect("types");
    let merges = f
        .get("tokenizer.ggml.merges")
        .and_then(|v| v.as_str_array())
        .expect("merges");
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = (0..tokens.len())
        .filter(|&i| types[i] == 3)
        .map(|i| json!({"id": i, "content": tokens[i], "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "unk_token": null, "byte_fallback": false, "vocab": vocab, "merges": merges}
    })
    .to_string()
}

#[test]
fn smollm_round_trips_through_gguf() {
    let path = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!(
            "skipping: {} not found (set CALDERA_MODELS)",
            path.display()
        );
        return;
    }
    let orig = GgufFile::open(&path).expect("open");
    let json_text = smollm_json(&orig);
    let template = orig
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .expect("chat template");
    let config = json!({"add_bos_token": false, "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|im_end|>",
        "chat_template": template});
    let keys = gguf_metadata_from_hf(&json_text, Some(&config)).expect("convert");
    assert_eq!(key_str(&keys, "tokenizer.ggml.model"), "gpt2");
    assert_eq!(key_str(&keys, "tokenizer.ggml.pre"), "smollm");
    assert_eq!(key_str(&keys, "tokenizer.chat_template"), template);
    // The vocabulary arrays are the original file's, element for element.
    for (k, what) in [
        ("tokenizer.ggml.tokens", "tokens"),
        ("tokenizer.ggml.merges", "merges"),
    ] {
        assert_eq!(
            key(&keys, k).and_then(|v| v.as_str_array()),
            orig.get(k).and_then(|v| v.as_str_array()),
            "{what}"
        );
    }
    assert_eq!(
        key(&keys, "tokenizer.ggml.token_type").and_then(|v| v.as_i64_array()),
        orig.get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_i64_array())
    );
    assert_eq!(
        key(&keys, "tokenizer.ggml.padding_token_id").and_then(|v| v.as_i64()),
        Some(2)
    );

    let hf = Tokenizer::from_hf_json(&json_text, Some(&config)).expect("json");
    let (gg, _) = load_through_gguf(&keys, "smollm");
    assert_eq!(
        (gg.bos_id(), gg.eos_id(), gg.adds_bos()),
        (Some(1), Some(2), false)
    );
    let mut texts: Vec<&str> = SMOLLM_EXPECTED.iter().map(|c| c.text).collect();
    texts.extend_from_slice(EXTRA_TEXTS);
    assert_same(&hf, &gg, &texts);
    // And both are llama.cpp's tokenization.
    for c in SMOLLM_EXPECTED {
        assert_eq!(
            gg.encode(c.text, c.bos, c.special).unwrap(),
            c.ids,
            "{:?}",
            c.text
        );
    }
}

/// GPT-2's byte → printable character table.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(0xFF + extra).unwrap()
            }
        })
        .collect()
}

fn byte_level(s: &str) -> String {
    let table = byte_chars();
    s.bytes().map(|b| table[b as usize]).collect()
}

/// A small byte-level BPE file: the 256 byte characters, then tokens built left to right
/// for each word (one merge per step), special and user-defined added tokens and a gap.
fn byte_level_json(pre_tokenizer: Value, normalizer: Value, ignore_merges: bool) -> String {
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let mut merges: Vec<String> = Vec::new();
    let words = [
        " the", "the", " world", "Hello", " hello", "ing", " don", "'s", "'t", "12", "123", "1234",
        " 20", "000", " café", " naïve", "日本", "  ", "   ", "\n\n", " (", ").", "DON", "'T",
        "’s", "ok",
    ];
    for w in words {
        let chars: Vec<String> = byte_level(w).chars().map(String::from).collect();
        let mut left = chars[0].clone();
        for c in &chars[1..] {
            let joined = format!("{left}{c}");
            if !vocab.contains_key(&joined) {
                merges.push(format!("{left} {c}"));
                let id = vocab.len();
                vocab.insert(joined.clone(), json!(id));
            }
            left = joined;
        }
    }
    let n = vocab.len();
    json!({
        "added_tokens": [
            {"id": n, "content": "<|endoftext|>", "special": true},
            {"id": n + 1, "content": "<|im_start|>", "special": true},
            {"id": n + 2, "content": "<|im_end|>", "special": true},
            {"id": n + 4, "content": "<tool>", "special": false}
        ],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges}
    })
    .to_string()
}

const LLAMA3_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_HF: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Llama 3 / Qwen layout: one isolated regex split, then ByteLevel without its regex.
fn split_then_byte_level(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
    ]})
}

#[test]
fn byte_level_pre_tokenizers_map_to_llama_cpp_names() {
    let texts: Vec<&str> = SMOLLM_EXPECTED
        .iter()
        .map(|c| c.text)
        .chain(EXTRA_TEXTS.iter().copied())
        .chain([
            "the world's 12345 don't<tool>the<|endoftext|> café  naïve",
            "Hello hello DON'T 2000000 ).(",
        ])
        .collect();
    let cases = [
        (
            json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}),
            json!(null),
            false,
            "gpt2|gpt-2",
        ),
        (
            split_then_byte_level(LLAMA3_HF),
            json!(null),
            true,
            "llama-bpe",
        ),
        (
            split_then_byte_level(LLAMA3_HF),
            json!(null),
            false,
            "smaug-bpe",
        ),
        (
            split_then_byte_level(QWEN2_HF),
            json!({"type": "NFC"}),
            false,
            "qwen2",
        ),
        (
            split_then_byte_level(QWEN35_HF),
            json!({"type": "NFC"}),
            false,
            "qwen35",
        ),
        (
            split_then_byte_level(GPT4O_HF),
            json!(null),
            false,
            "gpt-4o",
        ),
        (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]}),
            json!(null),
            false,
            "smollm",
        ),
    ];
    let config = json!({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "add_bos_token": true, "pad_token": "<|endoftext|>"});
    for (i, (pre, norm, ignore, names)) in cases.into_iter().enumerate() {
        let text = byte_level_json(pre, norm, ignore);
        let keys = gguf_metadata_from_hf(&text, Some(&config)).expect("convert");
        let name = key_str(&keys, "tokenizer.ggml.pre");
        assert!(
            names.split('|').any(|n| n == name),
            "case {i}: {name} is not {names}"
        );
        let types = key(&keys, "tokenizer.ggml.token_type")
            .and_then(|v| v.as_i64_array())
            .unwrap();
        let tokens = key(&keys, "tokenizer.ggml.tokens")
            .and_then(|v| v.as_str_array())
            .unwrap();
        let n = tokens.len();
        // Added tokens: three control, a gap filled as llama.cpp does, one user-defined.
        assert_eq!(&types[n - 5..], &[3, 3, 3, 5, 4]);
        assert_eq!(tokens[n - 2], format!("[PAD{}]", n - 2));
        assert_eq!(
            key(&keys, "tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()),
            Some(true)
        );
        let hf = Tokenizer::from_hf_json(&text, Some(&config)).expect("json");
        let (gg, _) = load_through_gguf(&keys, &format!("bl{i}"));
        assert!(gg.adds_bos());
        assert_same(&hf, &gg, &texts);
    }
}

#[test]
fn byte_level_without_a_gguf_equivalent_is_an_error() {
    let unsupported = |pre: Value, norm: Value, ignore: bool| {
        let text = byte_level_json(pre, norm, ignore);
        match gguf_metadata_from_hf(&text, None) {
            Err(TokenizerError::Unsupported(m)) => m,
            other => panic!("expected Unsupported, got {other:?}"),
        }
    };
    let m = unsupported(split_then_byte_level(r"\p{L}+|\p{N}+"), json!(null), false);
    assert!(m.contains(r"\p{L}+|\p{N}+"), "{m}");
    let m = unsupported(split_then_byte_level(QWEN2_HF), json!(null), true);
    assert!(m.contains("ignore_merges") && m.contains("qwen2"), "{m}");
    let m = unsupported(
        json!({"type": "ByteLevel", "add_prefix_space": true}),
        json!(null),
        false,
    );
    assert!(m.contains("add_prefix_space"), "{m}");
    let m = unsupported(
        json!({"type": "ByteLevel"}),
        json!({"type": "Lowercase"}),
        false,
    );
    assert!(m.contains("Lowercase"), "{m}");
    let m = unsupported(
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "ByteLevel", "use_regex": false},
            {"type": "Digits", "individual_digits": true}]}),
        json!(null),
        false,
    );
    assert!(m.contains("after ByteLevel"), "{m}");
}

/// The SentencePiece-converted vocabulary of tok_hf_json.rs: `<unk> <s> </s>`, 256 byte
/// tokens, then pieces, and a special `<start_of_turn>`.
const SPM_PIECES: &[&str] = &[
    "▁", "H", "e", "l", "o", "w", "r", "d", "ll", "He", "llo", "Hello", "▁w", "or", "▁wor", "ld",
    "▁world", "▁H", "▁Hello",
];

/// The hand-written merge list of tok_hf_json.rs (it has no `▁ Hello`).
const SPM_MERGES_HANDWRITTEN: &[&str] = &[
    "l l",
    "H e",
    "ll o",
    "He llo",
    "▁ w",
    "o r",
    "▁w or",
    "l d",
    "▁wor ld",
    "▁ H",
    "▁H ello",
];

/// Every split of each piece into two vocabulary pieces, in piece order: the merge list a
/// conversion from a SentencePiece model produces.
fn complete_merges() -> Vec<String> {
    let mut out = Vec::new();
    for p in SPM_PIECES {
        for (i, _) in p.char_indices().skip(1) {
            let (a, b) = p.split_at(i);
            if SPM_PIECES.contains(&a) && SPM_PIECES.contains(&b) {
                out.push(format!("{a} {b}"));
            }
        }
    }
    out
}

fn spm_json(normalizer: Value, pre_tokenizer: Value, decoder: Value, merges: &[String]) -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for b in 0..256 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    for (i, p) in SPM_PIECES.iter().enumerate() {
        vocab.insert(p.to_string(), json!(259 + i));
    }
    json!({
        "added_tokens": [
            {"id": 0, "content": "<unk>", "special": true},
            {"id": 1, "content": "<s>", "special": true},
            {"id": 2, "content": "</s>", "special": true},
            {"id": 278, "content": "<start_of_turn>", "special": true}
        ],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": decoder,
        "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true, "fuse_unk": true,
                  "vocab": vocab, "merges": merges}
    })
    .to_string()
}

fn llama2_normalizer() -> Value {
    json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
}

fn spm_decoder(strip: bool) -> Value {
    let mut d = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if strip {
        d.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({"type": "Sequence", "decoders": d})
}

fn spm_texts() -> Vec<&'static str> {
    GEMMA_EXPECTED
        .iter()
        .map(|c| c.text)
        .chain(EXTRA_TEXTS.iter().copied())
        .chain([
            "Hello world!",
            "Hello Hello world world Helloworld",
            "naïve 😀 日本",
            "  two  spaces ",
            "\t\n",
            "<start_of_turn>Hello world<start_of_turn> Hello<start_of_turn>",
            "Hello<unk><s></s> <0x41>",
        ])
        .collect()
}

#[test]
fn sentencepiece_style_round_trips_through_gguf() {
    let merges = complete_merges();
    assert!(merges.contains(&"▁ Hello".to_owned()));
    let files = [
        // Llama 2: prepend ▁, replace spaces, strip the first space when decoding.
        (
            spm_json(llama2_normalizer(), json!(null), spm_decoder(true), &merges),
            None,
            true,
            false,
        ),
        // Gemma: replace only, no prefix; the config turns BOS off.
        (
            spm_json(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}),
                json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
                spm_decoder(false),
                &merges,
            ),
            Some(
                json!({"add_bos_token": false, "eos_token": {"content": "</s>"},
                        "pad_token": "<unk>", "chat_template": [
                            {"name": "default", "template": "{{ messages }}"},
                            {"name": "tool use", "template": "{{ tools }}"}]}),
            ),
            false,
            false,
        ),
        // Metaspace pre-tokenizer doing both.
        (
            spm_json(
                json!(null),
                json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": false}),
                json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": false}),
                &merges,
            ),
            Some(json!({"bos_token": "<s>", "eos_token": "</s>", "add_eos_token": true})),
            true,
            true,
        ),
    ];
    let texts = spm_texts();
    for (i, (text, config, prefix, metaspace)) in files.iter().enumerate() {
        let keys = gguf_metadata_from_hf(text, config.as_ref()).expect("convert");
        assert_eq!(key_str(&keys, "tokenizer.ggml.model"), "llama");
        assert_eq!(
            key(&keys, "tokenizer.ggml.add_space_prefix").and_then(|v| v.as_bool()),
            Some(*prefix),
            "file {i}"
        );
        let types = key(&keys, "tokenizer.ggml.token_type")
            .and_then(|v| v.as_i64_array())
            .unwrap();
        assert_eq!(types.iter().filter(|&&t| t == 6).count(), 256);
        assert_eq!(&types[..3], &[3, 3, 3]);
        let scores = key(&keys, "tokenizer.ggml.scores")
            .and_then(|v| v.as_f32_array())
            .unwrap();
        assert_eq!(scores.len(), types.len());
        // "ll" is made by merge 0, "He" by merge 1; bytes score below every merge.
        assert_eq!((scores[267], scores[268]), (0.0, -1.0));
        assert!(scores[3] < -(merges.len() as f32 - 1.0));

        let hf = Tokenizer::from_hf_json(text, config.as_ref()).expect("json");
        let (gg, _) = load_through_gguf(&keys, &format!("spm{i}"));
        if *metaspace {
            // Metaspace adds no ▁ to a span that starts with a space; a GGUF always does.
            let id = |t: &str| hf.token_id(t).expect(t);
            assert_eq!(hf.encode(" Hello", false, false).unwrap(), [id("▁Hello")]);
            assert_eq!(
                gg.encode(" Hello", false, false).unwrap(),
                [id("▁"), id("▁Hello")]
            );
            let plain: Vec<&str> = texts
                .iter()
                .copied()
                .filter(|t| !t.starts_with(' ') && !t.contains("> "))
                .collect();
            assert_same(&hf, &gg, &plain);
        } else {
            assert_same(&hf, &gg, &texts);
        }
        let ids = gg.encode("Hello world", true, false).unwrap();
        assert_eq!(gg.decode(&ids, true).unwrap(), "Hello world");
    }

    // The Gemma-style config: template list, pad id, BOS off, EOS from the object form.
    let keys = gguf_metadata_from_hf(&files[1].0, files[1].1.as_ref()).unwrap();
    assert_eq!(key_str(&keys, "tokenizer.chat_template"), "{{ messages }}");
    assert_eq!(
        key_str(&keys, "tokenizer.chat_template.tool_use"),
        "{{ tools }}"
    );
    assert_eq!(
        key(&keys, "tokenizer.chat_templates").and_then(|v| v.as_str_array()),
        Some(vec!["tool_use"])
    );
    let id = |k: &str| key(&keys, k).and_then(|v| v.as_i64());
    assert_eq!(id("tokenizer.ggml.padding_token_id"), Some(0));
    assert_eq!(id("tokenizer.ggml.eos_token_id"), Some(2));
    assert_eq!(id("tokenizer.ggml.unknown_token_id"), Some(0));
    // The Metaspace file's config asks for EOS.
    let keys = gguf_metadata_from_hf(&files[2].0, files[2].1.as_ref()).unwrap();
    assert_eq!(
        key(&keys, "tokenizer.ggml.add_eos_token").and_then(|v| v.as_bool()),
        Some(true)
    );
}

/// With a merge list that lacks `▁ Hello` while `▁Hello` is in the vocabulary, BPE never
/// forms `▁Hello` but merging by score does: the one documented difference.
#[test]
fn incomplete_merge_list_differs_only_where_documented() {
    let merges: Vec<String> = SPM_MERGES_HANDWRITTEN
        .iter()
        .map(|s| s.to_string())
        .collect();
    let text = spm_json(llama2_normalizer(), json!(null), spm_decoder(true), &merges);
    let keys = gguf_metadata_from_hf(&text, None).expect("convert");
    let hf = Tokenizer::from_hf_json(&text, None).unwrap();
    let (gg, _) = load_through_gguf(&keys, "spm-hand");
    let id = |t: &str| hf.token_id(t).expect(t);
    assert_eq!(
        hf.encode("Hello world!", true, false).unwrap(),
        [1, id("▁"), id("Hello"), id("▁world"), id("<0x21>")]
    );
    assert_eq!(
        gg.encode("Hello world!", true, false).unwrap(),
        [1, id("▁Hello"), id("▁world"), id("<0x21>")]
    );
    // Text where no `▁` meets `Hello` agrees.
    assert_same(
        &hf,
        &gg,
        &["world", "wHello world", "naïve 😀 日本", "\t\n"],
    );
}

#[test]
fn unsupported_tokenizers_are_errors() {
    let unsupported = |j: Value| match gguf_metadata_from_hf(&j.to_string(), None) {
        Err(TokenizerError::Unsupported(m)) => m,
        other => panic!("expected Unsupported for {j}, got {other:?}"),
    };
    let m = unsupported(json!({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}));
    assert!(m.contains("Unigram"), "{m}");
    let m = unsupported(json!({"model": {"type": "WordPiece", "vocab": {"a": 0}}}));
    assert!(m.contains("WordPiece"), "{m}");
    let m = unsupported(json!({"model": {"type": "WordLevel", "vocab": {"a": 0}}}));
    assert!(m.contains("WordLevel"), "{m}");
    // Character BPE without byte fallback, and SentencePiece style with NFKC.
    unsupported(
        json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
        "merges": ["a b"]}}),
    );
    let m = unsupported(json!({"model": {"type": "BPE", "byte_fallback": true,
        "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}}));
    assert!(m.contains("NFKC"), "{m}");
    // Byte fallback but spaces never become ▁.
    unsupported(json!({"model": {"type": "BPE", "byte_fallback": true,
        "vocab": {"a": 0}, "merges": []}}));

    assert!(matches!(
        gguf_metadata_from_hf("{not json", None),
        Err(TokenizerError::Json(_))
    ));
    let ok = spm_json(
        llama2_normalizer(),
        json!(null),
        spm_decoder(true),
        &complete_merges(),
    );
    for bad in [
        json!({"chat_template": 7}),
        json!({"chat_template": [{"name": "x"}]}),
    ] {
        assert!(
            matches!(
                gguf_metadata_from_hf(&ok, Some(&bad)),
                Err(TokenizerError::BadMetadata { .. })
            ),
            "{bad}"
        );
    }
}
