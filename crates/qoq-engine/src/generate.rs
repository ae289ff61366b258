//! Batched generation of n rollouts for many prompts, with continuous batching.
//!
//! Each prompt is prefilled once (its image, video and ECG features are computed once) and its
//! key/value cache is shared by its n rollouts. Rollouts of all admitted prompts decode together
//! in one batch; a finished sequence leaves the batch at once, and a waiting prompt is admitted
//! whenever the batch has room, its cache joined to the running one with left padding
//! ([`KvCache::concat`]). Generated tokens continue the prompt's M-RoPE positions on all three
//! axes: `max prompt position + 1, + 2, ...` (spec §5.5).
//!
//! Every rollout samples from its own random stream (prompt stream id, rollout index), so a
//! request gives the same tokens whatever else shares the batch.

use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopCondition;
use candle_core::{DType, Device, Tensor};
use qoq_core::FinishReason;
use qoq_model::{ClinicalVlm, ForwardMode, KvCache, ModelInputs};

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

struct Row {
    group: usize,
    rollout: usize,
    sampler: Sampler,
    seen: Vec<u32>,
    next_pos: i64,
    out: Generated,
    last: u32,
}

/// Generate `n` rollouts for every request. `on_token(group, rollout, token)` is called for
/// every sampled token as it comes (for streaming). Output: per request, its `n` sequences in
/// rollout order.
pub fn generate(
    model: &ClinicalVlm,
    requests: &[GroupRequest],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, usize, u32),
) -> Result<Vec<Vec<Generated>>, GenerateError> {
    cfg.sampling
        .validate()
        .map_err(|message| GenerateError::Request { index: 0, message })?;
    let mut results: Vec<Vec<Option<Generated>>> =
        requests.iter().map(|r| vec![None; r.n]).collect();
    let device = model.device().clone();
    let mut waiting = 0usize; // next request to admit
    let mut rows: Vec<Row> = Vec::new();
    let mut cache = KvCache::new();
    let max_rows = cfg.max_batch_rows.max(1);
    loop {
        // Admit prompts while there is room (always at least one when the batch is empty).
        let mut admitted: Vec<(KvCache, Vec<Row>, Vec<f32>)> = Vec::new();
        while waiting < requests.len() {
            let req = &requests[waiting];
            let pending: usize = rows.len() + admitted.iter().map(|a| a.1.len()).sum::<usize>();
            if pending > 0 && pending + req.n > max_rows {
                break;
            }
            let index = waiting;
            waiting += 1;
            if req.n == 0 {
                continue;
            }
            let (b, _) = req.inputs.validate()?;
            if b != 1 {
                return Err(GenerateError::Request {
                    index,
                    message: format!("a request holds one prompt, got a batch of {b}"),
                });
            }
            let prompt: Vec<u32> = req
                .inputs
                .input_ids
                .to_dtype(DType::U32)?
                .flatten_all()?
                .to_vec1()?;
            let max_pos = req
                .inputs
                .position_ids
                .to_dtype(DType::I64)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<i64>()?;
            let mut c = KvCache::new();
            let logits = model.prefill(&req.inputs, &mut c, ForwardMode::Inference)?; // (1, v)
            let logits = logits
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let shared = c.select(&vec![0u32; req.n])?;
            let new_rows = (0..req.n)
                .map(|k| Row {
                    group: index,
                    rollout: k,
                    sampler: Sampler::new(cfg.sampling.clone(), req.stream, k as u64),
                    seen: prompt.clone(),
                    next_pos: max_pos + 1,
                    out: Generated {
                        tokens: Vec::new(),
                        logprobs: Vec::new(),
                        finish: FinishReason::Length,
                    },
                    last: 0,
                })
                .collect();
            admitted.push((shared, new_rows, logits));
        }
        // Sample the first token of admitted rows from their prefill logits.
        for (c, new_rows, logits) in admitted {
            let (kept, c) = advance(
                new_rows,
                c,
                |_| &logits,
                &cfg.stop,
                &mut on_token,
                &mut results,
            )?;
            if kept.is_empty() {
                continue;
            }
            cache = if rows.is_empty() {
                c
            } else {
                KvCache::concat(&[&cache, &c])?
            };
            rows.extend(kept);
        }
        if rows.is_empty() {
            if waiting >= requests.len() {
                break;
            }
            continue;
        }
        // One decode step for every active row.
        let ids: Vec<u32> = rows.iter().map(|r| r.last).collect();
        let pos: Vec<i64> = rows.iter().map(|r| r.next_pos).collect();
        let b = rows.len();
        let ids = Tensor::from_vec(ids, (b, 1), &device)?;
        let pos1 = Tensor::from_vec(pos, (1, b, 1), &device)?;
        let pos = Tensor::cat(&[&pos1, &pos1, &pos1], 0)?; // (3, b, 1)
        let logits = model.decode_step(&ids, &pos, &mut cache, ForwardMode::Inference)?;
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for r in &mut rows {
            r.next_pos += 1;
        }
        (rows, cache) = advance(
            std::mem::take(&mut rows),
            std::mem::take(&mut cache),
            |i| &logits[i],
            &cfg.stop,
            &mut on_token,
            &mut results,
        )?;
    }
    Ok(results
        .into_iter()
        .map(|g| {
            g.into_iter()
                .map(|r| r.expect("every rollout finishes"))
                .collect()
        })
        .collect())
}

/// Sample one token for every row (`logits(i)` is row i's vocabulary row), move finished rows'
/// outputs into `results`, and return the unfinished rows with their rows of `cache` (an empty
/// cache when none is left).
fn advance<'a>(
    rows: Vec<Row>,
    cache: KvCache,
    logits: impl Fn(usize) -> &'a [f32],
    stop: &StopCondition,
    on_token: &mut impl FnMut(usize, usize, u32),
    results: &mut [Vec<Option<Generated>>],
) -> Result<(Vec<Row>, KvCache), GenerateError> {
    let n = rows.len();
    let mut keep = Vec::with_capacity(n);
    let mut live = Vec::with_capacity(n);
    for (i, mut r) in rows.into_iter().enumerate() {
        if step_row(&mut r, logits(i), stop, on_token) {
            results[r.group][r.rollout] = Some(r.out);
        } else {
            keep.push(i as u32);
            live.push(r);
        }
    }
    let cache = if live.is_empty() {
        KvCache::new()
    } else if keep.len() == n {
        cache
    } else {
        cache.select(&keep)?
    };
    Ok((live, cache))
}

/// Sample one token for `r`; returns whether the row is finished.
fn step_row(
    r: &mut Row,
    logits: &[f32],
    stop: &StopCondition,
    on_token: &mut impl FnMut(usize, usize, u32),
) -> bool {
    if stop.max_new_tokens == 0 {
        r.out.finish = FinishReason::Length;
        return true;
    }
    let s = r.sampler.sample(logits, &r.seen);
    r.out.tokens.push(s.token);
    r.out.logprobs.push(s.logprob);
    r.seen.push(s.token);
    r.last = s.token;
    on_token(r.group, r.rollout, s.token);
    match stop.check(&r.out.tokens) {
        Some(f) => {
            r.out.finish = f;
            true
        }
        None => false,
    }
}

/// Position ids `(3, 1, s)` for a text-only prompt of `s` tokens (0..s on every axis).
pub fn text_positions(s: usize, device: &Device) -> candle_core::Result<Tensor> {
    let p = Tensor::arange(0i64, s as i64, device)?.reshape((1, 1, s))?;
    Tensor::cat(&[&p, &p, &p], 0)
}
