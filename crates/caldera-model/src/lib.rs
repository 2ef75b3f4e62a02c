//! Architectures as data.
//!
//! A model file (GGUF, or a Hugging Face folder translated on load) becomes a
//! [`ModelFile`]: GGUF-convention metadata plus tensors under GGUF names. Each
//! architecture module (`arch/*.rs`) reads that into a [`ModelConfig`] (one
//! [`LayerSpec`] per layer, over the block vocabulary in `blocks/`) and binds the tensors
//! into [`ModelWeights`]. Backends consume `Model` and never look at architecture names:
//! adding an architecture means one file here, not one per backend.

pub mod arch;
pub mod blocks;
pub mod config;
pub mod error;
pub mod file;
pub mod hf_names;
pub mod runner;
pub mod weights;

pub use config::{
    Activation, AttnSpec, FfnSpec, LayerSpec, Mixer, ModelConfig, RopeSpec, RopeStyle,
};
pub use error::{ModelError, Result};
pub use file::{ModelFile, TokenizerSource};
pub use runner::{
    panic_message, step_one, BatchItem, BatchStepper, Logits, RunError, Runner, RunnerStats,
    SerialStepper, StepOutcome,
};
pub use weights::{AttnWeights, DenseFfn, FfnWeights, Layer, MixerWeights, ModelWeights, Weight};

/// A loaded model: its description and its weights (views into the mapped file).
pub struct Model {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    /// Model-level parts only some architectures have (Gemma 4's per-layer inputs).
    pub extras: Extras,
}

/// Model-level parts only some architectures have; `Default` is none of them.
#[derive(Default)]
pub struct Extras {
    /// Per-layer input embeddings (Gemma 4).
    pub per_layer_inputs: Option<weights::PerLayerInputs>,
    /// Empty, or one entry per layer.
    pub layers: Vec<weights::LayerExtras>,
}

impl Model {
    /// Reads the architecture from `file` and binds its tensors.
    pub fn from_file(file: &ModelFile) -> Result<Model> {
        arch::build(file)
    }

    /// Opens a `.gguf` file or an HF folder and builds the model.
    pub fn open(path: &std::path::Path) -> Result<(ModelFile, Model)> {
        let file = ModelFile::open(path)?;
        let model = Model::from_file(&file)?;
        Ok((file, model))
    }
}
