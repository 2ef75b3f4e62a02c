//! AVX2 (+FMA, F16C, optionally AVX-VNNI) dot products. Each kernel computes exactly the
//! integer sums of its scalar twin in `legacy` / `kquants` / `floats` and differs only in
//! the order of the f32 scale products.
//!
//! Kernels are `#[inline(always)]` bodies generic over `V` (use AVX-VNNI `vpdpbusd`),
//! instantiated by [`kernels!`] inside functions that enable the matching target features.

use std::arch::x86_64::*;

use super::{level, Level, QuantizedActs};
use crate::GgmlType;

/// Raw pointers to one prepared activation row. Lengths were checked by the caller
/// (`QuantizedActs::check`): `q` has `k` values, `d` one per block, `s` one per group.
#[derive(Clone, Copy)]
struct Row {
    q: *const i8,
    d: *const f32,
    s: *const i16,
    ds: *const f32,
    f: *const f32,
    k: usize,
}

fn row(acts: &QuantizedActs, j: usize) -> Row {
    match acts.kind {
        super::ActKind::F32 => {
            let f = acts.f_row(j);
            Row {
                q: std::ptr::null(),
                d: std::ptr::null(),
                s: std::ptr::null(),
                ds: std::ptr::null(),
                f: f.as_ptr(),
                k: acts.k,
            }
        }
        _ => {
            let (q, d, s, ds) = acts.q_row(j);
            Row {
                q: q.as_ptr(),
                d: d.as_ptr(),
                s: s.as_ptr(),
                ds: ds.as_ptr(),
                f: std::ptr::null(),
                k: acts.k,
            }
        }
    }
}

type Kernel = unsafe fn(*const u8, Row) -> f32;
/// `n` consecutive weight rows of `row_bytes` each, one activation row, `n` outputs.
type ManyKernel = unsafe fn(*const u8, usize, usize, Row, *mut f32);

/// The kernel table: for each type, the body instantiated inside functions that enable
/// the matching target features, once for a single row and once as a loop over a block
/// of rows (one dispatch per block: a 262144-row output head pays the call cost once).
macro_rules! kernels {
    ($($ty:ident => $body:ident,)*) => {
        fn kernel_table(wty: GgmlType, vnni: bool) -> Option<(Kernel, ManyKernel)> {
            match wty {
                $(GgmlType::$ty => {
                    #[target_feature(enable = "avx2,fma,f16c")]
                    unsafe fn one(w: *const u8, r: Row) -> f32 {
                        $body::<false>(w, r)
                    }
                    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
                    unsafe fn one_vnni(w: *const u8, r: Row) -> f32 {
                        $body::<true>(w, r)
                    }
                    #[target_feature(enable = "avx2,fma,f16c")]
                    unsafe fn many(w: *const u8, rb: usize, n: usize, r: Row, out: *mut f32) {
                        for i in 0..n {
                            *out.add(i) = $body::<false>(w.add(i * rb), r);
                        }
                    }
                    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
                    unsafe fn many_vnni(w: *const u8, rb: usize, n: usize, r: Row, out: *mut f32) {
                        for i in 0..n {
                            *out.add(i) = $body::<true>(w.add(i * rb), r);
                        }
                    }
                    Some(if vnni {
                        (one_vnni as Kernel, many_vnni as ManyKernel)
                    } else {
                        (one as Kernel, many as ManyKernel)
                    })
                })*
                _ => None,
            }
        }
    };
}

kernels! {
    F32 => dot_f32,
    F16 => dot_f16,
    BF16 => dot_bf16,
    Q8_0 => dot_q8_0,
    Q4_0 => dot_q4_0,
    Q4_1 => dot_q4_1,
    Q5_0 => dot_q5_0,
    Q5_1 => dot_q5_1,
    IQ4_NL => dot_iq4_nl,
    MXFP4 => dot_mxfp4,
    Q2_K => dot_q2_k,
    Q3_K => dot_q3_k,
    Q4_K => dot_q4_k,
    Q5_K => dot_q5_k,
    Q6_K => dot_q6_k,
    IQ4_XS => dot_iq4_xs,
}

fn kernel(wty: GgmlType, vnni: bool) -> Option<Kernel> {
    kernel_table(wty, vnni).map(|k| k.0)
}

/// SIMD dot of `w` with activation row `j`, or `None` for types without a kernel.
///
/// # Safety
/// AVX2, FMA and F16C must be present (AVX-VNNI too when `level()` says so) and
/// `acts.check(wty, w, j)` must have passed.
pub(super) unsafe fn vec_dot(
    wty: GgmlType,
    w: &[u8],
    acts: &QuantizedActs,
    j: usize,
) -> Option<f32> {
    let k = kernel(wty, level() == Level::Avx2Vnni)?;
    Some(k(w.as_ptr(), row(acts, j)))
}

/// `out[i] = dot(weight row i of w, activation row j)` for `out.len()` consecutive rows
/// of `row_bytes` each; `false` when `wty` has no kernel.
///
/// # Safety
/// As [`vec_dot`] for every row: `w.len() >= out.len() * row_bytes`, each row checked.
pub(super) unsafe fn vec_dot_many(
    wty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    acts: &QuantizedActs,
    j: usize,
    out: &mut [f32],
) -> bool {
    let Some((_, k)) = kernel_table(wty, level() == Level::Avx2Vnni) else {
        return false;
    };
    k(
        w.as_ptr(),
        row_bytes,
        out.len(),
        row(acts, j),
        out.as_mut_ptr(),
    );
    true
}

/// All activation rows at once; `false` when `wty` has no kernel.
///
/// # Safety
/// As [`vec_dot`], for row 0 (all rows have the same shape).
pub(super) unsafe fn vec_dot_rows(
    wty: GgmlType,
    w: &[u8],
    acts: &QuantizedActs,
    out: &mut [f32],
) -> bool {
    let Some(k) = kernel(wty, level() == Level::Avx2Vnni) else {
        return false;
    };
    for (j, o) in out.iter_mut().enumerate() {
        *o = k(w.as_ptr(), row(acts, j));
    }
    true
}

// ---------------------------------------------------------------------------------------
// helpers

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn f16(p: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The f16 at `p`, reading 4 bytes (`p` must have 4 readable bytes). A full 32-bit
/// `movd` load avoids the merging `pinsrw` that a 16-bit load compiles to, whose false
/// dependency would chain loop iterations.
#[inline(always)]
unsafe fn f16_4(p: *const u8) -> f32 {
    f16x2(p).0
}

/// Two adjacent f16 values.
#[inline(always)]
unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

#[inline(always)]
unsafe fn load32(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// 16 bytes of nibbles → 32 bytes: low nibbles first, then high nibbles.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    _mm256_and_si256(both, _mm256_set1_epi8(15))
}

/// Per i32 lane: sum of four products `u[i] * s[i]` (u unsigned, s signed), added to acc.
/// Without VNNI the pairwise i16 sums must not saturate: |u * s| * 2 <= 32767.
#[inline(always)]
unsafe fn dpbusd<const V: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    if V {
        _mm256_dpbusd_avx_epi32(acc, u, s)
    } else {
        let p = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
}

/// Signed × signed byte dot (|w| <= 127 or w = -128 with |a| <= 127).
#[inline(always)]
unsafe fn dot_ss<const V: bool>(w: __m256i, a: __m256i) -> __m256i {
    let u = _mm256_sign_epi8(w, w);
    let s = _mm256_sign_epi8(a, w);
    dpbusd::<V>(_mm256_setzero_si256(), u, s)
}

/// Byte `i` = 0xFF when bit `i` of `bits` is set.
#[inline(always)]
unsafe fn bits_to_mask(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let v = _mm256_shuffle_epi8(v, shuf);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit)
}

#[inline(always)]
unsafe fn table(t: &[i8; 16]) -> __m256i {
    let v = _mm_loadu_si128(t.as_ptr() as *const __m128i);
    _mm256_set_m128i(v, v)
}

/// i16 lanes 0..8 = `lo`, lanes 8..16 = `hi`.
#[inline(always)]
unsafe fn scale_pair(lo: i32, hi: i32) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16))
}

// ---------------------------------------------------------------------------------------
// float weights

#[inline(always)]
unsafe fn dot_floats<F: Fn(usize) -> __m256, G: Fn(usize) -> f32>(r: Row, load: F, at: G) -> f32 {
    let k = r.k;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= k {
        for (u, a) in acc.iter_mut().enumerate() {
            let o = i + 8 * u;
            *a = _mm256_fmadd_ps(load(o), _mm256_loadu_ps(r.f.add(o)), *a);
        }
        i += 32;
    }
    while i + 8 <= k {
        acc[0] = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(r.f.add(i)), acc[0]);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < k {
        s += at(i) * *r.f.add(i);
        i += 1;
    }
    s
}

#[inline(always)]
unsafe fn dot_f32<const V: bool>(w: *const u8, r: Row) -> f32 {
    let w = w as *const f32;
    dot_floats(
        r,
        |i| _mm256_loadu_ps(w.add(i)),
        |i| std::ptr::read_unaligned(w.add(i)),
    )
}

#[inline(always)]
unsafe fn dot_f16<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_floats(
        r,
        |i| _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * i) as *const __m128i)),
        |i| f16(w.add(2 * i)),
    )
}

#[inline(always)]
unsafe fn dot_bf16<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_floats(
        r,
        |i| {
            let h = _mm_loadu_si128(w.add(2 * i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        },
        |i| f32::from_bits((u16::from_le_bytes([*w.add(2 * i), *w.add(2 * i + 1)]) as u32) << 16),
    )
}

// ---------------------------------------------------------------------------------------
// 32-element blocks: result = Σ_b dd_b * Σ(u·a) + corr, dd_b = d_w * d_a

#[inline(always)]
unsafe fn dot_q8_0<const V: bool>(w: *const u8, r: Row) -> f32 {
    let nb = r.k / 32;
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 2 <= nb {
        let b0 = w.add(34 * i);
        let b1 = w.add(34 * (i + 1));
        let p0 = dot_ss::<V>(load32(b0.add(2)), load32(r.q.add(32 * i) as *const u8));
        let p1 = dot_ss::<V>(load32(b1.add(2)), load32(r.q.add(32 * i + 32) as *const u8));
        acc0 = _mm256_fmadd_ps(
            _mm256_set1_ps(f16_4(b0) * *r.d.add(i)),
            _mm256_cvtepi32_ps(p0),
            acc0,
        );
        acc1 = _mm256_fmadd_ps(
            _mm256_set1_ps(f16_4(b1) * *r.d.add(i + 1)),
            _mm256_cvtepi32_ps(p1),
            acc1,
        );
        i += 2;
    }
    if i < nb {
        let b0 = w.add(34 * i);
        let p0 = dot_ss::<V>(load32(b0.add(2)), load32(r.q.add(32 * i) as *const u8));
        acc0 = _mm256_fmadd_ps(
            _mm256_set1_ps(f16_4(b0) * *r.d.add(i)),
            _mm256_cvtepi32_ps(p0),
            acc0,
        );
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

/// A 32-element block type with unsigned levels: `unpack(block) -> (u, d, c)` gives the
/// levels, the scale, and the factor of the per-block correction `c * d_a * Σa`
/// (`-offset * d` for offset types, the min `m` for min types).
trait UnsignedBlock {
    const BYTES: usize;
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32);
}

struct Q40;
struct Q41;
struct Q50;
struct Q51;

impl UnsignedBlock for Q40 {
    const BYTES: usize = 18;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let d = f16_4(b);
        (nibbles(b.add(2)), d, -8.0 * d)
    }
}

impl UnsignedBlock for Q41 {
    const BYTES: usize = 20;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let (d, m) = f16x2(b);
        (nibbles(b.add(4)), d, m)
    }
}

impl UnsignedBlock for Q50 {
    const BYTES: usize = 22;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let d = f16_4(b);
        let qh = std::ptr::read_unaligned(b.add(2) as *const u32);
        let hi = _mm256_and_si256(bits_to_mask(qh), _mm256_set1_epi8(16));
        (_mm256_or_si256(nibbles(b.add(6)), hi), d, -16.0 * d)
    }
}

impl UnsignedBlock for Q51 {
    const BYTES: usize = 24;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let qh = std::ptr::read_unaligned(b.add(4) as *const u32);
        let hi = _mm256_and_si256(bits_to_mask(qh), _mm256_set1_epi8(16));
        let (d, m) = f16x2(b);
        (_mm256_or_si256(nibbles(b.add(8)), hi), d, m)
    }
}

#[inline(always)]
unsafe fn dot_unsigned_blocks<const V: bool, B: UnsignedBlock>(w: *const u8, r: Row) -> f32 {
    let nb = r.k / 32;
    let bytes = B::BYTES;
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let (mut corr0, mut corr1) = (0.0f32, 0.0f32);
    let mut i = 0;
    while i + 2 <= nb {
        let (u0, d0, c0) = B::unpack(w.add(bytes * i));
        let (u1, d1, c1) = B::unpack(w.add(bytes * (i + 1)));
        let p0 = dpbusd::<V>(
            _mm256_setzero_si256(),
            u0,
            load32(r.q.add(32 * i) as *const u8),
        );
        let p1 = dpbusd::<V>(
            _mm256_setzero_si256(),
            u1,
            load32(r.q.add(32 * i + 32) as *const u8),
        );
        let (da0, da1) = (*r.d.add(i), *r.d.add(i + 1));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * da0), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * da1), _mm256_cvtepi32_ps(p1), acc1);
        corr0 += c0 * *r.ds.add(i);
        corr1 += c1 * *r.ds.add(i + 1);
        i += 2;
    }
    if i < nb {
        let (u0, d0, c0) = B::unpack(w.add(bytes * i));
        let p0 = dpbusd::<V>(
            _mm256_setzero_si256(),
            u0,
            load32(r.q.add(32 * i) as *const u8),
        );
        let da0 = *r.d.add(i);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * da0), _mm256_cvtepi32_ps(p0), acc0);
        corr0 += c0 * *r.ds.add(i);
    }
    hsum(_mm256_add_ps(acc0, acc1)) + (corr0 + corr1)
}

#[inline(always)]
unsafe fn dot_q4_0<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_unsigned_blocks::<V, Q40>(w, r)
}

#[inline(always)]
unsafe fn dot_q4_1<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_unsigned_blocks::<V, Q41>(w, r)
}

#[inline(always)]
unsafe fn dot_q5_0<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_unsigned_blocks::<V, Q50>(w, r)
}

#[inline(always)]
unsafe fn dot_q5_1<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_unsigned_blocks::<V, Q51>(w, r)
}

/// A non-linear 4-bit block type: 16-entry level table, nibbles at `QS`, scale by `scale`.
trait TableBlock {
    const BYTES: usize;
    const QS: usize;
    const TABLE: [i8; 16];
    unsafe fn scale(b: *const u8) -> f32;
}

struct Iq4Nl;
struct Mxfp4;

impl TableBlock for Iq4Nl {
    const BYTES: usize = 18;
    const QS: usize = 2;
    const TABLE: [i8; 16] = super::legacy::KVALUES_IQ4NL;
    #[inline(always)]
    unsafe fn scale(b: *const u8) -> f32 {
        f16_4(b)
    }
}

impl TableBlock for Mxfp4 {
    const BYTES: usize = 17;
    const QS: usize = 1;
    const TABLE: [i8; 16] = super::legacy::KVALUES_MXFP4;
    #[inline(always)]
    unsafe fn scale(b: *const u8) -> f32 {
        super::legacy::e8m0_half(*b)
    }
}

#[inline(always)]
unsafe fn dot_table_blocks<const V: bool, B: TableBlock>(w: *const u8, r: Row) -> f32 {
    let nb = r.k / 32;
    let t = table(&B::TABLE);
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 2 <= nb {
        let b0 = w.add(B::BYTES * i);
        let b1 = w.add(B::BYTES * (i + 1));
        let w0 = _mm256_shuffle_epi8(t, nibbles(b0.add(B::QS)));
        let w1 = _mm256_shuffle_epi8(t, nibbles(b1.add(B::QS)));
        let p0 = dot_ss::<V>(w0, load32(r.q.add(32 * i) as *const u8));
        let p1 = dot_ss::<V>(w1, load32(r.q.add(32 * i + 32) as *const u8));
        acc0 = _mm256_fmadd_ps(
            _mm256_set1_ps(B::scale(b0) * *r.d.add(i)),
            _mm256_cvtepi32_ps(p0),
            acc0,
        );
        acc1 = _mm256_fmadd_ps(
            _mm256_set1_ps(B::scale(b1) * *r.d.add(i + 1)),
            _mm256_cvtepi32_ps(p1),
            acc1,
        );
        i += 2;
    }
    if i < nb {
        let b0 = w.add(B::BYTES * i);
        let w0 = _mm256_shuffle_epi8(t, nibbles(b0.add(B::QS)));
        let p0 = dot_ss::<V>(w0, load32(r.q.add(32 * i) as *const u8));
        acc0 = _mm256_fmadd_ps(
            _mm256_set1_ps(B::scale(b0) * *r.d.add(i)),
            _mm256_cvtepi32_ps(p0),
            acc0,
        );
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

#[inline(always)]
unsafe fn dot_iq4_nl<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_table_blocks::<V, Iq4Nl>(w, r)
}

#[inline(always)]
unsafe fn dot_mxfp4<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_table_blocks::<V, Mxfp4>(w, r)
}

// ---------------------------------------------------------------------------------------
// 256-element super-blocks with Q8_K activations (d per 256, sums per 16)

/// `maddubs(u, a)` weighted by i16 scales `sc` → i32 lanes (u·a pair sums must fit i16).
#[inline(always)]
unsafe fn scaled(u: __m256i, a: __m256i, sc: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), sc)
}

#[inline(always)]
unsafe fn aq(r: Row, off: usize) -> __m256i {
    load32(r.q.add(off) as *const u8)
}

#[inline(always)]
unsafe fn bsums(r: Row, sb: usize) -> __m256i {
    _mm256_loadu_si256(r.s.add(16 * sb) as *const __m256i)
}

#[inline(always)]
unsafe fn dot_q4_k<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_k45::<false>(w, r)
}

#[inline(always)]
unsafe fn dot_q5_k<const V: bool>(w: *const u8, r: Row) -> f32 {
    dot_k45::<true>(w, r)
}

/// Q4_K (`FIVE = false`) and Q5_K.
#[inline(always)]
unsafe fn dot_k45<const FIVE: bool>(w: *const u8, r: Row) -> f32 {
    let nb = r.k / 256;
    let bytes = if FIVE { 176 } else { 144 };
    let m4 = _mm256_set1_epi8(15);
    let one = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    for i in 0..nb {
        let b = w.add(bytes * i);
        let da = *r.d.add(i);
        let d = f16(b) * da;
        let dmin = f16(b.add(2)) * da;
        let w0 = std::ptr::read_unaligned(b.add(4) as *const u32);
        let w1 = std::ptr::read_unaligned(b.add(8) as *const u32);
        let w2 = std::ptr::read_unaligned(b.add(12) as *const u32);
        let sc_lo = w0 & 0x3f3f_3f3f;
        let mn_lo = w1 & 0x3f3f_3f3f;
        let sc_hi = (w2 & 0x0f0f_0f0f) | (((w0 >> 6) & 0x0303_0303) << 4);
        let mn_hi = ((w2 >> 4) & 0x0f0f_0f0f) | (((w1 >> 6) & 0x0303_0303) << 4);
        let sc = ((sc_hi as u64) << 32 | sc_lo as u64).to_le_bytes();
        let mn = _mm_set_epi32(0, 0, mn_hi as i32, mn_lo as i32);
        let mn16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn, mn));
        let pm = _mm256_madd_epi16(bsums(r, i), mn16);
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), accm);

        let qs = if FIVE { b.add(48) } else { b.add(16) };
        let mut qh = if FIVE {
            load32(b.add(16))
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = _mm256_setzero_si256();
        for j in 0..4 {
            let q = load32(qs.add(32 * j));
            let mut lo = _mm256_and_si256(q, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if FIVE {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
                hi = _mm256_or_si256(
                    hi,
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4),
                );
                qh = _mm256_srli_epi16(qh, 2);
            }
            let p0 = scaled(
                lo,
                aq(r, 256 * i + 64 * j),
                _mm256_set1_epi16(sc[2 * j] as i16),
            );
            let p1 = scaled(
                hi,
                aq(r, 256 * i + 64 * j + 32),
                _mm256_set1_epi16(sc[2 * j + 1] as i16),
            );
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc) - hsum(accm)
}

#[inline(always)]
unsafe fn dot_q6_k<const V: bool>(w: *const u8, r: Row) -> f32 {
    let nb = r.k / 256;
    let m4 = _mm256_set1_epi8(15);
    let m2 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let b = w.add(210 * i);
        let d = f16(b.add(208)) * *r.d.add(i);
        let scb = b.add(192) as *const i8;
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(scb as *const __m128i));
        let corr = _mm256_madd_epi16(bsums(r, i), sc16);
        let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 5));
        for n in 0..2 {
            let l0 = load32(b.add(64 * n));
            let l1 = load32(b.add(64 * n + 32));
            let h = load32(b.add(128 + 32 * n));
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(l0, m4),
                    _mm256_slli_epi16(_mm256_and_si256(h, m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4),
                ),
            ];
            for (c, &qc) in q.iter().enumerate() {
                let g = 8 * n + 2 * c;
                let s = scale_pair(*scb.add(g) as i32, *scb.add(g + 1) as i32);
                sumi = _mm256_add_epi32(sumi, scaled(qc, aq(r, 256 * i + 128 * n + 32 * c), s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}

#[inline(always)]
unsafe fn dot_q3_k<const V: bool>(w: *const u8, r: Row) -> f32 {
    let nb = r.k / 256;
    let m2 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let b = w.add(110 * i);
        let d = f16(b.add(108)) * *r.d.add(i);
        let w0 = std::ptr::read_unaligned(b.add(96) as *const u32);
        let w1 = std::ptr::read_unaligned(b.add(100) as *const u32);
        let w2 = std::ptr::read_unaligned(b.add(104) as *const u32);
        let (m4, m2w) = (0x0f0f_0f0fu32, 0x0303_0303u32);
        let a0 = (w0 & m4) | ((w2 & m2w) << 4);
        let a1 = (w1 & m4) | (((w2 >> 2) & m2w) << 4);
        let a2 = ((w0 >> 4) & m4) | (((w2 >> 4) & m2w) << 4);
        let a3 = ((w1 >> 4) & m4) | (((w2 >> 6) & m2w) << 4);
        let sc8 = _mm_sub_epi8(
            _mm_set_epi32(a3 as i32, a2 as i32, a1 as i32, a0 as i32),
            _mm_set1_epi8(32),
        );
        let mut sc = [0i8; 16];
        _mm_storeu_si128(sc.as_mut_ptr() as *mut __m128i, sc8);
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        let corr = _mm256_madd_epi16(bsums(r, i), sc16);
        let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 2));
        let mut hm = load32(b);
        for n in 0..2 {
            let mut q = load32(b.add(32 + 32 * n));
            for sh in 0..4 {
                let low = _mm256_and_si256(q, m2);
                let high = _mm256_slli_epi16(_mm256_and_si256(hm, one), 2);
                q = _mm256_srli_epi16(q, 2);
                hm = _mm256_srli_epi16(hm, 1);
                let g = 8 * n + 2 * sh;
                let u = _mm256_or_si256(low, high);
                let p = scaled(
                    u,
                    aq(r, 256 * i + 128 * n + 32 * sh),
                    scale_pair(sc[g] as i32, sc[g + 1] as i32),
                );
                sumi = _mm256_add_epi32(sumi, p);
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}

#[inline(always)]
unsafe fn dot_q2_k<const V: bool>(w: *const u8, r: Row) -> f32 {
    let nb = r.k / 256;
    let m2 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    for i in 0..nb {
        let b = w.add(84 * i);
        let da = *r.d.add(i);
        let d = f16(b.add(80)) * da;
        let dmin = f16(b.add(82)) * da;
        let raw = _mm_loadu_si128(b as *const __m128i);
        let mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(15)));
        let pm = _mm256_madd_epi16(bsums(r, i), mn16);
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(pm), accm);
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            let mut q = load32(b.add(16 + 32 * n));
            for sh in 0..4 {
                let u = _mm256_and_si256(q, m2);
                q = _mm256_srli_epi16(q, 2);
                let g = 8 * n + 2 * sh;
                let s = scale_pair((*b.add(g) & 15) as i32, (*b.add(g + 1) & 15) as i32);
                sumi = _mm256_add_epi32(sumi, scaled(u, aq(r, 256 * i + 128 * n + 32 * sh), s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc) - hsum(accm)
}

#[inline(always)]
unsafe fn dot_iq4_xs<const V: bool>(w: *const u8, r: Row) -> f32 {
    let nb = r.k / 256;
    let t = table(&super::legacy::KVALUES_IQ4NL);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let b = w.add(136 * i);
        let d = f16(b) * *r.d.add(i);
        let sh = u16::from_le_bytes([*b.add(2), *b.add(3)]);
        let mut sumi = _mm256_setzero_si256();
        for g in 0..8 {
            let low = (*b.add(4 + g / 2) >> (4 * (g % 2))) & 15;
            let high = ((sh >> (2 * g)) & 3) as u8;
            let ls = (low | (high << 4)) as i16 - 32;
            let wv = _mm256_shuffle_epi8(t, nibbles(b.add(8 + 16 * g)));
            let a = aq(r, 256 * i + 32 * g);
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(a, wv));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, _mm256_set1_epi16(ls)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}
