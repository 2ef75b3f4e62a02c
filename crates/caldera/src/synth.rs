//! `caldera synth --arch qwen3 --shape 8b --quant q4_k_m OUT.gguf`: a GGUF file with random
//! weights and a real model's shapes, metadata, tensor types and a complete tokenizer, for
//! benchmarks and tests.
//!
//! - Shapes: Qwen3 0.6B / 8B / 14B / 32B (`tiny` is a 4-layer model for tests). Every
//!   shape has head_dim 128 (64 for `tiny`), rope theta 1e6, RMS eps 1e-6, context 40960;
//!   only 0.6B ties its output head to the token embeddings.
//! - Tensor types follow llama.cpp's quantizer for the file type: vectors stay F32; the
//!   output head (or the tied token embeddings) is Q6_K unless the file type is Q8_0;
//!   for Q4_K_M, `attn_v` and `ffn_down` are Q6_K on the "more bits" layers (the first and
//!   last eighth and every third layer between), Q4_K elsewhere, token embeddings
//!   included. A row that does not fit the chosen type's blocks takes llama.cpp's
//!   fallback (Q4_K -> Q5_0, Q6_K -> Q8_0).
//! - Weights are quantized blocks with random bits and random f16 scales chosen so a
//!   matrix's elements have a standard deviation of about `1/sqrt(ne[0])` (fan-in), which
//!   keeps activations O(1); norm weights are 1 ± 0.05. Nothing is quantized from floats,
//!   so the file is written at disk speed, one tensor at a time (streamed through
//!   [`TensorSource::stream`]); the same `--seed` gives the same bytes.
//! - Tokenizer: byte-level BPE (`gpt2`, pre-tokenizer `qwen2`) with the vocabulary layout of
//!   Qwen: the 256 byte characters, merged tokens up to id 151642 (each merge joins two
//!   existing tokens into a new, unique string), the 26 Qwen added tokens (those written
//!   `<|...|>` are control tokens, the others user-defined), then `[PADn]` unused slots up
//!   to the embedding size; a ChatML chat template. The vocabulary does not depend on
//!   the seed.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use caldera_format::gguf::{GgufValue, GgufWriter, TensorSource};
use caldera_format::GgmlType;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SynthArch {
    Qwen3,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Shape {
    /// 4 layers, d_model 256, vocab 1000: for tests.
    Tiny,
    #[value(name = "0.6b")]
    B0_6,
    #[value(name = "8b")]
    B8,
    #[value(name = "14b")]
    B14,
    #[value(name = "32b")]
    B32,
}

/// A llama.cpp file type (`general.file_type`): the default type of weight matrices.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Quant {
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q8_0")]
    Q8_0,
}

impl Quant {
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
        }
    }

    /// The type a weight matrix gets when no rule says otherwise.
    fn default_type(self) -> GgmlType {
        match self {
            Quant::Q4_0 => GgmlType::Q4_0,
            Quant::Q8_0 => GgmlType::Q8_0,
            Quant::Q4KM => GgmlType::Q4_K,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Quant::Q4_0 => "Q4_0",
            Quant::Q8_0 => "Q8_0",
            Quant::Q4KM => "Q4_K_M",
        }
    }
}

#[derive(Args)]
pub struct SynthArgs {
    /// The architecture whose layout and metadata the file has.
    #[arg(long, value_enum, default_value = "qwen3")]
    pub arch: SynthArch,
    /// The model size whose real hyperparameters the file has.
    #[arg(long, value_enum)]
    pub shape: Shape,
    /// The file type, with llama.cpp's per-tensor type choices.
    #[arg(long, value_enum, default_value = "q4_k_m")]
    pub quant: Quant,
    /// Seed of the random weights (the same seed writes the same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The GGUF file to write.
    pub output: PathBuf,
}

/// Hyperparameters of one synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct Hparams {
    pub arch: &'static str,
    /// `general.size_label`, e.g. "8B".
    pub size_label: &'static str,
    pub d_model: u64,
    pub n_layers: usize,
    pub n_heads: u64,
    pub n_kv_heads: u64,
    pub head_dim: u64,
    pub ffn: u64,
    /// Rows of the token embeddings and the output head.
    pub vocab: u64,
    /// Ids `0..n_bpe` are byte-level BPE tokens; the Qwen added tokens follow.
    pub n_bpe: u64,
    pub tied_embeddings: bool,
    pub context: u32,
    pub rope_theta: f32,
    pub rms_eps: f32,
}

/// Qwen's added tokens, with ids from `n_bpe` on in this order. llama.cpp's converter
/// makes the `<|...|>` ones control tokens and the others user-defined.
const QWEN_ADDED: [&str; 26] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
];
const ENDOFTEXT: u64 = 0;
const IM_END: u64 = 2;

/// A ChatML template: `<|im_start|>role\ncontent<|im_end|>\n` per message.
const CHATML_TEMPLATE: &str = "{%- for message in messages -%}\
{{- '<|im_start|>' + message['role'] + '\\n' -}}\
{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}\
{{- '<|im_end|>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

pub fn hparams(arch: SynthArch, shape: Shape) -> Hparams {
    let SynthArch::Qwen3 = arch;
    // (label, d_model, layers, heads, kv heads, ffn, tied)
    let (size_label, d_model, n_layers, n_heads, ffn, tied) = match shape {
        Shape::Tiny => ("tiny", 256, 4, 4, 512, false),
        Shape::B0_6 => ("0.6B", 1024, 28, 16, 3072, true),
        Shape::B8 => ("8B", 4096, 36, 32, 12288, false),
        Shape::B14 => ("14B", 5120, 40, 40, 17408, false),
        Shape::B32 => ("32B", 5120, 64, 64, 25600, false),
    };
    let tiny = shape == Shape::Tiny;
    let vocab = if tiny { 1000 } else { 151_936 };
    Hparams {
        arch: "qwen3",
        size_label,
        d_model,
        n_layers,
        n_heads,
        n_kv_heads: if tiny { 2 } else { 8 },
        head_dim: if tiny { 64 } else { 128 },
        ffn,
        vocab,
        n_bpe: if tiny {
            vocab - QWEN_ADDED.len() as u64
        } else {
            151_643
        },
        tied_embeddings: tied,
        context: 40_960,
        rope_theta: 1e6,
        rms_eps: 1e-6,
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// F32 values 1 ± 0.05.
    Norm,
    /// Quantized blocks whose elements have about this standard deviation.
    Random { std: f32 },
}

/// One tensor of the file, before any data exists.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    /// `ne[0]` (contiguous) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub init: Init,
}

impl TensorPlan {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data (`None` if `ne[0]` does not fit the type's blocks).
    pub fn n_bytes(&self) -> Option<u64> {
        self.ty
            .row_bytes(self.dims[0])?
            .checked_mul(self.dims[1..].iter().product())
    }
}

/// llama.cpp's "use more bits" layers: the first and last eighth, and every third layer.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

/// The type llama.cpp's quantizer gives a weight matrix (2-D) of this file type, for the
/// architectures synth writes (no MoE, no fused QKV). `layer` is the block index of
/// `blk.N.*` tensors; `has_output`: the file has its own `output.weight`.
pub fn matrix_type(
    name: &str,
    layer: Option<usize>,
    n_layers: usize,
    ne0: u64,
    quant: Quant,
    has_output: bool,
) -> Result<GgmlType> {
    let default = quant.default_type();
    let more_bits = || layer.is_some_and(|l| use_more_bits(l, n_layers));
    let ty = if name == "output.weight" || (!has_output && name == "token_embd.weight") {
        if !ne0.is_multiple_of(default.block_size() as u64) || default == GgmlType::Q8_0 {
            GgmlType::Q8_0
        } else {
            GgmlType::Q6_K
        }
    } else if name == "token_embd.weight" {
        default
    } else if (name.contains("attn_v.weight") || name.contains("ffn_down"))
        && quant == Quant::Q4KM
        && more_bits()
    {
        GgmlType::Q6_K
    } else {
        default
    };
    if ne0.is_multiple_of(ty.block_size() as u64) {
        return Ok(ty);
    }
    // llama.cpp's fallback for rows that do not fit the blocks.
    let fallback = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => bail!("{name}: a row of {ne0} does not fit {ty} blocks"),
    };
    if !ne0.is_multiple_of(fallback.block_size() as u64) {
        bail!("{name}: a row of {ne0} fits neither {ty} nor {fallback} blocks");
    }
    Ok(fallback)
}

/// The file's tensors in order (token embeddings, each layer's tensors, the final norm,
/// the output head): llama.cpp's names and shapes, the quantizer's types.
pub fn plan(h: &Hparams, quant: Quant) -> Result<Vec<TensorPlan>> {
    let d = h.d_model;
    let q = h.n_heads * h.head_dim;
    let kv = h.n_kv_heads * h.head_dim;
    let has_output = !h.tied_embeddings;
    let mut out = Vec::with_capacity(3 + 11 * h.n_layers);
    let matrix = |name: String, layer: Option<usize>, dims: [u64; 2]| -> Result<TensorPlan> {
        let ty = matrix_type(&name, layer, h.n_layers, dims[0], quant, has_output)?;
        Ok(TensorPlan {
            name,
            dims: dims.to_vec(),
            ty,
            init: Init::Random {
                std: 1.0 / (dims[0] as f32).sqrt(),
            },
        })
    };
    let norm = |name: String, n: u64| TensorPlan {
        name,
        dims: vec![n],
        ty: GgmlType::F32,
        init: Init::Norm,
    };
    out.push(matrix("token_embd.weight".into(), None, [d, h.vocab])?);
    for l in 0..h.n_layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        let m = |s: &str, dims| matrix(p(s), Some(l), dims);
        out.push(norm(p("attn_norm.weight"), d));
        out.push(m("attn_q.weight", [d, q])?);
        out.push(m("attn_k.weight", [d, kv])?);
        out.push(m("attn_v.weight", [d, kv])?);
        out.push(norm(p("attn_q_norm.weight"), h.head_dim));
        out.push(norm(p("attn_k_norm.weight"), h.head_dim));
        out.push(m("attn_output.weight", [q, d])?);
        out.push(norm(p("ffn_norm.weight"), d));
        out.push(m("ffn_gate.weight", [d, h.ffn])?);
        out.push(m("ffn_up.weight", [d, h.ffn])?);
        out.push(m("ffn_down.weight", [h.ffn, d])?);
    }
    out.push(norm("output_norm.weight".into(), d));
    if has_output {
        out.push(matrix("output.weight".into(), None, [d, h.vocab])?);
    }
    Ok(out)
}

/// Bytes of weights one decode step reads: every tensor, but only one row of the token
/// embeddings when the output head is a separate tensor.
pub fn weight_bytes_per_token(h: &Hparams, plan: &[TensorPlan]) -> u64 {
    plan.iter()
        .map(|t| {
            let n = t.n_bytes().unwrap_or(0);
            if t.name == "token_embd.weight" && !h.tied_embeddings {
                t.ty.row_bytes(t.dims[0]).unwrap_or(0)
            } else {
                n
            }
        })
        .sum()
}

/// A byte-level BPE vocabulary in Qwen's layout.
pub struct Vocab {
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` values: 1 normal, 3 control, 4 user-defined, 5 unused.
    pub types: Vec<i32>,
    /// `"left right"`, rank order; merge `i` makes token `256 + i`.
    pub merges: Vec<String>,
}

/// GPT-2's byte-to-character map: printable Latin-1 bytes stand for themselves, the others
/// (controls, space, 0x7F-0xA0, 0xAD) for U+0100 onward in byte order. Returns the bytes
/// in vocabulary order (printable first, as GPT-2's vocabulary has them) with their chars.
pub fn byte_chars() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut out: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let rest = (0..=255u8).filter(|&b| !printable(b));
    out.extend(
        rest.zip(256u32..)
            .map(|(b, c)| (b, char::from_u32(c).unwrap_or('?'))),
    );
    out
}

/// Builds the vocabulary: `h.n_bpe` BPE tokens, the Qwen added tokens, `[PADn]` slots up
/// to `h.vocab`. Merged tokens are at most 12 bytes long, which keeps the vocabulary
/// close to a real one in size; their parts lean towards lowercase letters.
pub fn build_vocab(h: &Hparams) -> Result<Vocab> {
    let n_added = QWEN_ADDED.len() as u64;
    if h.n_bpe < 256 || h.n_bpe + n_added > h.vocab {
        bail!(
            "a vocabulary of {} cannot hold {} BPE tokens and {n_added} added tokens",
            h.vocab,
            h.n_bpe
        );
    }
    let n_bpe = h.n_bpe as usize;
    let vocab = h.vocab as usize;
    let mut tokens: Vec<String> = Vec::with_capacity(vocab);
    let mut lens: Vec<u8> = Vec::with_capacity(n_bpe);
    let mut seen: HashSet<String> = HashSet::with_capacity(vocab);
    let byte_chars = byte_chars();
    let mut byte_id = [0u32; 256];
    for (i, &(b, c)) in byte_chars.iter().enumerate() {
        byte_id[b as usize] = i as u32;
        tokens.push(c.to_string());
        lens.push(1);
    }
    // Strings the merges must never produce.
    seen.extend(QWEN_ADDED.iter().map(|t| (*t).to_owned()));
    for i in (n_bpe + QWEN_ADDED.len())..vocab {
        seen.insert(format!("[PAD{i}]"));
    }
    seen.extend(tokens.iter().cloned());
    const MAX_LEN: u8 = 12;
    // Ids of tokens short enough to extend.
    let mut short: Vec<u32> = (0..256).collect();
    let mut rng = Rng::new(0x5eed_70c3_4a11_0001);
    let mut merges = Vec::with_capacity(n_bpe - 256);
    let mut attempts = 0u64;
    while tokens.len() < n_bpe {
        attempts += 1;
        if attempts > 64 * n_bpe as u64 {
            bail!("could not find {n_bpe} distinct merged tokens");
        }
        let r = rng.next();
        let left = if r.is_multiple_of(8) {
            byte_id[b' ' as usize]
        } else {
            short[(rng.next() % short.len() as u64) as usize]
        };
        let right = match (r >> 8) % 8 {
            0..=4 => byte_id[(b'a' + ((r >> 16) % 26) as u8) as usize],
            5 => ((r >> 16) % 256) as u32,
            _ => short[(rng.next() % short.len() as u64) as usize],
        };
        let len = lens[left as usize] + lens[right as usize];
        if len > MAX_LEN {
            continue;
        }
        let (l, rt) = (&tokens[left as usize], &tokens[right as usize]);
        let mut s = String::with_capacity(l.len() + rt.len());
        s.push_str(l);
        s.push_str(rt);
        if seen.contains(&s) {
            continue;
        }
        merges.push(format!("{l} {rt}"));
        seen.insert(s.clone());
        if len < MAX_LEN {
            short.push(tokens.len() as u32);
        }
        tokens.push(s);
        lens.push(len);
    }
    let mut types = vec![1i32; n_bpe];
    for t in QWEN_ADDED {
        tokens.push(t.to_owned());
        types.push(if t.starts_with("<|") && t.ends_with("|>") {
            3
        } else {
            4
        });
    }
    for i in tokens.len()..vocab {
        tokens.push(format!("[PAD{i}]"));
        types.push(5);
    }
    Ok(Vocab {
        tokens,
        types,
        merges,
    })
}

/// All metadata keys, in the order llama.cpp's converter writes them.
pub fn metadata(h: &Hparams, quant: Quant, seed: u64) -> Result<Vec<(String, GgufValue)>> {
    let a = h.arch;
    let u = |n: u64| GgufValue::U32(n as u32);
    let mut m: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), a.into()),
        ("general.type".into(), "model".into()),
        (
            "general.name".into(),
            format!("Qwen3 {}", h.size_label).into(),
        ),
        (
            "general.description".into(),
            format!("random weights with Qwen3 {}'s shapes (caldera synth, seed {seed}); not a trained model", h.size_label).into(),
        ),
        ("general.basename".into(), "Qwen3".into()),
        ("general.size_label".into(), h.size_label.into()),
        ("general.license".into(), "apache-2.0".into()),
        (format!("{a}.block_count"), u(h.n_layers as u64)),
        (format!("{a}.context_length"), GgufValue::U32(h.context)),
        (format!("{a}.embedding_length"), u(h.d_model)),
        (format!("{a}.feed_forward_length"), u(h.ffn)),
        (format!("{a}.attention.head_count"), u(h.n_heads)),
        (format!("{a}.attention.head_count_kv"), u(h.n_kv_heads)),
        (format!("{a}.rope.freq_base"), GgufValue::F32(h.rope_theta)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(h.rms_eps),
        ),
        (format!("{a}.attention.key_length"), u(h.head_dim)),
        (format!("{a}.attention.value_length"), u(h.head_dim)),
        ("general.file_type".into(), GgufValue::U32(quant.file_type())),
    ];
    let v = build_vocab(h)?;
    let special = |k: u64| GgufValue::U32((h.n_bpe + k) as u32);
    m.extend([
        ("tokenizer.ggml.model".into(), "gpt2".into()),
        ("tokenizer.ggml.pre".into(), "qwen2".into()),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::str_array(&v.tokens),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::i32_array(&v.types),
        ),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::str_array(&v.merges),
        ),
        ("tokenizer.ggml.eos_token_id".into(), special(IM_END)),
        ("tokenizer.ggml.padding_token_id".into(), special(ENDOFTEXT)),
        ("tokenizer.ggml.bos_token_id".into(), special(ENDOFTEXT)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(false),
        ),
        ("tokenizer.chat_template".into(), CHATML_TEMPLATE.into()),
        ("general.quantization_version".into(), GgufValue::U32(2)),
    ]);
    Ok(m)
}

/// wyrand: a small, fast generator (64 bits a step); plenty for random weights.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        let k = rest.len();
        rest.copy_from_slice(&last[..k]);
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The seed of one tensor: the file's seed mixed with an FNV-1a hash of the name, so a
/// tensor's bytes do not depend on the others.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut r = Rng::new(h ^ seed.rotate_left(17));
    r.next()
}

/// f32 to IEEE half bits, round to nearest, for finite `x` with |x| < 65504 (subnormal
/// results included).
fn f16_bits(x: f32) -> u16 {
    let sign = if x < 0.0 { 0x8000u16 } else { 0 };
    let a = x.abs();
    let mag = if a < 2f32.powi(-14) {
        (a / 2f32.powi(-24)).round() as u16
    } else {
        let e = a.log2().floor() as i32;
        let m = (a / 2f32.powi(e) - 1.0) * 1024.0;
        // A mantissa that rounds up to 1024 carries into the exponent, as it should.
        (((e + 15) as u16) << 10) + m.round() as u16
    };
    sign | mag.min(0x7bff)
}

/// Where the scale fields of a block type lie, and the RMS of a block's elements in units
/// of its f16 scale `d` when every other bit is random.
struct BlockLayout {
    d_at: usize,
    /// Q4_K's `dmin`, set to `dmin_ratio × d` so a group's mean is about zero.
    dmin_at: Option<usize>,
    /// Q6_K's signed group scales, kept in -64..=63.
    i8_scales: Option<std::ops::Range<usize>>,
    /// Q4_0 / Q5_0: `d` takes a random sign (as the quantizer's signed `d` does), which
    /// centres the blocks' asymmetric levels (-8..=7, -16..=15).
    signed_d: bool,
    unit_rms: f32,
}

fn block_layout(ty: GgmlType) -> Option<BlockLayout> {
    let plain = |unit_rms, signed_d| BlockLayout {
        d_at: 0,
        dmin_at: None,
        i8_scales: None,
        signed_d,
        unit_rms,
    };
    Some(match ty {
        // levels -8..=7, -16..=15, -128..=127: RMS sqrt((n²-1)/12 + 1/4)
        GgmlType::Q4_0 => plain(4.637, true),
        GgmlType::Q5_0 => plain(9.247, true),
        GgmlType::Q8_0 => plain(73.90, false),
        // d·sc·q − 7.5·d·m with sc, m uniform 0..=63 and q uniform 0..=15
        GgmlType::Q4_K => BlockLayout {
            d_at: 0,
            dmin_at: Some(2),
            i8_scales: None,
            signed_d: false,
            unit_rms: 258.3,
        },
        // d·sc·(q − 32), sc uniform -64..=63, q uniform 0..=63
        GgmlType::Q6_K => BlockLayout {
            d_at: 208,
            dmin_at: None,
            i8_scales: Some(192..208),
            signed_d: false,
            unit_rms: 682.9,
        },
        _ => return None,
    })
}

/// Writes one tensor's random data: blocks of random bits with patched scales, or F32
/// norm weights. `progress` gets the number of bytes written so far, piece by piece.
fn fill_tensor(
    w: &mut dyn Write,
    t: &TensorPlan,
    seed: u64,
    progress: &dyn Fn(u64),
) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut rng = Rng::new(tensor_seed(seed, &t.name));
    let n = t.n_elements();
    match (t.ty, t.init) {
        (GgmlType::F32, Init::Norm) => {
            let mut buf = Vec::with_capacity(CHUNK);
            let mut left = n;
            while left > 0 {
                let k = left.min((CHUNK / 4) as u64);
                buf.clear();
                for _ in 0..k {
                    let v = 1.0 + 0.1 * (rng.unit() - 0.5);
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                w.write_all(&buf)?;
                progress(buf.len() as u64);
                left -= k;
            }
            Ok(())
        }
        (ty, Init::Random { std }) => {
            let layout = block_layout(ty).ok_or_else(|| {
                std::io::Error::other(format!("{}: synth cannot write {ty} blocks", t.name))
            })?;
            let bs = ty.type_size();
            let n_blocks = n / ty.block_size() as u64;
            // 64 scales from 0.75 to 1.25 times the one that gives `std`.
            let d0 = std / layout.unit_rms;
            let d_table: [u16; 64] =
                std::array::from_fn(|i| f16_bits(d0 * (0.75 + 0.5 * i as f32 / 63.0)));
            let dmin_table: [u16; 64] =
                std::array::from_fn(|i| f16_bits(7.5 * d0 * (0.75 + 0.5 * i as f32 / 63.0)));
            let per_chunk = (CHUNK / bs).max(1);
            let mut buf = vec![0u8; per_chunk * bs];
            let mut left = n_blocks;
            while left > 0 {
                let k = left.min(per_chunk as u64) as usize;
                let buf = &mut buf[..k * bs];
                rng.fill(buf);
                for block in buf.chunks_exact_mut(bs) {
                    let r = rng.next();
                    let mut d = d_table[(r & 63) as usize];
                    if layout.signed_d && r & (1 << 12) != 0 {
                        d |= 0x8000;
                    }
                    block[layout.d_at..layout.d_at + 2].copy_from_slice(&d.to_le_bytes());
                    if let Some(at) = layout.dmin_at {
                        let j = ((r >> 6) & 63) as usize;
                        block[at..at + 2].copy_from_slice(&dmin_table[j].to_le_bytes());
                    }
                    if let Some(range) = &layout.i8_scales {
                        for s in &mut block[range.clone()] {
                            *s = (*s & 0x7f).wrapping_sub(64);
                        }
                    }
                }
                w.write_all(buf)?;
                progress(buf.len() as u64);
                left -= k as u64;
            }
            Ok(())
        }
        (ty, init) => Err(std::io::Error::other(format!(
            "{}: synth cannot write {ty} with {init:?}",
            t.name
        ))),
    }
}

/// What [`write_model`] wrote.
pub struct Written {
    pub file_size: u64,
    pub tensors: usize,
    pub weight_bytes_per_token: u64,
}

/// Writes the synthetic model to `path` (through a temporary file renamed into place),
/// streaming tensor by tensor; `progress` shows a byte progress bar on a terminal.
pub fn write_model(
    path: &Path,
    arch: SynthArch,
    shape: Shape,
    quant: Quant,
    seed: u64,
    progress: bool,
) -> Result<Written> {
    let h = hparams(arch, shape);
    let plan = plan(&h, quant)?;
    let mut w = GgufWriter::new();
    for (k, v) in metadata(&h, quant, seed)? {
        w.set(&k, v);
    }
    let mut total = 0u64;
    for t in &plan {
        let n = t
            .n_bytes()
            .with_context(|| format!("{}: {:?} does not fit {}", t.name, t.dims, t.ty))?;
        total = total.checked_add(n).context("model size overflows")?;
    }
    let bar = if progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} writing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    for t in &plan {
        let n = t.n_bytes().unwrap_or(0);
        let (t2, bar2) = (t.clone(), bar.clone());
        let src = TensorSource::stream(n, move |out| fill_tensor(out, &t2, seed, &|k| bar2.inc(k)));
        w.add_tensor(&t.name, t.ty, &t.dims, src)?;
    }
    w.write_file(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    bar.finish_and_clear();
    let file_size = std::fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    Ok(Written {
        file_size,
        tensors: plan.len(),
        weight_bytes_per_token: weight_bytes_per_token(&h, &plan),
    })
}

/// A byte count for people: GiB from 1 GiB on, else MiB.
fn human(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if b as f64 >= GIB {
        format!("{:.2} GiB", b as f64 / GIB)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

pub fn synth(a: SynthArgs) -> Result<ExitCode> {
    let t0 = Instant::now();
    let w = write_model(&a.output, a.arch, a.shape, a.quant, a.seed, true)?;
    let secs = t0.elapsed().as_secs_f64();
    let h = hparams(a.arch, a.shape);
    eprintln!(
        "wrote {}: {} {} {}, {} tensors, {} bytes ({}) in {secs:.1}s ({:.0} MB/s)",
        a.output.display(),
        h.arch,
        h.size_label,
        a.quant.name(),
        w.tensors,
        w.file_size,
        human(w.file_size),
        w.file_size as f64 / 1e6 / secs.max(1e-9),
    );
    eprintln!(
        "weight bytes read per decoded token: {} ({})",
        w.weight_bytes_per_token,
        human(w.weight_bytes_per_token)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use caldera_cpu::{CpuBackend, Logits};
    use caldera_format::gguf::GgufFile;
    use caldera_model::Model;
    use caldera_tokenizer::{ChatTemplate, Tokenizer};

    use super::*;

    const QUANTS: [Quant; 3] = [Quant::Q4_0, Quant::Q4KM, Quant::Q8_0];

    fn layer_of(name: &str) -> Option<usize> {
        name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
    }

    fn count(plan: &[TensorPlan], ty: GgmlType) -> usize {
        plan.iter().filter(|t| t.ty == ty).count()
    }

    #[test]
    fn more_bits_layers_are_llama_cpps() {
        let layers = |n| (0..n).filter(|&l| use_more_bits(l, n)).collect::<Vec<_>>();
        let expect_36 = [
            0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35,
        ];
        assert_eq!(layers(36), expect_36);
        let expect_28 = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27];
        assert_eq!(layers(28), expect_28);
        assert_eq!(layers(4), [2, 3]);
        assert_eq!(layers(64).len(), 8 + 8 + 16);
    }

    #[test]
    fn plan_8b_q4_k_m_has_llama_cpps_tensors_and_types() {
        let h = hparams(SynthArch::Qwen3, Shape::B8);
        assert_eq!(
            (
                h.d_model,
                h.n_layers,
                h.n_heads,
                h.n_kv_heads,
                h.head_dim,
                h.ffn
            ),
            (4096, 36, 32, 8, 128, 12288)
        );
        let plan = plan(&h, Quant::Q4KM).unwrap();
        assert_eq!(plan.len(), 1 + 36 * 11 + 2);
        let names: HashSet<&str> = plan.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), plan.len());
        assert_eq!(count(&plan, GgmlType::F32), 36 * 4 + 1);
        assert_eq!(count(&plan, GgmlType::Q6_K), 1 + 18 + 18);
        assert_eq!(count(&plan, GgmlType::Q4_K), 1 + 36 * 7 - 36);
        let get = |n: &str| plan.iter().find(|t| t.name == n).unwrap();
        assert_eq!(get("token_embd.weight").ty, GgmlType::Q4_K);
        assert_eq!(get("token_embd.weight").dims, [4096, 151936]);
        assert_eq!(get("output.weight").ty, GgmlType::Q6_K);
        assert_eq!(get("blk.0.attn_q.weight").dims, [4096, 4096]);
        assert_eq!(get("blk.0.attn_k.weight").dims, [4096, 1024]);
        assert_eq!(get("blk.0.attn_output.weight").dims, [4096, 4096]);
        assert_eq!(get("blk.0.ffn_down.weight").dims, [12288, 4096]);
        assert_eq!(get("blk.0.ffn_up.weight").dims, [4096, 12288]);
        assert_eq!(get("blk.0.attn_q_norm.weight").dims, [128]);
        for t in &plan {
            let want = if t.dims.len() == 1 {
                GgmlType::F32
            } else if t.name == "output.weight" {
                GgmlType::Q6_K
            } else if t.name.contains("attn_v") || t.name.contains("ffn_down") {
                let l = layer_of(&t.name).unwrap();
                if use_more_bits(l, 36) {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q4_K
                }
            } else {
                GgmlType::Q4_K
            };
            assert_eq!(t.ty, want, "{}", t.name);
        }
        // Data size beside a real Qwen3-8B Q4_K_M file (5,027,783,488 bytes with ~6 MB of
        // metadata): within 0.2%.
        let data: u64 = plan.iter().map(|t| t.n_bytes().unwrap()).sum();
        let real = 5_027_783_488f64 - 6e6;
        assert!((data as f64 / real - 1.0).abs() < 2e-3, "{data}");
        // A decode step reads everything but the embedding table.
        let emb = get("token_embd.weight").n_bytes().unwrap();
        assert_eq!(
            weight_bytes_per_token(&h, &plan),
            data - emb + GgmlType::Q4_K.row_bytes(4096).unwrap()
        );
    }

    #[test]
    fn plan_types_for_each_shape_and_quant() {
        for shape in [Shape::B0_6, Shape::B8, Shape::B14, Shape::B32] {
            let h = hparams(SynthArch::Qwen3, shape);
            for quant in QUANTS {
                let plan = plan(&h, quant).unwrap();
                let has_output = plan.iter().any(|t| t.name == "output.weight");
                assert_eq!(has_output, shape != Shape::B0_6);
                assert_eq!(plan.len(), 1 + 11 * h.n_layers + 1 + has_output as usize);
                let head = if has_output {
                    "output.weight"
                } else {
                    "token_embd.weight"
                };
                for t in &plan {
                    assert!(t.n_bytes().is_some(), "{}", t.name);
                    let want = match (t.dims.len(), quant) {
                        (1, _) => GgmlType::F32,
                        (_, Quant::Q8_0) => GgmlType::Q8_0,
                        _ if t.name == head => GgmlType::Q6_K,
                        (_, Quant::Q4_0) => GgmlType::Q4_0,
                        (_, Quant::Q4KM) => {
                            let more = layer_of(&t.name).is_some_and(|l| {
                                use_more_bits(l, h.n_layers)
                                    && (t.name.contains("attn_v") || t.name.contains("ffn_down"))
                            });
                            if more {
                                GgmlType::Q6_K
                            } else {
                                GgmlType::Q4_K
                            }
                        }
                    };
                    assert_eq!(t.ty, want, "{shape:?} {quant:?} {}", t.name);
                }
            }
        }
        // The 32B Q4_K_M file: 18.40 GiB as measured (to 0.5%, metadata included).
        let h = hparams(SynthArch::Qwen3, Shape::B32);
        let data: u64 = plan(&h, Quant::Q4KM)
            .unwrap()
            .iter()
            .map(|t| t.n_bytes().unwrap())
            .sum();
        let gib = (data as f64 + 6e6) / (1u64 << 30) as f64;
        assert!((gib / 18.40 - 1.0).abs() < 5e-3, "{gib}");
    }

    #[test]
    fn rows_that_do_not_fit_take_llama_cpps_fallbacks() {
        let t = |name, layer, ne0, quant, out| matrix_type(name, layer, 36, ne0, quant, out);
        let q4km = Quant::Q4KM;
        assert_eq!(
            t("blk.5.attn_q.weight", Some(5), 320, q4km, true).unwrap(),
            GgmlType::Q5_0
        );
        assert_eq!(
            t("blk.0.ffn_down.weight", Some(0), 320, q4km, true).unwrap(),
            GgmlType::Q8_0
        );
        assert_eq!(
            t("output.weight", None, 320, q4km, true).unwrap(),
            GgmlType::Q8_0
        );
        assert_eq!(
            t("token_embd.weight", None, 320, q4km, false).unwrap(),
            GgmlType::Q8_0
        );
        assert_eq!(
            t("token_embd.weight", None, 320, q4km, true).unwrap(),
            GgmlType::Q5_0
        );
        assert!(t("blk.0.attn_q.weight", Some(0), 40, Quant::Q4_0, true).is_err());
        assert!(t("blk.0.attn_q.weight", Some(0), 48, q4km, true).is_err());
    }

    /// Dequantized random blocks: finite, about the asked standard deviation, centred.
    #[test]
    fn random_blocks_are_finite_scaled_and_deterministic() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let std = 0.03f32;
            let t = TensorPlan {
                name: "w".into(),
                dims: vec![512, 96],
                ty,
                init: Init::Random { std },
            };
            let gen = |seed| {
                let mut v = Vec::new();
                fill_tensor(&mut v, &t, seed, &|_| {}).unwrap();
                v
            };
            let bytes = gen(7);
            assert_eq!(bytes.len() as u64, t.n_bytes().unwrap());
            assert_eq!(bytes, gen(7));
            assert_ne!(bytes, gen(8));
            let mut x = vec![0f32; 512 * 96];
            caldera_format::quant::dequantize(ty, &bytes, &mut x).unwrap();
            assert!(x.iter().all(|v| v.is_finite()), "{ty}");
            let n = x.len() as f64;
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let rms = (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n).sqrt();
            assert!((rms / f64::from(std) - 1.0).abs() < 0.15, "{ty}: rms {rms}");
            assert!(mean.abs() < 0.1 * f64::from(std), "{ty}: mean {mean}");
        }
        let norm = TensorPlan {
            name: "n".into(),
            dims: vec![300],
            ty: GgmlType::F32,
            init: Init::Norm,
        };
        let mut v = Vec::new();
        fill_tensor(&mut v, &norm, 1, &|_| {}).unwrap();
        assert_eq!(v.len(), 1200);
        for c in v.chunks_exact(4) {
            let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            assert!((0.94..=1.06).contains(&x), "{x}");
        }
    }

    #[test]
    fn f16_conversion_rounds_normal_and_subnormal_values() {
        for (x, bits) in [
            (1.0f32, 0x3c00u16),
            (0.5, 0x3800),
            (-2.0, 0xc000),
            (65504.0, 0x7bff),
            (6.103_515_6e-5, 0x0400),
            (5.960_464_5e-8, 0x0001),
            (1.0e-5, 0x00a8),
            (0.1, 0x2e66),
            (1.9996, 0x4000),
            (1.999, 0x3fff),
        ] {
            assert_eq!(f16_bits(x), bits, "{x}");
        }
    }

    #[test]
    fn vocab_merges_are_valid_and_tokens_unique() {
        for shape in [Shape::Tiny, Shape::B0_6] {
            let h = hparams(SynthArch::Qwen3, shape);
            let v = build_vocab(&h).unwrap();
            assert_eq!(v.tokens.len() as u64, h.vocab);
            assert_eq!(v.types.len() as u64, h.vocab);
            assert_eq!(v.merges.len() as u64, h.n_bpe - 256);
            let ids: std::collections::HashMap<&str, usize> = v
                .tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_str(), i))
                .collect();
            assert_eq!(ids.len(), v.tokens.len(), "duplicate token strings");
            for (i, m) in v.merges.iter().enumerate() {
                let (l, r) = m.split_once(' ').unwrap();
                assert!(!r.contains(' '));
                let id = 256 + i;
                assert!(ids[l] < id && ids[r] < id, "{m}");
                assert_eq!(v.tokens[id], format!("{l}{r}"));
            }
            let n = h.n_bpe as usize;
            assert_eq!(v.tokens[n], "<|endoftext|>");
            assert_eq!(v.tokens[n + 2], "<|im_end|>");
            assert_eq!(v.types[n..n + 3], [3, 3, 3]);
            assert_eq!(v.types[n + 14], 4); // <tool_call>
            assert!(v.types[..n].iter().all(|&t| t == 1));
            assert!(v.types[n + 26..].iter().all(|&t| t == 5));
        }
        let h = hparams(SynthArch::Qwen3, Shape::B8);
        let v = build_vocab(&h).unwrap();
        assert_eq!(v.tokens[151_645], "<|im_end|>");
        assert_eq!(v.tokens[151_668], "</think>");
        assert_eq!(v.tokens[151_935], "[PAD151935]");
        assert!(v
            .tokens
            .iter()
            .all(|t| t.chars().count() <= 12 || t.starts_with('[') || t.starts_with('<')));
    }

    /// The full-size vocabulary and template as a GGUF file, read back by caldera's tokenizer.
    #[test]
    fn tokenizer_loads_and_round_trips() {
        let h = hparams(SynthArch::Qwen3, Shape::B0_6);
        let mut w = GgufWriter::new();
        for (k, v) in metadata(&h, Quant::Q4KM, 0).unwrap() {
            w.set(&k, v);
        }
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.architecture(), Some("qwen3"));
        assert_eq!(f.get_u64("general.file_type"), Some(15));
        assert_eq!(f.get_u64("qwen3.context_length"), Some(40960));
        let tok = Tokenizer::from_gguf(&f).unwrap();
        assert_eq!(tok.vocab_size(), 151_936);
        assert_eq!(tok.eos_id(), Some(151_645));
        assert!(!tok.adds_bos());
        assert!(tok.is_eog(151_645));
        for text in [
            "Hello, world! The quick brown fox jumps over the lazy dog.",
            "  leading spaces,\ttabs\nand newlines\r\n\n",
            "naïve café — 日本語のテキスト 🦀 123456789 ₿",
            "fn main() { println!(\"{}\", 1 + 2); }",
            "",
        ] {
            let ids = tok.encode(text, true, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
            if text.len() > 40 {
                assert!(ids.len() < text.len(), "no merges used for {text:?}");
            }
        }
        let chat = ChatTemplate::new(f.get_str("tokenizer.chat_template").unwrap(), "", "")
            .unwrap()
            .render(
                &serde_json::json!([{"role": "user", "content": "Hi there"}]),
                None,
                true,
                None,
            )
            .unwrap();
        assert_eq!(
            chat,
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode(&chat, false, true).unwrap();
        assert_eq!(ids[0], 151_644);
        assert!(ids.contains(&151_645));
        assert_eq!(tok.decode(&ids, false).unwrap(), chat);
        // Without parse_special the markers are plain text.
        assert!(!tok.encode(&chat, false, false).unwrap().contains(&151_644));
    }

    /// The tiny shape, for each file type: the file loads as a model whose tensor types are
    /// the plan's, and one CPU forward gives finite, varied logits.
    #[test]
    fn tiny_models_load_and_run() {
        let dir = std::env::temp_dir().join(format!("caldera-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for quant in QUANTS {
            let path = dir.join(format!("tiny-{quant:?}.gguf"));
            let written =
                write_model(&path, SynthArch::Qwen3, Shape::Tiny, quant, 3, false).unwrap();
            assert_eq!(written.file_size, std::fs::metadata(&path).unwrap().len());
            let h = hparams(SynthArch::Qwen3, Shape::Tiny);
            let plan = plan(&h, quant).unwrap();
            let g = GgufFile::open(&path).unwrap();
            assert_eq!(g.tensors().len(), plan.len());
            for (t, p) in g.tensors().iter().zip(&plan) {
                assert_eq!((&t.name, &t.dims, t.ty), (&p.name, &p.dims, p.ty));
            }
            let (file, model) = Model::open(&path).unwrap();
            assert_eq!(model.config.vocab_size, 1000);
            assert_eq!(model.config.n_layers(), 4);
            let tok = match &file.tokenizer {
                caldera_model::TokenizerSource::Gguf(g) => Tokenizer::from_gguf(g).unwrap(),
                _ => panic!("no GGUF tokenizer"),
            };
            let ids = tok.encode("<|im_start|>user\nhello", false, true).unwrap();
            assert_eq!(ids[0], 974 + 1);
            let be = CpuBackend::new(Arc::new(model), 1);
            let mut s = be.new_session(16).unwrap();
            let mut out = Vec::new();
            be.forward(&mut s, &ids, Logits::All, &mut out).unwrap();
            assert_eq!(out.len(), ids.len() * 1000);
            assert!(out.iter().all(|v| v.is_finite()), "{quant:?}");
            let last = &out[out.len() - 1000..];
            let mean = last.iter().sum::<f32>() / 1000.0;
            let var = last.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 1000.0;
            assert!(var > 0.01 && var < 100.0, "{quant:?}: logit variance {var}");
            std::fs::remove_file(&path).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn same_seed_same_file() {
        let dir = std::env::temp_dir().join(format!("caldera-synth-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, seed| {
            let p = dir.join(name);
            write_model(&p, SynthArch::Qwen3, Shape::Tiny, Quant::Q4KM, seed, false).unwrap();
            std::fs::read(&p).unwrap()
        };
        let (a, b, c) = (write("a.gguf", 1), write("b.gguf", 1), write("c.gguf", 2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), c.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
