//! Round trips and dot products on fresh random data: the SIMD paths against the scalar
//! reference, and both against the dot of the dequantized weights.

use caldera_format::quant::{
    dequantize, quantize, quantize_into, reference, vec_dot, vec_dot_many, vec_dot_rows,
    QuantizedActs,
};
use caldera_format::GgmlType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Weight types with a dot product, and the relative RMSE bound of a quantize →
/// dequantize round trip on Gaussian data.
const TYPES: &[(GgmlType, f32)] = &[
    (GgmlType::F32, 0.0),
    (GgmlType::F16, 0.001),
    (GgmlType::BF16, 0.005),
    (GgmlType::Q8_0, 0.008),
    (GgmlType::Q4_0, 0.12),
    (GgmlType::Q4_1, 0.10),
    (GgmlType::Q5_0, 0.06),
    (GgmlType::Q5_1, 0.05),
    (GgmlType::IQ4_NL, 0.10),
    (GgmlType::MXFP4, 0.20),
    (GgmlType::Q2_K, 0.40),
    (GgmlType::Q3_K, 0.20),
    (GgmlType::Q4_K, 0.09),
    (GgmlType::Q5_K, 0.045),
    (GgmlType::Q6_K, 0.025),
    (GgmlType::IQ4_XS, 0.10),
];

fn gauss(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn rel_rmse(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = a.iter().map(|x| x * x).sum();
    (num / den).sqrt()
}

#[test]
fn round_trip_error_is_bounded() {
    let mut rng = StdRng::seed_from_u64(7);
    for &(ty, bound) in TYPES {
        let k = 512;
        let rows = 5;
        let mut x = gauss(&mut rng, rows * k);
        // A few outliers and an all-zero block.
        x[3] = 9.0;
        x[700] = -7.5;
        x[1024..1280].iter_mut().for_each(|v| *v = 0.0);
        let mut q = Vec::new();
        for r in x.chunks(k) {
            quantize_into(ty, r, &mut q).unwrap();
        }
        assert_eq!(q.len() as u64, ty.row_bytes((rows * k) as u64).unwrap());
        let mut y = vec![0.0; rows * k];
        dequantize(ty, &q, &mut y).unwrap();
        let e = rel_rmse(&x, &y);
        eprintln!("{ty}: relative RMSE {e:.4}");
        assert!(e <= bound, "{ty}: relative RMSE {e} > {bound}");
        assert!(y[1024..1280].iter().all(|&v| v == 0.0), "{ty}: zero block");
    }
}

fn ks(ty: GgmlType) -> &'static [usize] {
    match ty.block_size() {
        1 => &[1, 7, 33, 100, 261, 1024],
        32 => &[32, 64, 96, 160, 576, 1056],
        _ => &[256, 512, 768, 2304],
    }
}

#[test]
fn fast_dot_matches_reference_and_dequantized_dot() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut acts = QuantizedActs::default();
    for &(ty, _) in TYPES {
        for &k in ks(ty) {
            let m = 3;
            let w = gauss(&mut rng, 2 * k);
            let wq = quantize(ty, &w).unwrap();
            let mut wd = vec![0.0; 2 * k];
            dequantize(ty, &wq, &mut wd).unwrap();
            let mut x = gauss(&mut rng, m * k);
            x[0] *= 20.0;
            acts.prepare(ty, &x, k).unwrap();
            assert_eq!((acts.rows(), acts.k()), (m, k));
            let rb = wq.len() / 2;
            // Both weight rows against each activation row in one call.
            for j in 0..m {
                let mut many = vec![0.0; 2];
                vec_dot_many(ty, &wq, &acts, j, &mut many);
                for (r, wr) in wq.chunks(rb).enumerate() {
                    assert_eq!(
                        many[r],
                        vec_dot(ty, wr, &acts, j),
                        "{ty} k={k}: vec_dot_many row {r}"
                    );
                }
            }
            for (wr, wdr) in wq.chunks(rb).zip(wd.chunks(k)) {
                let mut rows = vec![0.0; m];
                vec_dot_rows(ty, wr, &acts, &mut rows);
                let mut rows_ref = vec![0.0; m];
                reference::vec_dot_rows(ty, wr, &acts, &mut rows_ref);
                for j in 0..m {
                    let xr = &x[j * k..(j + 1) * k];
                    let fast = vec_dot(ty, wr, &acts, j);
                    let slow = reference::vec_dot(ty, wr, &acts, j);
                    let exact: f32 = wdr.iter().zip(xr).map(|(a, b)| a * b).sum();
                    let mag: f32 = wdr.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                    assert!(
                        (fast - slow).abs() <= 1e-5 * mag + 1e-6,
                        "{ty} k={k}: fast {fast} vs reference {slow}"
                    );
                    assert_eq!(rows[j], fast, "{ty} k={k}: vec_dot_rows row {j}");
                    assert_eq!(rows_ref[j], slow, "{ty} k={k}: reference rows {j}");
                    // Activation rounding error: at most half a step per element.
                    let bound = if ty.block_size() == 1 {
                        1e-5 * mag
                    } else {
                        let blk = if ty.block_size() == 32 { 32 } else { 256 };
                        let mut b = 0.0f32;
                        for (wc, xc) in wdr.chunks(blk).zip(xr.chunks(blk)) {
                            let amax = xc.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                            b += wc.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0;
                        }
                        b * 1.01 + 1e-5 * mag
                    };
                    assert!(
                        (fast - exact).abs() <= bound + 1e-6,
                        "{ty} k={k}: {fast} vs {exact} (bound {bound})"
                    );
                }
            }
        }
    }
}

#[test]
fn prepare_reuses_buffers_and_handles_zeros() {
    let mut acts = QuantizedActs::default();
    let w = quantize(GgmlType::Q4_K, &vec![0.5; 256]).unwrap();
    acts.prepare(GgmlType::Q4_K, &[0.0; 512], 256).unwrap();
    assert_eq!(vec_dot(GgmlType::Q4_K, &w, &acts, 1), 0.0);
    acts.prepare(GgmlType::Q4_K, &vec![1.0; 256], 256).unwrap();
    assert_eq!(acts.rows(), 1);
    let d = vec_dot(GgmlType::Q4_K, &w, &acts, 0);
    assert!((d - 128.0).abs() < 0.5, "{d}");
}
