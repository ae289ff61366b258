//! Value (PPO with GAE only): the value model's values of the kept rollouts before the
//! advantages, and its update on GAE's returns ([`crate::critic`]; reference
//! `dp_critic.py::{compute_values, update_critic}`): the clipped value loss over the actor's
//! mini- and micro-batches, `actor.ppo_epochs` times, one step of the critic's own AdamW per
//! mini-batch.

use super::rollout::Prompt;
use super::score::StepRewards;
use super::update::{Learner, UpdateStats, padded};
use super::{Result, Trainer, TrainerError, model_err};
use qoq_core::Rollout;
use std::collections::BTreeMap;

/// Metric: the value model's gradient norm (mean over its optimiser steps).
pub const CRITIC_GRAD_NORM: &str = "critic/grad_norm";
/// Metric: the value model's learning rate.
pub const CRITIC_LR: &str = "critic/lr";
/// Metric: the value model's optimiser steps skipped so far (non-finite gradient norm).
pub const CRITIC_SKIPPED_STEPS: &str = "critic/skipped_steps";

fn no_critic() -> TrainerError {
    TrainerError::Config("estimator = \"gae\" needs the value model".into())
}

impl Trainer {
    /// The value model's values of the kept rollouts (estimator order), one vector per rollout
    /// of its response length, computed in the update's micro-batches.
    pub(super) fn values(
        &self,
        step: u64,
        prompts: &[Prompt],
        rewards: &StepRewards,
    ) -> Result<Vec<Vec<f32>>> {
        let critic = self.critic.as_ref().ok_or_else(no_critic)?;
        let flat: Vec<(usize, &Rollout, ())> = rewards
            .kept_rollouts()
            .into_iter()
            .map(|(gi, r)| (gi, r, ()))
            .collect();
        let mini = self.cfg.rollouts_per_optimizer_step();
        let micro = self.cfg.actor.micro_batch_size_per_device_for_update;
        self.per_rollout(step, prompts, &flat, mini, micro, |_, t| {
            Ok(critic
                .predict(&t.inputs, &t.at, &t.mask)
                .map_err(model_err)?
                .detach())
        })
    }

    /// The critic update on GAE's `returns` from the `old_values` of [`Trainer::values`] (both
    /// in estimator order); logs `critic/vf_loss`, `critic/vf_clipfrac`, `critic/vpred_mean`
    /// (means over micro-batches), `critic/grad_norm`, `critic/lr`, `critic/skipped_steps`.
    pub(super) fn update_critic(
        &mut self,
        step: u64,
        prompts: &[Prompt],
        rewards: &StepRewards,
        old_values: &[Vec<f32>],
        returns: &[Vec<f64>],
        m: &mut BTreeMap<String, f64>,
    ) -> Result<()> {
        let items: Vec<(usize, &Rollout, (&[f32], &[f64]))> = rewards
            .kept_rollouts()
            .into_iter()
            .zip(old_values.iter().zip(returns))
            .map(|((gi, r), (v, ret))| (gi, r, (v.as_slice(), ret.as_slice())))
            .collect();
        let mini = self.cfg.rollouts_per_optimizer_step();
        let micro = self.cfg.actor.micro_batch_size_per_device_for_update;
        let mut stats = UpdateStats::default();
        for _ in 0..self.cfg.actor.ppo_epochs.max(1) {
            stats.merge(
                self.update_loop_of(Learner::Critic, &items, mini, micro, |t, ub| {
                    let critic = t.critic.as_ref().ok_or_else(no_critic)?;
                    let rt = t.rollout_tensors(step, prompts, ub)?;
                    let (b, r_len) = rt.mask.dims2()?;
                    let old = padded(ub.iter().map(|(_, _, (v, _))| *v), b, r_len, &t.device)?;
                    let ret = padded(ub.iter().map(|(_, _, (_, r))| *r), b, r_len, &t.device)?;
                    let out = critic
                        .micro_loss(&rt.inputs, &rt.at, &rt.mask, &old, &ret)
                        .map_err(model_err)?;
                    Ok((out.loss, out.metrics.entries()))
                })?,
            );
        }
        for (name, (s, c)) in &stats.loss_sums {
            m.insert((*name).to_string(), s / (*c).max(1) as f64);
        }
        if stats.opt_steps > 0 {
            m.insert(
                CRITIC_GRAD_NORM.into(),
                stats.norm_sum / stats.opt_steps as f64,
            );
            m.insert(CRITIC_LR.into(), stats.lr_last);
        }
        let critic = self.critic.as_ref().ok_or_else(no_critic)?;
        m.insert(
            CRITIC_SKIPPED_STEPS.into(),
            critic.optimizer().skipped() as f64,
        );
        Ok(())
    }
}
