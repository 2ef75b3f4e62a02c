//! `lfm2` (HF `lfm2`). Not implemented yet: the architectures issue fills this file
//! in (GGUF keys and tensor names as llama.cpp writes them, and the HF translation).

use super::ArchDef;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::Model;

pub static LFM2: ArchDef = ArchDef {
    name: "lfm2",
    hf_model_types: &["lfm2"],
    build,
    hf_translate: translate,
};

fn build(_f: &ModelFile) -> Result<Model> {
    Err(ModelError::Invalid(
        "architecture 'lfm2' is not implemented yet".into(),
    ))
}

fn translate(_t: &mut Translation) -> Result<()> {
    Err(ModelError::Invalid(
        "architecture 'lfm2' is not implemented yet".into(),
    ))
}
