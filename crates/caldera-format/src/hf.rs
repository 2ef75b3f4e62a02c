//! Hugging Face model folders: `config.json`, safetensors weights (one
//! `model.safetensors`, or shards listed in `model.safetensors.index.json`), and the
//! tokenizer / generation JSON files beside them.
//!
//! Only JSON and safetensors are ever read. Pickle checkpoints (`*.bin`, `*.pt`, `*.pth`)
//! are refused, and `auto_map` / remote code entries in `config.json` are ignored.
//!
//! Safetensors layout (all little-endian):
//! ```text
//! n: u64 | header: n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}
//! | data: the tensors, row-major (outermost dimension first), at data_offsets relative to 8 + n
//! ```
//! Headers are parsed by the `safetensors` crate, which caps the header at 100 MB and
//! demands that the offsets are contiguous, non-overlapping, sized exactly by dtype and
//! shape, and cover the data section up to the end of the file. Tensors are views into
//! a memory map of their file; no weight is copied.
//!
//! Shards named by an index must be plain relative paths inside the folder (no absolute
//! path, no `..`): a hostile index cannot make us read outside it. A shard that is itself
//! a symlink (the Hugging Face cache layout) is followed, since whoever wrote the folder
//! chose its files anyway.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensors};

use crate::{FormatError, GgmlType, Result, Storage, TensorBytes};

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// JSON side files larger than this are refused (a 262k-token `tokenizer.json` is ~35 MB).
pub const MAX_JSON_BYTES: u64 = 512 << 20;

/// One tensor of a safetensors file.
///
/// `shape` is in Hugging Face order, outermost dimension first (a Linear weight is
/// `[out, in]`); the data are row-major, little-endian, `shape.product() ×
/// ty.type_size()` bytes long. `ty` is one of F32, F16, BF16, F64, I64, I32, I16 or I8:
/// [`HfModel::open`] admits only F32, F16 and BF16 for weights, while
/// [`open_safetensors`] (reference files) admits all of them.
#[derive(Clone, Debug)]
pub struct HfTensor {
    pub name: String,
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    pub data: TensorBytes,
}

impl HfTensor {
    /// Number of elements (product of `shape`; 1 for a scalar).
    pub fn n_elements(&self) -> usize {
        // Checked when the file was opened: shape × element size equals the byte length.
        self.data.len() / self.ty.type_size()
    }

    /// The values as `f32`, row-major. Floating types only (F32, F16, BF16, F64).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let b = self.data.as_slice();
        let v = match self.ty {
            GgmlType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            GgmlType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlType::F64 => b
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    f64::from_le_bytes(a) as f32
                })
                .collect(),
            other => {
                return Err(FormatError::Unsupported(format!(
                    "tensor '{}' has type {other}; to_f32_vec reads F32, F16, BF16 and F64",
                    self.name
                )))
            }
        };
        Ok(v)
    }

    /// The values as `i64`, row-major. Integer types only (I64, I32, I16, I8).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        let b = self.data.as_slice();
        let v = match self.ty {
            GgmlType::I64 => b
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::from_le_bytes(a)
                })
                .collect(),
            GgmlType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            GgmlType::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            GgmlType::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
            other => {
                return Err(FormatError::Unsupported(format!(
                    "tensor '{}' has type {other}; to_i64_vec reads I64, I32, I16 and I8",
                    self.name
                )))
            }
        };
        Ok(v)
    }
}

/// A Hugging Face model folder, opened.
///
/// `tensors` are ordered by shard (in the order the index first names them) and by
/// offset within a shard; names are unique.
pub struct HfModel {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub tensors: Vec<HfTensor>,
    /// `tokenizer.json`, verbatim.
    pub tokenizer_json: Option<String>,
    pub tokenizer_config: Option<serde_json::Value>,
    pub generation_config: Option<serde_json::Value>,
    /// Tensor name → position in `tensors`.
    index: HashMap<String, usize>,
    /// `chat_template.jinja`, verbatim.
    template_file: Option<String>,
    /// `chat_template.json` (processor format: `{"chat_template": ...}`).
    template_json: Option<serde_json::Value>,
}

impl std::fmt::Debug for HfModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfModel")
            .field("dir", &self.dir)
            .field("model_type", &self.model_type())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl HfModel {
    /// Opens a folder: `config.json` (required, a JSON object), the weights
    /// (`model.safetensors`, else the shards of `model.safetensors.index.json`), and the
    /// optional `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`,
    /// `chat_template.jinja` and `chat_template.json`.
    ///
    /// Errors: a folder with only pickle weights is `Unsupported`; a weight whose dtype
    /// is not F32, F16 or BF16 is `Unsupported`; a malformed file, an index naming a
    /// path outside the folder or a tensor its shard lacks is `Invalid`; a tensor in two
    /// shards is `Duplicate`.
    pub fn open(dir: &Path) -> Result<HfModel> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?.ok_or_else(|| {
            FormatError::Invalid(format!(
                "{}: not a Hugging Face model folder (no config.json)",
                dir.display()
            ))
        })?;
        if !config.is_object() {
            return Err(FormatError::Invalid(format!(
                "{}: expected a JSON object",
                config_path.display()
            )));
        }

        let tensors = if dir.join(SINGLE_FILE).is_file() {
            read_weights(&dir.join(SINGLE_FILE))?
        } else if dir.join(INDEX_FILE).is_file() {
            read_sharded(dir)?
        } else {
            return Err(no_weights_error(dir));
        };

        let mut index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if index.insert(t.name.clone(), i).is_some() {
                return Err(FormatError::Duplicate {
                    what: "tensor",
                    name: t.name.clone(),
                });
            }
        }

        Ok(HfModel {
            dir: dir.to_path_buf(),
            config,
            tensors,
            tokenizer_json: read_text(&dir.join("tokenizer.json"))?,
            tokenizer_config: read_json(&dir.join("tokenizer_config.json"))?,
            generation_config: read_json(&dir.join("generation_config.json"))?,
            index,
            template_file: read_text(&dir.join("chat_template.jinja"))?,
            template_json: read_json(&dir.join("chat_template.json"))?,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&HfTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The chat template, first found of: `chat_template.jinja`; `chat_template` in
    /// `tokenizer_config.json` (a string, or a list of `{name, template}` from which the
    /// one named "default" is taken); `chat_template` in `chat_template.json`.
    pub fn chat_template(&self) -> Option<String> {
        if let Some(t) = &self.template_file {
            return Some(t.clone());
        }
        [&self.tokenizer_config, &self.template_json]
            .into_iter()
            .flatten()
            .find_map(|v| template_from(v.get("chat_template")?))
    }

    /// `config["model_type"]`, e.g. "llama", "qwen3_moe".
    pub fn model_type(&self) -> Option<&str> {
        self.config.get("model_type")?.as_str()
    }
}

/// True for a folder that holds a `config.json`.
pub fn is_hf_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

/// Reads every tensor of one safetensors file, in offset order, as views into a map of
/// it. Dtypes F32, F16, BF16, F64, I64, I32, I16 and I8 are admitted; others are
/// `Unsupported`.
pub fn open_safetensors(path: &Path) -> Result<Vec<HfTensor>> {
    let store = Arc::new(Storage::map_file(path)?);
    let (header_len, meta) = SafeTensors::read_metadata(&store).map_err(|e| {
        FormatError::Invalid(format!("{}: bad safetensors file: {e}", path.display()))
    })?;
    // read_metadata checked 8 + header_len + data_len == file length.
    let data_start = header_len.checked_add(8).ok_or_else(|| {
        FormatError::Invalid(format!("{}: header length overflows", path.display()))
    })?;
    let mut out = Vec::with_capacity(meta.offset_keys().len());
    for name in meta.offset_keys() {
        let info = meta.info(&name).ok_or_else(|| {
            FormatError::Invalid(format!("{}: tensor '{name}' vanished", path.display()))
        })?;
        let ty = ggml_type(info.dtype).ok_or_else(|| {
            FormatError::Unsupported(format!(
                "{}: tensor '{name}' has dtype {}, which caldera does not read",
                path.display(),
                info.dtype
            ))
        })?;
        let (begin, end) = info.data_offsets;
        let len = end.checked_sub(begin).ok_or_else(|| {
            FormatError::Invalid(format!(
                "{}: tensor '{name}' ends before it begins",
                path.display()
            ))
        })?;
        let start = data_start.checked_add(begin).ok_or_else(|| {
            FormatError::Invalid(format!(
                "{}: tensor '{name}' offset overflows",
                path.display()
            ))
        })?;
        let data = TensorBytes::new(store.clone(), start, len)?;
        out.push(HfTensor {
            name,
            ty,
            shape: info.shape.clone(),
            data,
        });
    }
    Ok(out)
}

/// The GGML type of a safetensors dtype, for the dtypes caldera reads.
fn ggml_type(d: Dtype) -> Option<GgmlType> {
    Some(match d {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::BF16,
        Dtype::F64 => GgmlType::F64,
        Dtype::I64 => GgmlType::I64,
        Dtype::I32 => GgmlType::I32,
        Dtype::I16 => GgmlType::I16,
        Dtype::I8 => GgmlType::I8,
        _ => return None,
    })
}

/// One weights file: every tensor must be F32, F16 or BF16.
fn read_weights(path: &Path) -> Result<Vec<HfTensor>> {
    let tensors = open_safetensors(path)?;
    if let Some(t) = tensors
        .iter()
        .find(|t| !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16))
    {
        return Err(FormatError::Unsupported(format!(
            "{}: tensor '{}' has dtype {}; model weights must be F32, F16 or BF16",
            path.display(),
            t.name,
            t.ty
        )));
    }
    Ok(tensors)
}

/// The shards of `model.safetensors.index.json`, checked against its `weight_map`.
fn read_sharded(dir: &Path) -> Result<Vec<HfTensor>> {
    let index_path = dir.join(INDEX_FILE);
    let index = read_json(&index_path)?.unwrap_or(serde_json::Value::Null);
    let bad = |what: String| FormatError::Invalid(format!("{}: {what}", index_path.display()));
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;

    // Shards in the order the index first names them; tensor → shard.
    let mut shards: Vec<&str> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut wanted: Vec<(&str, &str)> = Vec::with_capacity(map.len());
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("shard of tensor '{tensor}' is not a string")))?;
        if !is_inside(shard) {
            return Err(bad(format!(
                "shard '{shard}' of tensor '{tensor}' is not a relative path inside the folder"
            )));
        }
        if seen.insert(shard) {
            shards.push(shard);
        }
        wanted.push((tensor, shard));
    }
    if shards.is_empty() {
        return Err(bad("\"weight_map\" is empty".into()));
    }

    let mut tensors = Vec::new();
    // Tensor name → index into `shards` of the shard holding it.
    let mut owner: HashMap<String, usize> = HashMap::new();
    for (si, shard) in shards.iter().enumerate() {
        let path = dir.join(shard);
        if !path.is_file() {
            return Err(bad(format!("shard '{shard}' is missing")));
        }
        for t in read_weights(&path)? {
            if let Some(prev) = owner.insert(t.name.clone(), si) {
                return Err(FormatError::Duplicate {
                    what: "tensor",
                    name: format!("{} (in shards '{}' and '{shard}')", t.name, shards[prev]),
                });
            }
            tensors.push(t);
        }
    }
    for (tensor, shard) in wanted {
        match owner.get(tensor) {
            Some(&si) if shards[si] == shard => {}
            Some(&si) => {
                return Err(bad(format!(
                    "tensor '{tensor}' is listed in shard '{shard}' but found in '{}'",
                    shards[si]
                )))
            }
            None => {
                return Err(bad(format!(
                    "tensor '{tensor}' is missing from shard '{shard}'"
                )))
            }
        }
    }
    Ok(tensors)
}

/// A relative path made only of normal components (no root, prefix, `.` or `..`).
fn is_inside(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && !p.contains('\\')
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// The error for a folder without safetensors weights.
fn no_weights_error(dir: &Path) -> FormatError {
    let pickled = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                [".bin", ".pt", ".pth", ".ckpt", ".pkl"]
                    .iter()
                    .any(|ext| name.ends_with(ext))
            })
        })
        .unwrap_or(false);
    if pickled {
        FormatError::Unsupported(format!(
            "{}: only safetensors weights are read; pickle checkpoints (*.bin, *.pt, *.pth) are never loaded",
            dir.display()
        ))
    } else {
        FormatError::Invalid(format!(
            "{}: no {SINGLE_FILE} or {INDEX_FILE}",
            dir.display()
        ))
    }
}

/// The whole file as UTF-8, `None` when it does not exist; refused above
/// [`MAX_JSON_BYTES`].
fn read_text(path: &Path) -> Result<Option<String>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FormatError::io(path, e)),
    };
    if !meta.is_file() {
        return Err(FormatError::Invalid(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    if meta.len() > MAX_JSON_BYTES {
        return Err(FormatError::Invalid(format!(
            "{}: {} bytes, more than the {MAX_JSON_BYTES} allowed",
            path.display(),
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| FormatError::Invalid(format!("{}: not UTF-8", path.display())))
}

/// The file parsed as JSON, `None` when it does not exist.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let Some(text) = read_text(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| FormatError::Invalid(format!("{}: bad JSON: {e}", path.display())))
}

/// A `chat_template` value: a string, or a list of `{name, template}` whose "default"
/// entry is taken.
fn template_from(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items.iter().find_map(|it| {
            if it.get("name")?.as_str()? == "default" {
                Some(it.get("template")?.as_str()?.to_string())
            } else {
                None
            }
        }),
        _ => None,
    }
}
