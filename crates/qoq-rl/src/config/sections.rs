//! The sections of a run file: `[data]`, `[model]`, `[rollout]`, `[algorithm]`, `[actor]`,
//! `[critic]`, `[trainer]`, each with the released 7B yaml's values as its defaults (spec §11).

use crate::advantage::{Drpo, DrpoConfig, Estimator};
use crate::early_stopping::EarlyStoppingConfig;
use crate::loss::config::{KlConfig, PolicyLossConfig};
use crate::optim::AdamWConfig;
use qoq_data::manifest::ManifestConfig;
use serde::{Deserialize, Serialize};

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
    /// Shuffle the training set each epoch with `seed`; false reads every epoch in the
    /// (pre-shuffled) row order. Default true (the paper pre-shuffles with seed 42 and disables
    /// shuffling).
    pub shuffle: bool,
    /// Seed of the training sampler (`RandomSampler(generator seed=1)`). Default 1.
    pub seed: u64,
    /// Permute the training rows once with this seed before the epoch sampler (the paper:
    /// "shuffle with seed 42 beforehand", spec §11, §14 item 10). Unset by default (file
    /// order). The permutation is this program's seeded shuffle
    /// ([`qoq_data::manifest::Manifest::with_row_order`]); the paper's shuffler is not
    /// recorded, so the order is not the authors' row for row. Recorded in the checkpoints'
    /// data fingerprint: a resume with another value is refused as changed data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preshuffle_seed: Option<u64>,
    /// Largest image area in pixels after resize. Default 524,288.
    pub max_pixels: usize,
    /// Smallest image area in pixels. Default 65,536.
    pub min_pixels: usize,
    /// Reproduce the reference's width/height swap of masks of non-square images (spec §4.3,
    /// §16.2 `data.mask_wh_swap_bug`). Default true.
    pub mask_wh_swap_bug: bool,
    /// Manifest keys and reader options (`video_frames` 2 as the code; the paper says 4).
    pub manifest: ManifestConfig,
    /// The format prompt around each question (EasyR1's `data.format_prompt`): `"medical"`
    /// (default) is the reference's `medical_format.jinja` (spec §3.1), `"none"` gives the
    /// plain chat prompt (the question alone), anything else is the path of a Jinja template
    /// file in which `{{ content }}` stands for the question. The rendered template travels
    /// with the model (`qoq_processor.json`), so evaluation and serving use the same prompt.
    pub format_prompt: String,
}

/// `data.format_prompt`'s value for the reference's built-in template.
pub const FORMAT_PROMPT_MEDICAL: &str = "medical";
/// `data.format_prompt`'s value for no format prompt.
pub const FORMAT_PROMPT_NONE: &str = "none";

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
            preshuffle_seed: None,
            max_pixels: 524_288,
            min_pixels: 65_536,
            mask_wh_swap_bug: true,
            manifest: ManifestConfig::default(),
            format_prompt: FORMAT_PROMPT_MEDICAL.to_string(),
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

impl DtypeName {
    /// The tensor type.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            DtypeName::F32 => candle_core::DType::F32,
            DtypeName::Bf16 => candle_core::DType::BF16,
            DtypeName::F16 => candle_core::DType::F16,
        }
    }
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
    /// Master weights of the actor, and the dtype their gradients are summed in over
    /// micro-batches. Default f32 (FSDP mixed precision keeps fp32 weights); `bf16` with
    /// `compute_dtype = "bf16"` and `actor.strategy = "adamw_bf16"` is the reference's bf16
    /// yaml.
    pub master_dtype: DtypeName,
    /// Compute dtype of the actor forward (training and rollouts) and of the frozen KL
    /// reference model. Equal to `master_dtype`, or `bf16` over f32 masters: mixed precision as
    /// FSDP's `MixedPrecision(param_dtype=bf16)`: the f32 master weights are cast to bf16 copies
    /// for the forward after every optimiser step, the gradients flow back through the casts and
    /// accumulate in f32, and the optimiser updates the f32 masters (which checkpoints save); the
    /// loss, log-softmax and KL are computed in f32. The reference model is held in bf16. The
    /// value model (`estimator = "gae"`) computes in `master_dtype`. Default f32 (the reference
    /// yaml computes in bf16).
    pub compute_dtype: DtypeName,
    /// Freeze the vision tower. Default false (all parameters train).
    pub freeze_vision_tower: bool,
    /// Freeze the language model. Default false.
    pub freeze_llm: bool,
    /// Freeze the ECG encoder and projector. Default false.
    pub freeze_time_series_encoder: bool,
    /// Activation checkpointing: the update's forward keeps only the input of each decoder
    /// layer and vision block and the backward recomputes them ([`qoq_model::checkpoint`]).
    /// Default false (the reference yaml sets true).
    pub gradient_checkpointing: bool,
    /// The parameter groups the optimiser updates ([`crate::trainable`]: `vision`, `merger`,
    /// `ecg`, `llm`); unset trains every group the `freeze_*` switches leave. The paper's
    /// Stage 1 trains `["merger", "ecg"]`. Not combined with the `freeze_*` switches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trainable: Option<Vec<String>>,
    /// Where the actor, the reference, the critic and the rollout engine run: `cpu`, `cuda`
    /// (= `cuda:0`) or `cuda:N` ([`qoq_model::DeviceSpec`]); `qoq train --device` overrides it.
    /// A CUDA device needs a build with the `cuda` feature (refused at load otherwise). The
    /// resolved config saved with checkpoints records the device the run used (`cuda:N`).
    /// Default `cpu`.
    pub device: String,
    /// `[model.lora]`: train LoRA adapters on the decoder's projections instead of the weights
    /// (every base weight frozen, whatever the `freeze_*` switches say; `trainable` is refused
    /// with it). Unset by default (full training).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
}

/// `[model.lora]`: LoRA adapters (Hu et al. 2021; PEFT `LoraConfig`) on the Qwen2 decoder's
/// projections. Only the adapters train (they alone get optimiser state); checkpoints hold
/// them in PEFT's layout beside the merged weights, and `qoq train` exports both at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Adapter rank r (PEFT `r`). Required, at least 1.
    pub rank: usize,
    /// Scaling numerator: the update is `alpha / rank · B A` (PEFT `lora_alpha`). Required.
    pub alpha: f64,
    /// Dropout on the adapter's input (PEFT `lora_dropout`). Only 0 is implemented: any other
    /// value is refused at load. Default 0.
    #[serde(default)]
    pub dropout: f64,
    /// Leaf names of the decoder projections that get adapters, among `q_proj`, `k_proj`,
    /// `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj` (PEFT `target_modules`). Default
    /// all seven.
    #[serde(default = "qoq_model::lora::all_targets")]
    pub target_modules: Vec<String>,
}

impl LoraSection {
    /// The model crate's adapter config.
    pub fn lora_config(&self) -> qoq_model::lora::LoraConfig {
        qoq_model::lora::LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets: self.target_modules.clone(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            model_path: "Qwen/Qwen2.5-VL-7B-Instruct".into(),
            tokenizer_path: None,
            master_dtype: DtypeName::F32,
            compute_dtype: DtypeName::F32,
            freeze_vision_tower: false,
            freeze_llm: false,
            freeze_time_series_encoder: false,
            gradient_checkpointing: false,
            trainable: None,
            device: "cpu".into(),
            lora: None,
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
    /// Images per prompt at most (video frames and volume slices count as images); a row with
    /// more is an error naming it (skipped with `data.manifest.skip_bad_rows`). Default 4.
    pub limit_images: usize,
    /// Prompt tokens per prefill forward of the rollout engine at most (prompts are prefilled in
    /// pieces; same tokens as whole prefills). Default 8192.
    pub max_num_batched_tokens: usize,
    /// Key/value cache memory of the rollout batch at most, in MiB (0: unbounded). Rows wait
    /// for memory, never fail: a group whose rows do not fit at once runs in parts, with the
    /// same tokens. The CPU's setting; on a GPU `gpu_memory_utilization` may size it instead.
    /// Default 0.
    pub kv_cache_mib: u64,
    /// Fraction of the GPU's memory the process may use when the rollout starts (vLLM's
    /// setting): the key/value budget is what remains of it after what is already allocated
    /// (weights, optimiser state). CUDA devices only. Default unset (reference yaml: 0.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_utilization: Option<f64>,
    /// Tensor-parallel ranks. Only 1 (one engine in this process) is implemented: more is
    /// refused at load. Default 1 (bf16 yaml: 4).
    pub tensor_parallel_size: usize,
    /// Validation sampling.
    pub val_override: ValOverride,
    /// Where rollouts are sampled: `"engine"` (this process, [`qoq_engine`]) or `"openai"` (an
    /// OpenAI-compatible server at `endpoint`: `qoq serve`, vLLM; the trainer syncs its weights
    /// to it after every update). Default `"engine"`.
    pub backend: RolloutBackend,
    /// The server's base URL with `backend = "openai"`, e.g. `http://127.0.0.1:8000/v1`
    /// (`http://` only). Refused without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The model name requests carry with `backend = "openai"` (the server's
    /// `--served-model-name`; default: the first id of its `/v1/models`). LoRA runs send the
    /// adapter's name instead once it is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    /// Seconds one request to the server may take (`backend = "openai"`). Default 600.
    pub request_timeout_s: u64,
}

/// `rollout.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutBackend {
    /// The in-process engine.
    #[default]
    Engine,
    /// An OpenAI-compatible server at `rollout.endpoint`.
    Openai,
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
            kv_cache_mib: 0,
            gpu_memory_utilization: None,
            tensor_parallel_size: 1,
            val_override: ValOverride::default(),
            backend: RolloutBackend::Engine,
            endpoint: None,
            served_model: None,
            request_timeout_s: 600,
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
    /// Rollouts of one prompt in a micro-batch (of the update, the old and reference
    /// log-probs, the critic) are one row: the prompt once, then each response, each seeing the
    /// prompt and itself only, at the positions it has after the prompt alone. The same values up
    /// to rounding, with the prompt's tokens, image and ECG computed once per micro-batch instead
    /// of once per rollout; a micro-batch whose packed rows would cost more (many long responses
    /// after a short prompt: `qoq_model::batch::packing_pays`) stays one rollout per row.
    /// Default true; false computes each rollout as its own row, as verl does (the last bits of
    /// the log-probs, and so a run's trajectory, differ between the two).
    pub pack_rollouts: bool,
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
            pack_rollouts: true,
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
    /// Devices per node. Default 8. With `nnodes`, the number of data-parallel ranks
    /// ([`Self::world_size`]): an `mpirun -np N` launch must have exactly that many
    /// ([`crate::dist`]); one process without mpirun runs the whole step, and the product then
    /// only enters the batch-size checks (per-device micro-batches).
    pub n_gpus_per_node: usize,
    /// Nodes. Default 1.
    pub nnodes: usize,
    /// Run directory: `metrics.jsonl`, TensorBoard events, checkpoints. Default
    /// `runs/qoq_med_7b`.
    pub out_dir: String,
    /// `qoq train --config` on an `out_dir` holding checkpoints continues that run from its
    /// newest complete checkpoint, with the run file's current values applied as overrides
    /// (those a resume may not change are refused by name). When false, such an `out_dir` is
    /// refused (a new run would overwrite it). Default true.
    pub find_last_checkpoint: bool,
    /// Continue from this checkpoint of `out_dir` (or the newest in this run folder) instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_checkpoint_path: Option<String>,
    /// Write TensorBoard event files under `out_dir/tensorboard`. Default true.
    pub tensorboard: bool,
    /// Validate once before the first step (logged as step 0; EasyR1 `val_before_train`).
    /// Default true.
    pub val_before_train: bool,
    /// Supervised fine-tuning on the manifest's answers (the trainer's SFT steps) instead of RL
    /// steps (`qoq train --sft` sets it). A resumed run keeps its checkpoint's mode. Default
    /// false.
    pub sft: bool,
    /// Stop when a validation metric stops improving ([`crate::early_stopping`]; the paper:
    /// one epoch with early stopping). Unset by default (the released code has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingConfig>,
    /// How the ranks' gradients are summed ([`crate::dist::GradientPath`]): `auto` (NCCL on
    /// GPUs with several ranks in a build with the `nccl` feature, else host memory), `host`
    /// (MPI from host memory) or `nccl` (always NCCL, also with one rank; needs a CUDA
    /// `model.device` and the feature). Default `auto`.
    pub all_reduce: AllReduce,
}

/// `trainer.all_reduce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllReduce {
    /// NCCL where it applies, else host memory.
    #[default]
    Auto,
    /// Host memory, over the launch's collective (MPI).
    Host,
    /// NCCL, between GPUs.
    Nccl,
}

impl AllReduce {
    /// Why `nccl` cannot run here (a build without the `nccl` feature, or a device that is not
    /// a GPU); `None` when it can.
    pub fn nccl_refusal(device_is_cuda: bool) -> Option<&'static str> {
        if !cfg!(feature = "nccl") {
            Some(
                "\"nccl\": this qoq was built without the `nccl` feature: build it with \
                 `scripts/build-cuda.sh --features nccl` (or use \"auto\" or \"host\")",
            )
        } else if !device_is_cuda {
            Some(
                "\"nccl\" sums GPU memory and needs a CUDA model.device (cuda or cuda:N); on \
                 the CPU use \"auto\" or \"host\"",
            )
        } else {
            None
        }
    }
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
            sft: false,
            early_stopping: None,
            all_reduce: AllReduce::Auto,
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
