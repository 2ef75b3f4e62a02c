//! Tests against the real SmolLM2 (byte-level BPE, pre = smollm) and gemma-3 (SentencePiece,
//! 262144 tokens) vocabularies. Expected ids come from llama.cpp (llama-cpp-python 0.3.36,
//! `Llama(vocab_only=True).tokenize(text, add_bos, special)`), committed as literals.
//! Skipped, with a message, when the model files are absent.

use std::path::PathBuf;
use std::time::Instant;

use caldera_format::gguf::GgufFile;
use caldera_tokenizer::{StreamDecoder, Tokenizer};

fn models_dir() -> PathBuf {
    match std::env::var_os("CALDERA_MODELS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")),
    }
}

fn load(file: &str) -> Option<Tokenizer> {
    let path = models_dir().join(file);
    if !path.exists() {
        eprintln!(
            "skipping: {} not found (set CALDERA_MODELS)",
            path.display()
        );
        return None;
    }
    let gguf = GgufFile::open(&path).expect("open gguf");
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(&gguf).expect("load tokenizer");
    eprintln!("{file}: vocabulary loaded in {:?}", t0.elapsed());
    Some(tok)
}

fn smollm() -> Option<Tokenizer> {
    load("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn gemma() -> Option<Tokenizer> {
    load("gemma-3-270m-q4_k_m.gguf")
}

struct Case {
    text: &'static str,
    special: bool,
    bos: bool,
    ids: &'static [u32],
}

include!("tok_models_expected.in");

const CORPUS: &[&str] = &[
    "Hello world",
    "Ça va? Élève, naïve café, Straße, señor",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε",
    "你好，世界！日本語のテキスト。한국어",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️",
    "fn main() {\n\tlet x = vec![1, 2, 3];\n\tif x.len() > 2 { println!(\"{}\", x[0]); }\n}",
    "   \n\n\t  ",
    "12345678",
    "don't I'll",
    " leading space",
    "trailing space ",
    "tabs\t\tand\r\nnewlines\n\n\n",
    "\u{0}\u{1}\u{7f} control chars \u{ad}\u{200b}\u{feff}",
    "mixed: a😀b Ωμέγα 漢字 ١٢٣ ๑๒๓",
];

fn check_expected(tok: &Tokenizer, cases: &[Case]) {
    let mut bad = Vec::new();
    for c in cases {
        let got = tok.encode(c.text, c.bos, c.special).expect("encode");
        if got != c.ids {
            bad.push(format!(
                "{:?} special={} bos={}\n  want {:?}\n  got  {:?}",
                c.text, c.special, c.bos, c.ids, got
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn check_round_trips(tok: &Tokenizer) {
    for s in CORPUS {
        let ids = tok.encode(s, false, false).expect("encode");
        let back = tok.decode(&ids, false).expect("decode");
        assert_eq!(&back, s, "round trip of {s:?} via {ids:?}");
        // Streaming gives the same text and never a replacement character.
        let mut sd = StreamDecoder::new(tok, false);
        let mut streamed = String::new();
        for &id in &ids {
            let part = sd.push(id);
            assert!(!part.contains('\u{FFFD}'), "U+FFFD streamed for {s:?}");
            streamed.push_str(&part);
        }
        streamed.push_str(&sd.flush());
        assert_eq!(&streamed, s);
    }
}

#[test]
fn smollm_matches_llama_cpp() {
    let Some(tok) = smollm() else { return };
    check_expected(&tok, SMOLLM_EXPECTED);
}

#[test]
fn gemma_matches_llama_cpp() {
    let Some(tok) = gemma() else { return };
    check_expected(&tok, GEMMA_EXPECTED);
}

#[test]
fn smollm_round_trips() {
    let Some(tok) = smollm() else { return };
    check_round_trips(&tok);
}

#[test]
fn gemma_round_trips() {
    let Some(tok) = gemma() else { return };
    check_round_trips(&tok);
}

#[test]
fn smollm_chat_prompt_and_specials() {
    let Some(tok) = smollm() else { return };
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(prompt, true, true).expect("encode");
    assert_eq!(
        ids,
        [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    );
    assert_eq!(tok.decode(&ids, false).expect("decode"), prompt);
    assert_eq!(
        tok.decode(&ids, true).expect("decode"),
        "user\nWhat is the capital of France?\nassistant\n"
    );
    assert!(!tok.adds_bos());
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert_eq!(tok.bos_text(), Some("<|im_start|>"));
    assert_eq!(tok.eos_text(), Some("<|im_end|>"));
    assert!(
        tok.is_eog(2) && tok.is_eog(0),
        "<|im_end|> and <|endoftext|> end generation"
    );
    assert!(!tok.is_eog(1));
    assert!(tok.is_special(1) && !tok.is_special(4093));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_text(905), Some("Ġworld"));
    assert_eq!(tok.token_bytes(905).as_deref(), Some(&b" world"[..]));
    // Without parse_special the markers are plain text.
    let plain = tok.encode("<|im_start|>", false, false).expect("encode");
    assert!(!plain.contains(&1));
    assert_eq!(tok.decode(&plain, false).expect("decode"), "<|im_start|>");
}

#[test]
fn gemma_specials() {
    let Some(tok) = gemma() else { return };
    assert_eq!(tok.vocab_size(), 262144);
    assert!(tok.adds_bos());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(2), Some(1)));
    assert_eq!(
        tok.encode("Hello world", true, false).expect("encode"),
        [2, 9259, 1902]
    );
    let eot = tok.token_id("<end_of_turn>").expect("<end_of_turn>");
    assert!(tok.is_eog(eot) && tok.is_eog(1));
    assert_eq!(tok.eog_ids(), vec![1, eot]);
    // Byte tokens decode to single bytes.
    assert_eq!(
        tok.token_bytes(tok.token_id("<0x41>").expect("byte token"))
            .as_deref(),
        Some(&b"A"[..])
    );
}

#[test]
fn stream_decoder_holds_split_characters() {
    let Some(tok) = gemma() else { return };
    // Characters outside the vocabulary fall back to byte tokens, one token per byte.
    let s = "a\u{10FFFD}b𝔸𝔹z";
    let ids = tok.encode(s, false, false).expect("encode");
    assert!(ids.len() > 6, "expected byte fallback tokens in {ids:?}");
    let mut sd = StreamDecoder::new(&tok, true);
    let mut streamed = String::new();
    for &id in &ids {
        let part = sd.push(id);
        assert!(!part.contains('\u{FFFD}'));
        streamed.push_str(&part);
    }
    streamed.push_str(&sd.flush());
    assert_eq!(streamed, tok.decode(&ids, true).expect("decode"));
    assert_eq!(streamed, s);
}

#[test]
fn encoding_is_fast() {
    let mut text = String::new();
    while text.len() < 10_000 {
        for s in CORPUS {
            text.push_str(s);
            text.push(' ');
        }
    }
    for tok in [smollm(), gemma()].into_iter().flatten() {
        let t0 = Instant::now();
        let ids = tok.encode(&text, true, true).expect("encode");
        let dt = t0.elapsed();
        eprintln!("{} bytes -> {} tokens in {dt:?}", text.len(), ids.len());
        assert!(dt.as_millis() < 500, "encoding 10 KB took {dt:?}");
        assert_eq!(tok.decode(&ids, true).expect("decode"), text);
    }
}
