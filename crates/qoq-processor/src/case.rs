//! One case builder for every entry point: a case given directly (`qoq infer`, `qoq serve`, a
//! library user) becomes the [`ClinicalSample`] and the [`ProcessedSample`] that the manifest
//! path (`qoq train`, `qoq eval`, `qoq process`) produces for the equivalent row, placeholders
//! and all (spec §2.1):
//!
//! * a case whose inputs are all files becomes the equivalent manifest row's sample
//!   ([`Case::to_sample`], through [`qoq_data::manifest::finish_sample`], the function
//!   [`qoq_data::manifest::parse_row`] ends with) and is processed by
//!   [`Processor::process_sample`], the trainer's call;
//! * a case with decoded images (the server's data URIs) or an ECG signal in memory goes
//!   through the same image loader (the dataset-side resize), the same ECG conversion and the
//!   same last step ([`Processor::process_sample`]'s placeholders for the images read, then
//!   the prompt).
//!
//! So an ECG-only case gets the white 224×224 placeholder image and its `<image>` placeholder
//! plus the time-series token, as training does; a volume becomes its sampled frames with one
//! placeholder each; a multi-frame DICOM one placeholder per frame; a text-only case (which a
//! manifest refuses: "No modality found.") is the ECG-only case without the ECG: the
//! placeholder image and zeros for the ECG.

use crate::error::{Error, Result};
use crate::processor::{ImageSource, ProcessedSample, Processor};
use image::DynamicImage;
use qoq_core::{ClinicalSample, Domain, SampleId};
use qoq_data::ecg::EcgSignal;
use qoq_data::manifest::{expected_images, finish_sample, normalise_placeholders, with_options};
use std::path::PathBuf;

/// One image input of a case.
#[derive(Debug, Clone)]
pub enum CaseImage {
    /// A file: PNG, JPEG, BMP, TIFF, WebP, GIF (one image), DICOM (every frame), NIfTI / NRRD
    /// (the sampled frames of the volume; listed under `videos` as the training manifests do).
    File(PathBuf),
    /// An image already decoded (a data URI of `qoq serve`); resized like a file's.
    Decoded(DynamicImage),
}

/// The ECG input of a case.
#[derive(Debug, Clone)]
pub enum CaseEcg {
    /// A file: WFDB `.hea`, DICOM waveform, `.npy` / `.npz`, CSV.
    File(PathBuf),
    /// A signal already read (the server's `input_ecg` part).
    Signal(EcgSignal),
}

/// A clinical case given directly rather than as a manifest row.
#[derive(Debug, Clone, Default)]
pub struct Case {
    /// The sample id.
    pub id: String,
    /// The question; may contain `<image>` / `<video>` placeholders (added when absent).
    pub question: String,
    /// Answer options, appended in the training manifests' wording
    /// ([`qoq_data::manifest::with_options`]).
    pub options: Vec<String>,
    /// A system message (the manifest's `system` key); `None`: the chat template's default.
    pub system: Option<String>,
    /// Earlier turns of a conversation (`user` / `assistant` text messages), rendered between
    /// the system message and the question; a manifest row has none.
    pub history: Vec<crate::prompt::Message>,
    /// Images, DICOMs and volumes, in order.
    pub images: Vec<CaseImage>,
    /// The ECG.
    pub ecg: Option<CaseEcg>,
    /// The gold answer, when known.
    pub answer: String,
    /// The dataset name (default `case`).
    pub dataset: Option<String>,
}

impl Case {
    /// A case with a question and nothing else.
    pub fn new(id: impl Into<String>, question: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            question: question.into(),
            ..Self::default()
        }
    }

    /// The question with its options, before the placeholder rules.
    pub fn question_text(&self) -> String {
        with_options(&self.question, &self.options)
    }

    /// Image files and volumes as a manifest lists them (`images`, `videos`), and the count
    /// of decoded images.
    fn split_images(&self) -> (Vec<PathBuf>, Vec<PathBuf>, usize) {
        let (mut images, mut videos, mut decoded) = (Vec::new(), Vec::new(), 0);
        for img in &self.images {
            match img {
                CaseImage::File(p) if qoq_data::volume::is_volume(p) => videos.push(p.clone()),
                CaseImage::File(p) => images.push(p.clone()),
                CaseImage::Decoded(_) => decoded += 1,
            }
        }
        (images, videos, decoded)
    }

    /// The sample the manifest path gives for the equivalent row (`problem` = the question
    /// with its options, `images` = the image and DICOM files, `videos` = the volumes,
    /// `time-series` = the ECG file, `system`, `dataset`). Fails when an input is not a file
    /// (a decoded image, an ECG signal): such a case has no manifest row.
    pub fn to_sample(&self, video_frames: usize) -> Result<ClinicalSample> {
        let what = || format!("case {}", self.id);
        if !self.history.is_empty() {
            return Err(Error::invalid(
                what(),
                "a case with earlier conversation turns has no manifest row",
            ));
        }
        let (images, videos, decoded) = self.split_images();
        if decoded > 0 {
            return Err(Error::invalid(
                what(),
                "a decoded image has no file, so the case has no manifest row",
            ));
        }
        let time_series = match &self.ecg {
            None => Vec::new(),
            Some(CaseEcg::File(p)) => vec![p.clone()],
            Some(CaseEcg::Signal(_)) => {
                return Err(Error::invalid(
                    what(),
                    "an ECG signal has no file, so the case has no manifest row",
                ));
            }
        };
        let data_source = if images.is_empty() && videos.is_empty() && !time_series.is_empty() {
            Domain::Ecg
        } else {
            Domain::Other("case".into())
        };
        let raw = ClinicalSample {
            id: SampleId(self.id.clone()),
            line: 0,
            problem: self.question_text(),
            system: self.system.clone(),
            answer: self.answer.clone(),
            images,
            videos,
            time_series,
            segmentation_path: None,
            bbox: None,
            dataset: self.dataset.clone().unwrap_or_else(|| "case".into()),
            data_source,
            extra: Default::default(),
        };
        finish_sample(raw, video_frames).map_err(|m| Error::invalid(what(), m))
    }

    /// The question after the placeholder rules for the images the manifest would count
    /// (what [`Case::to_sample`] gives as `problem`, also for cases with decoded images).
    pub fn problem(&self, video_frames: usize) -> Result<String> {
        let (images, videos, decoded) = self.split_images();
        let n = expected_images(images.len() + decoded, videos.len(), video_frames);
        normalise_placeholders(&self.question_text(), n)
            .map_err(|m| Error::invalid(format!("case {}", self.id), m))
    }
}

impl Processor {
    /// Process a case as training processes the equivalent manifest row (see the module
    /// docs). The ECG is ignored for a model without the ECG path, as for manifest rows.
    pub fn process_case(&self, case: &Case) -> Result<ProcessedSample> {
        let frames = self.opts.image_load.video_frames;
        let in_memory = case
            .images
            .iter()
            .any(|i| matches!(i, CaseImage::Decoded(_)))
            || matches!(case.ecg, Some(CaseEcg::Signal(_)));
        if !in_memory && case.history.is_empty() {
            return self.process_sample(&case.to_sample(frames)?);
        }
        let problem = case.problem(frames)?;
        let sources = case.images.iter().map(|i| match i {
            CaseImage::File(p) if qoq_data::volume::is_volume(p) => ImageSource::Video(p),
            CaseImage::File(p) => ImageSource::Image(p),
            CaseImage::Decoded(img) => ImageSource::Decoded(img),
        });
        // Files first, then volumes, as a manifest row lists them.
        let (mut files, videos): (Vec<_>, Vec<_>) =
            sources.partition(|s| !matches!(s, ImageSource::Video(_)));
        files.extend(videos);
        let images = self.load_images(files)?;
        let ecg = if self.time_series {
            Some(match &case.ecg {
                None => vec![0.0; crate::processor::ECG_LEN],
                Some(CaseEcg::File(p)) => self.load_ecg_file(p)?,
                Some(CaseEcg::Signal(sig)) => self
                    .ecg_input(sig)
                    .map_err(|m| Error::invalid(format!("case {} ECG", case.id), m))?,
            })
        } else {
            None
        };
        self.process_loaded(
            &case.id,
            &problem,
            case.system.as_deref(),
            &case.history,
            &images,
            ecg,
        )
    }
}
