//! Throughput of the QoQ medical reward against the Python reference on the same inputs.
//!
//! `cargo run --release -p qoq-reward --example bench_reward [-- CASES.jsonl [REPS]]`
//! (default: the parity fixture, REPS = 50). Times single-threaded and rayon-parallel batch
//! scoring in `compat = "reference"` mode (best of 5 passes of REPS x cases), then runs
//! `python3 tools/bench/reward_ref.py` on the same file (best of 5 passes; when python3 with
//! torch is available) and prints the ratios.

use qoq_core::SegMask;
use qoq_reward::{MaskIndex, MedicalConfig, QoqMedicalReward};
use rayon::prelude::*;
use std::time::Instant;

struct Case {
    response: String,
    answer: String,
    mask: Option<MaskIndex>,
    bbox: Option<[f64; 4]>,
}

fn load(path: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("case line");
            let mask = v.get("mask").map(|m| {
                let w = m["width"].as_u64().unwrap_or(0) as usize;
                let h = m["height"].as_u64().unwrap_or(0) as usize;
                let data: Vec<u8> = m["rows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|r| r.as_str().unwrap_or("").bytes().map(|b| (b == b'1') as u8))
                    .collect();
                MaskIndex::new(&SegMask::new(w, h, data).expect("mask size"))
            });
            let bbox = v
                .get("bbox")
                .and_then(|b| serde_json::from_value::<[f64; 4]>(b.clone()).ok());
            Case {
                response: v["response"].as_str().unwrap_or("").to_string(),
                answer: v["answer"].as_str().unwrap_or("").to_string(),
                mask,
                bbox,
            }
        })
        .collect()
}

fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let default = format!(
        "{}/tests/fixtures/reward_cases.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().cloned().unwrap_or(default);
    let reps: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(50);
    let cases = load(&path);
    let reward = QoqMedicalReward::new(MedicalConfig::reference()).expect("config");
    let score = |c: &Case| reward.score_parts(&c.response, &c.answer, c.mask.as_ref(), c.bbox);

    // best of 5 passes, each scoring the cases `reps` times: the pass least disturbed by other
    // load on the machine
    let mut sink = 0.0;
    let mut best_single = f64::INFINITY;
    let mut best_par = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            for c in &cases {
                sink += score(c).overall;
            }
        }
        best_single = best_single.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..reps {
            sink += cases.par_iter().map(|c| score(c).overall).sum::<f64>();
        }
        best_par = best_par.min(t.elapsed().as_secs_f64());
    }
    let single = (cases.len() * reps) as f64 / best_single;
    let parallel = (cases.len() * reps) as f64 / best_par;
    println!("cases file: {path} ({} cases x {reps})", cases.len());
    println!("rust single-threaded: {single:.0} responses/s");
    println!(
        "rust parallel ({} threads): {parallel:.0} responses/s",
        rayon::current_num_threads()
    );

    let py = std::process::Command::new("python3")
        .arg(format!("{root}/tools/bench/reward_ref.py"))
        .arg(&path)
        .output();
    match py {
        Ok(out) if out.status.success() => {
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if let Some(r) = v["responses_per_s"].as_f64() {
                println!("python reference: {r:.0} responses/s");
                println!("ratio single-threaded: {:.1}x", single / r);
                println!("ratio parallel: {:.1}x", parallel / r);
            }
        }
        _ => println!("python reference not run (python3 with torch/numpy needed)"),
    }
    std::hint::black_box(sink);
}
