//! 3D volumes (NIfTI-1/2 `.nii` / `.nii.gz`, NRRD `.nrrd` / `.nhdr`) to the frames the model
//! sees (spec §2.1 `videos`: the reference's `extract_video_frames(path, num_frames)` keeps the
//! frames `int(i * (total - 1) / (num - 1))`, `num = video_frames`, 2 in the release and 4 in
//! the paper; each frame is then one image).
//!
//! Frames are slices along the third (slice) axis. Slice `z` becomes an image `width = dim0`,
//! `height = dim1`, pixel `(x, y) = volume[x, y, z]` (no re-orientation). Intensities are scaled
//! to 8 bits by the min-max of the whole volume (the spec gives no window for volumes), rounded.
//! A 4D volume contributes its first time point. Label volumes become one [`SegMask`] per frame
//! (label values kept, clamped to 255; foreground is `> 0`).
//!
//! NRRD is read by a small reader here: no crate of the workspace's dependency set reads it, and
//! the format (a text header, then a raw, gzip or ascii payload) needs only `flate2`, which is
//! already a dependency; a new crate would add weight (and, for the ones built on `ndarray` /
//! `nalgebra`, a second array library) for ~150 lines of parsing.

use crate::error::{Error, Result};
use image::{DynamicImage, GrayImage};
use qoq_core::SegMask;
use std::path::Path;

/// A scalar 3D volume, `data[x + nx * (y + ny * z)]` (the first axis varies fastest).
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// `[nx, ny, nz]`.
    pub dims: [usize; 3],
    /// Voxel values (after any intensity scaling the file declares).
    pub data: Vec<f32>,
}

impl Volume {
    /// Number of slices along the slice axis.
    pub fn slices(&self) -> usize {
        self.dims[2]
    }

    /// The values of slice `z`, row-major with width `nx`.
    pub fn slice(&self, z: usize) -> &[f32] {
        let n = self.dims[0] * self.dims[1];
        &self.data[z * n..(z + 1) * n]
    }
}

/// The reference's frame indices: `int(i * (total - 1) / (num - 1))` for `i < num` (Python
/// float division, truncated). `num = 1` gives the first frame (the reference would divide by
/// zero); `total = 0` gives none.
pub fn frame_indices(total: usize, num: usize) -> Vec<usize> {
    if total == 0 || num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![0];
    }
    (0..num)
        .map(|i| (i as f64 * (total - 1) as f64 / (num - 1) as f64) as usize)
        .collect()
}

fn is_nifti(path: &Path) -> bool {
    let name = path.to_string_lossy().to_ascii_lowercase();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

fn is_nrrd(path: &Path) -> bool {
    let name = path.to_string_lossy().to_ascii_lowercase();
    name.ends_with(".nrrd") || name.ends_with(".nhdr")
}

/// Whether `path` names a volume this module reads (by extension).
pub fn is_volume(path: &Path) -> bool {
    is_nifti(path) || is_nrrd(path)
}

/// A NIfTI file's bytes, gunzipped (up to [`crate::guard::MAX_DECODED_BYTES`]) when the name
/// ends in `.gz`.
fn nifti_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if path.to_string_lossy().to_ascii_lowercase().ends_with(".gz") {
        crate::guard::read_bounded(
            path,
            "the NIfTI file",
            flate2::read::MultiGzDecoder::new(raw.as_slice()),
        )
    } else {
        Ok(raw)
    }
}

/// Read a NIfTI-1 or NIfTI-2 file (gzip or not), with `scl_slope` / `scl_inter` applied.
/// NIfTI-1 goes through the `nifti` crate; NIfTI-2 (540-byte header), which that crate does not
/// read, through [`read_nifti2`]. Behind [`crate::guard::contain`].
pub fn read_nifti(path: &Path) -> Result<Volume> {
    crate::guard::contain(path, "NIfTI", || {
        let bytes = nifti_bytes(path)?;
        let head: [u8; 4] = bytes
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| {
                Error::file(path, "cannot read NIfTI: the file is shorter than 4 bytes")
            })?;
        if i32::from_le_bytes(head) == 540 || i32::from_be_bytes(head) == 540 {
            return parse_nifti2(path, &bytes);
        }
        read_nifti1(path, bytes)
    })
}

/// Refuse a NIfTI-1 header whose extensions or voxels run past the end of the data (the
/// `nifti` crate reserves what the header declares before reading it).
fn check_nifti1_sizes(path: &Path, bytes: &[u8]) -> Result<()> {
    let fail = |m: String| Error::file(path, format!("cannot read NIfTI: {m}"));
    if bytes.len() < 352 {
        return Err(fail(format!(
            "the header is truncated ({} bytes, 348 + 4 expected)",
            bytes.len()
        )));
    }
    let big = i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) != 348;
    let i16_at = |at: usize| {
        let b = [bytes[at], bytes[at + 1]];
        if big {
            i16::from_be_bytes(b)
        } else {
            i16::from_le_bytes(b)
        }
    };
    let i32_at = |at: usize| {
        let b: [u8; 4] = bytes[at..at + 4].try_into().expect("4 bytes");
        if big {
            i32::from_be_bytes(b)
        } else {
            i32::from_le_bytes(b)
        }
    };
    let vox_offset = {
        let b: [u8; 4] = bytes[108..112].try_into().expect("4 bytes");
        if big {
            f32::from_be_bytes(b)
        } else {
            f32::from_le_bytes(b)
        }
    };
    let ndim = i16_at(40);
    let bitpix = i16_at(72);
    if !(1..=7).contains(&ndim) || bitpix <= 0 || !vox_offset.is_finite() || vox_offset < 0.0 {
        return Ok(()); // the crate refuses these
    }
    let dims: Vec<usize> = (1..=ndim as usize)
        .map(|i| i16_at(40 + 2 * i).max(0) as usize)
        .collect();
    let voxels = crate::guard::checked_bytes(&dims, 1).unwrap_or(u64::MAX);
    let need = voxels.saturating_mul(bitpix as u64 / 8);
    let offset = (vox_offset as u64).max(352);
    if offset.saturating_add(need) > bytes.len() as u64 {
        return Err(fail(format!(
            "the header promises {need} bytes of voxels ({dims:?} of {bitpix} bits) from byte {offset}, the file holds {}",
            bytes.len()
        )));
    }
    crate::guard::check_size(path, "the NIfTI voxels as f32", voxels.saturating_mul(4))?;
    // extensions: (esize, ecode, data) from byte 352 to the voxels
    if bytes[348] != 0 {
        let mut at = 352u64;
        while at + 8 <= offset {
            let esize = i32_at(at as usize);
            if esize < 8 || at + esize as u64 > offset {
                return Err(fail(format!(
                    "the extension at byte {at} declares {esize} bytes, the voxels start at byte {offset}"
                )));
            }
            at += esize as u64;
        }
    }
    Ok(())
}

fn read_nifti1(path: &Path, bytes: Vec<u8>) -> Result<Volume> {
    use nifti::{IntoNdArray, NiftiObject};
    check_nifti1_sizes(path, &bytes)?;
    let obj = nifti::InMemNiftiObject::from_reader(std::io::Cursor::new(bytes))
        .map_err(|e| Error::file(path, format!("cannot read NIfTI: {e}")))?;
    let arr = obj
        .into_volume()
        .into_ndarray::<f32>()
        .map_err(|e| Error::file(path, format!("cannot decode NIfTI voxels: {e}")))?;
    let shape = arr.shape().to_vec();
    let dims = match shape.as_slice() {
        [x, y] => [*x, *y, 1],
        [x, y, z, ..] => [*x, *y, *z],
        _ => {
            return Err(Error::file(
                path,
                format!("a NIfTI volume must have 2 to 7 dimensions, got {shape:?}"),
            ));
        }
    };
    let n = dims.iter().product::<usize>();
    // Reversing the axes makes iteration run the first axis fastest (NIfTI's own order).
    let data: Vec<f32> = arr.t().iter().take(n).copied().collect();
    Ok(Volume { dims, data })
}

/// Read a single-file NIfTI-2 volume (`.nii` or `.nii.gz`; header fields at the offsets of
/// the NIfTI-2 standard: `datatype` @12, `dim` @16 (8 x i64), `vox_offset` @168,
/// `scl_slope` @176, `scl_inter` @184, magic `n+2` @4). Behind [`crate::guard::contain`].
pub fn read_nifti2(path: &Path) -> Result<Volume> {
    crate::guard::contain(path, "NIfTI-2", || parse_nifti2(path, &nifti_bytes(path)?))
}

fn parse_nifti2(path: &Path, bytes: &[u8]) -> Result<Volume> {
    let fail = |m: String| Error::file(path, m);
    if bytes.len() < 540 {
        return Err(fail("NIfTI-2 header is truncated".into()));
    }
    let big = i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) != 540;
    if &bytes[4..7] != b"n+2" {
        return Err(fail(
            "NIfTI-2 header without the single-file magic `n+2` (pairs are not read)".into(),
        ));
    }
    let field = |at: usize, n: usize| -> Vec<u8> {
        let mut b = bytes[at..at + n].to_vec();
        if big {
            b.reverse();
        }
        b
    };
    let i16_at = |at: usize| i16::from_le_bytes(field(at, 2).try_into().expect("2 bytes"));
    let i64_at = |at: usize| i64::from_le_bytes(field(at, 8).try_into().expect("8 bytes"));
    let f64_at = |at: usize| f64::from_le_bytes(field(at, 8).try_into().expect("8 bytes"));
    let datatype = i16_at(12);
    let ndim = i64_at(16);
    if !(1..=7).contains(&ndim) {
        return Err(fail(format!("NIfTI-2 dim[0] = {ndim} is out of range")));
    }
    let dim: Vec<usize> = (1..=ndim as usize)
        .map(|i| i64_at(16 + 8 * i).max(1) as usize)
        .collect();
    let dims = match dim.as_slice() {
        [x] => [*x, 1, 1],
        [x, y] => [*x, *y, 1],
        [x, y, z, ..] => [*x, *y, *z],
        _ => unreachable!("ndim is 1..=7"),
    };
    let offset = i64_at(168).max(540) as u64;
    let (slope, inter) = (f64_at(176), f64_at(184));
    let (size, read): (usize, fn(&[u8]) -> f64) = match datatype {
        2 => (1, |b| b[0] as f64),
        256 => (1, |b| b[0] as i8 as f64),
        4 => (2, |b| i16::from_le_bytes([b[0], b[1]]) as f64),
        512 => (2, |b| u16::from_le_bytes([b[0], b[1]]) as f64),
        8 => (4, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
        768 => (4, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
        16 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
        64 => (8, |b| f64::from_le_bytes(b.try_into().expect("8 bytes"))),
        1024 => (8, |b| {
            i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64
        }),
        1280 => (8, |b| {
            u64::from_le_bytes(b.try_into().expect("8 bytes")) as f64
        }),
        t => return Err(fail(format!("unsupported NIfTI-2 datatype {t}"))),
    };
    let need = crate::guard::checked_bytes(&dims, size).unwrap_or(u64::MAX);
    if offset.saturating_add(need) > bytes.len() as u64 {
        return Err(fail(format!(
            "NIfTI-2 data is shorter than the header's {dims:?} voxels of {size} bytes from byte {offset} (the file holds {})",
            bytes.len()
        )));
    }
    crate::guard::check_size(path, "the NIfTI-2 voxels as f32", need / size as u64 * 4)?;
    // fits in the file: no overflow below
    let n: usize = dims.iter().product();
    let offset = offset as usize;
    let body = &bytes[offset..offset + n * size];
    let scale = slope.is_finite() && slope != 0.0;
    let data = body
        .chunks_exact(size)
        .map(|c| {
            let v = if big {
                let mut b = c.to_vec();
                b.reverse();
                read(&b)
            } else {
                read(c)
            };
            (if scale { v * slope + inter } else { v }) as f32
        })
        .collect();
    Ok(Volume { dims, data })
}

/// The fields of an NRRD header this reader uses.
#[derive(Debug, Clone, PartialEq)]
struct NrrdHeader {
    kind: String,
    sizes: Vec<usize>,
    encoding: String,
    big_endian: bool,
    data_file: Option<String>,
    byte_skip: usize,
    line_skip: usize,
}

fn parse_nrrd_header(text: &str) -> std::result::Result<NrrdHeader, String> {
    let mut lines = text.lines();
    let magic = lines.next().unwrap_or_default();
    if !magic.starts_with("NRRD000") {
        return Err("not an NRRD file (no NRRD000x magic)".into());
    }
    let mut h = NrrdHeader {
        kind: String::new(),
        sizes: Vec::new(),
        encoding: String::new(),
        big_endian: false,
        data_file: None,
        byte_skip: 0,
        line_skip: 0,
    };
    let mut dimension = None;
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with('#') || line.contains(":=") {
            continue;
        }
        let Some((key, value)) = line.split_once(": ") else {
            return Err(format!("bad NRRD header line `{line}`"));
        };
        let value = value.trim();
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("NRRD field `{key}`: `{v}` is not a count"))
        };
        match key.trim() {
            "type" => h.kind = value.to_ascii_lowercase(),
            "dimension" => dimension = Some(number(value)?),
            "sizes" => {
                h.sizes = value
                    .split_whitespace()
                    .map(number)
                    .collect::<std::result::Result<_, _>>()?
            }
            "encoding" => h.encoding = value.to_ascii_lowercase(),
            "endian" => h.big_endian = value == "big",
            "data file" | "datafile" => h.data_file = Some(value.to_string()),
            "byte skip" | "byteskip" => {
                if value == "-1" {
                    return Err("NRRD `byte skip: -1` is not supported".into());
                }
                h.byte_skip = number(value)?
            }
            "line skip" | "lineskip" => h.line_skip = number(value)?,
            _ => {}
        }
    }
    if dimension != Some(h.sizes.len()) {
        return Err(format!(
            "NRRD `dimension` {dimension:?} disagrees with `sizes` {:?}",
            h.sizes
        ));
    }
    if h.kind.is_empty() || h.encoding.is_empty() {
        return Err("NRRD header lacks `type` or `encoding`".into());
    }
    Ok(h)
}

fn nrrd_sample(kind: &str) -> std::result::Result<(usize, fn(&[u8]) -> f32), String> {
    fn i8v(b: &[u8]) -> f32 {
        b[0] as i8 as f32
    }
    fn u8v(b: &[u8]) -> f32 {
        b[0] as f32
    }
    fn i16v(b: &[u8]) -> f32 {
        i16::from_le_bytes([b[0], b[1]]) as f32
    }
    fn u16v(b: &[u8]) -> f32 {
        u16::from_le_bytes([b[0], b[1]]) as f32
    }
    fn i32v(b: &[u8]) -> f32 {
        i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32
    }
    fn u32v(b: &[u8]) -> f32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32
    }
    fn f32v(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn f64v(b: &[u8]) -> f32 {
        f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
    }
    Ok(match kind {
        "signed char" | "int8" | "int8_t" => (1, i8v),
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => (1, u8v),
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => {
            (2, i16v)
        }
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => (2, u16v),
        "int" | "signed int" | "int32" | "int32_t" => (4, i32v),
        "uint" | "unsigned int" | "uint32" | "uint32_t" => (4, u32v),
        "float" => (4, f32v),
        "double" => (8, f64v),
        other => return Err(format!("unsupported NRRD type `{other}`")),
    })
}

/// Read an NRRD volume (attached or detached data; raw, gzip or ascii encoding; 2 to 4
/// dimensions, a 4D volume giving its first 3D block). Behind [`crate::guard::contain`]; gzip
/// data is decompressed up to [`crate::guard::MAX_DECODED_BYTES`].
pub fn read_nrrd(path: &Path) -> Result<Volume> {
    crate::guard::contain(path, "NRRD", || read_nrrd_unguarded(path))
}

fn read_nrrd_unguarded(path: &Path) -> Result<Volume> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let fail = |m: String| Error::file(path, m);
    let header_end = bytes
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| p + 2)
        .or_else(|| (bytes.ends_with(b"\n")).then_some(bytes.len()))
        .ok_or_else(|| fail("NRRD header has no terminating blank line".into()))?;
    let header_text = std::str::from_utf8(&bytes[..header_end])
        .map_err(|_| fail("the NRRD header is not text".into()))?;
    let h = parse_nrrd_header(header_text).map_err(fail)?;
    let payload: Vec<u8> = match &h.data_file {
        None => bytes[header_end..].to_vec(),
        Some(f) => {
            let p = path.parent().unwrap_or(Path::new(".")).join(f);
            std::fs::read(&p).map_err(|e| Error::io(&p, e))?
        }
    };
    let mut payload = payload.as_slice();
    for _ in 0..h.line_skip {
        let nl = payload
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| fail("NRRD `line skip` runs past the data".into()))?;
        payload = &payload[nl + 1..];
    }
    let decoded: Vec<u8> = match h.encoding.as_str() {
        "raw" | "ascii" | "text" | "txt" => payload.to_vec(),
        "gzip" | "gz" => crate::guard::read_bounded(
            path,
            "the NRRD data",
            flate2::read::MultiGzDecoder::new(payload),
        )?,
        other => return Err(fail(format!("unsupported NRRD encoding `{other}`"))),
    };
    let dims = match h.sizes.as_slice() {
        [x, y] => [*x, *y, 1],
        [x, y, z] | [x, y, z, _] => [*x, *y, *z],
        s => {
            return Err(fail(format!(
                "NRRD sizes {s:?}: only 2 to 4 dimensions are read"
            )));
        }
    };
    let voxels = crate::guard::checked_bytes(&dims, 1).unwrap_or(u64::MAX);
    crate::guard::check_size(path, "the NRRD voxels as f32", voxels.saturating_mul(4))?;
    let n = voxels as usize;
    let data = if matches!(h.encoding.as_str(), "ascii" | "text" | "txt") {
        let text = String::from_utf8_lossy(&decoded);
        let values: Vec<f32> = text
            .split_whitespace()
            .take(n)
            .map(|t| {
                t.parse::<f32>()
                    .map_err(|_| fail(format!("bad NRRD value `{t}`")))
            })
            .collect::<Result<_>>()?;
        values
    } else {
        let (size, read) = nrrd_sample(&h.kind).map_err(fail)?;
        let need = voxels.saturating_mul(size as u64);
        let body = decoded
            .get(h.byte_skip..)
            .filter(|b| b.len() as u64 >= need)
            .ok_or_else(|| {
                fail(format!(
                    "NRRD data holds {} bytes, sizes {:?} of `{}` need {need}",
                    decoded.len(),
                    h.sizes,
                    h.kind,
                ))
            })?;
        body[..n * size]
            .chunks_exact(size)
            .map(|c| {
                if h.big_endian && size > 1 {
                    let mut b = c.to_vec();
                    b.reverse();
                    read(&b)
                } else {
                    read(c)
                }
            })
            .collect()
    };
    if data.len() != n {
        return Err(fail(format!(
            "NRRD data has {} values, {n} expected",
            data.len()
        )));
    }
    Ok(Volume { dims, data })
}

/// Read a NIfTI or NRRD volume, chosen by extension.
pub fn read_volume(path: &Path) -> Result<Volume> {
    if is_nifti(path) {
        read_nifti(path)
    } else if is_nrrd(path) {
        read_nrrd(path)
    } else {
        Err(Error::file(
            path,
            "not a volume (expected .nii, .nii.gz, .nrrd or .nhdr)",
        ))
    }
}

/// `num` frames of `vol` (see [`frame_indices`]) as 8-bit gray images, scaled by the volume's
/// min-max.
pub fn volume_frames(vol: &Volume, num: usize) -> Vec<GrayImage> {
    let (lo, hi) = vol
        .data
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = (hi - lo) as f64;
    let (w, h) = (vol.dims[0] as u32, vol.dims[1] as u32);
    frame_indices(vol.slices(), num)
        .into_iter()
        .map(|z| {
            let px = vol
                .slice(z)
                .iter()
                .map(|&v| {
                    if range > 0.0 && v.is_finite() {
                        (((v - lo) as f64 / range) * 255.0).round() as u8
                    } else {
                        0
                    }
                })
                .collect();
            GrayImage::from_raw(w, h, px).expect("slice has width * height values")
        })
        .collect()
}

/// `num` frames of a label volume as masks (values rounded and clamped to `[0, 255]`).
pub fn label_frames(vol: &Volume, num: usize) -> Vec<SegMask> {
    frame_indices(vol.slices(), num)
        .into_iter()
        .map(|z| {
            let px = vol
                .slice(z)
                .iter()
                .map(|&v| {
                    if v.is_finite() {
                        v.round().clamp(0.0, 255.0) as u8
                    } else {
                        0
                    }
                })
                .collect();
            SegMask::new(vol.dims[0], vol.dims[1], px).expect("slice has width * height values")
        })
        .collect()
}

/// Read a volume file and return its `num` frames as images.
pub fn read_volume_frames(path: &Path, num: usize) -> Result<Vec<DynamicImage>> {
    let vol = read_volume(path)?;
    Ok(volume_frames(&vol, num)
        .into_iter()
        .map(DynamicImage::ImageLuma8)
        .collect())
}

/// Read a label volume file and return its `num` frames as masks.
pub fn read_label_frames(path: &Path, num: usize) -> Result<Vec<SegMask>> {
    Ok(label_frames(&read_volume(path)?, num))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_indices_follow_the_reference() {
        // Python: [int(i * (48 - 1) / (4 - 1)) for i in range(4)] == [0, 15, 31, 47]
        assert_eq!(frame_indices(48, 4), vec![0, 15, 31, 47]);
        assert_eq!(frame_indices(48, 2), vec![0, 47]);
        assert_eq!(frame_indices(3, 5), vec![0, 0, 1, 1, 2]);
        assert_eq!(frame_indices(7, 1), vec![0]);
        assert!(frame_indices(0, 2).is_empty());
    }

    fn write_nrrd(dir: &Path, encoding: &str, body: &[u8]) -> std::path::PathBuf {
        let p = dir.join(format!("v_{encoding}.nrrd"));
        let mut out = format!(
            "NRRD0004\n# comment\ntype: short\ndimension: 3\nsizes: 2 3 2\nendian: little\nencoding: {encoding}\nspace origin: (0,0,0)\n\n"
        )
        .into_bytes();
        out.extend(body);
        std::fs::write(&p, out).unwrap();
        p
    }

    #[test]
    fn nrrd_raw_and_gzip_read_alike_and_frames_scale_by_volume() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<i16> = (0..12).map(|i| i * 10 - 20).collect();
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&raw).unwrap();
        let a = read_volume(&write_nrrd(dir.path(), "raw", &raw)).unwrap();
        let b = read_volume(&write_nrrd(dir.path(), "gzip", &gz.finish().unwrap())).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.dims, [2, 3, 2]);
        assert_eq!(a.slice(1)[0], 40.0);
        let frames = volume_frames(&a, 2);
        // min -20 -> 0, max 90 -> 255; voxel (1, 0, 1) = 50 -> round(70 / 110 * 255) = 162
        assert_eq!(frames[0].get_pixel(0, 0).0, [0]);
        assert_eq!(frames[1].get_pixel(1, 0).0, [162]);
        assert_eq!(frames[1].get_pixel(1, 2).0, [255]);
        let masks = label_frames(&a, 2);
        assert_eq!(masks[1].get(0, 0), 40);
        assert_eq!(masks[0].get(0, 0), 0);
        let bad = write_nrrd(dir.path(), "raw", &raw[..10]);
        let e = read_volume(&bad).unwrap_err().to_string();
        assert!(e.contains("v_raw.nrrd") && e.contains("need 24"), "{e}");
    }
}
