//! Trainer checkpoints (spec §11 step 9 "save every `save_freq` steps", `save_limit`; §15: the
//! reference does not checkpoint the DRPO state, so resuming resets its history — we do).
//!
//! A checkpoint is a directory `checkpoint_step_{N}` holding
//!
//! | file | content |
//! |---|---|
//! | `model.safetensors` | trainable weights in HF layout (the caller's name → tensor map) |
//! | `optimizer.safetensors` | AdamW moments ([`crate::optim::AdamW::save`]) |
//! | `estimator.json` | the advantage estimator with its state (any `Serialize`) |
//! | `rng.json` | [`RngStates`] of every random stream |
//! | `cursor.json` | the data cursor (`qoq_data::manifest::Cursor`) |
//! | `trainer_state.json` | [`TrainerState`]: step, episode, last metrics |
//! | `config.toml` | the resolved run configuration |
//! | `qoq_processor.json` | the run's processor settings ([`crate::config::RunConfig::processor_options`] of `config.toml`), the file `qoq infer` / `qoq serve` / `qoq eval` read beside a model's `config.json` ([`qoq_processor::settings`]) |
//! | `critic.safetensors`, `critic_optimizer.safetensors` | PPO's value model and its AdamW (GAE runs only) |
//! | `adapter_config.json`, `adapter_model.safetensors` | a LoRA run's adapters in PEFT's layout ([`qoq_model::lora::write_peft`]; `model.safetensors` then holds the merged weights, `optimizer.safetensors` the adapters' state) |
//! | `manifest.json` | every file above with its size and sha256, written last |
//!
//! It is written into `checkpoint_step_{N}.tmp-{pid}` and renamed into place, so a run killed
//! while saving leaves only a `.tmp-*` directory, which discovery ignores and the next save
//! removes. Loading checks the manifest: a missing, truncated or altered file is an error that
//! names it.

use crate::optim::AdamW;
use crate::rng::RngStates;
use candle_core::{Device, Tensor};
use qoq_data::manifest::Cursor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// File names inside a checkpoint directory.
pub mod files {
    /// Model weights.
    pub const MODEL: &str = "model.safetensors";
    /// Optimiser state.
    pub const OPTIMIZER: &str = "optimizer.safetensors";
    /// Advantage estimator state.
    pub const ESTIMATOR: &str = "estimator.json";
    /// Random generator positions.
    pub const RNG: &str = "rng.json";
    /// Data cursor.
    pub const CURSOR: &str = "cursor.json";
    /// Trainer counters and metrics.
    pub const TRAINER_STATE: &str = "trainer_state.json";
    /// Resolved run configuration.
    pub const CONFIG: &str = "config.toml";
    /// The run's processor settings (`qoq_processor::SETTINGS_FILE`).
    pub const PROCESSOR: &str = "qoq_processor.json";
    /// The value model's weights (PPO with GAE).
    pub const CRITIC: &str = "critic.safetensors";
    /// The value model's optimiser state.
    pub const CRITIC_OPTIMIZER: &str = "critic_optimizer.safetensors";
    /// Sizes and hashes, written last.
    pub const MANIFEST: &str = "manifest.json";
    /// PEFT's adapter config (LoRA runs).
    pub const ADAPTER_CONFIG: &str = qoq_model::lora::PEFT_CONFIG_FILE;
    /// PEFT's adapter weights (LoRA runs).
    pub const ADAPTERS: &str = qoq_model::lora::PEFT_WEIGHTS_FILE;
}

const PREFIX: &str = "checkpoint_step_";

/// Errors of saving, finding and loading checkpoints; each names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file could not be written or parsed.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A safetensors file could not be written or read.
    #[error("{path}: {source}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: candle_core::Error,
    },
    /// The configuration to save is not a run configuration.
    #[error("checkpoint config.toml: {0}")]
    Config(String),
    /// The checkpoint is partial or altered: a file is missing, truncated or has another hash.
    #[error("incomplete checkpoint: {path}: {reason}")]
    Incomplete {
        /// The offending file.
        path: PathBuf,
        /// What does not match the manifest.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, CheckpointError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Trainer counters saved with every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Global training step (rollout batches done).
    pub step: u64,
    /// Episode (epoch over the training manifest), 0-based.
    pub episode: u64,
    /// Optimiser updates done.
    pub optimizer_steps: u64,
    /// The last logged metrics (spec §12 names); non-finite values are left out.
    pub metrics: BTreeMap<String, f64>,
    /// Whether the run takes supervised (SFT) steps instead of RL steps.
    #[serde(default)]
    pub sft: bool,
    /// The KL controller of a run with the KL in the reward (its β moves when adaptive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_controller: Option<crate::loss::KlController>,
    /// Fingerprints of the manifests the run trains on (`train`, `val`), taken when the run
    /// (re)started; a resume compares them with the files it finds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<crate::run_dir::DataFingerprint>,
    /// Early stopping's record (`trainer.early_stopping`): best value and step, bad
    /// validations, the stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<crate::early_stopping::EarlyStoppingState>,
    /// The checkpoint a run started from with `--init-from` ([`InitSource`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitSource>,
    /// The number of data-parallel ranks of the launch that wrote the checkpoint, when more
    /// than one ([`crate::dist`]); a resume with another number is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
}

/// Where the weights of a run started with `--init-from` came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSource {
    /// The checkpoint folder (absolute when it could be resolved).
    pub checkpoint: String,
    /// How it was chosen: `given` (a checkpoint folder), `best` or `latest` (of a run folder).
    pub chosen: String,
    /// Its step.
    pub step: u64,
    /// sha256 of its `model.safetensors`, as its manifest records it (and verified on load).
    pub model_sha256: String,
    /// sha256 of its `manifest.json`.
    pub manifest_sha256: String,
}

/// One file of a checkpoint as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// File name inside the checkpoint directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex sha256.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointManifest {
    /// Layout version (1).
    pub format: u32,
    /// The step of the checkpoint.
    pub step: u64,
    /// Every other file.
    pub files: Vec<ManifestEntry>,
}

/// What a checkpoint saves. `E` is the estimator (e.g. `qoq_rl::advantage::Estimator`).
#[derive(Debug)]
pub struct CheckpointData<'a, E: Serialize> {
    /// Trainable weights, HF names.
    pub model: &'a HashMap<String, Tensor>,
    /// The optimiser (absent before the first update of a run that saves at step 0).
    pub optimizer: Option<&'a AdamW>,
    /// The advantage estimator with its state.
    pub estimator: &'a E,
    /// Random streams.
    pub rng: &'a RngStates,
    /// Data position.
    pub cursor: Cursor,
    /// Counters and metrics; `trainer_state.step` names the directory.
    pub trainer_state: &'a TrainerState,
    /// The resolved configuration as TOML text.
    pub config_toml: &'a str,
    /// The processor options the run uses (written as the checkpoint's processor settings);
    /// the run's own, built once, so that a `data.format_prompt` template file is not read
    /// again at every checkpoint.
    pub processor: &'a qoq_processor::ProcessorOptions,
    /// PPO's value model (weights, optimiser), when the run has one.
    pub critic: Option<CriticData<'a>>,
    /// A LoRA run's adapters, written in PEFT's layout.
    pub peft: Option<PeftData<'a>>,
    /// The model folder's other files, copied so that the checkpoint is itself a model folder
    /// (`qoq eval --model`, `qoq infer`, `qoq serve` load it as an exported model).
    pub model_folder: Option<ModelFolder<'a>>,
}

/// Where a checkpoint's model-folder files come from.
#[derive(Debug, Clone, Copy)]
pub struct ModelFolder<'a> {
    /// The run's model folder (`model.model_path`): its `config.json` and
    /// `preprocessor_config.json`.
    pub dir: &'a Path,
    /// The run's tokenizer file (`model.tokenizer_path`); `None`: `dir/tokenizer.json`.
    pub tokenizer: Option<&'a Path>,
}

/// The LoRA adapters of a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct PeftData<'a> {
    /// Rank, alpha, targets.
    pub cfg: &'a qoq_model::lora::LoraConfig,
    /// `lora_dropout`.
    pub dropout: f64,
    /// `base_model_name_or_path`.
    pub base_model: &'a str,
    /// The adapter matrices, named `<projection>.lora_A.weight` / `.lora_B.weight`.
    pub adapters: &'a HashMap<String, Tensor>,
}

/// The value model part of a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CriticData<'a> {
    /// Weights by checkpoint name.
    pub weights: &'a HashMap<String, Tensor>,
    /// Its optimiser.
    pub optimizer: &'a AdamW,
}

/// `root/checkpoint_step_{step}`.
pub fn checkpoint_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{PREFIX}{step}"))
}

/// The step of a completed checkpoint directory's name (`None` for `.tmp-*` and other names).
pub fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = BufReader::with_capacity(1 << 20, File::open(path).map_err(io(path))?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, hex))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| CheckpointError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_synced(path, text.as_bytes())
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Removes `checkpoint_step_*.tmp-*` directories left by killed writers (other processes' and
/// this one's). Returns the removed paths.
pub fn remove_stale_tmp(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io(root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && name.contains(".tmp-") {
            let p = entry.path();
            std::fs::remove_dir_all(&p).map_err(io(&p))?;
            tracing::warn!(path = %p.display(), "removed a partial checkpoint");
            removed.push(p);
        }
    }
    Ok(removed)
}

/// Writes `root/checkpoint_step_{step}` atomically (temporary directory, then rename; an
/// existing checkpoint of the same step is replaced) and returns its path.
pub fn save<E: Serialize>(root: &Path, data: &CheckpointData<'_, E>) -> Result<PathBuf> {
    let _span = tracing::info_span!("checkpoint", step = data.trainer_state.step).entered();
    std::fs::create_dir_all(root).map_err(io(root))?;
    remove_stale_tmp(root)?;
    let step = data.trainer_state.step;
    let final_dir = checkpoint_dir(root, step);
    let tmp = root.join(format!("{PREFIX}{step}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    let mut names = Vec::new();
    let p = tmp.join(files::MODEL);
    candle_core::safetensors::save(data.model, &p).map_err(|source| CheckpointError::Tensor {
        path: p.clone(),
        source,
    })?;
    sync_file(&p)?;
    names.push(files::MODEL);
    if let Some(opt) = data.optimizer {
        let p = tmp.join(files::OPTIMIZER);
        opt.save(&p).map_err(|source| CheckpointError::Tensor {
            path: p.clone(),
            source,
        })?;
        sync_file(&p)?;
        names.push(files::OPTIMIZER);
    }
    if let Some(c) = data.critic {
        let p = tmp.join(files::CRITIC);
        candle_core::safetensors::save(c.weights, &p).map_err(|source| {
            CheckpointError::Tensor {
                path: p.clone(),
                source,
            }
        })?;
        sync_file(&p)?;
        let q = tmp.join(files::CRITIC_OPTIMIZER);
        c.optimizer
            .save(&q)
            .map_err(|source| CheckpointError::Tensor {
                path: q.clone(),
                source,
            })?;
        sync_file(&q)?;
        names.extend([files::CRITIC, files::CRITIC_OPTIMIZER]);
    }
    if let Some(pd) = data.peft {
        qoq_model::lora::write_peft(&tmp, pd.cfg, pd.dropout, pd.base_model, pd.adapters).map_err(
            |e| CheckpointError::Config(format!("{}: LoRA adapters: {e}", tmp.display())),
        )?;
        for name in [files::ADAPTER_CONFIG, files::ADAPTERS] {
            sync_file(&tmp.join(name))?;
        }
        names.extend([files::ADAPTER_CONFIG, files::ADAPTERS]);
    }
    write_json(&tmp.join(files::ESTIMATOR), data.estimator)?;
    write_json(&tmp.join(files::RNG), data.rng)?;
    write_json(&tmp.join(files::CURSOR), &data.cursor)?;
    let mut state = data.trainer_state.clone();
    state.metrics.retain(|_, v| v.is_finite());
    write_json(&tmp.join(files::TRAINER_STATE), &state)?;
    write_synced(&tmp.join(files::CONFIG), data.config_toml.as_bytes())?;
    // The processor settings travel with the weights (a model folder made from this checkpoint
    // is served with them).
    let settings = qoq_processor::ProcessorSettings::from_options(data.processor);
    let p = tmp.join(files::PROCESSOR);
    let text = serde_json::to_string_pretty(&settings).map_err(|source| CheckpointError::Json {
        path: p.clone(),
        source,
    })? + "\n";
    write_synced(&p, text.as_bytes())?;
    names.extend([
        files::ESTIMATOR,
        files::RNG,
        files::CURSOR,
        files::TRAINER_STATE,
        files::CONFIG,
        files::PROCESSOR,
    ]);
    if let Some(m) = data.model_folder {
        for (name, from) in qoq_processor::model_folder_files(m.dir, m.tokenizer) {
            std::fs::copy(&from, tmp.join(name)).map_err(io(&from))?;
            names.push(name);
        }
    }

    let mut entries = Vec::new();
    for name in names {
        let (size, sha256) = sha256_file(&tmp.join(name))?;
        entries.push(ManifestEntry {
            name: name.to_string(),
            size,
            sha256,
        });
    }
    let manifest = CheckpointManifest {
        format: 1,
        step,
        files: entries,
    };
    write_json(&tmp.join(files::MANIFEST), &manifest)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    if let Ok(d) = File::open(root) {
        let _ = d.sync_all();
    }
    tracing::info!(path = %final_dir.display(), "checkpoint saved");
    Ok(final_dir)
}

fn read_manifest(dir: &Path) -> Result<CheckpointManifest> {
    let p = dir.join(files::MANIFEST);
    let text = std::fs::read_to_string(&p).map_err(|e| CheckpointError::Incomplete {
        path: p.clone(),
        reason: format!("cannot read the manifest (written last): {e}"),
    })?;
    serde_json::from_str(&text).map_err(|source| CheckpointError::Json { path: p, source })
}

/// Checks a checkpoint directory against its manifest: every file present, with the recorded
/// size and (when `hashes`) the recorded sha256.
pub fn verify(dir: &Path, hashes: bool) -> Result<CheckpointManifest> {
    let m = read_manifest(dir)?;
    for e in &m.files {
        let p = dir.join(&e.name);
        let meta = std::fs::metadata(&p).map_err(|err| CheckpointError::Incomplete {
            path: p.clone(),
            reason: format!("listed in the manifest but unreadable: {err}"),
        })?;
        if meta.len() != e.size {
            return Err(CheckpointError::Incomplete {
                path: p,
                reason: format!("{} bytes, the manifest says {}", meta.len(), e.size),
            });
        }
        if hashes {
            let (_, sha) = sha256_file(&p)?;
            if sha != e.sha256 {
                return Err(CheckpointError::Incomplete {
                    path: p,
                    reason: format!("sha256 {sha}, the manifest says {}", e.sha256),
                });
            }
        }
    }
    Ok(m)
}

/// Completed checkpoints under `root` (name parses, manifest present, sizes match), sorted by
/// step. Partial ones are skipped with a warning.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(root))?;
        let Some(step) = parse_step(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        let p = entry.path();
        if !p.is_dir() {
            continue;
        }
        match verify(&p, false) {
            Ok(_) => out.push((step, p)),
            Err(e) => tracing::warn!("skipping checkpoint: {e}"),
        }
    }
    out.sort();
    Ok(out)
}

/// The completed checkpoint with the highest step, if any.
pub fn latest(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list(root)?.pop())
}

/// `path` as a checkpoint to resume: the newest complete checkpoint when `path` is a run folder
/// that holds one, else `path` itself (a checkpoint folder; opening it says what is wrong).
pub fn latest_or_self(path: &Path) -> Result<PathBuf> {
    Ok(latest(path)?.map_or_else(|| path.to_path_buf(), |(_, p)| p))
}

/// Keeps the newest `keep_last` completed checkpoints (the reference's `save_limit`; `None`
/// keeps all) and removes the older ones. Returns the removed directories.
pub fn prune(root: &Path, keep_last: Option<usize>) -> Result<Vec<PathBuf>> {
    prune_except(root, keep_last, None)
}

/// [`prune`] that never removes the checkpoint of step `protect` (early stopping's best) and
/// does not count it among the `keep_last` newest.
pub fn prune_except(
    root: &Path,
    keep_last: Option<usize>,
    protect: Option<u64>,
) -> Result<Vec<PathBuf>> {
    let Some(keep) = keep_last else {
        return Ok(Vec::new());
    };
    let all: Vec<(u64, PathBuf)> = list(root)?
        .into_iter()
        .filter(|(s, _)| Some(*s) != protect)
        .collect();
    let n_remove = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, p) in all.into_iter().take(n_remove) {
        std::fs::remove_dir_all(&p).map_err(io(&p))?;
        removed.push(p);
    }
    Ok(removed)
}

/// A verified checkpoint directory, read file by file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    manifest: CheckpointManifest,
}

impl Checkpoint {
    /// Opens `dir`, verifying every file's size and sha256 against the manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true)
    }

    /// Opens `dir`, checking sizes always and hashes when `hashes` (hashing reads every byte:
    /// a 7B run's weights and AdamW moments are about 90 GB).
    pub fn open_with(dir: &Path, hashes: bool) -> Result<Self> {
        let manifest = verify(dir, hashes)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &CheckpointManifest {
        &self.manifest
    }

    /// The checkpoint's step.
    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        if self.manifest.files.iter().any(|e| e.name == name) {
            Ok(p)
        } else {
            Err(CheckpointError::Incomplete {
                path: p,
                reason: "not listed in the manifest".into(),
            })
        }
    }

    fn json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let p = self.path(name)?;
        let text = std::fs::read_to_string(&p).map_err(io(&p))?;
        serde_json::from_str(&text).map_err(|source| CheckpointError::Json { path: p, source })
    }

    /// The model weights on `device`.
    pub fn model(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let p = self.path(files::MODEL)?;
        candle_core::safetensors::load(&p, device)
            .map_err(|source| CheckpointError::Tensor { path: p, source })
    }

    /// One tensor of the model weights on `device`, as f32, read through a memory map (the file
    /// is not read whole).
    pub fn model_tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let p = self.path(files::MODEL)?;
        let (vb, _) =
            qoq_model::loading::checkpoint_var_builder(&self.dir, candle_core::DType::F32, device)
                .map_err(|e| CheckpointError::Config(format!("{}: {e}", p.display())))?;
        vb.get_unchecked_dtype(name, candle_core::DType::F32)
            .map_err(|source| CheckpointError::Tensor { path: p, source })
    }

    /// Whether an optimiser state was saved.
    pub fn has_optimizer(&self) -> bool {
        self.manifest
            .files
            .iter()
            .any(|e| e.name == files::OPTIMIZER)
    }

    /// Restores the optimiser's moments and step counters into `opt`.
    pub fn load_optimizer(&self, opt: &mut AdamW) -> Result<()> {
        let p = self.path(files::OPTIMIZER)?;
        opt.load(&p)
            .map_err(|source| CheckpointError::Tensor { path: p, source })
    }

    /// Whether the checkpoint holds a value model.
    pub fn has_critic(&self) -> bool {
        self.manifest.files.iter().any(|e| e.name == files::CRITIC)
    }

    /// The value model's weights on `device`.
    pub fn critic(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let p = self.path(files::CRITIC)?;
        candle_core::safetensors::load(&p, device)
            .map_err(|source| CheckpointError::Tensor { path: p, source })
    }

    /// Whether the checkpoint holds LoRA adapters.
    pub fn has_adapters(&self) -> bool {
        self.manifest
            .files
            .iter()
            .any(|e| e.name == files::ADAPTERS)
    }

    /// The LoRA adapters on `device`, named `<projection>.lora_A.weight` / `.lora_B.weight`
    /// (read back from PEFT's key names).
    pub fn adapters(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let p = self.path(files::ADAPTERS)?;
        qoq_model::lora::read_peft_weights(&p, device)
            .map_err(|e| CheckpointError::Config(e.to_string()))
    }

    /// Restores the value model's optimiser into `opt`.
    pub fn load_critic_optimizer(&self, opt: &mut AdamW) -> Result<()> {
        let p = self.path(files::CRITIC_OPTIMIZER)?;
        opt.load(&p)
            .map_err(|source| CheckpointError::Tensor { path: p, source })
    }

    /// The estimator JSON text (for `Estimator::load_state`, which rebuilds DRPO's indices).
    pub fn estimator_json(&self) -> Result<String> {
        let p = self.path(files::ESTIMATOR)?;
        std::fs::read_to_string(&p).map_err(io(&p))
    }

    /// The estimator deserialised as `E`.
    pub fn estimator<E: DeserializeOwned>(&self) -> Result<E> {
        self.json(files::ESTIMATOR)
    }

    /// The random streams.
    pub fn rng(&self) -> Result<RngStates> {
        self.json(files::RNG)
    }

    /// The data cursor.
    pub fn cursor(&self) -> Result<Cursor> {
        self.json(files::CURSOR)
    }

    /// Trainer counters and metrics.
    pub fn trainer_state(&self) -> Result<TrainerState> {
        self.json(files::TRAINER_STATE)
    }

    /// sha256 of `manifest.json`.
    pub fn manifest_sha256(&self) -> Result<String> {
        Ok(sha256_file(&self.dir.join(files::MANIFEST))?.1)
    }

    /// sha256 of `model.safetensors` as the manifest records it.
    pub fn model_sha256(&self) -> Result<String> {
        self.manifest
            .files
            .iter()
            .find(|e| e.name == files::MODEL)
            .map(|e| e.sha256.clone())
            .ok_or_else(|| CheckpointError::Incomplete {
                path: self.dir.join(files::MODEL),
                reason: "not listed in the manifest".into(),
            })
    }

    /// The resolved configuration TOML.
    pub fn config_toml(&self) -> Result<String> {
        let p = self.path(files::CONFIG)?;
        std::fs::read_to_string(&p).map_err(io(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_protected_step_beside_the_newest() {
        let root = tempfile::tempdir().unwrap();
        for step in 1..=5u64 {
            let d = checkpoint_dir(root.path(), step);
            std::fs::create_dir_all(&d).unwrap();
            let m = CheckpointManifest {
                format: 1,
                step,
                files: Vec::new(),
            };
            write_json(&d.join(files::MANIFEST), &m).unwrap();
        }
        prune_except(root.path(), Some(2), Some(2)).unwrap();
        let left: Vec<u64> = list(root.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![2, 4, 5]);
        prune(root.path(), Some(2)).unwrap();
        let left: Vec<u64> = list(root.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![4, 5]);
    }

    #[test]
    fn only_exact_checkpoint_names_parse() {
        assert_eq!(parse_step("checkpoint_step_30"), Some(30));
        assert_eq!(parse_step("checkpoint_step_30.tmp-123"), None);
        assert_eq!(parse_step("checkpoint_step_"), None);
        assert_eq!(parse_step("global_step_30"), None);
    }
}
