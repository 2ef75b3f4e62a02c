//! `qwen3moe` (HF `qwen3_moe`). Not implemented yet: the architectures issue fills this file
//! in (GGUF keys and tensor names as llama.cpp writes them, and the HF translation).

use super::ArchDef;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::Model;

pub static QWEN3_MOE: ArchDef = ArchDef {
    name: "qwen3moe",
    hf_model_types: &["qwen3_moe"],
    build,
    hf_translate: translate,
};

fn build(_f: &ModelFile) -> Result<Model> {
    Err(ModelError::Invalid(
        "architecture 'qwen3moe' is not implemented yet".into(),
    ))
}

fn translate(_t: &mut Translation) -> Result<()> {
    Err(ModelError::Invalid(
        "architecture 'qwen3_moe' is not implemented yet".into(),
    ))
}
