//! The shape of a model, independent of any file format or backend.

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): GGUF `llama` convention (its converter permutes q/k rows).
    Interleaved,
    /// Halves (i, i + d/2): GPT-NeoX / HF `rotate_half` convention (qwen, gemma, ...).
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
    /// Per-frequency divisors (GGUF `rope_freqs.weight`), length n_dims/2, if any.
    pub freq_factors: Option<Vec<f32>>,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// silu(gate) * up
    SwiGlu,
    /// gelu_tanh(gate) * up
    GeluTanhGlu,
}

#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub attn: AttnSpec,
    pub ffn_act: Activation,
    pub d_ff: usize,
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
