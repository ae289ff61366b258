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
        let mut max_pos = i64::MIN;
        for a in 0..3 {
            let src = &b.position_ids[a * n * s + i * s..a * n * s + (i + 1) * s];
            pos[a * n * t + i * t..a * n * t + i * t + s].copy_from_slice(src);
            for (k, &p) in src.iter().enumerate() {
                if b.attention_mask[i][k] != 0 {
                    max_pos = max_pos.max(p);
                }
            }
        }
        if r_len > 0 {
            let resp = responses[i];
            for j in 0..r_len {
                ids.push(resp.get(j).copied().unwrap_or(pad));
                mask.push(u32::from(j < resp.len()));
                for a in 0..3 {
                    pos[a * n * t + i * t + s + j] = max_pos.max(-1) + 1 + j as i64;
                }
            }
        }
    }
    let mut m = ModelInputs::text(
        Tensor::from_vec(ids, (n, t), dev)?,
        Some(Tensor::from_vec(mask, (n, t), dev)?),
        Tensor::from_vec(pos, (3, n, t), dev)?,
    );
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
    Ok(m)
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
                .map(|t| if placeholders.contains(t) { pad } else { *t })
                .collect()
        })
        .collect();
    let responses: Vec<&[u32]> = cleaned.iter().map(Vec::as_slice).collect();
    let r_len = responses.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let inputs = batch_to_inputs(batch, &responses, r_len, pad, dev)?;
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
        s: batch.seq_len(),
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
