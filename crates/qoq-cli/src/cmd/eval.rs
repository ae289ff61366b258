//! `qoq eval`: evaluation runs with every reasoning trace kept, and run comparison.
//!
//! * `qoq eval --data test.jsonl --responses gens.jsonl --out RUN_DIR` scores responses produced
//!   elsewhere (one JSON line per manifest row, `{"id": str, "response": str}`; rows are matched by
//!   the sample id: the manifest row's `id` field when present, else `<manifest stem>:<line>`), and
//!   writes `traces.jsonl`, `metrics.json`, `report.md`, `confusion/*.png`, `domains.png`.
//!   Boxes are read in the pixel coordinates of the original first image; masks are loaded at
//!   their native size. Interrupted runs resume.
//! * `qoq eval --model DIR --data test.jsonl --out RUN_DIR [--temperature 0.5] [--n 1]` generates
//!   with the model (processor, prefill, cached batched decoding) and writes the same artefacts.
//!   Boxes are then in the pixels of the image the model saw: masks are loaded at that size and
//!   ground-truth boxes rescaled to it (spec §4.3). Only `--n 1` is supported so far. The
//!   processor settings (and the manifest's frames per volume) are the model folder's
//!   `qoq_processor.json`, those it was trained with, when it has one; else the defaults.
//! * `qoq eval --compare RUN_A RUN_B [--bootstrap 1000] [--seed 0]` prints both runs' metrics
//!   side by side with B - A and, from their `traces.jsonl`, paired bootstrap 95 % intervals of
//!   B - A for macro-F1, balanced accuracy and IoU per domain and overall
//!   ([`qoq_eval::bootstrap`]; runs evaluated on different cases are refused).

use anyhow::{Context, bail};
use clap::Args;
use qoq_core::ClinicalSample;
use qoq_eval::Extraction;
use qoq_eval::run::{EvalOptions, Generation, Responder, compare_runs, run_eval};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The evaluation manifest (training schema).
    #[arg(long, required_unless_present = "compare")]
    data: Option<PathBuf>,
    /// Precomputed responses: JSON lines `{"id", "response"}`.
    #[arg(long, conflicts_with = "model")]
    responses: Option<PathBuf>,
    /// Generate with this model folder (config.json, weights, preprocessor_config.json,
    /// tokenizer.json) instead of reading responses.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sampling temperature for --model (the reference validates at 0.5).
    #[arg(long, default_value_t = 0.5)]
    temperature: f32,
    /// Nucleus mass for --model.
    #[arg(long, default_value_t = 0.99)]
    top_p: f32,
    /// Responses per sample for --model.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Tokens to generate at most per response.
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
    /// Samples decoded together (prompts per batch; rows = prompts x n).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// With --model: the sampling seed (default 1). With --compare: the bootstrap's resampling
    /// seed (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// With --compare: bootstrap replicates of the paired intervals of B - A (0: the table
    /// without intervals).
    #[arg(long, value_name = "N")]
    bootstrap: Option<usize>,
    #[command(flatten)]
    device: crate::cmd::DeviceArgs,
    /// Run directory (created; an existing run there is resumed).
    #[arg(long, required_unless_present = "compare")]
    out: Option<PathBuf>,
    /// Evaluate at most this many rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Use the reward's answer extraction (last `\boxed{}`) instead of the validation metrics'.
    #[arg(long)]
    reward_extraction: bool,
    /// Compare two finished runs instead of evaluating.
    #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"])]
    compare: Option<Vec<PathBuf>>,
    /// With --model: write each sample's processed inputs (the `qoq process` safetensors
    /// layout) into this folder as `<sample id>.safetensors` (for tests comparing them with
    /// the other paths').
    #[arg(long, hide = true, requires = "model")]
    dump_inputs: Option<PathBuf>,
}

/// Responses looked up by sample id.
struct FileResponder {
    by_id: HashMap<String, String>,
    path: PathBuf,
}

impl Responder for FileResponder {
    fn respond(&mut self, batch: &[ClinicalSample]) -> qoq_eval::Result<Vec<Generation>> {
        batch
            .iter()
            .map(|s| {
                let text = self.by_id.get(&s.id.0).ok_or_else(|| {
                    qoq_eval::Error::file(
                        &self.path,
                        format!("no response for sample {} (manifest line {})", s.id, s.line),
                    )
                })?;
                Ok(Generation {
                    text: text.clone(),
                    tokens: 0,
                    finish: qoq_core::FinishReason::Stop,
                })
            })
            .collect()
    }
}

fn read_responses(path: &PathBuf) -> anyhow::Result<HashMap<String, String>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = HashMap::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Row {
            id: serde_json::Value,
            response: String,
        }
        let r: Row = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: expected {{\"id\", \"response\"}}",
                path.display(),
                i + 1
            )
        })?;
        let id = match r.id {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        if out.insert(id.clone(), r.response).is_some() {
            bail!("{} line {}: duplicate id {id}", path.display(), i + 1);
        }
    }
    Ok(out)
}

pub fn run(a: EvalArgs) -> anyhow::Result<ExitCode> {
    // Only --model runs anything on a device (on a CPU build `--device cuda` already fails
    // while the arguments are parsed).
    if a.model.is_none() && a.device.device != qoq_model::DeviceSpec::Cpu {
        bail!(
            "--device {} applies to --model only: --compare and --responses run no model",
            a.device.device
        );
    }
    if let Some(runs) = &a.compare {
        let replicates = a.bootstrap.unwrap_or(1000);
        let intervals = if replicates == 0 {
            if a.seed.is_some() {
                bail!("--seed with --compare seeds the bootstrap, which --bootstrap 0 turns off");
            }
            None
        } else {
            let opts = qoq_eval::bootstrap::BootstrapOptions {
                replicates,
                seed: a.seed.unwrap_or(0),
                level: 0.95,
            };
            Some(
                qoq_eval::bootstrap::paired_bootstrap_runs(&runs[0], &runs[1], &opts)
                    .context("paired bootstrap intervals")?,
            )
        };
        print!("{}", compare_runs(&runs[0], &runs[1], intervals.as_ref())?);
        return Ok(ExitCode::SUCCESS);
    }
    if a.bootstrap.is_some() {
        bail!("--bootstrap applies to --compare only (intervals of the difference of two runs)");
    }
    if a.seed.is_some() && a.model.is_none() {
        bail!(
            "--seed applies to --model (the sampling seed) and to --compare (the bootstrap seed) \
             only; precomputed --responses are not sampled"
        );
    }
    let (Some(data), Some(out)) = (&a.data, &a.out) else {
        bail!("--data and --out are required unless --compare is given");
    };
    if a.model.is_none() && a.responses.is_none() {
        bail!("give --responses FILE or --model DIR");
    }
    // The manifest counts a volume's frames as the model's processor samples them.
    let mut mcfg = qoq_data::manifest::ManifestConfig::default();
    let model_opts = match &a.model {
        Some(dir) => {
            let (o, _) = qoq_processor::ProcessorOptions::for_model_dir(dir)?;
            mcfg.video_frames = o.image_load.video_frames;
            Some(o)
        }
        None => None,
    };
    let manifest = qoq_data::manifest::Manifest::open(data, mcfg)
        .with_context(|| format!("opening {}", data.display()))?;
    let reward = qoq_reward::QoqMedicalReward::new(qoq_reward::MedicalConfig::default())?;
    let opts = EvalOptions {
        limit: a.limit,
        extraction: if a.reward_extraction {
            Extraction::Reward
        } else {
            Extraction::Evaluation
        },
        batch_size: a.batch_size.max(1),
        ..EvalOptions::default()
    };
    if let (Some(model_dir), Some(model_opts)) = (&a.model, model_opts) {
        return eval_with_model(&a, model_dir, model_opts, &manifest, &reward, out, &opts);
    }
    let responses = a.responses.as_ref().expect("checked above");
    let by_id = read_responses(responses)?;
    let rows = manifest
        .rows()?
        .map(|r| r.map_err(|e| qoq_eval::Error::Other(e.to_string())));
    let mut responder = FileResponder {
        by_id,
        path: responses.clone(),
    };
    let mask_of = |s: &ClinicalSample| {
        s.segmentation_path
            .as_ref()
            .and_then(|p| match qoq_reward::load_mask_image(p) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("{e}; IoU for sample {} falls back to its box", s.id);
                    None
                }
            })
    };
    let outcome = run_eval(rows, &mut responder, &reward, &mask_of, out, &opts)
        .with_context(|| format!("evaluating into {}", out.display()))?;
    Ok(report(&outcome, out))
}

/// Generates with the model: each batch of samples is processed, its prompts decoded together.
struct EngineResponder<'p> {
    processor: qoq_processor::processor::Processor,
    model: qoq_model::ClinicalVlm,
    cfg: qoq_engine::GenerateConfig,
    n: usize,
    /// Dataset-side size of each sample's first image, for masks and boxes.
    sizes: std::sync::Arc<std::sync::Mutex<HashMap<String, (u32, u32)>>>,
    /// Row counter: the random stream of each prompt.
    next_stream: u64,
    /// Told the size of each generated batch.
    progress: &'p mut dyn FnMut(usize),
    /// Where each sample's processed inputs are written, if anywhere.
    dump_inputs: Option<PathBuf>,
}

impl Responder for EngineResponder<'_> {
    fn respond(&mut self, batch: &[ClinicalSample]) -> qoq_eval::Result<Vec<Generation>> {
        let err = |e: String| qoq_eval::Error::Other(e);
        let mut requests = Vec::with_capacity(batch.len());
        for s in batch {
            let ps = self
                .processor
                .process_sample(s)
                .map_err(|e| err(format!("sample {} (line {}): {e}", s.id, s.line)))?;
            if let Some(sz) = ps.image_sizes.first()
                && let Ok(mut m) = self.sizes.lock()
            {
                m.insert(s.id.0.clone(), *sz);
            }
            let b = self
                .processor
                .collate(std::slice::from_ref(&ps), None)
                .map_err(|e| err(e.to_string()))?;
            if let Some(dir) = &self.dump_inputs {
                let path = dir.join(format!("{}.safetensors", s.id));
                crate::cmd::process::write_batch(&b, &path).map_err(|e| err(format!("{e:#}")))?;
            }
            let inputs = qoq_model::prompt_inputs(&b, self.model.device())
                .map_err(|e| err(e.to_string()))?;
            requests.push(qoq_engine::GroupRequest {
                inputs,
                n: self.n,
                stream: self.next_stream,
            });
            self.next_stream += 1;
        }
        let out = qoq_engine::generate(&self.model, &requests, &self.cfg, |_, _, _| {})
            .map_err(|e| err(e.to_string()))?;
        let mut gens = Vec::new();
        for group in out {
            // One generation per sample (`--n 1`).
            for g in group.into_iter().take(1) {
                let text = self
                    .processor
                    .tokenizer
                    .decode(&g.tokens, true)
                    .map_err(|e| err(e.to_string()))?;
                gens.push(Generation {
                    text,
                    tokens: g.tokens.len(),
                    finish: g.finish,
                });
            }
        }
        (self.progress)(batch.len());
        Ok(gens)
    }
}

fn eval_with_model(
    a: &EvalArgs,
    model_dir: &std::path::Path,
    processor: qoq_processor::ProcessorOptions,
    manifest: &qoq_data::manifest::Manifest,
    reward: &qoq_reward::QoqMedicalReward,
    out: &std::path::Path,
    opts: &EvalOptions,
) -> anyhow::Result<ExitCode> {
    if a.n != 1 {
        bail!(
            "--n {} is not supported yet: evaluation traces one response per sample",
            a.n
        );
    }
    let settings = ModelEvalSettings {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed.unwrap_or(1),
        max_new_tokens: a.max_new_tokens,
        processor,
        dump_inputs: a.dump_inputs.clone(),
        device: a.device.open()?,
    };
    let outcome = eval_model(
        model_dir,
        manifest,
        reward,
        out,
        opts,
        &settings,
        &mut |_| {},
    )?;
    Ok(report(&outcome, out))
}

/// How [`eval_model`] generates: sampling and the processor's options (the dataset-side image
/// sizes must be the ones the model was trained with).
pub(crate) struct ModelEvalSettings {
    /// Sampling temperature (0 is greedy).
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Tokens to generate at most per response.
    pub max_new_tokens: usize,
    /// Processor options (the model folder's [`qoq_processor::SETTINGS_FILE`] for `qoq
    /// eval`).
    pub processor: qoq_processor::processor::ProcessorOptions,
    /// Where each sample's processed inputs are written (`qoq eval --dump-inputs`).
    pub dump_inputs: Option<PathBuf>,
    /// Where the model runs (`qoq eval --device`).
    pub device: candle_core::Device,
}

/// Evaluates the model in `model_dir` on `manifest` into `out` (one response per sample):
/// `traces.jsonl`, `metrics.json`, `report.md` and the charts, as `qoq eval --model` writes them.
/// `progress` is called with the number of samples of each generated batch.
pub(crate) fn eval_model(
    model_dir: &std::path::Path,
    manifest: &qoq_data::manifest::Manifest,
    reward: &qoq_reward::QoqMedicalReward,
    out: &std::path::Path,
    opts: &EvalOptions,
    settings: &ModelEvalSettings,
    progress: &mut dyn FnMut(usize),
) -> anyhow::Result<qoq_eval::run::EvalOutcome> {
    let processor = qoq_processor::processor::Processor::from_model_dir(
        model_dir,
        None,
        settings.processor.clone(),
    )
    .with_context(|| format!("loading the processor of {}", model_dir.display()))?;
    let (cfg, model) =
        qoq_model::loading::load_model(model_dir, candle_core::DType::F32, &settings.device)
            .with_context(|| format!("loading the model in {}", model_dir.display()))?;
    let ids = processor.tokenizer.ids;
    let gen_cfg = qoq_engine::GenerateConfig {
        sampling: qoq_engine::SamplingParams {
            temperature: settings.temperature,
            top_p: settings.top_p,
            seed: settings.seed,
            logit_bias: vec![(cfg.image_token_id, -100.0)],
            ..qoq_engine::SamplingParams::default()
        },
        stop: qoq_engine::StopCondition {
            eos: vec![ids.im_end, ids.endoftext],
            max_new_tokens: settings.max_new_tokens,
        },
        max_batch_rows: opts.batch_size,
        prefill_tokens: 0,
        kv_budget: None,
    };
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
    let mut responder = EngineResponder {
        processor,
        model,
        cfg: gen_cfg,
        n: 1,
        sizes: sizes.clone(),
        next_stream: 0,
        progress,
        dump_inputs: settings.dump_inputs.clone(),
    };
    if let Some(dir) = &settings.dump_inputs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (min_px, max_px) = (
        responder.processor.opts.dataset_min_pixels,
        responder.processor.opts.dataset_max_pixels,
    );
    // Ground-truth boxes live in the original first image's pixels: rescale them to the
    // dataset-side size the model sees (spec §4.3).
    let rows = manifest.rows()?.map(move |r| {
        let mut s = r.map_err(|e| qoq_eval::Error::Other(e.to_string()))?;
        if let (Some(b), Some(img)) = (s.bbox, s.images.first())
            && let Ok((w, h)) = image::image_dimensions(img)
        {
            let to = qoq_data::vision::dataset_resize_dims(w, h, min_px, max_px);
            s.bbox = Some(qoq_data::vision::rescale_bbox(b, (w, h), to));
        }
        Ok(s)
    });
    let mask_of = |s: &ClinicalSample| {
        let path = s.segmentation_path.as_ref()?;
        let size = sizes.lock().ok()?.get(&s.id.0).copied()?;
        match qoq_data::vision::load_mask(path, size, false) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("{e}; IoU for sample {} falls back to its box", s.id);
                None
            }
        }
    };
    run_eval(rows, &mut responder, reward, &mask_of, out, opts)
        .with_context(|| format!("evaluating into {}", out.display()))
}

/// Print a finished run's table and where its artefacts are.
fn report(outcome: &qoq_eval::run::EvalOutcome, out: &std::path::Path) -> ExitCode {
    print!("{}", outcome.report.to_markdown());
    eprintln!(
        "{} rows evaluated ({} resumed); artefacts in {}",
        outcome.generated + outcome.resumed,
        outcome.resumed,
        out.display()
    );
    ExitCode::SUCCESS
}
