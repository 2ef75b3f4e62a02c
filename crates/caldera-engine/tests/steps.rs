//! The step API against the whole-loop `generate` on SmolLM2-135M-Instruct (CPU):
//! chunked prefill, interleaved sequences and prefix reuse give the same greedy tokens.
//! Skipped when the model file is absent.

use std::path::PathBuf;
use std::sync::Arc;

use caldera_cpu::{CpuBackend, CpuRunner, KvConfig};
use caldera_engine::{GenParams, Generator, Piece, SamplerConfig};
use caldera_model::{
    BatchItem, BatchStepper, Model, ModelFile, SerialStepper, StepOutcome, TokenizerSource,
};
use caldera_tokenizer::Tokenizer;

fn model_path() -> Option<PathBuf> {
    let dir = std::env::var("CALDERA_MODELS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models").into());
    let p = PathBuf::from(dir).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skip: {} not found", p.display());
        None
    }
}

#[test]
fn steps_match_generate() {
    let Some(path) = model_path() else { return };
    let file = ModelFile::open(&path).unwrap();
    let model = Arc::new(Model::from_file(&file).unwrap());
    let tok = match &file.tokenizer {
        TokenizerSource::Gguf(g) => Tokenizer::from_gguf(g).unwrap(),
        _ => panic!("no tokenizer"),
    };
    // No shared prefix cache (the default): the stepped run must prefill every token.
    let be = Arc::new(CpuBackend::new(model, 2));
    let new = || Generator::new(Box::new(CpuRunner::new(be.clone(), 256).unwrap()));
    let params = GenParams::new(12, SamplerConfig::greedy(), Vec::new());
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    ]
    .iter()
    .map(|p| tok.encode(p, false, false).unwrap())
    .collect();

    // Reference: each prompt alone through `generate`.
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            let mut text = String::new();
            new()
                .generate(&tok, p, &params, |t| text.push_str(t))
                .unwrap();
            text
        })
        .collect();
    eprintln!("{want:?}");

    // Both at once, stepped together, prefill in chunks of 5 tokens.
    let mut gens = [new(), new()];
    let mut seqs: Vec<_> = gens
        .iter_mut()
        .zip(&prompts)
        .map(|(g, p)| Some(g.start(&tok, p.clone(), params.clone()).unwrap()))
        .collect();
    let mut got = vec![String::new(), String::new()];
    let mut steps = 0;
    while seqs.iter().any(Option::is_some) {
        steps += 1;
        let mut ran = [0usize; 2];
        let mut outcomes = Vec::new();
        {
            let mut items: Vec<BatchItem> = Vec::new();
            for (i, (g, s)) in gens.iter_mut().zip(&seqs).enumerate() {
                if let Some(s) = s {
                    let item = g.batch_item(s, 5).unwrap();
                    ran[i] = item.tokens.len();
                    items.push(item);
                }
            }
            SerialStepper.step_batch(&mut items);
            for it in &mut items {
                outcomes.push(std::mem::replace(&mut it.outcome, StepOutcome::Pending));
            }
        }
        assert!(outcomes.iter().all(|o| matches!(o, StepOutcome::Done)));
        for i in 0..2 {
            let (Some(s), g) = (seqs[i].as_mut(), &mut gens[i]) else {
                continue;
            };
            let out = &mut got[i];
            if g.advance(s, ran[i], |p| {
                if let Piece::Text(t) = p {
                    out.push_str(t)
                }
            })
            .is_some()
            {
                seqs[i] = None;
            }
        }
    }
    assert_eq!(got, want);
    // 17 prompt tokens in chunks of 5 take 4 steps before the first of 12 tokens.
    assert!(steps >= 12 + 3, "{steps} steps");

    // Prefix reuse: the same prompt again reuses all but its last token.
    let g = &mut gens[1];
    let seq = g.start(&tok, prompts[1].clone(), params.clone()).unwrap();
    assert_eq!(seq.reused_tokens(), prompts[1].len() - 1);
    drop(seq);
    let mut text = String::new();
    let stats = g
        .generate(&tok, &prompts[1], &params, |t| text.push_str(t))
        .unwrap();
    assert_eq!(text, want[1]);
    assert_eq!(stats.reused_tokens, prompts[1].len() - 1);
}

/// Another slot's pages: a generator on a backend with a shared prefix cache reuses the
/// whole pages of a prompt that an earlier generator ran, and writes what a cold run
/// writes (greedy).
#[test]
fn shared_prefix_reuse_matches_a_cold_run() {
    let Some(path) = model_path() else { return };
    let file = ModelFile::open(&path).unwrap();
    let model = Arc::new(Model::from_file(&file).unwrap());
    let tok = match &file.tokenizer {
        TokenizerSource::Gguf(g) => Tokenizer::from_gguf(g).unwrap(),
        _ => panic!("no tokenizer"),
    };
    let params = GenParams::new(10, SamplerConfig::greedy(), Vec::new());
    let system = "You are a careful assistant. Answer briefly and precisely, in English, \
        and never invent facts you are not sure about. The user is a sailor.";
    let a = tok
        .encode(&format!("{system} Question: what is a knot?"), false, false)
        .unwrap();
    let b = tok
        .encode(
            &format!("{system} Question: why is the sea salty?"),
            false,
            false,
        )
        .unwrap();
    let cold_be = Arc::new(CpuBackend::new(model.clone(), 2));
    let mut cold = Generator::new(Box::new(CpuRunner::new(cold_be, 256).unwrap()));
    let mut want = String::new();
    cold.generate(&tok, &b, &params, |t| want.push_str(t))
        .unwrap();

    let kv = KvConfig {
        max_pages: Some(64),
        prefix_cache: true,
        ..KvConfig::default()
    };
    let be = Arc::new(CpuBackend::with_kv(model, 2, &kv));
    let pt = be.kv_pool().page_tokens();
    let mut first = Generator::new(Box::new(CpuRunner::new(be.clone(), 256).unwrap()));
    first.generate(&tok, &a, &params, |_| {}).unwrap();
    drop(first);
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(common >= pt, "the prompts share {common} tokens");
    let mut second = Generator::new(Box::new(CpuRunner::new(be.clone(), 256).unwrap()));
    let mut got = String::new();
    let stats = second
        .generate(&tok, &b, &params, |t| got.push_str(t))
        .unwrap();
    assert_eq!(stats.reused_tokens, common / pt * pt);
    assert_eq!(got, want);
}
