//! Building GGUF files: metadata in insertion order, tensors laid out in the order they
//! were added, each at an offset that is a multiple of the alignment, and the data
//! section padded with zeros to the alignment after every tensor.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{GgufValue, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
use crate::{FormatError, GgmlType, Result, TensorBytes};

/// Writes a streamed tensor's bytes, in order, into the file being written.
pub type TensorFill = dyn Fn(&mut dyn Write) -> std::io::Result<()> + Send + Sync;

/// Where a tensor's bytes come from. A view keeps a large tensor in its memory map, so
/// converting a model never holds all of it in memory; a stream produces the bytes only
/// while the file is written, so a generated model is never in memory at all.
#[derive(Clone)]
pub enum TensorSource {
    Owned(Vec<u8>),
    View(TensorBytes),
    /// Exactly `len` bytes that `fill` writes when the tensor's turn comes. Writing fails
    /// (and no file is left behind) if `fill` writes more or fewer bytes or errs.
    Stream {
        len: u64,
        fill: Arc<TensorFill>,
    },
}

impl TensorSource {
    /// A streamed tensor of `len` bytes.
    pub fn stream(
        len: u64,
        fill: impl Fn(&mut dyn Write) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> TensorSource {
        TensorSource::Stream {
            len,
            fill: Arc::new(fill),
        }
    }

    /// The bytes when they are already in memory (`None` for a stream).
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            TensorSource::Owned(v) => Some(v),
            TensorSource::View(b) => Some(b.as_slice()),
            TensorSource::Stream { .. } => None,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            TensorSource::Owned(v) => v.len() as u64,
            TensorSource::View(b) => b.as_slice().len() as u64,
            TensorSource::Stream { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for TensorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorSource::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
            TensorSource::View(b) => write!(f, "View({} bytes)", b.as_slice().len()),
            TensorSource::Stream { len, .. } => write!(f, "Stream({len} bytes)"),
        }
    }
}

impl From<Vec<u8>> for TensorSource {
    fn from(v: Vec<u8>) -> TensorSource {
        TensorSource::Owned(v)
    }
}

impl From<TensorBytes> for TensorSource {
    fn from(b: TensorBytes) -> TensorSource {
        TensorSource::View(b)
    }
}

struct PendingTensor {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    data: TensorSource,
}

/// Accumulates metadata and tensors, then writes a GGUF file (version 3 unless
/// [`GgufWriter::set_version`] says 2; both have the same little-endian layout).
///
/// The data alignment is the `general.alignment` entry when present (a `u32` power of
/// two), else 32. Everything the reader would refuse is refused here, before the first
/// byte is written.
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
    tensor_names: HashSet<String>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
            tensor_names: HashSet::new(),
        }
    }

    /// The GGUF version to write: 2 or 3 (checked when writing).
    pub fn set_version(&mut self, version: u32) {
        self.version = version;
    }

    /// Sets `general.alignment`. Must be a power of two that fits a `u32` (checked when
    /// writing).
    pub fn set_alignment(&mut self, alignment: u64) {
        let value = match u32::try_from(alignment) {
            Ok(a) => GgufValue::U32(a),
            Err(_) => GgufValue::U64(alignment),
        };
        self.set(ALIGNMENT_KEY, value);
    }

    /// Sets `key`, replacing an existing value in place (order is kept) or appending.
    pub fn set(&mut self, key: &str, value: GgufValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key.to_owned(), value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<GgufValue> {
        let i = self.metadata.iter().position(|(k, _)| k == key)?;
        Some(self.metadata.remove(i).1)
    }

    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Adds a tensor. `dims` lists `ne[0]` (contiguous) first, 1 to 4 entries, each ≥ 1;
    /// `ne[0]` must be a multiple of `ty`'s block size and `data` exactly the tensor's
    /// byte size. Names must be unique and non-empty.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        dims: &[u64],
        data: impl Into<TensorSource>,
    ) -> Result<()> {
        let name = name.into();
        let data = data.into();
        let bad = |msg: String| FormatError::Invalid(format!("tensor '{name}': {msg}"));
        if name.is_empty() {
            return Err(FormatError::Invalid("tensor with an empty name".into()));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(bad(format!(
                "has {} dimensions; GGML allows 1 to {MAX_DIMS}",
                dims.len()
            )));
        }
        if dims.contains(&0) {
            return Err(bad(format!("shape {dims:?} has a zero dimension")));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| bad(format!("shape {dims:?} has more than 2^63 elements")))?;
        let n_bytes = ty
            .row_bytes(dims[0])
            .ok_or_else(|| {
                bad(format!(
                    "ne[0] = {} is not a multiple of the {ty} block size {}",
                    dims[0],
                    ty.block_size()
                ))
            })?
            .checked_mul(n_elements / dims[0])
            .ok_or_else(|| bad(format!("shape {dims:?} overflows a byte size")))?;
        if n_bytes != data.len() {
            return Err(bad(format!(
                "{ty} {dims:?} needs {n_bytes} bytes but {} were given",
                data.len()
            )));
        }
        if self.tensor_names.contains(&name) {
            return Err(FormatError::Duplicate {
                what: "tensor",
                name,
            });
        }
        self.tensor_names.insert(name.clone());
        self.tensors.push(PendingTensor {
            name,
            ty,
            dims: dims.to_vec(),
            data,
        });
        Ok(())
    }

    /// The alignment the file will use, after checking the `general.alignment` entry.
    fn alignment(&self) -> Result<u64> {
        match self.get(ALIGNMENT_KEY) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(GgufValue::U32(a)) if a.is_power_of_two() => Ok((*a).into()),
            Some(v) => Err(FormatError::Invalid(format!(
                "{ALIGNMENT_KEY} must be a u32 power of two, not {v:?}"
            ))),
        }
    }

    fn validate(&self) -> Result<u64> {
        if !matches!(self.version, 2 | 3) {
            return Err(FormatError::UnsupportedVersion(self.version));
        }
        for (key, value) in &self.metadata {
            if key.is_empty() {
                return Err(FormatError::Invalid("metadata key is empty".into()));
            }
            check_value(key, value, 0)?;
        }
        self.alignment()
    }

    /// Writes the whole file to `w` (pass a buffered writer) and returns its size in bytes.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<u64> {
        let alignment = self.validate()?;
        self.emit(&mut w, alignment)
            .map_err(|e| FormatError::io("<GGUF output>", e))
    }

    /// Writes the file to a temporary name beside `path`, syncs it, then renames it over
    /// `path`, so a reader never sees a half-written file.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let alignment = self.validate()?;
        let file_name = path.file_name().ok_or_else(|| {
            FormatError::Invalid(format!("{} is not a file path", path.display()))
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp: PathBuf = path.with_file_name(tmp_name);
        let result = (|| -> std::io::Result<()> {
            let file = std::fs::File::create(&tmp)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
            self.emit(&mut w, alignment)?;
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            FormatError::io(path, e)
        })
    }

    fn emit<W: Write>(&self, w: &mut W, alignment: u64) -> std::io::Result<u64> {
        let mut out = Counter { w, n: 0 };
        out.put(&GGUF_MAGIC)?;
        out.put(&self.version.to_le_bytes())?;
        out.put(&(self.tensors.len() as u64).to_le_bytes())?;
        out.put(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &self.metadata {
            out.string(key)?;
            out.put(&value.value_type().id().to_le_bytes())?;
            out.value(value)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            out.string(&t.name)?;
            out.put(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                out.put(&d.to_le_bytes())?;
            }
            out.put(&t.ty.id().to_le_bytes())?;
            out.put(&offset.to_le_bytes())?;
            let end = offset
                .checked_add(t.data.len())
                .ok_or_else(|| std::io::Error::other("GGUF output size overflows"))?;
            offset = next_multiple(end, alignment)?;
        }
        out.pad(alignment)?;
        for t in &self.tensors {
            match &t.data {
                TensorSource::Owned(v) => out.put(v)?,
                TensorSource::View(b) => out.put(b.as_slice())?,
                TensorSource::Stream { len, fill } => out.stream(&t.name, *len, fill.as_ref())?,
            }
            out.pad(alignment)?;
        }
        Ok(out.n)
    }
}

fn next_multiple(n: u64, alignment: u64) -> std::io::Result<u64> {
    n.checked_next_multiple_of(alignment)
        .ok_or_else(|| std::io::Error::other("GGUF output size overflows"))
}

/// Checks that array items match their element type and that arrays nest at most
/// [`MAX_ARRAY_DEPTH`] deep, as the reader requires.
fn check_value(key: &str, value: &GgufValue, depth: usize) -> Result<()> {
    let GgufValue::Array(a) = value else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(FormatError::Invalid(format!(
            "metadata key '{key}' nests arrays more than {MAX_ARRAY_DEPTH} deep"
        )));
    }
    for item in &a.items {
        if item.value_type() != a.elem_type {
            return Err(FormatError::Invalid(format!(
                "metadata key '{key}': an array of {} holds a {}",
                a.elem_type,
                item.value_type()
            )));
        }
        check_value(key, item, depth + 1)?;
    }
    Ok(())
}

/// A writer that counts bytes, with the GGUF encodings.
struct Counter<'a, W: Write> {
    w: &'a mut W,
    n: u64,
}

impl<W: Write> Counter<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)?;
        self.n += bytes.len() as u64;
        Ok(())
    }

    /// Runs `fill`, checking that it writes exactly `len` bytes.
    fn stream(&mut self, name: &str, len: u64, fill: &TensorFill) -> std::io::Result<()> {
        let mut exact = Exact {
            w: &mut *self.w,
            left: len,
        };
        fill(&mut exact)?;
        if exact.left != 0 {
            return Err(std::io::Error::other(format!(
                "tensor '{name}': its stream wrote {} of {len} bytes",
                len - exact.left
            )));
        }
        self.n += len;
        Ok(())
    }

    fn pad(&mut self, alignment: u64) -> std::io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut left = next_multiple(self.n, alignment)? - self.n;
        while left > 0 {
            let k = left.min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..k])?;
            left -= k as u64;
        }
        Ok(())
    }

    fn string(&mut self, s: &str) -> std::io::Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s.as_bytes())
    }

    /// A value without its type id (arrays carry their element type and count).
    fn value(&mut self, v: &GgufValue) -> std::io::Result<()> {
        match v {
            GgufValue::U8(x) => self.put(&[*x]),
            GgufValue::I8(x) => self.put(&x.to_le_bytes()),
            GgufValue::U16(x) => self.put(&x.to_le_bytes()),
            GgufValue::I16(x) => self.put(&x.to_le_bytes()),
            GgufValue::U32(x) => self.put(&x.to_le_bytes()),
            GgufValue::I32(x) => self.put(&x.to_le_bytes()),
            GgufValue::F32(x) => self.put(&x.to_le_bytes()),
            GgufValue::Bool(x) => self.put(&[u8::from(*x)]),
            GgufValue::String(s) => self.string(s),
            GgufValue::U64(x) => self.put(&x.to_le_bytes()),
            GgufValue::I64(x) => self.put(&x.to_le_bytes()),
            GgufValue::F64(x) => self.put(&x.to_le_bytes()),
            GgufValue::Array(a) => {
                self.put(&a.elem_type.id().to_le_bytes())?;
                self.put(&(a.items.len() as u64).to_le_bytes())?;
                for item in &a.items {
                    self.value(item)?;
                }
                Ok(())
            }
        }
    }
}

/// Passes at most `left` bytes through; one more is an error.
struct Exact<'a> {
    w: &'a mut dyn Write,
    left: u64,
}

impl Write for Exact<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other(
                "a streamed tensor wrote more bytes than its declared size",
            ));
        }
        let n = self.w.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    fn pattern(n: usize, k: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(k))
            .collect()
    }

    /// A stream that writes `data` in pieces of `piece` bytes.
    fn streamed(data: Vec<u8>, piece: usize) -> TensorSource {
        TensorSource::stream(data.len() as u64, move |w| {
            for c in data.chunks(piece) {
                w.write_all(c)?;
            }
            Ok(())
        })
    }

    #[test]
    fn streamed_tensors_write_the_same_file_as_owned_ones() {
        let shapes: [(&str, GgmlType, Vec<u64>); 3] = [
            ("a", GgmlType::F32, vec![3, 5]),
            ("b", GgmlType::Q8_0, vec![64, 3]),
            ("c", GgmlType::F16, vec![7]),
        ];
        let build = |stream: bool| {
            let mut w = GgufWriter::new();
            w.set("general.architecture", GgufValue::String("test".into()));
            for (i, (name, ty, dims)) in shapes.iter().enumerate() {
                let n = ty.row_bytes(dims[0]).unwrap() * dims[1..].iter().product::<u64>();
                let data = pattern(n as usize, i as u8);
                let src = if stream {
                    streamed(data, 7)
                } else {
                    TensorSource::Owned(data)
                };
                w.add_tensor(*name, *ty, dims, src).unwrap();
            }
            let mut out = Vec::new();
            let n = w.write_to(&mut out).unwrap();
            assert_eq!(n, out.len() as u64);
            out
        };
        let (owned, stream) = (build(false), build(true));
        assert_eq!(owned, stream);
        let f = GgufFile::from_bytes(stream).unwrap();
        let t = f.tensor("b").unwrap();
        assert_eq!(f.tensor_bytes(t).as_slice(), &pattern(68 * 3, 1)[..]);
    }

    #[test]
    fn a_stream_of_the_wrong_length_fails_and_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("caldera-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (len, wrote) in [(12u64, 8usize), (12, 16)] {
            let mut w = GgufWriter::new();
            let src = TensorSource::stream(len, move |out| out.write_all(&vec![1u8; wrote]));
            w.add_tensor("t", GgmlType::F32, &[3], src).unwrap();
            let err = w.write_to(Vec::new()).unwrap_err().to_string();
            assert!(err.contains("stream") || err.contains("streamed"), "{err}");
            let path = dir.join("bad.gguf");
            assert!(w.write_file(&path).is_err());
            assert!(!path.exists());
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        }
        // A fill that fails passes its error on.
        let mut w = GgufWriter::new();
        let src = TensorSource::stream(4, |_| Err(std::io::Error::other("generator broke")));
        w.add_tensor("t", GgmlType::F32, &[1], src).unwrap();
        let err = w.write_to(Vec::new()).unwrap_err().to_string();
        assert!(err.contains("generator broke"), "{err}");
        // A declared length that does not match the shape is refused when added.
        let mut w = GgufWriter::new();
        let src = TensorSource::stream(8, |out| out.write_all(&[0; 8]));
        assert!(w.add_tensor("t", GgmlType::F32, &[3], src).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
