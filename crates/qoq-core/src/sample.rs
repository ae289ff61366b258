//! A clinical sample: one manifest row, paths resolved, domain and dataset derived.

use crate::domain::{Domain, Modality};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Stable identifier of a sample: `"{manifest file stem}:{line}"` unless the manifest carries an
/// `id` field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SampleId(pub String);

impl std::fmt::Display for SampleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One training/evaluation case, in the released JSONL schema (spec §2.1) after the reference's
/// derivations: relative paths resolved against the manifest's folder, `data_source` = first path
/// component of the first image/video (or `ecg`), `dataset` = second component (or the row's
/// `dataset` for ECG-only rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClinicalSample {
    /// Stable id of the sample.
    pub id: SampleId,
    /// 1-based line number in the manifest it came from (0 for synthetic samples).
    #[serde(default)]
    pub line: u64,
    /// Question text; may contain `<image>` placeholders.
    pub problem: String,
    /// System message of the chat prompt (the manifest's `system` key); `None` gives the chat
    /// template's default system message, as the reference always has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Gold answer; multi-label answers are joined with `", "`.
    pub answer: String,
    /// 2D images, resolved paths.
    #[serde(default)]
    pub images: Vec<PathBuf>,
    /// 3D volumes / videos, resolved paths; each becomes sampled frames.
    #[serde(default)]
    pub videos: Vec<PathBuf>,
    /// ECG / time-series files, resolved paths. Only the first is used by the model.
    #[serde(default)]
    pub time_series: Vec<PathBuf>,
    /// Segmentation mask (image or label volume), resolved path.
    #[serde(default)]
    pub segmentation_path: Option<PathBuf>,
    /// Ground-truth box `[x_min, y_min, x_max, y_max]` in pixels of the original first image.
    #[serde(default)]
    pub bbox: Option<[f64; 4]>,
    /// The reference's `dataset` (DRPO's domain key in the released code).
    pub dataset: String,
    /// The reference's `data_source` (evaluation's domain).
    pub data_source: Domain,
    /// Every other manifest field, kept verbatim for rewards that want metadata.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ClinicalSample {
    /// The input kinds this sample carries (text is always present).
    pub fn modalities(&self) -> Vec<Modality> {
        let mut m = Vec::new();
        if !self.images.is_empty() {
            m.push(Modality::Image);
        }
        if !self.videos.is_empty() {
            m.push(Modality::Volume);
        }
        if !self.time_series.is_empty() {
            m.push(Modality::TimeSeries);
        }
        m.push(Modality::Text);
        m
    }

    /// The DRPO domain key under the released code's convention (`dataset`) or the paper's
    /// (`data_source`), or both joined as `data_source/dataset`.
    pub fn domain_key(&self, key: DomainKey) -> String {
        match key {
            DomainKey::Dataset => self.dataset.clone(),
            DomainKey::DataSource => self.data_source.as_source().to_string(),
            DomainKey::Both => format!("{}/{}", self.data_source.as_source(), self.dataset),
        }
    }
}

/// Which field identifies a DRPO domain (spec §16.2 `drpo.domain_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainKey {
    /// The released code's choice: the dataset name (`vindr` CXR and mammo collide).
    #[default]
    Dataset,
    /// The paper's choice: the clinical domain (modality folder).
    DataSource,
    /// `data_source/dataset`: no collisions.
    Both,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClinicalSample {
        ClinicalSample {
            id: SampleId("train:3".into()),
            line: 3,
            problem: "<image>\nAbove is a chest X-ray image of a patient.".into(),
            system: None,
            answer: "Pneumonia, Edema".into(),
            images: vec!["/d/chest_xray/vindr/a.png".into()],
            videos: vec![],
            time_series: vec![],
            segmentation_path: Some("/d/masks/a.png".into()),
            bbox: Some([1.0, 2.0, 30.5, 40.0]),
            dataset: "vindr".into(),
            data_source: Domain::ChestXray,
            extra: serde_json::Map::from_iter([("site".to_string(), serde_json::json!("A"))]),
        }
    }

    #[test]
    fn sample_round_trips_through_json() {
        let s = sample();
        let js = serde_json::to_string(&s).unwrap();
        let back: ClinicalSample = serde_json::from_str(&js).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn domain_key_follows_the_chosen_convention() {
        let s = sample();
        assert_eq!(s.domain_key(DomainKey::Dataset), "vindr");
        assert_eq!(s.domain_key(DomainKey::DataSource), "chest_xray");
        assert_eq!(s.domain_key(DomainKey::Both), "chest_xray/vindr");
        assert_eq!(s.modalities(), vec![Modality::Image, Modality::Text]);
    }
}
