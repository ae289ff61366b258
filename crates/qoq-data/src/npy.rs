//! NumPy `.npy` (format versions 1, 2 and 3) and `.npz` arrays, for ECG signals stored with
//! `np.save` / `np.savez` (CLIMB's MIMIC-IV ECGs, [CLIMB] `fusion/fusion_experiment.py`, spec
//! §5.1). Written by hand: the format is a magic, a Python-dict header and raw data, and the
//! crates that read it pull in `ndarray`; this reader returns `f32` values and a shape. The
//! writer ([`encode`], [`encode_f32`]) is the inverse, for fixtures and for clients that send an
//! ECG as `.npy`.
//!
//! Supported dtypes: little- or big-endian `f4`, `f8`, `i2`, `u2`, `i4`, `u4`, `i8`, `u8` and
//! `i1` / `u1`, C or Fortran order (Fortran arrays are returned in C order).

use crate::error::{Error, Result};
use std::path::Path;

/// An n-dimensional array of `f32` in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The array's shape, outermost axis first.
    pub shape: Vec<usize>,
    /// The values in C order.
    pub data: Vec<f32>,
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Parse an in-memory `.npy` file.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let descr = header_value(header, "descr").ok_or("the .npy header has no 'descr'")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("the .npy 'descr' is not a simple dtype string")?;
    let fortran = header_value(header, "fortran_order")
        .ok_or("the .npy header has no 'fortran_order'")?
        .starts_with("True");
    let shape_text = header_value(header, "shape").ok_or("the .npy header has no 'shape'")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("the .npy 'shape' is not a tuple")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry `{s}`"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let (endian, kind) = descr.split_at(1);
    let big = match endian {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(format!("unsupported dtype `{descr}`")),
    };
    let size: usize = match kind {
        "f4" | "i4" | "u4" => 4,
        "f8" | "i8" | "u8" => 8,
        "i2" | "u2" => 2,
        "i1" | "u1" | "b1" => 1,
        _ => return Err(format!("unsupported dtype `{descr}`")),
    };
    let body = &bytes[start + header_len..];
    let needed = crate::guard::checked_bytes(&shape, size).unwrap_or(u64::MAX);
    if (body.len() as u64) < needed {
        return Err(format!(
            "the .npy data holds {} bytes, shape {shape:?} of `{descr}` needs {needed}",
            body.len(),
        ));
    }
    // fits in the body, so neither the product nor `count * size` overflows
    let count: usize = shape.iter().product();
    let mut data = Vec::with_capacity(count);
    for chunk in body[..count * size].chunks_exact(size) {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(chunk);
        if big {
            b[..size].reverse();
        }
        let v = match kind {
            "f4" => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            "f8" => f64::from_le_bytes(b) as f32,
            "i2" => i16::from_le_bytes([b[0], b[1]]) as f32,
            "u2" => u16::from_le_bytes([b[0], b[1]]) as f32,
            "i4" => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            "u4" => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            "i8" => i64::from_le_bytes(b) as f32,
            "u8" => u64::from_le_bytes(b) as f32,
            "i1" => b[0] as i8 as f32,
            _ => b[0] as f32,
        };
        data.push(v);
    }
    if fortran && shape.len() > 1 {
        // Fortran order: the first index varies fastest. Re-order to C order.
        let n = shape.len();
        let mut c_data = vec![0.0f32; count];
        let mut idx = vec![0usize; n];
        for v in &data {
            let mut c = 0;
            for d in 0..n {
                c = c * shape[d] + idx[d];
            }
            c_data[c] = *v;
            for d in 0..n {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        data = c_data;
    }
    Ok(NpyArray { shape, data })
}

/// The bytes of a `.npy` file (format version 1.0) holding `body`, the raw values of an array of
/// `descr` (e.g. `<f4`), `shape`, in Fortran order when `fortran_order`.
pub fn encode(descr: &str, fortran_order: bool, shape: &[usize], body: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    // A Python tuple: `(n,)` for one axis.
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let order = if fortran_order { "True" } else { "False" };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    // Magic (6) + version (2) + header length (2) + header + newline, padded to 64 bytes.
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(body);
    out
}

/// [`encode`] of C-order little-endian `f4` values.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let body: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    encode("<f4", false, shape, &body)
}

/// Read a `.npy` file (behind [`crate::guard::contain`]).
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    crate::guard::contain(path, ".npy", || {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        parse_npy(&bytes).map_err(|m| Error::file(path, m))
    })
}

/// Read array `key` of a `.npz` archive; with `key = None` the archive must hold exactly one
/// (behind [`crate::guard::contain`]; an entry is decompressed up to
/// [`crate::guard::MAX_DECODED_BYTES`]).
pub fn read_npz(path: &Path, key: Option<&str>) -> Result<NpyArray> {
    crate::guard::contain(path, ".npz", || read_npz_unguarded(path, key))
}

fn read_npz_unguarded(path: &Path, key: Option<&str>) -> Result<NpyArray> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::file(path, format!("not a .npz (zip) archive: {e}")))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let name = match key {
        Some(k) => {
            let want = format!("{k}.npy");
            names
                .iter()
                .find(|n| **n == want || **n == k)
                .cloned()
                .ok_or_else(|| {
                    Error::file(
                        path,
                        format!("no array `{k}` in the archive (it has {names:?})"),
                    )
                })?
        }
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(Error::file(
                path,
                format!("the archive holds {names:?}: name the array to read"),
            ));
        }
    };
    let entry = zip
        .by_name(&name)
        .map_err(|e| Error::file(path, format!("{name}: {e}")))?;
    let bytes = crate::guard::read_bounded(path, &name, entry)?;
    parse_npy(&bytes).map_err(|m| Error::file(path, format!("{name}: {m}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_orders_and_endianness_decode() {
        let body: Vec<u8> = [1i16, -2, 3, -4, 5, -6]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_npy(&encode("<i2", false, &[2, 3], &body)).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![1.0, -2.0, 3.0, -4.0, 5.0, -6.0]);
        // the same bytes in Fortran order are the transpose's memory: [[1, 3, 5], [-2, -4, -6]]
        let f = parse_npy(&encode("<i2", true, &[2, 3], &body)).unwrap();
        assert_eq!(f.data, vec![1.0, 3.0, 5.0, -2.0, -4.0, -6.0]);
        let be: Vec<u8> = [1.5f64, -0.25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let b = parse_npy(&encode(">f8", false, &[2], &be)).unwrap();
        assert_eq!((b.shape.clone(), b.data), (vec![2], vec![1.5, -0.25]));
        assert!(parse_npy(&encode("<c8", false, &[1], &[0; 8])).is_err());
        assert!(parse_npy(&encode("<f4", false, &[4], &[0; 8])).is_err());
        assert!(parse_npy(b"PK\x03\x04").is_err());
    }
}
