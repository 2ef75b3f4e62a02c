//! `attn_decode` and `attn_dec` (q/k norm, RoPE, KV write, split attention, output gate,
//! int8 output) against a CPU twin on fresh random inputs: several head layouts (GQA
//! groups 1 to 8, chunks of query heads), positions that need one and many splits (and,
//! for `attn_dec`, blocks of one and of many tiles), windows, softcap, both RoPE styles,
//! partial RoPE, Qwen3.5's sigmoid output gate, Gemma 4's v norm, KV-shared layers (q
//! only; the token's k / v already cached) and heads of 32 to 512, gpt-oss's attention
//! sinks, f16, f32 and q8_0 caches (q8_0 on heads of multiples of 32; the CPU twin reads
//! the cache's own rounding of the uploaded values, the token's k / v in f32, and the
//! token's row must land in the cache within the type's rounding), workgroups of 32, 64
//! and 128 and both reduction variants; the cache is a pool of pages named by a scrambled
//! page table (odd capacities: a partly used last page; spare pages that must not change). Skips without a Vulkan device unless
//! `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use caldera_vulkan::kernels::{attn_dec_shape, attn_split};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions, Kernel, KvType, MemoryKind};
use common::{
    kv_row_mismatch, random_vec, read_kv, rms, rng, rope, rope_table, upload_kv, words, Pages, PAGE,
};
use rand::rngs::StdRng;

struct Case {
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    n_rot: usize,
    interleaved: bool,
    qk_norm: bool,
    window: usize,
    softcap: f32,
    pos: usize,
    cap: usize,
    q8: bool,
    /// The q projection's gates follow v (q | k | v | gate); out *= sigmoid(gate).
    gate: bool,
    /// v is RMS-normalized (no weights) before use and caching.
    v_norm: bool,
    /// qkv is q only; the token's k / v are in the caches already; nothing is written.
    no_kv: bool,
    /// A learned logit per head joins the softmax.
    sinks: bool,
}

/// Which kernel, and `attn_dec`'s knobs (query heads per workgroup, fewest positions per
/// block, most blocks; 0: defaults).
#[derive(Clone, Copy, Debug)]
enum Launch {
    Old,
    /// `attn_decode` in chunks of `hpw` query heads, merged into one chunk per kv head
    /// from `merge_from` splits in use on (0: never), with at most `target` splits
    /// where longer ones (up to 128 positions) fit (0: the launch's fixed split).
    Chunks {
        hpw: usize,
        merge_from: u32,
        target: u32,
    },
    New {
        hpw: usize,
        split: usize,
        blocks: usize,
    },
}

fn run(ctx: &Context, rng: &mut StdRng, c: &Case, launch: Launch) {
    let (nh, nkv, hd) = (c.n_heads, c.n_kv, c.hd);
    let kvd = nkv * hd;
    let gates = if c.gate { nh } else { 0 };
    let ld = if c.no_kv {
        nh * hd
    } else {
        (nh + 2 * nkv + gates) * hd
    };
    let eps = 1e-6f32;
    let scale = 1.0 / (hd as f32).sqrt();
    let qkv = random_vec(rng, ld, 1.0);
    // The cache in pages of a scrambled table (with spare pages of junk), in the
    // context's format (f16 / q8_0 round the values the CPU twin reads too).
    let pages = Pages::scrambled(rng, 1, c.cap, 3);
    let logical = random_vec(rng, c.cap * kvd, 1.0);
    let mut kpool = pages.scatter(rng, &[logical], kvd);
    let logical = random_vec(rng, c.cap * kvd, 1.0);
    let mut vpool = pages.scatter(rng, &[logical], kvd);
    let (kc_b, vc_b) = (upload_kv(ctx, &mut kpool), upload_kv(ctx, &mut vpool));
    let kc = pages.gather(&kpool, 0, c.cap, kvd);
    let vc = pages.gather(&vpool, 0, c.cap, kvd);
    let table_b = ctx
        .upload(&pages.table_bytes(c.cap.div_ceil(PAGE)))
        .unwrap();
    let qn = random_vec(rng, hd, 1.5);
    let kn = random_vec(rng, hd, 1.5);
    let table = rope_table(c.cap, c.n_rot);
    let sinks = random_vec(rng, nh, 3.0);
    // CPU twin.
    let gsize = nh / nkv;
    let lo = if c.window > 0 && c.pos + 1 > c.window {
        c.pos + 1 - c.window
    } else {
        0
    };
    let mut want = vec![0f64; nh * hd];
    let gate_at = (nh + 2 * nkv) * hd;
    let mut kv_new = Vec::new();
    for g in 0..nkv {
        if c.no_kv {
            let at = c.pos * kvd + g * hd;
            let k = (0..hd).map(|i| kc[at + i] as f64).collect();
            let v = (0..hd).map(|i| vc[at + i] as f64).collect();
            kv_new.push((k, v));
            continue;
        }
        let mut k: Vec<f64> = (0..hd).map(|i| qkv[nh * hd + g * hd + i] as f64).collect();
        if c.qk_norm {
            rms(&mut k, &kn, eps as f64);
        }
        rope(&mut k, &table, c.n_rot, c.interleaved, c.pos);
        let mut v: Vec<f64> = (0..hd)
            .map(|i| qkv[nh * hd + kvd + g * hd + i] as f64)
            .collect();
        if c.v_norm {
            rms(&mut v, &vec![1.0; hd], eps as f64);
        }
        kv_new.push((k, v));
    }
    for h in 0..nh {
        let g = h / gsize;
        let mut q: Vec<f64> = (0..hd).map(|i| qkv[h * hd + i] as f64).collect();
        if c.qk_norm {
            rms(&mut q, &qn, eps as f64);
        }
        rope(&mut q, &table, c.n_rot, c.interleaved, c.pos);
        let (kg, vg) = &kv_new[g];
        let mut s = Vec::new();
        for p in lo..=c.pos {
            let krow: Vec<f64> = if p == c.pos {
                kg.clone()
            } else {
                (0..hd).map(|i| kc[p * kvd + g * hd + i] as f64).collect()
            };
            let mut x = q.iter().zip(&krow).map(|(a, b)| a * b).sum::<f64>() * scale as f64;
            if c.softcap > 0.0 {
                x = c.softcap as f64 * (x / c.softcap as f64).tanh();
            }
            s.push(x);
        }
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let mut l: f64 = e.iter().sum();
        if c.sinks {
            l += (sinks[h] as f64 - m).exp();
        }
        for (j, p) in (lo..=c.pos).enumerate() {
            for i in 0..hd {
                let v = if p == c.pos {
                    vg[i]
                } else {
                    vc[p * kvd + g * hd + i] as f64
                };
                want[h * hd + i] += e[j] / l * v;
            }
        }
        if c.gate {
            for i in 0..hd {
                want[h * hd + i] /= 1.0 + (-(qkv[gate_at + h * hd + i] as f64)).exp();
            }
        }
    }
    // Device.
    let up = |v: &[f32]| ctx.upload_f32(v).unwrap();
    let qkv_b = up(&qkv);
    let (qn_b, kn_b, rope_b, sinks_b) = (up(&qn), up(&kn), up(&table), up(&sinks));
    let out = ctx
        .create_buffer((nh * hd * 4) as u64, MemoryKind::Device)
        .unwrap();
    let step = ctx.upload(&words(&[1, c.pos as u32, 0, 0])).unwrap();
    let xq = ctx
        .create_buffer((nh * hd) as u64, MemoryKind::Device)
        .unwrap();
    let xd = ctx
        .create_buffer((nh * hd / 8) as u64, MemoryKind::Device)
        .unwrap();
    let (kernel, hpw, n_chunks, split, max_splits) = match launch {
        Launch::Old => {
            let split = attn_split(c.cap);
            // At most 8 heads, and hpw * hd <= 2048 (the kernel's q tile).
            let hpw = gsize.min(8).min(2048 / hd);
            let n_chunks = gsize.div_ceil(hpw);
            (
                Kernel::AttnDecode,
                hpw,
                n_chunks,
                split,
                c.cap.div_ceil(split),
            )
        }
        Launch::Chunks { hpw, .. } => {
            let split = attn_split(c.cap);
            let hpw = hpw.min(gsize);
            (
                Kernel::AttnDecode,
                hpw,
                gsize.div_ceil(hpw),
                split,
                c.cap.div_ceil(split),
            )
        }
        Launch::New { hpw, split, blocks } => {
            let wg = ctx.tuning().workgroup_size;
            let sh = attn_dec_shape(gsize, hd, wg, c.cap, hpw, split, blocks)
                .unwrap_or_else(|| panic!("attn_dec: no layout for hd {hd} at workgroup {wg}"));
            (Kernel::AttnDec, sh.hpw, sh.n_chunks, sh.split, sh.blocks)
        }
    };
    let part = ctx
        .create_buffer((nh * max_splits * (hd + 2) * 4) as u64, MemoryKind::Device)
        .unwrap();
    let count = ctx.upload(&vec![0u8; nkv * n_chunks * 4]).unwrap();
    let binding = ctx
        .bind(
            kernel,
            &[
                &qkv_b, &kc_b, &vc_b, &out, &step, &qn_b, &kn_b, &rope_b, &xq, &xd, &part, &count,
                &sinks_b, &table_b,
            ],
        )
        .unwrap();
    let mut flags = 4u32;
    if c.qk_norm {
        flags |= 3;
    }
    if c.interleaved {
        flags |= 8;
    }
    if c.q8 {
        flags |= 16;
    }
    if c.gate {
        flags |= 32;
    }
    if c.v_norm {
        flags |= 64;
    }
    if c.no_kv {
        flags |= 128;
    }
    if c.sinks {
        flags |= 1024;
    }
    if let Launch::Chunks {
        merge_from, target, ..
    } = launch
    {
        flags |= merge_from << 16 | target << 24;
    }
    let push = words(&[
        nh as u32,
        nkv as u32,
        hd as u32,
        c.n_rot as u32,
        flags,
        ld as u32,
        c.window as u32,
        hpw as u32,
        n_chunks as u32,
        max_splits as u32,
        split as u32,
        eps.to_bits(),
        scale.to_bits(),
        c.softcap.to_bits(),
    ]);
    let groups = (nkv * n_chunks * max_splits) as u64;
    let rec = ctx.record(|r| r.dispatch(&binding, &push, groups)).unwrap();
    // Twice: the split counts must be back at zero.
    for _ in 0..2 {
        ctx.submit(&rec).unwrap();
    }
    let got = ctx.read_f32(&out, nh * hd).unwrap();
    let what = format!(
        "{nh}/{nkv} heads of {hd}, pos {}, window {}, softcap {}, norm {}, interleaved {}, \
         gate {}, v norm {}, no kv {}, sinks {}, {launch:?} (hpw {hpw}, split {split}, \
         blocks {max_splits}; subgroup {}, kv {}, workgroup {})",
        c.pos,
        c.window,
        c.softcap,
        c.qk_norm,
        c.interleaved,
        c.gate,
        c.v_norm,
        c.no_kv,
        c.sinks,
        ctx.tuning().subgroup_reduce,
        ctx.tuning().kv,
        ctx.tuning().workgroup_size
    );
    for i in 0..nh * hd {
        assert!(
            (got[i] as f64 - want[i]).abs() <= 1e-4,
            "{what}: out[{i}] = {}, want {}",
            got[i],
            want[i]
        );
    }
    // The token's k and v landed in the caches at pos's row (rounded to the cache's
    // type), and nothing else changed.
    let n_pool = pages.n_pages * PAGE * kvd;
    let kc_got = read_kv(ctx, &kc_b, n_pool);
    let vc_got = read_kv(ctx, &vc_b, n_pool);
    let own = pages.row(0, c.pos) * kvd;
    for (name, got, was) in [("k", &kc_got, &kpool), ("v", &vc_got, &vpool)] {
        for i in (0..n_pool).filter(|&i| i < own || i >= own + kvd) {
            assert!(
                got[i] == was[i],
                "{what}: {name} pool value {i} (row {}) changed",
                i / kvd
            );
        }
    }
    for (g, (k, v)) in kv_new.iter().enumerate() {
        let at = own + g * hd;
        for (name, got, want) in [("k", &kc_got, k), ("v", &vc_got, v)] {
            let row = &got[at..at + hd];
            if let Some(i) = kv_row_mismatch(ctx, row, want) {
                panic!(
                    "{what}: {name} cache [{g}][{i}] = {}, want {}",
                    row[i], want[i]
                );
            }
        }
    }
    if c.q8 {
        let q = ctx.read_buffer(&xq, 0, (nh * hd) as u64).unwrap();
        let d = ctx.read_f32(&xd, nh * hd / 32).unwrap();
        for i in 0..nh * hd {
            let deq = q[i] as i8 as f64 * d[i / 32] as f64;
            assert!(
                (deq - got[i] as f64).abs() <= 0.51 * d[i / 32] as f64 + 1e-6,
                "{what}: int8 output [{i}] {deq} for {}",
                got[i]
            );
        }
    }
}

#[test]
fn attn_decode_matches_cpu() {
    let mut rng = rng("attn_decode");
    let mut ctxs = Vec::new();
    // Subgroup / shared-memory reductions, f16 / f32 / q8_0 KV cache.
    for (shared, kv) in [
        (false, KvType::F16),
        (true, KvType::F32),
        (false, KvType::Q8_0),
    ] {
        let opts = ContextOptions {
            force_shared_reduce: shared,
            kv_type: Some(kv),
            ..Default::default()
        };
        match test_context("attn_decode", &opts) {
            Some(c) => ctxs.push(c),
            None => return,
        }
    }
    for ctx in &ctxs {
        // hd 256: k/v tiles of 16 positions, several per split; hd 512: 8, 4 q heads per
        // workgroup.
        for (n_heads, n_kv, hd, n_rot) in [
            (8, 2, 64, 64),
            (4, 4, 32, 16),
            (20, 2, 96, 96),
            (4, 2, 256, 128),
            (10, 2, 512, 128),
        ] {
            if ctx.tuning().kv.unsupported_head(hd).is_some() {
                continue; // q8_0: heads of multiples of 32 only
            }
            for (pos, cap, window) in [(0, 40, 0), (37, 40, 0), (150, 161, 0), (150, 161, 45)] {
                // (interleaved, qk_norm, softcap, q8, gate, v_norm, no_kv, sinks)
                for (interleaved, qk_norm, softcap, q8, gate, v_norm, no_kv, sinks) in [
                    (false, true, 0.0, true, false, false, false, false),
                    (true, false, 30.0, false, false, false, false, true),
                    (false, true, 0.0, true, true, false, false, false),
                    (false, true, 0.0, true, false, true, false, false),
                    (false, true, 0.0, false, false, false, true, false),
                    (true, true, 20.0, true, false, false, false, true),
                ] {
                    let c = Case {
                        n_heads,
                        n_kv,
                        hd,
                        n_rot,
                        interleaved,
                        qk_norm,
                        window,
                        softcap,
                        pos,
                        cap,
                        q8,
                        gate,
                        v_norm,
                        no_kv,
                        sinks,
                    };
                    run(ctx, &mut rng, &c, Launch::Old);
                    run(ctx, &mut rng, &c, NEW_DEFAULT);
                    // The model's default where a group fits a workgroup: chunks of 2
                    // heads, merged from 8 splits, at most 8 splits; and merged from 2
                    // (cap 40: pos 37 merges, pos 0 does not), chunks of one head never
                    // merged, and at most 2 / 3 splits (pos 150: 2 of 96 positions, 3 of
                    // 64 instead of 5 of 32).
                    if gsize_fits(n_heads / n_kv, hd) {
                        for (hpw, merge_from, target) in [
                            (2, 8, 8),
                            (2, 2, 0),
                            (1, 0, 0),
                            (3, 3, 0),
                            (2, 2, 2),
                            (1, 0, 3),
                        ] {
                            let l = Launch::Chunks {
                                hpw,
                                merge_from,
                                target,
                            };
                            run(ctx, &mut rng, &c, l);
                        }
                    }
                }
            }
        }
    }
}

/// Whether `attn_decode` can take a whole group of `gsize` heads of `hd` in one
/// workgroup (what the model requires before it merges chunks).
fn gsize_fits(gsize: usize, hd: usize) -> bool {
    gsize <= 8 && gsize * hd <= 2048
}

const NEW_DEFAULT: Launch = Launch::New {
    hpw: 8,
    split: 0,
    blocks: 0,
};

/// `attn_dec` alone: GQA groups 1 to 8, heads of 32 to 512 (80: a head that is not a
/// multiple of 32), contexts of one tile to many blocks of many tiles (few blocks force
/// the per-block tile loop: prefetch and the online softmax over tiles), windows, fewer
/// query heads per workgroup and a split that is not a multiple of the tile, at
/// workgroups of 32, 64 and 128.
#[test]
fn attn_dec_matches_cpu() {
    let mut rng = rng("attn_dec");
    let mut ctxs = Vec::new();
    // (shared reduction, cache, workgroup)
    for (shared, kv, wg) in [
        (false, KvType::F16, None),
        (true, KvType::F32, None),
        (false, KvType::F32, Some(128)),
        (true, KvType::F16, Some(32)),
        (false, KvType::Q8_0, None),
    ] {
        let opts = ContextOptions {
            force_shared_reduce: shared,
            kv_type: Some(kv),
            workgroup_size: wg,
            ..Default::default()
        };
        match test_context("attn_dec", &opts) {
            Some(c) => ctxs.push(c),
            None => return,
        }
    }
    for ctx in &ctxs {
        let wg = ctx.tuning().workgroup_size;
        for (n_heads, n_kv, hd, n_rot) in [
            (6, 6, 128, 128),
            (8, 4, 128, 64),
            (9, 3, 128, 128),
            (16, 4, 64, 64),
            (15, 3, 80, 80),
            (12, 2, 128, 128),
            (14, 2, 128, 128),
            (16, 2, 128, 128),
            (16, 2, 256, 256),
            (8, 2, 512, 512),
            (8, 2, 32, 32),
        ] {
            if ctx.tuning().kv.unsupported_head(hd).is_some() {
                continue; // q8_0: heads of multiples of 32 only
            }
            if attn_dec_shape(n_heads / n_kv, hd, wg, 64, 8, 0, 0).is_none() {
                // No layout at this workgroup (hd 512 at 32): the host runs attn_decode.
                assert!(wg < 64, "attn_dec: no layout for hd {hd} at workgroup {wg}");
                continue;
            }
            for (pos, cap, window, launch) in [
                (0, 8, 0, NEW_DEFAULT),
                (29, 40, 0, NEW_DEFAULT),
                (300, 333, 0, NEW_DEFAULT),
                (
                    300,
                    333,
                    0,
                    Launch::New {
                        hpw: 2,
                        split: 0,
                        blocks: 3,
                    },
                ),
                (
                    520,
                    700,
                    133,
                    Launch::New {
                        hpw: 8,
                        split: 100,
                        blocks: 0,
                    },
                ),
                (
                    1100,
                    1200,
                    0,
                    Launch::New {
                        hpw: 3,
                        split: 0,
                        blocks: 5,
                    },
                ),
            ] {
                // (interleaved, qk_norm, softcap, q8, gate, v_norm, no_kv, sinks), rotating.
                let flag_sets = [
                    (false, true, 0.0, true, false, false, false, false),
                    (true, false, 30.0, false, true, false, false, true),
                    (false, true, 0.0, true, false, true, false, false),
                    (false, true, 20.0, false, false, false, true, true),
                ];
                let i = (pos + hd + n_heads) % flag_sets.len();
                let (interleaved, qk_norm, softcap, q8, gate, v_norm, no_kv, sinks) = flag_sets[i];
                let c = Case {
                    n_heads,
                    n_kv,
                    hd,
                    n_rot,
                    interleaved,
                    qk_norm,
                    window,
                    softcap,
                    pos,
                    cap,
                    q8: q8 && hd.is_multiple_of(32),
                    gate,
                    v_norm,
                    no_kv,
                    sinks,
                };
                run(ctx, &mut rng, &c, launch);
            }
        }
    }
}
