//! Mamba2 mixer on the CPU. Not implemented yet (architectures issue).

use caldera_model::blocks::mamba2::{Mamba2Spec, Mamba2Weights};

use crate::ctx::Ctx;
use crate::forward::CpuError;

/// Per-sequence recurrent state of one Mamba2 layer.
#[derive(Clone)]
pub struct Mamba2State {}

impl Mamba2State {
    pub fn new(_spec: &Mamba2Spec) -> Mamba2State {
        Mamba2State {}
    }
}

#[allow(clippy::too_many_arguments)]
pub fn forward(
    _ctx: &mut Ctx,
    _spec: &Mamba2Spec,
    _w: &Mamba2Weights,
    _state: &mut Mamba2State,
    _h: &[f32],
    _m: usize,
    _eps: f32,
    _out: &mut [f32],
) -> Result<(), CpuError> {
    Err(CpuError::Unsupported("Mamba2 layers".into()))
}
