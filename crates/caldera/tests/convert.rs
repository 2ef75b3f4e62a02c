//! `caldera convert` writes GGUF files that load through the same path as the HF folder:
//! each fixture converted with `--type f32` and `--type bf16` passes `verify` at 1e-4
//! against the folder's own reference.

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

fn convert_and_verify(arch: &str) {
    let Some(dir) = fixtures() else { return };
    let tmp = std::env::temp_dir().join(format!("caldera-convert-{}-{arch}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for ty in ["f32", "bf16"] {
        let out = tmp.join(format!("{arch}-{ty}.gguf"));
        let o = bin()
            .arg("convert")
            .arg(dir.join(arch))
            .arg(&out)
            .args(["--type", ty])
            .output()
            .expect("running caldera convert");
        assert!(o.status.success(), "convert {arch} {ty}: {}", text(&o));
        let o = bin()
            .arg("verify")
            .arg(dir.join(arch))
            .arg("--model")
            .arg(&out)
            .args(["--threads", "2"])
            .output()
            .expect("running caldera verify");
        assert!(o.status.success(), "verify {arch} {ty}: {}", text(&o));
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

macro_rules! convert_tests {
    ($($name:ident => $arch:literal,)*) => {
        $(
            #[test]
            fn $name() {
                convert_and_verify($arch);
            }
        )*
    };
}

convert_tests! {
    convert_llama => "llama",
    convert_qwen3 => "qwen3",
    convert_qwen3_moe => "qwen3_moe",
    convert_gpt_oss => "gpt_oss",
    convert_qwen3_5 => "qwen3_5",
    convert_qwen3_5_moe => "qwen3_5_moe",
    convert_qwen3_next => "qwen3_next",
    convert_nemotron_h => "nemotron_h",
    convert_lfm2 => "lfm2",
    convert_lfm2_moe => "lfm2_moe",
    convert_gemma4 => "gemma4",
}

#[test]
fn convert_refuses_a_file() {
    let o = bin()
        .args(["convert", "/nonexistent-folder", "/tmp/x.gguf"])
        .output()
        .expect("running caldera convert");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
