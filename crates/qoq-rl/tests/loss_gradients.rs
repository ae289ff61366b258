//! Gradient checks (central finite differences in f64 against candle's backward) and edge cases
//! of the policy loss (spec §10).

mod loss_util;

use candle_core::{DType, Device, Tensor, Var};
use loss_util::{assert_close, fixture, tensor, values};
use qoq_rl::loss::{
    ActorLossInputs, KlEstimator, KlTerm, LossAggMode, LossConfig, LossError, PolicyLossConfig,
    PolicyLossInputs, agg_loss, compute_actor_loss, compute_kl, compute_policy_loss,
    entropy_from_logits, full_kl_from_logits, kl_penalized_rewards, log_probs_from_logits,
};

/// Finite-difference step and the agreement required (absolute, scaled by max(1, |g|)).
const H: f64 = 1e-6;
const FD_TOL: f64 = 1e-6;

/// Central differences of the scalar `f` at `x` (f64), element by element.
fn finite_diff(x: &Tensor, f: &dyn Fn(&Tensor) -> f64) -> Vec<f64> {
    let base = values(x);
    let shape = x.dims().to_vec();
    (0..base.len())
        .map(|i| {
            let mut plus = base.clone();
            plus[i] += H;
            let mut minus = base.clone();
            minus[i] -= H;
            let tp = Tensor::from_vec(plus, shape.as_slice(), &Device::Cpu).unwrap();
            let tm = Tensor::from_vec(minus, shape.as_slice(), &Device::Cpu).unwrap();
            (f(&tp) - f(&tm)) / (2.0 * H)
        })
        .collect()
}

/// Backward gradient of the scalar tensor `f(x)` w.r.t. `x`.
fn backward_grad(x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) -> Vec<f64> {
    let v = Var::from_tensor(x).unwrap();
    let y = f(v.as_tensor());
    let grads = y.backward().unwrap();
    values(grads.get(v.as_tensor()).expect("gradient recorded"))
}

fn check_fd(what: &str, x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) {
    let analytic = backward_grad(x, f);
    let numeric = finite_diff(x, &|t| values(&f(t))[0]);
    assert!(
        analytic.iter().any(|g| *g != 0.0),
        "{what}: gradient is not all zero"
    );
    assert_close(what, &analytic, &numeric, FD_TOL);
}

struct Inputs {
    old: Tensor,
    lp: Tensor,
    adv: Tensor,
    mask: Tensor,
    reference: Tensor,
}

fn inputs() -> Inputs {
    let f = fixture();
    let p = &f["policy_inputs"];
    Inputs {
        old: tensor(&p["old_log_probs"], DType::F64),
        lp: tensor(&p["log_probs"], DType::F64),
        adv: tensor(&p["advantages_tok"], DType::F64),
        mask: tensor(&p["response_mask"], DType::F64),
        reference: tensor(&p["ref_log_probs"], DType::F64),
    }
}

#[test]
fn policy_loss_gradient_matches_finite_differences_for_every_aggregation() {
    let inp = inputs();
    for mode in LossAggMode::ALL {
        let cfg = PolicyLossConfig {
            loss_agg_mode: mode,
            ..PolicyLossConfig::default()
        };
        let f = |lp: &Tensor| {
            compute_policy_loss(
                &PolicyLossInputs {
                    old_log_probs: &inp.old,
                    log_probs: lp,
                    advantages: &inp.adv,
                    response_mask: &inp.mask,
                },
                &cfg,
            )
            .unwrap()
            .loss
        };
        check_fd(&format!("policy {mode}"), &inp.lp, &f);
    }
}

#[test]
fn actor_loss_gradient_matches_finite_differences_for_every_estimator() {
    let inp = inputs();
    for est in [
        KlEstimator::Kl,
        KlEstimator::Abs,
        KlEstimator::Mse,
        KlEstimator::LowVarKl,
    ] {
        let mut cfg = LossConfig::default();
        cfg.kl.kl_penalty = est;
        cfg.kl.kl_coef = 0.3;
        let f = |lp: &Tensor| {
            compute_actor_loss(
                &ActorLossInputs {
                    policy: PolicyLossInputs {
                        old_log_probs: &inp.old,
                        log_probs: lp,
                        advantages: &inp.adv,
                        response_mask: &inp.mask,
                    },
                    kl: Some(KlTerm::RefLogProbs(&inp.reference)),
                },
                &cfg,
            )
            .unwrap()
            .loss
        };
        check_fd(&format!("actor {est}"), &inp.lp, &f);
    }
}

fn logits() -> (Tensor, Tensor) {
    let f = fixture();
    (
        tensor(&f["entropy"]["logits"], DType::F64),
        tensor(&f["entropy"]["weights"], DType::F64),
    )
}

#[test]
fn entropy_gradient_matches_finite_differences() {
    let (x, w) = logits();
    check_fd("entropy", &x, &|l| {
        entropy_from_logits(l)
            .unwrap()
            .mul(&w)
            .unwrap()
            .sum_all()
            .unwrap()
    });
}

#[test]
fn chosen_token_log_prob_gradient_matches_finite_differences() {
    let (x, w) = logits();
    let labels = Tensor::new(&[[0u32, 6, 3], [2, 2, 5]], &Device::Cpu).unwrap();
    check_fd("log_probs_from_logits", &x, &|l| {
        log_probs_from_logits(l, &labels)
            .unwrap()
            .mul(&w)
            .unwrap()
            .sum_all()
            .unwrap()
    });
}

#[test]
fn full_kl_gradient_matches_finite_differences() {
    let f = fixture();
    let x = tensor(&f["full_kl_logits"]["logits"], DType::F64);
    let r = tensor(&f["full_kl_logits"]["ref_logits"], DType::F64);
    let w = tensor(&f["full_kl_logits"]["weights"], DType::F64);
    check_fd("full kl", &x, &|l| {
        full_kl_from_logits(l, &r)
            .unwrap()
            .mul(&w)
            .unwrap()
            .sum_all()
            .unwrap()
    });
}

#[test]
fn full_kl_as_a_loss_term_reaches_the_logits() {
    // Training forward: logits -> chosen-token log-probs and per-token full KL, one graph.
    let f = fixture();
    let x = tensor(&f["full_kl_logits"]["logits"], DType::F64);
    let r = tensor(&f["full_kl_logits"]["ref_logits"], DType::F64);
    let old_rows = &f["policy_inputs"]["old_log_probs"];
    let old = tensor(old_rows, DType::F64)
        .narrow(0, 0, 2)
        .unwrap()
        .narrow(1, 0, 3)
        .unwrap();
    let adv = Tensor::new(&[[0.5f64, 0.5, 0.5], [-1.0, -1.0, -1.0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1.0f64, 1.0, 0.0], [1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[[1u32, 4, 0], [3, 2, 3]], &Device::Cpu).unwrap();
    let mut cfg = LossConfig::default();
    cfg.kl.kl_penalty = KlEstimator::Full;
    cfg.kl.kl_coef = 0.5;
    let f = |l: &Tensor| {
        let lp = log_probs_from_logits(l, &labels).unwrap();
        let kl = full_kl_from_logits(l, &r).unwrap();
        compute_actor_loss(
            &ActorLossInputs {
                policy: PolicyLossInputs {
                    old_log_probs: &old,
                    log_probs: &lp,
                    advantages: &adv,
                    response_mask: &mask,
                },
                kl: Some(KlTerm::PerToken(&kl)),
            },
            &cfg,
        )
        .unwrap()
        .loss
    };
    check_fd("policy + full kl through logits", &x, &f);
}

fn policy_out(
    lp: &Tensor,
    old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    mode: LossAggMode,
) -> (f64, Vec<f64>, qoq_rl::loss::PolicyLossMetrics) {
    let v = Var::from_tensor(lp).unwrap();
    let out = compute_policy_loss(
        &PolicyLossInputs {
            old_log_probs: old,
            log_probs: v.as_tensor(),
            advantages: adv,
            response_mask: mask,
        },
        &PolicyLossConfig {
            loss_agg_mode: mode,
            ..PolicyLossConfig::default()
        },
    )
    .unwrap();
    let g = values(out.loss.backward().unwrap().get(v.as_tensor()).unwrap());
    (values(&out.loss)[0], g, out.metrics)
}

/// All-zero mask: every mode gives a loss of exactly 0 with zero gradients and zero metrics.
/// token-mean is `0 / (0 + 1e-8)` as in the reference; seq-mean-token-sum and -sum-norm are sums
/// of zeros; seq-mean-token-mean divides by `max(Σm, 1)` (the reference's `Σm` alone is 0/0 = NaN).
#[test]
fn all_zero_mask_gives_zero_loss_not_nan() {
    let inp = inputs();
    let zeros = inp.mask.zeros_like().unwrap();
    for dtype in [DType::F64, DType::F32] {
        let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
        for mode in LossAggMode::ALL {
            let (loss, g, m) =
                policy_out(&c(&inp.lp), &c(&inp.old), &c(&inp.adv), &c(&zeros), mode);
            assert_eq!(loss, 0.0, "{mode} {dtype:?}");
            assert!(g.iter().all(|x| *x == 0.0), "{mode}: gradient {g:?}");
            assert_eq!(
                (m.pg_clipfrac_higher, m.pg_clipfrac_lower, m.ppo_kl),
                (0.0, 0.0, 0.0)
            );
            assert_eq!(m.entropy_loss, 0.0);
        }
    }
}

#[test]
fn seq_mean_token_mean_counts_an_empty_row_as_zero() {
    let loss = Tensor::new(&[[1.0f64, 3.0, 5.0], [7.0, 9.0, 11.0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1.0f64, 1.0, 0.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
    let v = agg_loss(&loss, &mask, LossAggMode::SeqMeanTokenMean, None).unwrap();
    assert_eq!(values(&v), vec![(2.0 + 0.0) / 2.0]);
    let v = agg_loss(&loss, &mask, LossAggMode::SeqMeanTokenSumNorm, None).unwrap();
    assert_eq!(values(&v), vec![4.0 / 3.0]);
    let v = agg_loss(&loss, &mask, LossAggMode::SeqMeanTokenSumNorm, Some(4000.0)).unwrap();
    assert_eq!(values(&v), vec![4.0 / 4000.0]);
    let v = agg_loss(&loss, &mask, LossAggMode::TokenMean, None).unwrap();
    assert!((values(&v)[0] - 4.0 / (2.0 + 1e-8)).abs() < 1e-15);
}

/// Huge ratios in f32 (exp overflows past Δ ≈ 88.7): the loss is clamped exactly as the
/// reference clamps it (A > 0: −A·(1+ε_high); A < 0: −A·c_dual; A = 0: 0) and the gradient on
/// those tokens is 0, where the reference's `exp` backward would give 0·inf = NaN.
#[test]
fn huge_ratios_are_clamped_by_the_clips_with_finite_zero_gradient() {
    let dev = Device::Cpu;
    let old = Tensor::new(&[[-1.0f32, -2.0, -3.0, -0.5]], &dev).unwrap();
    let lp = (&old + Tensor::new(&[[100.0f32, 1000.0, 100.0, 0.1]], &dev).unwrap()).unwrap();
    let mask = Tensor::ones((1, 4), DType::F32, &dev).unwrap();
    for (a, want) in [(2.0f64, -2.0 * 1.3), (-2.0, 2.0 * 3.0), (0.0, 0.0)] {
        let adv = Tensor::new(&[[a as f32, a as f32, a as f32, 0.0]], &dev).unwrap();
        let (loss, g, m) = policy_out(&lp, &old, &adv, &mask, LossAggMode::SeqMeanTokenSum);
        assert!(
            loss.is_finite() && g.iter().all(|x| x.is_finite()),
            "A={a}: {loss} {g:?}"
        );
        assert!(
            (loss - 3.0 * want).abs() < 1e-5 * want.abs().max(1.0),
            "A={a}: loss {loss}"
        );
        assert_eq!(&g[..3], &[0.0, 0.0, 0.0], "A={a}");
        let (hi, lo) = (m.pg_clipfrac_higher, m.pg_clipfrac_lower);
        match a {
            a if a > 0.0 => assert_eq!((hi, lo), (0.75, 0.0)),
            a if a < 0.0 => assert_eq!((hi, lo), (0.0, 0.75)),
            _ => assert_eq!((hi, lo), (0.0, 0.0)),
        }
    }
}

#[test]
fn low_var_kl_stays_finite_for_huge_log_ratios() {
    let dev = Device::Cpu;
    let lp = Var::new(&[[-1.0f32, -300.0, -1.0]], &dev).unwrap();
    let reference = Tensor::new(&[[-300.0f32, -1.0, -1.5]], &dev).unwrap();
    let kl = compute_kl(lp.as_tensor(), &reference, KlEstimator::LowVarKl).unwrap();
    let v = values(&kl);
    assert_eq!(&v[..2], &[10.0, 10.0]);
    let x = -0.5f64;
    assert!((v[2] - (x.exp() - x - 1.0)).abs() < 1e-6);
    let g = values(
        kl.sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(lp.as_tensor())
            .unwrap(),
    );
    assert_eq!(&g[..2], &[0.0, 0.0]);
    assert!(
        (g[2] - (1.0 - x.exp())).abs() < 1e-6,
        "d/dlogp (e^x − x − 1) = 1 − e^x"
    );
}

#[test]
fn shape_errors_name_the_argument() {
    let inp = inputs();
    let short = inp.adv.narrow(1, 0, 5).unwrap();
    let err = compute_policy_loss(
        &PolicyLossInputs {
            old_log_probs: &inp.old,
            log_probs: &inp.lp,
            advantages: &short,
            response_mask: &inp.mask,
        },
        &PolicyLossConfig::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LossError::Shape {
                name: "advantages",
                ..
            }
        ),
        "{err}"
    );
    let err = compute_kl(&inp.lp, &short, KlEstimator::Kl).unwrap_err();
    assert!(err.to_string().contains("ref_log_probs"), "{err}");
}

#[test]
fn kl_term_is_used_only_when_configured() {
    let inp = inputs();
    let policy = PolicyLossInputs {
        old_log_probs: &inp.old,
        log_probs: &inp.lp,
        advantages: &inp.adv,
        response_mask: &inp.mask,
    };
    let plain = compute_policy_loss(&policy, &PolicyLossConfig::default()).unwrap();
    let with_ref = ActorLossInputs {
        policy,
        kl: Some(KlTerm::RefLogProbs(&inp.reference)),
    };
    let mut cfg = LossConfig::default();
    cfg.kl.use_kl_loss = false;
    let out = compute_actor_loss(&with_ref, &cfg).unwrap();
    assert_eq!(out.metrics, plain.metrics);
    cfg.kl.use_kl_loss = true;
    cfg.kl.disable_kl = true;
    assert_eq!(
        compute_actor_loss(&with_ref, &cfg).unwrap().metrics.kl_loss,
        None
    );
    cfg.kl.disable_kl = false;
    let out = compute_actor_loss(&with_ref, &cfg).unwrap();
    let kl = out.metrics.kl_loss.unwrap();
    assert!(kl > 0.0);
    assert!((out.metrics.pg_loss - (plain.metrics.pg_loss + 1e-4 * kl)).abs() < 1e-12);
    let names: Vec<&str> = out.metrics.entries().iter().map(|(n, _)| *n).collect();
    assert!(names.contains(&"actor/kl_loss") && names.contains(&"actor/pg_clipfrac_lower"));
    cfg.kl.kl_penalty = KlEstimator::Full;
    assert!(matches!(
        compute_actor_loss(&with_ref, &cfg),
        Err(LossError::InvalidConfig {
            field: "kl_penalty",
            ..
        })
    ));
}

#[test]
fn half_precision_inputs_are_computed_in_f32() {
    let inp = inputs();
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let out = compute_policy_loss(
        &PolicyLossInputs {
            old_log_probs: &bf(&inp.old),
            log_probs: &bf(&inp.lp),
            advantages: &bf(&inp.adv),
            response_mask: &bf(&inp.mask),
        },
        &PolicyLossConfig::default(),
    )
    .unwrap();
    assert_eq!(out.loss.dtype(), DType::F32);
    assert!(out.metrics.pg_loss.is_finite());
}

#[test]
fn full_kl_from_logits_can_be_a_reward_penalty() {
    let f = fixture();
    let x = tensor(&f["full_kl_logits"]["logits"], DType::F64);
    let r = tensor(&f["full_kl_logits"]["ref_logits"], DType::F64);
    let kl = full_kl_from_logits(&x, &r).unwrap(); // (2, 3)
    let scores = Tensor::new(&[[0.0f64, 0.0, 1.0], [0.0, 0.5, 0.0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1.0f64, 1.0, 1.0], [1.0, 1.0, 0.0]], &Device::Cpu).unwrap();
    let rewards = kl_penalized_rewards(&scores, &kl, &mask, 0.1).unwrap();
    let (k, s, m) = (values(&kl), values(&scores), values(&mask));
    let want: Vec<f64> = (0..6).map(|i| s[i] - 0.1 * k[i] * m[i]).collect();
    assert_close("rewards", &values(&rewards), &want, 1e-15);
    assert_eq!(values(&rewards)[5], 0.0, "padding keeps its score");
}
