//! `caldera convert HF_DIR OUT.gguf --type T`: an HF folder to a GGUF file with
//! llama.cpp's names, keys and stored conventions (the same translation the loader uses),
//! the tokenizer and chat template carried over, weights stored as `T`.
//!
//! Types: `f32`, `f16`, `bf16` store every matrix in that type. `q8_0`, `q4_0`, `q6_k`
//! quantize every matrix whose rows fit the block size. `q4_k_m` follows llama.cpp's
//! Q4_K_M mixture: Q4_K, with Q6_K for the output head and for `attn_v` / `ffn_down` in
//! the first and last eighth of the layers and every third layer between. Vectors
//! (norms, biases, SSM parameters), router weights and convolution kernels stay F32.
//! A matrix whose rows do not fit a type's blocks falls back to Q8_0, then F16.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use caldera_format::gguf::{GgufValue, GgufWriter};
use caldera_format::{quant, GgmlType};
use caldera_model::file::RawTensor;
use caldera_model::{Model, ModelFile};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q6_k")]
    Q6K,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// An HF model folder (config.json + *.safetensors).
    pub input: PathBuf,
    /// The GGUF file to write.
    pub output: PathBuf,
    #[arg(long = "type", value_enum, default_value = "f16")]
    pub ty: OutType,
}

/// llama.cpp's "use more bits" layers: the first and last eighth, and every third layer.
fn more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8
        || layer >= 7 * n_layers / 8
        || (layer.saturating_sub(n_layers / 8)) % 3 == 2
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Whether a tensor is a weight matrix that takes the output type.
fn is_matrix(t: &RawTensor) -> bool {
    let keep_f32 = [
        "ffn_gate_inp",
        "ssm_conv1d",
        "shortconv.conv",
        "conv1d",
        "_norm",
        "norm.",
        "ssm_a",
        "ssm_d",
        "rope_freqs",
        "sinks",
    ];
    t.dims.len() >= 2
        && t.dims[1] > 1
        && t.name.ends_with(".weight")
        && !keep_f32.iter().any(|k| t.name.contains(k))
}

/// The type a tensor is stored as.
fn target_type(t: &RawTensor, out: OutType, n_layers: usize) -> GgmlType {
    if !is_matrix(t) {
        return GgmlType::F32;
    }
    let want = match out {
        OutType::F32 => GgmlType::F32,
        OutType::F16 => GgmlType::F16,
        OutType::Bf16 => GgmlType::BF16,
        OutType::Q8_0 => GgmlType::Q8_0,
        OutType::Q4_0 => GgmlType::Q4_0,
        OutType::Q6K => GgmlType::Q6_K,
        OutType::Q4KM => {
            let n = &t.name;
            let more = (n.contains("attn_v") || n.contains("ffn_down"))
                && layer_of(n).is_some_and(|l| more_bits(l, n_layers));
            if n == "output.weight" || more {
                GgmlType::Q6_K
            } else {
                GgmlType::Q4_K
            }
        }
    };
    let cols = t.dims[0];
    [want, GgmlType::Q8_0, GgmlType::F16]
        .into_iter()
        .find(|ty| cols.is_multiple_of(ty.block_size() as u64))
        .unwrap_or(GgmlType::F32)
}

pub fn convert(a: ConvertArgs) -> Result<ExitCode> {
    if !a.input.is_dir() {
        bail!("{} is not an HF model folder", a.input.display());
    }
    let t0 = Instant::now();
    let file =
        ModelFile::open(&a.input).with_context(|| format!("cannot open {}", a.input.display()))?;
    // Building the model checks that the translation is complete before writing anything.
    let model =
        Model::from_file(&file).with_context(|| format!("cannot load {}", a.input.display()))?;
    let n_layers = model.config.n_layers();

    let mut w = GgufWriter::new();
    for (k, v) in file.metadata() {
        w.set(k, v.clone());
    }
    let ftype = match a.ty {
        OutType::F32 => 0,
        OutType::F16 => 1,
        OutType::Q4_0 => 2,
        OutType::Q8_0 => 7,
        OutType::Q4KM => 15,
        OutType::Q6K => 18,
        OutType::Bf16 => 32,
    };
    w.set("general.file_type", GgufValue::U32(ftype));
    w.set("general.quantization_version", GgufValue::U32(2));
    if let caldera_model::TokenizerSource::HfJson { json, config } = &file.tokenizer {
        let keys = caldera_tokenizer::gguf_metadata_from_hf(json, config.as_ref())
            .context("converting the tokenizer")?;
        for (k, v) in keys {
            w.set(&k, v);
        }
    }
    if let Some(t) = &file.chat_template {
        w.set("tokenizer.chat_template", GgufValue::String(t.clone()));
    }

    let bar = ProgressBar::new(file.tensors().len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} converting [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (mut bytes_in, mut bytes_out) = (0usize, 0usize);
    for t in file.tensors() {
        bar.set_message(t.name.clone());
        let ty = target_type(t, a.ty, n_layers);
        bytes_in += t.data.len();
        if ty == t.ty {
            bytes_out += t.data.len();
            w.add_tensor(&t.name, ty, &t.dims, t.data.clone())?;
        } else {
            let n: u64 = t.dims.iter().product();
            let mut v = vec![0f32; n as usize];
            quant::dequantize(t.ty, t.data.as_slice(), &mut v)
                .with_context(|| format!("reading {}", t.name))?;
            let q =
                quant::quantize(ty, &v).with_context(|| format!("storing {} as {ty}", t.name))?;
            bytes_out += q.len();
            w.add_tensor(&t.name, ty, &t.dims, q)?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    w.write_file(&a.output)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({}, {} tensors, {:.1} MB from {:.1} MB) in {:.1}s",
        a.output.display(),
        model.config.arch,
        file.tensors().len(),
        bytes_out as f64 / 1e6,
        bytes_in as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
