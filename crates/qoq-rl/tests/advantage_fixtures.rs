//! Parity with the Python references written by tools/fixtures/advantage.py: numpy's
//! RandomState, sklearn's KMeans, multi-step DRPO runs of the released function (port in
//! tools/bench/drpo_ref.py), GRPO / Dr.GRPO / RLOO.

use qoq_rl::advantage::{Drpo, DrpoConfig, Estimator, RolloutReward};
use qoq_rl::kmeans::{self, Points, RandomState};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn mt19937_and_random_state_draws_are_bit_identical_to_numpy() {
    let f = fixture("advantage_rng.json");
    let mut rs = RandomState::new(0);
    for (i, want) in f["seed0_u32"].as_array().unwrap().iter().enumerate() {
        assert_eq!(rs.next_u32() as u64, want.as_u64().unwrap(), "draw {i}");
    }
    let mut rs = RandomState::new(0);
    for want in f64s(&f["seed0_random_sample"]) {
        assert_eq!(rs.random_sample().to_bits(), want.to_bits());
    }
    let mut rs = RandomState::new(1);
    for pair in f["seed1_randint"].as_array().unwrap() {
        let (high, want) = (pair[0].as_u64().unwrap(), pair[1].as_u64().unwrap());
        assert_eq!(rs.randint(high), want, "randint({high})");
    }
    let mut rs = RandomState::new(2);
    let p = f64s(&f["seed2_choice_p"]["p"]);
    for want in f["seed2_choice_p"]["draws"].as_array().unwrap() {
        assert_eq!(rs.choice_p(&p) as u64, want.as_u64().unwrap());
    }
    let mut rs = RandomState::new(3);
    for want in f64s(&f["seed3_uniform"]) {
        assert_eq!(rs.random_sample(), want);
    }
}

#[test]
fn kmeans_matches_sklearn_inertia_labels_and_centres() {
    let f = fixture("advantage_kmeans.json");
    for set in f.as_array().unwrap() {
        let name = set["name"].as_str().unwrap();
        let d = set["d"].as_u64().unwrap() as usize;
        let x = f64s(&set["x"]);
        let p = Points { x: &x, d, w: None };
        for fit in set["fits"].as_array().unwrap() {
            let k = fit["k"].as_u64().unwrap() as usize;
            let got = kmeans::kmeans(&p, k, 0);
            let want_inertia = fit["inertia"].as_f64().unwrap();
            assert!(
                (got.inertia - want_inertia).abs() <= 1e-5 * want_inertia.max(1.0),
                "{name} k={k}: inertia {} vs {want_inertia}",
                got.inertia
            );
            let labels: Vec<usize> = fit["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.labels, labels, "{name} k={k}: labels");
            for (g, w) in got.centers.iter().zip(f64s(&fit["centers"])) {
                assert!((g - w).abs() < 1e-5, "{name} k={k}: centre {g} vs {w}");
            }
        }
    }
}

fn rows_of(v: &Value) -> Vec<RolloutReward> {
    serde_json::from_value(v.clone()).unwrap()
}

fn run_drpo_fixture(cfg: DrpoConfig) {
    let f = fixture("advantage_drpo_runs.json");
    for run in f["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let mut d = Drpo::new(cfg.clone());
        for (s, step) in run["steps"].as_array().unwrap().iter().enumerate() {
            let got = d.step(&rows_of(&step["rollouts"])).unwrap();
            let m = got.metrics.drpo.as_ref().unwrap();
            for dm in &m.domains {
                let want = &step["domains"][&dm.domain];
                assert_eq!(
                    dm.k as u64,
                    want["k"].as_u64().unwrap(),
                    "{name} step {s} domain {}: k (inertias {:?} vs {})",
                    dm.domain,
                    dm.inertias,
                    want["inertias"]
                );
                assert!((dm.mu_d - want["mu_d"].as_f64().unwrap()).abs() < 1e-5);
            }
            for (i, (g, w)) in got
                .advantages
                .iter()
                .zip(f64s(&step["advantages"]))
                .enumerate()
            {
                assert!(
                    (g - w).abs() < 1e-4,
                    "{name} step {s} rollout {i}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn drpo_reference_mode_matches_multi_step_runs_of_the_released_function() {
    run_drpo_fixture(DrpoConfig::reference());
}

#[test]
fn group_estimators_match_numpy() {
    let f = fixture("advantage_group.json");
    let rows = rows_of(&f["rollouts"]);
    for (mut est, key) in [
        (Estimator::grpo(), "grpo"),
        (Estimator::Rloo, "rloo"),
        (Estimator::DrGrpo, "dr_grpo"),
    ] {
        let got = est.step(&rows).unwrap().advantages;
        for (g, w) in got.iter().zip(f64s(&f[key])) {
            assert!((g - w).abs() < 1e-9, "{key}: {g} vs {w}");
        }
    }
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(f64s).collect()
}

fn assert_matrix(got: &[Vec<f64>], want: &Value, what: &str) {
    let want = matrix(want);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        for (t, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() < 1e-9, "{what}[{i}][{t}]: {a} vs {b}");
        }
    }
}

#[test]
fn reinforce_pp_and_gae_match_the_verl_formulas() {
    use qoq_rl::advantage::token;
    let f = fixture("advantage_token.json");
    let (r, v, m) = (
        matrix(&f["rewards"]),
        matrix(&f["values"]),
        matrix(&f["mask"]),
    );
    let (adv, ret) = token::reinforce_plus_plus(&r, &m, f["rpp_gamma"].as_f64().unwrap()).unwrap();
    assert_matrix(&adv, &f["rpp_advantages"], "rpp advantages");
    assert_matrix(&ret, &f["rpp_returns"], "rpp returns");
    let (adv, ret) = token::gae(
        &r,
        &v,
        &m,
        f["gae_gamma"].as_f64().unwrap(),
        f["gae_lambda"].as_f64().unwrap(),
    )
    .unwrap();
    assert_matrix(&adv, &f["gae_advantages"], "gae advantages");
    assert_matrix(&ret, &f["gae_returns"], "gae returns");
}

/// The valid tokens of each row of a padded fixture matrix.
fn rows_by_mask(m: &[Vec<f64>], x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    m.iter()
        .zip(x)
        .map(|(mr, xr)| {
            xr.iter()
                .zip(mr)
                .filter(|(_, k)| **k > 0.0)
                .map(|(v, _)| *v)
                .collect()
        })
        .collect()
}

fn token_rows(n: usize) -> Vec<RolloutReward> {
    (0..n)
        .map(|i| RolloutReward {
            uid: format!("u{i}"),
            domain: "d".into(),
            reward: 0.0,
            kl: None,
        })
        .collect()
}

#[test]
fn reinforce_pp_and_gae_estimators_match_numpy_on_unpadded_rollouts() {
    use qoq_rl::advantage::StepInputs;
    let f = fixture("advantage_token.json");
    let m = matrix(&f["mask"]);
    let extra = StepInputs {
        token_rewards: Some(rows_by_mask(&m, &matrix(&f["rewards"]))),
        values: Some(rows_by_mask(&m, &matrix(&f["values"]))),
        ..StepInputs::default()
    };
    let rows = token_rows(m.len());
    // GAE on unpadded rollouts equals the padded recursion on masked values (the critic's values
    // times the mask, as the trainer and verl's `compute_values` pass them).
    for (mut est, key) in [
        (
            Estimator::ReinforcePlusPlus {
                gamma: f["rpp_gamma"].as_f64().unwrap(),
            },
            "rpp",
        ),
        (
            Estimator::Gae {
                gamma: f["gae_gamma"].as_f64().unwrap(),
                lam: f["gae_lambda"].as_f64().unwrap(),
            },
            "gae_masked",
        ),
    ] {
        let out = est.step_with(&rows, &extra).unwrap();
        let t = out.tokens.expect("token-level output");
        for (got, want) in [
            (&t.advantages, format!("{key}_advantages")),
            (&t.returns, format!("{key}_returns")),
        ] {
            let want = rows_by_mask(&m, &matrix(&f[&want]));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len(), "{key} row {i}: length");
                for (a, b) in g.iter().zip(w) {
                    assert!((a - b).abs() < 1e-9, "{key} row {i}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn remax_matches_numpy_with_per_token_rewards_and_greedy_baselines() {
    use qoq_rl::advantage::StepInputs;
    let f = fixture("advantage_remax.json");
    let token_rewards = matrix(&f["token_rewards"]);
    let rows: Vec<RolloutReward> = f["uids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&token_rewards)
        .map(|(u, tr)| RolloutReward {
            uid: u.as_str().unwrap().into(),
            domain: "d".into(),
            reward: tr.iter().sum(),
            kl: None,
        })
        .collect();
    let extra = StepInputs {
        baselines: Some(f64s(&f["baselines"])),
        ..StepInputs::default()
    };
    let out = Estimator::Remax.step_with(&rows, &extra).unwrap();
    assert!(out.tokens.is_none());
    for (i, (g, w)) in out
        .step
        .advantages
        .iter()
        .zip(f64s(&f["advantages"]))
        .enumerate()
    {
        assert!((g - w).abs() < 1e-12, "row {i}: {g} vs {w}");
    }
}
