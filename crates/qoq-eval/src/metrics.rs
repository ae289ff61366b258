//! Hierarchical metrics: class → dataset → data source → overall (spec §8.9,
//! `examples/reward_function/evaluation.py::compute_metrics_by_data_source`; paper App. D.2,
//! Eq. 12–15).
//!
//! Per `(data_source, dataset)` every label seen in a gold answer or a prediction gets a
//! one-vs-rest confusion matrix over the dataset's samples. The dataset's precision, recall,
//! sensitivity, specificity, F1 and accuracy are unweighted means over the classes whose gold
//! count is > 0; a data source averages its datasets, `val/*` averages the data sources.
//! Beside these reference metrics the report carries exact-match accuracy (predicted set equal to
//! the gold set), mean IoU over the samples that carry one, and counts, aggregated the same way.

use crate::answer::{Extraction, gold_conditions, predicted_conditions};
use crate::confusion::{ClassCounts, ClassMetrics};
use qoq_core::{ClinicalSample, Domain};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One line of a predictions file: a model response with its sample's gold answer and grouping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The model's full response text.
    pub response: String,
    /// The gold answer (multi-label answers joined by `", "`).
    pub answer: String,
    /// The clinical domain (the reference's `data_source`), verbatim.
    pub data_source: String,
    /// The dataset inside the domain.
    pub dataset: String,
    /// IoU of the response's boxes against the sample's mask or box, where the sample has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iou: Option<f64>,
}

impl Prediction {
    /// A prediction for `sample`, grouped by its `data_source` and `dataset`.
    pub fn from_sample(sample: &ClinicalSample, response: impl Into<String>) -> Self {
        Self {
            response: response.into(),
            answer: sample.answer.clone(),
            data_source: sample.data_source.as_source().to_string(),
            dataset: sample.dataset.clone(),
            iou: None,
        }
    }
}

/// The six averaged metrics of the reference, in its key order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricValues {
    /// Mean per-class precision.
    pub precision: f64,
    /// Mean per-class recall.
    pub recall: f64,
    /// Mean per-class sensitivity (equal to recall).
    pub sensitivity: f64,
    /// Mean per-class specificity.
    pub specificity: f64,
    /// Mean per-class F1 (the paper's macro-F1).
    pub f1: f64,
    /// Mean per-class one-vs-rest accuracy (the paper's "balanced accuracy", Eq. 12).
    pub accuracy: f64,
}

impl MetricValues {
    /// The metric names, as they end the reference's keys.
    pub const NAMES: [&'static str; 6] = [
        "precision",
        "recall",
        "sensitivity",
        "specificity",
        "f1",
        "accuracy",
    ];

    /// The values in [`Self::NAMES`] order.
    pub fn values(&self) -> [f64; 6] {
        [
            self.precision,
            self.recall,
            self.sensitivity,
            self.specificity,
            self.f1,
            self.accuracy,
        ]
    }

    fn from_values(v: [f64; 6]) -> Self {
        Self {
            precision: v[0],
            recall: v[1],
            sensitivity: v[2],
            specificity: v[3],
            f1: v[4],
            accuracy: v[5],
        }
    }

    /// Unweighted mean, summing in iteration order as the reference does; zeros when empty.
    fn mean<'a>(items: impl Iterator<Item = [f64; 6]> + 'a) -> Self {
        let mut sum = [0.0; 6];
        let mut n = 0usize;
        for v in items {
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
            n += 1;
        }
        if n > 0 {
            for s in &mut sum {
                *s /= n as f64;
            }
        }
        Self::from_values(sum)
    }
}

/// The metrics of one level (dataset, data source or overall).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The reference's six metrics.
    pub metrics: MetricValues,
    /// Fraction of samples whose predicted condition set equals the gold set (a dataset's
    /// fraction; above it, the unweighted mean over the children, like the reference metrics).
    pub exact_match: f64,
    /// Mean IoU over the samples that carry one (above a dataset: mean over the children that
    /// have one); `None` where no sample does.
    pub mean_iou: Option<f64>,
    /// Number of samples (summed over children).
    pub count: u64,
    /// Number of samples with an IoU (summed over children).
    pub iou_count: u64,
}

impl Summary {
    /// Unweighted mean over children summaries (counts summed).
    fn mean_of<'a>(children: impl Iterator<Item = &'a Summary> + Clone) -> Self {
        let metrics = MetricValues::mean(children.clone().map(|s| s.metrics.values()));
        let (mut em, mut n) = (0.0, 0usize);
        let (mut iou, mut n_iou) = (0.0, 0usize);
        let (mut count, mut iou_count) = (0, 0);
        for s in children {
            em += s.exact_match;
            n += 1;
            if let Some(v) = s.mean_iou {
                iou += v;
                n_iou += 1;
            }
            count += s.count;
            iou_count += s.iou_count;
        }
        Self {
            metrics,
            exact_match: if n > 0 { em / n as f64 } else { 0.0 },
            mean_iou: (n_iou > 0).then(|| iou / n_iou as f64),
            count,
            iou_count,
        }
    }
}

/// Metrics of one `(data_source, dataset)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetReport {
    /// Dataset name.
    pub name: String,
    /// Dataset-level metrics (zeros when no class has a gold sample, as in the reference).
    pub summary: Summary,
    /// Classes with gold count > 0 (the ones averaged).
    pub active_classes: usize,
    /// Size of the class universe (labels in gold answers or predictions).
    pub labels: usize,
    /// Per-class metrics of the active classes, by label.
    pub classes: BTreeMap<String, ClassMetrics>,
}

/// Metrics of one data source (clinical domain).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceReport {
    /// The `data_source` string.
    pub name: String,
    /// Its datasets, in order of first appearance.
    pub datasets: Vec<DatasetReport>,
    /// Mean over the datasets with an active class; `None` if there is none (the reference then
    /// writes no `{src}/*` keys).
    pub summary: Option<Summary>,
}

/// The whole report: per dataset, per data source, overall.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReport {
    /// The answer extraction used.
    pub extraction: Extraction,
    /// Data sources in order of first appearance.
    pub sources: Vec<SourceReport>,
    /// Mean over the data sources that have a summary (`val/*`); `None` without any.
    pub overall: Option<Summary>,
}

impl MetricsReport {
    /// Mean over the data sources accepted by `keep` (unweighted, like `val/*`); `None` when no
    /// kept source has a summary.
    pub fn overall_where(&self, keep: impl Fn(&str) -> bool) -> Option<Summary> {
        let kept = self
            .sources
            .iter()
            .filter(|s| keep(&s.name))
            .filter_map(|s| s.summary.as_ref());
        (kept.clone().count() > 0).then(|| Summary::mean_of(kept))
    }

    /// The paper's "Overall": the mean over the 8 vision domains only, ECG and the MIMIC-IV
    /// fusion tasks excluded (spec §13; `val/*` averages every data source instead).
    pub fn overall_vision(&self) -> Option<Summary> {
        self.overall_where(|s| Domain::from_source(s).is_vision())
    }

    /// Every metric as a flat `(key, value)` list in the reference's key scheme and order:
    /// `{src}/{ds}/{metric}` for each dataset, `{src}/{metric}` after a source's datasets,
    /// `val/{metric}` last. After the six reference metrics each level adds `exact_match`,
    /// `mean_iou` (only where defined), `count` and `iou_count`; datasets also `num_classes`.
    pub fn to_flat(&self) -> Vec<(String, f64)> {
        fn push_summary(out: &mut Vec<(String, f64)>, prefix: &str, s: &Summary) {
            for (name, v) in MetricValues::NAMES.iter().zip(s.metrics.values()) {
                out.push((format!("{prefix}/{name}"), v));
            }
            out.push((format!("{prefix}/exact_match"), s.exact_match));
            if let Some(v) = s.mean_iou {
                out.push((format!("{prefix}/mean_iou"), v));
            }
            out.push((format!("{prefix}/count"), s.count as f64));
            out.push((format!("{prefix}/iou_count"), s.iou_count as f64));
        }
        let mut out = Vec::new();
        for src in &self.sources {
            for ds in &src.datasets {
                let prefix = format!("{}/{}", src.name, ds.name);
                push_summary(&mut out, &prefix, &ds.summary);
                out.push((format!("{prefix}/num_classes"), ds.active_classes as f64));
            }
            if let Some(s) = &src.summary {
                push_summary(&mut out, &src.name, s);
            }
        }
        if let Some(s) = &self.overall {
            push_summary(&mut out, "val", s);
        }
        out
    }

    /// [`Self::to_flat`] as a JSON object (counts as integers, keys sorted).
    pub fn to_flat_json(&self) -> serde_json::Value {
        let map = self
            .to_flat()
            .into_iter()
            .map(|(k, v)| {
                let is_count = k.ends_with("/count")
                    || k.ends_with("/iou_count")
                    || k.ends_with("/num_classes");
                let value = if is_count {
                    serde_json::Value::from(v as u64)
                } else {
                    serde_json::Value::from(v)
                };
                (k, value)
            })
            .collect();
        serde_json::Value::Object(map)
    }
}

/// Streaming state of one dataset.
#[derive(Debug, Clone, Default)]
struct DatasetAcc {
    name: String,
    samples: u64,
    exact: u64,
    iou_sum: f64,
    iou_count: u64,
    classes: BTreeMap<String, ClassCounts>,
}

impl DatasetAcc {
    fn merge(&mut self, other: &DatasetAcc) {
        self.samples += other.samples;
        self.exact += other.exact;
        self.iou_sum += other.iou_sum;
        self.iou_count += other.iou_count;
        for (label, c) in &other.classes {
            self.classes.entry(label.clone()).or_default().add(c);
        }
    }

    fn report(&self) -> DatasetReport {
        let classes: BTreeMap<String, ClassMetrics> = self
            .classes
            .iter()
            .filter(|(_, c)| c.gold_count() > 0)
            .map(|(l, c)| {
                (
                    l.clone(),
                    ClassMetrics::from_confusion(c.confusion(self.samples)),
                )
            })
            .collect();
        let metrics = MetricValues::mean(classes.values().map(|m| {
            [
                m.precision,
                m.recall,
                m.sensitivity,
                m.specificity,
                m.f1,
                m.accuracy,
            ]
        }));
        let exact_match = if self.samples > 0 {
            self.exact as f64 / self.samples as f64
        } else {
            0.0
        };
        DatasetReport {
            name: self.name.clone(),
            summary: Summary {
                metrics,
                exact_match,
                mean_iou: (self.iou_count > 0).then(|| self.iou_sum / self.iou_count as f64),
                count: self.samples,
                iou_count: self.iou_count,
            },
            active_classes: classes.len(),
            labels: self.classes.len(),
            classes,
        }
    }
}

/// Streaming state of one data source.
#[derive(Debug, Clone, Default)]
struct SourceAcc {
    name: String,
    datasets: Vec<DatasetAcc>,
    index: HashMap<String, usize>,
}

impl SourceAcc {
    fn dataset(&mut self, name: &str) -> &mut DatasetAcc {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.datasets.push(DatasetAcc {
                    name: name.to_string(),
                    ..DatasetAcc::default()
                });
                self.index.insert(name.to_string(), self.datasets.len() - 1);
                self.datasets.len() - 1
            }
        };
        &mut self.datasets[i]
    }
}

/// Accumulates predictions and produces a [`MetricsReport`]. Memory grows with the number of
/// labels, not samples: each class keeps TP/FP/FN counts (TN follows from the sample count).
#[derive(Debug, Clone, Default)]
pub struct MetricsAccumulator {
    extraction: Extraction,
    sources: Vec<SourceAcc>,
    index: HashMap<String, usize>,
}

impl MetricsAccumulator {
    /// An empty accumulator that extracts predicted answers with `extraction`.
    pub fn new(extraction: Extraction) -> Self {
        Self {
            extraction,
            ..Self::default()
        }
    }

    /// The extraction this accumulator applies.
    pub fn extraction(&self) -> Extraction {
        self.extraction
    }

    /// Number of predictions pushed (or merged in).
    pub fn len(&self) -> u64 {
        self.sources
            .iter()
            .flat_map(|s| &s.datasets)
            .map(|d| d.samples)
            .sum()
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn source(&mut self, name: &str) -> &mut SourceAcc {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.sources.push(SourceAcc {
                    name: name.to_string(),
                    ..SourceAcc::default()
                });
                self.index.insert(name.to_string(), self.sources.len() - 1);
                self.sources.len() - 1
            }
        };
        &mut self.sources[i]
    }

    /// Count one prediction. A non-finite `iou` is ignored (file readers reject it earlier).
    pub fn push(&mut self, p: &Prediction) {
        let pred = predicted_conditions(&p.response, self.extraction);
        let gold = gold_conditions(&p.answer);
        self.push_conditions(&p.data_source, &p.dataset, &pred, &gold, p.iou);
    }

    /// Count one case whose predicted and gold condition sets are already extracted (a
    /// [`crate::run::Trace`]'s `predicted` and `gold`); [`Self::push`] extracts them first.
    pub fn push_conditions(
        &mut self,
        data_source: &str,
        dataset: &str,
        pred: &BTreeSet<String>,
        gold: &BTreeSet<String>,
        iou: Option<f64>,
    ) {
        let ds = self.source(data_source).dataset(dataset);
        ds.samples += 1;
        if pred == gold {
            ds.exact += 1;
        }
        if let Some(v) = iou.filter(|v| v.is_finite()) {
            ds.iou_sum += v;
            ds.iou_count += 1;
        }
        for label in gold {
            let c = ds.classes.entry(label.clone()).or_default();
            if pred.contains(label) {
                c.tp += 1;
            } else {
                c.fn_ += 1;
            }
        }
        for label in pred.difference(gold) {
            ds.classes.entry(label.clone()).or_default().fp += 1;
        }
    }

    /// Add another accumulator's counts (its new sources and datasets go after this one's).
    /// The counts are merged as they are, so both should use the same extraction; the result
    /// keeps this one's.
    pub fn merge(&mut self, other: MetricsAccumulator) {
        for src in &other.sources {
            let mine = self.source(&src.name);
            for ds in &src.datasets {
                mine.dataset(&ds.name).merge(ds);
            }
        }
    }

    /// The report of everything pushed so far.
    pub fn finish(&self) -> MetricsReport {
        let sources: Vec<SourceReport> = self
            .sources
            .iter()
            .map(|src| {
                let datasets: Vec<DatasetReport> =
                    src.datasets.iter().map(DatasetAcc::report).collect();
                let active = datasets
                    .iter()
                    .filter(|d| d.active_classes > 0)
                    .map(|d| &d.summary);
                let summary = (active.clone().count() > 0).then(|| Summary::mean_of(active));
                SourceReport {
                    name: src.name.clone(),
                    datasets,
                    summary,
                }
            })
            .collect();
        let active = sources.iter().filter_map(|s| s.summary.as_ref());
        let overall = (active.clone().count() > 0).then(|| Summary::mean_of(active));
        MetricsReport {
            extraction: self.extraction,
            sources,
            overall,
        }
    }
}

/// Metrics of a slice of predictions, accumulated in parallel chunks (same numbers as pushing them
/// in order, up to floating-point summation order of the IoU sums).
pub fn compute_metrics(predictions: &[Prediction], extraction: Extraction) -> MetricsReport {
    predictions
        .par_chunks(1024)
        .map(|chunk| {
            let mut acc = MetricsAccumulator::new(extraction);
            for p in chunk {
                acc.push(p);
            }
            acc
        })
        .reduce(
            || MetricsAccumulator::new(extraction),
            |mut a, b| {
                a.merge(b);
                a
            },
        )
        .finish()
}
