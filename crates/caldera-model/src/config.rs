//! The shape of a model, independent of any file format or backend.
//!
//! A model is a list of layers; each layer has an optional token mixer (attention,
//! GatedDeltaNet, Mamba2, short conv) and an optional feed-forward block (dense or MoE),
//! each wrapped as `x += post_norm(block(pre_norm(x)))`.

pub use crate::blocks::gdn::GdnSpec;
pub use crate::blocks::mamba2::Mamba2Spec;
pub use crate::blocks::moe::{MoeSpec, RouterKind};
pub use crate::blocks::shortconv::ShortConvSpec;

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): GGUF `llama` convention (its converter permutes q/k rows).
    Interleaved,
    /// Halves (i, i + n_dims/2): GPT-NeoX / HF `rotate_half` convention (qwen, gemma, ...).
    Neox,
}

#[derive(Clone, Debug)]
pub struct RopeSpec {
    pub style: RopeStyle,
    /// Rotated dimensions per head (≤ head_dim; the rest pass through).
    pub n_dims: usize,
    pub theta: f32,
    /// Linear position scaling: positions are divided by this (1 = none).
    pub linear_scale: f32,
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, YaRN, "proportional" RoPE), length
    /// n_dims/2, if any.
    pub freq_factors: Option<Vec<f32>>,
    /// Multiplier on cos/sin (YaRN's attention factor; 1 = none).
    pub mscale: f32,
}

#[derive(Clone, Debug)]
pub struct AttnSpec {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope: Option<RopeSpec>,
    /// Sliding window: a query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
    /// Multiplier applied to q·k (usually 1/sqrt(head_dim)).
    pub scale: f32,
    /// Per-head RMSNorm of q and k (weights of length head_dim).
    pub qk_norm: bool,
    /// The q projection also yields a per-head gate: output *= sigmoid(gate) (Qwen3.5).
    pub q_gate: bool,
    /// A learned per-head logit that joins the softmax but has no value (gpt-oss sinks).
    pub sinks: bool,
    /// Attention logits are soft-capped: cap * tanh(s / cap).
    pub softcap: Option<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// silu(gate) * up
    SwiGlu,
    /// gelu_tanh(gate) * up
    GeluTanhGlu,
    /// relu(up)² (no gate; Nemotron-H)
    Relu2,
    /// gpt-oss: gate = min(gate, limit), up = clamp(up, -limit, limit),
    /// out = (up + 1) * gate * sigmoid(alpha * gate)
    ClampedSwiGlu { alpha: f32, limit: f32 },
}

impl Activation {
    /// Whether the block has a gate projection.
    pub fn gated(self) -> bool {
        !matches!(self, Activation::Relu2)
    }
}

/// The token mixer of a layer.
#[derive(Clone, Debug)]
pub enum Mixer {
    Attention(AttnSpec),
    GatedDeltaNet(GdnSpec),
    Mamba2(Mamba2Spec),
    ShortConv(ShortConvSpec),
}

/// The feed-forward block of a layer.
#[derive(Clone, Debug)]
pub enum FfnSpec {
    Dense { d_ff: usize, act: Activation },
    Moe(MoeSpec),
}

#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub mixer: Option<Mixer>,
    pub ffn: Option<FfnSpec>,
}

impl LayerSpec {
    pub fn attention(&self) -> Option<&AttnSpec> {
        match &self.mixer {
            Some(Mixer::Attention(a)) => Some(a),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// GGUF architecture string (`llama`, `qwen3`, `gemma3`, ...).
    pub arch: String,
    pub d_model: usize,
    pub vocab_size: usize,
    pub norm_eps: f32,
    /// Training context length the file declares.
    pub context_length: usize,
    /// Token embeddings are multiplied by this (Gemma: sqrt(d_model)).
    pub embed_scale: Option<f32>,
    /// logits = cap * tanh(logits / cap).
    pub final_logit_softcap: Option<f32>,
    pub layers: Vec<LayerSpec>,
}

impl ModelConfig {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }
}
