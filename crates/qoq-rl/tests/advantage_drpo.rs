//! DRPO behaviour beyond the goldens: the bounded-cost engine agrees with the exact one, its
//! state round-trips through a checkpoint, windowed statistics, the paper's switches, and the
//! robust default never emits NaN.

use proptest::prelude::*;
use qoq_rl::advantage::drpo::{ClusterEngine, DrpoMode, KlDamping, MuD};
use qoq_rl::advantage::{Drpo, DrpoConfig, RolloutReward};
use qoq_rl::kmeans::RandomState;

/// Three difficulty levels per domain, rewards level ± 0.05 (unambiguous clusters).
fn synth(rs: &mut RandomState, step: usize, q: usize, domains: usize) -> Vec<RolloutReward> {
    let mut rows = Vec::new();
    for j in 0..q {
        let d = rs.randint(domains as u64);
        let level = [0.15, 0.5, 0.85][rs.randint(3) as usize];
        for _ in 0..5 {
            rows.push(RolloutReward {
                uid: format!("s{step}q{j}"),
                domain: format!("d{d}"),
                reward: level + 0.1 * (rs.random_sample() - 0.5),
                kl: Some(rs.random_sample() * 0.01),
            });
        }
    }
    rows
}

fn small_summary() -> DrpoConfig {
    DrpoConfig {
        summary_exact_below: 40,
        summary_max_cells: 48,
        ..DrpoConfig::default()
    }
}

#[test]
fn summary_engine_agrees_with_the_exact_reference_on_unambiguous_clusters() {
    let mut rs = RandomState::new(3);
    let mut exact = Drpo::new(DrpoConfig::reference());
    let mut fast = Drpo::new(small_summary());
    let mut summarised_steps = 0;
    for step in 0..25 {
        let rows = synth(&mut rs, step, 40, 3);
        let a = exact.step(&rows).unwrap();
        let b = fast.step(&rows).unwrap();
        for (x, y) in a.advantages.iter().zip(&b.advantages) {
            assert!((x - y).abs() < 1e-4, "step {step}: {x} vs {y}");
        }
        let (ma, mb) = (a.metrics.drpo.unwrap(), b.metrics.drpo.unwrap());
        for (da, db) in ma.domains.iter().zip(&mb.domains) {
            assert_eq!((da.k, da.n_d), (db.k, db.n_d), "step {step} {}", da.domain);
        }
        if mb.domains.iter().all(|d| d.n_d > 40) {
            summarised_steps += 1;
        }
    }
    assert!(summarised_steps > 15, "the summary path was exercised");
    assert_eq!(fast.domain_questions("d0"), exact.domain_questions("d0"));
}

#[test]
fn summary_state_round_trips_and_continues_identically() {
    let mut rs = RandomState::new(4);
    let steps: Vec<_> = (0..14).map(|s| synth(&mut rs, s, 30, 2)).collect();
    let mut a = Drpo::new(small_summary());
    for s in &steps[..8] {
        a.step(s).unwrap();
    }
    let mut b = Drpo::load(&a.save().unwrap()).unwrap();
    assert_eq!(b.steps(), 8);
    for s in &steps[8..] {
        assert_eq!(a.step(s).unwrap().advantages, b.step(s).unwrap().advantages);
    }
}

#[test]
fn window_mode_keeps_only_the_last_steps() {
    let cfg = DrpoConfig {
        mode: DrpoMode::Window { steps: 2 },
        engine: ClusterEngine::Exact,
        ..DrpoConfig::default()
    };
    let mut rs = RandomState::new(5);
    let mut d = Drpo::new(cfg);
    for step in 0..4 {
        let rows = synth(&mut rs, step, 10, 1);
        d.step(&rows).unwrap();
    }
    assert_eq!(d.domain_questions("d0"), Some(20));
}

#[test]
fn kl_damping_off_with_zero_kl_and_shrinking_with_kl() {
    let mut rs = RandomState::new(6);
    let mut rows = synth(&mut rs, 0, 12, 2);
    let base = Drpo::new(DrpoConfig::reference()).step(&rows).unwrap();
    let damped_cfg = DrpoConfig {
        kl_damping: KlDamping::Relu,
        ..DrpoConfig::reference()
    };
    let zero: Vec<_> = rows
        .iter()
        .map(|r| RolloutReward {
            kl: Some(0.0),
            ..r.clone()
        })
        .collect();
    let z = Drpo::new(damped_cfg.clone()).step(&zero).unwrap();
    for (x, y) in base.advantages.iter().zip(&z.advantages) {
        assert!((x - y).abs() < 1e-12);
    }
    let damped = Drpo::new(damped_cfg.clone()).step(&rows).unwrap();
    // Damping touches only positive s·kl; after the std division the negative side grows.
    assert!(damped.advantages != base.advantages);
    assert!(damped.advantages.iter().all(|x| x.is_finite()));
    rows[3].kl = None;
    let e = Drpo::new(damped_cfg).step(&rows).unwrap_err();
    assert!(e.to_string().contains("rollout 3"), "{e}");
}

#[test]
fn plain_mean_mu_d_is_the_domain_mean_reward() {
    let cfg = DrpoConfig {
        mu_d: MuD::PlainMean,
        ..DrpoConfig::reference()
    };
    let mut rs = RandomState::new(8);
    let rows = synth(&mut rs, 0, 10, 1);
    let out = Drpo::new(cfg).step(&rows).unwrap();
    let mean = rows.iter().map(|r| r.reward as f32 as f64).sum::<f64>() / rows.len() as f64;
    let mu = out.metrics.drpo.unwrap().domains[0].mu_d;
    assert!((mu - mean).abs() < 1e-6, "{mu} vs {mean}");
}

#[test]
fn the_paper_configuration_runs_and_stays_finite() {
    let mut rs = RandomState::new(9);
    let mut d = Drpo::new(DrpoConfig::paper());
    let mut last = Vec::new();
    for step in 0..3 {
        last = synth(&mut rs, step, 15, 3);
        let out = d.step(&last).unwrap();
        assert!(out.advantages.iter().all(|x| x.is_finite()));
    }
    // Per-step statistics: N_d counts this step's questions only.
    let d0 = last.iter().filter(|r| r.domain == "d0").count() as u64 / 5;
    assert_eq!(d.domain_questions("d0"), Some(d0));
}

fn arb_step() -> impl Strategy<Value = Vec<RolloutReward>> {
    (1usize..5, 1usize..6).prop_flat_map(|(n, q)| {
        prop::collection::vec(
            (
                0u8..3,
                prop::collection::vec(prop_oneof![Just(0.0f64), Just(1.0), -1.0f64..1.0], n),
            ),
            q,
        )
        .prop_map(|qs| {
            qs.into_iter()
                .enumerate()
                .flat_map(|(j, (d, v))| {
                    v.into_iter().map(move |r| RolloutReward {
                        uid: format!("q{j}"),
                        domain: format!("d{d}"),
                        reward: r,
                        kl: None,
                    })
                })
                .collect()
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn robust_default_never_emits_non_finite_values(steps in prop::collection::vec(arb_step(), 1..4)) {
        let mut d = Drpo::new(small_summary());
        let mut width: Option<usize> = None;
        for (s, rows) in steps.iter().enumerate() {
            let rows: Vec<RolloutReward> = rows
                .iter()
                .map(|r| RolloutReward { uid: format!("s{s}{}", r.uid), ..r.clone() })
                .collect();
            let n = rows.iter().filter(|r| r.uid == rows[0].uid).count();
            if width.is_some_and(|w| w != n) {
                // A domain's vector length is fixed; a new width is rejected, not NaN.
                continue;
            }
            match d.step(&rows) {
                Ok(out) => {
                    width = Some(n);
                    prop_assert_eq!(out.advantages.len(), rows.len());
                    prop_assert!(out.advantages.iter().all(|x| x.is_finite()), "{:?}", out.advantages);
                }
                Err(e) => prop_assert!(e.to_string().contains("rollouts"), "{}", e),
            }
        }
    }
}

#[test]
fn summary_engine_memory_stays_bounded_while_the_exact_one_grows() {
    let mut rs = RandomState::new(10);
    let mut fast = Drpo::new(small_summary());
    let mut exact = Drpo::new(DrpoConfig::reference());
    let mut at = Vec::new();
    for step in 0..60 {
        let rows = synth(&mut rs, step, 40, 3);
        fast.step(&rows).unwrap();
        exact.record(&rows).unwrap();
        if step == 29 || step == 59 {
            at.push((fast.stored_items(), exact.stored_items()));
        }
    }
    // 3 domains × at most 48 cells; the exact history holds 2 items per question.
    assert!(at[0].0 <= 3 * 48 && at[1].0 <= 3 * 48, "{at:?}");
    assert_eq!(at[1].1, 2 * 60 * 40);
}
