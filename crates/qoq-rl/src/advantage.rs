//! Advantage estimators (spec §9), tensor-free plain f64.
//!
//! Reference: `verl/trainer/core_algos.py` of the released QoQ-Med code — `compute_grpo_outcome_advantage`
//! (§9.1), `compute_rloo_outcome_advantage` (§9.2), `compute_reinforce_plus_plus_outcome_advantage`
//! (§9.3), `compute_remax_outcome_advantage` (§9.4), `compute_gae_advantage_return` (§9.5) and
//! `compute_drpo_outcome_advantage` (§9.6–9.8). Sequence-level estimators take one scalar reward per
//! rollout ([`RolloutReward`], batch order) and return one advantage per rollout in the same order;
//! the caller broadcasts it over the response mask. Token-level ones live in [`token`].

pub mod drpo;
pub mod group;
pub mod token;

use crate::error::{Error, Result};
use qoq_core::rollout::ScoredGroup;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub use drpo::{Drpo, DrpoConfig, DrpoMetrics};

/// One scored rollout of a training step, as the advantage stage sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutReward {
    /// The group id (`uid`): rollouts with the same uid answer the same prompt.
    pub uid: String,
    /// The DRPO domain key of the prompt (see `qoq_core::sample::DomainKey`).
    pub domain: String,
    /// Scalar reward (sum of token-level rewards).
    pub reward: f64,
    /// Sequence KL to the reference (sum over tokens of the k3 estimate); only DRPO's optional
    /// KL-aware damping reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

/// Flattens scored groups into batch order (group after group, as `repeat(interleave=True)`).
pub fn from_scored_groups(groups: &[ScoredGroup]) -> Vec<RolloutReward> {
    groups
        .iter()
        .flat_map(|g| {
            let grp = g.group();
            g.rewards().into_iter().map(|r| RolloutReward {
                uid: grp.id.0.clone(),
                domain: grp.domain.clone(),
                reward: r,
                kl: None,
            })
        })
        .collect()
}

/// Rollouts grouped by uid in order of first appearance.
#[derive(Debug, Clone)]
pub struct Groups {
    /// The uid of each group.
    pub uids: Vec<String>,
    /// Row indices of each group's rollouts, in batch order.
    pub members: Vec<Vec<usize>>,
    /// Group index of each row.
    pub group_of: Vec<usize>,
}

impl Groups {
    /// Groups `rows` by uid (the reference's `id2score` dictionary, insertion-ordered).
    pub fn of(rows: &[RolloutReward]) -> Self {
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut uids = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut group_of = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let g = *index.entry(r.uid.as_str()).or_insert_with(|| {
                uids.push(r.uid.clone());
                members.push(Vec::new());
                members.len() - 1
            });
            members[g].push(i);
            group_of.push(g);
        }
        Self {
            uids,
            members,
            group_of,
        }
    }
}

/// Checks a step's rollouts: at least one, all rewards finite.
pub(crate) fn check_rows(step: u64, rows: &[RolloutReward]) -> Result<()> {
    if rows.is_empty() {
        return Err(Error::BadInput {
            step,
            row: 0,
            reason: "empty batch".into(),
        });
    }
    for (i, r) in rows.iter().enumerate() {
        if !r.reward.is_finite() {
            return Err(Error::BadInput {
                step,
                row: i,
                reason: format!("reward {} is not finite", r.reward),
            });
        }
    }
    Ok(())
}

/// Mean and unbiased (N−1) standard deviation, as `torch.mean` / `torch.std`.
/// The std of one value is NaN, as in torch.
pub fn mean_std_unbiased(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let ss: f64 = v.iter().map(|x| (x - mean) * (x - mean)).sum();
    (mean, (ss / (n - 1.0)).sqrt())
}

/// Guard and bookkeeping counters of one step, reported in step metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdvantageMetrics {
    /// Groups with a single rollout (no within-group baseline): advantage set to 0.
    pub singleton_groups: u64,
    /// DRPO details (absent for other estimators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drpo: Option<DrpoMetrics>,
}

/// The advantages of one step, in batch order, plus the step's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct StepAdvantages {
    /// One advantage per rollout, same order as the input.
    pub advantages: Vec<f64>,
    /// Guard counters and per-domain statistics.
    pub metrics: AdvantageMetrics,
}

/// A sequence-level estimator selected by configuration (`algorithm.adv_estimator`).
/// Stateful estimators (DRPO) carry their state inside; serialise the whole value to checkpoint it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Estimator {
    /// GRPO (§9.1): `(r − mean)/(std_unbiased + eps)` per group.
    Grpo {
        /// Added to the std (1e-6 in the reference).
        eps: f64,
    },
    /// Dr.GRPO: `r − mean` per group, no std division.
    DrGrpo,
    /// RLOO (§9.2): `r − mean of the other rollouts of the group`.
    Rloo,
    /// DRPO (§9.6), with its cross-step state.
    Drpo(Box<Drpo>),
}

impl Estimator {
    /// GRPO with the reference epsilon 1e-6.
    pub fn grpo() -> Self {
        Estimator::Grpo { eps: 1e-6 }
    }

    /// Advantages of one training step's rollouts (batch order in, batch order out).
    pub fn step(&mut self, rows: &[RolloutReward]) -> Result<StepAdvantages> {
        match self {
            Estimator::Grpo { eps } => group::grpo(rows, *eps),
            Estimator::DrGrpo => group::dr_grpo(rows),
            Estimator::Rloo => group::rloo(rows),
            Estimator::Drpo(d) => d.step(rows),
        }
    }

    /// Serialises the estimator, state included (for checkpoints).
    pub fn save_state(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Restores an estimator saved by [`Estimator::save_state`].
    pub fn load_state(s: &str) -> Result<Self> {
        let mut e: Estimator = serde_json::from_str(s)?;
        if let Estimator::Drpo(d) = &mut e {
            d.rebuild_indices();
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoq_core::rollout::{FinishReason, GroupId, Rollout, RolloutGroup};
    use qoq_core::{RewardScore, SampleId};

    #[test]
    fn scored_groups_flatten_in_batch_order_with_their_domain() {
        let rollout = || Rollout {
            token_ids: vec![1],
            logprobs: vec![-0.1],
            text: "x".into(),
            finish: FinishReason::Stop,
        };
        let group = |id: &str, dom: &str, r: &[f64]| {
            let g = RolloutGroup::new(
                GroupId(id.into()),
                SampleId(format!("train:{id}")),
                dom.into(),
                r.iter().map(|_| rollout()).collect(),
            )
            .unwrap();
            ScoredGroup::new(g, r.iter().map(|&x| RewardScore::total(x)).collect()).unwrap()
        };
        let rows = from_scored_groups(&[
            group("a", "ct", &[0.1, 0.9]),
            group("b", "ecg", &[0.5, 0.5]),
        ]);
        let got: Vec<(&str, &str, f64)> = rows
            .iter()
            .map(|r| (r.uid.as_str(), r.domain.as_str(), r.reward))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "ct", 0.1),
                ("a", "ct", 0.9),
                ("b", "ecg", 0.5),
                ("b", "ecg", 0.5)
            ]
        );
        let g = Groups::of(&rows);
        assert_eq!(g.members, vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn estimator_state_round_trips_for_every_kind() {
        for e in [Estimator::grpo(), Estimator::DrGrpo, Estimator::Rloo] {
            let s = e.save_state().unwrap();
            let back = Estimator::load_state(&s).unwrap();
            assert_eq!(back.save_state().unwrap(), s);
        }
        assert!(Estimator::load_state("{\"type\": \"nope\"}").is_err());
    }
}
