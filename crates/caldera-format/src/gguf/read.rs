//! The GGUF parser. It reads from a byte slice through a cursor that refuses to go past
//! the end, checks every count against the bytes that remain before reserving memory for
//! it, and charges everything it decodes to a memory budget of file size +
//! [`METADATA_MEMORY_SLACK`], so a hostile file can neither read out of bounds nor make
//! the reader allocate far more than the file itself.

use std::collections::HashMap;
use std::mem::size_of;

use super::{
    GgufArray, GgufTensorInfo, GgufValue, GgufValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT,
    GGUF_MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS, METADATA_MEMORY_SLACK,
};
use crate::{FormatError, GgmlType, Result};

/// Fewest bytes of one key/value pair: key length, an empty key, value type, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes of one tensor description: name length, an empty name, n_dims, one dim,
/// type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// What the parser found; [`super::GgufFile`] wraps it with its storage.
pub(super) struct Parsed {
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub metadata: Vec<(String, GgufValue)>,
    pub key_index: HashMap<String, usize>,
    pub tensors: Vec<GgufTensorInfo>,
    pub tensor_index: HashMap<String, usize>,
}

/// Where in the file a read happens, for error messages; formatted only on error.
#[derive(Clone, Copy)]
enum Ctx<'a> {
    Header(&'static str),
    Key(u64),
    Value(&'a str),
    TensorName(u64),
    Tensor(&'a str),
}

impl Ctx<'_> {
    fn describe(self) -> String {
        match self {
            Ctx::Header(what) => format!("header field {what}"),
            Ctx::Key(i) => format!("key of metadata entry #{i}"),
            Ctx::Value(key) => format!("value of metadata key '{key}'"),
            Ctx::TensorName(i) => format!("name of tensor #{i}"),
            Ctx::Tensor(name) => format!("description of tensor '{name}'"),
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn short(&self, need: u64, ctx: Ctx<'_>) -> FormatError {
        FormatError::Truncated {
            what: ctx.describe(),
            offset: self.pos as u64,
            need,
            have: self.remaining(),
        }
    }

    fn take(&mut self, n: u64, ctx: Ctx<'_>) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.short(n, ctx));
        }
        // n ≤ remaining ≤ usize::MAX, so the cast and the addition are exact.
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self, ctx: Ctx<'_>) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, ctx)?);
        Ok(out)
    }

    fn u8(&mut self, ctx: Ctx<'_>) -> Result<u8> {
        Ok(self.array::<1>(ctx)?[0])
    }
    fn u16(&mut self, ctx: Ctx<'_>) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(ctx)?))
    }
    fn u32(&mut self, ctx: Ctx<'_>) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(ctx)?))
    }
    fn u64(&mut self, ctx: Ctx<'_>) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(ctx)?))
    }

    /// A length-prefixed UTF-8 string, charged to `budget`.
    fn string(&mut self, ctx: Ctx<'_>, budget: &mut Budget) -> Result<String> {
        let len = self.u64(ctx)?;
        let bytes = self.take(len, ctx)?;
        budget.charge(len, ctx)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(FormatError::Invalid(format!(
                "{} is not valid UTF-8 (at byte {} of the string, file offset {})",
                ctx.describe(),
                e.valid_up_to(),
                self.pos as u64 - len
            ))),
        }
    }
}

/// Memory the decoded header may still use, in bytes (an estimate of heap and inline
/// sizes, charged before each allocation).
struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    fn charge(&mut self, bytes: u64, ctx: Ctx<'_>) -> Result<()> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(FormatError::Invalid(format!(
                "{} would take the decoded header past {} MiB of memory, far more than a \
                 file of this size can describe",
                ctx.describe(),
                self.limit >> 20
            ))),
        }
    }
}

fn count_bytes(count: u64, each: u64) -> u64 {
    count.saturating_mul(each)
}

pub(super) fn parse(buf: &[u8]) -> Result<Parsed> {
    let mut r = Reader { buf, pos: 0 };
    let file_size = buf.len() as u64;
    let limit = file_size.saturating_add(METADATA_MEMORY_SLACK);
    let mut budget = Budget { left: limit, limit };

    let magic: [u8; 4] = r.array(Ctx::Header("magic"))?;
    if magic != GGUF_MAGIC {
        return Err(FormatError::BadMagic(magic));
    }
    let version = r.u32(Ctx::Header("version"))?;
    match version {
        2 | 3 => {}
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(FormatError::Unsupported(format!(
                "big-endian GGUF is not supported (version field {v:#010x} reads as \
                 version {} byte-swapped); convert the file to little-endian",
                v.swap_bytes()
            )))
        }
        v => return Err(FormatError::UnsupportedVersion(v)),
    }
    let tensor_count = r.u64(Ctx::Header("tensor_count"))?;
    let kv_count = r.u64(Ctx::Header("metadata_kv_count"))?;

    let kv_min = count_bytes(kv_count, MIN_KV_BYTES);
    if kv_min > r.remaining() {
        return Err(FormatError::Truncated {
            what: format!("{kv_count} metadata entries (at least {MIN_KV_BYTES} bytes each)"),
            offset: r.pos as u64,
            need: kv_min,
            have: r.remaining(),
        });
    }
    let ti_min = count_bytes(tensor_count, MIN_TENSOR_INFO_BYTES);
    if ti_min > r.remaining() - kv_min {
        return Err(FormatError::Truncated {
            what: format!(
                "{tensor_count} tensor descriptions (at least {MIN_TENSOR_INFO_BYTES} bytes \
                 each) after {kv_count} metadata entries"
            ),
            offset: r.pos as u64,
            need: ti_min.saturating_add(kv_min),
            have: r.remaining(),
        });
    }
    // Both counts now fit in usize: each is at most the file size.
    let kv_entry = (size_of::<(String, GgufValue)>() + size_of::<(String, usize)>() + 8) as u64;
    budget.charge(
        kv_count.saturating_mul(kv_entry),
        Ctx::Header("metadata_kv_count"),
    )?;
    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(kv_count as usize);
    let mut key_index: HashMap<String, usize> = HashMap::with_capacity(kv_count as usize);
    let mut alignment = DEFAULT_ALIGNMENT;

    for i in 0..kv_count {
        let key = r.string(Ctx::Key(i), &mut budget)?;
        // The index holds a second copy of the key.
        budget.charge(key.len() as u64, Ctx::Key(i))?;
        if key.is_empty() {
            return Err(FormatError::Invalid(format!(
                "metadata entry #{i} has an empty key"
            )));
        }
        if key_index.contains_key(&key) {
            return Err(FormatError::Duplicate {
                what: "metadata key",
                name: key,
            });
        }
        let ctx = Ctx::Value(&key);
        let type_id = r.u32(ctx)?;
        let ty = GgufValueType::from_id(type_id).ok_or_else(|| FormatError::UnknownValueType {
            key: key.clone(),
            id: type_id,
        })?;
        let value = read_value(&mut r, ty, &key, 0, &mut budget)?;
        if key == ALIGNMENT_KEY {
            alignment = match value {
                GgufValue::U32(a) if a.is_power_of_two() => a.into(),
                GgufValue::U32(a) => {
                    return Err(FormatError::Invalid(format!(
                        "{ALIGNMENT_KEY} is {a}; it must be a non-zero power of two"
                    )))
                }
                ref other => {
                    return Err(FormatError::Invalid(format!(
                        "{ALIGNMENT_KEY} has type {}; it must be a u32",
                        other.value_type()
                    )))
                }
            };
        }
        key_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    let ti_entry = (size_of::<GgufTensorInfo>() + size_of::<(String, usize)>() + 8) as u64;
    budget.charge(
        tensor_count.saturating_mul(ti_entry),
        Ctx::Header("tensor_count"),
    )?;
    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(tensor_count as usize);
    let mut tensor_index: HashMap<String, usize> = HashMap::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = r.string(Ctx::TensorName(i), &mut budget)?;
        budget.charge(
            name.len() as u64 + (MAX_DIMS * 8) as u64,
            Ctx::TensorName(i),
        )?;
        if name.is_empty() {
            return Err(FormatError::Invalid(format!(
                "tensor #{i} has an empty name"
            )));
        }
        if tensor_index.contains_key(&name) {
            return Err(FormatError::Duplicate {
                what: "tensor",
                name,
            });
        }
        let info = read_tensor_info(&mut r, name)?;
        tensor_index.insert(info.name.clone(), tensors.len());
        tensors.push(info);
    }

    let header_end = r.pos as u64;
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| FormatError::Invalid("data offset overflows".into()))?;
    check_tensor_ranges(&tensors, data_offset, alignment, file_size)?;

    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        key_index,
        tensors,
        tensor_index,
    })
}

/// Reads one value of type `ty` for metadata key `key`; `depth` counts the arrays
/// around it.
fn read_value(
    r: &mut Reader<'_>,
    ty: GgufValueType,
    key: &str,
    depth: usize,
    budget: &mut Budget,
) -> Result<GgufValue> {
    let ctx = Ctx::Value(key);
    Ok(match ty {
        GgufValueType::U8 => GgufValue::U8(r.u8(ctx)?),
        GgufValueType::I8 => GgufValue::I8(r.u8(ctx)? as i8),
        GgufValueType::U16 => GgufValue::U16(r.u16(ctx)?),
        GgufValueType::I16 => GgufValue::I16(r.u16(ctx)? as i16),
        GgufValueType::U32 => GgufValue::U32(r.u32(ctx)?),
        GgufValueType::I32 => GgufValue::I32(r.u32(ctx)? as i32),
        GgufValueType::F32 => GgufValue::F32(f32::from_bits(r.u32(ctx)?)),
        GgufValueType::U64 => GgufValue::U64(r.u64(ctx)?),
        GgufValueType::I64 => GgufValue::I64(r.u64(ctx)? as i64),
        GgufValueType::F64 => GgufValue::F64(f64::from_bits(r.u64(ctx)?)),
        GgufValueType::Bool => match r.u8(ctx)? {
            0 => GgufValue::Bool(false),
            1 => GgufValue::Bool(true),
            b => {
                return Err(FormatError::Invalid(format!(
                    "{} is a bool stored as {b}; it must be 0 or 1",
                    ctx.describe()
                )))
            }
        },
        GgufValueType::String => GgufValue::String(r.string(ctx, budget)?),
        GgufValueType::Array => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(FormatError::Invalid(format!(
                    "{} nests arrays more than {MAX_ARRAY_DEPTH} deep",
                    ctx.describe()
                )));
            }
            let elem_id = r.u32(ctx)?;
            let elem_type =
                GgufValueType::from_id(elem_id).ok_or_else(|| FormatError::UnknownValueType {
                    key: key.to_owned(),
                    id: elem_id,
                })?;
            let count = r.u64(ctx)?;
            let need = count_bytes(count, elem_type.min_encoded_size());
            if need > r.remaining() {
                return Err(FormatError::Truncated {
                    what: format!(
                        "{} ({count} {elem_type} items, at least {} bytes each)",
                        ctx.describe(),
                        elem_type.min_encoded_size()
                    ),
                    offset: r.pos as u64,
                    need,
                    have: r.remaining(),
                });
            }
            // count ≤ remaining bytes, so it fits in usize.
            budget.charge(count.saturating_mul(size_of::<GgufValue>() as u64), ctx)?;
            let items = match elem_type {
                GgufValueType::String => {
                    let mut items = Vec::with_capacity(count as usize);
                    for _ in 0..count {
                        items.push(GgufValue::String(r.string(ctx, budget)?));
                    }
                    items
                }
                GgufValueType::Array | GgufValueType::Bool => {
                    let mut items = Vec::with_capacity(count as usize);
                    for _ in 0..count {
                        items.push(read_value(r, elem_type, key, depth + 1, budget)?);
                    }
                    items
                }
                // Fixed-width numbers: count × width bytes, checked above.
                _ => {
                    let width = elem_type.min_encoded_size() as usize;
                    let bytes = r.take(need, ctx)?;
                    bytes
                        .chunks_exact(width)
                        .map(|c| decode_number(elem_type, c))
                        .collect()
                }
            };
            GgufValue::Array(GgufArray { elem_type, items })
        }
    })
}

/// A fixed-width number of type `ty` from exactly its little-endian bytes.
fn decode_number(ty: GgufValueType, b: &[u8]) -> GgufValue {
    let mut w = [0u8; 8];
    w[..b.len()].copy_from_slice(b);
    let v = u64::from_le_bytes(w);
    // Truncating casts keep exactly the bytes that were read.
    match ty {
        GgufValueType::U8 => GgufValue::U8(v as u8),
        GgufValueType::I8 => GgufValue::I8(v as u8 as i8),
        GgufValueType::U16 => GgufValue::U16(v as u16),
        GgufValueType::I16 => GgufValue::I16(v as u16 as i16),
        GgufValueType::U32 => GgufValue::U32(v as u32),
        GgufValueType::I32 => GgufValue::I32(v as u32 as i32),
        GgufValueType::F32 => GgufValue::F32(f32::from_bits(v as u32)),
        GgufValueType::U64 => GgufValue::U64(v),
        GgufValueType::I64 => GgufValue::I64(v as i64),
        _ => GgufValue::F64(f64::from_bits(v)),
    }
}

/// Reads the rest of a tensor description (after its name) and checks its shape.
fn read_tensor_info(r: &mut Reader<'_>, name: String) -> Result<GgufTensorInfo> {
    let ctx = Ctx::Tensor(&name);
    let bad = |msg: String| FormatError::Invalid(format!("tensor '{name}': {msg}"));
    let n_dims = r.u32(ctx)?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(bad(format!(
            "has {n_dims} dimensions; GGML allows 1 to {MAX_DIMS}"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64(ctx)?);
    }
    let type_id = r.u32(ctx)?;
    let offset = r.u64(ctx)?;
    let ty = GgmlType::from_id(type_id).ok_or_else(|| FormatError::UnknownTensorType {
        tensor: name.clone(),
        id: type_id,
    })?;
    if dims.contains(&0) {
        return Err(bad(format!(
            "shape {dims:?} has a zero dimension (empty tensors are not supported)"
        )));
    }
    let n_elements = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad(format!("shape {dims:?} has more than 2^63 elements")))?;
    let block = ty.block_size() as u64;
    let row = ty.row_bytes(dims[0]).ok_or_else(|| {
        bad(format!(
            "ne[0] = {} is not a multiple of the {ty} block size {block}",
            dims[0]
        ))
    })?;
    let n_bytes = row
        .checked_mul(n_elements / dims[0])
        .ok_or_else(|| bad(format!("shape {dims:?} of type {ty} overflows a byte size")))?;
    Ok(GgufTensorInfo {
        name,
        dims,
        ty,
        offset,
        n_bytes,
    })
}

/// Checks that every tensor's data is aligned, inside the file and apart from the others.
fn check_tensor_ranges(
    tensors: &[GgufTensorInfo],
    data_offset: u64,
    alignment: u64,
    file_size: u64,
) -> Result<()> {
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(FormatError::Invalid(format!(
                "tensor '{}': data offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            )));
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(_), Some(end)) if end <= file_size => {}
            (start, _) => {
                let start = start.unwrap_or(u64::MAX);
                return Err(FormatError::Truncated {
                    what: format!(
                        "data of tensor '{}' ({} {:?}, relative offset {})",
                        t.name, t.ty, t.dims, t.offset
                    ),
                    offset: start,
                    need: t.n_bytes,
                    have: file_size.saturating_sub(start),
                });
            }
        }
    }
    let mut order: Vec<&GgufTensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // In range: both ends were checked against the file size above.
        if a.offset + a.n_bytes > b.offset {
            return Err(FormatError::Invalid(format!(
                "tensors '{}' (bytes {}..{}) and '{}' (from {}) overlap in the data section",
                a.name,
                a.offset,
                a.offset + a.n_bytes,
                b.name,
                b.offset
            )));
        }
    }
    Ok(())
}
