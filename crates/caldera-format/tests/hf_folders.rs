//! Hugging Face folders: the transformers fixtures, a synthetic sharded folder, and
//! hostile folders that must fail with an error, never a panic or a read outside.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use caldera_format::hf::{is_hf_dir, open_safetensors, HfModel};
use caldera_format::{FormatError, GgmlType};
use safetensors::tensor::{Dtype, TensorView};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures/hf");

/// A fresh empty folder under the target's test scratch space.
fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "hf-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Serialized safetensors bytes of `(name, dtype, shape, raw bytes)`.
fn safetensors_bytes(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect()
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

const CONFIG: &str = r#"{"model_type": "llama", "auto_map": {"AutoModel": "evil.Model"}}"#;

fn invalid(r: Result<HfModel, FormatError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn fixtures_open() {
    let root = Path::new(FIXTURES);
    if !root.is_dir() {
        eprintln!("skip: {FIXTURES} is absent");
        return;
    }
    let mut n = 0;
    for entry in std::fs::read_dir(root).unwrap() {
        let dir = entry.unwrap().path();
        if !is_hf_dir(&dir) {
            continue;
        }
        let m = HfModel::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(m.model_type().is_some(), "{}", dir.display());
        assert!(!m.tensors.is_empty());
        for t in &m.tensors {
            assert!(matches!(
                t.ty,
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16
            ));
            let elems: usize = t.shape.iter().product();
            assert_eq!(elems * t.ty.type_size(), t.data.len(), "{}", t.name);
            assert!(std::ptr::eq(m.tensor(&t.name).unwrap(), t));
        }
        n += 1;

        let reference = dir.join("reference.safetensors");
        if reference.is_file() {
            let r = open_safetensors(&reference).unwrap();
            let ids = r.iter().find(|t| t.name == "input_ids").unwrap();
            assert_eq!(ids.ty, GgmlType::I64);
            let ids = ids.to_i64_vec().unwrap();
            let logits = r.iter().find(|t| t.name == "prefill_logits").unwrap();
            assert_eq!(logits.ty, GgmlType::F32);
            assert_eq!(logits.shape[0], ids.len());
            let vals = logits.to_f32_vec().unwrap();
            assert_eq!(vals.len(), logits.shape.iter().product::<usize>());
            assert!(vals.iter().all(|x| x.is_finite()));
            assert!(logits.to_i64_vec().is_err());
        }
    }
    eprintln!("opened {n} fixture folders");
    assert!(n > 0);
}

#[test]
fn llama_fixture_shapes() {
    let dir = Path::new(FIXTURES).join("llama");
    if !dir.is_dir() {
        eprintln!("skip: {} is absent", dir.display());
        return;
    }
    let m = HfModel::open(&dir).unwrap();
    assert_eq!(m.model_type(), Some("llama"));
    assert_eq!(m.config["hidden_size"], 128);
    let e = m.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(e.ty, GgmlType::BF16);
    assert_eq!(e.shape, vec![512, 128]);
    assert_eq!(e.data.len(), 512 * 128 * 2);
    let down = m.tensor("model.layers.0.mlp.down_proj.weight").unwrap();
    assert_eq!(down.shape, vec![128, 288]);
    let norm = m.tensor("model.layers.0.input_layernorm.weight").unwrap();
    assert_eq!(norm.shape, vec![128]);
    assert_eq!(norm.to_f32_vec().unwrap().len(), 128);
    assert!(m.tensor("no.such.tensor").is_none());

    let r = open_safetensors(&dir.join("reference.safetensors")).unwrap();
    let ids = r.iter().find(|t| t.name == "greedy_ids").unwrap();
    assert_eq!(ids.shape, vec![16]);
    assert_eq!(&ids.to_i64_vec().unwrap()[..4], &[57, 452, 413, 433]);
}

/// Two shards, an index, tokenizer files and a chat template.
#[test]
fn synthetic_sharded_folder() {
    let dir = scratch("sharded");
    write(&dir, "config.json", CONFIG);
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..4).map(|i| -(i as f32)).collect();
    write(
        &dir,
        "model-00001-of-00002.safetensors",
        safetensors_bytes(&[
            ("w.a", Dtype::F32, vec![2, 3], f32_bytes(&a)),
            ("w.b", Dtype::BF16, vec![4], bf16_bytes(&b)),
        ]),
    );
    let h: Vec<u8> = [1.0f32, 2.0, -3.5]
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    write(
        &dir,
        "model-00002-of-00002.safetensors",
        safetensors_bytes(&[("w.c", Dtype::F16, vec![3, 1], h)]),
    );
    write(
        &dir,
        "model.safetensors.index.json",
        r#"{"metadata": {"total_size": 38}, "weight_map": {
            "w.a": "model-00001-of-00002.safetensors",
            "w.c": "model-00002-of-00002.safetensors",
            "w.b": "model-00001-of-00002.safetensors"}}"#,
    );
    write(&dir, "tokenizer.json", r#"{"model": {"type": "BPE"}}"#);
    write(
        &dir,
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    );
    write(&dir, "generation_config.json", r#"{"temperature": 0.6}"#);
    write(&dir, "pytorch_model.bin", "never read");

    assert!(is_hf_dir(&dir));
    let m = HfModel::open(&dir).unwrap();
    let names: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["w.a", "w.b", "w.c"]);
    assert_eq!(m.tensor("w.a").unwrap().to_f32_vec().unwrap(), a);
    assert_eq!(m.tensor("w.a").unwrap().shape, vec![2, 3]);
    assert_eq!(m.tensor("w.b").unwrap().ty, GgmlType::BF16);
    assert_eq!(m.tensor("w.b").unwrap().to_f32_vec().unwrap(), b);
    let c = m.tensor("w.c").unwrap();
    assert_eq!((c.ty, c.shape.clone()), (GgmlType::F16, vec![3, 1]));
    assert_eq!(c.to_f32_vec().unwrap(), vec![1.0, 2.0, -3.5]);
    assert_eq!(m.model_type(), Some("llama"));
    assert!(m.tokenizer_json.as_deref().unwrap().contains("BPE"));
    assert_eq!(m.generation_config.as_ref().unwrap()["temperature"], 0.6);
    assert_eq!(m.chat_template().as_deref(), Some("D"));

    // A chat_template.jinja file wins over tokenizer_config.json.
    write(&dir, "chat_template.jinja", "{{ messages }}");
    let m = HfModel::open(&dir).unwrap();
    assert_eq!(m.chat_template().as_deref(), Some("{{ messages }}"));
}

#[test]
fn single_file_and_string_template() {
    let dir = scratch("single");
    write(&dir, "config.json", r#"{"model_type": "qwen3"}"#);
    write(
        &dir,
        "model.safetensors",
        safetensors_bytes(&[("x", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))]),
    );
    write(&dir, "tokenizer_config.json", r#"{"chat_template": "S"}"#);
    let m = HfModel::open(&dir).unwrap();
    assert_eq!(m.chat_template().as_deref(), Some("S"));
    assert_eq!(m.model_type(), Some("qwen3"));
    assert!(m.tokenizer_json.is_none());
    assert_eq!(m.tensors.len(), 1);

    // The list form without a "default" entry gives no template.
    write(
        &dir,
        "tokenizer_config.json",
        r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#,
    );
    assert_eq!(HfModel::open(&dir).unwrap().chat_template(), None);

    // The processor-style chat_template.json comes last.
    write(&dir, "chat_template.json", r#"{"chat_template": "J"}"#);
    assert_eq!(
        HfModel::open(&dir).unwrap().chat_template().as_deref(),
        Some("J")
    );
}

/// A folder with a valid config and one valid shard, and `index` as its index.
fn folder_with_index(tag: &str, index: &str) -> PathBuf {
    let dir = scratch(tag);
    write(&dir, "config.json", CONFIG);
    write(
        &dir,
        "s1.safetensors",
        safetensors_bytes(&[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]),
    );
    write(&dir, "model.safetensors.index.json", index);
    dir
}

#[test]
fn index_cannot_leave_the_folder() {
    let outer = scratch("outer");
    write(
        &outer,
        "x",
        safetensors_bytes(&[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]),
    );
    let outside = outer.join("x");
    for shard in [
        "../x".to_string(),
        "sub/../../x".to_string(),
        outside.display().to_string(),
        "./s1.safetensors".to_string(),
        String::new(),
    ] {
        let index = serde_json::json!({"weight_map": {"a": shard}}).to_string();
        let dir = folder_with_index("escape", &index);
        let e = invalid(HfModel::open(&dir));
        assert!(e.contains("inside the folder"), "{shard}: {e}");
    }
}

#[test]
fn hostile_indexes() {
    let cases = [
        (r#"{"weight_map": {"a": "missing.safetensors"}}"#, "missing"),
        (
            r#"{"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}"#,
            "missing from shard",
        ),
        (r#"{"weight_map": {"a": 3}}"#, "not a string"),
        (r#"{"weight_map": {}}"#, "empty"),
        (r#"{"weight_map": []}"#, "weight_map"),
        (r#"{"nothing": 1}"#, "weight_map"),
        (r#"[1, 2"#, "bad JSON"),
    ];
    for (index, want) in cases {
        let dir = folder_with_index("hostile", index);
        let e = invalid(HfModel::open(&dir));
        assert!(e.contains(want), "{index}: {e}");
    }
}

#[test]
fn duplicate_tensor_across_shards() {
    let dir = folder_with_index(
        "dup",
        r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
    );
    write(
        &dir,
        "s2.safetensors",
        safetensors_bytes(&[
            ("a", Dtype::F32, vec![1], f32_bytes(&[2.0])),
            ("b", Dtype::F32, vec![1], f32_bytes(&[3.0])),
        ]),
    );
    assert!(matches!(
        HfModel::open(&dir),
        Err(FormatError::Duplicate { .. })
    ));
}

#[test]
fn tensor_listed_in_the_wrong_shard() {
    let dir = folder_with_index(
        "wrong",
        r#"{"weight_map": {"a": "s2.safetensors", "b": "s1.safetensors"}}"#,
    );
    write(
        &dir,
        "s2.safetensors",
        safetensors_bytes(&[("b", Dtype::F32, vec![1], f32_bytes(&[3.0]))]),
    );
    let e = invalid(HfModel::open(&dir));
    assert!(e.contains("listed in shard"), "{e}");
}

fn with_weights(tag: &str, bytes: &[u8]) -> PathBuf {
    let dir = scratch(tag);
    write(&dir, "config.json", CONFIG);
    write(&dir, "model.safetensors", bytes);
    dir
}

#[test]
fn malformed_safetensors() {
    let good = safetensors_bytes(&[
        (
            "a",
            Dtype::F32,
            vec![2, 2],
            f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
        ),
        ("b", Dtype::BF16, vec![2], bf16_bytes(&[1.0, 2.0])),
    ]);
    assert!(HfModel::open(&with_weights("good", &good)).is_ok());

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("short", vec![1, 0, 0]),
        ("truncated", good[..good.len() - 3].to_vec()),
        ("trailing", [good.as_slice(), &[0u8; 8]].concat()),
    ];
    // Header length absurd: 2^60 and u64::MAX, and one just past the file end.
    for n in [1u64 << 60, u64::MAX, good.len() as u64] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        cases.push(("absurd header length", b));
    }
    // Hand-written headers: overlapping, gapped, oversized, negative, non-UTF-8 / non-JSON.
    let hand = |header: &str, data_len: usize| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data_len, 0);
        b
    };
    cases.push((
        "overlap",
        hand(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ),
    ));
    cases.push((
        "gap",
        hand(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        ),
    ));
    cases.push((
        "shape too big",
        hand(
            r#"{"a":{"dtype":"F32","shape":[4398046511105, 4398046511105],"data_offsets":[0,4]}}"#,
            4,
        ),
    ));
    cases.push((
        "negative",
        hand(
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            4,
        ),
    ));
    cases.push((
        "end before begin",
        hand(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
            4,
        ),
    ));
    cases.push(("not json", hand("{{{{", 0)));
    cases.push((
        "unknown dtype",
        hand(
            r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        ),
    ));
    let mut bad_utf8 = hand(r#"{"a":1}"#, 0);
    bad_utf8[9] = 0xff;
    cases.push(("bad utf-8", bad_utf8));

    for (what, bytes) in cases {
        let r = HfModel::open(&with_weights("bad", &bytes));
        assert!(matches!(r, Err(FormatError::Invalid(_))), "{what}: {r:?}");
    }
}

#[test]
fn unsupported_dtypes() {
    for (dtype, n) in [
        (Dtype::F8_E4M3, 4),
        (Dtype::I8, 4),
        (Dtype::U8, 4),
        (Dtype::I64, 32),
        (Dtype::F64, 32),
        (Dtype::BOOL, 4),
    ] {
        let bytes = safetensors_bytes(&[
            ("ok", Dtype::F32, vec![1], f32_bytes(&[1.0])),
            ("q.weight", dtype, vec![4], vec![0; n]),
        ]);
        let e = invalid(HfModel::open(&with_weights("dtype", &bytes)));
        assert!(e.starts_with("unsupported"), "{dtype}: {e}");
        assert!(
            e.contains("q.weight") && e.contains(&dtype.to_string()),
            "{e}"
        );
    }
    // open_safetensors reads integer and F64 reference tensors, not U8 or F8.
    let dir = scratch("ref");
    let p = dir.join("r.safetensors");
    std::fs::write(
        &p,
        safetensors_bytes(&[
            (
                "i",
                Dtype::I32,
                vec![2],
                [-7i32, 9].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            ("d", Dtype::F64, vec![1], 0.25f64.to_le_bytes().to_vec()),
            ("c", Dtype::I8, vec![2], vec![0xff, 3]),
        ]),
    )
    .unwrap();
    let r = open_safetensors(&p).unwrap();
    let get = |n: &str| r.iter().find(|t| t.name == n).unwrap();
    assert_eq!(get("i").to_i64_vec().unwrap(), vec![-7, 9]);
    assert_eq!(get("d").to_f32_vec().unwrap(), vec![0.25]);
    assert_eq!(get("c").to_i64_vec().unwrap(), vec![-1, 3]);
    assert_eq!(get("c").n_elements(), 2);
    std::fs::write(&p, safetensors_bytes(&[("u", Dtype::U8, vec![1], vec![1])])).unwrap();
    assert!(matches!(
        open_safetensors(&p),
        Err(FormatError::Unsupported(_))
    ));
}

#[test]
fn pickle_only_and_missing_pieces() {
    let dir = scratch("pickle");
    write(&dir, "config.json", CONFIG);
    write(&dir, "pytorch_model.bin", b"\x80\x02cos\nsystem\n");
    let e = invalid(HfModel::open(&dir));
    assert!(e.contains("only safetensors weights are read"), "{e}");

    let dir = scratch("noweights");
    write(&dir, "config.json", CONFIG);
    assert!(invalid(HfModel::open(&dir)).contains("no model.safetensors"));

    let dir = scratch("noconfig");
    assert!(!is_hf_dir(&dir));
    assert!(invalid(HfModel::open(&dir)).contains("config.json"));
    assert!(!is_hf_dir(&dir.join("nonexistent")));

    let dir = with_weights(
        "badconfig",
        &safetensors_bytes(&[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]),
    );
    write(&dir, "config.json", "[1]");
    assert!(invalid(HfModel::open(&dir)).contains("JSON object"));
    write(&dir, "config.json", "{");
    assert!(invalid(HfModel::open(&dir)).contains("bad JSON"));
    write(&dir, "config.json", "{}");
    write(&dir, "tokenizer_config.json", "{");
    assert!(invalid(HfModel::open(&dir)).contains("tokenizer_config.json"));
}
