//! Bound kernels and recorded command buffers.
//!
//! A [`Binding`] is one kernel's descriptor set pointing at fixed buffers, created once.
//! A [`Recording`] is a command buffer of dispatches recorded once and submitted as many
//! times as wanted: the shape of the per-token decode step (values that change per step
//! belong in device buffers the recording reads, not in the recording).

use std::sync::Arc;

use ash::vk;

use crate::context::{free_cmd, full_barrier, lock, Context, Shared};
use crate::error::{Result, VkError, VkResultExt};
use crate::kernels::Kernel;
use crate::memory::Buffer;

struct BindingInner {
    shared: Arc<Shared>,
    kernel: Kernel,
    set: vk::DescriptorSet,
    /// The pool the set came from.
    pool: vk::DescriptorPool,
    /// Kept alive while the descriptor set points at them.
    _buffers: Vec<Buffer>,
}

impl Drop for BindingInner {
    fn drop(&mut self) {
        let _pools = lock(&self.shared.desc_pool);
        // SAFETY: the set came from `self.pool` (created with FREE_DESCRIPTOR_SET, alive
        // while the context is), freed under the pools' lock; no pending command uses it
        // (recordings hold their bindings; submits wait).
        unsafe {
            let _ = self
                .shared
                .device
                .free_descriptor_sets(self.pool, &[self.set]);
        }
    }
}

/// A kernel with its buffers bound (descriptor set 0, binding i = `buffers[i]`, whole
/// buffers). Cheap to clone.
#[derive(Clone)]
pub struct Binding(Arc<BindingInner>);

impl Binding {
    pub fn kernel(&self) -> Kernel {
        self.0.kernel
    }
}

impl Context {
    /// Binds `buffers` to `kernel`'s bindings 0.. in order.
    pub fn bind(&self, kernel: Kernel, buffers: &[&Buffer]) -> Result<Binding> {
        let desc = kernel.desc();
        // Refuses a kernel this context cannot run ([`Context::runs`]) first.
        let layouts = [self.pipeline(kernel)?.set_layout];
        if buffers.len() != desc.bindings as usize {
            return Err(VkError::Invalid(format!(
                "{} takes {} buffers, got {}",
                desc.name,
                desc.bindings,
                buffers.len()
            )));
        }
        let dev = self.device();
        let (set, pool) = {
            let mut pools = lock(&self.shared.desc_pool);
            // Every pool from the newest back (freed sets make room in older ones), then
            // a new pool.
            let mut got = None;
            for &pool in pools.iter().rev() {
                let info = vk::DescriptorSetAllocateInfo::default()
                    .descriptor_pool(pool)
                    .set_layouts(&layouts);
                // SAFETY: the pools are locked; the layout is alive.
                match unsafe { dev.allocate_descriptor_sets(&info) } {
                    Ok(sets) => {
                        got = Some((sets[0], pool));
                        break;
                    }
                    Err(vk::Result::ERROR_OUT_OF_POOL_MEMORY)
                    | Err(vk::Result::ERROR_FRAGMENTED_POOL) => continue,
                    Err(r) => return Err(VkError::from_vk("allocating a descriptor set", r)),
                }
            }
            match got {
                Some(g) => g,
                None => {
                    let pool = crate::context::new_descriptor_pool(dev)?;
                    pools.push(pool);
                    let info = vk::DescriptorSetAllocateInfo::default()
                        .descriptor_pool(pool)
                        .set_layouts(&layouts);
                    // SAFETY: as above, on the fresh pool.
                    let sets = unsafe { dev.allocate_descriptor_sets(&info) }
                        .map_err(|r| VkError::from_vk("allocating a descriptor set", r))?;
                    (sets[0], pool)
                }
            }
        };
        let infos: Vec<[vk::DescriptorBufferInfo; 1]> = buffers
            .iter()
            .map(|b| {
                [vk::DescriptorBufferInfo {
                    buffer: b.handle(),
                    offset: b.offset(),
                    range: if b.is_view() {
                        b.size()
                    } else {
                        vk::WHOLE_SIZE
                    },
                }]
            })
            .collect();
        let writes: Vec<vk::WriteDescriptorSet> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(i as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        // SAFETY: the set is fresh and unused; buffers are alive and no larger than
        // maxStorageBufferRange (create_buffer guarantees it).
        unsafe { dev.update_descriptor_sets(&writes, &[]) };
        Ok(Binding(Arc::new(BindingInner {
            shared: self.shared.clone(),
            kernel,
            set,
            pool,
            _buffers: buffers.iter().map(|&b| b.clone()).collect(),
        })))
    }

    /// Records a reusable command buffer with `f`.
    pub fn record(&self, f: impl FnOnce(&mut Recorder<'_>) -> Result<()>) -> Result<Recording> {
        self.record_with(false, f)
    }

    /// [`Context::record`]; with `profile`, [`Recorder::mark`] writes GPU timestamps
    /// that [`Recording::profile`] reads back after each submit (a development tool:
    /// timestamps cost a little and serialise nothing extra, marks follow barriers).
    pub fn record_with(
        &self,
        profile: bool,
        f: impl FnOnce(&mut Recorder<'_>) -> Result<()>,
    ) -> Result<Recording> {
        let pool = if profile && self.info.timestamp_valid_bits > 0 {
            let info = vk::QueryPoolCreateInfo::default()
                .query_type(vk::QueryType::TIMESTAMP)
                .query_count(MAX_MARKS);
            // SAFETY: plain object creation, destroyed by the Recording (or below).
            Some(
                unsafe { self.device().create_query_pool(&info, None) }
                    .vk("creating a query pool")?,
            )
        } else {
            None
        };
        let cmd = match self.alloc_cmd() {
            Ok(c) => c,
            Err(e) => {
                if let Some(p) = pool {
                    // SAFETY: created above, unused.
                    unsafe { self.device().destroy_query_pool(p, None) };
                }
                return Err(e);
            }
        };
        let mut rec = Recorder {
            ctx: self,
            cmd,
            kept: Vec::new(),
            kept_buffers: Vec::new(),
            dispatches: 0,
            copies: 0,
            pool,
            marks: Vec::new(),
        };
        let r = (|| {
            // SAFETY: fresh command buffer from our pool, recorded by this thread only.
            unsafe {
                self.device()
                    .begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())
                    .vk("recording commands")?;
                full_barrier(self.device(), cmd);
                if let Some(p) = pool {
                    self.device().cmd_reset_query_pool(cmd, p, 0, MAX_MARKS);
                }
            }
            rec.mark("start");
            f(&mut rec)?;
            // SAFETY: as above.
            unsafe {
                full_barrier(self.device(), cmd);
                self.device()
                    .end_command_buffer(cmd)
                    .vk("recording commands")
            }
        })();
        match r {
            Ok(()) => Ok(Recording {
                shared: self.shared.clone(),
                cmd,
                _kept: rec.kept,
                _kept_buffers: rec.kept_buffers,
                dispatches: rec.dispatches,
                copies: rec.copies,
                pool: rec.pool,
                marks: rec.marks,
                tick_ns: self.info.timestamp_period as f64,
            }),
            Err(e) => {
                self.free_cmd(cmd);
                if let Some(p) = pool {
                    // SAFETY: the command buffer that used it is freed, never submitted.
                    unsafe { self.device().destroy_query_pool(p, None) };
                }
                Err(e)
            }
        }
    }

    /// Submits `rec` and waits until it has run.
    pub fn submit(&self, rec: &Recording) -> Result<()> {
        if !Arc::ptr_eq(&rec.shared, &self.shared) {
            return Err(VkError::Invalid(
                "a recording was submitted to another context than the one that made it".into(),
            ));
        }
        self.submit_wait(rec.cmd, "running kernels")
    }
}

/// Timestamps one profiled recording may write.
const MAX_MARKS: u32 = 8192;

/// Records dispatches into a command buffer; see [`Context::record`].
pub struct Recorder<'a> {
    ctx: &'a Context,
    cmd: vk::CommandBuffer,
    kept: Vec<Binding>,
    kept_buffers: Vec<Buffer>,
    dispatches: u32,
    copies: u32,
    pool: Option<vk::QueryPool>,
    marks: Vec<&'static str>,
}

impl Recorder<'_> {
    /// In a profiled recording, writes a timestamp once every command recorded so far
    /// has finished; the time since the previous mark is attributed to `label`. Does
    /// nothing otherwise (or past the recording's mark capacity).
    pub fn mark(&mut self, label: &'static str) {
        let Some(pool) = self.pool else { return };
        if self.marks.len() as u32 >= MAX_MARKS {
            return;
        }
        // SAFETY: recording state; the query was reset at the start of the buffer.
        unsafe {
            self.ctx.device().cmd_write_timestamp(
                self.cmd,
                vk::PipelineStageFlags::BOTTOM_OF_PIPE,
                pool,
                self.marks.len() as u32,
            )
        };
        self.marks.push(label);
    }

    /// Dispatches `groups` workgroups (a flat count, laid out 2D as the kernels expect)
    /// of `b`'s kernel with push constants `push` (exactly its declared size).
    pub fn dispatch(&mut self, b: &Binding, push: &[u8], groups: u64) -> Result<()> {
        let desc = b.kernel().desc();
        if push.len() != desc.push_bytes as usize {
            return Err(VkError::Invalid(format!(
                "{} takes {} bytes of push constants, got {}",
                desc.name,
                desc.push_bytes,
                push.len()
            )));
        }
        if groups == 0 {
            return Ok(());
        }
        let [max_x, max_y, _] = self.ctx.info.max_compute_work_group_count;
        let gx = groups.min(max_x as u64);
        let gy = groups.div_ceil(gx);
        if gy > max_y as u64 {
            return Err(VkError::Invalid(format!(
                "{groups} workgroups of {} exceed the device's dispatch limits",
                desc.name
            )));
        }
        let p = self.ctx.pipeline(b.kernel())?;
        let dev = self.ctx.device();
        // SAFETY: recording state; pipeline, layout and set are alive and compatible
        // (all from the same kernel-table entry).
        unsafe {
            dev.cmd_bind_pipeline(self.cmd, vk::PipelineBindPoint::COMPUTE, p.pipeline);
            dev.cmd_bind_descriptor_sets(
                self.cmd,
                vk::PipelineBindPoint::COMPUTE,
                p.layout,
                0,
                &[b.0.set],
                &[],
            );
            dev.cmd_push_constants(self.cmd, p.layout, vk::ShaderStageFlags::COMPUTE, 0, push);
            dev.cmd_dispatch(self.cmd, gx as u32, gy as u32, 1);
        }
        self.kept.push(b.clone());
        self.dispatches += 1;
        Ok(())
    }

    /// Copies `size` bytes from `src` (from byte 0) to `dst` (from byte 0), then makes
    /// the copy visible to later dispatches and to host reads after the submit.
    pub fn copy(&mut self, src: &Buffer, dst: &Buffer, size: u64) -> Result<()> {
        self.copy_at(src, 0, dst, 0, size)
    }

    /// [`Recorder::copy`] of bytes `src_at ..` of `src` to `dst_at ..` of `dst`.
    pub fn copy_at(
        &mut self,
        src: &Buffer,
        src_at: u64,
        dst: &Buffer,
        dst_at: u64,
        size: u64,
    ) -> Result<()> {
        self.copies(&[(src, src_at, dst, dst_at, size)])
    }

    /// Several independent copies (`src`, `src_at`, `dst`, `dst_at`, bytes), as
    /// [`Recorder::copy_at`] each, behind one pair of barriers: none may read what
    /// another writes.
    pub fn copies(&mut self, list: &[(&Buffer, u64, &Buffer, u64, u64)]) -> Result<()> {
        for &(src, src_at, dst, dst_at, size) in list {
            let fits = |at: u64, b: &Buffer| at.checked_add(size).is_some_and(|e| e <= b.size());
            if size == 0 || !fits(src_at, src) || !fits(dst_at, dst) {
                return Err(VkError::Invalid(format!(
                    "copying {size} bytes between buffers of {} and {}",
                    src.size(),
                    dst.size()
                )));
            }
        }
        let dev = self.ctx.device();
        let before = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::HOST_WRITE)
            .dst_access_mask(vk::AccessFlags::TRANSFER_READ | vk::AccessFlags::TRANSFER_WRITE)];
        let after = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(
                vk::AccessFlags::SHADER_READ
                    | vk::AccessFlags::SHADER_WRITE
                    | vk::AccessFlags::HOST_READ,
            )];
        // SAFETY: recording state; every buffer is alive (kept below) and large enough.
        unsafe {
            dev.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::HOST,
                vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &before,
                &[],
                &[],
            );
            for &(src, src_at, dst, dst_at, size) in list {
                let region = [vk::BufferCopy {
                    src_offset: src.offset() + src_at,
                    dst_offset: dst.offset() + dst_at,
                    size,
                }];
                dev.cmd_copy_buffer(self.cmd, src.handle(), dst.handle(), &region);
            }
            dev.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &after,
                &[],
                &[],
            );
        }
        for &(src, _, dst, _, _) in list {
            self.kept_buffers.push(src.clone());
            self.kept_buffers.push(dst.clone());
            self.copies += 1;
        }
        Ok(())
    }

    /// Makes every earlier dispatch's writes visible to later dispatches.
    pub fn barrier(&mut self) {
        let mb = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE)
            .dst_access_mask(vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE)];
        // SAFETY: recording state.
        unsafe {
            self.ctx.device().cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &mb,
                &[],
                &[],
            )
        };
    }
}

/// A recorded command buffer, submitted with [`Context::submit`] as often as wanted.
pub struct Recording {
    shared: Arc<Shared>,
    cmd: vk::CommandBuffer,
    _kept: Vec<Binding>,
    _kept_buffers: Vec<Buffer>,
    dispatches: u32,
    copies: u32,
    pool: Option<vk::QueryPool>,
    marks: Vec<&'static str>,
    tick_ns: f64,
}

impl Recording {
    /// For a profiled recording after a submit: nanoseconds between consecutive marks,
    /// each labelled with the later mark's label. `None` when not profiled.
    pub fn profile(&self) -> Result<Option<Vec<(&'static str, f64)>>> {
        let Some(pool) = self.pool else {
            return Ok(None);
        };
        let n = self.marks.len();
        let mut ticks = vec![0u64; n];
        if n > 0 {
            // SAFETY: the queries were written by the last submit, which was waited for.
            unsafe {
                self.shared.device.get_query_pool_results(
                    pool,
                    0,
                    &mut ticks,
                    vk::QueryResultFlags::TYPE_64 | vk::QueryResultFlags::WAIT,
                )
            }
            .vk("reading timestamps")?;
        }
        Ok(Some(
            (1..n)
                .map(|i| {
                    let dt = ticks[i].wrapping_sub(ticks[i - 1]) as f64 * self.tick_ns;
                    (self.marks[i], dt)
                })
                .collect(),
        ))
    }

    /// Dispatches recorded.
    pub fn dispatches(&self) -> u32 {
        self.dispatches
    }

    /// Buffer copies recorded.
    pub fn copies(&self) -> u32 {
        self.copies
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        free_cmd(&self.shared, self.cmd);
        if let Some(p) = self.pool {
            // SAFETY: no pending command uses it (submits wait), its buffer is freed.
            unsafe { self.shared.device.destroy_query_pool(p, None) };
        }
    }
}

impl Context {
    /// The device's memory bandwidth in bytes per second: a buffer of up to 1 GiB
    /// (bounded by [`Context::max_buffer_bytes`]) copied 8 times by the `copy` kernel,
    /// the fastest of such runs over at least 0.25 s, timed with GPU timestamps where the
    /// queue has them (host time otherwise), counting read + write bytes; the best of
    /// three pairs of fresh buffers (on the H100 one pair in two read ~1,700 GB/s and the
    /// next ~2,990: where an allocation lands matters). Allocates two such buffers at a
    /// time for the duration of the call.
    pub fn measure_copy_bandwidth(&self) -> Result<f64> {
        let mut best = 0f64;
        for _ in 0..3 {
            best = best.max(self.copy_bandwidth_once()?);
        }
        Ok(best)
    }

    fn copy_bandwidth_once(&self) -> Result<f64> {
        let size = (1u64 << 30).min(self.max_buffer_bytes() / 256 * 256);
        let a = self.create_buffer(size, crate::memory::MemoryKind::Device)?;
        let b = self.create_buffer(size, crate::memory::MemoryKind::Device)?;
        let binding = self.bind(Kernel::Copy, &[&a, &b])?;
        let n = (size / 16) as u32;
        let wg = self.tuning().workgroup_size as u64;
        let groups = (n as u64 / wg / 4).max(1);
        let reps = 8u32;
        let rec = self.record_with(true, |r| {
            for _ in 0..reps {
                r.dispatch(&binding, &n.to_le_bytes(), groups)?;
                r.barrier();
            }
            r.mark("copies");
            Ok(())
        })?;
        // The best of several runs over at least a quarter second: the first ones may
        // find the clocks low.
        let mut ns = f64::INFINITY;
        let start = std::time::Instant::now();
        let mut runs = 0;
        while runs < 4 || start.elapsed().as_secs_f64() < 0.25 {
            runs += 1;
            let t = std::time::Instant::now();
            self.submit(&rec)?;
            let host_ns = t.elapsed().as_nanos() as f64;
            let run = match rec.profile()? {
                Some(p) => p.iter().map(|(_, ns)| ns).sum::<f64>(),
                None => host_ns,
            };
            ns = ns.min(run);
        }
        Ok(2.0 * size as f64 * reps as f64 / (ns.max(1.0) * 1e-9))
    }
}
