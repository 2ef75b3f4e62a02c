//! Hostile and broken GGUF files: each must give a typed error quickly, never a panic,
//! an out-of-bounds read or an allocation sized by an unchecked header field.

use std::time::{Duration, Instant};

use caldera_format::gguf::{GgufFile, GgufValue, GgufValueType, GgufWriter, TensorSource};
use caldera_format::{FormatError, GgmlType};

/// Parses `bytes`, checking that it takes < 100 ms whatever the outcome (1 s for the
/// multi-MiB files of the memory tests, so a loaded machine does not fail them).
fn parse(bytes: Vec<u8>) -> Result<GgufFile, FormatError> {
    let limit = if bytes.len() < 1 << 16 { 100 } else { 1000 };
    let t = Instant::now();
    let r = GgufFile::from_bytes(bytes);
    assert!(
        t.elapsed() < Duration::from_millis(limit),
        "took {:?}",
        t.elapsed()
    );
    r
}

fn msg(bytes: Vec<u8>) -> String {
    match parse(bytes) {
        Ok(_) => panic!("a malformed file parsed"),
        Err(e) => e.to_string(),
    }
}

/// Hand-assembled GGUF bytes, for files the writer refuses to produce.
struct Raw(Vec<u8>);

impl Raw {
    fn new(version: u32, tensors: u64, kvs: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(tensors).u64(kvs);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Raw {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A key with a u32 value.
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Raw {
        self.str(key).u32(GgufValueType::U32 as u32).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Raw {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to `align` and appends `data` zero bytes.
    fn data(&mut self, align: usize, data: usize) -> Vec<u8> {
        let mut b = self.0.clone();
        b.resize(b.len().next_multiple_of(align) + data, 0);
        b
    }
}

fn small_valid_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", GgufValue::string("llama"));
    w.set("n", GgufValue::U32(3));
    w.set("f", GgufValue::F64(1.5));
    w.set("b", GgufValue::Bool(true));
    w.set("toks", GgufValue::str_array(&["a", "bc", ""]));
    w.set(
        "nest",
        GgufValue::array(GgufValueType::Array, vec![GgufValue::i32_array(&[1, 2])]),
    );
    w.add_tensor("a", GgmlType::F32, &[3], TensorSource::Owned(vec![1; 12]))
        .unwrap();
    w.add_tensor(
        "b",
        GgmlType::Q8_0,
        &[32, 2],
        TensorSource::Owned(vec![2; 68]),
    )
    .unwrap();
    w.add_tensor("c", GgmlType::F16, &[5], TensorSource::Owned(vec![3; 10]))
        .unwrap();
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

#[test]
fn truncated_at_every_byte() {
    let full = small_valid_file();
    let f = parse(full.clone()).unwrap();
    let data_end = f
        .tensors()
        .iter()
        .map(|t| f.data_offset + t.offset + t.n_bytes)
        .max()
        .unwrap() as usize;
    for n in 0..data_end {
        let e = parse(full[..n].to_vec());
        assert!(e.is_err(), "prefix of {n} bytes parsed");
    }
    // Dropping only the padding after the last tensor leaves a valid file.
    for n in data_end..=full.len() {
        parse(full[..n].to_vec()).unwrap();
    }
    // The header alone (no tensor data) is "truncated", with the tensor named.
    let m = msg(full[..f.data_offset as usize].to_vec());
    assert!(m.contains("data of tensor 'a'"), "{m}");
}

#[test]
fn bad_magic_and_versions() {
    assert!(
        matches!(parse(b"GGML\x03\0\0\0".to_vec()), Err(FormatError::BadMagic(m)) if &m == b"GGML")
    );
    assert!(matches!(
        parse(b"GG".to_vec()),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(parse(vec![]), Err(FormatError::Truncated { .. })));
    for v in [0u32, 1, 4, 0xffff_ffff] {
        let r = parse(Raw::new(v, 0, 0).0);
        assert!(
            matches!(r, Err(FormatError::UnsupportedVersion(x)) if x == v),
            "{v}"
        );
    }
    for v in [0x0200_0000u32, 0x0300_0000] {
        let m = msg(Raw::new(v, 0, 0).0);
        assert!(m.contains("big-endian GGUF is not supported"), "{m}");
    }
    // Version 2 and 3 with nothing in them are valid.
    for v in [2, 3] {
        let f = parse(Raw::new(v, 0, 0).0).unwrap();
        assert_eq!(f.version, v);
        assert!(f.metadata().is_empty() && f.tensors().is_empty());
    }
}

#[test]
fn absurd_counts() {
    for (tensors, kvs) in [
        (1u64 << 63, 0),
        (0, 1u64 << 40),
        (u64::MAX, u64::MAX),
        (1, 1),
    ] {
        let r = parse(Raw::new(3, tensors, kvs).0);
        assert!(
            matches!(r, Err(FormatError::Truncated { .. })),
            "{tensors} {kvs}: {r:?}"
        );
    }
    // Enough bytes for the kvs minimum but not for the tensors after them.
    let mut raw = Raw::new(3, 2, 1);
    raw.kv_u32("k", 1).bytes(&[0; 40]);
    assert!(msg(raw.0).contains("2 tensor descriptions"));
}

#[test]
fn absurd_string_and_array_lengths() {
    // Key length.
    let mut raw = Raw::new(3, 0, 1);
    raw.u64(1 << 63).bytes(&[0; 16]);
    assert!(
        matches!(parse(raw.0), Err(FormatError::Truncated { what, .. }) if what.contains("key of metadata entry #0"))
    );
    // String value length.
    let mut raw = Raw::new(3, 0, 1);
    raw.str("s")
        .u32(GgufValueType::String as u32)
        .u64(u64::MAX)
        .bytes(&[0; 8]);
    assert!(
        matches!(parse(raw.0), Err(FormatError::Truncated { what, .. }) if what.contains("'s'"))
    );
    // Array counts, for several element types, and count × size overflowing u64.
    for (elem, count) in [
        (0u32, 1u64 << 40),
        (8, 1 << 61),
        (9, u64::MAX),
        (12, u64::MAX / 4),
    ] {
        let mut raw = Raw::new(3, 0, 1);
        raw.str("arr").u32(9).u32(elem).u64(count).bytes(&[0; 64]);
        let r = parse(raw.0);
        assert!(
            matches!(&r, Err(FormatError::Truncated { what, .. }) if what.contains("'arr'")),
            "{r:?}"
        );
    }
    // Nested: an array of one array claiming 2^50 u64s.
    let mut raw = Raw::new(3, 0, 1);
    raw.str("nest")
        .u32(9)
        .u32(9)
        .u64(1)
        .u32(10)
        .u64(1 << 50)
        .bytes(&[0; 64]);
    assert!(matches!(parse(raw.0), Err(FormatError::Truncated { .. })));
    // Tensor name length.
    let mut raw = Raw::new(3, 1, 0);
    raw.u64(u64::MAX - 3).bytes(&[0; 64]);
    assert!(
        matches!(parse(raw.0), Err(FormatError::Truncated { what, .. }) if what.contains("name of tensor #0"))
    );
}

#[test]
fn unknown_value_types() {
    for id in [13u32, 100, u32::MAX] {
        let mut raw = Raw::new(3, 0, 1);
        raw.str("k").u32(id).bytes(&[0; 16]);
        let r = parse(raw.0);
        assert!(
            matches!(&r, Err(FormatError::UnknownValueType { key, id: i }) if key == "k" && *i == id),
            "{r:?}"
        );
        // As an array element type.
        let mut raw = Raw::new(3, 0, 1);
        raw.str("a").u32(9).u32(id).u64(1).bytes(&[0; 16]);
        assert!(
            matches!(parse(raw.0), Err(FormatError::UnknownValueType { id: i, .. }) if i == id)
        );
    }
}

#[test]
fn bad_values() {
    let mut raw = Raw::new(3, 0, 1);
    raw.str("b").u32(7).bytes(&[2]);
    assert!(msg(raw.0).contains("must be 0 or 1"));
    let mut raw = Raw::new(3, 0, 1);
    raw.str("s").u32(8).u64(2).bytes(&[0xc3, 0x28]);
    assert!(msg(raw.0).contains("not valid UTF-8"));
    let mut raw = Raw::new(3, 0, 1);
    raw.u64(1).bytes(&[0xff]).u32(4).u32(0);
    assert!(msg(raw.0).contains("not valid UTF-8"));
    let mut raw = Raw::new(3, 0, 1);
    raw.u64(0).u32(4).u32(0);
    assert!(msg(raw.0).contains("empty key"));
    // Nine nested arrays are refused, eight are fine.
    for (depth, ok) in [(8, true), (9, false), (1000, false)] {
        let mut raw = Raw::new(3, 0, 1);
        raw.str("d");
        raw.u32(9);
        for _ in 0..depth - 1 {
            raw.u32(9).u64(1);
        }
        raw.u32(0).u64(1).bytes(&[7]);
        let r = parse(raw.0);
        assert_eq!(r.is_ok(), ok, "depth {depth}: {r:?}");
        if !ok {
            assert!(r.unwrap_err().to_string().contains("deep"));
        }
    }
}

#[test]
fn duplicates() {
    let mut raw = Raw::new(3, 0, 2);
    raw.kv_u32("k", 1).kv_u32("k", 2);
    assert!(
        matches!(parse(raw.0), Err(FormatError::Duplicate { what: "metadata key", name }) if name == "k")
    );
    let mut raw = Raw::new(3, 2, 0);
    raw.tensor("t", &[1], 0, 0).tensor("t", &[1], 0, 32);
    assert!(
        matches!(parse(raw.data(32, 64)), Err(FormatError::Duplicate { what: "tensor", name }) if name == "t")
    );
}

#[test]
fn alignment_rules() {
    for (v, frag) in [
        (0u32, "power of two"),
        (3, "power of two"),
        (48, "power of two"),
    ] {
        let mut raw = Raw::new(3, 0, 1);
        raw.kv_u32("general.alignment", v);
        let m = msg(raw.0);
        assert!(m.contains(frag) && m.contains("general.alignment"), "{m}");
    }
    for ty in [10u32 /* u64 */, 5 /* i32 */] {
        let mut raw = Raw::new(3, 0, 1);
        raw.str("general.alignment").u32(ty).u64(32);
        assert!(msg(raw.0).contains("must be a u32"));
    }
    let mut raw = Raw::new(3, 0, 1);
    raw.str("general.alignment").u32(8).str("32");
    assert!(msg(raw.0).contains("must be a u32"));
    // A valid alignment moves the data section and constrains offsets.
    let mut raw = Raw::new(3, 2, 1);
    raw.kv_u32("general.alignment", 256)
        .tensor("a", &[4], 0, 0)
        .tensor("b", &[4], 0, 256);
    let f = parse(raw.data(256, 512)).unwrap();
    assert_eq!((f.alignment, f.data_offset), (256, 256));
    let mut raw = Raw::new(3, 1, 1);
    raw.kv_u32("general.alignment", 256)
        .tensor("a", &[4], 0, 32);
    assert!(msg(raw.data(256, 512)).contains("not a multiple of the alignment 256"));
}

fn one_tensor(dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut raw = Raw::new(3, 1, 0);
    raw.tensor("t", dims, ty, offset);
    raw.data(32, data)
}

#[test]
fn bad_tensor_types_and_shapes() {
    for id in [4u32, 5, 31, 1000, u32::MAX] {
        let r = parse(one_tensor(&[32], id, 0, 256));
        assert!(
            matches!(&r, Err(FormatError::UnknownTensorType { tensor, id: i }) if tensor == "t" && *i == id),
            "{r:?}"
        );
    }
    assert!(msg(one_tensor(&[], 0, 0, 64)).contains("0 dimensions"));
    let mut raw = Raw::new(3, 1, 0);
    raw.str("t")
        .u32(5)
        .u64(1)
        .u64(1)
        .u64(1)
        .u64(1)
        .u64(1)
        .u32(0)
        .u64(0);
    assert!(msg(raw.data(32, 64)).contains("5 dimensions"));
    let mut raw = Raw::new(3, 1, 0);
    raw.str("t").u32(u32::MAX).bytes(&[0; 64]);
    assert!(msg(raw.0).contains("dimensions"));
    assert!(msg(one_tensor(&[4, 0], 0, 0, 64)).contains("zero dimension"));
    assert!(msg(one_tensor(&[0], 0, 0, 64)).contains("zero dimension"));
    // ne[0] must be a whole number of blocks.
    assert!(msg(one_tensor(&[33], GgmlType::Q4_0 as u32, 0, 64)).contains("block size 32"));
    assert!(msg(one_tensor(&[128], GgmlType::Q4_K as u32, 0, 64)).contains("block size 256"));
    // Huge dims: element counts past 2^63, byte sizes past 2^64, sizes past the file.
    let m = msg(one_tensor(&[1 << 32, 1 << 32], 0, 0, 64));
    assert!(m.contains("2^63"), "{m}");
    let m = msg(one_tensor(&[u64::MAX], 24, 0, 64));
    assert!(m.contains("2^63"), "{m}");
    let m = msg(one_tensor(&[1 << 61, 2], 0, 0, 64));
    assert!(m.contains("overflows"), "{m}");
    for dims in [
        &[(1u64 << 42) + 1][..],
        &[1 << 20, 1 << 20, 1 << 20],
        &[3, 1 << 61],
    ] {
        let r = parse(one_tensor(dims, 24, 0, 64));
        assert!(
            matches!(&r, Err(FormatError::Truncated { what, .. }) if what.contains("tensor 't'")),
            "{dims:?}: {r:?}"
        );
    }
    // Empty tensor name.
    assert!(msg({
        let mut raw = Raw::new(3, 1, 0);
        raw.tensor("", &[1], 0, 0);
        raw.data(32, 32)
    })
    .contains("empty name"));
}

#[test]
fn tensor_ranges() {
    // Exactly fitting is fine; one byte short is not.
    parse(one_tensor(&[8], 0, 0, 32)).unwrap();
    assert!(matches!(
        parse(one_tensor(&[8], 0, 0, 31)),
        Err(FormatError::Truncated { .. })
    ));
    // Misaligned offset.
    assert!(msg(one_tensor(&[1], 0, 4, 64)).contains("not a multiple of the alignment 32"));
    // Offsets past the end, and offsets that overflow when added to the data offset.
    for off in [64u64, 1 << 40, u64::MAX - 31] {
        let r = parse(one_tensor(&[1], 0, off, 64));
        assert!(
            matches!(&r, Err(FormatError::Truncated { what, .. }) if what.contains("tensor 't'")),
            "{off}: {r:?}"
        );
    }
    // Overlap, whatever order the descriptions come in.
    for (oa, ob) in [(0u64, 32u64), (32, 0), (0, 0)] {
        let mut raw = Raw::new(3, 2, 0);
        raw.tensor("a", &[16], 0, oa).tensor("b", &[16], 0, ob);
        let m = msg(raw.data(32, 256));
        assert!(m.contains("overlap"), "{m}");
    }
    // Adjacent is fine.
    let mut raw = Raw::new(3, 2, 0);
    raw.tensor("a", &[8], 0, 32).tensor("b", &[8], 0, 0);
    let f = parse(raw.data(32, 64)).unwrap();
    assert_eq!(f.tensor("a").unwrap().offset, 32);
}

#[test]
fn metadata_memory_is_bounded() {
    // 1 MiB of u8 items decodes (about 32-40 MiB of values: under the budget).
    let n = 1 << 20;
    let mut raw = Raw::new(3, 0, 1);
    raw.str("a")
        .u32(9)
        .u32(0)
        .u64(n)
        .bytes(&vec![1; n as usize]);
    let f = parse(raw.0).unwrap();
    assert_eq!(f.get("a").unwrap().as_array().unwrap().len(), n as usize);
    // 4 MiB of them would need ~150 MiB of values: refused before allocating.
    let n = 4 << 20;
    let mut raw = Raw::new(3, 0, 1);
    raw.str("a")
        .u32(9)
        .u32(0)
        .u64(n)
        .bytes(&vec![1; n as usize]);
    let m = msg(raw.0);
    assert!(m.contains("MiB of memory"), "{m}");
    // Nested empty arrays are charged too.
    let n = 1 << 20;
    let mut raw = Raw::new(3, 0, 1);
    raw.str("a").u32(9).u32(9).u64(n);
    for _ in 0..n {
        raw.u32(0).u64(0);
    }
    parse(raw.0).unwrap();
}

#[test]
fn open_reports_missing_and_empty_files() {
    let dir = std::env::temp_dir().join(format!("caldera-gguf-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.gguf");
    let r = GgufFile::open(&missing);
    assert!(
        matches!(&r, Err(FormatError::Io { path, .. }) if path == &missing),
        "{r:?}"
    );
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(FormatError::Truncated { .. })
    ));
    let header_only = dir.join("header.gguf");
    std::fs::write(&header_only, Raw::new(3, 0, 0).0).unwrap();
    assert_eq!(GgufFile::open(&header_only).unwrap().file_size(), 24);
    std::fs::remove_dir_all(&dir).unwrap();
}
