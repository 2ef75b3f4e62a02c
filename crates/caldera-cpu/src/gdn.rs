//! GatedDeltaNet mixer on the CPU. Not implemented yet (architectures issue).

use caldera_model::blocks::gdn::{GdnSpec, GdnWeights};

use crate::ctx::Ctx;
use crate::forward::CpuError;

/// Per-sequence recurrent state of one GatedDeltaNet layer.
#[derive(Clone)]
pub struct GdnState {}

impl GdnState {
    pub fn new(_spec: &GdnSpec) -> GdnState {
        GdnState {}
    }
}

#[allow(clippy::too_many_arguments)]
pub fn forward(
    _ctx: &mut Ctx,
    _spec: &GdnSpec,
    _w: &GdnWeights,
    _state: &mut GdnState,
    _h: &[f32],
    _m: usize,
    _eps: f32,
    _out: &mut [f32],
) -> Result<(), CpuError> {
    Err(CpuError::Unsupported("GatedDeltaNet layers".into()))
}
