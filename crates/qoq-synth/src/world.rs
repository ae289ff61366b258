//! The synthetic clinical world: nine domains named as the paper's, their datasets and classes,
//! the paper's kind of imbalance compressed to a laptop, written in the training schema (spec §2.1).
//!
//! Layout of a world directory:
//! ```text
//! world.json                      config + per-dataset class counts per split
//! train.jsonl, test.jsonl         manifests (paths relative to the world directory)
//! <data_source>/<dataset>/<split>/<id>.png | .nii.gz | .hea + .dat, <id>_mask.png
//! ```
//! Every sample draws from its own ChaCha8 stream seeded by (seed, dataset, split, index), so the
//! world is byte-reproducible and can be generated in parallel.

use crate::canvas::{Canvas, Mask};
use crate::ecgsyn::{self, EcgClass, LEADS_12};
use crate::error::{Error, Result, io};
use crate::render;
use qoq_core::Domain;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// How big and how skewed the world is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorldConfig {
    /// Master seed.
    pub seed: u64,
    /// Side of every 2-D image and volume slice, in pixels.
    pub image_size: usize,
    /// Slices per 3-D volume.
    pub volume_slices: usize,
    /// Training rows of the largest domain (CT, as RSPECT makes CT the largest in the paper).
    pub largest_domain_rows: usize,
    /// Ratio of training rows between the largest and the rarest domain (ultrasound).
    pub domain_imbalance: f64,
    /// Ratio between the most and the least frequent class inside a dataset's training split.
    pub class_imbalance: f64,
    /// Test rows per class per dataset (the test split is balanced).
    pub test_per_class: usize,
    /// ECG sampling rate (Hz) and duration (s): 250 Hz x 10 s is the model's 2500 samples.
    pub ecg_fs: f64,
    pub ecg_seconds: f64,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            seed: 0,
            image_size: 56,
            volume_slices: 8,
            largest_domain_rows: 600,
            domain_imbalance: 100.0,
            class_imbalance: 4.0,
            test_per_class: 8,
            ecg_fs: 250.0,
            ecg_seconds: 10.0,
        }
    }
}

/// What a dataset's samples are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One 2-D image; the renderer is chosen by the domain (`site` varies the acquisition).
    Image { site: u8 },
    /// A 3-D volume written as NIfTI-1 and given to the model as `videos`.
    Volume,
    /// A 12-lead ECG written as a WFDB record and given as `time-series`.
    Ecg,
}

/// One dataset of the world.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    pub domain: Domain,
    pub name: &'static str,
    pub kind: Kind,
    /// Labels, the most frequent first.
    pub labels: &'static [&'static str],
    /// Share of its domain's training rows.
    pub share: f64,
    /// "chest X-ray image", "CT scan", ...
    pub phrase: &'static str,
    /// The CLIMB-style question, ending without a space before "Answer with".
    pub question: &'static str,
}

/// The world's datasets. Domain order is by size, largest first, as in the paper's data (§2.2).
pub fn catalog() -> Vec<DatasetSpec> {
    use Domain::*;
    let d = |domain, name, kind, labels, share, phrase, question| DatasetSpec {
        domain,
        name,
        kind,
        labels,
        share,
        phrase,
        question,
    };
    vec![
        d(
            Ct,
            "synth-chest-ct",
            Kind::Volume,
            &["No finding", "Lung nodule", "Lung mass"][..],
            1.0,
            "chest CT scan",
            "What abnormality is present in the chest CT?",
        ),
        d(
            ChestXray,
            "synth-cxr",
            Kind::Image { site: 0 },
            &["No Finding", "Nodule", "Pleural Effusion", "Cardiomegaly"][..],
            0.7,
            "chest X-ray image",
            "What is the diagnosis of the patient in the X-ray image?",
        ),
        d(
            ChestXray,
            "synth-cxr-site2",
            Kind::Image { site: 1 },
            &["No Finding", "Nodule", "Pleural Effusion", "Cardiomegaly"][..],
            0.3,
            "chest X-ray image",
            "What is the diagnosis of the patient in the X-ray image?",
        ),
        d(
            Ecg,
            "synth-ecg-rhythm",
            Kind::Ecg,
            &[
                "Normal sinus rhythm",
                "Atrial fibrillation",
                "Sinus bradycardia",
                "Sinus tachycardia",
            ][..],
            0.7,
            "12-lead electrocardiogram (ECG)",
            "What is the rhythm of the patient's ECG?",
        ),
        d(
            Ecg,
            "synth-ecg-st",
            Kind::Ecg,
            &["Normal", "ST elevation"][..],
            0.3,
            "12-lead electrocardiogram (ECG)",
            "Does the patient's ECG show ST elevation?",
        ),
        d(
            Dermoscopy,
            "synth-derm",
            Kind::Image { site: 0 },
            &["Nevus", "Basal cell carcinoma", "Melanoma"][..],
            1.0,
            "dermoscopy image",
            "What is the diagnosis of the skin lesion?",
        ),
        d(
            Pathology,
            "synth-path",
            Kind::Image { site: 0 },
            &["Benign tissue", "Adenocarcinoma", "Squamous cell carcinoma"][..],
            1.0,
            "pathology image",
            "What type of tissue is shown in the pathology image?",
        ),
        d(
            Mammography,
            "synth-mammo",
            Kind::Image { site: 0 },
            &["BI-RADS 1", "BI-RADS 2", "BI-RADS 5"][..],
            1.0,
            "mammography image",
            "What is the BI-RADS category of the mammogram?",
        ),
        d(
            Fundus,
            "synth-fundus",
            Kind::Image { site: 0 },
            &["Normal", "Diabetic retinopathy", "Glaucoma"][..],
            1.0,
            "fundus image",
            "What is the diagnosis of the patient's retina?",
        ),
        d(
            Mri,
            "synth-brain-mri",
            Kind::Volume,
            &["No tumor", "Glioma", "Meningioma", "Pituitary tumor"][..],
            1.0,
            "brain MRI scan",
            "What type of tumor, if any, is present in the brain MRI?",
        ),
        d(
            Ultrasound,
            "synth-breast-us",
            Kind::Image { site: 0 },
            &["Normal", "Benign", "Malignant"][..],
            1.0,
            "breast ultrasound image",
            "What is the diagnosis of the breast ultrasound?",
        ),
    ]
}

/// The domains by size rank, largest first.
pub const DOMAIN_RANK: [Domain; 9] = [
    Domain::Ct,
    Domain::ChestXray,
    Domain::Ecg,
    Domain::Dermoscopy,
    Domain::Pathology,
    Domain::Mammography,
    Domain::Fundus,
    Domain::Mri,
    Domain::Ultrasound,
];

/// Class counts of one dataset split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub labels: Vec<String>,
    pub counts: Vec<usize>,
}

/// One dataset's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub data_source: String,
    pub dataset: String,
    pub train: SplitCounts,
    pub test: SplitCounts,
}

/// What [`generate`] wrote (also saved as `world.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorldSummary {
    pub config: WorldConfig,
    pub datasets: Vec<DatasetSummary>,
}

impl WorldSummary {
    /// Training rows per domain, in [`DOMAIN_RANK`] order.
    pub fn train_rows_per_domain(&self) -> Vec<(String, usize)> {
        DOMAIN_RANK
            .iter()
            .map(|d| {
                let n = self
                    .datasets
                    .iter()
                    .filter(|s| s.data_source == d.as_source())
                    .map(|s| s.train.counts.iter().sum::<usize>())
                    .sum();
                (d.as_source().to_string(), n)
            })
            .collect()
    }
}

/// Training rows of each domain: geometric in the size rank, from `largest` down to
/// `largest / imbalance`.
fn domain_rows(cfg: &WorldConfig, domain: &Domain) -> usize {
    let rank = DOMAIN_RANK.iter().position(|d| d == domain).unwrap_or(0) as f64;
    let last = (DOMAIN_RANK.len() - 1) as f64;
    let w = cfg.domain_imbalance.powf(-rank / last);
    (cfg.largest_domain_rows as f64 * w).round() as usize
}

/// Split `total` over classes with geometric weights (largest remainder), at least one each.
fn class_counts(total: usize, k: usize, imbalance: f64) -> Vec<usize> {
    let w: Vec<f64> = (0..k)
        .map(|i| imbalance.powf(-(i as f64) / (k.max(2) - 1) as f64))
        .collect();
    let sum: f64 = w.iter().sum();
    let total = total.max(k);
    let exact: Vec<f64> = w.iter().map(|x| x / sum * total as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| (x.floor() as usize).max(1)).collect();
    let mut order: Vec<usize> = (0..k).collect();
    let floors = counts.clone();
    order.sort_by(|&a, &b| {
        // Remainders after the at-least-one floor, so a bumped class is served last.
        let ra = exact[a] - floors[a] as f64;
        let rb = exact[b] - floors[b] as f64;
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let mut i = 0;
    while counts.iter().sum::<usize>() < total {
        counts[order[i % k]] += 1;
        i += 1;
    }
    while counts.iter().sum::<usize>() > total {
        // Only reachable through the at-least-one floor: take from the largest class.
        let j = (0..k).max_by_key(|&j| counts[j]).unwrap_or(0);
        counts[j] -= 1;
    }
    counts
}

fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser.
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn rng_for(seed: u64, dataset: usize, split: usize, index: usize) -> ChaCha8Rng {
    let s = mix(mix(mix(mix(seed) ^ dataset as u64) ^ split as u64) ^ index as u64);
    ChaCha8Rng::seed_from_u64(s)
}

/// A manifest row in the training schema, keys in the reference's order.
#[derive(Debug, Serialize)]
struct Row {
    problem: String,
    answer: String,
    images: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    videos: Vec<String>,
    #[serde(rename = "time-series", skip_serializing_if = "Vec::is_empty")]
    time_series: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segmentation_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bbox: Option<[usize; 4]>,
    dataset: String,
    id: String,
    split: String,
}

fn problem_text(spec: &DatasetSpec) -> String {
    let options = spec.labels.join("\n");
    let prefix = match spec.kind {
        Kind::Image { .. } => "<image>\n",
        Kind::Volume => "<video>\n",
        Kind::Ecg => "",
    };
    format!(
        "{prefix}Above is a {} of a patient. {}Answer with one of the following:\n{options}",
        spec.phrase, spec.question
    )
}

fn write_png(path: &Path, c: &Canvas) -> Result<()> {
    let color = if c.channels == 3 {
        image::ExtendedColorType::Rgb8
    } else {
        image::ExtendedColorType::L8
    };
    image::save_buffer(path, &c.to_u8(), c.width as u32, c.height as u32, color).map_err(|source| {
        Error::Image {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn write_mask(path: &Path, m: &Mask) -> Result<()> {
    image::save_buffer(
        path,
        &m.to_u8(),
        m.width as u32,
        m.height as u32,
        image::ExtendedColorType::L8,
    )
    .map_err(|source| Error::Image {
        path: path.to_path_buf(),
        source,
    })
}

/// Write slices (all `w x h`, 1 channel) as a gzipped NIfTI-1 volume of u8 with dims (w, h, d):
/// x (image column) varies fastest, then y (row), then the slice. Written by hand because the
/// `nifti` crate's writer needs `ndarray`, a dependency we would take for 40 lines.
pub fn write_nifti_u8(path: &Path, slices: &[Canvas]) -> Result<()> {
    let (w, h) = (slices[0].width, slices[0].height);
    let mut hdr = vec![0u8; 352];
    let put_i16 = |hdr: &mut Vec<u8>, at: usize, v: i16| {
        hdr[at..at + 2].copy_from_slice(&v.to_le_bytes());
    };
    let put_f32 = |hdr: &mut Vec<u8>, at: usize, v: f32| {
        hdr[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    hdr[0..4].copy_from_slice(&348i32.to_le_bytes());
    let dims = [3, w as i16, h as i16, slices.len() as i16, 1, 1, 1, 1];
    for (i, d) in dims.iter().enumerate() {
        put_i16(&mut hdr, 40 + 2 * i, *d);
    }
    put_i16(&mut hdr, 70, 2); // DT_UINT8
    put_i16(&mut hdr, 72, 8); // bitpix
    for (i, p) in [1.0f32, 1.0, 1.0, 1.0].iter().enumerate() {
        put_f32(&mut hdr, 76 + 4 * i, *p);
    }
    put_f32(&mut hdr, 108, 352.0); // vox_offset
    put_f32(&mut hdr, 112, 1.0); // scl_slope
    hdr[123] = 2; // xyzt_units: mm
    hdr[148..157].copy_from_slice(b"qoq-synth");
    hdr[344..348].copy_from_slice(b"n+1\0");
    let mut data = hdr;
    for s in slices {
        data.extend(s.to_u8());
    }
    let file = std::fs::File::create(path).map_err(io(path))?;
    let mut gz = flate2::GzBuilder::new().write(file, flate2::Compression::default());
    gz.write_all(&data).map_err(io(path))?;
    gz.finish().map_err(io(path))?;
    Ok(())
}

struct Case {
    row: Row,
}

fn make_case(
    cfg: &WorldConfig,
    root: &Path,
    ds_idx: usize,
    spec: &DatasetSpec,
    split: &str,
    index: usize,
    class: usize,
) -> Result<Case> {
    let split_idx = usize::from(split == "test");
    let mut rng = rng_for(cfg.seed, ds_idx, split_idx, index);
    let rel_dir = format!("{}/{}/{split}", spec.domain.as_source(), spec.name);
    let dir = root.join(&rel_dir);
    let id = format!("{}-{split}-{index:05}", spec.name);
    let s = cfg.image_size;
    let mut row = Row {
        problem: problem_text(spec),
        answer: spec.labels[class].to_string(),
        images: Vec::new(),
        videos: Vec::new(),
        time_series: Vec::new(),
        segmentation_path: None,
        bbox: None,
        dataset: spec.name.to_string(),
        id: id.clone(),
        split: split.to_string(),
    };
    let mask = match spec.kind {
        Kind::Image { site } => {
            let (img, mask) = match spec.domain {
                Domain::ChestXray => render::chest_xray(&mut rng, s, class, site),
                Domain::Mammography => render::mammography(&mut rng, s, class),
                Domain::Dermoscopy => {
                    // Labels are ordered by frequency; the renderer's classes are
                    // 0 nevus, 1 melanoma, 2 basal cell carcinoma.
                    let c = [0, 2, 1][class];
                    render::dermoscopy(&mut rng, s, c)
                }
                Domain::Fundus => render::fundus(&mut rng, s, class),
                Domain::Pathology => render::pathology(&mut rng, s, class),
                Domain::Ultrasound => render::ultrasound(&mut rng, s, class),
                ref d => return Err(Error::Config(format!("no 2-D renderer for domain {d}"))),
            };
            write_png(&dir.join(format!("{id}.png")), &img)?;
            row.images.push(format!("{rel_dir}/{id}.png"));
            mask
        }
        Kind::Volume => {
            let ct = spec.domain == Domain::Ct;
            let g = render::volume_geometry(&mut rng, s, class, ct);
            let n = cfg.volume_slices.max(2);
            let mut slices = Vec::with_capacity(n);
            let mut first_mask = None;
            for k in 0..n {
                let z = k as f32 / (n - 1) as f32;
                let (img, m) = if ct {
                    render::ct_slice(&mut rng, s, class, z, &g)
                } else {
                    render::mri_slice(&mut rng, s, class, z, &g)
                };
                if k == 0 {
                    first_mask = m;
                }
                slices.push(img);
            }
            write_nifti_u8(&dir.join(format!("{id}.nii.gz")), &slices)?;
            row.videos.push(format!("{rel_dir}/{id}.nii.gz"));
            first_mask
        }
        Kind::Ecg => {
            let class = match (spec.name, class) {
                ("synth-ecg-st", 1) => EcgClass::StElevation,
                ("synth-ecg-st", _) => EcgClass::NormalSinus,
                (_, 1) => EcgClass::AtrialFibrillation,
                (_, 2) => EcgClass::SinusBradycardia,
                (_, 3) => EcgClass::SinusTachycardia,
                _ => EcgClass::NormalSinus,
            };
            let e = ecgsyn::generate(&mut rng, class, cfg.ecg_fs, cfg.ecg_seconds);
            // 1 uV per ADC unit, format 16.
            let adc: Vec<Vec<i32>> = e
                .leads
                .iter()
                .map(|l| l.iter().map(|v| (v * 1000.0).round() as i32).collect())
                .collect();
            let signals: Vec<(String, f64, i32)> = LEADS_12
                .iter()
                .map(|n| (n.to_string(), 1000.0, 0))
                .collect();
            qoq_data::wfdb::write_record(&dir, &id, e.fs, 16, &signals, &adc)?;
            row.time_series.push(format!("{rel_dir}/{id}.hea"));
            None
        }
    };
    if let Some(m) = mask {
        write_mask(&dir.join(format!("{id}_mask.png")), &m)?;
        row.segmentation_path = Some(format!("{rel_dir}/{id}_mask.png"));
        row.bbox = m.bbox();
    }
    Ok(Case { row })
}

/// Generate the world into `root` (created if needed). Returns the summary also written to
/// `root/world.json`. Deterministic: the same config gives byte-identical files.
pub fn generate(cfg: &WorldConfig, root: &Path) -> Result<WorldSummary> {
    if cfg.image_size < 28 || cfg.image_size > 4096 {
        return Err(Error::Config(format!(
            "image_size {} is outside 28..=4096",
            cfg.image_size
        )));
    }
    if !(cfg.domain_imbalance >= 1.0 && cfg.class_imbalance >= 1.0) {
        return Err(Error::Config(
            "domain_imbalance and class_imbalance must be at least 1".into(),
        ));
    }
    if !(cfg.ecg_fs > 0.0 && cfg.ecg_seconds > 0.0) {
        return Err(Error::Config(
            "ecg_fs and ecg_seconds must be positive".into(),
        ));
    }
    let specs = catalog();
    let mut summaries = Vec::new();
    let mut lines: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for (ds_idx, spec) in specs.iter().enumerate() {
        let k = spec.labels.len();
        let train_total = (domain_rows(cfg, &spec.domain) as f64 * spec.share).round() as usize;
        let train = class_counts(train_total, k, cfg.class_imbalance);
        let test = vec![cfg.test_per_class; k];
        for (split_idx, (split, counts)) in [("train", &train), ("test", &test)].iter().enumerate()
        {
            std::fs::create_dir_all(root.join(format!(
                "{}/{}/{split}",
                spec.domain.as_source(),
                spec.name
            )))
            .map_err(io(root))?;
            let mut classes: Vec<usize> = counts
                .iter()
                .enumerate()
                .flat_map(|(c, &n)| std::iter::repeat_n(c, n))
                .collect();
            classes.shuffle(&mut rng_for(cfg.seed, ds_idx, split_idx, usize::MAX));
            let cases: Vec<Result<Case>> = classes
                .par_iter()
                .enumerate()
                .map(|(i, &c)| make_case(cfg, root, ds_idx, spec, split, i, c))
                .collect();
            for case in cases {
                let case = case?;
                lines[split_idx].push(
                    serde_json::to_string(&case.row)
                        .map_err(|e| Error::Config(format!("serialising a row: {e}")))?,
                );
            }
        }
        summaries.push(DatasetSummary {
            data_source: spec.domain.as_source().to_string(),
            dataset: spec.name.to_string(),
            train: SplitCounts {
                labels: spec.labels.iter().map(|s| s.to_string()).collect(),
                counts: train,
            },
            test: SplitCounts {
                labels: spec.labels.iter().map(|s| s.to_string()).collect(),
                counts: test,
            },
        });
    }
    // Interleave the training rows so that a streaming reader without shuffling still sees every
    // domain early: a fixed seeded permutation of the whole split.
    let mut order: Vec<usize> = (0..lines[0].len()).collect();
    order.shuffle(&mut rng_for(cfg.seed, usize::MAX, 0, 0));
    let train_lines: Vec<&String> = order.iter().map(|&i| &lines[0][i]).collect();
    for (name, rows) in [
        ("train.jsonl", train_lines),
        ("test.jsonl", lines[1].iter().collect()),
    ] {
        let path = root.join(name);
        let mut text = String::new();
        for r in rows {
            text.push_str(r);
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    let summary = WorldSummary {
        config: cfg.clone(),
        datasets: summaries,
    };
    let path = root.join("world.json");
    let text = serde_json::to_string_pretty(&summary)
        .map_err(|e| Error::Config(format!("serialising world.json: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(io(&path))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_counts_are_geometric_and_complete() {
        let c = class_counts(100, 4, 4.0);
        assert_eq!(c.iter().sum::<usize>(), 100);
        assert!(c.windows(2).all(|w| w[0] >= w[1]), "{c:?}");
        let ratio = c[0] as f64 / c[3] as f64;
        assert!((3.0..5.5).contains(&ratio), "{c:?}");
        assert_eq!(class_counts(2, 3, 4.0), vec![1, 1, 1]);
        assert_eq!(class_counts(6, 3, 4.0), vec![3, 2, 1]);
    }

    #[test]
    fn domain_rows_span_the_configured_imbalance() {
        let cfg = WorldConfig::default();
        let big = domain_rows(&cfg, &Domain::Ct);
        let small = domain_rows(&cfg, &Domain::Ultrasound);
        assert_eq!(big, 600);
        assert_eq!(small, 6);
    }

    #[test]
    fn every_dataset_has_a_known_domain_and_two_to_five_classes() {
        for d in catalog() {
            assert!(DOMAIN_RANK.contains(&d.domain), "{}", d.name);
            assert!((2..=5).contains(&d.labels.len()), "{}", d.name);
        }
        let domains: std::collections::BTreeSet<_> =
            catalog().iter().map(|d| d.domain.clone()).collect();
        assert_eq!(domains.len(), 9);
    }
}
