//! `model.trainable`: which parameter groups the optimiser updates. The paper's Stage 1
//! ("modality alignment") trains the vision merger and the ECG encoder and projector with the
//! language model frozen; the released code only has the per-component `freeze_*` switches,
//! which cannot keep the vision blocks while training the merger.
//!
//! | group | parameters (checkpoint names) |
//! |---|---|
//! | `vision` | `visual.*` except the merger (patch embedding, blocks) |
//! | `merger` | `visual.merger.*` (the 2×2 patch merger into the LLM's width) |
//! | `ecg` | `time_series_embedding.*` (ECG-JEPA encoder and its projector) |
//! | `llm` | everything else (`model.*`, `lm_head.*`) |
//!
//! Components with no listed group are frozen where the model is built
//! ([`TrainableGroups::freeze`]: no gradient is computed for them); within the vision tower, a
//! list with `merger` but not `vision` keeps the blocks out of the optimiser's parameter set
//! ([`TrainableGroups::trains`]), so they stay bit-identical (their gradients are still
//! computed, since `qoq_model::train::Freeze` freezes whole components only: a cost, not an
//! effect). The value model's head (`score.*`, PPO) always trains.

use qoq_model::train::Freeze;

/// The group names, in the order of the table above.
pub const GROUPS: [&str; 4] = ["vision", "merger", "ecg", "llm"];

/// The group of a parameter (`None` for the value head, which always trains).
pub fn group_of(name: &str) -> Option<&'static str> {
    if name.starts_with("visual.merger.") {
        Some("merger")
    } else if name.starts_with("visual.") {
        Some("vision")
    } else if name.starts_with("time_series_embedding.") {
        Some("ecg")
    } else if name.starts_with("score.") {
        None
    } else {
        Some("llm")
    }
}

/// A checked `model.trainable` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainableGroups(Vec<&'static str>);

impl TrainableGroups {
    /// Parses the names; an unknown or repeated name, or an empty list, is an error (the
    /// reason; the caller names the field).
    pub fn parse(names: &[String]) -> Result<Self, String> {
        if names.is_empty() {
            return Err(format!(
                "an empty list trains nothing; omit the key to train every group ({})",
                GROUPS.join(", ")
            ));
        }
        let mut out = Vec::new();
        for n in names {
            let Some(g) = GROUPS.iter().find(|g| **g == n.as_str()) else {
                return Err(format!(
                    "unknown group `{n}`; groups: {}",
                    GROUPS.join(", ")
                ));
            };
            if out.contains(g) {
                return Err(format!("group `{n}` is listed twice"));
            }
            out.push(*g);
        }
        Ok(Self(out))
    }

    fn has(&self, g: &str) -> bool {
        self.0.contains(&g)
    }

    /// The component switches of the model builder: a component none of whose groups is
    /// listed is frozen.
    pub fn freeze(&self) -> Freeze {
        Freeze {
            vision_tower: !self.has("vision") && !self.has("merger"),
            time_series_encoder: !self.has("ecg"),
            llm: !self.has("llm"),
        }
    }

    /// Whether the optimiser updates the parameter `name`.
    pub fn trains(&self, name: &str) -> bool {
        group_of(name).is_none_or(|g| self.has(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_fall_in_their_groups() {
        assert_eq!(group_of("visual.merger.mlp.0.weight"), Some("merger"));
        assert_eq!(group_of("visual.merger.ln_q.weight"), Some("merger"));
        assert_eq!(group_of("visual.blocks.0.attn.qkv.weight"), Some("vision"));
        assert_eq!(group_of("visual.patch_embed.proj.weight"), Some("vision"));
        assert_eq!(group_of("time_series_embedding.linear.weight"), Some("ecg"));
        assert_eq!(group_of("model.layers.0.mlp.up_proj.weight"), Some("llm"));
        assert_eq!(group_of("lm_head.weight"), Some("llm"));
        assert_eq!(group_of("score.weight"), None);
    }

    #[test]
    fn stage_one_trains_merger_and_ecg_and_freezes_the_llm() {
        let g = TrainableGroups::parse(&["merger".into(), "ecg".into()]).unwrap();
        let f = g.freeze();
        assert!(f.llm && !f.vision_tower && !f.time_series_encoder);
        assert!(g.trains("visual.merger.mlp.2.bias"));
        assert!(!g.trains("visual.blocks.1.mlp.gate_proj.weight"));
        assert!(g.trains("time_series_embedding.encoder.blocks.0.attn.qkv.weight"));
        assert!(!g.trains("model.embed_tokens.weight"));
        assert!(g.trains("score.weight"));
    }

    #[test]
    fn unknown_repeated_or_no_groups_are_refused() {
        let e = TrainableGroups::parse(&["merger".into(), "projector".into()]).unwrap_err();
        assert!(
            e.contains("`projector`") && e.contains("vision, merger, ecg, llm"),
            "{e}"
        );
        assert!(TrainableGroups::parse(&["llm".into(), "llm".into()]).is_err());
        assert!(TrainableGroups::parse(&[]).is_err());
    }
}
