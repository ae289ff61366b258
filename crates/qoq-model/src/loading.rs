//! Loading HF safetensors checkpoints (single file or sharded via `model.safetensors.index.json`),
//! memory-mapped, in either key layout.
//!
//! The model asks for tensors by their transformers-4.51 names (the QoQ-Med checkpoint):
//! `model.*` (decoder), `visual.*`, `lm_head.weight`, `time_series_embedding.*`. Checkpoints saved
//! by newer transformers put the decoder under `model.language_model.*` and the tower under
//! `model.visual.*`; [`KeyLayout::detect`] recognises them from the tensor names and
//! [`KeyLayout::checkpoint_name`] renames each request.

use crate::error::{Error, Result};
use crate::model::ClinicalVlm;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use qoq_core::hf_config::QwenVlConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Name of the shard index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// How the checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// transformers <= 4.51 (QoQ-Med): `model.layers.*`, `visual.*`.
    Flat,
    /// Newer transformers: `model.language_model.layers.*`, `model.visual.*`.
    Nested,
}

impl KeyLayout {
    /// `Nested` when any name starts with `model.language_model.` or `model.visual.`.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        if names
            .into_iter()
            .any(|n| n.starts_with("model.language_model.") || n.starts_with("model.visual."))
        {
            KeyLayout::Nested
        } else {
            KeyLayout::Flat
        }
    }

    /// The checkpoint's name for the tensor the model calls `canonical` (a flat-layout name).
    pub fn checkpoint_name(&self, canonical: &str) -> String {
        match self {
            KeyLayout::Flat => canonical.to_string(),
            KeyLayout::Nested => {
                if let Some(rest) = canonical.strip_prefix("visual.") {
                    format!("model.visual.{rest}")
                } else if let Some(rest) = canonical.strip_prefix("model.") {
                    format!("model.language_model.{rest}")
                } else {
                    canonical.to_string()
                }
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// Read a shard index: tensor name → shard file name.
pub fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let idx: IndexFile = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("bad index: {e}"),
    })?;
    Ok(idx.weight_map)
}

/// The safetensors files of a checkpoint: `path` itself when it is a file, else the shards listed
/// in `path/model.safetensors.index.json`, else `path/model.safetensors`. Every listed shard must
/// exist.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let index = path.join(INDEX_FILE);
    if index.is_file() {
        let shards: BTreeSet<String> = read_index(&index)?.into_values().collect();
        let files: Vec<PathBuf> = shards.iter().map(|s| path.join(s)).collect();
        for f in &files {
            if !f.is_file() {
                return Err(Error::Checkpoint {
                    path: f.clone(),
                    message: format!("shard listed in {} is missing", index.display()),
                });
            }
        }
        return Ok(files);
    }
    let single = path.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("no {INDEX_FILE} or {SINGLE_FILE} here"),
    })
}

/// Memory-map the files, checking each one's header and length first so that a truncated or
/// corrupt shard is reported by name.
#[allow(unsafe_code)]
fn mmap_files(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    for f in files {
        // SAFETY: the file is only read; a checkpoint modified on disk while mapped is undefined
        // behaviour, which is the documented contract of loading weights by mmap.
        unsafe { MmapedSafetensors::new(f) }.map_err(|e| Error::Checkpoint {
            path: f.clone(),
            message: format!("cannot read as safetensors (truncated or corrupt?): {e}"),
        })?;
    }
    // SAFETY: as above; every file was just mapped and parsed successfully.
    Ok(unsafe { MmapedSafetensors::multi(files) }?)
}

/// A `VarBuilder` over the checkpoint at `path` (file or directory) that answers flat-layout
/// names whatever the checkpoint's layout; also returns the detected layout.
pub fn checkpoint_var_builder(
    path: &Path,
    dtype: DType,
    dev: &Device,
) -> Result<(VarBuilder<'static>, KeyLayout)> {
    let files = checkpoint_files(path)?;
    let st = mmap_files(&files)?;
    let layout = KeyLayout::detect(st.tensors().iter().map(|(n, _)| n.as_str()));
    let vb = VarBuilder::from_backend(Box::new(st), dtype, dev.clone());
    let vb = match layout {
        KeyLayout::Flat => vb,
        KeyLayout::Nested => vb.rename_f(move |n| layout.checkpoint_name(n)),
    };
    Ok((vb, layout))
}

/// Read `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<QwenVlConfig> {
    let p = dir.join("config.json");
    QwenVlConfig::from_file(&p).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// Load `dir/config.json` and the weights in `dir` as an inference model.
pub fn load_model(dir: &Path, dtype: DType, dev: &Device) -> Result<(QwenVlConfig, ClinicalVlm)> {
    let cfg = read_config(dir)?;
    let (vb, _) = checkpoint_var_builder(dir, dtype, dev)?;
    let model = ClinicalVlm::new(&cfg, vb)?;
    Ok((cfg, model))
}

/// A backend that allocates nothing: it records every requested name and shape and answers with
/// a broadcast zero. Requests for a name of `known` with another shape fail, as they would on a
/// real checkpoint (modules may try alternative layouts of one tensor).
#[derive(Clone, Default)]
struct ShapeRecorder {
    seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
    known: Arc<BTreeMap<String, Vec<usize>>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(k) = self.known.get(name)
            && k.as_slice() != s.dims()
        {
            candle_core::bail!("{name}: checkpoint shape {k:?}, requested {:?}", s.dims());
        }
        let mut m = self
            .seen
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        m.insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder cannot answer unchecked request for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every parameter the model requests for `cfg` (flat-layout names) with its shape, found without
/// allocating the weights.
pub fn requested_parameters(cfg: &QwenVlConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    requested_parameters_with(cfg, &BTreeMap::new())
}

/// As [`requested_parameters`], where tensors named in `known` (flat-layout names) exist only with
/// the given shapes: a request with another shape fails as it would on the real checkpoint.
pub fn requested_parameters_with(
    cfg: &QwenVlConfig,
    known: &BTreeMap<String, Vec<usize>>,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let rec = ShapeRecorder {
        seen: Arc::default(),
        known: Arc::new(known.clone()),
    };
    // The recorder answers with broadcast zero scalars (nothing allocated), so the CPU is
    // enough whatever device the model will run on.
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::BF16, Device::Cpu);
    ClinicalVlm::new(cfg, vb)?;
    let m = rec
        .seen
        .lock()
        .map_err(|_| Error::Config("shape recorder poisoned".into()))?
        .clone();
    Ok(m)
}

/// How a checkpoint's tensor names compare with what the model requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyReport {
    /// Names in the checkpoint that no parameter uses.
    pub unused: Vec<String>,
    /// Parameters (checkpoint names) without a tensor.
    pub missing: Vec<String>,
}

impl KeyReport {
    /// No unused and no missing names.
    pub fn is_exact(&self) -> bool {
        self.unused.is_empty() && self.missing.is_empty()
    }
}

/// Compare checkpoint tensor names with the parameters the model requests for `cfg`.
pub fn compare_keys<'a>(
    cfg: &QwenVlConfig,
    checkpoint_names: impl IntoIterator<Item = &'a str>,
) -> Result<KeyReport> {
    let names: BTreeSet<&str> = checkpoint_names.into_iter().collect();
    let layout = KeyLayout::detect(names.iter().copied());
    let wanted: BTreeSet<String> = requested_parameters(cfg)?
        .into_keys()
        .map(|n| layout.checkpoint_name(&n))
        .collect();
    Ok(KeyReport {
        unused: names
            .iter()
            .filter(|n| !wanted.contains(**n))
            .map(|n| n.to_string())
            .collect(),
        missing: wanted
            .iter()
            .filter(|n| !names.contains(n.as_str()))
            .cloned()
            .collect(),
    })
}
