//! Helpers shared by the trainer tests: a tiny random model folder, small manifests of image
//! questions in two datasets, a toy reward a random policy can learn, and a run file for them.
#![allow(dead_code)]

use candle_core::Tensor;
use qoq_core::RewardScore;
use qoq_reward::{RewardFn, RewardInput};
use qoq_rl::config::RunConfig;
use qoq_rl::trainer::Trainer;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A model folder: the processor fixture's files plus random weights for its config.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let src = repo().join("crates/qoq-processor/tests/fixtures/tiny_model");
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let cfg = qoq_core::hf_config::QwenVlConfig::from_file(&src.join("config.json")).unwrap();
    qoq_model::train::write_random_checkpoint(&cfg, &m).unwrap();
    // Deterministic HF-style initialisation (N(0, 0.02) matrices, seed 0).
    for f in ["config.json", "preprocessor_config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    m
}

/// A manifest of `rows` questions on one small image, in two datasets (`derm/alpha/...` and
/// `derm/beta/...`: the dataset is the image path's second segment).
pub fn text_manifest(dir: &Path, rows: usize) -> PathBuf {
    let p = dir.join("train.jsonl");
    let img = repo().join("examples/mini/derm/demo-derm/case_001.png");
    for ds in ["alpha", "beta"] {
        std::fs::create_dir_all(dir.join("derm").join(ds)).unwrap();
        std::fs::copy(&img, dir.join("derm").join(ds).join("case.png")).unwrap();
    }
    let mut s = String::new();
    for i in 0..rows {
        let ds = if i.is_multiple_of(2) { "alpha" } else { "beta" };
        s.push_str(&format!(
            "{{\"problem\": \"<image>Case {i}: is the finding present? Answer with yes or no.\", \
             \"answer\": \"yes\", \"images\": [\"derm/{ds}/case.png\"], \"dataset\": \"{ds}\"}}\n"
        ));
    }
    std::fs::write(&p, s).unwrap();
    p
}

/// Rewards responses whose characters are vowels or spaces (a dense signal a random policy can
/// learn within a few steps).
pub struct Vowels;

impl RewardFn for Vowels {
    fn name(&self) -> &str {
        "vowels"
    }
    fn score(&self, input: &RewardInput<'_>) -> RewardScore {
        let chars: Vec<char> = input.response.chars().collect();
        if chars.is_empty() {
            return RewardScore::total(0.0);
        }
        let good = chars.iter().filter(|c| "aeiou ".contains(**c)).count();
        RewardScore::total(good as f64 / chars.len() as f64)
    }
}

#[allow(clippy::too_many_arguments)]
pub fn config(
    model: &Path,
    manifest: &Path,
    out: &Path,
    batch: usize,
    n: usize,
    resp: usize,
    lr: f64,
    max_steps: u64,
    save_freq: u64,
    kl: bool,
) -> RunConfig {
    let text = format!(
        r#"
[data]
train_files = "{manifest}"
val_files = "{manifest}"
max_prompt_length = 2048
max_response_length = {resp}
rollout_batch_size = {batch}
max_pixels = 12544
min_pixels = 3136

[model]
model_path = "{model}"

[rollout]
n = {n}
temperature = 1.0
top_p = 1.0

[algorithm]
estimator = "grpo"

[algorithm.kl]
disable_kl = {nokl}

[actor]
global_batch_size = {gbs}
micro_batch_size_per_device_for_update = 2
micro_batch_size_per_device_for_experience = 2

[actor.optim]
lr = {lr:e}
weight_decay = 0.0

[trainer]
val_freq = 0
max_steps = {max_steps}
save_freq = {save_freq}
save_limit = -1
n_gpus_per_node = 1
tensorboard = false
out_dir = "{out}"
"#,
        manifest = manifest.display(),
        model = model.display(),
        out = out.display(),
        nokl = !kl,
        gbs = (batch / 2).max(1),
    );
    RunConfig::from_toml_str(&text, "test").unwrap()
}

pub fn weights(t: &Trainer) -> BTreeMap<String, Vec<f32>> {
    let w: HashMap<String, Tensor> = t.weights().unwrap();
    w.into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

pub fn comparable(t: &Trainer) -> Vec<(u64, BTreeMap<String, f64>)> {
    t.records()
        .iter()
        .map(|r| {
            let mut m = r.metrics.clone();
            m.retain(|k, _| !k.starts_with("perf/") && !k.starts_with("timing_s/"));
            (r.step, m)
        })
        .collect()
}

/// A manifest of held-out questions (other case numbers than [`text_manifest`]'s).
pub fn val_manifest(dir: &Path, rows: usize) -> PathBuf {
    let d = dir.join("val");
    std::fs::create_dir_all(&d).unwrap();
    let p = text_manifest(&d, rows + 100);
    let kept: Vec<String> = std::fs::read_to_string(&p)
        .unwrap()
        .lines()
        .skip(100)
        .map(String::from)
        .collect();
    std::fs::write(&p, kept.join("\n") + "\n").unwrap();
    p
}
