//! The one boundary every decoder of files we do not control runs behind (issue 24).
//!
//! Clinical archives hold damaged files, and some decoders of the dependency tree panic on them
//! instead of returning an error. [`contain`] runs a decoder under [`std::panic::catch_unwind`]
//! and turns a panic into [`Error::DecoderPanic`], naming the file, the decoder and the panic
//! message with its location, so `qoq data check` reports the row, `skip_bad_rows` skips it and
//! `qoq serve` answers 400, instead of the process ending (exit 101).
//!
//! The process's panic hook stays quiet for a panic caught here: the first call installs a hook
//! that, while the panicking thread is inside a boundary (a thread-local depth, so it works on
//! rayon workers, where `qoq data check` decodes), only records the panic's location for the
//! error and prints nothing; any other panic goes to the hook that was installed before, as
//! usual. A decoder that hands work to other rayon workers and panics there is still contained
//! (rayon re-raises the panic in the boundary's thread), but that worker's hook prints it.
//!
//! Known upstream panic (reported, not patched here): `dicom-transfer-syntax-registry` 0.10.1,
//! `src/adapters/rle_lossless.rs:119` (`decode`), indexes the decoded PackBits segment without
//! checking its length, so an RLE Lossless DICOM whose segment decodes to fewer than
//! `rows x columns` bytes (e.g. `MR_small_RLE.dcm` of pydicom's test files with a block of its
//! pixel data zeroed) panics with "index out of bounds"; line 99 also `unwrap()`s the segment's
//! read. Both are contained here; `crates/qoq-data/tests/damaged_corpus.rs` reproduces the
//! first.
//!
//! Allocation bound: readers that size a buffer from header fields check the size against the
//! data actually present, and never decode more than [`MAX_DECODED_BYTES`] from one file.

use crate::error::{Error, Result};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::path::Path;
use std::sync::Once;

/// The most bytes a reader decodes (decompresses or allocates for voxels / pixels / samples)
/// from one file: 2 GiB. Larger promises (a header's sizes, a gzip stream) are refused with an
/// error naming the file; real inputs of the project are far below (a 512 x 512 x 600 CT is
/// 315 MB of 16-bit voxels).
pub const MAX_DECODED_BYTES: u64 = 2 << 30;

thread_local! {
    /// How many boundaries the current thread is inside.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// Where the last contained panic of this thread happened (`file:line:column`).
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Install the quiet-inside-a-boundary hook once per process.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
            if DEPTH.with(Cell::get) > 0 {
                let at = info.location().map(|l| l.to_string());
                LOCATION.with(|l| *l.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

/// A panic caught by [`catch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panic {
    /// The panic message (`"index out of bounds: the len is 0 but the index is 0"`).
    pub message: String,
    /// Where it was raised (`file:line:column`), when known.
    pub location: Option<String>,
}

impl std::fmt::Display for Panic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Some(at) => write!(f, "{} (at {at})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Leaves the boundary on every exit path (return or unwind).
struct Inside;

impl Inside {
    fn enter() -> Self {
        DEPTH.with(|d| d.set(d.get() + 1));
        Inside
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Run `f`; a panic inside it becomes `Err(Panic)`, printed by no hook. For callers whose
/// errors are not this crate's (the server's request decoding); readers use [`contain`].
pub fn catch<T>(f: impl FnOnce() -> T) -> std::result::Result<T, Panic> {
    install_hook();
    let result = {
        let _inside = Inside::enter();
        // The decoders' state does not outlive the call: nothing observes a broken invariant.
        std::panic::catch_unwind(AssertUnwindSafe(f))
    };
    result.map_err(|payload| Panic {
        message: payload_message(payload.as_ref()),
        location: LOCATION.with(|l| l.borrow_mut().take()),
    })
}

/// Run the decoder `f` of the file `path`; a panic becomes [`Error::DecoderPanic`] naming the
/// file, `decoder` and the panic.
pub fn contain<T>(path: &Path, decoder: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch(f).unwrap_or_else(|p| {
        Err(Error::DecoderPanic {
            path: path.to_path_buf(),
            decoder: decoder.to_string(),
            message: p.to_string(),
        })
    })
}

/// Refuse to decode `bytes` from `path` when it exceeds [`MAX_DECODED_BYTES`]; `what` says
/// what the size is of (`"NIfTI voxels"`).
pub fn check_size(path: &Path, what: &str, bytes: u64) -> Result<()> {
    if bytes > MAX_DECODED_BYTES {
        return Err(Error::file(
            path,
            format!(
                "{what} would take {bytes} bytes, more than the limit of {MAX_DECODED_BYTES} bytes per file"
            ),
        ));
    }
    Ok(())
}

/// The product of `sizes` times `elem` bytes, `None` when it overflows.
pub fn checked_bytes(sizes: &[usize], elem: usize) -> Option<u64> {
    sizes
        .iter()
        .try_fold(elem as u64, |acc, &s| acc.checked_mul(s as u64))
}

/// Read all of `reader` (a decompressor) into memory, refusing more than
/// [`MAX_DECODED_BYTES`] (a damaged or hostile stream can expand without bound).
pub fn read_bounded(path: &Path, what: &str, reader: impl std::io::Read) -> Result<Vec<u8>> {
    read_limited(path, what, reader, MAX_DECODED_BYTES)
}

fn read_limited(
    path: &Path,
    what: &str,
    reader: impl std::io::Read,
    limit: u64,
) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::file(path, format!("cannot decompress {what}: {e}")))?;
    if out.len() as u64 > limit {
        return Err(Error::file(
            path,
            format!("{what} decompresses to more than the limit of {limit} bytes"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_naming_file_decoder_and_message() {
        let e = contain(
            Path::new("/data/x.dcm"),
            "RLE Lossless",
            || -> Result<()> {
                let v: Vec<u8> = Vec::new();
                let i = v.len() + 3;
                let _ = v[i];
                Ok(())
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/data/x.dcm: "), "{e}");
        assert!(e.contains("RLE Lossless"), "{e}");
        assert!(e.contains("index out of bounds"), "{e}");
        assert!(e.contains("guard.rs"), "the location is named: {e}");
        // the thread left the boundary: the depth is back to 0
        assert_eq!(DEPTH.with(Cell::get), 0);
        assert_eq!(contain(Path::new("a"), "d", || Ok(5)).unwrap(), 5);
    }

    #[test]
    fn panics_on_rayon_workers_are_contained_per_item() {
        use rayon::prelude::*;
        let out: Vec<std::result::Result<usize, String>> = (0..64usize)
            .into_par_iter()
            .map(|i| {
                let p = format!("f{i}");
                contain(Path::new(&p), "test decoder", || {
                    if i % 3 == 0 {
                        panic!("damaged {i}");
                    }
                    Ok(i)
                })
                .map_err(|e| e.to_string())
            })
            .collect();
        for (i, r) in out.iter().enumerate() {
            match r {
                Ok(v) => assert_eq!(*v, i),
                Err(e) => {
                    assert_eq!(i % 3, 0);
                    assert!(
                        e.starts_with(&format!("f{i}: ")) && e.contains(&format!("damaged {i}")),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn sizes_beyond_the_limit_are_refused() {
        assert_eq!(checked_bytes(&[2, 3, 4], 2), Some(48));
        assert_eq!(checked_bytes(&[usize::MAX, 2], 1), None);
        assert!(check_size(Path::new("v.nii"), "voxels", MAX_DECODED_BYTES).is_ok());
        let e = check_size(Path::new("v.nii"), "voxels", MAX_DECODED_BYTES + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("v.nii") && e.contains("voxels"), "{e}");
        use std::io::Read as _;
        let e = read_limited(Path::new("z.gz"), "data", std::io::repeat(0).take(12), 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("z.gz") && e.contains("more than the limit of 10"),
            "{e}"
        );
        let ok = read_limited(Path::new("z.gz"), "data", std::io::repeat(0).take(10), 10);
        assert_eq!(ok.unwrap().len(), 10);
    }
}
