//! caldera's Vulkan backend.
//!
//! - [`device`]: the run-time-loaded Vulkan loader, [`list_devices`] and [`DeviceInfo`];
//! - [`Context`]: one open device with a compute queue, its command and descriptor pools
//!   and every pipeline of the [`kernels`] table, created once at open;
//! - [`kv`]: the KV cache's element type ([`KvType`]: f32, f16, q8_0) and sizes;
//! - [`memory`]: buffers no larger than the device's allocation and binding limits, and
//!   [`DeviceTensor`]s split over several buffers between rows;
//! - [`record`]: kernels bound once to buffers ([`Binding`]) and reusable command
//!   buffers ([`Recording`]);
//! - [`ops`]: mat-vec straight from GGML blocks (F16, Q8_0, Q4_0, Q4_K, Q6_K) and RMSNorm;
//!   the batched mat-vec [`ops::Mm`] for every type the models use;
//! - [`recurrent`]: the decode and prefill steps of the recurrent mixers
//!   (GatedDeltaNet, Mamba2, short conv);
//! - [`moe`]: mixture of experts: the router and expert mat-vecs that read the chosen
//!   experts from device memory; the whole block for decode ([`moe::MoeFfn`]) and
//!   prefill ([`moe::MoeSteps`]);
//! - [`extras`]: bias adds, layer output scales and Gemma 4's per-layer inputs;
//! - [`model`]: whole models (attention and the recurrent mixers; dense, ungated and
//!   MoE MLPs) behind `caldera_model::Runner`, each step recorded once and replayed with
//!   one submit;
//! - [`batch`]: batched decode of several sequences (server slots) in one step, over
//!   a paged KV cache (page pools, per-sequence page tables).
//!
//! Shaders are GLSL under `shaders/`, compiled by `build-shaders.sh` into the committed
//! SPIR-V in `shaders/spv/` (see README.md).

pub mod batch;
pub mod context;
pub mod device;
pub mod error;
pub mod extras;
pub mod kernels;
pub mod kv;
pub mod memory;
pub mod model;
pub mod moe;
pub mod ops;
pub mod record;
pub mod recurrent;
pub mod sample;
pub mod testing;

pub use batch::{VkBatch, VkBatchStepper, MAX_BATCH};
pub use context::{Context, ContextOptions, UploadProgress, ENV_NO_SUBGROUP};
pub use device::{list_devices, DeviceInfo, DeviceType, MemoryHeap, ENV_VALIDATION};
pub use error::{Result, VkError};
pub use kernels::{Kernel, KernelDesc, Tuning, KERNELS};
pub use kv::{KvType, KV_PAGE};
pub use memory::{Buffer, DeviceTensor, MemoryKind, TensorPiece};
pub use model::{BatchMm, StepStats, VkModel, VkRunner};
pub use record::{Binding, Recorder, Recording};

/// Env var: the index of the Vulkan device to use (as `caldera devices` lists them).
pub const ENV_DEVICE: &str = "CALDERA_VK_DEVICE";
