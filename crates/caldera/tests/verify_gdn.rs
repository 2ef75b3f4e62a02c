//! GatedDeltaNet hybrids against their transformers fixtures (`qwen3_5`, `qwen3_5_moe`,
//! `qwen3_next`), from the HF folder and from a converted GGUF file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_caldera"))
}

fn fixtures() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: no fixtures at {}", p.display());
        None
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn verify_fixture(arch: &str) {
    let Some(dir) = fixtures() else { return };
    let o = bin()
        .args(["verify", "--threads", "2"])
        .arg(dir.join(arch))
        .output()
        .expect("running caldera");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("PASS"),
        "{}",
        text(&o)
    );
}

/// Converts the fixture to GGUF (bf16: the fixture's own weights) and verifies that file
/// against the folder's reference.
fn convert_and_verify(arch: &str) {
    let Some(dir) = fixtures() else { return };
    let tmp = std::env::temp_dir().join(format!("caldera-gdn-{}-{arch}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let out = tmp.join(format!("{arch}.gguf"));
    let o = bin()
        .arg("convert")
        .arg(dir.join(arch))
        .arg(&out)
        .args(["--type", "bf16"])
        .output()
        .expect("running caldera convert");
    assert!(o.status.success(), "convert {arch}: {}", text(&o));
    let o = bin()
        .arg("verify")
        .arg(dir.join(arch))
        .arg("--model")
        .arg(&out)
        .args(["--threads", "2"])
        .output()
        .expect("running caldera verify");
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(o.status.success(), "verify {arch} gguf: {}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("PASS"),
        "{}",
        text(&o)
    );
}

#[test]
fn verify_qwen3_5_fixture_cpu() {
    verify_fixture("qwen3_5");
}

#[test]
fn verify_qwen3_5_moe_fixture_cpu() {
    verify_fixture("qwen3_5_moe");
}

#[test]
fn verify_qwen3_next_fixture_cpu() {
    verify_fixture("qwen3_next");
}

#[test]
fn verify_qwen3_5_converted_gguf() {
    convert_and_verify("qwen3_5");
}

#[test]
fn verify_qwen3_next_converted_gguf() {
    convert_and_verify("qwen3_next");
}
