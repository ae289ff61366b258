//! DICOM images and ECG waveforms (the reference reads every 2D image with
//! `PIL.Image.open` in `dataset.py::ImageProcessMixin.process_image`, spec §4.1; CLIMB's DICOM
//! sources were converted to PNG before training, so this module produces the 8-bit images that
//! conversion would give).
//!
//! Images: pixel data is decoded with `dicom-pixeldata` (uncompressed little/big endian, deflate,
//! RLE lossless, JPEG baseline / extended / lossless, JPEG 2000 through the pure-Rust `openjp2`),
//! the modality LUT (rescale slope / intercept) is applied, then a VOI window (the file's window
//! centre / width, an override, or the frame's min-max) maps values to 8 bits; MONOCHROME1 is
//! inverted so that higher values are brighter; every frame of a multi-frame object becomes one
//! image. JPEG-LS and the other syntaxes without a pure-Rust decoder give
//! [`Error::UnsupportedTransferSyntax`].
//!
//! ECG: the first (or a chosen) item of the WaveformSequence, interleaved samples scaled by
//! channel sensitivity x correction factor + baseline (pydicom's `waveform_array`), converted to
//! mV, with lead names from each channel's source code meaning (`"Lead I (Einthoven)"` -> `I`).

use crate::ecg::EcgSignal;
use crate::error::{Error, Result};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
use image::{DynamicImage, GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

/// How stored values become 8-bit gray levels.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Windowing {
    /// The file's first window centre / width for the frame; min-max when it has none.
    #[default]
    FromFile,
    /// A given window (centre, width) in modality units (after rescale).
    Fixed { center: f64, width: f64 },
    /// Each frame's minimum to black and maximum to white.
    MinMax,
}

/// Whether the file at `path` starts with the DICOM preamble and `DICM` magic (bytes 128..132).
pub fn has_dicm_magic(path: &Path) -> bool {
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|_| &head[128..] == b"DICM")
        .unwrap_or(false)
}

/// Read and parse a DICOM file, its defined lengths checked against the file first (the parser
/// allocates and zero-fills an element's declared length before reading it: a damaged length of
/// 0x7fffffff would cost 2 GiB for a 7 kB file).
fn open(path: &Path) -> Result<DefaultDicomObject> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    check_lengths(&bytes).map_err(|m| Error::file(path, format!("cannot read DICOM: {m}")))?;
    dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Auto)
        .from_reader(std::io::Cursor::new(bytes))
        .map_err(|e| Error::file(path, format!("cannot read DICOM: {}", chain(&e))))
}

/// Why [`check_lengths`]'s walk ended early.
enum Walk {
    /// A defined length runs past the end of the file: refuse the file.
    Refuse(String),
    /// A structure the walk does not follow (deflated data set, an undefined-length `UN`, deep
    /// nesting): leave the file to the parser.
    Stop,
}

/// The element walk of [`check_lengths`] over one transfer syntax.
struct LengthWalk<'a> {
    bytes: &'a [u8],
    explicit: bool,
    big: bool,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Whether an explicit VR has a 2-byte length (PS3.5 7.1.2); every other VR, an unknown one
/// included (the parser reads it as `UN`), has 2 reserved bytes and a 4-byte length.
fn is_short_vr(vr: &[u8; 2]) -> bool {
    matches!(
        vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

impl LengthWalk<'_> {
    fn u16_at(&self, at: usize) -> u16 {
        let b = [self.bytes[at], self.bytes[at + 1]];
        if self.big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b: [u8; 4] = self.bytes[at..at + 4].try_into().expect("4 bytes");
        if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// `(group, element)` at `at`.
    fn tag(&self, at: usize) -> (u16, u16) {
        (self.u16_at(at), self.u16_at(at + 2))
    }

    /// Refuse `len` bytes at `start` when they run past the end of the file.
    fn fits(&self, tag: (u16, u16), start: usize, len: u32) -> std::result::Result<(), Walk> {
        if start as u64 + len as u64 > self.bytes.len() as u64 {
            return Err(Walk::Refuse(format!(
                "element ({:04X},{:04X}) at byte {start} declares {len} bytes, the file holds {} more",
                tag.0,
                tag.1,
                self.bytes.len().saturating_sub(start)
            )));
        }
        Ok(())
    }

    /// Elements from `pos` to `end` or to an item delimiter (consumed); the position after.
    fn elements(
        &self,
        mut pos: usize,
        end: usize,
        depth: usize,
    ) -> std::result::Result<usize, Walk> {
        if depth > 32 {
            return Err(Walk::Stop);
        }
        while pos + 8 <= end {
            let tag = self.tag(pos);
            if tag == (0xFFFE, 0xE00D) {
                return Ok(pos + 8);
            }
            let (vr, len, value) = if self.explicit && tag.0 != 0xFFFE {
                let vr = [self.bytes[pos + 4], self.bytes[pos + 5]];
                if !is_short_vr(&vr) {
                    if pos + 12 > end {
                        return Ok(end);
                    }
                    (Some(vr), self.u32_at(pos + 8), pos + 12)
                } else {
                    (Some(vr), self.u16_at(pos + 6) as u32, pos + 8)
                }
            } else {
                (None, self.u32_at(pos + 4), pos + 8)
            };
            if len == UNDEFINED {
                pos = match vr.as_ref() {
                    None | Some(b"SQ") => self.items(value, end, false, depth + 1)?,
                    Some(b"OB" | b"OW") => self.items(value, end, true, depth + 1)?,
                    Some(_) => return Err(Walk::Stop),
                };
                continue;
            }
            self.fits(tag, value, len)?;
            let next = value + len as usize;
            if vr.as_ref() == Some(b"SQ") {
                self.items(value, next.min(end), false, depth + 1)?;
            }
            pos = next;
        }
        Ok(end)
    }

    /// Items (or fragments) from `pos` to `end` or to a sequence delimiter (consumed).
    fn items(
        &self,
        mut pos: usize,
        end: usize,
        fragments: bool,
        depth: usize,
    ) -> std::result::Result<usize, Walk> {
        while pos + 8 <= end {
            let tag = self.tag(pos);
            let len = self.u32_at(pos + 4);
            match tag {
                (0xFFFE, 0xE0DD) => return Ok(pos + 8),
                (0xFFFE, 0xE000) if len == UNDEFINED && !fragments => {
                    pos = self.elements(pos + 8, end, depth + 1)?;
                }
                (0xFFFE, 0xE000) if len != UNDEFINED => {
                    self.fits(tag, pos + 8, len)?;
                    let next = pos + 8 + len as usize;
                    if !fragments {
                        self.elements(pos + 8, next.min(end), depth + 1)?;
                    }
                    pos = next;
                }
                _ => return Err(Walk::Stop),
            }
        }
        Ok(end)
    }
}

/// Refuse a DICOM file one of whose defined element or item lengths runs past the end of the
/// file (the allocation bound of the DICOM reader); structures the walk does not follow are
/// left to the parser, which reports them.
fn check_lengths(bytes: &[u8]) -> std::result::Result<(), String> {
    let start = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        132
    } else if bytes.starts_with(b"DICM") {
        4
    } else {
        return Ok(());
    };
    // The file meta group: explicit VR little endian, group 0002.
    let meta = LengthWalk {
        bytes,
        explicit: true,
        big: false,
    };
    let mut pos = start;
    let mut ts = String::new();
    while pos + 8 <= bytes.len() && meta.u16_at(pos) == 0x0002 {
        let tag = meta.tag(pos);
        let vr = &bytes[pos + 4..pos + 6];
        let (len, value) = if !is_short_vr(&[vr[0], vr[1]]) {
            if pos + 12 > bytes.len() {
                return Ok(());
            }
            (meta.u32_at(pos + 8), pos + 12)
        } else {
            (meta.u16_at(pos + 6) as u32, pos + 8)
        };
        if len == UNDEFINED {
            return Ok(());
        }
        match meta.fits(tag, value, len) {
            Err(Walk::Refuse(m)) => return Err(m),
            Err(Walk::Stop) => return Ok(()),
            Ok(()) => {}
        }
        if tag == (0x0002, 0x0010) {
            ts = String::from_utf8_lossy(&bytes[value..value + len as usize])
                .trim_end_matches(['\0', ' '])
                .to_string();
        }
        pos = value + len as usize;
    }
    let walk = match ts.as_str() {
        "1.2.840.10008.1.2" => LengthWalk {
            bytes,
            explicit: false,
            big: false,
        },
        "1.2.840.10008.1.2.2" => LengthWalk {
            bytes,
            explicit: true,
            big: true,
        },
        // deflated data sets are inflated by the parser; nothing to walk here
        "1.2.840.10008.1.2.1.99" => return Ok(()),
        _ => LengthWalk {
            bytes,
            explicit: true,
            big: false,
        },
    };
    match walk.elements(pos, bytes.len(), 0) {
        Err(Walk::Refuse(m)) => Err(m),
        _ => Ok(()),
    }
}

/// An error and its causes, `a: b: c` (dicom-rs errors keep the reason in their sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    // codec errors keep their cause out of `source()`; the Debug form names it
    // (e.g. `Unsupported(SamplePrecision(12))`)
    format!("{s} ({e:?})")
}

/// Fail with [`Error::UnsupportedTransferSyntax`] when this build has no decoder for the
/// object's pixel data.
fn ensure_decodable(path: &Path, obj: &DefaultDicomObject) -> Result<()> {
    let uid = obj.meta().transfer_syntax().trim_end_matches('\0').trim();
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) if ts.can_decode_all() => Ok(()),
        Some(ts) => Err(Error::UnsupportedTransferSyntax {
            path: path.to_path_buf(),
            uid: uid.to_string(),
            name: ts.name().to_string(),
        }),
        None => Err(Error::UnsupportedTransferSyntax {
            path: path.to_path_buf(),
            uid: uid.to_string(),
            name: "unknown transfer syntax".into(),
        }),
    }
}

/// Decoded pixel values of a DICOM image after the modality LUT (rescale slope / intercept).
#[derive(Debug, Clone, PartialEq)]
pub struct DicomPixels {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// 1 (gray) or 3 (RGB, interleaved).
    pub samples_per_pixel: u16,
    /// Bits stored per sample.
    pub bits_stored: u16,
    /// `MONOCHROME1`, `MONOCHROME2`, `RGB`, ...
    pub photometric: String,
    /// The transfer syntax UID of the file.
    pub transfer_syntax: String,
    /// Per frame, row-major, `width * height * samples_per_pixel` values.
    pub frames: Vec<Vec<f32>>,
    /// Per frame, the file's window (centre, width), if it gives one.
    pub windows: Vec<Option<(f64, f64)>>,
}

/// Decode every frame of a DICOM image to modality values. Runs behind the decoder boundary
/// ([`crate::guard::contain`]): a panic of the pixel-data decoder is an error naming the file
/// and the transfer syntax's decoder.
pub fn read_pixels(path: &Path) -> Result<DicomPixels> {
    crate::guard::contain(path, "DICOM", || read_pixels_unguarded(path))
}

/// An integer attribute of the data set (`IS`, `US`, ...).
fn attr_u64(obj: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<u64> {
    obj.element(tag).ok().and_then(|e| e.to_int::<u64>().ok())
}

/// The decoded size the header promises, refused beyond [`crate::guard::MAX_DECODED_BYTES`]
/// (as f32 modality values) and, for native pixel data, beyond what the file holds.
fn check_pixel_size(path: &Path, obj: &DefaultDicomObject) -> Result<()> {
    let dims = [
        attr_u64(obj, tags::ROWS).unwrap_or(0),
        attr_u64(obj, tags::COLUMNS).unwrap_or(0),
        attr_u64(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1),
        attr_u64(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1),
    ];
    let values = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .unwrap_or(u64::MAX);
    crate::guard::check_size(path, "the decoded pixel data", values.saturating_mul(4))?;
    let native = obj
        .element(tags::PIXEL_DATA)
        .ok()
        .and_then(|e| e.value().primitive().map(|p| p.calculate_byte_len()));
    if let Some(have) = native {
        let bits = attr_u64(obj, tags::BITS_ALLOCATED).unwrap_or(8).max(1);
        let need = values.saturating_mul(bits) / 8;
        if need > have as u64 {
            return Err(Error::file(
                path,
                format!(
                    "the header promises {need} bytes of pixel data ({} x {} x {} samples x {} frames of {bits} bits), the file holds {have}",
                    dims[0], dims[1], dims[2], dims[3]
                ),
            ));
        }
    }
    Ok(())
}

fn read_pixels_unguarded(path: &Path) -> Result<DicomPixels> {
    let obj = open(path)?;
    ensure_decodable(path, &obj)?;
    check_pixel_size(path, &obj)?;
    let uid = obj.meta().transfer_syntax().trim_end_matches('\0').trim();
    let decoder = format!(
        "DICOM pixel data ({})",
        TransferSyntaxRegistry
            .get(uid)
            .map_or("unknown transfer syntax", |ts| ts.name())
    );
    crate::guard::contain(path, &decoder, || {
        let err = |e: dicom_pixeldata::Error| {
            Error::file(path, format!("cannot decode pixel data: {}", chain(&e)))
        };
        let px = obj.decode_pixel_data().map_err(err)?;
        let n = px.number_of_frames();
        let mut frames = Vec::new();
        for f in 0..n {
            frames.push(px.to_vec_frame::<f32>(f).map_err(err)?);
        }
        let file_windows = px.window().map_err(err)?.unwrap_or(&[]);
        let windows = (0..n as usize)
            .map(|f| {
                file_windows
                    .get(f.min(file_windows.len().saturating_sub(1)))
                    .filter(|w| w.width.is_finite() && w.width >= 1.0 && w.center.is_finite())
                    .map(|w| (w.center, w.width))
            })
            .collect();
        Ok(DicomPixels {
            width: px.columns(),
            height: px.rows(),
            samples_per_pixel: px.samples_per_pixel(),
            bits_stored: px.bits_stored(),
            photometric: px.photometric_interpretation().as_str().to_string(),
            transfer_syntax: obj
                .meta()
                .transfer_syntax()
                .trim_end_matches('\0')
                .to_string(),
            frames,
            windows,
        })
    })
}

/// The DICOM linear VOI function (PS3.3 C.11.2.1.2.1) to `[0, 255]`.
pub fn window_linear(x: f64, center: f64, width: f64) -> u8 {
    let (c, w) = (center - 0.5, (width - 1.0).max(1e-9));
    if x <= c - w / 2.0 {
        0
    } else if x > c + w / 2.0 {
        255
    } else {
        (((x - c) / w + 0.5) * 255.0).round().clamp(0.0, 255.0) as u8
    }
}

/// Min-max scaling of `values` to `[0, 255]` (rounded); a constant input maps to 0.
pub fn min_max_u8(values: &[f32]) -> Vec<u8> {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = (hi - lo) as f64;
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() || range <= 0.0 {
                0
            } else {
                (((v - lo) as f64 / range) * 255.0).round() as u8
            }
        })
        .collect()
}

impl DicomPixels {
    /// One 8-bit image per frame: gray frames windowed (and inverted for MONOCHROME1), colour
    /// frames as RGB (YBR_FULL converted; 16-bit colour scaled by its stored bit depth).
    pub fn to_images(
        &self,
        windowing: Windowing,
    ) -> std::result::Result<Vec<DynamicImage>, String> {
        let (w, h) = (self.width, self.height);
        let mut out = Vec::with_capacity(self.frames.len());
        for (i, frame) in self.frames.iter().enumerate() {
            let img = match (self.samples_per_pixel, self.photometric.as_str()) {
                (1, "MONOCHROME1" | "MONOCHROME2") => {
                    let window = match windowing {
                        Windowing::FromFile => self.windows[i],
                        Windowing::Fixed { center, width } => Some((center, width)),
                        Windowing::MinMax => None,
                    };
                    let mut gray = match window {
                        Some((c, ww)) => frame
                            .iter()
                            .map(|&v| window_linear(v as f64, c, ww))
                            .collect(),
                        None => min_max_u8(frame),
                    };
                    if self.photometric == "MONOCHROME1" {
                        gray.iter_mut().for_each(|v| *v = 255 - *v);
                    }
                    DynamicImage::ImageLuma8(
                        GrayImage::from_raw(w, h, gray).ok_or("frame size mismatch")?,
                    )
                }
                (3, pi @ ("RGB" | "YBR_FULL")) => {
                    let scale = if self.bits_stored > 8 {
                        255.0 / ((1u64 << self.bits_stored.min(32)) - 1) as f64
                    } else {
                        1.0
                    };
                    let mut rgb: Vec<u8> = frame
                        .iter()
                        .map(|&v| (v as f64 * scale).round().clamp(0.0, 255.0) as u8)
                        .collect();
                    if pi == "YBR_FULL" {
                        for p in rgb.chunks_exact_mut(3) {
                            let (y, cb, cr) =
                                (p[0] as f64, p[1] as f64 - 128.0, p[2] as f64 - 128.0);
                            let to = |v: f64| v.round().clamp(0.0, 255.0) as u8;
                            p[0] = to(y + 1.402 * cr);
                            p[1] = to(y - 0.344136 * cb - 0.714136 * cr);
                            p[2] = to(y + 1.772 * cb);
                        }
                    }
                    DynamicImage::ImageRgb8(
                        RgbImage::from_raw(w, h, rgb).ok_or("frame size mismatch")?,
                    )
                }
                (spp, pi) => {
                    return Err(format!(
                        "unsupported photometric interpretation {pi} with {spp} samples per pixel"
                    ));
                }
            };
            out.push(img);
        }
        Ok(out)
    }
}

/// Read a DICOM image file as 8-bit images, one per frame.
pub fn read_image(path: &Path, windowing: Windowing) -> Result<Vec<DynamicImage>> {
    let px = read_pixels(path)?;
    crate::guard::contain(path, "DICOM windowing", || {
        px.to_images(windowing).map_err(|m| Error::file(path, m))
    })
}

fn item_str(obj: &InMemDicomObject, tag: dicom_object::Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().trim_end_matches('\0').to_string())
        .filter(|s| !s.is_empty())
}

fn item_f64(obj: &InMemDicomObject, tag: dicom_object::Tag) -> Option<f64> {
    obj.get(tag).and_then(|e| e.to_float64().ok())
}

/// Short lead name from a DICOM channel source code meaning: `"Lead I (Einthoven)"` -> `I`,
/// `"Lead aVR"` -> `aVR`, `"Lead V1"` -> `V1`.
pub fn lead_name(code_meaning: &str) -> String {
    let s = code_meaning.trim();
    let s = s.split(" (").next().unwrap_or(s);
    let s = s
        .strip_prefix("Lead ")
        .or_else(|| s.strip_prefix("lead "))
        .unwrap_or(s);
    s.trim().to_string()
}

/// Read the ECG waveform at `item` of the WaveformSequence (item 0 is the rhythm strip in
/// 12-lead ECG objects) as an [`EcgSignal`] in mV (behind [`crate::guard::contain`]).
pub fn read_ecg(path: &Path, item: usize) -> Result<EcgSignal> {
    crate::guard::contain(path, "DICOM waveform", || read_ecg_unguarded(path, item))
}

fn read_ecg_unguarded(path: &Path, item: usize) -> Result<EcgSignal> {
    let obj = open(path)?;
    let fail = |m: String| Error::file(path, m);
    let seq = obj
        .get(tags::WAVEFORM_SEQUENCE)
        .and_then(|e| e.items())
        .ok_or_else(|| fail("no WaveformSequence: not a DICOM waveform".into()))?;
    let wf = seq.get(item).ok_or_else(|| {
        fail(format!(
            "WaveformSequence has {} items, item {item} requested",
            seq.len()
        ))
    })?;
    let channels = item_f64(wf, tags::NUMBER_OF_WAVEFORM_CHANNELS)
        .ok_or_else(|| fail("missing NumberOfWaveformChannels".into()))?
        as usize;
    let samples = item_f64(wf, tags::NUMBER_OF_WAVEFORM_SAMPLES)
        .ok_or_else(|| fail("missing NumberOfWaveformSamples".into()))? as usize;
    let fs = item_f64(wf, tags::SAMPLING_FREQUENCY)
        .ok_or_else(|| fail("missing SamplingFrequency".into()))?;
    let bits = item_f64(wf, tags::WAVEFORM_BITS_ALLOCATED).unwrap_or(16.0) as u32;
    let interp = item_str(wf, tags::WAVEFORM_SAMPLE_INTERPRETATION).unwrap_or_else(|| "SS".into());
    if bits != 16 || !(interp == "SS" || interp == "US") {
        return Err(fail(format!(
            "unsupported waveform encoding: {bits} bits, interpretation {interp}"
        )));
    }
    let data = wf
        .get(tags::WAVEFORM_DATA)
        .ok_or_else(|| fail("missing WaveformData".into()))?;
    let raw: Vec<f32> = {
        use dicom_core::PrimitiveValue as P;
        let prim = data
            .value()
            .primitive()
            .ok_or_else(|| fail("WaveformData is not a primitive value".into()))?;
        let signed = interp == "SS";
        match prim {
            P::U16(v) => v
                .iter()
                .map(|&u| if signed { u as i16 as f32 } else { u as f32 })
                .collect(),
            P::I16(v) => v.iter().map(|&x| x as f32).collect(),
            P::U8(v) => v
                .chunks_exact(2)
                .map(|b| {
                    let u = u16::from_le_bytes([b[0], b[1]]);
                    if signed { u as i16 as f32 } else { u as f32 }
                })
                .collect(),
            _ => return Err(fail("WaveformData has an unexpected value type".into())),
        }
    };
    let needed = channels.saturating_mul(samples);
    if raw.len() < needed {
        return Err(fail(format!(
            "WaveformData has {} values, {channels} x {samples} expected",
            raw.len()
        )));
    }
    let defs = wf
        .get(tags::CHANNEL_DEFINITION_SEQUENCE)
        .and_then(|e| e.items())
        .ok_or_else(|| fail("missing ChannelDefinitionSequence".into()))?;
    if defs.len() != channels {
        return Err(fail(format!(
            "{} channel definitions for {channels} channels",
            defs.len()
        )));
    }
    let mut leads = Vec::with_capacity(channels);
    let mut out = Vec::with_capacity(channels);
    for (c, def) in defs.iter().enumerate() {
        let meaning = def
            .get(tags::CHANNEL_SOURCE_SEQUENCE)
            .and_then(|e| e.items())
            .and_then(|items| items.first())
            .and_then(|src| item_str(src, tags::CODE_MEANING));
        let name = meaning
            .map(|m| lead_name(&m))
            .or_else(|| item_str(def, tags::CHANNEL_LABEL))
            .unwrap_or_else(|| format!("ch{c}"));
        let sensitivity = item_f64(def, tags::CHANNEL_SENSITIVITY).unwrap_or(1.0);
        let correction = item_f64(def, tags::CHANNEL_SENSITIVITY_CORRECTION_FACTOR).unwrap_or(1.0);
        let baseline = item_f64(def, tags::CHANNEL_BASELINE).unwrap_or(0.0);
        let unit = def
            .get(tags::CHANNEL_SENSITIVITY_UNITS_SEQUENCE)
            .and_then(|e| e.items())
            .and_then(|items| items.first())
            .and_then(|u| item_str(u, tags::CODE_VALUE))
            .unwrap_or_else(|| "mV".into());
        let to_mv = match unit.as_str() {
            "uV" => 1e-3,
            "mV" => 1.0,
            "V" => 1e3,
            other => {
                return Err(fail(format!(
                    "channel {c}: unknown sensitivity unit {other}"
                )));
            }
        };
        let scale = sensitivity * correction;
        out.push(
            (0..samples)
                .map(|s| ((raw[s * channels + c] as f64 * scale + baseline) * to_mv) as f32)
                .collect(),
        );
        leads.push(name);
    }
    Ok(EcgSignal {
        fs,
        leads,
        data: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_follows_the_standard() {
        // c = 40, w = 400: below c - 0.5 - 199.5 = -160 is black, above 239.5 white
        assert_eq!(window_linear(-160.0, 40.0, 400.0), 0);
        assert_eq!(window_linear(240.0, 40.0, 400.0), 255);
        assert_eq!(window_linear(39.5, 40.0, 400.0), 128); // (0 / 399 + 0.5) * 255 = 127.5
        assert_eq!(min_max_u8(&[2.0, 4.0, 6.0]), vec![0, 128, 255]);
        assert_eq!(min_max_u8(&[3.0, 3.0]), vec![0, 0]);
    }

    #[test]
    fn lead_names_are_shortened() {
        assert_eq!(lead_name("Lead I (Einthoven)"), "I");
        assert_eq!(lead_name("Lead aVR"), "aVR");
        assert_eq!(lead_name("Lead V6"), "V6");
        assert_eq!(lead_name("II"), "II");
    }

    #[test]
    fn non_dicom_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.dcm");
        std::fs::write(&p, b"not dicom").unwrap();
        assert!(!has_dicm_magic(&p));
        let e = read_image(&p, Windowing::FromFile).unwrap_err().to_string();
        assert!(
            e.contains("x.dcm") && e.contains("cannot read DICOM"),
            "{e}"
        );
    }
}
