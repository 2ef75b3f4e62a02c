//! One logical device: a compute queue, a command pool, a descriptor pool and the
//! pipelines of the kernel table, each created on its kernel's first binding.

use std::ffi::{c_char, CStr};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ash::vk;

use crate::device::{instance, DeviceInfo, DeviceType, Instance};
use crate::error::{Result, VkError, VkResultExt};
use crate::kernels::{coop_layout, CoopLayout, Kernel, Tuning, KERNELS};
use crate::kv::KvType;

/// Env var: `1` forces the shared-memory reduction kernels (the fallback of devices
/// without subgroup arithmetic), so CI exercises both paths on one device.
pub const ENV_NO_SUBGROUP: &str = "CALDERA_VK_NO_SUBGROUP";

/// How long a submit may run before it is reported as a hang.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Descriptor sets one context can hold at once (bound kernels).
/// Descriptor sets per pool (a context makes more pools as bindings need them).
const MAX_SETS: u32 = 4096;
/// Storage-buffer descriptors per pool: the widest kernels bind 14 buffers.
const MAX_DESCRIPTORS: u32 = MAX_SETS * 12;

/// A descriptor pool of [`MAX_SETS`] sets whose sets can be freed one by one.
pub(crate) fn new_descriptor_pool(dev: &ash::Device) -> Result<vk::DescriptorPool> {
    let sizes = [vk::DescriptorPoolSize {
        ty: vk::DescriptorType::STORAGE_BUFFER,
        descriptor_count: MAX_DESCRIPTORS,
    }];
    // SAFETY: a valid device; the create info lives through the call.
    unsafe {
        dev.create_descriptor_pool(
            &vk::DescriptorPoolCreateInfo::default()
                .max_sets(MAX_SETS)
                .pool_sizes(&sizes)
                .flags(vk::DescriptorPoolCreateFlags::FREE_DESCRIPTOR_SET),
            None,
        )
    }
    .map_err(|r| VkError::from_vk("creating a descriptor pool", r))
}

/// Choices that override what the device reports; `Default` takes the device's own.
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Use the shared-memory reduction kernels even where subgroup arithmetic exists.
    /// `CALDERA_VK_NO_SUBGROUP=1` sets it too.
    pub force_shared_reduce: bool,
    /// Workgroup size (power of two); default 128 on GPUs, 64 on CPU drivers, or
    /// `CALDERA_VK_WG`; clamped to the device's limits.
    pub workgroup_size: Option<u32>,
    /// Mat-vec rows per workgroup; default 2.
    pub rows_per_group: Option<u32>,
    /// Never use int8 dot-product instructions (their emulation instead).
    pub force_no_int8_dot: bool,
    /// Decode mat-vecs on f32 activations only (no int8 quantization of x).
    pub force_f32_acts: bool,
    /// Decode mat-vec workgroup size (power of two, >= 16); default 128 (CPU drivers:
    /// 16), or `CALDERA_VK_MV_WG`.
    pub mv_workgroup_size: Option<u32>,
    /// Decode mat-vec outputs per workgroup (1..=4); default 2 (CPU drivers: 4), or
    /// `CALDERA_VK_MV_ROWS`.
    pub mv_rows: Option<u32>,
    /// Prefill mat-vecs never use the tiled matmul (`mmt.glsl`), only the batched
    /// mat-vec (`mm.glsl`). `CALDERA_VK_NO_MMT=1` sets it too.
    pub force_no_tiled_mm: bool,
    /// Prefill attention never uses `attn_flash`, only `attention`.
    /// `CALDERA_VK_NO_FLASH=1` sets it too.
    pub force_no_flash_attn: bool,
    /// Largest buffer (and so largest bound range and allocation) in bytes; default and
    /// upper bound [`DeviceInfo::max_buffer_bytes`]. Tests set it low to exercise splits.
    pub max_buffer_bytes: Option<u64>,
    /// Keep the KV cache in f32 instead of f16. `CALDERA_VK_KV_F32=1` sets it too;
    /// `kv_type` wins over both.
    pub force_kv_f32: bool,
    /// What the KV cache holds; default f16, or `CALDERA_VK_KV=f32|f16|q8_0` (or f32
    /// with `force_kv_f32`). q8_0 needs head sizes that are multiples of 32.
    pub kv_type: Option<KvType>,
    /// Decode mat-vecs on int8 activations run a subgroup per output (`mvq.glsl`'s
    /// `MV_SG`) where the device reduces with subgroups; else `CALDERA_VK_MV_SG=1`.
    pub mv_subgroup_rows: Option<bool>,
    /// Batched decode mat-vecs through the old per-column-reduction kernels (`mvqn_*`).
    /// `CALDERA_VK_MVQN_OLD=1` sets it too.
    pub force_old_mvqn: bool,
    /// Weight rows per workgroup of the batched decode mat-vecs `mvqm_*`: 4 or 8
    /// (`CALDERA_VK_MVQM_ROWS`; default 4).
    pub mvqm_rows: Option<u32>,
    /// Mamba2 prefill through the token-by-token `mamba2_scan` instead of the chunked
    /// `mamba2_chunk`. `CALDERA_VK_MAMBA2_SCAN=1` sets it too.
    pub force_mamba2_scan: bool,
    /// The tiled prefill matmul never uses cooperative matrices (`mmc.glsl`), only
    /// `mmt.glsl`. `CALDERA_VK_NO_COOPMAT=1` sets it too.
    pub force_no_coopmat: bool,
    /// Batched decode steps never use the cooperative-matrix mat-vec (`mvc.glsl`): the
    /// int8 one (`mvqm`) or the tiled matmul instead (as `CALDERA_VK_NO_MVC=1`).
    pub force_no_mvc: bool,
    /// The cooperative-matrix matmul loads the next step before this step's products
    /// ([`CoopLayout::prefetch`]); default on, off with `CALDERA_VK_COOPMAT_PREFETCH=0`.
    pub coopmat_prefetch: Option<bool>,
    /// Subgroups per workgroup of the block-tail int8 mat-vecs ([`Tuning::mv_block`]);
    /// 0 turns them off. Default 8, or `CALDERA_VK_MV_BLOCK`.
    pub mv_block: Option<u32>,
    /// When the wide block-tail mat-vecs run ([`Tuning::mv_wide`]: 0 never, 1 where
    /// they fill the device, 2 always); default 1, or `CALDERA_VK_MV_WIDE`.
    pub mv_wide: Option<u32>,
    /// The int8 expert mat-vecs' subgroup-per-output layout ([`Tuning::mvx_subgroup`]);
    /// default as `mv_subgroup_rows`, or `CALDERA_VK_MVX_SG=0|1`.
    pub mvx_subgroup: Option<bool>,
    /// Its outputs per workgroup (a power of two up to 32); default 4, or
    /// `CALDERA_VK_MVXS_ROWS`.
    pub mvxs_rows: Option<u32>,
}

/// The pipeline objects of one kernel.
pub(crate) struct Pipeline {
    pub set_layout: vk::DescriptorSetLayout,
    pub layout: vk::PipelineLayout,
    pub pipeline: vk::Pipeline,
}

/// Device-level objects, shared by everything created from the context; destroyed when
/// the last buffer, binding or recording referring to them is gone.
pub(crate) struct Shared {
    pub device: ash::Device,
    pub queue: Mutex<vk::Queue>,
    pub fence: vk::Fence,
    pub cmd_pool: Mutex<vk::CommandPool>,
    /// Descriptor pools, a new one made whenever the last is full (each binding frees
    /// its set into the pool it came from).
    pub desc_pool: Mutex<Vec<vk::DescriptorPool>>,
    pub pipeline_cache: vk::PipelineCache,
    /// One slot per entry of `KERNELS`, filled on the kernel's first binding
    /// ([`Context::pipeline`]): a model uses a few dozen of the table's kernels, and a
    /// software driver such as lavapipe spends ~10 s compiling all of them.
    pub pipelines: Vec<OnceLock<Pipeline>>,
    /// Held while a pipeline is created, so two threads never build the same one.
    pub pipeline_lock: Mutex<()>,
    /// With `CALDERA_VK_PIPELINE_STATS=1` where the driver has
    /// VK_KHR_pipeline_executable_properties: each pipeline prints its compiler's
    /// statistics (registers, local memory, shared memory, ...) to stderr when created.
    pub pipeline_stats: Option<ash::khr::pipeline_executable_properties::Device>,
    pub mem_props: vk::PhysicalDeviceMemoryProperties,
    /// Told the bytes of every staged upload ([`Context::set_upload_progress`]).
    pub upload_progress: Mutex<Option<UploadProgress>>,
    /// Dropped (destroyed) after `Drop::drop` destroyed the device.
    _instance: Arc<Instance>,
}

// SAFETY: the raw handles inside are plain integers/pointers owned by this struct; every
// Vulkan object that needs external synchronisation (queue, pools) sits behind a Mutex.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// A callback told how many bytes each staged upload copied to the device.
pub type UploadProgress = Box<dyn FnMut(u64) + Send>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: nothing else refers to these objects any more (this is the last Arc).
        unsafe {
            let _ = self.device.device_wait_idle();
            for p in self.pipelines.iter().filter_map(OnceLock::get) {
                self.device.destroy_pipeline(p.pipeline, None);
                self.device.destroy_pipeline_layout(p.layout, None);
                self.device
                    .destroy_descriptor_set_layout(p.set_layout, None);
            }
            self.device
                .destroy_pipeline_cache(self.pipeline_cache, None);
            for &p in lock(&self.desc_pool).iter() {
                self.device.destroy_descriptor_pool(p, None);
            }
            self.device
                .destroy_command_pool(*lock(&self.cmd_pool), None);
            self.device.destroy_fence(self.fence, None);
            self.device.destroy_device(None);
        }
    }
}

/// An open device, ready to allocate buffers and run kernels.
pub struct Context {
    pub(crate) shared: Arc<Shared>,
    pub(crate) info: DeviceInfo,
    pub(crate) tuning: Tuning,
    pub(crate) max_buffer_bytes: u64,
    pub(crate) queue_family: u32,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.info.name)
            .field("tuning", &self.tuning)
            .field("max_buffer_bytes", &self.max_buffer_bytes)
            .finish()
    }
}

impl Context {
    /// Opens device `device_index` (as [`crate::list_devices`] numbers them) with the
    /// device's own settings (and `CALDERA_VK_NO_SUBGROUP`).
    pub fn new(device_index: usize) -> Result<Context> {
        Context::with_options(device_index, &ContextOptions::default())
    }

    /// Opens device `device_index` with `opts`.
    pub fn with_options(device_index: usize, opts: &ContextOptions) -> Result<Context> {
        let instance = instance()?;
        let pds = instance.physical_devices()?;
        if pds.is_empty() {
            return Err(VkError::NoDevice);
        }
        let pd = *pds.get(device_index).ok_or(VkError::BadDeviceIndex {
            index: device_index,
            count: pds.len(),
        })?;
        let info = instance.describe(device_index, pd)?;
        let unusable = |why: &str| VkError::Unsupported {
            name: info.name.clone(),
            why: why.to_string(),
        };
        if info.api_version < vk::API_VERSION_1_1 {
            return Err(unusable("it supports only Vulkan 1.0; caldera needs 1.1"));
        }
        let family = info
            .compute_queue_family
            .ok_or_else(|| unusable("it has no compute queue"))?;
        let tuning = choose_tuning(&info, opts, kv_type(opts)?);
        let max_buffer_bytes = opts
            .max_buffer_bytes
            .map_or(info.max_buffer_bytes(), |m| m.min(info.max_buffer_bytes()))
            & !255;
        if max_buffer_bytes < 4096 {
            return Err(unusable("its storage buffers are smaller than 4 KiB"));
        }

        let (device, stats) = create_device(&instance, pd, &info, family)?;
        let pipeline_stats = stats.then(|| {
            ash::khr::pipeline_executable_properties::Device::new(&instance.instance, &device)
        });
        // SAFETY: plain queries on the valid device / physical device.
        let queue = unsafe { device.get_device_queue(family, 0) };
        let mem_props = unsafe { instance.instance.get_physical_device_memory_properties(pd) };
        // Null handles until created: `Shared::drop` destroys whatever exists (destroying
        // a null handle is a no-op), device before instance, on every error path below.
        let mut shared = Shared {
            device,
            queue: Mutex::new(queue),
            fence: vk::Fence::null(),
            cmd_pool: Mutex::new(vk::CommandPool::null()),
            desc_pool: Mutex::new(Vec::new()),
            pipeline_cache: vk::PipelineCache::null(),
            pipelines: (0..KERNELS.len()).map(|_| OnceLock::new()).collect(),
            pipeline_lock: Mutex::new(()),
            pipeline_stats,
            mem_props,
            upload_progress: Mutex::new(None),
            _instance: instance,
        };
        let dev = &shared.device;
        // SAFETY: plain object creation on a valid device.
        unsafe {
            shared.fence = dev
                .create_fence(&vk::FenceCreateInfo::default(), None)
                .vk("creating a fence")?;
            *lock(&shared.cmd_pool) = dev
                .create_command_pool(
                    &vk::CommandPoolCreateInfo::default()
                        .queue_family_index(family)
                        .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                    None,
                )
                .vk("creating a command pool")?;
            let first = new_descriptor_pool(dev)?;
            lock(&shared.desc_pool).push(first);
            shared.pipeline_cache = dev
                .create_pipeline_cache(&vk::PipelineCacheCreateInfo::default(), None)
                .vk("creating the pipeline cache")?;
        }
        Ok(Context {
            shared: Arc::new(shared),
            info,
            tuning,
            max_buffer_bytes,
            queue_family: family,
        })
    }

    /// What the device reports.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The launch shape the pipelines were specialised for.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// The largest buffer this context creates (and binds), in bytes.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.max_buffer_bytes
    }

    /// Calls `f` with the byte count of every staged upload from now on (weights go
    /// through staging in chunks, so a loader can show a progress bar); `None` stops.
    pub fn set_upload_progress(&self, f: Option<UploadProgress>) {
        *lock(&self.shared.upload_progress) = f;
    }

    pub(crate) fn report_upload(&self, bytes: u64) {
        if let Some(f) = lock(&self.shared.upload_progress).as_mut() {
            f(bytes);
        }
    }

    pub(crate) fn device(&self) -> &ash::Device {
        &self.shared.device
    }

    /// Whether this context can run kernel `k` (its device features, tuning and limits).
    pub fn runs(&self, k: Kernel) -> bool {
        self.refusal(k).is_none()
    }

    /// Why this context cannot run kernel `k`, or `None` where it can.
    fn refusal(&self, k: Kernel) -> Option<&'static str> {
        let desc = &KERNELS[k as usize];
        let tuning = &self.tuning;
        if desc.int8_dot && !tuning.int8_dot {
            Some("needs int8 dot products, which this context does not use")
        } else if desc.coop_fixed && !tuning.mvc_fixed {
            Some("is built for 16 x 16 x 16 cooperative matrices, which this context does not use")
        } else if desc.mvc && tuning.mvc.is_none() {
            Some("is the cooperative-matrix batched mat-vec, which this context does not use")
        } else if desc.coopmat && tuning.coopmat_mm.is_none() {
            Some("needs cooperative matrices, which this context does not use")
        } else if (desc.blk && tuning.mv_block == 0) || (desc.wide && tuning.mv_wide == 0) {
            Some("is a block-tail mat-vec, which this context's tuning turns off")
        } else if !k.fits(&self.info) {
            Some("needs more workgroup invocations or shared memory than the device has")
        } else {
            None
        }
    }

    /// Kernel `k`'s pipeline, created on first use; an error where this context cannot
    /// run it ([`Context::runs`]).
    pub(crate) fn pipeline(&self, k: Kernel) -> Result<&Pipeline> {
        let slot = &self.shared.pipelines[k as usize];
        if let Some(p) = slot.get() {
            return Ok(p);
        }
        let desc = &KERNELS[k as usize];
        debug_assert_eq!(desc.kernel, k);
        if let Some(why) = self.refusal(k) {
            return Err(VkError::Invalid(format!(
                "{} {why} ({})",
                desc.name, self.info.name
            )));
        }
        let _guard = lock(&self.shared.pipeline_lock);
        if let Some(p) = slot.get() {
            return Ok(p);
        }
        let p = create_pipeline(&self.shared, &self.tuning, desc)?;
        Ok(slot.get_or_init(|| p))
    }

    /// Creates every pipeline this context can run now rather than on first use (a
    /// server that wants no compile on its first request; the test that every kernel
    /// builds).
    pub fn create_all_pipelines(&self) -> Result<()> {
        for desc in KERNELS.iter().filter(|d| self.runs(d.kernel)) {
            self.pipeline(desc.kernel)?;
        }
        Ok(())
    }

    /// Allocates one primary command buffer from the context's pool.
    pub(crate) fn alloc_cmd(&self) -> Result<vk::CommandBuffer> {
        let pool = lock(&self.shared.cmd_pool);
        let info = vk::CommandBufferAllocateInfo::default()
            .command_pool(*pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is locked; valid device.
        let v = unsafe { self.device().allocate_command_buffers(&info) }
            .vk("allocating a command buffer")?;
        v.first()
            .copied()
            .ok_or(VkError::OutOfHostMemory("allocating a command buffer"))
    }

    pub(crate) fn free_cmd(&self, cmd: vk::CommandBuffer) {
        free_cmd(&self.shared, cmd);
    }

    /// Submits `cmd` and waits for it to finish.
    pub(crate) fn submit_wait(&self, cmd: vk::CommandBuffer, what: &'static str) -> Result<()> {
        let queue = lock(&self.shared.queue);
        let dev = self.device();
        let cmds = [cmd];
        let submit = vk::SubmitInfo::default().command_buffers(&cmds);
        // SAFETY: the queue is locked (external synchronisation); the fence is only
        // used under this lock; `cmd` was recorded and is not pending elsewhere (the
        // queue lock serialises every submit of this context, and we wait here).
        unsafe {
            dev.reset_fences(&[self.shared.fence]).vk(what)?;
            dev.queue_submit(*queue, &[submit], self.shared.fence)
                .vk(what)?;
            dev.wait_for_fences(&[self.shared.fence], true, SUBMIT_TIMEOUT.as_nanos() as u64)
                .map_err(|r| match r {
                    vk::Result::TIMEOUT => VkError::DeviceLost(what),
                    r => VkError::from_vk(what, r),
                })?;
        }
        Ok(())
    }

    /// Records a one-time command buffer with `f`, submits it and waits.
    pub(crate) fn one_shot(
        &self,
        what: &'static str,
        f: impl FnOnce(&ash::Device, vk::CommandBuffer),
    ) -> Result<()> {
        let cmd = self.alloc_cmd()?;
        let r = (|| {
            let dev = self.device();
            // SAFETY: fresh command buffer from our pool, used by this thread only.
            unsafe {
                dev.begin_command_buffer(
                    cmd,
                    &vk::CommandBufferBeginInfo::default()
                        .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                )
                .vk(what)?;
                full_barrier(dev, cmd);
                f(dev, cmd);
                dev.end_command_buffer(cmd).vk(what)?;
            }
            self.submit_wait(cmd, what)
        })();
        self.free_cmd(cmd);
        r
    }
}

pub(crate) fn free_cmd(shared: &Shared, cmd: vk::CommandBuffer) {
    let pool = lock(&shared.cmd_pool);
    // SAFETY: `cmd` came from this pool and is not pending (every submit waits).
    unsafe { shared.device.free_command_buffers(*pool, &[cmd]) };
}

/// Every earlier write (any stage, earlier submissions included) is visible to every
/// later read or write, host reads included.
pub(crate) fn full_barrier(dev: &ash::Device, cmd: vk::CommandBuffer) {
    let mb = [vk::MemoryBarrier::default()
        .src_access_mask(vk::AccessFlags::MEMORY_WRITE)
        .dst_access_mask(vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE)];
    // SAFETY: `cmd` is in the recording state (callers guarantee).
    unsafe {
        dev.cmd_pipeline_barrier(
            cmd,
            vk::PipelineStageFlags::ALL_COMMANDS,
            vk::PipelineStageFlags::ALL_COMMANDS,
            vk::DependencyFlags::empty(),
            &mb,
            &[],
            &[],
        )
    };
}

/// Transfer writes become visible to host reads (after the fence wait).
pub(crate) fn host_read_barrier(dev: &ash::Device, cmd: vk::CommandBuffer) {
    let mb = [vk::MemoryBarrier::default()
        .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
        .dst_access_mask(vk::AccessFlags::HOST_READ)];
    // SAFETY: `cmd` is in the recording state (callers guarantee).
    unsafe {
        dev.cmd_pipeline_barrier(
            cmd,
            vk::PipelineStageFlags::TRANSFER,
            vk::PipelineStageFlags::HOST,
            vk::DependencyFlags::empty(),
            &mb,
            &[],
            &[],
        )
    };
}

/// The KV cache's type: `opts.kv_type`, else f32 with `force_kv_f32` or
/// `CALDERA_VK_KV_F32=1`, else `CALDERA_VK_KV`, else f16.
fn kv_type(opts: &ContextOptions) -> Result<KvType> {
    if let Some(t) = opts.kv_type {
        return Ok(t);
    }
    if opts.force_kv_f32 || std::env::var("CALDERA_VK_KV_F32").is_ok_and(|v| v == "1") {
        return Ok(KvType::F32);
    }
    match std::env::var("CALDERA_VK_KV") {
        Ok(v) => KvType::parse(v.trim()).ok_or_else(|| {
            VkError::Invalid(format!(
                "CALDERA_VK_KV={v:?} is not a KV cache type (f32, f16, q8_0)"
            ))
        }),
        Err(_) => Ok(KvType::default()),
    }
}

/// The subgroup size `mvc.glsl` is specialised with (the fewest lanes its subgroups may
/// have: the required size, else the device's minimum), or `None` where it cannot run:
/// no cooperative-matrix layout, a shape that does not tile its 32 rows x 16 columns x
/// 2 sgs elements round within its array bounds (or whose k is under 8: its inputs are
/// read 8 halves at a time),
/// workgroups of `nsg` subgroups over the device's limit, or too little shared memory.
fn mvc_subgroup(
    info: &crate::DeviceInfo,
    required_sg: Option<u32>,
    nsg: u32,
    layout: Option<CoopLayout>,
) -> Option<u32> {
    let l = layout?;
    let sgs = required_sg.unwrap_or(info.subgroup_min).max(1);
    // Round RK = 2 sgs elements; the matrices tile 32 rows x 16 columns x RK, at most
    // 8 accumulators and 8 input matrices per round (the shader's array bounds).
    let rk = 2 * sgs;
    let tiles = [(l.m, 32), (l.n, 16), (l.k, rk)]
        .iter()
        .all(|&(d, t)| d > 0 && d <= t && t % d == 0);
    let wg = nsg * sgs;
    (sgs >= 8
        && tiles
        && l.k >= 8
        && (32 / l.m.max(1)) * (16 / l.n.max(1)) <= 8
        && (rk / l.k.max(1)) * (16 / l.n.max(1)) <= 8
        && wg <= info.max_compute_work_group_invocations
        && wg <= info.max_compute_work_group_size[0]
        && crate::kernels::mvc_shared_bytes(wg, sgs) <= info.max_compute_shared_memory_size)
        .then_some(sgs)
}

fn choose_tuning(info: &DeviceInfo, opts: &ContextOptions, kv: KvType) -> Tuning {
    let force_shared =
        opts.force_shared_reduce || std::env::var(ENV_NO_SUBGROUP).is_ok_and(|v| v == "1");
    let limit = info.max_compute_work_group_size[0]
        .min(info.max_compute_work_group_invocations)
        .max(1);
    let want = opts
        .workgroup_size
        .or_else(|| std::env::var("CALDERA_VK_WG").ok()?.parse().ok())
        // GPUs: 128 (decode attention measured faster on the H100 than at 64); CPU
        // drivers: 64.
        .unwrap_or(if info.device_type == DeviceType::Cpu {
            64
        } else {
            128
        })
        .clamp(1, limit);
    // Largest power of two not above `want`.
    let workgroup_size = 1u32 << (31 - want.leading_zeros());
    // Intel Arc runs best at subgroup 16 (DESIGN.md); elsewhere the driver's default.
    let required_subgroup_size = (info.vendor_id == 0x8086
        && info.subgroup_size_control
        && info.device_type != DeviceType::Cpu
        && (info.subgroup_min..=info.subgroup_max).contains(&16)
        && workgroup_size >= 16)
        .then_some(16);
    let env_u32 = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    // CPU drivers (lavapipe) run a workgroup's invocations as 8-wide SIMD strands that
    // switch at every barrier, and pay a fixed cost per workgroup: their decode mat-vecs
    // run 16 invocations x 4 outputs (gemma-3-270m q4_k_m decode on lavapipe, 2 cores:
    // 1.45 s per token against 10.5 s at the GPUs' shapes; docs/BENCHMARKS.md).
    let cpu = info.device_type == DeviceType::Cpu;
    let (mv_wg_default, mv_rows_default) = if cpu { (16, 4) } else { (128, 2) };
    let (mvg_wg_default, mvg_rows_default) = if cpu { (16, 4) } else { (64, 1) };
    let (mvx_wg_default, mvx_rows_default) = if cpu { (16, 4) } else { (128, 2) };
    let mv_want = opts
        .mv_workgroup_size
        .or_else(|| env_u32("CALDERA_VK_MV_WG"))
        .unwrap_or(mv_wg_default)
        .clamp(16, limit.max(16));
    let mv_workgroup_size = (1u32 << (31 - mv_want.leading_zeros())).max(16);
    let mv_rows = opts
        .mv_rows
        .or_else(|| env_u32("CALDERA_VK_MV_ROWS"))
        .unwrap_or(mv_rows_default)
        .clamp(1, 4);
    // Gate/up mat-vecs (two weight rows per output) measured fastest at 64 x 1 on the
    // H100 (docs/BENCHMARKS.md); an explicit plain shape applies to them too.
    let mvg_want = opts
        .mv_workgroup_size
        .or_else(|| env_u32("CALDERA_VK_MVG_WG"))
        .unwrap_or(mvg_wg_default)
        .clamp(16, limit.max(16));
    let mvg_workgroup_size = (1u32 << (31 - mvg_want.leading_zeros())).max(16);
    let mvg_rows = opts
        .mv_rows
        .or_else(|| env_u32("CALDERA_VK_MVG_ROWS"))
        .unwrap_or(mvg_rows_default)
        .clamp(1, 4);
    let mvx_want = env_u32("CALDERA_VK_MVX_WG")
        .unwrap_or(mvx_wg_default)
        .clamp(16, limit.max(16));
    let mvx_workgroup_size = (1u32 << (31 - mvx_want.leading_zeros())).max(16);
    let mvx_rows = env_u32("CALDERA_VK_MVX_ROWS")
        .unwrap_or(mvx_rows_default)
        .clamp(1, 4);
    let env_is = |name: &str, want: &str| std::env::var(name).is_ok_and(|v| v == want);
    let env_on = |name: &str| env_is(name, "1");
    // The int8 mat-vecs' subgroup-per-output layout: on by default on GPUs (measured
    // faster on the H100 and H200, docs/BENCHMARKS.md), off on CPU drivers (whose
    // subgroups of 4-8 lanes leave most of a workgroup idle); `CALDERA_VK_MV_SG=0|1`.
    let sg_ok = info.subgroup_arithmetic && !force_shared && info.subgroup_min >= 8;
    let mv_sg = opts.mv_subgroup_rows.unwrap_or_else(|| {
        std::env::var("CALDERA_VK_MV_SG").map_or(info.device_type != DeviceType::Cpu, |v| v == "1")
    });
    let sgs = required_subgroup_size.unwrap_or(info.subgroup_size).max(1);
    let sg_want = opts
        .mv_workgroup_size
        .or_else(|| env_u32("CALDERA_VK_MVQ_WG"))
        .unwrap_or(4 * sgs)
        .clamp(16, limit.max(16));
    let sg_workgroup_size = (1u32 << (31 - sg_want.leading_zeros())).max(16);
    let sg_rows = opts
        .mv_rows
        .or_else(|| env_u32("CALDERA_VK_MVQ_ROWS"))
        .unwrap_or(4)
        .clamp(1, 4);
    // Block-tail mat-vecs: a workgroup of `mv_block` subgroups, one output each (a
    // power of two, at most 32 and the device's workgroup limit).
    let mv_block = if sg_ok && mv_sg {
        let want = opts
            .mv_block
            .or_else(|| env_u32("CALDERA_VK_MV_BLOCK"))
            .unwrap_or(8)
            .min(32);
        let fit = (limit / sgs).max(1);
        if want == 0 {
            0
        } else {
            let n = want.min(fit);
            1u32 << (31 - n.leading_zeros())
        }
    } else {
        0
    };
    // Wide ones (32 subgroups): only where a workgroup holds 32 subgroups.
    let mv_wide = if mv_block > 0 && 32 * sgs <= limit {
        opts.mv_wide
            .or_else(|| env_u32("CALDERA_VK_MV_WIDE"))
            .unwrap_or(1)
            .min(2)
    } else {
        0
    };
    // The int8 expert mat-vecs: a subgroup per output where the dense ones run so, in
    // workgroups of 4 subgroups and 4 outputs (`CALDERA_VK_MVXS_WG`, `_ROWS`).
    let mvx_subgroup = sg_ok
        && opts
            .mvx_subgroup
            .unwrap_or_else(|| std::env::var("CALDERA_VK_MVX_SG").map_or(mv_sg, |v| v == "1"));
    let mvxs_want = env_u32("CALDERA_VK_MVXS_WG")
        .unwrap_or(4 * sgs)
        .clamp(sgs.min(limit), limit.max(16));
    let mvxs_workgroup_size = 1u32 << (31 - mvxs_want.max(1).leading_zeros());
    let mvxs_rows = opts
        .mvxs_rows
        .or_else(|| env_u32("CALDERA_VK_MVXS_ROWS"))
        .unwrap_or(4)
        .clamp(1, 32);
    let mvxs_rows = 1u32 << (31 - mvxs_rows.leading_zeros());
    let mvc_subgroups = env_u32("CALDERA_VK_MVC_NSG").unwrap_or(8).clamp(1, 16);
    let coopmat_mm = coop_layout(info, required_subgroup_size)
        .filter(|_| !opts.force_no_coopmat && !env_on("CALDERA_VK_NO_COOPMAT"))
        .map(|l| CoopLayout {
            // Both on by default (H200, pp512 of qwen3 8b q4_k_m: 1,604 tok/s with
            // both, 1,490 with two steps only, 1,427 for mmt; BENCHMARKS.md).
            prefetch: opts
                .coopmat_prefetch
                .unwrap_or_else(|| !env_is("CALDERA_VK_COOPMAT_PREFETCH", "0")),
            dual: !env_is("CALDERA_VK_COOPMAT_DUAL", "0")
                && info.max_compute_shared_memory_size >= crate::kernels::MMC_DUAL_SHARED_BYTES,
            ..l
        });
    let mvc = mvc_subgroup(info, required_subgroup_size, mvc_subgroups, coopmat_mm)
        .filter(|_| !opts.force_no_mvc && !env_on("CALDERA_VK_NO_MVC"));
    Tuning {
        int8_dot: info.int8_dot && !opts.force_no_int8_dot && !env_on("CALDERA_VK_NO_DOT"),
        q8_acts: !opts.force_f32_acts && !env_on("CALDERA_VK_NO_Q8"),
        workgroup_size,
        mv_workgroup_size,
        mv_rows,
        mvg_workgroup_size,
        mvg_rows,
        mvx_workgroup_size,
        mvx_rows,
        mvx_subgroup,
        mvxs_workgroup_size,
        mvxs_rows,
        rows_per_group: opts.rows_per_group.unwrap_or(2).clamp(1, 64),
        subgroup_reduce: info.subgroup_arithmetic && !force_shared,
        required_subgroup_size,
        flash_attn: Kernel::AttnFlash.fits(info)
            && !opts.force_no_flash_attn
            && !env_on("CALDERA_VK_NO_FLASH"),
        tiled_mm: Kernel::MmtF32.fits(info)
            && !opts.force_no_tiled_mm
            && !env_on("CALDERA_VK_NO_MMT"),
        mvc,
        mvc_subgroups,
        // (mvcf_* is mvc's build for that shape in 32-lane subgroups.)
        mvc_fixed: mvc == Some(32)
            && coopmat_mm.is_some_and(|l| (l.m, l.n, l.k) == (16, 16, 16))
            && !env_is("CALDERA_VK_MVC_FIXED", "0"),
        coopmat_mm,
        kv,
        mv_subgroup_rows: sg_ok && mv_sg,
        sg_workgroup_size,
        sg_rows,
        mvg_subgroup_rows: sg_ok && std::env::var("CALDERA_VK_MVG_SG").map_or(mv_sg, |v| v == "1"),
        // mvqm_*'s subgroup build meets its subgroups in WG / 8 slots per value.
        mvqn_old: opts.force_old_mvqn
            || env_on("CALDERA_VK_MVQN_OLD")
            || workgroup_size > 128
            || (info.subgroup_arithmetic && !force_shared && info.subgroup_size < 8),
        // 8 or else 4: the kernels exist for those two.
        mvqm_rows: match opts
            .mvqm_rows
            .or_else(|| std::env::var("CALDERA_VK_MVQM_ROWS").ok()?.parse().ok())
        {
            Some(8) => 8,
            _ => 4,
        },
        mamba2_chunk: Kernel::Mamba2Chunk.fits(info)
            && !opts.force_mamba2_scan
            && !env_on("CALDERA_VK_MAMBA2_SCAN"),
        // One block per lane and step: two measured 1-3% slower on the H100 and, at some
        // process starts, ~5x slower on Q6_K rows (docs/BENCHMARKS.md, session 12).
        mv_unroll: std::env::var("CALDERA_VK_MV_UNROLL")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .map_or(1, |v| v.clamp(1, 8)),
        mv_block,
        mvb_workgroup_size: mv_block * sgs,
        mv_wide,
        mvw_workgroup_size: 32 * sgs,
        compute_units: info.compute_units,
    }
}

fn create_device(
    instance: &Instance,
    pd: vk::PhysicalDevice,
    info: &DeviceInfo,
    family: u32,
) -> Result<(ash::Device, bool)> {
    let prio = [1.0f32];
    let queues = [vk::DeviceQueueCreateInfo::default()
        .queue_family_index(family)
        .queue_priorities(&prio)];
    let api = info.api_version.min(instance.api_version);
    let exts = instance.device_extensions(pd)?;
    let mut ext_ptrs: Vec<*const c_char> = Vec::new();
    let mut want_ext = |name: &'static CStr| {
        if exts.iter().any(|e| e.as_bytes() == name.to_bytes()) {
            ext_ptrs.push(name.as_ptr());
            true
        } else {
            false
        }
    };
    // Needed on portability (MoltenVK-like) drivers when they expose it.
    want_ext(c"VK_KHR_portability_subset");
    let coop = info.coopmat && want_ext(ash::khr::cooperative_matrix::NAME);
    let stats = std::env::var("CALDERA_VK_PIPELINE_STATS").is_ok_and(|v| v == "1")
        && want_ext(ash::khr::pipeline_executable_properties::NAME);
    let mut stats_f = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default()
        .pipeline_executable_info(true);

    let mut f11 = vk::PhysicalDeviceVulkan11Features::default()
        .storage_buffer16_bit_access(info.storage_16bit);
    let mut f12 = vk::PhysicalDeviceVulkan12Features::default()
        .shader_float16(info.fp16)
        .vulkan_memory_model(info.vulkan_memory_model)
        .shader_int8(info.int8)
        .storage_buffer8_bit_access(info.storage_8bit);
    let mut f13 = vk::PhysicalDeviceVulkan13Features::default()
        .subgroup_size_control(info.subgroup_size_control)
        .compute_full_subgroups(info.compute_full_subgroups)
        .shader_integer_dot_product(info.int8_dot);
    let mut coop_f =
        vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default().cooperative_matrix(true);
    let mut create = vk::DeviceCreateInfo::default()
        .queue_create_infos(&queues)
        .enabled_extension_names(&ext_ptrs);
    if api >= vk::API_VERSION_1_2 {
        create = create.push_next(&mut f11).push_next(&mut f12);
    }
    if api >= vk::API_VERSION_1_3 {
        create = create.push_next(&mut f13);
    }
    if coop {
        create = create.push_next(&mut coop_f);
    }
    if stats {
        create = create.push_next(&mut stats_f);
    }
    // SAFETY: every struct `create` points to lives until the call returns; features
    // requested are those the device reported.
    unsafe { instance.instance.create_device(pd, &create, None) }
        .map(|d| (d, stats))
        .map_err(|r| match r {
            vk::Result::ERROR_DEVICE_LOST => VkError::DeviceLost("opening the device"),
            r => VkError::from_vk("creating the Vulkan device", r),
        })
}

/// Prints pipeline `p`'s compiler statistics (`CALDERA_VK_PIPELINE_STATS=1`): one line
/// per executable, `pipeline NAME: stat=value ...` (NVIDIA: Register_Count,
/// Local_Memory_Size (spills; reported with bit 36 set), Shared_Memory_Size, ...).
fn print_pipeline_stats(
    ext: &ash::khr::pipeline_executable_properties::Device,
    name: &str,
    p: vk::Pipeline,
) {
    let text = |c: &[std::ffi::c_char]| {
        // SAFETY: the driver fills these fixed arrays with NUL-terminated strings.
        unsafe { CStr::from_ptr(c.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    let pinfo = vk::PipelineInfoKHR::default().pipeline(p);
    // SAFETY: plain queries on a pipeline created with CAPTURE_STATISTICS.
    let Ok(execs) = (unsafe { ext.get_pipeline_executable_properties(&pinfo) }) else {
        return;
    };
    for i in 0..execs.len() as u32 {
        let info = vk::PipelineExecutableInfoKHR::default()
            .pipeline(p)
            .executable_index(i);
        // SAFETY: as above.
        let Ok(stats) = (unsafe { ext.get_pipeline_executable_statistics(&info) }) else {
            continue;
        };
        let mut line = format!("pipeline {name}:");
        for st in &stats {
            // SAFETY: `format` says which member of the union the driver wrote.
            let v = unsafe {
                match st.format {
                    vk::PipelineExecutableStatisticFormatKHR::BOOL32 => st.value.b32.to_string(),
                    vk::PipelineExecutableStatisticFormatKHR::INT64 => st.value.i64.to_string(),
                    vk::PipelineExecutableStatisticFormatKHR::UINT64 => st.value.u64.to_string(),
                    _ => format!("{:.3}", st.value.f64),
                }
            };
            line.push_str(&format!(" {}={v}", text(&st.name).replace(' ', "_")));
        }
        eprintln!("{line}");
    }
}

fn create_pipeline(
    shared: &Shared,
    tuning: &Tuning,
    desc: &crate::kernels::KernelDesc,
) -> Result<Pipeline> {
    let dev = &shared.device;
    let what = "creating a compute pipeline";
    let bindings: Vec<vk::DescriptorSetLayoutBinding> = (0..desc.bindings)
        .map(|b| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(b)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .descriptor_count(1)
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
        })
        .collect();
    let spirv = if tuning.subgroup_reduce {
        desc.spirv_subgroup
    } else {
        desc.spirv_shared
    };
    let words = ash::util::read_spv(&mut std::io::Cursor::new(spirv))
        .map_err(|e| VkError::Invalid(format!("SPIR-V of {} is damaged: {e}", desc.name)))?;
    // SAFETY: plain object creation; each object is destroyed on every error path below.
    unsafe {
        let set_layout = dev
            .create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings),
                None,
            )
            .vk(what)?;
        let set_layouts = [set_layout];
        let ranges = [vk::PushConstantRange {
            stage_flags: vk::ShaderStageFlags::COMPUTE,
            offset: 0,
            size: desc.push_bytes,
        }];
        let layout = match dev.create_pipeline_layout(
            &vk::PipelineLayoutCreateInfo::default()
                .set_layouts(&set_layouts)
                .push_constant_ranges(&ranges),
            None,
        ) {
            Ok(l) => l,
            Err(r) => {
                dev.destroy_descriptor_set_layout(set_layout, None);
                return Err(VkError::from_vk(what, r));
            }
        };
        let module = match dev
            .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)
        {
            Ok(m) => m,
            Err(r) => {
                dev.destroy_pipeline_layout(layout, None);
                dev.destroy_descriptor_set_layout(set_layout, None);
                return Err(VkError::from_vk(what, r));
            }
        };
        let (wg, rows) = if desc.mvc {
            (tuning.mvc_subgroups * tuning.mvc.unwrap_or(1), 0)
        } else if desc.blk {
            tuning.mvqb_shape(desc.wide)
        } else if desc.expert_q8 {
            tuning.mvqx_shape()
        } else if desc.expert {
            tuning.mvx_shape()
        } else if desc.q8 {
            tuning.mvq_shape(desc.glu)
        } else if desc.mv {
            tuning.mv_shape(desc.glu)
        } else {
            (tuning.workgroup_size, tuning.rows_per_group)
        };
        // Constant 0: workgroup size; 1: rows per workgroup (mat-vecs only); 2: what the
        // KV cache holds (`KvType::spec`; kernels without a KV cache ignore it); 3: the
        // int8 mat-vecs' subgroup-per-output layout (the expert ones' too); 4-8 (the
        // cooperative-matrix kernels): the matrix shape M, N, K and the accumulators per
        // subgroup along rows and tokens; 9: their prefetch; 10: steps per round; 11: the
        // blocks per lane and step of the subgroup-per-output int8 mat-vecs; 12: their
        // block tail (`KernelDesc::blk`, which always runs that layout).
        let sg = desc.blk
            || (desc.q8 && tuning.mvq_subgroup(desc.glu))
            || (desc.expert_q8 && tuning.mvx_subgroup);
        let c = tuning.coopmat_mm.unwrap_or_default();
        let spec_data = [
            wg,
            rows,
            tuning.kv.spec(),
            u32::from(sg),
            c.m,
            c.n,
            c.k,
            c.wm,
            c.wn,
            u32::from(c.prefetch),
            if c.dual { 2 } else { 1 },
            tuning.mv_unroll,
            u32::from(desc.blk),
            tuning.mvc.unwrap_or(32),
        ];
        let ids: &[u32] = if desc.mvc {
            &[0, 4, 5, 6, 13]
        } else if desc.rows_per_group {
            &[0, 1, 2, 3, 11, 12]
        } else if desc.coopmat {
            &[0, 2, 4, 5, 6, 7, 8, 9, 10]
        } else {
            &[0, 2]
        };
        let entries: Vec<vk::SpecializationMapEntry> = ids
            .iter()
            .map(|&i| vk::SpecializationMapEntry {
                constant_id: i,
                offset: 4 * i,
                size: 4,
            })
            .collect();
        let spec_bytes: Vec<u8> = spec_data.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let spec = vk::SpecializationInfo::default()
            .map_entries(&entries)
            .data(&spec_bytes);
        let mut req_sg = vk::PipelineShaderStageRequiredSubgroupSizeCreateInfo::default()
            .required_subgroup_size(tuning.required_subgroup_size.unwrap_or(0));
        let mut stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main")
            .specialization_info(&spec);
        if tuning.required_subgroup_size.is_some() {
            stage = stage.push_next(&mut req_sg);
        }
        let flags = if shared.pipeline_stats.is_some() {
            vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR
        } else {
            vk::PipelineCreateFlags::empty()
        };
        let info = [vk::ComputePipelineCreateInfo::default()
            .flags(flags)
            .stage(stage)
            .layout(layout)];
        let r = dev.create_compute_pipelines(shared.pipeline_cache, &info, None);
        dev.destroy_shader_module(module, None);
        if let (Some(ext), Ok(p)) = (&shared.pipeline_stats, &r) {
            print_pipeline_stats(ext, desc.name, p[0]);
        }
        match r {
            Ok(p) => Ok(Pipeline {
                set_layout,
                layout,
                pipeline: p[0],
            }),
            Err((_, r)) => {
                dev.destroy_pipeline_layout(layout, None);
                dev.destroy_descriptor_set_layout(set_layout, None);
                Err(VkError::from_vk(what, r))
            }
        }
    }
}
