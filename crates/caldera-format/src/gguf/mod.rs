//! GGUF versions 2 and 3, little-endian: reading (over a memory map or owned bytes)
//! and writing.
//!
//! Layout, every integer little-endian:
//! ```text
//! "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × (key: string, value_type u32, value)
//! tensor_count × (name: string, n_dims u32, ne[0..n_dims] u64, type u32, offset u64)
//! padding to `alignment` | data section (each tensor at data_offset + offset)
//! string = len u64 + UTF-8 bytes; array = elem_type u32 + count u64 + items
//! ```
//! `ne[0]` is the contiguous dimension. `alignment` is `general.alignment` (a `u32`,
//! non-zero power of two) or 32.
//!
//! Everything read from a file is checked before use; see [`GgufFile`] for the rules.

mod read;
mod value;
mod write;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::{FormatError, GgmlType, Result, Storage, TensorBytes};

pub use value::{GgufArray, GgufValue, GgufValueType};
pub use write::{GgufWriter, TensorSource};

/// The file magic, "GGUF".
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// GGML tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// How deeply arrays may nest (an array of scalars has depth 1).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Decoded metadata and tensor descriptions may take at most this many bytes of memory
/// beyond the file size; more means a hostile file (real vocabularies need tens of MiB).
pub const METADATA_MEMORY_SLACK: u64 = 64 << 20;

/// One tensor's description. `offset` is relative to the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// `ne[0]` (contiguous) first, as stored; 1 to 4 entries, each ≥ 1.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from [`GgufFile::data_offset`], a multiple of the file's alignment.
    pub offset: u64,
    /// Bytes of data: `row_bytes(ne[0]) × ne[1] × ne[2] × ne[3]`.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// The product of `dims` (saturating at `u64::MAX` for a description that did not
    /// come from a validated file).
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .unwrap_or(u64::MAX)
    }
}

/// A parsed GGUF file. Tensor data stays in the storage (usually a memory map) and is
/// handed out as [`TensorBytes`] views.
///
/// Invariants established by the parser (a file breaking any is an error, never a panic):
/// - magic "GGUF", little-endian version 2 or 3;
/// - counts, string lengths and array lengths fit in the bytes that remain; arrays nest at
///   most [`MAX_ARRAY_DEPTH`] deep; keys and strings are UTF-8; keys and tensor names are
///   non-empty and unique; bools are 0 or 1;
/// - `alignment` is a non-zero power of two; `data_offset` is the end of the tensor
///   descriptions rounded up to it;
/// - each tensor has 1..=4 dims, each ≥ 1 (empty tensors are refused), an element count
///   ≤ `i64::MAX`, `ne[0]` a multiple of its type's block size, a known type, an aligned
///   offset, and its bytes lie inside the file without overlapping another tensor's.
pub struct GgufFile {
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    store: Arc<Storage>,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Maps `path` read-only and parses it.
    pub fn open(path: &Path) -> Result<GgufFile> {
        GgufFile::from_storage(Arc::new(Storage::map_file(path)?))
    }

    pub fn from_storage(store: Arc<Storage>) -> Result<GgufFile> {
        let parsed = read::parse(&store)?;
        Ok(GgufFile {
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            store,
            metadata: parsed.metadata,
            key_index: parsed.key_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        })
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::from_storage(Arc::new(Storage::Owned(bytes)))
    }

    /// All key/value pairs in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Any non-negative integer value.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// Any integer value that fits an `i64`.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// Any numeric value.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// Any numeric value.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Tensor descriptions in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of `t`, a tensor of this file (ranges were validated at open).
    ///
    /// # Panics
    /// If `t` is a description that does not fit this file's storage (a caller bug: it
    /// belongs to another file or was edited). [`GgufFile::try_tensor_bytes`] reports that
    /// as an error instead.
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> TensorBytes {
        match self.try_tensor_bytes(t) {
            Ok(b) => b,
            Err(e) => panic!("tensor '{}' does not belong to this GGUF file: {e}", t.name),
        }
    }

    /// The bytes of `t`, or an error when its range lies outside this file.
    pub fn try_tensor_bytes(&self, t: &GgufTensorInfo) -> Result<TensorBytes> {
        let range_err =
            || FormatError::Invalid(format!("tensor '{}': range does not fit memory", t.name));
        let start = self
            .data_offset
            .checked_add(t.offset)
            .ok_or_else(range_err)?;
        let start = usize::try_from(start).map_err(|_| range_err())?;
        let len = usize::try_from(t.n_bytes).map_err(|_| range_err())?;
        TensorBytes::new(self.store.clone(), start, len)
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.store
    }

    pub fn file_size(&self) -> u64 {
        self.store.len() as u64
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_size", &self.file_size())
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}
