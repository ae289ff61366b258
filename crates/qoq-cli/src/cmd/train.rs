//! `qoq train`: the RL loop of a run file (spec §10-§12) — rollouts, rewards, advantages, policy
//! updates, metrics (`<out_dir>/metrics.jsonl`, TensorBoard) and checkpoints
//! (`<out_dir>/checkpoint_step_N`); `--resume` continues a run from one of its checkpoints.

use anyhow::{Context, bail};
use clap::Args;
use qoq_rl::config::RunConfig;
use qoq_rl::trainer::Trainer;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run file (TOML; see configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key, e.g. `--set trainer.max_steps=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from a checkpoint folder (`<out_dir>/checkpoint_step_N`), or from the latest
    /// checkpoint of a run folder; its saved config is used.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Supervised fine-tuning on the manifest's answers (`<think>\n</think>\n\boxed{answer}`)
    /// instead of RL; give it again when resuming an SFT run.
    #[arg(long)]
    sft: bool,
}

pub fn run(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let mut trainer = match (&a.resume, &a.config) {
        (Some(dir), _) => {
            if !a.overrides.is_empty() {
                bail!("--set cannot be combined with --resume (the checkpoint's config is used)");
            }
            let ck = match qoq_rl::checkpoint::latest(dir)? {
                Some((_, p)) => p,
                None => dir.clone(),
            };
            Trainer::resume(&ck).with_context(|| format!("resuming from {}", ck.display()))?
        }
        (None, Some(path)) => {
            let cfg = RunConfig::load(path, &a.overrides)
                .with_context(|| format!("reading {}", path.display()))?;
            Trainer::new(cfg).context("setting up the run")?
        }
        (None, None) => bail!("give --config RUN.toml or --resume CHECKPOINT"),
    };
    trainer.set_sft(a.sft);
    let total = trainer.total_steps();
    tracing::info!(
        from = trainer.step_count(),
        to = total,
        out = %trainer.out_dir().display(),
        "training"
    );
    while trainer.step_count() < total {
        let o = if a.sft {
            trainer.sft_step()?
        } else {
            trainer.step()?
        };
        let get = |k: &str| o.metrics.get(k).copied().unwrap_or(f64::NAN);
        let head = if a.sft {
            format!("sft loss {:.4}", get(qoq_rl::trainer::SFT_LOSS))
        } else {
            format!(
                "reward {:.4}, pg_loss {:.4}",
                get(qoq_rl::metrics_log::names::REWARD_OVERALL),
                get(qoq_rl::metrics_log::names::PG_LOSS)
            )
        };
        eprintln!(
            "step {}/{total}: {head}, grad_norm {:.4}, {:.1}s",
            o.step,
            get(qoq_rl::metrics_log::names::GRAD_NORM),
            get(qoq_rl::metrics_log::names::TIME_PER_STEP),
        );
        if trainer.config().trainer.is_save_step(o.step, total) {
            let dir = trainer.save_checkpoint()?;
            eprintln!("checkpoint {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
