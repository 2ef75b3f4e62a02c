//! `lfm2moe` (HF `lfm2_moe`, LFM2-MoE / LFM2.5 MoE): LFM2's hybrid short-conv / attention
//! layers (see `lfm2.rs`, which holds the shared builder and translation) with the first
//! `leading_dense_block_count` FFNs dense and the rest mixtures of SwiGLU experts. The
//! router scores experts with a sigmoid, selects the top k of `score + expert_bias`,
//! weights them by their scores, renormalized (`norm_topk_prob`) and scaled
//! (`routed_scaling_factor`).

use super::lfm2::{build_lfm, translate_lfm};
use super::ArchDef;
use crate::error::Result;
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::Model;

pub static LFM2MOE: ArchDef = ArchDef {
    name: "lfm2moe",
    hf_model_types: &["lfm2_moe"],
    build,
    hf_translate: translate,
};

fn build(f: &ModelFile) -> Result<Model> {
    build_lfm(f, "lfm2moe", true)
}

fn translate(t: &mut Translation) -> Result<()> {
    translate_lfm(t, true)
}
