//! Gated short convolution (LFM2). Not implemented yet: the architectures issue fills in
//! the spec, weights and binding.

#[derive(Clone, Debug)]
pub struct ShortConvSpec {}

pub struct ShortConvWeights {}
