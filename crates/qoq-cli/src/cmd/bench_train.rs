//! `qoq bench train-step`: the trainer's own RL step ([`Trainer::step`]) split by phase,
//! against the same update in PyTorch.
//!
//! The run is an ordinary `qoq train` run (its run file is [`run_config`]): GRPO with the k3 KL
//! to the frozen initial weights in the loss, `--prompts` image rows drawn in order (one step is
//! one pass over them), `--n` rollouts each at temperature 1 and top-p 1 with EOS ignored (every
//! response has exactly `--response-len` tokens), one AdamW step per step. The reward alternates
//! 0 and 1 by rollout position ([`AlternatingReward`]), so that every group has mixed rewards and
//! the advantages are never all zero. The phases are the trainer's own step metrics ([`trainer_step`]):
//!
//! * `process`: drawing the rows, the processor (images, template, tokenizer) and the
//!   generation requests (`timing_s/process`);
//! * `generate`: the rollouts with [`qoq_engine::generate`] (`timing_s/gen`);
//! * `ref_logprobs`: the frozen reference's forward, which the trainer runs per micro-batch
//!   inside the update (`timing_s/ref`);
//! * `update`: the rest of the update (`timing_s/update_actor` minus `ref_logprobs`): per
//!   micro-batch the collation, the Train-mode forward, the actor loss and backward; then one
//!   AdamW step with global-norm clipping (`timing_s/optimizer`, reported besides);
//! * `total`: the trainer's step (`perf/time_per_step`, reward and advantages included).
//!
//! Peak resident memory per phase comes from the trainer too ([`Trainer::set_phase_memory`]).
//!
//! The exact update batch ([`Trainer::set_capture`]: micro-batch tensors, old and reference
//! log-probs, advantages) is written to `batch.safetensors` next to a `batch.json` holding the
//! settings (model folder, micro-batch size, optimiser, clip ratios, KL) and this side's losses
//! and gradient norms; then `tools/bench/train_step_ref.py --batch batch.json` runs the same
//! step with transformers' `Qwen2_5_VLForConditionalGeneration` on the same safetensors, and the
//! two sides' losses and gradient norms on the identical batch are compared.

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use qoq_data::manifest::{Manifest, ManifestConfig};
use qoq_model::ModelInputs;
use qoq_model::train::write_random_checkpoint_seeded;
use qoq_rl::config::RunConfig;
use qoq_rl::trainer::{
    PEAK_MIB_PREFIX, TIMING_GEN, TIMING_OPTIMIZER, TIMING_PROCESS, TIMING_REF, TIMING_UPDATE,
    Trainer,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The phases, in order.
pub const PHASES: [&str; 5] = ["process", "generate", "ref_logprobs", "update", "total"];
/// The part of `update` spent in the optimiser (gradient norm, clipping, AdamW), reported
/// besides the phases.
pub const UPDATE_OPTIMIZER: &str = "update_optimizer";

/// Model size of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchSize {
    /// The processor fixture's tiny Qwen2.5-VL (hidden 64, 2 layers), without the ECG path.
    Tiny,
    /// Qwen2.5-0.5B text dimensions with a 2-layer vision tower of the 7B's width.
    #[value(name = "0.5b")]
    HalfB,
}

/// Dtype of `qoq bench train-step --compute-dtype` and `--master-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDtype {
    /// f32.
    F32,
    /// bf16.
    Bf16,
}

/// Optimiser of `qoq bench train-step --strategy` (`actor.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchStrategy {
    /// AdamW with moments in the master weights' dtype.
    Adamw,
    /// bf16 moments and a bf16 Kahan compensation buffer (`AnyPrecisionAdamW`).
    #[value(name = "adamw_bf16")]
    AdamwBf16,
}

impl BenchStrategy {
    fn name(self) -> &'static str {
        match self {
            BenchStrategy::Adamw => "adamw",
            BenchStrategy::AdamwBf16 => "adamw_bf16",
        }
    }
}

impl BenchDtype {
    fn name(self) -> &'static str {
        match self {
            BenchDtype::F32 => "f32",
            BenchDtype::Bf16 => "bf16",
        }
    }
}

impl TrainStepArgs {
    /// The model's name in the report: the `--size` or the `--model` folder.
    fn size_label(&self) -> String {
        match &self.model {
            Some(m) => m.display().to_string(),
            None => size_name(self.size).to_string(),
        }
    }

    /// Why the PyTorch reference cannot check this run (it runs the f32 full-training update).
    fn reference_unfit(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.compute_dtype != BenchDtype::F32 {
            why.push("--compute-dtype bf16");
        }
        if self.master_dtype != BenchDtype::F32 {
            why.push("--master-dtype bf16");
        }
        if self.strategy != BenchStrategy::Adamw {
            why.push("--strategy adamw_bf16");
        }
        if self.lora_rank.is_some() {
            why.push("--lora-rank");
        }
        (!why.is_empty()).then(|| {
            format!(
                "{}: the reference script runs the f32 full-training update only",
                why.join(" and ")
            )
        })
    }

    /// The settings line: dtypes, optimiser, LoRA.
    fn precision_label(&self) -> String {
        let mut s = match (self.master_dtype, self.compute_dtype) {
            (BenchDtype::F32, BenchDtype::F32) => "f32".to_string(),
            (BenchDtype::F32, BenchDtype::Bf16) => "bf16 compute over f32 masters".to_string(),
            (BenchDtype::Bf16, BenchDtype::Bf16) => "bf16 masters and compute".to_string(),
            (m, c) => format!("{} compute over {} masters", c.name(), m.name()),
        };
        if self.strategy == BenchStrategy::AdamwBf16 {
            s.push_str(", adamw_bf16 (bf16 moments, Kahan)");
        }
        if let Some(r) = self.lora_rank {
            s.push_str(&format!(", LoRA r={r}"));
        }
        s
    }
}

#[derive(Debug, Args)]
pub struct TrainStepArgs {
    /// Model size.
    #[arg(long, value_enum, default_value = "tiny")]
    pub size: BenchSize,
    /// Prompts per step (the image rows of the manifest, repeated).
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// Rollouts per prompt.
    #[arg(long, default_value_t = 4)]
    pub n: usize,
    /// Tokens per response (EOS is ignored).
    #[arg(long, default_value_t = 32)]
    pub response_len: usize,
    /// Steps to run; with more than one, the first is a warm-up and the median of the others is
    /// reported.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Rollouts per micro-batch of the update (`actor.micro_batch_size_per_device_for_update`).
    #[arg(long, default_value_t = 2)]
    pub micro_batch: usize,
    /// Manifest whose image rows are the prompts (rows with videos or ECGs are skipped).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Python interpreter of the PyTorch reference.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Where the PyTorch reference runs (torch's device name: `cpu`, `cuda`, `cuda:N`).
    #[arg(long, default_value = "cpu")]
    pub reference_device: String,
    /// Train this model folder (HF layout: config.json, weights, tokenizer.json,
    /// preprocessor_config.json; a stock Qwen2.5-VL) instead of building a `--size` one, e.g. the
    /// 7B-shaped checkpoint scripts/gpu-check.sh writes. Its weights are loaded as they are.
    #[arg(long, conflicts_with = "size")]
    pub model: Option<PathBuf>,
    /// Skip the PyTorch reference.
    #[arg(long)]
    pub no_reference: bool,
    /// Activation checkpointing in the qoq side's update (`model.gradient_checkpointing`):
    /// compare the update's peak memory with and without it (the reference runs without).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Compute each rollout of the qoq side as its own row (`actor.pack_rollouts = false`, as
    /// the PyTorch reference does) instead of packing the rollouts of a prompt in a
    /// micro-batch after one copy of it.
    #[arg(long)]
    pub no_pack: bool,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Compute dtype of the qoq side (`model.compute_dtype`): `bf16` computes the forward on bf16
    /// copies of the f32 master weights, with a bf16 reference model (mixed precision). The
    /// PyTorch reference runs the f32 update only, so it is skipped with `bf16`.
    #[arg(long, value_enum, default_value = "f32")]
    pub compute_dtype: BenchDtype,
    /// Dtype of the qoq side's trained weights and gradients (`model.master_dtype`): `bf16`
    /// needs `--compute-dtype bf16` (the run file's validation refuses the other pairing), and
    /// goes with `--strategy adamw_bf16`, the reference recipe's bf16 configuration. The PyTorch
    /// reference is then skipped.
    #[arg(long, value_enum, default_value = "f32")]
    pub master_dtype: BenchDtype,
    /// Optimiser of the qoq side (`actor.strategy`): `adamw_bf16` keeps bf16 moments and a bf16
    /// Kahan compensation buffer. The PyTorch reference is then skipped.
    #[arg(long, value_enum, default_value = "adamw")]
    pub strategy: BenchStrategy,
    /// Train LoRA adapters of this rank (alpha = 2·rank, on every decoder projection) instead of
    /// every weight (`[model.lora]`). The PyTorch reference (full training) is then skipped.
    #[arg(long, value_name = "RANK")]
    pub lora_rank: Option<usize>,
    /// How the update's gradients are summed over the ranks (`trainer.all_reduce`): `nccl`
    /// sends them through NCCL on the GPU even in this one-process step (a sum over one rank:
    /// the step, and its agreement with the reference, must not change), the check that the
    /// NCCL path works (`scripts/gpu-check.sh`); it needs a CUDA `--device` and a build with
    /// the `nccl` feature, and is refused otherwise.
    #[arg(long, default_value = "auto", value_parser = ["auto", "host", "nccl"])]
    pub all_reduce: String,
    /// Where the qoq side runs (the run file's `model.device`; the PyTorch reference runs on
    /// its script's own device).
    #[command(flatten)]
    pub device: crate::cmd::DeviceArgs,
    /// Internal: run the qoq side only, writing the model, the batch and `qoq.json` into this
    /// folder (the command runs itself so with this, so that the reference does not share the
    /// machine's memory with a finished process's heap).
    #[arg(long, hide = true)]
    pub worker: Option<PathBuf>,
}

/// The repository the benchmark reads its fixtures and reference script from: `QOQ_REPO` if set,
/// else the current folder or the nearest folder above it holding
/// `tools/bench/train_step_ref.py`, else the source tree this binary was built from. (A binary
/// built on one machine runs from a copy of the repository elsewhere: scripts/gpu-check.sh.)
pub(crate) fn repo_root() -> PathBuf {
    if let Some(r) = std::env::var_os("QOQ_REPO") {
        return PathBuf::from(r);
    }
    if let Ok(cwd) = std::env::current_dir()
        && let Some(r) = cwd
            .ancestors()
            .find(|d| d.join("tools/bench/train_step_ref.py").is_file())
    {
        return r.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Seconds and peak MiB of one phase.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    seconds: f64,
    peak_mib: f64,
}

/// The 0.5B-class config (crates/qoq-model/benches/prefill.rs) with the tiny tokenizer's ids.
const HALF_B_CONFIG: &str = r#"{
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    "tie_word_embeddings": true,
    "vision_config": {"depth": 2, "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "out_hidden_size": 896, "fullatt_block_indexes": [1],
                      "window_size": 112, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "tokens_per_second": 2},
    "image_token_id": 3012, "video_token_id": 3013,
    "vision_start_token_id": 3009, "vision_end_token_id": 3010, "vision_token_id": 3011,
    "bos_token_id": 3000, "eos_token_id": 3002
}"#;

/// Writes `dir/model` (config, preprocessor config, tokenizer, seeded random weights).
pub(crate) fn build_model_dir(size: BenchSize, dir: &Path) -> anyhow::Result<PathBuf> {
    let fixture = repo_root().join("crates/qoq-processor/tests/fixtures/tiny_model");
    let m = dir.join("model");
    std::fs::create_dir_all(&m).with_context(|| format!("creating {}", m.display()))?;
    let mut cfg: Value = match size {
        BenchSize::Tiny => {
            let p = fixture.join("config.json");
            serde_json::from_str(
                &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?
        }
        BenchSize::HalfB => serde_json::from_str(HALF_B_CONFIG)?,
    };
    if let Some(o) = cfg.as_object_mut() {
        // A stock Qwen2.5-VL: no ECG path, loadable by transformers' class.
        o.remove("time_series_token_id");
        o.remove("time_series_config");
        o.insert(
            "architectures".into(),
            json!(["Qwen2_5_VLForConditionalGeneration"]),
        );
    }
    let cfg_path = m.join("config.json");
    std::fs::write(&cfg_path, cfg.to_string())?;
    let parsed = qoq_core::hf_config::QwenVlConfig::from_file(&cfg_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?;
    write_random_checkpoint_seeded(&parsed, &m, 0)?;
    // The weights writer saves the parsed config; keep the HF text.
    std::fs::write(&cfg_path, cfg.to_string())?;
    for f in ["preprocessor_config.json", "tokenizer.json"] {
        std::fs::copy(fixture.join(f), m.join(f))
            .with_context(|| format!("copying {}", fixture.join(f).display()))?;
    }
    Ok(m)
}

/// Writes `dir/manifest.jsonl`: the image-only rows of `manifest` (rows with videos or ECGs
/// are skipped: the benchmark's model is a stock Qwen2.5-VL), repeated to `want` rows, their file
/// paths made absolute and their `data_source` / `dataset` written out.
fn write_manifest(manifest: &Path, want: usize, dir: &Path) -> anyhow::Result<PathBuf> {
    let m = Manifest::open(manifest, ManifestConfig::default())
        .with_context(|| format!("opening {}", manifest.display()))?;
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let base = manifest.parent().unwrap_or(Path::new("."));
    let mut rows = Vec::new();
    for r in m.rows()? {
        let s = r.with_context(|| format!("reading {}", manifest.display()))?;
        if s.images.is_empty() || !s.videos.is_empty() || !s.time_series.is_empty() {
            continue;
        }
        let line = lines
            .get(
                usize::try_from(s.line)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(1),
            )
            .with_context(|| format!("{}: no line {}", manifest.display(), s.line))?;
        let mut v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}", manifest.display(), s.line))?;
        let o = v
            .as_object_mut()
            .with_context(|| format!("{}: line {} is not an object", manifest.display(), s.line))?;
        let abs = |p: &Value| -> Value {
            match p.as_str() {
                Some(p) => json!(base.join(p).display().to_string()),
                None => p.clone(),
            }
        };
        if let Some(imgs) = o.get("images").and_then(Value::as_array) {
            let imgs: Vec<Value> = imgs.iter().map(abs).collect();
            o.insert("images".into(), json!(imgs));
        }
        if let Some(seg) = o.get("segmentation_path").map(abs) {
            o.insert("segmentation_path".into(), seg);
        }
        o.insert("data_source".into(), json!(s.data_source));
        o.insert("dataset".into(), json!(s.dataset));
        rows.push(v.to_string());
    }
    if rows.is_empty() {
        bail!(
            "{}: no row with images only (videos and ECGs are skipped)",
            manifest.display()
        );
    }
    let out = dir.join("manifest.jsonl");
    let body: Vec<&str> = (0..want).map(|i| rows[i % rows.len()].as_str()).collect();
    std::fs::write(&out, body.join("\n") + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// The benchmark's reward: by position in the step's batch, alternating 0 and 1 (the phase
/// flips each step), so that every group of two or more rollouts has mixed rewards and the
/// advantages are never all zero. It does not read the response: a random model's text carries
/// no signal, and with the 0.5B-class config most sampled ids lie beyond the tiny tokenizer's
/// vocabulary and decode to nothing, so a text-based reward gave equal rewards, zero advantages
/// and a step whose gradient is rounding noise (which AdamW then turns into a full-size update).
/// The trainer scores a step with one [`qoq_reward::RewardFn::score_batch`] call, in rollout
/// order, so the rewards are deterministic.
struct AlternatingReward {
    calls: std::sync::atomic::AtomicU64,
}

impl qoq_reward::RewardFn for AlternatingReward {
    fn name(&self) -> &str {
        "bench_alternating"
    }

    fn score(&self, _input: &qoq_reward::RewardInput<'_>) -> qoq_core::RewardScore {
        qoq_core::RewardScore {
            overall: 0.5,
            ..Default::default()
        }
    }

    fn score_batch(&self, inputs: &[qoq_reward::RewardInput<'_>]) -> Vec<qoq_core::RewardScore> {
        let phase = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..inputs.len() as u64)
            .map(|j| qoq_core::RewardScore {
                overall: ((j + phase) % 2) as f64,
                ..Default::default()
            })
            .collect()
    }
}

/// The run file of the benchmark: one step is one pass over the `prompts` rows (in order), GRPO
/// with the KL to the frozen initial weights in the loss, sampling at temperature 1 and top-p 1
/// with EOS ignored (every response has exactly `response_len` tokens), one AdamW step per step.
fn run_config(a: &TrainStepArgs, model: &Path, manifest: &Path, out: &Path) -> String {
    // A JSON string is a valid TOML basic string (same escapes).
    let q = |p: &Path| json!(p.display().to_string()).to_string();
    format!(
        r#"[data]
train_files = {m}
val_files = {m}
rollout_batch_size = {prompts}
shuffle = false
max_response_length = {len}

[model]
model_path = {model}
device = "{device}"
gradient_checkpointing = {ckpt}
compute_dtype = "{compute}"
master_dtype = "{master}"
{lora}
[rollout]
n = {n}
temperature = 1.0
top_p = 1.0
ignore_eos = true

[algorithm]
estimator = "grpo"

[algorithm.kl]
use_kl_loss = true

[actor]
strategy = "{strategy}"
pack_rollouts = {pack}
global_batch_size = {prompts}
micro_batch_size_per_device_for_update = {micro}

[trainer]
max_steps = {steps}
val_freq = 0
val_before_train = false
n_gpus_per_node = 1
save_freq = 0
out_dir = {out}
all_reduce = "{all_reduce}"
"#,
        m = q(manifest),
        model = q(model),
        out = q(out),
        prompts = a.prompts,
        len = a.response_len,
        n = a.n,
        micro = a.micro_batch,
        steps = a.steps,
        device = a.device.device,
        all_reduce = a.all_reduce,
        ckpt = a.gradient_checkpointing,
        pack = !a.no_pack,
        compute = a.compute_dtype.name(),
        master = a.master_dtype.name(),
        strategy = a.strategy.name(),
        lora = match a.lora_rank {
            Some(r) => format!("\n[model.lora]\nrank = {r}\nalpha = {}\n", 2 * r),
            None => String::new(),
        },
    )
}

/// What one step measured and produced.
struct StepOut {
    phases: BTreeMap<&'static str, Phase>,
    /// Actor loss of each micro-batch (before the division by the micro-batch count).
    losses: Vec<f64>,
    grad_norm: f64,
    /// Tokens (prompt and response, padding included) the update's forwards ran over: the
    /// summed `[rows, seq]` sizes of the micro-batches' `input_ids` (for the update's MFU).
    update_tokens: usize,
    /// The step's tensors for the reference, keyed `s{step}.m{k}.{name}`.
    tensors: HashMap<String, Tensor>,
    /// Prompt length `s` of each micro-batch.
    prompt_lens: Vec<usize>,
    /// Rendered prompt text of each prompt (for the reference's processor).
    prompts: Vec<(String, Vec<String>)>,
    /// Per-prompt model inputs (generation requests).
    requests: Vec<ModelInputs>,
}

fn i64_tensor(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::I64)
}

/// One step of the trainer, read back as the benchmark's phases: `process` (draw, processor,
/// requests), `generate`, `ref_logprobs` (the frozen reference's forward, which the trainer runs
/// per micro-batch inside the update: its peak memory is the update's), `update` (the rest of
/// the update: Train-mode forward, loss, backward, AdamW), `update_optimizer` (of it, AdamW) and
/// `total` (the trainer's whole step, reward and advantages included).
fn trainer_step(trainer: &mut Trainer, step: usize) -> anyhow::Result<StepOut> {
    let out = trainer
        .step()
        .with_context(|| format!("step {}", step + 1))?;
    let m = &out.metrics;
    let get = |k: &str| -> anyhow::Result<f64> {
        m.get(k)
            .copied()
            .with_context(|| format!("step {}: the trainer logged no `{k}`", step + 1))
    };
    let peak = |p: &str| {
        m.get(&format!("{PEAK_MIB_PREFIX}{p}"))
            .copied()
            .unwrap_or(0.0)
    };
    let ref_s = get(TIMING_REF)?;
    let mut phases = BTreeMap::new();
    let ph = |seconds: f64, peak_mib: f64| Phase { seconds, peak_mib };
    phases.insert("process", ph(get(TIMING_PROCESS)?, peak("process")));
    phases.insert("generate", ph(get(TIMING_GEN)?, peak("gen")));
    phases.insert("ref_logprobs", ph(ref_s, peak("update")));
    phases.insert("update", ph(get(TIMING_UPDATE)? - ref_s, peak("update")));
    phases.insert(UPDATE_OPTIMIZER, ph(get(TIMING_OPTIMIZER)?, peak("update")));
    let total_peak = ["process", "gen", "update"]
        .map(peak)
        .into_iter()
        .fold(0.0, f64::max);
    phases.insert(
        "total",
        ph(get(qoq_rl::metrics_log::names::TIME_PER_STEP)?, total_peak),
    );
    let grad_norm = get(qoq_rl::metrics_log::names::GRAD_NORM)?;
    let cap = trainer
        .take_captured()
        .context("the trainer captured no update batch")?;

    let mut tensors = HashMap::new();
    let mut prompt_lens = Vec::new();
    let mut losses = Vec::new();
    let mut update_tokens = 0;
    for (k, mb) in cap.micro_batches.iter().enumerate() {
        let key = |n: &str| format!("s{step}.m{k}.{n}");
        update_tokens += mb.inputs.input_ids.elem_count();
        tensors.insert(key("input_ids"), i64_tensor(&mb.inputs.input_ids)?);
        if let Some(a) = &mb.inputs.attention_mask {
            tensors.insert(key("attention_mask"), i64_tensor(a)?);
        }
        tensors.insert(key("position_ids"), i64_tensor(&mb.inputs.position_ids)?);
        if let Some(pv) = &mb.inputs.pixel_values {
            tensors.insert(key("pixel_values"), pv.clone());
            tensors.insert(
                key("image_grid_thw"),
                grid_tensor(&mb.inputs.image_grid_thw)?,
            );
        }
        tensors.insert(key("labels"), i64_tensor(&mb.labels)?);
        tensors.insert(key("old_log_probs"), mb.old_log_probs.clone());
        tensors.insert(key("advantages"), mb.advantages.clone());
        tensors.insert(key("response_mask"), mb.mask.clone());
        let ref_lp = mb
            .ref_log_probs
            .as_ref()
            .context("the update ran without the reference log-probs")?;
        tensors.insert(key("ref_log_probs"), ref_lp.clone());
        prompt_lens.push(mb.s);
        losses.push(mb.pg_loss);
    }
    let prompts = cap
        .prompts
        .iter()
        .map(|p| {
            (
                p.prompt.clone(),
                p.images.iter().map(|i| i.display().to_string()).collect(),
            )
        })
        .collect();
    Ok(StepOut {
        phases,
        losses,
        grad_norm,
        update_tokens,
        tensors,
        prompt_lens,
        prompts,
        requests: cap.prompts.into_iter().map(|p| p.inputs).collect(),
    })
}

/// The grid rows as an i64 tensor for the batch file (host memory: written out, never computed
/// with).
fn grid_tensor(grid: &[[usize; 3]]) -> candle_core::Result<Tensor> {
    let v: Vec<i64> = grid.iter().flatten().map(|&x| x as i64).collect();
    Tensor::from_vec(v, (grid.len(), 3), &Device::Cpu)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) {
        0.5 * (v[m - 1] + v[m])
    } else {
        v[m]
    }
}

/// Per phase: median seconds and largest peak over the reported steps.
fn summarise(steps: &[BTreeMap<&'static str, Phase>]) -> BTreeMap<&'static str, Phase> {
    let reported = if steps.len() > 1 { &steps[1..] } else { steps };
    PHASES
        .iter()
        .chain(&[UPDATE_OPTIMIZER])
        .map(|&p| {
            let secs = median(reported.iter().map(|s| s[p].seconds).collect());
            let peak = reported.iter().map(|s| s[p].peak_mib).fold(0.0, f64::max);
            (
                p,
                Phase {
                    seconds: secs,
                    peak_mib: peak,
                },
            )
        })
        .collect()
}

/// Why the reference cannot run, or `None` when python with torch + transformers is there.
fn reference_missing(python: &str) -> Option<String> {
    match Command::new(python)
        .args(["-c", "import torch, transformers, safetensors"])
        .output()
    {
        Err(e) => Some(format!("{python} cannot be started: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "{python} lacks torch/transformers/safetensors: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Ok(_) => None,
    }
}

/// The qoq side: builds the model in `dir`, runs the steps, writes `batch.json`,
/// `batch.safetensors` and `qoq.json` there.
fn worker(a: &TrainStepArgs, dir: &Path) -> anyhow::Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let model_dir = match &a.model {
        Some(m) => m.clone(),
        None => build_model_dir(a.size, dir)?,
    };
    let manifest = a
        .manifest
        .clone()
        .unwrap_or_else(|| repo_root().join("examples/mini/manifest.jsonl"));
    let manifest = write_manifest(&manifest, a.prompts, dir)?;
    let toml_text = run_config(a, &model_dir, &manifest, &dir.join("run"));
    let run = RunConfig::from_toml_str(&toml_text, "the benchmark's run file")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let loss_cfg = run.loss_config();
    let optim = run.actor.optim.clone();
    let opts = run.processor_options()?;
    let placeholder_bias = run.rollout.image_pad_logit_bias;
    let plan_cfg = run.clone();
    let mut trainer = Trainer::with_reward(
        run,
        Box::new(AlternatingReward {
            calls: Default::default(),
        }),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    trainer.set_phase_memory(true);
    trainer.set_capture(true);
    let size = a.size_label();
    eprintln!(
        "train-step: {size} model, {} prompts x {} rollouts x {} tokens, micro-batch {}, {} step(s), {}, {threads} thread(s), gradient checkpointing {}, rollouts {}",
        a.prompts,
        a.n,
        a.response_len,
        a.micro_batch,
        a.steps,
        a.precision_label(),
        if a.gradient_checkpointing {
            "on"
        } else {
            "off"
        },
        if a.no_pack {
            "one per row"
        } else {
            "of a prompt packed in a row"
        }
    );
    let mut outs = Vec::with_capacity(a.steps);
    for step in 0..a.steps {
        let o = trainer_step(&mut trainer, step)?;
        eprintln!(
            "step {}: {:.3} s, loss per micro-batch {:?}, grad norm {:.6}",
            step + 1,
            o.phases["total"].seconds,
            o.losses,
            o.grad_norm
        );
        outs.push(o);
    }
    let pad_id = trainer.processor().tokenizer.ids.endoftext;
    // Free the models before the reference runs, so that its memory is not shared with ours.
    drop(trainer);

    // `qoq train --dry-run`'s estimate for this run, with the step's own prompt lengths and
    // images, beside the measured peak.
    let model_cfg = qoq_core::hf_config::QwenVlConfig::from_file(&model_dir.join("config.json"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", model_dir.display()))?;
    let longest = outs[0].prompt_lens.iter().copied().max().unwrap_or(0);
    let patches: Vec<usize> = outs[0]
        .requests
        .iter()
        .map(|r| {
            r.image_grid_thw
                .iter()
                .map(|g| g[0] * g[1] * g[2])
                .collect::<Vec<_>>()
        })
        .max_by_key(|p| p.iter().sum::<usize>())
        .unwrap_or_default();
    let plan = qoq_rl::memory::MemoryPlan::estimate(&plan_cfg, &model_cfg, longest, &patches)
        .map_err(|e| anyhow::anyhow!(e))?;
    let qoq = json!({
        "estimate": {
            "peak_mib": plan.peak() as f64 / (1u64 << 20) as f64,
            "table": plan.table(),
        },
        "threads": threads,
        // Layers and blocks the update's backward recomputed (0 without checkpointing).
        "recomputed_segments": qoq_model::checkpoint::recomputed(),
        "packed_micro_batches": qoq_model::batch::packed_batches(),
        "phases": phase_json(&summarise(&outs.iter().map(|o| o.phases.clone()).collect::<Vec<_>>())),
        "steps": outs.iter().map(|o| json!({
            "phases": phase_json(&o.phases), "losses": o.losses, "grad_norm": o.grad_norm,
            "update_tokens": o.update_tokens,
        })).collect::<Vec<_>>(),
    });
    let qoq_path = dir.join("qoq.json");
    std::fs::write(&qoq_path, serde_json::to_string_pretty(&qoq)?)
        .with_context(|| format!("writing {}", qoq_path.display()))?;

    // The batch for the reference.
    let batch_json = dir.join("batch.json");
    let batch_st = dir.join("batch.safetensors");
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, r) in outs[0].requests.iter().enumerate() {
        tensors.insert(format!("p{i}.input_ids"), i64_tensor(&r.input_ids)?);
        tensors.insert(format!("p{i}.position_ids"), i64_tensor(&r.position_ids)?);
        if let Some(pv) = &r.pixel_values {
            tensors.insert(format!("p{i}.pixel_values"), pv.clone());
            tensors.insert(
                format!("p{i}.image_grid_thw"),
                grid_tensor(&r.image_grid_thw)?,
            );
        }
    }
    let mut steps_meta = Vec::new();
    for o in &mut outs {
        tensors.extend(o.tensors.drain());
        steps_meta.push(json!({
            "prompt_lens": o.prompt_lens,
            "qoq_losses": o.losses,
            "qoq_grad_norm": o.grad_norm,
        }));
    }
    candle_core::safetensors::save(&tensors, &batch_st)
        .with_context(|| format!("writing {}", batch_st.display()))?;
    drop(tensors);
    let pol = &loss_cfg.policy;
    let meta = json!({
        "model_dir": model_dir,
        "tensors": batch_st,
        "threads": threads,
        "steps": steps_meta,
        "prompts": outs[0].prompts.iter().map(|(p, imgs)| json!({"prompt": p, "images": imgs})).collect::<Vec<_>>(),
        "dataset_min_pixels": opts.dataset_min_pixels,
        "dataset_max_pixels": opts.dataset_max_pixels,
        "n": a.n,
        "response_len": a.response_len,
        "micro_batch": a.micro_batch,
        "pad_token_id": pad_id,
        "placeholder_bias": placeholder_bias,
        "optim": {
            "lr": optim.lr, "beta1": optim.beta1, "beta2": optim.beta2, "eps": optim.eps,
            "weight_decay": optim.weight_decay, "max_grad_norm": optim.max_grad_norm,
        },
        "loss": {
            "clip_ratio_low": pol.clip_ratio_low,
            "clip_ratio_high": pol.clip_ratio_high,
            "clip_ratio_dual": pol.clip_ratio_dual,
            "loss_agg_mode": pol.loss_agg_mode.as_str(),
            "kl_in_loss": loss_cfg.kl.kl_in_loss(),
            "kl_penalty": loss_cfg.kl.kl_penalty.as_str(),
            "kl_coef": loss_cfg.kl.kl_coef,
        },
    });
    std::fs::write(&batch_json, serde_json::to_string_pretty(&meta)?)
        .with_context(|| format!("writing {}", batch_json.display()))?;
    if pol.loss_agg_mode.as_str() != "token-mean" || loss_cfg.kl.kl_penalty.as_str() != "low_var_kl"
    {
        bail!("the reference script implements token-mean and low_var_kl only");
    }
    Ok(())
}

fn size_name(s: BenchSize) -> &'static str {
    match s {
        BenchSize::Tiny => "tiny",
        BenchSize::HalfB => "0.5b",
    }
}

fn phase_json(m: &BTreeMap<&'static str, Phase>) -> Value {
    m.iter()
        .map(|(k, p)| {
            (
                (*k).to_string(),
                json!({"seconds": p.seconds, "peak_mib": p.peak_mib}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub fn train_step(a: TrainStepArgs) -> anyhow::Result<ExitCode> {
    if a.prompts == 0 || a.n == 0 || a.response_len == 0 || a.steps == 0 || a.micro_batch == 0 {
        bail!("--prompts, --n, --response-len, --steps and --micro-batch must be at least 1");
    }
    if let Some(dir) = &a.worker {
        worker(&a, dir)?;
        return Ok(ExitCode::SUCCESS);
    }
    // The qoq side runs in a child process: its memory is returned before the reference starts.
    let dir = tempfile::tempdir().context("creating a temporary folder")?;
    let exe = std::env::current_exe().context("locating the qoq binary")?;
    let status = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .arg("--worker")
        .arg(dir.path())
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    if !status.success() {
        bail!("the qoq side of the benchmark failed ({status})");
    }
    let read_json = |p: PathBuf| -> anyhow::Result<Value> {
        serde_json::from_str(
            &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))
    };
    let qoq = read_json(dir.path().join("qoq.json"))?;
    let batch_json = dir.path().join("batch.json");
    let threads = qoq["threads"].as_u64().unwrap_or(0);
    let size = a.size_label();
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let losses_of = |v: &Value| -> Vec<f64> {
        v.as_array()
            .map(|a| a.iter().map(num).collect())
            .unwrap_or_default()
    };
    let qoq_steps: Vec<(Vec<f64>, f64)> = qoq["steps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| (losses_of(&s["losses"]), num(&s["grad_norm"])))
                .collect()
        })
        .unwrap_or_default();

    // The reference.
    let script = repo_root().join("tools/bench/train_step_ref.py");
    let (torch, absent): (Option<Value>, Option<String>) = if a.no_reference {
        (None, Some("--no-reference".into()))
    } else if let Some(why) = a.reference_unfit() {
        (None, Some(why))
    } else if let Some(why) = reference_missing(&a.python) {
        (None, Some(why))
    } else {
        eprintln!("running the PyTorch reference: {}", script.display());
        let out = Command::new(&a.python)
            .arg(&script)
            .arg("--batch")
            .arg(&batch_json)
            .arg("--device")
            .arg(&a.reference_device)
            .output()
            .with_context(|| format!("running {} {}", a.python, script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.trim().lines().last().unwrap_or("");
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: output is not JSON: {line}", script.display()))?;
        (Some(v), None)
    };

    // Report.
    println!(
        "train-step, {size} model: {} prompts x {} rollouts x {} response tokens, micro-batch {}, \
         {} on {}, {threads} thread(s) both sides{}; {}",
        a.prompts,
        a.n,
        a.response_len,
        a.micro_batch,
        a.precision_label(),
        a.device.device,
        if a.gradient_checkpointing {
            ", gradient checkpointing on the qoq side"
        } else {
            ""
        },
        match a.steps {
            1 => "one step, no warm-up".to_string(),
            2 => "step 1 is a warm-up, step 2 reported".to_string(),
            k => format!("step 1 is a warm-up, median of steps 2..{k}"),
        }
    );
    println!(
        "{:<14}{:>10}{:>10}{:>18}{:>14}{:>16}",
        "phase", "qoq s", "torch s", "ratio torch/qoq", "qoq peak MiB", "torch peak MiB"
    );
    let torch_phase = |p: &str, k: &str| -> Option<f64> {
        torch
            .as_ref()
            .and_then(|t| t["phases"][p][k].as_f64())
            .filter(|x| x.is_finite())
    };
    let cell = |x: Option<f64>, prec: usize| match x {
        Some(v) => format!("{v:.prec$}"),
        None => "-".into(),
    };
    for p in [
        "process",
        "generate",
        "ref_logprobs",
        "update",
        UPDATE_OPTIMIZER,
        "total",
    ] {
        let (qs, qm) = (
            num(&qoq["phases"][p]["seconds"]),
            num(&qoq["phases"][p]["peak_mib"]),
        );
        let ts = torch_phase(p, "seconds");
        let tm = torch_phase(p, "peak_mib");
        println!(
            "{:<14}{:>10.3}{:>10}{:>18}{:>14.0}{:>16}",
            if p == UPDATE_OPTIMIZER {
                "  of it AdamW"
            } else {
                p
            },
            qs,
            cell(ts, 3),
            cell(ts.map(|t| t / qs), 2),
            qm,
            cell(tm, 0)
        );
    }
    let est = num(&qoq["estimate"]["peak_mib"]);
    let measured = num(&qoq["phases"]["total"]["peak_mib"]);
    println!(
        "memory estimate (as `qoq train --dry-run` computes it, for this step's prompts): \
         {est:.0} MiB, measured peak {measured:.0} MiB (estimate/measured {:.2})",
        est / measured
    );
    print!("{}", qoq["estimate"]["table"].as_str().unwrap_or(""));
    let mut check: Option<Value> = None;
    match (&torch, &absent) {
        (_, Some(why)) => println!("PyTorch reference not run: {why}"),
        (Some(t), None) => {
            println!("PyTorch reference on {}", a.reference_device);
            let mut worst_loss: f64 = 0.0;
            let mut worst_norm: f64 = 0.0;
            let mut rows = Vec::new();
            for (i, (q_losses, q_norm)) in qoq_steps.iter().enumerate() {
                let tl: Vec<f64> = t["steps"][i]["losses"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                if tl.len() != q_losses.len() {
                    bail!(
                        "reference step {}: {} losses for {} micro-batches",
                        i + 1,
                        tl.len(),
                        q_losses.len()
                    );
                }
                let tn = t["steps"][i]["grad_norm"].as_f64().unwrap_or(f64::NAN);
                let dl = q_losses
                    .iter()
                    .zip(&tl)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                let dn = (*q_norm - tn).abs() / q_norm.abs().max(1e-12);
                worst_loss = worst_loss.max(dl);
                worst_norm = worst_norm.max(if dn.is_nan() { f64::INFINITY } else { dn });
                println!(
                    "step {}: loss per micro-batch qoq {:?} torch {:?} (max |diff| {:.2e}); grad norm qoq {:.6} torch {:.6} (rel diff {:.2e}); ref log-prob max |diff| {:.2e}",
                    i + 1,
                    q_losses
                        .iter()
                        .map(|x| format!("{x:.6}"))
                        .collect::<Vec<_>>(),
                    tl.iter().map(|x| format!("{x:.6}")).collect::<Vec<_>>(),
                    dl,
                    *q_norm,
                    tn,
                    dn,
                    t["steps"][i]["ref_logprob_max_abs_diff"]
                        .as_f64()
                        .unwrap_or(f64::NAN)
                );
                rows.push(json!({"qoq_losses": q_losses, "torch_losses": tl, "qoq_grad_norm": *q_norm, "torch_grad_norm": tn}));
            }
            let ok = worst_loss <= 1e-4 && worst_norm <= 1e-3;
            println!(
                "identical step: loss max |diff| {worst_loss:.2e} (tolerance 1e-4), grad norm max rel diff {worst_norm:.2e} (tolerance 1e-3): {}",
                if ok { "agree" } else { "DISAGREE" }
            );
            if let Some(pc) = t.get("process_check") {
                println!("reference processor vs ours: {pc}");
            }
            check = Some(
                json!({"agree": ok, "loss_max_abs_diff": worst_loss, "grad_norm_max_rel_diff": worst_norm, "steps": rows}),
            );
        }
        (None, None) => unreachable!("the reference either ran or has a reason"),
    }
    if let Some(path) = &a.json {
        let v = json!({
            "size": size,
            "prompts": a.prompts,
            "n": a.n,
            "response_len": a.response_len,
            "micro_batch": a.micro_batch,
            "steps": a.steps,
            "gradient_checkpointing": a.gradient_checkpointing,
            "pack_rollouts": !a.no_pack,
            "compute_dtype": a.compute_dtype.name(),
            "master_dtype": a.master_dtype.name(),
            "strategy": a.strategy.name(),
            "lora_rank": a.lora_rank,
            "device": a.device.device.to_string(),
            "all_reduce": a.all_reduce,
            "reference_device": a.reference_device,
            "threads": threads,
            "qoq": qoq,
            "torch": torch,
            "reference_absent": absent,
            "check": check,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    match check {
        Some(c) if c["agree"] == json!(false) => Ok(ExitCode::from(1)),
        _ => Ok(ExitCode::SUCCESS),
    }
}
