//! `qoq data check`: validate every row of a manifest and summarise it per domain and dataset.
//!
//! Every bad row is reported (by line number, with the reason); checking never stops at the
//! first. Each group counts where its rows' domains came from (the row's keys, the path layout,
//! ...; see [`DomainOrigin`]), and [`CheckOptions::list_rows`] lists every row's domain and origin. Every referenced file is decoded: images (PNG/JPEG/... and DICOM, all frames), volumes
//! (NIfTI, NRRD), ECG files (WFDB, DICOM waveform, `.npy` / `.npz`, CSV) and masks. Files are
//! decoded in parallel (rayon) in blocks of rows; the report keeps manifest order. Every decoder
//! runs behind [`crate::guard::contain`]: a decoder that panics on a damaged file gives a bad row
//! naming the file and the decoder, and the check goes on.
//! Videos in other formats (`.mp4`, ...) and time series in other formats (`torch.save`d `.pt`
//! tensors, `.mat`, ...) are checked for existence only (no decoder here).

use crate::ecg_io::EcgLoadOptions;
use crate::error::Result;
use crate::manifest::{DomainOrigin, Manifest, ManifestConfig};
use crate::vision::ImageLoadOptions;
use qoq_core::ClinicalSample;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// One row that failed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// 1-based line number in the manifest.
    pub line: u64,
    pub reason: String,
}

/// Per (data_source, dataset) statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupStats {
    /// Rows that parsed (good or with file problems).
    pub rows: usize,
    /// Rows with a missing or undecodable file.
    pub bad_files: usize,
    /// Answer label -> count (multi-label answers split on ", ").
    pub classes: BTreeMap<String, usize>,
    /// Where the rows' domains came from -> count.
    pub origins: BTreeMap<DomainOrigin, usize>,
}

/// One row's domain and where it came from (listed with [`CheckOptions::list_rows`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RowDomain {
    /// 1-based line number in the manifest.
    pub line: u64,
    pub data_source: String,
    pub dataset: String,
    pub origin: DomainOrigin,
}

/// The result of checking a manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckReport {
    pub manifest: PathBuf,
    /// Non-empty lines.
    pub rows: usize,
    pub bad: Vec<BadRow>,
    /// Keyed by (data_source, dataset).
    pub groups: BTreeMap<(String, String), GroupStats>,
    /// Every row that parsed, in file order, when [`CheckOptions::list_rows`] is set.
    pub row_domains: Vec<RowDomain>,
}

impl CheckReport {
    /// Whether every row passed.
    pub fn is_ok(&self) -> bool {
        self.bad.is_empty()
    }
}

/// How referenced files are decoded while checking.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CheckOptions {
    /// DICOM windowing and frames per volume.
    pub image: ImageLoadOptions,
    /// ECG array / CSV options. Without `fs`, arrays and CSV files are checked for structure
    /// and values only (their sampling frequency is not known).
    pub ecg: EcgLoadOptions,
    /// Keep every row's domain and its origin in [`CheckReport::row_domains`].
    pub list_rows: bool,
}

fn ext_of(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Image,
    Video,
    Series,
    Mask,
}

fn check_file(path: &Path, role: Role, opts: &CheckOptions) -> std::result::Result<(), String> {
    if !path.is_file() {
        return Err(format!("missing file {}", path.display()));
    }
    let ext = ext_of(path);
    match role {
        Role::Series => {
            let decodable = matches!(ext.as_str(), "hea" | "dcm" | "npy" | "npz" | "csv")
                || crate::dicom::has_dicm_magic(path);
            if !decodable {
                return Ok(());
            }
            let mut ecg = opts.ecg.clone();
            ecg.fs.get_or_insert(1.0);
            let sig = crate::ecg_io::load_ecg(path, &ecg).map_err(|e| e.to_string())?;
            if sig.data.iter().all(|l| l.is_empty()) {
                return Err(format!("{}: the ECG has no samples", path.display()));
            }
        }
        Role::Video if !crate::volume::is_volume(path) && !crate::dicom::has_dicm_magic(path) => {}
        Role::Mask if crate::volume::is_volume(path) => {
            crate::volume::read_volume(path).map_err(|e| e.to_string())?;
        }
        _ => {
            let images =
                crate::vision::load_images(path, &opts.image).map_err(|e| e.to_string())?;
            if images.is_empty() {
                return Err(format!("{}: no frames", path.display()));
            }
        }
    }
    Ok(())
}

/// Decode every file a sample names; the problems found (empty when the row is good).
pub fn check_sample(s: &ClinicalSample, opts: &CheckOptions) -> Vec<String> {
    let mut problems = Vec::new();
    if s.answer.trim().is_empty() {
        problems.push("empty answer".to_string());
    }
    let files = s
        .images
        .iter()
        .map(|p| (p, Role::Image))
        .chain(s.videos.iter().map(|p| (p, Role::Video)))
        .chain(s.time_series.iter().map(|p| (p, Role::Series)))
        .chain(s.segmentation_path.iter().map(|p| (p, Role::Mask)));
    for (f, role) in files {
        if let Err(e) = check_file(f, role, opts) {
            problems.push(e);
        }
    }
    problems
}

/// Rows decoded per parallel block.
const BLOCK: usize = 256;

/// Validate every row of `path` with default [`CheckOptions`]. `progress` is called with
/// (rows done, rows total).
pub fn check_manifest(
    path: &Path,
    cfg: ManifestConfig,
    progress: impl FnMut(usize, usize),
) -> Result<CheckReport> {
    check_manifest_with(path, cfg, &CheckOptions::default(), progress)
}

/// Validate every row of `path`, decoding files under `opts` on the rayon pool.
pub fn check_manifest_with(
    path: &Path,
    cfg: ManifestConfig,
    opts: &CheckOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<CheckReport> {
    let manifest = Manifest::open(path, cfg)?;
    let total = manifest.len();
    let mut report = CheckReport {
        manifest: path.to_path_buf(),
        rows: total,
        ..CheckReport::default()
    };
    let mut rows = manifest.rows_traced()?;
    let mut done = 0;
    loop {
        let block: Vec<Result<(ClinicalSample, DomainOrigin)>> =
            rows.by_ref().take(BLOCK).collect();
        if block.is_empty() {
            break;
        }
        let checked: Vec<(Result<(ClinicalSample, DomainOrigin)>, Vec<String>)> = block
            .into_par_iter()
            .map(|row| {
                let problems = match &row {
                    Ok((sample, _)) => check_sample(sample, opts),
                    Err(_) => Vec::new(),
                };
                (row, problems)
            })
            .collect();
        for (row, problems) in checked {
            done += 1;
            absorb(&mut report, row, problems, opts.list_rows)?;
            progress(done, total);
        }
    }
    Ok(report)
}

fn absorb(
    report: &mut CheckReport,
    row: Result<(ClinicalSample, DomainOrigin)>,
    problems: Vec<String>,
    list_rows: bool,
) -> Result<()> {
    match row {
        Err(crate::Error::Row { line, message, .. }) => {
            report.bad.push(BadRow {
                line,
                reason: message,
            });
        }
        Err(e) => return Err(e),
        Ok((sample, origin)) => {
            let key = (
                sample.data_source.as_source().to_string(),
                sample.dataset.clone(),
            );
            if list_rows {
                report.row_domains.push(RowDomain {
                    line: sample.line,
                    data_source: key.0.clone(),
                    dataset: key.1.clone(),
                    origin,
                });
            }
            let g = report.groups.entry(key).or_default();
            g.rows += 1;
            *g.origins.entry(origin).or_default() += 1;
            for label in sample.answer.split(", ") {
                *g.classes.entry(label.trim().to_string()).or_default() += 1;
            }
            if !problems.is_empty() {
                g.bad_files += 1;
                report.bad.push(BadRow {
                    line: sample.line,
                    reason: problems.join("; "),
                });
            }
        }
    }
    Ok(())
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "manifest: {}", self.manifest.display())?;
        writeln!(
            f,
            "{:<14} {:<20} {:>7} {:>7} {:>9}  {:<12} class balance",
            "data_source", "dataset", "rows", "classes", "bad files", "domain from"
        )?;
        for ((src, ds), g) in &self.groups {
            let balance: Vec<String> = g.classes.iter().map(|(c, n)| format!("{c}={n}")).collect();
            let origins: Vec<String> = g.origins.iter().map(|(o, n)| format!("{o}={n}")).collect();
            writeln!(
                f,
                "{:<14} {:<20} {:>7} {:>7} {:>9}  {:<12} {}",
                src,
                ds,
                g.rows,
                g.classes.len(),
                g.bad_files,
                origins.join(","),
                balance.join(" ")
            )?;
        }
        writeln!(
            f,
            "domain from: <data_source rule>+<dataset rule> (one name when both agree): key(s) = \
             the row's keys, path = <data_source>/<dataset>/<file>, ecg = an ECG-only row, \
             question = the MIMIC-IV rule"
        )?;
        if !self.row_domains.is_empty() {
            writeln!(f, "rows (line: data_source/dataset from):")?;
            for r in &self.row_domains {
                writeln!(
                    f,
                    "  line {}: {}/{} from {}",
                    r.line, r.data_source, r.dataset, r.origin
                )?;
            }
        }
        writeln!(f, "rows: {}, bad rows: {}", self.rows, self.bad.len())?;
        for b in &self.bad {
            writeln!(f, "  line {}: {}", b.line, b.reason)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_row_is_listed_and_good_rows_are_summarised() {
        let dir = tempfile::tempdir().unwrap();
        let img_dir = dir.path().join("derm/ham");
        std::fs::create_dir_all(&img_dir).unwrap();
        image::RgbImage::new(8, 8)
            .save(img_dir.join("ok.png"))
            .unwrap();
        std::fs::write(img_dir.join("corrupt.png"), b"not a png").unwrap();
        let rows = [
            r#"{"problem": "q", "answer": "benign", "images": ["derm/ham/ok.png"]}"#,
            r#"{"problem": "q", "answer": "malignant", "images": ["derm/ham/corrupt.png"]}"#,
            r#"{"problem": "q", "answer": "benign", "images": ["derm/ham/missing.png"]}"#,
            r#"{"problem": "q" "#,
            r#"{"problem": "q", "answer": "benign", "images": ["derm/ham/ok.png"]}"#,
        ];
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, rows.join("\n")).unwrap();
        let mut calls = 0;
        let report = check_manifest(&path, ManifestConfig::default(), |_, _| calls += 1).unwrap();
        assert_eq!(calls, 5);
        let lines: Vec<u64> = report.bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![2, 3, 4]);
        assert!(report.bad[0].reason.contains("cannot decode image"));
        assert!(report.bad[1].reason.contains("missing file"));
        assert!(report.bad[2].reason.contains("malformed JSON"));
        let g = &report.groups[&("derm".to_string(), "ham".to_string())];
        assert_eq!(g.rows, 4);
        assert_eq!(g.origins.values().sum::<usize>(), 4);
        assert_eq!(g.bad_files, 2);
        assert_eq!(g.classes["benign"], 3);
        let text = report.to_string();
        assert!(text.contains("line 3: missing file"), "{text}");
    }

    #[test]
    fn the_report_shows_where_each_rows_domain_came_from() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("derm/ham")).unwrap();
        image::RgbImage::new(8, 8)
            .save(dir.path().join("derm/ham/a.png"))
            .unwrap();
        image::RgbImage::new(8, 8)
            .save(dir.path().join("b.png"))
            .unwrap();
        let abs = dir.path().join("b.png");
        let rows = [
            r#"{"problem": "q", "answer": "benign", "images": ["derm/ham/a.png"]}"#.to_string(),
            r#"{"problem": "q", "answer": "benign", "images": ["b.png"], "data_source": "derm", "dataset": "ham"}"#.to_string(),
            format!(
                r#"{{"problem": "q", "answer": "benign", "images": [{:?}], "data_source": "derm", "dataset": "isic"}}"#,
                abs.display().to_string()
            ),
            format!(
                r#"{{"problem": "q", "answer": "benign", "images": [{:?}]}}"#,
                abs.display().to_string()
            ),
        ];
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, rows.join("\n")).unwrap();
        let opts = CheckOptions {
            list_rows: true,
            ..CheckOptions::default()
        };
        let report =
            check_manifest_with(&path, ManifestConfig::default(), &opts, |_, _| {}).unwrap();
        let ham = &report.groups[&("derm".to_string(), "ham".to_string())];
        let origins: Vec<String> = ham
            .origins
            .iter()
            .map(|(o, n)| format!("{o}={n}"))
            .collect();
        assert_eq!(origins, vec!["keys=1", "path=1"]);
        assert_eq!(report.row_domains.len(), 3);
        assert_eq!(report.row_domains[2].dataset, "isic");
        assert_eq!(report.bad.len(), 1);
        assert_eq!(report.bad[0].line, 4);
        assert!(report.bad[0].reason.contains("is absolute"));
        let text = report.to_string();
        assert!(text.contains("keys=1,path=1"), "{text}");
        assert!(text.contains("line 3: derm/isic from keys"), "{text}");
        assert!(text.contains("line 1: derm/ham from path"), "{text}");
    }

    #[test]
    fn bundled_example_manifest_is_clean() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mini/manifest.jsonl");
        let report = check_manifest(&path, ManifestConfig::default(), |_, _| {}).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.rows, 4);
        assert_eq!(report.groups.len(), 4);
        assert!(
            report
                .groups
                .contains_key(&("ecg".into(), "demo-ecg".into()))
        );
    }
}
