//! Kernels over the tokens of a prefill step against CPU twins on fresh random inputs:
//! the MoE router (`moe_route` over several tokens, `MoeRoute::steps`) against
//! caldera-cpu's `ffn::route` for every router kind (with and without renorm, selection
//! bias, scale), odd expert counts, a logits stride, tokens past the step's marked
//! skipped; the grouping of a step's (token, slot) pairs by expert (`moe_group`) against
//! a CPU grouping; and `rows_act`. Each with subgroup and shared-memory reductions. Skips
//! without a Vulkan device unless `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use caldera_model::blocks::moe::{MoeSpec, RouterKind};
use caldera_model::Activation;
use caldera_vulkan::moe::{GroupLayout, MoeGroup, MoeRoute, RouterSpec, Routing};
use caldera_vulkan::ops::{RowAct, RowsAct};
use caldera_vulkan::MemoryKind;
use common::{random_vec, rng};
use rand::seq::SliceRandom;
use rand::Rng;

#[test]
fn moe_route_steps_match_cpu() {
    let mut rng = rng("moe_route_steps");
    let kinds = [
        RouterKind::Softmax { renorm: false },
        RouterKind::Softmax { renorm: true },
        RouterKind::TopKSoftmax,
        RouterKind::Sigmoid { renorm: false },
        RouterKind::Sigmoid { renorm: true },
    ];
    for ctx in common::reduction_contexts("moe_route_steps") {
        for (n, k) in [(4, 2), (37, 5), (128, 8), (300, 1)] {
            for kind in kinds {
                let biases: &[bool] = match kind {
                    RouterKind::Sigmoid { .. } => &[false, true],
                    _ => &[false],
                };
                for &bias in biases {
                    let spec = MoeSpec {
                        n_experts: n,
                        n_used: k,
                        d_ff: 8,
                        act: Activation::SwiGlu,
                        router: kind,
                        weights_scale: if bias { 2.5 } else { 1.0 },
                        shared_d_ff: None,
                    };
                    let (max_t, m) = (5, 3);
                    let ld = n + 3;
                    let logits = random_vec(&mut rng, max_t * ld, 4.0);
                    let sel = random_vec(&mut rng, n, 0.5);
                    let lb = ctx.upload_f32(&logits).unwrap();
                    let bb = ctx.upload_f32(&sel).unwrap();
                    let sb = common::step_values(&ctx, m);
                    let out = Routing::for_tokens(&ctx, k as u64, false, max_t as u64).unwrap();
                    let rs = RouterSpec::of(&spec, false);
                    let op = MoeRoute::steps(
                        &ctx,
                        &rs,
                        &lb,
                        ld as u64,
                        None,
                        bias.then_some(&bb),
                        &out,
                        Some(&sb),
                    )
                    .unwrap();
                    let rec = ctx.record(|r| op.record(r)).unwrap();
                    ctx.submit(&rec).unwrap();
                    let ids = ctx
                        .read_buffer(&out.ids, 0, (max_t * k * 4) as u64)
                        .unwrap();
                    let ids: Vec<u32> = ids
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    let wts = ctx.read_f32(&out.weights, max_t * k).unwrap();
                    // Dense rows of mixing weights, as the CPU's route gives them.
                    let mut got = vec![0f32; max_t * n];
                    for t in 0..max_t {
                        for j in 0..k {
                            let id = ids[t * k + j];
                            if t >= m {
                                assert_eq!(id, u32::MAX, "token {t} past the step");
                                got[t * n] = -7.0;
                                continue;
                            }
                            assert!((id as usize) < n, "token {t}: expert {id} of {n}");
                            got[t * n + id as usize] += wts[t * k + j];
                        }
                    }
                    for t in 0..max_t {
                        let row = &got[t * n..(t + 1) * n];
                        if t >= m {
                            assert_eq!(row[0], -7.0);
                            continue;
                        }
                        let mut want = vec![0f32; n];
                        let b = bias.then_some(sel.as_slice());
                        for (e, w) in caldera_cpu::ffn::route(&spec, &logits[t * ld..][..n], b) {
                            want[e] = w;
                        }
                        for e in 0..n {
                            assert!(
                                (row[e] - want[e]).abs() <= 1e-5 * (1.0 + want[e].abs()),
                                "{kind:?} {k} of {n}, bias {bias}, token {t}: w[{e}] = {}, want {}",
                                row[e],
                                want[e]
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn rows_act_matches_cpu() {
    let mut rng = rng("rows_act");
    for ctx in common::reduction_contexts("rows_act") {
        for (n, ld_y) in [(1usize, 1usize), (64, 70), (333, 333)] {
            let (max_t, m) = (5, 4);
            let y = random_vec(&mut rng, max_t * ld_y, 2.0);
            let (ld_src, src_off) = (n + 11, 7);
            let src = random_vec(&mut rng, max_t * ld_src, 3.0);
            let sb = common::step_values(&ctx, m);
            for act in [
                RowAct::Relu2,
                RowAct::Gate {
                    ld_src: ld_src as u64,
                    src_off: src_off as u64,
                },
            ] {
                let yb = ctx.upload_f32(&y).unwrap();
                let srcb = ctx.upload_f32(&src).unwrap();
                let op = RowsAct::new(
                    &ctx,
                    act,
                    n as u64,
                    &yb,
                    ld_y as u64,
                    &srcb,
                    &sb,
                    max_t as u64,
                )
                .unwrap();
                let rec = ctx.record(|r| op.record(r)).unwrap();
                ctx.submit(&rec).unwrap();
                let got = ctx.read_f32(&yb, max_t * ld_y).unwrap();
                for t in 0..max_t {
                    for i in 0..ld_y {
                        let v = y[t * ld_y + i] as f64;
                        let want = if t >= m || i >= n {
                            v
                        } else if act == RowAct::Relu2 {
                            v.max(0.0).powi(2)
                        } else {
                            let g = src[t * ld_src + src_off + i] as f64;
                            v / (1.0 + (-g).exp())
                        };
                        let g = got[t * ld_y + i] as f64;
                        assert!(
                            (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                            "{act:?} {n} of {ld_y}: y[{t}][{i}] = {g}, want {want}"
                        );
                    }
                }
            }
        }
    }
}

/// `moe_group` on random routings (odd token counts, tokens past the step's, a shared
/// slot, experts chosen by no token, one, or more than a tile of 64; more tokens than
/// the kernel's window of token masks) against a CPU grouping: the counts and offsets per expert,
/// each expert's pairs in token order, the tiles of up to 64 pairs in expert order.
#[test]
fn moe_group_matches_cpu() {
    let mut rng = rng("moe_group");
    for ctx in common::reduction_contexts("moe_group").iter().take(1) {
        // (experts, per token, tokens the buffers hold, tokens in the step, shared slot)
        for (n, k, max_t, m, shared) in [
            (4usize, 2usize, 5usize, 3usize, false),
            (37, 5, 70, 70, true),
            (128, 8, 7, 7, false),
            (300, 1, 70, 61, true),
            (16, 8, 300, 299, false),
            (1024, 32, 1, 1, false),
            (1024, 4, 200, 150, true),
            (300, 2, 500, 450, false),
            (9, 3, 1, 0, true),
        ] {
            let pt = k + usize::from(shared);
            // Half the tokens pick among a hot few experts (chosen by many tokens),
            // the rest among all; some experts stay unchosen.
            let hot: Vec<u32> = (0..(k + 1).min(n) as u32)
                .map(|e| e * 3 % n as u32)
                .collect();
            let mut ids = vec![u32::MAX; max_t * pt];
            for t in 0..m {
                let mut pool: Vec<u32> = if rng.gen_bool(0.5) && hot.len() > k {
                    hot.clone()
                } else {
                    (0..n as u32).filter(|e| e % 5 != 4 || n < 8).collect()
                };
                pool.shuffle(&mut rng);
                ids[t * pt..t * pt + k].copy_from_slice(&pool[..k]);
                if shared {
                    ids[t * pt + k] = 0;
                }
            }
            let idb = ctx.upload(&common::words(&ids)).unwrap();
            let wb = ctx
                .create_buffer((max_t * pt * 4) as u64, MemoryKind::Device)
                .unwrap();
            let routing = Routing {
                ids: idb,
                weights: wb,
                n_used: k as u64,
                shared,
                tokens: max_t as u64,
            };
            // The layout for a wider block than this one (as a scratch shared by layers).
            let layout = GroupLayout::new(n as u64 + 3, k as u64, max_t as u64);
            let fill = vec![0xabu8; (layout.words * 4) as usize];
            let g = ctx.upload(&fill).unwrap();
            let sb = common::step_values(ctx, m);
            let op =
                MoeGroup::new(ctx, n as u64, &layout, &routing, routing.routed(), &sb, &g).unwrap();
            let rec = ctx.record(|r| op.record(r)).unwrap();
            // Twice: the replay must give the same words.
            let mut prev: Option<Vec<u32>> = None;
            for _ in 0..2 {
                ctx.submit(&rec).unwrap();
                let got: Vec<u32> = ctx
                    .read_buffer(&g, 0, layout.words * 4)
                    .unwrap()
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                // The CPU grouping.
                let mut lists = vec![Vec::new(); n];
                for t in 0..m {
                    for s in 0..k {
                        lists[ids[t * pt + s] as usize].push((t * k + s) as u32);
                    }
                }
                let what = format!("{k} of {n}, {m} of {max_t} tokens, shared {shared}");
                let pairs = &got[layout.pairs_at as usize..][..m * k];
                let offs = &got[layout.offs_at as usize..][..n + 1];
                let mut o = 0usize;
                let mut tiles = Vec::new();
                for (e, list) in lists.iter().enumerate() {
                    assert_eq!(offs[e] as usize, o, "{what}: offset of expert {e}");
                    assert_eq!(&pairs[o..o + list.len()], &list[..], "{what}: expert {e}");
                    for j in (0..list.len()).step_by(64) {
                        let c = (list.len() - j).min(64) as u32;
                        tiles.push(((o + j) as u32, e as u32 | (c << 16)));
                    }
                    o += list.len();
                }
                assert_eq!(offs[n] as usize, m * k, "{what}: total");
                assert_eq!(got[0] as usize, tiles.len(), "{what}: tiles");
                assert!(tiles.len() as u64 <= layout.max_tiles, "{what}: tile bound");
                for (i, &(a, b)) in tiles.iter().enumerate() {
                    assert_eq!((got[1 + 2 * i], got[2 + 2 * i]), (a, b), "{what}: tile {i}");
                }
                if let Some(p) = &prev {
                    assert_eq!(p, &got, "{what}: replay differs");
                }
                prev = Some(got);
            }
            // The shared expert's slot: one expert, every token of the step in order.
            if let Some(slot) = routing.shared_slot() {
                let sl = GroupLayout::new(1, 1, max_t as u64);
                let sg = ctx.upload(&vec![0xabu8; (sl.words * 4) as usize]).unwrap();
                let op = MoeGroup::new(ctx, 1, &sl, &routing, slot, &sb, &sg).unwrap();
                let rec = ctx.record(|r| op.record(r)).unwrap();
                ctx.submit(&rec).unwrap();
                let got: Vec<u32> = ctx
                    .read_buffer(&sg, 0, sl.words * 4)
                    .unwrap()
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let pairs: Vec<u32> = (0..m as u32).collect();
                assert_eq!(
                    &got[sl.pairs_at as usize..][..m],
                    &pairs[..],
                    "shared pairs"
                );
                assert_eq!(got[0] as usize, m.div_ceil(64), "shared tiles");
                for i in 0..m.div_ceil(64) {
                    let c = (m - 64 * i).min(64) as u32;
                    assert_eq!((got[1 + 2 * i], got[2 + 2 * i]), ((64 * i) as u32, c << 16));
                }
            }
        }
    }
}
