//! Cached generation equals full forwards: prefill a prompt prefix, then decode the remaining
//! tokens one at a time; the logits at every step equal those of one forward over the whole
//! sequence (text only, images, ECG with left padding). Selecting rows of a cache equals running
//! those rows alone.

mod support;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use qoq_model::loading::load_model;
use qoq_model::{ForwardMode, KvCache, ModelInputs};
use support::*;

fn prefix(inputs: &ModelInputs, n: usize) -> ModelInputs {
    let mut p = inputs.clone();
    p.input_ids = inputs.input_ids.narrow(1, 0, n).unwrap();
    p.attention_mask = inputs
        .attention_mask
        .as_ref()
        .map(|m| m.narrow(1, 0, n).unwrap());
    p.position_ids = inputs.position_ids.narrow(2, 0, n).unwrap();
    p
}

#[test]
fn prefill_then_decode_equals_one_full_forward() {
    let (_, model) = load_model(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let all = cases();
    for name in CASES {
        let (inputs, _) = case_inputs(&all, name);
        let full = model.forward(&inputs, ForwardMode::Inference).unwrap(); // (b, s, v)
        let s = inputs.input_ids.dim(1).unwrap();
        let k = 3;
        let mut cache = KvCache::new();
        let first = model
            .prefill(&prefix(&inputs, s - k), &mut cache, ForwardMode::Inference)
            .unwrap();
        let d = max_abs(&first, &full.i((.., s - k - 1, ..)).unwrap());
        assert!(d < 1e-4, "{name}: prefill logits differ by {d}");
        for j in s - k..s {
            let ids = inputs.input_ids.narrow(1, j, 1).unwrap();
            let pos = inputs.position_ids.narrow(2, j, 1).unwrap();
            let step = model
                .decode_step(&ids, &pos, &mut cache, ForwardMode::Inference)
                .unwrap();
            let d = max_abs(&step, &full.i((.., j, ..)).unwrap());
            assert!(d < 1e-4, "{name}: decode logits at {j} differ by {d}");
        }
        assert_eq!(cache.len(), s);
        // The training forward agrees through the cache too.
        let mut c2 = KvCache::new();
        let t = model.prefill(&inputs, &mut c2, ForwardMode::Train).unwrap();
        assert!(
            max_abs(&t, &full.i((.., s - 1, ..)).unwrap()) < 1e-4,
            "{name}"
        );
    }
}

#[test]
fn selecting_cache_rows_equals_decoding_those_rows_alone() {
    let (_, model) = load_model(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let all = cases();
    // The ECG case is a batch of two, left padded.
    let (inputs, _) = case_inputs(&all, "ecg_image_text");
    let b = inputs.input_ids.dim(0).unwrap();
    assert!(b >= 2);
    let mut cache = KvCache::new();
    let logits = model
        .prefill(&inputs, &mut cache, ForwardMode::Inference)
        .unwrap();
    let next = logits.argmax(D::Minus1).unwrap().unsqueeze(1).unwrap(); // (b, 1)
    let last = inputs
        .position_ids
        .max_keepdim(2)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap(); // (3, b, 1)
    let pos = (last + 1.0).unwrap();
    // Row 1 alone, through a one-row cache.
    let mut one = cache.select(&[1]).unwrap();
    assert_eq!(one.batch_size(), 1);
    let alone = model
        .decode_step(
            &next.narrow(0, 1, 1).unwrap(),
            &pos.narrow(1, 1, 1).unwrap(),
            &mut one,
            ForwardMode::Inference,
        )
        .unwrap();
    let both = model
        .decode_step(&next, &pos, &mut cache, ForwardMode::Inference)
        .unwrap();
    let d = max_abs(&alone, &both.narrow(0, 1, 1).unwrap());
    assert!(d < 1e-5, "row 1 alone differs by {d}");
    // A cache shared by n rollouts of one prompt (rows repeated) decodes each like the original.
    let mut shared = KvCache::new();
    let p0 = model
        .prefill(&prefix_row(&inputs, 0), &mut shared, ForwardMode::Inference)
        .unwrap();
    let mut rep = shared.select(&[0, 0, 0]).unwrap();
    let ids = Tensor::new(&[[5u32], [6], [7]], &Device::Cpu).unwrap();
    let p = pos
        .narrow(1, 0, 1)
        .unwrap()
        .broadcast_as((3, 3, 1))
        .unwrap()
        .contiguous()
        .unwrap();
    let out = model
        .decode_step(&ids, &p, &mut rep, ForwardMode::Inference)
        .unwrap();
    assert_eq!(out.dims(), &[3, p0.dim(1).unwrap()]);
    let mut solo = shared.select(&[0]).unwrap();
    let r = model
        .decode_step(
            &Tensor::new(&[[6u32]], &Device::Cpu).unwrap(),
            &p.narrow(1, 1, 1).unwrap(),
            &mut solo,
            ForwardMode::Inference,
        )
        .unwrap();
    assert!(max_abs(&r, &out.narrow(0, 1, 1).unwrap()) < 1e-5);
    // A mismatched batch is refused.
    let mut wrong = shared.select(&[0]).unwrap();
    assert!(
        model
            .decode_step(&ids, &p, &mut wrong, ForwardMode::Inference)
            .is_err()
    );
}

/// Row `r` of a batch, without its left padding.
fn prefix_row(inputs: &ModelInputs, r: usize) -> ModelInputs {
    let mut p = inputs.clone();
    let mask: Vec<i64> = inputs
        .attention_mask
        .as_ref()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .i(r)
        .unwrap()
        .to_vec1()
        .unwrap();
    let start = mask.iter().position(|&m| m == 1).unwrap();
    let n = mask.len() - start;
    p.input_ids = inputs
        .input_ids
        .i(r..r + 1)
        .unwrap()
        .narrow(1, start, n)
        .unwrap();
    p.attention_mask = None;
    p.position_ids = inputs
        .position_ids
        .narrow(1, r, 1)
        .unwrap()
        .narrow(2, start, n)
        .unwrap();
    p.time_series_data = inputs
        .time_series_data
        .as_ref()
        .map(|t| t.i(r..r + 1).unwrap());
    // Keep only this row's images: the fixture's ECG case has one image per row.
    if let Some(pv) = &inputs.pixel_values {
        let per: Vec<usize> = inputs
            .image_grid_thw
            .iter()
            .map(|g| g[0] * g[1] * g[2])
            .collect();
        let off: usize = per[..r].iter().sum();
        p.pixel_values = Some(pv.narrow(0, off, per[r]).unwrap());
        p.image_grid_thw = vec![inputs.image_grid_thw[r]];
    }
    p
}

#[test]
fn joined_caches_of_different_lengths_decode_like_separate_ones() {
    let (_, model) = load_model(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let all = cases();
    let (a_in, _) = case_inputs(&all, "text_only");
    let (b_in, _) = case_inputs(&all, "image_text");
    let a_in = prefix_row(&with_mask(a_in), 0);
    let b_in = prefix_row(&with_mask(b_in), 0);
    let (mut ca, mut cb) = (KvCache::new(), KvCache::new());
    model
        .prefill(&a_in, &mut ca, ForwardMode::Inference)
        .unwrap();
    model
        .prefill(&b_in, &mut cb, ForwardMode::Inference)
        .unwrap();
    assert_ne!(ca.len(), cb.len());
    let next_pos = |i: &ModelInputs| {
        (i.position_ids
            .max_keepdim(2)
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            + 1.0)
            .unwrap()
    };
    let (pa, pb) = (next_pos(&a_in), next_pos(&b_in));
    let ids = Tensor::new(&[[9u32], [11]], &Device::Cpu).unwrap();
    let mut joined = KvCache::concat(&[&ca, &cb]).unwrap();
    assert_eq!(joined.batch_size(), 2);
    let pos = Tensor::cat(&[&pa, &pb], 1).unwrap();
    let both = model
        .decode_step(&ids, &pos, &mut joined, ForwardMode::Inference)
        .unwrap();
    let a = model
        .decode_step(
            &ids.narrow(0, 0, 1).unwrap(),
            &pa,
            &mut ca,
            ForwardMode::Inference,
        )
        .unwrap();
    let b = model
        .decode_step(
            &ids.narrow(0, 1, 1).unwrap(),
            &pb,
            &mut cb,
            ForwardMode::Inference,
        )
        .unwrap();
    assert!(max_abs(&a, &both.narrow(0, 0, 1).unwrap()) < 1e-5);
    assert!(max_abs(&b, &both.narrow(0, 1, 1).unwrap()) < 1e-5);
}

/// The same inputs with an explicit all-ones attention mask.
fn with_mask(mut i: ModelInputs) -> ModelInputs {
    if i.attention_mask.is_none() {
        i.attention_mask =
            Some(Tensor::ones(i.input_ids.dims(), DType::I64, &Device::Cpu).unwrap());
    }
    i
}

/// Two copies of one prompt's cache ([`KvCache::select`]) decode different continuations well
/// past the first buffer's capacity (so the buffers grow while being written in place): each
/// ends with the logits of one full forward over its prompt and continuation, so the copies
/// share no storage and growth loses no position.
#[test]
fn in_place_decoding_across_growth_from_independent_copies_equals_full_forwards() {
    let (_, model) = load_model(&tiny_dir(), DType::F32, &Device::Cpu).unwrap();
    let all = cases();
    let (p_in, _) = case_inputs(&all, "text_only");
    let p_in = prefix_row(&with_mask(p_in), 0);
    let mut cache = KvCache::new();
    model
        .prefill(&p_in, &mut cache, ForwardMode::Inference)
        .unwrap();
    let first_cap = cache.capacity();
    assert!(first_cap >= cache.len());
    let mut copies = [cache.select(&[0]).unwrap(), cache.select(&[0]).unwrap()];
    let start = p_in
        .position_ids
        .max(D::Minus1)
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_scalar::<i64>()
        .unwrap()
        + 1;
    let n = first_cap + 70 - cache.len();
    let token = |c: usize, j: usize| (10 + (j * (7 + 6 * c) + 3 * c) % 100) as u32;
    let mut last: [Option<Tensor>; 2] = [None, None];
    for j in 0..n {
        for (c, cc) in copies.iter_mut().enumerate() {
            let ids = Tensor::new(&[[token(c, j)]], &Device::Cpu).unwrap();
            let pos = Tensor::full(start + j as i64, (3, 1, 1), &Device::Cpu).unwrap();
            last[c] = Some(
                model
                    .decode_step(&ids, &pos, cc, ForwardMode::Inference)
                    .unwrap(),
            );
        }
    }
    for (c, cc) in copies.iter().enumerate() {
        assert!(cc.capacity() > first_cap, "the buffer grew");
        let cont: Vec<u32> = (0..n).map(|j| token(c, j)).collect();
        let mut full = p_in.clone();
        full.input_ids = Tensor::cat(
            &[
                &p_in.input_ids.to_dtype(DType::U32).unwrap(),
                &Tensor::new(cont.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            ],
            1,
        )
        .unwrap()
        .to_dtype(p_in.input_ids.dtype())
        .unwrap();
        let new_pos: Vec<i64> = (0..n as i64).map(|j| start + j).collect();
        let new_pos = Tensor::new(new_pos.as_slice(), &Device::Cpu)
            .unwrap()
            .reshape((1, 1, n))
            .unwrap()
            .broadcast_as((3, 1, n))
            .unwrap();
        full.position_ids = Tensor::cat(
            &[
                &p_in.position_ids.to_dtype(DType::I64).unwrap(),
                &new_pos.contiguous().unwrap(),
            ],
            2,
        )
        .unwrap()
        .to_dtype(p_in.position_ids.dtype())
        .unwrap();
        full.attention_mask = None;
        let want = model.forward(&full, ForwardMode::Inference).unwrap();
        let s = want.dim(1).unwrap();
        let d = max_abs(last[c].as_ref().unwrap(), &want.i((.., s - 1, ..)).unwrap());
        assert!(d < 1e-4, "continuation {c}: last logits differ by {d}");
    }
}
