//! Prints the top logits after a token sequence, computed as one prefill and step by
//! step: `cargo run -p caldera-cpu --example logits -- MODEL.gguf 1 9690 198 ...`.

use std::sync::Arc;

use caldera_cpu::{CpuBackend, Logits};
use caldera_model::Model;

fn top(v: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.into_iter().take(k).map(|i| (i, v[i])).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: logits MODEL IDS...")?;
    let ids: Vec<u32> = args[2..]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let (_, model) = Model::open(std::path::Path::new(path))?;
    let be = CpuBackend::new(Arc::new(model), 2);
    let mut out = Vec::new();
    let mut s = be.new_session(ids.len())?;
    be.forward(&mut s, &ids, Logits::Last, &mut out)?;
    println!("prefill: {:?}", top(&out, 5));
    let mut s = be.new_session(ids.len())?;
    for &t in &ids {
        be.forward(&mut s, &[t], Logits::Last, &mut out)?;
    }
    println!("steps:   {:?}", top(&out, 5));
    Ok(())
}
