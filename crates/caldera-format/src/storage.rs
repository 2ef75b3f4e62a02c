//! Bytes that tensors point into: a read-only memory map of a model file, or an owned
//! buffer (tests, converted data). Tensors hold a cheap, clonable view, so weights are
//! never copied out of the map.

use std::ops::Deref;
use std::sync::Arc;

pub enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    /// Maps `path` read-only. The map is shared with the page cache: weights are read
    /// straight from it and never copied.
    pub fn map_file(path: &std::path::Path) -> crate::Result<Storage> {
        let file = std::fs::File::open(path).map_err(|e| crate::FormatError::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath us by another process
        // is outside what any reader of mapped files can defend against.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::FormatError::io(path, e))?;
        Ok(Storage::Mmap(map))
    }
}

impl Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A byte range inside a shared [`Storage`]. Construction checks the range.
#[derive(Clone)]
pub struct TensorBytes {
    store: Arc<Storage>,
    start: usize,
    len: usize,
}

impl TensorBytes {
    pub fn new(store: Arc<Storage>, start: usize, len: usize) -> crate::Result<TensorBytes> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| crate::FormatError::Invalid("tensor range overflows".into()))?;
        if end > store.len() {
            return Err(crate::FormatError::Invalid(format!(
                "tensor range {start}..{end} lies outside the {} bytes of its file",
                store.len()
            )));
        }
        Ok(TensorBytes { store, start, len })
    }

    pub fn from_vec(v: Vec<u8>) -> TensorBytes {
        let len = v.len();
        TensorBytes {
            store: Arc::new(Storage::Owned(v)),
            start: 0,
            len,
        }
    }

    /// The sub-range `[off, off + len)` of this view.
    pub fn slice(&self, off: usize, len: usize) -> crate::Result<TensorBytes> {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                crate::FormatError::Invalid(format!(
                    "range {off}+{len} lies outside a tensor of {} bytes",
                    self.len
                ))
            })?;
        Ok(TensorBytes {
            store: self.store.clone(),
            start: self.start + off,
            len: end - off,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.store[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBytes({} bytes at {})", self.len, self.start)
    }
}
