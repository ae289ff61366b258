//! `qoq model`: model folders.
//!
//! * `qoq model init --preset tiny|demo|0.5b --tokenizer TOKENIZER --out DIR [--seed 0]` writes a
//!   fresh, loadable model folder (`config.json`, `model.safetensors`, `tokenizer.json`,
//!   `preprocessor_config.json`) with seeded random weights: the demo's own model writer
//!   ([`qoq_model::init::init_model`]). The config's special-token ids follow the tokenizer (a
//!   `tokenizer.json`, or a model folder holding one); an existing non-empty DIR is refused.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use qoq_model::init::ModelSize;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a fresh model folder with seeded random weights.
    Init(InitArgs),
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
    }
}
