//! `qoq bench train-step`: one RL training step split by phase, against the same step in PyTorch.
//!
//! The step is assembled as `qoq_rl::trainer::Trainer::step` does it, minus the reward (the
//! advantages are fixed, +1 / −0.5 alternating inside each group, so that both sides see the
//! same numbers and the loss does not cancel to zero):
//!
//! * `process`: processor on every prompt (images, template, tokenizer) and the per-prompt
//!   collation the engine takes;
//! * `generate`: `n` rollouts per prompt with [`qoq_engine::generate`] (temperature 1, top-p 1,
//!   EOS ignored: every response has exactly `--response-len` tokens; the placeholder tokens get
//!   the trainer's −100 logit bias), keeping the sampler's log-probs as the old policy;
//! * `ref_logprobs`: collation of the update's micro-batches (prompt + response) and an
//!   Inference-mode forward of each under the frozen initial weights (the KL reference);
//! * `update`: per micro-batch a Train-mode forward, the actor loss of the run config (clipped
//!   surrogate with clip-higher and dual clip, token-mean, plus the k3 KL term to the reference),
//!   backward, gradient accumulation; then one AdamW step with global-norm clipping;
//! * `total`: the step.
//!
//! Each phase's peak resident memory is measured by resetting the high-water mark (`5` into
//! `/proc/self/clear_refs`) before it and reading `VmHWM` after it.
//!
//! The exact batch (micro-batch tensors, old and reference log-probs, advantages) is written to
//! `batch.safetensors` next to a `batch.json` holding the settings (model folder, micro-batch
//! size, optimiser, clip ratios, KL) and this side's losses and gradient norms; then
//! `tools/bench/train_step_ref.py --batch batch.json` runs the same step with transformers'
//! `Qwen2_5_VLForConditionalGeneration` on the same safetensors, and the two sides' losses and
//! gradient norms on the identical batch are compared.

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use qoq_core::{ClinicalSample, Rollout};
use qoq_data::manifest::{Manifest, ManifestConfig};
use qoq_engine::{GenerateConfig, Generated, GroupRequest, SamplingParams, StopCondition};
use qoq_model::train::{Freeze, trainable_var_builder, write_random_checkpoint_seeded};
use qoq_model::{ClinicalVlm, ForwardMode, ModelInputs};
use qoq_model::{RolloutTensors, prompt_inputs, rollout_tensors};
use qoq_processor::processor::{ProcessedSample, Processor};
use qoq_rl::config::RunConfig;
use qoq_rl::loss::{ActorLossInputs, KlTerm, LossConfig, PolicyLossInputs, compute_actor_loss};
use qoq_rl::optim::{AdamW, GradAccumulator};
use qoq_rl::trainer::response_log_probs;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

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
    /// Skip the PyTorch reference.
    #[arg(long)]
    pub no_reference: bool,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Internal: run the qoq side only, writing the model, the batch and `qoq.json` into this
    /// folder (the command runs itself so with this, so that the reference does not share the
    /// machine's memory with a finished process's heap).
    #[arg(long, hide = true)]
    pub worker: Option<PathBuf>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Reset the peak-RSS high-water mark of this process; false where the kernel refuses.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `VmHWM` of this process in MiB.
fn peak_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Seconds and peak MiB of one phase.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    seconds: f64,
    peak_mib: f64,
}

struct PhaseTimer {
    t: Instant,
}

impl PhaseTimer {
    fn start() -> Self {
        reset_peak();
        Self { t: Instant::now() }
    }
    fn stop(self) -> Phase {
        Phase {
            seconds: self.t.elapsed().as_secs_f64(),
            peak_mib: peak_mib().unwrap_or(0.0),
        }
    }
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

/// The image-only rows of `manifest`, repeated to `want`.
fn load_prompts(manifest: &Path, want: usize) -> anyhow::Result<Vec<ClinicalSample>> {
    let m = Manifest::open(manifest, ManifestConfig::default())
        .with_context(|| format!("opening {}", manifest.display()))?;
    let mut rows = Vec::new();
    for r in m.rows()? {
        let s = r.with_context(|| format!("reading {}", manifest.display()))?;
        if !s.images.is_empty() && s.videos.is_empty() && s.time_series.is_empty() {
            rows.push(s);
        }
    }
    if rows.is_empty() {
        bail!(
            "{}: no row with images only (videos and ECGs are skipped)",
            manifest.display()
        );
    }
    Ok((0..want).map(|i| rows[i % rows.len()].clone()).collect())
}

/// Everything one step needs that outlives it.
struct Bench {
    processor: Processor,
    model: ClinicalVlm,
    ref_model: ClinicalVlm,
    opt: AdamW,
    loss_cfg: LossConfig,
    samples: Vec<ClinicalSample>,
    n: usize,
    response_len: usize,
    micro: usize,
    placeholders: Vec<u32>,
    pad: u32,
}

/// What one step measured and produced.
struct StepOut {
    phases: BTreeMap<&'static str, Phase>,
    /// Actor loss of each micro-batch (before the division by the micro-batch count).
    losses: Vec<f64>,
    grad_norm: f64,
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

impl Bench {
    fn step(&mut self, step: usize) -> anyhow::Result<StepOut> {
        let dev = Device::Cpu;
        let mut phases = BTreeMap::new();
        let total = PhaseTimer::start();
        let mut total_peak: f64 = 0.0;

        // process
        let timer = PhaseTimer::start();
        let mut processed: Vec<ProcessedSample> = Vec::with_capacity(self.samples.len());
        let mut requests = Vec::with_capacity(self.samples.len());
        for (i, s) in self.samples.iter().enumerate() {
            let p = self
                .processor
                .process_sample(s)
                .with_context(|| format!("processing manifest line {}", s.line))?;
            let batch = self
                .processor
                .collate(std::slice::from_ref(&p), None)
                .with_context(|| format!("collating manifest line {}", s.line))?;
            let inputs = prompt_inputs(&batch, &dev)?;
            requests.push(GroupRequest {
                inputs,
                n: self.n,
                stream: (step * self.samples.len() + i) as u64,
            });
            processed.push(p);
        }
        let ph = timer.stop();
        total_peak = total_peak.max(ph.peak_mib);
        phases.insert("process", ph);

        // generate
        let timer = PhaseTimer::start();
        let gen_cfg = GenerateConfig {
            sampling: SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                seed: 1,
                logit_bias: self.placeholders.iter().map(|&t| (t, -100.0)).collect(),
                ..SamplingParams::default()
            },
            stop: StopCondition {
                eos: Vec::new(),
                max_new_tokens: self.response_len,
            },
            max_batch_rows: self.samples.len() * self.n,
        };
        let generated = qoq_engine::generate(&self.model, &requests, &gen_cfg, |_, _, _| {})
            .context("generation")?;
        let ph = timer.stop();
        total_peak = total_peak.max(ph.peak_mib);
        phases.insert("generate", ph);
        let flat: Vec<(usize, usize, &Generated)> = generated
            .iter()
            .enumerate()
            .flat_map(|(gi, g)| g.iter().enumerate().map(move |(j, r)| (gi, j, r)))
            .collect();
        for (gi, j, r) in &flat {
            if r.tokens.len() != self.response_len || r.logprobs.len() != self.response_len {
                bail!(
                    "prompt {gi} rollout {j}: {} tokens, {} log-probs, expected {}",
                    r.tokens.len(),
                    r.logprobs.len(),
                    self.response_len
                );
            }
        }

        // ref_logprobs (with the micro-batch collation the update reuses)
        let timer = PhaseTimer::start();
        struct Micro {
            inputs: ModelInputs,
            s: usize,
            labels: Tensor,
            mask: Tensor,
            old: Tensor,
            adv: Tensor,
            ref_lp: Tensor,
        }
        let mut micros: Vec<Micro> = Vec::new();
        let r_len = self.response_len;
        for ub in flat.chunks(self.micro) {
            let prompts: Vec<ProcessedSample> =
                ub.iter().map(|(gi, _, _)| processed[*gi].clone()).collect();
            let batch = self.processor.collate(&prompts, None)?;
            let rollouts: Vec<Rollout> = ub
                .iter()
                .map(|(_, _, r)| Rollout {
                    token_ids: r.tokens.clone(),
                    logprobs: r.logprobs.clone(),
                    text: String::new(),
                    finish: r.finish,
                })
                .collect();
            let rollouts: Vec<&Rollout> = rollouts.iter().collect();
            let RolloutTensors {
                inputs,
                s,
                labels,
                mask,
                old,
            } = rollout_tensors(&batch, &rollouts, &self.placeholders, self.pad, &dev)?;
            // Fixed advantages, +1 / -0.5 alternating inside each group (so the loss does not
            // cancel to 0).
            let b = ub.len();
            let mut adv = vec![0f32; b * r_len];
            for (i, (_, j, _)) in ub.iter().enumerate() {
                adv[i * r_len..(i + 1) * r_len].fill(if j % 2 == 0 { 1.0 } else { -0.5 });
            }
            let ref_lp = response_log_probs(
                &self.ref_model,
                &inputs,
                s,
                &labels,
                ForwardMode::Inference,
                step as u64,
            )?
            .detach();
            micros.push(Micro {
                inputs,
                s,
                labels,
                mask,
                old,
                adv: Tensor::from_vec(adv, (b, r_len), &dev)?,
                ref_lp,
            });
        }
        let ph = timer.stop();
        total_peak = total_peak.max(ph.peak_mib);
        phases.insert("ref_logprobs", ph);

        // update
        let timer = PhaseTimer::start();
        let count = micros.len() as f64;
        let mut acc = GradAccumulator::new();
        let mut losses = Vec::with_capacity(micros.len());
        for m in &micros {
            let lp = response_log_probs(
                &self.model,
                &m.inputs,
                m.s,
                &m.labels,
                ForwardMode::Train,
                step as u64,
            )?;
            let out = compute_actor_loss(
                &ActorLossInputs {
                    policy: PolicyLossInputs {
                        old_log_probs: &m.old,
                        log_probs: &lp,
                        advantages: &m.adv,
                        response_mask: &m.mask,
                    },
                    kl: Some(KlTerm::RefLogProbs(&m.ref_lp)),
                },
                &self.loss_cfg,
            )?;
            losses.push(out.metrics.pg_loss);
            let grads = (out.loss / count)?.backward()?;
            acc.add(self.opt.grads_of(&grads))?;
        }
        let t_opt = Instant::now();
        let report = self.opt.step(&acc.take())?;
        let opt_s = t_opt.elapsed().as_secs_f64();
        let ph = timer.stop();
        phases.insert(
            UPDATE_OPTIMIZER,
            Phase {
                seconds: opt_s,
                peak_mib: ph.peak_mib,
            },
        );
        total_peak = total_peak.max(ph.peak_mib);
        phases.insert("update", ph);
        let mut t = total.stop();
        t.peak_mib = total_peak;
        phases.insert("total", t);

        // The batch for the reference.
        let mut tensors = HashMap::new();
        let mut prompt_lens = Vec::new();
        for (k, m) in micros.iter().enumerate() {
            let key = |n: &str| format!("s{step}.m{k}.{n}");
            tensors.insert(key("input_ids"), i64_tensor(&m.inputs.input_ids)?);
            if let Some(a) = &m.inputs.attention_mask {
                tensors.insert(key("attention_mask"), i64_tensor(a)?);
            }
            tensors.insert(key("position_ids"), i64_tensor(&m.inputs.position_ids)?);
            if let Some(pv) = &m.inputs.pixel_values {
                tensors.insert(key("pixel_values"), pv.clone());
                tensors.insert(
                    key("image_grid_thw"),
                    grid_tensor(&m.inputs.image_grid_thw)?,
                );
            }
            tensors.insert(key("labels"), i64_tensor(&m.labels)?);
            tensors.insert(key("old_log_probs"), m.old.clone());
            tensors.insert(key("advantages"), m.adv.clone());
            tensors.insert(key("response_mask"), m.mask.clone());
            tensors.insert(key("ref_log_probs"), m.ref_lp.clone());
            prompt_lens.push(m.s);
        }
        let prompts = processed
            .iter()
            .zip(&self.samples)
            .map(|(p, s)| {
                (
                    p.prompt.clone(),
                    s.images.iter().map(|i| i.display().to_string()).collect(),
                )
            })
            .collect();
        Ok(StepOut {
            phases,
            losses,
            grad_norm: report.grad_norm,
            tensors,
            prompt_lens,
            prompts,
            requests: requests.into_iter().map(|r| r.inputs).collect(),
        })
    }
}

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
    let model_dir = build_model_dir(a.size, dir)?;
    let manifest = a
        .manifest
        .clone()
        .unwrap_or_else(|| repo_root().join("examples/mini/manifest.jsonl"));
    let samples = load_prompts(&manifest, a.prompts)?;

    let mut run = RunConfig::default();
    run.actor.micro_batch_size_per_device_for_update = a.micro_batch;
    let loss_cfg = run.loss_config();
    let optim = run.actor.optim.clone();
    let opts = run.processor_options();
    let processor = Processor::from_model_dir(&model_dir, None, opts.clone())
        .with_context(|| format!("processor of {}", model_dir.display()))?;
    let model_cfg = qoq_model::loading::read_config(&model_dir)?;
    let dev = Device::Cpu;
    let (vb, _) = qoq_model::loading::checkpoint_var_builder(&model_dir, DType::F32, &dev)?;
    let (vb, store) = trainable_var_builder(vb, Freeze::default());
    let model = ClinicalVlm::new(&model_cfg, vb)?;
    let (_, ref_model) = qoq_model::loading::load_model(&model_dir, DType::F32, &dev)?;
    let opt = AdamW::new(store.trainable()?, optim.clone())?;
    let placeholders = model_cfg.placeholder_token_ids();
    let pad = processor.tokenizer.ids.endoftext;
    let mut bench = Bench {
        processor,
        model,
        ref_model,
        opt,
        loss_cfg,
        samples,
        n: a.n,
        response_len: a.response_len,
        micro: a.micro_batch,
        placeholders,
        pad,
    };
    let size = size_name(a.size);
    eprintln!(
        "train-step: {size} model, {} prompts x {} rollouts x {} tokens, micro-batch {}, {} step(s), {threads} thread(s)",
        a.prompts, a.n, a.response_len, a.micro_batch, a.steps
    );
    let mut outs = Vec::with_capacity(a.steps);
    for step in 0..a.steps {
        let o = bench.step(step)?;
        eprintln!(
            "step {}: {:.3} s, loss per micro-batch {:?}, grad norm {:.6}",
            step + 1,
            o.phases["total"].seconds,
            o.losses,
            o.grad_norm
        );
        outs.push(o);
    }
    let pad_id = bench.pad;
    // Free the models before the reference runs, so that its memory is not shared with ours.
    drop(bench);

    let qoq = json!({
        "threads": threads,
        "phases": phase_json(&summarise(&outs.iter().map(|o| o.phases.clone()).collect::<Vec<_>>())),
        "steps": outs.iter().map(|o| json!({
            "phases": phase_json(&o.phases), "losses": o.losses, "grad_norm": o.grad_norm,
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
        "placeholder_bias": -100.0,
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
    let size = size_name(a.size);
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
    } else if let Some(why) = reference_missing(&a.python) {
        (None, Some(why))
    } else {
        eprintln!("running the PyTorch reference: {}", script.display());
        let out = Command::new(&a.python)
            .arg(&script)
            .arg("--batch")
            .arg(&batch_json)
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
         f32 CPU, {threads} thread(s) both sides; {}",
        a.prompts,
        a.n,
        a.response_len,
        a.micro_batch,
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
    let mut check: Option<Value> = None;
    match (&torch, &absent) {
        (_, Some(why)) => println!("PyTorch reference not run: {why}"),
        (Some(t), None) => {
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
