//! `qwen35moe` (HF `qwen3_5_moe_text`). Not implemented yet: the architectures issue fills this file
//! in (GGUF keys and tensor names as llama.cpp writes them, and the HF translation).

use super::ArchDef;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::Model;

pub static QWEN35MOE: ArchDef = ArchDef {
    name: "qwen35moe",
    hf_model_types: &["qwen3_5_moe_text"],
    build,
    hf_translate: translate,
};

fn build(_f: &ModelFile) -> Result<Model> {
    Err(ModelError::Invalid(
        "architecture 'qwen35moe' is not implemented yet".into(),
    ))
}

fn translate(_t: &mut Translation) -> Result<()> {
    Err(ModelError::Invalid(
        "architecture 'qwen3_5_moe_text' is not implemented yet".into(),
    ))
}
