//! Choosing a backend and opening a runner (one sequence) on it.

use std::sync::Arc;

use anyhow::Result;
use caldera_cpu::{CpuBackend, CpuRunner, KvConfig, KvPool};
use caldera_model::{BatchStepper, Model, Runner, SerialStepper};
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Vulkan,
    /// A real GPU through Vulkan when one is present, else the CPU (never lavapipe).
    Auto,
}

/// Options every model-running command shares.
#[derive(clap::Args, Clone)]
pub struct BackendArgs {
    /// `auto` takes a real GPU through Vulkan when one is present and runs the model,
    /// else the CPU; it never picks a CPU-type Vulkan device such as lavapipe.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// CPU threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Vulkan device index (see `caldera devices`).
    #[arg(long)]
    pub device: Option<usize>,
    /// What the KV cache holds on Vulkan: f16 (the default), q8_0 (blocks of 32 int8
    /// values and an f32 scale: 36 bytes per 32 values, 56% of f16; heads must be
    /// multiples of 32) or f32. The CPU backend's cache is f32 only.
    #[arg(long, value_parser = kv_type_parser())]
    pub kv_type: Option<caldera_vulkan::KvType>,
}

/// `--kv-type`: the names [`caldera_vulkan::KvType`] parses.
fn kv_type_parser() -> impl clap::builder::TypedValueParser<Value = caldera_vulkan::KvType> {
    use clap::builder::{PossibleValuesParser, TypedValueParser};
    let names = caldera_vulkan::KvType::ALL.map(|t| t.name());
    PossibleValuesParser::new(names)
        .map(|s| caldera_vulkan::KvType::parse(&s).expect("one of KvType::ALL's names"))
}

/// The CPU backend keeps f32 rows: `--kv-type` other than f32 is refused there
/// (`fallback`: why `auto` did not take Vulkan).
fn cpu_kv_check(args: &BackendArgs, fallback: Option<&anyhow::Error>) -> Result<()> {
    match args.kv_type {
        None | Some(caldera_vulkan::KvType::F32) => Ok(()),
        Some(t) => match fallback {
            Some(e) => anyhow::bail!(
                "--kv-type {t} needs the Vulkan backend, which is not available ({e:#}); \
                     the CPU backend keeps its KV cache in f32"
            ),
            None => anyhow::bail!(
                "--kv-type {t} applies to the Vulkan backend; the CPU backend keeps its \
                     KV cache in f32 (--kv-type f32, or leave it out)"
            ),
        },
    }
}

/// Opens a runner of `ctx` tokens for `model` on the chosen backend.
pub fn open_runner(args: &BackendArgs, model: Arc<Model>, ctx: usize) -> Result<Box<dyn Runner>> {
    match args.backend {
        Backend::Cpu => {
            cpu_kv_check(args, None)?;
            let threads = args.threads.unwrap_or_else(crate::default_threads);
            let be = Arc::new(CpuBackend::new(model, threads));
            Ok(Box::new(CpuRunner::new(be, ctx)?))
        }
        Backend::Vulkan => vulkan_runner(args, model, ctx, false),
        Backend::Auto => match vulkan_runner(args, model.clone(), ctx, true) {
            Ok(r) => Ok(r),
            Err(e) => {
                if args.device.is_some() {
                    return Err(e);
                }
                cpu_kv_check(args, Some(&e))?;
                eprintln!("caldera: using the CPU backend ({e:#})");
                let cpu = BackendArgs {
                    backend: Backend::Cpu,
                    ..args.clone()
                };
                open_runner(&cpu, model, ctx)
            }
        },
    }
}

/// Makes runners of `ctx` tokens on demand.
pub type RunnerMaker = Box<dyn FnMut() -> Result<Box<dyn Runner>> + Send>;

/// What runs several sequences (`serve`'s slots, `bench --batch`): a maker of their
/// runners, what the backend is ("cpu, 8 threads"), the KV pool they share (CPU: `pool`;
/// Vulkan: `vk_batch`'s pages; both `None` where each runner has its own cache), the KV
/// cache bytes one token of a runner's context takes (CPU: f32 rows; Vulkan: its
/// `--kv-type`) and the stepper of a step over them.
pub struct SlotRunners {
    pub make: RunnerMaker,
    pub desc: String,
    pub pool: Option<Arc<KvPool>>,
    pub vk_batch: Option<Arc<caldera_vulkan::VkBatch>>,
    pub kv_token_bytes: u64,
    pub stepper: Box<dyn BatchStepper>,
}

/// Runners for `slots` sequences of `ctx` tokens. On the CPU every runner shares one
/// backend, hence one thread pool (the slots step one after another on all the threads
/// instead of each slot oversubscribing the cores) and one KV pool of `kv` pages. On
/// Vulkan the runners share the uploaded weights and, for models with a batched decode
/// step (all but Gemma 4 and attention with sinks, biases, v norm, shared KV or heads
/// over 256), one pool of KV caches and recurrent states (`VkBatch`): their decode steps
/// run together, one weight read for all (`CALDERA_VK_NO_BATCH=1` steps them one after
/// another instead), and their KV caches are pages of one pool: `kv.max_pages` pages of
/// `kv.page_tokens` tokens (in the batch's pages of `caldera_vulkan::KV_PAGE`), by
/// default every slot's whole context; otherwise each runner has its own KV cache of
/// `ctx` tokens.
pub fn slot_runners(
    args: &BackendArgs,
    model: Arc<Model>,
    ctx: usize,
    slots: usize,
    kv: &KvConfig,
) -> Result<SlotRunners> {
    let cpu = |threads: Option<usize>| -> Result<SlotRunners> {
        cpu_kv_check(args, None)?;
        let threads = threads.unwrap_or_else(crate::default_threads);
        let be = Arc::new(CpuBackend::with_kv(model.clone(), threads, kv));
        // The whole pool now: a plan that does not fit fails at start-up.
        be.kv_pool().preallocate()?;
        let desc = format!("cpu, {threads} threads shared by the slots");
        let pool = Some(be.kv_pool().clone());
        Ok(SlotRunners {
            make: Box::new(move || {
                Ok(Box::new(CpuRunner::new(be.clone(), ctx)?) as Box<dyn Runner>)
            }),
            desc,
            pool,
            vk_batch: None,
            kv_token_bytes: sequence_state_bytes(&model, 1) - sequence_state_bytes(&model, 0),
            stepper: Box::new(SerialStepper),
        })
    };
    let vulkan = |gpu_only: bool| -> Result<SlotRunners> {
        let vk = vulkan_model(args, model.clone(), gpu_only)?;
        let kv_token_bytes = vk.kv_cache_bytes(1);
        let no_batch = std::env::var("CALDERA_VK_NO_BATCH").is_ok_and(|v| v == "1");
        let batch = if no_batch {
            None
        } else {
            // Pools larger than one buffer (every model has a batched step): the slots
            // decode one after another on their own caches.
            let pages = match kv.max_pages {
                Some(p) => (p * kv.page_tokens).div_ceil(caldera_vulkan::KV_PAGE),
                None => slots * ctx.div_ceil(caldera_vulkan::KV_PAGE),
            };
            let mm = caldera_vulkan::BatchMm::from_env();
            // Models with recurrent layers keep prompt snapshots as on the CPU.
            match caldera_vulkan::VkBatch::with_snapshots(
                vk.clone(),
                slots,
                ctx,
                pages,
                kv.snapshots,
                mm,
            ) {
                Ok(b) => Some(b),
                Err(e) => {
                    eprintln!("caldera: {e}; the slots decode one after another");
                    None
                }
            }
        };
        let Some(batch) = batch else {
            let first = caldera_vulkan::VkRunner::new(vk.clone(), ctx)?;
            let desc = first.describe();
            let mut first = Some(first);
            return Ok(SlotRunners {
                make: Box::new(move || {
                    let r = match first.take() {
                        Some(r) => r,
                        None => caldera_vulkan::VkRunner::new(vk.clone(), ctx)?,
                    };
                    Ok(Box::new(r) as Box<dyn Runner>)
                }),
                desc,
                pool: None,
                vk_batch: None,
                kv_token_bytes,
                stepper: Box::new(SerialStepper),
            });
        };
        let first = batch.runner()?;
        let lend = if first.shares_prefixes() {
            " and lend prompt prefixes to each other".to_string()
        } else if batch.snapshots() > 0 {
            // Recurrent states are not lent: prompts are shared through snapshots.
            format!(", up to {} prompt snapshots", batch.snapshots())
        } else {
            String::new()
        };
        let desc = format!("{}; slots decode in batched steps{lend}", first.describe());
        let mut first = Some(first);
        let b = batch.clone();
        Ok(SlotRunners {
            make: Box::new(move || {
                let r = match first.take() {
                    Some(r) => r,
                    None => b.runner()?,
                };
                Ok(Box::new(r) as Box<dyn Runner>)
            }),
            desc,
            pool: None,
            vk_batch: Some(batch.clone()),
            kv_token_bytes,
            stepper: Box::new(caldera_vulkan::VkBatchStepper::new(batch)),
        })
    };
    match args.backend {
        Backend::Cpu => cpu(args.threads),
        Backend::Vulkan => vulkan(false),
        Backend::Auto => match vulkan(true) {
            Ok(s) => Ok(s),
            Err(e) => {
                if args.device.is_some() {
                    return Err(e);
                }
                cpu_kv_check(args, Some(&e))?;
                eprintln!("caldera: using the CPU backend ({e:#})");
                cpu(args.threads)
            }
        },
    }
}

/// Bytes one sequence of `ctx` tokens keeps besides the weights on the CPU backend: f32
/// K and V rows of every attention layer that has its own cache
/// (`sequence_state_bytes(m, 1) - sequence_state_bytes(m, 0)` per token), and the
/// recurrent layers' states (the same size on Vulkan, whose KV cache is
/// [`caldera_vulkan::VkModel::kv_cache_bytes`]).
pub fn sequence_state_bytes(model: &Model, ctx: usize) -> u64 {
    use caldera_model::Mixer;
    let mut bytes = 0u64;
    for (li, l) in model.config.layers.iter().enumerate() {
        if model
            .extras
            .layers
            .get(li)
            .is_some_and(|e| e.kv_from.is_some())
        {
            continue;
        }
        let floats = match &l.mixer {
            None => 0,
            Some(Mixer::Attention(a)) => 2 * (a.n_kv_heads * a.head_dim) as u64 * ctx as u64,
            Some(Mixer::GatedDeltaNet(g)) => {
                let s = caldera_cpu::gdn::GdnState::new(g);
                (s.conv.len() + s.ssm.len()) as u64
            }
            Some(Mixer::Mamba2(m)) => {
                let s = caldera_cpu::mamba2::Mamba2State::new(m);
                (s.conv.len() + s.ssm.len()) as u64
            }
            Some(Mixer::ShortConv(c)) => caldera_cpu::shortconv::ShortConvState::new(c)
                .inputs()
                .len() as u64,
        };
        bytes += floats * 4;
    }
    bytes
}

/// The uploaded weights of the last model opened on Vulkan, kept for the next runner of
/// the same model on the same device (`bench` opens one runner per repetition).
static VK_MODEL: std::sync::Mutex<Option<(usize, Arc<caldera_vulkan::VkModel>)>> =
    std::sync::Mutex::new(None);

/// The device to use: `--device`, else `CALDERA_VK_DEVICE`, else the first GPU; a
/// CPU-type device (lavapipe) only when asked for Vulkan explicitly (`gpu_only` false).
fn pick_vulkan_device(args: &BackendArgs, gpu_only: bool) -> Result<usize> {
    let devices = caldera_vulkan::list_devices()?;
    let env = std::env::var(caldera_vulkan::ENV_DEVICE).ok();
    let explicit = match (args.device, env) {
        (Some(i), _) => Some(i),
        (None, Some(v)) => Some(v.trim().parse::<usize>().map_err(|_| {
            anyhow::anyhow!("{}={v:?} is not a device index", caldera_vulkan::ENV_DEVICE)
        })?),
        (None, None) => None,
    };
    if let Some(i) = explicit {
        if i >= devices.len() {
            anyhow::bail!(
                "Vulkan device {i} does not exist: {} device(s) found (`caldera devices` lists them)",
                devices.len()
            );
        }
        return Ok(i);
    }
    let gpu = devices
        .iter()
        .position(|d| d.device_type != caldera_vulkan::DeviceType::Cpu);
    match (gpu, gpu_only) {
        (Some(i), _) => Ok(i),
        (None, true) => anyhow::bail!("no Vulkan GPU found"),
        (None, false) if !devices.is_empty() => Ok(0),
        (None, false) => Err(caldera_vulkan::VkError::NoDevice.into()),
    }
}

fn vulkan_runner(
    args: &BackendArgs,
    model: Arc<Model>,
    ctx: usize,
    gpu_only: bool,
) -> Result<Box<dyn Runner>> {
    let vk = vulkan_model(args, model, gpu_only)?;
    Ok(Box::new(caldera_vulkan::VkRunner::new(vk, ctx)?))
}

/// `model`'s weights on the chosen Vulkan device: uploaded now, or kept from the last
/// call for the same model and device.
fn vulkan_model(
    args: &BackendArgs,
    model: Arc<Model>,
    gpu_only: bool,
) -> Result<Arc<caldera_vulkan::VkModel>> {
    let index = pick_vulkan_device(args, gpu_only)?;
    let mut cache = VK_MODEL.lock().unwrap_or_else(|e| e.into_inner());
    let vk = match cache.as_ref() {
        Some((i, m))
            if *i == index
                && Arc::ptr_eq(m.model(), &model)
                && args.kv_type.is_none_or(|t| m.context().tuning().kv == t) =>
        {
            m.clone()
        }
        _ => {
            *cache = None;
            let opts = caldera_vulkan::ContextOptions {
                kv_type: args.kv_type,
                ..Default::default()
            };
            let c = caldera_vulkan::Context::with_options(index, &opts)?;
            let name = c.info().name.clone();
            let t = std::time::Instant::now();
            // Progress while the weights go through staging: bytes so far and the rate
            // (on a terminal only).
            let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                indicatif::ProgressBar::new_spinner()
            } else {
                indicatif::ProgressBar::hidden()
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} uploading weights to {msg}: {bytes} ({bytes_per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.set_message(name.clone());
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let b = bar.clone();
            c.set_upload_progress(Some(Box::new(move |n| b.inc(n))));
            let m = caldera_vulkan::VkModel::new(c, model);
            bar.finish_and_clear();
            let m = Arc::new(m?);
            m.context().set_upload_progress(None);
            eprintln!(
                "caldera: {:.1} MiB of weights uploaded to {name} in {:.2} s",
                m.weight_bytes() as f64 / (1 << 20) as f64,
                t.elapsed().as_secs_f64()
            );
            *cache = Some((index, m.clone()));
            m
        }
    };
    Ok(vk)
}
