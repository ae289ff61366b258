//! `qoq train` with `[model.lora]` and bf16 compute over f32 masters: the checkpoints hold the
//! adapters in PEFT's layout, and the end of the run exports the merged model and the adapter.

use std::process::Command;

mod support;

use support::{derm_manifest, tiny_model};

#[test]
fn a_lora_run_exports_the_merged_model_and_the_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = derm_manifest(
        dir.path(),
        4,
        "What is the diagnosis?Answer with one of the following:\nbenign\nmalignant",
    );
    let out = dir.path().join("run");
    let run_toml = dir.path().join("run.toml");
    std::fs::write(
        &run_toml,
        format!(
            r#"
[data]
train_files = "{m}"
val_files = "{m}"
max_prompt_length = 512
max_response_length = 6
rollout_batch_size = 2
max_pixels = 12544
min_pixels = 3136

[model]
model_path = "{model}"
master_dtype = "f32"
compute_dtype = "bf16"

[model.lora]
rank = 4
alpha = 8
dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]

[rollout]
n = 2

[actor]
global_batch_size = 1
micro_batch_size_per_device_for_update = 2
micro_batch_size_per_device_for_experience = 2

[actor.optim]
lr = 1e-3

[trainer]
max_steps = 2
save_freq = 1
val_freq = 0
n_gpus_per_node = 1
out_dir = "{out}"
"#,
            m = manifest.display(),
            model = model.display(),
            out = out.display(),
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(["train", "--no-plot", "--config"])
        .arg(&run_toml)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("LoRA adapter (PEFT layout) exported"),
        "{stderr}"
    );
    for step in [1, 2] {
        let ck = out.join(format!("checkpoint_step_{step}"));
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "adapter_config.json",
            "adapter_model.safetensors",
        ] {
            assert!(ck.join(f).is_file(), "{}: {f}", ck.display());
        }
    }
    let export = out.join("export");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(export.join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(export.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let dev = candle_core::Device::Cpu;
    let adapter =
        candle_core::safetensors::load(export.join("adapter/adapter_model.safetensors"), &dev)
            .unwrap();
    // Two layers × four attention projections × (A, B), under PEFT's names, in f32.
    assert_eq!(adapter.len(), 2 * 4 * 2);
    assert!(
        adapter
            .keys()
            .all(|k| k.starts_with("base_model.model.model.layers."))
    );
    assert!(
        adapter
            .values()
            .all(|t| t.dtype() == candle_core::DType::F32)
    );
    // The export's merged weights are the last checkpoint's.
    let a = candle_core::safetensors::load(export.join("model.safetensors"), &dev).unwrap();
    let b = candle_core::safetensors::load(out.join("checkpoint_step_2/model.safetensors"), &dev)
        .unwrap();
    assert_eq!(a.len(), b.len());
    let k = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(
        a[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}
