//! Generation throughput of qoq-engine against HF transformers `generate` on CPU, in the same run.
//!
//! The 0.5B-class config of qoq-model's prefill bench (Qwen2.5-0.5B text dims, random f32
//! weights), text prompts of `QOQ_BENCH_PROMPT` tokens (default 64), every sequence decoding
//! exactly `QOQ_BENCH_NEW` tokens (default 16; no EOS), temperature 1 and top_p 0.99 as the
//! reference's rollouts. Cases: 1 prompt x 1 rollout, and 16 prompts x 5 rollouts. Reports
//! prefill tokens/s, decode tokens/s, the ratio to `tools/bench/generate_ref.py`, and peak
//! resident memory of this process.
//!
//! Run: `cargo bench -p qoq-engine --bench generate` (`QOQ_BENCH_PYTHON` picks the interpreter).
//! `QOQ_BENCH_DEVICE` (`cpu`, `cuda`, `cuda:N`; default `cpu`, parsed by
//! [`qoq_model::parse_device`]; CUDA needs `--features cuda`) moves the qoq side only: the
//! reference stays on the CPU, so its ratio means something on the CPU alone.

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use qoq_core::hf_config::QwenVlConfig;
use qoq_engine::generate::text_positions;
use qoq_engine::{GenerateConfig, GroupRequest, SamplingParams, StopCondition, generate};
use qoq_model::{ClinicalVlm, ModelInputs};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn config() -> QwenVlConfig {
    serde_json::from_str(
        r#"{
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "tie_word_embeddings": true,
        "vision_config": {"depth": 2, "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "out_hidden_size": 896, "fullatt_block_indexes": [1],
                          "window_size": 112}
    }"#,
    )
    .expect("bench config parses")
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn reference(prompt: usize, new: usize) -> Vec<serde_json::Value> {
    let python = std::env::var("QOQ_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench/generate_ref.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--prompt", &prompt.to_string(), "--new", &new.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Ok(o) => {
            eprintln!(
                "reference skipped: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            Vec::new()
        }
        Err(e) => {
            eprintln!("reference skipped: {e}");
            Vec::new()
        }
    }
}

#[allow(unsafe_code)] // qoq_model::threads::pin_thread_count, before any thread exists
fn main() {
    // SAFETY: the first statement of main, before any thread exists.
    unsafe { qoq_model::threads::pin_thread_count() };
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("generate: run with `cargo bench -p qoq-engine --bench generate`");
        return;
    }
    let prompt = env("QOQ_BENCH_PROMPT", 64);
    let new = env("QOQ_BENCH_NEW", 16).max(2);
    let dev = qoq_model::parse_device(
        &std::env::var("QOQ_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )
    .unwrap_or_else(|e| panic!("QOQ_BENCH_DEVICE: {e}"));
    let cfg = config();
    let vm = VarMap::new();
    ClinicalVlm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).expect("model builds");
    let weights = qoq_model::init::plain_tensors(&vm);
    let model = ClinicalVlm::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev))
        .expect("model builds");
    let sampling = SamplingParams {
        logit_bias: vec![],
        ..SamplingParams::default()
    };
    let theirs = reference(prompt, new);
    for (case, prompts, n) in [("1x1", 1usize, 1usize), ("16x5", 16, 5)] {
        let reqs: Vec<GroupRequest> = (0..prompts)
            .map(|p| {
                let ids: Vec<u32> = (0..prompt)
                    .map(|i| ((p * 7919 + i * 104_729) % 150_000) as u32)
                    .collect();
                let t = Tensor::from_vec(ids, (1, prompt), &dev).expect("ids");
                GroupRequest {
                    inputs: ModelInputs::text(t, None, text_positions(prompt, &dev).expect("pos")),
                    n,
                    stream: p as u64,
                }
            })
            .collect();
        let run = |tokens: usize| {
            let cfg = GenerateConfig {
                sampling: sampling.clone(),
                stop: StopCondition {
                    eos: vec![],
                    max_new_tokens: tokens,
                },
                max_batch_rows: prompts * n,
                prefill_tokens: 0,
                kv_budget: None,
            };
            let t0 = Instant::now();
            // On a compute thread, as `qoq` runs its commands.
            let out = qoq_model::threads::install(|| generate(&model, &reqs, &cfg, |_, _, _| {}))
                .expect("generate");
            assert!(out.iter().flatten().all(|g| g.tokens.len() == tokens));
            t0.elapsed().as_secs_f64()
        };
        run(2); // warm-up
        let t1 = run(1);
        let tn = run(new);
        let rows = prompts * n;
        let prefill = (prompts * prompt) as f64 / t1;
        let decode = (rows * (new - 1)) as f64 / (tn - t1).max(1e-9);
        println!(
            "qoq-engine {case}: prefill {prefill:.1} tokens/s, decode {decode:.1} tokens/s ({rows} rows, {new} new tokens, {tn:.2} s), peak RSS {:.0} MiB",
            peak_rss_mib()
        );
        if let Some(r) = theirs.iter().find(|v| v["case"] == case) {
            let (tp, td) = (
                r["prefill_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                r["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            );
            println!(
                "transformers {case}: prefill {tp:.1} tokens/s, decode {td:.1} tokens/s; ratio ours/theirs: prefill {:.2}, decode {:.2}",
                prefill / tp,
                decode / td
            );
        }
    }
}
