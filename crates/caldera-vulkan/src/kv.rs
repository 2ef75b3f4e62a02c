//! What the KV cache holds: f32, f16 (the default) or q8_0, and the bytes that takes.
//! The kernels read and write it through `shaders/kv.glsl` (the layouts are described
//! there), whose specialization constant 2 is [`KvType::spec`].

use crate::memory::Buffer;

/// Positions per page of the KV cache (`KV_PAGE` in `shaders/kv.glsl`): a cache is a
/// pool of pages, and a sequence's position p lives in row `table[p / KV_PAGE] *
/// KV_PAGE + p % KV_PAGE` of it, `table` its page table (u32 page ids, a device buffer
/// every kernel touching the cache binds). 16 as the CPU backend's pages and the
/// server's admission budget: a page of a 32-bit f16 cache with 8 kv heads of 128 is
/// 32 KiB per layer and K or V, and a decode split (32-128 positions) spans 2-9 pages,
/// which `attn_decode` looks up once per workgroup.
pub const KV_PAGE: usize = 16;

/// Page-table entries for `cap` positions.
pub fn table_entries(cap: usize) -> usize {
    cap.div_ceil(KV_PAGE).max(1)
}

/// Page-table entries per slot of a shared table (a slot's entries start at a multiple
/// of [`Buffer::VIEW_ALIGN`] bytes, so a sequence binds its own as a view).
pub fn slot_table_entries(cap: usize) -> usize {
    let unit = (Buffer::VIEW_ALIGN / 4) as usize;
    table_entries(cap).next_multiple_of(unit)
}

/// The element type of the KV cache, chosen per [`crate::Context`]
/// ([`crate::ContextOptions::kv_type`], `CALDERA_VK_KV=f32|f16|q8_0`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    /// 4 bytes a value.
    F32,
    /// 2 bytes a value (two per 32-bit word).
    #[default]
    F16,
    /// Blocks of 32 int8 values and their f32 scale: 36 bytes per 32 values. The scale
    /// is f32 rather than f16 so that a block is 9 whole words (every load aligned,
    /// no half-word unpacking) and the scale is the exact amax / 127 the writer used;
    /// it costs 2 bytes per 32 values over an f16 scale. Only for head sizes that are
    /// multiples of 32 (a block stays inside one head's row).
    Q8_0,
}

impl KvType {
    /// Every type, in the order of their names.
    pub const ALL: [KvType; 3] = [KvType::F32, KvType::F16, KvType::Q8_0];

    /// The name the command line and `CALDERA_VK_KV` use.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// The type named `s` (`f32`, `f16`, `q8_0`).
    pub fn parse(s: &str) -> Option<KvType> {
        KvType::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Specialization constant 2 of the kernels that touch the cache (`KV_TYPE` in
    /// `kv.glsl`).
    pub fn spec(self) -> u32 {
        match self {
            KvType::F32 => 0,
            KvType::F16 => 1,
            KvType::Q8_0 => 2,
        }
    }

    /// Bytes that `values` cache values take (whole 32-bit words; q8_0: whole blocks of
    /// 32).
    pub fn bytes(self, values: u64) -> u64 {
        match self {
            KvType::F32 => values * 4,
            KvType::F16 => values.div_ceil(2) * 4,
            KvType::Q8_0 => values.div_ceil(32) * 36,
        }
    }

    /// The bytes `(offset, len)` holding values `a .. b` of a cache (`a <= b`; for
    /// q8_0 both multiples of 32, whole blocks: a row of positions is whole heads of 32n
    /// values). f16 values are 2 bytes each, the even one in the low half of its word
    /// (`packHalf2x16`, little-endian), so any range is whole bytes.
    pub fn span(self, a: u64, b: u64) -> (u64, u64) {
        match self {
            KvType::F32 => (a * 4, (b - a) * 4),
            KvType::F16 => (a * 2, (b - a) * 2),
            KvType::Q8_0 => (a / 32 * 36, (b.div_ceil(32) - a / 32) * 36),
        }
    }

    /// Why heads of `head_dim` cannot use this cache, if they cannot.
    pub fn unsupported_head(self, head_dim: usize) -> Option<String> {
        (self == KvType::Q8_0 && !head_dim.is_multiple_of(32)).then(|| {
            format!(
                "a q8_0 KV cache needs head sizes that are multiples of 32 (blocks of 32 \
                 values per head), this model has heads of {head_dim}; use --kv-type f16"
            )
        })
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(KvType::F32.bytes(96), 384);
        assert_eq!(KvType::F16.bytes(96), 192);
        assert_eq!(KvType::F16.bytes(3), 8);
        assert_eq!(KvType::Q8_0.bytes(96), 108);
        assert_eq!(table_entries(0), 1);
        assert_eq!(table_entries(33), 3);
        assert_eq!(slot_table_entries(33), 64);
        assert_eq!(slot_table_entries(16 * 65), 128);
        for t in KvType::ALL {
            assert_eq!(KvType::parse(t.name()), Some(t));
        }
        assert_eq!(KvType::F32.span(3, 5), (12, 8));
        assert_eq!(KvType::F16.span(3, 6), (6, 6));
        assert_eq!(KvType::Q8_0.span(64, 128), (72, 72));
        assert!(KvType::Q8_0.unsupported_head(48).is_some());
        assert!(KvType::Q8_0.unsupported_head(64).is_none());
        assert!(KvType::F16.unsupported_head(48).is_none());
    }
}
