//! `qwen35moe` (HF `qwen3_5_moe_text`): Qwen3.5 (see `qwen35.rs`) with MoE layers: softmax
//! router over all experts, top-k renormalized, plus a shared expert scaled by
//! `sigmoid(shared_expert_gate · x)`. Experts are stacked as `ffn_{gate,up,down}_exps`.

use super::qwen3next::{build_hybrid, translate_hybrid};
use super::ArchDef;
use crate::blocks::gdn::GdnHeadOrder;
use crate::error::Result;
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::Model;

pub static QWEN35MOE: ArchDef = ArchDef {
    name: "qwen35moe",
    hf_model_types: &["qwen3_5_moe_text", "qwen3_5_moe"],
    build,
    hf_translate: translate,
};

fn build(f: &ModelFile) -> Result<Model> {
    build_hybrid(f, "qwen35moe", GdnHeadOrder::Tiled)
}

fn translate(t: &mut Translation) -> Result<()> {
    translate_hybrid(t, true)
}
