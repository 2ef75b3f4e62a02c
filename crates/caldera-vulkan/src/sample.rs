//! Greedy sampling on the device (`argmax.comp`): a step's logits rows reduced to the
//! index of each row's largest value, so that a greedy decode copies 4 bytes per
//! sequence back to the host instead of a vocabulary row (600 KB at 150k entries) and
//! the host does not scan it. The rule is `caldera_engine::sampler::argmax`'s: the
//! first of equal maxima, NaN ignored, 0 for a row of NaN. Its CPU twin is in
//! `tests/kernels.rs`.

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::kernels::Kernel;
use crate::memory::{Buffer, MemoryKind};
use crate::ops::{push_words, u32_of};
use crate::record::{Binding, Recorder};

/// Whether greedy sequences take their argmax from the device (the default);
/// `CALDERA_VK_HOST_ARGMAX=1` hands the rows back to the host instead (to compare the
/// two). Read once.
pub fn device_argmax() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CALDERA_VK_HOST_ARGMAX").is_none_or(|v| v == "0"))
}

/// Values of a row one workgroup scans (16 per invocation at 256).
const SPAN: u64 = 4096;

/// The index of the largest value of each of `rows` rows of `n` values, `ld` apart,
/// into `ids` (u32 per row). One dispatch of `rows x ceil(n / SPAN)` workgroups; it
/// owns its partials and per-row counts (zeroed here, and left zero by every dispatch).
pub struct Argmax {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
    _scratch: (Buffer, Buffer),
}

impl Argmax {
    pub fn new(
        ctx: &Context,
        logits: &Buffer,
        ids: &Buffer,
        n: u64,
        ld: u64,
        rows: u64,
    ) -> Result<Argmax> {
        if n == 0 || rows == 0 || ld < n {
            return Err(VkError::Invalid(format!(
                "argmax of {rows} rows of {n} values, {ld} apart"
            )));
        }
        if logits.size() < ((rows - 1) * ld + n) * 4 || ids.size() < rows * 4 {
            return Err(VkError::Invalid(format!(
                "argmax of {rows} rows of {n} values: buffers too small"
            )));
        }
        let parts = n.div_ceil(SPAN);
        let part = ctx.create_buffer(rows * parts * 8, MemoryKind::Device)?;
        let cnt = ctx.create_buffer(rows * 4, MemoryKind::Device)?;
        ctx.fill_zero(&[&cnt])?;
        let binding = ctx.bind(Kernel::Argmax, &[logits, &part, &cnt, ids])?;
        let push = push_words(&[
            u32_of(n, "values per row")?,
            u32_of(ld, "row stride")?,
            u32_of(rows, "rows")?,
            u32_of(parts, "parts")?,
            u32_of(SPAN, "span")?,
        ]);
        Ok(Argmax {
            binding,
            push,
            groups: rows * parts,
            _scratch: (part, cnt),
        })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}
