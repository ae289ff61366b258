//! Rollouts and groups of rollouts.

use crate::error::{Error, Result};
use crate::reward::RewardScore;
use crate::sample::SampleId;
use serde::{Deserialize, Serialize};

/// Identifier of a prompt's group of rollouts within a training step (the reference's `uid`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupId(pub String);

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why generation of a rollout stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS token was generated (it is included in `token_ids`).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

/// One sampled response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Generated token ids, including the EOS token when `finish == Stop`.
    pub token_ids: Vec<u32>,
    /// Log-probability of each generated token under the sampling policy at temperature 1.
    pub logprobs: Vec<f32>,
    /// Decoded text (special tokens skipped), what the reward sees.
    pub text: String,
    pub finish: FinishReason,
}

/// The n rollouts of one prompt. The group owns them: batch reordering (length balancing,
/// mini-batching) moves whole groups or indexes into them, so no group can be split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutGroup {
    pub id: GroupId,
    pub sample: SampleId,
    /// The DRPO domain key of the group (see [`crate::sample::DomainKey`]).
    pub domain: String,
    rollouts: Vec<Rollout>,
}

impl RolloutGroup {
    /// A group of `n >= 1` rollouts.
    pub fn new(
        id: GroupId,
        sample: SampleId,
        domain: String,
        rollouts: Vec<Rollout>,
    ) -> Result<Self> {
        if rollouts.is_empty() {
            return Err(Error::EmptyGroup { group: id.0 });
        }
        Ok(Self {
            id,
            sample,
            domain,
            rollouts,
        })
    }

    pub fn rollouts(&self) -> &[Rollout] {
        &self.rollouts
    }

    /// Number of rollouts n.
    pub fn len(&self) -> usize {
        self.rollouts.len()
    }

    /// Always false: a group holds at least one rollout.
    pub fn is_empty(&self) -> bool {
        self.rollouts.is_empty()
    }

    pub fn into_rollouts(self) -> Vec<Rollout> {
        self.rollouts
    }
}

/// A group with one reward score per rollout, in the same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredGroup {
    group: RolloutGroup,
    scores: Vec<RewardScore>,
}

impl ScoredGroup {
    pub fn new(group: RolloutGroup, scores: Vec<RewardScore>) -> Result<Self> {
        if scores.len() != group.len() {
            return Err(Error::ScoreCount {
                group: group.id.0.clone(),
                rollouts: group.len(),
                scores: scores.len(),
            });
        }
        Ok(Self { group, scores })
    }

    pub fn group(&self) -> &RolloutGroup {
        &self.group
    }

    pub fn scores(&self) -> &[RewardScore] {
        &self.scores
    }

    /// The scalar rewards (`overall`) of the rollouts, in order.
    pub fn rewards(&self) -> Vec<f64> {
        self.scores.iter().map(|s| s.overall).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(t: &str) -> Rollout {
        Rollout {
            token_ids: vec![1, 2, 151645],
            logprobs: vec![-0.1, -0.2, -0.3],
            text: t.into(),
            finish: FinishReason::Stop,
        }
    }

    #[test]
    fn group_owns_at_least_one_rollout_and_round_trips() {
        let id = GroupId("g0".into());
        assert!(RolloutGroup::new(id.clone(), SampleId("s".into()), "d".into(), vec![]).is_err());
        let g = RolloutGroup::new(
            id,
            SampleId("s".into()),
            "vindr".into(),
            vec![rollout("a"), rollout("b")],
        )
        .unwrap();
        let back: RolloutGroup = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
        assert_eq!(g.len(), 2);
    }

    #[test]
    fn scored_group_needs_one_score_per_rollout() {
        let g = RolloutGroup::new(
            GroupId("g".into()),
            SampleId("s".into()),
            "d".into(),
            vec![rollout("a"), rollout("b")],
        )
        .unwrap();
        assert!(ScoredGroup::new(g.clone(), vec![RewardScore::total(1.0)]).is_err());
        let s =
            ScoredGroup::new(g, vec![RewardScore::total(1.0), RewardScore::total(0.5)]).unwrap();
        assert_eq!(s.rewards(), vec![1.0, 0.5]);
    }
}
