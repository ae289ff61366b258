//! `qoq infer`: one clinical case end to end — images (PNG/JPEG/DICOM/NIfTI/NRRD), an ECG (WFDB,
//! DICOM waveform, .npy/.npz, CSV) and a question in; the streamed response, then its reasoning,
//! boxes and final answer out; `--overlay` draws the boxes on the image the model saw.
//!
//! The case is built by the library's case builder ([`qoq_processor::Case`]), so the model sees
//! the prompt training built for the equivalent manifest row: an ECG alone gets the placeholder
//! image and the time-series token, a volume one placeholder per sampled frame. The processor
//! settings are the model folder's `qoq_processor.json` (those it was trained with) when it has
//! one, else the defaults.

use anyhow::{Context, bail};
use candle_core::DType;
use clap::Args;
use qoq_engine::{GenerateConfig, GroupRequest, SamplingParams, StopCondition, generate};
use qoq_processor::processor::{Processor, ProcessorOptions};
use qoq_processor::{Case, CaseEcg, CaseImage};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model folder: config.json, weights (HF layout), preprocessor_config.json, tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer file overriding DIR/tokenizer.json.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// An image (PNG, JPEG, BMP, TIFF, WebP, DICOM, NIfTI, NRRD); repeat for several.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A DICOM image (same as --image).
    #[arg(long = "dicom")]
    dicoms: Vec<PathBuf>,
    /// An ECG recording (WFDB .hea, DICOM waveform, .npy/.npz, CSV).
    #[arg(long)]
    ecg: Option<PathBuf>,
    /// The question.
    question: String,
    /// An answer option, appended to the question in the training manifests' wording
    /// ("Answer with one of the following:"); repeat for each.
    #[arg(long = "option")]
    options: Vec<String>,
    /// A system message instead of the chat template's default one.
    #[arg(long)]
    system: Option<String>,
    /// Draw the predicted boxes on the first image and write it here (PNG).
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy; the reference validates at 0.5).
    #[arg(long, default_value_t = 0.5)]
    temperature: f32,
    /// Nucleus mass.
    #[arg(long, default_value_t = 0.99)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Plain chat prompt instead of the QoQ format prompt.
    #[arg(long)]
    no_format_prompt: bool,
    /// Do not stream tokens; print only the summary.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    device: crate::cmd::DeviceArgs,
    /// Write the processed inputs (the `qoq process` safetensors layout) here and exit (for
    /// tests comparing them with the manifest path's).
    #[arg(long, hide = true)]
    dump_inputs: Option<PathBuf>,
}

/// The processor of a model folder with the settings it was trained with (its
/// `qoq_processor.json`, else the defaults); `format_prompt = false` drops the format prompt.
/// Missing input files are errors.
pub fn model_processor(
    dir: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    format_prompt: bool,
) -> anyhow::Result<Processor> {
    let (mut opts, found) = ProcessorOptions::for_model_dir(dir)?;
    if found {
        tracing::info!(
            "processor settings from {}",
            dir.join(qoq_processor::SETTINGS_FILE).display()
        );
    } else {
        tracing::info!(
            "{} has no {}: default processor settings",
            dir.display(),
            qoq_processor::SETTINGS_FILE
        );
    }
    if !format_prompt {
        opts.format_prompt = None;
    }
    opts.missing_files_as_placeholders = false;
    Processor::from_model_dir(dir, tokenizer, opts)
        .with_context(|| format!("loading the processor of {}", dir.display()))
}

pub fn run(a: InferArgs) -> anyhow::Result<ExitCode> {
    let images: Vec<PathBuf> = a.images.iter().chain(&a.dicoms).cloned().collect();
    for p in images.iter().chain(&a.ecg) {
        if !p.exists() {
            bail!("{}: no such file", p.display());
        }
    }
    let processor = model_processor(&a.model, a.tokenizer.as_deref(), !a.no_format_prompt)?;
    let cfg = qoq_model::loading::read_config(&a.model)
        .with_context(|| format!("reading the config of {}", a.model.display()))?;
    if a.ecg.is_some() && !cfg.has_time_series() {
        bail!(
            "{} is a stock Qwen2.5-VL checkpoint without the ECG path (no time_series_token_id); --ecg needs a QoQ-Med checkpoint",
            a.model.display()
        );
    }
    let case = Case {
        id: "infer".into(),
        question: a.question.clone(),
        options: a.options.clone(),
        system: a.system.clone(),
        images: images.iter().cloned().map(CaseImage::File).collect(),
        ecg: a.ecg.clone().map(CaseEcg::File),
        ..Case::default()
    };
    let processed = processor
        .process_case(&case)
        .context("processing the case")?;
    let batch = processor.collate(std::slice::from_ref(&processed), None)?;
    if let Some(path) = &a.dump_inputs {
        crate::cmd::process::write_batch(&batch, path)?;
        return Ok(ExitCode::SUCCESS);
    }
    let dev = a.device.open()?;
    let (cfg, model) = qoq_model::loading::load_model(&a.model, DType::F32, &dev)
        .with_context(|| format!("loading the model in {}", a.model.display()))?;
    let inputs = qoq_model::prompt_inputs(&batch, &dev)?;
    tracing::info!(
        prompt_tokens = batch.seq_len(),
        images = processed.image_grid_thw.len(),
        "prefill"
    );
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        logit_bias: vec![(cfg.image_token_id, -100.0)],
        ..SamplingParams::default()
    };
    let ids = processor.tokenizer.ids;
    let gen_cfg = GenerateConfig {
        sampling,
        stop: StopCondition {
            eos: vec![ids.im_end, ids.endoftext],
            max_new_tokens: a.max_new_tokens,
        },
        max_batch_rows: 1,
        prefill_tokens: 0,
        kv_budget: None,
    };
    let mut tokens: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout().lock();
    let out = generate(
        &model,
        &[GroupRequest {
            inputs,
            n: 1,
            stream: 0,
        }],
        &gen_cfg,
        |_, _, t| {
            tokens.push(t);
            if a.quiet {
                return;
            }
            // Print the newly decodable text; hold back an incomplete UTF-8 sequence.
            if let Ok(text) = processor.tokenizer.decode(&tokens, true)
                && text.len() > printed
                && !text.ends_with('\u{FFFD}')
                && text.is_char_boundary(printed)
            {
                let _ = stdout.write_all(&text.as_bytes()[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        },
    )?;
    let g = &out[0][0];
    let text = processor.tokenizer.decode(&g.tokens, true)?;
    if !a.quiet {
        let _ = stdout.write_all(text.get(printed..).unwrap_or("").as_bytes());
        let _ = writeln!(stdout);
    }
    let boxes = qoq_eval::run::boxes_of(&text);
    let answer = qoq_reward::extract_boxed(&text);
    writeln!(
        stdout,
        "\n=== reasoning ===\n{}",
        qoq_eval::run::reasoning_of(&text)
    )?;
    let size = processed.image_sizes.first().copied();
    match size {
        Some((w, h)) => writeln!(
            stdout,
            "=== boxes ({} in the {w}x{h} image the model saw) ===",
            boxes.len()
        )?,
        None => writeln!(stdout, "=== boxes ({}) ===", boxes.len())?,
    }
    for b in &boxes {
        writeln!(stdout, "[{}, {}, {}, {}]", b[0], b[1], b[2], b[3])?;
    }
    writeln!(
        stdout,
        "=== answer ===\n{}",
        answer.as_deref().unwrap_or("(no \\boxed{} answer)")
    )?;
    writeln!(
        stdout,
        "=== {} tokens, finished by {:?} ===",
        g.tokens.len(),
        g.finish
    )?;
    if let Some(path) = &a.overlay {
        let sample = case.to_sample(processor.opts.image_load.video_frames)?;
        let imgs = processor
            .load_sample_images(&sample)
            .context("reloading the image for the overlay")?;
        let mut img = imgs
            .into_iter()
            .next()
            .context("--overlay needs an image")?;
        draw_boxes(&mut img, &boxes);
        img.save(path)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("overlay written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Red 2-pixel outlines of `[x1, y1, x2, y2]` boxes (inclusive pixels, clipped to the image).
pub fn draw_boxes(img: &mut image::RgbImage, boxes: &[[f64; 4]]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    if w == 0 || h == 0 {
        return;
    }
    let red = image::Rgb([230u8, 30, 30]);
    for b in boxes {
        let c = |v: f64, hi: i64| (v as i64).clamp(0, hi - 1);
        let (mut x1, mut y1, mut x2, mut y2) = (c(b[0], w), c(b[1], h), c(b[2], w), c(b[3], h));
        if x1 > x2 {
            std::mem::swap(&mut x1, &mut x2);
        }
        if y1 > y2 {
            std::mem::swap(&mut y1, &mut y2);
        }
        for t in 0..2 {
            for x in x1..=x2 {
                for y in [(y1 + t).min(h - 1), (y2 - t).max(0)] {
                    img.put_pixel(x as u32, y as u32, red);
                }
            }
            for y in y1..=y2 {
                for x in [(x1 + t).min(w - 1), (x2 - t).max(0)] {
                    img.put_pixel(x as u32, y as u32, red);
                }
            }
        }
    }
}
