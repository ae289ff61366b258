//! Prefill throughput of [`ClinicalVlm`] against HF transformers on CPU, measured in the same run.
//!
//! 0.5B-class config (Qwen2.5-0.5B text dims: hidden 896, 24 layers, 14 heads, 2 KV heads,
//! intermediate 4864, vocab 151936, tied embeddings; a 2-layer vision tower of the 7B's width),
//! random f32 weights, one 512-token prompt holding one 392x392 image (196 image tokens).
//! Prints tokens/s for both and the ratio. `tools/bench/forward_ref.py` is the reference; set
//! `QOQ_BENCH_PYTHON` to choose the interpreter (default `python3`), `QOQ_BENCH_RUNS` for the
//! number of timed runs (default 3). Without Python + torch + transformers the reference is skipped
//! with a notice.
//!
//! Run: `cargo bench -p qoq-model --bench prefill`.
//! `QOQ_BENCH_DEVICE` (`cpu`, `cuda`, `cuda:N`; default `cpu`, parsed by
//! [`qoq_model::parse_device`]; CUDA needs `--features cuda`) moves the qoq side only: the
//! reference stays on the CPU, so its ratio means something on the CPU alone.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use qoq_core::hf_config::QwenVlConfig;
use qoq_model::{ClinicalVlm, ForwardMode, ModelInputs};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const SEQ: usize = 512;
const GRID: [usize; 3] = [1, 28, 28];

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

/// Prompt `[text, <vision_start>, image pads, <vision_end>, text]` and its M-RoPE ids (HF
/// `get_rope_index` rules: text `(p, p, p)`, image `(st, st + h, st + w)` over the merged grid).
fn inputs(cfg: &QwenVlConfig, dev: &Device) -> ModelInputs {
    let (gh, gw) = (GRID[1] / 2, GRID[2] / 2);
    let n_img = gh * gw;
    let text = SEQ - n_img - 2;
    let before = text / 2 + 1; // text plus <vision_start>
    let mut ids: Vec<u32> = (0..before - 1)
        .map(|i| (i * 7919 % 150_000) as u32)
        .collect();
    ids.push(cfg.vision_start_token_id);
    ids.extend(std::iter::repeat_n(cfg.image_token_id, n_img));
    ids.push(cfg.vision_end_token_id);
    ids.extend((0..text - text / 2).map(|i| (i * 104_729 % 150_000) as u32));
    let mut pos = [Vec::new(), Vec::new(), Vec::new()];
    for p in 0..before {
        pos.iter_mut().for_each(|a| a.push(p as i64));
    }
    let st = before as i64;
    for h in 0..gh {
        for w in 0..gw {
            pos[0].push(st);
            pos[1].push(st + h as i64);
            pos[2].push(st + w as i64);
        }
    }
    let next = st + gh.max(gw) as i64;
    for k in 0..(SEQ - before - n_img) {
        pos.iter_mut().for_each(|a| a.push(next + k as i64));
    }
    let flat: Vec<i64> = pos.concat();
    let patches = GRID.iter().product::<usize>();
    let pv: Vec<f32> = (0..patches * 1176)
        .map(|k| ((k as f64) * 0.618034).sin() as f32)
        .collect();
    let mut m = ModelInputs::text(
        Tensor::from_vec(ids, (1, SEQ), dev).expect("ids"),
        None,
        Tensor::from_vec(flat, (3, 1, SEQ), dev).expect("positions"),
    );
    m.pixel_values = Some(Tensor::from_vec(pv, (patches, 1176), dev).expect("pixels"));
    m.image_grid_thw = vec![GRID];
    m
}

/// The reference's tokens/s and its transformers version.
fn reference(runs: usize) -> Option<(f64, String)> {
    let python = std::env::var("QOQ_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench/forward_ref.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--runs", &runs.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "reference skipped: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last()?).ok()?;
    Some((
        v["tokens_per_s"].as_f64()?,
        v["transformers"].as_str().unwrap_or("?").to_string(),
    ))
}

#[allow(unsafe_code)] // qoq_model::threads::pin_thread_count, before any thread exists
fn main() {
    // SAFETY: the first statement of main, before any thread exists.
    unsafe { qoq_model::threads::pin_thread_count() };
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
    // a 0.5B-parameter forward has no place in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("prefill: run with `cargo bench -p qoq-model --bench prefill`");
        return;
    }
    let runs: usize = std::env::var("QOQ_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
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
    let inp = inputs(&cfg, &dev);
    let mut times = Vec::new();
    for i in 0..=runs {
        let t0 = Instant::now();
        // On a compute thread, as `qoq` runs its commands.
        let logits = qoq_model::threads::install(|| model.forward(&inp, ForwardMode::Inference))
            .expect("forward");
        assert_eq!(logits.dims(), &[1, SEQ, 151_936]);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let ours = SEQ as f64 / med;
    println!(
        "qoq-model prefill (512 tokens, 1 image, 0.5B-class, f32, CPU): {med:.3} s, {ours:.1} tokens/s"
    );
    match reference(runs) {
        Some((theirs, version)) => println!(
            "transformers {version} (same config, sdpa): {theirs:.1} tokens/s; ratio ours/theirs = {:.2}",
            ours / theirs
        ),
        None => {
            println!("transformers reference not run (python3 with torch + transformers needed)")
        }
    }
}
