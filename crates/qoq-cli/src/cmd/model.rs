//! `qoq model`: model folders.
//!
//! * `qoq model init --preset tiny|demo|0.5b --tokenizer TOKENIZER --out DIR [--seed 0]` writes a
//!   fresh, loadable model folder (`config.json`, `model.safetensors`, `tokenizer.json`,
//!   `preprocessor_config.json`) with seeded random weights: the demo's own model writer
//!   ([`qoq_model::init::init_model`]). The config's special-token ids follow the tokenizer (a
//!   `tokenizer.json`, or a model folder holding one); an existing non-empty DIR is refused.
//! * `qoq model pretrain-ecg --model DIR --data TRAIN.jsonl [--val VAL.jsonl] --out DIR2 [--steps
//!   400 --batch-size 32 --lr 3e-3 --seed 0]` pre-trains the model's ECG-JEPA encoder on the
//!   manifest's labelled ECGs and writes the model with the new encoder to DIR2
//!   ([`qoq_rl::ecg_pretrain`]): the stand-in for QoQ-Med's pre-trained ECG-JEPA in a model
//!   with random weights (the demo's first training phase).

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use qoq_model::init::ModelSize;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a fresh model folder with seeded random weights.
    Init(InitArgs),
    /// Pre-train a model's ECG-JEPA encoder on labelled ECGs (supervised, on a manifest's
    /// answers) and write the model with the new encoder to a new folder.
    PretrainEcg(PretrainEcgArgs),
}

#[derive(Debug, Args)]
pub struct PretrainEcgArgs {
    /// The model folder whose encoder is trained (read only).
    #[arg(long)]
    model: PathBuf,
    /// Training manifest (JSONL, `time-series` and `answer` keys); rows without a time series
    /// are skipped; each dataset's answers are its classes.
    #[arg(long)]
    data: PathBuf,
    /// Manifest whose ECGs measure the accuracy after training (its answers must occur in the
    /// training rows of the same dataset).
    #[arg(long)]
    val: Option<PathBuf>,
    /// The new model folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 400)]
    steps: u64,
    /// ECGs per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate (AdamW, 10 warm-up steps, no weight decay).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed of the head's weights and the row order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The architecture presets of [`ModelSize::PRESETS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Decoder hidden 32, 1 layer; vision 16 x 1; ECG 16 x 1 (tests).
    Tiny,
    /// The demo's model: decoder hidden 128, 2 layers; vision 64 x 2; ECG 32 x 2.
    Demo,
    /// Qwen2.5-0.5B's decoder, a 2-block vision tower of the 7B's width, QoQ-Med's ECG-JEPA.
    #[value(name = "0.5b")]
    HalfB,
}

impl Preset {
    fn size(self) -> ModelSize {
        match self {
            Preset::Tiny => ModelSize::TINY,
            Preset::Demo => ModelSize::DEMO,
            Preset::HalfB => ModelSize::HALF_B,
        }
    }
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Architecture preset.
    #[arg(long, value_enum)]
    preset: Preset,
    /// The tokenizer: a `tokenizer.json`, or a model folder holding one (its special-token ids
    /// set the config's; it is copied into the new folder).
    #[arg(long)]
    tokenizer: PathBuf,
    /// The new model folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(c: ModelCommand) -> anyhow::Result<ExitCode> {
    match c {
        ModelCommand::Init(a) => {
            qoq_model::init::init_model(&a.out, &a.preset.size(), &a.tokenizer, a.seed)
                .with_context(|| format!("writing the model folder {}", a.out.display()))?;
            let name = a
                .preset
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            eprintln!(
                "wrote a {name} model with seed {} into {}",
                a.seed,
                a.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::PretrainEcg(a) => {
            let (processor, _) = qoq_processor::ProcessorOptions::for_model_dir(&a.model)
                .with_context(|| format!("reading {}'s processor settings", a.model.display()))?;
            let options = qoq_rl::ecg_pretrain::EcgPretrainOptions {
                steps: a.steps,
                batch_size: a.batch_size,
                lr: a.lr,
                seed: a.seed,
            };
            let r = qoq_rl::ecg_pretrain::pretrain_ecg_encoder(
                &a.model,
                &a.data,
                a.val.as_deref(),
                &a.out,
                &processor,
                &options,
            )
            .context("pre-training the ECG encoder")?;
            eprintln!("{}", qoq_rl::ecg_pretrain::summary(&r));
            Ok(ExitCode::SUCCESS)
        }
    }
}
