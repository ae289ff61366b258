//! The external rollout backend (issue 22): `rollout.backend = "openai"` against a spawned
//! `qoq serve` trains 3 steps whose rollouts (token ids) equal the in-process engine's for the
//! same seeded config, whose old log-probs are the policy's (so the weights equal the engine
//! run's), and after the weight sync the server's greedy answer is the trainer's own: full
//! weights through `/v1/reload_weights`, LoRA adapters through `/v1/load_lora_adapter`.

use base64::Engine as _;
use qoq_engine::{GenerateConfig, GroupRequest, SamplingParams, StopCondition};
use qoq_rl::config::RunConfig;
use qoq_rl::trainer::{SERVER_LOGPROB_DIFF, Trainer};
use serde_json::json;
use std::path::Path;

mod support;

use support::{derm_manifest, post_chat, repo, spawn_serve, tiny_model};

const QUESTION: &str = "What is the diagnosis?Answer with one of the following:\nbenign\nmalignant";
const STEPS: u64 = 3;

fn run_file(dir: &Path, model: &Path, manifest: &Path, extra: &str) -> std::path::PathBuf {
    let p = dir.join("run.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[data]
train_files = "{m}"
val_files = "{m}"
max_prompt_length = 512
max_response_length = 8
rollout_batch_size = 2

[model]
model_path = "{model}"
master_dtype = "f32"
compute_dtype = "f32"
gradient_checkpointing = false

[rollout]
n = 2

[algorithm]
estimator = "grpo"
dynamic_filter = false

[actor]
global_batch_size = 1
micro_batch_size_per_device_for_update = 2
micro_batch_size_per_device_for_experience = 2
ppo_epochs = 2

[actor.optim]
lr = 1e-3

[trainer]
max_steps = {STEPS}
val_freq = 0
n_gpus_per_node = 1
{extra}
"#,
            m = manifest.display(),
            model = model.display(),
        ),
    )
    .unwrap();
    p
}

/// The update batches' response token ids and old log-probs of each step, and the weights.
#[allow(clippy::type_complexity)]
fn train(cfg: RunConfig) -> (Trainer, Vec<(Vec<Vec<u32>>, Vec<Vec<f32>>)>) {
    let mut t = Trainer::new(cfg).unwrap();
    t.set_capture(true);
    let mut steps = Vec::new();
    for _ in 0..STEPS {
        t.step().unwrap();
        let c = t.take_captured().expect("captured");
        let mut ids = Vec::new();
        let mut old = Vec::new();
        for mb in &c.micro_batches {
            ids.extend(mb.labels.to_vec2::<u32>().unwrap());
            old.extend(mb.old_log_probs.to_vec2::<f32>().unwrap());
        }
        steps.push((ids, old));
    }
    (t, steps)
}

/// The trainer's own greedy answer (token ids, log-probs) to row 0's question, in process.
fn engine_greedy(
    model: &qoq_model::ClinicalVlm,
    p: &qoq_processor::processor::Processor,
) -> (Vec<u32>, Vec<f32>) {
    let img = repo().join("examples/mini/derm/demo-derm/case_001.png");
    let case = qoq_processor::Case {
        id: "greedy".into(),
        question: format!("<image>Case 0. {QUESTION}"),
        images: vec![qoq_processor::CaseImage::File(img)],
        ..Default::default()
    };
    let processed = p.process_case(&case).unwrap();
    let batch = p.collate(std::slice::from_ref(&processed), None).unwrap();
    let inputs = qoq_model::prompt_inputs(&batch, model.device()).unwrap();
    let ids = p.tokenizer.ids;
    let cfg = GenerateConfig {
        sampling: SamplingParams {
            temperature: 0.0,
            logit_bias: vec![(ids.image_pad, -100.0)],
            ..SamplingParams::default()
        },
        stop: StopCondition {
            eos: vec![ids.im_end, ids.endoftext],
            max_new_tokens: 8,
        },
        max_batch_rows: 1,
        prefill_tokens: 0,
        kv_budget: None,
    };
    let req = GroupRequest {
        inputs,
        n: 1,
        stream: 0,
    };
    let g = qoq_engine::generate(model, &[req], &cfg, |_, _, _| {})
        .unwrap()
        .remove(0)
        .remove(0);
    (g.tokens, g.logprobs)
}

/// The server's greedy answer to the same question (token ids, log-probs).
fn server_greedy(addr: &str, model: Option<&str>) -> (Vec<u32>, Vec<f32>) {
    let png = std::fs::read(repo().join("examples/mini/derm/demo-derm/case_001.png")).unwrap();
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let mut body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": format!("<image>Case 0. {QUESTION}")},
            {"type": "image_url", "image_url": {"url": uri}}]}],
            "temperature": 0, "max_tokens": 8, "logprobs": true,
            "return_tokens_as_token_ids": true});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let (status, v) = post_chat(addr, &body);
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    content
        .iter()
        .map(|e| {
            let t = e["token"].as_str().unwrap();
            let id = t.strip_prefix("token_id:").unwrap().parse::<u32>().unwrap();
            (id, e["logprob"].as_f64().unwrap() as f32)
        })
        .unzip()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The trained parameters: the LoRA adapters, else every weight.
fn trained(t: &Trainer) -> std::collections::HashMap<String, candle_core::Tensor> {
    t.adapters()
        .unwrap()
        .unwrap_or_else(|| t.weights().unwrap())
}

/// The adapters `/v1/models` lists (with their `parent`).
fn listed_adapters(addr: &str) -> Vec<String> {
    let (status, body) = support::http(addr, "GET", "/v1/models", b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.get("parent").is_some())
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn openai_backend_samples_the_engines_rollouts_and_syncs_weights_to_qoq_serve() {
    check_backend(false);
}

#[test]
fn openai_backend_syncs_lora_adapters_through_load_lora_adapter() {
    check_backend(true);
}

fn check_backend(lora: bool) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = derm_manifest(dir.path(), 4, QUESTION);
    let extra = if lora {
        "[model.lora]\nrank = 4\nalpha = 8.0\n"
    } else {
        ""
    };
    let run = run_file(dir.path(), &model, &manifest, extra);
    let server = spawn_serve(
        &model,
        &["--max-tokens-cap", "64"],
        std::process::Stdio::null(),
    );
    // The untrained model's greedy answer, from the server before any sync.
    let before = server_greedy(&server.addr, None);

    let load = |out: &str, extra: &[String]| {
        let mut o = vec![format!(
            "trainer.out_dir={}",
            dir.path().join(out).display()
        )];
        o.extend_from_slice(extra);
        RunConfig::load(&run, &o).unwrap()
    };
    let (engine, engine_steps) = train(load("engine", &[]));
    let endpoint = format!("http://{}/v1", server.addr);
    let (remote, remote_steps) = train(load(
        "openai",
        &[
            "rollout.backend=openai".into(),
            format!("rollout.endpoint={endpoint}"),
        ],
    ));
    if !lora {
        // qoq serve renders the reference's format prompt or none: a template file of the
        // run's own is refused when the trainer connects, naming the key.
        let tpl = dir.path().join("own.jinja");
        std::fs::write(&tpl, "Say it. {{ content }}").unwrap();
        let err = Trainer::new(load(
            "own-template",
            &[
                "rollout.backend=openai".into(),
                format!("rollout.endpoint={endpoint}"),
                format!("data.format_prompt={}", tpl.display()),
            ],
        ))
        .err()
        .expect("a template file refused with qoq serve")
        .to_string();
        assert!(
            err.contains("data.format_prompt") && err.contains("qoq serve"),
            "{err}"
        );
    }

    for (k, (e, r)) in engine_steps.iter().zip(&remote_steps).enumerate() {
        // The server samples the engine's tokens: same seed, same per-prompt stream.
        assert_eq!(e.0, r.0, "step {}: rollout token ids differ", k + 1);
        // The old log-probs are the policy's in both runs (recomputed: ppo_epochs = 2 for the
        // engine, the external-server rule for the other).
        for (a, b) in e.1.iter().zip(&r.1) {
            assert!(
                max_diff(a, b) <= 1e-6,
                "step {}: old log-probs differ",
                k + 1
            );
        }
    }
    // The server's log-probs were those of the trainer's current weights every step (synced).
    for rec in remote.records() {
        let d = rec.metrics[SERVER_LOGPROB_DIFF];
        assert!(d < 1e-4, "step {}: |server - policy| = {d}", rec.step);
    }
    let (we, wr) = (trained(&engine), trained(&remote));
    assert!(!we.is_empty());
    for (name, a) in &we {
        let b = &wr[name];
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        assert!(d <= 1e-6, "{name}: the runs' weights differ by {d}");
    }

    // A validation pass generates through the server: the last update is synced first; the
    // server then answers greedily with the trainer's weights.
    remote.validate(STEPS).unwrap();
    let adapters = listed_adapters(&server.addr);
    let after = if lora {
        // One adapter served: each sync unloads the one before.
        assert_eq!(adapters.len(), 1, "{adapters:?}");
        server_greedy(&server.addr, Some(&adapters[0]))
    } else {
        assert!(adapters.is_empty(), "{adapters:?}");
        server_greedy(&server.addr, None)
    };
    let ours = engine_greedy(engine.model(), engine.processor());
    assert_eq!(after.0, ours.0, "greedy token ids: server vs trainer");
    assert!(
        max_diff(&after.1, &ours.1) < 1e-4,
        "greedy log-probs: server {:?} vs trainer {:?}",
        after.1,
        ours.1
    );
    // ... and not the untrained model's (the check can fail).
    let n = before.1.len().min(after.1.len());
    assert!(
        before.0 != after.0 || max_diff(&before.1[..n], &after.1[..n]) > 1e-3,
        "the server still answers with the untrained weights: {before:?} vs {after:?}"
    );
    if lora {
        // The base model is still served unchanged beside the adapter (vLLM's semantics).
        assert_eq!(server_greedy(&server.addr, None), before);
    } else {
        assert!(
            dir.path()
                .join("openai/rollout_sync/weights/model.safetensors")
                .is_file(),
            "the full-weight sync writes the exported model"
        );
    }
}

/// Rows with an image and a WFDB ECG: the ECG travels as the `input_ecg` part; the server's
/// processed inputs (its `--dump-inputs`) are the trainer's (token ids, pixels, ECG) and it
/// samples the engine's tokens from them.
#[test]
fn openai_backend_sends_the_rows_ecg_as_the_input_ecg_part() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let img = repo().join("examples/mini/derm/demo-derm/case_001.png");
    let hea = repo().join("examples/mini/ecg/demo-ecg/rec_003.hea");
    let rows: String = (0..4)
        .map(|i| {
            format!(
                "{}\n",
                json!({"problem": format!("<image>Case {i}. {QUESTION}"), "answer": "benign",
                    "images": [img], "time-series": [hea], "data_source": "ecg",
                    "dataset": "demo-ecg"})
            )
        })
        .collect();
    let manifest = dir.path().join("ecg.jsonl");
    std::fs::write(&manifest, rows).unwrap();
    let run = run_file(dir.path(), &model, &manifest, "");
    let dumps = dir.path().join("dumps");
    let server = spawn_serve(
        &model,
        &[
            "--max-tokens-cap".as_ref(),
            "64".as_ref(),
            "--dump-inputs".as_ref(),
            dumps.as_os_str(),
        ],
        std::process::Stdio::null(),
    );
    let load = |out: &str, extra: &[String]| {
        let mut o = vec![
            format!("trainer.out_dir={}", dir.path().join(out).display()),
            "trainer.max_steps=1".to_string(),
        ];
        o.extend_from_slice(extra);
        RunConfig::load(&run, &o).unwrap()
    };
    let one_step = |cfg: RunConfig| {
        let mut t = Trainer::new(cfg).unwrap();
        t.set_capture(true);
        t.step().unwrap();
        let c = t.take_captured().unwrap();
        let ids = c
            .micro_batches
            .iter()
            .flat_map(|mb| mb.labels.to_vec2::<u32>().unwrap())
            .collect::<Vec<_>>();
        (ids, c.prompts)
    };
    let flat = |t: &candle_core::Tensor| -> Vec<f32> {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let engine = one_step(load("engine", &[]));
    let remote = one_step(load(
        "openai",
        &[
            "rollout.backend=openai".into(),
            format!("rollout.endpoint=http://{}/v1", server.addr),
        ],
    ));
    assert_eq!(engine.0, remote.0, "rollout token ids differ");
    // The requests, in prompt order, as the server processed them.
    for (k, p) in remote.1.iter().enumerate() {
        let d = candle_core::safetensors::load(
            dumps.join(format!("request-{k}.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let ecg = flat(p.inputs.time_series_data.as_ref().expect("the ECG input"));
        assert!(
            ecg.iter().any(|&x| x != 0.0),
            "prompt {k}: the ECG is zeros"
        );
        assert_eq!(flat(&d["time_series_data"]), ecg, "prompt {k}: ECG");
        assert_eq!(
            flat(&d["input_ids"]),
            flat(&p.inputs.input_ids),
            "prompt {k}: ids"
        );
        assert_eq!(
            flat(&d["pixel_values"]),
            flat(p.inputs.pixel_values.as_ref().unwrap()),
            "prompt {k}: pixels"
        );
    }
}

#[test]
fn weight_and_adapter_endpoints_refuse_what_they_cannot_serve() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let other = tempfile::tempdir().unwrap();
    let other_model = support::tiny_model_with(other.path(), false);
    let server = spawn_serve(&model, &[] as &[&str], std::process::Stdio::null());
    let post = |body: serde_json::Value| {
        let (status, v) = support::http(
            &server.addr,
            "POST",
            "/v1/reload_weights",
            body.to_string().as_bytes(),
        );
        (status, String::from_utf8_lossy(&v).to_string())
    };
    let (status, body) = post(json!({"model_path": other_model}));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("reload_failed") && body.contains("config.json"),
        "{body}"
    );
    let (status, body) = post(json!({"model_path": dir.path().join("missing")}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(json!({"path": model}));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("model_path"), "{body}");
    // The same folder reloads, and the server still answers.
    let (status, body) = post(json!({"model_path": model}));
    assert_eq!(status, 200, "{body}");
    let admin = |path: &str, body: serde_json::Value| {
        let (status, v) = support::http(&server.addr, "POST", path, body.to_string().as_bytes());
        (status, String::from_utf8_lossy(&v).to_string())
    };
    // vLLM's adapter endpoints: a folder without an adapter, the base model's name, a name
    // already loaded, an unknown name to unload, a request for an unknown model.
    let (status, body) = admin(
        "/v1/load_lora_adapter",
        json!({"lora_name": "a", "lora_path": model}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("adapter_config.json"), "{body}");
    let (status, body) = admin(
        "/v1/load_lora_adapter",
        json!({"lora_name": "qoq-med", "lora_path": model}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = admin("/v1/unload_lora_adapter", json!({"lora_name": "a"}));
    assert_eq!(status, 404, "{body}");
    let (status, v) = post_chat(
        &server.addr,
        &json!({"model": "a", "messages": [{"role": "user", "content": "hello"}]}),
    );
    assert_eq!(status, 404, "{v}");
    let (status, v) = post_chat(
        &server.addr,
        &json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{v}");
}
