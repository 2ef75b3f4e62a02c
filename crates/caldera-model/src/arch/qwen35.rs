//! `qwen35` (HF `qwen3_5_text`, the text part of Qwen3.5; the `qwen3_5` multimodal folder's
//! vision tower and MTP head are skipped): the Qwen3-Next hybrid layout
//! (see `qwen3next.rs`) with separate `in_proj_qkv` / `in_proj_z` / `in_proj_b` /
//! `in_proj_a` projections and dense SwiGLU MLPs. GGUF stores the GatedDeltaNet value heads
//! in tiled order (llama.cpp's converter reorders them) and the text-only MRoPE sections
//! under `rope.dimension_sections`; for text, MRoPE equals NeoX RoPE on the rotated dims.

use super::qwen3next::{build_hybrid, translate_hybrid};
use super::ArchDef;
use crate::blocks::gdn::GdnHeadOrder;
use crate::error::Result;
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::Model;

pub static QWEN35: ArchDef = ArchDef {
    name: "qwen35",
    hf_model_types: &["qwen3_5_text", "qwen3_5"],
    build,
    hf_translate: translate,
};

fn build(f: &ModelFile) -> Result<Model> {
    build_hybrid(f, "qwen35", GdnHeadOrder::Tiled)
}

fn translate(t: &mut Translation) -> Result<()> {
    translate_hybrid(t, true)
}
