//! 32-element block types.
//!
//! Byte layouts (little endian, `f16` = IEEE half):
//! - Q4_0 (18 B): `d: f16, qs[16]`; element `i < 16` is `qs[i] & 15`, element `i + 16` is
//!   `qs[i] >> 4`; value `d * (q - 8)`.
//! - Q4_1 (20 B): `d: f16, m: f16, qs[16]` as Q4_0; value `d * q + m`.
//! - Q5_0 (22 B): `d: f16, qh: u32, qs[16]`; bit `i` of `qh` is bit 4 of element `i`;
//!   value `d * (q - 16)`.
//! - Q5_1 (24 B): `d: f16, m: f16, qh: u32, qs[16]`; value `d * q + m`.
//! - Q8_0 (34 B): `d: f16, qs: [i8; 32]`; value `d * q`.
//! - Q8_1 (36 B): `d: f16, s: f16, qs: [i8; 32]`; value `d * q` (`s = d * Σq`).
//! - IQ4_NL (18 B): `d: f16, qs[16]` nibbles as Q4_0; value `d * KVALUES_IQ4NL[q]`.
//! - MXFP4 (17 B): `e: u8` (E8M0), `qs[16]` nibbles as Q4_0; value
//!   `2^(e-128) * KVALUES_MXFP4[q]` (the table holds doubled E2M1 values).

use super::{f16_at, f16_bytes};
use crate::GgmlType;

/// The 16 non-linear levels of IQ4_NL and IQ4_XS, ascending.
pub(super) const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// E2M1 values times two, indexed by the 4-bit code.
pub(super) const KVALUES_MXFP4: [i8; 16] =
    [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(e - 128)`: half the E8M0 scale, matching the doubled table.
#[inline(always)]
pub(super) fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000u32 << e)
    } else {
        f32::from_bits((e as u32 - 1) << 23)
    }
}

/// Splits a block into its 32 integer levels; returns `(d, m)` with value = `d * q + m`.
#[inline(always)]
fn unpack(ty: GgmlType, b: &[u8], q: &mut [i32; 32]) -> (f32, f32) {
    let nib = |qs: &[u8], q: &mut [i32; 32]| {
        for i in 0..16 {
            q[i] = (qs[i] & 15) as i32;
            q[i + 16] = (qs[i] >> 4) as i32;
        }
    };
    match ty {
        GgmlType::Q4_0 => {
            nib(&b[2..18], q);
            q.iter_mut().for_each(|v| *v -= 8);
            (f16_at(b, 0), 0.0)
        }
        GgmlType::Q4_1 => {
            nib(&b[4..20], q);
            (f16_at(b, 0), f16_at(b, 2))
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let off = if ty == GgmlType::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
            nib(&b[off + 4..off + 20], q);
            for (i, v) in q.iter_mut().enumerate() {
                *v |= (((qh >> i) & 1) << 4) as i32;
            }
            if ty == GgmlType::Q5_0 {
                q.iter_mut().for_each(|v| *v -= 16);
                (f16_at(b, 0), 0.0)
            } else {
                (f16_at(b, 0), f16_at(b, 2))
            }
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let off = if ty == GgmlType::Q8_0 { 2 } else { 4 };
            for (v, &x) in q.iter_mut().zip(&b[off..off + 32]) {
                *v = x as i8 as i32;
            }
            (f16_at(b, 0), 0.0)
        }
        GgmlType::IQ4_NL => {
            nib(&b[2..18], q);
            q.iter_mut()
                .for_each(|v| *v = KVALUES_IQ4NL[*v as usize] as i32);
            (f16_at(b, 0), 0.0)
        }
        _ => {
            // MXFP4
            nib(&b[1..17], q);
            q.iter_mut()
                .for_each(|v| *v = KVALUES_MXFP4[*v as usize] as i32);
            (e8m0_half(b[0]), 0.0)
        }
    }
}

pub(super) fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let mut q = [0i32; 32];
    for (b, out) in src
        .chunks_exact(ty.type_size())
        .zip(dst.chunks_exact_mut(32))
    {
        let (d, m) = unpack(ty, b, &mut q);
        if m == 0.0 && !matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            for (o, &v) in out.iter_mut().zip(&q) {
                *o = d * v as f32;
            }
        } else {
            for (o, &v) in out.iter_mut().zip(&q) {
                *o = d * v as f32 + m;
            }
        }
    }
}

/// Σ over blocks of `(d_w * d_a) * Σ q_w q_a + m_w * ds_a` with `ds_a = d_a * Σ q_a`
/// (f32 across blocks, exact integers within a block).
pub(super) fn dot(ty: GgmlType, w: &[u8], qa: &[i8], da: &[f32], ds: &[f32]) -> f32 {
    let mut q = [0i32; 32];
    let mut acc = 0.0f32;
    for (bi, b) in w.chunks_exact(ty.type_size()).take(da.len()).enumerate() {
        let (d, m) = unpack(ty, b, &mut q);
        let a = &qa[32 * bi..32 * bi + 32];
        let isum: i32 = q.iter().zip(a).map(|(&x, &y)| x * y as i32).sum();
        acc += d * da[bi] * isum as f32;
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            acc += m * ds[bi];
        }
    }
    acc
}

/// First value of largest magnitude (what ggml's reference quantizers scale by).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = 0.0f32;
    for &v in x {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

fn pack_nibbles(q: &[u8; 32], out: &mut Vec<u8>) {
    for i in 0..16 {
        out.push((q[i] & 15) | ((q[i + 16] & 15) << 4));
    }
}

fn high_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (i, &v) in q.iter().enumerate() {
        qh |= (((v >> 4) & 1) as u32) << i;
    }
    qh.to_le_bytes()
}

/// Index of the level of `table` (ascending) nearest to `v`.
#[inline]
pub(super) fn nearest_level(table: &[i8; 16], v: f32) -> usize {
    let mut i = 0;
    while i < 15 && v > 0.5 * (table[i] as f32 + table[i + 1] as f32) {
        i += 1;
    }
    i
}

/// Scale `s` minimizing Σ (x - s * table[nearest(x / s)])², searched around the
/// candidates that map the largest |x| to either end of the table, each refined by a
/// least-squares fit. Returns 0 for an all-zero block.
pub(super) fn fit_nonlinear(x: &[f32], table: &[i8; 16]) -> f32 {
    let vmax = signed_absmax(x);
    if vmax == 0.0 {
        return 0.0;
    }
    let lo = table[0] as f32;
    let hi = table[15] as f32;
    let mut best = (f32::INFINITY, 0.0f32);
    for end in [lo, hi] {
        for step in -6..=6 {
            let s = vmax / end * (1.0 + 0.025 * step as f32);
            let inv = 1.0 / s;
            let (mut sxq, mut sqq) = (0.0f32, 0.0f32);
            for &v in x {
                let l = table[nearest_level(table, v * inv)] as f32;
                sxq += v * l;
                sqq += l * l;
            }
            if sqq == 0.0 {
                continue;
            }
            let s2 = sxq / sqq;
            for cand in [s, s2] {
                if cand == 0.0 {
                    continue;
                }
                let inv = 1.0 / cand;
                let err: f32 = x
                    .iter()
                    .map(|&v| {
                        let e = v - cand * table[nearest_level(table, v * inv)] as f32;
                        e * e
                    })
                    .sum();
                if err < best.0 {
                    best = (err, cand);
                }
            }
        }
    }
    best.1
}

pub(super) fn quantize(ty: GgmlType, src: &[f32], out: &mut Vec<u8>) {
    let mut q = [0u8; 32];
    for x in src.chunks_exact(32) {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let (div, off, top) = if ty == GgmlType::Q4_0 {
                    (-8.0, 8.5, 15)
                } else {
                    (-16.0, 16.5, 31)
                };
                let d = signed_absmax(x) / div;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (o, &v) in q.iter_mut().zip(x) {
                    *o = ((v * id + off) as i32).clamp(0, top) as u8;
                }
                out.extend_from_slice(&f16_bytes(d));
                if ty == GgmlType::Q5_0 {
                    out.extend_from_slice(&high_bits(&q));
                }
                pack_nibbles(&q, out);
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let top = if ty == GgmlType::Q4_1 { 15 } else { 31 };
                let (mut mn, mut mx) = (x[0], x[0]);
                for &v in x {
                    mn = mn.min(v);
                    mx = mx.max(v);
                }
                let d = (mx - mn) / top as f32;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (o, &v) in q.iter_mut().zip(x) {
                    *o = (((v - mn) * id + 0.5) as i32).clamp(0, top) as u8;
                }
                out.extend_from_slice(&f16_bytes(d));
                out.extend_from_slice(&f16_bytes(mn));
                if ty == GgmlType::Q5_1 {
                    out.extend_from_slice(&high_bits(&q));
                }
                pack_nibbles(&q, out);
            }
            GgmlType::Q8_0 => {
                let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16_bytes(d));
                for &v in x {
                    out.push(((v * id).round() as i32).clamp(-128, 127) as i8 as u8);
                }
            }
            GgmlType::IQ4_NL => {
                let s = fit_nonlinear(x, &KVALUES_IQ4NL);
                let d = half::f16::from_f32(s).to_f32();
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (o, &v) in q.iter_mut().zip(x) {
                    *o = nearest_level(&KVALUES_IQ4NL, v * id) as u8;
                }
                out.extend_from_slice(&f16_bytes(s));
                pack_nibbles(&q, out);
            }
            _ => {
                // MXFP4: exponent from the largest magnitude, then the nearest code.
                let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let e = if amax > 0.0 {
                    (amax.log2().floor() as i32 - 2 + 127).clamp(0, 255) as u8
                } else {
                    0
                };
                let d = e8m0_half(e);
                for (o, &v) in q.iter_mut().zip(x) {
                    let mut bi = 0;
                    let mut be = f32::INFINITY;
                    for (i, &l) in KVALUES_MXFP4.iter().enumerate() {
                        let err = (d * l as f32 - v).abs();
                        if err < be {
                            be = err;
                            bi = i;
                        }
                    }
                    *o = bi as u8;
                }
                out.push(e);
                pack_nibbles(&q, out);
            }
        }
    }
}
