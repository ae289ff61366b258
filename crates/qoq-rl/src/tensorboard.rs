//! TensorBoard event files for the trainer's scalars (spec §12; the reference logs the same
//! names through `verl/utils/tracking.py` to wandb/TensorBoard).
//!
//! The format is TFRecord framing around `tensorflow.Event` protobufs:
//!
//! ```text
//! u64 length (LE) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)
//! masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8      (wrapping u32)
//! ```
//!
//! The first record is `Event{wall_time, file_version: "brain.Event:2"}`; each later one is
//! `Event{wall_time, step, summary: Summary{value: [Value{tag, simple_value}, ...]}}`. The few
//! protobuf fields are written by hand (field numbers from `event.proto`/`summary.proto`):
//! `Event.wall_time` = 1 (double), `step` = 2 (int64), `file_version` = 3 (string),
//! `summary` = 5 (message); `Summary.value` = 1; `Value.tag` = 1 (string),
//! `simple_value` = 2 (float). CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) is computed
//! here with a byte table. `tools/fixtures/tensorboard_read.py` reads our files back with the
//! real `tensorboard` package.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors of the event writer and reader; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TensorboardError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The event file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A record's framing or CRC is wrong, or a protobuf field cannot be decoded.
    #[error("{path}: record {record} at byte {offset}: {reason}")]
    Corrupt {
        /// The event file.
        path: PathBuf,
        /// 0-based record index.
        record: usize,
        /// Byte offset of the record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, TensorboardError>;

const CRC32C_POLY: u32 = 0x82F6_3B78;

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The TFRecord masked CRC: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, ((field << 3) | 2) as u64);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event.wall_time`, left out when it is +0.0 as proto3 does for default values.
fn put_wall_time(out: &mut Vec<u8>, wall_time: f64) {
    if wall_time.to_bits() != 0 {
        out.push(0x09); // field 1, fixed64
        out.extend_from_slice(&wall_time.to_le_bytes());
    }
}

/// `Event{wall_time, file_version: "brain.Event:2"}` (the first record of every file).
pub fn encode_file_version_event(wall_time: f64) -> Vec<u8> {
    let mut out = Vec::new();
    put_wall_time(&mut out, wall_time);
    put_bytes(&mut out, 3, b"brain.Event:2");
    out
}

/// `Event{wall_time, step, summary{value{tag, simple_value}...}}` with one value per scalar.
/// As in proto3, a zero step and a +0.0 wall time are not written (readers take them as 0).
pub fn encode_scalar_event(wall_time: f64, step: i64, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        v.push(0x15); // field 2, fixed32
        v.extend_from_slice(&value.to_le_bytes());
        put_bytes(&mut summary, 1, &v);
    }
    let mut out = Vec::new();
    put_wall_time(&mut out, wall_time);
    if step != 0 {
        out.push(0x10); // field 2, varint (int64 two's complement)
        put_varint(&mut out, step as u64);
    }
    put_bytes(&mut out, 5, &summary);
    out
}

/// `Event{wall_time, step, session_log: SessionLog{status: START}}` (`Event.session_log` = 7,
/// `SessionLog.status` = 1, `START` = 1). TensorBoard's reader, on meeting it, drops every
/// event already read with a step at or above `step`: written when a resumed run restarts at
/// `step`, it hides the stale tail of the killed run.
pub fn encode_session_start_event(wall_time: f64, step: i64) -> Vec<u8> {
    let mut out = Vec::new();
    put_wall_time(&mut out, wall_time);
    if step != 0 {
        out.push(0x10);
        put_varint(&mut out, step as u64);
    }
    put_bytes(&mut out, 7, &[0x08, 0x01]);
    out
}

/// Seconds since the Unix epoch as TensorBoard stores them.
pub fn now_wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends scalar events to one `events.out.tfevents.*` file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it
    /// (`events.out.tfevents.{unix seconds}.qoq.{pid}.{n}`, `n` counting this process's files,
    /// so names sort in creation order), writing the file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| TensorboardError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let wall = now_wall_time();
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.qoq.{}.{n}",
            wall as u64,
            std::process::id()
        ));
        Self::create_file(&path, wall)
    }

    /// Creates the event file `path` (which must not exist) with a file-version record stamped
    /// `wall_time`.
    pub fn create_file(path: &Path, wall_time: f64) -> Result<Self> {
        let file = File::create_new(path).map_err(|source| TensorboardError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut w = Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        };
        w.write_record(&encode_file_version_event(wall_time))?;
        w.flush()?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(&frame_record(data))
            .map_err(|source| TensorboardError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes one event holding every scalar of `step`, stamped now.
    pub fn add_scalars<'a>(
        &mut self,
        step: i64,
        scalars: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<()> {
        self.add_scalars_at(now_wall_time(), step, scalars)
    }

    /// Writes one event holding every scalar of `step` with an explicit wall time. Values are
    /// stored as f32 (`simple_value`), as TensorBoard does.
    pub fn add_scalars_at<'a>(
        &mut self,
        wall_time: f64,
        step: i64,
        scalars: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<()> {
        let values: Vec<(&str, f32)> = scalars.into_iter().map(|(t, v)| (t, v as f32)).collect();
        self.write_record(&encode_scalar_event(wall_time, step, &values))
    }

    /// Marks a restart at `step` (see [`encode_session_start_event`]), stamped now.
    pub fn add_session_start(&mut self, step: i64) -> Result<()> {
        self.write_record(&encode_session_start_event(now_wall_time(), step))
    }

    /// Flushes buffered records to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|source| TensorboardError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// One scalar read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarEvent {
    /// Seconds since the epoch.
    pub wall_time: f64,
    /// Global step.
    pub step: i64,
    /// Summary tag.
    pub tag: String,
    /// `simple_value`.
    pub value: f32,
}

/// Everything [`read_events`] found: the file version and the scalars, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFile {
    /// `file_version` of the first event (`"brain.Event:2"` for ours).
    pub file_version: Option<String>,
    /// Every `simple_value`.
    pub scalars: Vec<ScalarEvent>,
}

struct Proto<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Proto<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("field of {n} bytes runs past the message"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Next `(field, wire type, payload)`; varints come back as their 8 LE bytes.
    fn field(&mut self) -> std::result::Result<Option<(u64, u8, Vec<u8>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        let payload = match wire {
            0 => self.varint()?.to_le_bytes().to_vec(),
            1 => self.take(8)?.to_vec(),
            2 => {
                let n = self.varint()? as usize;
                self.take(n)?.to_vec()
            }
            5 => self.take(4)?.to_vec(),
            w => return Err(format!("unsupported wire type {w} (field {field})")),
        };
        Ok(Some((field, wire, payload)))
    }
}

fn decode_event(data: &[u8], file: &mut EventFile) -> std::result::Result<(), String> {
    let mut p = Proto { buf: data, pos: 0 };
    let (mut wall_time, mut step) = (0.0f64, 0i64);
    let mut values = Vec::new();
    while let Some((field, wire, payload)) = p.field()? {
        match (field, wire) {
            (1, 1) => wall_time = f64::from_le_bytes(payload[..8].try_into().unwrap()),
            (2, 0) => step = i64::from_le_bytes(payload[..8].try_into().unwrap()),
            (3, 2) => {
                file.file_version =
                    Some(String::from_utf8(payload).map_err(|e| format!("file_version: {e}"))?)
            }
            (5, 2) => {
                let mut s = Proto {
                    buf: &payload,
                    pos: 0,
                };
                while let Some((f, w, value)) = s.field()? {
                    if (f, w) != (1, 2) {
                        continue;
                    }
                    let mut v = Proto {
                        buf: &value,
                        pos: 0,
                    };
                    let (mut tag, mut simple) = (String::new(), None);
                    while let Some((vf, vw, vp)) = v.field()? {
                        match (vf, vw) {
                            (1, 2) => {
                                tag = String::from_utf8(vp).map_err(|e| format!("tag: {e}"))?
                            }
                            (2, 5) => {
                                simple = Some(f32::from_le_bytes(vp[..4].try_into().unwrap()))
                            }
                            _ => {}
                        }
                    }
                    if let Some(value) = simple {
                        values.push((tag, value));
                    }
                }
            }
            _ => {}
        }
    }
    for (tag, value) in values {
        file.scalars.push(ScalarEvent {
            wall_time,
            step,
            tag,
            value,
        });
    }
    Ok(())
}

/// Reads an event file, checking every length and data CRC, and decodes its scalars.
pub fn read_events(path: &Path) -> Result<EventFile> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| TensorboardError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let mut file = EventFile::default();
    let (mut pos, mut record) = (0usize, 0usize);
    while pos < bytes.len() {
        let corrupt = |reason: String| TensorboardError::Corrupt {
            path: path.to_path_buf(),
            record,
            offset: pos as u64,
            reason,
        };
        if bytes.len() - pos < 12 {
            return Err(corrupt(format!(
                "{} trailing bytes, a header needs 12",
                bytes.len() - pos
            )));
        }
        let len_bytes = &bytes[pos..pos + 8];
        let crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        if crc != masked_crc32c(len_bytes) {
            return Err(corrupt("length CRC mismatch".into()));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let start = pos + 12;
        let end = start
            .checked_add(len)
            .and_then(|e| e.checked_add(4))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| corrupt(format!("data of {len} bytes runs past the end")))?;
        let data = &bytes[start..start + len];
        let dcrc = u32::from_le_bytes(bytes[start + len..end].try_into().unwrap());
        if dcrc != masked_crc32c(data) {
            return Err(corrupt("data CRC mismatch".into()));
        }
        decode_event(data, &mut file).map_err(corrupt)?;
        pos = end;
        record += 1;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_rfc3720_check_values() {
        // RFC 3720 B.4: 32 bytes of zeros, of 0xff, and the ascending sequence.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let asc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&asc), 0x46DD_794E);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn negative_steps_are_ten_byte_varints() {
        let e = encode_scalar_event(0.0, -1, &[]);
        assert_eq!(
            &e[..11],
            &[
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        );
    }
}
