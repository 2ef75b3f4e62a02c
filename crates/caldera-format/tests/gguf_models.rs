//! The real model files (SmolLM2-135M Q4_1 and gemma-3-270m Q4_K_M): known facts, and a
//! rewrite through `GgufWriter` that must reproduce metadata and tensor bytes. Skipped
//! with a message when the files are absent; `CALDERA_MODELS` names their folder.

use std::path::PathBuf;

use caldera_format::gguf::{GgufFile, GgufValueType, GgufWriter, TensorSource};
use caldera_format::GgmlType;

fn model(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CALDERA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let path = dir.join(name);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} not found (set CALDERA_MODELS)",
            path.display()
        );
        None
    }
}

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

#[test]
fn smollm2_facts() {
    let Some(path) = model(SMOLLM2) else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.data_offset, 1_785_664);
    assert_eq!(f.get_u64("llama.block_count"), Some(30));
    assert_eq!(f.get_u64("llama.embedding_length"), Some(576));
    assert_eq!(f.get_f32("llama.rope.freq_base"), Some(100000.0));
    assert_eq!(f.get_str("tokenizer.ggml.pre"), Some("smollm"));
    assert_eq!(f.get_bool("tokenizer.ggml.add_bos_token"), Some(false));
    assert!(f
        .get_str("tokenizer.chat_template")
        .unwrap()
        .contains("im_start"));
    let toks = f
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_str_array()
        .unwrap();
    assert_eq!(toks.len(), 49152);
    let types = f
        .get("tokenizer.ggml.token_type")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!((types.elem_type, types.len()), (GgufValueType::I32, 49152));
    assert_eq!(
        f.get("tokenizer.ggml.merges")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        48900
    );
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ty, GgmlType::Q8_0);
    assert_eq!(emb.dims, [576, 49152]);
    assert_eq!(emb.n_bytes, 30_081_024);
    assert_eq!(f.tensor_bytes(emb).len(), 30_081_024);
    let down = f.tensor("blk.0.ffn_down.weight").unwrap();
    assert_eq!(
        (down.ty, &down.dims[..]),
        (GgmlType::Q4_1, &[1536u64, 576][..])
    );
    let count = |ty| f.tensors().iter().filter(|t| t.ty == ty).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );
    let end = f
        .tensors()
        .iter()
        .map(|t| f.data_offset + t.offset + t.n_bytes)
        .max();
    assert_eq!(end, Some(f.file_size()));
}

#[test]
fn gemma3_facts() {
    let Some(path) = model(GEMMA3) else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.architecture(), Some("gemma3"));
    assert_eq!(f.tensors().len(), 236);
    assert_eq!(f.get_u64("gemma3.attention.key_length"), Some(256));
    assert_eq!(f.get_u64("gemma3.attention.sliding_window"), Some(512));
    assert_eq!(f.get_str("tokenizer.ggml.model"), Some("llama"));
    let toks = f
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_str_array()
        .unwrap();
    assert_eq!(toks.len(), 262144);
    let scores = f
        .get("tokenizer.ggml.scores")
        .unwrap()
        .as_f32_array()
        .unwrap();
    assert_eq!(scores.len(), 262144);
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (emb.ty, &emb.dims[..]),
        (GgmlType::Q8_0, &[640u64, 262144][..])
    );
    for ty in [
        GgmlType::F32,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        assert!(f.tensors().iter().any(|t| t.ty == ty), "{ty}");
    }
}

/// Re-writes SmolLM2 from views into its map; the result parses to the same metadata and
/// tensor bytes, and (same alignment, same padding rules) is byte-identical.
#[test]
fn smollm2_rewrite_is_identical() {
    let Some(path) = model(SMOLLM2) else { return };
    let f = GgufFile::open(&path).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.set(k, v.clone());
    }
    for t in f.tensors() {
        w.add_tensor(
            &t.name,
            t.ty,
            &t.dims,
            TensorSource::View(f.tensor_bytes(t)),
        )
        .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("caldera-gguf-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("rewrite.gguf");
    w.write_file(&out).unwrap();
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.metadata(), f.metadata());
    assert_eq!(g.tensors().len(), f.tensors().len());
    for (a, b) in f.tensors().iter().zip(g.tensors()) {
        assert_eq!((&a.name, a.ty, &a.dims), (&b.name, b.ty, &b.dims));
        assert!(
            f.tensor_bytes(a).as_slice() == g.tensor_bytes(b).as_slice(),
            "{}",
            a.name
        );
    }
    assert!(
        f.storage()[..] == g.storage()[..],
        "rewrite is byte-identical"
    );
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}
