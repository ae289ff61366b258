//! Seeded damage of real files, the kinds clinical archives show: truncation, flipped bytes,
//! zeroed blocks and length fields set to `0x7fffffff`. The damaged-corpus tests of every
//! reader (qoq-data, the processor, `qoq serve`) generate their files with it at test time from
//! the cached real files, so no damaged file is committed; it is public so that a pipeline
//! built on this crate can be tested the same way.
//!
//! Length fields are found by format: the 4-byte element and item lengths of a DICOM file, the
//! `dim` fields of a NIfTI-1 header, the numbers of an NRRD `sizes:` line, a `.npy` shape and a
//! WFDB header's sample count; other files get the value at a seeded offset of their first
//! kilobyte.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::path::{Path, PathBuf};

/// The kinds of damage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DamageKind {
    /// Cut the file at a seeded length (a transfer that stopped).
    Truncate,
    /// Flip 1 to 16 seeded bytes (bit rot).
    FlipBytes,
    /// Zero a seeded block of 16 bytes to 4 KiB (a lost disk block).
    ZeroBlock,
    /// Set one length field to `0x7fffffff` (a header that promises more than the file holds).
    LengthField,
}

impl DamageKind {
    /// Every kind, in a fixed order.
    pub const ALL: [DamageKind; 4] = [
        DamageKind::Truncate,
        DamageKind::FlipBytes,
        DamageKind::ZeroBlock,
        DamageKind::LengthField,
    ];

    /// A short name for file names and reports (`truncate`, `flip`, `zero`, `length`).
    pub fn name(self) -> &'static str {
        match self {
            DamageKind::Truncate => "truncate",
            DamageKind::FlipBytes => "flip",
            DamageKind::ZeroBlock => "zero",
            DamageKind::LengthField => "length",
        }
    }
}

/// What was done to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub kind: DamageKind,
    /// Where (the byte offset of the cut, the first flipped byte, the block, the field).
    pub at: usize,
    /// How many bytes (kept by a cut, flipped, zeroed, or the field's width).
    pub len: usize,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            DamageKind::Truncate => write!(f, "truncated to {} bytes", self.at),
            DamageKind::FlipBytes => write!(f, "{} bytes flipped from byte {}", self.len, self.at),
            DamageKind::ZeroBlock => write!(f, "{} bytes zeroed at byte {}", self.len, self.at),
            DamageKind::LengthField => {
                write!(
                    f,
                    "{}-byte length field at byte {} set to 0x7fffffff",
                    self.len, self.at
                )
            }
        }
    }
}

/// DICOM VRs whose length field is 4 bytes in explicit VR.
const LONG_VRS: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
];

/// Offsets of binary 4-byte little-endian length fields (DICOM, NIfTI-1).
fn binary_length_fields(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        for i in 132..bytes.len().saturating_sub(12) {
            let vr = &bytes[i + 4..i + 6];
            if LONG_VRS.iter().any(|v| v.as_slice() == vr) && bytes[i + 6..i + 8] == [0, 0] {
                out.push(i + 8);
            }
            if bytes[i..i + 4] == [0xFE, 0xFF, 0x00, 0xE0] {
                out.push(i + 4);
            }
        }
    } else if bytes.len() >= 348 && bytes[..4] == 348i32.to_le_bytes() {
        // dim[1..3] (i16 at 42, 44, 46): the 4-byte value spans two of them
        out.extend([42, 44]);
    }
    out
}

/// Byte ranges of decimal numbers to replace by `2147483647` in text headers (NRRD `sizes:`,
/// `.npy` shape, WFDB record line).
fn text_length_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let head = &bytes[..bytes.len().min(4096)];
    let numbers_after = |start: usize, stop: &[u8]| -> Vec<(usize, usize)> {
        let end = head[start..]
            .iter()
            .position(|b| stop.contains(b))
            .map_or(head.len(), |p| start + p);
        let mut out = Vec::new();
        let mut i = start;
        while i < end {
            if head[i].is_ascii_digit() {
                let s = i;
                while i < end && head[i].is_ascii_digit() {
                    i += 1;
                }
                out.push((s, i));
            } else {
                i += 1;
            }
        }
        out
    };
    let find = |needle: &[u8]| head.windows(needle.len()).position(|w| w == needle);
    if head.starts_with(b"NRRD") {
        if let Some(p) = find(b"sizes:") {
            return numbers_after(p + 6, b"\n");
        }
    } else if head.starts_with(b"\x93NUMPY") {
        if let Some(p) = find(b"'shape':") {
            return numbers_after(p + 8, b")");
        }
    } else if head
        .iter()
        .take_while(|b| **b != b'\n')
        .all(|b| b.is_ascii())
        && !head.is_empty()
    {
        // a WFDB header: `name n_sig fs n_samples`, the fourth field of the first line
        let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
        let fields = numbers_after(0, b"\n");
        if line_end > 0 && fields.len() >= 3 {
            return vec![fields[2]];
        }
    }
    Vec::new()
}

/// Damage `bytes` with `kind`, choices drawn from `rng`. The result always differs from the
/// input (an empty input stays empty).
pub fn damage(bytes: &[u8], kind: DamageKind, rng: &mut impl Rng) -> (Vec<u8>, Damage) {
    let n = bytes.len();
    if n == 0 {
        return (
            Vec::new(),
            Damage {
                kind,
                at: 0,
                len: 0,
            },
        );
    }
    let mut out = bytes.to_vec();
    let d = match kind {
        DamageKind::Truncate => {
            // half the cuts fall in the first 2 KiB, where the headers are
            let keep = if rng.random_bool(0.5) {
                rng.random_range(0..n.min(2048))
            } else {
                rng.random_range(0..n)
            };
            out.truncate(keep);
            Damage {
                kind,
                at: keep,
                len: keep,
            }
        }
        DamageKind::FlipBytes => {
            let count = rng.random_range(1..=16usize).min(n);
            let start = rng.random_range(0..n);
            for k in 0..count {
                let i = (start + k * rng.random_range(1..64usize)) % n;
                out[i] ^= rng.random_range(1..=255u8);
            }
            Damage {
                kind,
                at: start,
                len: count,
            }
        }
        DamageKind::ZeroBlock => {
            let len = rng.random_range(16..=4096usize).min(n);
            let at = rng.random_range(0..=n - len);
            out[at..at + len].fill(0);
            if out == bytes {
                out[at] = 0xFF;
            }
            Damage { kind, at, len }
        }
        DamageKind::LengthField => {
            let binary = binary_length_fields(bytes);
            let text = text_length_fields(bytes);
            if !binary.is_empty() {
                let at = binary[rng.random_range(0..binary.len())];
                out[at..at + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
                Damage { kind, at, len: 4 }
            } else if !text.is_empty() {
                let (s, e) = text[rng.random_range(0..text.len())];
                out.splice(s..e, b"2147483647".iter().copied());
                Damage {
                    kind,
                    at: s,
                    len: e - s,
                }
            } else {
                let at = rng.random_range(0..n.min(1024).saturating_sub(4).max(1));
                let end = (at + 4).min(n);
                out[at..end].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()[..end - at]);
                Damage {
                    kind,
                    at,
                    len: end - at,
                }
            }
        }
    };
    if out == bytes && !out.is_empty() {
        out[d.at.min(n - 1)] ^= 0xFF;
    }
    (out, d)
}

/// `count` damaged copies of `bytes`, the kinds in turn, from `seed` (the same seed gives the
/// same copies).
pub fn damaged_copies(bytes: &[u8], count: usize, seed: u64) -> Vec<(Vec<u8>, Damage)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|i| damage(bytes, DamageKind::ALL[i % DamageKind::ALL.len()], &mut rng))
        .collect()
}

/// How a corpus file is named in a manifest (which reader `qoq data check` uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `images`: a 2D image or a DICOM image.
    Image,
    /// `videos`: a NIfTI / NRRD volume.
    Volume,
    /// `segmentation_path`: a label volume.
    Mask,
    /// `time-series`: an ECG (WFDB, DICOM waveform, `.npy`, `.npz`, CSV).
    Ecg,
}

/// One damaged file of a corpus.
#[derive(Debug, Clone)]
pub struct CorpusFile {
    /// The damaged file (for a WFDB record, its `.hea`).
    pub path: PathBuf,
    /// The real file it was made from.
    pub source: PathBuf,
    pub role: Role,
    pub damage: Damage,
}

/// Copies per source file: fewer for files above 1 MB (they take longer to decode).
fn copies_for(len: u64, per_file: usize) -> usize {
    if len > 1 << 20 {
        per_file.div_ceil(2)
    } else {
        per_file
    }
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

/// The test-data cache of the repository at `repo` (`$QOQ_TESTDATA`, else `<repo>/.testdata`),
/// or `None` with a printed notice when it is absent (tests that need it then skip).
pub fn testdata_cache(repo: &Path) -> Option<PathBuf> {
    let dir = match std::env::var_os("QOQ_TESTDATA") {
        Some(p) => PathBuf::from(p),
        None => repo.join(".testdata"),
    };
    if dir.join("dicom").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: no test-data cache at {} (run scripts/fetch-testdata.sh)",
            dir.display()
        );
        None
    }
}

/// The real files of a test-data cache (`scripts/fetch-testdata.sh`: `dicom/`, `ecg/`,
/// `images/`, `volumes/`) with their roles, plus files written into `derived` from them so
/// that every reader has a real input: the MIT-BIH record of `ecg/ecg.dat` (an `.npz`) as
/// `.npy`, CSV and a WFDB record (format 16), and the first frame of `dicom/CT_small.dcm` as
/// PNG. Files of the cache that are missing are left out.
pub fn corpus_sources(cache: &Path, derived: &Path) -> Result<Vec<(PathBuf, Role)>> {
    let mut out = Vec::new();
    for (dir, role) in [
        ("dicom", Role::Image),
        ("ecg", Role::Ecg),
        ("images", Role::Image),
        ("volumes", Role::Volume),
    ] {
        let Ok(entries) = std::fs::read_dir(cache.join(dir)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let role = if name.contains("label") {
                Role::Mask
            } else {
                role
            };
            out.push((f, role));
        }
    }
    io(derived, std::fs::create_dir_all(derived))?;
    // ecg.dat is an .npz holding the array `ecg`: give it its extension
    let ecg = cache.join("ecg/ecg.dat");
    if let Some(slot) = out.iter_mut().find(|(p, _)| *p == ecg) {
        let npz = derived.join("mit_bih.npz");
        io(&npz, std::fs::copy(&ecg, &npz))?;
        slot.0 = npz.clone();
        let arr = crate::npy::read_npz(&npz, Some("ecg"))?;
        let samples: Vec<f32> = arr.data.iter().take(3600).copied().collect();
        let npy = derived.join("mit_bih.npy");
        io(
            &npy,
            std::fs::write(&npy, crate::npy::encode_f32(&[1, samples.len()], &samples)),
        )?;
        out.push((npy, Role::Ecg));
        let mut csv = String::from("time,MLII\n");
        for (i, v) in samples.iter().enumerate() {
            csv.push_str(&format!("{:.6},{v}\n", i as f64 / 360.0));
        }
        let path = derived.join("mit_bih.csv");
        io(&path, std::fs::write(&path, csv))?;
        out.push((path, Role::Ecg));
        let adc: Vec<i32> = samples.iter().map(|v| *v as i32).collect();
        let hea = crate::wfdb::write_record(
            derived,
            "mit_bih",
            360.0,
            16,
            &[("MLII".to_string(), 200.0, 1024)],
            &[adc],
        )?;
        out.push((hea, Role::Ecg));
    }
    let ct = cache.join("dicom/CT_small.dcm");
    if ct.is_file() {
        let frames = crate::dicom::read_image(&ct, crate::dicom::Windowing::FromFile)?;
        let png = derived.join("ct_small.png");
        frames[0]
            .save(&png)
            .map_err(|e| Error::file(&png, e.to_string()))?;
        out.push((png, Role::Image));
    }
    Ok(out)
}

/// Write `per_file` damaged copies (the kinds in turn, seeded by `seed` and the source's
/// position) of every source into `out` (half as many for sources above 1 MB). A WFDB record
/// is copied as a pair, one of its two files damaged.
pub fn write_corpus(
    sources: &[(PathBuf, Role)],
    out: &Path,
    per_file: usize,
    seed: u64,
) -> Result<Vec<CorpusFile>> {
    io(out, std::fs::create_dir_all(out))?;
    let mut files = Vec::new();
    for (k, (src, role)) in sources.iter().enumerate() {
        let bytes = io(src, std::fs::read(src))?;
        let name = src
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let is_hea = name.ends_with(".hea");
        let (dat_name, dat) = if is_hea {
            let dat_path = src.with_extension("dat");
            (
                dat_path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string(),
                io(&dat_path, std::fs::read(&dat_path))?,
            )
        } else {
            (String::new(), Vec::new())
        };
        let count = copies_for(bytes.len() as u64, per_file);
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in 0..count {
            let kind = DamageKind::ALL[i % DamageKind::ALL.len()];
            let prefix = format!("{k:02}_{i:02}_{}", kind.name());
            let path = out.join(format!("{prefix}_{name}"));
            let what = if is_hea {
                // the record's files, renamed; the header names the new signal file
                let new_dat = format!("{prefix}_{dat_name}");
                let hea = String::from_utf8_lossy(&bytes).replace(&dat_name, &new_dat);
                let (h, d, damage) = if i % 2 == 0 {
                    let (h, d) = damage(hea.as_bytes(), kind, &mut rng);
                    (h, dat.clone(), d)
                } else {
                    let (d, dm) = damage(&dat, kind, &mut rng);
                    (hea.into_bytes(), d, dm)
                };
                let dat_path = out.join(&new_dat);
                io(&dat_path, std::fs::write(&dat_path, d))?;
                io(&path, std::fs::write(&path, h))?;
                damage
            } else {
                let (b, d) = damage(&bytes, kind, &mut rng);
                io(&path, std::fs::write(&path, b))?;
                d
            };
            files.push(CorpusFile {
                path,
                source: src.clone(),
                role: *role,
                damage: what,
            });
        }
    }
    Ok(files)
}

/// The damaged corpus of the cached real files `cache`, built in `dir` (`derived/` for the files
/// derived from them, `damaged/` for the copies, [`write_corpus`]) with its manifest
/// `dir/damaged.jsonl` ([`write_corpus_manifest`]): what each crate's corpus test reads.
pub fn build_corpus(
    cache: &Path,
    dir: &Path,
    per_file: usize,
    seed: u64,
) -> Result<(Vec<CorpusFile>, PathBuf)> {
    let sources = corpus_sources(cache, &dir.join("derived"))?;
    let files = write_corpus(&sources, &dir.join("damaged"), per_file, seed)?;
    let manifest = dir.join("damaged.jsonl");
    write_corpus_manifest(&files, &manifest)?;
    Ok((files, manifest))
}

/// A manifest naming each corpus file in one row (under the key of its role), paths relative
/// to the manifest's folder when they are inside it. Row `i` (line `i + 1`) is `files[i]`.
pub fn write_corpus_manifest(files: &[CorpusFile], manifest: &Path) -> Result<()> {
    let base = manifest.parent().unwrap_or(Path::new("."));
    let mut text = String::new();
    for f in files {
        let rel = f.path.strip_prefix(base).unwrap_or(&f.path);
        let rel = rel.to_string_lossy().to_string();
        let key = match f.role {
            Role::Image => "images",
            Role::Volume => "videos",
            Role::Mask => "segmentation_path",
            Role::Ecg => "time-series",
        };
        let value = if f.role == Role::Mask {
            serde_json::Value::from(rel)
        } else {
            serde_json::json!([rel])
        };
        let mut row = serde_json::json!({
            "problem": "What is shown?",
            "answer": "normal",
            "data_source": "damaged",
            "dataset": "damaged",
        });
        row[key] = value;
        if f.role == Role::Mask {
            // a row needs a modality: the label volume is read as frames too
            row["videos"] = serde_json::json!([row[key].clone()]);
        }
        text.push_str(&row.to_string());
        text.push('\n');
    }
    io(manifest, std::fs::write(manifest, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_seeded_and_every_kind_changes_the_file() {
        let mut nrrd =
            b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 3 4\nencoding: raw\n\n".to_vec();
        nrrd.extend([7u8; 48]);
        let a = damaged_copies(&nrrd, 8, 3);
        assert_eq!(a, damaged_copies(&nrrd, 8, 3));
        assert_ne!(a, damaged_copies(&nrrd, 8, 4));
        for (bytes, d) in &a {
            assert_ne!(bytes, &nrrd, "{d}");
        }
        let (_, d) = &a[3];
        assert_eq!(d.kind, DamageKind::LengthField);
        assert!(
            String::from_utf8_lossy(&a[3].0).contains("2147483647"),
            "{d}"
        );
        let (t, d) = &a[0];
        assert_eq!((t.len(), d.kind), (d.at, DamageKind::Truncate));
    }

    #[test]
    fn dicom_length_fields_are_found() {
        let mut f = vec![0u8; 128];
        f.extend(b"DICM");
        // (7FE0,0010) OB, reserved, length 4
        f.extend([
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 4, 0, 0, 0, 1, 2, 3, 4,
        ]);
        f.extend([0; 8]);
        let fields = binary_length_fields(&f);
        assert_eq!(fields, vec![140]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (out, d) = damage(&f, DamageKind::LengthField, &mut rng);
        assert_eq!(d.at, 140);
        assert_eq!(out[140..144], [0xFF, 0xFF, 0xFF, 0x7F]);
    }
}
