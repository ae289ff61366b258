//! Supervised pre-training of a model's ECG-JEPA encoder on labelled ECGs (`qoq model
//! pretrain-ecg`, and the demo's first training phase).
//!
//! QoQ-Med starts from a *pre-trained* ECG-JEPA (spec §5.3: the merged checkpoint carries
//! Kim 2024's self-supervised weights); a model written with random weights (`qoq model init`,
//! the demo) has none, and its random encoder hands the decoder one token whose ECG-dependent
//! part is a few per mille of its size (the fixed sin-cos table dominates every patch token): in
//! the demo, SFT left the ECG domain at its label prior in every seed. This phase stands in for
//! the pre-trained encoder: the encoder's pooled representation (`TimeSeriesEmbedding::encode`,
//! the `(b, embed_dim)` vector the projector reads) feeds a linear head over each dataset's
//! answers, trained with cross-entropy restricted to the row's own dataset's answers (two
//! datasets may name the same class differently, and a label of another dataset is never a
//! possible answer). Only the encoder's weights are written back; the head is discarded, the
//! projector and everything else are copied unchanged. It is supervised on the training split's
//! answers, not ECG-JEPA's self-supervised objective: the README says so.
//!
//! Rows without a time series are skipped; rows are drawn in seeded shuffled epochs; AdamW with
//! a linear warm-up, no weight decay, the global norm clipped at 1. A non-finite loss or gradient
//! is an error naming the step.

use candle_core::{DType, Device, Tensor, Var};
use qoq_data::manifest::{Manifest, ManifestConfig};
use qoq_model::ecg::TimeSeriesEmbedding;
use qoq_model::ops::ForwardMode;
use qoq_model::train::{Freeze, seeded_normal, trainable_var_builder};
use qoq_processor::{Processor, ProcessorOptions};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::optim::{AdamW, AdamWConfig, LrSchedule};

/// Prefix of the trained weights (the encoder; the projector `time_series_embedding.linear` is
/// not reached by the pooled representation and is left as it is).
const ENCODER: &str = "time_series_embedding.encoder.";
/// Logit offset of the answers of other datasets (their probability is `exp(-1e4)`, zero in f32).
const OTHER_DATASET: f32 = -1e4;
/// Rows per forward when measuring accuracy.
const EVAL_CHUNK: usize = 64;
/// Steps of linear learning-rate warm-up (fewer when the run is shorter).
const WARMUP: u64 = 10;

/// Errors of the pre-training; each names the file, row or step concerned.
#[derive(Debug, thiserror::Error)]
pub enum EcgPretrainError {
    /// A manifest, an ECG file or the model folder could not be read, or holds nothing to train.
    #[error("{path}: {message}", path = path.display())]
    Input { path: PathBuf, message: String },
    /// The options are invalid.
    #[error("{0}")]
    Options(String),
    /// The loss or a gradient stopped being finite.
    #[error("step {step}: {what} is not finite; lower the learning rate (--lr)")]
    NonFinite { step: u64, what: &'static str },
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, EcgPretrainError>;

/// What to train and how long.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EcgPretrainOptions {
    /// Optimiser steps.
    pub steps: u64,
    /// ECGs per step.
    pub batch_size: usize,
    /// Peak learning rate (after the warm-up).
    pub lr: f64,
    /// Seed of the head's initial weights and of the row order.
    pub seed: u64,
}

/// What a run did, also written as `ecg_pretrain.json` in the new model folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EcgPretrainReport {
    /// The options it ran with.
    pub options: EcgPretrainOptions,
    /// The model folder it started from and the training manifest.
    pub model: PathBuf,
    pub train_manifest: PathBuf,
    /// Training ECG rows (rows without a time series skipped).
    pub train_rows: usize,
    /// The answers of every dataset, sorted.
    pub labels: BTreeMap<String, Vec<String>>,
    /// Mean loss over the first and the last (up to) 10 steps.
    pub first_loss: f64,
    pub last_loss: f64,
    /// Share of the training ECGs whose answer the head picks among their dataset's, after
    /// training.
    pub train_accuracy: f64,
    /// The same over the validation manifest's ECGs, when one was given.
    pub val_manifest: Option<PathBuf>,
    pub val_rows: usize,
    pub val_accuracy: Option<f64>,
    /// Wall time of loading, training and measuring, in seconds.
    pub seconds: f64,
}

/// ECG inputs with their answer column and the columns of their dataset.
struct EcgSet {
    /// `rows * leads * samples` values.
    x: Vec<f32>,
    targets: Vec<u32>,
    datasets: Vec<usize>,
}

impl EcgSet {
    fn len(&self) -> usize {
        self.targets.len()
    }
}

/// Dataset answers as head columns: dataset `d`'s answers are the columns
/// `offsets[d] .. offsets[d] + labels[d].len()`.
struct Columns {
    names: Vec<String>,
    labels: Vec<Vec<String>>,
    offsets: Vec<usize>,
    width: usize,
}

impl Columns {
    fn new(found: BTreeMap<String, BTreeSet<String>>) -> Self {
        let (mut names, mut labels, mut offsets, mut width) = (vec![], vec![], vec![], 0);
        for (name, answers) in found {
            offsets.push(width);
            width += answers.len();
            names.push(name);
            labels.push(answers.into_iter().collect());
        }
        Self {
            names,
            labels,
            offsets,
            width,
        }
    }

    /// `(dataset index, column)` of an answer, if the training rows had it.
    fn column(&self, dataset: &str, answer: &str) -> Option<(usize, u32)> {
        let d = self.names.iter().position(|n| n == dataset)?;
        let a = self.labels[d].iter().position(|l| l == answer)?;
        Some((d, (self.offsets[d] + a) as u32))
    }

    /// `(rows, width)`: 0 on each row's dataset's columns, [`OTHER_DATASET`] elsewhere.
    fn mask(&self, datasets: &[usize], dev: &Device) -> candle_core::Result<Tensor> {
        let mut m = vec![OTHER_DATASET; datasets.len() * self.width];
        for (r, &d) in datasets.iter().enumerate() {
            let start = r * self.width + self.offsets[d];
            m[start..start + self.labels[d].len()].fill(0.0);
        }
        Tensor::from_vec(m, (datasets.len(), self.width), dev)
    }
}

/// The ECG rows of a manifest (default keys, as `qoq synth` and the reference write them):
/// `(ECG input as the model takes it, dataset, answer, line)`.
fn ecg_rows(path: &Path, proc: &Processor) -> Result<Vec<(Vec<f32>, String, String, u64)>> {
    let input = |message: String| EcgPretrainError::Input {
        path: path.to_path_buf(),
        message,
    };
    let manifest =
        Manifest::open(path, ManifestConfig::default()).map_err(|e| input(e.to_string()))?;
    let mut out = Vec::new();
    for row in manifest.rows().map_err(|e| input(e.to_string()))? {
        let s = row.map_err(|e| input(e.to_string()))?;
        if s.time_series.is_empty() {
            continue;
        }
        let x = proc
            .load_sample_ecg(&s)
            .map_err(|e| input(format!("line {}: {e}", s.line)))?;
        if s.answer.trim().is_empty() {
            return Err(input(format!("line {}: the answer is empty", s.line)));
        }
        out.push((x, s.dataset.clone(), s.answer.trim().to_string(), s.line));
    }
    Ok(out)
}

/// Pre-trains the ECG-JEPA encoder of the model folder `model` on the ECG rows of `train`
/// (measuring on `val`'s when given) and writes the model with the new encoder to `out`, which
/// must not exist or be empty. `processor` are the options the model's inputs are prepared with
/// (written to `out` as its `qoq_processor.json`). Runs on the CPU.
pub fn pretrain_ecg_encoder(
    model: &Path,
    train: &Path,
    val: Option<&Path>,
    out: &Path,
    processor: &ProcessorOptions,
    options: &EcgPretrainOptions,
) -> Result<EcgPretrainReport> {
    let start = Instant::now();
    if options.steps == 0 || options.batch_size == 0 {
        return Err(EcgPretrainError::Options(
            "steps and batch size must be at least 1".into(),
        ));
    }
    if !(options.lr.is_finite() && options.lr > 0.0) {
        return Err(EcgPretrainError::Options(format!(
            "the learning rate must be positive, got {}",
            options.lr
        )));
    }
    let out_err = |message: String| EcgPretrainError::Input {
        path: out.to_path_buf(),
        message,
    };
    qoq_model::init::require_new_folder(out)
        .map_err(|e| EcgPretrainError::Options(e.to_string()))?;
    let model_err = |message: String| EcgPretrainError::Input {
        path: model.to_path_buf(),
        message,
    };
    let cfg = qoq_model::loading::read_config(model).map_err(|e| model_err(e.to_string()))?;
    if !cfg.has_time_series() {
        return Err(model_err(
            "the model has no time-series encoder (config.json time_series_config)".into(),
        ));
    }
    let proc = Processor::from_model_dir(model, None, processor.clone())
        .map_err(|e| model_err(e.to_string()))?;

    // Data: the training rows decide the datasets and their answers.
    let rows = ecg_rows(train, &proc)?;
    if rows.is_empty() {
        return Err(EcgPretrainError::Input {
            path: train.to_path_buf(),
            message: "no row has a time series: nothing to pre-train the ECG encoder on".into(),
        });
    }
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, d, a, _) in &rows {
        found.entry(d.clone()).or_default().insert(a.clone());
    }
    let cols = Columns::new(found);
    let to_set = |rows: Vec<(Vec<f32>, String, String, u64)>, path: &Path| -> Result<EcgSet> {
        let mut set = EcgSet {
            x: Vec::with_capacity(rows.len() * rows.first().map_or(0, |r| r.0.len())),
            targets: Vec::new(),
            datasets: Vec::new(),
        };
        for (x, d, a, line) in rows {
            let (di, col) = cols.column(&d, &a).ok_or_else(|| EcgPretrainError::Input {
                path: path.to_path_buf(),
                message: format!(
                    "line {line}: answer {a:?} of dataset {d:?} is not among the training ECGs' answers"
                ),
            })?;
            set.x.extend_from_slice(&x);
            set.targets.push(col);
            set.datasets.push(di);
        }
        Ok(set)
    };
    let train_set = to_set(rows, train)?;
    let val_set = match val {
        Some(p) => Some(to_set(ecg_rows(p, &proc)?, p)?),
        None => None,
    };

    // Model: the encoder as variables, a fresh linear head.
    let dev = Device::Cpu;
    let (vb, layout) = qoq_model::loading::checkpoint_var_builder(model, DType::F32, &dev)
        .map_err(|e| model_err(e.to_string()))?;
    let (vb, store) = trainable_var_builder(vb, Freeze::default());
    let ts = &cfg.time_series;
    let emb = TimeSeriesEmbedding::new(ts, cfg.text.hidden_size, vb.pp("time_series_embedding"))?;
    let encoder: Vec<(String, Var)> = store
        .trainable()
        .map_err(|e| model_err(e.to_string()))?
        .into_iter()
        .filter(|(n, _)| n.starts_with(ENCODER))
        .collect();
    let d = ts.embed_dim;
    let head_w = seeded_normal(
        "ecg_pretrain.head.weight",
        &[cols.width, d],
        0.02,
        options.seed,
        DType::F32,
        &dev,
    )
    .map_err(|e| EcgPretrainError::Options(e.to_string()))?;
    let head_w = Var::from_tensor(&head_w)?;
    let head_b = Var::from_tensor(&Tensor::zeros(cols.width, DType::F32, &dev)?)?;
    let mut params = encoder.clone();
    params.push(("ecg_pretrain.head.weight".into(), head_w.clone()));
    params.push(("ecg_pretrain.head.bias".into(), head_b.clone()));
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr: options.lr,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            schedule: LrSchedule::Constant {
                warmup_steps: WARMUP.min(options.steps.saturating_sub(1)),
            },
            ..AdamWConfig::default()
        },
    )?;
    let per_row = ts.leads * ts.patches_per_lead * ts.patch_size;
    let logits = |x: &[f32], datasets: &[usize], mode: ForwardMode| -> Result<Tensor> {
        let b = datasets.len();
        let x = Tensor::from_slice(x, (b, ts.leads, per_row / ts.leads), &dev)?;
        let h = emb.encode(&x, mode)?;
        let z = h
            .matmul(&head_w.as_tensor().t()?)?
            .broadcast_add(head_b.as_tensor())?;
        Ok((z + cols.mask(datasets, &dev)?)?)
    };
    let accuracy = |set: &EcgSet| -> Result<f64> {
        let mut right = 0usize;
        for start in (0..set.len()).step_by(EVAL_CHUNK) {
            let end = (start + EVAL_CHUNK).min(set.len());
            let z = logits(
                &set.x[start * per_row..end * per_row],
                &set.datasets[start..end],
                ForwardMode::Inference,
            )?;
            let picked = z.argmax(1)?.to_vec1::<u32>()?;
            right += picked
                .iter()
                .zip(&set.targets[start..end])
                .filter(|(p, t)| p == t)
                .count();
        }
        Ok(right as f64 / set.len().max(1) as f64)
    };

    // Training: seeded shuffled epochs over the rows.
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut losses = Vec::with_capacity(options.steps as usize);
    for step in 1..=options.steps {
        let mut batch = Vec::with_capacity(options.batch_size);
        while batch.len() < options.batch_size {
            if order.is_empty() {
                order = (0..train_set.len()).collect();
                order.shuffle(&mut rng);
            }
            batch.extend(order.pop());
        }
        let mut x = Vec::with_capacity(batch.len() * per_row);
        for &r in &batch {
            x.extend_from_slice(&train_set.x[r * per_row..(r + 1) * per_row]);
        }
        let datasets: Vec<usize> = batch.iter().map(|&r| train_set.datasets[r]).collect();
        let targets: Vec<u32> = batch.iter().map(|&r| train_set.targets[r]).collect();
        let z = logits(&x, &datasets, ForwardMode::Train)?;
        let loss = candle_nn::loss::cross_entropy(&z, &Tensor::new(targets.as_slice(), &dev)?)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(EcgPretrainError::NonFinite {
                step,
                what: "the loss",
            });
        }
        let mut grads = loss.backward()?;
        let report = opt.step_owned(opt.grads_of(&mut grads))?;
        if report.skipped {
            return Err(EcgPretrainError::NonFinite {
                step,
                what: "the gradient norm",
            });
        }
        losses.push(value);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let k = losses.len().min(10);
    let train_accuracy = accuracy(&train_set)?;
    let val_accuracy = match &val_set {
        Some(s) => Some(accuracy(s)?),
        None => None,
    };

    // The model folder with the new encoder (in the checkpoint's dtypes), every other tensor
    // streamed from the source's files as it was, in their shard layout.
    let mut replace: HashMap<String, Tensor> = HashMap::with_capacity(encoder.len());
    for (name, var) in &encoder {
        replace.insert(layout.checkpoint_name(name), var.as_tensor().detach());
    }
    qoq_model::init::export_replacing(out, model, &replace, processor)
        .map_err(|e| out_err(e.to_string()))?;
    let report = EcgPretrainReport {
        options: options.clone(),
        model: model.to_path_buf(),
        train_manifest: train.to_path_buf(),
        train_rows: train_set.len(),
        labels: cols
            .names
            .iter()
            .cloned()
            .zip(cols.labels.iter().cloned())
            .collect(),
        first_loss: mean(&losses[..k]),
        last_loss: mean(&losses[losses.len() - k..]),
        train_accuracy,
        val_manifest: val.map(Path::to_path_buf),
        val_rows: val_set.as_ref().map_or(0, EcgSet::len),
        val_accuracy,
        seconds: start.elapsed().as_secs_f64(),
    };
    let path = out.join("ecg_pretrain.json");
    let text = serde_json::to_string_pretty(&report).map_err(|e| out_err(e.to_string()))? + "\n";
    std::fs::write(&path, text).map_err(|e| EcgPretrainError::Input {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(report)
}

/// One line for a terminal: rows, steps, loss and accuracies, where the model went.
pub fn summary(r: &EcgPretrainReport) -> String {
    let val = match r.val_accuracy {
        Some(a) => format!(", {:.1} % on {} held-out ECGs", 100.0 * a, r.val_rows),
        None => String::new(),
    };
    format!(
        "ECG encoder: {} steps on {} ECGs of {} datasets, loss {:.3} -> {:.3}, answers right {:.1} % on the training ECGs{val} ({:.0} s)",
        r.options.steps,
        r.train_rows,
        r.labels.len(),
        r.first_loss,
        r.last_loss,
        100.0 * r.train_accuracy,
        r.seconds
    )
}
