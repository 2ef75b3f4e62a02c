//! `caldera verify` on the LFM2 fixtures (`lfm2`, `lfm2_moe`): from the HF folder, and
//! from GGUF files converted from it (f32, bf16) with llama.cpp's names and keys.

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

fn assert_pass(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("PASS"),
        "{}",
        text(o)
    );
}

fn verify_fixture(arch: &str) {
    let Some(dir) = fixtures() else { return };
    let o = bin()
        .args(["verify", "--threads", "2"])
        .arg(dir.join(arch))
        .output()
        .expect("running caldera");
    assert_pass(&o);
}

/// Converts the fixture to GGUF of each type and verifies the file against the folder's
/// reference.
fn verify_converted(arch: &str) {
    let Some(dir) = fixtures() else { return };
    let folder = dir.join(arch);
    for ty in ["f32", "bf16"] {
        let gguf =
            std::env::temp_dir().join(format!("caldera-{arch}-{ty}-{}.gguf", std::process::id()));
        let o = bin()
            .arg("convert")
            .arg(&folder)
            .arg(&gguf)
            .args(["--type", ty])
            .output()
            .expect("running caldera convert");
        assert!(o.status.success(), "{}", text(&o));
        let o = bin()
            .args(["verify", "--threads", "2"])
            .arg(&folder)
            .arg("--model")
            .arg(&gguf)
            .output()
            .expect("running caldera verify");
        let _ = std::fs::remove_file(&gguf);
        assert_pass(&o);
    }
}

#[test]
fn verify_lfm2_fixture_cpu() {
    verify_fixture("lfm2");
}

#[test]
fn verify_lfm2_moe_fixture_cpu() {
    verify_fixture("lfm2_moe");
}

#[test]
fn verify_lfm2_converted_gguf() {
    verify_converted("lfm2");
}

#[test]
fn verify_lfm2_moe_converted_gguf() {
    verify_converted("lfm2_moe");
}
