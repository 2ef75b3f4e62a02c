//! Plain f32 primitives. These define what every backend's fused kernels must compute.

use caldera_model::{RopeSpec, RopeStyle};

/// `out = x / sqrt(mean(x²) + eps) * w`, row by row (`x.len()` a multiple of `w.len()`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// In-place RMSNorm of each `w.len()`-sized chunk (per-head q/k norm).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for xr in x.chunks_exact_mut(d) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// cos/sin of every rotated pair at one position: `out` holds n_dims/2 (cos, sin).
pub fn rope_angles(spec: &RopeSpec, pos: usize, out: &mut Vec<(f32, f32)>) {
    out.clear();
    let half = spec.n_dims / 2;
    let p = pos as f64 / spec.linear_scale as f64;
    for i in 0..half {
        let mut inv_freq = (spec.theta as f64).powf(-(2.0 * i as f64) / spec.n_dims as f64);
        if let Some(ff) = &spec.freq_factors {
            inv_freq /= ff[i] as f64;
        }
        let (s, c) = (p * inv_freq).sin_cos();
        out.push((
            (c * spec.mscale as f64) as f32,
            (s * spec.mscale as f64) as f32,
        ));
    }
}

/// Rotates one head vector (`x.len()` = head_dim) by precomputed angles.
pub fn rope_apply(style: RopeStyle, angles: &[(f32, f32)], x: &mut [f32]) {
    let half = angles.len();
    match style {
        RopeStyle::Neox => {
            for (i, &(c, s)) in angles.iter().enumerate() {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * c - b * s;
                x[i + half] = a * s + b * c;
            }
        }
        RopeStyle::Interleaved => {
            for (i, &(c, s)) in angles.iter().enumerate() {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * c - b * s;
                x[2 * i + 1] = a * s + b * c;
            }
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: vectorizes, and is more accurate than one running sum.
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a * x`
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_styles_agree_after_permutation() {
        // Interleaved RoPE on a permuted vector equals NeoX RoPE on the original.
        let spec = RopeSpec {
            style: RopeStyle::Neox,
            n_dims: 8,
            theta: 10000.0,
            linear_scale: 1.0,
            freq_factors: None,
            mscale: 1.0,
        };
        let mut ang = Vec::new();
        rope_angles(&spec, 7, &mut ang);
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.37 - 1.0).collect();
        let mut neox = x.clone();
        rope_apply(RopeStyle::Neox, &ang, &mut neox);
        let mut perm: Vec<f32> = (0..8).map(|j| x[(j % 2) * 4 + j / 2]).collect();
        rope_apply(RopeStyle::Interleaved, &ang, &mut perm);
        for j in 0..8 {
            assert!((perm[j] - neox[(j % 2) * 4 + j / 2]).abs() < 1e-6);
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut v = vec![1.0, 2.0, 3.0, -1e9];
        softmax(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[3] == 0.0);
    }
}
