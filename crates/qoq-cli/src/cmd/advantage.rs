//! `qoq advantage`: advantages of training steps' rollouts (spec §9), the estimator's state
//! carried from line to line as in training.
//!
//! Input: JSONL, one training step per line, `{"rollouts": [{"uid", "domain", "reward"}, ...]}`
//! in batch order (rollouts sharing a uid form a group), plus what some estimators need, one
//! entry per rollout in the same order: `"baselines": [...]` (ReMax: the greedy rollout's
//! reward), `"token_rewards": [[...], ...]` (REINFORCE++ and GAE: each response token's reward)
//! and `"values": [[...], ...]` (GAE: the critic's value per response token). Output: one line
//! per step, `{"advantages": [...]}` in the same order (NaN written as `null`); token-level
//! estimators write `{"advantages": [[...], ...], "returns": [[...], ...]}`, one vector per
//! rollout of its response length.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use qoq_rl::advantage::{
    Drpo, DrpoConfig, Estimator, RolloutReward, StepAdvantages, StepInputs, StepOutput,
};
use serde::Deserialize;
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

/// Which estimator computes the advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum EstimatorName {
    /// GRPO (§9.1).
    Grpo,
    /// DRPO (§9.6).
    Drpo,
    /// RLOO (§9.2).
    Rloo,
    /// Dr.GRPO: GRPO without the std division.
    DrGrpo,
    /// REINFORCE++ (§9.3): needs `token_rewards`; `--gamma`.
    ReinforcePlusPlus,
    /// ReMax (§9.4): needs `baselines`.
    Remax,
    /// GAE (§9.5): needs `token_rewards` and `values`; `--gamma`, `--lam`.
    Gae,
}

/// Compatibility level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compat {
    /// The released functions to the digit: exact DRPO clustering, NaNs where the reference
    /// produces them, and GRPO/RLOO reject single-rollout groups as the reference asserts.
    Reference,
}

#[derive(Debug, Args)]
pub struct AdvantageArgs {
    /// Estimator.
    #[arg(long, value_enum)]
    pub estimator: EstimatorName,
    /// Reproduce the reference implementation exactly (default: robust, bounded-cost DRPO).
    #[arg(long, value_enum)]
    pub compat: Option<Compat>,
    /// Discount γ of REINFORCE++ and GAE (default 1.0, the reference's).
    #[arg(long)]
    pub gamma: Option<f64>,
    /// λ of GAE (default 1.0, the reference's).
    #[arg(long)]
    pub lam: Option<f64>,
    /// Rollouts per group; a step with another group size is an error.
    #[arg(long)]
    pub n: Option<usize>,
    /// Steps file (JSONL, one step per line).
    #[arg(long)]
    pub input: PathBuf,
    /// Add each step's guard counters and per-domain statistics as `"metrics"`.
    #[arg(long)]
    pub metrics: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepLine {
    rollouts: Vec<RolloutReward>,
    #[serde(default)]
    baselines: Option<Vec<f64>>,
    #[serde(default)]
    token_rewards: Option<Vec<Vec<f64>>>,
    #[serde(default)]
    values: Option<Vec<Vec<f64>>>,
}

fn build(args: &AdvantageArgs) -> anyhow::Result<Estimator> {
    let reference = args.compat == Some(Compat::Reference);
    let uses_gamma = matches!(
        args.estimator,
        EstimatorName::ReinforcePlusPlus | EstimatorName::Gae
    );
    if args.gamma.is_some() && !uses_gamma {
        bail!("--gamma is used by --estimator reinforce_plus_plus or gae only");
    }
    if args.lam.is_some() && args.estimator != EstimatorName::Gae {
        bail!("--lam is used by --estimator gae only");
    }
    for (flag, v) in [("--gamma", args.gamma), ("--lam", args.lam)] {
        if let Some(v) = v
            && !(0.0..=1.0).contains(&v)
        {
            bail!("{flag} {v} is not in [0, 1]");
        }
    }
    let gamma = args.gamma.unwrap_or(1.0);
    Ok(match args.estimator {
        EstimatorName::Grpo => Estimator::grpo(),
        EstimatorName::Rloo => Estimator::Rloo,
        EstimatorName::DrGrpo => Estimator::DrGrpo,
        EstimatorName::Drpo => {
            let cfg = if reference {
                DrpoConfig {
                    reference_nan: true,
                    ..DrpoConfig::reference()
                }
            } else {
                DrpoConfig::default()
            };
            Estimator::Drpo(Box::new(Drpo::new(cfg)))
        }
        EstimatorName::ReinforcePlusPlus => Estimator::ReinforcePlusPlus { gamma },
        EstimatorName::Remax => Estimator::Remax,
        EstimatorName::Gae => Estimator::Gae {
            gamma,
            lam: args.lam.unwrap_or(1.0),
        },
    })
}

fn check_groups(args: &AdvantageArgs, line: usize, rows: &[RolloutReward]) -> anyhow::Result<()> {
    let groups = qoq_rl::advantage::Groups::of(rows);
    for (uid, m) in groups.uids.iter().zip(&groups.members) {
        if let Some(n) = args.n
            && m.len() != n
        {
            bail!(
                "line {line}: group {uid:?} has {} rollouts, --n is {n}",
                m.len()
            );
        }
        if args.compat == Some(Compat::Reference)
            && matches!(
                args.estimator,
                EstimatorName::Grpo | EstimatorName::Rloo | EstimatorName::DrGrpo
            )
            && m.len() < 2
        {
            bail!("line {line}: group {uid:?} has one rollout (the reference asserts |G| > 1)");
        }
    }
    Ok(())
}

pub fn run(args: AdvantageArgs) -> anyhow::Result<std::process::ExitCode> {
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let mut est = build(&args)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let lineno = i + 1;
        let line =
            line.with_context(|| format!("{}: reading line {lineno}", args.input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let step: StepLine = serde_json::from_str(&line)
            .with_context(|| format!("{}: line {lineno}", args.input.display()))?;
        check_groups(&args, lineno, &step.rollouts)?;
        let extra = StepInputs {
            baselines: step.baselines,
            token_rewards: step.token_rewards,
            values: step.values,
        };
        let StepOutput {
            step:
                StepAdvantages {
                    advantages,
                    metrics,
                },
            tokens,
        } = est
            .step_with(&step.rollouts, &extra)
            .with_context(|| format!("{}: line {lineno}", args.input.display()))?;
        let mut obj = match tokens {
            Some(t) => serde_json::json!({ "advantages": t.advantages, "returns": t.returns }),
            None => serde_json::json!({ "advantages": advantages }),
        };
        if args.metrics {
            obj["metrics"] = serde_json::to_value(&metrics)?;
        }
        serde_json::to_writer(&mut out, &obj)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(std::process::ExitCode::SUCCESS)
}
