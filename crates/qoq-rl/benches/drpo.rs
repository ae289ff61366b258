//! DRPO cost as training proceeds (spec §9.6 "Cost of the reference implementation").
//!
//! The synthetic run of tools/bench/drpo_ref.py, reproduced draw for draw with numpy's
//! `RandomState(7)`: 9 domains with the record shares of spec §2.2, 512 questions × 5 rollouts
//! per step, three difficulty levels per domain. Prints a table of per-step times at history
//! sizes 10^3, 10^4, 10^5 (and 10^6 for the bounded engine) for
//! * `summary`: the default bounded-cost engine, timed inside one continuous run
//!   (`DRPO_STEPS`, default 2000 steps; median of the 21 steps centred on the first one whose
//!   history reaches the size),
//! * `exact`: the reference algorithm in Rust (history pre-filled with `Drpo::record`, then one
//!   step timed),
//! * the Python reference (`DRPO_REF_JSON`, written by `drpo_ref.py --out`), when present,
//!   with the ratio and the largest advantage difference on the same step.
//!
//! Run: `cargo bench -p qoq-rl --bench drpo` (`DRPO_STEPS=250` for a quick run).

use qoq_rl::advantage::drpo::ClusterEngine;
use qoq_rl::advantage::{Drpo, DrpoConfig, RolloutReward};
use qoq_rl::kmeans::RandomState;
use std::time::Instant;

const DOMAIN_RECORDS: [f64; 9] = [
    88976.0, 595621.0, 24697.0, 45439.0, 15345.0, 1822374.0, 1241.0, 3517.0, 24014.0,
];
const BASES: [f64; 3] = [0.15, 0.5, 0.85];
const Q: usize = 512;
const N: usize = 5;

fn synth_step(rs: &mut RandomState, step: usize) -> Vec<RolloutReward> {
    let total: f64 = DOMAIN_RECORDS.iter().sum();
    let mut acc = 0.0;
    let cdf: Vec<f64> = DOMAIN_RECORDS
        .iter()
        .map(|r| {
            acc += r / total;
            acc
        })
        .collect();
    let mut rows = Vec::with_capacity(Q * N);
    for j in 0..Q {
        let u = rs.random_sample();
        let d = cdf.iter().position(|&c| u < c).unwrap_or(cdf.len() - 1);
        let t = ((rs.random_sample() * 3.0) as usize).min(2);
        for _ in 0..N {
            let x = BASES[t] + 0.1 * (rs.random_sample() - 0.5);
            rows.push(RolloutReward {
                uid: format!("s{step}q{j}"),
                domain: format!("d{d}"),
                reward: x,
                kl: None,
            });
        }
    }
    rows
}

/// Steps needed before the history holds `size` questions (as drpo_ref.py's `prefill`).
fn prefill_steps(size: usize) -> usize {
    size.div_ceil(Q)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let steps: usize = std::env::var("DRPO_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let sizes = [1_000usize, 10_000, 100_000, 1_000_000];
    let reference: Option<serde_json::Value> = std::env::var("DRPO_REF_JSON")
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok());

    // 1. The bounded engine over one continuous run.
    let mut rs = RandomState::new(7);
    let mut fast = Drpo::new(DrpoConfig::default());
    let mut times = Vec::with_capacity(steps);
    let mut adv_at = std::collections::HashMap::new();
    let wanted: Vec<usize> = sizes.iter().map(|&s| prefill_steps(s)).collect();
    let t_run = Instant::now();
    for step in 0..steps {
        let rows = synth_step(&mut rs, step);
        let t0 = Instant::now();
        let out = fast.step(&rows).expect("step");
        times.push(t0.elapsed().as_secs_f64());
        if wanted.contains(&step) {
            adv_at.insert(step, out.advantages);
        }
    }
    println!(
        "summary engine: {steps} steps in {:.2} s ({} questions of history at the end)",
        t_run.elapsed().as_secs_f64(),
        steps * Q
    );
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    println!(
        "summary engine per step over the run: mean {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        times.iter().sum::<f64>() / times.len() as f64 * 1e3,
        sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)] * 1e3,
        sorted[sorted.len() - 1] * 1e3
    );
    let mut slow: Vec<(f64, usize)> = times.iter().copied().zip(0..).collect();
    slow.sort_by(|a, b| b.0.total_cmp(&a.0));
    let slow: Vec<String> = slow
        .iter()
        .take(5)
        .map(|(t, s)| format!("step {s}: {:.1} ms", t * 1e3))
        .collect();
    println!("slowest steps: {}", slow.join(", "));
    println!(
        "{:>9} {:>6} {:>14} {:>14} {:>14} {:>12} {:>12} {:>12}",
        "history",
        "step",
        "summary ms",
        "exact-rs ms",
        "python ms",
        "py/summary",
        "|Δ| vs exact",
        "|Δ| vs py"
    );
    for (&size, &step) in sizes.iter().zip(&wanted) {
        if step >= steps {
            continue;
        }
        let (lo, hi) = (step.saturating_sub(10), (step + 11).min(steps));
        let summary_ms = median(&mut times[lo..hi].to_vec()) * 1e3;
        let fast_adv = &adv_at[&step];
        // 2. The exact engine on the same history (skipped at 10^6: minutes per step).
        let (exact_ms, d_exact) = if size <= 100_000 {
            let mut rs = RandomState::new(7);
            let mut exact = Drpo::new(DrpoConfig {
                engine: ClusterEngine::Exact,
                ..DrpoConfig::reference()
            });
            for s in 0..step {
                exact.record(&synth_step(&mut rs, s)).expect("record");
            }
            let rows = synth_step(&mut rs, step);
            let t0 = Instant::now();
            let out = exact.step(&rows).expect("step");
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            (
                format!("{ms:.1}"),
                format!("{:.2e}", max_diff(&out.advantages, fast_adv)),
            )
        } else {
            ("-".into(), "-".into())
        };
        let (py_ms, ratio, d_py) = reference
            .as_ref()
            .and_then(|r| {
                r["results"]
                    .as_array()?
                    .iter()
                    .find(|x| x["size"].as_u64() == Some(size as u64))
                    .cloned()
            })
            .map(|x| {
                let ms = x["seconds"].as_f64().unwrap_or(f64::NAN) * 1e3;
                let py: Vec<f64> = x["advantages"]
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect())
                    .unwrap_or_default();
                (
                    format!("{ms:.1}"),
                    format!("{:.0}x", ms / summary_ms),
                    format!("{:.2e}", max_diff(&py, fast_adv)),
                )
            })
            .unwrap_or(("-".into(), "-".into(), "-".into()));
        println!(
            "{:>9} {:>6} {:>14.3} {:>14} {:>14} {:>12} {:>12} {:>12}",
            step * Q,
            step,
            summary_ms,
            exact_ms,
            py_ms,
            ratio,
            d_exact,
            d_py
        );
    }
}
