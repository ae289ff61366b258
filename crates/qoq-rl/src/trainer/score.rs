//! Score: [`RolloutGroup`]s → [`ScoredGroup`]s with the configured reward, then the rewards the
//! estimator sees ([`StepRewards`]): the KL to the reference subtracted when it is in the reward
//! (`use_kl_loss = false`), and groups without reward variance dropped by dynamic filtering.

use super::rollout::Prompt;
use super::{CRITIC_KL, CRITIC_KL_COEF, FILTER_DROPPED_GROUPS, FILTER_KEPT_GROUPS, TIMING_REF};
use super::{Result, Trainer, TrainerError, response_log_probs};
use crate::advantage::RolloutReward;
use candle_core::DType;
use qoq_core::{Rollout, RolloutGroup, ScoredGroup};
use qoq_model::ForwardMode;
use qoq_reward::RewardInput;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// The scored groups of a step with the rewards the estimator sees.
pub struct StepRewards {
    /// One scored group per prompt, in prompt order (filtered groups included).
    pub groups: Vec<ScoredGroup>,
    /// Per group and rollout: the reward, less `β · Σ_t kl_t` when the KL is in the reward.
    pub rewards: Vec<Vec<f64>>,
    /// Per group and rollout: the sequence KL to the reference, when it was computed.
    pub kl: Option<Vec<Vec<f64>>>,
    /// Per group: kept by dynamic filtering (always true without it).
    pub keep: Vec<bool>,
    /// Per group and rollout: the per-token KL to the reference (response length), with the β
    /// applied, when the KL is in the reward (token-level rewards of REINFORCE++ and GAE).
    pub token_kl: Option<(f64, Vec<Vec<Vec<f64>>>)>,
}

impl StepRewards {
    /// The estimator's input: one row per rollout of the kept groups, group after group.
    pub fn estimator_rows(&self) -> Vec<RolloutReward> {
        let mut rows = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            if !self.keep[gi] {
                continue;
            }
            let grp = g.group();
            for (j, &reward) in self.rewards[gi].iter().enumerate() {
                rows.push(RolloutReward {
                    uid: grp.id.0.clone(),
                    domain: grp.domain.clone(),
                    reward,
                    kl: self.kl.as_ref().map(|k| k[gi][j]),
                });
            }
        }
        rows
    }

    /// Token-level rewards of the kept groups' rollouts, in the order of
    /// [`StepRewards::estimator_rows`]: the outcome reward on the response's last token, minus
    /// `β · kl_t` on every token when the KL is in the reward (verl's `token_level_rewards`).
    pub fn token_rewards(&self) -> Vec<Vec<f64>> {
        let mut out = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            if !self.keep[gi] {
                continue;
            }
            for (j, (r, score)) in g.group().rollouts().iter().zip(g.rewards()).enumerate() {
                let mut tr = vec![0.0; r.token_ids.len()];
                if let Some((beta, kl)) = &self.token_kl {
                    for (x, k) in tr.iter_mut().zip(&kl[gi][j]) {
                        *x -= beta * k;
                    }
                }
                if let Some(last) = tr.last_mut() {
                    *last += score;
                }
                out.push(tr);
            }
        }
        out
    }

    /// `(prompt index, rollout)` of every rollout of the kept groups, in the order of
    /// [`StepRewards::estimator_rows`].
    pub fn kept_rollouts(&self) -> Vec<(usize, &Rollout)> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(gi, _)| self.keep[*gi])
            .flat_map(|(gi, g)| g.group().rollouts().iter().map(move |r| (gi, r)))
            .collect()
    }
}

/// Population standard deviation (0 for fewer than two values).
pub fn population_std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64).sqrt()
}

impl Trainer {
    /// Scores every rollout of `groups` (answering `prompts`, in order) with the reward.
    pub(super) fn score(
        &self,
        step: u64,
        path: &Path,
        prompts: &[Prompt],
        groups: Vec<RolloutGroup>,
    ) -> Result<Vec<ScoredGroup>> {
        let inputs: Vec<RewardInput<'_>> = prompts
            .iter()
            .zip(&groups)
            .flat_map(|(p, g)| {
                g.rollouts().iter().map(move |r| RewardInput {
                    response: &r.text,
                    sample: &p.sample,
                    mask: p.mask.as_ref(),
                })
            })
            .collect();
        let mut scores = self.reward.score_batch(&inputs).into_iter();
        drop(inputs);
        let mut out = Vec::with_capacity(groups.len());
        for (p, g) in prompts.iter().zip(groups) {
            let group_scores: Vec<_> = scores.by_ref().take(g.len()).collect();
            // A NaN or infinite reward would poison the advantages of its whole group (and
            // DRPO's history): refuse it, naming the row.
            for s in &group_scores {
                if !s.overall.is_finite() {
                    return Err(TrainerError::Data {
                        step,
                        path: path.to_path_buf(),
                        message: format!(
                            "line {}: the reward `{}` returned a non-finite score {}",
                            p.sample.line,
                            self.reward.name(),
                            s.overall
                        ),
                    });
                }
            }
            out.push(
                ScoredGroup::new(g, group_scores).map_err(|e| TrainerError::Data {
                    step,
                    path: path.to_path_buf(),
                    message: format!(
                        "line {}: reward `{}`: {e}",
                        p.sample.line,
                        self.reward.name()
                    ),
                })?,
            );
        }
        Ok(out)
    }

    /// The rewards the estimator sees: `r − β·Σ_t kl_t` per rollout when the KL is in the
    /// reward (logging `critic/kl`, `critic/kl_coef`, `timing_s/ref` and updating the
    /// controller), and the groups kept by dynamic filtering (logging `filter/*`).
    pub(super) fn shape_rewards(
        &mut self,
        step: u64,
        prompts: &[Prompt],
        groups: Vec<ScoredGroup>,
        m: &mut BTreeMap<String, f64>,
    ) -> Result<StepRewards> {
        let t_ref = Instant::now();
        // The per-rollout KL: for the KL in the reward, and for DRPO's KL-aware damping whatever
        // `use_kl_loss` says.
        let wants_kl = self.state.kl_controller.is_some() || self.cfg.algorithm.needs_rollout_kl();
        let seq_kl = if wants_kl {
            let _span = tracing::info_span!("reference_kl", step).entered();
            Some(self.sharded_sequence_kl(step, prompts, &groups)?)
        } else {
            None
        };
        let mut rewards: Vec<Vec<f64>> = groups.iter().map(ScoredGroup::rewards).collect();
        if let Some((_, mean_kl, _)) = &seq_kl {
            m.insert(CRITIC_KL.into(), *mean_kl);
            m.insert(TIMING_REF.into(), t_ref.elapsed().as_secs_f64());
        }
        let mut token_kl = None;
        if let (Some((seq, mean_kl, tok)), Some(ctl)) = (&seq_kl, self.state.kl_controller.as_mut())
        {
            let beta = ctl.kl_coef();
            token_kl = Some((beta, tok.clone()));
            let mut count = 0;
            for (rg, kg) in rewards.iter_mut().zip(seq) {
                for (r, k) in rg.iter_mut().zip(kg) {
                    *r -= beta * k;
                    count += 1;
                }
            }
            ctl.update(*mean_kl, count);
            m.insert(CRITIC_KL_COEF.into(), beta);
        }
        let a = &self.cfg.algorithm;
        let keep: Vec<bool> = rewards
            .iter()
            .map(|r| !a.dynamic_filter || population_std(r) > a.filter_min_std)
            .collect();
        if a.dynamic_filter {
            let kept = keep.iter().filter(|k| **k).count();
            m.insert(FILTER_KEPT_GROUPS.into(), kept as f64);
            m.insert(FILTER_DROPPED_GROUPS.into(), (groups.len() - kept) as f64);
        }
        Ok(StepRewards {
            groups,
            rewards,
            kl: seq_kl.map(|(s, _, _)| s),
            keep,
            token_kl,
        })
    }

    /// [`Trainer::sequence_kl`] with the groups shared among the data-parallel ranks (the
    /// contiguous shares of [`crate::dist::shard`]), the results all-gathered: every rank gets
    /// every group's KL. The batch mean is recombined from each rank's mean and count.
    #[allow(clippy::type_complexity)]
    fn sharded_sequence_kl(
        &self,
        step: u64,
        prompts: &[Prompt],
        groups: &[ScoredGroup],
    ) -> Result<(Vec<Vec<f64>>, f64, Vec<Vec<Vec<f64>>>)> {
        let (rank, ranks) = (self.dist.rank(), self.dist.size());
        if ranks == 1 {
            return self.sequence_kl(step, prompts, groups);
        }
        let mine = crate::dist::shard(groups.len(), rank, ranks);
        let rollouts: usize = groups[mine.clone()].iter().map(|g| g.group().len()).sum();
        let (seq, mean, tokens) = self.sequence_kl(step, &prompts[mine.clone()], &groups[mine])?;
        let err = Self::dist_err(step, "reference KL all-gather");
        let bytes = serde_json::to_vec(&(seq, mean, rollouts, tokens))
            .map_err(|e| err(crate::dist::DistError::Mpi(format!("serialising: {e}"))))?;
        let (mut seq, mut sum, mut count, mut tokens) = (Vec::new(), 0.0, 0usize, Vec::new());
        for (r, part) in self
            .dist
            .all_gather_bytes(&bytes)
            .map_err(&err)?
            .iter()
            .enumerate()
        {
            let (s, m, c, t): (Vec<Vec<f64>>, f64, usize, Vec<Vec<Vec<f64>>>) =
                serde_json::from_slice(part)
                    .map_err(|e| err(crate::dist::DistError::Mpi(format!("rank {r}'s KL: {e}"))))?;
            seq.extend(s);
            tokens.extend(t);
            sum += m * c as f64;
            count += c;
        }
        Ok((seq, sum / count.max(1) as f64, tokens))
    }

    /// Per-rollout sequence KL to the reference policy (`Σ_t kl_t` over the response, estimator
    /// `algorithm.kl.kl_penalty` between the sampler's and the reference's log-probs, in
    /// micro-batches of `actor.micro_batch_size_per_device_for_experience`), per group, with
    /// the batch mean of the per-sequence token-mean KL (the controller's input,
    /// `apply_kl_penalty`'s `current_kl`), and each rollout's per-token KL.
    #[allow(clippy::type_complexity)]
    fn sequence_kl(
        &self,
        step: u64,
        prompts: &[Prompt],
        groups: &[ScoredGroup],
    ) -> Result<(Vec<Vec<f64>>, f64, Vec<Vec<Vec<f64>>>)> {
        let Some(rm) = &self.ref_model else {
            return Err(TrainerError::Config(
                "the KL in the reward and DRPO's KL damping need the reference model".into(),
            ));
        };
        let flat: Vec<(usize, &Rollout, ())> = groups
            .iter()
            .enumerate()
            .flat_map(|(gi, g)| g.group().rollouts().iter().map(move |r| (gi, r, ())))
            .collect();
        let micro = self
            .cfg
            .actor
            .micro_batch_size_per_device_for_experience
            .max(1);
        let (mut seq, mut means) = (Vec::with_capacity(flat.len()), 0.0);
        let mut tokens: Vec<Vec<f64>> = Vec::with_capacity(flat.len());
        for ub in flat.chunks(micro) {
            let t = self.rollout_tensors(step, prompts, ub)?;
            let rf = response_log_probs(
                rm,
                &t.inputs,
                &t.at,
                &t.labels,
                ForwardMode::Inference,
                step,
            )?;
            let kld = crate::loss::compute_kl(&t.old, &rf, self.cfg.algorithm.kl.kl_penalty)
                .map_err(|source| TrainerError::Loss { step, source })?
                .mul(&t.mask)?
                .to_dtype(DType::F64)?;
            let sums: Vec<f64> = kld.sum(1)?.to_vec1()?;
            let rows: Vec<Vec<f64>> = kld.to_vec2()?;
            for (row, (_, r, _)) in rows.into_iter().zip(ub) {
                tokens.push(row[..r.token_ids.len().min(row.len())].to_vec());
            }
            let counts: Vec<f64> = t.mask.to_dtype(DType::F64)?.sum(1)?.to_vec1()?;
            for (sum, c) in sums.into_iter().zip(counts) {
                means += sum / c.max(1.0);
                seq.push(sum);
            }
        }
        let mean = means / seq.len().max(1) as f64;
        let mut it = seq.into_iter();
        let per_group = groups
            .iter()
            .map(|g| it.by_ref().take(g.group().len()).collect())
            .collect();
        let mut it = tokens.into_iter();
        let tokens_per_group = groups
            .iter()
            .map(|g| it.by_ref().take(g.group().len()).collect())
            .collect();
        Ok((per_group, mean, tokens_per_group))
    }
}
