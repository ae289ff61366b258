//! `qoq advantage` end to end: the spec §9.9 golden steps through the CLI, NaN as null,
//! GRPO on the same input, and errors naming the line.

use std::process::Command;

fn qoq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
}

fn step(qs: &[(&str, &str, [f64; 5])]) -> String {
    let rollouts: Vec<serde_json::Value> = qs
        .iter()
        .flat_map(|(u, d, r)| {
            r.iter()
                .map(move |x| serde_json::json!({"uid": u, "domain": d, "reward": x}))
        })
        .collect();
    serde_json::json!({ "rollouts": rollouts }).to_string()
}

fn golden_input() -> String {
    let s1 = step(&[
        ("q1", "A", [0.9, 0.8, 0.85, 0.9, 0.3]),
        ("q2", "A", [0.7, 0.75, 0.2, 0.8, 0.7]),
        ("q3", "A", [0.95, 0.9, 0.9, 0.92, 0.94]),
        ("q4", "A", [0.6, 0.62, 0.61, 0.6, 0.6]),
        ("q5", "B", [0.1, 0.6, 0.12, 0.15, 0.1]),
        ("q6", "B", [0.2, 0.2, 0.2, 0.2, 0.2]),
    ]);
    let s2 = step(&[
        ("q7", "A", [0.5, 0.9, 0.9, 0.5, 0.9]),
        ("q8", "B", [0.3, 0.3, 0.35, 0.3, 0.3]),
    ]);
    format!("{s1}\n{s2}\n")
}

fn run(args: &[&str], input: &str) -> (bool, Vec<serde_json::Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steps.jsonl");
    std::fs::write(&path, input).unwrap();
    let out = qoq()
        .arg("advantage")
        .args(args)
        .arg("--input")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn advantages(v: &serde_json::Value) -> Vec<Option<f64>> {
    v["advantages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64())
        .collect()
}

#[test]
fn drpo_reference_carries_state_across_lines_and_matches_the_goldens() {
    let (ok, lines, err) = run(
        &["--estimator", "drpo", "--compat", "reference", "--n", "5"],
        &golden_input(),
    );
    assert!(ok, "{err}");
    assert_eq!(lines.len(), 2);
    let a1 = advantages(&lines[0]);
    assert_eq!(a1.len(), 30);
    assert!((a1[0].unwrap() - 0.090323).abs() < 1e-5);
    assert!((a1[21].unwrap() - 4.759055).abs() < 1e-5);
    let a2 = advantages(&lines[1]);
    // Only right if the step-1 history carried over (k* = 5 and 3, N_d = 5 and 3).
    assert!((a2[0].unwrap() + 0.175368).abs() < 1e-5);
    assert!((a2[7].unwrap() - 2.667956).abs() < 1e-5);
}

#[test]
fn reference_nan_is_written_as_null_and_default_mode_stays_finite() {
    let input = step(&[("z", "Z", [0.0; 5]), ("a", "A", [0.1, 0.5, 0.2, 0.9, 0.4])]);
    let (ok, lines, err) = run(&["--estimator", "drpo", "--compat", "reference"], &input);
    assert!(ok, "{err}");
    assert!(advantages(&lines[0]).iter().all(|x| x.is_none()));
    let (ok, lines, err) = run(&["--estimator", "drpo", "--metrics"], &input);
    assert!(ok, "{err}");
    assert!(advantages(&lines[0]).iter().all(|x| x.is_some()));
    assert_eq!(lines[0]["metrics"]["drpo"]["zero_factor_guards"], 5);
}

#[test]
fn grpo_rloo_and_dr_grpo_on_the_golden_step() {
    let input = golden_input();
    let (ok, lines, _) = run(&["--estimator", "grpo"], &input);
    assert!(ok);
    // Spec §9.9: GRPO-normalised q1.
    let a = advantages(&lines[0]);
    for (g, w) in a
        .iter()
        .zip([0.588346, 0.196115, 0.392231, 0.588346, -1.765038])
    {
        assert!((g.unwrap() - w).abs() < 1e-5);
    }
    let (ok, lines, _) = run(&["--estimator", "rloo"], &input);
    assert!(ok);
    assert!((advantages(&lines[1])[0].unwrap() - (0.5 - 0.8)).abs() < 1e-9);
    let (ok, lines, _) = run(&["--estimator", "dr_grpo"], &input);
    assert!(ok);
    assert!((advantages(&lines[1])[0].unwrap() - (0.5 - 0.74)).abs() < 1e-9);
}

#[test]
fn a_group_of_the_wrong_size_names_the_line() {
    let (ok, _, err) = run(&["--estimator", "grpo", "--n", "4"], &golden_input());
    assert!(!ok);
    assert!(err.contains("line 1") && err.contains("q1"), "{err}");
}

fn rl_fixture(name: &str) -> serde_json::Value {
    let path = format!(
        "{}/../qoq-rl/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn matrix(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// The valid tokens of each row of a padded matrix.
fn unpad(mask: &[Vec<f64>], x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    mask.iter()
        .zip(x)
        .map(|(m, r)| {
            r.iter()
                .zip(m)
                .filter(|(_, k)| **k > 0.0)
                .map(|(v, _)| *v)
                .collect()
        })
        .collect()
}

#[test]
fn reinforce_pp_and_gae_take_token_rewards_and_values_and_match_numpy() {
    let f = rl_fixture("advantage_token.json");
    let mask = matrix(&f["mask"]);
    let rewards = unpad(&mask, &matrix(&f["rewards"]));
    let values = unpad(&mask, &matrix(&f["values"]));
    let rollouts: Vec<serde_json::Value> = (0..rewards.len())
        .map(|i| serde_json::json!({"uid": format!("u{i}"), "domain": "d", "reward": 0.0}))
        .collect();
    let line =
        serde_json::json!({"rollouts": rollouts, "token_rewards": rewards, "values": values})
            .to_string();
    for (est, key, extra) in [
        (
            "reinforce_plus_plus",
            "rpp",
            vec!["--gamma".to_string(), f["rpp_gamma"].to_string()],
        ),
        (
            // unpadded rollouts: the padded recursion on masked values
            "gae",
            "gae_masked",
            vec![
                "--gamma".to_string(),
                f["gae_gamma"].to_string(),
                "--lam".to_string(),
                f["gae_lambda"].to_string(),
            ],
        ),
    ] {
        let mut args = vec!["--estimator", est];
        args.extend(extra.iter().map(String::as_str));
        let (ok, lines, err) = run(&args, &line);
        assert!(ok, "{est}: {err}");
        for out_key in ["advantages", "returns"] {
            let got = matrix(&lines[0][out_key]);
            let want = unpad(&mask, &matrix(&f[format!("{key}_{out_key}").as_str()]));
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.len(), w.len(), "{est} {out_key}: one value per token");
                for (a, b) in g.iter().zip(w) {
                    assert!((a - b).abs() < 1e-9, "{est} {out_key}: {a} vs {b}");
                }
            }
        }
    }
    // GAE without values, and --lam with another estimator, are refused by name.
    let no_values = serde_json::json!({"rollouts": rollouts, "token_rewards": rewards}).to_string();
    let (ok, _, err) = run(&["--estimator", "gae"], &no_values);
    assert!(!ok && err.contains("values"), "{err}");
    let (ok, _, err) = run(&["--estimator", "grpo", "--lam", "0.9"], &line);
    assert!(!ok && err.contains("--lam"), "{err}");
}

#[test]
fn remax_subtracts_the_greedy_baselines_and_needs_them() {
    let f = rl_fixture("advantage_remax.json");
    let token_rewards = matrix(&f["token_rewards"]);
    let rollouts: Vec<serde_json::Value> = f["uids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&token_rewards)
        .map(|(u, tr)| serde_json::json!({"uid": u, "domain": "d", "reward": tr.iter().sum::<f64>()}))
        .collect();
    let line = serde_json::json!({"rollouts": rollouts, "baselines": f["baselines"]}).to_string();
    let (ok, lines, err) = run(&["--estimator", "remax"], &line);
    assert!(ok, "{err}");
    let want: Vec<f64> = f["advantages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for (g, w) in advantages(&lines[0]).iter().zip(want) {
        assert!((g.unwrap() - w).abs() < 1e-12);
    }
    let (ok, _, err) = run(
        &["--estimator", "remax"],
        &serde_json::json!({ "rollouts": rollouts }).to_string(),
    );
    assert!(
        !ok && err.contains("baselines") && err.contains("line 1"),
        "{err}"
    );
}
