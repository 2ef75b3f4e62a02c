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

/// The Vulkan device the tests run on (`caldera_vulkan::testing::pick_test_device`), or
/// `None` (the test skips) where there is none, unless CALDERA_REQUIRE_VULKAN=1 asks
/// for one: then its absence fails the test.
pub fn vulkan_device() -> Option<usize> {
    let required = std::env::var(caldera_vulkan::testing::ENV_REQUIRE).is_ok_and(|v| v == "1");
    let picked =
        caldera_vulkan::list_devices().and_then(|d| caldera_vulkan::testing::pick_test_device(&d));
    match picked {
        Ok(i) => Some(i),
        Err(e) if !required => {
            eprintln!("skipping: no Vulkan device ({e})");
            None
        }
        Err(e) => panic!("no Vulkan device (CALDERA_REQUIRE_VULKAN=1): {e}"),
    }
}

/// `|a - b| / |a|`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
    let n = a.iter().map(|x| x * x).sum::<f32>();
    (d / n.max(1e-30)).sqrt()
}

/// The index of the largest value (the last of equal ones).
pub fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// The gemma4 fixture made to exercise what it lacks: layer 2 reads layer 1's KV cache
/// (Gemma 4's KV sharing; both sliding layers with heads of 32) and the global layer 3
/// is widened to heads of 512 with 128 rotated dimensions (as Gemma 4's real global
/// layers: random f32 q / k / v / o weights and q / k norms from a fixed seed).
pub fn gemma4_shared_wide(fixtures: &std::path::Path) -> caldera_model::Model {
    use caldera_format::{GgmlType, TensorBytes};
    use caldera_model::{Mixer, MixerWeights, Weight};
    let (_file, mut m) = caldera_model::Model::open(&fixtures.join("gemma4")).expect("model");
    m.extras.layers[2].kv_from = Some(1);
    let d = m.config.d_model;
    let hd = 512;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let Some(Mixer::Attention(a)) = &mut m.config.layers[3].mixer else {
        panic!("gemma4 layer 3 is not attention");
    };
    a.head_dim = hd;
    let (nh, nkv) = (a.n_heads, a.n_kv_heads);
    if let Some(r) = &mut a.rope {
        r.n_dims = 128;
        r.freq_factors = None;
    }
    let mut weight = |name: &str, rows: usize, cols: usize, scale: f32| Weight {
        name: name.to_string(),
        ty: GgmlType::F32,
        rows,
        cols,
        data: TensorBytes::from_vec(
            (0..rows * cols)
                .flat_map(|_| (next() * scale).to_le_bytes())
                .collect(),
        ),
        bias: None,
    };
    let q = weight("q", nh * hd, d, 0.1);
    let k = weight("k", nkv * hd, d, 0.1);
    let v = weight("v", nkv * hd, d, 0.1);
    let o = weight("o", d, nh * hd, 0.05);
    let norm = weight("norms", 2, hd, 0.5);
    let norms: Vec<f32> = norm
        .bytes()
        .chunks_exact(4)
        .map(|b| 1.0 + f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let Some(MixerWeights::Attention(aw)) = &mut m.weights.layers[3].mixer else {
        panic!("gemma4 layer 3 has no attention weights");
    };
    (aw.q, aw.k, aw.v, aw.o) = (q, k, v, o);
    aw.q_norm = Some(norms[..hd].to_vec());
    aw.k_norm = Some(norms[hd..].to_vec());
    m
}
