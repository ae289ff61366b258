//! The step's metrics from its groups, rewards and advantages (reference names in
//! [`crate::metrics_log::names`]).

use super::PROMPT_LENGTH_MEAN;
use super::rollout::Prompt;
use super::score::StepRewards;
use crate::advantage::{RolloutReward, StepAdvantages};
use crate::metrics_log::names;
use qoq_core::{FinishReason, RewardScore};
use std::collections::BTreeMap;

/// Reward components (batch mean and per domain over every rollout, filtered groups included),
/// the mean advantage, the response length and clip ratio (kept rollouts) and the mean prompt
/// length.
pub fn rollout_metrics(
    prompts: &[Prompt],
    rewards: &StepRewards,
    adv: &StepAdvantages,
    m: &mut BTreeMap<String, f64>,
) {
    let scores: Vec<&RewardScore> = rewards.groups.iter().flat_map(|g| g.scores()).collect();
    let total = scores.len().max(1) as f64;
    let mean = |f: &dyn Fn(&RewardScore) -> f64| scores.iter().map(|s| f(s)).sum::<f64>() / total;
    m.insert(names::REWARD_OVERALL.into(), mean(&|s| s.overall));
    m.insert(names::REWARD_STANDARD.into(), mean(&|s| s.standard_score));
    m.insert(names::REWARD_IOU.into(), mean(&|s| s.iou_score));
    m.insert(names::REWARD_FORMAT.into(), mean(&|s| s.format_score));
    m.insert(names::REWARD_LENGTH.into(), mean(&|s| s.length_score));
    m.insert(names::SCORE_MEAN.into(), mean(&|s| s.overall));
    let mut per_domain: BTreeMap<&str, Vec<&RewardScore>> = BTreeMap::new();
    for g in &rewards.groups {
        per_domain
            .entry(g.group().domain.as_str())
            .or_default()
            .extend(g.scores());
    }
    for (d, ss) in per_domain {
        let c = ss.len() as f64;
        m.insert(
            names::domain_reward(d),
            ss.iter().map(|s| s.overall).sum::<f64>() / c,
        );
        for (name, v) in [
            (
                "standard_score",
                ss.iter().map(|s| s.standard_score).sum::<f64>(),
            ),
            ("iou_score", ss.iter().map(|s| s.iou_score).sum::<f64>()),
            (
                "format_score",
                ss.iter().map(|s| s.format_score).sum::<f64>(),
            ),
            (
                "length_score",
                ss.iter().map(|s| s.length_score).sum::<f64>(),
            ),
        ] {
            m.insert(format!("reward_by_domain_{name}/{d}"), v / c);
        }
    }
    if !adv.advantages.is_empty() {
        m.insert(
            names::ADVANTAGES_MEAN.into(),
            adv.advantages.iter().sum::<f64>() / adv.advantages.len() as f64,
        );
    }
    let kept = rewards.kept_rollouts();
    let lens: usize = kept.iter().map(|(_, r)| r.token_ids.len()).sum();
    m.insert(
        names::RESPONSE_LENGTH_MEAN.into(),
        lens as f64 / kept.len().max(1) as f64,
    );
    let clipped = kept
        .iter()
        .filter(|(_, r)| r.finish == FinishReason::Length)
        .count();
    m.insert(
        names::RESPONSE_LENGTH_CLIP_RATIO.into(),
        clipped as f64 / kept.len().max(1) as f64,
    );
    m.insert(
        PROMPT_LENGTH_MEAN.into(),
        prompts
            .iter()
            .map(|p| p.processed.input_ids.len())
            .sum::<usize>() as f64
            / prompts.len().max(1) as f64,
    );
}

/// The estimator's step metrics: guard counters (`drpo/...`), and per domain of the batch the
/// DRPO scaling (`drpo/{domain}/k`, `n_d`, `mu_d`, `temperature`) and the mean absolute
/// advantage (`critic/advantages/abs_mean/{domain}`, every estimator).
pub fn advantage_metrics(
    adv: &StepAdvantages,
    rows: &[RolloutReward],
    m: &mut BTreeMap<String, f64>,
) {
    let mut abs: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (r, a) in rows.iter().zip(&adv.advantages) {
        let e = abs.entry(&r.domain).or_insert((0.0, 0));
        e.0 += a.abs();
        e.1 += 1;
    }
    for (d, (s, c)) in abs {
        m.insert(format!("critic/advantages/abs_mean/{d}"), s / c as f64);
    }
    m.insert(
        "critic/singleton_groups".into(),
        adv.metrics.singleton_groups as f64,
    );
    if let Some(d) = &adv.metrics.drpo {
        for (name, v) in [
            ("temperature_floors", d.temperature_floors),
            ("zero_factor_guards", d.zero_factor_guards),
            ("negative_factor_guards", d.negative_factor_guards),
            ("batch_std_guards", d.batch_std_guards),
            ("nonfinite_zeroed", d.nonfinite_zeroed),
        ] {
            m.insert(format!("drpo/{name}"), v as f64);
        }
        for dm in &d.domains {
            m.insert(format!("drpo/{}/k", dm.domain), dm.k as f64);
            m.insert(format!("drpo/{}/n_d", dm.domain), dm.n_d as f64);
            m.insert(format!("drpo/{}/mu_d", dm.domain), dm.mu_d);
            m.insert(format!("drpo/{}/temperature", dm.domain), dm.t_d);
        }
    }
}
