//! `--init-from`: a new run whose initial weights are another run's (the paper's two stages:
//! Stage 2 starts from Stage 1's weights). Everything else is fresh: the optimiser, the
//! estimator state, the data cursor, the step count; the KL reference policy (and a PPO critic's
//! body) start from the source's weights too, as they start from `model.model_path` in a plain
//! run.
//!
//! The source is a checkpoint folder (`<out_dir>/checkpoint_step_N`), or a run folder: its
//! **best** checkpoint when early stopping recorded one (`best_checkpoint.json`), else its
//! **latest** complete checkpoint. The choice, the step, and the sha256 of the source's
//! `model.safetensors` and `manifest.json` are saved in the new run's `trainer_state.json`
//! (`init_from`) and in its `events.jsonl` (`init_from` event).

use super::stopping::read_best;
use super::{Result, TrainerError};
use crate::checkpoint::{self, Checkpoint, InitSource};
use candle_core::{Device, Tensor};
use qoq_core::hf_config::QwenVlConfig;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A resolved `--init-from` source: which checkpoint, and its weights.
pub struct InitFrom {
    /// The record saved with the new run.
    pub source: InitSource,
    /// Every parameter of the source by checkpoint name.
    pub weights: HashMap<String, Tensor>,
}

impl std::fmt::Debug for InitFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitFrom")
            .field("source", &self.source)
            .field("tensors", &self.weights.len())
            .finish()
    }
}

fn config_err(path: &Path, reason: impl std::fmt::Display) -> TrainerError {
    TrainerError::Config(format!("--init-from {}: {reason}", path.display()))
}

impl InitFrom {
    /// Resolves `path` (a checkpoint folder, or a run folder: best, else latest) and loads the
    /// checkpoint's weights, verifying its manifest's hashes.
    pub fn resolve(path: &Path) -> Result<Self> {
        let (dir, chosen) = if path.join(checkpoint::files::MANIFEST).is_file() {
            (path.to_path_buf(), "given")
        } else if let Some(best) = read_best(path)? {
            (path.join(&best.checkpoint), "best")
        } else {
            match checkpoint::latest(path)? {
                Some((_, dir)) => (dir, "latest"),
                None => {
                    return Err(config_err(
                        path,
                        "neither a checkpoint folder (no manifest.json) nor a run folder with a \
                         complete checkpoint_step_N",
                    ));
                }
            }
        };
        let ck = Checkpoint::open(&dir)?;
        // Host memory on purpose: read once, before the run's device is opened; each
        // VarBuilder that takes them (policy, KL reference, critic) copies them to that device.
        let weights = ck.model(&Device::Cpu)?;
        let source = InitSource {
            checkpoint: std::fs::canonicalize(&dir)
                .unwrap_or_else(|_| dir.clone())
                .display()
                .to_string(),
            chosen: chosen.into(),
            step: ck.step(),
            model_sha256: ck.model_sha256()?,
            manifest_sha256: ck.manifest_sha256()?,
        };
        tracing::info!(
            checkpoint = %source.checkpoint,
            chosen = %source.chosen,
            step = source.step,
            "initialising the run from another run's weights"
        );
        Ok(Self { source, weights })
    }

    /// The recorded source of a resumed run, opened again (its KL reference is the source's
    /// weights): the checkpoint must still be there with the same weights.
    pub fn reopen(source: &InitSource) -> Result<Self> {
        let dir = Path::new(&source.checkpoint);
        let gone = |reason: String| {
            TrainerError::Config(format!(
                "this run started from {} (--init-from) and its KL reference policy is that \
                 checkpoint's weights: {reason}",
                source.checkpoint
            ))
        };
        let ck = Checkpoint::open(dir).map_err(|e| gone(e.to_string()))?;
        let sha = ck.model_sha256()?;
        if sha != source.model_sha256 {
            return Err(gone(format!(
                "its model.safetensors is now sha256 {sha}, the run recorded {}",
                source.model_sha256
            )));
        }
        Ok(Self {
            source: source.clone(),
            // Host memory, as in `resolve`: copied to the run's device by the VarBuilders.
            weights: ck.model(&Device::Cpu)?,
        })
    }

    /// Refuses a source whose parameters are not those the run's model (`model.model_path`'s
    /// `config.json`) requests, naming the missing, extra and differently shaped ones.
    pub fn check_architecture(&self, cfg: &QwenVlConfig, model_dir: &Path) -> Result<()> {
        let wanted: BTreeMap<String, Vec<usize>> =
            qoq_model::loading::requested_parameters(cfg).map_err(super::model_err)?;
        let have: BTreeMap<&str, &[usize]> = self
            .weights
            .iter()
            .map(|(k, t)| (k.as_str(), t.dims()))
            .collect();
        let missing: Vec<&str> = wanted
            .keys()
            .filter(|k| !have.contains_key(k.as_str()))
            .map(String::as_str)
            .collect();
        let extra: Vec<&str> = have
            .keys()
            .filter(|k| !wanted.contains_key(**k))
            .copied()
            .collect();
        let shapes: Vec<String> = wanted
            .iter()
            .filter_map(|(k, w)| {
                have.get(k.as_str())
                    .filter(|h| **h != w.as_slice())
                    .map(|h| format!("{k}: source {h:?}, model {w:?}"))
            })
            .collect();
        if missing.is_empty() && extra.is_empty() && shapes.is_empty() {
            return Ok(());
        }
        let few = |v: &[&str]| {
            let mut s = v.iter().take(4).copied().collect::<Vec<_>>().join(", ");
            if v.len() > 4 {
                s.push_str(&format!(", … ({} in all)", v.len()));
            }
            s
        };
        let mut parts = Vec::new();
        if !shapes.is_empty() {
            let v: Vec<&str> = shapes.iter().map(String::as_str).collect();
            parts.push(format!("shapes differ: {}", few(&v)));
        }
        if !missing.is_empty() {
            parts.push(format!("missing in the source: {}", few(&missing)));
        }
        if !extra.is_empty() {
            parts.push(format!("not in the run's model: {}", few(&extra)));
        }
        Err(TrainerError::Config(format!(
            "--init-from {}: its weights do not fit the architecture of model.model_path = {} \
             (config.json): {}",
            self.source.checkpoint,
            model_dir.display(),
            parts.join("; ")
        )))
    }

    /// Appends the `init_from` event to `<out_dir>/events.jsonl`.
    pub fn record(&self, out_dir: &Path) -> Result<()> {
        crate::run_dir::append_event(
            out_dir,
            &serde_json::json!({
                "event": "init_from",
                "time": crate::run_dir::utc_now(),
                "source": self.source,
            }),
        )?;
        Ok(())
    }
}
