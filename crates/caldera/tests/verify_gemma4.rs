//! `caldera verify` on the gemma4 fixture: from the HF folder, and from a GGUF written
//! by `caldera convert` (f32, so the tolerance stays 1e-4).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_caldera"))
}

fn fixture(arch: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/hf")
        .join(arch);
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: no fixture at {}", p.display());
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

#[test]
fn verify_gemma4_fixture_cpu() {
    let Some(dir) = fixture("gemma4") else { return };
    let o = bin()
        .args(["verify", "--threads", "2"])
        .arg(&dir)
        .output()
        .expect("running caldera");
    assert_pass(&o);
}

#[test]
fn verify_gemma4_converted_gguf_cpu() {
    let Some(dir) = fixture("gemma4") else { return };
    let gguf = std::env::temp_dir().join(format!("caldera-gemma4-{}.gguf", std::process::id()));
    let o = bin()
        .args(["convert", "--type", "f32"])
        .arg(&dir)
        .arg(&gguf)
        .output()
        .expect("running caldera");
    assert!(o.status.success(), "{}", text(&o));
    let o = bin()
        .args(["verify", "--threads", "2", "--model"])
        .arg(&gguf)
        .arg(&dir)
        .output()
        .expect("running caldera");
    let _ = std::fs::remove_file(&gguf);
    assert_pass(&o);
}
