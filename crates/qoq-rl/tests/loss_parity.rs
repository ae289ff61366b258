//! Parity of the policy loss, KL estimators, controllers, aggregation, entropy and log-probs
//! with the reference math run in torch (`tools/fixtures/loss.py`, float64, autograd gradients).
//!
//! Tolerances: f64 runs must agree to 1e-10 relative (max(1, |x|)); f32 runs to 2e-5 (loss values
//! and gradients are O(1); f32 has a 6e-8 unit round-off and the losses sum ≤ 24 terms).

mod loss_util;

use candle_core::{DType, Var};
use loss_util::{assert_close, assert_scalar, fixture, flatten, num, tensor, values};
use qoq_rl::loss::{
    ActorLossInputs, KlController, KlEstimator, KlTerm, LossAggMode, LossConfig, PolicyLossConfig,
    PolicyLossInputs, apply_kl_penalty, compute_actor_loss, compute_kl, compute_policy_loss,
    entropy_from_logits, full_kl_from_logits, log_probs_from_logits,
};

const TOL_F64: f64 = 1e-10;
const TOL_F32: f64 = 2e-5;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        TOL_F64
    } else {
        TOL_F32
    }
}

fn policy_cfg(c: &serde_json::Value) -> PolicyLossConfig {
    PolicyLossConfig {
        clip_ratio_low: num(&c["clip_ratio_low"]),
        clip_ratio_high: num(&c["clip_ratio_high"]),
        clip_ratio_dual: num(&c["clip_ratio_dual"]),
        loss_agg_mode: c["loss_agg_mode"].as_str().unwrap().parse().unwrap(),
        loss_scale_factor: c["loss_scale_factor"].as_f64(),
    }
}

#[test]
fn policy_loss_values_metrics_and_gradients_match_torch() {
    let f = fixture();
    let cases = f["policy_cases"].as_array().unwrap();
    assert!(cases.len() >= 14);
    let mut modes_seen = std::collections::HashSet::new();
    for dtype in [DType::F64, DType::F32] {
        let tol = tol(dtype);
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let cfg = policy_cfg(c);
            modes_seen.insert(cfg.loss_agg_mode);
            let lp = Var::from_tensor(&tensor(&c["log_probs"], dtype)).unwrap();
            let old = tensor(&c["old_log_probs"], dtype);
            let adv = tensor(&c["advantages"], dtype);
            let mask = tensor(&c["response_mask"], dtype);
            let out = compute_policy_loss(
                &PolicyLossInputs {
                    old_log_probs: &old,
                    log_probs: lp.as_tensor(),
                    advantages: &adv,
                    response_mask: &mask,
                },
                &cfg,
            )
            .unwrap();
            assert_eq!(out.loss.dtype(), dtype);
            let m = &out.metrics;
            let what = format!("{name} {dtype:?}");
            assert_scalar(&format!("{what} loss"), m.pg_loss, num(&c["loss"]), tol);
            assert_scalar(
                &format!("{what} loss tensor"),
                values(&out.loss)[0],
                num(&c["loss"]),
                tol,
            );
            assert_scalar(
                &format!("{what} clipfrac_higher"),
                m.pg_clipfrac_higher,
                num(&c["pg_clipfrac_higher"]),
                tol,
            );
            assert_scalar(
                &format!("{what} clipfrac_lower"),
                m.pg_clipfrac_lower,
                num(&c["pg_clipfrac_lower"]),
                tol,
            );
            assert_scalar(&format!("{what} ppo_kl"), m.ppo_kl, num(&c["ppo_kl"]), tol);
            assert_scalar(
                &format!("{what} entropy_loss"),
                m.entropy_loss,
                num(&c["entropy_loss"]),
                tol,
            );
            let grads = out.loss.backward().unwrap();
            let g = grads
                .get(lp.as_tensor())
                .expect("gradient w.r.t. log_probs");
            let (want, _) = loss_util::flatten(&c["grad_log_probs"]);
            assert_close(&format!("{what} grad"), &values(g), &want, tol);
        }
    }
    assert_eq!(
        modes_seen.len(),
        LossAggMode::ALL.len(),
        "every aggregation mode is covered"
    );
}

#[test]
fn the_fixture_exercises_both_clips_and_the_dual_clip() {
    let f = fixture();
    let cases = f["policy_cases"].as_array().unwrap();
    let main = cases
        .iter()
        .find(|c| c["name"] == "seq_adv_token-mean")
        .unwrap();
    assert!(num(&main["pg_clipfrac_higher"]) > 0.0);
    assert!(num(&main["pg_clipfrac_lower"]) > 0.0);
    // Masked tokens contribute nothing to the gradient.
    let (g, _) = loss_util::flatten(&main["grad_log_probs"]);
    let (m, _) = loss_util::flatten(&main["response_mask"]);
    assert!(g.iter().zip(&m).all(|(g, m)| *m == 1.0 || *g == 0.0));
}

#[test]
fn per_token_kl_estimators_match_torch() {
    let f = fixture();
    let inp = &f["kl_inputs"];
    for dtype in [DType::F64, DType::F32] {
        let tol = tol(dtype);
        let reference = tensor(&inp["ref_log_probs"], dtype);
        let w = tensor(&inp["weights"], dtype);
        for c in f["kl_cases"].as_array().unwrap() {
            let est: KlEstimator = c["estimator"].as_str().unwrap().parse().unwrap();
            let lp = Var::from_tensor(&tensor(&inp["log_probs"], dtype)).unwrap();
            let kl = compute_kl(lp.as_tensor(), &reference, est).unwrap();
            let (want, shape) = loss_util::flatten(&c["kl"]);
            assert_eq!(kl.dims(), &shape[..]);
            assert_close(&format!("{est} {dtype:?} kl"), &values(&kl), &want, tol);
            let grads = kl.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gw, _) = loss_util::flatten(&c["grad_log_probs"]);
            let g = values(grads.get(lp.as_tensor()).unwrap());
            assert_close(&format!("{est} {dtype:?} grad"), &g, &gw, tol);
        }
        // `full` on gathered per-token log-probs sums over the sequence, as the reference does.
        let c = &f["full_kl_tokens"];
        let lp = Var::from_tensor(&tensor(&inp["log_probs"], dtype)).unwrap();
        let kl = compute_kl(lp.as_tensor(), &reference, KlEstimator::Full).unwrap();
        let (want, shape) = loss_util::flatten(&c["kl"]);
        assert_eq!(kl.dims(), &shape[..]);
        assert_close("full tokens", &values(&kl), &want, tol);
        let w4 = tensor(&c["weights"], dtype);
        let grads = kl.mul(&w4).unwrap().sum_all().unwrap().backward().unwrap();
        let (gw, _) = loss_util::flatten(&c["grad_log_probs"]);
        assert_close(
            "full tokens grad",
            &values(grads.get(lp.as_tensor()).unwrap()),
            &gw,
            tol,
        );
    }
}

#[test]
fn low_var_kl_is_clamped_at_ten_with_zero_gradient() {
    let f = fixture();
    let c = f["kl_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["estimator"] == "low_var_kl")
        .unwrap();
    let (kl, _) = loss_util::flatten(&c["kl"]);
    let (g, _) = loss_util::flatten(&c["grad_log_probs"]);
    let clamped: Vec<usize> = (0..kl.len()).filter(|&i| kl[i] == 10.0).collect();
    assert_eq!(clamped.len(), 2, "the fixture places two clamped tokens");
    assert!(clamped.iter().all(|&i| g[i] == 0.0));
}

#[test]
fn full_kl_from_logits_matches_torch() {
    let f = fixture();
    let c = &f["full_kl_logits"];
    for dtype in [DType::F64, DType::F32] {
        let tol = tol(dtype);
        let lg = Var::from_tensor(&tensor(&c["logits"], dtype)).unwrap();
        let rf = tensor(&c["ref_logits"], dtype);
        let kl = full_kl_from_logits(lg.as_tensor(), &rf).unwrap();
        let (want, shape) = loss_util::flatten(&c["kl"]);
        assert_eq!(kl.dims(), &shape[..]);
        assert_close("full kl", &values(&kl), &want, tol);
        assert!(
            values(&kl).iter().all(|&x| x >= -1e-6),
            "KL is non-negative"
        );
        let w = tensor(&c["weights"], dtype);
        let grads = kl.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gw, _) = loss_util::flatten(&c["grad_logits"]);
        assert_close(
            "full kl grad",
            &values(grads.get(lg.as_tensor()).unwrap()),
            &gw,
            tol,
        );
    }
}

#[test]
fn actor_loss_with_kl_term_matches_torch() {
    let f = fixture();
    let inp = &f["policy_inputs"];
    for dtype in [DType::F64, DType::F32] {
        let tol = tol(dtype);
        let old = tensor(&inp["old_log_probs"], dtype);
        let adv = tensor(&inp["advantages_tok"], dtype);
        let mask = tensor(&inp["response_mask"], dtype);
        let reference = tensor(&inp["ref_log_probs"], dtype);
        for c in f["actor_cases"].as_array().unwrap() {
            let mut cfg = LossConfig::default();
            cfg.kl.kl_penalty = c["kl_penalty"].as_str().unwrap().parse().unwrap();
            cfg.kl.kl_coef = num(&c["kl_coef"]);
            cfg.policy.loss_agg_mode = c["loss_agg_mode"].as_str().unwrap().parse().unwrap();
            let lp = Var::from_tensor(&tensor(&inp["log_probs"], dtype)).unwrap();
            let out = compute_actor_loss(
                &ActorLossInputs {
                    policy: PolicyLossInputs {
                        old_log_probs: &old,
                        log_probs: lp.as_tensor(),
                        advantages: &adv,
                        response_mask: &mask,
                    },
                    kl: Some(KlTerm::RefLogProbs(&reference)),
                },
                &cfg,
            )
            .unwrap();
            let what = format!("{} {dtype:?}", cfg.kl.kl_penalty);
            assert_scalar(
                &format!("{what} loss"),
                values(&out.loss)[0],
                num(&c["loss"]),
                tol,
            );
            assert_scalar(
                &format!("{what} pg_loss metric"),
                out.metrics.pg_loss,
                num(&c["loss"]),
                tol,
            );
            assert_scalar(
                &format!("{what} kl_loss"),
                out.metrics.kl_loss.unwrap(),
                num(&c["kl_loss"]),
                tol,
            );
            assert_eq!(out.metrics.kl_coef, Some(cfg.kl.kl_coef));
            assert_scalar(
                &format!("{what} ppo_kl"),
                out.metrics.ppo_kl,
                num(&c["ppo_kl"]),
                tol,
            );
            let grads = out.loss.backward().unwrap();
            let (gw, _) = loss_util::flatten(&c["grad_log_probs"]);
            assert_close(
                &format!("{what} grad"),
                &values(grads.get(lp.as_tensor()).unwrap()),
                &gw,
                tol,
            );
        }
    }
}

#[test]
fn kl_reward_penalty_and_controllers_match_torch() {
    let f = fixture();
    let inp = &f["policy_inputs"];
    for dtype in [DType::F64, DType::F32] {
        let tol = tol(dtype);
        let scores = tensor(&f["penalty_inputs"]["token_level_scores"], dtype);
        let old = tensor(&inp["old_log_probs"], dtype);
        let reference = tensor(&inp["ref_log_probs"], dtype);
        let mask = tensor(&inp["response_mask"], dtype);
        for c in f["penalty_cases"].as_array().unwrap() {
            let est: KlEstimator = c["estimator"].as_str().unwrap().parse().unwrap();
            let mut ctrl: KlController = serde_json::from_value(c["controller"].clone()).unwrap();
            let out = apply_kl_penalty(&scores, &old, &reference, &mask, est, &mut ctrl).unwrap();
            let (want, _) = loss_util::flatten(&c["token_level_rewards"]);
            assert_close(
                &format!("{est} rewards"),
                &values(&out.token_level_rewards),
                &want,
                tol,
            );
            assert_scalar(&format!("{est} critic/kl"), out.kl, num(&c["kl"]), tol);
            assert_eq!(out.kl_coef, num(&c["kl_coef"]));
            assert_scalar(
                &format!("{est} β after"),
                ctrl.kl_coef(),
                num(&c["kl_coef_after"]),
                tol,
            );
        }
    }
}

#[test]
fn entropy_and_log_probs_from_logits_match_torch() {
    let f = fixture();
    let e = &f["entropy"];
    let lpc = &f["log_probs_from_logits"];
    let (labels, shape) = loss_util::flatten(&lpc["labels"]);
    let labels = candle_core::Tensor::from_vec(
        labels.iter().map(|&x| x as u32).collect::<Vec<_>>(),
        shape,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for dtype in [DType::F64, DType::F32] {
        let tol = tol(dtype);
        let w = tensor(&e["weights"], dtype);
        let lg = Var::from_tensor(&tensor(&e["logits"], dtype)).unwrap();
        let ent = entropy_from_logits(lg.as_tensor()).unwrap();
        let (want, _) = loss_util::flatten(&e["entropy"]);
        assert_close("entropy", &values(&ent), &want, tol);
        let grads = ent.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gw, _) = loss_util::flatten(&e["grad_logits"]);
        assert_close(
            "entropy grad",
            &values(grads.get(lg.as_tensor()).unwrap()),
            &gw,
            tol,
        );

        let lg = Var::from_tensor(&tensor(&e["logits"], dtype)).unwrap();
        let lp = log_probs_from_logits(lg.as_tensor(), &labels).unwrap();
        let (want, _) = loss_util::flatten(&lpc["log_probs"]);
        assert_close("log_probs", &values(&lp), &want, tol);
        let grads = lp.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gw, _) = loss_util::flatten(&lpc["grad_logits"]);
        assert_close(
            "log_probs grad",
            &values(grads.get(lg.as_tensor()).unwrap()),
            &gw,
            tol,
        );
    }
}

#[test]
fn value_loss_values_metrics_and_gradients_match_numpy() {
    use qoq_rl::loss::{ValueLossInputs, compute_value_loss};
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/value_loss.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut clipped = 0;
    for dtype in [DType::F64, DType::F32] {
        let v = Var::from_tensor(&tensor(&f["vpreds"], dtype)).unwrap();
        let old = tensor(&f["old_values"], dtype);
        let ret = tensor(&f["returns"], dtype);
        let mask = tensor(&f["mask"], dtype);
        for case in f["cases"].as_array().unwrap() {
            let c = num(&case["cliprange_value"]);
            let out = compute_value_loss(
                &ValueLossInputs {
                    vpreds: v.as_tensor(),
                    old_values: &old,
                    returns: &ret,
                    response_mask: &mask,
                },
                c,
            )
            .unwrap();
            let what = format!("{dtype:?} c={c}");
            assert_scalar(&what, out.metrics.vf_loss, num(&case["loss"]), tol(dtype));
            assert_scalar(
                &what,
                out.metrics.vf_clipfrac,
                num(&case["vf_clipfrac"]),
                tol(dtype),
            );
            assert_scalar(
                &what,
                out.metrics.vpred_mean,
                num(&case["vpred_mean"]),
                tol(dtype),
            );
            let g = out.loss.backward().unwrap();
            let got = values(g.get(v.as_tensor()).unwrap());
            let (want, _) = flatten(&case["grad"]);
            assert_close(&what, &got, &want, tol(dtype));
            if out.metrics.vf_clipfrac > 0.0 {
                clipped += 1;
            }
        }
    }
    assert!(clipped > 0, "the fixture exercises value clipping");
}
