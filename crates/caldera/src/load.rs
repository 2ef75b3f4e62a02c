//! Opening a model, its tokenizer and its chat template for the commands.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use caldera_model::{Model, ModelFile, TokenizerSource};
use caldera_tokenizer::{ChatTemplate, Tokenizer};

pub struct Loaded {
    pub file: ModelFile,
    pub model: Arc<Model>,
}

pub fn open_model(path: &Path) -> Result<Loaded> {
    let file = ModelFile::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let model =
        Model::from_file(&file).with_context(|| format!("cannot load {}", path.display()))?;
    Ok(Loaded {
        file,
        model: Arc::new(model),
    })
}

pub fn tokenizer(file: &ModelFile) -> Result<Tokenizer> {
    let tok = match &file.tokenizer {
        TokenizerSource::Gguf(g) => Tokenizer::from_gguf(g)?,
        TokenizerSource::HfJson { json, config } => Tokenizer::from_hf_json(json, config.as_ref())?,
        TokenizerSource::None => anyhow::bail!(
            "{} has no tokenizer (no tokenizer.ggml.* keys or tokenizer.json)",
            file.path.display()
        ),
    };
    Ok(tok)
}

pub fn chat_template(file: &ModelFile, tok: &Tokenizer) -> Result<Option<ChatTemplate>> {
    let Some(src) = &file.chat_template else {
        return Ok(None);
    };
    let bos = tok.bos_id().and_then(|i| tok.token_text(i)).unwrap_or("");
    let eos = tok.eos_id().and_then(|i| tok.token_text(i)).unwrap_or("");
    Ok(Some(
        ChatTemplate::new(src, bos, eos).context("the model's chat template")?,
    ))
}
