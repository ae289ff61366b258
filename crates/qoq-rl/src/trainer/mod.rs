//! The RL training loop (spec §10-§12; reference `verl/trainer/ray_trainer.py::fit` with
//! `verl/workers/actor/dp_actor.py::update_policy`), one file per stage:
//!
//! | stage | file | in → out |
//! |---|---|---|
//! | build / resume | `build.rs` | `RunConfig` (+ checkpoint) → model, reference, optimiser, estimator, cursor |
//! | rollout | `rollout.rs` | manifest rows → [`Prompt`]s → [`RolloutGroup`]s via [`qoq_engine::generate`] |
//! | score | `score.rs` | [`RolloutGroup`]s → [`ScoredGroup`]s → [`StepRewards`] (KL in the reward, filtering) |
//! | update | `update.rs` | rollouts + advantages → one micro-batched update loop (RL and SFT) |
//! | value | `value.rs` | PPO: the value model's values before GAE, its update on the returns |
//! | validate | `validate.rs` | validation rows → generations, metrics, `val_generations_{step}.jsonl` |
//! | early stopping | `stopping.rs` | validation metrics → best checkpoint, stop ([`crate::early_stopping`]) |
//! | init-from | `init.rs` | another run's checkpoint → a new run's initial weights, checked and recorded |
//! | metrics | `metrics.rs` | a step's groups, advantages and update → its logged metrics |
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
//! - with `actor.ppo_epochs = 1` the old log-probs are the sampler's log-probs of the drawn tokens
//!   (raw logits, temperature 1, computed with the KV cache), so the ratio starts at 1 up to
//!   rounding between the cached decode and the full training forward; with more epochs they are
//!   recomputed by the policy before the update (verl's rule) with the update's own forward and
//!   micro-batches, and every epoch passes over the same mini-batches in order;
//! - with `rollout.backend = "openai"` ([`openai`]) the rollouts come from an OpenAI-compatible
//!   server, which gets the weights after every update (`POST /v1/reload_weights`, LoRA:
//!   `/v1/load_lora_adapter`); the old log-probs are then always recomputed by the policy
//!   (verl's rule: the server's numerics differ) and the server's are only compared with them
//!   (`rollout/server_logprob_abs_diff`);
//! - ReMax (`estimator = "remax"`) generates one greedy rollout per prompt (temperature 0) after
//!   the sampled ones and scores it, without the KL, as the baseline;
//! - REINFORCE++ and GAE take token-level rewards: the outcome reward on each response's last
//!   token, minus β·kl_t on every token when the KL is in the reward;
//! - PPO (`estimator = "gae"`) trains a value model ([`crate::critic`]) beside the policy (its
//!   values before the advantages, GAE, then `actor.ppo_epochs` epochs of the clipped value loss
//!   with its own AdamW); it is checkpointed with the run;
//! - the KL reference policy is the initial checkpoint at `model.model_path`, loaded frozen when
//!   `algorithm.kl` puts the KL in the loss or in the reward;
//! - `rollout.image_pad_logit_bias` is applied to the video and ECG placeholder tokens too (a
//!   sampled placeholder cannot be re-encoded by the training forward; should one be sampled
//!   anyway it is fed as padding and masked out of the loss);
//! - one process is one device; alone, it runs the whole step (`n_gpus_per_node` then only
//!   enters the config's batch-size checks). Data-parallel training ([`crate::dist`],
//!   `mpirun -np N qoq train`; the constructors' `*_dist` forms) runs `trainer.nnodes ·
//!   n_gpus_per_node` ranks: every rank draws and processes the step's prompts (the same
//!   seeded order), samples and scores its contiguous share of them ([`crate::dist::shard`]), and the scored groups are all-gathered,
//!   so every rank computes the same advantages (DRPO's history stays identical). The update
//!   splits each mini-batch into the same micro-batches as one process would and gives each
//!   rank its share of them; the accumulated gradients are summed over the ranks before the
//!   optimiser step, so the update is the one-process update of the same global batch up to
//!   the order of float sums. Rank 0 alone writes logs, validation files and checkpoints.
//!   The reference KL of the rollouts is computed on the same shares and all-gathered. Every
//!   rank validates, and computes PPO's values and (`ppo_epochs > 1`) the old log-probs of all
//!   the step's rollouts (redundant work, not yet sharded).
//!
//! Besides the reference metric names, each step logs `timing_s/process`, `timing_s/gen`,
//! `timing_s/update_actor` (with, inside it, `timing_s/optimizer` and, when the KL is in the
//! loss, the reference forward `timing_s/ref`), `prompt_length/mean` and the cumulative
//! `actor/skipped_steps`; [`Trainer::set_phase_memory`] adds each phase's peak memory.
//!
//! There is no mutable random state: sampling seeds derive from `(rollout.seed, stream, rollout)`
//! and the data order from `(data.seed, epoch)`, so the checkpoint's `rng.json` is empty.

mod build;
mod init;
mod metrics;
mod openai;
mod perf;
mod rollout;
mod score;
mod stopping;
mod update;
mod validate;
mod value;

pub use init::InitFrom;
pub use openai::SERVER_LOGPROB_DIFF;
pub use perf::{
    CapturedMicroBatch, CapturedPrompt, CapturedStep, PEAK_MIB_PREFIX, TIMING_OPTIMIZER,
    TIMING_PROCESS, peak_rss_mib, reset_peak_rss,
};
pub use rollout::Prompt;
pub use score::StepRewards;
pub use stopping::{
    BEST_CHECKPOINT_FILE, BestCheckpoint, EARLY_STOPPING_BAD, EARLY_STOPPING_BEST,
    EARLY_STOPPING_BEST_STEP, read_best,
};
pub use update::{
    LOGITS_CHUNK, UpdateStats, positions_per_chunk, response_log_probs, response_log_probs_chunked,
    sft_target,
};
pub use value::{CRITIC_GRAD_NORM, CRITIC_LR, CRITIC_SKIPPED_STEPS};

use crate::advantage::{Estimator, StepInputs};
use crate::checkpoint::{self, CheckpointData, TrainerState};
use crate::config::RunConfig;
use crate::critic::Critic;
use crate::dist::{Collective, Single};
use crate::metrics_log::{MetricsRecord, RunLog};
use crate::optim::AdamW;
use crate::rng::RngStates;
use candle_core::{Device, Tensor};
use qoq_core::{RolloutGroup, ScoredGroup};
use qoq_data::manifest::{Cursor, Manifest};
use qoq_model::ClinicalVlm;
use qoq_model::train::ParamStore;
use qoq_processor::processor::Processor;
use qoq_reward::RewardFn;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

/// Metric: optimiser steps skipped so far because of a non-finite gradient norm.
pub const SKIPPED_STEPS: &str = "actor/skipped_steps";
/// Metric: token-mean cross-entropy of the SFT targets ([`Trainer::sft_step`]).
pub const SFT_LOSS: &str = "sft/loss";
/// Metric: seconds spent generating the step's rollouts (reference `timing_s/gen`).
pub const TIMING_GEN: &str = "timing_s/gen";
/// Training rows skipped by the step's draw (bad JSON or a file that fails to decode), with
/// `data.manifest.skip_bad_rows`.
pub const DATA_SKIPPED_ROWS: &str = "data/skipped_rows";
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
/// Metric: mean reward of the greedy baseline rollouts (ReMax).
pub const REMAX_BASELINE_MEAN: &str = "critic/reward_baseline/mean";
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
    /// The manifests differ from the ones the checkpoint recorded.
    #[error(
        "resuming from {checkpoint}: the data changed since it was saved: {changes}; the saved \
         data cursor and epoch order describe the old files. Restore them, or pass \
         --allow-changed-data (`ResumeOptions::allow_changed_data`) to resume anyway (recorded \
         in the run's events.jsonl)",
        checkpoint = checkpoint.display(),
        changes = changes.join("; ")
    )]
    DataChanged {
        /// The checkpoint folder.
        checkpoint: PathBuf,
        /// One line per changed manifest.
        changes: Vec<String>,
    },
    /// The run folder's lock or event log failed.
    #[error(transparent)]
    RunDir(#[from] crate::run_dir::RunDirError),
    /// A collective between the data-parallel ranks failed (a peer left or timed out).
    #[error("step {step}: data-parallel {what}: {source}")]
    Dist {
        step: u64,
        what: &'static str,
        #[source]
        source: crate::dist::DistError,
    },
}

impl From<crate::config::ConfigError> for TrainerError {
    fn from(e: crate::config::ConfigError) -> Self {
        TrainerError::Config(e.to_string())
    }
}

/// How [`Trainer::resume_with`] resumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeOptions {
    /// `key=value` overrides of the checkpoint's config ([`Trainer::resume_with_overrides`]).
    pub overrides: Vec<String>,
    /// Resume even when a manifest differs from the fingerprint the checkpoint recorded; the
    /// changes are written to `<out_dir>/events.jsonl` and the new fingerprints saved.
    pub allow_changed_data: bool,
}

impl From<qoq_model::Error> for TrainerError {
    fn from(e: qoq_model::Error) -> Self {
        model_err(e)
    }
}

/// Result of the trainer.
pub type Result<T> = std::result::Result<T, TrainerError>;

pub(crate) fn model_err(e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Model(e.to_string())
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
    /// The metrics log (rank 0 only).
    log: Option<RunLog>,
    records: Vec<MetricsRecord>,
    val_manifest: Manifest,
    /// PPO's value model (`estimator = "gae"`).
    critic: Option<Critic>,
    /// The LoRA adapters (`[model.lora]`), the only trained parameters when present.
    adapters: Option<build::Adapters>,
    /// Rows the last [`Trainer::draw`] skipped (`data.manifest.skip_bad_rows`), logged with the
    /// step as `data/skipped_rows`.
    skipped_rows: usize,
    /// Nested timers, phase memory and batch capture ([`perf`]).
    perf: perf::Perf,
    /// The data-parallel ranks ([`Single`] for one process).
    dist: Rc<dyn Collective>,
    /// How the gradients are summed over the ranks (`trainer.all_reduce`).
    gradients: crate::dist::GradientPath,
    /// Mixed precision: the compute copies `model` reads, whose gradients the backward brings to
    /// the master `Var`s (`None` when the run computes in its master dtype).
    copies: Option<qoq_model::train::ComputeCopies>,
    /// The last RL step's advantages, one per kept rollout in the estimator's order.
    advantages: Vec<f64>,
    /// Where rollouts are sampled (`rollout.backend`).
    backend: openai::Backend,
}

impl Trainer {
    /// A fresh run of `cfg` writing into `trainer.out_dir`, scored by the configured reward.
    pub fn new(cfg: RunConfig) -> Result<Self> {
        Self::new_dist(cfg, None, Rc::new(Single))
    }

    /// A fresh run scored by `reward` instead of the configured one.
    pub fn with_reward(cfg: RunConfig, reward: Box<dyn RewardFn>) -> Result<Self> {
        build::fresh(cfg, reward, Rc::new(Single))
    }

    /// [`Trainer::new`] as one rank of data-parallel training over `dist` (its number of ranks
    /// must be `trainer.nnodes · n_gpus_per_node`; [`crate::dist`]); `reward` replaces the
    /// configured one when given.
    pub fn new_dist(
        cfg: RunConfig,
        reward: Option<Box<dyn RewardFn>>,
        dist: Rc<dyn Collective>,
    ) -> Result<Self> {
        let reward = match reward {
            Some(r) => r,
            None => cfg
                .reward
                .build()
                .map_err(|e| TrainerError::Config(format!("reward: {e}")))?,
        };
        build::fresh(cfg, reward, dist)
    }

    /// [`Trainer::init_from`] as one rank of data-parallel training over `dist`.
    pub fn init_from_dist(cfg: RunConfig, source: &Path, dist: Rc<dyn Collective>) -> Result<Self> {
        let reward = cfg
            .reward
            .build()
            .map_err(|e| TrainerError::Config(format!("reward: {e}")))?;
        let init = InitFrom::resolve(source)?;
        build::init_from(cfg, reward, init, dist)
    }

    /// [`Trainer::resume_with`] as one rank of data-parallel training over `dist` (the
    /// checkpoint must come from a launch with as many ranks); `reward` replaces the
    /// configured one when given.
    pub fn resume_dist(
        dir: &Path,
        reward: Option<Box<dyn RewardFn>>,
        opts: &ResumeOptions,
        dist: Rc<dyn Collective>,
    ) -> Result<Self> {
        build::resume(dir, reward, opts, dist)
    }

    /// The last RL step's advantages (one per rollout of the kept groups, group after group;
    /// every data-parallel rank computes all of them).
    pub fn last_advantages(&self) -> &[f64] {
        &self.advantages
    }

    /// The advantage estimator's saved state (DRPO's history; JSON, as in checkpoints).
    pub fn estimator_state(&self) -> Result<String> {
        self.estimator
            .save_state()
            .map_err(|source| TrainerError::Advantage {
                step: self.state.step,
                source,
            })
    }

    /// This process's data-parallel rank (0 without [`crate::dist`]).
    pub fn rank(&self) -> usize {
        self.dist.rank()
    }

    /// Whether this process writes the run folder (rank 0).
    fn writes(&self) -> bool {
        self.dist.rank() == 0
    }

    /// Maps a collective's failure to the trainer's error.
    fn dist_err(step: u64, what: &'static str) -> impl Fn(crate::dist::DistError) -> TrainerError {
        move |source| TrainerError::Dist { step, what, source }
    }

    /// A fresh run of `cfg` whose initial weights are those of another run's checkpoint
    /// (`--init-from`: a checkpoint folder, or a run folder's best, else latest, checkpoint;
    /// [`InitFrom::resolve`]). The optimiser, estimator, data cursor and step count are fresh;
    /// the source is recorded in the run's `trainer_state.json` and `events.jsonl`. A source
    /// whose parameters differ from the architecture of `model.model_path` is refused.
    pub fn init_from(cfg: RunConfig, source: &Path) -> Result<Self> {
        Self::init_from_dist(cfg, source, Rc::new(Single))
    }

    /// [`Trainer::init_from`] scored by `reward` instead of the configured one.
    pub fn init_from_with_reward(
        cfg: RunConfig,
        source: &Path,
        reward: Box<dyn RewardFn>,
    ) -> Result<Self> {
        let init = InitFrom::resolve(source)?;
        build::init_from(cfg, reward, init, Rc::new(Single))
    }

    /// Where the run's initial weights came from (`--init-from`), if not `model.model_path`.
    pub fn init_source(&self) -> Option<&checkpoint::InitSource> {
        self.state.init_from.as_ref()
    }

    /// Resumes the run whose checkpoint is `dir` (`<out_dir>/checkpoint_step_N`): weights,
    /// optimiser, estimator, cursor, trainer state and config come from it; the metrics log in
    /// the parent folder is truncated to the checkpoint's step.
    pub fn resume(dir: &Path) -> Result<Self> {
        build::resume(dir, None, &ResumeOptions::default(), Rc::new(Single))
    }

    /// [`Trainer::resume`] with options: config overrides, and whether changed data is
    /// accepted (a resume refuses manifests that differ from the checkpoint's fingerprints).
    pub fn resume_with(dir: &Path, opts: &ResumeOptions) -> Result<Self> {
        build::resume(dir, None, opts, Rc::new(Single))
    }

    /// [`Trainer::resume`] with `key=value` overrides applied to the checkpoint's config (e.g. a
    /// longer `trainer.max_steps`, another `trainer.save_freq`). Keys that would make the saved
    /// state meaningless are refused: `model.*` (the weights' architecture and freezing; but
    /// `model.device` may change) and `algorithm.estimator` (the estimator state).
    pub fn resume_with_overrides(dir: &Path, overrides: &[String]) -> Result<Self> {
        let opts = ResumeOptions {
            overrides: overrides.to_vec(),
            ..ResumeOptions::default()
        };
        build::resume(dir, None, &opts, Rc::new(Single))
    }

    /// [`Trainer::resume`] with a reward other than the configured one.
    pub fn resume_with_reward(dir: &Path, reward: Box<dyn RewardFn>) -> Result<Self> {
        build::resume(
            dir,
            Some(reward),
            &ResumeOptions::default(),
            Rc::new(Single),
        )
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

    /// The run's processor (tokenizer, template, image settings).
    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    /// Every parameter's current value by checkpoint name, LoRA adapters merged, in the master
    /// dtype (the f32 masters of a mixed-precision run, not its compute copies).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        let master = build::dtype_of(self.cfg.model.master_dtype);
        qoq_model::train::merged_tensors_in(&self.model, &self.store, Some(master))
            .map_err(model_err)
    }

    /// The frozen KL reference policy, when the run has one (held in `model.compute_dtype`).
    pub fn reference_model(&self) -> Option<&ClinicalVlm> {
        self.ref_model.as_ref()
    }

    /// The LoRA adapters' current values (`<projection>.lora_A.weight` / `.lora_B.weight`), when
    /// the run trains adapters (`[model.lora]`).
    pub fn adapters(&self) -> Result<Option<HashMap<String, Tensor>>> {
        self.adapters.as_ref().map(|a| a.tensors()).transpose()
    }

    /// What PEFT's `adapter_config.json` names as the base model: `model.model_path`, or the
    /// `--init-from` checkpoint whose weights the adapters sit on.
    fn lora_base_name(&self) -> String {
        match &self.state.init_from {
            Some(src) => src.checkpoint.clone(),
            None => self.cfg.model.model_path.clone(),
        }
    }

    /// Writes the trained model into `dir` for inference elsewhere: the merged weights as an HF
    /// model folder ([`qoq_model::init::export`]: `model.safetensors`, the config and
    /// preprocessor config of `model.model_path`, the run's tokenizer (`model.tokenizer_path`
    /// where set), the processor settings) and, for a LoRA run,
    /// the adapters in PEFT's layout in `dir/adapter` (`adapter_config.json`,
    /// `adapter_model.safetensors`); returns the adapter folder when written.
    pub fn export(&self, dir: &Path) -> Result<Option<PathBuf>> {
        qoq_model::init::export(
            dir,
            Path::new(&self.cfg.model.model_path),
            self.cfg.model.tokenizer_path.as_deref().map(Path::new),
            &self.weights()?,
            &self.processor.opts,
        )
        .map_err(model_err)?;
        let Some(a) = &self.adapters else {
            return Ok(None);
        };
        let adapter_dir = dir.join("adapter");
        qoq_model::lora::write_peft(
            &adapter_dir,
            &a.cfg,
            a.dropout,
            &self.lora_base_name(),
            &a.tensors()?,
        )
        .map_err(model_err)?;
        Ok(Some(adapter_dir))
    }

    /// The metrics records of this run so far (kept ones of a resumed run included).
    pub fn records(&self) -> &[MetricsRecord] {
        &self.records
    }

    /// Steps the configuration asks for (`trainer.max_steps` or episodes × batches).
    pub fn total_steps(&self) -> u64 {
        self.cfg.training_steps(self.manifest.len())
    }

    /// Runs steps until [`Trainer::total_steps`] or an early stop ([`Trainer::is_finished`])
    /// with [`Trainer::train_step`]; returns the last step's outcome (`None` when there was
    /// nothing left to do).
    pub fn run(&mut self) -> Result<Option<StepOutcome>> {
        let mut out = None;
        while !self.is_finished() {
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
            if let Some(log) = &mut self.log {
                log.log(0, &m)?;
            }
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
        if self.cfg.trainer.is_save_step(o.step, self.total_steps())
            || self.early_stopping_saves(o.step)
        {
            o.checkpoint = Some(self.save_checkpoint()?);
        }
        if self.stop_reason().is_some() {
            self.record_stop()?;
        }
        Ok(o)
    }

    /// Whether [`Trainer::train_step`] takes SFT steps (saved in checkpoints).
    pub fn is_sft(&self) -> bool {
        self.state.sft
    }

    /// Whether [`Trainer::run`] takes supervised steps ([`Trainer::sft_step`]) instead of RL
    /// steps (`trainer.sft` of the run file; the config saved in checkpoints follows). Saved in
    /// checkpoints: a resumed run continues in its mode.
    pub fn set_sft(&mut self, sft: bool) {
        self.state.sft = sft;
        if self.cfg.trainer.sft != sft {
            self.cfg.trainer.sft = sft;
            // The same config serialised at build time; it cannot fail now.
            if let Ok(t) = self.cfg.to_toml_string() {
                self.config_toml = t;
            }
        }
    }

    /// Writes `<out_dir>/checkpoint_step_<step>` and prunes old ones per `trainer.save_limit`
    /// (early stopping's best checkpoint is kept beside them). In data-parallel training rank 0
    /// writes it and every rank returns once it is written.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let step = self.state.step;
        let written = if self.writes() {
            self.write_checkpoint()
        } else {
            Ok(checkpoint::checkpoint_dir(&self.out_dir, step))
        };
        // Rank 0's failure is fatal for the job: its peers stop at the barrier (bounded).
        if written.is_ok() {
            self.dist
                .barrier()
                .map_err(Self::dist_err(step, "barrier after the checkpoint"))?;
        }
        written
    }

    fn write_checkpoint(&self) -> Result<PathBuf> {
        let _span = tracing::info_span!("checkpoint", step = self.state.step).entered();
        let weights = self.weights()?;
        let critic_weights = match &self.critic {
            Some(c) => Some(c.weights().map_err(model_err)?),
            None => None,
        };
        let rng = RngStates::default();
        let adapters = match &self.adapters {
            Some(a) => Some(a.tensors()?),
            None => None,
        };
        let base_name = self.lora_base_name();
        let data = CheckpointData {
            processor: &self.processor.opts,
            model_folder: Some(checkpoint::ModelFolder {
                dir: Path::new(&self.cfg.model.model_path),
                tokenizer: self.cfg.model.tokenizer_path.as_deref().map(Path::new),
            }),
            peft: match (&self.adapters, &adapters) {
                (Some(a), Some(t)) => Some(checkpoint::PeftData {
                    cfg: &a.cfg,
                    dropout: a.dropout,
                    base_model: &base_name,
                    adapters: t,
                }),
                _ => None,
            },
            model: &weights,
            optimizer: Some(&self.opt),
            estimator: &self.estimator,
            rng: &rng,
            cursor: self.cursor,
            trainer_state: &self.state,
            config_toml: &self.config_toml,
            critic: match (&self.critic, &critic_weights) {
                (Some(c), Some(w)) => Some(checkpoint::CriticData {
                    weights: w,
                    optimizer: c.optimizer(),
                }),
                _ => None,
            },
        };
        let dir = checkpoint::save(&self.out_dir, &data)?;
        let best = self.update_best_pointer(&dir)?;
        checkpoint::prune_except(&self.out_dir, self.cfg.trainer.keep_last(), best)?;
        Ok(dir)
    }

    /// One training step: rollout, score (KL in the reward, filtering), advantages, update,
    /// metrics.
    pub fn step(&mut self) -> Result<StepOutcome> {
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let path = self.manifest.path().to_path_buf();

        self.perf.begin_step();
        let mut m: BTreeMap<String, f64> = BTreeMap::new();

        // 1. Draw and process the rows, then sample.
        let span = tracing::info_span!("rollout", step).entered();
        let phase = self.perf.phase();
        let prompts = self.draw(step)?;
        // This rank's share of the prompts: it samples and scores them (all of them alone).
        let mine = crate::dist::shard(prompts.len(), self.dist.rank(), self.dist.size());
        let requests = self.requests(step, &path, &prompts[mine.clone()], self.cfg.rollout.n)?;
        let process_s = phase.stop("process", &mut m);
        m.insert(TIMING_PROCESS.into(), process_s);
        self.perf.record(|c| {
            c.prompts = prompts
                .iter()
                .zip(&requests)
                .map(|(p, r)| CapturedPrompt {
                    prompt: p.processed.prompt.clone(),
                    images: p.sample.images.clone(),
                    inputs: r.inputs.clone(),
                })
                .collect();
        });
        let phase = self.perf.phase();
        let gen_cfg = self.sampling()?;
        let mut groups: Vec<RolloutGroup> =
            self.generate(step, &path, &prompts[mine.clone()], requests, &gen_cfg)?;
        if matches!(self.backend, openai::Backend::OpenAi(_)) {
            groups = self.with_policy_log_probs(step, &prompts[mine.clone()], groups, &mut m)?;
        }
        // ReMax: each prompt's greedy rollout, scored, is its rollouts' baseline.
        let baselines = if matches!(self.estimator, Estimator::Remax) {
            let b = self.greedy_baselines(step, &path, &prompts[mine.clone()])?;
            Some(self.gather_baselines(step, b)?)
        } else {
            None
        };
        let gen_s = phase.stop("gen", &mut m);
        drop(span);

        // 2. Score; the KL in the reward; dynamic filtering.
        let span = tracing::info_span!("reward", step).entered();
        let scored: Vec<ScoredGroup> = self.score(step, &path, &prompts[mine], groups)?;
        // Every rank gets every prompt's scored group: the same advantages everywhere.
        let scored = self.gather_groups(step, scored)?;
        let rewards = self.shape_rewards(step, &prompts, scored, &mut m)?;
        drop(span);

        // 3. Advantages of the kept groups.
        let span = tracing::info_span!("advantage", step).entered();
        let rows = rewards.estimator_rows();
        let mut extra = StepInputs::default();
        if let Some(b) = &baselines {
            m.insert(
                REMAX_BASELINE_MEAN.into(),
                b.iter().sum::<f64>() / b.len().max(1) as f64,
            );
            extra.baselines = Some(
                rewards
                    .kept_rollouts()
                    .iter()
                    .map(|(gi, _)| b[*gi])
                    .collect(),
            );
        }
        if self.estimator.is_token_level() {
            extra.token_rewards = Some(rewards.token_rewards());
        }
        let old_values = match self.critic {
            Some(_) => {
                let v = self.values(step, &prompts, &rewards)?;
                extra.values = Some(
                    v.iter()
                        .map(|r| r.iter().map(|&x| f64::from(x)).collect())
                        .collect(),
                );
                Some(v)
            }
            None => None,
        };
        let (adv, tokens) = if rows.is_empty() {
            let empty = crate::advantage::StepAdvantages {
                advantages: Vec::new(),
                metrics: crate::advantage::AdvantageMetrics::default(),
            };
            (empty, None)
        } else {
            let out = self
                .estimator
                .step_with(&rows, &extra)
                .map_err(|source| TrainerError::Advantage { step, source })?;
            (out.step, out.tokens)
        };
        metrics::advantage_metrics(&adv, &rows, &mut m);
        self.advantages.clone_from(&adv.advantages);
        drop(span);

        // 4. Policy update (and the value model's, for PPO).
        let span = tracing::info_span!("update", step).entered();
        let phase = self.perf.phase();
        let stats = self.rl_update(step, &prompts, &rewards, &adv.advantages, tokens.as_ref())?;
        if let (Some(v), Some(t)) = (&old_values, &tokens) {
            self.update_critic(step, &prompts, &rewards, v, &t.returns, &mut m)?;
        }
        let update_s = phase.stop("update", &mut m);
        drop(span);
        if self.ref_model.is_some() && self.cfg.loss_config().kl.kl_in_loss() {
            m.insert(TIMING_REF.into(), self.perf.ref_s.get());
        }
        m.insert(TIMING_OPTIMIZER.into(), self.perf.optimizer_s.get());

        // 5. Metrics.
        m.insert(TIMING_GEN.into(), gen_s);
        m.insert(TIMING_UPDATE.into(), update_s);
        stats.rl_metrics(&mut m);
        m.insert(SKIPPED_STEPS.into(), self.opt.skipped() as f64);
        metrics::rollout_metrics(&prompts, &rewards, &adv, &mut m);
        m.insert(
            crate::metrics_log::names::TIME_PER_STEP.into(),
            t0.elapsed().as_secs_f64(),
        );
        self.finish_step(step, m)
    }

    /// Every rank's scored groups, in rank order (the prompts' order, as each rank scores a
    /// contiguous share of them).
    fn gather_groups(&self, step: u64, mine: Vec<ScoredGroup>) -> Result<Vec<ScoredGroup>> {
        if self.dist.size() == 1 {
            return Ok(mine);
        }
        let err = Self::dist_err(step, "rollout all-gather");
        let bytes = serde_json::to_vec(&mine)
            .map_err(|e| err(crate::dist::DistError::Mpi(format!("serialising: {e}"))))?;
        let mut out = Vec::new();
        for (rank, part) in self
            .dist
            .all_gather_bytes(&bytes)
            .map_err(&err)?
            .iter()
            .enumerate()
        {
            let groups: Vec<ScoredGroup> = serde_json::from_slice(part).map_err(|e| {
                err(crate::dist::DistError::Mpi(format!(
                    "rank {rank}'s scored groups: {e}"
                )))
            })?;
            out.extend(groups);
        }
        Ok(out)
    }

    /// Every rank's ReMax baselines, in rank order.
    fn gather_baselines(&self, step: u64, mine: Vec<f64>) -> Result<Vec<f64>> {
        if self.dist.size() == 1 {
            return Ok(mine);
        }
        Ok(self
            .dist
            .all_gather_f64(&mine)
            .map_err(Self::dist_err(step, "baseline all-gather"))?
            .concat())
    }

    /// Validation metrics on validation steps, the log, the records and the trainer state.
    fn finish_step(&mut self, step: u64, mut m: BTreeMap<String, f64>) -> Result<StepOutcome> {
        if self.cfg.data.manifest.skip_bad_rows {
            m.insert(DATA_SKIPPED_ROWS.into(), self.skipped_rows as f64);
        }
        if self.cfg.trainer.val_freq > 0 && self.cfg.trainer.is_val_step(step, self.total_steps()) {
            m.extend(self.validate(step)?);
            self.observe_validation(step, &mut m)?;
        }
        if let Some(log) = &mut self.log {
            log.log(step, &m)?;
        }
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
}
