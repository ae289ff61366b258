//! The step-wise generation engine: requests join and leave one running decode batch at token
//! boundaries (continuous batching), each with its own sampling settings and stop rule.
//!
//! [`Engine::add`] queues a prompt for prefill; [`Engine::step`] runs, in order,
//!
//! 1. prefill of queued prompts, bounded by a token budget: a prompt is run in pieces of at most
//!    `chunk` tokens (chunked prefill; its image, video and ECG features are computed once, at
//!    its first piece), whole pieces only, at least one piece per step so that prefill always
//!    advances. A prompt whose last piece ran samples its rollouts' first tokens from the
//!    piece's logits and joins the running batch, its cache shared by its `n` rollouts and
//!    joined to the running one with left padding ([`KvCache::concat`]);
//! 2. one decode step for every running row.
//!
//! Every sampled token is returned as a [`TokenEvent`]; a finished row leaves the batch at once,
//! and [`Engine::cancel`] removes a request (or one of its rollouts) between steps. The cache
//! is trimmed to its longest live row whenever rows leave, so its size is bounded by the rows
//! running and their lengths.
//!
//! A prompt's pieces are cut at fixed offsets (multiples of `chunk`), whatever else is
//! prefilled in the same step, and every rollout samples from its own random stream (its
//! request's stream id, its rollout index), so a request gives the same tokens whatever else
//! shares the batch. Generated tokens continue the prompt's M-RoPE positions on all three axes:
//! `max prompt position + 1, + 2, ...` (spec §5.5). [`crate::generate`] is this engine fed
//! from a list.

use crate::generate::GenerateError;
use crate::sampling::{Sampler, SamplingParams, top_logprobs};
use crate::stop::StopCondition;
use candle_core::{DType, Tensor};
use qoq_core::FinishReason;
use qoq_model::{ClinicalVlm, ForwardMode, KvCache, ModelInputs};
use std::collections::{HashMap, VecDeque};

/// One prompt to answer `n` times, with its own settings.
#[derive(Debug, Clone)]
pub struct SeqRequest {
    /// The processed prompt, a batch of one row without padding.
    pub inputs: ModelInputs,
    /// Rollouts to sample.
    pub n: usize,
    /// Index of the first of them: the rollouts are `first_rollout .. first_rollout + n`, each
    /// sampling from the stream `(stream, index)` and reported under its index, so a group run
    /// in parts (a memory budget too small for all its rows at once) gives the same tokens as
    /// the group run whole. Usually 0.
    pub first_rollout: usize,
    /// The prompt's random stream id.
    pub stream: u64,
    pub sampling: SamplingParams,
    /// When a rollout ends; `max_new_tokens` 0 runs nothing (no event comes).
    pub stop: StopCondition,
    /// Alternatives to report with each token ([`TokenEvent::top_logprobs`]); 0: none.
    pub top_logprobs: usize,
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The id the request was added with.
    pub id: u64,
    pub rollout: usize,
    pub token: u32,
    /// Log-probability under the raw logits at temperature 1.
    pub logprob: f32,
    /// The request's `top_logprobs` most likely tokens on the same scale, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
    /// Set on the rollout's last token.
    pub finish: Option<FinishReason>,
}

/// A request's settings shared by its rows.
struct Group {
    stop: StopCondition,
    top_logprobs: usize,
}

/// A prompt being prefilled.
struct Pending {
    id: u64,
    req: SeqRequest,
    prompt: Vec<u32>,
    max_pos: i64,
    /// The whole prompt's embeddings, from its first piece on.
    embeds: Option<Tensor>,
    /// Positions prefilled.
    done: usize,
    cache: KvCache,
}

struct Row {
    id: u64,
    rollout: usize,
    sampler: Sampler,
    /// Prompt and generated tokens (for the repetition penalty).
    seen: Vec<u32>,
    prompt_len: usize,
    next_pos: i64,
    last: u32,
}

/// The running batch and the prompts waiting for prefill (see the module docs).
pub struct Engine<'m> {
    model: &'m ClinicalVlm,
    chunk: usize,
    pending: VecDeque<Pending>,
    rows: Vec<Row>,
    cache: KvCache,
    groups: HashMap<u64, Group>,
}

impl<'m> Engine<'m> {
    /// An idle engine; prompts are prefilled in pieces of at most `chunk` tokens (0: whole).
    pub fn new(model: &'m ClinicalVlm, chunk: usize) -> Self {
        Engine {
            model,
            chunk,
            pending: VecDeque::new(),
            rows: Vec::new(),
            cache: KvCache::new(),
            groups: HashMap::new(),
        }
    }

    /// Queue a prompt for prefill under `id` (unique among the requests in the engine).
    pub fn add(&mut self, id: u64, req: SeqRequest) -> Result<(), GenerateError> {
        let index = id as usize;
        req.sampling
            .validate()
            .map_err(|message| GenerateError::Request { index, message })?;
        if self.groups.contains_key(&id) {
            return Err(GenerateError::Request {
                index,
                message: format!("request id {id} is already in the engine"),
            });
        }
        let (b, s) = req.inputs.validate()?;
        if b != 1 {
            return Err(GenerateError::Request {
                index,
                message: format!("a request holds one prompt, got a batch of {b}"),
            });
        }
        if s == 0 {
            return Err(GenerateError::Request {
                index,
                message: "the prompt is empty".into(),
            });
        }
        if req.n == 0 || req.stop.max_new_tokens == 0 {
            return Ok(());
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
        self.groups.insert(
            id,
            Group {
                stop: req.stop.clone(),
                top_logprobs: req.top_logprobs,
            },
        );
        self.pending.push_back(Pending {
            id,
            req,
            prompt,
            max_pos,
            embeds: None,
            done: 0,
            cache: KvCache::new(),
        });
        Ok(())
    }

    /// Drop everything (after an error left the batch in an unknown state).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.rows.clear();
        self.cache = KvCache::new();
        self.groups.clear();
    }

    /// Rows decoding now.
    pub fn running_rows(&self) -> usize {
        self.rows.len()
    }

    /// Rows of the prompts waiting for (or in) prefill.
    pub fn pending_rows(&self) -> usize {
        self.pending.iter().map(|p| p.req.n).sum()
    }

    /// Prompt tokens still to prefill.
    pub fn pending_tokens(&self) -> usize {
        self.pending.iter().map(|p| p.prompt.len() - p.done).sum()
    }

    /// Whether nothing is running or waiting for prefill.
    pub fn is_idle(&self) -> bool {
        self.rows.is_empty() && self.pending.is_empty()
    }

    /// Bytes of keys and values held (the running batch and partly prefilled prompts).
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes() + self.pending.iter().map(|p| p.cache.bytes()).sum::<usize>()
    }

    /// Positions of the running batch's cache (its longest row).
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Remove request `id` (all its rollouts, or only `rollout`), whether it is prefilling or
    /// running; no event comes for what is removed.
    pub fn cancel(&mut self, id: u64, rollout: Option<usize>) -> Result<(), GenerateError> {
        if rollout.is_none() {
            self.pending.retain(|p| p.id != id);
        }
        let hit = |r: &Row| r.id == id && rollout.is_none_or(|k| k == r.rollout);
        if self.rows.iter().any(hit) {
            let keep: Vec<u32> = (0..self.rows.len() as u32)
                .filter(|&i| !hit(&self.rows[i as usize]))
                .collect();
            self.cache = if keep.is_empty() {
                KvCache::new()
            } else {
                self.cache.select_trimmed(&keep)?
            };
            self.rows.retain(|r| !hit(r));
        }
        self.forget_if_done(id);
        Ok(())
    }

    fn forget_if_done(&mut self, id: u64) {
        if !self.rows.iter().any(|r| r.id == id) && !self.pending.iter().any(|p| p.id == id) {
            self.groups.remove(&id);
        }
    }

    /// One step: prefill within `prefill_budget` prompt tokens, then one decode step (module
    /// docs). Returns the tokens sampled, in order.
    pub fn step(&mut self, prefill_budget: usize) -> Result<Vec<TokenEvent>, GenerateError> {
        let mut events = Vec::new();
        let mut spent = 0usize;
        let mut joined: Vec<(KvCache, Vec<Row>, Vec<f32>)> = Vec::new();
        while let Some(p) = self.pending.front_mut() {
            let remaining = p.prompt.len() - p.done;
            let piece = if self.chunk == 0 {
                remaining
            } else {
                remaining.min(self.chunk)
            };
            if spent > 0 && spent + piece > prefill_budget {
                break;
            }
            if p.embeds.is_none() {
                p.embeds = Some(
                    self.model
                        .embed_inputs(&p.req.inputs, ForwardMode::Inference)?,
                );
            }
            let embeds = p.embeds.as_ref().expect("set above");
            let (e, pos, mask) = if p.done == 0 && piece == p.prompt.len() {
                (
                    embeds.clone(),
                    p.req.inputs.position_ids.clone(),
                    p.req.inputs.attention_mask.clone(),
                )
            } else {
                (
                    embeds.narrow(1, p.done, piece)?,
                    p.req.inputs.position_ids.narrow(2, p.done, piece)?,
                    p.req
                        .inputs
                        .attention_mask
                        .as_ref()
                        .map(|m| m.narrow(1, p.done, piece))
                        .transpose()?,
                )
            };
            let logits = self.model.prefill_chunk(
                &e,
                &pos,
                mask.as_ref(),
                &mut p.cache,
                ForwardMode::Inference,
            )?; // (1, v)
            p.done += piece;
            spent += piece;
            if p.done < p.prompt.len() {
                continue;
            }
            let p = self.pending.pop_front().expect("front exists");
            let logits = logits
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let (n, first) = (p.req.n, p.req.first_rollout);
            let shared = p.cache.select(&vec![0u32; n])?;
            let rows = (first..first + n)
                .map(|k| Row {
                    id: p.id,
                    rollout: k,
                    sampler: Sampler::new(p.req.sampling.clone(), p.req.stream, k as u64),
                    seen: p.prompt.clone(),
                    prompt_len: p.prompt.len(),
                    next_pos: p.max_pos + 1,
                    last: 0,
                })
                .collect();
            joined.push((shared, rows, logits));
        }
        // Sample the first token of joined rows from their prefill logits.
        for (c, rows, logits) in joined {
            let (kept, c) = advance(rows, c, |_| &logits, &self.groups, &mut events)?;
            if !kept.is_empty() {
                self.cache = if self.rows.is_empty() {
                    c
                } else {
                    KvCache::concat(&[&self.cache, &c])?
                };
                self.rows.extend(kept);
            }
        }
        if !self.rows.is_empty() {
            // One decode step for every running row.
            let device = self.model.device().clone();
            let b = self.rows.len();
            let ids: Vec<u32> = self.rows.iter().map(|r| r.last).collect();
            let pos: Vec<i64> = self.rows.iter().map(|r| r.next_pos).collect();
            let ids = Tensor::from_vec(ids, (b, 1), &device)?;
            let pos1 = Tensor::from_vec(pos, (1, b, 1), &device)?;
            let pos = Tensor::cat(&[&pos1, &pos1, &pos1], 0)?; // (3, b, 1)
            let logits =
                self.model
                    .decode_step(&ids, &pos, &mut self.cache, ForwardMode::Inference)?;
            let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for r in &mut self.rows {
                r.next_pos += 1;
            }
            (self.rows, self.cache) = advance(
                std::mem::take(&mut self.rows),
                std::mem::take(&mut self.cache),
                |i| &logits[i],
                &self.groups,
                &mut events,
            )?;
        }
        let finished: Vec<u64> = events
            .iter()
            .filter(|e| e.finish.is_some())
            .map(|e| e.id)
            .collect();
        for id in finished {
            self.forget_if_done(id);
        }
        Ok(events)
    }
}

/// Sample one token for every row (`logits(i)` is row i's vocabulary row), push the events,
/// and return the unfinished rows with their rows of `cache` (trimmed; an empty cache when none
/// is left).
fn advance<'a>(
    rows: Vec<Row>,
    cache: KvCache,
    logits: impl Fn(usize) -> &'a [f32],
    groups: &HashMap<u64, Group>,
    events: &mut Vec<TokenEvent>,
) -> Result<(Vec<Row>, KvCache), GenerateError> {
    let n = rows.len();
    let mut keep = Vec::with_capacity(n);
    let mut live = Vec::with_capacity(n);
    for (i, mut r) in rows.into_iter().enumerate() {
        let g = &groups[&r.id];
        let l = logits(i);
        let s = r
            .sampler
            .sample_after(l, &r.seen, r.seen.len() - r.prompt_len);
        r.seen.push(s.token);
        r.last = s.token;
        let finish = g.stop.check(&r.seen[r.prompt_len..]);
        events.push(TokenEvent {
            id: r.id,
            rollout: r.rollout,
            token: s.token,
            logprob: s.logprob,
            top_logprobs: if g.top_logprobs > 0 {
                top_logprobs(l, g.top_logprobs)
            } else {
                Vec::new()
            },
            finish,
        });
        if finish.is_none() {
            keep.push(i as u32);
            live.push(r);
        }
    }
    let cache = if live.is_empty() {
        KvCache::new()
    } else if keep.len() == n {
        cache
    } else {
        cache.select_trimmed(&keep)?
    };
    Ok((live, cache))
}
