//! Where every run-file key takes effect: the registry behind the rule that a setting that does
//! nothing is a lie.
//!
//! Each entry names a key (or a key prefix, for a table handed whole to one component, such as
//! a tagged schedule), a source file of the workspace, and a piece of code in that file that
//! reads it. A key may have several entries (a value converted in `config/` and the place that
//! uses the conversion). The tests below collect every key a run file can set (the defaults,
//! every file under `configs/`, and the optional keys) and require an entry for each; and they
//! require every entry's code to be present in its file outside comments. A key added to
//! [`super::RunConfig`] without a consumer, or a consumer removed while its key stays, fails
//! them. Keys that are only refused (a value other than the one implemented) name the refusal.

/// `(key or prefix, file relative to the workspace root, code that reads the key there)`.
pub const CONSUMERS: &[(&str, &str, &str)] = &[
    // [data]
    ("data.train_files", TRAINER_BUILD, "cfg.data.train_files"),
    ("data.val_files", TRAINER_BUILD, "cfg.data.val_files"),
    (
        "data.max_prompt_length",
        PROCESSOR,
        "opts.max_prompt_length",
    ),
    (
        "data.max_prompt_length",
        CONFIG,
        "max_prompt_length: self.data.max_prompt_length",
    ),
    (
        "data.max_prompt_length",
        TRAINER_BUILD,
        ".processor_options()",
    ),
    (
        "data.max_response_length",
        TRAINER_ROLLOUT,
        "data.max_response_length",
    ),
    (
        "data.rollout_batch_size",
        TRAINER_ROLLOUT,
        "data.rollout_batch_size",
    ),
    (
        "data.val_batch_size",
        TRAINER_VALIDATE,
        "data.val_batch_size",
    ),
    ("data.shuffle", TRAINER_BUILD, "cfg.data.shuffle"),
    (
        "data.format_prompt",
        CONFIG,
        "match self.data.format_prompt.as_str()",
    ),
    (
        "data.format_prompt",
        TRAINER_OPENAI,
        "cfg.data.format_prompt.as_str()",
    ),
    ("data.seed", TRAINER_ROLLOUT, "self.cfg.data.seed"),
    (
        "data.preshuffle_seed",
        TRAINER_BUILD,
        "cfg.data.preshuffle_seed",
    ),
    (
        "data.max_pixels",
        CONFIG,
        "dataset_max_pixels: self.data.max_pixels",
    ),
    (
        "data.min_pixels",
        CONFIG,
        "dataset_min_pixels: self.data.min_pixels",
    ),
    ("data.max_pixels", PROCESSOR_IMAGE, "cfg.max_pixels"),
    (
        "data.mask_wh_swap_bug",
        TRAINER_ROLLOUT,
        "data.mask_wh_swap_bug",
    ),
    ("data.manifest", TRAINER_BUILD, "cfg.data.manifest"),
    ("data.manifest.prompt_key", MANIFEST, "cfg.prompt_key"),
    ("data.manifest.answer_key", MANIFEST, "cfg.answer_key"),
    ("data.manifest.image_key", MANIFEST, "cfg.image_key"),
    ("data.manifest.video_key", MANIFEST, "cfg.video_key"),
    (
        "data.manifest.time_series_key",
        MANIFEST,
        "cfg.time_series_key",
    ),
    (
        "data.manifest.segmentation_key",
        MANIFEST,
        "cfg.segmentation_key",
    ),
    ("data.manifest.bbox_key", MANIFEST, "cfg.bbox_key"),
    ("data.manifest.dataset_key", MANIFEST, "cfg.dataset_key"),
    (
        "data.manifest.data_source_key",
        MANIFEST,
        "cfg.data_source_key",
    ),
    ("data.manifest.system_key", MANIFEST, "cfg.system_key"),
    ("data.manifest.video_frames", MANIFEST, "cfg.video_frames"),
    (
        "data.manifest.require_image_key",
        MANIFEST,
        "cfg.require_image_key",
    ),
    (
        "data.manifest.skip_bad_rows",
        TRAINER_ROLLOUT,
        "manifest.skip_bad_rows",
    ),
    // [model]
    ("model.model_path", TRAINER_INIT, "model.model_path"),
    (
        "model.tokenizer_path",
        TRAINER_BUILD,
        "cfg.model.tokenizer_path",
    ),
    (
        "model.master_dtype",
        TRAINER_BUILD,
        "cfg.model.master_dtype",
    ),
    (
        "model.compute_dtype",
        TRAINER_BUILD,
        "dtype_of(cfg.model.compute_dtype)",
    ),
    ("model.lora", TRAINER_BUILD, "cfg.model.lora.as_ref().map("),
    ("model.lora", SECTIONS, "pub fn lora_config(&self)"),
    ("model.lora.rank", SECTIONS, "rank: self.rank"),
    ("model.lora.alpha", SECTIONS, "alpha: self.alpha"),
    (
        "model.lora.target_modules",
        SECTIONS,
        "targets: self.target_modules.clone()",
    ),
    // Only 0 is implemented: another value is refused.
    ("model.lora.dropout", CONFIG, "if l.dropout != 0.0 {"),
    (
        "model.freeze_vision_tower",
        CONFIG,
        "vision_tower: self.model.freeze_vision_tower",
    ),
    ("model.freeze_llm", CONFIG, "llm: self.model.freeze_llm"),
    (
        "model.freeze_time_series_encoder",
        CONFIG,
        "time_series_encoder: self.model.freeze_time_series_encoder",
    ),
    ("model.trainable", CONFIG, "match &self.model.trainable"),
    ("model.trainable", TRAINER_BUILD, "cfg.trainable()"),
    (
        "model.gradient_checkpointing",
        TRAINER_UPDATE,
        "self.cfg.model.gradient_checkpointing",
    ),
    (
        "model.device",
        TRAINER_BUILD,
        "cfg.model.device = configured.to_string()",
    ),
    (
        "model.device",
        CONFIG,
        "DeviceSpec::parse(&self.model.device)",
    ),
    // [rollout]
    ("rollout.n", TRAINER, "self.cfg.rollout.n"),
    ("rollout.temperature", TRAINER_ROLLOUT, "r.temperature"),
    ("rollout.top_p", TRAINER_ROLLOUT, "r.top_p"),
    ("rollout.top_k", TRAINER_ROLLOUT, "r.top_k"),
    ("rollout.seed", TRAINER_ROLLOUT, "seed: r.seed"),
    ("rollout.ignore_eos", TRAINER_ROLLOUT, "r.ignore_eos"),
    (
        "rollout.image_pad_logit_bias",
        TRAINER_ROLLOUT,
        "r.image_pad_logit_bias",
    ),
    (
        "rollout.limit_images",
        TRAINER_ROLLOUT,
        "self.cfg.rollout.limit_images",
    ),
    (
        "rollout.max_num_batched_tokens",
        TRAINER_ROLLOUT,
        "r.max_num_batched_tokens",
    ),
    ("rollout.kv_cache_mib", TRAINER_ROLLOUT, "r.kv_cache_mib"),
    (
        "rollout.gpu_memory_utilization",
        TRAINER_ROLLOUT,
        "r.gpu_memory_utilization",
    ),
    // Only 1 is implemented: more is refused.
    (
        "rollout.tensor_parallel_size",
        CONFIG,
        "self.rollout.tensor_parallel_size > 1",
    ),
    (
        "rollout.backend",
        CONFIG,
        "r.backend == RolloutBackend::Engine",
    ),
    ("rollout.backend", TRAINER_OPENAI, "RolloutBackend::Openai"),
    ("rollout.endpoint", TRAINER_OPENAI, "r.endpoint"),
    ("rollout.served_model", TRAINER_OPENAI, "r.served_model"),
    (
        "rollout.request_timeout_s",
        TRAINER_OPENAI,
        "r.request_timeout_s",
    ),
    ("rollout.val_override.n", TRAINER_VALIDATE, "vo.n"),
    (
        "rollout.val_override.temperature",
        TRAINER_VALIDATE,
        "vo.temperature",
    ),
    // [reward]: built whole by qoq-reward.
    ("reward", TRAINER_BUILD, ".reward\n            .build()"),
    ("reward.type", REWARD, "RewardConfig::QoqMedical(c)"),
    ("reward.compat", MEDICAL, "cfg.compat"),
    ("reward.iou_reduce", MEDICAL, "cfg.iou_reduce"),
    ("reward.weights", MEDICAL, "cfg.weights"),
    ("reward.format", MEDICAL, "cfg.format"),
    ("reward.coherence_weight", MEDICAL, "cfg.coherence_weight"),
    // [algorithm]
    (
        "algorithm.estimator",
        TRAINER_BUILD,
        "cfg.algorithm.build_estimator()",
    ),
    ("algorithm.estimator", SECTIONS, "match self.estimator"),
    (
        "algorithm.grpo_eps",
        SECTIONS,
        "Estimator::Grpo { eps: self.grpo_eps }",
    ),
    ("algorithm.gamma", SECTIONS, "gamma: self.gamma"),
    ("algorithm.lam", SECTIONS, "lam: self.lam"),
    (
        "algorithm.dynamic_filter",
        TRAINER_SCORE,
        "a.dynamic_filter",
    ),
    (
        "algorithm.filter_min_std",
        TRAINER_SCORE,
        "a.filter_min_std",
    ),
    ("algorithm.drpo", SECTIONS, "self.drpo"),
    ("algorithm.drpo.mode", DRPO, "cfg.mode"),
    ("algorithm.drpo.engine", DRPO, "cfg.engine"),
    (
        "algorithm.drpo.domain_key",
        TRAINER_ROLLOUT,
        "drpo.domain_key",
    ),
    ("algorithm.drpo.k_max", DRPO_HISTORY, "cfg.k_max"),
    ("algorithm.drpo.tol", DRPO_HISTORY, "cfg.tol"),
    ("algorithm.drpo.eps", DRPO, "cfg.eps"),
    (
        "algorithm.drpo.cluster_eps_floor",
        DRPO,
        "cfg.cluster_eps_floor",
    ),
    ("algorithm.drpo.mu_d", DRPO, "cfg.mu_d"),
    ("algorithm.drpo.elbow", DRPO_HISTORY, "cfg.elbow"),
    ("algorithm.drpo.kl_damping", DRPO, "cfg.kl_damping"),
    ("algorithm.drpo.kl_q", DRPO, "cfg.kl_q"),
    ("algorithm.drpo.kl_position", DRPO, "cfg.kl_position"),
    (
        "algorithm.drpo.sort_rollout_vectors",
        DRPO,
        "cfg.sort_rollout_vectors",
    ),
    ("algorithm.drpo.reference_nan", DRPO, "cfg.reference_nan"),
    (
        "algorithm.drpo.summary_exact_below",
        DRPO_HISTORY,
        "cfg.summary_exact_below",
    ),
    (
        "algorithm.drpo.summary_max_cells",
        DRPO_HISTORY,
        "cfg.summary_max_cells",
    ),
    ("algorithm.kl", CONFIG, "kl: self.algorithm.kl"),
    ("algorithm.kl.disable_kl", LOSS_CONFIG, "kl.disable_kl"),
    ("algorithm.kl.use_kl_loss", LOSS_CONFIG, "kl.use_kl_loss"),
    ("algorithm.kl.kl_penalty", TRAINER_SCORE, "kl.kl_penalty"),
    ("algorithm.kl.kl_coef", LOSS_KL, "cfg.kl_coef"),
    ("algorithm.kl.kl_type", LOSS_KL, "cfg.kl_type"),
    ("algorithm.kl.kl_horizon", LOSS_KL, "cfg.kl_horizon"),
    ("algorithm.kl.kl_target", LOSS_KL, "cfg.kl_target"),
    // [actor]
    (
        "actor.global_batch_size",
        TRAINER_UPDATE,
        "actor.global_batch_size",
    ),
    (
        "actor.micro_batch_size_per_device_for_update",
        TRAINER_UPDATE,
        "actor.micro_batch_size_per_device_for_update",
    ),
    (
        "actor.micro_batch_size_per_device_for_experience",
        TRAINER_SCORE,
        ".micro_batch_size_per_device_for_experience",
    ),
    ("actor.ppo_epochs", TRAINER_UPDATE, "actor.ppo_epochs"),
    (
        "actor.pack_rollouts",
        TRAINER_UPDATE,
        "cfg.actor.pack_rollouts",
    ),
    ("actor.strategy", TRAINER_BUILD, "cfg.actor.strategy"),
    ("actor.optim", TRAINER_BUILD, "cfg.actor.optim.clone()"),
    ("actor.optim.lr", OPTIM, "self.cfg.lr"),
    ("actor.optim.beta1", OPTIM, "cfg.beta1"),
    ("actor.optim.beta2", OPTIM, "cfg.beta2"),
    ("actor.optim.eps", OPTIM, "self.cfg.eps"),
    ("actor.optim.weight_decay", OPTIM, "cfg.weight_decay"),
    ("actor.optim.max_grad_norm", OPTIM, "cfg.max_grad_norm"),
    (
        "actor.optim.schedule",
        OPTIM,
        "self.cfg.schedule.factor(self.step)",
    ),
    ("actor.policy_loss", CONFIG, "self.actor.policy_loss"),
    (
        "actor.policy_loss.clip_ratio_low",
        LOSS_CONFIG,
        "self.clip_ratio_low",
    ),
    (
        "actor.policy_loss.clip_ratio_high",
        LOSS_CONFIG,
        "self.clip_ratio_high",
    ),
    (
        "actor.policy_loss.clip_ratio_dual",
        LOSS_CONFIG,
        "self.clip_ratio_dual",
    ),
    (
        "actor.policy_loss.loss_agg_mode",
        LOSS_POLICY,
        "cfg.loss_agg_mode",
    ),
    // [critic] (GAE runs)
    ("critic.cliprange_value", CRITIC, "cfg.cliprange_value"),
    ("critic.optim", CRITIC, "cfg.optim.clone()"),
    ("critic.optim.lr", OPTIM, "self.cfg.lr"),
    ("critic.optim.beta1", OPTIM, "cfg.beta1"),
    ("critic.optim.beta2", OPTIM, "cfg.beta2"),
    ("critic.optim.eps", OPTIM, "self.cfg.eps"),
    ("critic.optim.weight_decay", OPTIM, "cfg.weight_decay"),
    ("critic.optim.max_grad_norm", OPTIM, "cfg.max_grad_norm"),
    (
        "critic.optim.schedule",
        OPTIM,
        "self.cfg.schedule.factor(self.step)",
    ),
    // [trainer]
    (
        "trainer.total_episodes",
        CONFIG,
        "* self.trainer.total_episodes",
    ),
    (
        "trainer.total_episodes",
        TRAINER,
        "self.cfg.training_steps(",
    ),
    (
        "trainer.max_steps",
        CONFIG,
        "self.trainer.max_steps.unwrap_or_else",
    ),
    ("trainer.val_freq", TRAINER, "self.cfg.trainer.val_freq"),
    (
        "trainer.save_freq",
        SECTIONS,
        "step.is_multiple_of(self.save_freq)",
    ),
    (
        "trainer.save_freq",
        TRAINER,
        "self.cfg.trainer.is_save_step(",
    ),
    (
        "trainer.save_limit",
        SECTIONS,
        "usize::try_from(self.save_limit)",
    ),
    (
        "trainer.save_limit",
        TRAINER,
        "self.cfg.trainer.keep_last()",
    ),
    (
        "trainer.n_gpus_per_node",
        SECTIONS,
        "self.n_gpus_per_node * self.nnodes",
    ),
    (
        "trainer.nnodes",
        SECTIONS,
        "self.n_gpus_per_node * self.nnodes",
    ),
    // The launch's rank count must equal it (data-parallel training under mpirun).
    (
        "trainer.n_gpus_per_node",
        TRAINER_BUILD,
        "let want = cfg.trainer.world_size();",
    ),
    (
        "trainer.nnodes",
        TRAINER_BUILD,
        "let want = cfg.trainer.world_size();",
    ),
    ("trainer.out_dir", TRAINER_BUILD, "cfg.trainer.out_dir"),
    (
        "trainer.find_last_checkpoint",
        CLI_TRAIN,
        "trainer.find_last_checkpoint",
    ),
    (
        "trainer.load_checkpoint_path",
        CLI_TRAIN,
        "trainer.load_checkpoint_path",
    ),
    (
        "trainer.tensorboard",
        TRAINER_BUILD,
        "cfg.trainer.tensorboard",
    ),
    (
        "trainer.val_before_train",
        TRAINER,
        "self.cfg.trainer.val_before_train",
    ),
    ("trainer.sft", TRAINER_BUILD, "cfg.trainer.sft"),
    (
        "trainer.all_reduce",
        TRAINER_BUILD,
        "GradientPath::open(cfg.trainer.all_reduce",
    ),
    (
        "trainer.all_reduce",
        CONFIG,
        "self.trainer.all_reduce == AllReduce::Nccl",
    ),
    ("trainer.early_stopping", TRAINER_STOPPING, "early_stopping"),
    (
        "trainer.early_stopping.metric",
        EARLY_STOPPING,
        "cfg.metric",
    ),
    (
        "trainer.early_stopping.mode",
        EARLY_STOPPING,
        "match cfg.mode",
    ),
    (
        "trainer.early_stopping.patience",
        EARLY_STOPPING,
        "cfg.patience",
    ),
    (
        "trainer.early_stopping.min_delta",
        EARLY_STOPPING,
        "cfg.min_delta",
    ),
];

const CONFIG: &str = "crates/qoq-rl/src/config/mod.rs";
const SECTIONS: &str = "crates/qoq-rl/src/config/sections.rs";
const TRAINER: &str = "crates/qoq-rl/src/trainer/mod.rs";
const TRAINER_BUILD: &str = "crates/qoq-rl/src/trainer/build.rs";
const TRAINER_INIT: &str = "crates/qoq-rl/src/trainer/init.rs";
const TRAINER_ROLLOUT: &str = "crates/qoq-rl/src/trainer/rollout.rs";
const TRAINER_OPENAI: &str = "crates/qoq-rl/src/trainer/openai.rs";
const TRAINER_SCORE: &str = "crates/qoq-rl/src/trainer/score.rs";
const TRAINER_UPDATE: &str = "crates/qoq-rl/src/trainer/update.rs";
const TRAINER_VALIDATE: &str = "crates/qoq-rl/src/trainer/validate.rs";
const TRAINER_STOPPING: &str = "crates/qoq-rl/src/trainer/stopping.rs";
const EARLY_STOPPING: &str = "crates/qoq-rl/src/early_stopping.rs";
const OPTIM: &str = "crates/qoq-rl/src/optim/mod.rs";
const CRITIC: &str = "crates/qoq-rl/src/critic.rs";
const DRPO: &str = "crates/qoq-rl/src/advantage/drpo/mod.rs";
const DRPO_HISTORY: &str = "crates/qoq-rl/src/advantage/drpo/history.rs";
const LOSS_CONFIG: &str = "crates/qoq-rl/src/loss/config.rs";
const LOSS_KL: &str = "crates/qoq-rl/src/loss/kl.rs";
const LOSS_POLICY: &str = "crates/qoq-rl/src/loss/policy.rs";
const MANIFEST: &str = "crates/qoq-data/src/manifest.rs";
const PROCESSOR: &str = "crates/qoq-processor/src/processor.rs";
const PROCESSOR_IMAGE: &str = "crates/qoq-processor/src/image.rs";
const REWARD: &str = "crates/qoq-reward/src/reward.rs";
const MEDICAL: &str = "crates/qoq-reward/src/medical.rs";
const CLI_TRAIN: &str = "crates/qoq-cli/src/cmd/train.rs";

#[cfg(test)]
mod tests {
    use super::CONSUMERS;
    use crate::config::RunConfig;
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// Dotted paths of the leaves of a TOML document.
    fn leaves(v: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, x) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(x, &p, out);
                }
            }
            _ => {
                out.insert(prefix.to_string());
            }
        }
    }

    /// Every key a run file can set: the defaults, the optional keys set, every `configs/` file.
    fn settable_keys() -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        let mut c = RunConfig::default();
        c.data.preshuffle_seed = Some(42);
        c.model.tokenizer_path = Some("tok".into());
        c.model.trainable = Some(vec!["llm".into()]);
        c.rollout.gpu_memory_utilization = Some(0.5);
        c.rollout.endpoint = Some("http://127.0.0.1:8000/v1".into());
        c.rollout.served_model = Some("qoq-med".into());
        c.trainer.max_steps = Some(3);
        c.trainer.load_checkpoint_path = Some("ckpt".into());
        c.model.lora = Some(crate::config::LoraSection {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: qoq_model::lora::all_targets(),
        });
        c.trainer.early_stopping = Some(crate::early_stopping::EarlyStoppingConfig {
            metric: "val/f1".into(),
            mode: Default::default(),
            patience: 2,
            min_delta: 0.0,
        });
        let doc: toml::Value = toml::from_str(&c.to_toml_string().unwrap()).unwrap();
        leaves(&doc, "", &mut keys);
        let dir = root().join("configs");
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let doc: toml::Value = toml::from_str(&std::fs::read_to_string(&p).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                leaves(&doc, "", &mut keys);
            }
        }
        keys
    }

    fn covered(key: &str) -> bool {
        CONSUMERS.iter().any(|(k, _, _)| {
            key == *k || (key.starts_with(k) && key.as_bytes().get(k.len()) == Some(&b'.'))
        })
    }

    #[test]
    fn every_settable_key_has_a_consumer() {
        let keys = settable_keys();
        assert!(keys.len() > 100, "{} keys", keys.len());
        assert!(keys.contains("rollout.kv_cache_mib") && keys.contains("trainer.max_steps"));
        let missing: Vec<&String> = keys.iter().filter(|k| !covered(k)).collect();
        assert!(
            missing.is_empty(),
            "run-file keys with no consumer in config::consumers::CONSUMERS (implement them or \
             refuse them, then register where): {missing:?}"
        );
        // No stale entry: every registered key (or prefix) is one a run file can set.
        for (k, _, _) in CONSUMERS {
            assert!(
                keys.iter()
                    .any(|x| x == k || x.starts_with(&format!("{k}."))),
                "{k} is registered but no run file can set it"
            );
        }
    }

    #[test]
    fn every_consumer_reads_its_key_in_code() {
        let mut bad = Vec::new();
        for (key, file, code) in CONSUMERS {
            let text = std::fs::read_to_string(root().join(file))
                .unwrap_or_else(|e| panic!("{key}: {file}: {e}"));
            // Comments removed line by line (a `//` inside a string literal is rare enough in
            // these files; a needle never spans one).
            let code_only: String = text
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            if !code_only.contains(code) {
                bad.push(format!("{key}: `{code}` is not in {file}"));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}
