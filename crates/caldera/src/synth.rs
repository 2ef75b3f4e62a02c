//! `caldera synth --arch qwen3 --shape 8b --quant q4_k_m OUT.gguf`: a GGUF file with random
//! weights and a real model's shapes, metadata, tensor types and a complete tokenizer, for
//! benchmarks and tests. Files use llama.cpp's architecture names, keys and tensor names,
//! so llama.cpp loads them too.
//!
//! # Shapes
//! Every architecture has its real shapes and a `tiny` one (a few layers of width 256-320,
//! vocabulary 1000) for tests. The real hyperparameters, from the published `config.json`
//! files (where a value was not findable, the note says what was used):
//! - `qwen3` 0.6b / 8b / 14b / 32b (Qwen3-*): head_dim 128, rope theta 1e6, RMS eps 1e-6,
//!   context 40960, vocabulary 151936; 0.6B ties its output head to the embeddings.
//!   (d, layers, heads, ffn): 0.6B 1024/28/16/3072, 8B 4096/36/32/12288, 14B 5120/40/40/17408,
//!   32B 5120/64/64/25600; 8 kv heads.
//! - `qwen3moe` 30b-a3b (Qwen3-30B-A3B): d 2048, 48 layers, 32 heads, 4 kv heads, head_dim
//!   128, 128 experts of width 768, 8 used (renormalized), `feed_forward_length` 6144 (no
//!   dense layer uses it), vocabulary 151936, theta 1e6, eps 1e-6, context 40960, untied.
//! - `qwen35` 27b (Qwen3.5-27B, text part): d 5120, 64 layers, every 4th full attention
//!   (24 heads, 4 kv heads, head_dim 256, q carries a gate, rope on 64 dims, MRoPE sections
//!   11/11/10), the others GatedDeltaNet (16 key heads, 48 value heads, head dims 128, conv
//!   kernel 4); dense SwiGLU 17408; vocabulary 248320; theta 1e7; eps 1e-6; context 262144;
//!   untied. The MTP head is not written (caldera does not use it).
//! - `qwen35moe` 35b-a3b (Qwen3.5-35B-A3B): d 2048, 40 layers, attention every 4th (16
//!   heads, 2 kv heads, head_dim 256), GatedDeltaNet (16 key heads, 32 value heads, 128),
//!   256 experts of width 512, 8 used, a shared expert of 512 with a sigmoid gate; otherwise
//!   as 27b.
//! - `nemotron_h` 8b (Nemotron-H-8B-Base-8K): d 4096, 52 one-block layers in the pattern
//!   `M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-` (24 Mamba2, 4 attention, 24
//!   relu² MLP of 21504); attention 32 heads, 8 kv heads, head_dim 128, no RoPE; Mamba2 128
//!   heads of 64 (d_inner 8192), state 128, 8 groups, conv kernel 4; vocabulary 131072; eps
//!   1e-5; context 2^20 (what llama.cpp's converter writes for it; the config says 8192);
//!   untied.
//! - `lfm2` 2.6b (LFM2-2.6B): d 2048, 30 layers, attention (32 heads, 8 kv heads, head_dim
//!   64, q/k norm) on layers 2, 6, 10, 14, 18, 21, 24, 27 and gated short convolutions
//!   (kernel 3) elsewhere; SwiGLU 10752 (2.57B parameters, as the model card says); vocabulary
//!   65536; theta 1e6; eps 1e-5; context 128000; tied embeddings. The attention layer
//!   indices are from memory of the published `layer_types` (8 attention and 22 conv layers
//!   are confirmed; which 8 is not).
//! - `gpt-oss` 20b (gpt-oss-20b): d 2880, 24 layers, 64 heads, 8 kv heads, head_dim 64,
//!   attention sinks, q/k/v/o biases, sliding window 128 on even layers, YaRN (factor 32,
//!   original context 4096), theta 150000; 32 experts of width 2880 with biases, 4 used;
//!   vocabulary 201088 (o200k_harmony); eps 1e-5; context 131072; untied.
//!
//! # Tensor types
//! The types llama.cpp's quantizer (`llama_tensor_get_type`, `src/llama-quant.cpp`) gives
//! each tensor for the file type, emulated in [`assign_types`]: only tensors of two or more
//! dimensions (trailing 1s not counted) whose names end in `weight` are quantized, except
//! norms, routers (`ffn_gate_inp`), conv kernels (`ssm_conv1d`, `shortconv.conv`); those stay
//! F32 as the converter writes them. Tensors are visited in llama.cpp's order (by layer,
//! then by name). The output head (or tied token embeddings) is Q6_K (Q8_0 for a Q8_0 file,
//! or when its rows do not fit the file type's blocks). For Q4_K_M, attention-v-like
//! tensors (`attn_v`, and the GatedDeltaNet `attn_qkv`, which llama.cpp groups with them)
//! are Q6_K where `use_more_bits(i, n)` holds for their index among such tensors, and
//! `ffn_down*` tensors are Q6_K where it holds for their layer (MoE) or their index among
//! `ffn_down` tensors over the layer count (dense: Nemotron-H's MLP layers). Rows that do
//! not fit take llama.cpp's fallback (Q4_K -> Q5_0, Q6_K -> Q8_0), which gpt-oss's width
//! 2880 hits. `mxfp4_moe` is llama.cpp's MXFP4_MOE: 3-D expert tensors MXFP4, everything
//! else Q8_0.
//!
//! Deviation: gpt-oss's experts are MXFP4 in every file type, as in the released files (the
//! checkpoint's experts are MXFP4 and the published quantizations keep them, as their sizes
//! show); llama-quantize's own rules would requantize them to Q5_0/Q8_0. llama.cpp's rules
//! for 8-expert models and for the file types synth does not write are not modelled (synth
//! refuses 8 experts).
//!
//! # Weights
//! Quantized blocks with random bits and random scales chosen so a matrix's elements have a
//! standard deviation of about `1/sqrt(ne[0])` (fan-in), which keeps activations O(1); norm
//! weights 1 ± 0.05; routers F32 with the same spread; SSM parameters in the ranges their
//! initializers use (A in [-16, -1], dt biases, D near 1, conv kernels in ±0.5). Nothing is
//! quantized from floats, so the file is written at disk speed, one tensor at a time
//! (streamed through [`TensorSource::stream`]); the same `--seed` gives the same bytes.
//!
//! # Tokenizer
//! Byte-level BPE (`gpt2`) in each family's id layout: the 256 byte characters, merged
//! tokens (each merge joins two existing tokens into a new, unique string) and the family's
//! special tokens at their ids: Qwen's 26 added tokens after the BPE tokens (`<|...|>`
//! control, the others user-defined) and `[PADn]` up to the embedding size; gpt-oss's
//! harmony tokens from id 199998 (`<|return|>` is EOS); LFM2's and Nemotron-H's control
//! tokens in front (64 and 1000 of them; LFM2's first 14 are its named ones). Pre-tokenizers:
//! `qwen2`, `qwen35`, `gpt-4o`, and `llama-bpe` for LFM2 (llama.cpp reads LFM2's own name
//! `lfm2` as `llama-bpe`) and Nemotron-H (a stand-in for its tekken-style split). A chat
//! template in the family's format. The vocabulary does not depend on the seed.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use caldera_format::gguf::{GgufArray, GgufValue, GgufValueType, GgufWriter, TensorSource};
use caldera_format::GgmlType;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The shapes of each architecture, for `--help` and error messages.
const SHAPES_HELP: &str = "Shapes per architecture (all have `tiny`, a few small layers for tests):
  qwen3       0.6b, 8b, 14b, 32b   Qwen3 dense
  qwen3moe    30b-a3b              Qwen3-30B-A3B: 128 experts, 8 used
  qwen35      27b                  Qwen3.5-27B: GatedDeltaNet + gated attention (3:1)
  qwen35moe   35b-a3b              Qwen3.5-35B-A3B: hybrid, 256 experts (8 used) + shared
  nemotron_h  8b                   Nemotron-H-8B: Mamba2 / attention / relu² MLP layers
  lfm2        2.6b                 LFM2-2.6B: short conv + attention
  gpt-oss     20b                  gpt-oss-20b: sliding/full attention, 32 MXFP4 experts

The bytes read per decoded token are printed after writing; for MoE models they count only
the experts a token uses (expert_used_count of expert_count), not every expert.";

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SynthArch {
    /// Qwen3 dense.
    Qwen3,
    /// Qwen3 MoE (GGUF `qwen3moe`).
    Qwen3moe,
    /// Qwen3.5 dense hybrid (GGUF `qwen35`).
    Qwen35,
    /// Qwen3.5 MoE hybrid (GGUF `qwen35moe`).
    Qwen35moe,
    /// Nemotron-H (GGUF `nemotron_h`).
    #[value(name = "nemotron_h", alias = "nemotron-h")]
    NemotronH,
    /// LFM2 (GGUF `lfm2`).
    Lfm2,
    /// gpt-oss (GGUF `gpt-oss`).
    #[value(name = "gpt-oss")]
    GptOss,
}

impl SynthArch {
    /// llama.cpp's `general.architecture` name.
    pub fn gguf_name(self) -> &'static str {
        match self {
            SynthArch::Qwen3 => "qwen3",
            SynthArch::Qwen3moe => "qwen3moe",
            SynthArch::Qwen35 => "qwen35",
            SynthArch::Qwen35moe => "qwen35moe",
            SynthArch::NemotronH => "nemotron_h",
            SynthArch::Lfm2 => "lfm2",
            SynthArch::GptOss => "gpt-oss",
        }
    }

    /// The real shapes (besides `tiny`).
    pub fn shapes(self) -> &'static [Shape] {
        match self {
            SynthArch::Qwen3 => &[Shape::B0_6, Shape::B8, Shape::B14, Shape::B32],
            SynthArch::Qwen3moe => &[Shape::B30A3],
            SynthArch::Qwen35 => &[Shape::B27],
            SynthArch::Qwen35moe => &[Shape::B35A3],
            SynthArch::NemotronH => &[Shape::B8],
            SynthArch::Lfm2 => &[Shape::B2_6],
            SynthArch::GptOss => &[Shape::B20],
        }
    }

    /// `general.basename`, `general.license`.
    fn family(self) -> (&'static str, &'static str) {
        match self {
            SynthArch::Qwen3 | SynthArch::Qwen3moe => ("Qwen3", "apache-2.0"),
            SynthArch::Qwen35 | SynthArch::Qwen35moe => ("Qwen3.5", "apache-2.0"),
            SynthArch::NemotronH => ("Nemotron-H", "other"),
            SynthArch::Lfm2 => ("LFM2", "other"),
            SynthArch::GptOss => ("gpt-oss", "apache-2.0"),
        }
    }

    #[cfg(test)]
    pub const ALL: [SynthArch; 7] = [
        SynthArch::Qwen3,
        SynthArch::Qwen3moe,
        SynthArch::Qwen35,
        SynthArch::Qwen35moe,
        SynthArch::NemotronH,
        SynthArch::Lfm2,
        SynthArch::GptOss,
    ];
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Shape {
    /// A few layers of width 256-320, vocabulary 1000 (every architecture): for tests.
    Tiny,
    /// qwen3
    #[value(name = "0.6b")]
    B0_6,
    /// lfm2
    #[value(name = "2.6b")]
    B2_6,
    /// qwen3, nemotron_h
    #[value(name = "8b")]
    B8,
    /// qwen3
    #[value(name = "14b")]
    B14,
    /// gpt-oss
    #[value(name = "20b")]
    B20,
    /// qwen35
    #[value(name = "27b")]
    B27,
    /// qwen3moe
    #[value(name = "30b-a3b")]
    B30A3,
    /// qwen3
    #[value(name = "32b")]
    B32,
    /// qwen35moe
    #[value(name = "35b-a3b")]
    B35A3,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Tiny => "tiny",
            Shape::B0_6 => "0.6b",
            Shape::B2_6 => "2.6b",
            Shape::B8 => "8b",
            Shape::B14 => "14b",
            Shape::B20 => "20b",
            Shape::B27 => "27b",
            Shape::B30A3 => "30b-a3b",
            Shape::B32 => "32b",
            Shape::B35A3 => "35b-a3b",
        }
    }
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
    /// llama.cpp's MXFP4_MOE: expert tensors MXFP4, all other matrices Q8_0.
    #[value(name = "mxfp4_moe")]
    Mxfp4Moe,
}

impl Quant {
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
            Quant::Mxfp4Moe => 38,
        }
    }

    /// The type a weight matrix gets when no rule says otherwise.
    fn default_type(self) -> GgmlType {
        match self {
            Quant::Q4_0 => GgmlType::Q4_0,
            Quant::Q8_0 => GgmlType::Q8_0,
            Quant::Q4KM => GgmlType::Q4_K,
            Quant::Mxfp4Moe => GgmlType::MXFP4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Quant::Q4_0 => "Q4_0",
            Quant::Q8_0 => "Q8_0",
            Quant::Q4KM => "Q4_K_M",
            Quant::Mxfp4Moe => "MXFP4_MOE",
        }
    }
}

#[derive(Args)]
#[command(after_help = SHAPES_HELP)]
pub struct SynthArgs {
    /// The architecture whose layout and metadata the file has.
    #[arg(long, value_enum, default_value = "qwen3")]
    pub arch: SynthArch,
    /// The model size whose real hyperparameters the file has (see below).
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

/// The token mixer of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixerKind {
    Attention,
    GatedDeltaNet,
    Mamba2,
    ShortConv,
}

/// The feed-forward block of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    Dense,
    Moe,
}

/// What one layer holds (Nemotron-H layers hold one block, the others a mixer and an FFN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerKind {
    pub mixer: Option<MixerKind>,
    pub ffn: Option<FfnKind>,
}

impl LayerKind {
    const fn both(mixer: MixerKind, ffn: FfnKind) -> LayerKind {
        LayerKind {
            mixer: Some(mixer),
            ffn: Some(ffn),
        }
    }
}

/// Mixture-of-experts sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeHparams {
    pub n_experts: u64,
    pub n_used: u64,
    /// Width of each expert.
    pub d_ff: u64,
    /// Width of the shared expert (Qwen3.5 MoE), if any.
    pub shared_ff: Option<u64>,
}

/// GatedDeltaNet sizes (key and value heads have the same size, as llama.cpp requires).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GdnHparams {
    pub n_k_heads: u64,
    pub n_v_heads: u64,
    pub head_dim: u64,
    pub conv_kernel: u64,
}

impl GdnHparams {
    fn conv_dim(&self) -> u64 {
        (2 * self.n_k_heads + self.n_v_heads) * self.head_dim
    }

    fn value_dim(&self) -> u64 {
        self.n_v_heads * self.head_dim
    }
}

/// Mamba2 sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MambaHparams {
    pub n_heads: u64,
    pub head_dim: u64,
    pub d_state: u64,
    pub n_groups: u64,
    pub conv_kernel: u64,
}

impl MambaHparams {
    fn d_inner(&self) -> u64 {
        self.n_heads * self.head_dim
    }

    fn conv_dim(&self) -> u64 {
        self.d_inner() + 2 * self.n_groups * self.d_state
    }
}

/// The vocabulary's layout: `front` control tokens, `n_bpe` byte-level BPE tokens, `back`
/// special tokens (with their `token_type`), then `[PADn]` slots up to the vocabulary size.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLayout {
    /// `tokenizer.ggml.pre`.
    pub pre: &'static str,
    pub front: Vec<String>,
    pub n_bpe: u64,
    pub back: Vec<(String, i32)>,
    pub bos: u64,
    pub eos: u64,
    pub pad: u64,
    pub add_bos: bool,
    pub template: &'static str,
}

/// Hyperparameters of one synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct Hparams {
    pub arch: SynthArch,
    /// `general.size_label`, e.g. "8B".
    pub size_label: &'static str,
    pub d_model: u64,
    pub layers: Vec<LayerKind>,
    /// Attention heads (of the attention layers).
    pub n_heads: u64,
    pub n_kv_heads: u64,
    pub head_dim: u64,
    /// Rotated dimensions per head (0: no RoPE).
    pub rope_dims: u64,
    /// Width of the dense FFNs (`feed_forward_length`; 0 where no layer is dense).
    pub ffn: u64,
    /// Rows of the token embeddings and the output head.
    pub vocab: u64,
    pub tied_embeddings: bool,
    pub context: u32,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub moe: Option<MoeHparams>,
    pub gdn: Option<GdnHparams>,
    pub mamba: Option<MambaHparams>,
    /// LFM2's short-conv kernel length.
    pub shortconv_l: u64,
    /// gpt-oss's sliding window (even layers).
    pub sliding_window: u64,
    /// YaRN (factor, original context).
    pub yarn: Option<(f32, u32)>,
    /// Qwen3.5's MRoPE sections.
    pub rope_sections: Option<[i32; 4]>,
    pub tokens: TokenLayout,
}

impl Hparams {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }
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

/// A ChatML template: `<|im_start|>role\ncontent<|im_end|>\n` per message.
const CHATML_TEMPLATE: &str = "{%- for message in messages -%}\
{{- '<|im_start|>' + message['role'] + '\\n' -}}\
{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}\
{{- '<|im_end|>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/// gpt-oss's harmony format, reduced to roles and contents.
const HARMONY_TEMPLATE: &str = "{%- for message in messages -%}\
{{- '<|start|>' + message['role'] + '<|message|>' -}}\
{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}\
{{- '<|end|>' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}";

/// A plain template for Nemotron-H (the base model ships none).
const PLAIN_TEMPLATE: &str = "{%- for message in messages -%}\
{{- message['role'] + ': ' -}}\
{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}\
{{- '\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}";

/// Qwen's layout: BPE tokens `0..n_bpe`, the added tokens, `[PADn]` slots.
fn qwen_tokens(pre: &'static str, n_bpe: u64) -> TokenLayout {
    let back = QWEN_ADDED
        .iter()
        .map(|t| {
            let control = t.starts_with("<|") && t.ends_with("|>");
            ((*t).to_owned(), if control { 3 } else { 4 })
        })
        .collect();
    TokenLayout {
        pre,
        front: Vec::new(),
        n_bpe,
        back,
        bos: n_bpe,
        eos: n_bpe + 2,
        pad: n_bpe,
        add_bos: false,
        template: CHATML_TEMPLATE,
    }
}

/// gpt-oss's layout (o200k_harmony): BPE tokens `0..n_bpe`, then its special tokens, the
/// unnamed ones `<|reserved_ID|>`, up to `vocab`.
fn harmony_tokens(n_bpe: u64, vocab: u64) -> TokenLayout {
    let named = |off: u64| -> Option<&'static str> {
        Some(match off {
            0 => "<|startoftext|>",
            1 => "<|endoftext|>",
            4 => "<|return|>",
            5 => "<|constrain|>",
            7 => "<|channel|>",
            8 => "<|start|>",
            9 => "<|end|>",
            10 => "<|message|>",
            14 => "<|call|>",
            _ => return None,
        })
    };
    let back = (0..vocab - n_bpe)
        .map(|off| {
            let name = named(off)
                .map_or_else(|| format!("<|reserved_{}|>", n_bpe + off), |s| s.to_owned());
            (name, 3)
        })
        .collect();
    TokenLayout {
        pre: "gpt-4o",
        front: Vec::new(),
        n_bpe,
        back,
        bos: n_bpe,
        eos: n_bpe + 4,
        pad: n_bpe + 1,
        add_bos: false,
        template: HARMONY_TEMPLATE,
    }
}

/// LFM2's layout: `n_front` control tokens (its named ones, then `<|reserved_N|>`), then
/// BPE tokens to the end.
fn lfm2_tokens(n_front: u64, vocab: u64) -> TokenLayout {
    const NAMED: [&str; 14] = [
        "<|pad|>",
        "<|startoftext|>",
        "<|endoftext|>",
        "<|fim_pre|>",
        "<|fim_mid|>",
        "<|fim_suf|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|tool_list_start|>",
        "<|tool_list_end|>",
        "<|tool_call_start|>",
        "<|tool_call_end|>",
        "<|tool_response_start|>",
        "<|tool_response_end|>",
    ];
    let front = (0..n_front as usize)
        .map(|i| {
            NAMED
                .get(i)
                .map_or_else(|| format!("<|reserved_{i}|>"), |s| (*s).to_owned())
        })
        .collect();
    TokenLayout {
        pre: "llama-bpe",
        front,
        n_bpe: vocab - n_front,
        back: Vec::new(),
        bos: 1,
        eos: 7,
        pad: 0,
        add_bos: true,
        template: CHATML_TEMPLATE,
    }
}

/// Nemotron-H's layout: `<unk>`, `<s>`, `</s>`, `<SPECIAL_N>` up to `n_front`, then BPE.
fn nemotron_tokens(n_front: u64, vocab: u64) -> TokenLayout {
    let front = (0..n_front as usize)
        .map(|i| match i {
            0 => "<unk>".to_owned(),
            1 => "<s>".to_owned(),
            2 => "</s>".to_owned(),
            _ => format!("<SPECIAL_{i}>"),
        })
        .collect();
    TokenLayout {
        pre: "llama-bpe",
        front,
        n_bpe: vocab - n_front,
        back: Vec::new(),
        bos: 1,
        eos: 2,
        pad: 0,
        add_bos: true,
        template: PLAIN_TEMPLATE,
    }
}

/// Nemotron-H-8B's layer pattern: M = Mamba2, * = attention, - = MLP.
const NEMOTRON_H_8B_PATTERN: &str = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-";
/// LFM2-2.6B's attention layers (the others are short convolutions).
const LFM2_2_6B_ATTENTION: [usize; 8] = [2, 6, 10, 14, 18, 21, 24, 27];

/// The hyperparameters of `arch` at `shape`; an error for shapes the architecture lacks.
pub fn hparams(arch: SynthArch, shape: Shape) -> Result<Hparams> {
    use FfnKind::{Dense, Moe};
    use MixerKind::{Attention, GatedDeltaNet, Mamba2, ShortConv};
    if shape != Shape::Tiny && !arch.shapes().contains(&shape) {
        let names: Vec<&str> = arch.shapes().iter().map(|s| s.name()).collect();
        bail!(
            "{} has no shape {}; its shapes: {}, tiny",
            arch.gguf_name(),
            shape.name(),
            names.join(", ")
        );
    }
    let tiny = shape == Shape::Tiny;
    // Fields most shapes share; each arm overrides what differs.
    let base = Hparams {
        arch,
        size_label: "tiny",
        d_model: 256,
        layers: Vec::new(),
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        rope_dims: 64,
        ffn: 512,
        vocab: 1000,
        tied_embeddings: false,
        context: 40_960,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        moe: None,
        gdn: None,
        mamba: None,
        shortconv_l: 0,
        sliding_window: 0,
        yarn: None,
        rope_sections: None,
        tokens: qwen_tokens("qwen2", 1000 - QWEN_ADDED.len() as u64),
    };
    let uniform = |n: usize, k: LayerKind| vec![k; n];
    let h = match arch {
        SynthArch::Qwen3 => {
            // (label, d_model, layers, heads, ffn, tied)
            let (size_label, d_model, n_layers, n_heads, ffn, tied) = match shape {
                Shape::B0_6 => ("0.6B", 1024, 28, 16, 3072, true),
                Shape::B8 => ("8B", 4096, 36, 32, 12288, false),
                Shape::B14 => ("14B", 5120, 40, 40, 17408, false),
                Shape::B32 => ("32B", 5120, 64, 64, 25600, false),
                _ => ("tiny", 256, 4, 4, 512, false),
            };
            let kind = LayerKind::both(Attention, Dense);
            if tiny {
                Hparams {
                    layers: uniform(4, kind),
                    ..base
                }
            } else {
                Hparams {
                    size_label,
                    d_model,
                    layers: uniform(n_layers, kind),
                    n_heads,
                    n_kv_heads: 8,
                    head_dim: 128,
                    rope_dims: 128,
                    ffn,
                    vocab: 151_936,
                    tied_embeddings: tied,
                    tokens: qwen_tokens("qwen2", 151_643),
                    ..base
                }
            }
        }
        SynthArch::Qwen3moe => {
            let kind = LayerKind::both(Attention, Moe);
            if tiny {
                Hparams {
                    layers: uniform(4, kind),
                    moe: Some(MoeHparams {
                        n_experts: 16,
                        n_used: 4,
                        d_ff: 256,
                        shared_ff: None,
                    }),
                    ..base
                }
            } else {
                Hparams {
                    size_label: "30B-A3B",
                    d_model: 2048,
                    layers: uniform(48, kind),
                    n_heads: 32,
                    n_kv_heads: 4,
                    head_dim: 128,
                    rope_dims: 128,
                    ffn: 6144,
                    vocab: 151_936,
                    moe: Some(MoeHparams {
                        n_experts: 128,
                        n_used: 8,
                        d_ff: 768,
                        shared_ff: None,
                    }),
                    tokens: qwen_tokens("qwen2", 151_643),
                    ..base
                }
            }
        }
        SynthArch::Qwen35 | SynthArch::Qwen35moe => {
            let moe = arch == SynthArch::Qwen35moe;
            let ffn_kind = if moe { Moe } else { Dense };
            let hybrid = |n: usize| -> Vec<LayerKind> {
                (0..n)
                    .map(|i| {
                        let mixer = if (i + 1) % 4 == 0 {
                            Attention
                        } else {
                            GatedDeltaNet
                        };
                        LayerKind::both(mixer, ffn_kind)
                    })
                    .collect()
            };
            if tiny {
                Hparams {
                    layers: hybrid(4),
                    rope_dims: 16,
                    ffn: if moe { 0 } else { 512 },
                    context: 262_144,
                    rope_theta: 1e7,
                    moe: moe.then_some(MoeHparams {
                        n_experts: 16,
                        n_used: 4,
                        d_ff: 256,
                        shared_ff: Some(256),
                    }),
                    gdn: Some(GdnHparams {
                        n_k_heads: 2,
                        n_v_heads: 4,
                        head_dim: 64,
                        conv_kernel: 4,
                    }),
                    rope_sections: Some([3, 3, 2, 0]),
                    tokens: qwen_tokens("qwen35", 1000 - QWEN_ADDED.len() as u64),
                    ..base
                }
            } else {
                let common = Hparams {
                    head_dim: 256,
                    rope_dims: 64,
                    vocab: 248_320,
                    context: 262_144,
                    rope_theta: 1e7,
                    rope_sections: Some([11, 11, 10, 0]),
                    tokens: qwen_tokens("qwen35", 248_044),
                    ..base
                };
                if moe {
                    Hparams {
                        size_label: "35B-A3B",
                        d_model: 2048,
                        layers: hybrid(40),
                        n_heads: 16,
                        n_kv_heads: 2,
                        ffn: 0,
                        moe: Some(MoeHparams {
                            n_experts: 256,
                            n_used: 8,
                            d_ff: 512,
                            shared_ff: Some(512),
                        }),
                        gdn: Some(GdnHparams {
                            n_k_heads: 16,
                            n_v_heads: 32,
                            head_dim: 128,
                            conv_kernel: 4,
                        }),
                        ..common
                    }
                } else {
                    Hparams {
                        size_label: "27B",
                        d_model: 5120,
                        layers: hybrid(64),
                        n_heads: 24,
                        n_kv_heads: 4,
                        ffn: 17408,
                        gdn: Some(GdnHparams {
                            n_k_heads: 16,
                            n_v_heads: 48,
                            head_dim: 128,
                            conv_kernel: 4,
                        }),
                        ..common
                    }
                }
            }
        }
        SynthArch::NemotronH => {
            let pattern = if tiny { "M-M*-" } else { NEMOTRON_H_8B_PATTERN };
            let layers = pattern
                .chars()
                .map(|c| match c {
                    'M' => LayerKind {
                        mixer: Some(Mamba2),
                        ffn: None,
                    },
                    '*' => LayerKind {
                        mixer: Some(Attention),
                        ffn: None,
                    },
                    _ => LayerKind {
                        mixer: None,
                        ffn: Some(Dense),
                    },
                })
                .collect();
            let common = Hparams {
                layers,
                rope_dims: 0,
                // The converter writes 2^20 for hybrids without RoPE (the config: 8192).
                context: 1 << 20,
                rms_eps: 1e-5,
                ..base
            };
            if tiny {
                Hparams {
                    mamba: Some(MambaHparams {
                        n_heads: 8,
                        head_dim: 64,
                        d_state: 32,
                        n_groups: 2,
                        conv_kernel: 4,
                    }),
                    tokens: nemotron_tokens(32, 1000),
                    ..common
                }
            } else {
                Hparams {
                    size_label: "8B",
                    d_model: 4096,
                    n_heads: 32,
                    n_kv_heads: 8,
                    head_dim: 128,
                    ffn: 21504,
                    vocab: 131_072,
                    mamba: Some(MambaHparams {
                        n_heads: 128,
                        head_dim: 64,
                        d_state: 128,
                        n_groups: 8,
                        conv_kernel: 4,
                    }),
                    tokens: nemotron_tokens(1000, 131_072),
                    ..common
                }
            }
        }
        SynthArch::Lfm2 => {
            let (n_layers, attn): (usize, &[usize]) = if tiny {
                (6, &[2, 5])
            } else {
                (30, &LFM2_2_6B_ATTENTION)
            };
            let layers = (0..n_layers)
                .map(|i| {
                    let mixer = if attn.contains(&i) {
                        Attention
                    } else {
                        ShortConv
                    };
                    LayerKind::both(mixer, Dense)
                })
                .collect();
            let common = Hparams {
                layers,
                tied_embeddings: true,
                context: 128_000,
                rms_eps: 1e-5,
                shortconv_l: 3,
                ..base
            };
            if tiny {
                Hparams {
                    tokens: lfm2_tokens(32, 1000),
                    ..common
                }
            } else {
                Hparams {
                    size_label: "2.6B",
                    d_model: 2048,
                    n_heads: 32,
                    n_kv_heads: 8,
                    ffn: 10752,
                    vocab: 65_536,
                    tokens: lfm2_tokens(64, 65_536),
                    ..common
                }
            }
        }
        SynthArch::GptOss => {
            let common = Hparams {
                context: 131_072,
                rope_theta: 150_000.0,
                rms_eps: 1e-5,
                yarn: Some((32.0, 4096)),
                ..base
            };
            if tiny {
                Hparams {
                    d_model: 320,
                    layers: uniform(4, LayerKind::both(Attention, Moe)),
                    ffn: 320,
                    moe: Some(MoeHparams {
                        n_experts: 16,
                        n_used: 4,
                        d_ff: 320,
                        shared_ff: None,
                    }),
                    sliding_window: 8,
                    tokens: harmony_tokens(980, 1000),
                    ..common
                }
            } else {
                Hparams {
                    size_label: "20B",
                    d_model: 2880,
                    layers: uniform(24, LayerKind::both(Attention, Moe)),
                    n_heads: 64,
                    n_kv_heads: 8,
                    head_dim: 64,
                    rope_dims: 64,
                    ffn: 2880,
                    vocab: 201_088,
                    moe: Some(MoeHparams {
                        n_experts: 32,
                        n_used: 4,
                        d_ff: 2880,
                        shared_ff: None,
                    }),
                    sliding_window: 128,
                    tokens: harmony_tokens(199_998, 201_088),
                    ..common
                }
            }
        }
    };
    Ok(h)
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// F32 values 1 ± 0.05.
    Norm,
    /// Elements with about this standard deviation and mean zero (quantized blocks, or
    /// uniform F32 values).
    Random { std: f32 },
    /// F32 values uniform in `[lo, hi)`.
    Uniform { lo: f32, hi: f32 },
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

    /// A stacked expert tensor (or its bias): a token reads only its experts' slices.
    pub fn is_expert(&self) -> bool {
        self.name.contains("_exps.")
    }
}

/// llama.cpp's "use more bits" layers: the first and last eighth, and every third layer.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

/// `ggml_n_dims`: dimensions up to the last one above 1.
fn n_dims(dims: &[u64]) -> usize {
    dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1)
}

/// llama.cpp's `tensor_allows_quantization` for the names synth writes: matrices (two or
/// more dimensions) named `*weight`, but not norms, routers or conv kernels.
pub fn allows_quantization(name: &str, dims: &[u64]) -> bool {
    n_dims(dims) >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && !name.contains("ssm_conv1d")
        && !name.contains("shortconv.conv.weight")
}

/// The `blk.N.` layer of a tensor name.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama.cpp's weight order (`weight_name_comparer`): by layer (non-layer tensors first),
/// then by name.
fn weight_order(a: &str, b: &str) -> std::cmp::Ordering {
    let la = layer_of(a).map_or(-1, |l| l as i64);
    let lb = layer_of(b).map_or(-1, |l| l as i64);
    la.cmp(&lb).then_with(|| a.cmp(b))
}

/// llama.cpp's tensor categories that matter for the file types synth writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    /// `attn_v`, `attn_qkv`: the "more sensitive" attention-v-like tensors.
    AttnVLike,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight") || name.contains("attn_v.weight") {
        Category::AttnVLike
    } else if name.contains("ffn_up") || name.contains("ffn_gate") {
        Category::Other
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// Marks a tensor as "quantizer decides" in a plan before [`assign_types`] runs (the
/// converter would write it F16/BF16).
const UNASSIGNED: GgmlType = GgmlType::F16;

/// Gives every quantizable tensor of `plan` the type llama.cpp's quantizer would choose for
/// `quant` (see the module docs), with the same counters, order and fallbacks. Tensors
/// already MXFP4 (gpt-oss's experts) keep that type.
pub fn assign_types(h: &Hparams, quant: Quant, plan: &mut [TensorPlan]) -> Result<()> {
    let n_layers = h.n_layers();
    let n_expert = h.moe.map_or(0, |m| m.n_experts);
    if n_expert == 8 {
        bail!("synth does not model llama.cpp's special rules for 8-expert models");
    }
    let tied = !plan.iter().any(|t| t.name == "output.weight");
    let n_attn_v = plan
        .iter()
        .filter(|t| category(&t.name) == Category::AttnVLike)
        .count();
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by(|&a, &b| weight_order(&plan[a].name, &plan[b].name));
    let default = quant.default_type();
    let q4km = quant == Quant::Q4KM;
    let (mut i_attn_v, mut i_ffn_down) = (0usize, 0usize);
    for i in order {
        let t = &mut plan[i];
        if !allows_quantization(&t.name, &t.dims) {
            if t.ty == UNASSIGNED {
                bail!("{}: llama.cpp would not quantize it", t.name);
            }
            continue;
        }
        if t.ty == GgmlType::MXFP4 && quant != Quant::Mxfp4Moe {
            continue; // kept as released (module docs)
        }
        let ne0 = t.dims[0];
        let cat = category(&t.name);
        let mut ty = default;
        if cat == Category::Output || (tied && cat == Category::TokenEmbd) {
            ty = if quant == Quant::Mxfp4Moe
                || !ne0.is_multiple_of(default.block_size() as u64)
                || default == GgmlType::Q8_0
            {
                GgmlType::Q8_0
            } else {
                GgmlType::Q6_K
            };
        } else if quant == Quant::Mxfp4Moe {
            ty = if t.dims.get(2).is_some_and(|&n| n > 1) {
                GgmlType::MXFP4
            } else {
                GgmlType::Q8_0
            };
        } else if cat == Category::AttnVLike {
            if q4km && use_more_bits(i_attn_v, n_attn_v) {
                ty = GgmlType::Q6_K;
            }
            i_attn_v += 1;
        } else if cat == Category::FfnDown {
            let layer = if n_expert > 1 {
                layer_of(&t.name).with_context(|| format!("{}: no layer in the name", t.name))?
            } else {
                i_ffn_down
            };
            if q4km && use_more_bits(layer, n_layers) {
                ty = GgmlType::Q6_K;
            }
            i_ffn_down += 1;
        }
        t.ty = fallback(&t.name, ne0, ty)?;
    }
    if let Some(t) = plan.iter().find(|t| t.ty == UNASSIGNED) {
        bail!("{}: no type assigned", t.name);
    }
    Ok(())
}

/// llama.cpp's `tensor_type_fallback` for rows that do not fit the chosen type's blocks.
pub fn fallback(name: &str, ne0: u64, ty: GgmlType) -> Result<GgmlType> {
    if ne0.is_multiple_of(ty.block_size() as u64) {
        return Ok(ty);
    }
    let fb = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => bail!("{name}: a row of {ne0} does not fit {ty} blocks"),
    };
    if !ne0.is_multiple_of(fb.block_size() as u64) {
        bail!("{name}: a row of {ne0} fits neither {ty} nor {fb} blocks");
    }
    Ok(fb)
}

/// Builds a plan tensor by tensor.
struct Planner {
    out: Vec<TensorPlan>,
}

impl Planner {
    fn push(&mut self, name: String, dims: &[u64], ty: GgmlType, init: Init) {
        self.out.push(TensorPlan {
            name,
            dims: dims.to_vec(),
            ty,
            init,
        });
    }

    /// An F32 norm weight.
    fn norm(&mut self, name: String, dims: &[u64]) {
        self.push(name, dims, GgmlType::F32, Init::Norm);
    }

    /// An F32 tensor llama.cpp keeps as it is.
    fn f32(&mut self, name: String, dims: &[u64], init: Init) {
        self.push(name, dims, GgmlType::F32, init);
    }

    /// A matrix (or stack of expert matrices) whose type the quantizer chooses.
    fn mat(&mut self, name: String, dims: &[u64]) {
        let std = 1.0 / (dims[0] as f32).sqrt();
        self.push(name, dims, UNASSIGNED, Init::Random { std });
    }

    /// A router: F32, fan-in spread.
    fn router(&mut self, name: String, dims: &[u64]) {
        let std = 1.0 / (dims[0] as f32).sqrt();
        self.f32(name, dims, Init::Random { std });
    }
}

/// Small biases (gpt-oss).
const BIAS: Init = Init::Uniform {
    lo: -0.02,
    hi: 0.02,
};

/// The file's tensors in order (token embeddings, each layer's tensors, the final norm,
/// the output head): llama.cpp's names and shapes, the quantizer's types.
pub fn plan(h: &Hparams, quant: Quant) -> Result<Vec<TensorPlan>> {
    let d = h.d_model;
    let q = h.n_heads * h.head_dim;
    let kv = h.n_kv_heads * h.head_dim;
    let mut p = Planner { out: Vec::new() };
    p.mat("token_embd.weight".into(), &[d, h.vocab]);
    for (l, kind) in h.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{l}.{s}");
        match h.arch {
            // One block per layer, each under `attn_norm`.
            SynthArch::NemotronH => {
                p.norm(n("attn_norm.weight"), &[d]);
                match (kind.mixer, kind.ffn) {
                    (Some(MixerKind::Mamba2), _) => {
                        let m = h.mamba.context("nemotron_h without Mamba2 sizes")?;
                        let (di, cd, nh) = (m.d_inner(), m.conv_dim(), m.n_heads);
                        p.mat(n("ssm_in.weight"), &[d, di + cd + nh]);
                        p.f32(
                            n("ssm_conv1d.weight"),
                            &[m.conv_kernel, cd],
                            Init::Uniform { lo: -0.5, hi: 0.5 },
                        );
                        p.f32(
                            n("ssm_conv1d.bias"),
                            &[cd],
                            Init::Uniform { lo: -0.1, hi: 0.1 },
                        );
                        // softplus(dt_bias) in about [0.001, 0.1], as Mamba2 initializes it.
                        p.f32(
                            n("ssm_dt.bias"),
                            &[nh],
                            Init::Uniform { lo: -6.9, hi: -2.3 },
                        );
                        p.f32(
                            n("ssm_a"),
                            &[1, nh],
                            Init::Uniform {
                                lo: -16.0,
                                hi: -1.0,
                            },
                        );
                        p.f32(n("ssm_d"), &[1, nh], Init::Uniform { lo: 0.9, hi: 1.1 });
                        p.norm(n("ssm_norm.weight"), &[di / m.n_groups, m.n_groups]);
                        p.mat(n("ssm_out.weight"), &[di, d]);
                    }
                    (Some(MixerKind::Attention), _) => {
                        p.mat(n("attn_q.weight"), &[d, q]);
                        p.mat(n("attn_k.weight"), &[d, kv]);
                        p.mat(n("attn_v.weight"), &[d, kv]);
                        p.mat(n("attn_output.weight"), &[q, d]);
                    }
                    _ => {
                        p.mat(n("ffn_up.weight"), &[d, h.ffn]);
                        p.mat(n("ffn_down.weight"), &[h.ffn, d]);
                    }
                }
                continue;
            }
            _ => p.norm(n("attn_norm.weight"), &[d]),
        }
        match kind.mixer {
            Some(MixerKind::Attention) => {
                // Qwen3.5's q carries a per-head gate: twice the rows.
                let q_rows = if h.gdn.is_some() { 2 * q } else { q };
                let gpt_oss = h.arch == SynthArch::GptOss;
                p.mat(n("attn_q.weight"), &[d, q_rows]);
                if gpt_oss {
                    p.f32(n("attn_q.bias"), &[q_rows], BIAS);
                }
                p.mat(n("attn_k.weight"), &[d, kv]);
                if gpt_oss {
                    p.f32(n("attn_k.bias"), &[kv], BIAS);
                }
                p.mat(n("attn_v.weight"), &[d, kv]);
                if gpt_oss {
                    p.f32(n("attn_v.bias"), &[kv], BIAS);
                }
                if !gpt_oss {
                    p.norm(n("attn_q_norm.weight"), &[h.head_dim]);
                    p.norm(n("attn_k_norm.weight"), &[h.head_dim]);
                }
                p.mat(n("attn_output.weight"), &[q, d]);
                if gpt_oss {
                    p.f32(n("attn_output.bias"), &[d], BIAS);
                    p.f32(
                        n("attn_sinks.weight"),
                        &[h.n_heads],
                        Init::Uniform { lo: -1.0, hi: 1.0 },
                    );
                }
            }
            Some(MixerKind::GatedDeltaNet) => {
                let g = h.gdn.context("GatedDeltaNet layer without sizes")?;
                let (cd, vd, nv) = (g.conv_dim(), g.value_dim(), g.n_v_heads);
                p.mat(n("attn_qkv.weight"), &[d, cd]);
                p.mat(n("attn_gate.weight"), &[d, vd]);
                p.f32(
                    n("ssm_conv1d.weight"),
                    &[g.conv_kernel, cd],
                    Init::Uniform { lo: -0.5, hi: 0.5 },
                );
                p.f32(n("ssm_dt.bias"), &[nv], Init::Uniform { lo: 0.5, hi: 1.5 });
                p.f32(
                    n("ssm_a"),
                    &[nv],
                    Init::Uniform {
                        lo: -16.0,
                        hi: -1.0,
                    },
                );
                p.mat(n("ssm_beta.weight"), &[d, nv]);
                p.mat(n("ssm_alpha.weight"), &[d, nv]);
                p.norm(n("ssm_norm.weight"), &[g.head_dim]);
                p.mat(n("ssm_out.weight"), &[vd, d]);
            }
            Some(MixerKind::ShortConv) => {
                p.f32(
                    n("shortconv.conv.weight"),
                    &[h.shortconv_l, d],
                    Init::Uniform { lo: -0.5, hi: 0.5 },
                );
                p.mat(n("shortconv.in_proj.weight"), &[d, 3 * d]);
                p.mat(n("shortconv.out_proj.weight"), &[d, d]);
            }
            Some(MixerKind::Mamba2) | None => {
                bail!("{}: unexpected layer {kind:?}", h.arch.gguf_name())
            }
        }
        // The FFN's pre-norm: `post_attention_norm` in the Qwen3.5 and gpt-oss files.
        if h.gdn.is_some() || h.arch == SynthArch::GptOss {
            p.norm(n("post_attention_norm.weight"), &[d]);
        } else {
            p.norm(n("ffn_norm.weight"), &[d]);
        }
        match kind.ffn {
            Some(FfnKind::Dense) => {
                p.mat(n("ffn_gate.weight"), &[d, h.ffn]);
                p.mat(n("ffn_up.weight"), &[d, h.ffn]);
                p.mat(n("ffn_down.weight"), &[h.ffn, d]);
            }
            Some(FfnKind::Moe) => {
                let m = h.moe.context("MoE layer without expert sizes")?;
                let (ne, ff) = (m.n_experts, m.d_ff);
                p.router(n("ffn_gate_inp.weight"), &[d, ne]);
                if h.arch == SynthArch::GptOss {
                    p.f32(n("ffn_gate_inp.bias"), &[ne], BIAS);
                    // The released experts are MXFP4 (module docs).
                    let mut mx = |s: &str, dims: &[u64]| {
                        let std = 1.0 / (dims[0] as f32).sqrt();
                        p.push(n(s), dims, GgmlType::MXFP4, Init::Random { std });
                    };
                    mx("ffn_gate_exps.weight", &[d, ff, ne]);
                    mx("ffn_up_exps.weight", &[d, ff, ne]);
                    mx("ffn_down_exps.weight", &[ff, d, ne]);
                    p.f32(n("ffn_gate_exps.bias"), &[ff, ne], BIAS);
                    p.f32(n("ffn_up_exps.bias"), &[ff, ne], BIAS);
                    p.f32(n("ffn_down_exps.bias"), &[d, ne], BIAS);
                } else {
                    p.mat(n("ffn_gate_exps.weight"), &[d, ff, ne]);
                    p.mat(n("ffn_up_exps.weight"), &[d, ff, ne]);
                    p.mat(n("ffn_down_exps.weight"), &[ff, d, ne]);
                }
                if let Some(sff) = m.shared_ff {
                    // [d, 1]: one dimension to llama.cpp, so it stays F32.
                    p.router(n("ffn_gate_inp_shexp.weight"), &[d, 1]);
                    p.mat(n("ffn_gate_shexp.weight"), &[d, sff]);
                    p.mat(n("ffn_up_shexp.weight"), &[d, sff]);
                    p.mat(n("ffn_down_shexp.weight"), &[sff, d]);
                }
            }
            None => bail!("{}: a layer without FFN", h.arch.gguf_name()),
        }
    }
    // LFM2's final norm is `token_embd_norm` in llama.cpp's files.
    if h.arch == SynthArch::Lfm2 {
        p.norm("token_embd_norm.weight".into(), &[d]);
    } else {
        p.norm("output_norm.weight".into(), &[d]);
    }
    if !h.tied_embeddings {
        p.mat("output.weight".into(), &[d, h.vocab]);
    }
    let mut out = p.out;
    assign_types(h, quant, &mut out)?;
    Ok(out)
}

/// Bytes of weights one decode step reads: every tensor, but one row of the token
/// embeddings when the output head is a separate tensor, and of stacked experts only the
/// `n_used` of `n_experts` a token is routed to.
pub fn weight_bytes_per_token(h: &Hparams, plan: &[TensorPlan]) -> u64 {
    plan.iter()
        .map(|t| {
            let n = t.n_bytes().unwrap_or(0);
            if t.name == "token_embd.weight" && !h.tied_embeddings {
                t.ty.row_bytes(t.dims[0]).unwrap_or(0)
            } else if let (true, Some(m)) = (t.is_expert(), h.moe) {
                n / m.n_experts * m.n_used
            } else {
                n
            }
        })
        .sum()
}

/// A byte-level BPE vocabulary in a family's layout ([`TokenLayout`]).
pub struct Vocab {
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` values: 1 normal, 3 control, 4 user-defined, 5 unused.
    pub types: Vec<i32>,
    /// `"left right"`, rank order; merge `i` makes BPE token `256 + i` (id `front + 256 + i`).
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

/// Builds the vocabulary: the layout's front tokens, `n_bpe` BPE tokens, its back tokens,
/// `[PADn]` slots up to `h.vocab`. Merged tokens are at most 12 bytes long, which keeps the
/// vocabulary close to a real one in size; their parts lean towards lowercase letters.
pub fn build_vocab(h: &Hparams) -> Result<Vocab> {
    let lay = &h.tokens;
    let n_front = lay.front.len() as u64;
    let n_back = lay.back.len() as u64;
    if lay.n_bpe < 256 || n_front + lay.n_bpe + n_back > h.vocab {
        bail!(
            "a vocabulary of {} cannot hold {n_front} + {} BPE + {n_back} tokens",
            h.vocab,
            lay.n_bpe
        );
    }
    for id in [lay.bos, lay.eos, lay.pad] {
        if id >= h.vocab {
            bail!(
                "special token id {id} is outside the vocabulary of {}",
                h.vocab
            );
        }
    }
    let n_bpe = lay.n_bpe as usize;
    let vocab = h.vocab as usize;
    let n_pad_from = (n_front + lay.n_bpe + n_back) as usize;
    // The BPE tokens, ids relative to the first of them.
    let mut bpe: Vec<String> = Vec::with_capacity(n_bpe);
    let mut lens: Vec<u8> = Vec::with_capacity(n_bpe);
    let mut seen: HashSet<String> = HashSet::with_capacity(vocab);
    let byte_chars = byte_chars();
    let mut byte_id = [0u32; 256];
    for (i, &(b, c)) in byte_chars.iter().enumerate() {
        byte_id[b as usize] = i as u32;
        bpe.push(c.to_string());
        lens.push(1);
    }
    // Strings the merges must never produce.
    seen.extend(lay.front.iter().cloned());
    seen.extend(lay.back.iter().map(|(t, _)| t.clone()));
    for i in n_pad_from..vocab {
        seen.insert(format!("[PAD{i}]"));
    }
    if seen.len() != lay.front.len() + lay.back.len() + (vocab - n_pad_from) {
        bail!("the special tokens are not distinct");
    }
    seen.extend(bpe.iter().cloned());
    const MAX_LEN: u8 = 12;
    // Ids of tokens short enough to extend.
    let mut short: Vec<u32> = (0..256).collect();
    let mut rng = Rng::new(0x5eed_70c3_4a11_0001);
    let mut merges = Vec::with_capacity(n_bpe - 256);
    let mut attempts = 0u64;
    while bpe.len() < n_bpe {
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
        let (l, rt) = (&bpe[left as usize], &bpe[right as usize]);
        let mut s = String::with_capacity(l.len() + rt.len());
        s.push_str(l);
        s.push_str(rt);
        if seen.contains(&s) {
            continue;
        }
        merges.push(format!("{l} {rt}"));
        seen.insert(s.clone());
        if len < MAX_LEN {
            short.push(bpe.len() as u32);
        }
        bpe.push(s);
        lens.push(len);
    }
    let mut tokens: Vec<String> = Vec::with_capacity(vocab);
    let mut types: Vec<i32> = Vec::with_capacity(vocab);
    tokens.extend(lay.front.iter().cloned());
    types.extend(lay.front.iter().map(|_| 3));
    tokens.extend(bpe);
    types.resize(tokens.len(), 1);
    for (t, ty) in &lay.back {
        tokens.push(t.clone());
        types.push(*ty);
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

/// All metadata keys, in the order llama.cpp's converter writes them (general keys, the
/// architecture's hyperparameters, the tokenizer).
pub fn metadata(h: &Hparams, quant: Quant, seed: u64) -> Result<Vec<(String, GgufValue)>> {
    let a = h.arch.gguf_name();
    let (basename, license) = h.arch.family();
    let u = |n: u64| GgufValue::U32(n as u32);
    let k = |s: &str| format!("{a}.{s}");
    let mut m: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), a.into()),
        ("general.type".into(), "model".into()),
        (
            "general.name".into(),
            format!("{basename} {}", h.size_label).into(),
        ),
        (
            "general.description".into(),
            format!(
                "random weights with {basename} {}'s shapes (caldera synth, seed {seed}); \
                 not a trained model",
                h.size_label
            )
            .into(),
        ),
        ("general.basename".into(), basename.into()),
        ("general.size_label".into(), h.size_label.into()),
        ("general.license".into(), license.into()),
        (k("block_count"), u(h.n_layers() as u64)),
        (k("context_length"), GgufValue::U32(h.context)),
        (k("embedding_length"), u(h.d_model)),
    ];
    // Per-layer arrays (Nemotron-H, LFM2): zeros mark layers without that block.
    let per_layer = |f: &dyn Fn(&LayerKind) -> u64| -> GgufValue {
        let v: Vec<i32> = h.layers.iter().map(|l| f(l) as i32).collect();
        GgufValue::i32_array(&v)
    };
    match h.arch {
        SynthArch::NemotronH => m.push((
            k("feed_forward_length"),
            per_layer(&|l| if l.ffn.is_some() { h.ffn } else { 0 }),
        )),
        _ if h.ffn > 0 => m.push((k("feed_forward_length"), u(h.ffn))),
        _ => {}
    }
    m.push((k("attention.head_count"), u(h.n_heads)));
    let attn_kv = |l: &LayerKind| {
        if l.mixer == Some(MixerKind::Attention) {
            h.n_kv_heads
        } else {
            0
        }
    };
    match h.arch {
        SynthArch::NemotronH | SynthArch::Lfm2 => {
            m.push((k("attention.head_count_kv"), per_layer(&attn_kv)))
        }
        _ => m.push((k("attention.head_count_kv"), u(h.n_kv_heads))),
    }
    if h.rope_dims > 0 {
        m.push((k("rope.freq_base"), GgufValue::F32(h.rope_theta)));
    }
    m.push((
        k("attention.layer_norm_rms_epsilon"),
        GgufValue::F32(h.rms_eps),
    ));
    // Nemotron-H's config also has `layer_norm_epsilon`, which the converter writes and
    // llama.cpp's nemotron_h loader requires.
    if h.arch == SynthArch::NemotronH {
        m.push((k("attention.layer_norm_epsilon"), GgufValue::F32(h.rms_eps)));
    }
    m.push((k("attention.key_length"), u(h.head_dim)));
    m.push((k("attention.value_length"), u(h.head_dim)));
    if h.rope_dims > 0 && h.rope_dims != h.head_dim {
        m.push((k("rope.dimension_count"), u(h.rope_dims)));
    }
    if let Some(sections) = h.rope_sections {
        m.push((
            k("rope.dimension_sections"),
            GgufValue::Array(GgufArray::new(
                GgufValueType::I32,
                sections.iter().map(|&s| GgufValue::I32(s)).collect(),
            )),
        ));
    }
    if let Some(e) = h.moe {
        m.push((k("expert_count"), u(e.n_experts)));
        m.push((k("expert_used_count"), u(e.n_used)));
        m.push((k("expert_feed_forward_length"), u(e.d_ff)));
        if let Some(s) = e.shared_ff {
            m.push((k("expert_shared_feed_forward_length"), u(s)));
        }
    }
    if let Some(g) = h.gdn {
        m.push((k("ssm.conv_kernel"), u(g.conv_kernel)));
        m.push((k("ssm.state_size"), u(g.head_dim)));
        m.push((k("ssm.group_count"), u(g.n_k_heads)));
        m.push((k("ssm.time_step_rank"), u(g.n_v_heads)));
        m.push((k("ssm.inner_size"), u(g.value_dim())));
        m.push((k("full_attention_interval"), u(4)));
    }
    if let Some(s) = h.mamba {
        m.push((k("ssm.conv_kernel"), u(s.conv_kernel)));
        m.push((k("ssm.state_size"), u(s.d_state)));
        m.push((k("ssm.group_count"), u(s.n_groups)));
        m.push((k("ssm.inner_size"), u(s.d_inner())));
        m.push((k("ssm.time_step_rank"), u(s.n_heads)));
    }
    if h.shortconv_l > 0 {
        m.push((k("shortconv.l_cache"), u(h.shortconv_l)));
    }
    if h.sliding_window > 0 {
        m.push((k("attention.sliding_window"), u(h.sliding_window)));
    }
    if let Some((factor, orig)) = h.yarn {
        m.push((k("rope.scaling.type"), "yarn".into()));
        m.push((k("rope.scaling.factor"), GgufValue::F32(factor)));
        m.push((
            k("rope.scaling.original_context_length"),
            GgufValue::U32(orig),
        ));
    }
    if matches!(h.arch, SynthArch::NemotronH | SynthArch::Lfm2) {
        m.push((k("vocab_size"), u(h.vocab)));
    }
    m.push((
        "general.file_type".into(),
        GgufValue::U32(quant.file_type()),
    ));
    let v = build_vocab(h)?;
    let lay = &h.tokens;
    let id = |n: u64| GgufValue::U32(n as u32);
    m.extend([
        ("tokenizer.ggml.model".into(), "gpt2".into()),
        ("tokenizer.ggml.pre".into(), lay.pre.into()),
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
        ("tokenizer.ggml.eos_token_id".into(), id(lay.eos)),
        ("tokenizer.ggml.padding_token_id".into(), id(lay.pad)),
        ("tokenizer.ggml.bos_token_id".into(), id(lay.bos)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(lay.add_bos),
        ),
        ("tokenizer.chat_template".into(), lay.template.into()),
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
        (GgmlType::F32, init) => {
            let mut value = || -> f32 {
                let u = rng.unit();
                match init {
                    Init::Norm => 1.0 + 0.1 * (u - 0.5),
                    // Uniform with this standard deviation.
                    Init::Random { std } => (u - 0.5) * std * 12f32.sqrt(),
                    Init::Uniform { lo, hi } => lo + (hi - lo) * u,
                }
            };
            let mut buf = Vec::with_capacity(CHUNK);
            let mut left = n;
            while left > 0 {
                let k = left.min((CHUNK / 4) as u64);
                buf.clear();
                for _ in 0..k {
                    buf.extend_from_slice(&value().to_le_bytes());
                }
                w.write_all(&buf)?;
                progress(buf.len() as u64);
                left -= k;
            }
            Ok(())
        }
        (GgmlType::MXFP4, Init::Random { std }) => {
            // Elements are 2^(e-128) times doubled E2M1 values (RMS 5.852 over random
            // codes); e is e0 or e0 + 1 with the odds that give `std` on average.
            let x = (std / 5.852).log2() + 128.0;
            let e0 = x.floor();
            let p_up = (4f32.powf(x - e0) - 1.0) / 3.0;
            let e0 = e0.clamp(0.0, 253.0) as u8;
            let bs = GgmlType::MXFP4.type_size();
            let per_chunk = CHUNK / bs;
            let mut buf = vec![0u8; per_chunk * bs];
            let mut left = n / GgmlType::MXFP4.block_size() as u64;
            while left > 0 {
                let k = left.min(per_chunk as u64) as usize;
                let buf = &mut buf[..k * bs];
                rng.fill(buf);
                for block in buf.chunks_exact_mut(bs) {
                    block[0] = e0 + u8::from(rng.unit() < p_up);
                }
                w.write_all(buf)?;
                progress(buf.len() as u64);
                left -= k as u64;
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
    /// Weight bytes one decode step reads (MoE: only the experts a token uses).
    pub weight_bytes_per_token: u64,
    /// Bytes of all tensor data.
    pub weight_bytes: u64,
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
    let h = hparams(arch, shape)?;
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
        weight_bytes: total,
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
    let h = hparams(a.arch, a.shape)?;
    let w = write_model(&a.output, a.arch, a.shape, a.quant, a.seed, true)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {}: {} {} {}, {} tensors, {} bytes ({}) in {secs:.1}s ({:.0} MB/s)",
        a.output.display(),
        h.arch.gguf_name(),
        h.size_label,
        a.quant.name(),
        w.tensors,
        w.file_size,
        human(w.file_size),
        w.file_size as f64 / 1e6 / secs.max(1e-9),
    );
    let moe_note = match h.moe {
        Some(m) => format!(
            ": the {} of {} experts a token uses, not all ({} of weights in all)",
            m.n_used,
            m.n_experts,
            human(w.weight_bytes)
        ),
        None => String::new(),
    };
    eprintln!(
        "weight bytes read per decoded token: {} ({}){moe_note}",
        w.weight_bytes_per_token,
        human(w.weight_bytes_per_token)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use caldera_cpu::{CpuBackend, Logits};
    use caldera_format::gguf::GgufFile;
    use caldera_model::{FfnSpec, Mixer, Model};
    use caldera_tokenizer::{ChatTemplate, Tokenizer};

    use super::*;

    const QUANTS: [Quant; 3] = [Quant::Q4_0, Quant::Q4KM, Quant::Q8_0];

    fn count(plan: &[TensorPlan], ty: GgmlType) -> usize {
        plan.iter().filter(|t| t.ty == ty).count()
    }

    fn get<'a>(plan: &'a [TensorPlan], name: &str) -> &'a TensorPlan {
        plan.iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn params(plan: &[TensorPlan]) -> u64 {
        plan.iter().map(|t| t.n_elements()).sum()
    }

    /// Parameters counted as active: all but the experts a token does not use.
    fn active_params(h: &Hparams, plan: &[TensorPlan]) -> u64 {
        plan.iter()
            .map(|t| match (t.is_expert(), h.moe) {
                (true, Some(m)) => t.n_elements() / m.n_experts * m.n_used,
                _ => t.n_elements(),
            })
            .sum()
    }

    fn near(x: u64, want: f64, tol: f64) -> bool {
        (x as f64 / want - 1.0).abs() < tol
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
        let h = hparams(SynthArch::Qwen3, Shape::B8).unwrap();
        assert_eq!(
            (
                h.d_model,
                h.n_layers(),
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
        let get = |n: &str| get(&plan, n);
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
        for &shape in SynthArch::Qwen3.shapes() {
            let h = hparams(SynthArch::Qwen3, shape).unwrap();
            for quant in QUANTS {
                let plan = plan(&h, quant).unwrap();
                let has_output = plan.iter().any(|t| t.name == "output.weight");
                assert_eq!(has_output, shape != Shape::B0_6);
                assert_eq!(plan.len(), 1 + 11 * h.n_layers() + 1 + has_output as usize);
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
                        _ => {
                            let more = layer_of(&t.name).is_some_and(|l| {
                                use_more_bits(l, h.n_layers())
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
        let h = hparams(SynthArch::Qwen3, Shape::B32).unwrap();
        let data: u64 = plan(&h, Quant::Q4KM)
            .unwrap()
            .iter()
            .map(|t| t.n_bytes().unwrap())
            .sum();
        let gib = (data as f64 + 6e6) / (1u64 << 30) as f64;
        assert!((gib / 18.40 - 1.0).abs() < 5e-3, "{gib}");
    }

    #[test]
    fn shapes_an_arch_lacks_are_errors() {
        assert!(hparams(SynthArch::Qwen3, Shape::B20).is_err());
        assert!(hparams(SynthArch::GptOss, Shape::B8).is_err());
        let e = hparams(SynthArch::Lfm2, Shape::B27)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2.6b"), "{e}");
        for arch in SynthArch::ALL {
            assert!(hparams(arch, Shape::Tiny).is_ok());
            for &s in arch.shapes() {
                let h = hparams(arch, s).unwrap();
                for quant in QUANTS.into_iter().chain([Quant::Mxfp4Moe]) {
                    let p = plan(&h, quant).unwrap();
                    let names: HashSet<&str> = p.iter().map(|t| t.name.as_str()).collect();
                    assert_eq!(names.len(), p.len(), "{arch:?}");
                    assert!(p.iter().all(|t| t.n_bytes().is_some()), "{arch:?}");
                }
            }
        }
    }

    #[test]
    fn fallbacks_are_llama_cpps() {
        assert_eq!(fallback("w", 320, GgmlType::Q4_K).unwrap(), GgmlType::Q5_0);
        assert_eq!(fallback("w", 320, GgmlType::Q6_K).unwrap(), GgmlType::Q8_0);
        assert_eq!(fallback("w", 512, GgmlType::Q4_K).unwrap(), GgmlType::Q4_K);
        assert!(fallback("w", 40, GgmlType::Q4_0).is_err());
        assert!(fallback("w", 48, GgmlType::Q4_K).is_err());
        // Not quantized: 1-D (trailing 1s do not count), norms, routers, conv kernels.
        assert!(allows_quantization("blk.0.ffn_up_exps.weight", &[8, 8, 4]));
        assert!(!allows_quantization(
            "blk.0.ffn_gate_inp_shexp.weight",
            &[8, 1]
        ));
        assert!(!allows_quantization("blk.0.ffn_gate_inp.weight", &[8, 4]));
        assert!(!allows_quantization("blk.0.ssm_conv1d.weight", &[4, 8]));
        assert!(!allows_quantization("blk.0.shortconv.conv.weight", &[3, 8]));
        assert!(!allows_quantization("blk.0.ssm_norm.weight", &[8, 2]));
        assert!(!allows_quantization("blk.0.ssm_a", &[1, 8]));
        assert!(!allows_quantization("blk.0.ffn_gate_exps.bias", &[8, 4]));
    }

    #[test]
    fn qwen3moe_30b_a3b() {
        let h = hparams(SynthArch::Qwen3moe, Shape::B30A3).unwrap();
        let plan = plan(&h, Quant::Q4KM).unwrap();
        // Qwen3-30B-A3B's model card: 30.5B parameters, 3.3B activated.
        assert!(near(params(&plan), 30.5e9, 0.01), "{}", params(&plan));
        assert!(near(active_params(&h, &plan), 3.3e9, 0.03));
        assert_eq!(plan.len(), 1 + 48 * 12 + 2);
        let g = |n: &str| get(&plan, n);
        assert_eq!(g("blk.0.ffn_gate_exps.weight").dims, [2048, 768, 128]);
        assert_eq!(g("blk.0.ffn_down_exps.weight").dims, [768, 2048, 128]);
        assert_eq!(g("blk.0.ffn_gate_inp.weight").ty, GgmlType::F32);
        assert_eq!(g("blk.0.ffn_gate_inp.weight").dims, [2048, 128]);
        assert_eq!(g("blk.0.attn_q.weight").dims, [2048, 4096]);
        assert_eq!(g("blk.0.attn_k.weight").dims, [2048, 512]);
        for l in 0..48 {
            let more = use_more_bits(l, 48);
            let want = |yes| if yes { GgmlType::Q6_K } else { GgmlType::Q4_K };
            let t = |s: &str| g(&format!("blk.{l}.{s}")).ty;
            assert_eq!(t("ffn_down_exps.weight"), want(more), "{l}");
            assert_eq!(t("attn_v.weight"), want(more), "{l}");
            assert_eq!(t("ffn_up_exps.weight"), GgmlType::Q4_K);
        }
        // A token reads 8 of the 128 experts.
        let experts: u64 = plan
            .iter()
            .filter(|t| t.is_expert())
            .map(|t| t.n_bytes().unwrap())
            .sum();
        let all: u64 = plan.iter().map(|t| t.n_bytes().unwrap()).sum();
        let emb = g("token_embd.weight");
        assert_eq!(
            weight_bytes_per_token(&h, &plan),
            all - experts + experts / 16 - emb.n_bytes().unwrap() + emb.ty.row_bytes(2048).unwrap()
        );
    }

    #[test]
    fn qwen35_27b() {
        let h = hparams(SynthArch::Qwen35, Shape::B27).unwrap();
        let plan = plan(&h, Quant::Q4KM).unwrap();
        // The text model's parameters (the released 27.8B include vision and MTP).
        assert!(near(params(&plan), 26.9e9, 0.01), "{}", params(&plan));
        let g = |n: &str| get(&plan, n);
        // Layer 3 is full attention: q with its gate, head_dim 256.
        assert_eq!(g("blk.3.attn_q.weight").dims, [5120, 12288]);
        assert_eq!(g("blk.3.attn_k.weight").dims, [5120, 1024]);
        assert_eq!(g("blk.3.attn_output.weight").dims, [6144, 5120]);
        assert_eq!(g("blk.3.attn_q_norm.weight").dims, [256]);
        // Layer 0 is GatedDeltaNet: q, k (16 x 128 each) and v (48 x 128).
        assert_eq!(g("blk.0.attn_qkv.weight").dims, [5120, 10240]);
        assert_eq!(g("blk.0.attn_gate.weight").dims, [5120, 6144]);
        assert_eq!(g("blk.0.ssm_conv1d.weight").dims, [4, 10240]);
        assert_eq!(g("blk.0.ssm_conv1d.weight").ty, GgmlType::F32);
        assert_eq!(g("blk.0.ssm_beta.weight").dims, [5120, 48]);
        assert_eq!(g("blk.0.ssm_beta.weight").ty, GgmlType::Q4_K);
        assert_eq!(g("blk.0.ssm_a").ty, GgmlType::F32);
        assert_eq!(g("blk.0.ssm_norm.weight").dims, [128]);
        assert_eq!(g("blk.0.ssm_out.weight").dims, [6144, 5120]);
        assert!(plan.iter().all(|t| !t.name.starts_with("blk.0.attn_q.")));
        // attn_qkv counts as attention-v-like: one per layer, so the index is the layer.
        for l in 0..64 {
            let name = if (l + 1) % 4 == 0 {
                format!("blk.{l}.attn_v.weight")
            } else {
                format!("blk.{l}.attn_qkv.weight")
            };
            let want = if use_more_bits(l, 64) {
                GgmlType::Q6_K
            } else {
                GgmlType::Q4_K
            };
            assert_eq!(g(&name).ty, want, "{name}");
        }
        let meta: HashMap<String, GgufValue> =
            metadata(&h, Quant::Q4KM, 0).unwrap().into_iter().collect();
        assert_eq!(meta["qwen35.ssm.inner_size"].as_u64(), Some(6144));
        assert_eq!(meta["qwen35.ssm.time_step_rank"].as_u64(), Some(48));
        assert_eq!(meta["qwen35.rope.dimension_count"].as_u64(), Some(64));
        assert_eq!(
            meta["qwen35.rope.dimension_sections"].as_i64_array(),
            Some(vec![11, 11, 10, 0])
        );
        assert_eq!(meta["tokenizer.ggml.eos_token_id"].as_u64(), Some(248_046));
    }

    #[test]
    fn qwen35moe_35b_a3b() {
        let h = hparams(SynthArch::Qwen35moe, Shape::B35A3).unwrap();
        let plan = plan(&h, Quant::Q4KM).unwrap();
        assert!(near(params(&plan), 34.66e9, 0.01), "{}", params(&plan));
        // "A3B": 3.45B by this count (embeddings included).
        let active = active_params(&h, &plan);
        assert!(near(active, 3.45e9, 0.02), "{active}");
        let g = |n: &str| get(&plan, n);
        assert_eq!(g("blk.0.ffn_gate_exps.weight").dims, [2048, 512, 256]);
        assert_eq!(g("blk.0.ffn_gate_inp_shexp.weight").dims, [2048, 1]);
        assert_eq!(g("blk.0.ffn_gate_inp_shexp.weight").ty, GgmlType::F32);
        assert_eq!(g("blk.0.ffn_down_shexp.weight").dims, [512, 2048]);
        assert_eq!(g("blk.0.ffn_down_shexp.weight").ty, GgmlType::Q6_K);
        assert_eq!(g("blk.5.ffn_down_shexp.weight").ty, GgmlType::Q4_K);
        assert_eq!(g("blk.0.attn_qkv.weight").dims, [2048, 8192]);
        assert_eq!(g("blk.3.attn_q.weight").dims, [2048, 8192]);
        assert!(plan.iter().all(|t| t.name != "blk.0.ffn_up.weight"));
    }

    #[test]
    fn nemotron_h_8b() {
        let h = hparams(SynthArch::NemotronH, Shape::B8).unwrap();
        let kinds = |k: LayerKind| h.layers.iter().filter(|&&l| l == k).count();
        let mamba = LayerKind {
            mixer: Some(MixerKind::Mamba2),
            ffn: None,
        };
        let attn = LayerKind {
            mixer: Some(MixerKind::Attention),
            ffn: None,
        };
        let mlp = LayerKind {
            mixer: None,
            ffn: Some(FfnKind::Dense),
        };
        assert_eq!((kinds(mamba), kinds(attn), kinds(mlp)), (24, 4, 24));
        let plan = plan(&h, Quant::Q4KM).unwrap();
        assert!(near(params(&plan), 8.1e9, 0.02), "{}", params(&plan));
        let g = |n: &str| get(&plan, n);
        assert_eq!(
            g("blk.0.ssm_in.weight").dims,
            [4096, 2 * 8192 + 2 * 8 * 128 + 128]
        );
        assert_eq!(g("blk.0.ssm_conv1d.weight").dims, [4, 8192 + 2048]);
        assert_eq!(g("blk.0.ssm_a").dims, [1, 128]);
        assert_eq!(g("blk.0.ssm_norm.weight").dims, [1024, 8]);
        assert_eq!(g("blk.0.ssm_out.weight").dims, [8192, 4096]);
        assert_eq!(g("blk.1.ffn_up.weight").dims, [4096, 21504]);
        assert_eq!(g("blk.7.attn_q.weight").dims, [4096, 4096]);
        // attn_v: 4 of them, the last two get more bits.
        let v: Vec<GgmlType> = plan
            .iter()
            .filter(|t| t.name.ends_with("attn_v.weight"))
            .map(|t| t.ty)
            .collect();
        assert_eq!(
            v,
            [
                GgmlType::Q4_K,
                GgmlType::Q4_K,
                GgmlType::Q6_K,
                GgmlType::Q6_K
            ]
        );
        // ffn_down: counted among the 24 MLP layers, over 52 layers.
        let downs: Vec<GgmlType> = plan
            .iter()
            .filter(|t| t.name.ends_with("ffn_down.weight"))
            .map(|t| t.ty)
            .collect();
        for (i, ty) in downs.iter().enumerate() {
            let want = if use_more_bits(i, 52) {
                GgmlType::Q6_K
            } else {
                GgmlType::Q4_K
            };
            assert_eq!(*ty, want, "{i}");
        }
        let meta: HashMap<String, GgufValue> =
            metadata(&h, Quant::Q4KM, 0).unwrap().into_iter().collect();
        let kv = meta["nemotron_h.attention.head_count_kv"]
            .as_i64_array()
            .unwrap();
        assert_eq!(kv[7], 8);
        assert_eq!(kv[0] + kv[1], 0);
        assert!(!meta.contains_key("nemotron_h.rope.freq_base"));
    }

    #[test]
    fn lfm2_2_6b() {
        let h = hparams(SynthArch::Lfm2, Shape::B2_6).unwrap();
        let plan = plan(&h, Quant::Q4KM).unwrap();
        // The LFM2-2.6B model card: 2.57B parameters.
        assert!(near(params(&plan), 2.57e9, 0.01), "{}", params(&plan));
        let g = |n: &str| get(&plan, n);
        assert!(plan.iter().all(|t| t.name != "output.weight"));
        assert_eq!(g("token_embd.weight").ty, GgmlType::Q6_K);
        assert_eq!(g("token_embd_norm.weight").dims, [2048]);
        assert_eq!(g("blk.0.shortconv.conv.weight").dims, [3, 2048]);
        assert_eq!(g("blk.0.shortconv.in_proj.weight").dims, [2048, 6144]);
        assert_eq!(g("blk.2.attn_k.weight").dims, [2048, 512]);
        assert_eq!(g("blk.2.attn_v.weight").ty, GgmlType::Q6_K);
        assert_eq!(g("blk.6.attn_v.weight").ty, GgmlType::Q4_K);
        assert_eq!(g("blk.14.attn_v.weight").ty, GgmlType::Q6_K);
        // A tied head: the whole embedding table is read per token.
        let all: u64 = plan.iter().map(|t| t.n_bytes().unwrap()).sum();
        assert_eq!(weight_bytes_per_token(&h, &plan), all);
    }

    #[test]
    fn gpt_oss_20b() {
        let h = hparams(SynthArch::GptOss, Shape::B20).unwrap();
        for quant in QUANTS.into_iter().chain([Quant::Mxfp4Moe]) {
            let plan = plan(&h, quant).unwrap();
            // gpt-oss-20b: 20.9B parameters, 3.6B active (without the embedding table).
            assert!(near(params(&plan), 20.9e9, 0.01), "{}", params(&plan));
            let emb = get(&plan, "token_embd.weight").n_elements();
            assert!(near(active_params(&h, &plan) - emb, 3.6e9, 0.01));
            let g = |n: &str| get(&plan, n);
            for e in ["gate", "up", "down"] {
                let t = g(&format!("blk.0.ffn_{e}_exps.weight"));
                assert_eq!(t.ty, GgmlType::MXFP4, "{quant:?}");
                let b = g(&format!("blk.0.ffn_{e}_exps.bias"));
                assert_eq!(b.ty, GgmlType::F32);
            }
            assert_eq!(g("blk.0.ffn_down_exps.weight").dims, [2880, 2880, 32]);
            assert_eq!(g("blk.0.attn_sinks.weight").dims, [64]);
            assert_eq!(g("blk.0.attn_q.bias").dims, [4096]);
            // 2880 fits no K-quant block: Q4_K falls back to Q5_0, Q6_K to Q8_0.
            let (q, v0, v4, o, head, emb) = (
                g("blk.0.attn_q.weight").ty,
                g("blk.0.attn_v.weight").ty,
                g("blk.4.attn_v.weight").ty,
                g("blk.0.attn_output.weight").ty,
                g("output.weight").ty,
                g("token_embd.weight").ty,
            );
            use GgmlType::*;
            let want = match quant {
                Quant::Q4KM => (Q5_0, Q8_0, Q5_0, Q4_K, Q8_0, Q5_0),
                Quant::Q4_0 => (Q4_0, Q4_0, Q4_0, Q4_0, Q8_0, Q4_0),
                Quant::Q8_0 | Quant::Mxfp4Moe => (Q8_0, Q8_0, Q8_0, Q8_0, Q8_0, Q8_0),
            };
            assert_eq!((q, v0, v4, o, head, emb), want, "{quant:?}");
        }
        // The MXFP4_MOE file: 12.1 GB as released by ggml-org (metadata included).
        let plan = plan(&h, Quant::Mxfp4Moe).unwrap();
        let data: u64 = plan.iter().map(|t| t.n_bytes().unwrap()).sum();
        assert!(near(data, 12.1e9, 0.01), "{data}");
        let meta: HashMap<String, GgufValue> = metadata(&h, Quant::Mxfp4Moe, 0)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(meta["general.file_type"].as_u64(), Some(38));
        assert_eq!(meta["gpt-oss.attention.sliding_window"].as_u64(), Some(128));
        assert_eq!(meta["gpt-oss.rope.scaling.type"].as_str(), Some("yarn"));
        assert_eq!(meta["tokenizer.ggml.eos_token_id"].as_u64(), Some(200_002));
        assert_eq!(meta["tokenizer.ggml.pre"].as_str(), Some("gpt-4o"));
    }

    /// Dequantized random blocks: finite, about the asked standard deviation, centred.
    #[test]
    fn random_blocks_are_finite_scaled_and_deterministic() {
        for ty in [
            GgmlType::F32,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::MXFP4,
        ] {
            for std in [0.03f32, 0.0186] {
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
        }
        let f32s = |init| {
            let t = TensorPlan {
                name: "n".into(),
                dims: vec![300],
                ty: GgmlType::F32,
                init,
            };
            let mut v = Vec::new();
            fill_tensor(&mut v, &t, 1, &|_| {}).unwrap();
            assert_eq!(v.len(), 1200);
            v.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<f32>>()
        };
        assert!(f32s(Init::Norm).iter().all(|x| (0.94..=1.06).contains(x)));
        let u = f32s(Init::Uniform {
            lo: -16.0,
            hi: -1.0,
        });
        assert!(u.iter().all(|x| (-16.0..-1.0).contains(x)));
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

    fn check_vocab(h: &Hparams) -> Vocab {
        let v = build_vocab(h).unwrap();
        let lay = &h.tokens;
        let front = lay.front.len();
        assert_eq!(v.tokens.len() as u64, h.vocab);
        assert_eq!(v.types.len() as u64, h.vocab);
        assert_eq!(v.merges.len() as u64, lay.n_bpe - 256);
        let ids: HashMap<&str, usize> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        assert_eq!(ids.len(), v.tokens.len(), "duplicate token strings");
        for (i, m) in v.merges.iter().enumerate() {
            let (l, r) = m.split_once(' ').unwrap();
            assert!(!r.contains(' '));
            let id = front + 256 + i;
            assert!(ids[l] < id && ids[r] < id, "{m}");
            assert!(ids[l] >= front && ids[r] >= front, "{m}");
            assert_eq!(v.tokens[id], format!("{l}{r}"));
        }
        let bpe = front..front + lay.n_bpe as usize;
        assert!(v.types[..front].iter().all(|&t| t == 3));
        assert!(v.types[bpe.clone()].iter().all(|&t| t == 1));
        assert!(v.tokens[bpe]
            .iter()
            .all(|t| t.chars().count() <= 12 || t.starts_with('[') || t.starts_with('<')));
        v
    }

    #[test]
    fn vocab_layouts_are_the_families() {
        for shape in [Shape::Tiny, Shape::B0_6] {
            let h = hparams(SynthArch::Qwen3, shape).unwrap();
            let v = check_vocab(&h);
            let n = h.tokens.n_bpe as usize;
            assert_eq!(v.tokens[n], "<|endoftext|>");
            assert_eq!(v.tokens[n + 2], "<|im_end|>");
            assert_eq!(v.types[n..n + 3], [3, 3, 3]);
            assert_eq!(v.types[n + 14], 4); // <tool_call>
            assert!(v.types[n + 26..].iter().all(|&t| t == 5));
        }
        let h = hparams(SynthArch::Qwen3, Shape::B8).unwrap();
        let v = build_vocab(&h).unwrap();
        assert_eq!(v.tokens[151_645], "<|im_end|>");
        assert_eq!(v.tokens[151_668], "</think>");
        assert_eq!(v.tokens[151_935], "[PAD151935]");
        // Qwen3.5: the same added tokens from 248044 (<|im_end|> 248046, image pad 248056).
        let t = hparams(SynthArch::Qwen35, Shape::B27).unwrap().tokens;
        assert_eq!((t.n_bpe, t.eos, t.pre), (248_044, 248_046, "qwen35"));
        assert_eq!(t.back[12].0, "<|image_pad|>");
        // gpt-oss (o200k_harmony).
        let t = harmony_tokens(199_998, 201_088);
        let id = |name: &str| t.n_bpe + t.back.iter().position(|(s, _)| s == name).unwrap() as u64;
        assert_eq!(id("<|startoftext|>"), 199_998);
        assert_eq!(id("<|return|>"), 200_002);
        assert_eq!(id("<|start|>"), 200_006);
        assert_eq!(id("<|message|>"), 200_008);
        assert_eq!(id("<|call|>"), 200_012);
        assert_eq!(id("<|reserved_201087|>"), 201_087);
        assert_eq!((t.bos, t.eos, t.pad), (199_998, 200_002, 199_999));
        // LFM2 and Nemotron-H put their control tokens first.
        for arch in [SynthArch::Lfm2, SynthArch::NemotronH, SynthArch::GptOss] {
            let h = hparams(arch, Shape::Tiny).unwrap();
            let v = check_vocab(&h);
            assert_eq!(v.types[h.tokens.eos as usize], 3, "{arch:?}");
        }
        let h = hparams(SynthArch::Lfm2, Shape::Tiny).unwrap();
        let v = build_vocab(&h).unwrap();
        assert_eq!(v.tokens[1], "<|startoftext|>");
        assert_eq!(v.tokens[7], "<|im_end|>");
        assert_eq!(v.tokens[31], "<|reserved_31|>");
        let h = hparams(SynthArch::NemotronH, Shape::Tiny).unwrap();
        let v = build_vocab(&h).unwrap();
        assert_eq!(v.tokens[..3], ["<unk>", "<s>", "</s>"]);
    }

    /// The full-size vocabulary and template as a GGUF file, read back by caldera's tokenizer.
    #[test]
    fn tokenizer_loads_and_round_trips() {
        let h = hparams(SynthArch::Qwen3, Shape::B0_6).unwrap();
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

    /// The layer kinds caldera built, in synth's terms.
    fn built_kinds(model: &Model) -> Vec<LayerKind> {
        model
            .config
            .layers
            .iter()
            .map(|s| LayerKind {
                mixer: s.mixer.as_ref().map(|m| match m {
                    Mixer::Attention(_) => MixerKind::Attention,
                    Mixer::GatedDeltaNet(_) => MixerKind::GatedDeltaNet,
                    Mixer::Mamba2(_) => MixerKind::Mamba2,
                    Mixer::ShortConv(_) => MixerKind::ShortConv,
                }),
                ffn: s.ffn.as_ref().map(|f| match f {
                    FfnSpec::Dense { .. } => FfnKind::Dense,
                    FfnSpec::Moe(_) => FfnKind::Moe,
                }),
            })
            .collect()
    }

    /// The tiny shape of every architecture, for each file type: the file loads as a model
    /// of that architecture with the planned layer kinds and tensor types, its tokenizer
    /// loads, and the CPU backend runs a 4-token prompt and two decode steps with finite,
    /// varied logits.
    #[test]
    fn tiny_models_of_every_arch_load_and_run() {
        let dir = std::env::temp_dir().join(format!("caldera-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for arch in SynthArch::ALL {
            let h = hparams(arch, Shape::Tiny).unwrap();
            let mut quants = QUANTS.to_vec();
            if h.moe.is_some() {
                quants.push(Quant::Mxfp4Moe);
            }
            for quant in quants {
                let what = format!("{arch:?} {quant:?}");
                let path = dir.join(format!("tiny-{arch:?}-{quant:?}.gguf"));
                let written = write_model(&path, arch, Shape::Tiny, quant, 3, false).unwrap();
                assert_eq!(written.file_size, std::fs::metadata(&path).unwrap().len());
                let plan = plan(&h, quant).unwrap();
                let g = GgufFile::open(&path).unwrap();
                assert_eq!(g.tensors().len(), plan.len());
                for (t, p) in g.tensors().iter().zip(&plan) {
                    assert_eq!((&t.name, &t.dims, t.ty), (&p.name, &p.dims, p.ty), "{what}");
                }
                let tok = Tokenizer::from_gguf(&g).unwrap();
                assert_eq!(tok.eos_id(), Some(h.tokens.eos as u32), "{what}");
                let (_, model) = Model::open(&path).unwrap();
                assert_eq!(model.config.arch, arch.gguf_name());
                assert_eq!(model.config.vocab_size, 1000);
                assert_eq!(built_kinds(&model), h.layers, "{what}");
                if let (Some(m), Some(FfnSpec::Moe(spec))) = (
                    h.moe,
                    model.config.layers.iter().find_map(|l| l.ffn.as_ref()),
                ) {
                    assert_eq!(
                        (spec.n_experts, spec.n_used, spec.d_ff, spec.shared_d_ff),
                        (
                            m.n_experts as usize,
                            m.n_used as usize,
                            m.d_ff as usize,
                            m.shared_ff.map(|s| s as usize)
                        ),
                        "{what}"
                    );
                }
                if arch == SynthArch::GptOss {
                    let windows: Vec<Option<usize>> = model
                        .config
                        .layers
                        .iter()
                        .map(|l| l.attention().unwrap().window)
                        .collect();
                    assert_eq!(windows, [Some(8), None, Some(8), None]);
                }
                let ids = tok.encode("hello world, tiny", true, false).unwrap();
                let ids = &ids[..ids.len().min(4)];
                let be = CpuBackend::new(Arc::new(model), 1);
                let mut s = be.new_session(32).unwrap();
                let mut out = Vec::new();
                be.forward(&mut s, ids, Logits::All, &mut out).unwrap();
                assert_eq!(out.len(), ids.len() * 1000, "{what}");
                let mut next = ids[ids.len() - 1];
                for _ in 0..2 {
                    let last = out[out.len() - 1000..].to_vec();
                    assert!(last.iter().all(|v| v.is_finite()), "{what}");
                    let mean = last.iter().sum::<f32>() / 1000.0;
                    let var = last.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 1000.0;
                    assert!(var > 0.01 && var < 100.0, "{what}: logit variance {var}");
                    next = (next + 17) % 1000;
                    be.forward(&mut s, &[next], Logits::Last, &mut out).unwrap();
                    assert_eq!(out.len(), 1000, "{what}");
                }
                std::fs::remove_file(&path).unwrap();
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn same_seed_same_file() {
        let dir = std::env::temp_dir().join(format!("caldera-synth-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, seed| {
            let p = dir.join(name);
            write_model(
                &p,
                SynthArch::Qwen35moe,
                Shape::Tiny,
                Quant::Q4KM,
                seed,
                false,
            )
            .unwrap();
            std::fs::read(&p).unwrap()
        };
        let (a, b, c) = (write("a.gguf", 1), write("b.gguf", 1), write("c.gguf", 2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), c.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
