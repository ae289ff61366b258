//! WFDB records: the `.hea` header and signal files in formats 16 and 212, read and written.
//!
//! Written by hand because no maintained Rust crate reads WFDB. Header grammar (PhysioNet
//! "header(5)"): a record line `name n_sig fs[/counter][(base)] n_samples ...`, then one line per
//! signal `file format[xN][:skew][+offset] gain[(baseline)][/units] adc_res adc_zero init
//! checksum block_size description`. Physical value = (adc - baseline) / gain; a gain of 0 or a
//! missing gain means 200 ADC units per physical unit. Signals that share a file are interleaved
//! frame by frame. Format 16: little-endian i16. Format 212: two 12-bit two's-complement samples in
//! three bytes (`s0 = b0 | (b1 & 0x0F) << 8`, `s1 = b2 | (b1 & 0xF0) << 4`).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// One signal's header fields.
#[derive(Debug, Clone, PartialEq)]
pub struct WfdbSignal {
    pub file: String,
    pub format: u16,
    pub gain: f64,
    pub baseline: i32,
    pub units: String,
    pub adc_zero: i32,
    pub name: String,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq)]
pub struct WfdbHeader {
    pub record: String,
    pub fs: f64,
    pub n_samples: usize,
    pub signals: Vec<WfdbSignal>,
}

/// A decoded record: ADC units and physical values per signal.
#[derive(Debug, Clone, PartialEq)]
pub struct WfdbRecord {
    pub header: WfdbHeader,
    /// `adc[signal][sample]`.
    pub adc: Vec<Vec<i32>>,
}

impl WfdbRecord {
    /// The record as an [`crate::ecg::EcgSignal`] in physical units, leads named by the header.
    pub fn to_signal(&self) -> crate::ecg::EcgSignal {
        crate::ecg::EcgSignal {
            fs: self.header.fs,
            leads: self.header.signals.iter().map(|s| s.name.clone()).collect(),
            data: self.physical(),
        }
    }

    /// Physical values (`(adc - baseline) / gain`) per signal.
    pub fn physical(&self) -> Vec<Vec<f32>> {
        self.header
            .signals
            .iter()
            .zip(&self.adc)
            .map(|(s, a)| {
                a.iter()
                    .map(|&v| ((v as f64 - s.baseline as f64) / s.gain) as f32)
                    .collect()
            })
            .collect()
    }
}

fn bad(path: &Path, line: u64, message: impl Into<String>) -> Error {
    Error::Row {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Parse a `.hea` header file.
pub fn read_header(path: &Path) -> Result<WfdbHeader> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    let (ln, record_line) = lines
        .next()
        .ok_or_else(|| bad(path, 1, "empty WFDB header"))?;
    let f: Vec<&str> = record_line.split_whitespace().collect();
    if f.len() < 2 {
        return Err(bad(path, ln, "record line needs a name and a signal count"));
    }
    if f[0].contains('/') {
        return Err(bad(path, ln, "multi-segment records are not supported"));
    }
    let n_sig: usize = f[1]
        .parse()
        .map_err(|_| bad(path, ln, format!("bad signal count `{}`", f[1])))?;
    let fs = match f.get(2) {
        Some(s) => {
            let s = s.split(['/', '(']).next().unwrap_or(s);
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| bad(path, ln, format!("bad sampling frequency `{s}`")))?
        }
        None => 250.0,
    };
    let n_samples: usize = match f.get(3) {
        Some(s) => s
            .parse()
            .map_err(|_| bad(path, ln, format!("bad sample count `{s}`")))?,
        None => 0,
    };
    // the count comes from the file: no allocation from it (each signal needs a line)
    let mut signals = Vec::new();
    for _ in 0..n_sig {
        let (ln, l) = lines.next().ok_or_else(|| {
            bad(
                path,
                ln,
                format!("header declares {n_sig} signals but lists fewer"),
            )
        })?;
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 2 {
            return Err(bad(path, ln, "signal line needs a file name and a format"));
        }
        let fmt_field = f[1];
        let fmt_digits: String = fmt_field.chars().take_while(char::is_ascii_digit).collect();
        if fmt_field.len() != fmt_digits.len() {
            return Err(bad(
                path,
                ln,
                format!(
                    "format modifiers in `{fmt_field}` (samples per frame, skew, offset) are not supported"
                ),
            ));
        }
        let format: u16 = fmt_digits
            .parse()
            .map_err(|_| bad(path, ln, format!("bad format `{fmt_field}`")))?;
        if format != 16 && format != 212 {
            return Err(bad(
                path,
                ln,
                format!("WFDB format {format} is not supported (16 and 212 are)"),
            ));
        }
        let adc_zero: i32 = match f.get(4) {
            Some(s) => s
                .parse()
                .map_err(|_| bad(path, ln, format!("bad adc_zero `{s}`")))?,
            None => 0,
        };
        let (mut gain, mut baseline, mut units) = (0.0f64, adc_zero, "mV".to_string());
        if let Some(g) = f.get(2) {
            let (g, u) = match g.split_once('/') {
                Some((g, u)) => (g, Some(u)),
                None => (*g, None),
            };
            if let Some(u) = u {
                units = u.to_string();
            }
            let (g, b) = match g.split_once('(') {
                Some((g, b)) => (g, Some(b.trim_end_matches(')'))),
                None => (g, None),
            };
            gain = g
                .parse()
                .map_err(|_| bad(path, ln, format!("bad gain `{g}`")))?;
            if let Some(b) = b {
                baseline = b
                    .parse()
                    .map_err(|_| bad(path, ln, format!("bad baseline `{b}`")))?;
            }
        }
        if !gain.is_finite() || gain == 0.0 {
            gain = 200.0;
        }
        signals.push(WfdbSignal {
            file: f[0].to_string(),
            format,
            gain,
            baseline,
            units,
            adc_zero,
            name: f.get(8..).map(|d| d.join(" ")).unwrap_or_default(),
        });
    }
    Ok(WfdbHeader {
        record: f[0].to_string(),
        fs,
        n_samples,
        signals,
    })
}

/// Read a record from its `.hea` path: every signal file it names, de-interleaved (behind
/// [`crate::guard::contain`]).
pub fn read_record(hea: &Path) -> Result<WfdbRecord> {
    crate::guard::contain(hea, "WFDB", || read_record_unguarded(hea))
}

fn read_record_unguarded(hea: &Path) -> Result<WfdbRecord> {
    let header = read_header(hea)?;
    let mut adc = vec![Vec::new(); header.signals.len()];
    let mut files: Vec<(String, u16, Vec<usize>)> = Vec::new();
    for (i, s) in header.signals.iter().enumerate() {
        match files.iter_mut().find(|(f, _, _)| *f == s.file) {
            Some((_, fmt, idx)) => {
                if *fmt != s.format {
                    return Err(Error::file(
                        hea,
                        format!("signals in {} mix formats", s.file),
                    ));
                }
                idx.push(i)
            }
            None => files.push((s.file.clone(), s.format, vec![i])),
        }
    }
    for (file, format, idx) in files {
        let path: PathBuf = hea.with_file_name(&file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let values = match format {
            16 => {
                if bytes.len() % 2 != 0 {
                    return Err(Error::file(
                        &path,
                        "format 16 file has an odd number of bytes",
                    ));
                }
                bytes
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]) as i32)
                    .collect::<Vec<_>>()
            }
            _ => {
                let mut v = Vec::with_capacity(bytes.len() / 3 * 2 + 1);
                for c in bytes.chunks(3) {
                    let s0 = c[0] as i32 | ((*c.get(1).unwrap_or(&0) as i32 & 0x0F) << 8);
                    v.push(if s0 > 2047 { s0 - 4096 } else { s0 });
                    if c.len() == 3 {
                        let s1 = c[2] as i32 | ((c[1] as i32 & 0xF0) << 4);
                        v.push(if s1 > 2047 { s1 - 4096 } else { s1 });
                    }
                }
                v
            }
        };
        let k = idx.len();
        let frames = values.len() / k;
        if header.n_samples > 0 && frames < header.n_samples {
            return Err(Error::file(
                &path,
                format!(
                    "header promises {} samples per signal but {} holds only {frames}",
                    header.n_samples,
                    path.display()
                ),
            ));
        }
        let n = if header.n_samples > 0 {
            header.n_samples
        } else {
            frames
        };
        for (j, &sig) in idx.iter().enumerate() {
            adc[sig] = (0..n).map(|t| values[t * k + j]).collect();
        }
    }
    Ok(WfdbRecord { header, adc })
}

/// Write `adc[signal][sample]` as a record `dir/name.hea` + `dir/name.dat` in format 16 or 212,
/// all signals interleaved in one file. Returns the header path.
pub fn write_record(
    dir: &Path,
    name: &str,
    fs: f64,
    format: u16,
    signals: &[(String, f64, i32)],
    adc: &[Vec<i32>],
) -> Result<PathBuf> {
    let hea = dir.join(format!("{name}.hea"));
    if signals.len() != adc.len() || signals.is_empty() {
        return Err(Error::file(
            &hea,
            "one (name, gain, baseline) per signal is needed",
        ));
    }
    let n = adc[0].len();
    if adc.iter().any(|a| a.len() != n) {
        return Err(Error::file(&hea, "all signals need the same length"));
    }
    let (lo, hi) = if format == 212 {
        (-2048, 2047)
    } else {
        (-32768, 32767)
    };
    if format != 16 && format != 212 {
        return Err(Error::file(&hea, format!("cannot write format {format}")));
    }
    if let Some(v) = adc.iter().flatten().find(|v| **v < lo || **v > hi) {
        return Err(Error::file(
            &hea,
            format!("value {v} does not fit format {format}"),
        ));
    }
    let frame: Vec<i32> = (0..n).flat_map(|t| adc.iter().map(move |a| a[t])).collect();
    let mut bytes = Vec::new();
    if format == 16 {
        for v in &frame {
            bytes.extend_from_slice(&(*v as i16).to_le_bytes());
        }
    } else {
        for pair in frame.chunks(2) {
            let a = (pair[0] & 0xFFF) as u16;
            let b = (*pair.get(1).unwrap_or(&0) & 0xFFF) as u16;
            bytes.push((a & 0xFF) as u8);
            bytes.push(((a >> 8) as u8 & 0x0F) | (((b >> 8) as u8 & 0x0F) << 4));
            if pair.len() == 2 {
                bytes.push((b & 0xFF) as u8);
            }
        }
    }
    let dat = dir.join(format!("{name}.dat"));
    std::fs::write(&dat, bytes).map_err(|e| Error::io(&dat, e))?;
    let mut text = format!("{name} {} {fs} {n}\n", signals.len());
    let bits = if format == 212 { 12 } else { 16 };
    for ((sig, gain, baseline), a) in signals.iter().zip(adc) {
        let init = a.first().copied().unwrap_or(0);
        let checksum = a.iter().fold(0i32, |s, v| s.wrapping_add(*v)) as i16;
        text.push_str(&format!(
            "{name}.dat {format} {gain}({baseline})/mV {bits} 0 {init} {checksum} 0 {sig}\n"
        ));
    }
    std::fs::write(&hea, text).map_err(|e| Error::io(&hea, e))?;
    Ok(hea)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_written_by_the_python_wfdb_package_reads_back() {
        let hea = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/mini/ecg/demo-ecg/rec_003.hea");
        let r = read_record(&hea).unwrap();
        assert_eq!(r.header.fs, 500.0);
        assert_eq!(r.header.signals.len(), 12);
        assert_eq!(r.header.signals[1].name, "II");
        assert_eq!(r.adc[1].len(), 5000);
        // the header's init values are the first samples
        assert_eq!(r.adc[0][0], -27173);
        assert_eq!(r.adc[1][0], -29464);
        // lead II of the generator has R peaks of about 1.2 mV every 0.8 s (75 bpm)
        let ii = &r.physical()[1];
        let max = ii.iter().cloned().fold(f32::MIN, f32::max);
        assert!((max - 1.2).abs() < 0.1, "R peak {max}");
        // an R peak: above 0.8 mV and the maximum within +-100 samples (200 ms refractory)
        let peaks: Vec<usize> = (0..ii.len())
            .filter(|&t| {
                let lo = t.saturating_sub(100);
                let hi = (t + 100).min(ii.len() - 1);
                ii[t] > 0.8 && (lo..=hi).all(|u| ii[u] < ii[t] || u == t)
            })
            .collect();
        assert_eq!(peaks.len(), 12);
        let input =
            crate::ecg::to_model_input(&r.to_signal(), crate::ecg::EcgConvention::EcgJepa, false)
                .unwrap();
        assert_eq!(input.len(), 8 * 2500);
        for w in peaks.windows(2) {
            assert!(
                (w[1] - w[0]).abs_diff(400) <= 2,
                "RR {} samples",
                w[1] - w[0]
            );
        }
    }

    #[test]
    fn formats_16_and_212_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let adc: Vec<Vec<i32>> = vec![
            (0..101).map(|i| (i * 37 % 4096) - 2048).collect(),
            (0..101).map(|i| 2047 - (i * 91 % 4096)).collect(),
            (0..101).map(|i| (i % 7) - 3).collect(),
        ];
        let sigs: Vec<(String, f64, i32)> = ["I", "II", "V1"]
            .iter()
            .map(|n| (n.to_string(), 200.0, 0))
            .collect();
        for format in [16, 212] {
            let hea = write_record(
                dir.path(),
                &format!("r{format}"),
                360.0,
                format,
                &sigs,
                &adc,
            )
            .unwrap();
            let r = read_record(&hea).unwrap();
            assert_eq!(r.adc, adc, "format {format}");
            assert_eq!(r.header.fs, 360.0);
        }
        assert!(write_record(dir.path(), "x", 360.0, 212, &sigs[..1], &[vec![5000]]).is_err());
    }

    #[test]
    fn a_header_that_lies_about_its_length_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let sigs = vec![("I".to_string(), 100.0, 0)];
        let hea = write_record(dir.path(), "r", 500.0, 16, &sigs, &[vec![1, 2, 3]]).unwrap();
        let text = std::fs::read_to_string(&hea)
            .unwrap()
            .replace("500 3", "500 30");
        std::fs::write(&hea, text).unwrap();
        let e = read_record(&hea).unwrap_err().to_string();
        assert!(
            e.contains("promises 30 samples") && e.contains("r.dat"),
            "{e}"
        );
        std::fs::write(&hea, "r 2 500 3\nr.dat 16 100/mV 16 0 1 0 0 I\n").unwrap();
        let e = read_record(&hea).unwrap_err().to_string();
        assert!(e.contains("declares 2 signals"), "{e}");
    }
}
