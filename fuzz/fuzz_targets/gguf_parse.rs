//! Arbitrary bytes into the GGUF reader. A file that parses must hold up to use: every
//! metadata value and every tensor's bytes are touched, lookups agree with the lists, and
//! writing the parsed file back out gives a file that parses to the same bytes again.

#![no_main]

use caldera_format::gguf::{GgufFile, GgufValue, GgufWriter, TensorSource};
use libfuzzer_sys::fuzz_target;

fn touch(v: &GgufValue, acc: &mut u64) {
    *acc = acc.wrapping_add(v.as_u64().unwrap_or(0));
    *acc = acc.wrapping_add(v.as_i64().unwrap_or(0) as u64);
    *acc = acc.wrapping_add(v.as_f64().unwrap_or(0.0).to_bits());
    *acc = acc.wrapping_add(v.as_f32().unwrap_or(0.0).to_bits() as u64);
    *acc = acc.wrapping_add(v.as_bool().unwrap_or(false) as u64);
    *acc = acc.wrapping_add(v.as_str().map_or(0, |s| s.len() as u64));
    *acc = acc.wrapping_add(v.as_str_array().map_or(0, |a| a.len() as u64));
    *acc = acc.wrapping_add(v.as_f32_array().map_or(0, |a| a.len() as u64));
    *acc = acc.wrapping_add(v.as_i64_array().map_or(0, |a| a.len() as u64));
    if let Some(a) = v.as_array() {
        for item in &a.items {
            assert_eq!(item.value_type(), a.elem_type);
            touch(item, acc);
        }
    }
}

fn rewrite(f: &GgufFile) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set_version(f.version);
    for (k, v) in f.metadata() {
        w.set(k, v.clone());
    }
    for t in f.tensors() {
        w.add_tensor(
            &t.name,
            t.ty,
            &t.dims,
            TensorSource::View(f.tensor_bytes(t)),
        )
        .expect("a parsed tensor is accepted by the writer");
    }
    let mut out = Vec::new();
    w.write_to(&mut out)
        .expect("a parsed file is accepted by the writer");
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let mut acc = 0u64;
    for (k, v) in f.metadata() {
        assert!(f.get(k).is_some());
        touch(v, &mut acc);
    }
    acc = acc.wrapping_add(f.architecture().map_or(0, |s| s.len() as u64));
    for t in f.tensors() {
        assert_eq!(f.tensor(&t.name), Some(t));
        let bytes = f.tensor_bytes(t);
        assert_eq!(bytes.len() as u64, t.n_bytes);
        assert!(t.n_elements() >= 1);
        assert_eq!(t.offset % f.alignment, 0);
        acc = acc.wrapping_add(bytes.as_slice().iter().map(|&b| b as u64).sum::<u64>());
    }
    std::hint::black_box(acc);

    // Round trip, unless padding to a huge alignment would make the output enormous.
    if f.alignment <= 1 << 16 {
        let once = rewrite(&f);
        let g = GgufFile::from_bytes(once.clone()).expect("the writer's output parses");
        assert_eq!(g.metadata().len(), f.metadata().len());
        assert_eq!(g.tensors().len(), f.tensors().len());
        for (a, b) in f.tensors().iter().zip(g.tensors()) {
            assert_eq!((&a.name, a.ty, &a.dims), (&b.name, b.ty, &b.dims));
            assert_eq!(f.tensor_bytes(a).as_slice(), g.tensor_bytes(b).as_slice());
        }
        assert_eq!(rewrite(&g), once, "writing is idempotent");
    }
});
