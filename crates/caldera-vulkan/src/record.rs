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
    /// Kept alive while the descriptor set points at them.
    _buffers: Vec<Buffer>,
}

impl Drop for BindingInner {
    fn drop(&mut self) {
        let pool = lock(&self.shared.desc_pool);
        // SAFETY: the set came from this pool (created with FREE_DESCRIPTOR_SET) and no
        // pending command uses it (recordings hold their bindings; submits wait).
        unsafe {
            let _ = self.shared.device.free_descriptor_sets(*pool, &[self.set]);
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
        if buffers.len() != desc.bindings as usize {
            return Err(VkError::Invalid(format!(
                "{} takes {} buffers, got {}",
                desc.name,
                desc.bindings,
                buffers.len()
            )));
        }
        let dev = self.device();
        let layouts = [self.pipeline(kernel).set_layout];
        let set = {
            let pool = lock(&self.shared.desc_pool);
            let info = vk::DescriptorSetAllocateInfo::default()
                .descriptor_pool(*pool)
                .set_layouts(&layouts);
            // SAFETY: the pool is locked; the layout is alive.
            let sets = unsafe { dev.allocate_descriptor_sets(&info) }.map_err(|r| match r {
                vk::Result::ERROR_OUT_OF_POOL_MEMORY | vk::Result::ERROR_FRAGMENTED_POOL => {
                    VkError::Invalid(format!(
                        "too many bound kernels at once (descriptor pool exhausted) binding {}",
                        desc.name
                    ))
                }
                r => VkError::from_vk("allocating a descriptor set", r),
            })?;
            sets[0]
        };
        let infos: Vec<[vk::DescriptorBufferInfo; 1]> = buffers
            .iter()
            .map(|b| {
                [vk::DescriptorBufferInfo {
                    buffer: b.handle(),
                    offset: 0,
                    range: vk::WHOLE_SIZE,
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
            _buffers: buffers.iter().map(|&b| b.clone()).collect(),
        })))
    }

    /// Records a reusable command buffer with `f`.
    pub fn record(&self, f: impl FnOnce(&mut Recorder<'_>) -> Result<()>) -> Result<Recording> {
        let cmd = self.alloc_cmd()?;
        let mut rec = Recorder {
            ctx: self,
            cmd,
            kept: Vec::new(),
            kept_buffers: Vec::new(),
            dispatches: 0,
            copies: 0,
        };
        let r = (|| {
            // SAFETY: fresh command buffer from our pool, recorded by this thread only.
            unsafe {
                self.device()
                    .begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())
                    .vk("recording commands")?;
                full_barrier(self.device(), cmd);
            }
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
            }),
            Err(e) => {
                self.free_cmd(cmd);
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

/// Records dispatches into a command buffer; see [`Context::record`].
pub struct Recorder<'a> {
    ctx: &'a Context,
    cmd: vk::CommandBuffer,
    kept: Vec<Binding>,
    kept_buffers: Vec<Buffer>,
    dispatches: u32,
    copies: u32,
}

impl Recorder<'_> {
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
        let p = self.ctx.pipeline(b.kernel());
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
        if size == 0 || size > src.size() || size > dst.size() {
            return Err(VkError::Invalid(format!(
                "copying {size} bytes between buffers of {} and {}",
                src.size(),
                dst.size()
            )));
        }
        let dev = self.ctx.device();
        let region = [vk::BufferCopy {
            src_offset: 0,
            dst_offset: 0,
            size,
        }];
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
        // SAFETY: recording state; both buffers are alive (kept below) and large enough.
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
            dev.cmd_copy_buffer(self.cmd, src.handle(), dst.handle(), &region);
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
        self.kept_buffers.push(src.clone());
        self.kept_buffers.push(dst.clone());
        self.copies += 1;
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
}

impl Recording {
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
    }
}
