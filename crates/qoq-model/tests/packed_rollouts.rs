//! Packed rollouts ([`qoq_model::rollout_tensors_packed`]: the rollouts of a prompt as segments
//! of one row after the prompt) give each rollout the log-probs, and the parameters the
//! gradients, of the rollouts computed one per row after their own prompt
//! ([`qoq_model::rollout_tensors`]), with images, an ECG and left padding, through both the
//! one-node eager attention and the chunked one.

mod support;

use candle_core::{DType, Device, Tensor};
use qoq_core::{FinishReason, Rollout};
use qoq_model::loading::{checkpoint_var_builder, read_config};
use qoq_model::train::{Freeze, ParamStore, trainable_var_builder};
use qoq_model::{ClinicalVlm, ForwardMode, ResponseAt, RolloutTensors};
use qoq_processor::processor::ProcessedBatch;
use support::*;

const PAD: u32 = 0;

fn build() -> (ClinicalVlm, ParamStore) {
    let cfg = read_config(&tiny_dir()).unwrap();
    let (vb, _) = checkpoint_var_builder(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let (vb, store) = trainable_var_builder(vb, Freeze::default());
    (ClinicalVlm::new(&cfg, vb).unwrap(), store)
}

/// The fixture case's inputs as the collated prompt batch they came from.
fn prompt_batch(name: &str) -> ProcessedBatch {
    let (inputs, _) = case_inputs(&cases(), name);
    let input_ids: Vec<Vec<u32>> = inputs
        .input_ids
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let (b, s) = (input_ids.len(), input_ids[0].len());
    let attention_mask: Vec<Vec<u32>> = match &inputs.attention_mask {
        Some(m) => m.to_dtype(DType::U32).unwrap().to_vec2().unwrap(),
        None => vec![vec![1; s]; b],
    };
    let position_ids: Vec<i64> = inputs
        .position_ids
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (pixel_values, pixel_values_shape) = match &inputs.pixel_values {
        Some(p) => (
            p.flatten_all().unwrap().to_vec1().unwrap(),
            [p.dim(0).unwrap(), p.dim(1).unwrap()],
        ),
        None => (Vec::new(), [0, 0]),
    };
    ProcessedBatch {
        ids: (0..b).map(|i| i.to_string()).collect(),
        raw_prompt_ids: input_ids.clone(),
        input_ids,
        attention_mask,
        position_ids,
        rope_deltas: vec![0; b],
        pixel_values,
        pixel_values_shape,
        image_grid_thw: inputs.image_grid_thw.clone(),
        time_series_data: inputs
            .time_series_data
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .unwrap_or_default(),
    }
}

fn rollout(seed: usize, len: usize) -> Rollout {
    Rollout {
        token_ids: (0..len)
            .map(|j| (7 + 13 * seed + 5 * j) as u32 % 60 + 1)
            .collect(),
        logprobs: vec![-1.0; len],
        text: String::new(),
        finish: FinishReason::Stop,
    }
}

fn log_probs(model: &ClinicalVlm, t: &RolloutTensors, mode: ForwardMode) -> Tensor {
    let r_len = t.labels.dim(1).unwrap();
    let hidden = model.forward_hidden(&t.inputs, mode).unwrap();
    let logits = model
        .logits_from_hidden(&t.at.hidden(&hidden, r_len).unwrap())
        .unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
    lsm.gather(&t.labels.unsqueeze(2).unwrap(), 2)
        .unwrap()
        .squeeze(2)
        .unwrap()
}

/// Packed against one rollout per row: log-probs on every response token (the mask's) and the
/// gradient of a weighted sum of them on every trainable parameter.
fn compare(name: &str, chunked: bool) {
    let (model, store) = build();
    let batch = prompt_batch(name);
    let n = batch.batch_size();
    // Three rollouts of row 0 and two of row 1, interleaved, of different lengths (a one-row
    // batch: all five of row 0).
    let rows = if n >= 2 { [0, 1, 0, 0, 1] } else { [0; 5] };
    let lens = [5, 3, 2, 4, 6];
    let rollouts: Vec<Rollout> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| rollout(i, l))
        .collect();
    let refs: Vec<&Rollout> = rollouts.iter().collect();
    let dev = Device::Cpu;
    let min_macs = if chunked { 0 } else { usize::MAX };
    let packed = qoq_model::rollout_tensors_packed(&batch, &rows, &refs, &[], PAD, &dev).unwrap();
    assert!(matches!(packed.at, ResponseAt::Gather(_)));
    let r_len = packed.labels.dim(1).unwrap();
    assert_eq!(r_len, 6);
    // Row 0 is its prompt and three responses of 6 positions; row 1 two, left-padded by 6.
    let most = if n >= 2 { 3 } else { 5 };
    assert_eq!(
        packed.inputs.input_ids.dims(),
        &[n, batch.seq_len() + most * r_len]
    );
    let weights: Vec<f32> = (0..rows.len() * r_len)
        .map(|i| 1.0 + (i % 7) as f32 / 5.0)
        .collect();
    let weights = Tensor::from_vec(weights, (rows.len(), r_len), &dev).unwrap();
    let weights = (weights * &packed.mask).unwrap();
    let lp_packed = qoq_model::attention::with_min_macs(min_macs, || {
        log_probs(&model, &packed, ForwardMode::Train)
    });
    let g_packed = (&lp_packed * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // The reference: slot k's rollouts one per row of the whole prompt batch (a row without a
    // k-th rollout answers a placeholder of weight 0).
    let mut want = vec![vec![0f32; r_len]; rows.len()];
    let mut g_sum: Vec<Option<Tensor>> = vec![None; store.trainable().unwrap().len()];
    for k in 0..most {
        let mut mine = vec![None; n];
        let mut seen = vec![0; n];
        for (i, &p) in rows.iter().enumerate() {
            if seen[p] == k {
                mine[p] = Some(i);
            }
            seen[p] += 1;
        }
        let filler = rollout(99, 1);
        let slot: Vec<&Rollout> = mine
            .iter()
            .map(|m| m.map_or(&filler, |i| &rollouts[i]))
            .collect();
        let t = qoq_model::rollout_tensors(&batch, &slot, &[], PAD, &dev).unwrap();
        let lp = qoq_model::attention::with_min_macs(min_macs, || {
            log_probs(&model, &t, ForwardMode::Train)
        });
        let rl = lp.dim(1).unwrap();
        let mut w = vec![0f32; n * rl];
        let wp: Vec<Vec<f32>> = weights.to_vec2().unwrap();
        let values: Vec<Vec<f32>> = lp.to_vec2().unwrap();
        for (p, m) in mine.iter().enumerate() {
            if let Some(i) = *m {
                for j in 0..lens[i] {
                    want[i][j] = values[p][j];
                    w[p * rl + j] = wp[i][j];
                }
            }
        }
        let w = Tensor::from_vec(w, (n, rl), &dev).unwrap();
        let g = (&lp * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (acc, (_, var)) in g_sum.iter_mut().zip(store.trainable().unwrap()) {
            if let Some(x) = g.get(var.as_tensor()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + x).unwrap(),
                    None => x.clone(),
                });
            }
        }
    }
    let got: Vec<Vec<f32>> = lp_packed.to_vec2().unwrap();
    for (i, &len) in lens.iter().enumerate() {
        for j in 0..len {
            let d = (got[i][j] - want[i][j]).abs();
            assert!(
                d <= 2e-5,
                "{name} chunked {chunked}: rollout {i} token {j}: {} vs {}",
                got[i][j],
                want[i][j]
            );
        }
    }
    let mut checked = 0;
    for (acc, (pname, var)) in g_sum.iter().zip(store.trainable().unwrap()) {
        let Some(want) = acc else { continue };
        let got = g_packed
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: {pname} has no gradient packed"));
        let scale = max_abs(want, &want.zeros_like().unwrap()).max(1e-3);
        let d = max_abs(got, want);
        assert!(
            d <= 1e-4 * scale,
            "{name} chunked {chunked}: {pname}: gradients differ by {d} (largest {scale})"
        );
        checked += 1;
    }
    assert!(checked > 20, "{name}: {checked} parameters checked");
}

#[test]
fn packed_rollouts_give_the_log_probs_and_gradients_of_one_rollout_per_row() {
    for name in ["ecg_image_text", "two_images", "text_only"] {
        compare(name, false);
        compare(name, true);
    }
}

#[test]
fn packed_rows_are_refused_by_a_kv_cache_prefill_and_bad_rows_are_named() {
    let (model, _) = build();
    let batch = prompt_batch("text_only");
    let r = rollout(1, 3);
    let dev = Device::Cpu;
    let t = qoq_model::rollout_tensors_packed(&batch, &[0, 0], &[&r, &r], &[], PAD, &dev).unwrap();
    let mut cache = qoq_model::KvCache::new();
    let e = model
        .prefill(&t.inputs, &mut cache, ForwardMode::Inference)
        .unwrap_err()
        .to_string();
    assert!(e.contains("segments"), "{e}");
    let e = qoq_model::rollout_tensors_packed(&batch, &[7], &[&r], &[], PAD, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt rows"), "{e}");
}
