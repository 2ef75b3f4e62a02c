//! gpt-oss experts stored as MXFP4 in a GGUF file.

mod common;

use std::sync::Arc;

use common::fixtures;

use caldera_cpu::{CpuBackend, Logits};
use caldera_format::gguf::GgufWriter;
use caldera_format::{quant, GgmlType};
use caldera_model::file::RawTensor;
use caldera_model::{Model, ModelFile};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn logits(model: Model, tokens: &[u32]) -> Vec<f32> {
    let be = CpuBackend::new(Arc::new(model), 2);
    let mut s = be.new_session(tokens.len()).expect("session");
    let mut out = Vec::new();
    be.forward(&mut s, tokens, Logits::All, &mut out)
        .expect("forward");
    out
}

/// gpt-oss with MXFP4 experts written to and read back from a GGUF file runs like the
/// same model with those experts dequantized to f32 (up to the 8-bit activation
/// quantization of the MXFP4 dot product), and stays near the bf16 model.
#[test]
fn gpt_oss_mxfp4_experts_load_from_gguf() {
    let Some(dir) = fixtures() else { return };
    let hf = ModelFile::open(&dir.join("gpt_oss")).expect("fixture");
    let mut w = GgufWriter::new();
    for (k, v) in hf.metadata() {
        w.set(k, v.clone());
    }
    let mut deq_tensors = Vec::new();
    let mut n_mxfp4 = 0;
    for t in hf.tensors() {
        let n: u64 = t.dims.iter().product();
        let mut v = vec![0f32; n as usize];
        quant::dequantize(t.ty, t.data.as_slice(), &mut v).expect("dequantize");
        let (ty, bytes, back) = if t.name.contains("_exps.weight") {
            n_mxfp4 += 1;
            let q = quant::quantize(GgmlType::MXFP4, &v).expect("quantize");
            let mut back = vec![0f32; v.len()];
            quant::dequantize(GgmlType::MXFP4, &q, &mut back).expect("dequantize");
            (GgmlType::MXFP4, q, back)
        } else {
            (GgmlType::F32, f32_bytes(&v), v)
        };
        w.add_tensor(t.name.clone(), ty, &t.dims, bytes)
            .expect("add tensor");
        deq_tensors.push(RawTensor {
            name: t.name.clone(),
            ty: GgmlType::F32,
            dims: t.dims.clone(),
            data: caldera_format::TensorBytes::from_vec(f32_bytes(&back)),
        });
    }
    assert_eq!(n_mxfp4, 3 * 2, "three expert tensors per layer");
    let path =
        std::env::temp_dir().join(format!("caldera-gpt-oss-mxfp4-{}.gguf", std::process::id()));
    w.write_file(&path).expect("write gguf");
    let gguf = ModelFile::open(&path).expect("open gguf");
    let q_model = Model::from_file(&gguf).expect("build from gguf");
    let _ = std::fs::remove_file(&path);
    let meta = hf
        .metadata()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect();
    let deq = ModelFile::new(&dir.join("gpt_oss"), "hf", meta, deq_tensors).expect("file");
    let deq_model = Model::from_file(&deq).expect("build dequantized");
    let bf16_model = Model::from_file(&hf).expect("build bf16");

    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 37 + 5) % 512).collect();
    let a = logits(q_model, &tokens);
    let b = logits(deq_model, &tokens);
    let c = logits(bf16_model, &tokens);
    let rel = |x: &[f32], y: &[f32]| {
        let num: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let e_deq = rel(&a, &b);
    let e_bf16 = rel(&a, &c);
    eprintln!("mxfp4 vs dequantized: {e_deq:.3e}; vs bf16: {e_bf16:.3e}");
    assert!(e_deq < 2e-3, "mxfp4 vs dequantized: {e_deq}");
    assert!(e_bf16 < 5e-2, "mxfp4 vs bf16: {e_bf16}");
}
