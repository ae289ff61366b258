//! Learning-rate schedules over optimiser updates: HF's `get_constant_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (with verl's `min_lr_ratio`).

use serde::{Deserialize, Serialize};

/// Learning-rate schedule over optimiser updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// HF `get_constant_schedule_with_warmup` (the reference's, with warmup 0).
    Constant {
        #[serde(default)]
        warmup_steps: u64,
    },
    /// HF `get_cosine_schedule_with_warmup` (half a cosine) with a floor of `min_lr_ratio`.
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        #[serde(default)]
        min_lr_ratio: f64,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::Constant { warmup_steps: 0 }
    }
}

impl LrSchedule {
    /// The multiplier of the base learning rate for update number `step` (0-based), as the HF
    /// `LambdaLR` gives it: the first update of a warmup uses multiplier 0.
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant { warmup_steps } => {
                if step < warmup_steps {
                    step as f64 / warmup_steps.max(1) as f64
                } else {
                    1.0
                }
            }
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => {
                if step < warmup_steps {
                    return step as f64 / warmup_steps.max(1) as f64;
                }
                let progress = (step - warmup_steps) as f64
                    / (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (min_lr_ratio + (1.0 - min_lr_ratio) * cos).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_the_hf_lambdas() {
        let c = LrSchedule::Constant { warmup_steps: 4 };
        assert_eq!(
            (0..6).map(|s| c.factor(s)).collect::<Vec<_>>(),
            vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
        );
        let cos = LrSchedule::WarmupCosine {
            warmup_steps: 2,
            total_steps: 12,
            min_lr_ratio: 0.0,
        };
        assert_eq!(cos.factor(1), 0.5);
        assert_eq!(cos.factor(2), 1.0);
        assert!((cos.factor(7) - 0.5).abs() < 1e-12);
        assert!(cos.factor(12).abs() < 1e-12);
        let floor = LrSchedule::WarmupCosine {
            warmup_steps: 0,
            total_steps: 10,
            min_lr_ratio: 0.1,
        };
        assert!((floor.factor(10) - 0.1).abs() < 1e-12);
    }
}
