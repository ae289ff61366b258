//! Generation on the tiny model of qoq-model's parity fixture: cached greedy decoding equals a
//! naive loop of full forwards, log-probs are the trainer's, batching and continuous admission do
//! not change any rollout, EOS stops a sequence.

use candle_core::{D, DType, Device, IndexOp, Tensor};
use qoq_engine::generate::text_positions;
use qoq_engine::{GenerateConfig, GroupRequest, SamplingParams, StopCondition, generate};
use qoq_model::loading::load_model;
use qoq_model::{ClinicalVlm, ForwardMode, ModelInputs};
use std::path::PathBuf;

fn model() -> ClinicalVlm {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qoq-model/tests/fixtures/model_tiny");
    load_model(&dir, DType::F32, &Device::Cpu).unwrap().1
}

fn prompt(ids: &[u32]) -> ModelInputs {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    ModelInputs::text(t, None, text_positions(ids.len(), &Device::Cpu).unwrap())
}

fn cfg(sampling: SamplingParams, max_new: usize, rows: usize) -> GenerateConfig {
    GenerateConfig {
        sampling,
        stop: StopCondition {
            eos: vec![],
            max_new_tokens: max_new,
        },
        max_batch_rows: rows,
        prefill_tokens: 0,
        kv_budget: None,
    }
}

#[test]
fn cached_greedy_decoding_equals_a_loop_of_full_forwards() {
    let m = model();
    let ids = [3u32, 17, 42, 99, 5, 8];
    let out = generate(
        &m,
        &[GroupRequest {
            inputs: prompt(&ids),
            n: 1,
            stream: 0,
        }],
        &cfg(SamplingParams::greedy(), 8, 4),
        |_, _, _| {},
    )
    .unwrap();
    let got = &out[0][0];
    assert_eq!(got.tokens.len(), 8);
    let mut seq = ids.to_vec();
    for k in 0..8 {
        let logits = m.forward(&prompt(&seq), ForwardMode::Inference).unwrap();
        let last = logits.i((0, seq.len() - 1)).unwrap();
        let next = last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(next, got.tokens[k], "token {k}");
        let lsm = candle_nn::ops::log_softmax(&last, D::Minus1).unwrap();
        let lp = lsm.i(next as usize).unwrap().to_scalar::<f32>().unwrap();
        assert!(
            (lp - got.logprobs[k]).abs() < 1e-4,
            "log-prob {k}: {lp} vs {}",
            got.logprobs[k]
        );
        seq.push(next);
    }
}

#[test]
fn rollouts_do_not_depend_on_batching_or_admission_order() {
    let m = model();
    let reqs = vec![
        GroupRequest {
            inputs: prompt(&[1, 2, 3, 4]),
            n: 3,
            stream: 10,
        },
        GroupRequest {
            inputs: prompt(&[9, 8, 7, 6, 5, 4, 3]),
            n: 2,
            stream: 11,
        },
        GroupRequest {
            inputs: prompt(&[50, 60]),
            n: 2,
            stream: 12,
        },
    ];
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        logit_bias: vec![],
        seed: 3,
        ..SamplingParams::default()
    };
    // Eos on a frequent token so that rows finish at different steps and slots are reused.
    let mut c = cfg(sampling, 12, 4);
    c.stop.eos = vec![7, 8, 9, 10, 11, 12];
    let batched = generate(&m, &reqs, &c, |_, _, _| {}).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let alone = generate(&m, std::slice::from_ref(r), &cfg_rows(&c, 1), |_, _, _| {}).unwrap();
        assert_eq!(alone[0].len(), r.n);
        for k in 0..r.n {
            assert_eq!(
                alone[0][k].tokens, batched[i][k].tokens,
                "request {i} rollout {k}"
            );
            for (a, b) in alone[0][k].logprobs.iter().zip(&batched[i][k].logprobs) {
                assert!((a - b).abs() < 1e-4);
            }
        }
    }
    // The n rollouts of one prompt differ (their streams differ).
    assert!(
        batched[0][0].tokens != batched[0][1].tokens
            || batched[0][1].tokens != batched[0][2].tokens
    );
}

fn cfg_rows(c: &GenerateConfig, rows: usize) -> GenerateConfig {
    GenerateConfig {
        max_batch_rows: rows,
        ..c.clone()
    }
}

#[test]
fn eos_stops_a_sequence_and_is_kept_and_tokens_stream_in_order() {
    let m = model();
    let greedy = generate(
        &m,
        &[GroupRequest {
            inputs: prompt(&[3, 17, 42]),
            n: 1,
            stream: 0,
        }],
        &cfg(SamplingParams::greedy(), 6, 2),
        |_, _, _| {},
    )
    .unwrap();
    let third = greedy[0][0].tokens[2];
    let mut c = cfg(SamplingParams::greedy(), 6, 2);
    c.stop.eos = vec![third];
    let mut streamed = Vec::new();
    let out = generate(
        &m,
        &[GroupRequest {
            inputs: prompt(&[3, 17, 42]),
            n: 1,
            stream: 0,
        }],
        &c,
        |g, r, t| streamed.push((g, r, t)),
    )
    .unwrap();
    let first_eos = greedy[0][0]
        .tokens
        .iter()
        .position(|&t| t == third)
        .unwrap();
    assert_eq!(out[0][0].tokens, greedy[0][0].tokens[..=first_eos].to_vec());
    assert_eq!(out[0][0].finish, qoq_core::FinishReason::Stop);
    assert_eq!(
        streamed.iter().map(|x| x.2).collect::<Vec<_>>(),
        out[0][0].tokens
    );
    assert_eq!(greedy[0][0].finish, qoq_core::FinishReason::Length);
}

#[test]
fn a_batched_prompt_is_refused_with_its_index() {
    let m = model();
    let two = Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu).unwrap();
    let pos = text_positions(2, &Device::Cpu)
        .unwrap()
        .repeat((1, 2, 1))
        .unwrap();
    let bad = GroupRequest {
        inputs: ModelInputs::text(two, None, pos),
        n: 1,
        stream: 0,
    };
    let ok = GroupRequest {
        inputs: prompt(&[1]),
        n: 1,
        stream: 0,
    };
    let e = generate(
        &m,
        &[ok, bad],
        &cfg(SamplingParams::greedy(), 2, 1),
        |_, _, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("request 1"), "{e}");
}

#[test]
fn a_prefill_token_bound_gives_the_rollouts_of_whole_prefills() {
    // `rollout.max_num_batched_tokens`: prompts of 6 and 11 tokens prefilled in pieces of at
    // most 4 tokens (4 per step) sample what whole prefills sample.
    let m = model();
    let reqs: Vec<GroupRequest> = [
        &[3u32, 17, 42, 99, 5, 8][..],
        &[7, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12],
    ]
    .iter()
    .enumerate()
    .map(|(i, ids)| GroupRequest {
        inputs: prompt(ids),
        n: 2,
        stream: i as u64,
    })
    .collect();
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        seed: 5,
        ..SamplingParams::default()
    };
    let whole = generate(&m, &reqs, &cfg(sampling.clone(), 6, 8), |_, _, _| {}).unwrap();
    let bounded = GenerateConfig {
        prefill_tokens: 4,
        ..cfg(sampling, 6, 8)
    };
    let chunked = generate(&m, &reqs, &bounded, |_, _, _| {}).unwrap();
    // Same tokens; log-probs to float rounding (the prompt's attention is summed in pieces).
    for (a, b) in whole.iter().flatten().zip(chunked.iter().flatten()) {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.finish, b.finish);
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
}

#[test]
fn a_kv_budget_makes_rows_wait_and_splits_groups_without_changing_a_rollout() {
    // `rollout.kv_cache_mib`: every row here reaches at most 11 + 6 positions, a 64-position
    // buffer; a budget of two such rows makes groups of 3 run in parts of 2 and 1 and makes
    // rows wait for others to finish. The rollouts are those of the unbounded run.
    let m = model();
    let reqs: Vec<GroupRequest> = [
        &[3u32, 17, 42, 99, 5, 8][..],
        &[7, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12],
        &[4, 4, 2, 19],
    ]
    .iter()
    .enumerate()
    .map(|(i, ids)| GroupRequest {
        inputs: prompt(ids),
        n: 3,
        stream: i as u64,
    })
    .collect();
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        seed: 9,
        ..SamplingParams::default()
    };
    let free = generate(&m, &reqs, &cfg(sampling.clone(), 6, 16), |_, _, _| {}).unwrap();
    let one_row = qoq_engine::KvBudget::for_model(&m, 0, "test").worst_case(1, 17);
    let bounded = GenerateConfig {
        kv_budget: Some(qoq_engine::KvBudget::for_model(
            &m,
            2 * one_row,
            "rollout.kv_cache_mib = test",
        )),
        ..cfg(sampling.clone(), 6, 16)
    };
    // Rows that have sampled a first token and not yet their sixth: running together.
    let mut seen = std::collections::HashMap::<(usize, usize), usize>::new();
    let mut peak = 0;
    let waited = generate(&m, &reqs, &bounded, |g, r, _| {
        *seen.entry((g, r)).or_default() += 1;
        peak = peak.max(seen.values().filter(|&&k| k < 6).count());
    })
    .unwrap();
    assert_eq!(peak, 2, "at most two rows live at once, and two do");
    assert_eq!(seen.len(), 9);
    for (a, b) in free.iter().flatten().zip(waited.iter().flatten()) {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.finish, b.finish);
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
    // A budget below one row is an error naming the setting, not a silent overrun.
    let tiny = GenerateConfig {
        kv_budget: Some(qoq_engine::KvBudget::for_model(
            &m,
            one_row - 1,
            "rollout.kv_cache_mib = 0.001",
        )),
        ..cfg(sampling, 6, 16)
    };
    let e = generate(&m, &reqs, &tiny, |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("request 0") && e.contains("rollout.kv_cache_mib = 0.001") && e.contains("MiB"),
        "{e}"
    );
}
