//! GGML block formats on the CPU: dequantize, quantize, and dot products straight from
//! the quantized blocks, bit-compatible with the blocks of llama.cpp's GGUF files.
//!
//! Supported weight types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
//! Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4 (and Q8_0 / Q8_K / Q8_1 dequantization).
//!
//! Dot products pair one weight row (raw blocks, `k` elements) with an activation row
//! prepared once by [`QuantizedActs::prepare`]:
//! - float weights (F32, F16, BF16): activations stay f32, accumulation in f32;
//! - 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, MXFP4): activations
//!   in 32-element int8 blocks, one f32 scale and one integer sum per block;
//! - 256-element super-block types (Q2_K..Q6_K, IQ4_XS): activations in 256-element
//!   int8 blocks, one f32 scale per block and one integer sum per 16 elements.
//!
//! Activation quantization is symmetric: `d = max|x| / 127`, `q = round_half_even(x / d)`.
//! The integer parts of every dot product are exact, so [`vec_dot`] (SIMD) and
//! [`reference::vec_dot`] (scalar) differ only by float rounding of the scale products.

mod floats;
mod kquants;
mod legacy;
#[cfg(target_arch = "x86_64")]
mod simd_x86;

use crate::{FormatError, GgmlType, Result};

/// Whether [`dequantize`] handles `ty`.
pub fn supports_dequantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q8_1
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | Q8_K
            | IQ4_NL
            | IQ4_XS
            | MXFP4
    )
}

/// Whether [`quantize`], [`QuantizedActs::prepare`] and [`vec_dot`] handle `ty`.
pub fn supports_quantize(ty: GgmlType) -> bool {
    act_kind(ty).is_some()
}

fn unsupported(ty: GgmlType, what: &str) -> FormatError {
    FormatError::Unsupported(format!("{what} of tensor type {ty} is not implemented"))
}

/// Expands `dst.len()` elements of type `ty` from their raw blocks `src`.
///
/// `dst.len()` must be a multiple of `ty.block_size()` and `src.len()` must equal
/// `ty.row_bytes(dst.len())`; anything else is an error.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    if !supports_dequantize(ty) {
        return Err(unsupported(ty, "dequantization"));
    }
    check_row(ty, src.len(), dst.len())?;
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => floats::dequantize(ty, src, dst),
        GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
        | GgmlType::Q8_K
        | GgmlType::IQ4_XS => kquants::dequantize(ty, src, dst),
        _ => legacy::dequantize(ty, src, dst),
    }
    Ok(())
}

fn check_row(ty: GgmlType, bytes: usize, n: usize) -> Result<()> {
    let bs = ty.block_size();
    if !n.is_multiple_of(bs) {
        return Err(FormatError::Invalid(format!(
            "{n} elements of {ty} are not a whole number of {bs}-element blocks"
        )));
    }
    let want = ty.row_bytes(n as u64);
    if want != Some(bytes as u64) {
        return Err(FormatError::Invalid(format!(
            "{n} elements of {ty} need {want:?} bytes, got {bytes}"
        )));
    }
    Ok(())
}

/// Quantizes `src` (a multiple of `ty.block_size()` values) into new blocks of `ty`.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    quantize_into(ty, src, &mut out)?;
    Ok(out)
}

/// Quantizes `src` into blocks of `ty`, appended to `dst`.
///
/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, F16 and BF16 produce the same bytes as ggml's
/// reference quantizers; the K-quants and IQ4 types use our own scale search (same
/// format, similar error, not the same bytes). No importance matrix.
pub fn quantize_into(ty: GgmlType, src: &[f32], dst: &mut Vec<u8>) -> Result<()> {
    if !supports_quantize(ty) {
        return Err(unsupported(ty, "quantization"));
    }
    let bs = ty.block_size();
    if !src.len().is_multiple_of(bs) {
        return Err(FormatError::Invalid(format!(
            "{} values cannot be quantized to {ty}: not a multiple of the block size {bs}",
            src.len()
        )));
    }
    let bytes = ty
        .row_bytes(src.len() as u64)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| FormatError::Invalid(format!("{} values of {ty} overflow", src.len())))?;
    dst.reserve(bytes);
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => floats::quantize(ty, src, dst),
        GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
        | GgmlType::IQ4_XS => kquants::quantize(ty, src, dst),
        _ => legacy::quantize(ty, src, dst),
    }
    Ok(())
}

/// The activation format a weight type's dot product consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum ActKind {
    /// Nothing prepared yet.
    #[default]
    Empty,
    /// Plain f32 values.
    F32,
    /// int8 in 32-element blocks: `d` per block, `sums` per block.
    Q8B32,
    /// int8 in 256-element blocks: `d` per block, `sums` per 16 elements.
    Q8K,
}

impl ActKind {
    /// (elements per scale, elements per sum)
    fn grouping(self) -> (usize, usize) {
        match self {
            ActKind::Q8B32 => (32, 32),
            ActKind::Q8K => (256, 16),
            ActKind::F32 | ActKind::Empty => (1, 1),
        }
    }
}

fn act_kind(ty: GgmlType) -> Option<ActKind> {
    use GgmlType::*;
    match ty {
        F32 | F16 | BF16 => Some(ActKind::F32),
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4_NL | MXFP4 => Some(ActKind::Q8B32),
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS => Some(ActKind::Q8K),
        _ => None,
    }
}

/// Activations prepared once for one weight type and reused for every weight row.
///
/// Holds `rows()` rows of `k()` values each, in the format the weight type's dot product
/// wants (see the module docs). Row `j` of the int8 data is `q[j*k..(j+1)*k]`, its scales
/// `d[j*k/B..]` (B = 32 or 256) and its sums `sums[j*k/G..]` (G = 32 or 16).
/// Buffers are reused: once warm, `prepare` with the same or smaller shape allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActs {
    kind: ActKind,
    m: usize,
    k: usize,
    f: Vec<f32>,
    q: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<i16>,
    /// 32-element blocks only: `d * Σq` per block (the Q8_1 `s` field, in f32).
    ds: Vec<f32>,
}

impl QuantizedActs {
    /// Prepares `x` (`m * k` values, row-major, `m = x.len() / k`) for dot products with
    /// weights of type `wty`. `k` must be a non-zero multiple of `wty.block_size()`.
    pub fn prepare(&mut self, wty: GgmlType, x: &[f32], k: usize) -> Result<()> {
        let kind = act_kind(wty).ok_or_else(|| unsupported(wty, "dot product"))?;
        if k == 0 || !k.is_multiple_of(wty.block_size()) || !x.len().is_multiple_of(k) {
            return Err(FormatError::Invalid(format!(
                "activations of {} values in rows of {k} do not fit {wty} blocks of {}",
                x.len(),
                wty.block_size()
            )));
        }
        self.kind = kind;
        self.k = k;
        self.m = x.len() / k;
        match kind {
            ActKind::F32 => {
                self.f.clear();
                self.f.extend_from_slice(x);
            }
            ActKind::Q8B32 | ActKind::Q8K => {
                let (blk, grp) = kind.grouping();
                let n = x.len();
                self.q.resize(n, 0);
                self.d.resize(n / blk, 0.0);
                self.sums.resize(n / grp, 0);
                quantize_acts(x, blk, grp, &mut self.q, &mut self.d, &mut self.sums);
                if kind == ActKind::Q8B32 {
                    self.ds.clear();
                    self.ds
                        .extend(self.d.iter().zip(&self.sums).map(|(&d, &s)| d * s as f32));
                } else {
                    self.ds.clear();
                }
            }
            ActKind::Empty => {}
        }
        Ok(())
    }

    /// Number of activation rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    fn f_row(&self, j: usize) -> &[f32] {
        &self.f[j * self.k..(j + 1) * self.k]
    }

    /// Row `j`'s int8 values, scales, sums, and (32-element blocks) `d * Σq` per block.
    fn q_row(&self, j: usize) -> (&[i8], &[f32], &[i16], &[f32]) {
        let (blk, grp) = self.kind.grouping();
        let k = self.k;
        let ds: &[f32] = if self.kind == ActKind::Q8B32 {
            &self.ds[j * (k / blk)..(j + 1) * (k / blk)]
        } else {
            &[]
        };
        (
            &self.q[j * k..(j + 1) * k],
            &self.d[j * (k / blk)..(j + 1) * (k / blk)],
            &self.sums[j * (k / grp)..(j + 1) * (k / grp)],
            ds,
        )
    }

    /// Panics when the weight row cannot be paired with row `j` (a caller bug, never
    /// file data): the SIMD kernels rely on these lengths.
    #[inline]
    fn check(&self, wty: GgmlType, w_row: &[u8], j: usize) {
        assert!(
            act_kind(wty) == Some(self.kind),
            "activations prepared as {:?}, not for {wty}",
            self.kind
        );
        assert!(j < self.m, "activation row {j} of {}", self.m);
        let need = self.k / wty.block_size() * wty.type_size();
        assert!(
            w_row.len() >= need,
            "weight row of {} bytes, {wty} needs {need}",
            w_row.len()
        );
        debug_assert_eq!(w_row.len(), need);
    }
}

/// Rounds to the nearest integer, ties to even, for |v| < 2^22.
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (v + MAGIC) - MAGIC
}

/// Symmetric int8 quantization of activations in blocks of `blk` with sums per `grp`.
fn quantize_acts(x: &[f32], blk: usize, grp: usize, q: &mut [i8], d: &mut [f32], sums: &mut [i16]) {
    for (b, (xb, qb)) in x.chunks_exact(blk).zip(q.chunks_exact_mut(blk)).enumerate() {
        let mut amax = 0.0f32;
        for &v in xb {
            let a = v.abs();
            if a > amax {
                amax = a;
            }
        }
        let db = amax / 127.0;
        let id = if db > 0.0 { 1.0 / db } else { 0.0 };
        for (o, &v) in qb.iter_mut().zip(xb) {
            *o = round_even(v * id).clamp(-127.0, 127.0) as i8;
        }
        d[b] = db;
        for (g, qg) in qb.chunks_exact(grp).enumerate() {
            sums[b * (blk / grp) + g] = qg.iter().map(|&v| v as i16).sum();
        }
    }
}

/// Dot product of one weight row (raw blocks of `k = acts.k()` elements) with activation
/// row `j`. Panics if `acts` was prepared for another weight type, `j >= acts.rows()` or
/// `w_row` is shorter than one row.
#[inline]
pub fn vec_dot(wty: GgmlType, w_row: &[u8], acts: &QuantizedActs, j: usize) -> f32 {
    acts.check(wty, w_row, j);
    #[cfg(target_arch = "x86_64")]
    if level() >= Level::Avx2 {
        // SAFETY: `check` validated the lengths the kernel reads; AVX2/FMA/F16C present.
        if let Some(v) = unsafe { simd_x86::vec_dot(wty, w_row, acts, j) } {
            return v;
        }
    }
    reference::dot_unchecked(wty, w_row, acts, j)
}

/// `out[i] = vec_dot(wty, row i, acts, j)` for `out.len()` consecutive weight rows of
/// `w` (each `w.len() / out.len()` bytes): one dispatch for a whole block of rows.
pub fn vec_dot_many(wty: GgmlType, w: &[u8], acts: &QuantizedActs, j: usize, out: &mut [f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    assert!(w.len().is_multiple_of(n), "whole rows");
    let rb = w.len() / n;
    acts.check(wty, &w[..rb], j);
    #[cfg(target_arch = "x86_64")]
    if level() >= Level::Avx2 {
        // SAFETY: every row has the checked length `rb`; AVX2/FMA/F16C present.
        if unsafe { simd_x86::vec_dot_many(wty, w, rb, acts, j, out) } {
            return;
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = reference::dot_unchecked(wty, &w[i * rb..(i + 1) * rb], acts, j);
    }
}

/// `out[j] = vec_dot(wty, w_row, acts, j)` for every activation row; `out.len()` must
/// be `acts.rows()`. The weight row is read from memory once and stays in cache.
pub fn vec_dot_rows(wty: GgmlType, w_row: &[u8], acts: &QuantizedActs, out: &mut [f32]) {
    assert_eq!(out.len(), acts.rows(), "one output per activation row");
    if acts.rows() == 0 {
        return;
    }
    acts.check(wty, w_row, 0);
    #[cfg(target_arch = "x86_64")]
    if level() >= Level::Avx2 {
        // SAFETY: as in `vec_dot`; rows are all of the same length.
        if unsafe { simd_x86::vec_dot_rows(wty, w_row, acts, out) } {
            return;
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = vec_dot(wty, w_row, acts, j);
    }
}

/// Plain scalar dot products that define what the fast paths compute.
pub mod reference {
    use super::*;

    /// Scalar twin of [`super::vec_dot`].
    pub fn vec_dot(wty: GgmlType, w_row: &[u8], acts: &QuantizedActs, j: usize) -> f32 {
        acts.check(wty, w_row, j);
        dot_unchecked(wty, w_row, acts, j)
    }

    /// Scalar twin of [`super::vec_dot_rows`].
    pub fn vec_dot_rows(wty: GgmlType, w_row: &[u8], acts: &QuantizedActs, out: &mut [f32]) {
        assert_eq!(out.len(), acts.rows(), "one output per activation row");
        for (j, o) in out.iter_mut().enumerate() {
            *o = vec_dot(wty, w_row, acts, j);
        }
    }

    pub(super) fn dot_unchecked(
        wty: GgmlType,
        w_row: &[u8],
        acts: &QuantizedActs,
        j: usize,
    ) -> f32 {
        match acts.kind {
            ActKind::F32 => floats::dot(wty, w_row, acts.f_row(j)),
            ActKind::Q8B32 => {
                let (q, d, _, ds) = acts.q_row(j);
                legacy::dot(wty, w_row, q, d, ds)
            }
            ActKind::Q8K => {
                let (q, d, s, _) = acts.q_row(j);
                kquants::dot(wty, w_row, q, d, s)
            }
            ActKind::Empty => 0.0,
        }
    }
}

/// Instruction sets the fast paths may use, detected once.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Scalar = 1,
    /// AVX2 + FMA + F16C.
    Avx2 = 2,
    /// AVX2 level plus AVX-VNNI (256-bit int8 dot products).
    Avx2Vnni = 3,
}

#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(0);
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Scalar,
        2 => Level::Avx2,
        3 => Level::Avx2Vnni,
        _ => {
            let forced_scalar = std::env::var_os("CALDERA_NO_SIMD").is_some();
            let l = if !forced_scalar
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                if is_x86_feature_detected!("avxvnni")
                    && std::env::var_os("CALDERA_NO_VNNI").is_none()
                {
                    Level::Avx2Vnni
                } else {
                    Level::Avx2
                }
            } else {
                Level::Scalar
            };
            LEVEL.store(l as u8, Ordering::Relaxed);
            l
        }
    }
}

/// The instruction set the fast paths use on this machine ("scalar", "avx2", "avx2+vnni").
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx2Vnni => "avx2+vnni",
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = Level::Scalar;
        "scalar"
    }
}

/// Little-endian f16 at byte `i`.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[inline(always)]
fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}
