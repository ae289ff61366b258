//! The RL training loop (spec §10-§12; reference `verl/trainer/ray_trainer.py::fit` with
//! `verl/workers/actor/dp_actor.py::update_policy`).
//!
//! One [`Trainer::step`]:
//! 1. draws `data.rollout_batch_size` prompts from the manifest in its seeded, resumable order;
//! 2. processes them and samples `rollout.n` responses per prompt with [`qoq_engine::generate`];
//!    each prompt's random stream id is `epoch · rows + row index`, so a rollout depends only on
//!    the weights, the seed and the row (resumed runs sample the same tokens);
//! 3. decodes and scores the responses with the configured reward (segmentation masks are loaded
//!    at the processed image size);
//! 4. computes advantages with the configured estimator (domain key `algorithm.drpo.domain_key`);
//! 5. updates the policy: mini-batches of `actor.global_batch_size · n` rollouts, each split in
//!    micro-batches of `actor.micro_batch_size_per_device_for_update`; every micro-batch runs a
//!    Train-mode forward on prompt (left-padded) + response (right-padded), takes the response
//!    tokens' log-probs and the actor loss divided by the number of micro-batches, and
//!    accumulates gradients; AdamW steps once per mini-batch (a non-finite gradient norm skips
//!    the step and is counted);
//! 6. logs the reference metric names ([`crate::metrics_log::names`]) and, every
//!    `trainer.save_freq` steps, writes an atomic checkpoint.
//!
//! Simplifications of this core, all documented in the metrics or errors they affect:
//! - one PPO epoch: the old log-probs are the sampler's log-probs of the drawn tokens (raw logits,
//!   temperature 1, computed with the KV cache), so the ratio starts at 1 up to rounding between
//!   the cached decode and the full training forward; `actor.ppo_epochs` must be 1;
//! - the KL reference policy is the initial checkpoint at `model.model_path`, loaded frozen when
//!   `algorithm.kl` puts the KL in the loss;
//! - `rollout.image_pad_logit_bias` is applied to the video and ECG placeholder tokens too (a
//!   sampled placeholder cannot be re-encoded by the training forward; should one be sampled
//!   anyway it is fed as padding and masked out of the loss);
//! - no KL-in-reward, no validation loop, single device (`n_gpus_per_node` only
//!   enters the config's batch-size checks).
//!
//! Besides the reference metric names, each step logs `timing_s/gen`, `timing_s/update_actor`,
//! `prompt_length/mean` and the cumulative `actor/skipped_steps`.
//!
//! There is no mutable random state: sampling seeds derive from `(rollout.seed, stream, rollout)`
//! and the data order from `(data.seed, epoch)`, so the checkpoint's `rng.json` is empty.

use crate::advantage::{Estimator, RolloutReward};
use crate::checkpoint::{self, Checkpoint, CheckpointData, TrainerState};
use crate::config::{DtypeName, RunConfig};
use crate::loss::{
    ActorLossInputs, KlTerm, PolicyLossInputs, compute_actor_loss, log_probs_from_logits,
};
use crate::metrics_log::{MetricsRecord, RunLog, names};
use crate::optim::{AdamW, GradAccumulator};
use crate::rng::RngStates;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use qoq_core::{ClinicalSample, FinishReason, RewardScore};
use qoq_data::manifest::{Cursor, Manifest};
use qoq_engine::{GenerateConfig, Generated, GroupRequest, SamplingParams, StopCondition};
use qoq_model::train::{Freeze, ParamStore, trainable_var_builder};
use qoq_model::{ClinicalVlm, ForwardMode, ModelInputs};
use qoq_processor::processor::{ProcessedBatch, ProcessedSample, Processor};
use qoq_reward::{MaskIndex, RewardFn, RewardInput};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Metric: optimiser steps skipped so far because of a non-finite gradient norm.
pub const SKIPPED_STEPS: &str = "actor/skipped_steps";
/// Metric: token-mean cross-entropy of the SFT targets ([`Trainer::sft_step`]).
pub const SFT_LOSS: &str = "sft/loss";

/// The SFT target of an answer: the reasoning block, then the boxed answer (the response format
/// of the QoQ prompt). With a ground-truth box (in the pixels of the image the model sees) the
/// reasoning block outlines it as the prompt asks, a ```json list of `{"bbox_2d", "label"}`
/// (which the reward's format and IoU scores read); without one it is empty.
pub fn sft_target(answer: &str, bbox: Option<[f64; 4]>) -> String {
    match bbox {
        Some(b) => {
            let item = serde_json::json!([{
                "bbox_2d": b.map(|v| v.round() as i64),
                "label": answer,
            }]);
            format!("<think>\n```json\n{item}\n```\n</think>\n\\boxed{{{answer}}}")
        }
        None => format!("<think>\n</think>\n\\boxed{{{answer}}}"),
    }
}

/// Metric: seconds spent generating the step's rollouts (reference `timing_s/gen`).
pub const TIMING_GEN: &str = "timing_s/gen";
/// Metric: seconds spent in the policy update (reference `timing_s/update_actor`).
pub const TIMING_UPDATE: &str = "timing_s/update_actor";
/// Metric: seconds spent validating (on validation steps).
pub const TIMING_VALIDATION: &str = "timing_s/validation";
/// Metric: seconds spent on the reference policy's log-probs for the KL in the reward.
pub const TIMING_REF: &str = "timing_s/ref";
/// Metric: batch mean of the per-sequence mean KL to the reference (KL in the reward).
pub const CRITIC_KL: &str = "critic/kl";
/// Metric: the β applied to the KL in the reward this step.
pub const CRITIC_KL_COEF: &str = "critic/kl_coef";
/// Metric: groups kept by dynamic filtering.
pub const FILTER_KEPT_GROUPS: &str = "filter/kept_groups";
/// Metric: groups dropped by dynamic filtering (reward std at most `algorithm.filter_min_std`).
pub const FILTER_DROPPED_GROUPS: &str = "filter/dropped_groups";
/// Metric: mean prompt length in tokens (image and ECG placeholders included).
pub const PROMPT_LENGTH_MEAN: &str = "prompt_length/mean";

/// Errors of the trainer; each names the step, file or field concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The run configuration is invalid or unsupported by this trainer.
    #[error("config: {0}")]
    Config(String),
    /// A manifest row could not be read or processed.
    #[error("step {step}: manifest {path}: {message}")]
    Data {
        step: u64,
        path: PathBuf,
        message: String,
    },
    /// Loading or running the model failed.
    #[error("model: {0}")]
    Model(String),
    /// Generation failed.
    #[error("step {step}: generation: {message}")]
    Generate { step: u64, message: String },
    /// Advantage estimation failed.
    #[error("step {step}: advantages: {source}")]
    Advantage {
        step: u64,
        #[source]
        source: crate::Error,
    },
    /// The loss failed.
    #[error("step {step}: loss: {source}")]
    Loss {
        step: u64,
        #[source]
        source: crate::loss::LossError,
    },
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// The metrics log failed.
    #[error(transparent)]
    Metrics(#[from] crate::metrics_log::MetricsLogError),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result of the trainer.
pub type Result<T> = std::result::Result<T, TrainerError>;

fn model_err(e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Model(e.to_string())
}

/// Log-probabilities `(b, r_len)` of the response tokens `labels` under `model`: the hidden state
/// at position p predicts token p + 1, so positions `s - 1 .. s - 1 + r_len` of a prompt of
/// length `s` followed by the response.
pub fn response_log_probs(
    model: &ClinicalVlm,
    inputs: &ModelInputs,
    s: usize,
    labels: &Tensor,
    mode: ForwardMode,
    step: u64,
) -> Result<Tensor> {
    let r_len = labels.dim(1)?;
    let hidden = model
        .forward_hidden(inputs, mode)
        .map_err(model_err)?
        .narrow(1, s - 1, r_len)?;
    let logits = model
        .logits_from_hidden(&hidden)
        .map_err(model_err)?
        .to_dtype(DType::F32)?;
    log_probs_from_logits(&logits, labels).map_err(|source| TrainerError::Loss { step, source })
}

/// What one [`Trainer::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// The step just completed (1-based).
    pub step: u64,
    /// Its metrics, as logged (validation metrics included on validation steps).
    pub metrics: BTreeMap<String, f64>,
    /// The checkpoint written after it ([`Trainer::train_step`] on save steps).
    pub checkpoint: Option<PathBuf>,
}

/// Tensors of a micro-batch of rollouts ([`rollout_tensors`]).
#[derive(Debug)]
pub struct RolloutTensors {
    /// Prompt (left-padded) + response (right-padded) inputs.
    pub inputs: ModelInputs,
    /// Prompt length of the collated batch.
    pub s: usize,
    /// Response tokens `(b, r_len)`, `pad` after each response's end.
    pub labels: Tensor,
    /// Loss mask `(b, r_len)`: 1 on response tokens, 0 on padding and sampled placeholders.
    pub mask: Tensor,
    /// The sampler's log-probs of the response tokens `(b, r_len)`.
    pub old: Tensor,
}

/// Model inputs and per-token tensors `(b, r_len)` of `rollouts` answering the rows of the
/// collated prompt `batch` (row i answers row i): prompt + response inputs, the response tokens
/// as labels, the loss mask and the sampler's log-probs. A sampled placeholder token (possible
/// when its logit bias is off) would be taken for a feature slot: it is fed as `pad` and left out
/// of the mask.
pub fn rollout_tensors(
    batch: &ProcessedBatch,
    rollouts: &[&Generated],
    placeholders: &[u32],
    pad: u32,
    dev: &Device,
) -> Result<RolloutTensors> {
    let cleaned: Vec<Vec<u32>> = rollouts
        .iter()
        .map(|r| {
            r.tokens
                .iter()
                .map(|t| if placeholders.contains(t) { pad } else { *t })
                .collect()
        })
        .collect();
    let responses: Vec<&[u32]> = cleaned.iter().map(Vec::as_slice).collect();
    let r_len = responses.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let inputs = batch_to_inputs(batch, &responses, r_len, pad, dev)?;
    let b = rollouts.len();
    let mut labels = vec![pad; b * r_len];
    let mut mask = vec![0f32; b * r_len];
    let mut old = vec![0f32; b * r_len];
    for (i, r) in rollouts.iter().enumerate() {
        for (j, (&t, &lp)) in r.tokens.iter().zip(&r.logprobs).enumerate() {
            labels[i * r_len + j] = t;
            mask[i * r_len + j] = if placeholders.contains(&t) { 0.0 } else { 1.0 };
            old[i * r_len + j] = lp;
        }
    }
    Ok(RolloutTensors {
        inputs,
        s: batch.seq_len(),
        labels: Tensor::from_vec(labels, (b, r_len), dev)?,
        mask: Tensor::from_vec(mask, (b, r_len), dev)?,
        old: Tensor::from_vec(old, (b, r_len), dev)?,
    })
}

/// One prompt of a step with its rollouts.
struct PromptGroup {
    stream: u64,
    sample: ClinicalSample,
    processed: ProcessedSample,
    mask: Option<MaskIndex>,
    rollouts: Vec<Generated>,
}

/// The RL trainer: model, optimiser, estimator, data cursor and logs of one run.
pub struct Trainer {
    cfg: RunConfig,
    config_toml: String,
    out_dir: PathBuf,
    device: Device,
    processor: Processor,
    model: ClinicalVlm,
    store: ParamStore,
    ref_model: Option<ClinicalVlm>,
    opt: AdamW,
    estimator: Estimator,
    reward: Box<dyn RewardFn>,
    manifest: Manifest,
    cursor: Cursor,
    state: TrainerState,
    log: RunLog,
    records: Vec<MetricsRecord>,
    val_manifest: Manifest,
}

fn dtype_of(d: DtypeName) -> DType {
    match d {
        DtypeName::F32 => DType::F32,
        DtypeName::Bf16 => DType::BF16,
        DtypeName::F16 => DType::F16,
    }
}

impl Trainer {
    /// A fresh run of `cfg` writing into `trainer.out_dir`, scored by the configured reward.
    pub fn new(cfg: RunConfig) -> Result<Self> {
        let reward = cfg
            .reward
            .build()
            .map_err(|e| TrainerError::Config(format!("reward: {e}")))?;
        Self::with_reward(cfg, reward)
    }

    /// A fresh run scored by `reward` instead of the configured one.
    pub fn with_reward(cfg: RunConfig, reward: Box<dyn RewardFn>) -> Result<Self> {
        let out_dir = PathBuf::from(&cfg.trainer.out_dir);
        let model_dir = PathBuf::from(&cfg.model.model_path);
        let dtype = dtype_of(cfg.model.master_dtype);
        let (vb, _) = qoq_model::loading::checkpoint_var_builder(&model_dir, dtype, &Device::Cpu)
            .map_err(|e| model_err(format!("{}: {e}", model_dir.display())))?;
        Self::build(cfg, reward, vb, out_dir, None)
    }

    /// Resumes the run whose checkpoint is `dir` (`<out_dir>/checkpoint_step_N`): weights,
    /// optimiser, estimator, cursor, trainer state and config come from it; the metrics log in
    /// the parent folder is truncated to the checkpoint's step.
    pub fn resume(dir: &Path) -> Result<Self> {
        Self::resume_inner(dir, None, &[])
    }

    /// [`Trainer::resume`] with `key=value` overrides applied to the checkpoint's config (e.g. a
    /// longer `trainer.max_steps`, another `trainer.save_freq`). Keys that would make the saved
    /// state meaningless are refused: `model.*` (the weights' architecture and freezing) and
    /// `algorithm.estimator` (the estimator state).
    pub fn resume_with_overrides(dir: &Path, overrides: &[String]) -> Result<Self> {
        Self::resume_inner(dir, None, overrides)
    }

    /// [`Trainer::resume`] with a reward other than the configured one.
    pub fn resume_with_reward(dir: &Path, reward: Box<dyn RewardFn>) -> Result<Self> {
        Self::resume_inner(dir, Some(reward), &[])
    }

    fn resume_inner(
        dir: &Path,
        reward: Option<Box<dyn RewardFn>>,
        overrides: &[String],
    ) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        let text = ck.config_toml()?;
        for o in overrides {
            let key = o.split('=').next().unwrap_or("").trim();
            if key.starts_with("model.") || key == "algorithm.estimator" {
                return Err(TrainerError::Config(format!(
                    "--set {o}: `{key}` cannot change when resuming (the checkpoint's weights and \
                     estimator state depend on it)"
                )));
            }
        }
        let cfg = RunConfig::from_toml_str_with_overrides(
            &text,
            &dir.join(checkpoint::files::CONFIG).display().to_string(),
            overrides,
        )
        .map_err(|e| TrainerError::Config(e.to_string()))?;
        let reward = match reward {
            Some(r) => r,
            None => cfg
                .reward
                .build()
                .map_err(|e| TrainerError::Config(format!("reward: {e}")))?,
        };
        let dtype = dtype_of(cfg.model.master_dtype);
        let weights = ck.model(&Device::Cpu)?;
        let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
        let out_dir = dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::build(cfg, reward, vb, out_dir, Some(&ck))
    }

    fn build(
        cfg: RunConfig,
        reward: Box<dyn RewardFn>,
        vb: VarBuilder<'static>,
        out_dir: PathBuf,
        ck: Option<&Checkpoint>,
    ) -> Result<Self> {
        cfg.validate()
            .map_err(|e| TrainerError::Config(e.to_string()))?;
        if cfg.algorithm.kl.kl_in_reward()
            && cfg.algorithm.kl.kl_penalty == crate::loss::KlEstimator::Full
        {
            return Err(TrainerError::Config(
                "algorithm.kl: kl_penalty = \"full\" needs vocabulary log-probs and works with \
                 use_kl_loss = true only; the KL in the reward takes kl, abs, mse or low_var_kl"
                    .into(),
            ));
        }
        if cfg.actor.ppo_epochs != 1 {
            return Err(TrainerError::Config(format!(
                "actor.ppo_epochs = {}: this trainer reuses the sampler's log-probs as the old \
                 policy and supports 1 only",
                cfg.actor.ppo_epochs
            )));
        }
        let device = Device::Cpu;
        let model_dir = PathBuf::from(&cfg.model.model_path);
        let model_cfg = qoq_model::loading::read_config(&model_dir).map_err(model_err)?;
        let opts = cfg.processor_options();
        let processor = Processor::from_model_dir(
            &model_dir,
            cfg.model.tokenizer_path.as_deref().map(Path::new),
            opts,
        )
        .map_err(|e| model_err(format!("processor of {}: {e}", model_dir.display())))?;
        let freeze = Freeze {
            vision_tower: cfg.model.freeze_vision_tower,
            time_series_encoder: cfg.model.freeze_time_series_encoder,
            llm: cfg.model.freeze_llm,
        };
        let (vb, store) = trainable_var_builder(vb, freeze);
        let model = ClinicalVlm::new(&model_cfg, vb).map_err(model_err)?;
        let ref_model = if cfg.algorithm.kl.kl_in_loss() || cfg.algorithm.kl.kl_in_reward() {
            let dtype = dtype_of(cfg.model.master_dtype);
            let (_, m) =
                qoq_model::loading::load_model(&model_dir, dtype, &device).map_err(model_err)?;
            Some(m)
        } else {
            None
        };
        let params = store.trainable().map_err(model_err)?;
        if params.is_empty() {
            return Err(TrainerError::Config(
                "model: every component is frozen; nothing to train".into(),
            ));
        }
        let mut opt = AdamW::new(params, cfg.actor.optim.clone())?;
        let manifest_path = PathBuf::from(&cfg.data.train_files);
        let manifest = Manifest::open(&manifest_path, cfg.data.manifest.clone()).map_err(|e| {
            TrainerError::Data {
                step: 0,
                path: manifest_path.clone(),
                message: e.to_string(),
            }
        })?;
        if manifest.len() < cfg.data.rollout_batch_size {
            return Err(TrainerError::Config(format!(
                "{}: {} rows, fewer than data.rollout_batch_size = {}",
                manifest_path.display(),
                manifest.len(),
                cfg.data.rollout_batch_size
            )));
        }
        let val_path = PathBuf::from(&cfg.data.val_files);
        let val_manifest = Manifest::open(&val_path, cfg.data.manifest.clone()).map_err(|e| {
            TrainerError::Data {
                step: 0,
                path: val_path.clone(),
                message: e.to_string(),
            }
        })?;
        let kl_controller = if cfg.algorithm.kl.kl_in_reward() {
            Some(
                crate::loss::KlController::from_config(&cfg.algorithm.kl)
                    .map_err(|source| TrainerError::Loss { step: 0, source })?,
            )
        } else {
            None
        };
        let config_toml = cfg
            .to_toml_string()
            .map_err(|e| TrainerError::Config(e.to_string()))?;
        let (estimator, cursor, state, resume_step) = match ck {
            Some(ck) => {
                if ck.has_optimizer() {
                    ck.load_optimizer(&mut opt)?;
                }
                let est = Estimator::load_state(&ck.estimator_json()?).map_err(|source| {
                    TrainerError::Advantage {
                        step: ck.step(),
                        source,
                    }
                })?;
                let mut state = ck.trainer_state()?;
                if state.kl_controller.is_none() {
                    state.kl_controller = kl_controller;
                } else if kl_controller.is_none() {
                    state.kl_controller = None;
                }
                (est, ck.cursor()?, state, Some(ck.step()))
            }
            None => (
                cfg.algorithm.build_estimator(),
                Cursor::default(),
                TrainerState {
                    kl_controller,
                    ..TrainerState::default()
                },
                None,
            ),
        };
        let (log, records) = RunLog::open(&out_dir, cfg.trainer.tensorboard, resume_step)?;
        Ok(Self {
            cfg,
            config_toml,
            out_dir,
            device,
            processor,
            model,
            store,
            ref_model,
            opt,
            estimator,
            reward,
            manifest,
            cursor,
            state,
            log,
            records,
            val_manifest,
        })
    }

    /// The run configuration.
    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    /// Steps completed so far.
    pub fn step_count(&self) -> u64 {
        self.state.step
    }

    /// Where the data stream stands.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The optimiser (steps taken, steps skipped).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The run folder (metrics log, checkpoints).
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// The policy being trained.
    pub fn model(&self) -> &ClinicalVlm {
        &self.model
    }

    /// Every parameter's current value by checkpoint name, LoRA adapters merged.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .store
            .tensors()
            .map_err(model_err)?
            .into_iter()
            .collect();
        for p in self.model.adapted_projs() {
            if let Some((name, w)) = p.merged_weight().map_err(model_err)? {
                out.insert(name, w);
            }
        }
        Ok(out)
    }

    /// The metrics records of this run so far (kept ones of a resumed run included).
    pub fn records(&self) -> &[MetricsRecord] {
        &self.records
    }

    /// Steps the configuration asks for (`trainer.max_steps` or episodes × batches).
    pub fn total_steps(&self) -> u64 {
        self.cfg.training_steps(self.manifest.len())
    }

    /// Runs steps until [`Trainer::total_steps`] with [`Trainer::train_step`]; returns the last
    /// step's outcome (`None` when there was nothing left to do).
    pub fn run(&mut self) -> Result<Option<StepOutcome>> {
        let last = self.total_steps();
        let mut out = None;
        while self.state.step < last {
            out = Some(self.train_step()?);
        }
        Ok(out)
    }

    /// One step of the run as configured: validation before the first step
    /// (`trainer.val_before_train`, logged as step 0), then an RL or SFT step (each validates on
    /// its validation steps), then a checkpoint on save steps (and the last).
    pub fn train_step(&mut self) -> Result<StepOutcome> {
        if self.state.step == 0
            && self.cfg.trainer.val_before_train
            && self.cfg.trainer.val_freq > 0
            && !self.records.iter().any(|r| r.step == 0)
        {
            let m = self.validate(0)?;
            self.log.log(0, &m)?;
            self.records.push(MetricsRecord {
                step: 0,
                wall_time: 0.0,
                metrics: m,
            });
        }
        let mut o = if self.state.sft {
            self.sft_step()?
        } else {
            self.step()?
        };
        if self.cfg.trainer.is_save_step(o.step, self.total_steps()) {
            o.checkpoint = Some(self.save_checkpoint()?);
        }
        Ok(o)
    }

    /// Whether [`Trainer::train_step`] takes SFT steps (saved in checkpoints).
    pub fn is_sft(&self) -> bool {
        self.state.sft
    }

    /// Writes `<out_dir>/checkpoint_step_<step>` and prunes old ones per `trainer.save_limit`.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let weights = self.weights()?;
        let rng = RngStates::default();
        let data = CheckpointData {
            model: &weights,
            optimizer: Some(&self.opt),
            estimator: &self.estimator,
            rng: &rng,
            cursor: self.cursor,
            trainer_state: &self.state,
            config_toml: &self.config_toml,
        };
        let dir = checkpoint::save(&self.out_dir, &data)?;
        checkpoint::prune(&self.out_dir, self.cfg.trainer.keep_last())?;
        Ok(dir)
    }

    /// Draws the step's prompts: `(stream id, sample)` in the seeded order.
    fn draw(&mut self, step: u64) -> Result<Vec<(u64, ClinicalSample)>> {
        let want = self.cfg.data.rollout_batch_size;
        let seed = self.cfg.data.seed;
        let rows = self.manifest.len() as u64;
        let path = self.manifest.path().to_path_buf();
        let data_err = |message: String| TrainerError::Data {
            step,
            path: path.clone(),
            message,
        };
        let mut out = Vec::with_capacity(want);
        let mut order: Option<(u64, Vec<u32>)> = None;
        let mut next = self.cursor;
        let iter = self
            .manifest
            .shuffled(seed, self.cursor)
            .map_err(|e| data_err(e.to_string()))?;
        for (after, row) in iter {
            let sample = row.map_err(|e| data_err(e.to_string()))?;
            // The row index: the position just consumed in `after`'s epoch order.
            let epoch = after.epoch;
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((epoch, self.manifest.epoch_order(seed, epoch)));
            }
            let index = order
                .as_ref()
                .map_or(0, |(_, o)| o[after.position as usize - 1]);
            next = after;
            out.push((epoch * rows + u64::from(index), sample));
            if out.len() == want {
                break;
            }
        }
        if out.len() < want {
            return Err(data_err(format!(
                "the stream ended after {} of {want} rows",
                out.len()
            )));
        }
        self.cursor = next;
        Ok(out)
    }

    fn sampling(&self) -> GenerateConfig {
        let r = &self.cfg.rollout;
        let ids = self.processor.tokenizer.ids;
        // The reference biases `<|image_pad|>`; the video and ECG placeholders get the same
        // bias here, as a sampled placeholder cannot be re-encoded by the training forward.
        let placeholders = self.placeholder_ids();
        GenerateConfig {
            sampling: SamplingParams {
                temperature: r.temperature as f32,
                top_p: r.top_p as f32,
                top_k: usize::try_from(r.top_k).unwrap_or(0),
                seed: r.seed,
                logit_bias: if r.image_pad_logit_bias != 0.0 {
                    placeholders
                        .iter()
                        .map(|&t| (t, r.image_pad_logit_bias as f32))
                        .collect()
                } else {
                    Vec::new()
                },
                ..SamplingParams::default()
            },
            stop: StopCondition {
                eos: if r.ignore_eos {
                    Vec::new()
                } else {
                    vec![ids.im_end, ids.endoftext]
                },
                max_new_tokens: self.cfg.data.max_response_length,
            },
            max_batch_rows: self.cfg.rollouts_per_step(),
        }
    }

    /// Whether [`Trainer::run`] takes supervised steps ([`Trainer::sft_step`]) instead of RL
    /// steps. Saved in checkpoints: a resumed run continues in its mode.
    pub fn set_sft(&mut self, sft: bool) {
        self.state.sft = sft;
    }

    /// One supervised fine-tuning step on the same data stream: the target of each drawn row is
    /// [`sft_target`] of its answer followed by `<|im_end|>`; the loss is the token-mean
    /// cross-entropy of the target tokens given the prompt, accumulated over micro-batches of
    /// `actor.micro_batch_size_per_device_for_update` prompts, with one AdamW step per
    /// `actor.global_batch_size` prompts. Logs `sft/loss` (mean over micro-batches),
    /// `actor/grad_norm`, `actor/lr` and `actor/skipped_steps`.
    pub fn sft_step(&mut self) -> Result<StepOutcome> {
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let drawn = self.draw(step)?;
        let path = self.manifest.path().to_path_buf();
        let data_err = |message: String| TrainerError::Data {
            step,
            path: path.clone(),
            message,
        };
        let im_end = self.processor.tokenizer.ids.im_end;
        let mut rows: Vec<(ProcessedSample, Vec<u32>)> = Vec::with_capacity(drawn.len());
        for (_, sample) in &drawn {
            let processed = self
                .processor
                .process_sample(sample)
                .map_err(|e| data_err(format!("line {}: {e}", sample.line)))?;
            let mut sample = sample.clone();
            self.box_to_model_pixels(&mut sample, &processed)
                .map_err(|e| data_err(format!("line {}: {e}", sample.line)))?;
            let mut target = self
                .processor
                .tokenizer
                .encode(&sft_target(&sample.answer, sample.bbox))
                .map_err(|e| data_err(format!("line {}: {e}", sample.line)))?;
            target.truncate(self.cfg.data.max_response_length.saturating_sub(1));
            target.push(im_end);
            rows.push((processed, target));
        }
        let mini = self.cfg.actor.global_batch_size.max(1);
        let micro = self.cfg.actor.micro_batch_size_per_device_for_update.max(1);
        let pad = self.processor.tokenizer.ids.endoftext;
        let (mut loss_sum, mut losses) = (0.0, 0usize);
        let (mut norm_sum, mut lr_last, mut opt_steps) = (0.0, 0.0, 0usize);
        for mb in rows.chunks(mini) {
            let parts: Vec<&[(ProcessedSample, Vec<u32>)]> = mb.chunks(micro).collect();
            let count = parts.len() as f64;
            let mut acc = GradAccumulator::new();
            for ub in parts {
                let prompts: Vec<ProcessedSample> = ub.iter().map(|(p, _)| p.clone()).collect();
                let batch = self
                    .processor
                    .collate(&prompts, None)
                    .map_err(|e| data_err(e.to_string()))?;
                let targets: Vec<&[u32]> = ub.iter().map(|(_, t)| t.as_slice()).collect();
                let r_len = targets.iter().map(|t| t.len()).max().unwrap_or(1);
                let inputs = batch_to_inputs(&batch, &targets, r_len, pad, &self.device)?;
                let b = ub.len();
                let mut labels = vec![pad; b * r_len];
                let mut mask = vec![0f32; b * r_len];
                for (i, t) in targets.iter().enumerate() {
                    for (j, &tok) in t.iter().enumerate() {
                        labels[i * r_len + j] = tok;
                        mask[i * r_len + j] = 1.0;
                    }
                }
                let labels = Tensor::from_vec(labels, (b, r_len), &self.device)?;
                let mask = Tensor::from_vec(mask, (b, r_len), &self.device)?;
                let s = batch.seq_len();
                let lp =
                    response_log_probs(&self.model, &inputs, s, &labels, ForwardMode::Train, step)?;
                let loss = lp.mul(&mask)?.sum_all()?.neg()?.affine(
                    1.0 / mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64,
                    0.0,
                )?;
                loss_sum += f64::from(loss.to_scalar::<f32>()?);
                losses += 1;
                let grads = (loss / count)?.backward()?;
                acc.add(self.opt.grads_of(&grads))?;
            }
            let report = self.opt.step(&acc.take())?;
            if report.grad_norm.is_finite() {
                norm_sum += report.grad_norm;
            }
            lr_last = report.lr;
            opt_steps += 1;
        }
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        m.insert(SFT_LOSS.into(), loss_sum / losses.max(1) as f64);
        m.insert(names::GRAD_NORM.into(), norm_sum / opt_steps.max(1) as f64);
        m.insert(names::LR.into(), lr_last);
        m.insert(SKIPPED_STEPS.into(), self.opt.skipped() as f64);
        m.insert(names::TIME_PER_STEP.into(), t0.elapsed().as_secs_f64());
        self.finish_step(step, m)
    }

    fn finish_step(&mut self, step: u64, mut m: BTreeMap<String, f64>) -> Result<StepOutcome> {
        if self.cfg.trainer.val_freq > 0 && self.cfg.trainer.is_val_step(step, self.total_steps()) {
            m.extend(self.validate(step)?);
        }
        self.log.log(step, &m)?;
        self.records.push(MetricsRecord {
            step,
            wall_time: 0.0,
            metrics: m.clone(),
        });
        self.state.step = step;
        self.state.episode = self.cursor.epoch;
        self.state.optimizer_steps = self.opt.steps();
        self.state.metrics = m.clone();
        Ok(StepOutcome {
            step,
            metrics: m,
            checkpoint: None,
        })
    }

    /// Token ids the model replaces by encoder features.
    fn placeholder_ids(&self) -> Vec<u32> {
        self.model.config().placeholder_token_ids()
    }

    /// Processes drawn rows into prompt groups of `n` rollouts each, with their generation
    /// requests; errors name `path` (the manifest) and the row's line.
    fn prepare(
        &self,
        step: u64,
        path: &Path,
        drawn: Vec<(u64, ClinicalSample)>,
        n: usize,
    ) -> Result<(Vec<PromptGroup>, Vec<GroupRequest>)> {
        let data_err = |message: String| TrainerError::Data {
            step,
            path: path.to_path_buf(),
            message,
        };
        let mut groups: Vec<PromptGroup> = Vec::with_capacity(drawn.len());
        let mut requests = Vec::with_capacity(drawn.len());
        for (stream, mut sample) in drawn {
            let processed = self
                .processor
                .process_sample(&sample)
                .map_err(|e| data_err(format!("line {}: {e}", sample.line)))?;
            self.box_to_model_pixels(&mut sample, &processed)
                .map_err(|e| data_err(format!("line {}: {e}", sample.line)))?;
            let batch = self
                .processor
                .collate(std::slice::from_ref(&processed), None)
                .map_err(|e| data_err(format!("line {}: {e}", sample.line)))?;
            let inputs = batch_to_inputs(&batch, &[], 0, 0, &self.device)?;
            let mask = match (&sample.segmentation_path, processed.image_sizes.first()) {
                (Some(p), Some(&size)) => {
                    let m = qoq_data::vision::load_mask(p, size, self.cfg.data.mask_wh_swap_bug)
                        .map_err(|e| data_err(format!("line {}: {e}", sample.line)))?;
                    Some(MaskIndex::new(&m))
                }
                _ => None,
            };
            requests.push(GroupRequest { inputs, n, stream });
            groups.push(PromptGroup {
                stream,
                sample,
                processed,
                mask,
                rollouts: Vec::new(),
            });
        }
        Ok((groups, requests))
    }

    /// Rescales the sample's ground-truth box from the original first image's pixels to the
    /// image the model sees (the dataset-side resize; spec §4.3), as the predicted boxes are in
    /// those pixels.
    fn box_to_model_pixels(
        &self,
        sample: &mut ClinicalSample,
        processed: &ProcessedSample,
    ) -> std::result::Result<(), String> {
        if let (Some(b), Some(img), Some(&to)) = (
            sample.bbox,
            sample.images.first(),
            processed.image_sizes.first(),
        ) {
            let from = qoq_data::vision::image_dims(img).map_err(|e| e.to_string())?;
            sample.bbox = Some(qoq_data::vision::rescale_bbox(b, from, to));
        }
        Ok(())
    }

    /// Samples every group's rollouts.
    fn generate_into(
        &self,
        step: u64,
        groups: &mut [PromptGroup],
        requests: Vec<GroupRequest>,
        cfg: &GenerateConfig,
    ) -> Result<()> {
        let generated =
            qoq_engine::generate(&self.model, &requests, cfg, |_, _, _| {}).map_err(|e| {
                TrainerError::Generate {
                    step,
                    message: e.to_string(),
                }
            })?;
        drop(requests);
        for (g, r) in groups.iter_mut().zip(generated) {
            g.rollouts = r;
        }
        Ok(())
    }

    /// Decodes and scores every rollout, in group order: `(texts, scores)`.
    fn score(
        &self,
        step: u64,
        path: &Path,
        groups: &[PromptGroup],
    ) -> Result<(Vec<String>, Vec<RewardScore>)> {
        let mut texts: Vec<String> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            for r in &g.rollouts {
                texts.push(
                    self.processor
                        .tokenizer
                        .decode(&r.tokens, true)
                        .map_err(|e| TrainerError::Data {
                            step,
                            path: path.to_path_buf(),
                            message: format!("line {}: decoding a response: {e}", g.sample.line),
                        })?,
                );
                owner.push(gi);
            }
        }
        let inputs: Vec<RewardInput<'_>> = texts
            .iter()
            .zip(&owner)
            .map(|(t, &gi)| RewardInput {
                response: t,
                sample: &groups[gi].sample,
                mask: groups[gi].mask.as_ref(),
            })
            .collect();
        let scores = self.reward.score_batch(&inputs);
        drop(inputs);
        // A NaN or infinite reward would poison the advantages of its whole group (and DRPO's
        // history): refuse it, naming the row.
        for (s, &gi) in scores.iter().zip(&owner) {
            if !s.overall.is_finite() {
                return Err(TrainerError::Data {
                    step,
                    path: path.to_path_buf(),
                    message: format!(
                        "line {}: the reward `{}` returned a non-finite score {}",
                        groups[gi].sample.line,
                        self.reward.name(),
                        s.overall
                    ),
                });
            }
        }
        Ok((texts, scores))
    }

    /// Validation on `data.val_files` (spec §11-§12; `ray_trainer.py::_validate`): every row in
    /// file order, `rollout.val_override.n` samples at `rollout.val_override.temperature`
    /// (random stream = row index, so a validation depends only on the weights and the seed), in
    /// batches of `data.val_batch_size` prompts. Returns `val/reward_score`,
    /// `val/{component}_reward`, `val/test_score/{data_source}`, the evaluation metrics per
    /// dataset, per domain and overall (`{src}/{ds}/{metric}`, `{src}/{metric}`, `val/{metric}`,
    /// spec §8.9) and `timing_s/validation`; writes every generation with its scores (and the
    /// ground-truth box in the pixels of the image the model saw) to
    /// `<out_dir>/val_generations_{step}.jsonl` (atomically).
    pub fn validate(&self, step: u64) -> Result<BTreeMap<String, f64>> {
        let t0 = Instant::now();
        let path = self.val_manifest.path().to_path_buf();
        let data_err = |message: String| TrainerError::Data {
            step,
            path: path.clone(),
            message,
        };
        let vo = &self.cfg.rollout.val_override;
        let mut gen_cfg = self.sampling();
        gen_cfg.sampling.temperature = vo.temperature as f32;
        gen_cfg.max_batch_rows = self.cfg.data.val_batch_size * vo.n;
        let mut acc =
            qoq_eval::metrics::MetricsAccumulator::new(qoq_eval::answer::Extraction::Evaluation);
        let mut components: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut per_source: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut lines = String::new();
        let mut rows = self
            .val_manifest
            .rows()
            .map_err(|e| data_err(e.to_string()))?
            .enumerate();
        loop {
            let mut drawn = Vec::with_capacity(self.cfg.data.val_batch_size);
            for (i, row) in rows.by_ref() {
                drawn.push((i as u64, row.map_err(|e| data_err(e.to_string()))?));
                if drawn.len() == self.cfg.data.val_batch_size {
                    break;
                }
            }
            if drawn.is_empty() {
                break;
            }
            let (mut groups, requests) = self.prepare(step, &path, drawn, vo.n)?;
            self.generate_into(step, &mut groups, requests, &gen_cfg)?;
            let (texts, scores) = self.score(step, &path, &groups)?;
            let mut k = 0;
            for g in &groups {
                for r in &g.rollouts {
                    let (text, score) = (&texts[k], &scores[k]);
                    k += 1;
                    for (name, v) in score.components() {
                        let e = components.entry(name).or_insert((0.0, 0));
                        e.0 += v;
                        e.1 += 1;
                    }
                    let src = g.sample.data_source.as_source().to_string();
                    let e = per_source.entry(src).or_insert((0.0, 0));
                    e.0 += score.overall;
                    e.1 += 1;
                    let mut p = qoq_eval::metrics::Prediction::from_sample(&g.sample, text.clone());
                    if g.mask.is_some() || g.sample.bbox.is_some() {
                        p.iou = Some(score.iou_score);
                    }
                    acc.push(&p);
                    let line = serde_json::json!({
                        "step": step,
                        "id": g.sample.id.0,
                        "line": g.sample.line,
                        "data_source": g.sample.data_source.as_source(),
                        "dataset": g.sample.dataset,
                        "answer": g.sample.answer,
                        "bbox": g.sample.bbox,
                        "response": text,
                        "response_tokens": r.tokens.len(),
                        "finish": format!("{:?}", r.finish),
                        "reward": score,
                    });
                    lines.push_str(&line.to_string());
                    lines.push('\n');
                }
            }
        }
        let file = self.out_dir.join(format!("val_generations_{step}.jsonl"));
        let tmp = self
            .out_dir
            .join(format!(".val_generations_{step}.jsonl.tmp"));
        std::fs::create_dir_all(&self.out_dir)
            .and_then(|_| std::fs::write(&tmp, &lines))
            .and_then(|_| std::fs::rename(&tmp, &file))
            .map_err(|e| TrainerError::Data {
                step,
                path: file.clone(),
                message: format!("writing the validation generations: {e}"),
            })?;
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        for (name, (sum, count)) in components {
            m.insert(format!("val/{name}_reward"), sum / count.max(1) as f64);
        }
        if let Some(v) = m.get("val/overall_reward").copied() {
            m.insert(names::VAL_REWARD_SCORE.into(), v);
        }
        for (src, (sum, count)) in per_source {
            m.insert(names::val_test_score(&src), sum / count.max(1) as f64);
        }
        for (k, v) in acc.finish().to_flat() {
            m.insert(k, v);
        }
        m.insert(TIMING_VALIDATION.into(), t0.elapsed().as_secs_f64());
        Ok(m)
    }

    /// One training step (rollout, reward, advantages, update, metrics).
    pub fn step(&mut self) -> Result<StepOutcome> {
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let drawn = self.draw(step)?;
        let manifest_path = self.manifest.path().to_path_buf();

        // 1. Process and sample.
        let (mut groups, requests) =
            self.prepare(step, &manifest_path, drawn, self.cfg.rollout.n)?;
        let t_gen = Instant::now();
        let gen_cfg = self.sampling();
        self.generate_into(step, &mut groups, requests, &gen_cfg)?;
        let gen_s = t_gen.elapsed().as_secs_f64();

        // 2. Decode and score.
        let (_texts, scores) = self.score(step, &manifest_path, &groups)?;
        let n = self.cfg.rollout.n;
        let mut m: BTreeMap<String, f64> = BTreeMap::new();

        // 3. KL in the reward (`use_kl_loss = false`): r − β·Σ_t kl_t per rollout.
        let t_ref = Instant::now();
        let seq_kl = match self.state.kl_controller {
            Some(_) if self.ref_model.is_some() => Some(self.sequence_kl(step, &groups)?),
            _ => None,
        };
        let mut rewards: Vec<f64> = scores.iter().map(|s| s.overall).collect();
        if let (Some((seq, mean_kl)), Some(ctl)) = (&seq_kl, self.state.kl_controller.as_mut()) {
            let beta = ctl.kl_coef();
            for (r, k) in rewards.iter_mut().zip(seq) {
                *r -= beta * k;
            }
            ctl.update(*mean_kl, rewards.len());
            m.insert(CRITIC_KL.into(), *mean_kl);
            m.insert(CRITIC_KL_COEF.into(), beta);
            m.insert(TIMING_REF.into(), t_ref.elapsed().as_secs_f64());
        }

        // 4. Dynamic filtering of groups without reward variance, then advantages.
        let key = self.cfg.algorithm.drpo.domain_key;
        let keep: Vec<bool> = (0..groups.len())
            .map(|gi| {
                !self.cfg.algorithm.dynamic_filter
                    || population_std(&rewards[gi * n..(gi + 1) * n])
                        > self.cfg.algorithm.filter_min_std
            })
            .collect();
        let kept = keep.iter().filter(|k| **k).count();
        if self.cfg.algorithm.dynamic_filter {
            m.insert(FILTER_KEPT_GROUPS.into(), kept as f64);
            m.insert(FILTER_DROPPED_GROUPS.into(), (groups.len() - kept) as f64);
        }
        let rows: Vec<RolloutReward> = rewards
            .iter()
            .enumerate()
            .filter(|(i, _)| keep[i / n])
            .map(|(i, &reward)| {
                let g = &groups[i / n];
                RolloutReward {
                    // The stream id keeps a row drawn twice in one step (across an epoch end) in
                    // two groups.
                    uid: format!("{}#{}", g.sample.id.0, g.stream),
                    domain: g.sample.domain_key(key),
                    reward,
                    kl: seq_kl.as_ref().map(|(s, _)| s[i]),
                }
            })
            .collect();
        let adv = if rows.is_empty() {
            crate::advantage::StepAdvantages {
                advantages: Vec::new(),
                metrics: crate::advantage::AdvantageMetrics::default(),
            }
        } else {
            self.estimator
                .step(&rows)
                .map_err(|source| TrainerError::Advantage { step, source })?
        };
        advantage_metrics(&adv, &rows, &mut m);

        // 4. Policy update.
        let t_update = Instant::now();
        let flat: Vec<(usize, &Generated)> = groups
            .iter()
            .enumerate()
            .filter(|(gi, _)| keep[*gi])
            .flat_map(|(gi, g)| g.rollouts.iter().map(move |r| (gi, r)))
            .collect();
        let mini = self.cfg.rollouts_per_optimizer_step().max(1);
        let micro = self.cfg.actor.micro_batch_size_per_device_for_update.max(1);
        let loss_cfg = self.cfg.loss_config();
        let mut loss_sums: BTreeMap<&'static str, (f64, usize)> = BTreeMap::new();
        let (mut norm_sum, mut lr_last, mut opt_steps) = (0.0, 0.0, 0usize);
        for (mi, mb) in flat.chunks(mini).enumerate() {
            let micro_batches: Vec<&[(usize, &Generated)]> = mb.chunks(micro).collect();
            let count = micro_batches.len() as f64;
            let mut acc = GradAccumulator::new();
            for (ui, ub) in micro_batches.iter().enumerate() {
                let base = mi * mini + ui * micro;
                let advs = &adv.advantages[base..base + ub.len()];
                let out = self.micro_loss(step, &groups, ub, advs, &loss_cfg)?;
                for (name, v) in out.metrics.entries() {
                    let e = loss_sums.entry(name).or_insert((0.0, 0));
                    e.0 += v;
                    e.1 += 1;
                }
                let scaled = (out.loss / count)?;
                let grads = scaled.backward()?;
                acc.add(self.opt.grads_of(&grads))?;
            }
            let report = self.opt.step(&acc.take())?;
            if report.grad_norm.is_finite() {
                norm_sum += report.grad_norm;
            }
            lr_last = report.lr;
            opt_steps += 1;
        }

        // 5. Metrics.
        let update_s = t_update.elapsed().as_secs_f64();
        m.insert(TIMING_GEN.into(), gen_s);
        m.insert(TIMING_UPDATE.into(), update_s);
        for (name, (s, c)) in &loss_sums {
            m.insert((*name).to_string(), s / *c as f64);
        }
        if opt_steps > 0 {
            m.insert(names::GRAD_NORM.into(), norm_sum / opt_steps as f64);
            m.insert(names::LR.into(), lr_last);
        }
        m.insert(SKIPPED_STEPS.into(), self.opt.skipped() as f64);
        let total = scores.len().max(1) as f64;
        let mean =
            |f: &dyn Fn(&qoq_core::RewardScore) -> f64| scores.iter().map(f).sum::<f64>() / total;
        m.insert(names::REWARD_OVERALL.into(), mean(&|s| s.overall));
        m.insert(names::REWARD_STANDARD.into(), mean(&|s| s.standard_score));
        m.insert(names::REWARD_IOU.into(), mean(&|s| s.iou_score));
        m.insert(names::REWARD_FORMAT.into(), mean(&|s| s.format_score));
        m.insert(names::REWARD_LENGTH.into(), mean(&|s| s.length_score));
        m.insert(names::SCORE_MEAN.into(), mean(&|s| s.overall));
        // Per-domain reward components over every rollout (filtered groups included).
        let mut per_domain: BTreeMap<String, Vec<&qoq_core::RewardScore>> = BTreeMap::new();
        for (i, s) in scores.iter().enumerate() {
            per_domain
                .entry(groups[i / n].sample.domain_key(key))
                .or_default()
                .push(s);
        }
        for (d, ss) in per_domain {
            let c = ss.len() as f64;
            m.insert(
                names::domain_reward(&d),
                ss.iter().map(|s| s.overall).sum::<f64>() / c,
            );
            for (name, v) in [
                (
                    "standard_score",
                    ss.iter().map(|s| s.standard_score).sum::<f64>(),
                ),
                ("iou_score", ss.iter().map(|s| s.iou_score).sum::<f64>()),
                (
                    "format_score",
                    ss.iter().map(|s| s.format_score).sum::<f64>(),
                ),
                (
                    "length_score",
                    ss.iter().map(|s| s.length_score).sum::<f64>(),
                ),
            ] {
                m.insert(format!("reward_by_domain_{name}/{d}"), v / c);
            }
        }
        if !adv.advantages.is_empty() {
            m.insert(
                names::ADVANTAGES_MEAN.into(),
                adv.advantages.iter().sum::<f64>() / adv.advantages.len() as f64,
            );
        }
        let lens: Vec<usize> = flat.iter().map(|(_, r)| r.tokens.len()).collect();
        m.insert(
            names::RESPONSE_LENGTH_MEAN.into(),
            lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
        );
        let clipped = flat
            .iter()
            .filter(|(_, r)| r.finish == FinishReason::Length)
            .count();
        m.insert(
            names::RESPONSE_LENGTH_CLIP_RATIO.into(),
            clipped as f64 / flat.len().max(1) as f64,
        );
        m.insert(
            PROMPT_LENGTH_MEAN.into(),
            groups
                .iter()
                .map(|g| g.processed.input_ids.len())
                .sum::<usize>() as f64
                / groups.len().max(1) as f64,
        );
        m.insert(names::TIME_PER_STEP.into(), t0.elapsed().as_secs_f64());

        self.finish_step(step, m)
    }

    /// [`rollout_tensors`] of the rollouts `ub` (indices into `groups`), their prompts collated.
    fn rollout_tensors(
        &self,
        step: u64,
        groups: &[PromptGroup],
        ub: &[(usize, &Generated)],
    ) -> Result<RolloutTensors> {
        let prompts: Vec<ProcessedSample> = ub
            .iter()
            .map(|(gi, _)| groups[*gi].processed.clone())
            .collect();
        let batch = self
            .processor
            .collate(&prompts, None)
            .map_err(|e| TrainerError::Data {
                step,
                path: self.manifest.path().to_path_buf(),
                message: e.to_string(),
            })?;
        let rollouts: Vec<&Generated> = ub.iter().map(|(_, r)| *r).collect();
        rollout_tensors(
            &batch,
            &rollouts,
            &self.placeholder_ids(),
            self.processor.tokenizer.ids.endoftext,
            &self.device,
        )
    }

    /// Per-rollout sequence KL to the reference policy (`Σ_t kl_t` over the response, estimator
    /// `algorithm.kl.kl_penalty` between the sampler's and the reference's log-probs, in
    /// micro-batches of `actor.micro_batch_size_per_device_for_experience`), in group order,
    /// with the batch mean of the per-sequence token-mean KL (the controller's input,
    /// `apply_kl_penalty`'s `current_kl`).
    fn sequence_kl(&self, step: u64, groups: &[PromptGroup]) -> Result<(Vec<f64>, f64)> {
        let Some(rm) = &self.ref_model else {
            return Err(TrainerError::Config(
                "the KL in the reward needs the reference model".into(),
            ));
        };
        let flat: Vec<(usize, &Generated)> = groups
            .iter()
            .enumerate()
            .flat_map(|(gi, g)| g.rollouts.iter().map(move |r| (gi, r)))
            .collect();
        let micro = self
            .cfg
            .actor
            .micro_batch_size_per_device_for_experience
            .max(1);
        let (mut seq, mut means) = (Vec::with_capacity(flat.len()), 0.0);
        for ub in flat.chunks(micro) {
            let t = self.rollout_tensors(step, groups, ub)?;
            let rf =
                response_log_probs(rm, &t.inputs, t.s, &t.labels, ForwardMode::Inference, step)?;
            let kld = crate::loss::compute_kl(&t.old, &rf, self.cfg.algorithm.kl.kl_penalty)
                .map_err(|source| TrainerError::Loss { step, source })?
                .mul(&t.mask)?
                .to_dtype(DType::F64)?;
            let sums: Vec<f64> = kld.sum(1)?.to_vec1()?;
            let counts: Vec<f64> = t.mask.to_dtype(DType::F64)?.sum(1)?.to_vec1()?;
            for (sum, c) in sums.into_iter().zip(counts) {
                means += sum / c.max(1.0);
                seq.push(sum);
            }
        }
        let mean = means / seq.len().max(1) as f64;
        Ok((seq, mean))
    }

    /// The actor loss of one micro-batch (graph attached to the trainable parameters).
    fn micro_loss(
        &self,
        step: u64,
        groups: &[PromptGroup],
        ub: &[(usize, &Generated)],
        advs: &[f64],
        loss_cfg: &crate::loss::LossConfig,
    ) -> Result<crate::loss::PolicyLossOutput> {
        let RolloutTensors {
            inputs,
            s,
            labels,
            mask,
            old,
        } = self.rollout_tensors(step, groups, ub)?;
        let (b, r_len) = labels.dims2()?;
        let mut adv = vec![0f32; b * r_len];
        for (i, a) in advs.iter().enumerate() {
            adv[i * r_len..(i + 1) * r_len].fill(*a as f32);
        }
        let adv = Tensor::from_vec(adv, (b, r_len), &self.device)?;
        let lp = response_log_probs(&self.model, &inputs, s, &labels, ForwardMode::Train, step)?;
        let ref_lp = match &self.ref_model {
            Some(rm) => Some(
                response_log_probs(rm, &inputs, s, &labels, ForwardMode::Inference, step)?.detach(),
            ),
            None => None,
        };
        let inputs = ActorLossInputs {
            policy: PolicyLossInputs {
                old_log_probs: &old,
                log_probs: &lp,
                advantages: &adv,
                response_mask: &mask,
            },
            kl: ref_lp.as_ref().map(KlTerm::RefLogProbs),
        };
        compute_actor_loss(&inputs, loss_cfg).map_err(|source| TrainerError::Loss { step, source })
    }
}

/// Population standard deviation (0 for fewer than two values).
fn population_std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64).sqrt()
}

/// The estimator's step metrics: guard counters (`drpo/...`), and per domain of the batch the
/// DRPO scaling (`drpo/{domain}/k`, `n_d`, `mu_d`, `temperature`) and the mean absolute
/// advantage (`critic/advantages/abs_mean/{domain}`, every estimator).
fn advantage_metrics(
    adv: &crate::advantage::StepAdvantages,
    rows: &[RolloutReward],
    m: &mut BTreeMap<String, f64>,
) {
    let mut abs: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (r, a) in rows.iter().zip(&adv.advantages) {
        let e = abs.entry(&r.domain).or_insert((0.0, 0));
        e.0 += a.abs();
        e.1 += 1;
    }
    for (d, (s, c)) in abs {
        m.insert(format!("critic/advantages/abs_mean/{d}"), s / c as f64);
    }
    m.insert(
        "critic/singleton_groups".into(),
        adv.metrics.singleton_groups as f64,
    );
    if let Some(d) = &adv.metrics.drpo {
        for (name, v) in [
            ("temperature_floors", d.temperature_floors),
            ("zero_factor_guards", d.zero_factor_guards),
            ("negative_factor_guards", d.negative_factor_guards),
            ("batch_std_guards", d.batch_std_guards),
            ("nonfinite_zeroed", d.nonfinite_zeroed),
        ] {
            m.insert(format!("drpo/{name}"), v as f64);
        }
        for dm in &d.domains {
            m.insert(format!("drpo/{}/k", dm.domain), dm.k as f64);
            m.insert(format!("drpo/{}/n_d", dm.domain), dm.n_d as f64);
            m.insert(format!("drpo/{}/mu_d", dm.domain), dm.mu_d);
            m.insert(format!("drpo/{}/temperature", dm.domain), dm.t_d);
        }
    }
}

/// Tensors of a collated prompt batch, each row extended by its response (right-padded with
/// `pad` to `r_len`, masked out; pass `&[]` for the prompt alone). Response positions continue
/// each row's largest prompt position on all three M-RoPE axes, as in generation (spec §5.5).
pub fn batch_to_inputs(
    b: &ProcessedBatch,
    responses: &[&[u32]],
    r_len: usize,
    pad: u32,
    dev: &Device,
) -> Result<ModelInputs> {
    let (n, s) = (b.batch_size(), b.seq_len());
    if !responses.is_empty() && responses.len() != n {
        return Err(TrainerError::Config(format!(
            "batch_to_inputs: {} responses for a batch of {n}",
            responses.len()
        )));
    }
    let r_len = if responses.is_empty() { 0 } else { r_len };
    let t = s + r_len;
    let mut ids = Vec::with_capacity(n * t);
    let mut mask = Vec::with_capacity(n * t);
    let mut pos = vec![0i64; 3 * n * t];
    for i in 0..n {
        ids.extend_from_slice(&b.input_ids[i]);
        mask.extend_from_slice(&b.attention_mask[i]);
        let mut max_pos = i64::MIN;
        for a in 0..3 {
            let src = &b.position_ids[a * n * s + i * s..a * n * s + (i + 1) * s];
            pos[a * n * t + i * t..a * n * t + i * t + s].copy_from_slice(src);
            for (k, &p) in src.iter().enumerate() {
                if b.attention_mask[i][k] != 0 {
                    max_pos = max_pos.max(p);
                }
            }
        }
        if r_len > 0 {
            let resp = responses[i];
            for j in 0..r_len {
                ids.push(resp.get(j).copied().unwrap_or(pad));
                mask.push(u32::from(j < resp.len()));
                for a in 0..3 {
                    pos[a * n * t + i * t + s + j] = max_pos.max(-1) + 1 + j as i64;
                }
            }
        }
    }
    let mut m = ModelInputs::text(
        Tensor::from_vec(ids, (n, t), dev)?,
        Some(Tensor::from_vec(mask, (n, t), dev)?),
        Tensor::from_vec(pos, (3, n, t), dev)?,
    );
    if !b.pixel_values.is_empty() {
        m.pixel_values = Some(Tensor::from_vec(
            b.pixel_values.clone(),
            (b.pixel_values_shape[0], b.pixel_values_shape[1]),
            dev,
        )?);
        m.image_grid_thw = b.image_grid_thw.clone();
    }
    if !b.time_series_data.is_empty() {
        m.time_series_data = Some(Tensor::from_vec(
            b.time_series_data.clone(),
            (n, 8, b.time_series_data.len() / n / 8),
            dev,
        )?);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows: a left-padded 2-token prompt and a 3-token prompt with an image-like position
    /// jump (max position 5 on the height axis).
    fn batch() -> ProcessedBatch {
        ProcessedBatch {
            ids: vec!["a".into(), "b".into()],
            input_ids: vec![vec![0, 7, 8], vec![4, 5, 6]],
            attention_mask: vec![vec![0, 1, 1], vec![1, 1, 1]],
            // [3][2][3]: temporal, height, width.
            position_ids: vec![
                1, 0, 1, 0, 1, 2, // t
                1, 0, 1, 0, 5, 2, // h
                1, 0, 1, 0, 1, 2, // w
            ],
            rope_deltas: vec![0, 0],
            pixel_values: Vec::new(),
            pixel_values_shape: [0, 0],
            image_grid_thw: Vec::new(),
            time_series_data: Vec::new(),
            raw_prompt_ids: vec![vec![7, 8], vec![4, 5, 6]],
        }
    }

    #[test]
    fn responses_are_right_padded_masked_and_continue_the_largest_position() {
        let dev = Device::Cpu;
        let r0: &[u32] = &[11];
        let r1: &[u32] = &[12, 13];
        let m = batch_to_inputs(&batch(), &[r0, r1], 2, 99, &dev).unwrap();
        let ids: Vec<Vec<u32>> = m.input_ids.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![0, 7, 8, 11, 99], vec![4, 5, 6, 12, 13]]);
        let mask: Vec<Vec<u32>> = m.attention_mask.unwrap().to_vec2().unwrap();
        assert_eq!(mask, vec![vec![0, 1, 1, 1, 0], vec![1, 1, 1, 1, 1]]);
        let pos: Vec<Vec<Vec<i64>>> = m.position_ids.to_vec3().unwrap();
        for axis in &pos {
            // Row 0: prompt max 1 → 2, 3; row 1: max 5 (height axis) → 6, 7 on every axis.
            assert_eq!(&axis[0][3..], &[2, 3]);
            assert_eq!(&axis[1][3..], &[6, 7]);
        }
        assert_eq!(&pos[1][1][..3], &[0, 5, 2]);
    }

    #[test]
    fn sft_targets_outline_the_box_the_way_the_format_score_wants() {
        let t = sft_target("Nodule", Some([10.2, 20.0, 30.0, 40.7]));
        assert_eq!(
            t,
            "<think>\n```json\n[{\"bbox_2d\":[10,20,30,41],\"label\":\"Nodule\"}]\n```\n</think>\n\\boxed{Nodule}"
        );
        assert_eq!(qoq_reward::format::format_score(&t), 1.0);
        assert_eq!(
            qoq_reward::iou::collect_bboxes(&qoq_reward::iou::extract_json(&t).unwrap().unwrap())
                .len(),
            1
        );
        assert_eq!(sft_target("AF", None), "<think>\n</think>\n\\boxed{AF}");
    }

    #[test]
    fn prompt_only_inputs_match_the_batch() {
        let m = batch_to_inputs(&batch(), &[], 0, 99, &Device::Cpu).unwrap();
        assert_eq!(m.input_ids.dims(), &[2, 3]);
        assert_eq!(m.position_ids.dims(), &[3, 2, 3]);
        let r: &[u32] = &[1];
        assert!(batch_to_inputs(&batch(), &[r], 1, 99, &Device::Cpu).is_err());
    }
}
