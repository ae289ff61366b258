//! Early stopping on a validation metric (`[trainer.early_stopping]`): the paper trains "one
//! epoch with early stopping" on the validation set (spec §11 table, §14 item 10); the released
//! code has none.
//!
//! Rule, checked at every validation after a training step (the `val_before_train` validation
//! of the initial weights is a baseline, not a candidate: there is no checkpoint of it to keep):
//! a value *improves* when it beats the best so far by more than `min_delta` (`value > best +
//! min_delta` with `mode = "max"`, `value < best − min_delta` with `"min"`; the first validation
//! always improves). An improvement makes its step the best and resets the count of bad
//! validations; any other value (a non-finite one included) adds one, and the run stops after
//! the validation that brings the count to `patience`. The [`EarlyStoppingState`] travels in
//! every checkpoint's `trainer_state.json`, so a resumed run continues the count.

use crate::metrics_log::names;
use serde::{Deserialize, Serialize};

/// Whether larger or smaller values of the metric are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// Larger is better (accuracy, F1, reward). Default.
    #[default]
    Max,
    /// Smaller is better.
    Min,
}

/// `[trainer.early_stopping]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingConfig {
    /// A validation metric of [`metric_names`], e.g. `val/f1`.
    pub metric: String,
    /// `max` (default) or `min`.
    #[serde(default)]
    pub mode: StopMode,
    /// Validations without improvement after which the run stops (at least 1).
    pub patience: u64,
    /// The margin an improvement must exceed. Default 0.
    #[serde(default)]
    pub min_delta: f64,
}

/// Reward components the QoQ reward reports (`val/{name}_reward`), the coherence term included.
const REWARD_COMPONENTS: [&str; 6] = [
    "overall",
    "standard_score",
    "iou_score",
    "format_score",
    "length_score",
    "coherence_score",
];

/// Every validation metric early stopping accepts: the overall ones of
/// [`crate::trainer::Trainer::validate`] (`val/reward_score`, `val/{component}_reward`, and the
/// evaluation metrics of spec §8.9, `val/{precision,recall,sensitivity,specificity,f1,accuracy,
/// exact_match,mean_iou}`). Per-source and per-dataset metrics depend on the data and are not
/// offered.
pub fn metric_names() -> Vec<String> {
    let mut out = vec![names::VAL_REWARD_SCORE.to_string()];
    out.extend(REWARD_COMPONENTS.iter().map(|c| format!("val/{c}_reward")));
    out.extend(
        qoq_eval::metrics::MetricValues::NAMES
            .iter()
            .chain(&["exact_match", "mean_iou"])
            .map(|m| format!("val/{m}")),
    );
    out
}

impl EarlyStoppingConfig {
    /// Range checks; the error is the reason (the caller names the field).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let valid = metric_names();
        if !valid.contains(&self.metric) {
            return Err((
                "trainer.early_stopping.metric",
                format!(
                    "`{}` is not a validation metric; valid: {}",
                    self.metric,
                    valid.join(", ")
                ),
            ));
        }
        if self.patience == 0 {
            return Err((
                "trainer.early_stopping.patience",
                "must be at least 1".into(),
            ));
        }
        if !(self.min_delta >= 0.0 && self.min_delta.is_finite()) {
            return Err((
                "trainer.early_stopping.min_delta",
                format!("{} is not a finite value ≥ 0", self.min_delta),
            ));
        }
        Ok(())
    }
}

/// What one validation did to the early-stopping state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A new best: its step's checkpoint is the one to keep.
    Improved,
    /// No improvement; the run goes on.
    NotImproved,
    /// No improvement, and `patience` validations in a row without one: stop.
    Stop,
}

/// The early-stopping record of a run, saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingState {
    /// The metric the state tracks (a resume with another metric is refused).
    pub metric: String,
    /// The best value so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_value: Option<f64>,
    /// The step of the best value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<u64>,
    /// Validations since the best without improvement.
    pub bad_validations: u64,
    /// The step after which the run stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<u64>,
}

impl EarlyStoppingState {
    /// A fresh record for `cfg`.
    pub fn new(cfg: &EarlyStoppingConfig) -> Self {
        Self {
            metric: cfg.metric.clone(),
            best_value: None,
            best_step: None,
            bad_validations: 0,
            stopped_at: None,
        }
    }

    /// Records the validation of `step` with `value`.
    pub fn observe(&mut self, cfg: &EarlyStoppingConfig, step: u64, value: f64) -> Verdict {
        let improved = value.is_finite()
            && match self.best_value {
                None => true,
                Some(best) => match cfg.mode {
                    StopMode::Max => value > best + cfg.min_delta,
                    StopMode::Min => value < best - cfg.min_delta,
                },
            };
        if improved {
            self.best_value = Some(value);
            self.best_step = Some(step);
            self.bad_validations = 0;
            return Verdict::Improved;
        }
        self.bad_validations += 1;
        if self.bad_validations >= cfg.patience {
            self.stopped_at = Some(step);
            Verdict::Stop
        } else {
            Verdict::NotImproved
        }
    }

    /// The logged reason of a stop.
    pub fn reason(&self, cfg: &EarlyStoppingConfig) -> String {
        format!(
            "early stopping: {} did not improve by more than {} ({}) in {} validation(s); best {} at step {}",
            cfg.metric,
            cfg.min_delta,
            match cfg.mode {
                StopMode::Max => "max",
                StopMode::Min => "min",
            },
            self.bad_validations,
            self.best_value
                .map_or_else(|| "none".to_string(), |v| format!("{v}")),
            self.best_step
                .map_or_else(|| "none".to_string(), |s| s.to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: StopMode, patience: u64, min_delta: f64) -> EarlyStoppingConfig {
        EarlyStoppingConfig {
            metric: "val/f1".into(),
            mode,
            patience,
            min_delta,
        }
    }

    #[test]
    fn the_run_stops_after_patience_validations_without_an_improvement_beyond_min_delta() {
        let c = cfg(StopMode::Max, 2, 0.01);
        let mut s = EarlyStoppingState::new(&c);
        assert_eq!(s.observe(&c, 5, 0.50), Verdict::Improved);
        // +0.005 is within min_delta: not an improvement.
        assert_eq!(s.observe(&c, 10, 0.505), Verdict::NotImproved);
        // A real improvement resets the count.
        assert_eq!(s.observe(&c, 15, 0.60), Verdict::Improved);
        assert_eq!((s.best_step, s.bad_validations), (Some(15), 0));
        assert_eq!(s.observe(&c, 20, f64::NAN), Verdict::NotImproved);
        assert_eq!(s.observe(&c, 25, 0.55), Verdict::Stop);
        assert_eq!(s.stopped_at, Some(25));
        assert_eq!((s.best_step, s.best_value), (Some(15), Some(0.60)));
        let r = s.reason(&c);
        assert!(r.contains("val/f1") && r.contains("step 15"), "{r}");
    }

    #[test]
    fn min_mode_wants_smaller_values() {
        let c = cfg(StopMode::Min, 1, 0.0);
        let mut s = EarlyStoppingState::new(&c);
        assert_eq!(s.observe(&c, 1, 2.0), Verdict::Improved);
        assert_eq!(s.observe(&c, 2, 1.5), Verdict::Improved);
        assert_eq!(s.observe(&c, 3, 1.5), Verdict::Stop);
        assert_eq!(s.best_step, Some(2));
    }

    #[test]
    fn unknown_metrics_are_refused_listing_the_valid_ones() {
        let mut c = cfg(StopMode::Max, 1, 0.0);
        c.metric = "val/f2".into();
        let (field, msg) = c.validate().unwrap_err();
        assert_eq!(field, "trainer.early_stopping.metric");
        assert!(
            msg.contains("`val/f2`") && msg.contains("val/f1") && msg.contains("val/reward_score")
        );
        for m in metric_names() {
            c.metric = m;
            c.validate().unwrap();
        }
        c.patience = 0;
        assert_eq!(
            c.validate().unwrap_err().0,
            "trainer.early_stopping.patience"
        );
    }
}
