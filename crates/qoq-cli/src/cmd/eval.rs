//! `qoq eval`: evaluation runs with every reasoning trace kept, and run comparison.
//!
//! * `qoq eval --data test.jsonl --responses gens.jsonl --out RUN_DIR` scores responses produced
//!   elsewhere (one JSON line per manifest row, `{"id": str, "response": str}`; rows are matched by
//!   the sample id: the manifest row's `id` field when present, else `<manifest stem>:<line>`), and
//!   writes `traces.jsonl`, `metrics.json`, `report.md`, `confusion/*.png`, `domains.png`.
//!   Boxes are read in the pixel coordinates of the original first image; masks are loaded at
//!   their native size. Interrupted runs resume.
//! * `qoq eval --compare RUN_A RUN_B` prints both runs' metrics side by side with B - A.

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
    #[arg(long, required_unless_present = "compare")]
    responses: Option<PathBuf>,
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
    if let Some(runs) = &a.compare {
        print!("{}", compare_runs(&runs[0], &runs[1])?);
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(data), Some(responses), Some(out)) = (&a.data, &a.responses, &a.out) else {
        bail!("--data, --responses and --out are required unless --compare is given");
    };
    let by_id = read_responses(responses)?;
    let manifest = qoq_data::manifest::Manifest::open(data, Default::default())
        .with_context(|| format!("opening {}", data.display()))?;
    let rows = manifest
        .rows()?
        .map(|r| r.map_err(|e| qoq_eval::Error::Other(e.to_string())));
    let mut responder = FileResponder {
        by_id,
        path: responses.clone(),
    };
    let reward = qoq_reward::QoqMedicalReward::new(qoq_reward::MedicalConfig::default())?;
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
    let opts = EvalOptions {
        limit: a.limit,
        extraction: if a.reward_extraction {
            Extraction::Reward
        } else {
            Extraction::Evaluation
        },
        ..EvalOptions::default()
    };
    let outcome = run_eval(rows, &mut responder, &reward, &mask_of, out, &opts)
        .with_context(|| format!("evaluating into {}", out.display()))?;
    print!("{}", outcome.report.to_markdown());
    eprintln!(
        "{} rows evaluated ({} resumed); artefacts in {}",
        outcome.generated + outcome.resumed,
        outcome.resumed,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
