//! Advantage estimators (spec §9), tensor-free plain f64.
//!
//! Reference: `verl/trainer/core_algos.py` of the released QoQ-Med code — `compute_grpo_outcome_advantage`
//! (§9.1), `compute_rloo_outcome_advantage` (§9.2), `compute_reinforce_plus_plus_outcome_advantage`
//! (§9.3), `compute_remax_outcome_advantage` (§9.4), `compute_gae_advantage_return` (§9.5) and
//! `compute_drpo_outcome_advantage` (§9.6–9.8). Sequence-level estimators take one scalar reward per
//! rollout ([`RolloutReward`], batch order) and return one advantage per rollout in the same order;
//! the caller broadcasts it over the response mask. Token-level ones live in [`token`]; they and
//! ReMax take their extra inputs (greedy-rollout rewards, per-token rewards, critic values) in a
//! [`StepInputs`] beside the rows, through [`Estimator::step_with`].

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
    /// One advantage per rollout, same order as the input. For token-level estimators
    /// (REINFORCE++, GAE) the mean of the rollout's token advantages, a summary for the metrics;
    /// the loss takes [`TokenAdvantages`].
    pub advantages: Vec<f64>,
    /// Guard counters and per-domain statistics.
    pub metrics: AdvantageMetrics,
}

/// Extra per-rollout inputs of a step, each in batch order (one entry per row) when present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepInputs {
    /// ReMax: the reward of the greedy rollout of each row's prompt (`reward_baselines`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baselines: Option<Vec<f64>>,
    /// REINFORCE++ and GAE: each row's reward per response token (`token_level_rewards`: the
    /// outcome reward on the last token, minus β·kl_t on every token when the KL is in the
    /// reward); the row's length is its response length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_rewards: Option<Vec<Vec<f64>>>,
    /// GAE: the critic's value at each response token (same lengths as `token_rewards`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<Vec<f64>>>,
}

/// Token-level output of REINFORCE++ and GAE: one vector per rollout, of its response length.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenAdvantages {
    /// Whitened advantage per response token.
    pub advantages: Vec<Vec<f64>>,
    /// Returns per response token (GAE: `gae + V`, the critic's regression targets).
    pub returns: Vec<Vec<f64>>,
}

/// Everything an estimator computes for a step: [`StepAdvantages`], plus the token-level
/// advantages and returns of the token-level estimators.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Per-rollout advantages (summaries for token-level estimators) and metrics.
    pub step: StepAdvantages,
    /// REINFORCE++ and GAE only.
    pub tokens: Option<TokenAdvantages>,
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
    /// REINFORCE++ (§9.3): discounted return-to-go of the token rewards, whitened over the
    /// batch's response tokens (token-level; needs [`StepInputs::token_rewards`]).
    ReinforcePlusPlus {
        /// Discount γ (`algorithm.gamma`, 1.0 in the reference).
        gamma: f64,
    },
    /// ReMax (§9.4): `r − b`, `b` the reward of the prompt's greedy rollout (needs
    /// [`StepInputs::baselines`]).
    Remax,
    /// GAE (§9.5, PPO with a critic): token-level, needs [`StepInputs::token_rewards`] and
    /// [`StepInputs::values`].
    Gae {
        /// Discount γ (`algorithm.gamma`, 1.0).
        gamma: f64,
        /// GAE λ (`algorithm.lam`, 1.0).
        lam: f64,
    },
}

impl Estimator {
    /// GRPO with the reference epsilon 1e-6.
    pub fn grpo() -> Self {
        Estimator::Grpo { eps: 1e-6 }
    }

    /// Whether the estimator returns token-level advantages ([`StepOutput::tokens`]).
    pub fn is_token_level(&self) -> bool {
        matches!(
            self,
            Estimator::ReinforcePlusPlus { .. } | Estimator::Gae { .. }
        )
    }

    /// Advantages of one training step's rollouts (batch order in, batch order out), for the
    /// estimators that need nothing beyond the rows (GRPO, Dr.GRPO, RLOO, DRPO); the others
    /// fail naming what they need ([`Estimator::step_with`]).
    pub fn step(&mut self, rows: &[RolloutReward]) -> Result<StepAdvantages> {
        Ok(self.step_with(rows, &StepInputs::default())?.step)
    }

    /// Advantages of one training step's rollouts with the extra inputs ReMax, REINFORCE++ and
    /// GAE need (other estimators ignore them).
    pub fn step_with(&mut self, rows: &[RolloutReward], extra: &StepInputs) -> Result<StepOutput> {
        let sequence = |step| Ok(StepOutput { step, tokens: None });
        match self {
            Estimator::Grpo { eps } => sequence(group::grpo(rows, *eps)?),
            Estimator::DrGrpo => sequence(group::dr_grpo(rows)?),
            Estimator::Rloo => sequence(group::rloo(rows)?),
            Estimator::Drpo(d) => sequence(d.step(rows)?),
            Estimator::Remax => {
                check_rows(0, rows)?;
                let b = need(&extra.baselines, "baselines", "ReMax", rows.len())?;
                let r: Vec<f64> = rows.iter().map(|x| x.reward).collect();
                sequence(StepAdvantages {
                    advantages: group::remax(&r, b)?,
                    metrics: AdvantageMetrics::default(),
                })
            }
            Estimator::ReinforcePlusPlus { gamma } => {
                let tr = need(
                    &extra.token_rewards,
                    "token_rewards",
                    "REINFORCE++",
                    rows.len(),
                )?;
                check_finite("token_rewards", tr)?;
                let (r, m) = token::pad(tr);
                let (a, ret) = token::reinforce_plus_plus(&r, &m, *gamma)?;
                Ok(token_output(tr, a, ret))
            }
            Estimator::Gae { gamma, lam } => {
                let tr = need(&extra.token_rewards, "token_rewards", "GAE", rows.len())?;
                let v = need(&extra.values, "values", "GAE", rows.len())?;
                check_finite("token_rewards", tr)?;
                check_finite("values", v)?;
                for (i, (a, b)) in tr.iter().zip(v).enumerate() {
                    if a.len() != b.len() {
                        return Err(Error::Shape {
                            what: "values",
                            row: i,
                            got: b.len(),
                            expected: a.len(),
                        });
                    }
                }
                let (r, m) = token::pad(tr);
                let (v, _) = token::pad(v);
                let (a, ret) = token::gae(&r, &v, &m, *gamma, *lam)?;
                Ok(token_output(tr, a, ret))
            }
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

/// The extra input `what` of `who`, checked to have one entry per row.
fn need<'a, T>(
    v: &'a Option<Vec<T>>,
    what: &'static str,
    who: &str,
    rows: usize,
) -> Result<&'a [T]> {
    let v = v.as_deref().ok_or_else(|| Error::BadInput {
        step: 0,
        row: 0,
        reason: format!("{who} needs `{what}` (one entry per rollout)"),
    })?;
    if v.len() != rows {
        return Err(Error::Shape {
            what,
            row: 0,
            got: v.len(),
            expected: rows,
        });
    }
    Ok(v)
}

/// Fails on the first non-finite value, naming the row.
fn check_finite(what: &str, rows: &[Vec<f64>]) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        if let Some(x) = r.iter().find(|x| !x.is_finite()) {
            return Err(Error::BadInput {
                step: 0,
                row: i,
                reason: format!("{what}: {x} is not finite"),
            });
        }
    }
    Ok(())
}

/// Cuts padded `(B, L)` outputs back to each row's length; the per-rollout summary is the mean
/// token advantage (0 for an empty response).
fn token_output(rows: &[Vec<f64>], adv: Vec<Vec<f64>>, ret: Vec<Vec<f64>>) -> StepOutput {
    let cut = |m: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        m.into_iter()
            .zip(rows)
            .map(|(mut v, r)| {
                v.truncate(r.len());
                v
            })
            .collect()
    };
    let (advantages, returns) = (cut(adv), cut(ret));
    let summary = advantages
        .iter()
        .map(|a| {
            if a.is_empty() {
                0.0
            } else {
                a.iter().sum::<f64>() / a.len() as f64
            }
        })
        .collect();
    StepOutput {
        step: StepAdvantages {
            advantages: summary,
            metrics: AdvantageMetrics::default(),
        },
        tokens: Some(TokenAdvantages {
            advantages,
            returns,
        }),
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
        for e in [
            Estimator::grpo(),
            Estimator::DrGrpo,
            Estimator::Rloo,
            Estimator::Remax,
            Estimator::ReinforcePlusPlus { gamma: 0.9 },
            Estimator::Gae {
                gamma: 0.9,
                lam: 0.8,
            },
        ] {
            let s = e.save_state().unwrap();
            let back = Estimator::load_state(&s).unwrap();
            assert_eq!(back.save_state().unwrap(), s);
        }
        assert!(Estimator::load_state("{\"type\": \"nope\"}").is_err());
    }

    fn rows(n: usize) -> Vec<RolloutReward> {
        (0..n)
            .map(|i| RolloutReward {
                uid: format!("u{}", i / 2),
                domain: "d".into(),
                reward: i as f64,
                kl: None,
            })
            .collect()
    }

    #[test]
    fn estimators_that_need_extra_inputs_name_them() {
        let r = rows(2);
        let e = Estimator::Remax.step(&r).unwrap_err().to_string();
        assert!(e.contains("baselines"), "{e}");
        let e = Estimator::ReinforcePlusPlus { gamma: 1.0 }
            .step(&r)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_rewards"), "{e}");
        let extra = StepInputs {
            token_rewards: Some(vec![vec![0.0, 1.0], vec![2.0]]),
            ..StepInputs::default()
        };
        let mut gae = Estimator::Gae {
            gamma: 1.0,
            lam: 1.0,
        };
        let e = gae.step_with(&r, &extra).unwrap_err().to_string();
        assert!(e.contains("values"), "{e}");
        let bad = StepInputs {
            values: Some(vec![vec![0.0, 1.0], vec![2.0, 3.0]]),
            ..extra.clone()
        };
        assert!(gae.step_with(&r, &bad).is_err());
        let nan = StepInputs {
            token_rewards: Some(vec![vec![0.0, f64::NAN], vec![2.0]]),
            ..StepInputs::default()
        };
        let e = Estimator::ReinforcePlusPlus { gamma: 1.0 }
            .step_with(&r, &nan)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 0") || e.contains("not finite"), "{e}");
    }

    #[test]
    fn token_level_outputs_keep_each_response_length_and_summarise_by_the_mean() {
        let extra = StepInputs {
            token_rewards: Some(vec![vec![0.0, 0.0, 1.0], vec![0.5]]),
            ..StepInputs::default()
        };
        let out = Estimator::ReinforcePlusPlus { gamma: 1.0 }
            .step_with(&rows(2), &extra)
            .unwrap();
        let t = out.tokens.unwrap();
        assert_eq!(t.advantages[0].len(), 3);
        assert_eq!(t.advantages[1].len(), 1);
        assert_eq!(t.returns[0], vec![1.0, 1.0, 1.0]);
        let mean0 = t.advantages[0].iter().sum::<f64>() / 3.0;
        assert!((out.step.advantages[0] - mean0).abs() < 1e-12);
        assert!(out.step.advantages[0] > out.step.advantages[1]);
        let out = Estimator::Remax
            .step_with(
                &rows(2),
                &StepInputs {
                    baselines: Some(vec![0.5, 0.5]),
                    ..StepInputs::default()
                },
            )
            .unwrap();
        assert_eq!(out.step.advantages, vec![-0.5, 0.5]);
        assert!(out.tokens.is_none());
    }
}
