//! Arbitrary vocabularies and texts into the tokenizer. The input is split at 0xFF bytes:
//! the first part picks the model (BPE or SentencePiece-style) and flags, the next parts
//! are token strings (each prefixed by a token-type byte), merges ("a b" from pairs of
//! tokens named by byte indices) and, last, a text to encode. A vocabulary that loads
//! must encode any text without panicking, and decoding must give back valid UTF-8.

#![no_main]

use caldera_format::gguf::{GgufFile, GgufValue, GgufWriter};
use caldera_tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xFF);
    let head = parts.next().unwrap_or(&[]);
    let spm = head.first().is_some_and(|b| b & 1 == 1);
    let parse_special = head.first().is_some_and(|b| b & 2 == 2);
    let mut rest: Vec<&[u8]> = parts.collect();
    let text = rest.pop().unwrap_or(&[]);
    if rest.len() > 512 {
        return;
    }
    let mut tokens = Vec::new();
    let mut types = Vec::new();
    for p in &rest {
        let (ty, s) = p.split_first().unwrap_or((&1, &[]));
        tokens.push(String::from_utf8_lossy(s).into_owned());
        types.push((*ty % 8) as i32);
    }
    let mut merges = Vec::new();
    for pair in head.get(1..).unwrap_or(&[]).chunks_exact(2).take(256) {
        let (a, b) = (pair[0] as usize, pair[1] as usize);
        if let (Some(x), Some(y)) = (tokens.get(a), tokens.get(b)) {
            merges.push(format!("{x} {y}"));
        }
    }
    let mut w = GgufWriter::new();
    w.set("general.architecture", GgufValue::from("llama"));
    w.set("tokenizer.ggml.model", GgufValue::from(if spm { "llama" } else { "gpt2" }));
    w.set("tokenizer.ggml.pre", GgufValue::from("default"));
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    w.set("tokenizer.ggml.tokens", GgufValue::str_array(&refs));
    w.set("tokenizer.ggml.token_type", GgufValue::i32_array(&types));
    if spm {
        let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        w.set("tokenizer.ggml.scores", GgufValue::f32_array(&scores));
    } else {
        let m: Vec<&str> = merges.iter().map(String::as_str).collect();
        w.set("tokenizer.ggml.merges", GgufValue::str_array(&m));
    }
    if let Some(&b) = head.get(1) {
        w.set("tokenizer.ggml.bos_token_id", GgufValue::U32(b as u32));
    }
    let mut bytes = Vec::new();
    if w.write_to(&mut bytes).is_err() {
        return;
    }
    let Ok(f) = GgufFile::from_bytes(bytes) else { return };
    let Ok(tok) = Tokenizer::from_gguf(&f) else { return };
    let text = String::from_utf8_lossy(text);
    if let Ok(ids) = tok.encode(&text, true, parse_special) {
        for &id in &ids {
            assert!((id as usize) < tok.vocab_size(), "id {id} out of range");
        }
        let _ = tok.decode(&ids, false);
        let _ = tok.decode(&ids, true);
    }
});
