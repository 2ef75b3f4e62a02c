//! The block vocabulary that architectures are built from: each block's spec
//! (hyperparameters) and weights, and how to bind them from a [`crate::ModelFile`].
//! Backends implement each block once.

pub mod gdn;
pub mod mamba2;
pub mod moe;
pub mod shortconv;
