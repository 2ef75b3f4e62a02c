//! Writer → reader round trips: every value type, nested arrays, unicode keys, tensors
//! of several types, custom alignment, versions 2 and 3, and the writer's own checks.

use caldera_format::gguf::{
    GgufArray, GgufFile, GgufValue, GgufValueType, GgufWriter, TensorSource,
};
use caldera_format::{FormatError, GgmlType, TensorBytes};
use rand::{Rng, SeedableRng};

fn write_bytes(w: &GgufWriter) -> Vec<u8> {
    let mut out = Vec::new();
    let n = w.write_to(&mut out).expect("write");
    assert_eq!(n, out.len() as u64);
    out
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen()).collect()
}

/// Compares values, treating floats by their bits (NaN payloads must survive).
fn same(a: &GgufValue, b: &GgufValue) -> bool {
    match (a, b) {
        (GgufValue::F32(x), GgufValue::F32(y)) => x.to_bits() == y.to_bits(),
        (GgufValue::F64(x), GgufValue::F64(y)) => x.to_bits() == y.to_bits(),
        (GgufValue::Array(x), GgufValue::Array(y)) => {
            x.elem_type == y.elem_type
                && x.items.len() == y.items.len()
                && x.items.iter().zip(&y.items).all(|(p, q)| same(p, q))
        }
        _ => a == b,
    }
}

fn every_scalar() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("u8", GgufValue::U8(255)),
        ("i8", GgufValue::I8(-128)),
        ("u16", GgufValue::U16(65535)),
        ("i16", GgufValue::I16(-32768)),
        ("u32", GgufValue::U32(u32::MAX)),
        ("i32", GgufValue::I32(i32::MIN)),
        ("f32", GgufValue::F32(-1.5e-7)),
        ("f32.nan", GgufValue::F32(f32::from_bits(0x7fc0_1234))),
        ("bool.t", GgufValue::Bool(true)),
        ("bool.f", GgufValue::Bool(false)),
        ("string", GgufValue::string("hello\0world\n")),
        ("string.empty", GgufValue::string("")),
        ("u64", GgufValue::U64(u64::MAX)),
        ("i64", GgufValue::I64(i64::MIN)),
        ("f64", GgufValue::F64(std::f64::consts::PI)),
        ("f64.inf", GgufValue::F64(f64::NEG_INFINITY)),
    ]
}

#[test]
fn every_value_type_round_trips() {
    let mut w = GgufWriter::new();
    for (k, v) in every_scalar() {
        w.set(k, v);
    }
    w.set("arr.str", GgufValue::str_array(&["a", "", "ünïcödé", "🦀"]));
    w.set("arr.f32", GgufValue::f32_array(&[1.0, -2.5, f32::INFINITY]));
    w.set("arr.i32", GgufValue::i32_array(&[i32::MIN, 0, i32::MAX]));
    w.set("arr.u32", GgufValue::u32_array(&[7, 8]));
    w.set("arr.bool", GgufValue::bool_array(&[true, false, true]));
    w.set("arr.empty", GgufValue::array(GgufValueType::U64, vec![]));
    // Every scalar type as an array element type.
    for (k, v) in every_scalar() {
        let ty = v.value_type();
        w.set(
            &format!("arr.of.{k}"),
            GgufValue::array(ty, vec![v.clone(), v]),
        );
    }
    // Arrays of arrays, with differing element types inside, and 8 levels deep.
    let inner_a = GgufValue::str_array(&["x", "y"]);
    let inner_b = GgufValue::i32_array(&[1, 2, 3]);
    let inner_c = GgufValue::array(GgufValueType::Array, vec![]);
    w.set(
        "arr.nested",
        GgufValue::array(GgufValueType::Array, vec![inner_a, inner_b, inner_c]),
    );
    let mut deep = GgufValue::U8(9);
    for _ in 0..8 {
        let ty = deep.value_type();
        deep = GgufValue::array(ty, vec![deep]);
    }
    w.set("arr.deep8", deep);
    w.set("général.名前", GgufValue::string("ключ"));
    w.set("emoji.🦀.key", GgufValue::U8(1));

    let bytes = write_bytes(&w);
    let f = GgufFile::from_bytes(bytes).expect("parse");
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert!(f.tensors().is_empty());
    assert_eq!(f.metadata().len(), w.metadata().len());
    for ((ka, va), (kb, vb)) in f.metadata().iter().zip(w.metadata()) {
        assert_eq!(ka, kb, "file order is kept");
        assert!(same(va, vb), "{ka}: {va:?} != {vb:?}");
        assert!(same(f.get(ka).unwrap(), vb));
    }
    assert_eq!(f.get_str("général.名前"), Some("ключ"));
    assert_eq!(
        f.get("arr.str").unwrap().as_str_array().unwrap(),
        vec!["a", "", "ünïcödé", "🦀"]
    );
    let nested = f.get("arr.nested").unwrap().as_array().unwrap();
    assert_eq!(nested.elem_type, GgufValueType::Array);
    assert_eq!(nested.items[1].as_i64_array().unwrap(), vec![1, 2, 3]);
    assert!(f.get("missing").is_none());
}

#[test]
fn accessors_tolerate_numeric_widths() {
    let mut w = GgufWriter::new();
    w.set("u8", GgufValue::U8(7));
    w.set("i32.neg", GgufValue::I32(-3));
    w.set("u64.big", GgufValue::U64(u64::MAX));
    w.set("f64", GgufValue::F64(0.25));
    w.set("bool", GgufValue::Bool(true));
    w.set("general.architecture", GgufValue::string("llama"));
    w.set(
        "mixed",
        GgufValue::array(GgufValueType::U64, vec![GgufValue::U64(u64::MAX)]),
    );
    w.set(
        "ints",
        GgufValue::array(
            GgufValueType::I16,
            vec![GgufValue::I16(-2), GgufValue::I16(5)],
        ),
    );
    let f = GgufFile::from_bytes(write_bytes(&w)).unwrap();
    assert_eq!(f.get_u64("u8"), Some(7));
    assert_eq!(f.get_f32("u8"), Some(7.0));
    assert_eq!(f.get_u64("i32.neg"), None);
    assert_eq!(f.get_i64("i32.neg"), Some(-3));
    assert_eq!(f.get_f64("i32.neg"), Some(-3.0));
    assert_eq!(f.get_u64("u64.big"), Some(u64::MAX));
    assert_eq!(f.get_i64("u64.big"), None);
    assert_eq!(f.get_f32("f64"), Some(0.25));
    assert_eq!(f.get_u64("f64"), None);
    assert_eq!(f.get_bool("bool"), Some(true));
    assert_eq!(f.get_bool("u8"), None);
    assert_eq!(f.get_str("u8"), None);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.get("mixed").unwrap().as_i64_array(), None);
    assert_eq!(f.get("mixed").unwrap().as_f32_array().unwrap().len(), 1);
    assert_eq!(f.get("ints").unwrap().as_i64_array(), Some(vec![-2, 5]));
    assert_eq!(f.get("ints").unwrap().as_f32_array(), Some(vec![-2.0, 5.0]));
    assert_eq!(f.get("ints").unwrap().as_str_array(), None);
    assert_eq!(f.get("u8").unwrap().as_array(), None);
}

fn tensor_cases() -> Vec<(&'static str, GgmlType, Vec<u64>)> {
    vec![
        ("f32.vec", GgmlType::F32, vec![7]),
        ("f16.mat", GgmlType::F16, vec![5, 3]),
        ("bf16.3d", GgmlType::BF16, vec![2, 3, 4]),
        ("q4_0", GgmlType::Q4_0, vec![64, 3]),
        ("q8_0", GgmlType::Q8_0, vec![32, 5, 1, 2]),
        ("q4_k", GgmlType::Q4_K, vec![256, 2]),
        ("q6_k", GgmlType::Q6_K, vec![512, 1]),
        ("i8", GgmlType::I8, vec![3]),
        ("q5_0.odd", GgmlType::Q5_0, vec![96, 1, 3]),
    ]
}

fn tensor_writer(alignment: Option<u64>) -> (GgufWriter, Vec<Vec<u8>>) {
    let mut w = GgufWriter::new();
    if let Some(a) = alignment {
        w.set_alignment(a);
    }
    w.set("general.architecture", GgufValue::string("test"));
    let mut datas = Vec::new();
    for (i, (name, ty, dims)) in tensor_cases().into_iter().enumerate() {
        let n = ty.row_bytes(dims[0]).unwrap() * dims[1..].iter().product::<u64>();
        let data = random_bytes(n as usize, i as u64);
        w.add_tensor(name, ty, &dims, TensorSource::Owned(data.clone()))
            .unwrap();
        datas.push(data);
    }
    (w, datas)
}

fn check_tensors(f: &GgufFile, datas: &[Vec<u8>]) {
    assert_eq!(f.tensors().len(), datas.len());
    for ((info, (name, ty, dims)), data) in f.tensors().iter().zip(tensor_cases()).zip(datas) {
        assert_eq!(info.name, name);
        assert_eq!(info.ty, ty);
        assert_eq!(info.dims, dims);
        assert_eq!(info.n_elements(), dims.iter().product::<u64>());
        assert_eq!(info.n_bytes, data.len() as u64);
        assert_eq!(info.offset % f.alignment, 0);
        assert_eq!((f.data_offset + info.offset) % f.alignment, 0);
        assert_eq!(f.tensor_bytes(info).as_slice(), &data[..]);
        assert_eq!(f.tensor(name), Some(info));
    }
    assert!(f.tensor("nope").is_none());
}

#[test]
fn tensors_round_trip_with_default_and_custom_alignment() {
    for alignment in [None, Some(1), Some(8), Some(64), Some(4096)] {
        let (w, datas) = tensor_writer(alignment);
        let bytes = write_bytes(&w);
        let expect = alignment.unwrap_or(32);
        assert_eq!(bytes.len() as u64 % expect, 0);
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.alignment, expect);
        assert_eq!(f.data_offset % expect, 0);
        if alignment.is_some() {
            assert_eq!(
                f.get("general.alignment"),
                Some(&GgufValue::U32(expect as u32))
            );
        }
        check_tensors(&f, &datas);
    }
}

#[test]
fn version_2_round_trips() {
    let (mut w, datas) = tensor_writer(None);
    w.set_version(2);
    let bytes = write_bytes(&w);
    assert_eq!(&bytes[4..8], &2u32.to_le_bytes());
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.version, 2);
    check_tensors(&f, &datas);
}

#[test]
fn views_and_files_round_trip() {
    let (w, datas) = tensor_writer(Some(64));
    let first = GgufFile::from_bytes(write_bytes(&w)).unwrap();
    // Rebuild from views into the first file's storage.
    let mut w2 = GgufWriter::new();
    for (k, v) in first.metadata() {
        w2.set(k, v.clone());
    }
    for t in first.tensors() {
        w2.add_tensor(
            &t.name,
            t.ty,
            &t.dims,
            TensorSource::View(first.tensor_bytes(t)),
        )
        .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("caldera-gguf-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    w2.write_file(&path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    let f = GgufFile::open(&path).unwrap();
    check_tensors(&f, &datas);
    assert_eq!(f.metadata(), first.metadata());
    assert_eq!(f.file_size(), std::fs::metadata(&path).unwrap().len());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        write_bytes(&w),
        "same content, same bytes"
    );
    drop(f);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn set_replaces_in_place_and_remove_works() {
    let mut w = GgufWriter::new();
    w.set("a", GgufValue::U8(1));
    w.set("b", GgufValue::U8(2));
    w.set("c", GgufValue::U8(3));
    w.set("a", GgufValue::string("first"));
    assert_eq!(w.remove("b"), Some(GgufValue::U8(2)));
    assert_eq!(w.remove("b"), None);
    let f = GgufFile::from_bytes(write_bytes(&w)).unwrap();
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "c"]);
    assert_eq!(f.get_str("a"), Some("first"));
}

/// A file written by the reference Python `gguf` package (0.19), committed as bytes: one
/// key, one F32 tensor [2, 1] = [1.0, 2.0]. Our reader must read it and our writer must
/// reproduce it byte for byte.
#[test]
fn matches_reference_writer_bytes() {
    let reference = reference_file();
    let f = GgufFile::from_bytes(reference.clone()).unwrap();
    assert_eq!(f.architecture(), Some("test"));
    let t = f.tensor("w").unwrap();
    assert_eq!(t.dims, [2, 1]);
    assert_eq!(t.ty, GgmlType::F32);
    let data = f.tensor_bytes(t).as_slice().to_vec();
    let mut w = GgufWriter::new();
    w.set("general.architecture", GgufValue::string("test"));
    w.add_tensor("w", GgmlType::F32, &[2, 1], TensorSource::Owned(data))
        .unwrap();
    assert_eq!(write_bytes(&w), reference);
}

fn reference_file() -> Vec<u8> {
    REFERENCE_HEX
        .split_whitespace()
        .collect::<String>()
        .as_bytes()
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
        .collect()
}

const REFERENCE_HEX: &str = "\
    4747554603000000010000000000000001000000000000001400000000000000\
    67656e6572616c2e617263686974656374757265080000000400000000000000\
    7465737401000000000000007702000000020000000000000001000000000000\
    0000000000000000000000000000000000000000000000000000000000000000\
    0000803f00000040000000000000000000000000000000000000000000000000
";

#[test]
fn writer_refuses_what_the_reader_would() {
    let mut w = GgufWriter::new();
    let err = |r: Result<(), FormatError>| r.unwrap_err().to_string();
    assert!(err(w.add_tensor("t", GgmlType::F32, &[4], vec![0u8; 15])).contains("needs 16 bytes"));
    assert!(err(w.add_tensor("t", GgmlType::F32, &[], vec![])).contains("dimensions"));
    assert!(
        err(w.add_tensor("t", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0; 4])).contains("dimensions")
    );
    assert!(err(w.add_tensor("t", GgmlType::F32, &[0], vec![])).contains("zero"));
    assert!(err(w.add_tensor("t", GgmlType::Q4_0, &[33], vec![0; 18])).contains("block size"));
    assert!(err(w.add_tensor("t", GgmlType::F32, &[1 << 32, 1 << 32], vec![])).contains("2^63"));
    assert!(err(w.add_tensor("", GgmlType::F32, &[1], vec![0; 4])).contains("empty"));
    w.add_tensor("t", GgmlType::F32, &[1], vec![0; 4]).unwrap();
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[1], vec![0; 4]),
        Err(FormatError::Duplicate { .. })
    ));
    let view = TensorBytes::from_vec(vec![1, 2, 3, 4]);
    w.add_tensor("v", GgmlType::I8, &[4], view).unwrap();
    assert_eq!(w.tensor_count(), 2);

    let fails = |w: &GgufWriter| w.write_to(Vec::new()).unwrap_err().to_string();
    let mut bad = GgufWriter::new();
    bad.set_alignment(3);
    assert!(fails(&bad).contains("power of two"));
    bad.set_alignment(1 << 40);
    assert!(fails(&bad).contains("power of two"));
    bad.set("general.alignment", GgufValue::I32(32));
    assert!(fails(&bad).contains("power of two"));
    bad.set_alignment(16);
    bad.write_to(Vec::new()).unwrap();
    bad.set_version(1);
    assert!(matches!(
        bad.write_to(Vec::new()),
        Err(FormatError::UnsupportedVersion(1))
    ));

    let mut mixed = GgufWriter::new();
    mixed.set(
        "m",
        GgufValue::Array(GgufArray::new(
            GgufValueType::U8,
            vec![GgufValue::U8(1), GgufValue::I8(1)],
        )),
    );
    assert!(fails(&mixed).contains("holds a i8"));
    let mut deep = GgufValue::U8(0);
    for _ in 0..9 {
        let ty = deep.value_type();
        deep = GgufValue::array(ty, vec![deep]);
    }
    let mut too_deep = GgufWriter::new();
    too_deep.set("d", deep);
    assert!(fails(&too_deep).contains("deep"));
    let mut empty_key = GgufWriter::new();
    empty_key.set("", GgufValue::U8(0));
    assert!(fails(&empty_key).contains("empty"));
}
