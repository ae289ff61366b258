//! Clinical domains (the reference's `data_source`) and input modalities.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The clinical domain of a sample: the reference's `data_source`, i.e. the first path component
/// of the first image/video path (`chest_xray/mimic-cxr/...` -> `chest_xray`), `ecg` for ECG-only
/// rows, `multimodal` for the MIMIC-IV fusion tasks (spec §2.1).
///
/// Serialised as the reference's `data_source` string, so manifests and metric keys round-trip.
/// Unknown strings are kept verbatim in [`Domain::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    Ecg,
    ChestXray,
    Mammography,
    Dermoscopy,
    Fundus,
    Pathology,
    Ct,
    Ultrasound,
    Mri,
    Multimodal,
    Other(String),
}

impl Domain {
    /// The 9 clinical domains in the paper's table order (Table 2: CXR, Mammo, Derm, CT, Fundus,
    /// US, MRI, Path), with ECG first as in Fig. 2b.
    pub const PAPER_ORDER: [Domain; 9] = [
        Domain::Ecg,
        Domain::ChestXray,
        Domain::Mammography,
        Domain::Dermoscopy,
        Domain::Ct,
        Domain::Fundus,
        Domain::Ultrasound,
        Domain::Mri,
        Domain::Pathology,
    ];

    /// Parse a `data_source` string. Accepts the reference's folder names and a few common aliases.
    pub fn from_source(s: &str) -> Domain {
        match s.trim().to_ascii_lowercase().as_str() {
            "ecg" => Domain::Ecg,
            "chest_xray" | "cxr" | "chest-xray" | "chestxray" => Domain::ChestXray,
            "mammo" | "mammography" => Domain::Mammography,
            "derm" | "dermoscopy" | "dermatology" => Domain::Dermoscopy,
            "fundus" => Domain::Fundus,
            "pathology" | "path" => Domain::Pathology,
            "ct" => Domain::Ct,
            "ultrasound" | "us" => Domain::Ultrasound,
            "mri" => Domain::Mri,
            "multimodal" => Domain::Multimodal,
            _ => Domain::Other(s.to_string()),
        }
    }

    /// The reference's `data_source` string (folder name).
    pub fn as_source(&self) -> &str {
        match self {
            Domain::Ecg => "ecg",
            Domain::ChestXray => "chest_xray",
            Domain::Mammography => "mammo",
            Domain::Dermoscopy => "derm",
            Domain::Fundus => "fundus",
            Domain::Pathology => "pathology",
            Domain::Ct => "ct",
            Domain::Ultrasound => "ultrasound",
            Domain::Mri => "mri",
            Domain::Multimodal => "multimodal",
            Domain::Other(s) => s,
        }
    }

    /// Short column name used in the paper's tables.
    pub fn short_name(&self) -> &str {
        match self {
            Domain::Ecg => "ECG",
            Domain::ChestXray => "CXR",
            Domain::Mammography => "Mammo",
            Domain::Dermoscopy => "Derm",
            Domain::Fundus => "Fundus",
            Domain::Pathology => "Path",
            Domain::Ct => "CT",
            Domain::Ultrasound => "US",
            Domain::Mri => "MRI",
            Domain::Multimodal => "Multimodal",
            Domain::Other(s) => s,
        }
    }

    /// Human-readable name used in CLIMB-style question text ("a chest X-ray image").
    pub fn display_name(&self) -> &str {
        match self {
            Domain::Ecg => "ECG",
            Domain::ChestXray => "chest X-ray",
            Domain::Mammography => "mammography",
            Domain::Dermoscopy => "dermoscopy",
            Domain::Fundus => "fundus",
            Domain::Pathology => "pathology",
            Domain::Ct => "CT",
            Domain::Ultrasound => "ultrasound",
            Domain::Mri => "MRI",
            Domain::Multimodal => "multimodal",
            Domain::Other(s) => s,
        }
    }

    /// Position in [`Domain::PAPER_ORDER`]; unknown domains sort after the known ones.
    pub fn paper_rank(&self) -> usize {
        Self::PAPER_ORDER
            .iter()
            .position(|d| d == self)
            .unwrap_or(Self::PAPER_ORDER.len())
    }

    /// Whether the domain counts in the paper's "Overall" (the 8 vision domains; ECG is reported
    /// separately, spec §13).
    pub fn is_vision(&self) -> bool {
        !matches!(self, Domain::Ecg | Domain::Multimodal | Domain::Other(_))
    }

    /// The input kind the domain's samples normally carry (3D domains come as frame stacks).
    pub fn default_modality(&self) -> Modality {
        match self {
            Domain::Ecg => Modality::TimeSeries,
            Domain::Ct | Domain::Ultrasound | Domain::Mri => Modality::Volume,
            Domain::Multimodal | Domain::Other(_) => Modality::Text,
            _ => Modality::Image,
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_source())
    }
}

impl Serialize for Domain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_source())
    }
}

impl<'de> Deserialize<'de> for Domain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Domain::from_source(&s))
    }
}

/// The kind of an input attached to a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    /// A 2D image (PNG, JPEG, DICOM frame, ...).
    Image,
    /// A 3D volume or video, fed to the model as sampled frames.
    Volume,
    /// A physiological time series (ECG).
    TimeSeries,
    /// Text only.
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_round_trips_through_its_source_string() {
        for d in Domain::PAPER_ORDER.iter().chain([&Domain::Multimodal]) {
            let js = serde_json::to_string(d).unwrap();
            let back: Domain = serde_json::from_str(&js).unwrap();
            assert_eq!(&back, d);
        }
        let other: Domain = serde_json::from_str("\"histology_x\"").unwrap();
        assert_eq!(other, Domain::Other("histology_x".into()));
        assert_eq!(serde_json::to_string(&other).unwrap(), "\"histology_x\"");
    }

    #[test]
    fn overall_excludes_ecg_as_the_paper_does() {
        let vision: Vec<_> = Domain::PAPER_ORDER
            .iter()
            .filter(|d| d.is_vision())
            .collect();
        assert_eq!(vision.len(), 8);
        assert!(!Domain::Ecg.is_vision());
    }
}
