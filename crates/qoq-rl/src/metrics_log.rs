//! The per-step metrics log `metrics.jsonl` (spec §12: the reference logs these names through
//! `verl/utils/tracking.py::Tracking.log`; we write them to a file as well).
//!
//! One JSON line per step: `{"step": 12, "wall_time": 1764028800.5, "metrics": {"actor/pg_loss":
//! 0.01, ...}}`. Non-finite values are written as `null` and read back as NaN. Every append is
//! flushed. Opening an existing log for a resumed run drops a torn last line (what a killed run
//! leaves) and, given the step the checkpoint resumes from, every line after it, so the log never
//! holds two lines for one step. [`series`] and [`metric_groups`] turn the lines into the curves
//! `qoq plot` draws.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The reference's metric names (spec §12) and the few this project adds.
pub mod names {
    /// Policy-gradient loss (`actor/pg_loss`).
    pub const PG_LOSS: &str = "actor/pg_loss";
    /// Fraction of tokens clipped above (`actor/pg_clipfrac_higher`).
    pub const PG_CLIPFRAC_HIGHER: &str = "actor/pg_clipfrac_higher";
    /// Fraction of tokens dual-clipped (`actor/pg_clipfrac_lower`).
    pub const PG_CLIPFRAC_LOWER: &str = "actor/pg_clipfrac_lower";
    /// `−mean log π(sampled)` (logged only).
    pub const ENTROPY_LOSS: &str = "actor/entropy_loss";
    /// `mean(−Δ)` between the current and the rollout policy.
    pub const PPO_KL: &str = "actor/ppo_kl";
    /// KL-to-reference loss term.
    pub const KL_LOSS: &str = "actor/kl_loss";
    /// KL coefficient β.
    pub const KL_COEF: &str = "actor/kl_coef";
    /// Gradient norm before clipping.
    pub const GRAD_NORM: &str = "actor/grad_norm";
    /// Learning rate of the update.
    pub const LR: &str = "actor/lr";
    /// Mean total reward of the batch.
    pub const REWARD_OVERALL: &str = "reward/overall";
    /// Mean accuracy (F1) component.
    pub const REWARD_STANDARD: &str = "reward/standard_score";
    /// Mean IoU component.
    pub const REWARD_IOU: &str = "reward/iou_score";
    /// Mean format component.
    pub const REWARD_FORMAT: &str = "reward/format_score";
    /// Mean length component.
    pub const REWARD_LENGTH: &str = "reward/length_score";
    /// Mean sequence score (`critic/score/mean`).
    pub const SCORE_MEAN: &str = "critic/score/mean";
    /// Mean advantage (`critic/advantages/mean`).
    pub const ADVANTAGES_MEAN: &str = "critic/advantages/mean";
    /// Mean response length in tokens.
    pub const RESPONSE_LENGTH_MEAN: &str = "response_length/mean";
    /// Fraction of responses cut at `max_response_length`.
    pub const RESPONSE_LENGTH_CLIP_RATIO: &str = "response_length/clip_ratio";
    /// Validation mean reward.
    pub const VAL_REWARD_SCORE: &str = "val/reward_score";
    /// Seconds per training step.
    pub const TIME_PER_STEP: &str = "perf/time_per_step";

    /// Validation score of one data source (`val/test_score/{data_source}`).
    pub fn val_test_score(data_source: &str) -> String {
        format!("val/test_score/{data_source}")
    }

    /// Training-batch mean reward of one DRPO domain (ours; the reference logs no per-domain
    /// training reward): `reward_by_domain/{domain}`.
    pub fn domain_reward(domain: &str) -> String {
        format!("reward_by_domain/{domain}")
    }
}

/// Errors of the metrics log; each names the file (and the line when one is bad).
#[derive(Debug, thiserror::Error)]
pub enum MetricsLogError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing the TensorBoard events failed.
    #[error(transparent)]
    Tensorboard(#[from] crate::tensorboard::TensorboardError),
    /// A complete (newline-terminated) line is not a metrics record.
    #[error("{path}:{line}: {reason}")]
    BadLine {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, MetricsLogError>;

/// One step's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRecord {
    /// Global training step.
    pub step: u64,
    /// Seconds since the Unix epoch when the step finished.
    pub wall_time: f64,
    /// Metric name (spec §12 spelling) to value.
    pub metrics: BTreeMap<String, f64>,
}

impl MetricsRecord {
    /// The record as one JSON line (no newline).
    pub fn to_json_line(&self) -> String {
        let metrics: Map<String, Value> = self
            .metrics
            .iter()
            .map(|(k, &v)| {
                let v = serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
                (k.clone(), v)
            })
            .collect();
        let mut obj = Map::new();
        obj.insert("step".into(), Value::from(self.step));
        obj.insert(
            "wall_time".into(),
            serde_json::Number::from_f64(self.wall_time).map_or(Value::Null, Value::Number),
        );
        obj.insert("metrics".into(), Value::Object(metrics));
        Value::Object(obj).to_string()
    }

    /// Parses one line written by [`MetricsRecord::to_json_line`].
    pub fn from_json_line(line: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        let step = obj
            .get("step")
            .and_then(Value::as_u64)
            .ok_or("missing or non-integer \"step\"")?;
        let wall_time = obj
            .get("wall_time")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        let m = obj
            .get("metrics")
            .and_then(Value::as_object)
            .ok_or("missing \"metrics\" object")?;
        let mut metrics = BTreeMap::new();
        for (k, v) in m {
            let x = match v {
                Value::Null => f64::NAN,
                Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
                other => return Err(format!("metric {k:?} is not a number: {other}")),
            };
            metrics.insert(k.clone(), x);
        }
        Ok(Self {
            step,
            wall_time,
            metrics,
        })
    }
}

/// Reads every complete line of a log. A last line without its newline (a torn write) is
/// ignored; a bad complete line is an error naming its line number.
pub fn read_records(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path).map_err(|source| MetricsLogError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_complete_lines(path, &text).map(|(records, _)| records)
}

/// Records of the complete lines and the byte length they cover.
fn parse_complete_lines(path: &Path, text: &str) -> Result<(Vec<MetricsRecord>, usize)> {
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    let mut records = Vec::new();
    for (i, line) in text[..complete].lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = MetricsRecord::from_json_line(line).map_err(|reason| MetricsLogError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        })?;
        records.push(r);
    }
    Ok((records, complete))
}

/// An open `metrics.jsonl`, appending one flushed line per step.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Creates (or empties) the log for a fresh run.
    pub fn create(path: &Path) -> Result<Self> {
        let io = |source| MetricsLogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Opens the log of a resumed run: drops a torn last line and every line with a step above
    /// `resume_step` (`None` keeps them all), and returns the kept records. A missing file is
    /// created empty.
    pub fn resume(path: &Path, resume_step: Option<u64>) -> Result<(Self, Vec<MetricsRecord>)> {
        let io = |source| MetricsLogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let (mut records, complete) = parse_complete_lines(path, &text)?;
        let keep_len = match resume_step {
            Some(s) if records.iter().any(|r| r.step > s) => {
                records.retain(|r| r.step <= s);
                let kept: String = records.iter().map(|r| r.to_json_line() + "\n").collect();
                std::fs::write(path, &kept).map_err(io)?;
                kept.len()
            }
            _ => complete,
        };
        if keep_len < text.len() && keep_len == complete {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = text.len() - complete,
                "dropping a torn last line of the metrics log"
            );
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        file.set_len(keep_len as u64).map_err(io)?;
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok((
            Self {
                path: path.to_path_buf(),
                out: BufWriter::new(file),
            },
            records,
        ))
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and flushes it to the file.
    pub fn append(&mut self, record: &MetricsRecord) -> Result<()> {
        let io = |source| MetricsLogError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = record.to_json_line();
        line.push('\n');
        self.out.write_all(line.as_bytes()).map_err(io)?;
        self.out.flush().map_err(io)
    }
}

/// Both sinks of a run directory: `RUN_DIR/metrics.jsonl` and, when enabled, TensorBoard events
/// under `RUN_DIR/tensorboard/`.
#[derive(Debug)]
pub struct RunLog {
    jsonl: MetricsLog,
    events: Option<crate::tensorboard::EventWriter>,
}

impl RunLog {
    /// Opens the sinks of `run_dir` (created if needed). `resume_step` is the step of the
    /// checkpoint a resumed run starts from (`None` for a fresh run, which empties the log);
    /// returns the metrics records kept from earlier steps. A resumed run starts a new event file
    /// that begins with a session-start marker at `resume_step + 1`, so TensorBoard hides the
    /// killed run's later events.
    pub fn open(
        run_dir: &Path,
        tensorboard: bool,
        resume_step: Option<u64>,
    ) -> Result<(Self, Vec<MetricsRecord>)> {
        std::fs::create_dir_all(run_dir).map_err(|source| MetricsLogError::Io {
            path: run_dir.to_path_buf(),
            source,
        })?;
        let path = run_dir.join("metrics.jsonl");
        let (jsonl, kept) = match resume_step {
            Some(_) => MetricsLog::resume(&path, resume_step)?,
            None => (MetricsLog::create(&path)?, Vec::new()),
        };
        let events = if tensorboard {
            let mut w = crate::tensorboard::EventWriter::create(&run_dir.join("tensorboard"))?;
            if let Some(s) = resume_step {
                // TensorBoard drops the killed run's events from step s + 1 on.
                w.add_session_start(s as i64 + 1)?;
                w.flush()?;
            }
            Some(w)
        } else {
            None
        };
        Ok((Self { jsonl, events }, kept))
    }

    /// Logs one step to every sink (stamped now) and flushes them.
    pub fn log(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        let record = MetricsRecord {
            step,
            wall_time: crate::tensorboard::now_wall_time(),
            metrics: metrics.clone(),
        };
        self.jsonl.append(&record)?;
        if let Some(ev) = &mut self.events {
            ev.add_scalars_at(
                record.wall_time,
                step as i64,
                metrics.iter().map(|(k, &v)| (k.as_str(), v)),
            )?;
            ev.flush()?;
        }
        Ok(())
    }

    /// The event file, when TensorBoard is on.
    pub fn event_file(&self) -> Option<&Path> {
        self.events.as_ref().map(|e| e.path())
    }
}

/// Every metric as a `(step, value)` series, steps in file order.
pub fn series(records: &[MetricsRecord]) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        for (k, &v) in &r.metrics {
            out.entry(k.clone()).or_default().push((r.step as f64, v));
        }
    }
    out
}

/// The metric names of the evaluation report (`qoq_eval::metrics`), last path segment.
const EVAL_METRICS: [&str; 8] = [
    "accuracy",
    "f1",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
    "exact_match",
    "mean_iou",
];

/// The chart a metric belongs to: `reward` (the `reward/*` components and the mean score),
/// `reward_by_domain`, `val_score_by_domain` (`val/test_score/*`), `val`, `kl` (`actor/kl_loss`,
/// `actor/ppo_kl`, `actor/kl_coef`), `loss` (`actor/pg_loss`, `actor/entropy_loss`),
/// `clipfrac`, `grad_norm`, `lr`, `advantages` (`critic/advantages|returns/*`), `length`
/// (`response_length/*`, `prompt_length/*`), else the metric's first path segment.
pub fn metric_group(name: &str) -> String {
    let first = name.split('/').next().unwrap_or(name);
    let group = match name {
        "actor/kl_loss" | "actor/ppo_kl" | "actor/kl_coef" | "critic/kl" => "kl",
        "actor/pg_loss" | "actor/entropy_loss" => "loss",
        "actor/pg_clipfrac_higher" | "actor/pg_clipfrac_lower" => "clipfrac",
        "actor/grad_norm" => "grad_norm",
        "actor/lr" => "lr",
        "critic/score/mean" | "critic/rewards/mean" => "reward",
        _ if name.starts_with("val/test_score/") => "val_score_by_domain",
        _ if name.ends_with("/count")
            || name.ends_with("/iou_count")
            || name.ends_with("/num_classes") =>
        {
            "val_counts"
        }
        _ if name.starts_with("critic/advantages/") || name.starts_with("critic/returns/") => {
            "advantages"
        }
        _ if name.starts_with("critic/score/") || name.starts_with("critic/rewards/") => {
            "score_range"
        }
        _ => match first {
            "response_length" | "prompt_length" => "length",
            other => other,
        },
    };
    // `drpo/{domain}/{stat}`: one chart per statistic, one line per domain; the evaluation
    // metrics per dataset and domain (`{src}/{ds}/{metric}`, `{src}/{metric}`): one chart per
    // metric.
    let last = name.rsplit('/').next().unwrap_or(name);
    let segments = name.split('/').count();
    let owned;
    let group = if first == "drpo" && segments == 3 {
        owned = format!("drpo_{last}");
        owned.as_str()
    } else if first != "val" && (2..=3).contains(&segments) && EVAL_METRICS.contains(&last) {
        owned = format!("val_{last}");
        owned.as_str()
    } else {
        group
    };
    group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Metric names grouped by [`metric_group`], groups and names sorted.
pub fn metric_groups<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in names {
        out.entry(metric_group(n)).or_default().push(n.to_string());
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, pairs: &[(&str, f64)]) -> MetricsRecord {
        MetricsRecord {
            step,
            wall_time: 1000.0 + step as f64,
            metrics: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn lines_round_trip_and_non_finite_values_become_nan() {
        let r = rec(
            3,
            &[(names::PG_LOSS, 0.25), (names::GRAD_NORM, f64::INFINITY)],
        );
        let line = r.to_json_line();
        assert!(line.contains("\"actor/grad_norm\":null"), "{line}");
        let back = MetricsRecord::from_json_line(&line).unwrap();
        assert_eq!(back.step, 3);
        assert_eq!(back.metrics[names::PG_LOSS], 0.25);
        assert!(back.metrics[names::GRAD_NORM].is_nan());
    }

    #[test]
    fn resume_drops_a_torn_line_and_steps_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        for s in 1..=4 {
            log.append(&rec(s, &[(names::REWARD_OVERALL, s as f64 / 10.0)]))
                .unwrap();
        }
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\": 5, \"wall_ti").unwrap();
        drop(f);
        // the torn line alone
        let (mut log, kept) = MetricsLog::resume(&path, None).unwrap();
        assert_eq!(kept.len(), 4);
        log.append(&rec(5, &[(names::REWARD_OVERALL, 0.5)]))
            .unwrap();
        drop(log);
        let steps: Vec<u64> = read_records(&path)
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5]);
        // a checkpoint at step 2: steps 3..5 will be redone
        let (mut log, kept) = MetricsLog::resume(&path, Some(2)).unwrap();
        assert_eq!(kept.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2]);
        log.append(&rec(3, &[(names::REWARD_OVERALL, 0.33)]))
            .unwrap();
        drop(log);
        let records = read_records(&path).unwrap();
        let s = series(&records);
        assert_eq!(
            s[names::REWARD_OVERALL],
            vec![(1.0, 0.1), (2.0, 0.2), (3.0, 0.33)]
        );
    }

    #[test]
    fn run_log_writes_both_sinks_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, kept) = RunLog::open(dir.path(), true, None).unwrap();
        assert!(kept.is_empty());
        for s in 1..=3u64 {
            let m: BTreeMap<String, f64> = [(names::PG_LOSS.to_string(), s as f64)].into();
            log.log(s, &m).unwrap();
        }
        let events = crate::tensorboard::read_events(log.event_file().unwrap()).unwrap();
        assert_eq!(
            events.scalars.iter().map(|e| e.step).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        drop(log);
        let (_, kept) = RunLog::open(dir.path(), false, Some(2)).unwrap();
        assert_eq!(kept.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2]);
        let records = read_records(&dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(records.len(), 2);
    }

    #[test]
    fn a_bad_complete_line_names_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, format!("{}\n[1]\n", rec(1, &[]).to_json_line())).unwrap();
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2"), "{e}");
    }

    #[test]
    fn metrics_are_grouped_into_the_reference_charts() {
        let g = metric_groups([
            names::PG_LOSS,
            names::ENTROPY_LOSS,
            names::KL_LOSS,
            names::PPO_KL,
            names::LR,
            names::REWARD_OVERALL,
            names::SCORE_MEAN,
            "val/test_score/chest x-ray",
            "reward_by_domain/vindr",
            "perf/time_per_step",
        ]);
        assert_eq!(g["loss"], vec![names::ENTROPY_LOSS, names::PG_LOSS]);
        assert_eq!(g["kl"], vec![names::KL_LOSS, names::PPO_KL]);
        assert_eq!(g["lr"], vec![names::LR]);
        assert_eq!(g["reward"], vec![names::SCORE_MEAN, names::REWARD_OVERALL]);
        assert_eq!(g["val_score_by_domain"], vec!["val/test_score/chest x-ray"]);
        assert_eq!(g["reward_by_domain"], vec!["reward_by_domain/vindr"]);
        assert_eq!(g["perf"], vec!["perf/time_per_step"]);
    }
}
