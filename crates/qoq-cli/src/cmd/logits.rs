//! `qoq logits`: run [`qoq_model::ClinicalVlm`] on saved inputs and write its logits (spec §5.3,
//! §5.5; reference `Qwen2_5_VLForConditionalGeneration.forward`, transformers 4.51.3).
//!
//! `--inputs` is a safetensors file with `input_ids` (i64 `[b, s]`), optional `attention_mask`
//! (i64 `[b, s]`, 1 = token, 0 = left padding), optional `pixel_values` (f32 `[patches, 1176]`)
//! with `image_grid_thw` (i64 `[images, 3]`), optional `time_series_data` (f32 `[b, 8, 2500]`).
//! M-RoPE position ids are computed as HF's `get_rope_index` does. `--out` receives `logits`
//! (f32 `[b, s, vocab]`).

use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use qoq_model::loading::load_model;
use qoq_model::{ForwardMode, ModelInputs};
use qoq_processor::rope::{RopeIndexConfig, get_rope_index};
use std::collections::HashMap;
use std::path::PathBuf;

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats (default).
    F32,
    /// bfloat16 weights and activations.
    Bf16,
}

/// Arguments of `qoq logits`.
#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// Model directory: config.json plus model.safetensors or a sharded index (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Inputs (safetensors): input_ids, [attention_mask], [pixel_values, image_grid_thw],
    /// [time_series_data].
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors file with `logits` (f32 [b, s, vocab]).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight and activation dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    #[command(flatten)]
    pub device: crate::cmd::DeviceArgs,
}

fn int_rows(t: &Tensor, name: &str) -> anyhow::Result<Vec<Vec<u32>>> {
    let rows = t
        .to_dtype(DType::I64)
        .and_then(|t| t.to_vec2::<i64>())
        .with_context(|| format!("`{name}` must be an integer [b, s] tensor"))?;
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| u32::try_from(v).with_context(|| format!("`{name}` holds {v}")))
                .collect()
        })
        .collect()
}

/// Run the command.
pub fn run(args: LogitsArgs) -> anyhow::Result<std::process::ExitCode> {
    let dev = args.device.open()?;
    let dtype = match args.dtype {
        DtypeArg::F32 => DType::F32,
        DtypeArg::Bf16 => DType::BF16,
    };
    let mut t: HashMap<String, Tensor> = candle_core::safetensors::load(&args.inputs, &dev)
        .with_context(|| format!("reading inputs {}", args.inputs.display()))?;
    let input_ids = t
        .remove("input_ids")
        .with_context(|| format!("{}: no `input_ids` tensor", args.inputs.display()))?;
    let ids = int_rows(&input_ids, "input_ids")?;
    let (b, s) = (ids.len(), ids.first().map_or(0, Vec::len));
    let attention_mask = t.remove("attention_mask");
    let mask_rows = attention_mask
        .as_ref()
        .map(|m| int_rows(m, "attention_mask"))
        .transpose()?;
    let pixel_values = t.remove("pixel_values");
    let grids: Vec<[usize; 3]> = match t.remove("image_grid_thw") {
        Some(g) => g
            .to_dtype(DType::I64)?
            .to_vec2::<i64>()
            .context("`image_grid_thw` must be [images, 3]")?
            .into_iter()
            .map(|r| match r.as_slice() {
                [a, b, c] if *a > 0 && *b > 0 && *c > 0 => {
                    Ok([*a as usize, *b as usize, *c as usize])
                }
                _ => bail!("`image_grid_thw` row {r:?} is not three positive sizes"),
            })
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    if pixel_values.is_some() == grids.is_empty() {
        bail!("`pixel_values` and `image_grid_thw` must be given together");
    }
    let time_series_data = t.remove("time_series_data");
    if let Some(k) = t.keys().next() {
        bail!("{}: unknown input tensor `{k}`", args.inputs.display());
    }

    let (cfg, model) = load_model(&args.model, dtype, &dev)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let rope = get_rope_index(
        &RopeIndexConfig::from_config(&cfg),
        &ids,
        mask_rows.as_deref(),
        &grids,
        &[],
        &[],
    )?;
    let mut pos = Vec::with_capacity(3 * b * s);
    for axis in 0..3 {
        for row in &rope.position_ids {
            pos.extend_from_slice(&row[axis]);
        }
    }
    let position_ids = Tensor::from_vec(pos, (3, b, s), &dev)?;
    let inputs = ModelInputs {
        input_ids,
        attention_mask,
        position_ids,
        pixel_values,
        image_grid_thw: grids,
        pixel_values_videos: None,
        video_grid_thw: Vec::new(),
        time_series_data,
        segments: None,
    };
    let logits = model
        .forward(&inputs, ForwardMode::Inference)?
        .to_dtype(DType::F32)?;
    let out: HashMap<String, Tensor> = HashMap::from([("logits".to_string(), logits)]);
    candle_core::safetensors::save(&out, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(batch = b, seq = s, out = %args.out.display(), "logits written");
    Ok(std::process::ExitCode::SUCCESS)
}
