//! Buffers, and tensors split over several buffers.
//!
//! Allocation is our own and deliberately plain: every buffer owns one dedicated
//! `VkDeviceMemory` allocation, and no buffer is larger than
//! [`Context::max_buffer_bytes`] = min(maxStorageBufferRange, maxMemoryAllocationSize),
//! so no allocation passes the driver's limit and every buffer can be bound whole
//! (lavapipe: 128 MiB per binding; Arc and NVIDIA: about 4 GiB per allocation). A
//! tensor larger than that is a [`DeviceTensor`] of several buffers, split between rows.
//!
//! Device-local buffers are filled through a host-visible staging buffer and read back
//! through a host-visible one.

use std::sync::Arc;

use ash::vk;

use crate::context::{host_read_barrier, Context, Shared};
use crate::error::{Result, VkError, VkResultExt};

/// Largest staging buffer one upload or download uses; larger data goes in chunks.
const STAGING_BYTES: u64 = 16 << 20;

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Device-local (VRAM); filled and read through staging.
    Device,
    /// Host-visible and coherent, written by the host (staging for uploads).
    Upload,
    /// Host-visible and coherent, read by the host (cached where the device offers it).
    Readback,
}

struct BufferInner {
    shared: Arc<Shared>,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    size: u64,
    kind: MemoryKind,
    /// Host address of the whole buffer for host-visible kinds, else null.
    mapped: *mut u8,
    /// A view ([`Buffer::view`]): bytes `offset .. offset + size` of `parent`, whose
    /// buffer and memory it borrows (and does not free).
    offset: u64,
    parent: Option<Buffer>,
}

// SAFETY: the mapped pointer is only dereferenced through `&mut`/exclusive paths of the
// owning context's methods (uploads and downloads run under the queue lock and wait).
unsafe impl Send for BufferInner {}
// SAFETY: as above.
unsafe impl Sync for BufferInner {}

impl Drop for BufferInner {
    fn drop(&mut self) {
        if self.parent.is_some() {
            return; // a view: the parent owns the buffer and its memory
        }
        // SAFETY: no command using the buffer is pending: every submit waits, and
        // bindings/recordings hold a clone of the buffer while they live.
        unsafe {
            let dev = &self.shared.device;
            if !self.mapped.is_null() {
                dev.unmap_memory(self.memory);
            }
            dev.destroy_buffer(self.buffer, None);
            dev.free_memory(self.memory, None);
        }
    }
}

/// A storage buffer with its own memory; cheap to clone (shared ownership).
#[derive(Clone)]
pub struct Buffer(Arc<BufferInner>);

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} bytes, {:?})", self.0.size, self.0.kind)
    }
}

impl Buffer {
    pub fn size(&self) -> u64 {
        self.0.size
    }

    pub fn kind(&self) -> MemoryKind {
        self.0.kind
    }

    pub(crate) fn handle(&self) -> vk::Buffer {
        self.0.buffer
    }

    /// Byte offset of this buffer within its Vulkan buffer (non-zero for views only).
    pub(crate) fn offset(&self) -> u64 {
        self.0.offset
    }

    /// Whether this is a view of part of another buffer.
    pub(crate) fn is_view(&self) -> bool {
        self.0.parent.is_some()
    }

    /// Offsets of views must be multiples of this (the largest
    /// minStorageBufferOffsetAlignment Vulkan allows, so it holds on every device).
    pub const VIEW_ALIGN: u64 = 256;

    /// Bytes `offset .. offset + size` of this device-local buffer as a buffer of their
    /// own (sharing its memory), for binding part of a buffer: a sequence's page table
    /// or recurrent states in a batch's pools. `offset` must be a multiple of [`Buffer::VIEW_ALIGN`] and `size`
    /// of 4.
    pub fn view(&self, offset: u64, size: u64) -> Result<Buffer> {
        let base = self.offset() + offset;
        if self.kind() != MemoryKind::Device
            || !base.is_multiple_of(Self::VIEW_ALIGN)
            || !size.is_multiple_of(4)
            || size == 0
            || offset.checked_add(size).is_none_or(|e| e > self.size())
        {
            return Err(VkError::Invalid(format!(
                "a view of {size} bytes at {offset} of a {:?} buffer of {} bytes",
                self.kind(),
                self.size()
            )));
        }
        let root = self.0.parent.clone().unwrap_or_else(|| self.clone());
        Ok(Buffer(Arc::new(BufferInner {
            shared: self.0.shared.clone(),
            buffer: self.0.buffer,
            memory: self.0.memory,
            size,
            kind: self.0.kind,
            mapped: std::ptr::null_mut(),
            offset: base,
            parent: Some(root),
        })))
    }
}

/// One buffer of a [`DeviceTensor`]: rows `first_row .. first_row + rows`.
#[derive(Clone, Debug)]
pub struct TensorPiece {
    pub buffer: Buffer,
    pub first_row: u64,
    pub rows: u64,
}

/// A row-major tensor of `rows` rows of `row_bytes` bytes (raw blocks for quantized
/// types), held in one or more device-local buffers; every piece holds whole rows and
/// row `r` of a piece starts at byte `r * row_bytes` of its buffer.
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    pub rows: u64,
    pub row_bytes: u64,
    pub pieces: Vec<TensorPiece>,
}

impl Context {
    /// Creates a buffer of `size` bytes (at most [`Context::max_buffer_bytes`]), rounded
    /// up to a multiple of 4: shaders see storage buffers as 32-bit words, and a range
    /// that ends mid-word would hide its last bytes.
    pub fn create_buffer(&self, size: u64, kind: MemoryKind) -> Result<Buffer> {
        if size == 0 || size > self.max_buffer_bytes {
            return Err(VkError::Invalid(format!(
                "a buffer of {size} bytes: buffers must hold 1 to {} bytes on {} \
                 (split larger tensors with upload_rows)",
                self.max_buffer_bytes, self.info.name
            )));
        }
        // `max_buffer_bytes` is a multiple of 256, so the rounded size still fits.
        let size = size.next_multiple_of(4);
        let dev = self.device();
        let usage = vk::BufferUsageFlags::STORAGE_BUFFER
            | vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST;
        let qf = [self.queue_family];
        let info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(usage)
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .queue_family_indices(&qf);
        let oom = |r: vk::Result, what: &str| match r {
            vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
                VkError::OutOfDeviceMemory {
                    what: what.to_string(),
                    bytes: size,
                }
            }
            r => VkError::from_vk("creating a buffer", r),
        };
        // SAFETY: valid device; the buffer is destroyed on every error path.
        let buffer =
            unsafe { dev.create_buffer(&info, None) }.map_err(|r| oom(r, "creating a buffer"))?;
        let destroy_buffer = || unsafe { dev.destroy_buffer(buffer, None) };
        // SAFETY: `buffer` is valid.
        let req = unsafe { dev.get_buffer_memory_requirements(buffer) };
        if req.size > self.info.max_memory_allocation_size {
            destroy_buffer();
            return Err(VkError::Invalid(format!(
                "a buffer of {size} bytes needs {} bytes of memory, more than one allocation \
                 may hold on {} ({})",
                req.size, self.info.name, self.info.max_memory_allocation_size
            )));
        }
        let Some(type_index) = self.memory_type(req.memory_type_bits, kind) else {
            destroy_buffer();
            return Err(VkError::NoMemoryType {
                what: format!("a {kind:?} buffer"),
                wanted: match kind {
                    MemoryKind::Device => "usable for storage buffers",
                    _ => "host-visible and coherent",
                },
            });
        };
        let alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(req.size)
            .memory_type_index(type_index);
        // SAFETY: valid device and allocate info.
        let memory = match unsafe { dev.allocate_memory(&alloc, None) } {
            Ok(m) => m,
            Err(r) => {
                destroy_buffer();
                return Err(oom(r, "allocating device memory"));
            }
        };
        let fail = |e: VkError| {
            // SAFETY: both objects were created above and are unused.
            unsafe {
                dev.destroy_buffer(buffer, None);
                dev.free_memory(memory, None);
            }
            e
        };
        // SAFETY: fresh memory of a type the buffer accepts, offset 0.
        unsafe { dev.bind_buffer_memory(buffer, memory, 0) }
            .vk("binding buffer memory")
            .map_err(fail)?;
        let mapped = if kind == MemoryKind::Device {
            std::ptr::null_mut()
        } else {
            // SAFETY: host-visible memory, mapped once for the buffer's lifetime.
            unsafe { dev.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) }
                .vk("mapping host-visible memory")
                .map_err(fail)? as *mut u8
        };
        Ok(Buffer(Arc::new(BufferInner {
            shared: self.shared.clone(),
            buffer,
            memory,
            size,
            kind,
            mapped,
            offset: 0,
            parent: None,
        })))
    }

    fn memory_type(&self, bits: u32, kind: MemoryKind) -> Option<u32> {
        let props = &self.shared.mem_props;
        let types = props.memory_types_as_slice();
        let find = |want: vk::MemoryPropertyFlags| {
            types
                .iter()
                .enumerate()
                .find(|(i, t)| bits & (1 << i) != 0 && t.property_flags.contains(want))
                .map(|(i, _)| i as u32)
        };
        use vk::MemoryPropertyFlags as F;
        match kind {
            MemoryKind::Device => find(F::DEVICE_LOCAL).or_else(|| find(F::empty())),
            MemoryKind::Upload => find(F::HOST_VISIBLE | F::HOST_COHERENT),
            MemoryKind::Readback => find(F::HOST_VISIBLE | F::HOST_COHERENT | F::HOST_CACHED)
                .or_else(|| find(F::HOST_VISIBLE | F::HOST_COHERENT)),
        }
    }

    /// Copies `data` into `dst` at byte `offset` through a staging buffer.
    pub fn write_buffer(&self, dst: &Buffer, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > dst.size()) {
            return Err(VkError::Invalid(format!(
                "writing {len} bytes at {offset} into a buffer of {}",
                dst.size()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let staging = self.create_buffer(len.min(STAGING_BYTES), MemoryKind::Upload)?;
        let mut done = 0u64;
        for chunk in data.chunks(staging.size() as usize) {
            // SAFETY: `mapped` covers `staging.size()` bytes, chunk is no longer; no
            // command is reading staging (the previous copy was waited for).
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), staging.0.mapped, chunk.len()) };
            let region = [vk::BufferCopy {
                src_offset: 0,
                dst_offset: dst.offset() + offset + done,
                size: chunk.len() as u64,
            }];
            self.one_shot("uploading to the device", |dev, cmd| {
                // SAFETY: both buffers are alive and large enough (checked above).
                unsafe { dev.cmd_copy_buffer(cmd, staging.handle(), dst.handle(), &region) };
            })?;
            done += chunk.len() as u64;
            self.report_upload(chunk.len() as u64);
        }
        Ok(())
    }

    /// Copies byte ranges within device buffers, all in one submit (waited for): each
    /// `(buffer, src, dst, size)` copies `size` bytes of `buffer` at `src` to `dst`
    /// (relative to the buffer; the two ranges must not overlap). Every earlier submit
    /// has finished (each submit waits), and the next one's leading barrier makes the
    /// copies visible to its kernels.
    pub fn copy_within(&self, copies: &[(&Buffer, u64, u64, u64)]) -> Result<()> {
        let mut all = Vec::with_capacity(copies.len());
        for &(buf, src, dst, size) in copies {
            let inside = |at: u64| at.checked_add(size).is_some_and(|e| e <= buf.size());
            if !inside(src) || !inside(dst) || src.max(dst) < src.min(dst) + size {
                return Err(VkError::Invalid(format!(
                    "copying {size} bytes from {src} to {dst} within a buffer of {}",
                    buf.size()
                )));
            }
            if size > 0 {
                let region = vk::BufferCopy {
                    src_offset: buf.offset() + src,
                    dst_offset: buf.offset() + dst,
                    size,
                };
                all.push((buf.handle(), [region]));
            }
        }
        if all.is_empty() {
            return Ok(());
        }
        self.one_shot("copying within device buffers", |dev, cmd| {
            for (h, region) in &all {
                // SAFETY: the buffers are alive (borrowed), the ranges inside them and
                // disjoint (checked above).
                unsafe { dev.cmd_copy_buffer(cmd, *h, *h, region) };
            }
        })
    }

    /// Zeroes each of `bufs` (views: their range only), all in one submit (waited for;
    /// the next submit's leading barrier makes the zeros visible to its kernels).
    pub fn fill_zero(&self, bufs: &[&Buffer]) -> Result<()> {
        let mut all = Vec::with_capacity(bufs.len());
        for b in bufs {
            if b.kind() != MemoryKind::Device || !b.size().is_multiple_of(4) {
                return Err(VkError::Invalid(format!(
                    "zeroing a {:?} buffer of {} bytes",
                    b.kind(),
                    b.size()
                )));
            }
            if b.size() > 0 {
                all.push((b.handle(), b.offset(), b.size()));
            }
        }
        if all.is_empty() {
            return Ok(());
        }
        self.one_shot("zeroing device buffers", |dev, cmd| {
            for &(h, offset, size) in &all {
                // SAFETY: the buffers are alive (borrowed); offset and size are
                // multiples of 4 within the buffer (views lie inside their parent).
                unsafe { dev.cmd_fill_buffer(cmd, h, offset, size, 0) };
            }
        })
    }

    /// Reads `len` bytes of `src` from byte `offset` through a readback buffer.
    pub fn read_buffer(&self, src: &Buffer, offset: u64, len: u64) -> Result<Vec<u8>> {
        if offset.checked_add(len).is_none_or(|end| end > src.size()) {
            return Err(VkError::Invalid(format!(
                "reading {len} bytes at {offset} from a buffer of {}",
                src.size()
            )));
        }
        let mut out = Vec::with_capacity(len as usize);
        if len == 0 {
            return Ok(out);
        }
        let staging = self.create_buffer(len.min(STAGING_BYTES), MemoryKind::Readback)?;
        while (out.len() as u64) < len {
            let n = (len - out.len() as u64).min(staging.size());
            let region = [vk::BufferCopy {
                src_offset: src.offset() + offset + out.len() as u64,
                dst_offset: 0,
                size: n,
            }];
            self.one_shot("reading back from the device", |dev, cmd| {
                // SAFETY: both buffers are alive and large enough (checked above).
                unsafe { dev.cmd_copy_buffer(cmd, src.handle(), staging.handle(), &region) };
                host_read_barrier(dev, cmd);
            })?;
            // SAFETY: the copy finished (waited) and made its writes host-visible;
            // `mapped` covers at least `n` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(staging.0.mapped, n as usize) };
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    /// A new device-local buffer holding `data`.
    pub fn upload(&self, data: &[u8]) -> Result<Buffer> {
        let buf = self.create_buffer(data.len() as u64, MemoryKind::Device)?;
        self.write_buffer(&buf, 0, data)?;
        Ok(buf)
    }

    /// A new device-local buffer holding `data` as f32.
    pub fn upload_f32(&self, data: &[f32]) -> Result<Buffer> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload(&bytes)
    }

    /// Reads `n` f32 values from the start of `src`.
    pub fn read_f32(&self, src: &Buffer, n: usize) -> Result<Vec<f32>> {
        let bytes = self.read_buffer(src, 0, (n as u64).saturating_mul(4))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Uploads a row-major tensor (`data.len() / row_bytes` rows) into as few
    /// device-local buffers as [`Context::max_buffer_bytes`] allows, split between rows.
    pub fn upload_rows(&self, data: &[u8], row_bytes: u64) -> Result<DeviceTensor> {
        self.upload_rows_grouped(&[data], row_bytes, 1)
    }
}

/// Bytes past the last row of every weight piece: kernels read whole words (and the
/// word after) at 2-byte-aligned block offsets, so the tail must be addressable.
pub const PIECE_PAD: u64 = 16;

impl Context {
    /// Uploads the row-major tensors `parts` (all rows of `row_bytes` bytes) as one
    /// tensor whose rows are those of `parts[0]`, then `parts[1]`, ... (fused
    /// projections), split between rows as [`Context::upload_rows`] does. Each piece is
    /// written straight from the parts' bytes, never assembled on the host.
    pub fn upload_rows_concat(&self, parts: &[&[u8]], row_bytes: u64) -> Result<DeviceTensor> {
        self.upload_rows_grouped(parts, row_bytes, 1)
    }

    /// [`Context::upload_rows_concat`] where every piece holds a multiple of `group`
    /// rows (the gate/up pairs of a gated MLP stay in one piece).
    pub fn upload_rows_grouped(
        &self,
        parts: &[&[u8]],
        row_bytes: u64,
        group: u64,
    ) -> Result<DeviceTensor> {
        if group == 0
            || row_bytes == 0
            || parts
                .iter()
                .any(|p| !(p.len() as u64).is_multiple_of(row_bytes))
        {
            return Err(VkError::Invalid(format!(
                "tensors to concatenate are not whole rows of {row_bytes} bytes"
            )));
        }
        let rows: u64 = parts.iter().map(|p| p.len() as u64 / row_bytes).sum();
        if !rows.is_multiple_of(group) {
            return Err(VkError::Invalid(format!(
                "{rows} rows are not whole groups of {group}"
            )));
        }
        let rows_per_piece =
            (self.max_buffer_bytes.saturating_sub(PIECE_PAD) / row_bytes) / group * group;
        if rows_per_piece == 0 {
            return Err(VkError::Invalid(format!(
                "one row of {row_bytes} bytes is larger than a buffer may be on {} ({} bytes)",
                self.info.name, self.max_buffer_bytes
            )));
        }
        let mut pieces = Vec::new();
        let mut first = 0u64;
        while first < rows {
            let n = rows_per_piece.min(rows - first);
            let buffer = self.create_buffer(n * row_bytes + PIECE_PAD, MemoryKind::Device)?;
            // Copy rows first .. first + n from whichever parts hold them.
            let (lo, hi) = (first * row_bytes, (first + n) * row_bytes);
            let mut at = 0u64;
            for part in parts {
                let (s, e) = (at, at + part.len() as u64);
                at = e;
                let (a, b) = (s.max(lo), e.min(hi));
                if a < b {
                    self.write_buffer(&buffer, a - lo, &part[(a - s) as usize..(b - s) as usize])?;
                }
            }
            pieces.push(TensorPiece {
                buffer,
                first_row: first,
                rows: n,
            });
            first += n;
        }
        Ok(DeviceTensor {
            rows,
            row_bytes,
            pieces,
        })
    }

    /// Writes `data` at byte `offset` of a host-visible buffer through its mapping. The
    /// caller makes sure no submitted command is using the buffer (every submit waits).
    pub fn write_mapped(&self, dst: &Buffer, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if dst.0.mapped.is_null() || offset.checked_add(len).is_none_or(|e| e > dst.size()) {
            return Err(VkError::Invalid(format!(
                "writing {len} bytes at {offset} into a {:?} buffer of {} bytes",
                dst.kind(),
                dst.size()
            )));
        }
        // SAFETY: the mapping covers the whole buffer and the range is inside it; no
        // command reads the buffer now (submits wait before returning).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                dst.0.mapped.add(offset as usize),
                data.len(),
            )
        };
        Ok(())
    }

    /// Reads the u32 at byte `offset` of a host-visible buffer through its mapping
    /// (after the submit that wrote it has been waited for).
    pub fn read_mapped_u32(&self, src: &Buffer, offset: u64) -> Result<u32> {
        if src.0.mapped.is_null()
            || !offset.is_multiple_of(4)
            || offset.checked_add(4).is_none_or(|e| e > src.size())
        {
            return Err(VkError::Invalid(format!(
                "reading a u32 at {offset} from a {:?} buffer of {} bytes",
                src.kind(),
                src.size()
            )));
        }
        // SAFETY: in range (checked), 4-aligned (mappings are at least 4-aligned), and the
        // write was made host-visible by the recording's host barrier and fence wait.
        Ok(unsafe { std::ptr::read(src.0.mapped.add(offset as usize) as *const u32) })
    }

    /// Reads `n` f32 values from byte `offset` of a host-visible buffer through its
    /// mapping (after the submit that wrote them has been waited for).
    pub fn read_mapped_f32(
        &self,
        src: &Buffer,
        offset: u64,
        n: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let len = (n as u64).checked_mul(4);
        if src.0.mapped.is_null()
            || !offset.is_multiple_of(4)
            || len
                .and_then(|l| l.checked_add(offset))
                .is_none_or(|e| e > src.size())
        {
            return Err(VkError::Invalid(format!(
                "reading {n} f32 at {offset} from a {:?} buffer of {} bytes",
                src.kind(),
                src.size()
            )));
        }
        // SAFETY: in range (checked), 4-aligned (mappings are at least 4-aligned), and the
        // writes were made host-visible by the recording's host barrier and fence wait.
        let vals = unsafe {
            std::slice::from_raw_parts(src.0.mapped.add(offset as usize) as *const f32, n)
        };
        out.extend_from_slice(vals);
        Ok(())
    }
}
