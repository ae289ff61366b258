//! Vocabulary types shared by every qoq-med-rs crate. No tensors, no I/O beyond serde.
//!
//! * [`sample`]: [`ClinicalSample`], the row of a training manifest after path resolution and
//!   the reference's `data_source` / `dataset` derivation (spec §2.1).
//! * [`domain`]: [`Domain`] (the clinical domain, the reference's `data_source`) and
//!   [`Modality`] (the kind of input: image, volume, ECG, text).
//! * [`rollout`]: [`Rollout`], [`RolloutGroup`] (owns its n rollouts, so no reordering can split a
//!   group), [`ScoredGroup`].
//! * [`reward`]: [`RewardScore`] with every component of the QoQ medical reward.
//! * [`mask`]: [`SegMask`], a binary/greyscale segmentation mask in pixel coordinates.
//! * [`hf_config`]: the HF `config.json` of Qwen2.5-VL / QoQ-Med (flat and nested layouts).

pub mod domain;
pub mod error;
pub mod hf_config;
pub mod mask;
pub mod reward;
pub mod rollout;
pub mod sample;

pub use domain::{Domain, Modality};
pub use error::{Error, Result};
pub use hf_config::{PreprocessorConfig, QwenVlConfig, TextConfig, VisionConfig};
pub use mask::SegMask;
pub use reward::RewardScore;
pub use rollout::{FinishReason, GroupId, Rollout, RolloutGroup, ScoredGroup};
pub use sample::{ClinicalSample, SampleId};
