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
use dicom_core::{Tag, VR};
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

/// The deepest nesting of sequences [`check_lengths`] lets through. dicom-object builds the tree
/// of a data set by recursion (one `build_sequence` and one `build_object` frame per level), so
/// a damaged or hostile file nesting sequences thousands deep would overflow the stack of the
/// reading thread, an abort no boundary can catch. Real objects nest a few levels (structured
/// reports a dozen or so).
pub const MAX_SEQUENCE_DEPTH: usize = 64;

/// The bytes the parser reads, counted: the walk's position in the stream.
struct Counted<R> {
    inner: R,
    at: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl<R: Read> Counted<R> {
    /// Read up to `n` bytes past, `None` when the stream fails; how many were there.
    fn skip(&mut self, n: u64) -> Option<u64> {
        std::io::copy(&mut self.by_ref().take(n), &mut std::io::sink()).ok()
    }
}

/// One open sequence or item of the parser (dicom-parser's `SeqToken`).
#[derive(Clone, Copy)]
struct Open {
    item: bool,
    /// The declared length, `None` when undefined.
    len: Option<u32>,
    /// Part of an encapsulated pixel data element (fragments, not data sets).
    pixel: bool,
    /// The parser's position when the value began.
    base: u64,
}

/// How many bytes of a defined-length value dicom-parser reads (and allocates, as a vector of
/// its value type) for `vr` (`StatefulDecoder::read_value_preserved`): whole values only, so an
/// `US` of 5 bytes reads 4.
fn value_bytes(vr: VR, len: u32) -> u64 {
    let unit: u32 = match vr {
        VR::US | VR::OW | VR::SS => 2,
        VR::AT | VR::FL | VR::OF | VR::SL | VR::UL | VR::OL => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    };
    (len / unit * unit) as u64
}

/// The refusal of a value or item that runs past the end of the data.
fn past_end(tag: Tag, at: u64, where_: &str, len: u32, have: u64) -> String {
    format!(
        "element ({:04X},{:04X}) at byte {at}{where_} declares {len} bytes, the {} holds {have} more",
        tag.0,
        tag.1,
        if where_.is_empty() {
            "file"
        } else {
            "inflated data set"
        }
    )
}

/// Walk a data set token by token the way dicom-parser 0.10's `DataSetReader` (driven by
/// dicom-object's tree builder) reads it, from `src` (the bytes after the file meta group, or
/// their inflation), allocating nothing: every value, offset table and fragment the parser
/// would allocate for is checked against the bytes that follow, and nesting is bounded by
/// [`MAX_SEQUENCE_DEPTH`]. `Ok` also where the parser stops with an error of its own (it
/// allocates nothing past that point). `offset` and `where_` place byte positions in messages.
fn walk_data_set<'r, R: Read + 'r>(
    src: &mut Counted<R>,
    decoder: &dicom_encoding::transfer_syntax::DynDecoder<dyn Read + 'r>,
    big_endian: bool,
    offset: u64,
    where_: &str,
) -> std::result::Result<(), String> {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
    use dicom_core::header::{Header, SequenceItemHeader};
    const ITEM: Tag = Tag(0xFFFE, 0xE000);
    let mut stack: Vec<Open> = Vec::new();
    // the reader's state (`DataSetReader`'s fields of the same names)
    let mut in_sequence = false;
    let mut offset_table_next = false;
    let mut delimiter_check_pending = false;
    let mut last_header: Option<(dicom_core::DataElementHeader, u64)> = None;
    // the decoder's `position` (what sequence ends are checked against) and pixel sign
    let mut position = 0u64;
    let mut signed_pixeldata: Option<bool> = None;
    let nested = |stack: &[Open]| stack.iter().filter(|o| !o.item && !o.pixel).count();
    loop {
        if delimiter_check_pending {
            if let Some(top) = stack.last()
                && let Some(len) = top.len
            {
                let end = top.base + len as u64;
                if end == position {
                    in_sequence = top.item;
                    stack.pop();
                    continue;
                }
                if end < position {
                    return Ok(()); // the parser: inconsistent sequence end
                }
            }
            delimiter_check_pending = false;
        }
        let at = offset + src.at;
        if in_sequence {
            // an item, an item delimiter or a sequence delimiter; at the end of the data the
            // parser stops (gracefully inside pixel data, with an error elsewhere)
            let Ok(header) = decoder.decode_item_header(src) else {
                return Ok(());
            };
            position += 8;
            match header {
                SequenceItemHeader::Item { len } => {
                    in_sequence = false;
                    let Some(parent) = stack.last() else {
                        return Ok(()); // the parser: item outside a sequence
                    };
                    let pixel = parent.pixel;
                    stack.push(Open {
                        item: true,
                        len: len.get(),
                        pixel,
                        base: position,
                    });
                    if len.0 == 0 {
                        delimiter_check_pending = true;
                    }
                }
                SequenceItemHeader::ItemDelimiter => {
                    stack.pop();
                    in_sequence = true;
                    delimiter_check_pending = true;
                }
                SequenceItemHeader::SequenceDelimiter => {
                    stack.pop();
                    in_sequence = false;
                    delimiter_check_pending = true;
                }
            }
        } else if let Some(&Open {
            item: true,
            pixel: true,
            len,
            ..
        }) = stack.last()
        {
            // the offset table (a vector of `len` u32) or a fragment (`len` bytes), allocated
            // before reading; a fragment is read without checking that it is all there
            let Some(len) = len else {
                return Ok(()); // the parser: undefined pixel data item length
            };
            // (a u32 vector of `len` entries, of which the parser reads the whole ones)
            let need = if offset_table_next {
                len as u64 / 4 * 4
            } else {
                len as u64
            };
            let have = src.skip(need).unwrap_or(0);
            if have < need {
                return Err(past_end(ITEM, at, where_, len, have));
            }
            position += need;
            offset_table_next = false;
            delimiter_check_pending = true;
        } else if let Some((header, at)) = last_header.take() {
            if header.is_encapsulated_pixeldata() {
                // encapsulated pixel data: a pixel sequence, then the offset table item
                stack.push(Open {
                    item: false,
                    len: None,
                    pixel: true,
                    base: position,
                });
                let Ok(item) = decoder.decode_item_header(src) else {
                    return Ok(());
                };
                position += 8;
                match item {
                    SequenceItemHeader::Item { len } => {
                        in_sequence = false;
                        stack.push(Open {
                            item: true,
                            len: len.get(),
                            pixel: true,
                            base: position,
                        });
                        if len.0 == 0 {
                            delimiter_check_pending = true;
                        } else {
                            offset_table_next = true;
                        }
                    }
                    SequenceItemHeader::SequenceDelimiter => {
                        stack.pop();
                        in_sequence = false;
                    }
                    SequenceItemHeader::ItemDelimiter => return Ok(()),
                }
            } else {
                // a primitive value, allocated whole before it is read
                let len = header.len.0;
                if len != 0 {
                    let need = value_bytes(header.vr, len);
                    let mut first = [0u8; 2];
                    let mut have = 0;
                    if header.tag == Tag(0x0028, 0x0103) && need >= 2 {
                        if src.read_exact(&mut first).is_err() {
                            return Err(past_end(header.tag, at, where_, len, 0));
                        }
                        have = 2;
                    }
                    have += src.skip(need - have).unwrap_or(0);
                    if have < need {
                        return Err(past_end(header.tag, at, where_, len, have));
                    }
                    if header.tag == Tag(0x0028, 0x0103) && matches!(header.vr, VR::US | VR::OW) {
                        signed_pixeldata = (need >= 2).then(|| {
                            if big_endian {
                                u16::from_be_bytes(first) != 0
                            } else {
                                u16::from_le_bytes(first) != 0
                            }
                        });
                    }
                    position += len as u64;
                }
                delimiter_check_pending = true;
            }
        } else {
            // an element header (the end of the data here ends the data set)
            let Ok((mut header, size)) = decoder.decode_header(src) else {
                return Ok(());
            };
            position += size as u64;
            if signed_pixeldata == Some(true)
                && dicom_dictionary_std::StandardDataDictionary
                    .by_tag(header.tag)
                    .map(|e| e.vr())
                    == Some(VirtualVr::Xs)
            {
                header.vr = VR::SS;
            }
            let opens = header.vr == VR::SQ
                || (header.len.is_undefined()
                    && header.tag != Tag(0xFFFE, 0xE00D)
                    && !header.is_encapsulated_pixeldata());
            if opens {
                // a sequence; an element of any other VR with an undefined length is read as
                // one too (its VR dropped), with the same transfer syntax
                if nested(&stack) >= MAX_SEQUENCE_DEPTH {
                    return Err(format!(
                        "element ({:04X},{:04X}) at byte {at}{where_} opens a sequence nested more than {MAX_SEQUENCE_DEPTH} deep",
                        header.tag.0, header.tag.1
                    ));
                }
                in_sequence = true;
                stack.push(Open {
                    item: false,
                    len: header.len.get(),
                    pixel: false,
                    base: position,
                });
                if header.len.0 == 0 {
                    delimiter_check_pending = true;
                }
            } else if header.tag == Tag(0xFFFE, 0xE00D) {
                // an item delimiter: ignored outside a sequence
                if !stack.is_empty() {
                    in_sequence = true;
                    stack.pop();
                    delimiter_check_pending = true;
                }
            } else {
                // encapsulated pixel data or a primitive value: read on the next turn
                last_header = Some((header, at));
            }
        }
    }
}

/// Refuse a DICOM file on which dicom-object's reader would allocate past the end of the data:
/// a value, a basic offset table or a pixel data fragment whose declared length runs past the
/// bytes that follow (the parser allocates and zero-fills a declared length before reading it:
/// a damaged length of 0x7fffffff would cost 2 GiB for a 7 kB file), or sequences nested deeper
/// than [`MAX_SEQUENCE_DEPTH`]. The walk follows the reader token by token (the file meta group
/// as `FileMetaTable::read_from` reads it, then the data set in its transfer syntax: explicit
/// or implicit VR, little or big endian, deflated; sequences and items of defined or undefined
/// length; elements of other VRs with an undefined length, which the parser reads as sequences;
/// encapsulated pixel data), so a refusal names the element and the length, and a file the
/// reader can read is never refused. Where the reader itself stops with an error the walk
/// stops too and leaves the file to it.
fn check_lengths(bytes: &[u8]) -> std::result::Result<(), String> {
    use dicom_encoding::transfer_syntax::{Codec, Endianness};
    let start = if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        132
    } else if bytes.starts_with(b"DICM") {
        4
    } else {
        return Ok(());
    };
    // The file meta group: explicit VR little endian, (0002,0000) first, then elements (of any
    // group) until the group length is used up.
    let Some(meta) = TransferSyntaxRegistry
        .get("1.2.840.10008.1.2.1")
        .and_then(|ts| ts.decoder())
    else {
        return Ok(());
    };
    let mut src = Counted {
        inner: &bytes[start..],
        at: 0,
    };
    match meta.decode_header(&mut src) {
        Ok((h, _)) if h.tag == Tag(0x0002, 0x0000) && h.len.0 == 4 => {}
        _ => return Ok(()),
    }
    let mut group_length = [0u8; 4];
    if src.read_exact(&mut group_length).is_err() {
        return Ok(());
    }
    let group_length = u32::from_le_bytes(group_length);
    let (mut total, mut uid) = (0u32, String::new());
    while total < group_length {
        let at = start as u64 + src.at;
        let Ok((h, size)) = meta.decode_header(&mut src) else {
            return Ok(());
        };
        let Some(len) = h.len.get() else {
            return Ok(());
        };
        // the values the reader allocates (within its limits), then reads; others it skips
        let allocated = match (h.tag.0, h.tag.1) {
            (0x0002, 0x0001) => len == 2,
            (0x0002, 0x0002 | 0x0003 | 0x0010 | 0x0012) => true,
            (0x0002, 0x0013 | 0x0016 | 0x0017 | 0x0018) => len <= 16,
            (0x0002, 0x0100) => len <= 64,
            (0x0002, 0x0102) => len <= 1 << 26,
            _ => false,
        };
        let value = start + src.at as usize;
        let left = (bytes.len() - value) as u64;
        if allocated && len as u64 > left {
            return Err(past_end(h.tag, at, "", len, left));
        }
        if h.tag == Tag(0x0002, 0x0010) {
            uid = String::from_utf8_lossy(&bytes[value..value + len as usize])
                .trim_end_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string();
        }
        if matches!(
            h.tag,
            Tag(
                0x0002,
                0x0001 | 0x0013 | 0x0016 | 0x0017 | 0x0018 | 0x0100 | 0x0102
            )
        ) && !allocated
        {
            return Ok(()); // the reader: unexpected value length
        }
        if src.skip(len as u64) != Some(len as u64) {
            return Ok(());
        }
        total = total.saturating_add(size as u32).saturating_add(len);
    }
    let Some(ts) = TransferSyntaxRegistry.get(&uid) else {
        return Ok(()); // the reader: unknown transfer syntax
    };
    let Some(decoder) = ts.decoder() else {
        return Ok(());
    };
    let big_endian = ts.endianness() == Endianness::Big;
    let data_set = start + src.at as usize;
    match ts.codec() {
        Codec::Dataset(Some(_)) => {
            // deflated: the reader inflates as it reads; so does the walk, up to the bound of
            // what one file may decode
            let inflated = flate2::read::DeflateDecoder::new(&bytes[data_set..]);
            let mut src = Counted {
                inner: inflated.take(crate::guard::MAX_DECODED_BYTES + 1),
                at: 0,
            };
            let walked = walk_data_set(
                &mut src,
                &decoder,
                big_endian,
                0,
                " of the inflated data set",
            );
            if src.at > crate::guard::MAX_DECODED_BYTES {
                return Err(format!(
                    "the deflated data set inflates to more than {} bytes",
                    crate::guard::MAX_DECODED_BYTES
                ));
            }
            walked
        }
        Codec::Dataset(None) => Ok(()),
        _ => walk_data_set(
            &mut Counted {
                inner: &bytes[data_set..],
                at: 0,
            },
            &decoder,
            big_endian,
            data_set as u64,
            "",
        ),
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

    // ---- the length walk, on files built here (no test data needed) ----

    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
    const UNDEFINED: u32 = u32::MAX;

    /// An explicit VR element header declaring `len` (the 2-byte length form for the VRs that
    /// have it), little or big endian.
    fn header(tag: (u16, u16), vr: &[u8; 2], len: u32, big: bool) -> Vec<u8> {
        let u16b = |v: u16| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let u32b = |v: u32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut out = [u16b(tag.0), u16b(tag.1)].concat();
        out.extend_from_slice(vr);
        let short = VR::from_binary(*vr).is_some_and(|v| {
            matches!(
                v,
                VR::AE
                    | VR::AS
                    | VR::AT
                    | VR::CS
                    | VR::DA
                    | VR::DS
                    | VR::DT
                    | VR::FL
                    | VR::FD
                    | VR::IS
                    | VR::LO
                    | VR::LT
                    | VR::PN
                    | VR::SH
                    | VR::SL
                    | VR::SS
                    | VR::ST
                    | VR::TM
                    | VR::UI
                    | VR::UL
                    | VR::US
            )
        });
        if short {
            out.extend_from_slice(&u16b(len as u16));
        } else {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&u32b(len));
        }
        out
    }

    /// An explicit VR little endian element with its value.
    fn el(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        [header(tag, vr, value.len() as u32, false), value.to_vec()].concat()
    }

    /// An implicit VR little endian element header.
    fn implicit(tag: (u16, u16), len: u32) -> Vec<u8> {
        [tag.0.to_le_bytes(), tag.1.to_le_bytes()]
            .concat()
            .into_iter()
            .chain(len.to_le_bytes())
            .collect()
    }

    /// An item (`FFFE,E000`), item delimiter (`E00D`) or sequence delimiter (`E0DD`) header.
    fn item(element: u16, len: u32) -> Vec<u8> {
        [
            &[0xFE, 0xFF][..],
            &element.to_le_bytes(),
            &len.to_le_bytes(),
        ]
        .concat()
    }

    /// Preamble, `DICM`, the file meta group naming `ts`, then `data_set`.
    fn file(ts: &str, data_set: &[u8]) -> Vec<u8> {
        let mut uid = ts.as_bytes().to_vec();
        if uid.len() % 2 == 1 {
            uid.push(0);
        }
        let group = el((0x0002, 0x0010), b"UI", &uid);
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend(el(
            (0x0002, 0x0000),
            b"UL",
            &(group.len() as u32).to_le_bytes(),
        ));
        out.extend(group);
        out.extend_from_slice(data_set);
        out
    }

    /// dicom-object's reading of `bytes` (what `open` does after the walk).
    fn parse(bytes: &[u8]) -> std::result::Result<DefaultDicomObject, String> {
        dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Auto)
            .from_reader(std::io::Cursor::new(bytes.to_vec()))
            .map_err(|e| chain(&e))
    }

    /// The walk accepts `bytes` and dicom-object reads them.
    fn accepted(bytes: &[u8]) {
        check_lengths(bytes).unwrap();
        parse(bytes).unwrap();
    }

    /// The walk refuses `bytes` naming `element` and `len`.
    fn refused(bytes: &[u8], element: &str, len: u32) -> String {
        let m = check_lengths(bytes).unwrap_err();
        assert!(
            m.contains(&format!("element {element} at byte"))
                && m.contains(&format!("declares {len} bytes")),
            "{m}"
        );
        m
    }

    const PATIENT: (u16, u16) = (0x0010, 0x0010);
    const CODE_VALUE: (u16, u16) = (0x0008, 0x0100);
    const PRIVATE_OB: (u16, u16) = (0x0011, 0x1010);

    /// `inner` inside an element of `vr` with an undefined length: one undefined-length item.
    fn undefined_length(tag: (u16, u16), vr: &[u8; 2], inner: &[u8]) -> Vec<u8> {
        [
            header(tag, vr, UNDEFINED, false),
            item(0xE000, UNDEFINED),
            inner.to_vec(),
            item(0xE00D, 0),
            item(0xE0DD, 0),
        ]
        .concat()
    }

    #[test]
    fn undefined_length_elements_of_any_vr_are_walked_as_sequences() {
        // what the first fuzz campaign found: (0008,1090) with a damaged VR and an undefined
        // length; dicom-parser reads it as a sequence in the file's own transfer syntax
        let inner = |len: u32| {
            [
                el(CODE_VALUE, b"SH", b"AB"),
                header(PRIVATE_OB, b"OB", len, false),
                vec![7; 4],
            ]
            .concat()
        };
        for vr in [b"LQ", b"UN", b"OW", b"\0Q"] {
            let ok = file(
                EXPLICIT_LE,
                &[
                    undefined_length((0x0008, 0x1090), vr, &inner(4)),
                    el(PATIENT, b"PN", b"DOE^J "),
                ]
                .concat(),
            );
            accepted(&ok);
            let bad = file(
                EXPLICIT_LE,
                &undefined_length((0x0008, 0x1090), vr, &inner(0x7FFF_FFF0)),
            );
            let m = refused(&bad, "(0011,1010)", 0x7FFF_FFF0);
            // the value's 4 bytes, the item and the sequence delimiters
            assert!(m.contains("the file holds 20 more"), "{m}");
        }
    }

    /// `depth` nested sequences, alternating defined and undefined lengths, around `inner`.
    fn nested(depth: usize, inner: Vec<u8>) -> Vec<u8> {
        (0..depth).fold(inner, |inner, level| {
            if level % 2 == 0 {
                let it = [item(0xE000, inner.len() as u32), inner].concat();
                [header((0x0040, 0xA730), b"SQ", it.len() as u32, false), it].concat()
            } else {
                undefined_length((0x0040, 0xA730), b"SQ", &inner)
            }
        })
    }

    #[test]
    fn nested_sequences_are_walked_at_every_depth_up_to_the_bound() {
        let value = |len: u32| [header(PRIVATE_OB, b"OB", len, false), vec![1; 6]].concat();
        for depth in [1, 2, 5, MAX_SEQUENCE_DEPTH] {
            accepted(&file(EXPLICIT_LE, &nested(depth, value(6))));
            refused(
                &file(EXPLICIT_LE, &nested(depth, value(1 << 30))),
                "(0011,1010)",
                1 << 30,
            );
        }
        // one more level is refused, as is a hostile depth (walked without recursion; read by
        // dicom-object, it would overflow the stack)
        let hostile = |depth: usize| {
            let open = [
                header((0x0040, 0xA730), b"SQ", UNDEFINED, false),
                item(0xE000, UNDEFINED),
            ];
            let close = [item(0xE00D, 0), item(0xE0DD, 0)].concat();
            [open.concat().repeat(depth), value(6), close.repeat(depth)].concat()
        };
        for data in [nested(MAX_SEQUENCE_DEPTH + 1, value(6)), hostile(100_000)] {
            let m = check_lengths(&file(EXPLICIT_LE, &data)).unwrap_err();
            assert!(
                m.contains("(0040,A730)") && m.contains("nested more than 64 deep"),
                "{m}"
            );
        }
    }

    #[test]
    fn the_deepest_nesting_let_through_is_read_on_a_small_stack() {
        // rayon's workers and tokio's blocking threads have 2 MiB stacks
        let bytes = file(
            EXPLICIT_LE,
            &nested(MAX_SEQUENCE_DEPTH, el(PATIENT, b"PN", b"DOE^J ")),
        );
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || accepted(&bytes))
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn encapsulated_pixel_data_fragments_and_offset_table_are_checked() {
        let pixels = |table: u32, fragment: u32| {
            [
                header((0x7FE0, 0x0010), b"OB", UNDEFINED, false),
                item(0xE000, table),
                vec![0; 4],
                item(0xE000, fragment),
                vec![0xFF, 0xD8, 0xFF, 0xD9],
                item(0xE0DD, 0),
            ]
            .concat()
        };
        accepted(&file(JPEG_BASELINE, &pixels(4, 4)));
        refused(
            &file(JPEG_BASELINE, &pixels(4, 0x7FFF_FFFF)),
            "(FFFE,E000)",
            0x7FFF_FFFF,
        );
        refused(
            &file(JPEG_BASELINE, &pixels(0x7FFF_FFFF, 4)),
            "(FFFE,E000)",
            0x7FFF_FFFF,
        );
    }

    #[test]
    fn implicit_vr_sequences_are_known_from_the_dictionary() {
        // (0040,A730) ContentSequence is SQ in the dictionary: its defined-length item is walked
        let data = |len: u32| {
            let inner = [implicit(PRIVATE_OB, len), vec![3; 8]].concat();
            let it = [implicit((0xFFFE, 0xE000), inner.len() as u32), inner].concat();
            [implicit((0x0040, 0xA730), it.len() as u32), it].concat()
        };
        accepted(&file(IMPLICIT_LE, &data(8)));
        refused(
            &file(IMPLICIT_LE, &data(0x4000_0000)),
            "(0011,1010)",
            0x4000_0000,
        );
    }

    #[test]
    fn big_endian_lengths_are_read_big_endian() {
        // 0x1000_0000 big endian reads as 16 little endian, which would fit
        let data = |len: u32| [header(PRIVATE_OB, b"OB", len, true), vec![5; 16]].concat();
        accepted(&file(EXPLICIT_BE, &data(16)));
        refused(
            &file(EXPLICIT_BE, &data(0x1000_0000)),
            "(0011,1010)",
            0x1000_0000,
        );
    }

    #[test]
    fn deflated_data_sets_are_walked_inflated() {
        use std::io::Write as _;
        let deflate = |data: &[u8]| {
            let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(data).unwrap();
            z.finish().unwrap()
        };
        let data = |len: u32| {
            [
                el(PATIENT, b"PN", b"DOE^J "),
                header(PRIVATE_OB, b"OB", len, false),
                vec![9; 10],
            ]
            .concat()
        };
        accepted(&file(DEFLATED, &deflate(&data(10))));
        let m = refused(
            &file(DEFLATED, &deflate(&data(0x7000_0000))),
            "(0011,1010)",
            0x7000_0000,
        );
        assert!(m.contains("of the inflated data set"), "{m}");
    }

    #[test]
    fn the_walk_refuses_only_what_the_parser_reads() {
        // an odd length of a 16-bit VR: the parser reads (and allocates) the whole values, 2 of
        // the 3 bytes declared; the file ends there and the parser reads it: so does the walk
        let odd = file(
            EXPLICIT_LE,
            &[header((0x0028, 0x0010), b"US", 3, false), vec![0, 2]].concat(),
        );
        accepted(&odd);
        // one byte short of the whole values: refused
        let short = file(
            EXPLICIT_LE,
            &[header((0x0028, 0x0010), b"US", 4, false), vec![0, 2, 0]].concat(),
        );
        refused(&short, "(0028,0010)", 4);
        // a sequence of a defined length past the end, closed by a delimiter, allocates
        // nothing and is read
        let closed = file(
            EXPLICIT_LE,
            &[
                header((0x0040, 0xA730), b"SQ", 0x7FFF_0000, false),
                item(0xE000, UNDEFINED),
                el(CODE_VALUE, b"SH", b"AB"),
                item(0xE00D, 0),
                item(0xE0DD, 0),
                el(PATIENT, b"PN", b"DOE^J "),
            ]
            .concat(),
        );
        accepted(&closed);
    }

    #[test]
    fn the_file_meta_group_is_walked_by_its_group_length() {
        let mut bad = file(EXPLICIT_LE, &el(PATIENT, b"PN", b"DOE^J "));
        // the transfer syntax UID's length (2 bytes at 132 + 12 + 6)
        bad[150..152].copy_from_slice(&0xFFF0u16.to_le_bytes());
        refused(&bad, "(0002,0010)", 0xFFF0);
    }

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
