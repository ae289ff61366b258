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
//!
//! [`ManifestConfig`]: qoq_data::manifest::ManifestConfig
//! [`DrpoConfig`]: crate::advantage::DrpoConfig
//! [`KlConfig`]: crate::loss::config::KlConfig
//! [`PolicyLossConfig`]: crate::loss::config::PolicyLossConfig
//! [`AdamWConfig`]: crate::optim::AdamWConfig
//!
//! Files: this one (the whole file, its errors, validation), `sections.rs` (one struct per
//! section), `overrides.rs` (`--set` overrides).

pub mod consumers;
mod overrides;
mod sections;

pub use overrides::{apply_override, infer_value, split_override};
pub use sections::{
    ActorConfig, AlgorithmConfig, AllReduce, CriticConfig, DataConfig, DtypeName, EstimatorKind,
    FORMAT_PROMPT_MEDICAL, FORMAT_PROMPT_NONE, LoraSection, ModelConfig, OptimizerStrategy,
    RolloutBackend, RolloutConfig, TrainerConfig, ValOverride,
};

use crate::loss::config::LossConfig;
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

/// Keys of the reference's configuration that this build does not implement, with the reason:
/// a run file setting one is refused with that reason (rather than by an unknown-key error, or
/// worse, accepted and ignored).
pub const NOT_IMPLEMENTED: &[(&str, &str)] = &[];

/// Refuses a document that sets a [`NOT_IMPLEMENTED`] key.
fn refuse_unimplemented(doc: &toml::Value, origin: &str) -> Result<()> {
    for (key, why) in NOT_IMPLEMENTED {
        let mut v = Some(doc);
        for seg in key.split('.') {
            v = v.and_then(|x| x.get(seg));
        }
        if v.is_some() {
            return Err(ConfigError::Parse {
                origin: origin.to_string(),
                message: format!("`{key}` is not implemented: {why}"),
            });
        }
    }
    Ok(())
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
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
        if let Ok(doc) = toml::from_str::<toml::Value>(text) {
            refuse_unimplemented(&doc, origin)?;
        }
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
        // Applied together: a known key whose value does not fit may be completed by later
        // overrides (a tagged variant, then its fields); while the document does not
        // deserialise, later overrides are set unchecked. An unknown key on a valid document is
        // refused at once; the first misfit is the error if nothing completes it.
        let mut misfit: Option<ConfigError> = None;
        for o in overrides {
            let (key, value) = split_override(o)?;
            match overrides::apply_override_deferred(&mut doc, key, value)? {
                None => misfit = None,
                Some(e @ ConfigError::UnknownKey { .. }) if misfit.is_none() => return Err(e),
                Some(e) => {
                    misfit.get_or_insert(e);
                }
            }
        }
        let cfg = match Self::from_value(doc, &origin) {
            Ok(cfg) => cfg,
            Err(last) => {
                return Err(match misfit {
                    Some(ConfigError::BadOverride { key, reason }) => ConfigError::BadOverride {
                        key,
                        reason: format!("{reason}; with every override applied: {last}"),
                    },
                    Some(e) => e,
                    None => last,
                });
            }
        };
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

    /// The processor settings of the run's data section (format prompt, dataset-side image
    /// area, prompt length, frames per volume; missing files are errors). They travel with the
    /// model as `qoq_processor.json` (checkpoints and exported folders). Fails when
    /// `data.format_prompt` names a template file that cannot be read or compiled.
    pub fn processor_options(&self) -> Result<qoq_processor::processor::ProcessorOptions> {
        let mut o = qoq_processor::processor::ProcessorOptions {
            format_prompt: self.format_prompt_source()?,
            dataset_min_pixels: self.data.min_pixels as u64,
            dataset_max_pixels: self.data.max_pixels as u64,
            max_prompt_length: self.data.max_prompt_length,
            missing_files_as_placeholders: false,
            ..Default::default()
        };
        o.image_load.video_frames = self.data.manifest.video_frames;
        Ok(o)
    }

    /// The source of the format prompt template that `data.format_prompt` names (`None`: no
    /// format prompt), checked to compile.
    fn format_prompt_source(&self) -> Result<Option<String>> {
        let key = "data.format_prompt";
        let src = match self.data.format_prompt.as_str() {
            sections::FORMAT_PROMPT_MEDICAL => {
                return Ok(Some(qoq_processor::prompt::DEFAULT_FORMAT_PROMPT.to_string()));
            }
            sections::FORMAT_PROMPT_NONE => return Ok(None),
            "" => {
                return Err(invalid(
                    key,
                    "empty: \"medical\" (the reference's template), \"none\" or the path of a Jinja template file",
                ));
            }
            path => std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    key,
                    format!(
                        "template file {path}: {e} (the value is \"medical\", \"none\" or the path of a Jinja template file)"
                    ),
                )
            })?,
        };
        let path = &self.data.format_prompt;
        if !src.contains("content") {
            return Err(invalid(
                key,
                format!("template file {path} never uses `{{{{ content }}}}` (the question)"),
            ));
        }
        let builder = qoq_processor::prompt::PromptBuilder::new(
            Some(&src),
            qoq_processor::prompt::DEFAULT_CHAT_TEMPLATE,
        )
        .and_then(|b| b.format("question"));
        builder.map_err(|e| invalid(key, format!("template file {path}: {e}")))?;
        Ok(Some(src))
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
        self.format_prompt_source()?;
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
            ("rollout.limit_images", self.rollout.limit_images),
            (
                "rollout.max_num_batched_tokens",
                self.rollout.max_num_batched_tokens,
            ),
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
        let device = self.device()?;
        if self.trainer.all_reduce == AllReduce::Nccl
            && let Some(why) = AllReduce::nccl_refusal(device.is_cuda())
        {
            return Err(invalid("trainer.all_reduce", why));
        }
        if let Some(u) = self.rollout.gpu_memory_utilization {
            if !(u > 0.0 && u <= 1.0) {
                return Err(invalid(
                    "rollout.gpu_memory_utilization",
                    format!("{u} is not in (0, 1]"),
                ));
            }
            if !device.is_cuda() {
                return Err(invalid(
                    "rollout.gpu_memory_utilization",
                    format!(
                        "sizes the key/value cache from GPU memory, but the run's device is \
                         {device}: bound the cache with rollout.kv_cache_mib instead"
                    ),
                ));
            }
            if self.rollout.kv_cache_mib > 0 {
                return Err(invalid(
                    "rollout.gpu_memory_utilization",
                    format!(
                        "set together with rollout.kv_cache_mib = {}: set one of them",
                        self.rollout.kv_cache_mib
                    ),
                ));
            }
        }
        // Settings whose implementation does not exist yet are refused rather than ignored.
        self.validate_precision()?;
        self.validate_lora()?;
        self.validate_backend()?;
        if self.rollout.tensor_parallel_size > 1 {
            return Err(invalid(
                "rollout.tensor_parallel_size",
                format!(
                    "{}: the rollout engine runs in this process on one device; tensor \
                     parallelism is not implemented (use 1)",
                    self.rollout.tensor_parallel_size
                ),
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
        self.validate_paper_keys()
    }
}

impl RunConfig {
    /// `model.device` parsed: an unknown name, or `cuda` in a build without the `cuda` feature,
    /// is an error naming the field.
    pub fn device(&self) -> Result<qoq_model::DeviceSpec> {
        qoq_model::DeviceSpec::parse(&self.model.device)
            .map_err(|e| invalid("model.device", e.to_string()))
    }

    /// The trained components: `model.trainable`'s groups when set (a parameter trains when its
    /// group is listed and the component is not frozen), none with `[model.lora]` (the adapters
    /// alone train), else the `model.freeze_*` switches.
    pub fn trainable(
        &self,
    ) -> std::result::Result<
        (
            Option<crate::trainable::TrainableGroups>,
            qoq_model::train::Freeze,
        ),
        String,
    > {
        let groups = match &self.model.trainable {
            Some(names) => Some(
                crate::trainable::TrainableGroups::parse(names)
                    .map_err(|e| format!("model.trainable: {e}"))?,
            ),
            None => None,
        };
        let freeze = match &groups {
            Some(g) => g.freeze(),
            // LoRA: every base weight is frozen, the adapters alone train.
            None if self.model.lora.is_some() => qoq_model::train::Freeze {
                vision_tower: true,
                time_series_encoder: true,
                llm: true,
            },
            None => qoq_model::train::Freeze {
                vision_tower: self.model.freeze_vision_tower,
                time_series_encoder: self.model.freeze_time_series_encoder,
                llm: self.model.freeze_llm,
            },
        };
        Ok((groups, freeze))
    }

    /// `model.trainable`, `trainer.early_stopping`.
    fn validate_paper_keys(&self) -> Result<()> {
        if let Some(names) = &self.model.trainable {
            crate::trainable::TrainableGroups::parse(names)
                .map_err(|reason| invalid("model.trainable", reason))?;
            let m = &self.model;
            for (flag, on) in [
                ("model.freeze_vision_tower", m.freeze_vision_tower),
                ("model.freeze_llm", m.freeze_llm),
                (
                    "model.freeze_time_series_encoder",
                    m.freeze_time_series_encoder,
                ),
            ] {
                if on {
                    return Err(invalid(
                        "model.trainable",
                        format!(
                            "set together with {flag} = true: list the trained groups in \
                             model.trainable only (a group left out is frozen)"
                        ),
                    ));
                }
            }
        }
        if let Some(es) = &self.trainer.early_stopping {
            es.validate()
                .map_err(|(field, reason)| invalid(field, reason))?;
            if self.trainer.val_freq == 0 {
                return Err(invalid(
                    "trainer.early_stopping",
                    "checks the validations, and trainer.val_freq = 0 never validates",
                ));
            }
        }
        Ok(())
    }
}

impl RunConfig {
    /// `model.master_dtype` / `model.compute_dtype`: equal, or f32 masters with bf16 compute
    /// (mixed precision).
    fn validate_precision(&self) -> Result<()> {
        let (master, compute) = (self.model.master_dtype, self.model.compute_dtype);
        if master == compute || (master == DtypeName::F32 && compute == DtypeName::Bf16) {
            return Ok(());
        }
        Err(invalid(
            "model.compute_dtype",
            format!(
                "{compute:?} over model.master_dtype {master:?}: mixed precision is implemented \
                 for f32 master weights with bf16 compute only; otherwise set both to the same \
                 dtype"
            ),
        ))
    }

    /// `[model.lora]`: rank, alpha, dropout, targets, and the keys it cannot be combined with.
    /// `rollout.backend` and the keys it needs or cannot honour: an endpoint goes with
    /// `backend = "openai"` and only with it; the in-process engine's settings (its key/value
    /// budget, prefill pieces) and sampling settings the OpenAI API cannot carry are refused with
    /// it rather than ignored.
    fn validate_backend(&self) -> Result<()> {
        let r = &self.rollout;
        if r.backend == RolloutBackend::Engine {
            for (key, set) in [
                ("rollout.endpoint", r.endpoint.is_some()),
                ("rollout.served_model", r.served_model.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "names the server of rollout.backend = \"openai\", but the backend is \
                         \"engine\" (rollouts in this process): set rollout.backend = \"openai\" \
                         or remove it",
                    ));
                }
            }
            return Ok(());
        }
        let Some(url) = &r.endpoint else {
            return Err(invalid(
                "rollout.backend",
                "\"openai\" needs rollout.endpoint, the server's base URL (e.g. \
                 \"http://127.0.0.1:8000/v1\")",
            ));
        };
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            return Err(invalid(
                "rollout.endpoint",
                format!(
                    "{url:?} is not an http:// URL (e.g. \"http://127.0.0.1:8000/v1\"; the \
                     client speaks plain HTTP to a server on the training network)"
                ),
            ));
        }
        if r.request_timeout_s == 0 {
            return Err(invalid("rollout.request_timeout_s", "must be at least 1"));
        }
        let engine_only = "sizes the in-process engine; with rollout.backend = \"openai\" the \
                           server's own settings apply (vLLM: --gpu-memory-utilization, \
                           --max-num-batched-tokens; qoq serve: --kv-cache-mb, --prefill-chunk)";
        if r.kv_cache_mib > 0 {
            return Err(invalid("rollout.kv_cache_mib", engine_only));
        }
        if r.gpu_memory_utilization.is_some() {
            return Err(invalid("rollout.gpu_memory_utilization", engine_only));
        }
        if r.max_num_batched_tokens != RolloutConfig::default().max_num_batched_tokens {
            return Err(invalid("rollout.max_num_batched_tokens", engine_only));
        }
        if r.top_k != -1 {
            return Err(invalid(
                "rollout.top_k",
                format!(
                    "{}: the OpenAI chat-completions API has no top-k (qoq serve refuses it); \
                     use -1 with rollout.backend = \"openai\"",
                    r.top_k
                ),
            ));
        }
        for (key, t) in [
            ("rollout.temperature", r.temperature),
            (
                "rollout.val_override.temperature",
                r.val_override.temperature,
            ),
        ] {
            if t > 2.0 {
                return Err(invalid(
                    key,
                    format!("{t}: the OpenAI API's temperature is in [0, 2]"),
                ));
            }
        }
        if !(-100.0..=100.0).contains(&r.image_pad_logit_bias) {
            return Err(invalid(
                "rollout.image_pad_logit_bias",
                format!(
                    "{}: the OpenAI API's logit_bias is in [-100, 100]",
                    r.image_pad_logit_bias
                ),
            ));
        }
        Ok(())
    }

    fn validate_lora(&self) -> Result<()> {
        let Some(l) = &self.model.lora else {
            return Ok(());
        };
        if l.rank == 0 {
            return Err(invalid("model.lora.rank", "must be at least 1"));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            return Err(invalid(
                "model.lora.alpha",
                format!("{} is not a finite value > 0", l.alpha),
            ));
        }
        if l.dropout != 0.0 {
            return Err(invalid(
                "model.lora.dropout",
                format!(
                    "{}: dropout on the adapters' input is not implemented; set 0",
                    l.dropout
                ),
            ));
        }
        if l.target_modules.is_empty() {
            return Err(invalid("model.lora.target_modules", "lists no projection"));
        }
        let known = qoq_model::lora::all_targets();
        for t in &l.target_modules {
            if !known.contains(t) {
                return Err(invalid(
                    "model.lora.target_modules",
                    format!(
                        "`{t}` is not a decoder projection (known: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        if self.model.trainable.is_some() {
            return Err(invalid(
                "model.lora",
                "set together with model.trainable: with LoRA only the adapters train (every \
                 base weight is frozen); remove model.trainable",
            ));
        }
        if self.algorithm.estimator == EstimatorKind::Gae {
            return Err(invalid(
                "model.lora",
                "with estimator = \"gae\": the value model has no LoRA adapters in this build; \
                 use another estimator or full training",
            ));
        }
        Ok(())
    }

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
