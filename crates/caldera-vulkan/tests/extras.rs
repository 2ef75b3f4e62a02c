//! `rows_ext` (bias add, scale, Gemma 4's gelu * per-layer input, the selection of the
//! logits tokens' rows from step[2] on) and `ple_in` (Gemma 4's
//! per-layer inputs) against CPU twins on fresh random inputs: odd widths, offsets and
//! strides, several tokens of a step with rows past the step's tokens left alone; each
//! with subgroup and shared-memory reductions and a small workgroup. Skips without a
//! Vulkan device unless `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use caldera_vulkan::extras::{PleIn, PleShape, RowExt, RowsExt, RowsIo};
use common::{gelu_tanh, random_vec, rng};

#[test]
fn rows_ext_matches_cpu() {
    let mut rng = rng("rows_ext");
    for ctx in common::reduction_contexts("rows_ext") {
        // (values, row stride, row offset, tokens in the step, rows the op covers)
        for (n, ld, off, m, max_t) in [
            (1usize, 1usize, 0usize, 1usize, 1usize),
            (37, 53, 9, 3, 4),
            (300, 300, 0, 5, 5),
            (129, 200, 71, 2, 3),
        ] {
            let ld_src = n + 11;
            let src_off = 5;
            for op in [
                RowExt::Bias,
                RowExt::Scale(0.37),
                RowExt::GeluMul {
                    ld_src: ld_src as u64,
                    src_off: src_off as u64,
                },
                RowExt::Select {
                    ld_src: ld_src as u64,
                    src_off: src_off as u64,
                },
            ] {
                // Select reads rows first.. of src (the step's first logits token: the
                // last of the step's m tokens, so the rows past it are never read).
                let first = if matches!(op, RowExt::Select { .. }) {
                    m - 1
                } else {
                    0
                };
                let y = random_vec(&mut rng, max_t * ld, 2.0);
                let src = random_vec(&mut rng, (first + max_t) * ld_src + src_off + n, 1.5);
                let (yb, sb) = (ctx.upload_f32(&y).unwrap(), ctx.upload_f32(&src).unwrap());
                let st = ctx
                    .upload(&common::words(&[m as u32, 0, first as u32, m as u32]))
                    .unwrap();
                let io = RowsIo {
                    y: &yb,
                    ld_y: ld as u64,
                    y_off: off as u64,
                    src: &sb,
                    step: &st,
                    max_tokens: max_t as u64,
                };
                let x = RowsExt::new(&ctx, op, n as u64, &io).unwrap();
                let rec = ctx.record(|r| x.record(r)).unwrap();
                ctx.submit(&rec).unwrap();
                let got = ctx.read_f32(&yb, max_t * ld).unwrap();
                for t in 0..max_t {
                    for j in 0..ld {
                        let v = y[t * ld + j] as f64;
                        let i = j.wrapping_sub(off);
                        let want = if t >= m || j < off || i >= n {
                            v
                        } else {
                            match op {
                                RowExt::Bias => v + src[i] as f64,
                                RowExt::Scale(s) => v * s as f64,
                                RowExt::GeluMul { .. } => {
                                    gelu_tanh(v) * src[t * ld_src + src_off + i] as f64
                                }
                                RowExt::Select { .. } => {
                                    src[(first + t) * ld_src + src_off + i] as f64
                                }
                            }
                        };
                        let g = got[t * ld + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{op:?} n {n} ld {ld} off {off} [{t}][{j}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn ple_in_matches_cpu() {
    let mut rng = rng("ple_in");
    for ctx in common::reduction_contexts("ple_in") {
        // (layers, per-layer width, tokens in the step, rows the op covers)
        for (n_layers, dpl, m, max_t) in [
            (1usize, 1usize, 1usize, 1usize),
            (3, 37, 2, 3),
            (5, 256, 4, 4),
        ] {
            let s = PleShape {
                n_layers,
                dpl,
                eps: 1e-6,
                proj_scale: 0.3,
                tok_scale: 1.7,
                input_scale: 0.6,
            };
            let row = n_layers * dpl;
            let pli = random_vec(&mut rng, max_t * row, 2.0);
            let tok = random_vec(&mut rng, max_t * row, 1.0);
            let norm = random_vec(&mut rng, dpl, 1.5);
            let up = |v: &[f32]| ctx.upload_f32(v).unwrap();
            let (pb, tb, nb) = (up(&pli), up(&tok), up(&norm));
            let st = common::step_values(&ctx, m);
            let op = PleIn::new(&ctx, &s, &pb, &tb, &nb, &st, max_t as u64).unwrap();
            let rec = ctx.record(|r| op.record(r)).unwrap();
            ctx.submit(&rec).unwrap();
            let got = ctx.read_f32(&pb, max_t * row).unwrap();
            for t in 0..max_t {
                for l in 0..n_layers {
                    let base = t * row + l * dpl;
                    let v: Vec<f64> = (0..dpl)
                        .map(|i| pli[base + i] as f64 * s.proj_scale as f64)
                        .collect();
                    let ss = v.iter().map(|a| a * a).sum::<f64>() / dpl as f64;
                    let inv = 1.0 / (ss + s.eps as f64).sqrt();
                    for i in 0..dpl {
                        let want = if t >= m {
                            pli[base + i] as f64
                        } else {
                            (v[i] * inv * norm[i] as f64
                                + tok[base + i] as f64 * s.tok_scale as f64)
                                * s.input_scale as f64
                        };
                        let g = got[base + i] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "ple_in {n_layers} x {dpl} [{t}][{l}][{i}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
