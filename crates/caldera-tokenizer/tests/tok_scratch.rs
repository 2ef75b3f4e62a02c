use caldera_format::gguf::GgufFile;
use caldera_tokenizer::Tokenizer;
use std::time::Instant;
#[test]
fn scratch() {
    let mut text = String::new();
    let corpus = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tok_models.rs")).unwrap();
    while text.len() < 10_000 { text.push_str(&corpus[..2000]); }
    for f in ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"] {
        let g = GgufFile::open(std::path::Path::new(&format!("/work/models/{f}"))).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        for _ in 0..3 {
            let t0 = Instant::now();
            let ids = tok.encode(&text, false, false).unwrap();
            eprintln!("{f}: {} tokens {:?}", ids.len(), t0.elapsed());
        }
        let t0 = Instant::now();
        let ids = tok.encode(&"a".repeat(10000), false, false).unwrap();
        eprintln!("{f}: aaaa {} tokens {:?}", ids.len(), t0.elapsed());
        let t0 = Instant::now();
        let ids = tok.encode(&" ".repeat(10000), false, false).unwrap();
        eprintln!("{f}: spaces {} tokens {:?}", ids.len(), t0.elapsed());
        let mut big = " ".repeat(1_000_000); big.push('x'); big.push_str(&"\n\t ".repeat(100000)); big.push_str(&"ab1".repeat(100000));
        let t0 = Instant::now();
        let ids = tok.encode(&big, false, true);
        eprintln!("{f}: big {:?} tokens {:?}", ids.map(|v| v.len()), t0.elapsed());
        let t0 = Instant::now();
        let ids = tok.encode(&"<".repeat(10000), false, true).unwrap();
        eprintln!("{f}: <<<< {} tokens {:?}", ids.len(), t0.elapsed());
    }
}
