//! Reward scores with every component reported.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The score of one response. `overall` is what the trainer optimises; the named components are
/// those of the QoQ medical reward (spec §8) and are 0 for reward functions that lack them;
/// `extra` holds the components of other reward functions by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardScore {
    pub overall: f64,
    #[serde(default)]
    pub standard_score: f64,
    #[serde(default)]
    pub iou_score: f64,
    #[serde(default)]
    pub format_score: f64,
    #[serde(default)]
    pub length_score: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

impl RewardScore {
    /// A score with only a total.
    pub fn total(overall: f64) -> Self {
        Self {
            overall,
            ..Self::default()
        }
    }

    /// Every component by its reference metric name (`reward/{name}` in spec §12).
    pub fn components(&self) -> Vec<(String, f64)> {
        let mut v = vec![
            ("overall".to_string(), self.overall),
            ("standard_score".to_string(), self.standard_score),
            ("iou_score".to_string(), self.iou_score),
            ("format_score".to_string(), self.format_score),
            ("length_score".to_string(), self.length_score),
        ];
        v.extend(self.extra.iter().map(|(k, v)| (k.clone(), *v)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_score_round_trips_and_lists_components() {
        let mut s = RewardScore {
            overall: 0.9134,
            standard_score: 1.0,
            iou_score: 1.0,
            format_score: 1.0,
            length_score: 0.134,
            extra: BTreeMap::new(),
        };
        s.extra.insert("coherence".into(), 0.5);
        let back: RewardScore = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(s.components().len(), 6);
        assert_eq!(RewardScore::total(0.3).overall, 0.3);
    }
}
