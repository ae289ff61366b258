//! JSONL manifests in the released schema (spec §2.1; the user-facing schema is docs/manifest.md).
//!
//! A row's domain (`data_source`, `dataset`) comes, field by field, from the row's own
//! `data_source` / `dataset` keys when present, otherwise from the first image or volume path laid
//! out as `<data_source>/<dataset>/<file>` relative to the manifest. ECG-only rows are
//! `data_source = "ecg"` and must name their `dataset` (the reference's rule). An absolute path,
//! or a path with fewer than two folders, names no domain: such a row must carry the keys, and an
//! error naming the row says so. [`DomainOrigin`] records which rule gave each field (shown by
//! `qoq data check`). The reference overwrites a vision row's `dataset` key with the path's
//! folder; here the key wins (the two agree whenever the key equals the folder).
//!
//! A manifest is read once to index the byte offset of every non-empty line; rows are decoded
//! on demand, so a 2.6-million-row manifest costs a few tens of MB of offsets, never the decoded
//! samples. Iteration order is a seeded permutation per epoch and resumes from a [`Cursor`].

use crate::error::{Error, Result};
use qoq_core::{ClinicalSample, Domain, SampleId};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

/// Key names and options of the manifest reader (the reference's `data` config keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManifestConfig {
    /// Question text key (reference `prompt_key`).
    pub prompt_key: String,
    /// Gold answer key (reference `answer_key`).
    pub answer_key: String,
    /// 2D image list key (reference `image_key`).
    pub image_key: String,
    /// 3D volume / video list key.
    pub video_key: String,
    /// ECG / time-series list key (reference: hard-coded `"time-series"`).
    pub time_series_key: String,
    /// Segmentation mask path key.
    pub segmentation_key: String,
    /// Ground-truth box key.
    pub bbox_key: String,
    /// Dataset name key (required for ECG-only rows and rows whose paths name no domain).
    pub dataset_key: String,
    /// System message key (optional; absent: the chat template's default system message).
    pub system_key: String,
    /// Data source (clinical domain) key; optional, the first folder of the path otherwise.
    pub data_source_key: String,
    /// Frames sampled from each volume/video (reference 2, paper 4); each frame is one image.
    pub video_frames: usize,
    /// Fail when the image key is absent, as the reference does (`row_dict['images']`).
    pub require_image_key: bool,
    /// Training-time loading ([`Manifest::training_rows`]) skips rows that fail to decode,
    /// counting them with their line numbers, instead of stopping at the first.
    pub skip_bad_rows: bool,
}

impl Default for ManifestConfig {
    fn default() -> Self {
        Self {
            prompt_key: "problem".into(),
            answer_key: "answer".into(),
            image_key: "images".into(),
            video_key: "videos".into(),
            time_series_key: "time-series".into(),
            segmentation_key: "segmentation_path".into(),
            bbox_key: "bbox".into(),
            dataset_key: "dataset".into(),
            system_key: "system".into(),
            data_source_key: "data_source".into(),
            video_frames: 2,
            require_image_key: false,
            skip_bad_rows: false,
        }
    }
}

const LOS_QUESTION: &str = "How long will the patient stay in the hospital?";
const IHM_QUESTION: &str = "Will the patient survive for at least 48 hours?";

/// Apply the reference's `<image>` placeholder rules for a row that yields `n_images` images
/// (spec §2.1): `<video>` becomes `<image>`; with no placeholder, `"<image> "` is prepended; with
/// fewer placeholders than images, the first becomes `"<image> " * (missing + 1)`; the counts
/// must then agree.
pub fn normalise_placeholders(
    problem: &str,
    n_images: usize,
) -> std::result::Result<String, String> {
    let mut text = problem.replace("<video>", "<image>");
    if n_images == 0 {
        return Ok(text);
    }
    if !text.contains("<image>") {
        text = format!("<image> {text}");
    }
    let count = text.matches("<image>").count();
    if n_images > count {
        let missing = n_images - count;
        text = text.replacen("<image>", &"<image> ".repeat(missing + 1), 1);
    }
    let count = text.matches("<image>").count();
    if count != n_images {
        return Err(format!(
            "the question has {count} <image> placeholders but the row yields {n_images} images"
        ));
    }
    Ok(text)
}

/// The images a sample yields as the manifest counts them before reading any file: one per
/// `images` path, `video_frames` per `videos` path, and at least one (rows without an image get
/// the white placeholder image, spec §2.1). A multi-frame DICOM or a volume listed under
/// `images` yields more; the processor re-applies [`normalise_placeholders`] with the count it
/// reads.
pub fn expected_images(n_images: usize, n_videos: usize, video_frames: usize) -> usize {
    (n_images + n_videos * video_frames).max(1)
}

/// A question with its answer options in the CLIMB wording the training manifests use
/// (`to_qa`: `"{question}Answer with one of the following:\n" + "\n".join(options)`, no space
/// after a question mark); a question not ending in whitespace or `?` gets one space first. No
/// options: the question unchanged.
pub fn with_options(question: &str, options: &[String]) -> String {
    if options.is_empty() {
        return question.to_string();
    }
    let sep = if question.is_empty() || question.ends_with(['?', ' ', '\n', '\t']) {
        ""
    } else {
        " "
    };
    format!(
        "{question}{sep}Answer with one of the following:\n{}",
        options.join("\n")
    )
}

/// The domain fields the reference's special MIMIC-IV questions set: LOS sets
/// `data_source = multimodal`, `dataset = los_prediction`; 48-hour mortality sets
/// `dataset = 48_ihm`.
fn special_question_domain(problem: &str) -> (Option<Domain>, Option<&'static str>) {
    if problem.contains(LOS_QUESTION) {
        (Some(Domain::Multimodal), Some("los_prediction"))
    } else if problem.contains(IHM_QUESTION) {
        (None, Some("48_ihm"))
    } else {
        (None, None)
    }
}

/// The `<image>` placeholders of a sample for [`expected_images`]; the last step of every sample,
/// from a manifest row or given directly.
fn finish_placeholders(
    mut s: ClinicalSample,
    video_frames: usize,
) -> std::result::Result<ClinicalSample, String> {
    let n_images = expected_images(s.images.len(), s.videos.len(), video_frames);
    s.problem = normalise_placeholders(&s.problem, n_images)?;
    Ok(s)
}

/// The derivations a sample given directly (a case of `qoq infer` / `qoq serve`, which has no
/// `data_source` / `dataset` keys) goes through, as a manifest row without those keys does in
/// [`parse_row`]: the reference's special questions set the domain fields, then the `<image>`
/// placeholders for [`expected_images`]. `s.problem` is the raw question; `s.data_source` /
/// `s.dataset` the ones derived from the paths.
pub fn finish_sample(
    mut s: ClinicalSample,
    video_frames: usize,
) -> std::result::Result<ClinicalSample, String> {
    let (source, dataset) = special_question_domain(&s.problem);
    if let Some(source) = source {
        s.data_source = source;
    }
    if let Some(dataset) = dataset {
        s.dataset = dataset.into();
    }
    finish_placeholders(s, video_frames)
}

/// Which rule gave one domain field of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FieldOrigin {
    /// The row's own key (`data_source` / `dataset`).
    Key,
    /// A folder of the first image or volume path (`<data_source>/<dataset>/<file>`).
    Path,
    /// An ECG-only row: `data_source = "ecg"`.
    EcgRow,
    /// The reference's MIMIC-IV questions (LOS: `multimodal` / `los_prediction`; 48-h IHM:
    /// `48_ihm`).
    Question,
}

impl FieldOrigin {
    /// Short name: `key`, `path`, `ecg`, `question`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FieldOrigin::Key => "key",
            FieldOrigin::Path => "path",
            FieldOrigin::EcgRow => "ecg",
            FieldOrigin::Question => "question",
        }
    }
}

/// Where a row's `data_source` and `dataset` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainOrigin {
    pub data_source: FieldOrigin,
    pub dataset: FieldOrigin,
}

impl std::fmt::Display for DomainOrigin {
    /// `keys`, `path`, `question` when both fields share a rule, else `<data_source rule>+<dataset
    /// rule>` (e.g. `ecg+key`, `path+key`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.data_source, self.dataset) {
            (FieldOrigin::Key, FieldOrigin::Key) => f.write_str("keys"),
            (a, b) if a == b => f.write_str(a.as_str()),
            (a, b) => write!(f, "{}+{}", a.as_str(), b.as_str()),
        }
    }
}

/// The `<data_source>` and `<dataset>` folders of a manifest-relative path laid out as
/// `<data_source>/<dataset>/<file>` (deeper paths use their first two folders); why not
/// otherwise.
fn layout_folders(path: &str) -> std::result::Result<(String, String), String> {
    let p = Path::new(path);
    if p.has_root() || p.is_absolute() {
        return Err(format!(
            "path `{path}` is absolute, so its folders name no data source and dataset"
        ));
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "path `{path}` leaves the manifest's folder, so its folders name no data \
                     source and dataset"
                ));
            }
        }
    }
    if parts.len() < 3 {
        return Err(format!(
            "path `{path}` is not laid out as <data_source>/<dataset>/<file>"
        ));
    }
    Ok((parts[0].clone(), parts[1].clone()))
}

fn string_list(row: &Map<String, Value>, key: &str) -> std::result::Result<Vec<String>, String> {
    match row.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("field `{key}`[{i}] is not a string"))
            })
            .collect(),
        Some(_) => Err(format!("field `{key}` must be a list of paths")),
    }
}

/// Decode one manifest row (already parsed as JSON) into a [`ClinicalSample`].
///
/// `base_dir` is the manifest's folder (relative paths resolve against it), `stem` the manifest's
/// file stem (for the sample id) and `line` the 1-based line number.
pub fn parse_row(
    value: Value,
    cfg: &ManifestConfig,
    base_dir: &Path,
    stem: &str,
    line: u64,
) -> std::result::Result<ClinicalSample, String> {
    parse_row_traced(value, cfg, base_dir, stem, line).map(|(s, _)| s)
}

/// [`parse_row`], also telling where the row's domain came from.
pub fn parse_row_traced(
    value: Value,
    cfg: &ManifestConfig,
    base_dir: &Path,
    stem: &str,
    line: u64,
) -> std::result::Result<(ClinicalSample, DomainOrigin), String> {
    let Value::Object(mut row) = value else {
        return Err("a row must be a JSON object".into());
    };
    let text_field = |row: &Map<String, Value>, key: &str| -> std::result::Result<String, String> {
        match row.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(_) => Err(format!("field `{key}` must be a string")),
            None => Err(format!("missing field `{key}`")),
        }
    };
    let problem = text_field(&row, &cfg.prompt_key)?;
    let answer = text_field(&row, &cfg.answer_key)?;
    if cfg.require_image_key && !row.contains_key(&cfg.image_key) {
        return Err(format!(
            "missing field `{}` (the reference raises KeyError)",
            cfg.image_key
        ));
    }
    let images = string_list(&row, &cfg.image_key)?;
    let videos = string_list(&row, &cfg.video_key)?;
    let series = string_list(&row, &cfg.time_series_key)?;
    if images.is_empty() && videos.is_empty() && series.is_empty() {
        return Err("No modality found.".into());
    }
    let key_text = |key: &str| -> std::result::Result<Option<String>, String> {
        match row.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(v)) if v.trim().is_empty() => Err(format!("field `{key}` is empty")),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(format!("field `{key}` must be a string")),
        }
    };
    let source_key = key_text(&cfg.data_source_key)?;
    let dataset_key = key_text(&cfg.dataset_key)?;
    let first_media = images.first().or(videos.first());
    let folders = first_media.map(|p| layout_folders(p));
    // the error for a field neither a key nor the path gives, naming the fix
    let missing = |why: &str| {
        let need: Vec<String> = [
            (&source_key, &cfg.data_source_key),
            (&dataset_key, &cfg.dataset_key),
        ]
        .into_iter()
        .filter(|(v, _)| v.is_none())
        .map(|(_, k)| format!("\"{k}\""))
        .collect();
        format!(
            "{why}: add {} to the row (e.g. \"{}\": \"derm\", \"{}\": \"ham10000\"), or give the \
             path relative to the manifest's folder as <data_source>/<dataset>/<file>",
            need.join(" and "),
            cfg.data_source_key,
            cfg.dataset_key
        )
    };
    let (mut data_source, mut source_origin) = match (&source_key, &folders) {
        (Some(k), _) => (Domain::from_source(k), FieldOrigin::Key),
        (None, None) => (Domain::Ecg, FieldOrigin::EcgRow),
        (None, Some(Ok((src, _)))) => (Domain::from_source(src), FieldOrigin::Path),
        (None, Some(Err(why))) => return Err(missing(why)),
    };
    let (mut dataset, mut dataset_origin) = match (&dataset_key, &folders) {
        (Some(k), _) => (k.clone(), FieldOrigin::Key),
        (None, None) => {
            return Err(format!(
                "an ECG-only row must carry `{}` (the reference: \"dataset already set in json\")",
                cfg.dataset_key
            ));
        }
        (None, Some(Ok((_, ds)))) => (ds.clone(), FieldOrigin::Path),
        (None, Some(Err(why))) => return Err(missing(why)),
    };
    // the reference's MIMIC-IV questions, for the fields the row's keys do not give
    let (question_source, question_dataset) = special_question_domain(&problem);
    if let (Some(src), None) = (question_source, &source_key) {
        (data_source, source_origin) = (src, FieldOrigin::Question);
    }
    if let (Some(ds), None) = (question_dataset, &dataset_key) {
        (dataset, dataset_origin) = (ds.to_string(), FieldOrigin::Question);
    }
    let origin = DomainOrigin {
        data_source: source_origin,
        dataset: dataset_origin,
    };
    let system = match row.get(&cfg.system_key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(format!("field `{}` must be a string", cfg.system_key)),
    };
    let bbox = match row.get(&cfg.bbox_key) {
        None | Some(Value::Null) => None,
        Some(Value::Array(v)) if v.len() == 4 => {
            let mut b = [0.0; 4];
            for (i, x) in v.iter().enumerate() {
                b[i] = x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| {
                    format!("field `{}`[{i}] is not a finite number", cfg.bbox_key)
                })?;
            }
            Some(b)
        }
        Some(_) => return Err(format!("field `{}` must be [x1, y1, x2, y2]", cfg.bbox_key)),
    };
    let segmentation_path = match row.get(&cfg.segmentation_key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(base_dir.join(s)),
        Some(_) => return Err(format!("field `{}` must be a path", cfg.segmentation_key)),
    };
    let id = match row.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("{stem}:{line}"),
    };
    for key in [
        &cfg.prompt_key,
        &cfg.answer_key,
        &cfg.image_key,
        &cfg.video_key,
        &cfg.time_series_key,
        &cfg.segmentation_key,
        &cfg.bbox_key,
        &cfg.dataset_key,
        &cfg.system_key,
        &cfg.data_source_key,
    ] {
        row.remove(key);
    }
    row.remove("id");
    let resolve = |v: Vec<String>| {
        v.into_iter()
            .map(|p| base_dir.join(p))
            .collect::<Vec<PathBuf>>()
    };
    let sample = ClinicalSample {
        id: SampleId(id),
        line,
        problem,
        system,
        answer,
        images: resolve(images),
        videos: resolve(videos),
        time_series: resolve(series),
        segmentation_path,
        bbox,
        dataset,
        data_source,
        extra: row,
    };
    let sample = finish_placeholders(sample, cfg.video_frames)?;
    Ok((sample, origin))
}

/// Where an iteration over a manifest stands: the epoch and the position in that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
}

/// How the training stream orders the rows of a manifest ([`Manifest::with_row_order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowOrder {
    /// Permute the rows once, with this seed, before any epoch order (the paper's "shuffle with
    /// seed 42 beforehand"); `None` keeps the file order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshuffle_seed: Option<u64>,
    /// Shuffle each epoch with `(seed, epoch)`; `false` reads every epoch in the (pre-shuffled)
    /// base order.
    pub shuffle: bool,
}

impl Default for RowOrder {
    fn default() -> Self {
        Self {
            preshuffle_seed: None,
            shuffle: true,
        }
    }
}

/// An indexed JSONL manifest: byte offsets of its non-empty lines, rows decoded on demand.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    base_dir: PathBuf,
    stem: String,
    cfg: ManifestConfig,
    /// (byte offset, 1-based line number) of every non-empty line.
    offsets: Vec<(u64, u64)>,
    /// The training stream's ordering rule.
    order: RowOrder,
    /// The row indices before any epoch shuffle (the pre-shuffled order, or file order).
    base_order: Vec<u32>,
}

impl Manifest {
    /// Index a manifest file (one sequential pass, nothing decoded).
    pub fn open(path: &Path, cfg: ManifestConfig) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut offsets = Vec::new();
        let mut buf = Vec::new();
        let mut offset = 0u64;
        let mut line = 0u64;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            line += 1;
            if buf.iter().any(|b| !b.is_ascii_whitespace()) {
                offsets.push((offset, line));
            }
            offset += n as u64;
        }
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base_order = (0..offsets.len() as u32).collect();
        Ok(Self {
            path: path.to_path_buf(),
            base_dir,
            stem,
            cfg,
            offsets,
            order: RowOrder::default(),
            base_order,
        })
    }

    /// The manifest with another ordering rule for [`Manifest::epoch_order`] and the training
    /// stream: the rows are permuted once with `preshuffle_seed` (a seeded Fisher-Yates shuffle,
    /// ChaCha8), then each epoch shuffles that base order with `(seed, epoch)` when `shuffle`, or
    /// reads it as is. The default rule (no pre-shuffle, shuffled epochs) is the order of
    /// [`Manifest::open`].
    pub fn with_row_order(mut self, order: RowOrder) -> Self {
        let mut base: Vec<u32> = (0..self.offsets.len() as u32).collect();
        if let Some(seed) = order.preshuffle_seed {
            base.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        }
        self.base_order = base;
        self.order = order;
        self
    }

    /// The ordering rule of the training stream.
    pub fn row_order(&self) -> RowOrder {
        self.order
    }

    /// Number of rows (non-empty lines).
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The reader options this manifest was opened with.
    pub fn config(&self) -> &ManifestConfig {
        &self.cfg
    }

    /// The seeded, resumable training stream ([`Manifest::shuffled`]) that skips and records
    /// bad rows when the config's `skip_bad_rows` is set; otherwise bad rows are yielded as
    /// errors. It stops (returns `None`) if a whole epoch's worth of rows in a row is bad.
    pub fn training_rows(
        &self,
        seed: u64,
        cursor: Cursor,
    ) -> Result<SkipBadRows<ShuffledRows<'_>>> {
        let rows = self.shuffled(seed, cursor)?;
        Ok(SkipBadRows::new(rows, self.cfg.skip_bad_rows, self.len()))
    }

    /// Every row in file order, skipping and recording the bad ones.
    pub fn rows_skipping_bad(
        &self,
    ) -> Result<SkipBadRows<impl Iterator<Item = Result<ClinicalSample>> + '_>> {
        Ok(SkipBadRows::new(self.rows()?, true, self.len()))
    }

    /// Decode one JSON line into a sample, with errors naming the file and line.
    fn decode(&self, text: &str, line: u64) -> Result<ClinicalSample> {
        self.decode_traced(text, line).map(|(s, _)| s)
    }

    /// [`Manifest::decode`] with the row's [`DomainOrigin`].
    fn decode_traced(&self, text: &str, line: u64) -> Result<(ClinicalSample, DomainOrigin)> {
        let row_err = |message: String| Error::Row {
            path: self.path.clone(),
            line,
            message,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| row_err(format!("malformed JSON: {e}")))?;
        parse_row_traced(value, &self.cfg, &self.base_dir, &self.stem, line).map_err(row_err)
    }

    /// Decode every row in file order, streaming (one line in memory at a time).
    pub fn rows(&self) -> Result<impl Iterator<Item = Result<ClinicalSample>> + '_> {
        Ok(self.rows_traced()?.map(|r| r.map(|(s, _)| s)))
    }

    /// [`Manifest::rows`] with each row's [`DomainOrigin`].
    pub fn rows_traced(
        &self,
    ) -> Result<impl Iterator<Item = Result<(ClinicalSample, DomainOrigin)>> + '_> {
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut lines = BufReader::with_capacity(1 << 20, file).lines();
        let mut line_no = 0u64;
        Ok(std::iter::from_fn(move || {
            loop {
                let next = lines.next()?;
                line_no += 1;
                match next {
                    Err(e) => return Some(Err(Error::io(&self.path, e))),
                    Ok(text) if text.trim().is_empty() => continue,
                    Ok(text) => return Some(self.decode_traced(&text, line_no)),
                }
            }
        }))
    }

    /// The row order of an epoch: the base order ([`Manifest::with_row_order`]; file order by
    /// default) permuted by `(seed, epoch)`, or the base order itself when epochs are not
    /// shuffled.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u32> {
        let mut order = self.base_order.clone();
        if self.order.shuffle {
            let mix = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix);
            order.shuffle(&mut rng);
        }
        order
    }

    /// Iterate rows in the seeded order, starting at `cursor` and running through epochs without
    /// end. Each item carries the cursor to resume *after* that row.
    pub fn shuffled(&self, seed: u64, cursor: Cursor) -> Result<ShuffledRows<'_>> {
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(ShuffledRows {
            manifest: self,
            file: BufReader::new(file),
            seed,
            order: self.epoch_order(seed, cursor.epoch),
            cursor,
        })
    }

    fn read_row(&self, file: &mut BufReader<File>, index: usize) -> Result<ClinicalSample> {
        let (offset, line) = self.offsets[index];
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&self.path, e))?;
        let mut text = String::new();
        file.read_line(&mut text)
            .map_err(|e| Error::io(&self.path, e))?;
        self.decode(&text, line)
    }
}

/// Rows of a manifest in a seeded, resumable order (see [`Manifest::shuffled`]).
#[derive(Debug)]
pub struct ShuffledRows<'a> {
    manifest: &'a Manifest,
    file: BufReader<File>,
    seed: u64,
    order: Vec<u32>,
    cursor: Cursor,
}

impl Iterator for ShuffledRows<'_> {
    type Item = (Cursor, Result<ClinicalSample>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.order.is_empty() {
            return None;
        }
        if self.cursor.position as usize >= self.order.len() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
            self.order = self.manifest.epoch_order(self.seed, self.cursor.epoch);
        }
        let index = self.order[self.cursor.position as usize] as usize;
        let row = self.manifest.read_row(&mut self.file, index);
        self.cursor.position += 1;
        Some((self.cursor, row))
    }
}

/// A row that was skipped while loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRow {
    /// 1-based line number in the manifest.
    pub line: u64,
    /// Why the row was skipped.
    pub reason: String,
}

/// An item of a row stream: a decoded row, possibly with a cursor.
pub trait RowItem {
    /// The (line, reason) of a bad row; `None` for a good row or a fatal (I/O) error.
    fn bad_row(&self) -> Option<(u64, &str)>;
}

impl RowItem for Result<ClinicalSample> {
    fn bad_row(&self) -> Option<(u64, &str)> {
        match self {
            Err(Error::Row { line, message, .. }) => Some((*line, message.as_str())),
            _ => None,
        }
    }
}

impl RowItem for (Cursor, Result<ClinicalSample>) {
    fn bad_row(&self) -> Option<(u64, &str)> {
        self.1.bad_row()
    }
}

/// A row stream that, when enabled, skips bad rows and records them (see
/// [`Manifest::training_rows`]). I/O errors are always passed through.
#[derive(Debug)]
pub struct SkipBadRows<I> {
    inner: I,
    enabled: bool,
    /// Consecutive skips after which the stream ends (every row of an epoch is bad).
    max_consecutive: usize,
    skipped: Vec<SkippedRow>,
}

impl<I> SkipBadRows<I> {
    /// Wrap `inner`; `enabled = false` passes every item through.
    pub fn new(inner: I, enabled: bool, max_consecutive: usize) -> Self {
        Self {
            inner,
            enabled,
            max_consecutive: max_consecutive.max(1),
            skipped: Vec::new(),
        }
    }

    /// The rows skipped so far, in the order they were met (a row met in several epochs is
    /// listed each time).
    pub fn skipped(&self) -> &[SkippedRow] {
        &self.skipped
    }

    /// How many rows were skipped so far.
    pub fn skipped_count(&self) -> usize {
        self.skipped.len()
    }
}

impl<I> Iterator for SkipBadRows<I>
where
    I: Iterator,
    I::Item: RowItem,
{
    type Item = I::Item;

    fn next(&mut self) -> Option<Self::Item> {
        let mut consecutive = 0;
        loop {
            let item = self.inner.next()?;
            if !self.enabled {
                return Some(item);
            }
            match item.bad_row() {
                Some((line, reason)) => {
                    self.skipped.push(SkippedRow {
                        line,
                        reason: reason.to_string(),
                    });
                    consecutive += 1;
                    if consecutive >= self.max_consecutive {
                        return None;
                    }
                }
                None => return Some(item),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> std::result::Result<ClinicalSample, String> {
        parse_row(
            v,
            &ManifestConfig::default(),
            Path::new("/data"),
            "train",
            7,
        )
    }

    fn traced(v: Value) -> std::result::Result<(ClinicalSample, DomainOrigin), String> {
        parse_row_traced(
            v,
            &ManifestConfig::default(),
            Path::new("/data"),
            "train",
            7,
        )
    }

    fn origin(data_source: FieldOrigin, dataset: FieldOrigin) -> DomainOrigin {
        DomainOrigin {
            data_source,
            dataset,
        }
    }

    #[test]
    fn vision_rows_take_source_and_dataset_from_the_first_path() {
        let (s, o) = traced(json!({"problem": "What is it?", "answer": "Edema",
            "images": ["chest_xray/vindr/a.png"], "site": 3}))
        .unwrap();
        assert_eq!(s.data_source, Domain::ChestXray);
        assert_eq!(s.dataset, "vindr");
        assert_eq!(o, origin(FieldOrigin::Path, FieldOrigin::Path));
        assert_eq!(o.to_string(), "path");
        assert_eq!(s.problem, "<image> What is it?");
        assert_eq!(
            s.images,
            vec![PathBuf::from("/data/chest_xray/vindr/a.png")]
        );
        assert_eq!(s.id.0, "train:7");
        assert_eq!(s.extra.get("site"), Some(&json!(3)));
        // deeper paths use their first two folders; a leading "./" is no folder
        let (s, _) = traced(json!({"problem": "q", "answer": "a",
            "videos": ["./ct/lidc/p001/scan.nii.gz"]}))
        .unwrap();
        assert_eq!((s.data_source, s.dataset.as_str()), (Domain::Ct, "lidc"));
    }

    #[test]
    fn domain_keys_win_over_the_path_field_by_field() {
        let (s, o) = traced(json!({"problem": "q", "answer": "a",
            "images": ["chest_xray/vindr/a.png"], "data_source": "mammo", "dataset": "vindr-mammo"}))
        .unwrap();
        assert_eq!(
            (s.data_source, s.dataset.as_str()),
            (Domain::Mammography, "vindr-mammo")
        );
        assert_eq!(o.to_string(), "keys");
        // the keys are not kept among the extra fields
        assert!(s.extra.is_empty());
        let (s, o) = traced(json!({"problem": "q", "answer": "a",
            "images": ["chest_xray/vindr/a.png"], "dataset": "vindr-cxr"}))
        .unwrap();
        assert_eq!(
            (s.data_source, s.dataset.as_str()),
            (Domain::ChestXray, "vindr-cxr")
        );
        assert_eq!(o, origin(FieldOrigin::Path, FieldOrigin::Key));
        assert_eq!(o.to_string(), "path+key");
        // ECG-only rows: data_source "ecg" unless the key says otherwise
        let (s, o) = traced(
            json!({"problem": "q", "answer": "MI", "time-series": ["x.hea"],
            "dataset": "ptbxl"}),
        )
        .unwrap();
        assert_eq!(
            (s.data_source, o.to_string().as_str()),
            (Domain::Ecg, "ecg+key")
        );
        // keys must be non-empty strings
        let e = traced(
            json!({"problem": "q", "answer": "a", "images": ["ct/x/a.png"],
            "dataset": 3}),
        );
        assert!(e.unwrap_err().contains("field `dataset` must be a string"));
        let e = traced(
            json!({"problem": "q", "answer": "a", "images": ["ct/x/a.png"],
            "data_source": " "}),
        );
        assert!(e.unwrap_err().contains("field `data_source` is empty"));
    }

    #[test]
    fn absolute_path_without_keys_is_an_error_naming_the_fix() {
        let e = traced(json!({"problem": "q", "answer": "a", "images": ["/tmp/x/derm/a.png"]}))
            .unwrap_err();
        assert!(e.contains("`/tmp/x/derm/a.png` is absolute"), "{e}");
        assert!(e.contains("add \"data_source\" and \"dataset\""), "{e}");
        // with one key, the error asks for the other only
        let e = traced(
            json!({"problem": "q", "answer": "a", "images": ["/tmp/x/derm/a.png"],
            "data_source": "derm"}),
        )
        .unwrap_err();
        assert!(e.contains("add \"dataset\" to the row"), "{e}");
        // with both keys the row is accepted and the path kept as given
        let (s, o) = traced(
            json!({"problem": "q", "answer": "a", "images": ["/tmp/x/derm/a.png"],
            "data_source": "derm", "dataset": "ham10000"}),
        )
        .unwrap();
        assert_eq!(
            (s.data_source, s.dataset.as_str()),
            (Domain::Dermoscopy, "ham10000")
        );
        assert_eq!(s.images, vec![PathBuf::from("/tmp/x/derm/a.png")]);
        assert_eq!(o.to_string(), "keys");
        // a path leaving the manifest's folder names no domain either
        let e = traced(json!({"problem": "q", "answer": "a", "images": ["../derm/ham/a.png"]}))
            .unwrap_err();
        assert!(e.contains("leaves the manifest's folder"), "{e}");
    }

    #[test]
    fn rows_without_the_layout_are_accepted_when_they_name_their_domain() {
        let (s, o) = traced(json!({"problem": "q", "answer": "a", "images": ["a.png"],
            "data_source": "fundus", "dataset": "aptos"}))
        .unwrap();
        assert_eq!(
            (s.data_source, s.dataset.as_str()),
            (Domain::Fundus, "aptos")
        );
        assert_eq!(o.to_string(), "keys");
        // one folder is not the layout: the folder is not taken as the data source
        let e = traced(
            json!({"problem": "q", "answer": "a", "images": ["images/a.png"],
            "dataset": "aptos"}),
        )
        .unwrap_err();
        assert!(
            e.contains("not laid out as <data_source>/<dataset>/<file>"),
            "{e}"
        );
        assert!(e.contains("add \"data_source\" to the row"), "{e}");
        let e = traced(json!({"problem": "q", "answer": "a", "images": ["a.png"]})).unwrap_err();
        assert!(e.contains("add \"data_source\" and \"dataset\""), "{e}");
    }

    #[test]
    fn domain_errors_name_the_manifest_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(
            &path,
            "{\"problem\": \"q\", \"answer\": \"a\", \"images\": [\"ct/x/1.png\"]}\n\
             {\"problem\": \"q\", \"answer\": \"a\", \"images\": [\"/abs/ct/x/2.png\"]}\n",
        )
        .unwrap();
        let m = Manifest::open(&path, ManifestConfig::default()).unwrap();
        let rows: Vec<_> = m.rows_traced().unwrap().collect();
        assert_eq!(rows[0].as_ref().unwrap().1.to_string(), "path");
        let e = rows[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("m.jsonl:2:") && e.contains("is absolute"), "{e}");
        assert!(e.contains("\"data_source\" and \"dataset\""), "{e}");
    }

    #[test]
    fn ecg_only_rows_need_their_dataset() {
        let s = parse(json!({"problem": "q", "answer": "MI", "images": [],
            "time-series": ["ecg/x.hea"], "dataset": "ptbxl"}))
        .unwrap();
        assert_eq!((s.data_source, s.dataset.as_str()), (Domain::Ecg, "ptbxl"));
        let e = parse(json!({"problem": "q", "answer": "MI", "time-series": ["x.hea"]}));
        assert!(e.unwrap_err().contains("ECG-only row"));
        let e = parse(json!({"problem": "q", "answer": "MI", "images": []}));
        assert_eq!(e.unwrap_err(), "No modality found.");
    }

    #[test]
    fn placeholder_rules_follow_the_reference() {
        assert_eq!(
            normalise_placeholders("<video> q", 2).unwrap(),
            "<image> <image>  q"
        );
        assert_eq!(normalise_placeholders("q", 1).unwrap(), "<image> q");
        assert_eq!(
            normalise_placeholders("a <image> b", 3).unwrap(),
            "a <image> <image> <image>  b"
        );
        assert!(normalise_placeholders("<image><image><image>", 2).is_err());
    }

    #[test]
    fn options_follow_the_climb_wording() {
        let opts = vec!["Normal".to_string(), "MI".to_string()];
        assert_eq!(
            with_options("What is it?", &opts),
            "What is it?Answer with one of the following:\nNormal\nMI"
        );
        assert_eq!(
            with_options("Diagnosis", &opts),
            "Diagnosis Answer with one of the following:\nNormal\nMI"
        );
        assert_eq!(with_options("Q", &[]), "Q");
    }

    #[test]
    fn a_system_message_is_read_from_its_key_and_checked() {
        let s = parse(
            json!({"problem": "q", "answer": "a", "images": ["x/y/z.png"],
            "system": "You are a radiologist."}),
        )
        .unwrap();
        assert_eq!(s.system.as_deref(), Some("You are a radiologist."));
        assert!(!s.extra.contains_key("system"));
        let e = parse(
            json!({"problem": "q", "answer": "a", "images": ["x/y/z.png"],
            "system": 3}),
        );
        assert!(e.unwrap_err().contains("`system`"));
        assert_eq!(
            parse(json!({"problem": "q", "answer": "a", "images": ["x/y/z.png"]}))
                .unwrap()
                .system,
            None
        );
    }

    #[test]
    fn rows_count_frames_per_volume_and_one_placeholder_image_at_least() {
        assert_eq!(expected_images(0, 0, 2), 1);
        assert_eq!(expected_images(1, 2, 4), 9);
        let cfg = ManifestConfig {
            video_frames: 4,
            ..ManifestConfig::default()
        };
        let s = parse_row(
            json!({"problem": "<video>\nq", "answer": "a", "videos": ["ct/d/v.nii.gz"]}),
            &cfg,
            Path::new("/data"),
            "m",
            1,
        )
        .unwrap();
        assert_eq!(s.problem, "<image> <image> <image> <image> \nq");
    }

    #[test]
    fn special_questions_set_the_reference_datasets() {
        let s = parse(
            json!({"problem": "How long will the patient stay in the hospital?",
            "answer": "0-4", "images": ["chest_xray/mimic/a.png"]}),
        )
        .unwrap();
        assert_eq!(
            (s.data_source, s.dataset.as_str()),
            (Domain::Multimodal, "los_prediction")
        );
        // the row's own keys win over the question rule
        let (s, o) = traced(
            json!({"problem": "Will the patient survive for at least 48 hours?",
            "answer": "yes", "images": ["chest_xray/mimic/a.png"], "dataset": "ihm"}),
        )
        .unwrap();
        assert_eq!(
            (s.dataset.as_str(), o.to_string().as_str()),
            ("ihm", "path+key")
        );
        let (s, o) = traced(
            json!({"problem": "Will the patient survive for at least 48 hours?",
            "answer": "yes", "images": ["chest_xray/mimic/a.png"]}),
        )
        .unwrap();
        assert_eq!(
            (s.dataset.as_str(), o.to_string().as_str()),
            ("48_ihm", "path+question")
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let e = parse(
            json!({"problem": "q", "answer": "a", "images": ["x/y/z.png"],
            "bbox": [1, 2, "x", 4]}),
        );
        assert!(e.unwrap_err().contains("bbox"));
        let e = parse(json!({"answer": "a", "images": ["x/y/z.png"]}));
        assert!(e.unwrap_err().contains("problem"));
        let strict = ManifestConfig {
            require_image_key: true,
            ..ManifestConfig::default()
        };
        let e = parse_row(
            json!({"problem": "q", "answer": "a", "time-series": ["t"],
            "dataset": "d"}),
            &strict,
            Path::new("."),
            "m",
            1,
        );
        assert!(e.unwrap_err().contains("KeyError"));
    }

    fn write_manifest(rows: usize, bad_line: Option<usize>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut text = String::new();
        for i in 0..rows {
            if Some(i) == bad_line {
                text.push_str("{not json\n");
            } else {
                text.push_str(&format!(
                    "{{\"problem\": \"q{i}\", \"answer\": \"a\", \"images\": [\"ct/set/{i}.png\"]}}\n\n"
                ));
            }
        }
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn malformed_lines_are_reported_with_their_line_number() {
        let (_d, path) = write_manifest(4, Some(2));
        let m = Manifest::open(&path, ManifestConfig::default()).unwrap();
        assert_eq!(m.len(), 4);
        let results: Vec<_> = m.rows().unwrap().collect();
        let err = results[2].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("m.jsonl:5:") && err.contains("malformed JSON"),
            "{err}"
        );
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    }

    #[test]
    fn bad_rows_are_skipped_and_counted_when_asked() {
        let (_d, path) = write_manifest(6, Some(3));
        let m = Manifest::open(&path, ManifestConfig::default()).unwrap();
        let mut rows = m.rows_skipping_bad().unwrap();
        let good: Vec<_> = rows.by_ref().map(|r| r.unwrap().problem).collect();
        assert_eq!(good.len(), 5);
        assert_eq!(rows.skipped_count(), 1);
        assert_eq!(rows.skipped()[0].line, 7);
        assert!(rows.skipped()[0].reason.contains("malformed JSON"));
        // training stream: off by default (the error is yielded), on with skip_bad_rows
        let strict: Vec<_> = m
            .training_rows(1, Cursor::default())
            .unwrap()
            .take(6)
            .collect();
        assert_eq!(strict.iter().filter(|(_, r)| r.is_err()).count(), 1);
        let cfg = ManifestConfig {
            skip_bad_rows: true,
            ..ManifestConfig::default()
        };
        let m = Manifest::open(&path, cfg).unwrap();
        let mut train = m.training_rows(1, Cursor::default()).unwrap();
        let first: Vec<_> = train.by_ref().take(11).collect();
        assert!(first.iter().all(|(_, r)| r.is_ok()));
        // epochs 0 and 1 were passed in full; epoch 2 perhaps met its bad row already
        assert!((2..=3).contains(&train.skipped_count()));
        assert_eq!(first[10].0.epoch, 2);
        assert!(train.skipped().iter().all(|s| s.line == 7));
        // a manifest of only bad rows ends instead of spinning
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{x\n{y\n").unwrap();
        let cfg = ManifestConfig {
            skip_bad_rows: true,
            ..ManifestConfig::default()
        };
        let m = Manifest::open(&bad, cfg).unwrap();
        let mut train = m.training_rows(0, Cursor::default()).unwrap();
        assert!(train.next().is_none());
        assert_eq!(train.skipped_count(), 2);
    }

    #[test]
    fn a_preshuffled_unshuffled_order_is_one_fixed_permutation_every_epoch() {
        let (_d, path) = write_manifest(20, None);
        let plain = Manifest::open(&path, ManifestConfig::default()).unwrap();
        let identity: Vec<u32> = (0..20).collect();
        // No pre-shuffle, no epoch shuffle: file order.
        let m = Manifest::open(&path, ManifestConfig::default())
            .unwrap()
            .with_row_order(RowOrder {
                preshuffle_seed: None,
                shuffle: false,
            });
        assert_eq!(m.epoch_order(1, 0), identity);
        // The default rule is the order of `open`.
        let d = Manifest::open(&path, ManifestConfig::default())
            .unwrap()
            .with_row_order(RowOrder::default());
        assert_eq!(d.epoch_order(1, 3), plain.epoch_order(1, 3));
        // Pre-shuffled with 42, epochs unshuffled: one permutation, the same in every epoch and
        // for every sampler seed, and another one for another pre-shuffle seed.
        let order = |seed| RowOrder {
            preshuffle_seed: Some(seed),
            shuffle: false,
        };
        let m42 = Manifest::open(&path, ManifestConfig::default())
            .unwrap()
            .with_row_order(order(42));
        let p = m42.epoch_order(1, 0);
        assert_ne!(p, identity);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, identity);
        assert_eq!(m42.epoch_order(1, 1), p);
        assert_eq!(m42.epoch_order(7, 0), p);
        let m43 = Manifest::open(&path, ManifestConfig::default())
            .unwrap()
            .with_row_order(order(43));
        assert_ne!(m43.epoch_order(1, 0), p);
        // The stream reads rows in that order.
        let rows: Vec<String> = m42
            .shuffled(1, Cursor::default())
            .unwrap()
            .take(20)
            .map(|(_, r)| r.unwrap().problem)
            .collect();
        let want: Vec<String> = p.iter().map(|i| format!("<image> q{i}")).collect();
        assert_eq!(rows, want);
    }

    #[test]
    fn shuffled_iteration_is_seeded_complete_and_resumable() {
        let (_d, path) = write_manifest(50, None);
        let m = Manifest::open(&path, ManifestConfig::default()).unwrap();
        let all: Vec<_> = m
            .shuffled(3, Cursor::default())
            .unwrap()
            .take(120)
            .map(|(c, r)| (c, r.unwrap().problem))
            .collect();
        // epoch 0 visits every row once, in a seeded non-identity order
        let mut first: Vec<_> = all[..50].iter().map(|(_, p)| p.clone()).collect();
        let in_file: Vec<_> = (0..50).map(|i| format!("<image> q{i}")).collect();
        assert_ne!(first, in_file);
        first.sort();
        let mut sorted = in_file.clone();
        sorted.sort();
        assert_eq!(first, sorted);
        assert_eq!(
            all[50].0,
            Cursor {
                epoch: 1,
                position: 1
            }
        );
        // epochs differ, and a resumed iterator continues exactly where the first stopped
        assert_ne!(m.epoch_order(3, 0), m.epoch_order(3, 1));
        let resume_at = all[72].0;
        let resumed: Vec<_> = m
            .shuffled(3, resume_at)
            .unwrap()
            .take(47)
            .map(|(c, r)| (c, r.unwrap().problem))
            .collect();
        assert_eq!(&resumed[..], &all[73..120]);
    }
}

/// Counts of a full streaming pass over a manifest (see [`scan_manifest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanStats {
    pub rows: usize,
    pub bad_rows: usize,
}

/// Index a manifest and decode every row in file order without touching the files it names:
/// the cost of streaming a manifest, as measured by `qoq bench manifest`.
pub fn scan_manifest(path: &Path, cfg: ManifestConfig) -> Result<ScanStats> {
    let m = Manifest::open(path, cfg)?;
    let mut stats = ScanStats::default();
    for row in m.rows()? {
        match row {
            Ok(_) => stats.rows += 1,
            Err(Error::Row { .. }) => stats.bad_rows += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    #[test]
    fn scan_counts_good_and_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(
            &path,
            "{\"problem\": \"q\", \"answer\": \"a\", \"images\": [\"ct/x/1.png\"]}\n{bad\n",
        )
        .unwrap();
        let s = scan_manifest(&path, ManifestConfig::default()).unwrap();
        assert_eq!(
            s,
            ScanStats {
                rows: 1,
                bad_rows: 1
            }
        );
    }
}
