//! What the binary's integration tests share: running `caldera`, finding the fixtures and
//! the real models, and reporting a failed run.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_caldera"))
}

/// `shared/fixtures/hf` beside the checkout, or `None` (with a message) when absent.
pub fn fixtures() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: no fixtures at {}", p.display());
        None
    }
}

/// `$CALDERA_MODELS` or `<repo>/models`.
pub fn models() -> PathBuf {
    std::env::var_os("CALDERA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

/// A real model file, or `None` (with a message) when it has not been fetched.
pub fn model(name: &str) -> Option<PathBuf> {
    let p = models().join(name);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} is missing (scripts/fetch-models.sh fetches it)",
            p.display()
        );
        None
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The run succeeded and `verify` said PASS.
pub fn assert_pass(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("PASS"),
        "{}",
        text(o)
    );
}

/// A temporary folder removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("caldera-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
