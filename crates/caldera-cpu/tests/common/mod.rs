//! A random tiny model of an attention architecture (llama, qwen3, gemma3) for tests.

use std::path::Path;

use caldera_format::gguf::GgufValue;
use caldera_format::{quant, GgmlType, TensorBytes};
use caldera_model::file::RawTensor;
use caldera_model::{Model, ModelFile};
use rand::{Rng, SeedableRng};

pub struct Spec {
    pub arch: &'static str,
    pub d: usize,
    pub heads: usize,
    pub kv: usize,
    pub head_dim: usize,
    pub ff: usize,
    pub vocab: usize,
    pub layers: usize,
    pub ty: GgmlType,
    pub window: Option<usize>,
}

pub fn random_model(s: &Spec, seed: u64) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = s.arch;
    let u = |n: usize| GgufValue::U32(n as u32);
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(a.into()),
        ),
        (format!("{a}.block_count"), u(s.layers)),
        (format!("{a}.embedding_length"), u(s.d)),
        (format!("{a}.feed_forward_length"), u(s.ff)),
        (format!("{a}.attention.head_count"), u(s.heads)),
        (format!("{a}.attention.head_count_kv"), u(s.kv)),
        (format!("{a}.attention.key_length"), u(s.head_dim)),
        (format!("{a}.attention.value_length"), u(s.head_dim)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-6),
        ),
        (format!("{a}.rope.freq_base"), GgufValue::F32(10000.0)),
    ];
    if let Some(w) = s.window {
        meta.push((format!("{a}.attention.sliding_window"), u(w)));
    }
    let mut tensors = Vec::new();
    let mut add = |name: String,
                   dims: Vec<u64>,
                   ty: GgmlType,
                   rng: &mut rand::rngs::StdRng,
                   scale: f32,
                   offset: f32| {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| offset + scale * rng.gen_range(-1.0f32..1.0))
            .collect();
        let data = quant::quantize(ty, &v).expect("quantize");
        tensors.push(RawTensor {
            name,
            ty,
            dims,
            data: TensorBytes::from_vec(data),
        });
    };
    let (d, hd) = (s.d as u64, s.head_dim as u64);
    let q = s.heads as u64 * hd;
    let kv = s.kv as u64 * hd;
    let ff = s.ff as u64;
    add(
        "token_embd.weight".into(),
        vec![d, s.vocab as u64],
        s.ty,
        &mut rng,
        1.0,
        0.0,
    );
    add(
        "output_norm.weight".into(),
        vec![d],
        GgmlType::F32,
        &mut rng,
        0.1,
        1.0,
    );
    for i in 0..s.layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        add(
            p("attn_norm.weight"),
            vec![d],
            GgmlType::F32,
            &mut rng,
            0.1,
            1.0,
        );
        add(p("attn_q.weight"), vec![d, q], s.ty, &mut rng, 0.3, 0.0);
        add(p("attn_k.weight"), vec![d, kv], s.ty, &mut rng, 0.3, 0.0);
        add(p("attn_v.weight"), vec![d, kv], s.ty, &mut rng, 0.3, 0.0);
        add(
            p("attn_output.weight"),
            vec![q, d],
            s.ty,
            &mut rng,
            0.3,
            0.0,
        );
        add(
            p("ffn_norm.weight"),
            vec![d],
            GgmlType::F32,
            &mut rng,
            0.1,
            1.0,
        );
        add(p("ffn_gate.weight"), vec![d, ff], s.ty, &mut rng, 0.3, 0.0);
        add(p("ffn_up.weight"), vec![d, ff], s.ty, &mut rng, 0.3, 0.0);
        add(p("ffn_down.weight"), vec![ff, d], s.ty, &mut rng, 0.3, 0.0);
        if a != "llama" {
            add(
                p("attn_q_norm.weight"),
                vec![hd],
                GgmlType::F32,
                &mut rng,
                0.1,
                1.0,
            );
            add(
                p("attn_k_norm.weight"),
                vec![hd],
                GgmlType::F32,
                &mut rng,
                0.1,
                1.0,
            );
        }
        if a == "gemma3" {
            add(
                p("post_attention_norm.weight"),
                vec![d],
                GgmlType::F32,
                &mut rng,
                0.1,
                1.0,
            );
            add(
                p("post_ffw_norm.weight"),
                vec![d],
                GgmlType::F32,
                &mut rng,
                0.1,
                1.0,
            );
        }
    }
    let file = ModelFile::new(Path::new("random"), "gguf", meta, tensors).expect("model file");
    Model::from_file(&file).expect("model")
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}
