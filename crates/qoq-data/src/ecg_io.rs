//! ECG files of every supported format to one [`EcgSignal`] (spec §5.1: the reference reads
//! WFDB with `wfdb.rdrecord` in `dataset.py::process_time_series`; CLIMB's MIMIC-IV ECGs are
//! arrays). Formats, chosen by extension (or the DICOM magic):
//!
//! * `.hea`: WFDB record ([`crate::wfdb`]);
//! * `.dcm`: DICOM 12-lead ECG waveform ([`crate::dicom::read_ecg`]);
//! * `.npy` / `.npz`: NumPy arrays ([`crate::npy`]), leads x samples or samples x leads;
//! * `.csv`: a header row of lead names, one row per sample (a `time` column, if present, gives
//!   the sampling frequency).
//!
//! The result goes through [`crate::ecg::select_leads`] / [`crate::ecg::to_model_input`].

use crate::ecg::EcgSignal;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The standard 12-lead order, used to name the rows of 12-lead arrays.
pub const STANDARD_LEADS: [&str; 12] = [
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
];

/// How a 2D array's axes map to leads and samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Orientation {
    /// The axis of length <= 16 that is the shorter one holds the leads.
    #[default]
    Auto,
    /// `array[lead][sample]`.
    LeadsBySamples,
    /// `array[sample][lead]`.
    SamplesByLeads,
}

/// Options for formats that do not carry their own metadata (arrays, CSV).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EcgLoadOptions {
    /// Sampling frequency of arrays (and of CSV files without a time column), Hz.
    pub fs: Option<f64>,
    /// Which axis of a 2D array holds the leads.
    pub orientation: Orientation,
    /// Lead names of array rows; default: the standard 12 (12 leads), the model's 8 (8 leads),
    /// else `ch0`, `ch1`, ...
    pub leads: Option<Vec<String>>,
    /// The array to read from a `.npz` holding several.
    pub npz_key: Option<String>,
    /// Array values to mV: `(raw - offset) / gain` (WFDB's baseline and ADC gain).
    pub offset: f64,
    /// See `offset`.
    pub gain: f64,
    /// WaveformSequence item of a DICOM ECG (0: rhythm strip).
    pub dicom_item: usize,
}

impl Default for EcgLoadOptions {
    fn default() -> Self {
        Self {
            fs: None,
            orientation: Orientation::Auto,
            leads: None,
            npz_key: None,
            offset: 0.0,
            gain: 1.0,
            dicom_item: 0,
        }
    }
}

fn default_names(n: usize) -> Vec<String> {
    match n {
        12 => STANDARD_LEADS.iter().map(|s| s.to_string()).collect(),
        8 => crate::ecg::MODEL_LEADS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        _ => (0..n).map(|i| format!("ch{i}")).collect(),
    }
}

/// Turn a 1D or 2D array into a signal under `opts`.
pub fn array_to_signal(
    shape: &[usize],
    data: &[f32],
    opts: &EcgLoadOptions,
) -> std::result::Result<EcgSignal, String> {
    let fs = opts
        .fs
        .ok_or("arrays carry no sampling frequency: set `fs` in the load options")?;
    if !(fs.is_finite() && fs > 0.0) {
        return Err(format!("invalid sampling frequency {fs}"));
    }
    if opts.gain == 0.0 || !opts.gain.is_finite() {
        return Err(format!("invalid gain {}", opts.gain));
    }
    let (n_leads, n_samples, leads_first) = match shape {
        [n] => (1, *n, true),
        [a, b] => {
            let leads_first = match opts.orientation {
                Orientation::LeadsBySamples => true,
                Orientation::SamplesByLeads => false,
                Orientation::Auto if *a <= 16 && a <= b => true,
                Orientation::Auto if *b <= 16 && b < a => false,
                Orientation::Auto => {
                    return Err(format!(
                        "cannot tell leads from samples in shape {shape:?}: set `orientation`"
                    ));
                }
            };
            if leads_first {
                (*a, *b, true)
            } else {
                (*b, *a, false)
            }
        }
        _ => {
            return Err(format!(
                "an ECG array must be 1D or 2D, got shape {shape:?}"
            ));
        }
    };
    let names = match &opts.leads {
        Some(l) if l.len() == n_leads => l.clone(),
        Some(l) => {
            return Err(format!("{} lead names given for {n_leads} leads", l.len()));
        }
        None => default_names(n_leads),
    };
    let phys = |v: f32| ((v as f64 - opts.offset) / opts.gain) as f32;
    let rows = (0..n_leads)
        .map(|l| {
            (0..n_samples)
                .map(|s| {
                    phys(if leads_first {
                        data[l * n_samples + s]
                    } else {
                        data[s * n_leads + l]
                    })
                })
                .collect()
        })
        .collect();
    Ok(EcgSignal {
        fs,
        leads: names,
        data: rows,
    })
}

/// Read a CSV ECG: a header row of lead names, one row per sample. A first column named
/// `time`, `t` or `seconds` (in seconds) is dropped and gives `fs` unless `opts.fs` is set;
/// `sample` / `index` columns are dropped.
pub fn read_csv(path: &Path, opts: &EcgLoadOptions) -> Result<EcgSignal> {
    crate::guard::contain(path, "CSV", || read_csv_unguarded(path, opts))
}

fn read_csv_unguarded(path: &Path, opts: &EcgLoadOptions) -> Result<EcgSignal> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| Error::file(path, format!("cannot read CSV: {e}")))?;
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| Error::file(path, format!("cannot read the CSV header: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let time_col = headers
        .iter()
        .position(|h| matches!(h.to_ascii_lowercase().as_str(), "time" | "t" | "seconds"));
    let skip: Vec<bool> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Some(i) == time_col || matches!(h.to_ascii_lowercase().as_str(), "sample" | "index")
        })
        .collect();
    let leads: Vec<String> = headers
        .iter()
        .zip(&skip)
        .filter(|(_, s)| !**s)
        .map(|(h, _)| h.clone())
        .collect();
    if leads.is_empty() {
        return Err(Error::file(path, "the CSV header names no lead columns"));
    }
    let mut data = vec![Vec::new(); leads.len()];
    let mut times = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let line = i as u64 + 2;
        let rec = rec.map_err(|e| Error::Row {
            path: path.to_path_buf(),
            line,
            message: e.to_string(),
        })?;
        let mut lead = 0;
        for (c, field) in rec.iter().enumerate() {
            let value = || {
                field.parse::<f64>().map_err(|_| Error::Row {
                    path: path.to_path_buf(),
                    line,
                    message: format!("column `{}`: `{field}` is not a number", headers[c]),
                })
            };
            if Some(c) == time_col {
                times.push(value()?);
            } else if !skip[c] {
                data[lead].push(((value()? - opts.offset) / opts.gain) as f32);
                lead += 1;
            }
        }
    }
    let fs = match (opts.fs, times.len()) {
        (Some(fs), _) => fs,
        (None, n) if n >= 2 => {
            let dt = (times[n - 1] - times[0]) / (n - 1) as f64;
            if dt.is_nan() || dt <= 0.0 {
                return Err(Error::file(path, "the time column does not increase"));
            }
            1.0 / dt
        }
        _ => {
            return Err(Error::file(
                path,
                "no sampling frequency: add a time column or set `fs` in the load options",
            ));
        }
    };
    Ok(EcgSignal { fs, leads, data })
}

/// Load an ECG file of any supported format (see the module docs).
pub fn load_ecg(path: &Path, opts: &EcgLoadOptions) -> Result<EcgSignal> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "hea" => Ok(crate::wfdb::read_record(path)?.to_signal()),
        "npy" => {
            let a = crate::npy::read_npy(path)?;
            array_to_signal(&a.shape, &a.data, opts).map_err(|m| Error::file(path, m))
        }
        "npz" => {
            let a = crate::npy::read_npz(path, opts.npz_key.as_deref())?;
            array_to_signal(&a.shape, &a.data, opts).map_err(|m| Error::file(path, m))
        }
        "csv" => read_csv(path, opts),
        _ if ext == "dcm" || crate::dicom::has_dicm_magic(path) => {
            crate::dicom::read_ecg(path, opts.dicom_item)
        }
        _ => Err(Error::file(
            path,
            format!("unknown ECG format `.{ext}` (expected .hea, .dcm, .npy, .npz or .csv)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_in_both_orientations_give_the_same_signal() {
        let opts = EcgLoadOptions {
            fs: Some(500.0),
            offset: 1.0,
            gain: 2.0,
            ..EcgLoadOptions::default()
        };
        // 2 leads x 20 samples, and its transpose
        let lxs: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let sxl: Vec<f32> = (0..20).flat_map(|s| [s as f32, (20 + s) as f32]).collect();
        let a = array_to_signal(&[2, 20], &lxs, &opts).unwrap();
        let b = array_to_signal(&[20, 2], &sxl, &opts).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.leads, vec!["ch0", "ch1"]);
        assert_eq!(a.data[1][3], (23.0 - 1.0) / 2.0);
        let forced = EcgLoadOptions {
            orientation: Orientation::SamplesByLeads,
            ..opts.clone()
        };
        assert_eq!(
            array_to_signal(&[2, 20], &lxs, &forced).unwrap().data.len(),
            20
        );
        assert!(array_to_signal(&[40, 40], &[0.0; 1600], &opts).is_err());
        let no_fs = EcgLoadOptions::default();
        assert!(
            array_to_signal(&[2, 20], &lxs, &no_fs)
                .unwrap_err()
                .contains("fs")
        );
    }

    #[test]
    fn csv_reads_names_and_sampling_frequency() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.csv");
        std::fs::write(&p, "time,I,II\n0.000,0.1,0.2\n0.002,0.3,0.4\n0.004,0.5,x\n").unwrap();
        let e = read_csv(&p, &EcgLoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("e.csv:4") && e.contains("`II`"), "{e}");
        std::fs::write(
            &p,
            "time,I,II\n0.000,0.1,0.2\n0.002,0.3,0.4\n0.004,0.5,0.6\n",
        )
        .unwrap();
        let s = load_ecg(&p, &EcgLoadOptions::default()).unwrap();
        assert_eq!(s.leads, vec!["I", "II"]);
        assert!((s.fs - 500.0).abs() < 1e-9);
        assert_eq!(s.data[1], vec![0.2, 0.4, 0.6]);
    }
}
