//! The processor (spec §2.1, §3, §4, §5.1, §5.4): `ClinicalSample` to model-ready arrays, the
//! way the reference's `RLHFDataset.__getitem__` + `TimeSeriesQwen2_5_VLProcessor.__call__` +
//! `collate_fn` do it, and `get_rope_index` over the collated batch.
//!
//! Per sample:
//! 1. images: every `images` path (and the sampled frames of every `videos` path) goes through
//!    the dataset-side resize (`process_image`, NEAREST into `[min, max]` pixels); a missing file
//!    becomes a white 224×224 image that is resized the same way (a missing video: white
//!    224×224 frames, not resized); a row with no image at all gets a white 224×224 placeholder,
//!    not resized (spec §4.1);
//! 2. the prompt: the question's `<image>` placeholders re-counted for the images read (a
//!    multi-frame DICOM or a volume yields several; the reference's rule), format prompt, user
//!    content with one `{"type": "time-series"}` item when the model has the ECG path, the
//!    sample's system message when it has one, chat template (spec §3);
//! 3. `raw_prompt_ids` (one `<|image_pad|>` per image) and `input_ids` (each pad expanded to
//!    `t·h·w / merge²` copies);
//! 4. the ECG: the first series as the (8, 2500) input under the chosen convention, zeros when
//!    the row has none (spec §5.4); none at all for a stock Qwen2.5-VL config.
//!
//! The batch is left-padded with `<|endoftext|>`; position ids come from
//! [`crate::rope::get_rope_index`] over the padded batch (padded positions are 1).

use crate::error::{Error, Result};
use crate::image::ImageProcessor;
use crate::prompt::{DEFAULT_CHAT_TEMPLATE, DEFAULT_FORMAT_PROMPT, PromptBuilder};
use crate::rope::{RopeIndexConfig, get_rope_index};
use crate::tokenizer::QoqTokenizer;
use image::{DynamicImage, RgbImage};
use qoq_core::ClinicalSample;
use qoq_core::hf_config::{PreprocessorConfig, QwenVlConfig};
use qoq_data::ecg::{EcgConvention, MODEL_LEADS, MODEL_SAMPLES};
use qoq_data::ecg_io::EcgLoadOptions;
use qoq_data::vision::ImageLoadOptions;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Number of floats of one ECG input (8 × 2500).
pub const ECG_LEN: usize = MODEL_LEADS.len() * MODEL_SAMPLES;

/// What to do with a prompt longer than `max_prompt_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Refuse it (an error naming the sample).
    #[default]
    Error,
    /// Cut on the right, as the reference's `truncation="right"` does, but only when the cut
    /// part holds no image, video or ECG token; otherwise refuse it.
    Right,
}

/// Options of the processor (the reference's `data` config); the `[processor]` section of a run
/// file (unknown keys are refused; missing keys take the defaults below).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessorOptions {
    /// Source of the format prompt template; `None` gives the plain chat prompt.
    pub format_prompt: Option<String>,
    /// Source of the chat template.
    pub chat_template: String,
    /// Dataset-side `min_pixels` (CLIMB yaml: 65,536).
    pub dataset_min_pixels: u64,
    /// Dataset-side `max_pixels` (CLIMB yaml: 524,288).
    pub dataset_max_pixels: u64,
    /// Longest prompt in tokens (reference 4000).
    pub max_prompt_length: usize,
    /// Over-long prompt policy.
    pub truncation: Truncation,
    /// How an ECG recording becomes 2500 samples.
    pub ecg_convention: EcgConvention,
    /// Per-lead z-score of the ECG input.
    pub ecg_zscore: bool,
    /// Options for ECG formats without metadata.
    pub ecg_load: EcgLoadOptions,
    /// Options for DICOM / volume images (set from the manifest config, not from the file).
    #[serde(skip)]
    pub image_load: ImageLoadOptions,
    /// The reference's handling of missing files: a missing image becomes a white image and a
    /// missing ECG zeros. When false, a missing file is an error.
    pub missing_files_as_placeholders: bool,
}

impl Default for ProcessorOptions {
    fn default() -> Self {
        Self {
            format_prompt: Some(DEFAULT_FORMAT_PROMPT.to_string()),
            chat_template: DEFAULT_CHAT_TEMPLATE.to_string(),
            dataset_min_pixels: 65_536,
            dataset_max_pixels: 524_288,
            max_prompt_length: 4000,
            truncation: Truncation::Error,
            ecg_convention: EcgConvention::default(),
            ecg_zscore: false,
            ecg_load: EcgLoadOptions::default(),
            image_load: ImageLoadOptions::default(),
            missing_files_as_placeholders: true,
        }
    }
}

/// One processed sample.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedSample {
    /// The sample's id.
    pub id: String,
    /// The rendered prompt text.
    pub prompt: String,
    /// Prompt ids with one `<|image_pad|>` per image (for vLLM).
    pub raw_prompt_ids: Vec<u32>,
    /// Prompt ids with every image pad expanded.
    pub input_ids: Vec<u32>,
    /// `[patches, patch_dim]` of all images, in order.
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` per image.
    pub image_grid_thw: Vec<[usize; 3]>,
    /// `(width, height)` of every image after the dataset-side resize (masks and boxes live
    /// at this resolution).
    pub image_sizes: Vec<(u32, u32)>,
    /// The (8, 2500) ECG, row-major; `None` for a model without the ECG path.
    pub time_series: Option<Vec<f32>>,
}

/// A collated batch, tensor-free.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedBatch {
    /// Sample ids, in batch order.
    pub ids: Vec<String>,
    /// `[b][s]`, left-padded with `<|endoftext|>`.
    pub input_ids: Vec<Vec<u32>>,
    /// `[b][s]`, 0 on padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// `[3][b][s]` flattened (axis-major, HF layout).
    pub position_ids: Vec<i64>,
    /// `mrope_position_deltas`, one per row.
    pub rope_deltas: Vec<i64>,
    /// `[patches, patch_dim]` of all images of the batch, flattened.
    pub pixel_values: Vec<f32>,
    /// Shape of `pixel_values`.
    pub pixel_values_shape: [usize; 2],
    /// `(t, h, w)` per image of the batch.
    pub image_grid_thw: Vec<[usize; 3]>,
    /// `[b][8][2500]` flattened; empty for a model without the ECG path.
    pub time_series_data: Vec<f32>,
    /// Un-expanded prompt ids per row (unpadded).
    pub raw_prompt_ids: Vec<Vec<u32>>,
}

impl ProcessedBatch {
    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.input_ids.len()
    }

    /// Padded sequence length.
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }
}

/// The processor: tokenizer, templates, image processor and ECG conventions of one model.
#[derive(Debug)]
pub struct Processor {
    /// The tokenizer.
    pub tokenizer: QoqTokenizer,
    /// The prompt templates.
    pub prompt: PromptBuilder,
    /// The image processor.
    pub image: ImageProcessor,
    /// What `get_rope_index` needs.
    pub rope: RopeIndexConfig,
    /// Whether the model has the ECG path (`time_series_token_id` in `config.json`).
    pub time_series: bool,
    /// The options.
    pub opts: ProcessorOptions,
}

/// One image input of a sample.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ImageSource<'a> {
    /// A file listed under `images`: a missing one becomes one white image.
    Image(&'a Path),
    /// A file listed under `videos`: a missing one becomes `video_frames` white frames.
    Video(&'a Path),
    /// An image already decoded (the server's data URIs).
    Decoded(&'a DynamicImage),
}

fn white(w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]))
}

/// The files of a model folder besides its weights, each as `(name in the folder, where it is
/// read from)`: `config.json` and `preprocessor_config.json` of `dir`, and the tokenizer,
/// `tokenizer` when given, else `dir/tokenizer.json`. [`Processor::from_model_dir`] reads
/// them; exported models and checkpoints copy them so that they are model folders too.
pub fn model_folder_files(dir: &Path, tokenizer: Option<&Path>) -> [(&'static str, PathBuf); 3] {
    const TOKENIZER: &str = "tokenizer.json";
    [
        ("config.json", dir.join("config.json")),
        (
            "preprocessor_config.json",
            dir.join("preprocessor_config.json"),
        ),
        (
            TOKENIZER,
            tokenizer.map_or_else(|| dir.join(TOKENIZER), Path::to_path_buf),
        ),
    ]
}

impl Processor {
    /// Build from parts; fails when the tokenizer's ids disagree with `config.json`'s.
    pub fn new(
        tokenizer: QoqTokenizer,
        model: &QwenVlConfig,
        preprocessor: PreprocessorConfig,
        opts: ProcessorOptions,
    ) -> Result<Self> {
        let ids = &tokenizer.ids;
        let mut checks = vec![
            ("image_token_id", model.image_token_id, ids.image_pad),
            ("video_token_id", model.video_token_id, ids.video_pad),
            (
                "vision_start_token_id",
                model.vision_start_token_id,
                ids.vision_start,
            ),
            (
                "vision_end_token_id",
                model.vision_end_token_id,
                ids.vision_end,
            ),
        ];
        if let Some(ts) = model.time_series_token_id {
            checks.push(("time_series_token_id", ts, ids.time_series_pad));
        }
        for (key, cfg_id, tok_id) in checks {
            if cfg_id != tok_id {
                return Err(Error::invalid(
                    format!("config.json {key}"),
                    format!("{cfg_id}, but the tokenizer gives that token id {tok_id}"),
                ));
            }
        }
        if preprocessor.merge_size != model.vision.spatial_merge_size
            || preprocessor.patch_size != model.vision.patch_size
        {
            return Err(Error::invalid(
                "preprocessor_config.json",
                "patch_size / merge_size disagree with config.json's vision_config",
            ));
        }
        let prompt = PromptBuilder::new(opts.format_prompt.as_deref(), &opts.chat_template)?;
        Ok(Self {
            tokenizer,
            prompt,
            image: ImageProcessor::new(preprocessor),
            rope: RopeIndexConfig::from_config(model),
            time_series: model.has_time_series(),
            opts,
        })
    }

    /// Load `config.json`, `preprocessor_config.json` and `tokenizer.json` from a model folder
    /// ([`model_folder_files`]); `tokenizer` overrides the tokenizer file.
    pub fn from_model_dir(
        dir: &Path,
        tokenizer: Option<&Path>,
        opts: ProcessorOptions,
    ) -> Result<Self> {
        let cfg_err = |path: &Path, e: qoq_core::Error| Error::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let [(_, cfg_path), (_, pp_path), (_, tok_path)] = model_folder_files(dir, tokenizer);
        let model = QwenVlConfig::from_file(&cfg_path).map_err(|e| cfg_err(&cfg_path, e))?;
        let pp = PreprocessorConfig::from_file(&pp_path).map_err(|e| cfg_err(&pp_path, e))?;
        let tok = QoqTokenizer::from_file(&tok_path)?;
        Self::new(tok, &model, pp, opts)
    }

    /// The dataset-side images of a sample (spec §4.1), before the model's resize.
    pub fn load_sample_images(&self, s: &ClinicalSample) -> Result<Vec<RgbImage>> {
        let sources = s
            .images
            .iter()
            .map(|p| ImageSource::Image(p))
            .chain(s.videos.iter().map(|p| ImageSource::Video(p)));
        self.load_images(sources)
    }

    /// The dataset-side images of every source, in order: each file's images (every frame of
    /// a DICOM, the sampled frames of a volume) and each decoded image, through the reference's
    /// `process_image`; missing files as the reference substitutes them when
    /// `missing_files_as_placeholders`; a white 224×224 image, not resized, when there is none.
    pub(crate) fn load_images<'a>(
        &self,
        sources: impl IntoIterator<Item = ImageSource<'a>>,
    ) -> Result<Vec<RgbImage>> {
        let (mn, mx) = (self.opts.dataset_min_pixels, self.opts.dataset_max_pixels);
        let mut out = Vec::new();
        for src in sources {
            let path = match src {
                ImageSource::Decoded(img) => {
                    out.push(qoq_data::vision::process_image(img, mn, mx));
                    continue;
                }
                ImageSource::Image(path) | ImageSource::Video(path) => path,
            };
            if !path.exists() && self.opts.missing_files_as_placeholders {
                if matches!(src, ImageSource::Video(_)) {
                    for _ in 0..self.opts.image_load.video_frames {
                        out.push(white(224, 224));
                    }
                } else {
                    out.push(qoq_data::vision::process_image(
                        &DynamicImage::ImageRgb8(white(224, 224)),
                        mn,
                        mx,
                    ));
                }
                continue;
            }
            for img in qoq_data::vision::load_images(path, &self.opts.image_load)? {
                out.push(qoq_data::vision::process_image(&img, mn, mx));
            }
        }
        if out.is_empty() {
            out.push(white(224, 224));
        }
        Ok(out)
    }

    /// The (8, 2500) ECG input of a sample: its first series, or zeros when it has none.
    pub fn load_sample_ecg(&self, s: &ClinicalSample) -> Result<Vec<f32>> {
        let Some(path) = s.time_series.first() else {
            return Ok(vec![0.0; ECG_LEN]);
        };
        self.load_ecg_file(path)
    }

    /// The (8, 2500) ECG input of one ECG file (zeros for a missing file when
    /// `missing_files_as_placeholders`).
    pub(crate) fn load_ecg_file(&self, path: &Path) -> Result<Vec<f32>> {
        if !path.exists() && self.opts.missing_files_as_placeholders {
            return Ok(vec![0.0; ECG_LEN]);
        }
        let sig = qoq_data::ecg_io::load_ecg(path, &self.opts.ecg_load)?;
        self.ecg_input(&sig).map_err(|m| Error::File {
            path: path.to_path_buf(),
            message: m,
        })
    }

    /// A signal as the model's (8, 2500) input under the options' convention and z-scoring.
    pub fn ecg_input(
        &self,
        sig: &qoq_data::ecg::EcgSignal,
    ) -> std::result::Result<Vec<f32>, String> {
        qoq_data::ecg::to_model_input(sig, self.opts.ecg_convention, self.opts.ecg_zscore)
    }

    /// Process one manifest sample (reads its files).
    pub fn process_sample(&self, s: &ClinicalSample) -> Result<ProcessedSample> {
        let images = self.load_sample_images(s)?;
        let ecg = if self.time_series {
            Some(self.load_sample_ecg(s)?)
        } else {
            None
        };
        self.process_loaded(&s.id.0, &s.problem, s.system.as_deref(), &[], &images, ecg)
    }

    /// The last step of every sample, from a manifest row or a [`crate::case::Case`]: the
    /// question's `<image>` placeholders follow the images actually read (the reference's rule,
    /// [`qoq_data::manifest::normalise_placeholders`]: a multi-frame DICOM or a volume yields
    /// several), then [`Processor::process_prompt`].
    pub(crate) fn process_loaded(
        &self,
        id: &str,
        problem: &str,
        system: Option<&str>,
        history: &[crate::prompt::Message],
        images: &[RgbImage],
        ecg: Option<Vec<f32>>,
    ) -> Result<ProcessedSample> {
        let question = qoq_data::manifest::normalise_placeholders(problem, images.len())
            .map_err(|m| Error::invalid(format!("sample {id}"), m))?;
        self.process_turns(id, &question, system, history, images, ecg)
    }

    /// Process a question (placeholders already normalised), its dataset-side images and its
    /// ECG input (`None`: zeros, when the model has the ECG path).
    pub fn process_parts(
        &self,
        id: &str,
        question: &str,
        images: &[RgbImage],
        ecg: Option<Vec<f32>>,
    ) -> Result<ProcessedSample> {
        self.process_prompt(id, question, None, images, ecg)
    }

    /// As [`Processor::process_parts`], with an optional system message.
    pub fn process_prompt(
        &self,
        id: &str,
        question: &str,
        system: Option<&str>,
        images: &[RgbImage],
        ecg: Option<Vec<f32>>,
    ) -> Result<ProcessedSample> {
        self.process_turns(id, question, system, &[], images, ecg)
    }

    /// As [`Processor::process_prompt`], with earlier turns of the conversation
    /// ([`crate::prompt::PromptBuilder::prompt_with_turns`]).
    pub fn process_turns(
        &self,
        id: &str,
        question: &str,
        system: Option<&str>,
        history: &[crate::prompt::Message],
        images: &[RgbImage],
        ecg: Option<Vec<f32>>,
    ) -> Result<ProcessedSample> {
        let what = || format!("sample {id}");
        let prompt = self
            .prompt
            .prompt_with_turns(question, self.time_series, system, history)?;
        let raw_prompt_ids = self.tokenizer.encode(&prompt)?;
        let ids = self.tokenizer.ids;
        let n_pads = raw_prompt_ids
            .iter()
            .filter(|&&t| t == ids.image_pad)
            .count();
        if n_pads != images.len() {
            return Err(Error::invalid(
                what(),
                format!(
                    "the prompt has {n_pads} image placeholders but the sample has {} images",
                    images.len()
                ),
            ));
        }
        let mut pixel_values = Vec::new();
        let mut image_grid_thw = Vec::with_capacity(images.len());
        for img in images {
            let v = self.image.preprocess_image(img).map_err(|e| match e {
                Error::Invalid { what: w, message } => {
                    Error::invalid(format!("{} {w}", what()), message)
                }
                other => other,
            })?;
            if pixel_values.is_empty() {
                pixel_values = v.pixel_values;
            } else {
                pixel_values.extend_from_slice(&v.pixel_values);
            }
            image_grid_thw.push(v.grid_thw);
        }
        let merge2 = self.image.cfg.merge_size * self.image.cfg.merge_size;
        let mut input_ids = Vec::with_capacity(raw_prompt_ids.len());
        let mut k = 0;
        for &t in &raw_prompt_ids {
            if t == ids.image_pad {
                let n = image_grid_thw[k].iter().product::<usize>() / merge2;
                input_ids.extend(std::iter::repeat_n(t, n));
                k += 1;
            } else {
                input_ids.push(t);
            }
        }
        let time_series = if self.time_series {
            let ecg = ecg.unwrap_or_else(|| vec![0.0; ECG_LEN]);
            if ecg.len() != ECG_LEN {
                return Err(Error::invalid(
                    what(),
                    format!("ECG input has {} values, expected 8 x 2500", ecg.len()),
                ));
            }
            Some(ecg)
        } else {
            None
        };
        let mut out = ProcessedSample {
            id: id.to_string(),
            prompt,
            raw_prompt_ids,
            input_ids,
            pixel_values,
            image_grid_thw,
            image_sizes: images.iter().map(RgbImage::dimensions).collect(),
            time_series,
        };
        self.truncate(&mut out)?;
        Ok(out)
    }

    fn truncate(&self, s: &mut ProcessedSample) -> Result<()> {
        let max = self.opts.max_prompt_length;
        if s.input_ids.len() <= max {
            return Ok(());
        }
        let ids = self.tokenizer.ids;
        let protected = [
            ids.image_pad,
            ids.video_pad,
            ids.vision_start,
            ids.vision_end,
            ids.time_series_pad,
        ];
        let cut_is_safe =
            |v: &[u32]| v.len() <= max || !v[max..].iter().any(|t| protected.contains(t));
        let reason = match self.opts.truncation {
            Truncation::Right if cut_is_safe(&s.input_ids) && cut_is_safe(&s.raw_prompt_ids) => {
                s.input_ids.truncate(max);
                s.raw_prompt_ids.truncate(max);
                return Ok(());
            }
            Truncation::Right => "a right cut would drop image/ECG tokens",
            Truncation::Error => "truncation is off",
        };
        Err(Error::TooLong {
            sample: s.id.clone(),
            len: s.input_ids.len(),
            max,
            reason: reason.into(),
        })
    }

    /// Collate samples: left-pad to the longest (or to `pad_to` when longer), concatenate images
    /// and ECGs, compute M-RoPE position ids.
    pub fn collate(
        &self,
        samples: &[ProcessedSample],
        pad_to: Option<usize>,
    ) -> Result<ProcessedBatch> {
        let longest = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
        let seq = longest.max(pad_to.unwrap_or(0));
        let pad = self.tokenizer.ids.endoftext;
        let patch_dim = self.image.patch_dim();
        let mut b = ProcessedBatch {
            ids: Vec::with_capacity(samples.len()),
            input_ids: Vec::with_capacity(samples.len()),
            attention_mask: Vec::with_capacity(samples.len()),
            position_ids: Vec::new(),
            rope_deltas: Vec::new(),
            pixel_values: Vec::new(),
            pixel_values_shape: [0, patch_dim],
            image_grid_thw: Vec::new(),
            time_series_data: Vec::new(),
            raw_prompt_ids: Vec::with_capacity(samples.len()),
        };
        for s in samples {
            let n_pad = seq - s.input_ids.len();
            let mut ids = vec![pad; n_pad];
            ids.extend_from_slice(&s.input_ids);
            let mut mask = vec![0u32; n_pad];
            mask.extend(std::iter::repeat_n(1u32, s.input_ids.len()));
            b.ids.push(s.id.clone());
            b.input_ids.push(ids);
            b.attention_mask.push(mask);
            b.pixel_values.extend_from_slice(&s.pixel_values);
            b.image_grid_thw.extend_from_slice(&s.image_grid_thw);
            if let Some(ts) = &s.time_series {
                b.time_series_data.extend_from_slice(ts);
            } else if self.time_series {
                return Err(Error::invalid(
                    format!("sample {}", s.id),
                    "no ECG input for a model with the ECG path",
                ));
            }
            b.raw_prompt_ids.push(s.raw_prompt_ids.clone());
        }
        b.pixel_values_shape = [b.pixel_values.len() / patch_dim, patch_dim];
        let rope = get_rope_index(
            &self.rope,
            &b.input_ids,
            Some(&b.attention_mask),
            &b.image_grid_thw,
            &[],
            &[],
        )?;
        b.position_ids = rope.to_axis_major();
        b.rope_deltas = rope.deltas;
        Ok(b)
    }
}
