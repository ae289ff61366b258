//! Parity with the reference `compute_metrics_by_data_source` (spec §8.9): the fixture is written
//! by `tools/fixtures/metrics.py` (a port of the reference checked against scikit-learn).

use qoq_eval::{Extraction, MetricsAccumulator, Prediction, compute_metrics};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Fixture {
    tolerance: f64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    predictions: Vec<Prediction>,
    expected: BTreeMap<String, f64>,
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics_cases.json"
    ))
    .expect("fixture (run tools/fixtures/metrics.py)");
    serde_json::from_str(&text).unwrap()
}

fn assert_matches(name: &str, got: &[(String, f64)], expected: &BTreeMap<String, f64>, tol: f64) {
    let got_map: BTreeMap<&str, f64> = got.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(got_map.len(), got.len(), "{name}: duplicate keys");
    for (k, want) in expected {
        let have = got_map
            .get(k.as_str())
            .unwrap_or_else(|| panic!("{name}: missing key {k}"));
        assert!(
            (have - want).abs() <= tol,
            "{name}: {k} = {have}, reference {want}"
        );
    }
    for k in got_map.keys() {
        assert!(expected.contains_key(*k), "{name}: extra key {k}");
    }
}

#[test]
fn every_key_matches_the_reference_port_to_1e_12() {
    let fx = fixture();
    assert!(fx.cases.len() >= 3);
    let mut total = 0;
    for case in &fx.cases {
        let mut acc = MetricsAccumulator::new(Extraction::Evaluation);
        for p in &case.predictions {
            acc.push(p);
        }
        let report = acc.finish();
        assert_matches(&case.name, &report.to_flat(), &case.expected, fx.tolerance);
        total += case.expected.len();
    }
    assert!(total > 150, "fixture too small: {total} keys");
}

#[test]
fn parallel_chunked_accumulation_matches_the_reference_port() {
    let fx = fixture();
    for case in &fx.cases {
        let report = compute_metrics(&case.predictions, Extraction::Evaluation);
        assert_matches(&case.name, &report.to_flat(), &case.expected, fx.tolerance);
    }
}

#[test]
fn split_and_merged_accumulators_match_the_reference_port() {
    let fx = fixture();
    let case = fx.cases.iter().max_by_key(|c| c.predictions.len()).unwrap();
    for split in [
        1,
        17,
        case.predictions.len() / 2,
        case.predictions.len() - 1,
    ] {
        let (a, b) = case.predictions.split_at(split);
        let mut left = MetricsAccumulator::new(Extraction::Evaluation);
        let mut right = MetricsAccumulator::new(Extraction::Evaluation);
        a.iter().for_each(|p| left.push(p));
        b.iter().for_each(|p| right.push(p));
        left.merge(right);
        assert_eq!(left.len(), case.predictions.len() as u64);
        assert_matches(
            &format!("{} split at {split}", case.name),
            &left.finish().to_flat(),
            &case.expected,
            fx.tolerance,
        );
    }
}
