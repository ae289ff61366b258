//! The batch → tensors conversion: a collated [`ProcessedBatch`] (tensor-free, from
//! `qoq-processor`) becomes [`ModelInputs`] on a device, optionally extended by each row's
//! response ([`batch_to_inputs`]); a micro-batch of sampled rollouts becomes the per-token
//! tensors of the policy loss ([`rollout_tensors`]). Used by inference, evaluation, the server,
//! the trainer and the train-step benchmark alike.

use crate::error::{Error, Result};
use crate::inputs::ModelInputs;
use candle_core::{Device, Tensor};
use qoq_core::Rollout;
use qoq_processor::processor::ProcessedBatch;

/// Tensors of a collated prompt batch, each row extended by its response (right-padded with
/// `pad` to `r_len`, masked out; pass `&[]` for the prompt alone). Response positions continue
/// each row's largest prompt position on all three M-RoPE axes, as in generation (spec §5.5).
pub fn batch_to_inputs(
    b: &ProcessedBatch,
    responses: &[&[u32]],
    r_len: usize,
    pad: u32,
    dev: &Device,
) -> Result<ModelInputs> {
    let (n, s) = (b.batch_size(), b.seq_len());
    if !responses.is_empty() && responses.len() != n {
        return Err(Error::Input {
            field: "input_ids",
            message: format!(
                "batch_to_inputs: {} responses for a batch of {n}",
                responses.len()
            ),
        });
    }
    let r_len = if responses.is_empty() { 0 } else { r_len };
    let t = s + r_len;
    let mut ids = Vec::with_capacity(n * t);
    let mut mask = Vec::with_capacity(n * t);
    let mut pos = vec![0i64; 3 * n * t];
    for i in 0..n {
        ids.extend_from_slice(&b.input_ids[i]);
        mask.extend_from_slice(&b.attention_mask[i]);
        let next = place_positions(b, i, &mut pos, n * t, i * t);
        if r_len > 0 {
            let resp = responses[i];
            for j in 0..r_len {
                ids.push(resp.get(j).copied().unwrap_or(pad));
                mask.push(u32::from(j < resp.len()));
                for a in 0..3 {
                    pos[a * n * t + i * t + s + j] = next + j as i64;
                }
            }
        }
    }
    let mut m = ModelInputs::text(
        Tensor::from_vec(ids, (n, t), dev)?,
        Some(Tensor::from_vec(mask, (n, t), dev)?),
        Tensor::from_vec(pos, (3, n, t), dev)?,
    );
    attach_features(&mut m, b, dev)?;
    Ok(m)
}

/// Copies the position ids of row `i` of the collated batch `b` into `pos` (three axes of `axis`
/// values each, a row's positions at `row · t + column`) from offset `at` of every axis, and
/// returns the position a response after the prompt starts at: one past its largest real
/// position on any axis (spec §5.5).
fn place_positions(b: &ProcessedBatch, i: usize, pos: &mut [i64], axis: usize, at: usize) -> i64 {
    let (n, s) = (b.batch_size(), b.seq_len());
    let mut max_pos = i64::MIN;
    for a in 0..3 {
        let src = &b.position_ids[a * n * s + i * s..a * n * s + (i + 1) * s];
        pos[a * axis + at..a * axis + at + s].copy_from_slice(src);
        for (&p, &m) in src.iter().zip(&b.attention_mask[i]) {
            if m != 0 {
                max_pos = max_pos.max(p);
            }
        }
    }
    max_pos.max(-1) + 1
}

/// A sampled token as the forward is fed it: a sampled placeholder would be taken for a
/// feature slot, so it is fed as `pad` (and left out of the loss mask, [`per_token`]).
fn fed(token: u32, placeholders: &[u32], pad: u32) -> u32 {
    if placeholders.contains(&token) {
        pad
    } else {
        token
    }
}

/// The image patches and ECGs of the collated batch `b` (one ECG per row) on `m`.
fn attach_features(m: &mut ModelInputs, b: &ProcessedBatch, dev: &Device) -> Result<()> {
    let n = b.batch_size();
    if !b.pixel_values.is_empty() {
        m.pixel_values = Some(Tensor::from_vec(
            b.pixel_values.clone(),
            (b.pixel_values_shape[0], b.pixel_values_shape[1]),
            dev,
        )?);
        m.image_grid_thw = b.image_grid_thw.clone();
    }
    if !b.time_series_data.is_empty() {
        m.time_series_data = Some(Tensor::from_vec(
            b.time_series_data.clone(),
            (n, 8, b.time_series_data.len() / n / 8),
            dev,
        )?);
    }
    Ok(())
}

/// Tensors of the prompts alone ([`batch_to_inputs`] without responses).
pub fn prompt_inputs(b: &ProcessedBatch, dev: &Device) -> Result<ModelInputs> {
    batch_to_inputs(b, &[], 0, 0, dev)
}

/// Tensors of a micro-batch of rollouts ([`rollout_tensors`]).
#[derive(Debug)]
pub struct RolloutTensors {
    /// Prompt (left-padded) + response (right-padded) inputs.
    pub inputs: ModelInputs,
    /// Prompt length of the collated batch.
    pub s: usize,
    /// Where the hidden states predicting the response tokens are.
    pub at: ResponseAt,
    /// Response tokens `(b, r_len)`, `pad` after each response's end.
    pub labels: Tensor,
    /// Loss mask `(b, r_len)`: 1 on response tokens, 0 on padding and sampled placeholders.
    pub mask: Tensor,
    /// The sampler's log-probs of the response tokens `(b, r_len)`.
    pub old: Tensor,
}

/// Model inputs and per-token tensors `(b, r_len)` of `rollouts` answering the rows of the
/// collated prompt `batch` (row i answers row i): prompt + response inputs, the response tokens
/// as labels, the loss mask and the sampler's log-probs. A sampled placeholder token (possible
/// when its logit bias is off) would be taken for a feature slot: it is fed as `pad` and left out
/// of the mask.
pub fn rollout_tensors(
    batch: &ProcessedBatch,
    rollouts: &[&Rollout],
    placeholders: &[u32],
    pad: u32,
    dev: &Device,
) -> Result<RolloutTensors> {
    let cleaned: Vec<Vec<u32>> = rollouts
        .iter()
        .map(|r| {
            r.token_ids
                .iter()
                .map(|&t| fed(t, placeholders, pad))
                .collect()
        })
        .collect();
    let responses: Vec<&[u32]> = cleaned.iter().map(Vec::as_slice).collect();
    let r_len = responses.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let inputs = batch_to_inputs(batch, &responses, r_len, pad, dev)?;
    per_token(
        inputs,
        batch.seq_len(),
        ResponseAt::After(batch.seq_len()),
        rollouts,
        r_len,
        placeholders,
        pad,
        dev,
    )
}

/// Where the hidden states that predict a micro-batch's response tokens are (the hidden state
/// at position p predicts token p + 1).
#[derive(Debug, Clone)]
pub enum ResponseAt {
    /// Row `i` is rollout `i` after its prompt of `s` positions: positions `s - 1 .. s - 1 +
    /// r_len`.
    After(usize),
    /// Packed rows ([`rollout_tensors_packed`]): `(b · r_len)` u32 indices into the hidden states
    /// flattened to `(rows · t, hidden)`, rollout after rollout.
    Gather(Tensor),
}

impl ResponseAt {
    /// The `(b, r_len, hidden)` hidden states predicting the response tokens, from a forward's
    /// `(rows, t, hidden)` (differentiable).
    pub fn hidden(&self, hidden: &Tensor, r_len: usize) -> candle_core::Result<Tensor> {
        match self {
            ResponseAt::After(s) => hidden.narrow(1, s - 1, r_len),
            ResponseAt::Gather(idx) => {
                let (rows, t, h) = hidden.dims3()?;
                let b = idx.dim(0)? / r_len.max(1);
                hidden
                    .reshape((rows * t, h))?
                    .index_select(idx, 0)?
                    .reshape((b, r_len, h))
            }
        }
    }
}

/// Whether packing pays: rows of `prompts[i].0` prompt tokens answered `prompts[i].1` times,
/// responses of `r_len` positions, in a decoder `hidden` wide. The work of a row of `t` tokens is
/// counted as `t · (1 + t / (6 · hidden))`: the projections' work per token (about `24 ·
/// hidden²` multiply-adds per layer for Qwen2's MLP ratio) and the attention's per pair of
/// tokens (`4 · hidden` forward and backward, not halved for causality since the packed rows'
/// skipped responses are computed and masked). A packed row is one prompt and all its
/// responses; unpacked, each response is a row after its own prompt. Long responses after a
/// short prompt make the packed row's attention grow with the square of their number: then the
/// rows stay apart.
pub fn packing_pays(prompts: &[(usize, usize)], r_len: usize, hidden: usize) -> bool {
    let c = 6.0 * hidden.max(1) as f64;
    let work = |t: usize| t as f64 * (1.0 + t as f64 / c);
    let packed: f64 = prompts.iter().map(|&(s, k)| work(s + k * r_len)).sum();
    let apart: f64 = prompts
        .iter()
        .map(|&(s, k)| k as f64 * work(s + r_len))
        .sum();
    packed < apart
}

/// Micro-batches packed by [`rollout_tensors_packed`] in this process (tests: a setting's
/// path really ran).
pub fn packed_batches() -> u64 {
    PACKED.load(std::sync::atomic::Ordering::Relaxed)
}

static PACKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// [`rollout_tensors`] with the rollouts of one prompt packed into one row: `batch` holds each
/// distinct prompt once, `rows[i]` is the row of rollout `i`'s prompt. Row `p` is its prompt (and
/// image, ECG) once, then each of its rollouts' responses (right-padded to `r_len`), each a
/// segment ([`ModelInputs::segments`]: 0 for the prompt, 1, 2, ... for the responses) that sees
/// the prompt and itself, as if it followed the prompt alone: the same positions, the same
/// attention, so the same log-probs up to rounding, while the prompt's tokens and image are
/// computed once instead of once per rollout. Rows with fewer rollouts are left-padded further.
/// The per-token tensors are in rollout order, as [`rollout_tensors`]'s.
pub fn rollout_tensors_packed(
    batch: &ProcessedBatch,
    rows: &[usize],
    rollouts: &[&Rollout],
    placeholders: &[u32],
    pad: u32,
    dev: &Device,
) -> Result<RolloutTensors> {
    let (n, s) = (batch.batch_size(), batch.seq_len());
    if rows.len() != rollouts.len() || rows.iter().any(|&p| p >= n) {
        return Err(Error::Input {
            field: "input_ids",
            message: format!(
                "rollout_tensors_packed: {} rollouts with {} prompt rows for a batch of {n}",
                rollouts.len(),
                rows.len()
            ),
        });
    }
    let r_len = rollouts
        .iter()
        .map(|r| r.token_ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    // The slot of each rollout in its row, and each row's count.
    let mut count = vec![0usize; n];
    let slot: Vec<usize> = rows
        .iter()
        .map(|&p| {
            count[p] += 1;
            count[p] - 1
        })
        .collect();
    let most = count.iter().copied().max().unwrap_or(0);
    let t = s + most * r_len;
    let mut ids = vec![pad; n * t];
    let mut mask = vec![0u32; n * t];
    let mut seg = vec![0u32; n * t];
    // Padding positions are 1 (as the collated prompt's).
    let mut pos = vec![1i64; 3 * n * t];
    let extra: Vec<usize> = count.iter().map(|&c| (most - c) * r_len).collect();
    let mut next = vec![0i64; n];
    for p in 0..n {
        let at = p * t + extra[p];
        ids[at..at + s].copy_from_slice(&batch.input_ids[p]);
        mask[at..at + s].copy_from_slice(&batch.attention_mask[p]);
        next[p] = place_positions(batch, p, &mut pos, n * t, at);
    }
    let mut gather = Vec::with_capacity(rollouts.len() * r_len);
    for ((&p, &k), r) in rows.iter().zip(&slot).zip(rollouts) {
        let start = p * t + extra[p] + s + k * r_len;
        for j in 0..r_len {
            ids[start + j] = fed(
                r.token_ids.get(j).copied().unwrap_or(pad),
                placeholders,
                pad,
            );
            mask[start + j] = u32::from(j < r.token_ids.len());
            seg[start + j] = k as u32 + 1;
            for a in 0..3 {
                pos[a * n * t + start + j] = next[p] + j as i64;
            }
        }
        // Token 0 is predicted by the prompt's last position, token j by the response's j - 1.
        gather.push((p * t + extra[p] + s - 1) as u32);
        gather.extend((0..r_len - 1).map(|j| (start + j) as u32));
    }
    let mut inputs = ModelInputs::text(
        Tensor::from_vec(ids, (n, t), dev)?,
        Some(Tensor::from_vec(mask, (n, t), dev)?),
        Tensor::from_vec(pos, (3, n, t), dev)?,
    );
    inputs.segments = Some(Tensor::from_vec(seg, (n, t), dev)?);
    attach_features(&mut inputs, batch, dev)?;
    let gather = Tensor::from_vec(gather, rollouts.len() * r_len, dev)?;
    PACKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    per_token(
        inputs,
        s,
        ResponseAt::Gather(gather),
        rollouts,
        r_len,
        placeholders,
        pad,
        dev,
    )
}

/// The per-token tensors of `rollouts` (labels, loss mask, the sampler's log-probs) beside
/// their `inputs`.
#[allow(clippy::too_many_arguments)]
fn per_token(
    inputs: ModelInputs,
    s: usize,
    at: ResponseAt,
    rollouts: &[&Rollout],
    r_len: usize,
    placeholders: &[u32],
    pad: u32,
    dev: &Device,
) -> Result<RolloutTensors> {
    let b = rollouts.len();
    let mut labels = vec![pad; b * r_len];
    let mut mask = vec![0f32; b * r_len];
    let mut old = vec![0f32; b * r_len];
    for (i, r) in rollouts.iter().enumerate() {
        for (j, (&t, &lp)) in r.token_ids.iter().zip(&r.logprobs).enumerate() {
            labels[i * r_len + j] = t;
            mask[i * r_len + j] = if placeholders.contains(&t) { 0.0 } else { 1.0 };
            old[i * r_len + j] = lp;
        }
    }
    Ok(RolloutTensors {
        inputs,
        s,
        at,
        labels: Tensor::from_vec(labels, (b, r_len), dev)?,
        mask: Tensor::from_vec(mask, (b, r_len), dev)?,
        old: Tensor::from_vec(old, (b, r_len), dev)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoq_core::FinishReason;

    /// Two rows: a left-padded 2-token prompt and a 3-token prompt with an image-like position
    /// jump (max position 5 on the height axis).
    fn batch() -> ProcessedBatch {
        ProcessedBatch {
            ids: vec!["a".into(), "b".into()],
            input_ids: vec![vec![0, 7, 8], vec![4, 5, 6]],
            attention_mask: vec![vec![0, 1, 1], vec![1, 1, 1]],
            // [3][2][3]: temporal, height, width.
            position_ids: vec![
                1, 0, 1, 0, 1, 2, // t
                1, 0, 1, 0, 5, 2, // h
                1, 0, 1, 0, 1, 2, // w
            ],
            rope_deltas: vec![0, 0],
            pixel_values: Vec::new(),
            pixel_values_shape: [0, 0],
            image_grid_thw: Vec::new(),
            time_series_data: Vec::new(),
            raw_prompt_ids: vec![vec![7, 8], vec![4, 5, 6]],
        }
    }

    #[test]
    fn responses_are_right_padded_masked_and_continue_the_largest_position() {
        let dev = Device::Cpu;
        let r0: &[u32] = &[11];
        let r1: &[u32] = &[12, 13];
        let m = batch_to_inputs(&batch(), &[r0, r1], 2, 99, &dev).unwrap();
        let ids: Vec<Vec<u32>> = m.input_ids.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![0, 7, 8, 11, 99], vec![4, 5, 6, 12, 13]]);
        let mask: Vec<Vec<u32>> = m.attention_mask.unwrap().to_vec2().unwrap();
        assert_eq!(mask, vec![vec![0, 1, 1, 1, 0], vec![1, 1, 1, 1, 1]]);
        let pos: Vec<Vec<Vec<i64>>> = m.position_ids.to_vec3().unwrap();
        for axis in &pos {
            // Row 0: prompt max 1 → 2, 3; row 1: max 5 (height axis) → 6, 7 on every axis.
            assert_eq!(&axis[0][3..], &[2, 3]);
            assert_eq!(&axis[1][3..], &[6, 7]);
        }
        assert_eq!(&pos[1][1][..3], &[0, 5, 2]);
    }

    #[test]
    fn prompt_only_inputs_match_the_batch() {
        let m = prompt_inputs(&batch(), &Device::Cpu).unwrap();
        assert_eq!(m.input_ids.dims(), &[2, 3]);
        assert_eq!(m.position_ids.dims(), &[3, 2, 3]);
        let r: &[u32] = &[1];
        assert!(batch_to_inputs(&batch(), &[r], 1, 99, &Device::Cpu).is_err());
    }

    #[test]
    fn packing_pays_for_long_prompts_and_not_for_many_long_responses() {
        // The tiny bench: 335-token prompts, 2 rollouts of 32 tokens per micro-batch.
        assert!(packing_pays(&[(335, 2)], 32, 64));
        // One rollout per prompt: nothing shared.
        assert!(!packing_pays(&[(335, 1), (300, 1)], 32, 64));
        // 7B-wide, 1,000-token prompts and 8 responses of 1,000: still the projections win.
        assert!(packing_pays(&[(1000, 8)], 1000, 3584));
        // 100-token prompts and 8 responses of 2,000: the packed attention would cost more.
        assert!(!packing_pays(&[(100, 8)], 2000, 3584));
    }

    #[test]
    fn rollout_tensors_mask_placeholders_and_padding() {
        let rollout = |token_ids: Vec<u32>, logprobs: Vec<f32>| Rollout {
            token_ids,
            logprobs,
            text: String::new(),
            finish: FinishReason::Stop,
        };
        // Row 0 samples the placeholder 50: fed as pad, masked out, still its label.
        let r0 = rollout(vec![11, 50], vec![-0.5, -1.0]);
        let r1 = rollout(vec![12], vec![-0.25]);
        let t = rollout_tensors(&batch(), &[&r0, &r1], &[50], 99, &Device::Cpu).unwrap();
        assert_eq!(t.s, 3);
        let ids: Vec<Vec<u32>> = t.inputs.input_ids.to_vec2().unwrap();
        assert_eq!(ids, vec![vec![0, 7, 8, 11, 99], vec![4, 5, 6, 12, 99]]);
        let labels: Vec<Vec<u32>> = t.labels.to_vec2().unwrap();
        assert_eq!(labels, vec![vec![11, 50], vec![12, 99]]);
        let mask: Vec<Vec<f32>> = t.mask.to_vec2().unwrap();
        assert_eq!(mask, vec![vec![1.0, 0.0], vec![1.0, 0.0]]);
        let old: Vec<Vec<f32>> = t.old.to_vec2().unwrap();
        assert_eq!(old, vec![vec![-0.5, -1.0], vec![-0.25, 0.0]]);
    }
}
