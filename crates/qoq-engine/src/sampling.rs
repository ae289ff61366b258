//! Token sampling from one row of logits.
//!
//! Order of the logit processors, as in vLLM's sampler (which the reference rolls out with, spec §7):
//! repetition penalty (HF/vLLM rule: a seen token's positive logit is divided by the penalty, a
//! negative one multiplied), logit bias (the reference adds -100 to `<|image_pad|>`), temperature,
//! top-k, top-p (nucleus, smallest set whose probability reaches `top_p`), min-p (drop tokens whose
//! probability is below `min_p` times the largest), then one draw. Temperature 0 means greedy.
//!
//! The log-probability returned with each token is the one the trainer recomputes: the log-softmax
//! of the raw logits at temperature 1 with no processor applied (spec §7: "old log-probs are
//! recomputed by the FSDP actor with logits / temperature (1.0)").
//!
//! Nucleus sampling never sorts the whole vocabulary: it selects the largest `k` candidates with a
//! partial selection, doubling `k` until they hold `top_p` of the mass, which is a few dozen tokens
//! for a trained model's distributions instead of a 152k-entry sort per token.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Sampling settings for one request. Defaults are the reference's rollout settings (spec §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 gives greedy decoding.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep only the `top_k` largest logits; 0 (or the reference's -1, read as 0) disables.
    pub top_k: usize,
    /// Drop tokens with probability below `min_p` times the largest; 0 disables.
    pub min_p: f32,
    /// Repetition penalty over prompt and generated tokens; 1 disables.
    pub repetition_penalty: f32,
    /// Added to the logits of the given tokens before anything else but the penalties.
    pub logit_bias: Vec<(u32, f32)>,
    /// Base seed; each sequence derives its own stream from it (see [`Sampler::new`]).
    pub seed: u64,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of every token
    /// generated so far (the prompt does not count); 0 disables.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's logit once per time it
    /// was generated; 0 disables.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 0.99,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![(151_655, -100.0)],
            seed: 1,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no other processor.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            logit_bias: Vec::new(),
            ..SamplingParams::default()
        }
    }

    /// Check ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, x) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&x) {
                return Err(format!("{name} must be in [-2, 2], got {x}"));
            }
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return Err(format!("logit_bias for token {t} is not finite ({b})"));
        }
        Ok(())
    }
}

/// One sampled token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability under the raw logits at temperature 1 (what the trainer recomputes).
    pub logprob: f32,
}

/// The sampler of one sequence: its parameters and its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    // Scratch buffers reused across tokens.
    work: Vec<f32>,
    idx: Vec<u32>,
}

impl Sampler {
    /// A sampler for rollout `rollout` of the request whose stream id is `stream` (e.g. the prompt's
    /// index in the dataset), seeded from `params.seed`. The same (seed, stream, rollout) always
    /// gives the same tokens, whichever other sequences are decoded alongside.
    pub fn new(params: SamplingParams, stream: u64, rollout: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        rng.set_stream(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ rollout);
        Sampler {
            params,
            rng,
            work: Vec::new(),
            idx: Vec::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The random stream's state, for checkpoints: (word position). Restore with [`Self::restore`].
    pub fn word_pos(&self) -> u128 {
        self.rng.get_word_pos()
    }

    /// Continue a stream from a saved word position.
    pub fn restore(&mut self, word_pos: u128) {
        self.rng.set_word_pos(word_pos);
    }

    /// Sample the next token from `logits` (one vocabulary row) given the tokens seen so far
    /// (prompt and generated, for the repetition penalty), all of them taken as the prompt (so no
    /// presence or frequency penalty applies: see [`Sampler::sample_after`]). Non-finite logits
    /// are treated as -inf; if no token is finite the lowest id is returned with log-probability
    /// -inf, never a panic.
    pub fn sample(&mut self, logits: &[f32], seen: &[u32]) -> Sampled {
        self.sample_after(logits, seen, 0)
    }

    /// As [`Sampler::sample`], the last `generated` tokens of `seen` being the ones generated
    /// so far (the presence and frequency penalties count those).
    pub fn sample_after(&mut self, logits: &[f32], seen: &[u32], generated: usize) -> Sampled {
        let logprob_of = raw_logprobs(logits);
        let p = &self.params;
        self.work.clear();
        self.work.extend(
            logits
                .iter()
                .map(|&x| if x.is_finite() { x } else { f32::NEG_INFINITY }),
        );
        let w = &mut self.work;
        if p.repetition_penalty != 1.0 {
            // Each distinct seen token once.
            let mut seen_sorted: Vec<u32> = seen.to_vec();
            seen_sorted.sort_unstable();
            seen_sorted.dedup();
            for &t in &seen_sorted {
                if let Some(x) = w.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0) && generated > 0 {
            let mut gen_sorted: Vec<u32> = seen[seen.len().saturating_sub(generated)..].to_vec();
            gen_sorted.sort_unstable();
            for run in gen_sorted.chunk_by(|a, b| a == b) {
                if let Some(x) = w.get_mut(run[0] as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(x) = w.get_mut(t as usize) {
                *x += b;
            }
        }
        let token = if p.temperature == 0.0 {
            argmax(w)
        } else {
            let inv_t = 1.0 / p.temperature;
            let max = w.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                0
            } else {
                // Unnormalised probabilities in f32; candidates restricted progressively.
                for x in w.iter_mut() {
                    *x = ((*x - max) * inv_t).exp();
                }
                let total: f64 = w.iter().map(|&x| x as f64).sum();
                candidates(w, &mut self.idx, p.top_k, p.top_p, p.min_p, total);
                let mass: f64 = self.idx.iter().map(|&i| w[i as usize] as f64).sum();
                let u = self.rng.random::<f64>() * mass;
                let mut acc = 0.0;
                let mut pick = *self.idx.last().unwrap_or(&0);
                for &i in &self.idx {
                    acc += w[i as usize] as f64;
                    if u < acc {
                        pick = i;
                        break;
                    }
                }
                pick
            }
        };
        Sampled {
            token,
            logprob: logprob_of(token),
        }
    }
}

/// The `k` most likely tokens under the raw logits at temperature 1 (the scale of
/// [`Sampled::logprob`]), most likely first (ties: lower id first); non-finite logits never
/// appear.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lp = raw_logprobs(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize].is_finite())
        .collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let desc = most_likely_first(logits);
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, desc);
        idx.truncate(k);
    }
    idx.sort_unstable_by(desc);
    idx.into_iter().map(|i| (i, lp(i))).collect()
}

/// A closure giving log-softmax(logits)[t] at temperature 1.
fn raw_logprobs(logits: &[f32]) -> impl Fn(u32) -> f32 + '_ {
    let max = logits
        .iter()
        .cloned()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let lse = if max == f32::NEG_INFINITY {
        f64::INFINITY
    } else {
        // f32 `exp` (the f64 one is about twice as slow and this runs per row and token),
        // summed in f64.
        max as f64
            + logits
                .iter()
                .filter(|x| x.is_finite())
                .map(|&x| f64::from(qoq_model::expf::exp_or_zero(x - max)))
                .sum::<f64>()
                .ln()
    };
    move |t| match logits.get(t as usize) {
        Some(&x) if x.is_finite() => (x as f64 - lse) as f32,
        _ => f32::NEG_INFINITY,
    }
}

fn argmax(w: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in w.iter().enumerate() {
        if x > w[best] {
            best = i;
        }
    }
    best as u32
}

/// Fill `idx` with the surviving candidates, in id order (the draw walks them in that order).
///
/// The cuts are those of vLLM, in its order: zero-probability tokens (-inf logits) never; top-k
/// (ties: lower id first); the nucleus, the smallest set of most likely tokens (ties: lower id
/// first) whose mass reaches `top_p` of the whole distribution, or of the top-k set when top-k
/// cut it; min-p against the most likely token. No step orders the vocabulary: top-k is a
/// selection and the nucleus a weighted selection ([`keep_nucleus`]), so a flat distribution
/// over a large vocabulary (a random model's) costs linear time per token, not a sort.
fn candidates(w: &[f32], idx: &mut Vec<u32>, top_k: usize, top_p: f32, min_p: f32, total: f64) {
    idx.clear();
    idx.extend((0..w.len() as u32).filter(|&i| w[i as usize] > 0.0));
    if idx.is_empty() {
        // Unreachable from `sample_after` (the most likely token has weight 1); keep a token.
        idx.push(argmax(w));
        return;
    }
    let desc = most_likely_first(w);
    if top_k > 0 && top_k < idx.len() {
        idx.select_nth_unstable_by(top_k - 1, desc);
        idx.truncate(top_k);
    }
    if top_p < 1.0 {
        // vLLM renormalises after top-k first: the nucleus is taken within the top-k set.
        let denom: f64 = if top_k == 0 {
            total
        } else {
            idx.iter().map(|&i| w[i as usize] as f64).sum()
        };
        keep_nucleus(w, idx, top_p as f64 * denom);
    }
    if min_p > 0.0 {
        let top = idx.iter().map(|&i| w[i as usize]).fold(0.0f32, f32::max);
        idx.retain(|&i| w[i as usize] >= min_p * top);
    }
    if top_k > 0 || top_p < 1.0 {
        // Back to id order without a sort: mark the survivors, then list them.
        let mut kept = vec![false; w.len()];
        for &i in idx.iter() {
            kept[i as usize] = true;
        }
        idx.clear();
        idx.extend((0..w.len() as u32).filter(|&i| kept[i as usize]));
    }
}

/// Token ids ordered by descending `w`, ties by lower id first.
fn most_likely_first(w: &[f32]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + Copy + '_ {
    move |a, b| w[*b as usize].total_cmp(&w[*a as usize]).then(a.cmp(b))
}

/// Keep in `idx` the smallest set of its most likely tokens (ties: lower id first) whose mass
/// reaches `target`, by halving selections: the upper half of the undecided range is either
/// enough (the set ends inside it) or kept whole (the rest is sought in the lower half). Linear
/// expected time; the kept tokens come first, in no particular order.
fn keep_nucleus(w: &[f32], idx: &mut Vec<u32>, target: f64) {
    let desc = most_likely_first(w);
    // idx[..lo] is kept, idx[hi..] dropped, idx[lo..hi] undecided; `need` is the mass still
    // missing after idx[..lo].
    let (mut lo, mut hi) = (0usize, idx.len());
    let mut need = target;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        idx[lo..hi].select_nth_unstable_by(mid - lo, desc);
        let upper: f64 = idx[lo..mid].iter().map(|&i| w[i as usize] as f64).sum();
        if upper >= need {
            hi = mid;
        } else {
            need -= upper;
            lo = mid;
        }
    }
    let keep = if hi > lo && need > 0.0 { hi } else { lo };
    idx.truncate(keep.max(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, top_p: f32, top_k: usize, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p,
            top_k,
            min_p,
            repetition_penalty: 1.0,
            logit_bias: vec![],
            seed: 7,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let logits = [1.0f32, 0.9, 0.0];
        let greedy = |presence: f32, frequency: f32, seen: &[u32], generated: usize| {
            let p = SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..params(0.0, 1.0, 0, 0.0)
            };
            Sampler::new(p, 0, 0).sample_after(&logits, seen, generated)
        };
        // Token 0 generated once: a presence penalty of 0.5 puts it below token 1.
        let s = greedy(0.5, 0.0, &[0], 1);
        assert_eq!(s.token, 1);
        // The log-prob is the raw one, before any penalty.
        let raw = greedy(0.0, 0.0, &[], 0);
        assert_eq!(raw.token, 0);
        assert!((greedy(0.0, 0.0, &[], 0).logprob - raw.logprob).abs() < 1e-7);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((s.logprob - (0.9 - z.ln())).abs() < 1e-5);
        // Frequency: twice generated, 0.06 each = 0.12 > 0.1; 0.04 each = 0.08 < 0.1.
        assert_eq!(greedy(0.0, 0.06, &[0, 0], 2).token, 1);
        assert_eq!(greedy(0.0, 0.04, &[0, 0], 2).token, 0);
        // The same tokens in the prompt do not count.
        assert_eq!(greedy(0.5, 0.5, &[0, 0], 0).token, 0);
        assert_eq!(greedy(0.5, 0.0, &[0, 2], 1).token, 0);
        // Out of range is refused by name.
        let p = SamplingParams {
            frequency_penalty: 2.5,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().contains("frequency_penalty"));
    }

    #[test]
    fn greedy_picks_the_argmax_and_reports_the_raw_logprob() {
        let logits = [0.0f32, 2.0, 1.0];
        let mut s = Sampler::new(SamplingParams::greedy(), 0, 0);
        let out = s.sample(&logits, &[]);
        assert_eq!(out.token, 1);
        let lse = (1f64 + 2f64.exp() + 1f64.exp()).ln();
        assert!((out.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn frequencies_follow_the_softmax_at_temperature_one() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let mut s = Sampler::new(params(1.0, 1.0, 0, 0.0), 3, 1);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&logits, &[]).token as usize] += 1;
        }
        for i in 0..4 {
            let want = (logits[i] as f64).exp() / z;
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.005, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn temperature_sharpens_and_top_k_one_is_greedy() {
        let logits = [0.0f32, 1.0, 0.5];
        let mut s = Sampler::new(params(1.0, 1.0, 1, 0.0), 0, 0);
        assert!((0..100).all(|_| s.sample(&logits, &[]).token == 1));
        let mut cold = Sampler::new(params(0.05, 1.0, 0, 0.0), 0, 0);
        let hits = (0..1000)
            .filter(|_| cold.sample(&logits, &[]).token == 1)
            .count();
        assert!(hits > 990, "{hits}");
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probabilities 0.5, 0.3, 0.2 (as logits of their logs)
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(params(1.0, 0.75, 0, 0.0), 0, 0);
        let seen: std::collections::BTreeSet<u32> =
            (0..2000).map(|_| s.sample(&logits, &[]).token).collect();
        assert_eq!(seen, [0, 1].into_iter().collect());
        let mut s = Sampler::new(params(1.0, 0.5, 0, 0.0), 0, 0);
        assert!((0..500).all(|_| s.sample(&logits, &[]).token == 0));
    }

    #[test]
    fn nucleus_over_a_large_flat_vocabulary_widens_its_search() {
        // 1000 equal tokens: top_p 0.5 must keep 500 of them, beyond the first 64-token window.
        let logits = vec![0.0f32; 1000];
        let mut s = Sampler::new(params(1.0, 0.5, 0, 0.0), 0, 0);
        let seen: std::collections::BTreeSet<u32> =
            (0..20_000).map(|_| s.sample(&logits, &[]).token).collect();
        assert!(seen.len() > 450 && seen.len() <= 500, "{}", seen.len());
        assert!(seen.iter().all(|&t| t < 500), "ties keep the lower ids");
    }

    /// The weighted selection keeps exactly the sorted definition's nucleus (smallest prefix
    /// in descending order, ties by lower id, whose mass reaches the target), on peaked, flat
    /// and tied distributions, for targets across (0, 1].
    #[test]
    fn the_nucleus_selection_equals_the_sorted_prefix() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..300 {
            let n = 1 + case % 97;
            let w: Vec<f32> = (0..n)
                .map(|_| match case % 3 {
                    0 => rng.random::<f32>().powi(8),           // peaked
                    1 => 1.0,                                   // flat: ties everywhere
                    _ => (rng.random_range(0..4) as f32) / 3.0, // few levels, some zeros
                })
                .collect();
            let total: f64 = w.iter().map(|&x| x as f64).sum();
            for top_p in [0.05f32, 0.3, 0.5, 0.9, 0.99, 1.0] {
                let mut idx = Vec::new();
                candidates(&w, &mut idx, 0, top_p, 0.0, total);
                // The sorted definition.
                let mut order: Vec<u32> = (0..n as u32).filter(|&i| w[i as usize] > 0.0).collect();
                order.sort_by(most_likely_first(&w));
                let mut want = order.clone();
                if top_p < 1.0 {
                    let mut acc = 0.0;
                    let mut keep = order.len();
                    for (j, &i) in order.iter().enumerate() {
                        acc += w[i as usize] as f64;
                        if acc >= top_p as f64 * total {
                            keep = j + 1;
                            break;
                        }
                    }
                    want.truncate(keep.max(1));
                }
                if want.is_empty() {
                    continue; // all weights zero: not a distribution sample_after produces
                }
                want.sort_unstable();
                assert_eq!(idx, want, "case {case}, n {n}, top_p {top_p}, w {w:?}");
            }
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [0.0f32, -1.0, -5.0];
        let mut s = Sampler::new(params(1.0, 1.0, 0, 0.1), 0, 0);
        assert!((0..3000).all(|_| s.sample(&logits, &[]).token != 2));
    }

    #[test]
    fn repetition_penalty_follows_the_hf_rule_and_bias_masks_a_token() {
        // Token 0 (logit 2) seen with penalty 4 -> 0.5 < token 1 (1.0); token 2 (-1) seen -> -4.
        let logits = [2.0f32, 1.0, -1.0];
        let mut p = SamplingParams::greedy();
        p.repetition_penalty = 4.0;
        let mut s = Sampler::new(p.clone(), 0, 0);
        assert_eq!(s.sample(&logits, &[0, 0, 2]).token, 1);
        p.repetition_penalty = 1.0;
        p.logit_bias = vec![(0, -100.0)];
        let mut s = Sampler::new(p, 0, 0);
        let out = s.sample(&logits, &[]);
        assert_eq!(out.token, 1);
        // The reported log-prob ignores the processors.
        let lse = (2f64.exp() + 1f64.exp() + (-1f64).exp()).ln();
        assert!((out.logprob as f64 - (1.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn streams_are_independent_of_each_other_and_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |stream, rollout, interleave: bool| {
            let mut s = Sampler::new(params(1.0, 0.99, 0, 0.0), stream, rollout);
            let mut other = Sampler::new(params(1.0, 0.99, 0, 0.0), 99, 0);
            (0..20)
                .map(|_| {
                    if interleave {
                        other.sample(&logits, &[]);
                    }
                    s.sample(&logits, &[]).token
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1, 0, false), run(1, 0, true));
        assert_ne!(run(1, 0, false), run(1, 1, false));
        assert_ne!(run(1, 0, false), run(2, 0, false));
    }

    #[test]
    fn a_restored_stream_continues_identically() {
        let logits: Vec<f32> = (0..30).map(|i| (i as f32 * 0.7).cos()).collect();
        let mut a = Sampler::new(params(1.0, 1.0, 0, 0.0), 4, 2);
        for _ in 0..5 {
            a.sample(&logits, &[]);
        }
        let pos = a.word_pos();
        let mut b = Sampler::new(params(1.0, 1.0, 0, 0.0), 4, 2);
        b.restore(pos);
        for _ in 0..10 {
            assert_eq!(a.sample(&logits, &[]), b.sample(&logits, &[]));
        }
    }

    #[test]
    fn hostile_logits_never_panic() {
        let mut s = Sampler::new(params(1.0, 0.9, 3, 0.2), 0, 0);
        let out = s.sample(
            &[f32::NAN, f32::NEG_INFINITY, f32::INFINITY],
            &[7, 1_000_000],
        );
        assert_eq!(out.token, 0);
        assert_eq!(out.logprob, f32::NEG_INFINITY);
        let out = s.sample(&[f32::NAN, 1.0, f32::NEG_INFINITY], &[]);
        assert_eq!(out.token, 1);
        assert!(out.logprob.abs() < 1e-6);
        assert!(s.sample(&[], &[]).logprob.is_infinite());
    }

    #[test]
    fn top_logprobs_are_the_largest_raw_logprobs_in_order() {
        let logits = [0.5f32, 3.0, f32::NAN, 1.0, 3.0, -2.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4, 3]);
        let mut s = Sampler::new(SamplingParams::greedy(), 0, 0);
        let got = s.sample(&logits, &[]);
        assert_eq!(got.token, 1);
        assert!((top[0].1 - got.logprob).abs() < 1e-6);
        let z: f64 = [0.5f64, 3.0, 1.0, 3.0, -2.0].iter().map(|x| x.exp()).sum();
        assert!((top[2].1 as f64 - (1.0 - z.ln())).abs() < 1e-5);
        assert_eq!(top_logprobs(&logits, 99).len(), 5);
        assert!(top_logprobs(&logits, 0).is_empty());
    }

    #[test]
    fn invalid_params_name_the_field() {
        let p = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().contains("top_p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().contains("temperature"));
        assert!(SamplingParams::default().validate().is_ok());
    }
}
