//! GatedDeltaNet (Qwen3.5 / Qwen3-Next linear attention). Not implemented yet: the
//! architectures issue fills in the spec, weights and binding.

#[derive(Clone, Debug)]
pub struct GdnSpec {}

pub struct GdnWeights {}
