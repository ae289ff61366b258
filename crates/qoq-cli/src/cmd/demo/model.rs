//! The demo's tiny model: a Qwen2.5-VL-architecture config with the ECG-JEPA encoder whose
//! special token ids follow the trained tokenizer, seeded random weights, and model folders
//! exported from a trainer's weights.

use anyhow::Context;
use candle_core::Tensor;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Sizes of the tiny model.
#[derive(Debug, Clone, Copy)]
pub struct ModelSize {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vision_hidden: usize,
    pub vision_depth: usize,
    pub ecg_embed: usize,
    pub ecg_depth: usize,
}

/// `config.json` for a BPE vocabulary of `bpe_vocab` entries: the 23 added tokens follow it in
/// [`qoq_processor::tokenizer::QoqTokenizer`]'s order (`<|endoftext|>` first,
/// `<|time_series_pad|>` last).
pub fn config_json(size: &ModelSize, bpe_vocab: usize) -> serde_json::Value {
    let v = bpe_vocab as u64;
    let head_dim = size.hidden / size.heads;
    // M-RoPE sections over head_dim / 2 frequencies: temporal, height, width (Qwen's 16/24/24
    // proportions).
    let half = head_dim / 2;
    let t = half / 4;
    let h = (half - t) / 2;
    let w = half - t - h;
    json!({
        "architectures": ["TimeSeriesQwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "vocab_size": v + super::tokenizer::ADDED as u64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [t, h, w]},
        "tie_word_embeddings": false,
        "vision_config": {
            "depth": size.vision_depth,
            "hidden_size": size.vision_hidden,
            "intermediate_size": 2 * size.vision_hidden,
            "num_heads": 2,
            "out_hidden_size": size.hidden,
            "fullatt_block_indexes": [size.vision_depth - 1],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112
        },
        "bos_token_id": v,
        "eos_token_id": v + 2,
        "vision_start_token_id": v + 9,
        "vision_end_token_id": v + 10,
        "vision_token_id": v + 11,
        "image_token_id": v + 12,
        "video_token_id": v + 13,
        "time_series_token_id": v + 22,
        "time_series_config": {
            "embed_dim": size.ecg_embed,
            "depth": size.ecg_depth,
            "num_heads": 2
        }
    })
}

/// `preprocessor_config.json`: Qwen2.5-VL's image processor.
pub fn preprocessor_json() -> serde_json::Value {
    json!({
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor"
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes the initial model folder: config, preprocessor config, tokenizer, seeded weights.
pub fn write_initial(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer_json: &str,
    seed: u64,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg_path = dir.join("config.json");
    write_json(&cfg_path, config)?;
    let parsed = qoq_core::hf_config::QwenVlConfig::from_file(&cfg_path)?;
    qoq_model::train::write_random_checkpoint_seeded(&parsed, dir, seed)
        .with_context(|| format!("writing random weights into {}", dir.display()))?;
    // The weights writer saves the parsed config; keep ours (the HF layout with every key).
    write_json(&cfg_path, config)?;
    write_json(&dir.join("preprocessor_config.json"), &preprocessor_json())?;
    let tok = dir.join("tokenizer.json");
    std::fs::write(&tok, tokenizer_json).with_context(|| format!("writing {}", tok.display()))
}

/// Writes a model folder with `weights`, the other files of `like` (config, preprocessor
/// config, tokenizer) and the processor settings it was trained with
/// ([`qoq_processor::SETTINGS_FILE`]).
pub fn export(
    dir: &Path,
    like: &Path,
    weights: &HashMap<String, Tensor>,
    processor: &qoq_processor::ProcessorOptions,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for f in ["config.json", "preprocessor_config.json", "tokenizer.json"] {
        std::fs::copy(like.join(f), dir.join(f)).with_context(|| {
            format!("copying {} into {}", like.join(f).display(), dir.display())
        })?;
    }
    processor.write_to_model_dir(dir)?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(weights, &path)
        .with_context(|| format!("writing {}", path.display()))
}
