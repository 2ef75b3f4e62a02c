//! What the mat-vec kernel tests share: seeded randomness, activations and the CPU twin
//! of the decode mat-vecs (`mv.rs`, `mvq.rs`).
#![allow(dead_code)]

use caldera_format::quant::dequantize;
use caldera_format::GgmlType;
use caldera_vulkan::ops::{GluAct, MmMode, MvMode};
use caldera_vulkan::{Context, KvType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A generator seeded from `CALDERA_TEST_SEED` or the clock (printed, to replay).
pub fn rng(test: &str) -> StdRng {
    let s = std::env::var("CALDERA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: CALDERA_TEST_SEED={s}");
    StdRng::seed_from_u64(s)
}

pub fn random_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

pub fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

pub fn gelu_tanh(v: f64) -> f64 {
    0.5 * v * (1.0 + (0.797_884_560_802_865_4 * (v + 0.044715 * v * v * v)).tanh())
}

/// The f32 mat-vec input: x, or rmsnorm(x) * gam with `mode.norm`.
pub fn f32_input(x: &[f32], gam: &[f32], mode: MvMode) -> Vec<f64> {
    let k = x.len();
    if mode.norm {
        let ss = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
        let inv = 1.0 / (ss + mode.eps as f64).sqrt();
        (0..k).map(|c| x[c] as f64 * inv * gam[c] as f64).collect()
    } else {
        x.iter().map(|&v| v as f64).collect()
    }
}

/// CPU twin of a decode mat-vec on a prepared `input`: dequantized rows, f64 sums, then
/// the GLU / softcap / add of `mode`. Returns (y, error scale of each y).
pub fn cpu_mv(
    ty: GgmlType,
    w: &[u8],
    input: &[f64],
    y0: &[f32],
    mode: MvMode,
) -> (Vec<f64>, Vec<f64>) {
    let k = input.len();
    let row_bytes = ty.row_bytes(k as u64).unwrap() as usize;
    let mut deq = vec![0f32; k];
    let dots: Vec<(f64, f64)> = w
        .chunks_exact(row_bytes)
        .map(|row| {
            dequantize(ty, row, &mut deq).unwrap();
            let (mut s, mut a) = (0f64, 0f64);
            for c in 0..k {
                s += deq[c] as f64 * input[c];
                a += (deq[c] as f64 * input[c]).abs();
            }
            (s, a)
        })
        .collect();
    let mut y = Vec::new();
    let mut mag = Vec::new();
    let outs: Vec<(f64, f64)> = match mode.glu {
        None => dots,
        Some(act) => dots
            .chunks_exact(2)
            .map(|p| {
                let ((g, mg), (u, mu)) = (p[0], p[1]);
                let a = match act {
                    GluAct::Silu => silu(g),
                    GluAct::GeluTanh => gelu_tanh(g),
                };
                (a * u, 1.2 * mg * u.abs() + (g.abs() + 1.0) * mu)
            })
            .collect(),
    };
    for (i, (mut s, mut a)) in outs.into_iter().enumerate() {
        if let Some(cap) = mode.softcap {
            s = cap as f64 * (s / cap as f64).tanh();
        }
        if mode.relu2 {
            a *= 2.0 * s.abs() + a;
            s = s.max(0.0).powi(2);
        }
        if mode.add {
            s += y0[i] as f64;
            a += (y0[i] as f64).abs();
        }
        y.push(s);
        mag.push(a);
    }
    (y, mag)
}

/// One decode mat-vec case on fresh random data: `run` computes it on the device from
/// (w, k, x, gam, y0), `input` prepares x for the CPU twin; every output within
/// `rel * scale + abs`.
#[allow(clippy::too_many_arguments)]
pub fn check(
    ctx: &Context,
    rng: &mut StdRng,
    ty: GgmlType,
    outs: usize,
    k: usize,
    mode: MvMode,
    run: impl Fn(&Context, &[u8], &[f32], &[f32], &[f32]) -> Vec<f32>,
    input: impl Fn(&[f32], &[f32], MvMode) -> Vec<f64>,
    (rel, abs): (f64, f64),
) {
    let rows = if mode.glu.is_some() { 2 * outs } else { outs };
    let w = caldera_format::quant::quantize(ty, &random_vec(rng, rows * k, 1.0)).unwrap();
    let x = random_vec(rng, k, 2.0);
    let gam = random_vec(rng, k, 1.5);
    let y0 = random_vec(rng, outs, 1.0);
    let got = run(ctx, &w, &x, &gam, &y0);
    let (want, mag) = cpu_mv(ty, &w, &input(&x, &gam, mode), &y0, mode);
    assert_eq!(got.len(), outs);
    let t = ctx.tuning();
    for i in 0..outs {
        let err = (got[i] as f64 - want[i]).abs();
        assert!(
            err <= rel * mag[i] + abs,
            "{ty} {outs}x{k} {mode:?} (wg {}, rows {}, subgroup {}, int8 dot {}): [{i}] got \
             {}, want {} (scale {})",
            t.mv_workgroup_size,
            t.mv_rows,
            t.subgroup_reduce,
            t.int8_dot,
            got[i],
            want[i],
            mag[i]
        );
    }
}

/// The fused modes every decode mat-vec test covers.
pub fn modes() -> Vec<MvMode> {
    let eps = 1e-6;
    vec![
        MvMode::default(),
        MvMode {
            norm: true,
            eps,
            ..Default::default()
        },
        MvMode {
            add: true,
            ..Default::default()
        },
        MvMode {
            norm: true,
            glu: Some(GluAct::Silu),
            eps,
            ..Default::default()
        },
        MvMode {
            glu: Some(GluAct::GeluTanh),
            add: true,
            ..Default::default()
        },
        MvMode {
            norm: true,
            softcap: Some(3.0),
            eps,
            ..Default::default()
        },
        MvMode {
            norm: true,
            relu2: true,
            eps,
            ..Default::default()
        },
    ]
}

/// CPU twin of a prefill mat-vec (`mm_host`, `Mm`): `m` token rows of x (`k` values, `2k`
/// with the GLU), dequantized rows, f64 sums. Returns (y, scale of each y).
#[allow(clippy::too_many_arguments)]
pub fn cpu_mm(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    gam: Option<&[f32]>,
    y0: Option<&[f32]>,
    mode: MmMode,
) -> (Vec<f64>, Vec<f64>) {
    let row_bytes = ty.row_bytes(k as u64).unwrap() as usize;
    let rows = w.len() / row_bytes;
    let width = if mode.glu.is_some() { 2 * k } else { k };
    let mut deq = vec![0f32; k];
    let mut y = vec![0f64; m * rows];
    let mut mag = vec![0f64; m * rows];
    for t in 0..m {
        let xr = &x[t * width..(t + 1) * width];
        let input: Vec<f64> = match (mode.norm, mode.glu) {
            (true, _) => {
                let ss = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
                let inv = 1.0 / (ss + mode.eps as f64).sqrt();
                (0..k)
                    .map(|c| xr[c] as f64 * inv * gam.unwrap()[c] as f64)
                    .collect()
            }
            (false, Some(GluAct::Silu)) => (0..k)
                .map(|c| silu(xr[2 * c] as f64) * xr[2 * c + 1] as f64)
                .collect(),
            (false, Some(GluAct::GeluTanh)) => (0..k)
                .map(|c| gelu_tanh(xr[2 * c] as f64) * xr[2 * c + 1] as f64)
                .collect(),
            (false, None) => xr.iter().map(|&v| v as f64).collect(),
        };
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            dequantize(ty, row, &mut deq).unwrap();
            let (mut s, mut a) = (0f64, 0f64);
            for c in 0..k {
                s += deq[c] as f64 * input[c];
                a += (deq[c] as f64 * input[c]).abs();
            }
            if let Some(cap) = mode.softcap {
                s = cap as f64 * (s / cap as f64).tanh();
            }
            if mode.add {
                let b = y0.unwrap()[t * rows + r] as f64;
                s += b;
                a += b.abs();
            }
            y[t * rows + r] = s;
            mag[t * rows + r] = a;
        }
    }
    (y, mag)
}

/// Push-constant bytes of 32-bit words.
pub fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// RMSNorm of `v` in place with weights `w`.
pub fn rms(v: &mut [f64], w: &[f32], eps: f64) {
    let ss = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
    let inv = 1.0 / (ss + eps).sqrt();
    for (x, g) in v.iter_mut().zip(w) {
        *x *= inv * *g as f64;
    }
}

/// The kernels' RoPE table (theta 10000): (cos, sin) of pair i at position p at
/// 2 (p * n_rot / 2 + i), for positions 0 .. cap.
pub fn rope_table(cap: usize, n_rot: usize) -> Vec<f32> {
    let half = n_rot / 2;
    let mut table = Vec::with_capacity(cap * n_rot);
    for p in 0..cap {
        for i in 0..half {
            let th = p as f64 * 10000f64.powf(-2.0 * i as f64 / n_rot as f64);
            table.push(th.cos() as f32);
            table.push(th.sin() as f32);
        }
    }
    table
}

/// Rotates the first `n_rot` dims of `v` for position `pos` (pairs (i, i + n_rot / 2), or
/// (2i, 2i + 1) when `interleaved`).
pub fn rope(v: &mut [f64], table: &[f32], n_rot: usize, interleaved: bool, pos: usize) {
    let half = n_rot / 2;
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let r = 2 * (pos * half + i);
        let (co, si) = (table[r] as f64, table[r + 1] as f64);
        let (x0, x1) = (v[a], v[b]);
        v[a] = x0 * co - x1 * si;
        v[b] = x0 * si + x1 * co;
    }
}

/// q8_0 of one block of 32 as the kernels make it (`kv_put32` in `kv.glsl`): the scale
/// amax / 127 and the values round(x * 127 / amax), ties to even, within ±127.
pub fn q8_block(x: &[f32]) -> (f32, Vec<i8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let q = x
        .iter()
        .map(|v| (v * id).round_ties_even().clamp(-127.0, 127.0) as i8)
        .collect();
    (amax / 127.0, q)
}

/// Uploads KV-cache values in the context's cache format (f16 pairs per word; q8_0
/// blocks of 32, 36 bytes each: the f32 scale, then the int8 values), first replacing
/// `vals` by what the cache holds of them so the CPU twin sees the same values.
pub fn upload_kv(ctx: &caldera_vulkan::Context, vals: &mut [f32]) -> caldera_vulkan::Buffer {
    let mut bytes = Vec::new();
    match ctx.tuning().kv {
        KvType::F32 => return ctx.upload_f32(vals).unwrap(),
        KvType::F16 => {
            for v in vals.iter_mut() {
                let h = half::f16::from_f32(*v);
                *v = h.to_f32();
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        KvType::Q8_0 => {
            assert!(
                vals.len().is_multiple_of(32),
                "q8_0 caches hold whole blocks"
            );
            for blk in vals.chunks_mut(32) {
                let (d, q) = q8_block(blk);
                bytes.extend_from_slice(&d.to_le_bytes());
                bytes.extend(q.iter().map(|&v| v as u8));
                for (x, &qv) in blk.iter_mut().zip(&q) {
                    *x = qv as f32 * d;
                }
            }
        }
    }
    while bytes.len() % 4 != 0 || bytes.is_empty() {
        bytes.push(0);
    }
    ctx.upload(&bytes).unwrap()
}

/// Reads `n` KV-cache values back in the context's cache format.
pub fn read_kv(ctx: &caldera_vulkan::Context, buf: &caldera_vulkan::Buffer, n: usize) -> Vec<f32> {
    match ctx.tuning().kv {
        KvType::F32 => ctx.read_f32(buf, n).unwrap(),
        KvType::F16 => {
            let bytes = ctx.read_buffer(buf, 0, (n * 2) as u64).unwrap();
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect()
        }
        KvType::Q8_0 => {
            assert!(n.is_multiple_of(32), "q8_0 caches hold whole blocks");
            let bytes = ctx.read_buffer(buf, 0, (n / 32 * 36) as u64).unwrap();
            bytes
                .chunks_exact(36)
                .flat_map(|b| {
                    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    b[4..].iter().map(move |&q| q as i8 as f32 * d)
                })
                .collect()
        }
    }
}

/// What the KV cache keeps of a row of `row.len()` values (a kv head's row of hd
/// values, or several): itself in f32, each value rounded to f16, or each block of 32
/// quantized to q8_0 from its f32 values.
pub fn kv_round_row(ctx: &caldera_vulkan::Context, row: &[f64]) -> Vec<f64> {
    match ctx.tuning().kv {
        KvType::F32 => row.to_vec(),
        KvType::F16 => row
            .iter()
            .map(|&v| half::f16::from_f64(v).to_f64())
            .collect(),
        KvType::Q8_0 => row
            .chunks(32)
            .flat_map(|blk| {
                let x: Vec<f32> = blk.iter().map(|&v| v as f32).collect();
                let (d, q) = q8_block(&x);
                q.into_iter().map(move |qv| qv as f64 * d as f64)
            })
            .collect(),
    }
}

/// The first value of a cache row that a kernel wrote from the exact values `want` (the
/// whole row: the device computed them in f32) that the cache may not hold, as
/// `got` (read back) shows it: f32 within 1e-5, f16 within 1e-3 of our rounding
/// (relative to max(|x|, 1): the rounding of ours or of a neighbour), q8_0 within half a
/// step (its block's amax / 127, plus 0.1%) of the exact value: the rounding of the
/// device's own value, which may land a step from ours at a tie.
pub fn kv_row_mismatch(ctx: &caldera_vulkan::Context, got: &[f32], want: &[f64]) -> Option<usize> {
    assert_eq!(got.len(), want.len());
    let rounded = kv_round_row(ctx, want);
    (0..want.len()).find(|&i| {
        let g = got[i] as f64;
        match ctx.tuning().kv {
            KvType::F32 => (g - want[i]).abs() > 1e-5 * want[i].abs().max(1.0),
            KvType::F16 => (g - rounded[i]).abs() > 1e-3 * want[i].abs().max(1.0),
            KvType::Q8_0 => {
                let b = i / 32 * 32;
                let amax = want[b..(b + 32).min(want.len())]
                    .iter()
                    .fold(0f64, |m, v| m.max(v.abs()));
                (g - want[i]).abs() > 0.5 * amax / 127.0 * 1.001 + 1e-6
            }
        }
    })
}

/// A context per reduction path the kernels have (subgroup, shared memory, small
/// workgroups); empty without a Vulkan device (unless `CALDERA_REQUIRE_VULKAN=1`).
pub fn reduction_contexts(test: &str) -> Vec<Context> {
    let mut v = Vec::new();
    for (shared, wg) in [(false, None), (true, None), (false, Some(16))] {
        let opts = caldera_vulkan::ContextOptions {
            force_shared_reduce: shared,
            workgroup_size: wg,
            ..Default::default()
        };
        match caldera_vulkan::testing::test_context(test, &opts) {
            Some(c) => v.push(c),
            None => return Vec::new(),
        }
    }
    v
}

/// The step values of a step of `m` tokens (all rows' logits).
pub fn step_values(ctx: &Context, m: usize) -> caldera_vulkan::Buffer {
    ctx.upload(&words(&[m as u32, 0, 0, m as u32])).unwrap()
}

/// Positions per page of the KV cache (`kv.glsl`'s paging).
pub const PAGE: usize = caldera_vulkan::KV_PAGE;

/// Scrambled page tables: sequence s's positions `0..cap` live in the pages
/// `tables[s]` (`ceil(cap / PAGE)` of them) of a pool of `n_pages`, a random permutation,
/// with spare pages that no table names.
pub struct Pages {
    pub tables: Vec<Vec<u32>>,
    pub n_pages: usize,
}

impl Pages {
    pub fn scrambled(rng: &mut StdRng, seqs: usize, cap: usize, spare: usize) -> Pages {
        use rand::seq::SliceRandom;
        let per = cap.div_ceil(PAGE);
        let n_pages = seqs * per + spare;
        let mut ids: Vec<u32> = (0..n_pages as u32).collect();
        ids.shuffle(rng);
        let tables = ids.chunks(per).take(seqs).map(|c| c.to_vec()).collect();
        Pages { tables, n_pages }
    }

    /// The pool row of position `p` of sequence `s`.
    pub fn row(&self, s: usize, p: usize) -> usize {
        self.tables[s][p / PAGE] as usize * PAGE + p % PAGE
    }

    /// A pool holding each sequence's logical cache (`[pos][kvd]`) in its pages, random
    /// values in the rest.
    pub fn scatter(&self, rng: &mut StdRng, logical: &[Vec<f32>], kvd: usize) -> Vec<f32> {
        let mut pool = random_vec(rng, self.n_pages * PAGE * kvd, 1.0);
        for (s, l) in logical.iter().enumerate() {
            for p in 0..l.len() / kvd {
                let r = self.row(s, p);
                pool[r * kvd..(r + 1) * kvd].copy_from_slice(&l[p * kvd..(p + 1) * kvd]);
            }
        }
        pool
    }

    /// Sequence `s`'s logical cache of `cap` positions, read from the pool.
    pub fn gather(&self, pool: &[f32], s: usize, cap: usize, kvd: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(cap * kvd);
        for p in 0..cap {
            let r = self.row(s, p);
            out.extend_from_slice(&pool[r * kvd..(r + 1) * kvd]);
        }
        out
    }

    /// The tables as one u32 buffer's bytes, `stride` entries per sequence.
    pub fn table_bytes(&self, stride: usize) -> Vec<u8> {
        let mut w = vec![0u32; self.tables.len() * stride];
        for (s, t) in self.tables.iter().enumerate() {
            w[s * stride..s * stride + t.len()].copy_from_slice(t);
        }
        words(&w)
    }
}

/// A batched step's column input as `quant_rows` / `half_rows` form it, in f32: the
/// GLU act(x[2c]) * x[2c + 1] of `k` (gate, up) pairs with `glu`, else x * gam / rms(x)
/// with `norm` (epsilon 1e-6), else x; before their int8 / f16 rounding.
pub fn batch_input(x: &[f32], gam: &[f32], k: usize, norm: bool, glu: Option<GluAct>) -> Vec<f32> {
    if let Some(act) = glu {
        (0..k)
            .map(|c| {
                let (g, u) = (x[2 * c] as f64, x[2 * c + 1] as f64);
                let a = match act {
                    GluAct::Silu => silu(g),
                    GluAct::GeluTanh => gelu_tanh(g),
                };
                (a * u) as f32
            })
            .collect()
    } else if norm {
        let ss = x[..k].iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
        let inv = (1.0 / (ss + 1e-6).sqrt()) as f32;
        (0..k).map(|c| x[c] * inv * gam[c]).collect()
    } else {
        x[..k].to_vec()
    }
}
