//! Update: one micro-batched loop for the RL and the SFT step ([`Trainer::update_loop`]):
//! mini-batches of items, each split in micro-batches whose losses (divided by the number of
//! micro-batches) are backpropagated and accumulated; one AdamW step per mini-batch. The RL
//! update runs `actor.ppo_epochs` passes over the same mini-batches; with more than one the old
//! log-probs are the policy's own before the update (verl's rule), otherwise the sampler's.
//! In data-parallel training each rank runs its share of every mini-batch's micro-batches
//! ([`crate::dist::shard`]) and the accumulated gradients are summed over the ranks
//! ([`Trainer::all_reduce_grads`]) before the one optimiser step.

use super::perf::CapturedMicroBatch;
use super::rollout::Prompt;
use super::score::StepRewards;
use super::{Result, SFT_LOSS, SKIPPED_STEPS, StepOutcome, Trainer, TrainerError, model_err};
use crate::advantage::TokenAdvantages;
use crate::loss::{
    ActorLossInputs, KlTerm, LossConfig, PolicyLossInputs, check_labels, compute_actor_loss,
    log_probs_from_logits,
};
use crate::metrics_log::names;
use crate::optim::{AdamW, GradAccumulator};
use candle_core::{DType, Tensor};
use qoq_core::Rollout;
use qoq_model::{ClinicalVlm, ForwardMode, ModelInputs, ResponseAt, RolloutTensors};
use qoq_processor::processor::ProcessedSample;
use std::collections::BTreeMap;
use std::time::Instant;

/// The SFT target of an answer: the reasoning block, then the boxed answer (the response format
/// of the QoQ prompt). With a ground-truth box (in the pixels of the image the model sees) the
/// reasoning block outlines it as the prompt asks, a ```json list of `{"bbox_2d", "label"}`
/// (which the reward's format and IoU scores read); without one it is empty.
pub fn sft_target(answer: &str, bbox: Option<[f64; 4]>) -> String {
    match bbox {
        Some(b) => {
            let item = serde_json::json!([{
                "bbox_2d": b.map(|v| v.round() as i64),
                "label": answer,
            }]);
            format!("<think>\n```json\n{item}\n```\n</think>\n\\boxed{{{answer}}}")
        }
        None => format!("<think>\n</think>\n\\boxed{{{answer}}}"),
    }
}

/// Log-probabilities `(b, r_len)` of the response tokens `labels` under `model`: the hidden state
/// at position p predicts token p + 1, so positions `s - 1 .. s - 1 + r_len` of a prompt of
/// length `s` followed by the response ([`ResponseAt::After`]), or the packed rows' positions
/// ([`ResponseAt::Gather`]).
pub fn response_log_probs(
    model: &ClinicalVlm,
    inputs: &ModelInputs,
    at: &ResponseAt,
    labels: &Tensor,
    mode: ForwardMode,
    step: u64,
) -> Result<Tensor> {
    response_log_probs_chunked(model, inputs, at, labels, mode, step, LOGITS_CHUNK)
}

/// [`response_log_probs`] with `chunk` elements of logits per checkpointed chunk of positions
/// (tests force several chunks on a tiny model with it).
#[doc(hidden)]
pub fn response_log_probs_chunked(
    model: &ClinicalVlm,
    inputs: &ModelInputs,
    at: &ResponseAt,
    labels: &Tensor,
    mode: ForwardMode,
    step: u64,
    chunk: usize,
) -> Result<Tensor> {
    let r_len = labels.dim(1)?;
    let hidden = at.hidden(
        &model.forward_hidden(inputs, mode).map_err(model_err)?,
        r_len,
    )?;
    let head = model.lm_head().map_err(model_err)?;
    let (b, vocab) = (hidden.dim(0)?, head.weight().dim(0)?);
    let positions = positions_per_chunk(chunk, b, vocab);
    if !qoq_model::checkpoint::active() || r_len <= positions {
        let logits = qoq_model::linear::linear(head, &hidden)?.to_dtype(DType::F32)?;
        return log_probs_from_logits(&logits, labels)
            .map_err(|source| TrainerError::Loss { step, source });
    }
    // Activation checkpointing: the logits are activations too, `(b, r_len, vocab)` in f32 plus
    // their gradient (at 256 response tokens of a 151,936-token vocabulary, about 0.45 GiB of
    // the bf16 recipe's peak). Each chunk of positions is a checkpointed segment: its forward
    // keeps its hidden states and log-probs only, its backward recomputes its logits, so one
    // chunk's logits exist at a time. The labels are checked here, where a bad one is an error
    // of this step, not inside a chunk's forward.
    check_labels(labels, vocab).map_err(|source| TrainerError::Loss { step, source })?;
    let mut parts = Vec::with_capacity(r_len.div_ceil(positions));
    for start in (0..r_len).step_by(positions) {
        let n = positions.min(r_len - start);
        let (head, labels) = (head.clone(), labels.narrow(1, start, n)?);
        let segment: qoq_model::checkpoint::Segment = std::sync::Arc::new(move |h: &Tensor| {
            let logits = qoq_model::linear::linear(&head, h)?.to_dtype(DType::F32)?;
            log_probs_from_logits(&logits, &labels).map_err(candle_core::Error::wrap)
        });
        let h = hidden.narrow(1, start, n)?;
        parts.push(qoq_model::checkpoint::checkpointed(&h, segment)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Elements of the `(rows, positions, vocab)` logits of one chunk of positions that
/// [`response_log_probs`] computes at a time under activation checkpointing (32 MiB in f32).
pub const LOGITS_CHUNK: usize = 1 << 23;

/// Response positions per chunk of `chunk` logits for `rows` rows of a `vocab`-token
/// vocabulary (at least one).
pub fn positions_per_chunk(chunk: usize, rows: usize, vocab: usize) -> usize {
    (chunk / (rows * vocab).max(1)).max(1)
}

/// What an update loop did: per-metric sums over micro-batches, and the optimiser's steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateStats {
    /// `(sum, count)` of each micro-batch metric (over every rank's micro-batches).
    pub loss_sums: BTreeMap<String, (f64, usize)>,
    /// Sum of the finite gradient norms.
    pub norm_sum: f64,
    /// The learning rate of the last optimiser step.
    pub lr_last: f64,
    /// Optimiser steps taken (skipped ones included).
    pub opt_steps: usize,
}

impl UpdateStats {
    /// Adds another loop's sums and steps (its learning rate becomes the last).
    pub fn merge(&mut self, other: UpdateStats) {
        for (name, (s, c)) in other.loss_sums {
            let e = self.loss_sums.entry(name).or_insert((0.0, 0));
            e.0 += s;
            e.1 += c;
        }
        self.norm_sum += other.norm_sum;
        self.opt_steps += other.opt_steps;
        if other.opt_steps > 0 {
            self.lr_last = other.lr_last;
        }
    }

    /// The mean of a micro-batch metric (0 when none was recorded).
    pub fn mean(&self, name: &str) -> f64 {
        self.loss_sums
            .get(name)
            .map_or(0.0, |(s, c)| s / (*c).max(1) as f64)
    }

    /// The RL step's metrics: each loss metric's mean, and the mean gradient norm and last
    /// learning rate when the optimiser stepped.
    pub fn rl_metrics(&self, m: &mut BTreeMap<String, f64>) {
        for (name, (s, c)) in &self.loss_sums {
            m.insert(name.clone(), s / *c as f64);
        }
        if self.opt_steps > 0 {
            m.insert(
                names::GRAD_NORM.into(),
                self.norm_sum / self.opt_steps as f64,
            );
            m.insert(names::LR.into(), self.lr_last);
        }
    }
}

/// The loss of one micro-batch (graph attached to the trainable parameters) with its metrics.
pub type MicroLoss = (Tensor, Vec<(&'static str, f64)>);

/// Which model an update loop trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Learner {
    /// The policy, with the actor's AdamW.
    Actor,
    /// PPO's value model, with its own AdamW.
    Critic,
}

/// What the actor loss of one rollout needs beyond its tokens.
pub(super) struct ActorItem<'a> {
    /// Its advantage (sequence-level estimators).
    advantage: f64,
    /// Its advantage per response token (token-level estimators).
    token_advantages: Option<&'a [f64]>,
    /// The policy's log-probs before the update (`actor.ppo_epochs > 1`).
    old_log_probs: Option<Vec<f32>>,
}

/// A `(b, r_len)` tensor of per-rollout vectors, zero-padded (longer vectors cut).
pub(super) fn padded<'a, T: Copy + Into<f64> + 'a>(
    rows: impl Iterator<Item = &'a [T]>,
    b: usize,
    r_len: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let mut v = vec![0f32; b * r_len];
    for (i, row) in rows.enumerate() {
        for (j, x) in row.iter().take(r_len).enumerate() {
            v[i * r_len + j] = (*x).into() as f32;
        }
    }
    Ok(Tensor::from_vec(v, (b, r_len), dev)?)
}

impl Trainer {
    /// The update loop: `items` in mini-batches of `mini`, each in micro-batches of `micro`;
    /// `loss_of` gives a micro-batch's loss, which is divided by the number of micro-batches of
    /// its mini-batch before the backward pass; gradients accumulate over the mini-batch and
    /// AdamW steps once per mini-batch (a non-finite gradient norm skips the step and is
    /// counted by the optimiser).
    pub(super) fn update_loop<T>(
        &mut self,
        items: &[T],
        mini: usize,
        micro: usize,
        loss_of: impl FnMut(&Self, &[T]) -> Result<MicroLoss>,
    ) -> Result<UpdateStats> {
        self.update_loop_of(Learner::Actor, items, mini, micro, loss_of)
    }

    /// The optimiser of `learner`.
    fn optimizer_of(&mut self, learner: Learner) -> Result<&mut AdamW> {
        match learner {
            Learner::Actor => Ok(&mut self.opt),
            Learner::Critic => self
                .critic
                .as_mut()
                .map(crate::critic::Critic::optimizer_mut)
                .ok_or_else(|| TrainerError::Config("this run has no value model".into())),
        }
    }

    /// [`Trainer::update_loop`] for `learner` (the actor's or the critic's optimiser). With
    /// several ranks, each runs its contiguous share of a mini-batch's micro-batches (every
    /// micro-batch's loss still divided by the mini-batch's number of micro-batches), and the
    /// gradients and metric sums are summed over the ranks: the update is the one-process
    /// update.
    pub(super) fn update_loop_of<T>(
        &mut self,
        learner: Learner,
        items: &[T],
        mini: usize,
        micro: usize,
        mut loss_of: impl FnMut(&Self, &[T]) -> Result<MicroLoss>,
    ) -> Result<UpdateStats> {
        let mut stats = UpdateStats::default();
        let (rank, ranks) = (self.dist.rank(), self.dist.size());
        for mb in items.chunks(mini.max(1)) {
            let parts: Vec<&[T]> = mb.chunks(micro.max(1)).collect();
            let count = parts.len() as f64;
            let mut acc = GradAccumulator::new();
            // `model.gradient_checkpointing`: the loss's Train forwards keep only each layer's
            // input and the backward recomputes the layers (the same path with it off).
            let ckpt = self.cfg.model.gradient_checkpointing;
            // The next micro-batch's backward adds the projections' and embedding's
            // gradients (and with checkpointing every layer parameter's) to the sums as it goes
            // (`backward_onto`: in place on the CPU) instead of holding them besides the sums
            // until it ends. The sums are in the parameters' dtype, as the backward's own
            // gradients are (`GradAccumulator`).
            for &ub in &parts[crate::dist::shard(parts.len(), rank, ranks)] {
                let (loss, metrics) = qoq_model::checkpoint::scope(ckpt, || loss_of(self, ub))?;
                for (name, v) in metrics {
                    let e = stats.loss_sums.entry(name.to_string()).or_insert((0.0, 0));
                    e.0 += v;
                    e.1 += 1;
                }
                let opt = match learner {
                    Learner::Actor => &self.opt,
                    Learner::Critic => match &self.critic {
                        Some(c) => c.optimizer(),
                        None => return Err(TrainerError::Config("no value model".into())),
                    },
                };
                let sums = acc.take_store(opt.params())?;
                let continued = sums.is_some();
                // The loss (and with it the graph's activations) is dropped with the
                // statement; the store's other gradients with `store`, once the parameters'
                // are moved out.
                let loss = (loss / count)?;
                let sums = sums.unwrap_or_default();
                let mut store = match &self.copies {
                    // Mixed precision: the copies' gradients summed onto the masters.
                    Some(copies) => {
                        qoq_model::checkpoint::backward_onto_copies(&loss, sums, copies)?
                    }
                    None => qoq_model::checkpoint::backward_onto(&loss, sums)?,
                };
                drop(loss);
                let grads = opt.grads_of(&mut store);
                drop(store);
                if continued {
                    acc.set_sums(grads);
                } else {
                    acc.add(grads)?;
                }
            }
            let grads = self.all_reduce_grads(learner, acc.take())?;
            let t_opt = Instant::now();
            // Each gradient is freed as soon as its parameter is updated.
            let report = self.optimizer_of(learner)?.step_owned(grads)?;
            let opt_s = &self.perf.optimizer_s;
            opt_s.set(opt_s.get() + t_opt.elapsed().as_secs_f64());
            if learner == Learner::Actor {
                // Mixed precision: the next forward uses casts of the updated masters.
                self.refresh_compute_model()?;
            }
            if report.grad_norm.is_finite() {
                stats.norm_sum += report.grad_norm;
            }
            stats.lr_last = report.lr;
            stats.opt_steps += 1;
        }
        if ranks > 1 {
            stats.loss_sums = self.all_reduce_metric_sums(&stats.loss_sums)?;
        }
        Ok(stats)
    }

    /// The gradients `grads` (aligned with `learner`'s parameters; empty when this rank had no
    /// micro-batch) summed over the ranks: a parameter without a gradient on every rank stays
    /// without one (not updated, as in one process); one with a gradient somewhere gets the sum,
    /// zeros standing for the ranks without. The sums are f32: one all-reduce of the
    /// concatenated gradients through host memory, or NCCL's of each gradient on the GPU
    /// (`trainer.all_reduce`, [`crate::dist::GradientPath`]; with `nccl` also for one rank).
    pub(super) fn all_reduce_grads(
        &self,
        learner: Learner,
        grads: Vec<Option<Tensor>>,
    ) -> Result<Vec<Option<Tensor>>> {
        if self.dist.size() == 1 && matches!(self.gradients, crate::dist::GradientPath::Host) {
            return Ok(grads);
        }
        let step = self.state.step + 1;
        let params = match learner {
            Learner::Actor => self.opt.params(),
            Learner::Critic => self
                .critic
                .as_ref()
                .map(|c| c.optimizer().params())
                .ok_or_else(|| TrainerError::Config("this run has no value model".into()))?,
        };
        let grads = if grads.is_empty() {
            vec![None; params.len()]
        } else {
            grads
        };
        let mut present: Vec<f64> = grads
            .iter()
            .map(|g| if g.is_some() { 1.0 } else { 0.0 })
            .collect();
        self.dist
            .all_reduce_sum_f64(&mut present)
            .map_err(Self::dist_err(step, "gradient presence all-reduce"))?;
        #[cfg(feature = "nccl")]
        if let crate::dist::GradientPath::Nccl(nccl) = &self.gradients {
            // The present gradients, zeros where this rank has none, summed on the GPU.
            let mut parts = Vec::new();
            for ((g, p), &c) in grads.into_iter().zip(params).zip(&present) {
                if c != 0.0 {
                    parts.push(match g {
                        Some(g) => g,
                        None => Tensor::zeros(p.shape(), DType::F32, p.device())?,
                    });
                }
            }
            let mut sums = nccl
                .all_reduce_sum(&parts)
                .map_err(Self::dist_err(step, "gradient all-reduce (NCCL)"))?
                .into_iter();
            drop(parts);
            return Ok(present
                .iter()
                .map(|&c| if c == 0.0 { None } else { sums.next() })
                .collect());
        }
        let mut flat: Vec<f32> = Vec::new();
        // Each gradient is dropped once copied into the all-reduce buffer.
        for ((g, p), &c) in grads.into_iter().zip(params).zip(&present) {
            if c == 0.0 {
                continue;
            }
            match g {
                Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, p.elem_count())),
            }
        }
        self.dist
            .all_reduce_sum_f32(&mut flat)
            .map_err(Self::dist_err(step, "gradient all-reduce"))?;
        let mut out = Vec::with_capacity(params.len());
        let mut at = 0;
        for (p, &c) in params.iter().zip(&present) {
            if c == 0.0 {
                out.push(None);
                continue;
            }
            let n = p.elem_count();
            out.push(Some(Tensor::from_slice(
                &flat[at..at + n],
                p.shape(),
                p.device(),
            )?));
            at += n;
        }
        Ok(out)
    }

    /// Every rank's `(sum, count)` per metric, added up (by name: a rank without micro-batches
    /// has none).
    fn all_reduce_metric_sums(
        &self,
        sums: &BTreeMap<String, (f64, usize)>,
    ) -> Result<BTreeMap<String, (f64, usize)>> {
        let step = self.state.step + 1;
        let err = Self::dist_err(step, "metric all-gather");
        let mine = serde_json::to_vec(sums).map_err(|e| {
            err(crate::dist::DistError::Mpi(format!(
                "serialising metrics: {e}"
            )))
        })?;
        let mut out: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for part in self.dist.all_gather_bytes(&mine).map_err(&err)? {
            let theirs: BTreeMap<String, (f64, usize)> =
                serde_json::from_slice(&part).map_err(|e| {
                    err(crate::dist::DistError::Mpi(format!(
                        "a peer's metrics: {e}"
                    )))
                })?;
            for (name, (s, c)) in theirs {
                let e = out.entry(name).or_insert((0.0, 0));
                e.0 += s;
                e.1 += c;
            }
        }
        Ok(out)
    }

    /// The RL update: the kept groups' rollouts with their advantages (in the estimator's
    /// order; token-level ones when given), in mini-batches of `actor.global_batch_size · n`
    /// rollouts, `actor.ppo_epochs` times.
    pub(super) fn rl_update(
        &mut self,
        step: u64,
        prompts: &[Prompt],
        rewards: &StepRewards,
        advantages: &[f64],
        tokens: Option<&TokenAdvantages>,
    ) -> Result<UpdateStats> {
        let kept = rewards.kept_rollouts();
        let mini = self.cfg.rollouts_per_optimizer_step();
        let micro = self.cfg.actor.micro_batch_size_per_device_for_update;
        let epochs = self.cfg.actor.ppo_epochs.max(1);
        let old = if epochs > 1 {
            let flat: Vec<(usize, &Rollout, ())> =
                kept.iter().map(|&(gi, r)| (gi, r, ())).collect();
            Some(self.policy_log_probs(step, prompts, &flat)?)
        } else {
            None
        };
        let items: Vec<(usize, &Rollout, ActorItem<'_>)> = kept
            .into_iter()
            .enumerate()
            .map(|(i, (gi, r))| {
                let item = ActorItem {
                    advantage: advantages[i],
                    token_advantages: tokens.map(|t| t.advantages[i].as_slice()),
                    old_log_probs: old.as_ref().map(|o| o[i].clone()),
                };
                (gi, r, item)
            })
            .collect();
        let loss_cfg = self.cfg.loss_config();
        let mut stats = UpdateStats::default();
        for _ in 0..epochs {
            stats.merge(self.update_loop(&items, mini, micro, |t, ub| {
                let out = t.micro_loss(step, prompts, ub, &loss_cfg)?;
                Ok((out.loss, out.metrics.entries()))
            })?);
        }
        Ok(stats)
    }

    /// A `(b, r_len)` quantity `f` of the rollouts `flat`, computed in the update's mini- and
    /// micro-batches (so that the update's forward sees the same shapes) and returned per
    /// rollout, cut to its response length.
    /// The policy's log-probs of each rollout's response tokens as they stand now (no gradient),
    /// computed with the update's forward, mini- and micro-batches: the PPO ratio's old
    /// log-probs. Checkpointed too, so that no layer's activations outlive a micro-batch.
    pub(super) fn policy_log_probs(
        &self,
        step: u64,
        prompts: &[Prompt],
        flat: &[(usize, &Rollout, ())],
    ) -> Result<Vec<Vec<f32>>> {
        let mini = self.cfg.rollouts_per_optimizer_step();
        let micro = self.cfg.actor.micro_batch_size_per_device_for_update;
        self.per_rollout(step, prompts, flat, mini, micro, |t, rt| {
            let ckpt = t.cfg.model.gradient_checkpointing;
            let lp = qoq_model::checkpoint::scope(ckpt, || {
                response_log_probs(
                    &t.model,
                    &rt.inputs,
                    &rt.at,
                    &rt.labels,
                    ForwardMode::Train,
                    step,
                )
            })?;
            Ok(lp.detach())
        })
    }

    pub(super) fn per_rollout<X>(
        &self,
        step: u64,
        prompts: &[Prompt],
        flat: &[(usize, &Rollout, X)],
        mini: usize,
        micro: usize,
        f: impl Fn(&Self, &RolloutTensors) -> Result<Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(flat.len());
        for mb in flat.chunks(mini.max(1)) {
            for ub in mb.chunks(micro.max(1)) {
                let t = self.rollout_tensors(step, prompts, ub)?;
                let rows: Vec<Vec<f32>> = f(self, &t)?.to_dtype(DType::F32)?.to_vec2()?;
                for (row, (_, r, _)) in rows.into_iter().zip(ub) {
                    out.push(row[..r.token_ids.len().min(row.len())].to_vec());
                }
            }
        }
        Ok(out)
    }

    /// The tensors of the rollouts `ub` (with the index of their prompt): with
    /// `actor.pack_rollouts`, a prompt answered more than once in `ub` and packing paying
    /// ([`qoq_model::batch::packing_pays`]), each distinct prompt collated once and its rollouts
    /// packed after it ([`qoq_model::rollout_tensors_packed`]), otherwise one rollout per row
    /// after its prompt ([`qoq_model::rollout_tensors`]).
    pub(super) fn rollout_tensors<X>(
        &self,
        step: u64,
        prompts: &[Prompt],
        ub: &[(usize, &Rollout, X)],
    ) -> Result<RolloutTensors> {
        self.rollout_tensors_as(step, prompts, ub, self.cfg.actor.pack_rollouts)
    }

    /// [`Trainer::rollout_tensors`], packed or not as `pack` says.
    pub(super) fn rollout_tensors_as<X>(
        &self,
        step: u64,
        prompts: &[Prompt],
        ub: &[(usize, &Rollout, X)],
        pack: bool,
    ) -> Result<RolloutTensors> {
        // Each distinct prompt, in order of first appearance, and each rollout's row among them.
        let mut distinct: Vec<usize> = Vec::new();
        let rows: Vec<usize> = ub
            .iter()
            .map(|(gi, _, _)| match distinct.iter().position(|d| d == gi) {
                Some(r) => r,
                None => {
                    distinct.push(*gi);
                    distinct.len() - 1
                }
            })
            .collect();
        let pack = pack && distinct.len() < ub.len() && {
            // Each distinct prompt's real tokens and rollouts, against the longest response.
            let r_len = ub
                .iter()
                .map(|(_, r, _)| r.token_ids.len())
                .max()
                .unwrap_or(0)
                .max(1);
            let rows: Vec<(usize, usize)> = distinct
                .iter()
                .enumerate()
                .map(|(d, gi)| {
                    let s = prompts[*gi].processed.input_ids.len();
                    (s, rows.iter().filter(|&&r| r == d).count())
                })
                .collect();
            let hidden = self.model.config().text.hidden_size;
            qoq_model::batch::packing_pays(&rows, r_len, hidden)
        };
        let batch_prompts: Vec<ProcessedSample> = if pack {
            distinct
                .iter()
                .map(|gi| prompts[*gi].processed.clone())
                .collect()
        } else {
            ub.iter()
                .map(|(gi, _, _)| prompts[*gi].processed.clone())
                .collect()
        };
        let batch =
            self.processor
                .collate(&batch_prompts, None)
                .map_err(|e| TrainerError::Data {
                    step,
                    path: self.manifest.path().to_path_buf(),
                    message: e.to_string(),
                })?;
        let rollouts: Vec<&Rollout> = ub.iter().map(|(_, r, _)| *r).collect();
        let (placeholders, pad) = (
            self.placeholder_ids(),
            self.processor.tokenizer.ids.endoftext,
        );
        Ok(if pack {
            qoq_model::rollout_tensors_packed(
                &batch,
                &rows,
                &rollouts,
                &placeholders,
                pad,
                &self.device,
            )?
        } else {
            qoq_model::rollout_tensors(&batch, &rollouts, &placeholders, pad, &self.device)?
        })
    }

    /// The actor loss of one micro-batch of `(prompt index, rollout, advantage)` (graph attached
    /// to the trainable parameters).
    fn micro_loss(
        &self,
        step: u64,
        prompts: &[Prompt],
        ub: &[(usize, &Rollout, ActorItem<'_>)],
        loss_cfg: &LossConfig,
    ) -> Result<crate::loss::PolicyLossOutput> {
        let RolloutTensors {
            inputs,
            s,
            at,
            labels,
            mask,
            old,
        } = self.rollout_tensors(step, prompts, ub)?;
        let (b, r_len) = labels.dims2()?;
        let adv = if ub.iter().all(|(_, _, it)| it.token_advantages.is_some()) {
            let rows = ub.iter().filter_map(|(_, _, it)| it.token_advantages);
            padded(rows, b, r_len, &self.device)?
        } else {
            let mut adv = vec![0f32; b * r_len];
            for (i, (_, _, it)) in ub.iter().enumerate() {
                adv[i * r_len..(i + 1) * r_len].fill(it.advantage as f32);
            }
            Tensor::from_vec(adv, (b, r_len), &self.device)?
        };
        let old = if ub.iter().all(|(_, _, it)| it.old_log_probs.is_some()) {
            let rows = ub
                .iter()
                .filter_map(|(_, _, it)| it.old_log_probs.as_deref());
            padded(rows, b, r_len, &self.device)?
        } else {
            old
        };
        let lp = response_log_probs(&self.model, &inputs, &at, &labels, ForwardMode::Train, step)?;
        let ref_lp = match &self.ref_model {
            Some(rm) => Some(super::perf::Perf::timed(&self.perf.ref_s, || {
                response_log_probs(rm, &inputs, &at, &labels, ForwardMode::Inference, step)
                    .map(|t| t.detach())
            })?),
            None => None,
        };
        let loss_in = ActorLossInputs {
            policy: PolicyLossInputs {
                old_log_probs: &old,
                log_probs: &lp,
                advantages: &adv,
                response_mask: &mask,
            },
            kl: ref_lp.as_ref().map(KlTerm::RefLogProbs),
        };
        let out = compute_actor_loss(&loss_in, loss_cfg)
            .map_err(|source| TrainerError::Loss { step, source })?;
        // The capture is the micro-batch one rollout per row (as the PyTorch reference runs it).
        let unpacked = match (&at, self.perf.capture) {
            (ResponseAt::Gather(_), true) => {
                Some(self.rollout_tensors_as(step, prompts, ub, false)?)
            }
            _ => None,
        };
        self.perf.record(|c| {
            let (inputs, s) = match unpacked {
                Some(t) => (t.inputs, t.s),
                None => (inputs.clone(), s),
            };
            c.micro_batches.push(CapturedMicroBatch {
                inputs,
                s,
                labels: labels.clone(),
                mask: mask.clone(),
                old_log_probs: old.clone(),
                advantages: adv.clone(),
                ref_log_probs: ref_lp.clone(),
                pg_loss: out.metrics.pg_loss,
            })
        });
        Ok(out)
    }

    /// One supervised fine-tuning step on the same data stream: the target of each drawn row is
    /// [`sft_target`] of its answer followed by `<|im_end|>`; the loss is the cross-entropy of
    /// the target tokens given the prompt, reduced as the policy loss is
    /// (`actor.policy_loss.loss_agg_mode`, token-mean by default, and `loss_scale_factor`),
    /// accumulated over micro-batches of `actor.micro_batch_size_per_device_for_update` prompts,
    /// with one AdamW step per `actor.global_batch_size` prompts ([`Trainer::update_loop`]). Logs
    /// `sft/loss` (mean over micro-batches), `actor/grad_norm`, `actor/lr` and
    /// `actor/skipped_steps`.
    pub fn sft_step(&mut self) -> Result<StepOutcome> {
        self.perf.begin_step();
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let span = tracing::info_span!("sft_update", step).entered();
        // The rows processed, their boxes in the model's pixels.
        let prompts = self.draw(step)?;
        let path = self.manifest.path().to_path_buf();
        let data_err = |message: String| TrainerError::Data {
            step,
            path: path.clone(),
            message,
        };
        let im_end = self.processor.tokenizer.ids.im_end;
        let mut rows: Vec<(ProcessedSample, Vec<u32>)> = Vec::with_capacity(prompts.len());
        for Prompt {
            sample, processed, ..
        } in prompts
        {
            let mut target = self
                .processor
                .tokenizer
                .encode(&sft_target(&sample.answer, sample.bbox))
                .map_err(|e| data_err(format!("line {}: {e}", sample.line)))?;
            target.truncate(self.cfg.data.max_response_length.saturating_sub(1));
            target.push(im_end);
            rows.push((processed, target));
        }
        let mini = self.cfg.actor.global_batch_size;
        let micro = self.cfg.actor.micro_batch_size_per_device_for_update;
        let stats = self.update_loop(&rows, mini, micro, |t, ub| {
            let (loss, value) = t.sft_micro_loss(step, ub)?;
            Ok((loss, vec![(SFT_LOSS, value)]))
        })?;
        drop(span);
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        m.insert(SFT_LOSS.into(), stats.mean(SFT_LOSS));
        m.insert(
            names::GRAD_NORM.into(),
            stats.norm_sum / stats.opt_steps.max(1) as f64,
        );
        m.insert(names::LR.into(), stats.lr_last);
        m.insert(SKIPPED_STEPS.into(), self.opt.skipped() as f64);
        m.insert(super::TIMING_OPTIMIZER.into(), self.perf.optimizer_s.get());
        m.insert(names::TIME_PER_STEP.into(), t0.elapsed().as_secs_f64());
        self.finish_step(step, m)
    }

    /// The SFT loss of one micro-batch of `(prompt, target)` and its value.
    fn sft_micro_loss(
        &self,
        step: u64,
        ub: &[(ProcessedSample, Vec<u32>)],
    ) -> Result<(Tensor, f64)> {
        let pad = self.processor.tokenizer.ids.endoftext;
        let prompts: Vec<ProcessedSample> = ub.iter().map(|(p, _)| p.clone()).collect();
        let batch = self
            .processor
            .collate(&prompts, None)
            .map_err(|e| TrainerError::Data {
                step,
                path: self.manifest.path().to_path_buf(),
                message: e.to_string(),
            })?;
        let targets: Vec<&[u32]> = ub.iter().map(|(_, t)| t.as_slice()).collect();
        let r_len = targets.iter().map(|t| t.len()).max().unwrap_or(1);
        let inputs = qoq_model::batch_to_inputs(&batch, &targets, r_len, pad, &self.device)?;
        let b = ub.len();
        let mut labels = vec![pad; b * r_len];
        let mut mask = vec![0f32; b * r_len];
        for (i, t) in targets.iter().enumerate() {
            for (j, &tok) in t.iter().enumerate() {
                labels[i * r_len + j] = tok;
                mask[i * r_len + j] = 1.0;
            }
        }
        let labels = Tensor::from_vec(labels, (b, r_len), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, r_len), &self.device)?;
        let at = ResponseAt::After(batch.seq_len());
        let lp = response_log_probs(&self.model, &inputs, &at, &labels, ForwardMode::Train, step)?;
        // The run's `actor.policy_loss.loss_agg_mode` (and Dr.GRPO's scale factor) reduce the
        // target tokens' negative log-likelihoods as they reduce the policy loss.
        let agg = &self.cfg.actor.policy_loss;
        let loss =
            crate::loss::ops::agg_loss(&lp.neg()?, &mask, agg.loss_agg_mode, agg.loss_scale_factor)
                .map_err(|source| TrainerError::Loss { step, source })?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        Ok((loss, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sft_targets_outline_the_box_the_way_the_format_score_wants() {
        let t = sft_target("Nodule", Some([10.2, 20.0, 30.0, 40.7]));
        assert_eq!(
            t,
            "<think>\n```json\n[{\"bbox_2d\":[10,20,30,41],\"label\":\"Nodule\"}]\n```\n</think>\n\\boxed{Nodule}"
        );
        assert_eq!(qoq_reward::format::format_score(&t), 1.0);
        assert_eq!(
            qoq_reward::iou::collect_bboxes(&qoq_reward::iou::extract_json(&t).unwrap().unwrap())
                .len(),
            1
        );
        assert_eq!(sft_target("AF", None), "<think>\n</think>\n\\boxed{AF}");
    }
}
