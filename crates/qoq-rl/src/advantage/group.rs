//! Group-baseline estimators on scalar rewards: GRPO (`compute_grpo_outcome_advantage`, spec §9.1),
//! Dr.GRPO (GRPO without the std division), RLOO (`compute_rloo_outcome_advantage`, §9.2) and
//! ReMax (`compute_remax_outcome_advantage`, §9.4).
//!
//! The reference asserts groups of more than one rollout; here a single-rollout group gets
//! advantage 0 and is counted in [`AdvantageMetrics::singleton_groups`].

use super::{
    AdvantageMetrics, Groups, RolloutReward, StepAdvantages, check_rows, mean_std_unbiased,
};
use crate::error::{Error, Result};

fn per_group(rows: &[RolloutReward], f: impl Fn(&[f64], usize) -> f64) -> Result<StepAdvantages> {
    check_rows(0, rows)?;
    let groups = Groups::of(rows);
    let mut adv = vec![0.0; rows.len()];
    let mut metrics = AdvantageMetrics::default();
    for members in &groups.members {
        if members.len() < 2 {
            metrics.singleton_groups += 1;
            continue;
        }
        let r: Vec<f64> = members.iter().map(|&i| rows[i].reward).collect();
        for (j, &i) in members.iter().enumerate() {
            adv[i] = f(&r, j);
        }
    }
    Ok(StepAdvantages {
        advantages: adv,
        metrics,
    })
}

/// GRPO: `A_i = (r_i − mean_G)/(std_unbiased_G + eps)`.
pub fn grpo(rows: &[RolloutReward], eps: f64) -> Result<StepAdvantages> {
    per_group(rows, |r, j| {
        let (m, s) = mean_std_unbiased(r);
        (r[j] - m) / (s + eps)
    })
}

/// Dr.GRPO: `A_i = r_i − mean_G` (no std division).
pub fn dr_grpo(rows: &[RolloutReward]) -> Result<StepAdvantages> {
    per_group(rows, |r, j| {
        let (m, _) = mean_std_unbiased(r);
        r[j] - m
    })
}

/// RLOO: `A_i = r_i − (Σ_G r − r_i)/(|G| − 1)`.
pub fn rloo(rows: &[RolloutReward]) -> Result<StepAdvantages> {
    per_group(rows, |r, j| {
        let total: f64 = r.iter().sum();
        r[j] - (total - r[j]) / (r.len() as f64 - 1.0)
    })
}

/// ReMax: `A_i = r_i − b_i`, with `b_i` the reward of the greedy rollout of the same prompt.
pub fn remax(rewards: &[f64], baselines: &[f64]) -> Result<Vec<f64>> {
    if rewards.len() != baselines.len() {
        return Err(Error::Shape {
            what: "remax baselines",
            row: 0,
            got: baselines.len(),
            expected: rewards.len(),
        });
    }
    Ok(rewards.iter().zip(baselines).map(|(r, b)| r - b).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[(&str, f64)]) -> Vec<RolloutReward> {
        v.iter()
            .map(|&(u, r)| RolloutReward {
                uid: u.into(),
                domain: "d".into(),
                reward: r,
                kl: None,
            })
            .collect()
    }

    #[test]
    fn grpo_uses_unbiased_std_plus_eps() {
        let a = grpo(
            &rows(&[("a", 1.0), ("a", 0.0), ("b", 0.5), ("b", 0.5)]),
            1e-6,
        )
        .unwrap();
        let s = (0.5f64).sqrt();
        assert!((a.advantages[0] - 0.5 / (s + 1e-6)).abs() < 1e-12);
        assert!((a.advantages[1] + 0.5 / (s + 1e-6)).abs() < 1e-12);
        assert_eq!(&a.advantages[2..], &[0.0, 0.0]);
    }

    #[test]
    fn rloo_and_dr_grpo_on_interleaved_groups() {
        let r = rows(&[("a", 1.0), ("b", 0.2), ("a", 0.0), ("a", 0.5), ("b", 0.4)]);
        let a = rloo(&r).unwrap().advantages;
        assert!((a[0] - (1.0 - 0.25)).abs() < 1e-12);
        assert!((a[1] - (0.2 - 0.4)).abs() < 1e-12);
        let d = dr_grpo(&r).unwrap().advantages;
        assert!((d[0] - 0.5).abs() < 1e-12 && (d[4] - 0.1).abs() < 1e-12);
    }

    #[test]
    fn a_single_rollout_group_gets_zero_and_is_counted() {
        let a = grpo(&rows(&[("a", 1.0), ("b", 0.0), ("b", 1.0)]), 1e-6).unwrap();
        assert_eq!(a.advantages[0], 0.0);
        assert_eq!(a.metrics.singleton_groups, 1);
        assert!(a.advantages.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn remax_subtracts_the_greedy_reward() {
        assert_eq!(remax(&[1.0, 0.5], &[0.5, 0.5]).unwrap(), vec![0.5, 0.0]);
        assert!(remax(&[1.0], &[]).is_err());
    }
}
