//! The run configuration: one TOML file with a section per stage (spec §11 hyper-parameter
//! table, §10.4–10.5, §7; ARCHITECTURE.md house style 6). Reference: EasyR1 v0.3.0
//! `verl/trainer/config.py::PPOConfig` (`data`, `algorithm`, `worker.{actor,rollout,reward}`,
//! `trainer`) filled by `examples/grpo_climb_engaging.yaml`.
//!
//! Every default is the released 7B yaml's value (spec §11), so an empty file is the reference
//! run; the doc of each field says where the paper or the bf16 yaml differ. Sections reuse the
//! owning crate's config types: [`ManifestConfig`] (`[data.manifest]`), [`RewardConfig`]
//! (`[reward]`), [`DrpoConfig`] (`[algorithm.drpo]`), [`KlConfig`] (`[algorithm.kl]`),
//! [`PolicyLossConfig`] (`[actor.policy_loss]`), [`AdamWConfig`] (`[actor.optim]`). Every struct
//! rejects unknown keys. Command-line `--set key.path=value` overrides go through
//! [`apply_override`], and [`RunConfig::to_toml_string`] is the resolved file saved beside every
//! checkpoint.

use crate::advantage::{Drpo, DrpoConfig, Estimator};
use crate::loss::config::{KlConfig, LossConfig, PolicyLossConfig};
use crate::optim::AdamWConfig;
use qoq_data::manifest::ManifestConfig;
use qoq_reward::RewardConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors of reading, overriding and validating a run configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not match the schema (unknown key, wrong type).
    #[error("{origin}: {message}")]
    Parse {
        /// The file, or `<string>` / `<resolved>`.
        origin: String,
        /// toml's message (with line, column and the offending key).
        message: String,
    },
    /// An override names a key that no section has.
    #[error("unknown config key `{key}`{}", if known.is_empty() { String::new() } else { format!(" (known keys there: {})", known.join(", ")) })]
    UnknownKey {
        /// The dotted path as given.
        key: String,
        /// The keys of the deepest table that exists.
        known: Vec<String>,
    },
    /// An override is not `key=value`, or its value does not fit the key.
    #[error("override `{key}`: {reason}")]
    BadOverride {
        /// The dotted path (or the whole argument when it has no `=`).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A value is out of range or values disagree.
    #[error("config `{field}`: {reason}")]
    Invalid {
        /// The dotted path of the field.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ConfigError>;

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// `[data]`: manifests, lengths, batch sizes, shuffling, image sizes (reference `data.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training manifest (JSONL, spec §2.1). Required (the yaml's is the authors' cluster path
    /// `/scratch/high_modality/geom_train.jsonl`).
    pub train_files: String,
    /// Validation manifest. Required.
    pub val_files: String,
    /// Prompt tokens (left-padded). Default 4000.
    pub max_prompt_length: usize,
    /// Response tokens (`max_tokens` of sampling). Default 4000.
    pub max_response_length: usize,
    /// Prompts per rollout step. Default 512 (bf16 yaml and [DEV] May-09 yaml: 256).
    pub rollout_batch_size: usize,
    /// Prompts per validation batch. Default 1024.
    pub val_batch_size: usize,
    /// Shuffle the training set each epoch. Default true (the paper pre-shuffles with seed 42
    /// and disables shuffling).
    pub shuffle: bool,
    /// Seed of the training sampler (`RandomSampler(generator seed=1)`). Default 1.
    pub seed: u64,
    /// Largest image area in pixels after resize. Default 524,288.
    pub max_pixels: usize,
    /// Smallest image area in pixels. Default 65,536.
    pub min_pixels: usize,
    /// Reproduce the reference's width/height swap of masks of non-square images (spec §4.3,
    /// §16.2 `data.mask_wh_swap_bug`). Default true.
    pub mask_wh_swap_bug: bool,
    /// Manifest keys and reader options (`video_frames` 2 as the code; the paper says 4).
    pub manifest: ManifestConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train_files: String::new(),
            val_files: String::new(),
            max_prompt_length: 4000,
            max_response_length: 4000,
            rollout_batch_size: 512,
            val_batch_size: 1024,
            shuffle: true,
            seed: 1,
            max_pixels: 524_288,
            min_pixels: 65_536,
            mask_wh_swap_bug: true,
            manifest: ManifestConfig::default(),
        }
    }
}

/// Floating-point type of weights or optimiser moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DtypeName {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

/// `[model]`: which checkpoint, which parts train, precision (reference
/// `worker.actor.model`, spec §6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// HF model directory or hub id. Default `Qwen/Qwen2.5-VL-7B-Instruct` (the 7B yaml).
    pub model_path: String,
    /// Tokenizer directory when not the model's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer_path: Option<String>,
    /// Master weights of the actor. Default f32 (FSDP mixed precision keeps fp32 weights).
    pub master_dtype: DtypeName,
    /// Compute dtype of the actor forward and of the reference model. Default bf16.
    pub compute_dtype: DtypeName,
    /// Freeze the vision tower. Default false (all parameters train).
    pub freeze_vision_tower: bool,
    /// Freeze the language model. Default false.
    pub freeze_llm: bool,
    /// Freeze the ECG encoder and projector. Default false.
    pub freeze_time_series_encoder: bool,
    /// Recompute activations in the backward pass. Default true.
    pub gradient_checkpointing: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            model_path: "Qwen/Qwen2.5-VL-7B-Instruct".into(),
            tokenizer_path: None,
            master_dtype: DtypeName::F32,
            compute_dtype: DtypeName::Bf16,
            freeze_vision_tower: false,
            freeze_llm: false,
            freeze_time_series_encoder: false,
            gradient_checkpointing: true,
        }
    }
}

/// `[rollout.val_override]`: sampling changes for validation (`val_override_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValOverride {
    /// Default 0.5.
    pub temperature: f64,
    /// Samples per validation prompt. Default 1.
    pub n: usize,
}

impl Default for ValOverride {
    fn default() -> Self {
        Self {
            temperature: 0.5,
            n: 1,
        }
    }
}

/// `[rollout]`: sampling and engine settings (reference `worker.rollout`, spec §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Samples per prompt. Default 5.
    pub n: usize,
    /// Default 1.0 (also the log-prob recomputation temperature).
    pub temperature: f64,
    /// Default 0.99.
    pub top_p: f64,
    /// −1 disables. Default −1.
    pub top_k: i64,
    /// Per-request sampling seed (every request uses the same seed in the reference). Default 1.
    pub seed: u64,
    /// Default false.
    pub ignore_eos: bool,
    /// Logit bias on `<|image_pad|>` (151655). Default −100.
    pub image_pad_logit_bias: f64,
    /// Images per prompt. Default 4.
    pub limit_images: usize,
    /// Engine token budget per forward. Default 8192.
    pub max_num_batched_tokens: usize,
    /// Fraction of device memory for the engine's KV cache. Default 0.6 (bf16 yaml: 0.4).
    pub gpu_memory_utilization: f64,
    /// Tensor-parallel ranks. Default 1 (bf16 yaml: 4).
    pub tensor_parallel_size: usize,
    /// Validation sampling.
    pub val_override: ValOverride,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            n: 5,
            temperature: 1.0,
            top_p: 0.99,
            top_k: -1,
            seed: 1,
            ignore_eos: false,
            image_pad_logit_bias: -100.0,
            limit_images: 4,
            max_num_batched_tokens: 8192,
            gpu_memory_utilization: 0.6,
            tensor_parallel_size: 1,
            val_override: ValOverride::default(),
        }
    }
}

/// Advantage estimator name (`algorithm.adv_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EstimatorKind {
    /// The released yaml's choice (spec §14.1).
    #[default]
    Grpo,
    /// The paper's DRPO ([DEV] run scripts pass `algorithm.adv_estimator=drpo`).
    Drpo,
    /// GRPO without the std division.
    DrGrpo,
    /// Leave-one-out baseline.
    Rloo,
    /// REINFORCE++ (spec §9.3): token-level discounted returns (`algorithm.gamma`), whitened
    /// over the batch.
    ReinforcePlusPlus,
    /// ReMax (spec §9.4): the reward minus the reward of a greedy rollout of the same prompt,
    /// which the trainer generates (temperature 0, one more sequence per prompt) and scores.
    Remax,
    /// PPO with a value model (spec §9.5): GAE (`algorithm.gamma`, `algorithm.lam`) on the
    /// values of a critic trained beside the policy (`[critic]`).
    Gae,
}

impl EstimatorKind {
    /// The name in the run file.
    pub fn name(self) -> &'static str {
        match self {
            EstimatorKind::Grpo => "grpo",
            EstimatorKind::Drpo => "drpo",
            EstimatorKind::DrGrpo => "dr_grpo",
            EstimatorKind::Rloo => "rloo",
            EstimatorKind::ReinforcePlusPlus => "reinforce_plus_plus",
            EstimatorKind::Remax => "remax",
            EstimatorKind::Gae => "gae",
        }
    }
}

/// `[algorithm]`: estimator, DRPO switches, KL (reference `algorithm.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlgorithmConfig {
    /// Default `grpo` (released yaml); the paper's recipe sets `drpo`.
    pub estimator: EstimatorKind,
    /// ε added to the group std by GRPO. Default 1e-6.
    pub grpo_eps: f64,
    /// DRPO switches (spec §16.2); used when `estimator = "drpo"`.
    pub drpo: DrpoConfig,
    /// KL to the reference policy (loss, low_var_kl, β 1e-4).
    pub kl: KlConfig,
    /// Dynamic filtering (DAPO-style; not in the released code): leave groups whose reward
    /// standard deviation is at most `filter_min_std` out of the estimator and the policy
    /// update. The std, not the mean, decides: with continuous rewards (IoU, format, length) a
    /// group can have a mean strictly between 0 and 1 and still no signal. Default false.
    pub dynamic_filter: bool,
    /// Groups with a reward std (population) at or below this are filtered. Default 1e-6.
    pub filter_min_std: f64,
    /// Discount γ of REINFORCE++ and GAE (reference `algorithm.gamma`). Default 1.0; another
    /// value with another estimator is refused.
    pub gamma: f64,
    /// GAE's λ (reference `algorithm.lam`). Default 1.0; another value with another estimator
    /// is refused.
    pub lam: f64,
}

impl Default for AlgorithmConfig {
    fn default() -> Self {
        Self {
            estimator: EstimatorKind::Grpo,
            grpo_eps: 1e-6,
            drpo: DrpoConfig::default(),
            kl: KlConfig::default(),
            dynamic_filter: false,
            filter_min_std: 1e-6,
            gamma: 1.0,
            lam: 1.0,
        }
    }
}

impl AlgorithmConfig {
    /// A fresh estimator of the configured kind.
    pub fn build_estimator(&self) -> Estimator {
        match self.estimator {
            EstimatorKind::Grpo => Estimator::Grpo { eps: self.grpo_eps },
            EstimatorKind::DrGrpo => Estimator::DrGrpo,
            EstimatorKind::Rloo => Estimator::Rloo,
            EstimatorKind::Drpo => Estimator::Drpo(Box::new(Drpo::new(self.drpo.clone()))),
            EstimatorKind::ReinforcePlusPlus => Estimator::ReinforcePlusPlus { gamma: self.gamma },
            EstimatorKind::Remax => Estimator::Remax,
            EstimatorKind::Gae => Estimator::Gae {
                gamma: self.gamma,
                lam: self.lam,
            },
        }
    }

    /// Whether the estimator reads each rollout's sequence KL to the reference (DRPO's
    /// KL-aware damping, `algorithm.drpo.kl_damping`): the trainer then computes it from the
    /// reference model whether the KL is in the loss or in the reward.
    pub fn needs_rollout_kl(&self) -> bool {
        self.estimator == EstimatorKind::Drpo
            && self.drpo.kl_damping != crate::advantage::drpo::KlDamping::Off
    }

    /// Whether the run needs the frozen reference policy: a KL in the loss or in the reward,
    /// or the per-rollout KL of DRPO's damping.
    pub fn needs_reference(&self) -> bool {
        self.kl.kl_in_loss() || self.kl.kl_in_reward() || self.needs_rollout_kl()
    }
}

/// Optimiser implementation (`worker.actor.optim.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerStrategy {
    /// `torch.optim.AdamW` with fp32 moments (7B yaml).
    #[default]
    Adamw,
    /// `AnyPrecisionAdamW`: bf16 moments with Kahan summation (bf16 yaml, paper's 32B).
    AdamwBf16,
}

/// `[actor]`: batching, optimiser, policy loss (reference `worker.actor`, spec §10).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorConfig {
    /// Prompts per optimiser step (×n rollouts). Default 128.
    pub global_batch_size: usize,
    /// Rollouts per device per micro-batch of the update. Default 2 (bf16 yaml: 1; the paper
    /// says 4).
    pub micro_batch_size_per_device_for_update: usize,
    /// Rollouts per device per log-prob micro-batch. Default 8.
    pub micro_batch_size_per_device_for_experience: usize,
    /// Passes over each rollout batch. Default 1.
    pub ppo_epochs: usize,
    /// Optimiser implementation. Default `adamw`.
    pub strategy: OptimizerStrategy,
    /// AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8, wd 1e-2, grad clip 1.0, constant schedule).
    pub optim: AdamWConfig,
    /// Clipped surrogate (0.2 / 0.3 / dual 3.0, token-mean).
    pub policy_loss: PolicyLossConfig,
}

impl Default for ActorConfig {
    fn default() -> Self {
        Self {
            global_batch_size: 128,
            micro_batch_size_per_device_for_update: 2,
            micro_batch_size_per_device_for_experience: 8,
            ppo_epochs: 1,
            strategy: OptimizerStrategy::Adamw,
            optim: AdamWConfig::default(),
            policy_loss: PolicyLossConfig::default(),
        }
    }
}

/// `[critic]`: the value model of PPO, used with `algorithm.estimator = "gae"` only (reference
/// `worker.critic`; spec §9.5). The critic is the policy's architecture with the language-model
/// head replaced by a scalar head (`score`), initialised from `model.model_path` with a fresh
/// head; it shares `[model]`'s freezing switches and `[actor]`'s micro-batch sizes, and trains
/// one epoch per step on the returns of GAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriticConfig {
    /// The critic's own AdamW (reference `critic.optim`: lr 1e-6, grad clip 1.0, ...).
    pub optim: AdamWConfig,
    /// Value clipping: the clipped prediction stays within `old value ± cliprange_value`
    /// (`compute_value_loss`). Default 0.5.
    pub cliprange_value: f64,
}

impl Default for CriticConfig {
    fn default() -> Self {
        Self {
            optim: AdamWConfig::default(),
            cliprange_value: 0.5,
        }
    }
}

/// `[trainer]`: length of the run, validation, checkpoints, devices, output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Epochs over the training manifest. Default 3 (the paper: 1 with early stopping).
    pub total_episodes: u64,
    /// Stop after this many steps instead (reference `max_steps`, unset by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Validate every this many steps (0 = never). Default 5.
    pub val_freq: u64,
    /// Save a checkpoint every this many steps (0 = never). Default 30.
    pub save_freq: u64,
    /// Checkpoints kept (`save_limit`); −1 keeps all. Default 3 (bf16 yaml: −1).
    pub save_limit: i64,
    /// Devices per node. Default 8.
    pub n_gpus_per_node: usize,
    /// Nodes. Default 1.
    pub nnodes: usize,
    /// Run directory: `metrics.jsonl`, TensorBoard events, checkpoints. Default
    /// `runs/qoq_med_7b`.
    pub out_dir: String,
    /// Resume from the newest complete checkpoint in `out_dir` when there is one. Default true.
    pub find_last_checkpoint: bool,
    /// Resume from this checkpoint directory instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_checkpoint_path: Option<String>,
    /// Write TensorBoard event files under `out_dir/tensorboard`. Default true.
    pub tensorboard: bool,
    /// Validate once before the first step (logged as step 0; EasyR1 `val_before_train`).
    /// Default true.
    pub val_before_train: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            total_episodes: 3,
            max_steps: None,
            val_freq: 5,
            save_freq: 30,
            save_limit: 3,
            n_gpus_per_node: 8,
            nnodes: 1,
            out_dir: "runs/qoq_med_7b".into(),
            find_last_checkpoint: true,
            load_checkpoint_path: None,
            tensorboard: true,
            val_before_train: true,
        }
    }
}

impl TrainerConfig {
    /// `save_limit` as a count for [`crate::checkpoint::prune`] (`None` keeps all).
    pub fn keep_last(&self) -> Option<usize> {
        usize::try_from(self.save_limit).ok()
    }

    /// Whether step `step` (1-based) validates: every `val_freq` steps, and after the last step
    /// when it was not a validation step already (EasyR1 `fit`).
    pub fn is_val_step(&self, step: u64, last_step: u64) -> bool {
        (self.val_freq > 0 && step.is_multiple_of(self.val_freq)) || step == last_step
    }

    /// Whether step `step` (1-based) saves a checkpoint: every `save_freq` steps, and after the
    /// last step.
    pub fn is_save_step(&self, step: u64, last_step: u64) -> bool {
        (self.save_freq > 0 && step.is_multiple_of(self.save_freq)) || step == last_step
    }

    /// Data-parallel ranks (`n_gpus_per_node · nnodes`).
    pub fn world_size(&self) -> usize {
        self.n_gpus_per_node * self.nnodes
    }
}

/// A whole run file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// `[data]`.
    pub data: DataConfig,
    /// `[model]`.
    pub model: ModelConfig,
    /// `[rollout]`.
    pub rollout: RolloutConfig,
    /// `[reward]` (`type = "qoq_medical"` by default, code weights 0.5/0.3/0.1/0.1).
    pub reward: RewardConfig,
    /// `[algorithm]`.
    pub algorithm: AlgorithmConfig,
    /// `[actor]`.
    pub actor: ActorConfig,
    /// `[critic]` (`estimator = "gae"` only).
    pub critic: CriticConfig,
    /// `[trainer]`.
    pub trainer: TrainerConfig,
}

impl RunConfig {
    /// Parses TOML text; `origin` labels errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Reads a run file, applies `key.path=value` overrides in order, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str_with_overrides(&text, &path.display().to_string(), overrides)
    }

    /// [`RunConfig::load`] on a document already read (`origin` names it in errors).
    pub fn from_toml_str_with_overrides(
        text: &str,
        origin: &str,
        overrides: &[String],
    ) -> Result<Self> {
        let origin = origin.to_string();
        let mut doc: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        // The file alone must be valid, so that its errors are not blamed on an override.
        Self::from_value(doc.clone(), &origin)?;
        for o in overrides {
            let (key, value) = split_override(o)?;
            apply_override(&mut doc, key, value)?;
        }
        let cfg = Self::from_value(doc, &origin)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Deserialises a TOML document.
    pub fn from_value(doc: toml::Value, origin: &str) -> Result<Self> {
        // Through text so that toml's error names the line and key.
        let text = toml::to_string(&doc).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml_str(&text, origin)
    }

    /// The resolved configuration as TOML (every field, defaults included).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| ConfigError::Parse {
            origin: "<resolved>".into(),
            message: e.to_string(),
        })
    }

    /// Writes [`RunConfig::to_toml_string`] to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_toml_string()?).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The processor settings of the run's data section (dataset-side image area, prompt
    /// length, frames per volume; missing files are errors). They travel with the model as
    /// `qoq_processor.json` (checkpoints and exported folders).
    pub fn processor_options(&self) -> qoq_processor::processor::ProcessorOptions {
        let mut o = qoq_processor::processor::ProcessorOptions {
            dataset_min_pixels: self.data.min_pixels as u64,
            dataset_max_pixels: self.data.max_pixels as u64,
            max_prompt_length: self.data.max_prompt_length,
            missing_files_as_placeholders: false,
            ..Default::default()
        };
        o.image_load.video_frames = self.data.manifest.video_frames;
        o
    }

    /// The loss settings in the shape `qoq_rl::loss` takes.
    pub fn loss_config(&self) -> LossConfig {
        LossConfig {
            policy: self.actor.policy_loss,
            kl: self.algorithm.kl,
        }
    }

    /// Training steps of the run (spec §11): `max_steps` when set, else
    /// `⌊train_rows / rollout_batch_size⌋ · total_episodes` (the dataloader drops the last
    /// partial batch).
    pub fn training_steps(&self, train_rows: usize) -> u64 {
        self.trainer.max_steps.unwrap_or_else(|| {
            (train_rows / self.data.rollout_batch_size) as u64 * self.trainer.total_episodes
        })
    }

    /// Rollouts per optimiser step: `global_batch_size · n` (640 in the reference).
    pub fn rollouts_per_optimizer_step(&self) -> usize {
        self.actor.global_batch_size * self.rollout.n
    }

    /// Rollouts per rollout step: `rollout_batch_size · n` (2560).
    pub fn rollouts_per_step(&self) -> usize {
        self.data.rollout_batch_size * self.rollout.n
    }

    /// Optimiser steps per rollout step: `rollout_batch_size / global_batch_size · ppo_epochs`
    /// (4).
    pub fn optimizer_steps_per_step(&self) -> usize {
        self.data.rollout_batch_size / self.actor.global_batch_size * self.actor.ppo_epochs
    }

    /// Micro-batches accumulated per optimiser step on each device:
    /// `global_batch_size · n / world_size / micro_batch_size` (40).
    pub fn gradient_accumulation(&self) -> usize {
        self.rollouts_per_optimizer_step()
            / self.trainer.world_size()
            / self.actor.micro_batch_size_per_device_for_update
    }

    /// Range and consistency checks; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.data.train_files.is_empty() {
            return Err(invalid("data.train_files", "required (a JSONL manifest)"));
        }
        if self.data.val_files.is_empty() {
            return Err(invalid("data.val_files", "required (a JSONL manifest)"));
        }
        if !(self.algorithm.filter_min_std >= 0.0 && self.algorithm.filter_min_std.is_finite()) {
            return Err(invalid(
                "algorithm.filter_min_std",
                format!(
                    "{} is not a finite value ≥ 0",
                    self.algorithm.filter_min_std
                ),
            ));
        }
        let positive = [
            ("data.max_prompt_length", self.data.max_prompt_length),
            ("data.max_response_length", self.data.max_response_length),
            ("data.rollout_batch_size", self.data.rollout_batch_size),
            ("data.val_batch_size", self.data.val_batch_size),
            ("rollout.n", self.rollout.n),
            ("rollout.val_override.n", self.rollout.val_override.n),
            (
                "rollout.tensor_parallel_size",
                self.rollout.tensor_parallel_size,
            ),
            ("actor.global_batch_size", self.actor.global_batch_size),
            (
                "actor.micro_batch_size_per_device_for_update",
                self.actor.micro_batch_size_per_device_for_update,
            ),
            (
                "actor.micro_batch_size_per_device_for_experience",
                self.actor.micro_batch_size_per_device_for_experience,
            ),
            ("actor.ppo_epochs", self.actor.ppo_epochs),
            ("trainer.n_gpus_per_node", self.trainer.n_gpus_per_node),
            ("trainer.nnodes", self.trainer.nnodes),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.data.min_pixels > self.data.max_pixels {
            return Err(invalid(
                "data.min_pixels",
                format!(
                    "{} is above data.max_pixels {}",
                    self.data.min_pixels, self.data.max_pixels
                ),
            ));
        }
        for (field, t) in [
            ("rollout.temperature", self.rollout.temperature),
            (
                "rollout.val_override.temperature",
                self.rollout.val_override.temperature,
            ),
        ] {
            if !(t > 0.0 && t.is_finite()) {
                return Err(invalid(field, format!("{t} is not a finite value > 0")));
            }
        }
        let p = self.rollout.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid("rollout.top_p", format!("{p} is not in (0, 1]")));
        }
        let u = self.rollout.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(invalid(
                "rollout.gpu_memory_utilization",
                format!("{u} is not in (0, 1]"),
            ));
        }
        if !self
            .data
            .rollout_batch_size
            .is_multiple_of(self.actor.global_batch_size)
        {
            return Err(invalid(
                "actor.global_batch_size",
                format!(
                    "data.rollout_batch_size {} is not a multiple of it ({})",
                    self.data.rollout_batch_size, self.actor.global_batch_size
                ),
            ));
        }
        let per_device = self.rollouts_per_optimizer_step() / self.trainer.world_size();
        if !self
            .rollouts_per_optimizer_step()
            .is_multiple_of(self.trainer.world_size())
            || !per_device.is_multiple_of(self.actor.micro_batch_size_per_device_for_update)
        {
            return Err(invalid(
                "actor.micro_batch_size_per_device_for_update",
                format!(
                    "global_batch_size·n = {} rollouts do not split into {} devices × micro-batches of {}",
                    self.rollouts_per_optimizer_step(),
                    self.trainer.world_size(),
                    self.actor.micro_batch_size_per_device_for_update
                ),
            ));
        }
        if !(self.actor.optim.lr >= 0.0 && self.actor.optim.lr.is_finite()) {
            return Err(invalid(
                "actor.optim.lr",
                format!("{} is not a finite value ≥ 0", self.actor.optim.lr),
            ));
        }
        self.validate_estimator()?;
        if self.trainer.save_limit < -1 || self.trainer.save_limit == 0 {
            return Err(invalid(
                "trainer.save_limit",
                format!(
                    "{} must be −1 (keep all) or at least 1",
                    self.trainer.save_limit
                ),
            ));
        }
        self.actor
            .policy_loss
            .validate()
            .map_err(|e| invalid("actor.policy_loss", e.to_string()))?;
        self.algorithm
            .kl
            .validate()
            .map_err(|e| invalid("algorithm.kl", e.to_string()))?;
        if self.algorithm.needs_rollout_kl() {
            let damping = format!("{:?}", self.algorithm.drpo.kl_damping).to_lowercase();
            if self.algorithm.kl.disable_kl {
                return Err(invalid(
                    "algorithm.drpo.kl_damping",
                    format!(
                        "\"{damping}\" needs each rollout's KL to the reference policy, which \
                         algorithm.kl.disable_kl = true turns off: set disable_kl = false (the KL \
                         may stay out of the loss and the reward with kl_coef = 0) or \
                         kl_damping = \"off\""
                    ),
                ));
            }
            if self.algorithm.kl.kl_penalty == crate::loss::KlEstimator::Full {
                return Err(invalid(
                    "algorithm.drpo.kl_damping",
                    format!(
                        "\"{damping}\" needs a per-token KL between the sampler's and the \
                         reference's log-probs; algorithm.kl.kl_penalty = \"full\" needs the \
                         vocabulary log-probs: use kl, abs, mse or low_var_kl"
                    ),
                ));
            }
        }
        if let Err(e) = self.reward.build() {
            return Err(invalid("reward", e.to_string()));
        }
        Ok(())
    }
}

impl RunConfig {
    /// The estimator-specific keys: γ and λ in [0, 1] and used by their estimators only, the
    /// `[critic]` section with GAE only.
    fn validate_estimator(&self) -> Result<()> {
        let a = &self.algorithm;
        let kind = a.estimator;
        for (field, v) in [("algorithm.gamma", a.gamma), ("algorithm.lam", a.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(field, format!("{v} is not in [0, 1]")));
            }
        }
        let uses_gamma = matches!(kind, EstimatorKind::ReinforcePlusPlus | EstimatorKind::Gae);
        if a.gamma != 1.0 && !uses_gamma {
            return Err(invalid(
                "algorithm.gamma",
                format!(
                    "{} is used by estimator = \"reinforce_plus_plus\" or \"gae\" only, not \"{}\"",
                    a.gamma,
                    kind.name()
                ),
            ));
        }
        if a.lam != 1.0 && kind != EstimatorKind::Gae {
            return Err(invalid(
                "algorithm.lam",
                format!(
                    "{} is used by estimator = \"gae\" only, not \"{}\"",
                    a.lam,
                    kind.name()
                ),
            ));
        }
        if kind != EstimatorKind::Gae {
            if self.critic != CriticConfig::default() {
                return Err(invalid(
                    "critic",
                    format!(
                        "the value model is used by estimator = \"gae\" only, not \"{}\"",
                        kind.name()
                    ),
                ));
            }
            return Ok(());
        }
        let c = &self.critic;
        if !(c.cliprange_value > 0.0 && c.cliprange_value.is_finite()) {
            return Err(invalid(
                "critic.cliprange_value",
                format!("{} is not a finite value > 0", c.cliprange_value),
            ));
        }
        if !(c.optim.lr >= 0.0 && c.optim.lr.is_finite()) {
            return Err(invalid(
                "critic.optim.lr",
                format!("{} is not a finite value ≥ 0", c.optim.lr),
            ));
        }
        Ok(())
    }
}

/// Splits `key.path=value` at the first `=`.
pub fn split_override(arg: &str) -> Result<(&str, &str)> {
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride {
            key: arg.to_string(),
            reason: "expected key.path=value".into(),
        })?;
    let k = k.trim();
    if k.is_empty() || k.split('.').any(str::is_empty) {
        return Err(ConfigError::BadOverride {
            key: arg.to_string(),
            reason: "empty key segment".into(),
        });
    }
    Ok((k, v.trim()))
}

/// The TOML value of an override's text: `true`/`false`, an integer, a float (`1e-6`, `inf`),
/// an array (`[1, 2]`, `["a", "b"]`), a quoted string, else the text as a string.
pub fn infer_value(raw: &str) -> toml::Value {
    let t = raw.trim();
    if (t.starts_with('[') || t.starts_with('{') || t.starts_with('"') || t.starts_with('\''))
        && let Ok(toml::Value::Table(mut tab)) = toml::from_str::<toml::Value>(&format!("v = {t}"))
        && let Some(v) = tab.remove("v")
    {
        return v;
    }
    match t {
        "true" => return toml::Value::Boolean(true),
        "false" => return toml::Value::Boolean(false),
        _ => {}
    }
    match t {
        "inf" | "+inf" => return toml::Value::Float(f64::INFINITY),
        "-inf" => return toml::Value::Float(f64::NEG_INFINITY),
        "nan" => return toml::Value::Float(f64::NAN),
        _ => {}
    }
    if let Ok(i) = t.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if t.parse::<f64>().is_ok()
        && t.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
    {
        return toml::Value::Float(t.parse().unwrap());
    }
    toml::Value::String(t.to_string())
}

fn default_schema() -> toml::Value {
    toml::Value::try_from(RunConfig::default()).expect("the default config serialises to TOML")
}

/// Whether `path` names a key of the schema (the defaults) or of the document.
fn key_known(
    schema: &toml::Value,
    doc: &toml::Value,
    path: &[&str],
) -> std::result::Result<(), Vec<String>> {
    let (mut s, mut d) = (Some(schema), Some(doc));
    for seg in path {
        let next_s = s.and_then(|v| v.get(seg));
        let next_d = d.and_then(|v| v.get(seg));
        if next_s.is_none() && next_d.is_none() {
            let mut known: Vec<String> = Vec::new();
            for v in [s, d].into_iter().flatten() {
                if let Some(t) = v.as_table() {
                    known.extend(t.keys().cloned());
                }
            }
            known.sort();
            known.dedup();
            return Err(known);
        }
        (s, d) = (next_s, next_d);
    }
    Ok(())
}

/// Sets `key` (dotted path, e.g. `algorithm.estimator`) to the inferred value of `raw` in a run
/// document, creating intermediate tables. The key must exist in the schema (or already in the
/// document, for optional keys and tagged variants) unless the result still deserialises; an
/// unknown key is an error naming it, and a value of the wrong type an error naming the key.
/// An integer given for a float field is stored as a float.
pub fn apply_override(doc: &mut toml::Value, key: &str, raw: &str) -> Result<()> {
    let path: Vec<&str> = key.split('.').collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::BadOverride {
            key: key.to_string(),
            reason: "empty key segment".into(),
        });
    }
    let schema = default_schema();
    let known = key_known(&schema, doc, &path);
    let mut value = infer_value(raw);
    // An integer for a key whose default is a float.
    if let toml::Value::Integer(i) = value {
        let mut s = Some(&schema);
        for seg in &path {
            s = s.and_then(|v| v.get(seg));
        }
        if matches!(s, Some(toml::Value::Float(_))) {
            value = toml::Value::Float(i as f64);
        }
    }
    let mut candidate = doc.clone();
    {
        let mut cur = &mut candidate;
        for (i, seg) in path.iter().enumerate() {
            let table = cur.as_table_mut().ok_or_else(|| ConfigError::BadOverride {
                key: key.to_string(),
                reason: format!("`{}` is not a table", path[..i].join(".")),
            })?;
            if i + 1 == path.len() {
                table.insert(seg.to_string(), value.clone());
                break;
            }
            cur = table
                .entry(seg.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
    }
    match (
        RunConfig::from_value(candidate.clone(), "<override>"),
        known,
    ) {
        (Ok(_), _) => {
            *doc = candidate;
            Ok(())
        }
        (Err(_), Err(known)) => Err(ConfigError::UnknownKey {
            key: key.to_string(),
            known,
        }),
        (Err(e), Ok(())) => Err(ConfigError::BadOverride {
            key: key.to_string(),
            reason: format!("value {raw:?} does not fit: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_inferred_by_type() {
        assert_eq!(infer_value("true"), toml::Value::Boolean(true));
        assert_eq!(infer_value("12"), toml::Value::Integer(12));
        assert_eq!(infer_value("1e-6"), toml::Value::Float(1e-6));
        assert_eq!(infer_value("-1.5"), toml::Value::Float(-1.5));
        assert_eq!(infer_value("inf"), toml::Value::Float(f64::INFINITY));
        assert_eq!(infer_value("info"), toml::Value::String("info".into()));
        assert_eq!(infer_value("drpo"), toml::Value::String("drpo".into()));
        assert_eq!(infer_value("\"12\""), toml::Value::String("12".into()));
        assert_eq!(
            infer_value("[1, 2]"),
            toml::Value::Array(vec![toml::Value::Integer(1), toml::Value::Integer(2)])
        );
    }

    #[test]
    fn split_override_needs_an_equals_sign() {
        assert_eq!(split_override("a.b = 3").unwrap(), ("a.b", "3"));
        assert!(split_override("a.b").is_err());
        assert!(split_override("a..b=1").is_err());
    }
}
