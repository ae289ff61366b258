//! The HF `config.json` of Qwen2.5-VL and QoQ-Med, and `preprocessor_config.json`.
//!
//! Both layouts are read in the variants transformers writes (spec §5, transformers
//! `configuration_qwen2_5_vl.py`):
//! * flat (transformers <= 4.51, the QoQ-Med checkpoint): the text model's keys at the top level,
//!   `rope_scaling = {"type": "mrope" | "default", "mrope_section": [...]}`, `rope_theta`,
//!   `torch_dtype`;
//! * nested (transformers >= 4.52 and 5): the text model's keys under `text_config`; transformers
//!   5 writes `rope_parameters = {"rope_type": "default", "mrope_section": [...], "rope_theta": ...}`
//!   instead of `rope_scaling` / `rope_theta`, `dtype` instead of `torch_dtype`, `layer_types`
//!   (one attention kind per layer), and `vision_config.rope_parameters` (the vision tower's
//!   RoPE base). `tie_word_embeddings` is the outer key or'ed with `text_config`'s, as
//!   transformers 5 resolves it.
//!
//! Keys that would change the model and that the model does not implement are refused by name:
//! a RoPE type other than `default` / `mrope`, sliding-window attention (`use_sliding_window`,
//! `sliding_attention` in `layer_types`), a vision RoPE base other than 10000.
//!
//! `time_series_token_id` present means a QoQ-Med checkpoint with the ECG path; absent means a
//! stock Qwen2.5-VL checkpoint. The ECG-JEPA encoder's sizes are not in the upstream file (they are
//! hard-coded there); we read them from an optional `time_series_config` object and default to the
//! checkpoint's 768 / 12 / 16.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `rope_scaling` of the text model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Channels (in pairs) given to the temporal, height and width position axes: [16, 24, 24].
    pub mrope_section: Vec<usize>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
}

/// The Qwen2 decoder's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    pub rope_scaling: RopeScaling,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The Qwen2.5-VL vision tower's hyper-parameters (`vision_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    #[serde(default = "default_in_chans")]
    pub in_channels: usize,
    /// Older alias of `in_channels` that HF configs carry beside it; kept for round-trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_chans: Option<usize>,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_merge")]
    pub spatial_merge_size: usize,
    #[serde(default = "default_temporal")]
    pub temporal_patch_size: usize,
    #[serde(default = "default_tps")]
    pub tokens_per_second: f64,
    #[serde(default = "default_window")]
    pub window_size: usize,
    #[serde(default)]
    pub fullatt_block_indexes: Vec<usize>,
    pub out_hidden_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// transformers 5's `{"rope_type": "axial", "rope_theta": 10000.0}`; only the base the vision
    /// tower implements ([`VISION_ROPE_THETA`]) is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<VisionRopeParameters>,
}

/// The vision tower's 2-D RoPE base (fixed in transformers 4, `vision_config.rope_parameters`
/// in transformers 5).
pub const VISION_ROPE_THETA: f64 = 10000.0;

/// `vision_config.rope_parameters` (transformers 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionRopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Length of one flattened patch: `in_channels * temporal_patch * patch * patch` (1176).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// ECG-JEPA encoder sizes (our extension key `time_series_config`; defaults are the QoQ-Med
/// checkpoint's, spec §5.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSeriesConfig {
    #[serde(default = "ts_embed")]
    pub embed_dim: usize,
    #[serde(default = "ts_depth")]
    pub depth: usize,
    #[serde(default = "ts_heads")]
    pub num_heads: usize,
    #[serde(default = "ts_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub qkv_bias: bool,
    /// Number of leads c (8: I, II, V1-V6).
    #[serde(default = "ts_leads")]
    pub leads: usize,
    /// Patches per lead p.
    #[serde(default = "ts_50")]
    pub patches_per_lead: usize,
    /// Samples per patch t.
    #[serde(default = "ts_50")]
    pub patch_size: usize,
    #[serde(default = "ts_ln_eps")]
    pub layer_norm_eps: f64,
}

impl Default for TimeSeriesConfig {
    fn default() -> Self {
        Self {
            embed_dim: ts_embed(),
            depth: ts_depth(),
            num_heads: ts_heads(),
            mlp_ratio: ts_mlp_ratio(),
            qkv_bias: false,
            leads: ts_leads(),
            patches_per_lead: ts_50(),
            patch_size: ts_50(),
            layer_norm_eps: ts_ln_eps(),
        }
    }
}

impl TimeSeriesConfig {
    /// Samples per lead the encoder expects (2500).
    pub fn samples(&self) -> usize {
        self.patches_per_lead * self.patch_size
    }
}

/// A resolved Qwen2.5-VL / QoQ-Med model config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawConfig", into = "RawConfig")]
pub struct QwenVlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub vision_token_id: u32,
    /// `Some` for QoQ-Med checkpoints with the ECG path.
    pub time_series_token_id: Option<u32>,
    pub time_series: TimeSeriesConfig,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Whether the source file used the nested `text_config` layout (kept for round-trips).
    pub nested: bool,
}

impl QwenVlConfig {
    /// Read `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Whether the checkpoint has the QoQ ECG path.
    pub fn has_time_series(&self) -> bool {
        self.time_series_token_id.is_some()
    }

    /// Token ids the model replaces by encoder features: image, video and (with the ECG path)
    /// time-series placeholders.
    pub fn placeholder_token_ids(&self) -> Vec<u32> {
        let mut v = vec![self.image_token_id, self.video_token_id];
        v.extend(self.time_series_token_id);
        v
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RawConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text_config: Option<RawText>,
    #[serde(flatten)]
    flat_text: Option<RawText>,
    vision_config: VisionConfig,
    #[serde(default = "d_image")]
    image_token_id: u32,
    #[serde(default = "d_video")]
    video_token_id: u32,
    #[serde(default = "d_vstart")]
    vision_start_token_id: u32,
    #[serde(default = "d_vend")]
    vision_end_token_id: u32,
    #[serde(default = "d_vpad")]
    vision_token_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time_series_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time_series_config: Option<TimeSeriesConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eos_token_id: Option<u32>,
    #[serde(default = "d_model_type")]
    model_type: String,
}

/// transformers 5's `rope_parameters` (text model): `{"rope_type": "default", "mrope_section":
/// [...], "rope_theta": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mrope_section: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_theta: Option<f64>,
}

/// The text model's keys as any transformers version writes them, at the top level (flat) or
/// under `text_config` (nested); all optional so either layout parses, checked by
/// [`RawText::resolve`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RawText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vocab_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hidden_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_hidden_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_attention_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rms_norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_scaling: Option<RopeScaling>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_parameters: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layer_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    torch_dtype: Option<String>,
    /// transformers 5's name of `torch_dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dtype: Option<String>,
}

/// RoPE types the decoder implements: M-RoPE with the default (unscaled) frequencies.
/// transformers 4 writes `"mrope"` (older files) or `"default"`, transformers 5 `"default"`.
fn check_rope_type(key: &str, kind: Option<&str>) -> std::result::Result<(), String> {
    match kind {
        None | Some("default") | Some("mrope") => Ok(()),
        Some(other) => Err(format!(
            "`{key}` = \"{other}\" is not implemented (the decoder does M-RoPE without frequency \
             scaling: \"default\" or \"mrope\")"
        )),
    }
}

impl RawText {
    /// The decoder's config; `at` is where the keys were read (`""` for the top level,
    /// `"text_config."`) so errors name the key as the file spells it.
    fn resolve(self, at: &str) -> std::result::Result<TextConfig, String> {
        let need =
            |v: Option<usize>, k: &str| v.ok_or_else(|| format!("missing text key `{at}{k}`"));
        let mut section = None;
        let mut scaling = None;
        if let Some(rs) = self.rope_scaling {
            check_rope_type(&format!("{at}rope_scaling.type"), rs.kind.as_deref())?;
            check_rope_type(
                &format!("{at}rope_scaling.rope_type"),
                rs.rope_type.as_deref(),
            )?;
            section = Some(rs.mrope_section.clone());
            scaling = Some(rs);
        }
        let mut theta = self.rope_theta;
        if let Some(rp) = self.rope_parameters {
            check_rope_type(
                &format!("{at}rope_parameters.rope_type"),
                rp.rope_type.as_deref(),
            )?;
            if let Some(s) = rp.mrope_section {
                if section.as_ref().is_some_and(|old| *old != s) {
                    return Err(format!(
                        "`{at}rope_parameters.mrope_section` {s:?} disagrees with \
                         `{at}rope_scaling.mrope_section` {:?}",
                        section.unwrap_or_default()
                    ));
                }
                section = Some(s);
            }
            if let Some(t) = rp.rope_theta {
                if theta.is_some_and(|old| old != t) {
                    return Err(format!(
                        "`{at}rope_parameters.rope_theta` {t} disagrees with `{at}rope_theta` {}",
                        theta.unwrap_or_default()
                    ));
                }
                theta = Some(t);
            }
            if scaling.is_none() {
                scaling = Some(RopeScaling {
                    mrope_section: Vec::new(),
                    kind: None,
                    rope_type: rp.rope_type,
                });
            }
        }
        let mrope_section = section.ok_or_else(|| {
            format!(
                "missing text key `{at}rope_scaling.mrope_section` (transformers 4) or \
                 `{at}rope_parameters.mrope_section` (transformers 5)"
            )
        })?;
        let mut rope_scaling = scaling.expect("set with the section");
        rope_scaling.mrope_section = mrope_section;
        if self.use_sliding_window == Some(true) {
            return Err(format!(
                "`{at}use_sliding_window` = true: sliding-window attention is not implemented"
            ));
        }
        let num_hidden_layers = need(self.num_hidden_layers, "num_hidden_layers")?;
        if let Some(types) = &self.layer_types {
            if types.len() != num_hidden_layers {
                return Err(format!(
                    "`{at}layer_types` has {} entries for {num_hidden_layers} layers",
                    types.len()
                ));
            }
            if let Some((i, t)) = types
                .iter()
                .enumerate()
                .find(|(_, t)| t.as_str() != "full_attention")
            {
                return Err(format!(
                    "`{at}layer_types`[{i}] = \"{t}\": only \"full_attention\" is implemented"
                ));
            }
        }
        Ok(TextConfig {
            vocab_size: need(self.vocab_size, "vocab_size")?,
            hidden_size: need(self.hidden_size, "hidden_size")?,
            intermediate_size: need(self.intermediate_size, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: need(self.num_attention_heads, "num_attention_heads")?,
            num_key_value_heads: need(self.num_key_value_heads, "num_key_value_heads")?,
            rms_norm_eps: self.rms_norm_eps.unwrap_or_else(default_rms_eps),
            rope_theta: theta.unwrap_or_else(default_rope_theta),
            max_position_embeddings: self.max_position_embeddings.unwrap_or_else(default_max_pos),
            rope_scaling,
            hidden_act: self.hidden_act.unwrap_or_else(default_act),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            use_sliding_window: false,
            sliding_window: self.sliding_window,
            torch_dtype: self.torch_dtype.or(self.dtype),
        })
    }

    fn from_text(t: &TextConfig) -> Self {
        RawText {
            vocab_size: Some(t.vocab_size),
            hidden_size: Some(t.hidden_size),
            intermediate_size: Some(t.intermediate_size),
            num_hidden_layers: Some(t.num_hidden_layers),
            num_attention_heads: Some(t.num_attention_heads),
            num_key_value_heads: Some(t.num_key_value_heads),
            rms_norm_eps: Some(t.rms_norm_eps),
            rope_theta: Some(t.rope_theta),
            max_position_embeddings: Some(t.max_position_embeddings),
            rope_scaling: Some(t.rope_scaling.clone()),
            rope_parameters: None,
            hidden_act: Some(t.hidden_act.clone()),
            tie_word_embeddings: Some(t.tie_word_embeddings),
            use_sliding_window: Some(t.use_sliding_window),
            sliding_window: t.sliding_window,
            layer_types: None,
            torch_dtype: t.torch_dtype.clone(),
            dtype: None,
        }
    }
}

impl TryFrom<RawConfig> for QwenVlConfig {
    type Error = String;
    fn try_from(r: RawConfig) -> std::result::Result<Self, String> {
        let nested = r.text_config.is_some();
        let text = match r.text_config {
            Some(t) => {
                let outer = r.flat_text.as_ref();
                let mut text = t.resolve("text_config.")?;
                // transformers 5: the outer key, or'ed with text_config's (pre-v5 saves)
                text.tie_word_embeddings |= outer.and_then(|o| o.tie_word_embeddings) == Some(true);
                if text.torch_dtype.is_none() {
                    text.torch_dtype =
                        outer.and_then(|o| o.torch_dtype.clone().or(o.dtype.clone()));
                }
                text
            }
            None => r
                .flat_text
                .ok_or_else(|| "no text model keys".to_string())?
                .resolve("")?,
        };
        if text.rope_scaling.mrope_section.iter().sum::<usize>() * 2 != text.head_dim() {
            return Err(format!(
                "rope_scaling.mrope_section {:?} must sum to head_dim/2 = {}",
                text.rope_scaling.mrope_section,
                text.head_dim() / 2
            ));
        }
        if text.num_attention_heads % text.num_key_value_heads != 0 {
            return Err("num_attention_heads must be a multiple of num_key_value_heads".into());
        }
        if let Some(t) = r
            .vision_config
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            && t != VISION_ROPE_THETA
        {
            return Err(format!(
                "`vision_config.rope_parameters.rope_theta` = {t}: the vision tower implements \
                 {VISION_ROPE_THETA} only"
            ));
        }
        Ok(QwenVlConfig {
            text,
            vision: r.vision_config,
            image_token_id: r.image_token_id,
            video_token_id: r.video_token_id,
            vision_start_token_id: r.vision_start_token_id,
            vision_end_token_id: r.vision_end_token_id,
            vision_token_id: r.vision_token_id,
            time_series_token_id: r.time_series_token_id,
            time_series: r.time_series_config.unwrap_or_default(),
            bos_token_id: r.bos_token_id,
            eos_token_id: r.eos_token_id,
            nested,
        })
    }
}

impl From<QwenVlConfig> for RawConfig {
    fn from(c: QwenVlConfig) -> Self {
        let (text_config, flat_text) = if c.nested {
            (Some(RawText::from_text(&c.text)), None)
        } else {
            (None, Some(RawText::from_text(&c.text)))
        };
        let ts = c.time_series_token_id.map(|_| c.time_series.clone());
        RawConfig {
            text_config,
            flat_text,
            vision_config: c.vision,
            image_token_id: c.image_token_id,
            video_token_id: c.video_token_id,
            vision_start_token_id: c.vision_start_token_id,
            vision_end_token_id: c.vision_end_token_id,
            vision_token_id: c.vision_token_id,
            time_series_token_id: c.time_series_token_id,
            time_series_config: ts,
            bos_token_id: c.bos_token_id,
            eos_token_id: c.eos_token_id,
            model_type: "qwen2_5_vl".into(),
        }
    }
}

/// `preprocessor_config.json` of the Qwen2-VL image processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessorConfig {
    #[serde(default = "pp_min")]
    pub min_pixels: usize,
    #[serde(default = "pp_max")]
    pub max_pixels: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_temporal")]
    pub temporal_patch_size: usize,
    #[serde(default = "default_merge")]
    pub merge_size: usize,
    #[serde(default = "clip_mean")]
    pub image_mean: [f32; 3],
    #[serde(default = "clip_std")]
    pub image_std: [f32; 3],
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl PreprocessorConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    1_000_000.0
}
fn default_max_pos() -> usize {
    128_000
}
fn default_act() -> String {
    "silu".into()
}
fn default_in_chans() -> usize {
    3
}
fn default_patch() -> usize {
    14
}
fn default_merge() -> usize {
    2
}
fn default_temporal() -> usize {
    2
}
fn default_tps() -> f64 {
    2.0
}
fn default_window() -> usize {
    112
}
fn d_image() -> u32 {
    151655
}
fn d_video() -> u32 {
    151656
}
fn d_vstart() -> u32 {
    151652
}
fn d_vend() -> u32 {
    151653
}
fn d_vpad() -> u32 {
    151654
}
fn d_model_type() -> String {
    "qwen2_5_vl".into()
}
fn ts_embed() -> usize {
    768
}
fn ts_depth() -> usize {
    12
}
fn ts_heads() -> usize {
    16
}
fn ts_mlp_ratio() -> f64 {
    4.0
}
fn ts_leads() -> usize {
    8
}
fn ts_50() -> usize {
    50
}
fn ts_ln_eps() -> f64 {
    1e-5
}
fn pp_min() -> usize {
    3136
}
fn pp_max() -> usize {
    12_845_056
}
fn clip_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn clip_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY_FLAT: &str = r#"{
      "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151680,
      "rope_scaling": {"mrope_section": [2, 3, 3], "type": "default"},
      "time_series_token_id": 151665,
      "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                        "out_hidden_size": 64, "fullatt_block_indexes": [1]},
      "some_unknown_key": true
    }"#;

    #[test]
    fn flat_and_nested_layouts_resolve_to_the_same_config() {
        let flat: QwenVlConfig = serde_json::from_str(TINY_FLAT).unwrap();
        assert!(!flat.nested);
        assert_eq!(flat.text.head_dim(), 16);
        assert_eq!(flat.vision.patch_dim(), 1176);
        assert!(flat.has_time_series());
        let nested_js = r#"{
          "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151680,
             "rope_scaling": {"mrope_section": [2, 3, 3], "type": "default"}},
          "time_series_token_id": 151665,
          "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                            "out_hidden_size": 64, "fullatt_block_indexes": [1]}
        }"#;
        let nested: QwenVlConfig = serde_json::from_str(nested_js).unwrap();
        assert!(nested.nested);
        assert_eq!(nested.text, flat.text);
        assert_eq!(nested.vision, flat.vision);
        // round trip keeps the layout
        let again: QwenVlConfig =
            serde_json::from_str(&serde_json::to_string(&flat).unwrap()).unwrap();
        assert_eq!(again, flat);
        let again: QwenVlConfig =
            serde_json::from_str(&serde_json::to_string(&nested).unwrap()).unwrap();
        assert_eq!(again, nested);
    }

    /// `text_config` as transformers 5.23 `save_pretrained` writes it (tools/fixtures/hf_layouts.py).
    const T5_NESTED: &str = r#"{
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "dtype": "bfloat16",
      "image_token_id": 123, "model_type": "qwen2_5_vl",
      "text_config": {"attention_dropout": 0.0, "bos_token_id": 125, "eos_token_id": 126,
        "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
        "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 1024,
        "max_window_layers": 80, "model_type": "qwen2_5_vl_text", "num_attention_heads": 2,
        "num_hidden_layers": 2, "num_key_value_heads": 1, "pad_token_id": null, "rms_norm_eps": 1e-06,
        "rope_parameters": {"mrope_section": [2, 3, 3], "rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": null, "tie_word_embeddings": false, "use_cache": true,
        "use_sliding_window": false, "vocab_size": 128},
      "tie_word_embeddings": false, "transformers_version": "5.23.0", "video_token_id": 124,
      "vision_config": {"depth": 2, "fullatt_block_indexes": [1], "hidden_act": "silu",
        "hidden_size": 16, "in_channels": 3, "intermediate_size": 32, "model_type": "qwen2_5_vl_vision",
        "num_heads": 2, "out_hidden_size": 32, "patch_size": 14,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112},
      "vision_end_token_id": 121, "vision_start_token_id": 120, "vision_token_id": 122
    }"#;

    /// The same model in transformers 4.51's flat layout.
    const T4_FLAT: &str = r#"{
      "bos_token_id": 125, "eos_token_id": 126, "hidden_act": "silu", "hidden_size": 32,
      "image_token_id": 123, "intermediate_size": 64, "max_position_embeddings": 1024,
      "max_window_layers": 80, "model_type": "qwen2_5_vl", "num_attention_heads": 2,
      "num_hidden_layers": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
      "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
      "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
      "torch_dtype": "bfloat16", "transformers_version": "4.51.3", "use_sliding_window": false,
      "video_token_id": 124, "vocab_size": 128,
      "vision_config": {"depth": 2, "fullatt_block_indexes": [1], "hidden_act": "silu",
        "hidden_size": 16, "in_channels": 3, "intermediate_size": 32, "num_heads": 2,
        "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112},
      "vision_end_token_id": 121, "vision_start_token_id": 120, "vision_token_id": 122
    }"#;

    fn parse(js: &str) -> std::result::Result<QwenVlConfig, String> {
        serde_json::from_str(js).map_err(|e| e.to_string())
    }

    #[test]
    fn transformers_5_nested_layout_with_rope_parameters_reads_like_transformers_4_flat() {
        let t5 = parse(T5_NESTED).unwrap();
        assert!(t5.nested);
        assert_eq!(t5.text.rope_theta, 10000.0);
        assert_eq!(t5.text.rope_scaling.mrope_section, vec![2, 3, 3]);
        assert_eq!(t5.text.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!((t5.text.num_hidden_layers, t5.text.vocab_size), (2, 128));
        assert_eq!(t5.image_token_id, 123);
        let t4 = parse(T4_FLAT).unwrap();
        assert!(!t4.nested);
        // same decoder apart from what each version writes about sliding windows
        let mut a = t5.text.clone();
        a.sliding_window = t4.text.sliding_window;
        a.rope_scaling = t4.text.rope_scaling.clone();
        assert_eq!(a, t4.text);
        assert_eq!(t5.vision.depth, t4.vision.depth);
        assert_eq!(t5.vision.patch_dim(), t4.vision.patch_dim());
        // round trips keep the layout and the values
        let again = parse(&serde_json::to_string(&t5).unwrap()).unwrap();
        assert_eq!(again, t5);
        // the old `"type": "mrope"` spelling is the same
        let old = T4_FLAT.replace(
            r#""rope_type": "default", "type": "default""#,
            r#""type": "mrope""#,
        );
        assert_eq!(
            parse(&old).unwrap().text.rope_scaling.mrope_section,
            vec![2, 3, 3]
        );
    }

    #[test]
    fn tie_word_embeddings_is_the_outer_key_or_text_configs() {
        let outer = T5_NESTED.replacen(
            r#""tie_word_embeddings": false, "transformers_version""#,
            r#""tie_word_embeddings": true, "transformers_version""#,
            1,
        );
        assert!(parse(&outer).unwrap().text.tie_word_embeddings);
        let inner = T5_NESTED.replacen(
            r#""tie_word_embeddings": false, "use_cache""#,
            r#""tie_word_embeddings": true, "use_cache""#,
            1,
        );
        assert!(parse(&inner).unwrap().text.tie_word_embeddings);
        assert!(!parse(T5_NESTED).unwrap().text.tie_word_embeddings);
    }

    #[test]
    fn unimplemented_rope_and_attention_settings_are_refused_by_name() {
        let cases = [
            (
                T5_NESTED.replace(r#""rope_type": "default"}"#, r#""rope_type": "yarn"}"#),
                "text_config.rope_parameters.rope_type",
            ),
            (
                T4_FLAT.replace(r#""type": "default""#, r#""type": "linear""#),
                "rope_scaling.type",
            ),
            (
                T5_NESTED.replace(
                    r#"["full_attention", "full_attention"]"#,
                    r#"["full_attention", "sliding_attention"]"#,
                ),
                "text_config.layer_types`[1]",
            ),
            (
                T5_NESTED.replace(
                    r#"["full_attention", "full_attention"]"#,
                    r#"["full_attention"]"#,
                ),
                "text_config.layer_types",
            ),
            (
                T4_FLAT.replace(
                    r#""use_sliding_window": false"#,
                    r#""use_sliding_window": true"#,
                ),
                "use_sliding_window",
            ),
            (
                T5_NESTED.replace(
                    r#""rope_theta": 10000.0, "rope_type": "axial""#,
                    r#""rope_theta": 500.0"#,
                ),
                "vision_config.rope_parameters.rope_theta",
            ),
            (
                T5_NESTED.replace(
                    r#""mrope_section": [2, 3, 3], "rope_theta""#,
                    r#""rope_theta""#,
                ),
                "text_config.rope_parameters.mrope_section",
            ),
        ];
        for (js, key) in cases {
            let err = parse(&js).unwrap_err();
            assert!(err.contains(key), "expected `{key}` in: {err}");
        }
        // both spellings present must agree
        let both = T4_FLAT.replace(
            r#""rope_theta": 10000.0,"#,
            r#""rope_theta": 10000.0, "rope_parameters": {"rope_theta": 20000.0},"#,
        );
        assert!(parse(&both).unwrap_err().contains("disagrees"));
    }

    #[test]
    fn bad_mrope_section_is_refused() {
        let bad = TINY_FLAT.replace("[2, 3, 3]", "[2, 3, 4]");
        let err = serde_json::from_str::<QwenVlConfig>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mrope_section"), "{err}");
    }

    #[test]
    fn stock_config_has_no_ecg_path() {
        let stock = TINY_FLAT.replace("\"time_series_token_id\": 151665,", "");
        let c: QwenVlConfig = serde_json::from_str(&stock).unwrap();
        assert!(!c.has_time_series());
    }

    #[test]
    fn real_qoq_7b_config_parses_when_shared_data_is_present() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/qoq_med_vl_7b_time_series/config.json");
        if !p.exists() {
            eprintln!("skipping: {} not present", p.display());
            return;
        }
        let c = QwenVlConfig::from_file(&p).unwrap();
        assert_eq!(c.text.hidden_size, 3584);
        assert_eq!(c.text.num_hidden_layers, 28);
        assert_eq!(c.text.num_key_value_heads, 4);
        assert_eq!(c.text.rope_scaling.mrope_section, vec![16, 24, 24]);
        assert_eq!(c.vision.fullatt_block_indexes, vec![7, 15, 23, 31]);
        assert_eq!(c.vision.out_hidden_size, 3584);
        assert_eq!(c.time_series_token_id, Some(151665));
        assert_eq!(c.time_series, TimeSeriesConfig::default());
        let pp =
            PreprocessorConfig::from_file(&p.with_file_name("preprocessor_config.json")).unwrap();
        assert_eq!(pp, PreprocessorConfig::default());
    }
}
