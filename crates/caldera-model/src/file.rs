//! One view over both file formats: GGUF-convention metadata and tensors under GGUF
//! names. A GGUF file is used as it is; an HF folder is translated on open
//! ([`crate::hf_names`]), so every architecture is read by one code path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use caldera_format::gguf::{GgufFile, GgufValue};
use caldera_format::hf::HfModel;
use caldera_format::{quant, GgmlType, TensorBytes};

use crate::error::{ModelError, Result};
use crate::weights::Weight;

/// A tensor under its GGUF name; `dims` in GGUF order (contiguous dimension first).
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<u64>,
    pub data: TensorBytes,
}

/// Where the tokenizer comes from.
pub enum TokenizerSource {
    /// `tokenizer.ggml.*` keys of the GGUF file.
    Gguf(Arc<GgufFile>),
    /// An HF `tokenizer.json` (+ `tokenizer_config.json`).
    HfJson {
        json: String,
        config: Option<serde_json::Value>,
    },
    None,
}

pub struct ModelFile {
    pub path: PathBuf,
    /// "gguf" or "hf".
    pub format: &'static str,
    gguf: Option<Arc<GgufFile>>,
    /// Metadata synthesized for HF folders (GGUF keys).
    meta: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<RawTensor>,
    tensor_index: HashMap<String, usize>,
    pub chat_template: Option<String>,
    pub tokenizer: TokenizerSource,
}

impl ModelFile {
    /// Opens a `.gguf` file or an HF folder (a directory with `config.json`).
    pub fn open(path: &Path) -> Result<ModelFile> {
        if path.is_dir() {
            let hf = HfModel::open(path)?;
            return crate::hf_names::translate(&hf);
        }
        if !path.exists() {
            return Err(ModelError::Invalid(format!(
                "{}: no such file or folder",
                path.display()
            )));
        }
        let g = Arc::new(GgufFile::open(path)?);
        ModelFile::from_gguf(path, g)
    }

    pub fn from_gguf(path: &Path, g: Arc<GgufFile>) -> Result<ModelFile> {
        let mut tensors = Vec::with_capacity(g.tensors().len());
        for t in g.tensors() {
            tensors.push(RawTensor {
                name: t.name.clone(),
                ty: t.ty,
                dims: t.dims.clone(),
                data: g.tensor_bytes(t),
            });
        }
        let chat_template = g.get_str("tokenizer.chat_template").map(str::to_owned);
        let mut f = ModelFile::new(path, "gguf", Vec::new(), tensors)?;
        f.chat_template = chat_template;
        f.tokenizer = TokenizerSource::Gguf(g.clone());
        f.gguf = Some(g);
        Ok(f)
    }

    /// Builds a file from synthesized metadata and tensors (HF translation, tests).
    pub fn new(
        path: &Path,
        format: &'static str,
        meta: Vec<(String, GgufValue)>,
        tensors: Vec<RawTensor>,
    ) -> Result<ModelFile> {
        let mut meta_index = HashMap::new();
        for (i, (k, _)) in meta.iter().enumerate() {
            meta_index.insert(k.clone(), i);
        }
        let mut tensor_index = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            if tensor_index.insert(t.name.clone(), i).is_some() {
                return Err(ModelError::Invalid(format!(
                    "duplicate tensor '{}'",
                    t.name
                )));
            }
        }
        Ok(ModelFile {
            path: path.to_path_buf(),
            format,
            gguf: None,
            meta,
            meta_index,
            tensors,
            tensor_index,
            chat_template: None,
            tokenizer: TokenizerSource::None,
        })
    }

    pub fn gguf(&self) -> Option<&Arc<GgufFile>> {
        self.gguf.as_ref()
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> Vec<(&str, &GgufValue)> {
        match &self.gguf {
            Some(g) => g.metadata().iter().map(|(k, v)| (k.as_str(), v)).collect(),
            None => self.meta.iter().map(|(k, v)| (k.as_str(), v)).collect(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        match &self.gguf {
            Some(g) => g.get(key),
            None => self.meta_index.get(key).map(|&i| &self.meta[i].1),
        }
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(|v| v.as_str())
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(|v| v.as_f32())
    }

    /// A required non-negative integer that fits a usize.
    pub fn req_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| ModelError::MissingKey(key.to_owned()))?;
        let n = v.as_u64().ok_or_else(|| ModelError::BadKey {
            key: key.to_owned(),
            msg: "expected a non-negative integer".into(),
        })?;
        usize::try_from(n).map_err(|_| ModelError::BadKey {
            key: key.to_owned(),
            msg: format!("{n} is too large"),
        })
    }

    pub fn req_f32(&self, key: &str) -> Result<f32> {
        self.get_f32(key)
            .ok_or_else(|| ModelError::MissingKey(key.to_owned()))
    }

    pub fn tensors(&self) -> &[RawTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&RawTensor> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// A 2-D weight `[cols, rows]` (GGUF order) with the given shape, and its `.bias`
    /// (`rows` values) when the file has one.
    pub fn weight(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let t = self
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let bad = |msg: String| ModelError::BadTensor {
            name: name.to_owned(),
            msg,
        };
        let (c, r) = match t.dims.as_slice() {
            [c, r] => (*c, *r),
            [c, r, rest @ ..] if rest.iter().all(|&d| d == 1) => (*c, *r),
            _ => return Err(bad(format!("expected 2 dims, found {:?}", t.dims))),
        };
        if c != cols as u64 || r != rows as u64 {
            return Err(bad(format!(
                "expected shape [{cols}, {rows}] (GGUF order), found {:?}",
                t.dims
            )));
        }
        if !quant::supports_dequantize(t.ty) {
            return Err(bad(format!("tensor type {} is not supported", t.ty)));
        }
        let bias = match name.strip_suffix(".weight") {
            Some(stem) => self.opt_vector(&format!("{stem}.bias"), rows)?,
            None => None,
        };
        Ok(Weight {
            name: name.to_owned(),
            ty: t.ty,
            rows,
            cols,
            data: t.data.clone(),
            bias,
        })
    }

    /// A 1-D tensor of `len` elements as f32 (norm weights, biases).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let n: u64 = t.dims.iter().product();
        if n != len as u64 {
            return Err(ModelError::BadTensor {
                name: name.to_owned(),
                msg: format!("expected {len} elements, found dims {:?}", t.dims),
            });
        }
        let mut out = vec![0f32; len];
        quant::dequantize(t.ty, t.data.as_slice(), &mut out).map_err(|e| {
            ModelError::BadTensor {
                name: name.to_owned(),
                msg: e.to_string(),
            }
        })?;
        Ok(out)
    }

    pub fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        if self.tensor(name).is_none() {
            return Ok(None);
        }
        self.vector(name, len).map(Some)
    }
}
