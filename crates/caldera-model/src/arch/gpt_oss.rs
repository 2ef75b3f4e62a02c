//! `gpt-oss` (HF `gpt_oss`). Not implemented yet: the architectures issue fills this file
//! in (GGUF keys and tensor names as llama.cpp writes them, and the HF translation).

use super::ArchDef;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::Model;

pub static GPT_OSS: ArchDef = ArchDef {
    name: "gpt-oss",
    hf_model_types: &["gpt_oss"],
    build,
    hf_translate: translate,
};

fn build(_f: &ModelFile) -> Result<Model> {
    Err(ModelError::Invalid(
        "architecture 'gpt-oss' is not implemented yet".into(),
    ))
}

fn translate(_t: &mut Translation) -> Result<()> {
    Err(ModelError::Invalid(
        "architecture 'gpt_oss' is not implemented yet".into(),
    ))
}
