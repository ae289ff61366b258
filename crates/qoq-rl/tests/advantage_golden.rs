//! Spec §9.9: golden DRPO vectors of the released `compute_drpo_outcome_advantage`
//! (sklearn 1.9.1, fresh process), both steps, plus the edge cases.

use qoq_rl::advantage::{Drpo, DrpoConfig, Estimator, RolloutReward};

fn step_rows(qs: &[(&str, &str, [f64; 5])]) -> Vec<RolloutReward> {
    qs.iter()
        .flat_map(|(uid, dom, r)| {
            r.iter().map(move |&x| RolloutReward {
                uid: uid.to_string(),
                domain: dom.to_string(),
                reward: x,
                kl: None,
            })
        })
        .collect()
}

fn step1() -> Vec<RolloutReward> {
    step_rows(&[
        ("q1", "A", [0.9, 0.8, 0.85, 0.9, 0.3]),
        ("q2", "A", [0.7, 0.75, 0.2, 0.8, 0.7]),
        ("q3", "A", [0.95, 0.9, 0.9, 0.92, 0.94]),
        ("q4", "A", [0.6, 0.62, 0.61, 0.6, 0.6]),
        ("q5", "B", [0.1, 0.6, 0.12, 0.15, 0.1]),
        ("q6", "B", [0.2, 0.2, 0.2, 0.2, 0.2]),
    ])
}

fn step2() -> Vec<RolloutReward> {
    step_rows(&[
        ("q7", "A", [0.5, 0.9, 0.9, 0.5, 0.9]),
        ("q8", "B", [0.3, 0.3, 0.35, 0.3, 0.3]),
    ])
}

const STEP1: [[f64; 5]; 6] = [
    [0.090323, 0.030108, 0.060215, 0.090323, -0.270969],
    [0.052447, 0.089910, -0.322177, 0.127372, 0.052447],
    [0.153332, -0.120476, -0.120476, -0.010952, 0.098570],
    [-0.127443, 0.297363, 0.084960, -0.127443, -0.127443],
    [-1.405524, 4.759055, -1.158941, -0.789066, -1.405524],
    [0.0, 0.0, 0.0, 0.0, 0.0],
];
const STEP2: [[f64; 5]; 2] = [
    [-0.175368, 0.116912, 0.116912, -0.175368, 0.116912],
    [-0.666988, -0.666988, 2.667956, -0.666988, -0.666988],
];

fn assert_close(got: &[f64], want: &[[f64; 5]], tol: f64) {
    let want: Vec<f64> = want.iter().flatten().copied().collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= tol, "rollout {i}: got {g}, want {w}");
    }
}

fn check_goldens(cfg: DrpoConfig) {
    let mut d = Drpo::new(cfg);
    let a1 = d.step(&step1()).unwrap();
    assert_close(&a1.advantages, &STEP1, 1e-5);
    let m = a1.metrics.drpo.unwrap();
    let da = m.domains.iter().find(|x| x.domain == "A").unwrap();
    let db = m.domains.iter().find(|x| x.domain == "B").unwrap();
    assert_eq!((da.k, db.k), (4, 2));
    let want_inertia = [0.70375, 0.413333, 0.1225, 0.0];
    for (g, w) in da.inertias.iter().zip(want_inertia) {
        assert!((g - w).abs() < 1e-5, "{:?}", da.inertias);
    }
    assert!((da.mu_d - 0.727).abs() < 1e-6 && (da.t_d - 1.454).abs() < 1e-6);
    assert!((db.mu_d - 0.207).abs() < 1e-6 && (db.t_d - 0.292742).abs() < 1e-6);
    let a2 = d.step(&step2()).unwrap();
    assert_close(&a2.advantages, &STEP2, 1e-5);
    let m = a2.metrics.drpo.unwrap();
    let da = m.domains.iter().find(|x| x.domain == "A").unwrap();
    let db = m.domains.iter().find(|x| x.domain == "B").unwrap();
    assert_eq!((da.k, da.n_d, db.k, db.n_d), (5, 5, 3, 3));
    assert!((da.mu_d - 0.7296).abs() < 1e-6 && (da.t_d - 1.631435).abs() < 1e-6);
    assert!((db.mu_d - 0.241333).abs() < 1e-6 && (db.t_d - 0.418002).abs() < 1e-6);
}

#[test]
fn reference_mode_reproduces_both_golden_steps() {
    check_goldens(DrpoConfig::reference());
}

#[test]
fn summary_engine_matches_the_goldens_while_histories_are_small() {
    check_goldens(DrpoConfig::default());
}

#[test]
fn restored_estimator_continues_identically() {
    let mut a = Estimator::Drpo(Box::new(Drpo::new(DrpoConfig::reference())));
    a.step(&step1()).unwrap();
    let saved = a.save_state().unwrap();
    let mut b = Estimator::load_state(&saved).unwrap();
    let x = a.step(&step2()).unwrap();
    let y = b.step(&step2()).unwrap();
    assert_eq!(x.advantages, y.advantages);
    assert_close(&y.advantages, &STEP2, 1e-5);
}

#[test]
fn edge_cases_of_the_reference_behind_the_nan_flag() {
    let nan_cfg = DrpoConfig {
        reference_nan: true,
        ..DrpoConfig::reference()
    };
    // n = 1 rollout per question: all NaN in the reference.
    let one = step_rows(&[("a", "A", [0.5; 5])])[..1].to_vec();
    let mut two = one.clone();
    two.push(RolloutReward {
        uid: "b".into(),
        ..one[0].clone()
    });
    let r = Drpo::new(nan_cfg.clone()).step(&two).unwrap();
    assert!(
        r.advantages.iter().all(|x| x.is_nan()),
        "{:?}",
        r.advantages
    );
    // A question with all-zero rewards alone in its domain: the whole batch is NaN.
    let mut rows = step1();
    rows.extend(step_rows(&[("z", "Z", [0.0; 5])]));
    let r = Drpo::new(nan_cfg.clone()).step(&rows).unwrap();
    assert!(r.advantages.iter().all(|x| x.is_nan()));
    // All-equal rewards give zeros.
    let r = Drpo::new(nan_cfg)
        .step(&step_rows(&[
            ("a", "A", [0.4; 5]),
            ("b", "A", [0.1, 0.2, 0.3, 0.4, 0.5]),
        ]))
        .unwrap();
    assert!(r.advantages[..5].iter().all(|&x| x == 0.0));
}

#[test]
fn robust_default_never_emits_nan_and_counts_guards() {
    let mut d = Drpo::new(DrpoConfig::default());
    let one = step_rows(&[("a", "A", [0.5; 5])])[..1].to_vec();
    let r = d.step(&one).unwrap();
    assert!(r.advantages.iter().all(|x| x.is_finite()));
    let m = r.metrics.drpo.unwrap();
    assert_eq!(m.singleton_groups, 1);
    assert_eq!(m.batch_std_guards, 1);
    // Zero-mean cluster in a new domain next to normal questions.
    let mut rows = step1();
    rows.extend(step_rows(&[("z", "Z", [0.0; 5])]));
    let r = Drpo::new(DrpoConfig::default()).step(&rows).unwrap();
    assert!(r.advantages.iter().all(|x| x.is_finite()));
    assert!(r.metrics.drpo.as_ref().unwrap().zero_factor_guards >= 5);
    // Negative rewards: no sign flip.
    let rows = step_rows(&[
        ("n1", "N", [-0.9, -0.1, -0.5, -0.5, -0.2]),
        ("n2", "N", [-0.3, -0.2, -0.8, -0.1, -0.6]),
    ]);
    let r = Drpo::new(DrpoConfig::default()).step(&rows).unwrap();
    assert!(r.advantages.iter().all(|x| x.is_finite()));
    assert!(r.advantages[1] > 0.0 && r.advantages[0] < 0.0);
}

#[test]
fn per_step_mode_forgets_the_previous_step() {
    let cfg = DrpoConfig {
        mode: qoq_rl::advantage::drpo::DrpoMode::PerStep,
        ..DrpoConfig::reference()
    };
    let mut d = Drpo::new(cfg.clone());
    d.step(&step1()).unwrap();
    let a = d.step(&step2()).unwrap();
    let b = Drpo::new(cfg).step(&step2()).unwrap();
    assert_eq!(a.advantages, b.advantages);
    assert_eq!(d.domain_questions("A"), Some(1));
}

#[test]
fn unequal_group_sizes_are_an_error_naming_the_group() {
    let mut rows = step1();
    rows.pop();
    let e = Drpo::new(DrpoConfig::default()).step(&rows).unwrap_err();
    assert!(e.to_string().contains("q6"), "{e}");
}

#[test]
fn elbow_rule_unit_cases() {
    use qoq_rl::kmeans::elbow_code;
    assert_eq!(elbow_code(&[10.0, 4.0, 3.5, 3.4], 0.10), 2);
    assert_eq!(elbow_code(&[0.70375, 0.413333, 0.1225, 0.0], 0.10), 4);
    assert_eq!(elbow_code(&[5.0, 3.0], 0.10), 2);
}

#[test]
fn a_step_of_another_width_is_rejected_and_leaves_the_history_untouched() {
    let mut d = Drpo::new(DrpoConfig::reference());
    d.step(&step1()).unwrap();
    let saved = d.save().unwrap();
    let mut rows = step2();
    rows.retain(|r| r.uid == "q8");
    rows.pop();
    let mut mixed = step_rows(&[("q9", "C", [0.1, 0.2, 0.3, 0.4, 0.5])])[..4].to_vec();
    mixed.extend(rows);
    let e = d.step(&mixed).unwrap_err();
    assert!(e.to_string().contains("\"B\""), "{e}");
    assert_eq!(d.save().unwrap(), saved);
    assert_close(&d.step(&step2()).unwrap().advantages, &STEP2, 1e-5);
}
