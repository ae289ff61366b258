//! The step-wise engine on the tiny model of qoq-model's parity fixture: chunked prefill gives
//! the tokens of a whole prefill, requests joining a running batch mid-way and cancelled
//! neighbours change no other request's tokens, a cancelled request frees its rows, and
//! top log-probs are reported in order.

use candle_core::{DType, Device, Tensor};
use qoq_engine::generate::text_positions;
use qoq_engine::{Engine, SamplingParams, SeqRequest, StopCondition, TokenEvent};
use qoq_model::loading::load_model;
use qoq_model::{ClinicalVlm, ModelInputs};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn model() -> ClinicalVlm {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qoq-model/tests/fixtures/model_tiny");
    load_model(&dir, DType::F32, &Device::Cpu).unwrap().1
}

fn req(ids: &[u32], n: usize, sampling: SamplingParams, max_new: usize) -> SeqRequest {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    SeqRequest {
        inputs: ModelInputs::text(t, None, text_positions(ids.len(), &Device::Cpu).unwrap()),
        n,
        first_rollout: 0,
        stream: 0,
        sampling,
        stop: StopCondition {
            eos: vec![],
            max_new_tokens: max_new,
        },
        top_logprobs: 0,
    }
}

type Out = BTreeMap<(u64, usize), Vec<TokenEvent>>;

/// Step until idle; `before(step, engine)` may add or cancel requests.
fn run(e: &mut Engine, budget: usize, mut before: impl FnMut(usize, &mut Engine)) -> Out {
    let mut out = Out::new();
    let mut step = 0;
    loop {
        before(step, e);
        if e.is_idle() {
            break;
        }
        for ev in e.step(budget).unwrap() {
            out.entry((ev.id, ev.rollout)).or_default().push(ev);
        }
        step += 1;
    }
    out
}

fn tokens(out: &Out, id: u64, k: usize) -> Vec<u32> {
    out[&(id, k)].iter().map(|e| e.token).collect()
}

#[test]
fn chunked_prefill_gives_the_tokens_of_a_whole_prefill() {
    let m = model();
    let ids: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 200).collect();
    let mut whole = Engine::new(&m, 0);
    whole
        .add(1, req(&ids, 1, SamplingParams::greedy(), 10))
        .unwrap();
    let a = run(&mut whole, usize::MAX, |_, _| {});
    for chunk in [1, 4, 7] {
        let mut e = Engine::new(&m, chunk);
        e.add(1, req(&ids, 1, SamplingParams::greedy(), 10))
            .unwrap();
        // A budget of one piece: the prefill takes several steps before the first token.
        let b = run(&mut e, chunk, |_, _| {});
        assert_eq!(tokens(&a, 1, 0), tokens(&b, 1, 0), "chunk {chunk}");
        for (x, y) in a[&(1, 0)].iter().zip(&b[&(1, 0)]) {
            assert!((x.logprob - y.logprob).abs() < 1e-4, "chunk {chunk}");
        }
    }
}

#[test]
fn joining_and_cancelled_neighbours_change_no_request_and_cancel_frees_rows() {
    let m = model();
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        logit_bias: vec![],
        seed: 3,
        ..SamplingParams::default()
    };
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4], vec![9, 8, 7, 6, 5, 4, 3], vec![50, 60]];
    // Each alone.
    let alone: Vec<Out> = prompts
        .iter()
        .map(|p| {
            let mut e = Engine::new(&m, 3);
            e.add(7, req(p, 2, sampling.clone(), 12)).unwrap();
            run(&mut e, 3, |_, _| {})
        })
        .collect();
    // Together: request 0 first, 1 joins at step 2, 2 at step 5; a long request 9 runs from
    // the start and is cancelled at step 4.
    let mut e = Engine::new(&m, 3);
    let mut rows_after_cancel = None;
    let out = run(&mut e, 3, |step, e| {
        if step == 0 {
            e.add(0, req(&prompts[0], 2, sampling.clone(), 12)).unwrap();
            e.add(9, req(&[11, 12, 13, 14, 15], 3, sampling.clone(), 1000))
                .unwrap();
        }
        if step == 2 {
            e.add(1, req(&prompts[1], 2, sampling.clone(), 12)).unwrap();
        }
        if step == 4 {
            let before = e.running_rows();
            let kv = e.kv_bytes();
            e.cancel(9, None).unwrap();
            assert_eq!(e.running_rows(), before - 3);
            assert!(e.kv_bytes() < kv);
            rows_after_cancel = Some(e.running_rows());
        }
        if step == 5 {
            e.add(2, req(&prompts[2], 2, sampling.clone(), 12)).unwrap();
        }
    });
    assert!(rows_after_cancel.is_some());
    for (i, a) in alone.iter().enumerate() {
        for k in 0..2 {
            assert_eq!(tokens(a, 7, k), tokens(&out, i as u64, k), "request {i}");
            let last = out[&(i as u64, k)].last().unwrap();
            assert_eq!(last.finish, Some(qoq_core::FinishReason::Length));
        }
    }
    // The cancelled request stopped early, without a finish event.
    let c = &out[&(9, 0)];
    assert!(c.len() < 10 && c.iter().all(|e| e.finish.is_none()));
    assert!(e.is_idle());
    assert_eq!(e.kv_bytes(), 0);
}

#[test]
fn one_rollout_can_be_cancelled_and_top_logprobs_come_in_order() {
    let m = model();
    let mut e = Engine::new(&m, 0);
    let mut r = req(&[4, 5, 6], 2, SamplingParams::greedy(), 6);
    r.top_logprobs = 3;
    e.add(1, r).unwrap();
    let out = run(&mut e, usize::MAX, |step, e| {
        if step == 2 {
            e.cancel(1, Some(1)).unwrap();
            assert_eq!(e.running_rows(), 1);
        }
    });
    assert_eq!(out[&(1, 0)].len(), 6);
    assert!(out[&(1, 1)].len() < 6);
    for ev in &out[&(1, 0)] {
        assert_eq!(ev.top_logprobs.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(ev.top_logprobs[0].0, ev.token);
        assert!((ev.top_logprobs[0].1 - ev.logprob).abs() < 1e-6);
        assert!(ev.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}
