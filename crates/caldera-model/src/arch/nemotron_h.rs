//! `nemotron_h` (HF `nemotron_h`). Not implemented yet: the architectures issue fills this file
//! in (GGUF keys and tensor names as llama.cpp writes them, and the HF translation).

use super::ArchDef;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::Model;

pub static NEMOTRON_H: ArchDef = ArchDef {
    name: "nemotron_h",
    hf_model_types: &["nemotron_h"],
    build,
    hf_translate: translate,
};

fn build(_f: &ModelFile) -> Result<Model> {
    Err(ModelError::Invalid(
        "architecture 'nemotron_h' is not implemented yet".into(),
    ))
}

fn translate(_t: &mut Translation) -> Result<()> {
    Err(ModelError::Invalid(
        "architecture 'nemotron_h' is not implemented yet".into(),
    ))
}
