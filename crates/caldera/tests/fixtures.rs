//! Every architecture against its transformers fixture (shared/fixtures/hf) on the CPU,
//! from the HF folder, and from GGUF files `caldera convert` writes with `--type f32` and
//! `--type bf16` (which must load through the same path and pass at the same 1e-4).

mod common;

use common::{assert_pass, bin, fixtures, text, TempDir};

fn verify_folder(arch: &str) {
    let Some(dir) = fixtures() else { return };
    let o = bin()
        .args(["verify", "--threads", "2"])
        .arg(dir.join(arch))
        .output()
        .expect("running caldera verify");
    assert_pass(&o);
}

fn convert_and_verify(arch: &str) {
    let Some(dir) = fixtures() else { return };
    let tmp = TempDir::new(&format!("convert-{arch}"));
    for ty in ["f32", "bf16"] {
        let out = tmp.0.join(format!("{arch}-{ty}.gguf"));
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
        assert_pass(&o);
    }
}

macro_rules! fixture_tests {
    ($($arch:ident,)*) => {
        mod folder {
            $(
                #[test]
                fn $arch() {
                    super::verify_folder(stringify!($arch));
                }
            )*
        }
        mod converted {
            $(
                #[test]
                fn $arch() {
                    super::convert_and_verify(stringify!($arch));
                }
            )*
        }
    };
}

fixture_tests! {
    llama,
    qwen3,
    qwen3_moe,
    gpt_oss,
    qwen3_5,
    qwen3_5_moe,
    qwen3_next,
    nemotron_h,
    lfm2,
    lfm2_moe,
    gemma4,
}

#[test]
fn convert_refuses_a_file() {
    let o = bin()
        .args(["convert", "/nonexistent-folder", "/tmp/x.gguf"])
        .output()
        .expect("running caldera convert");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
