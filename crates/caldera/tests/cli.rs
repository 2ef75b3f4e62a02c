//! End-to-end tests of the `caldera` binary: fixtures, real models, hostile files.

mod common;

use std::process::Output;

use common::{bin, fixtures, model, text};

/// The file's own chat template adds a default system prompt ("You are a helpful AI
/// assistant named SmolLM, ..."); with it the Q4_1 model's greedy answer starts
/// "L'Étoile" in llama.cpp (llama-cpp-python 0.3.36) as in caldera: its top-2 logits are
/// within 0.1. With a plain system prompt both answer "The capital of France is Paris."
#[test]
fn smollm2_answers_paris() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let o = bin()
        .arg("run")
        .arg(&m)
        .args([
            "-p",
            "What is the capital of France?",
            "-n",
            "16",
            "--temp",
            "0",
            "-t",
            "2",
        ])
        .args(["--system", "You are a helpful assistant."])
        .output()
        .expect("running caldera");
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Paris"), "{}", text(&o));
}

#[test]
fn gemma3_continues_the_story() {
    let Some(m) = model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let o = bin()
        .arg("run")
        .arg(&m)
        .args([
            "--raw",
            "-p",
            "Once upon a time, there was a little",
            "-n",
            "4",
            "--temp",
            "0",
            "-t",
            "2",
        ])
        .output()
        .expect("running caldera");
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with(" girl named Lily"), "{}", text(&o));
}

#[test]
fn inspect_lists_tensors() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let o = bin()
        .arg("inspect")
        .arg(&m)
        .output()
        .expect("running caldera");
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("token_embd.weight") && out.contains("Q4_1"),
        "{}",
        text(&o)
    );
    assert!(out.contains("272 tensors"), "{}", text(&o));
}

/// A damaged file is an error with a message and exit code 1 or 2, never a panic (101).
fn assert_clean_failure(o: &Output) {
    let code = o.status.code();
    assert!(matches!(code, Some(1) | Some(2)), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("error"), "{}", text(o));
    assert!(!err.contains("panicked"), "{}", text(o));
}

#[test]
fn damaged_gguf_files_fail_cleanly() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let bytes = std::fs::read(&m).expect("reading the model");
    let dir = std::env::temp_dir().join(format!("caldera-damaged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        (
            "magic".into(),
            b"GGUX"
                .iter()
                .copied()
                .chain(bytes[4..4096].iter().copied())
                .collect(),
        ),
    ];
    for cut in [
        3usize,
        24,
        1000,
        100_000,
        2_000_000,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        cases.push((format!("cut{cut}"), bytes[..cut].to_vec()));
    }
    // Corrupt the tensor count and the first key's length.
    let mut c = bytes[..1 << 20].to_vec();
    c[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("count".into(), c));
    let mut c = bytes[..1 << 20].to_vec();
    c[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    cases.push(("keylen".into(), c));
    for (name, data) in &cases {
        let p = dir.join(format!("{name}.gguf"));
        std::fs::write(&p, data).unwrap();
        for args in [
            vec!["inspect".to_string(), p.display().to_string()],
            vec![
                "run".into(),
                p.display().to_string(),
                "-p".into(),
                "hi".into(),
                "-n".into(),
                "2".into(),
            ],
        ] {
            let o = bin().args(&args).output().expect("running caldera");
            assert_clean_failure(&o);
        }
        if let Some(f) = fixtures() {
            let o = bin()
                .arg("verify")
                .arg(f.join("llama"))
                .arg("--model")
                .arg(&p)
                .output()
                .expect("running caldera");
            assert_clean_failure(&o);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--kv-type` f16 or q8_0 applies to the Vulkan backend: the CPU backend (whose cache is
/// f32) refuses it with exit code 2 and a message, and takes `--kv-type f32`.
#[test]
fn cpu_refuses_a_q8_0_kv_cache() {
    let Some(fx) = fixtures() else {
        return;
    };
    let run = |kv: &str| {
        bin()
            .args(["verify", "--backend", "cpu", "-t", "2", "--kv-type", kv])
            .arg(fx.join("llama"))
            .output()
            .expect("running caldera")
    };
    let o = run("q8_0");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--kv-type q8_0 applies to the Vulkan backend"),
        "{}",
        text(&o)
    );
    assert!(run("f32").status.success());
}
