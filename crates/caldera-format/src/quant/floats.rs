//! F32, F16 and BF16 rows: little-endian IEEE values, one element per "block".

use crate::GgmlType;

#[inline(always)]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits, round to nearest even, NaN kept quiet (as ggml does).
fn f32_to_bf16(v: f32) -> u16 {
    let n = v.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return (((n & 0xffff_0000) | (64 << 16)) >> 16) as u16;
    }
    ((n as u64 + 0x7fff + ((n >> 16) & 1) as u64) >> 16) as u16
}

/// Value `i` of a float row (caller guarantees the length).
#[inline(always)]
fn at(ty: GgmlType, src: &[u8], i: usize) -> f32 {
    match ty {
        GgmlType::F32 => {
            f32::from_le_bytes([src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]])
        }
        GgmlType::F16 => super::f16_at(src, 2 * i),
        _ => bf16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
    }
}

pub(super) fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        _ => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
    }
}

pub(super) fn quantize(ty: GgmlType, src: &[f32], dst: &mut Vec<u8>) {
    match ty {
        GgmlType::F32 => src
            .iter()
            .for_each(|v| dst.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => src
            .iter()
            .for_each(|&v| dst.extend_from_slice(&super::f16_bytes(v))),
        _ => src
            .iter()
            .for_each(|&v| dst.extend_from_slice(&f32_to_bf16(v).to_le_bytes())),
    }
}

/// Σ w[i]·x[i] in f32, in index order.
pub(super) fn dot(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for (i, &xv) in x.iter().enumerate() {
        s += at(ty, w, i) * xv;
    }
    s
}
