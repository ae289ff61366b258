//! The processor (spec §3, §4, §5.1, §5.5): `ClinicalSample` to model-ready arrays, tensor-free.
//! `qoq process`: manifest rows through `qoq_processor::Processor`, collated and written as
//! safetensors (`input_ids`, `attention_mask` [b, s]; `position_ids` [3, b, s]; `rope_deltas`
//! [b, 1]; `pixel_values` [patches, 1176]; `image_grid_thw` [images, 3]; `time_series_data`
//! [b, 8, 2500] for models with the ECG path). Sample ids, prompts and `raw_prompt_ids` go into
//! the file's metadata (`ids`, `raw_prompt_ids`, JSON).

use anyhow::Context;
use clap::Args;
use qoq_data::ecg::EcgConvention;
use qoq_data::manifest::{Manifest, ManifestConfig};
use qoq_processor::{ProcessedBatch, Processor, ProcessorOptions, Truncation};
use rayon::prelude::*;
use safetensors::{Dtype, tensor::TensorView};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// `qoq process` arguments.
#[derive(Debug, Args)]
pub struct ProcessArgs {
    /// Model folder with config.json, preprocessor_config.json and tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// tokenizer.json to use instead of the model folder's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Manifest (JSONL, training schema; paths relative to its folder).
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Plain chat prompt: no QoQ format prompt around the question.
    #[arg(long)]
    pub no_format_prompt: bool,
    /// A format-prompt template file (Jinja, `{{ content }}` is the question) instead of the
    /// embedded QoQ one.
    #[arg(long, conflicts_with = "no_format_prompt")]
    pub format_prompt: Option<PathBuf>,
    /// A chat template file instead of the embedded Qwen2.5-VL + time-series one.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Longest prompt in tokens; longer ones are an error unless --truncate-right.
    #[arg(long, default_value_t = 4000)]
    pub max_prompt_length: usize,
    /// Cut over-long prompts on the right (refused when that would cut image/ECG tokens).
    #[arg(long)]
    pub truncate_right: bool,
    /// Left-pad every row to --max-prompt-length, as the reference does, instead of to the
    /// longest row.
    #[arg(long)]
    pub pad_to_max_length: bool,
    /// Dataset-side min_pixels (spec §4.1).
    #[arg(long, default_value_t = 65_536)]
    pub min_pixels: u64,
    /// Dataset-side max_pixels (spec §4.1).
    #[arg(long, default_value_t = 524_288)]
    pub max_pixels: u64,
    /// ECG convention: `ecg_jepa` (10 s resampled to 2500) or `reference` (500 Hz, first 5 s).
    #[arg(long, default_value = "ecg_jepa")]
    pub ecg_convention: String,
    /// Z-score each ECG lead.
    #[arg(long)]
    pub zscore: bool,
    /// Missing image / ECG files are errors (the reference substitutes white images / zeros).
    #[arg(long)]
    pub strict_files: bool,
    /// Manifest reader options as a JSON object (key names, video_frames, ...).
    #[arg(long)]
    pub config: Option<String>,
}

fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> anyhow::Result<TensorView<'_>> {
    TensorView::new(dtype, shape, data).context("tensor shape does not match its data")
}

fn bytes_i64(v: impl IntoIterator<Item = i64>) -> Vec<u8> {
    v.into_iter().flat_map(i64::to_le_bytes).collect()
}

/// Process every manifest row, collate them into one batch and write it as safetensors.
pub fn run(args: ProcessArgs) -> anyhow::Result<ExitCode> {
    let mcfg: ManifestConfig = match &args.config {
        Some(js) => serde_json::from_str(js).context("--config is not a manifest config object")?,
        None => ManifestConfig::default(),
    };
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let defaults = ProcessorOptions::default();
    let format_prompt = match (&args.format_prompt, args.no_format_prompt) {
        (_, true) => None,
        (Some(p), false) => Some(read(p)?),
        (None, false) => defaults.format_prompt.clone(),
    };
    let chat_template = match &args.chat_template {
        Some(p) => read(p)?,
        None => defaults.chat_template.clone(),
    };
    let ecg_convention: EcgConvention =
        serde_json::from_value(serde_json::Value::String(args.ecg_convention.clone()))
            .context("--ecg-convention must be `ecg_jepa` or `reference`")?;
    let mut opts = ProcessorOptions {
        format_prompt,
        chat_template,
        dataset_min_pixels: args.min_pixels,
        dataset_max_pixels: args.max_pixels,
        max_prompt_length: args.max_prompt_length,
        truncation: if args.truncate_right {
            Truncation::Right
        } else {
            Truncation::Error
        },
        ecg_convention,
        ecg_zscore: args.zscore,
        missing_files_as_placeholders: !args.strict_files,
        ..defaults
    };
    opts.image_load.video_frames = mcfg.video_frames;
    let processor = Processor::from_model_dir(&args.model, args.tokenizer.as_deref(), opts)
        .with_context(|| format!("cannot set up the processor from {}", args.model.display()))?;

    let manifest = Manifest::open(&args.input, mcfg)?;
    let rows: Vec<_> = manifest.rows()?.collect::<Result<_, _>>()?;
    anyhow::ensure!(!rows.is_empty(), "{}: no rows", args.input.display());
    let start = Instant::now();
    let samples: Vec<_> = rows
        .par_iter()
        .map(|s| {
            processor
                .process_sample(s)
                .with_context(|| format!("{}:{}: sample {}", args.input.display(), s.line, s.id))
        })
        .collect::<anyhow::Result<_>>()?;
    let pad_to = args.pad_to_max_length.then_some(args.max_prompt_length);
    let batch = processor.collate(&samples, pad_to)?;
    let secs = start.elapsed().as_secs_f64();

    let (b, s) = (batch.batch_size(), batch.seq_len());
    write_batch(&batch, &args.out)?;
    let images: usize = samples.iter().map(|x| x.image_grid_thw.len()).sum();
    println!(
        "processed {b} rows ({images} images, {} patches, seq len {s}) in {secs:.3} s -> {}",
        batch.pixel_values_shape[0],
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Write a collated batch as safetensors in the `qoq process` layout (see the module docs).
pub fn write_batch(batch: &ProcessedBatch, out: &std::path::Path) -> anyhow::Result<()> {
    let (b, s) = (batch.batch_size(), batch.seq_len());
    let ids = bytes_i64(batch.input_ids.iter().flatten().map(|&v| v as i64));
    let mask = bytes_i64(batch.attention_mask.iter().flatten().map(|&v| v as i64));
    let pos = bytes_i64(batch.position_ids.iter().copied());
    let deltas = bytes_i64(batch.rope_deltas.iter().copied());
    let pixels: Vec<u8> = batch
        .pixel_values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let grids = bytes_i64(batch.image_grid_thw.iter().flatten().map(|&v| v as i64));
    let ts: Vec<u8> = batch
        .time_series_data
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let n_img = batch.image_grid_thw.len();
    let mut tensors = vec![
        ("input_ids", view(Dtype::I64, vec![b, s], &ids)?),
        ("attention_mask", view(Dtype::I64, vec![b, s], &mask)?),
        ("position_ids", view(Dtype::I64, vec![3, b, s], &pos)?),
        ("rope_deltas", view(Dtype::I64, vec![b, 1], &deltas)?),
        (
            "pixel_values",
            view(Dtype::F32, batch.pixel_values_shape.to_vec(), &pixels)?,
        ),
        ("image_grid_thw", view(Dtype::I64, vec![n_img, 3], &grids)?),
    ];
    if !ts.is_empty() {
        tensors.push(("time_series_data", view(Dtype::F32, vec![b, 8, 2500], &ts)?));
    }
    let mut meta = HashMap::new();
    meta.insert("ids".to_string(), serde_json::to_string(&batch.ids)?);
    meta.insert(
        "raw_prompt_ids".to_string(),
        serde_json::to_string(&batch.raw_prompt_ids)?,
    );
    let bytes = safetensors::tensor::serialize(tensors, Some(meta))?;
    std::fs::write(out, bytes).with_context(|| format!("cannot write {}", out.display()))
}
