//! Choosing a backend and opening a runner (one sequence) on it.

use std::sync::Arc;

use anyhow::Result;
use caldera_cpu::{CpuBackend, CpuRunner};
use caldera_model::{Model, Runner};
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Vulkan,
}

/// Options every model-running command shares.
#[derive(clap::Args, Clone)]
pub struct BackendArgs {
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// CPU threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Vulkan device index (see `caldera devices`).
    #[arg(long)]
    pub device: Option<usize>,
}

/// Opens a runner of `ctx` tokens for `model` on the chosen backend.
pub fn open_runner(args: &BackendArgs, model: Arc<Model>, ctx: usize) -> Result<Box<dyn Runner>> {
    match args.backend {
        Backend::Cpu => {
            let threads = args.threads.unwrap_or_else(crate::default_threads);
            let be = Arc::new(CpuBackend::new(model, threads));
            Ok(Box::new(CpuRunner::new(be, ctx)?))
        }
        Backend::Vulkan => anyhow::bail!(
            "the Vulkan backend runs single kernels so far, not whole models; use --backend cpu"
        ),
    }
}
