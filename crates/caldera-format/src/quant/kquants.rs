//! 256-element super-block types. `e` is an element index in 0..256, `g` a group
//! (sub-block) index; every type's value is `(d * sc[g]) * q[e] - (dmin * mn[g])`.
//!
//! Byte layouts (little endian):
//! - Q2_K (84 B): `scales[16]` (low nibble sc, high nibble mn, groups of 16), `qs[64]`,
//!   `d: f16`, `dmin: f16`. Element `e = 128n + 32s + l`: `(qs[32n+l] >> 2s) & 3`.
//! - Q3_K (110 B): `hmask[32], qs[64], scales[12], d: f16`. 2 low bits as Q2_K; the level is
//!   `low - 4` unless bit `4n+s` of `hmask[l]` is set. 16 six-bit scales minus 32: low
//!   nibble of `scales[g]` (g < 8) or high nibble of `scales[g-8]`; top 2 bits at
//!   bit `2*(g/4)` of `scales[8 + g%4]`.
//! - Q4_K (144 B): `d: f16, dmin: f16, scales[12], qs[128]`; 8 groups of 32 with six-bit
//!   sc and mn (see [`scale_min_k4`]); `e = 64j + r`: low nibble of `qs[32j+r]` for r < 32,
//!   else high nibble of `qs[32j+r-32]`.
//! - Q5_K (176 B): `d, dmin, scales[12], qh[32], qs[128]`: Q4_K plus bit `e/32` of
//!   `qh[e%32]` as bit 4.
//! - Q6_K (210 B): `ql[128], qh[64], scales: [i8; 16], d: f16`; `e = 128n + 32c + l`:
//!   nibble `c / 2` (low, high) of `ql[64n + 32(c&1) + l]`, bits `2c..2c+2` of
//!   `qh[32n+l]` on top; level minus 32; groups of 16.
//! - IQ4_XS (136 B): `d: f16, scales_h: u16, scales_l[4], qs[128]`; 8 groups of 32;
//!   six-bit scale minus 32 from nibble `g%2` of `scales_l[g/2]` and bits `2g..2g+2` of
//!   `scales_h`; `qs[16g..16g+16]` nibbles as Q4_0 index `KVALUES_IQ4NL`.
//! - Q8_K (292 B): `d: f32, qs: [i8; 256], bsums: [i16; 16]`.

use super::legacy::{fit_nonlinear, nearest_level, KVALUES_IQ4NL};
use super::{f16_at, f16_bytes};
use crate::GgmlType;

/// One super-block split into integer levels and group scales.
pub(super) struct Unpacked {
    pub q: [i32; 256],
    /// Elements per group: 16 or 32.
    pub gsize: usize,
    pub sc: [i32; 16],
    pub mn: [i32; 16],
    pub d: f32,
    pub dmin: f32,
}

impl Default for Unpacked {
    fn default() -> Self {
        Unpacked {
            q: [0; 256],
            gsize: 16,
            sc: [0; 16],
            mn: [0; 16],
            d: 0.0,
            dmin: 0.0,
        }
    }
}

/// Six-bit scale and min of group `j` (0..8) of Q4_K / Q5_K.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Six-bit (unsigned, before the -32) scale `g` (0..16) of Q3_K.
#[inline(always)]
fn scale_q3k(g: usize, s: &[u8]) -> i32 {
    let low = if g < 8 { s[g] & 15 } else { s[g - 8] >> 4 };
    let high = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
    (low | (high << 4)) as i32
}

pub(super) fn unpack(ty: GgmlType, b: &[u8], u: &mut Unpacked) {
    u.mn = [0; 16];
    u.dmin = 0.0;
    match ty {
        GgmlType::Q2_K => {
            let qs = &b[16..80];
            for e in 0..256 {
                let (n, s, l) = (e / 128, (e % 128) / 32, e % 32);
                u.q[e] = ((qs[32 * n + l] >> (2 * s)) & 3) as i32;
            }
            for (g, &v) in b[..16].iter().enumerate() {
                u.sc[g] = (v & 15) as i32;
                u.mn[g] = (v >> 4) as i32;
            }
            u.gsize = 16;
            u.d = f16_at(b, 80);
            u.dmin = f16_at(b, 82);
        }
        GgmlType::Q3_K => {
            let (hm, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
            for e in 0..256 {
                let (n, s, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = ((qs[32 * n + l] >> (2 * s)) & 3) as i32;
                let high = hm[l] & (1 << (4 * n + s)) != 0;
                u.q[e] = if high { low } else { low - 4 };
            }
            for g in 0..16 {
                u.sc[g] = scale_q3k(g, sc) - 32;
            }
            u.gsize = 16;
            u.d = f16_at(b, 108);
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let s = &b[4..16];
            let (qh, qs) = if ty == GgmlType::Q5_K {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            for e in 0..256 {
                let (j, r) = (e / 64, e % 64);
                let mut v = if r < 32 {
                    qs[32 * j + r] & 15
                } else {
                    qs[32 * j + r - 32] >> 4
                } as i32;
                if ty == GgmlType::Q5_K {
                    v |= (((qh[e % 32] >> (e / 32)) & 1) as i32) << 4;
                }
                u.q[e] = v;
            }
            for g in 0..8 {
                let (sc, mn) = scale_min_k4(g, s);
                u.sc[g] = sc as i32;
                u.mn[g] = mn as i32;
            }
            u.gsize = 32;
            u.d = f16_at(b, 0);
            u.dmin = f16_at(b, 2);
        }
        GgmlType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            for e in 0..256 {
                let (n, c, l) = (e / 128, (e % 128) / 32, e % 32);
                let byte = ql[64 * n + 32 * (c & 1) + l];
                let nib = if c < 2 { byte & 15 } else { byte >> 4 };
                let hb = (qh[32 * n + l] >> (2 * c)) & 3;
                u.q[e] = (nib | (hb << 4)) as i32 - 32;
            }
            for (o, &v) in u.sc.iter_mut().zip(sc) {
                *o = v as i8 as i32;
            }
            u.gsize = 16;
            u.d = f16_at(b, 208);
        }
        GgmlType::IQ4_XS => {
            let sh = u16::from_le_bytes([b[2], b[3]]);
            let (sl, qs) = (&b[4..8], &b[8..136]);
            for e in 0..256 {
                let (g, r) = (e / 32, e % 32);
                let idx = if r < 16 {
                    qs[16 * g + r] & 15
                } else {
                    qs[16 * g + r - 16] >> 4
                };
                u.q[e] = KVALUES_IQ4NL[idx as usize] as i32;
            }
            for g in 0..8 {
                let low = (sl[g / 2] >> (4 * (g % 2))) & 15;
                let high = ((sh >> (2 * g)) & 3) as u8;
                u.sc[g] = (low | (high << 4)) as i32 - 32;
            }
            u.gsize = 32;
            u.d = f16_at(b, 0);
        }
        _ => {
            // Q8_K
            for e in 0..256 {
                u.q[e] = b[4 + e] as i8 as i32;
            }
            u.sc = [1; 16];
            u.gsize = 16;
            u.d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

pub(super) fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let mut u = Unpacked::default();
    for (b, out) in src
        .chunks_exact(ty.type_size())
        .zip(dst.chunks_exact_mut(256))
    {
        unpack(ty, b, &mut u);
        for (g, og) in out.chunks_exact_mut(u.gsize).enumerate() {
            let dl = u.d * u.sc[g] as f32;
            let ml = u.dmin * u.mn[g] as f32;
            for (o, &q) in og.iter_mut().zip(&u.q[g * u.gsize..]) {
                *o = dl * q as f32 - ml;
            }
        }
    }
}

/// Σ over super-blocks of `d_a * (d * Σ_g sc[g] Σ q q_a - dmin * Σ_g mn[g] Σ q_a)`.
pub(super) fn dot(ty: GgmlType, w: &[u8], qa: &[i8], da: &[f32], sa: &[i16]) -> f32 {
    let mut u = Unpacked::default();
    let mut acc = 0.0f32;
    for (bi, b) in w.chunks_exact(ty.type_size()).take(da.len()).enumerate() {
        unpack(ty, b, &mut u);
        let a = &qa[256 * bi..256 * bi + 256];
        let sums = &sa[16 * bi..16 * bi + 16];
        let (mut isum, mut msum) = (0i32, 0i32);
        for g in 0..256 / u.gsize {
            let r = g * u.gsize..(g + 1) * u.gsize;
            let s: i32 = u.q[r.clone()]
                .iter()
                .zip(&a[r])
                .map(|(&x, &y)| x * y as i32)
                .sum();
            isum += u.sc[g] * s;
            let asum: i32 = if u.gsize == 16 {
                sums[g] as i32
            } else {
                sums[2 * g] as i32 + sums[2 * g + 1] as i32
            };
            msum += u.mn[g] * asum;
        }
        acc += da[bi] * (u.d * isum as f32 - u.dmin * msum as f32);
    }
    acc
}

#[inline(always)]
fn round_i(v: f32) -> i32 {
    v.round() as i32
}

/// Fits `x ≈ s * q - m` with `q` in `0..=nmax`, `s >= 0`, `m >= 0`: a few starting scales
/// around `(max - min) / nmax`, each refined by least squares; returns the best `(s, m)`.
fn fit_asym(x: &[f32], nmax: i32) -> (f32, f32) {
    let mut lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if lo > 0.0 {
        lo = 0.0;
    }
    if hi <= lo || hi.is_nan() || lo.is_nan() {
        return (0.0, -lo);
    }
    let err_of = |s: f32, b: f32| -> f32 {
        let inv = 1.0 / s;
        x.iter()
            .map(|&v| {
                let q = round_i((v - b) * inv).clamp(0, nmax) as f32;
                let e = s * q + b - v;
                e * e
            })
            .sum()
    };
    let s0 = (hi - lo) / nmax as f32;
    let mut best = (err_of(s0, lo), s0, lo);
    let n = x.len() as f32;
    for step in -4..=12 {
        let iscale = (nmax as f32 + 0.1 * step as f32) / (hi - lo);
        let (mut sq, mut sqq, mut sx, mut sqx) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
        for &v in x {
            let q = round_i((v - lo) * iscale).clamp(0, nmax) as f32;
            sq += q;
            sqq += q * q;
            sx += v;
            sqx += q * v;
        }
        let det = n * sqq - sq * sq;
        if det <= 0.0 {
            continue;
        }
        let mut s = (n * sqx - sq * sx) / det;
        let mut b = (sqq * sx - sq * sqx) / det;
        if b > 0.0 {
            b = 0.0;
            s = sqx / sqq;
        }
        if s > 0.0 && s.is_finite() {
            let e = err_of(s, b);
            if e < best.0 {
                best = (e, s, b);
            }
        }
    }
    (best.1, -best.2)
}

/// Fits `x ≈ s * q` with `q` in `-nneg..=npos`; returns the best `s` (may be negative).
fn fit_sym(x: &[f32], nneg: i32, npos: i32) -> f32 {
    let mut vmax = 0.0f32;
    for &v in x {
        if v.abs() > vmax.abs() {
            vmax = v;
        }
    }
    if vmax == 0.0 {
        return 0.0;
    }
    let err_of = |s: f32| -> f32 {
        let inv = 1.0 / s;
        x.iter()
            .map(|&v| {
                let e = v - s * round_i(v * inv).clamp(-nneg, npos) as f32;
                e * e
            })
            .sum()
    };
    let mut best = (f32::INFINITY, 0.0f32);
    for end in [-(nneg as f32), npos as f32] {
        for step in -4..=4 {
            let s = vmax / (end + 0.15 * step as f32);
            if !(s.is_finite()) || s == 0.0 {
                continue;
            }
            let inv = 1.0 / s;
            let (mut sqx, mut sqq) = (0.0f32, 0.0f32);
            for &v in x {
                let q = round_i(v * inv).clamp(-nneg, npos) as f32;
                sqx += q * v;
                sqq += q * q;
            }
            for cand in [s, if sqq > 0.0 { sqx / sqq } else { 0.0 }] {
                if cand != 0.0 && cand.is_finite() {
                    let e = err_of(cand);
                    if e < best.0 {
                        best = (e, cand);
                    }
                }
            }
        }
    }
    best.1
}

fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Quantizes group scales `s` (>= 0) to integers in `0..=top` with a shared f16 step.
fn quant_scales_unsigned(s: &[f32], top: i32, out: &mut [i32]) -> f32 {
    let mx = s.iter().copied().fold(0.0f32, f32::max);
    let d = f16_round(mx / top as f32);
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in out.iter_mut().zip(s) {
        *o = round_i(v * id).clamp(0, top);
    }
    d
}

/// Quantizes signed group scales to integers in `lo..=hi` with a shared f16 step.
fn quant_scales_signed(s: &[f32], lo: i32, hi: i32, out: &mut [i32]) -> f32 {
    let mx = s.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = f16_round(mx / hi as f32);
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in out.iter_mut().zip(s) {
        *o = round_i(v * id).clamp(lo, hi);
    }
    d
}

/// Levels of one asymmetric group given its final scale and min.
fn levels_asym(x: &[f32], s: f32, m: f32, nmax: i32, q: &mut [i32]) {
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = round_i((v + m) * inv).clamp(0, nmax);
    }
}

fn levels_sym(x: &[f32], s: f32, lo: i32, hi: i32, q: &mut [i32]) {
    let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = round_i(v * inv).clamp(lo, hi);
    }
}

pub(super) fn quantize(ty: GgmlType, src: &[f32], out: &mut Vec<u8>) {
    let mut q = [0i32; 256];
    let mut s = [0f32; 16];
    let mut m = [0f32; 16];
    let mut isc = [0i32; 16];
    let mut imn = [0i32; 16];
    for x in src.chunks_exact(256) {
        match ty {
            GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::Q5_K => {
                let (gs, nmax, top) = match ty {
                    GgmlType::Q2_K => (16, 3, 15),
                    GgmlType::Q4_K => (32, 15, 63),
                    _ => (32, 31, 63),
                };
                let ng = 256 / gs;
                for g in 0..ng {
                    (s[g], m[g]) = fit_asym(&x[g * gs..(g + 1) * gs], nmax);
                }
                let d = quant_scales_unsigned(&s[..ng], top, &mut isc);
                let dmin = quant_scales_unsigned(&m[..ng], top, &mut imn);
                for g in 0..ng {
                    let r = g * gs..(g + 1) * gs;
                    levels_asym(
                        &x[r.clone()],
                        d * isc[g] as f32,
                        dmin * imn[g] as f32,
                        nmax,
                        &mut q[r],
                    );
                }
                if ty == GgmlType::Q2_K {
                    for g in 0..16 {
                        out.push((isc[g] | (imn[g] << 4)) as u8);
                    }
                    let mut qs = [0u8; 64];
                    for (e, &v) in q.iter().enumerate() {
                        let (n, sh, l) = (e / 128, (e % 128) / 32, e % 32);
                        qs[32 * n + l] |= (v as u8) << (2 * sh);
                    }
                    out.extend_from_slice(&qs);
                    out.extend_from_slice(&f16_bytes(d));
                    out.extend_from_slice(&f16_bytes(dmin));
                } else {
                    out.extend_from_slice(&f16_bytes(d));
                    out.extend_from_slice(&f16_bytes(dmin));
                    let mut sc = [0u8; 12];
                    for j in 0..4 {
                        let (a, b) = (isc[j] as u8, isc[j + 4] as u8);
                        let (c, e) = (imn[j] as u8, imn[j + 4] as u8);
                        sc[j] = a | ((b >> 4) << 6);
                        sc[j + 4] = c | ((e >> 4) << 6);
                        sc[j + 8] = (b & 15) | ((e & 15) << 4);
                    }
                    out.extend_from_slice(&sc);
                    if ty == GgmlType::Q5_K {
                        let mut qh = [0u8; 32];
                        for (e, &v) in q.iter().enumerate() {
                            qh[e % 32] |= (((v >> 4) & 1) as u8) << (e / 32);
                        }
                        out.extend_from_slice(&qh);
                    }
                    let mut qs = [0u8; 128];
                    for (e, &v) in q.iter().enumerate() {
                        let (j, r) = (e / 64, e % 64);
                        if r < 32 {
                            qs[32 * j + r] |= (v & 15) as u8;
                        } else {
                            qs[32 * j + r - 32] |= ((v & 15) as u8) << 4;
                        }
                    }
                    out.extend_from_slice(&qs);
                }
            }
            GgmlType::Q3_K | GgmlType::Q6_K => {
                let (nneg, npos, slo, shi) = if ty == GgmlType::Q3_K {
                    (4, 3, -32, 31)
                } else {
                    (32, 31, -128, 127)
                };
                for (sg, xg) in s.iter_mut().zip(x.chunks_exact(16)) {
                    *sg = fit_sym(xg, nneg, npos);
                }
                let d = quant_scales_signed(&s, slo, shi, &mut isc);
                for ((&sc, xg), qg) in isc
                    .iter()
                    .zip(x.chunks_exact(16))
                    .zip(q.chunks_exact_mut(16))
                {
                    levels_sym(xg, d * sc as f32, -nneg, npos, qg);
                }
                if ty == GgmlType::Q3_K {
                    let mut hm = [0u8; 32];
                    let mut qs = [0u8; 64];
                    for (e, &v) in q.iter().enumerate() {
                        let u = (v + 4) as u8;
                        let (n, sh, l) = (e / 128, (e % 128) / 32, e % 32);
                        qs[32 * n + l] |= (u & 3) << (2 * sh);
                        hm[l] |= (u >> 2) << (4 * n + sh);
                    }
                    let mut sc = [0u8; 12];
                    for g in 0..16 {
                        let u = (isc[g] + 32) as u8;
                        if g < 8 {
                            sc[g] |= u & 15;
                        } else {
                            sc[g - 8] |= (u & 15) << 4;
                        }
                        sc[8 + g % 4] |= (u >> 4) << (2 * (g / 4));
                    }
                    out.extend_from_slice(&hm);
                    out.extend_from_slice(&qs);
                    out.extend_from_slice(&sc);
                    out.extend_from_slice(&f16_bytes(d));
                } else {
                    let mut ql = [0u8; 128];
                    let mut qh = [0u8; 64];
                    for (e, &v) in q.iter().enumerate() {
                        let u = (v + 32) as u8;
                        let (n, c, l) = (e / 128, (e % 128) / 32, e % 32);
                        ql[64 * n + 32 * (c & 1) + l] |= (u & 15) << (4 * (c / 2));
                        qh[32 * n + l] |= (u >> 4) << (2 * c);
                    }
                    out.extend_from_slice(&ql);
                    out.extend_from_slice(&qh);
                    for &v in &isc {
                        out.push(v as i8 as u8);
                    }
                    out.extend_from_slice(&f16_bytes(d));
                }
            }
            _ => {
                // IQ4_XS
                for g in 0..8 {
                    s[g] = fit_nonlinear(&x[g * 32..(g + 1) * 32], &KVALUES_IQ4NL);
                }
                let d = quant_scales_signed(&s[..8], -32, 31, &mut isc);
                let mut sh = 0u16;
                let mut sl = [0u8; 4];
                let mut qs = [0u8; 128];
                for g in 0..8 {
                    let ls = (isc[g] + 32) as u8;
                    sl[g / 2] |= (ls & 15) << (4 * (g % 2));
                    sh |= ((ls >> 4) as u16) << (2 * g);
                    let sg = d * isc[g] as f32;
                    let inv = if sg != 0.0 { 1.0 / sg } else { 0.0 };
                    for r in 0..32 {
                        let idx = nearest_level(&KVALUES_IQ4NL, x[32 * g + r] * inv) as u8;
                        if r < 16 {
                            qs[16 * g + r] |= idx;
                        } else {
                            qs[16 * g + r - 16] |= idx << 4;
                        }
                    }
                }
                out.extend_from_slice(&f16_bytes(d));
                out.extend_from_slice(&sh.to_le_bytes());
                out.extend_from_slice(&sl);
                out.extend_from_slice(&qs);
            }
        }
    }
}
