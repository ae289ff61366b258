//! Evaluation with the paper's metric conventions (spec §8.9, §13; reference
//! `examples/reward_function/evaluation.py::compute_metrics_by_data_source`). Tensor-free.
//!
//! * [`answer`]: the evaluation's own answer extraction (first `\boxed{}`, else `[...]`, else the
//!   text) and condition sets via `qoq_reward::parse_conditions`.
//! * [`confusion`]: one-vs-rest confusion counts and per-class metrics.
//! * [`metrics`]: [`Prediction`], [`MetricsAccumulator`] (`push`, `merge`, `finish`) and
//!   [`MetricsReport`] (per dataset, per data source, `val`; `to_flat_json`, `to_markdown`).
//! * [`io`]: predictions JSONL reading with file/line errors.
//! * [`bootstrap`]: paired, seeded bootstrap intervals of the difference between two runs.
//! * [`run`]: resumable evaluation runs over a [`run::Responder`]: traces, metrics, report, charts.
//! * [`plot`]: PNG confusion matrices, grouped bars and line curves on a plain raster.
//!
//! ```
//! use qoq_eval::{Extraction, MetricsAccumulator, Prediction};
//! let mut acc = MetricsAccumulator::new(Extraction::Evaluation);
//! for (r, a) in [(r"\boxed{A}", "A"), (r"\boxed{B}", "B"), (r"\boxed{A, B}", "A"), (r"\boxed{C}", "A")] {
//!     acc.push(&Prediction {
//!         response: r.into(),
//!         answer: a.into(),
//!         data_source: "src".into(),
//!         dataset: "ds".into(),
//!         iou: None,
//!     });
//! }
//! let json = acc.finish().to_flat_json();
//! assert_eq!(json["val/precision"], 0.75);
//! assert_eq!(json["src/ds/accuracy"], 0.75);
//! ```

pub mod answer;
pub mod bootstrap;
pub mod confusion;
pub mod error;
pub mod io;
pub mod markdown;
pub mod metrics;
pub mod plot;
pub mod run;

pub use answer::{Extraction, extract_answer, gold_conditions, predicted_conditions};
pub use confusion::{ClassCounts, ClassMetrics, Confusion};
pub use error::{Error, Result};
pub use io::{accumulate_file, parse_prediction_line, read_predictions};
pub use metrics::{
    DatasetReport, MetricValues, MetricsAccumulator, MetricsReport, Prediction, SourceReport,
    Summary, compute_metrics,
};
