//! One-vs-rest confusion counts and per-class metrics (spec §8.9,
//! `evaluation.py::compute_confusion_matrices` and `compute_class_metrics`).

use serde::{Deserialize, Serialize};

/// Streaming one-vs-rest counts of one class over a dataset's samples. True negatives are not
/// stored: every sample that is not a TP, FP or FN for the class is a TN, so
/// `tn = n_samples - tp - fp - fn` (the reference counts them one by one; same numbers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCounts {
    /// Samples whose gold and predicted sets both hold the class.
    pub tp: u64,
    /// Samples that predict the class without it being gold.
    pub fp: u64,
    /// Samples with the class gold but not predicted.
    pub fn_: u64,
}

impl ClassCounts {
    /// Number of samples whose gold set holds the class (the reference's `count`).
    pub fn gold_count(&self) -> u64 {
        self.tp + self.fn_
    }

    /// Add another accumulator's counts.
    pub fn add(&mut self, other: &ClassCounts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
    }

    /// The full confusion matrix over `n_samples` samples.
    pub fn confusion(&self, n_samples: u64) -> Confusion {
        Confusion {
            tp: self.tp,
            fp: self.fp,
            fn_: self.fn_,
            tn: n_samples - self.tp - self.fp - self.fn_,
        }
    }
}

/// A one-vs-rest confusion matrix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// True positives.
    pub tp: u64,
    /// False positives.
    pub fp: u64,
    /// False negatives.
    #[serde(rename = "fn")]
    pub fn_: u64,
    /// True negatives.
    pub tn: u64,
}

/// `a / b`, or 0 when `b` is 0 (the reference's guard on every ratio).
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The metrics of one class (`compute_class_metrics`). Every ratio with a zero denominator is 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// TP / (TP + FP).
    pub precision: f64,
    /// TP / (TP + FN).
    pub recall: f64,
    /// Equal to `recall`.
    pub sensitivity: f64,
    /// TN / (TN + FP).
    pub specificity: f64,
    /// 2·P·R / (P + R).
    pub f1: f64,
    /// (TP + TN) / N.
    pub accuracy: f64,
    /// Samples with the class in their gold set.
    pub count: u64,
    /// The confusion matrix the ratios come from.
    pub confusion: Confusion,
}

impl ClassMetrics {
    /// Metrics from a confusion matrix.
    pub fn from_confusion(c: Confusion) -> Self {
        let (tp, fp, fn_, tn) = (c.tp as f64, c.fp as f64, c.fn_ as f64, c.tn as f64);
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        let specificity = ratio(tn, tn + fp);
        let f1 = ratio(2.0 * precision * recall, precision + recall);
        let accuracy = ratio(tp + tn, tp + tn + fp + fn_);
        Self {
            precision,
            recall,
            sensitivity: recall,
            specificity,
            f1,
            accuracy,
            count: c.tp + c.fn_,
            confusion: c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_metrics_follow_the_reference_formulas() {
        let m = ClassMetrics::from_confusion(Confusion {
            tp: 2,
            fp: 0,
            fn_: 1,
            tn: 1,
        });
        assert_eq!(m.precision, 1.0);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(m.sensitivity, m.recall);
        assert_eq!(m.specificity, 1.0);
        assert!((m.f1 - 0.8).abs() < 1e-15);
        assert_eq!(m.accuracy, 0.75);
        assert_eq!(m.count, 3);
    }

    #[test]
    fn zero_denominators_give_zero() {
        let m = ClassMetrics::from_confusion(Confusion {
            tp: 0,
            fp: 0,
            fn_: 3,
            tn: 0,
        });
        assert_eq!(
            (m.precision, m.recall, m.f1, m.specificity),
            (0.0, 0.0, 0.0, 0.0)
        );
        assert_eq!(m.accuracy, 0.0);
    }

    #[test]
    fn true_negatives_are_the_remaining_samples() {
        let c = ClassCounts {
            tp: 1,
            fp: 2,
            fn_: 3,
        };
        assert_eq!(c.confusion(10).tn, 4);
        assert_eq!(c.gold_count(), 4);
    }
}
