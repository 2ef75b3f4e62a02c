//! Mamba2 (Nemotron-H). Not implemented yet: the architectures issue fills in the spec,
//! weights and binding.

#[derive(Clone, Debug)]
pub struct Mamba2Spec {}

pub struct Mamba2Weights {}
