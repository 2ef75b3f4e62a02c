//! Small hand-built vocabularies: round trips, merge order, special tokens, malformed
//! metadata (through `from_spec` and through a GGUF file written in memory).

use caldera_format::gguf::{GgufFile, GgufValue, GgufWriter};
use caldera_tokenizer::tokenizer::{ModelSpec, TokenType, VocabSpec};
use caldera_tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

const CORPUS: &[&str] = &[
    "Hello world",
    "Ça va? Élève, naïve café",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "你好，世界！",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "😀👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "fn main() {\n\tlet x = [1, 2];\n}",
    "   \n\n\t  ",
    "12345678",
    "don't I'll",
    "",
];

/// The GPT-2 byte alphabet character of each byte.
fn byte_char(b: u8) -> char {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b as u32) {
        return char::from_u32(b as u32).unwrap_or('?');
    }
    let n = (0..b as u32).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}

/// Control tokens, 256 byte-alphabet tokens, then merges building "Ġw", "or", "ld", "Ġwor",
/// "Ġworld", "he", "ll", "hell", "hello".
fn byte_level_spec() -> VocabSpec {
    let mut tokens: Vec<String> = vec!["<s>".into(), "</s>".into(), "<|im_end|>".into()];
    let mut types = vec![TokenType::Control; 3];
    for b in 0..=255u8 {
        tokens.push(byte_char(b).to_string());
        types.push(TokenType::Normal);
    }
    let merges = [
        "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld", "h e", "l l", "he ll", "hell o", "x y",
    ];
    for m in merges {
        let t: String = m.split(' ').collect();
        if !tokens.contains(&t) {
            tokens.push(t);
            types.push(TokenType::Normal);
        }
    }
    // "x y" merges into a token that does not exist: the merge must be skipped.
    tokens.retain(|t| t != "xy");
    types.truncate(tokens.len());
    tokens.push("<user>".into());
    types.push(TokenType::UserDefined);
    VocabSpec {
        tokens,
        types,
        model: ModelSpec::ByteLevelBpe {
            merges: merges.iter().map(|s| s.to_string()).collect(),
            pre: "gpt2".into(),
        },
        bos: Some(0),
        eos: Some(1),
        eot: None,
        eom: None,
        unk: None,
        add_bos: true,
        add_space_prefix: false,
    }
}

/// Control tokens, 256 byte tokens, and a few SentencePiece pieces with scores.
fn spm_spec() -> VocabSpec {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TokenType::Byte);
        scores.push(0.0);
    }
    let pieces = [
        ("▁", -1.0),
        ("H", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("ll", -3.0),
        ("He", -4.0),
        ("llo", -3.5),
        ("Hello", -5.0),
        ("▁w", -3.0),
        ("or", -3.0),
        ("▁wor", -4.0),
        ("ld", -3.0),
        ("▁world", -4.5),
    ];
    for (p, s) in pieces {
        tokens.push(p.into());
        types.push(TokenType::Normal);
        scores.push(s);
    }
    tokens.push("\n\n".into());
    types.push(TokenType::UserDefined);
    scores.push(0.0);
    VocabSpec {
        tokens,
        types,
        model: ModelSpec::Spm { scores },
        bos: Some(1),
        eos: Some(2),
        eot: None,
        eom: None,
        unk: Some(0),
        add_bos: true,
        add_space_prefix: false,
    }
}

fn round_trip(tok: &Tokenizer) {
    for s in CORPUS {
        let ids = tok.encode(s, false, false).expect("encode");
        assert_eq!(&tok.decode(&ids, false).expect("decode"), s, "{ids:?}");
        let mut sd = StreamDecoder::new(tok, false);
        let mut out = String::new();
        for &id in &ids {
            let part = sd.push(id);
            assert!(!part.contains('\u{FFFD}'));
            out.push_str(&part);
        }
        out.push_str(&sd.flush());
        assert_eq!(&out, s);
    }
}

#[test]
fn byte_level_round_trips_and_merges() {
    let tok = Tokenizer::from_spec(byte_level_spec()).expect("build");
    round_trip(&tok);
    let id = |t: &str| tok.token_id(t).expect(t);
    assert_eq!(
        tok.encode("hello world", true, false).unwrap(),
        [0, id("hello"), id("Ġworld")]
    );
    // "xy" is not merged (its merge names a missing token).
    assert_eq!(tok.encode("xy", false, false).unwrap(), [id("x"), id("y")]);
    // User-defined tokens always match; control tokens only with parse_special.
    assert_eq!(
        tok.encode("a<user>b", false, false).unwrap(),
        [id("a"), id("<user>"), id("b")]
    );
    assert_eq!(tok.encode("</s>", false, true).unwrap(), [1]);
    assert_ne!(tok.encode("</s>", false, false).unwrap(), [1]);
    assert!(tok.is_eog(1) && tok.is_eog(2) && !tok.is_eog(0));
    assert_eq!(tok.decode(&[0, id("hello"), 1], true).unwrap(), "hello");
    assert!(matches!(
        tok.decode(&[9999], false),
        Err(TokenizerError::IdOutOfRange { .. })
    ));
}

#[test]
fn spm_round_trips_and_merges() {
    let tok = Tokenizer::from_spec(spm_spec()).expect("build");
    round_trip(&tok);
    let id = |t: &str| tok.token_id(t).expect(t);
    assert_eq!(
        tok.encode("Hello world", true, false).unwrap(),
        [1, id("Hello"), id("▁world")]
    );
    // "!" is not in the vocabulary: byte fallback.
    assert_eq!(
        tok.encode("Hello!", false, false).unwrap(),
        [id("Hello"), id("<0x21>")]
    );
    assert_eq!(
        tok.encode("d\n\nd", false, false).unwrap(),
        [id("d"), id("\n\n"), id("d")]
    );
    // A 4-byte character split over byte tokens streams without a broken sequence.
    let ids = tok.encode("é😀", false, false).unwrap();
    assert_eq!(ids.len(), 6);
    let mut sd = StreamDecoder::new(&tok, true);
    let parts: Vec<String> = ids.iter().map(|&i| sd.push(i)).collect();
    assert_eq!(parts, ["", "é", "", "", "", "😀"]);
    assert_eq!(sd.flush(), "");
    // Invalid UTF-8 decodes lossily, the same way in both decoders.
    let bad = [id("<0xF0>"), id("<0x9F>"), id("H"), id("<0xFF>")];
    let whole = tok.decode(&bad, false).unwrap();
    let mut sd = StreamDecoder::new(&tok, false);
    let mut streamed: String = bad.iter().map(|&i| sd.push(i)).collect();
    streamed.push_str(&sd.flush());
    assert_eq!(whole, "\u{FFFD}H\u{FFFD}");
    assert_eq!(streamed, whole);
}

#[test]
fn space_prefix_added_and_stripped() {
    let mut spec = spm_spec();
    spec.add_space_prefix = true;
    let tok = Tokenizer::from_spec(spec).unwrap();
    let ids = tok.encode("world", false, false).unwrap();
    assert_eq!(ids, [tok.token_id("▁world").unwrap()]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "world");
}

fn expect_invalid(spec: VocabSpec, what: &str) {
    match Tokenizer::from_spec(spec) {
        Err(TokenizerError::InvalidVocab(msg)) => eprintln!("{what}: {msg}"),
        other => panic!("{what}: expected InvalidVocab, got {other:?}"),
    }
}

#[test]
fn malformed_specs_are_rejected() {
    let mut s = spm_spec();
    s.tokens[3 + 0x41] = "<0x-1>".into();
    expect_invalid(s, "bad byte token");
    let mut s = spm_spec();
    s.tokens[3] = "<0x1>".into();
    expect_invalid(s, "short byte token");
    let mut s = spm_spec();
    s.bos = Some(1_000_000);
    expect_invalid(s, "bos out of range");
    let mut s = byte_level_spec();
    s.eos = Some(u32::MAX);
    expect_invalid(s, "eos out of range");
    let mut s = spm_spec();
    s.types.pop();
    expect_invalid(s, "types shorter than tokens");
    let mut s = spm_spec();
    if let ModelSpec::Spm { scores } = &mut s.model {
        scores.push(1.0);
    }
    expect_invalid(s, "scores longer than tokens");
    let mut s = spm_spec();
    s.tokens.clear();
    s.types.clear();
    s.model = ModelSpec::Spm { scores: vec![] };
    s.bos = None;
    s.eos = None;
    s.unk = None;
    s.add_bos = false;
    expect_invalid(s, "empty vocabulary");
    // Unknown pre-tokenizer names are refused, not guessed.
    let mut s = byte_level_spec();
    s.model = ModelSpec::ByteLevelBpe {
        merges: vec![],
        pre: "no-such-pre".into(),
    };
    assert!(matches!(
        Tokenizer::from_spec(s),
        Err(TokenizerError::Unsupported(_))
    ));
}

type Edit = Box<dyn FnOnce(&mut GgufWriter)>;

fn gguf_of(spec: &VocabSpec, edit: impl FnOnce(&mut GgufWriter)) -> GgufFile {
    let mut w = GgufWriter::new();
    w.set("general.architecture", GgufValue::string("llama"));
    w.set("tokenizer.ggml.tokens", GgufValue::str_array(&spec.tokens));
    let types: Vec<i32> = spec
        .types
        .iter()
        .map(|t| match t {
            TokenType::Normal => 1,
            TokenType::Unknown => 2,
            TokenType::Control => 3,
            TokenType::UserDefined => 4,
            TokenType::Unused => 5,
            TokenType::Byte => 6,
        })
        .collect();
    w.set("tokenizer.ggml.token_type", GgufValue::i32_array(&types));
    match &spec.model {
        ModelSpec::Spm { scores } => {
            w.set("tokenizer.ggml.model", GgufValue::string("llama"));
            w.set("tokenizer.ggml.scores", GgufValue::f32_array(scores));
        }
        ModelSpec::ByteLevelBpe { merges, pre } => {
            w.set("tokenizer.ggml.model", GgufValue::string("gpt2"));
            w.set("tokenizer.ggml.pre", GgufValue::string(pre.clone()));
            w.set("tokenizer.ggml.merges", GgufValue::str_array(merges));
        }
    }
    if let Some(b) = spec.bos {
        w.set("tokenizer.ggml.bos_token_id", GgufValue::U32(b));
    }
    if let Some(e) = spec.eos {
        w.set("tokenizer.ggml.eos_token_id", GgufValue::U32(e));
    }
    w.set(
        "tokenizer.ggml.add_bos_token",
        GgufValue::Bool(spec.add_bos),
    );
    w.set(
        "tokenizer.ggml.add_space_prefix",
        GgufValue::Bool(spec.add_space_prefix),
    );
    edit(&mut w);
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).expect("write gguf");
    GgufFile::from_bytes(bytes).expect("parse gguf")
}

#[test]
fn gguf_vocabularies_load_and_match_specs() {
    for spec in [spm_spec(), byte_level_spec()] {
        let a = Tokenizer::from_spec(spec.clone()).unwrap();
        let b = Tokenizer::from_gguf(&gguf_of(&spec, |_| {})).unwrap();
        for s in CORPUS {
            assert_eq!(
                a.encode(s, true, true).unwrap(),
                b.encode(s, true, true).unwrap()
            );
        }
        assert_eq!(
            (a.bos_id(), a.eos_id(), a.adds_bos()),
            (b.bos_id(), b.eos_id(), b.adds_bos())
        );
    }
}

#[test]
fn malformed_gguf_vocabularies_are_errors() {
    let spec = spm_spec();
    let n = spec.tokens.len();
    let cases: Vec<(&str, Edit)> = vec![
        (
            "bad byte token",
            Box::new(|w: &mut GgufWriter| {
                let mut t = spm_spec().tokens;
                t[10] = "<0x-1>".into();
                w.set("tokenizer.ggml.tokens", GgufValue::str_array(&t));
            }),
        ),
        (
            "bos out of range",
            Box::new(move |w: &mut GgufWriter| {
                w.set("tokenizer.ggml.bos_token_id", GgufValue::U32(n as u32));
            }),
        ),
        (
            "eos negative",
            Box::new(|w: &mut GgufWriter| {
                w.set("tokenizer.ggml.eos_token_id", GgufValue::I32(-7));
            }),
        ),
        (
            "short scores",
            Box::new(|w: &mut GgufWriter| {
                w.set("tokenizer.ggml.scores", GgufValue::f32_array(&[0.0; 5]));
            }),
        ),
        (
            "short token types",
            Box::new(|w: &mut GgufWriter| {
                w.set("tokenizer.ggml.token_type", GgufValue::i32_array(&[1; 5]));
            }),
        ),
        (
            "unknown token type",
            Box::new(move |w: &mut GgufWriter| {
                w.set(
                    "tokenizer.ggml.token_type",
                    GgufValue::i32_array(&vec![9; n]),
                );
            }),
        ),
        (
            "tokens not strings",
            Box::new(|w: &mut GgufWriter| {
                w.set("tokenizer.ggml.tokens", GgufValue::i32_array(&[1, 2, 3]));
            }),
        ),
        (
            "missing tokens",
            Box::new(|w: &mut GgufWriter| {
                w.remove("tokenizer.ggml.tokens");
            }),
        ),
        (
            "unknown model",
            Box::new(|w: &mut GgufWriter| {
                w.set("tokenizer.ggml.model", GgufValue::string("bert"));
            }),
        ),
        (
            "gpt2 without merges",
            Box::new(|w: &mut GgufWriter| {
                w.set("tokenizer.ggml.model", GgufValue::string("gpt2"));
            }),
        ),
    ];
    for (what, edit) in cases {
        match Tokenizer::from_gguf(&gguf_of(&spec, edit)) {
            Err(e) => eprintln!("{what}: {e}"),
            Ok(_) => panic!("{what}: loaded without error"),
        }
    }
}

#[test]
fn hostile_merges_are_skipped() {
    let mut spec = byte_level_spec();
    if let ModelSpec::ByteLevelBpe { merges, .. } = &mut spec.model {
        merges.extend([
            "".into(),
            "nospace".into(),
            "a b c".into(),
            " ".into(),
            "zz qq".into(),
        ]);
    }
    let tok = Tokenizer::from_spec(spec).unwrap();
    round_trip(&tok);
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<StreamDecoder<'static>>();
}
