//! Early stopping in the loop ([`crate::early_stopping`] holds the rule): each validation after
//! a training step updates the record; a new best is checkpointed at its step (save step or
//! not), named in `<out_dir>/best_checkpoint.json` and an `events.jsonl` line, and protected
//! from `trainer.save_limit`'s rotation; a stop is checkpointed, logged with its reason and
//! recorded as an `early_stop` event, and ends [`Trainer::run`].

use super::{Result, Trainer, TrainerError};
use crate::early_stopping::{EarlyStoppingConfig, EarlyStoppingState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The pointer to the best checkpoint inside the run folder.
pub const BEST_CHECKPOINT_FILE: &str = "best_checkpoint.json";
/// Metric: the best value of the early-stopping metric so far (validation steps).
pub const EARLY_STOPPING_BEST: &str = "early_stopping/best";
/// Metric: the step of that best value.
pub const EARLY_STOPPING_BEST_STEP: &str = "early_stopping/best_step";
/// Metric: validations since the best without improvement.
pub const EARLY_STOPPING_BAD: &str = "early_stopping/bad_validations";

/// `best_checkpoint.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestCheckpoint {
    /// The checkpoint folder's name inside the run folder (`checkpoint_step_N`).
    pub checkpoint: String,
    /// Its step.
    pub step: u64,
    /// The early-stopping metric.
    pub metric: String,
    /// Its value at that step.
    pub value: f64,
}

/// The run folder's best checkpoint, when early stopping recorded one. A pointer to a folder
/// that is gone is an error naming both.
pub fn read_best(run_dir: &Path) -> Result<Option<BestCheckpoint>> {
    let p = run_dir.join(BEST_CHECKPOINT_FILE);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainerError::Config(format!("{}: {e}", p.display()))),
    };
    let best: BestCheckpoint = serde_json::from_str(&text)
        .map_err(|e| TrainerError::Config(format!("{}: {e}", p.display())))?;
    if !run_dir.join(&best.checkpoint).is_dir() {
        return Err(TrainerError::Config(format!(
            "{} names {}, which is not in {}",
            p.display(),
            best.checkpoint,
            run_dir.display()
        )));
    }
    Ok(Some(best))
}

/// The early-stopping record of a resumed run: the checkpoint's, when it tracks the configured
/// metric; a fresh one when early stopping was added by an override; a checkpoint tracking
/// another metric is refused.
pub(super) fn resumed_state(
    cfg: Option<&EarlyStoppingConfig>,
    saved: Option<EarlyStoppingState>,
    checkpoint: &Path,
) -> Result<Option<EarlyStoppingState>> {
    match (cfg, saved) {
        (None, _) => Ok(None),
        (Some(c), None) => Ok(Some(EarlyStoppingState::new(c))),
        (Some(c), Some(s)) if s.metric == c.metric => Ok(Some(s)),
        (Some(c), Some(s)) => Err(TrainerError::Config(format!(
            "trainer.early_stopping.metric: {} tracks `{}` (best {:?} at step {:?}); resuming \
             with `{}` would compare values of two metrics",
            checkpoint.display(),
            s.metric,
            s.best_value,
            s.best_step,
            c.metric
        ))),
    }
}

impl Trainer {
    /// Updates the early-stopping record with the validation metrics `m` of `step` (≥ 1) and
    /// logs its state into `m`. A missing metric is an error naming it.
    pub(super) fn observe_validation(
        &mut self,
        step: u64,
        m: &mut BTreeMap<String, f64>,
    ) -> Result<()> {
        let (Some(cfg), Some(state)) = (
            self.cfg.trainer.early_stopping.as_ref(),
            self.state.early_stopping.as_mut(),
        ) else {
            return Ok(());
        };
        let value = *m.get(&cfg.metric).ok_or_else(|| {
            TrainerError::Config(format!(
                "trainer.early_stopping.metric: the validation of step {step} has no `{}` (the \
                 validation set gives no such value, e.g. val/mean_iou without boxes or masks)",
                cfg.metric
            ))
        })?;
        let verdict = state.observe(cfg, step, value);
        tracing::info!(step, metric = %cfg.metric, value, ?verdict, "early stopping");
        if let Some(best) = state.best_value {
            m.insert(EARLY_STOPPING_BEST.into(), best);
        }
        if let Some(s) = state.best_step {
            m.insert(EARLY_STOPPING_BEST_STEP.into(), s as f64);
        }
        m.insert(EARLY_STOPPING_BAD.into(), state.bad_validations as f64);
        Ok(())
    }

    /// Whether the last step must be checkpointed for early stopping: a new best, or the stop.
    pub(super) fn early_stopping_saves(&self, step: u64) -> bool {
        self.state
            .early_stopping
            .as_ref()
            .is_some_and(|s| s.best_step == Some(step) || s.stopped_at == Some(step))
    }

    /// After a checkpoint of the current step: points `best_checkpoint.json` at it when it is
    /// the best (atomically) and records the event. Returns the best step (protected from
    /// rotation).
    pub(super) fn update_best_pointer(&self, dir: &Path) -> Result<Option<u64>> {
        let Some(s) = &self.state.early_stopping else {
            return Ok(None);
        };
        if s.best_step == Some(self.state.step)
            && let Some(value) = s.best_value
        {
            let best = BestCheckpoint {
                checkpoint: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                step: self.state.step,
                metric: s.metric.clone(),
                value,
            };
            let p = self.out_dir.join(BEST_CHECKPOINT_FILE);
            let tmp = self.out_dir.join(format!(".{BEST_CHECKPOINT_FILE}.tmp"));
            let text = serde_json::to_string_pretty(&best).expect("serialises") + "\n";
            std::fs::write(&tmp, text)
                .and_then(|_| std::fs::rename(&tmp, &p))
                .map_err(|e| TrainerError::Config(format!("{}: {e}", p.display())))?;
            crate::run_dir::append_event(
                &self.out_dir,
                &serde_json::json!({
                    "event": "best_checkpoint",
                    "time": crate::run_dir::utc_now(),
                    "best": best,
                }),
            )?;
        }
        Ok(s.best_step)
    }

    /// Logs the stop and appends the `early_stop` event (after its checkpoint is written).
    pub(super) fn record_stop(&self) -> Result<()> {
        let (Some(cfg), Some(s)) = (&self.cfg.trainer.early_stopping, &self.state.early_stopping)
        else {
            return Ok(());
        };
        let reason = s.reason(cfg);
        tracing::info!(step = self.state.step, "{reason}");
        if !self.writes() {
            return Ok(());
        }
        crate::run_dir::append_event(
            &self.out_dir,
            &serde_json::json!({
                "event": "early_stop",
                "time": crate::run_dir::utc_now(),
                "step": self.state.step,
                "reason": reason,
                "state": s,
            }),
        )?;
        Ok(())
    }

    /// Whether the run is over: every configured step taken, or early stopping stopped it.
    pub fn is_finished(&self) -> bool {
        self.state.step >= self.total_steps() || self.stop_reason().is_some()
    }

    /// Why early stopping ended the run, when it did.
    pub fn stop_reason(&self) -> Option<String> {
        let cfg = self.cfg.trainer.early_stopping.as_ref()?;
        let s = self.state.early_stopping.as_ref()?;
        s.stopped_at.map(|_| s.reason(cfg))
    }

    /// The early-stopping record (best value and step, bad validations, the stop).
    pub fn early_stopping(&self) -> Option<&EarlyStoppingState> {
        self.state.early_stopping.as_ref()
    }

    /// The checkpoint of the best validation so far (early stopping), when it was written.
    pub fn best_checkpoint(&self) -> Option<PathBuf> {
        let step = self.state.early_stopping.as_ref()?.best_step?;
        let dir = crate::checkpoint::checkpoint_dir(&self.out_dir, step);
        dir.is_dir().then_some(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_keeps_the_record_of_its_metric_and_refuses_another() {
        let c = EarlyStoppingConfig {
            metric: "val/f1".into(),
            mode: crate::early_stopping::StopMode::Max,
            patience: 2,
            min_delta: 0.0,
        };
        let mut s = EarlyStoppingState::new(&c);
        s.observe(&c, 2, 0.4);
        s.observe(&c, 4, 0.3);
        let ck = Path::new("run/checkpoint_step_4");
        let kept = resumed_state(Some(&c), Some(s.clone()), ck).unwrap();
        assert_eq!(kept, Some(s.clone()));
        assert_eq!(
            resumed_state(Some(&c), None, ck).unwrap(),
            Some(EarlyStoppingState::new(&c))
        );
        let mut other = c.clone();
        other.metric = "val/accuracy".into();
        let e = resumed_state(Some(&other), Some(s), ck)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`val/f1`") && e.contains("`val/accuracy`"),
            "{e}"
        );
    }
}
