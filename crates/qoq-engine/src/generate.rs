//! Batched generation of n rollouts for many prompts, with continuous batching: the
//! [`Engine`](crate::engine::Engine) fed from a list.
//!
//! Each prompt is prefilled once (its image, video and ECG features are computed once) and its
//! key/value cache is shared by its n rollouts. Rollouts of all admitted prompts decode together
//! in one batch; a finished sequence leaves the batch at once, and a waiting prompt is admitted
//! whenever the batch has room. Every rollout samples from its own random stream (prompt stream
//! id, rollout index), so a request gives the same tokens whatever else shares the batch.

use crate::budget::KvBudget;
use crate::engine::{Engine, SeqRequest};
use crate::sampling::SamplingParams;
use crate::stop::StopCondition;
use candle_core::{Device, Tensor};
use qoq_core::FinishReason;
use qoq_model::{ClinicalVlm, ModelInputs};

/// One prompt to answer `n` times.
#[derive(Debug, Clone)]
pub struct GroupRequest {
    /// The processed prompt, a batch of one row without padding.
    pub inputs: ModelInputs,
    /// Rollouts to sample.
    pub n: usize,
    /// The prompt's random stream id (e.g. its index in the dataset).
    pub stream: u64,
}

/// Settings shared by all requests of a call.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub sampling: SamplingParams,
    pub stop: StopCondition,
    /// Sequences decoded together at most (rows of the decode batch).
    pub max_batch_rows: usize,
    /// Prompt tokens per prefill forward at most (vLLM's `max_num_batched_tokens`): prompts are
    /// prefilled in pieces of at most this many tokens, at most this many per step (chunked
    /// prefill gives the same tokens as a whole one). 0: whole prompts, no bound.
    pub prefill_tokens: usize,
    /// Key/value memory the batch may hold (`rollout.kv_cache_mib`,
    /// `rollout.gpu_memory_utilization`); `None`: unbounded.
    pub kv_budget: Option<KvBudget>,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Generated token ids, the EOS included when `finish` is `Stop`.
    pub tokens: Vec<u32>,
    /// Log-probability of each token under the raw logits at temperature 1.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("request {index}: {message}")]
    Request { index: usize, message: String },
    #[error(transparent)]
    Model(#[from] qoq_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Generate `n` rollouts for every request: the [`Engine`] fed from the list, in order. A
/// request is admitted whenever the batch has room for its `n` rows (always when it is empty)
/// and, with [`GenerateConfig::kv_budget`], when the batch's key/value memory stays within the
/// budget with it ([`KvBudget::worst_case`]); otherwise it waits for rows to finish. A request
/// with more rows than fit in an empty batch runs in parts of rows that fit (each part prefills
/// the prompt again); every rollout samples from its own stream, so the tokens are those of the
/// unbounded run. `on_token(group, rollout, token)` is called for every sampled token as it
/// comes (for streaming). Output: per request, its `n` sequences in rollout order.
///
/// Errors: a request of which not even one row fits the budget (named with the budget's origin).
pub fn generate(
    model: &ClinicalVlm,
    requests: &[GroupRequest],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, usize, u32),
) -> Result<Vec<Vec<Generated>>, GenerateError> {
    cfg.sampling
        .validate()
        .map_err(|message| GenerateError::Request { index: 0, message })?;
    let empty = Generated {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        finish: FinishReason::Length,
    };
    let mut results: Vec<Vec<Generated>> =
        requests.iter().map(|r| vec![empty.clone(); r.n]).collect();
    let mut engine = Engine::new(model, cfg.prefill_tokens);
    let budget = match cfg.prefill_tokens {
        0 => usize::MAX,
        n => n,
    };
    let max_rows = cfg.max_batch_rows.max(1);
    // Parts in the engine (engine id = index here): request, rows still live, longest length.
    let mut parts: Vec<(usize, usize, usize)> = Vec::new();
    let mut waiting = 0usize; // next request to admit
    let mut admitted = 0usize; // rows of it already admitted
    loop {
        // Admit prompts while there is room (always at least one row when the batch is empty).
        while waiting < requests.len() {
            let req = &requests[waiting];
            let (index, remaining) = (waiting, req.n - admitted);
            let len = req.inputs.input_ids.dim(1)? + cfg.stop.max_new_tokens;
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let longest = parts.iter().filter(|p| p.1 > 0).map(|p| p.2).max();
            let part = match &cfg.kv_budget {
                Some(b) if remaining > 0 => match b.rows_alone(len) {
                    0 => {
                        return Err(GenerateError::Request {
                            index,
                            message: format!(
                                "one rollout of {} prompt tokens + {} new tokens needs {:.1} MiB \
                                 of key/value memory, more than {} allows ({:.1} MiB)",
                                len - cfg.stop.max_new_tokens,
                                cfg.stop.max_new_tokens,
                                KvBudget::mib(b.worst_case(1, len)),
                                b.origin,
                                KvBudget::mib(b.bytes)
                            ),
                        });
                    }
                    alone => remaining.min(alone),
                },
                _ => remaining,
            };
            if rows > 0 {
                let longest = longest.unwrap_or(0).max(len);
                let over_budget = cfg
                    .kv_budget
                    .as_ref()
                    .is_some_and(|b| !b.fits(rows + part, longest));
                if rows + part > max_rows || over_budget {
                    break;
                }
            }
            if part > 0 {
                engine
                    .add(
                        parts.len() as u64,
                        SeqRequest {
                            inputs: req.inputs.clone(),
                            n: part,
                            first_rollout: admitted,
                            stream: req.stream,
                            sampling: cfg.sampling.clone(),
                            stop: cfg.stop.clone(),
                            top_logprobs: 0,
                        },
                    )
                    .map_err(|e| match e {
                        GenerateError::Request { message, .. } => {
                            GenerateError::Request { index, message }
                        }
                        e => e,
                    })?;
                // A part that runs nothing (max_new_tokens 0) has no live rows.
                let live = if cfg.stop.max_new_tokens == 0 {
                    0
                } else {
                    part
                };
                parts.push((index, live, len));
            }
            admitted += part;
            if admitted == req.n {
                waiting += 1;
                admitted = 0;
            }
        }
        if engine.is_idle() {
            if waiting >= requests.len() {
                break;
            }
            continue;
        }
        for e in engine.step(budget)? {
            let part = &mut parts[e.id as usize];
            let g = &mut results[part.0][e.rollout];
            g.tokens.push(e.token);
            g.logprobs.push(e.logprob);
            if let Some(f) = e.finish {
                g.finish = f;
                part.1 -= 1;
            }
            on_token(part.0, e.rollout, e.token);
        }
    }
    Ok(results)
}

/// Position ids `(3, 1, s)` for a text-only prompt of `s` tokens (0..s on every axis).
pub fn text_positions(s: usize, device: &Device) -> candle_core::Result<Tensor> {
    let p = Tensor::arange(0i64, s as i64, device)?.reshape((1, 1, s))?;
    Tensor::cat(&[&p, &p, &p], 0)
}
