//! `caldera inspect`: metadata, tensor table and totals of a model file.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use caldera_format::gguf::GgufValue;
use caldera_model::ModelFile;

pub fn inspect(path: &Path, full: bool) -> Result<ExitCode> {
    let f = ModelFile::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    println!("file: {} ({})", path.display(), f.format);
    if let Some(g) = f.gguf() {
        println!(
            "gguf: version {}, alignment {}, data at offset {}, {} bytes",
            g.version,
            g.alignment,
            g.data_offset,
            g.file_size()
        );
    } else {
        println!("(an HF folder, shown with the GGUF names and keys caldera translates it to)");
    }
    println!("\nmetadata:");
    for (k, v) in f.metadata() {
        println!("  {k:<44} {}", show_value(v, full));
    }
    println!("\ntensors:");
    println!(
        "  {:<40} {:<8} {:<22} {:>14}",
        "name", "type", "shape", "bytes"
    );
    let mut by_type: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    let (mut total_bytes, mut total_params) = (0u64, 0u64);
    for t in f.tensors() {
        let n: u64 = t.dims.iter().product();
        let bytes = t.data.len() as u64;
        println!(
            "  {:<40} {:<8} {:<22} {:>14}",
            t.name,
            t.ty.name(),
            format!("{:?}", t.dims),
            bytes
        );
        let e = by_type.entry(t.ty.name().to_owned()).or_default();
        e.0 += 1;
        e.1 += n;
        e.2 += bytes;
        total_bytes += bytes;
        total_params += n;
    }
    println!("\ntotals:");
    for (ty, (count, n, bytes)) in &by_type {
        println!("  {ty:<8} {count:>5} tensors {n:>14} params {bytes:>14} bytes");
    }
    println!(
        "  all      {:>5} tensors {total_params:>14} params {total_bytes:>14} bytes ({:.2} bits/param)",
        f.tensors().len(),
        if total_params > 0 { total_bytes as f64 * 8.0 / total_params as f64 } else { 0.0 }
    );
    Ok(ExitCode::SUCCESS)
}

fn show_value(v: &GgufValue, full: bool) -> String {
    match v {
        GgufValue::String(s) => {
            let one_line = s.replace('\n', "\\n");
            if full || one_line.chars().count() <= 80 {
                format!("{one_line:?}")
            } else {
                let head: String = one_line.chars().take(77).collect();
                format!("{head:?}... ({} chars)", s.chars().count())
            }
        }
        GgufValue::Array(a) => {
            let shown = if full {
                a.items.len()
            } else {
                a.items.len().min(6)
            };
            let items: Vec<String> = a.items[..shown]
                .iter()
                .map(|x| show_value(x, full))
                .collect();
            let more = if shown < a.items.len() { ", ..." } else { "" };
            format!(
                "[{}{more}] ({} x {:?})",
                items.join(", "),
                a.items.len(),
                a.elem_type
            )
        }
        GgufValue::U8(x) => x.to_string(),
        GgufValue::I8(x) => x.to_string(),
        GgufValue::U16(x) => x.to_string(),
        GgufValue::I16(x) => x.to_string(),
        GgufValue::U32(x) => x.to_string(),
        GgufValue::I32(x) => x.to_string(),
        GgufValue::U64(x) => x.to_string(),
        GgufValue::I64(x) => x.to_string(),
        GgufValue::F32(x) => x.to_string(),
        GgufValue::F64(x) => x.to_string(),
        GgufValue::Bool(x) => x.to_string(),
    }
}
