//! Mat-vec throughput of `quant::vec_dot` per weight type, single thread: a ~16 MiB weight
//! matrix (rows of k = 2048) times one activation row, reported as weight GB/s.
//! Also reports `vec_dot_rows` with 8 activation rows (prefill shape), in weight GB/s
//! per activation row.
//!
//! Run: `cargo run --release -p caldera-format --example quant_bench [TYPE...]`

use std::time::Instant;

use caldera_format::quant::{quantize, simd_level, vec_dot, vec_dot_rows, QuantizedActs};
use caldera_format::GgmlType;

fn main() {
    let names: Vec<String> = std::env::args().skip(1).collect();
    let all = [
        "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K", "IQ4_XS", "F32", "F16", "BF16",
    ];
    let list: Vec<&str> = if names.is_empty() {
        all.to_vec()
    } else {
        names.iter().map(|s| s.as_str()).collect()
    };
    println!("simd level: {}", simd_level());
    println!(
        "{:<8} {:>10} {:>12} {:>14}",
        "type", "rows", "GB/s (m=1)", "GB/s·row (m=8)"
    );
    let k = 2048;
    let mut seed = 1u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for name in list {
        let Some(ty) = GgmlType::from_name(name) else {
            eprintln!("unknown type {name}");
            continue;
        };
        let rb = ty.row_bytes(k as u64).unwrap() as usize;
        let rows = (16 << 20) / rb;
        let base: Vec<f32> = (0..64 * k).map(|_| rnd()).collect();
        let tile = quantize(ty, &base).unwrap();
        let mut w = Vec::with_capacity(rows * rb);
        while w.len() < rows * rb {
            let n = (rows * rb - w.len()).min(tile.len());
            w.extend_from_slice(&tile[..n]);
        }
        let x: Vec<f32> = (0..8 * k).map(|_| rnd()).collect();
        let mut acts = QuantizedActs::default();
        acts.prepare(ty, &x[..k], k).unwrap();
        let mut out = vec![0.0f32; rows];
        let mut best = f64::MAX;
        for _ in 0..12 {
            let t = Instant::now();
            for (o, r) in out.iter_mut().zip(w.chunks_exact(rb)) {
                *o = vec_dot(ty, r, &acts, 0);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(&out);
        let gbs = w.len() as f64 / best / 1e9;

        acts.prepare(ty, &x, k).unwrap();
        let mut out8 = vec![0.0f32; 8];
        let mut best8 = f64::MAX;
        for _ in 0..4 {
            let t = Instant::now();
            for r in w.chunks_exact(rb) {
                vec_dot_rows(ty, r, &acts, &mut out8);
                std::hint::black_box(&out8);
            }
            best8 = best8.min(t.elapsed().as_secs_f64());
        }
        let gbs8 = 8.0 * w.len() as f64 / best8 / 1e9;
        println!("{:<8} {:>10} {:>12.2} {:>14.2}", name, rows, gbs, gbs8);
    }
}
