//! Writes small valid GGUF files into a corpus folder (default
//! `corpus/gguf_parse`): every value type, nested arrays, several tensor types and
//! alignments, and, when the SmolLM2 model is present, its metadata with arrays cut short.
//!
//! Run from `fuzz/`: `cargo run --example seed_corpus [-- DIR]`.

use std::path::PathBuf;

use caldera_format::gguf::{GgufFile, GgufValue, GgufValueType, GgufWriter};
use caldera_format::GgmlType;

fn bytes(w: &GgufWriter) -> Vec<u8> {
    let mut out = Vec::new();
    w.write_to(&mut out).expect("seed writes");
    out
}

fn tensor(w: &mut GgufWriter, name: &str, ty: GgmlType, dims: &[u64], fill: u8) {
    let n = ty.row_bytes(dims[0]).expect("whole blocks") * dims[1..].iter().product::<u64>();
    w.add_tensor(name, ty, dims, vec![fill; n as usize])
        .expect("seed tensor");
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("corpus/gguf_parse"));
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();

    for v in [2, 3] {
        let mut w = GgufWriter::new();
        w.set_version(v);
        seeds.push((format!("empty_v{v}"), bytes(&w)));
    }

    let mut w = GgufWriter::new();
    w.set("general.architecture", GgufValue::string("llama"));
    w.set("u8", GgufValue::U8(1));
    w.set("i8", GgufValue::I8(-1));
    w.set("u16", GgufValue::U16(2));
    w.set("i16", GgufValue::I16(-2));
    w.set("u32", GgufValue::U32(3));
    w.set("i32", GgufValue::I32(-3));
    w.set("f32", GgufValue::F32(0.5));
    w.set("bool", GgufValue::Bool(true));
    w.set("str", GgufValue::string("héllo"));
    w.set("u64", GgufValue::U64(4));
    w.set("i64", GgufValue::I64(-4));
    w.set("f64", GgufValue::F64(0.25));
    w.set("toks", GgufValue::str_array(&["<s>", "a", "bc"]));
    w.set("scores", GgufValue::f32_array(&[0.0, -1.0, -2.0]));
    w.set("types", GgufValue::i32_array(&[3, 1, 1]));
    w.set("flags", GgufValue::bool_array(&[true, false]));
    w.set(
        "nested",
        GgufValue::array(
            GgufValueType::Array,
            vec![GgufValue::u32_array(&[1, 2]), GgufValue::str_array(&["x"])],
        ),
    );
    seeds.push(("all_values".into(), bytes(&w)));
    tensor(&mut w, "token_embd.weight", GgmlType::Q8_0, &[32, 3], 1);
    tensor(&mut w, "output_norm.weight", GgmlType::F32, &[32], 2);
    tensor(
        &mut w,
        "blk.0.ffn_down.weight",
        GgmlType::Q4_K,
        &[256, 2],
        3,
    );
    tensor(&mut w, "blk.0.attn_q.weight", GgmlType::F16, &[4, 2, 2], 4);
    seeds.push(("values_and_tensors".into(), bytes(&w)));

    for align in [1u64, 8, 64] {
        let mut w = GgufWriter::new();
        w.set_alignment(align);
        tensor(&mut w, "a", GgmlType::I8, &[3], 5);
        tensor(&mut w, "b", GgmlType::Q4_0, &[32, 1, 1, 2], 6);
        tensor(&mut w, "c", GgmlType::BF16, &[1], 7);
        seeds.push((format!("align_{align}"), bytes(&w)));
    }

    let models = std::env::var_os("CALDERA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../models"));
    if let Ok(f) = GgufFile::open(&models.join("SmolLM2-135M-Instruct.Q4_1.gguf")) {
        let mut w = GgufWriter::new();
        for (k, v) in f.metadata() {
            let v = match v {
                GgufValue::Array(a) => {
                    GgufValue::array(a.elem_type, a.items.iter().take(40).cloned().collect())
                }
                GgufValue::String(s) if s.len() > 200 => {
                    GgufValue::string(s.chars().take(200).collect::<String>())
                }
                other => other.clone(),
            };
            w.set(k, v);
        }
        tensor(&mut w, "token_embd.weight", GgmlType::Q8_0, &[64, 2], 1);
        tensor(&mut w, "blk.0.attn_norm.weight", GgmlType::F32, &[64], 2);
        tensor(&mut w, "blk.0.ffn_down.weight", GgmlType::Q4_1, &[64, 2], 3);
        seeds.push(("smollm2_mini".into(), bytes(&w)));
    } else {
        eprintln!(
            "SmolLM2 not found under {}: skipping that seed",
            models.display()
        );
    }

    for (name, b) in &seeds {
        GgufFile::from_bytes(b.clone()).expect("seed parses");
        std::fs::write(dir.join(format!("{name}.gguf")), b).expect("write seed");
    }
    eprintln!("wrote {} seeds to {}", seeds.len(), dir.display());
}
