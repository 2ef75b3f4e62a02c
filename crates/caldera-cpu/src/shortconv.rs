//! Short-conv mixer on the CPU. Not implemented yet (architectures issue).

use caldera_model::blocks::shortconv::{ShortConvSpec, ShortConvWeights};

use crate::ctx::Ctx;
use crate::forward::CpuError;

/// Per-sequence recurrent state of one short-conv layer.
#[derive(Clone)]
pub struct ShortConvState {}

impl ShortConvState {
    pub fn new(_spec: &ShortConvSpec) -> ShortConvState {
        ShortConvState {}
    }
}

#[allow(clippy::too_many_arguments)]
pub fn forward(
    _ctx: &mut Ctx,
    _spec: &ShortConvSpec,
    _w: &ShortConvWeights,
    _state: &mut ShortConvState,
    _h: &[f32],
    _m: usize,
    _eps: f32,
    _out: &mut [f32],
) -> Result<(), CpuError> {
    Err(CpuError::Unsupported("short-conv layers".into()))
}
