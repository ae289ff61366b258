//! Reward functions (spec §8): the QoQ medical reward
//! (`examples/reward_function/medical.py::medical_compute_score`) behind a [`RewardFn`] trait.
//!
//! * [`text`]: `\boxed{}` extraction ([`extract_boxed`]), condition sets ([`parse_conditions`]),
//!   set F1 (spec §8.1-8.3). `qoq-eval` uses the same parsing for its metrics (§8.9).
//! * [`format`]: the graded JSON-bbox format score (§8.4).
//! * [`iou`]: fenced-JSON box extraction and IoU against a mask (summed-area table) or a box (§8.6).
//! * [`medical`]: [`QoqMedicalReward`] with `compat = reference | fixed`, weights presets (§8.7),
//!   [`MedicalConfig::paper`].
//! * [`paper`]: the paper's binary box-per-label format reward and visual-coherence reward.
//! * [`reward`]: the [`RewardFn`] trait, [`RewardConfig`] (`#[serde(tag = "type")]`), `weighted`.
//! * [`pyvalue`]: Python's `json.loads` and `ast.literal_eval` on model output.
//!
//! Every scoring function is total: any UTF-8 response gives finite components in [0, 1].

pub mod error;
pub mod format;
pub mod iou;
pub mod mask_io;
pub mod medical;
pub mod paper;
pub mod pyvalue;
pub mod reward;
pub mod text;

pub use error::{Error, Result};
pub use iou::{IouReduce, MaskIndex};
pub use mask_io::load_mask_image;
pub use medical::{Compat, MedicalConfig, QoqMedicalReward, WeightPreset, Weights, WeightsConfig};
pub use paper::{FormatReward, box_per_label_score, coherence_score, coherence_views};
pub use reward::{MedicalStandard, RewardConfig, RewardFn, RewardInput, Weighted, WeightedPart};
pub use text::{extract_boxed, parse_conditions};
