//! tokenizer.json loading: a byte-level file rebuilt from SmolLM2's GGUF vocabulary (same
//! layout as SmolLM2's published tokenizer.json) checked against llama.cpp's ids, and small
//! SentencePiece-converted files written by hand.

use std::path::PathBuf;

use caldera_format::gguf::GgufFile;
use caldera_tokenizer::{Tokenizer, TokenizerError};
use serde_json::{json, Value};

struct Case {
    text: &'static str,
    special: bool,
    bos: bool,
    ids: &'static [u32],
}

include!("tok_models_expected.in");

#[test]
fn expected_tables_are_paired() {
    // Each text appears twice (plain, and with specials + BOS) in both tables.
    assert_eq!(SMOLLM_EXPECTED.len(), GEMMA_EXPECTED.len());
    assert!(GEMMA_EXPECTED
        .iter()
        .zip(SMOLLM_EXPECTED)
        .all(|(a, b)| a.text == b.text));
}

fn models_dir() -> PathBuf {
    match std::env::var_os("CALDERA_MODELS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")),
    }
}

/// SmolLM2's tokenizer.json layout: Digits(individual) then ByteLevel, ByteLevel decoder,
/// control tokens as special added tokens.
fn smollm_json(pair_merges: bool) -> Option<String> {
    let path = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!(
            "skipping: {} not found (set CALDERA_MODELS)",
            path.display()
        );
        return None;
    }
    let f = GgufFile::open(&path).expect("open");
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
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges: Vec<Value> = if pair_merges {
        merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').expect("merge");
                json!([a, b])
            })
            .collect()
    } else {
        merges.iter().map(|m| json!(m)).collect()
    };
    let j = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    });
    Some(j.to_string())
}

#[test]
fn smollm_tokenizer_json_matches_llama_cpp() {
    for pair_merges in [false, true] {
        let Some(text) = smollm_json(pair_merges) else {
            return;
        };
        let config =
            json!({"add_bos_token": false, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"});
        let tok = Tokenizer::from_hf_json(&text, Some(&config)).expect("load");
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.adds_bos()),
            (Some(1), Some(2), false)
        );
        let mut bad = Vec::new();
        for c in SMOLLM_EXPECTED {
            let got = tok.encode(c.text, c.bos, c.special).expect("encode");
            if got != c.ids {
                bad.push(format!("{:?}: want {:?} got {:?}", c.text, c.ids, got));
            }
            if !c.special {
                assert_eq!(tok.decode(&got, false).unwrap(), c.text);
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}

/// A SentencePiece-converted BPE file (Llama 2 / Gemma style): ▁ for space through the
/// normalizer, byte fallback, BOS from the post-processor.
fn spm_json(normalizer: Value, decoder: Value) -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for b in 0..256 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    let pieces = [
        "▁", "H", "e", "l", "o", "w", "r", "d", "ll", "He", "llo", "Hello", "▁w", "or", "▁wor",
        "ld", "▁world", "▁H", "▁Hello",
    ];
    for (i, p) in pieces.iter().enumerate() {
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
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": decoder,
        "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true, "fuse_unk": true, "vocab": vocab,
                  "merges": ["l l", "H e", "ll o", "He llo", "▁ w", "o r", "▁w or", "l d", "▁wor ld", "▁ H", "▁H ello"]}
    })
    .to_string()
}

#[test]
fn sentencepiece_style_json() {
    // Llama 2 style: prepend ▁ and replace spaces; the decoder strips the first space.
    let llama = spm_json(
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
        json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
    );
    let tok = Tokenizer::from_hf_json(&llama, None).expect("load");
    assert!(tok.adds_bos());
    assert_eq!(tok.bos_id(), Some(1));
    let id = |t: &str| tok.token_id(t).expect(t);
    let ids = tok.encode("Hello world!", true, false).unwrap();
    // "▁ H" ranks below "H e", so "Hello" forms first and "▁" stays alone.
    assert_eq!(ids, [1, id("▁"), id("Hello"), id("▁world"), id("<0x21>")]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world!");
    for s in ["Hello world", "naïve 😀 日本", "  two  spaces ", "\t\n"] {
        let ids = tok.encode(s, false, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }
    let ids = tok.encode("<start_of_turn>Hello", false, true).unwrap();
    assert_eq!(ids[0], 278);
    // Gemma style: replace only, no prefix, no strip; config turns BOS off.
    let gemma = spm_json(
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}),
        json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]}),
    );
    let tok = Tokenizer::from_hf_json(
        &gemma,
        Some(&json!({"add_bos_token": false, "eos_token": {"content": "</s>"}})),
    )
    .unwrap();
    assert!(!tok.adds_bos());
    assert_eq!(tok.eos_id(), Some(2));
    let ids = tok.encode("Hello world", true, false).unwrap();
    assert_eq!(
        ids,
        [
            tok.token_id("Hello").unwrap(),
            tok.token_id("▁world").unwrap()
        ]
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), "Hello world");
}

#[test]
fn unsupported_and_malformed_json_are_errors() {
    assert!(matches!(
        Tokenizer::from_hf_json("{not json", None),
        Err(TokenizerError::Json(_))
    ));
    let wp = json!({"model": {"type": "WordPiece", "vocab": {"a": 0}}}).to_string();
    assert!(matches!(
        Tokenizer::from_hf_json(&wp, None),
        Err(TokenizerError::Unsupported(_))
    ));
    let uni = json!({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}).to_string();
    assert!(matches!(
        Tokenizer::from_hf_json(&uni, None),
        Err(TokenizerError::Unsupported(_))
    ));
    let gap =
        json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 4_000_000_000u64}, "merges": []}})
            .to_string();
    assert!(matches!(
        Tokenizer::from_hf_json(&gap, None),
        Err(TokenizerError::InvalidVocab(_))
    ));
    let dup =
        json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}, "merges": []}}).to_string();
    assert!(matches!(
        Tokenizer::from_hf_json(&dup, None),
        Err(TokenizerError::InvalidVocab(_))
    ));
    let bad_re = json!({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}}).to_string();
    assert!(matches!(
        Tokenizer::from_hf_json(&bad_re, None),
        Err(TokenizerError::Regex(_))
    ));
    let bad_bos = json!({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}],
        "special_tokens": {"<s>": {"ids": [77]}}}}).to_string();
    assert!(matches!(
        Tokenizer::from_hf_json(&bad_bos, None),
        Err(TokenizerError::InvalidVocab(_))
    ));
    let bert = json!({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
        "normalizer": {"type": "BertNormalizer"}})
    .to_string();
    assert!(matches!(
        Tokenizer::from_hf_json(&bert, None),
        Err(TokenizerError::Unsupported(_))
    ));
}
