//! No input file can crash a run (issue 24): seeded damaged copies of the cached real files
//! (`scripts/fetch-testdata.sh`: every DICOM transfer syntax, NIfTI, NRRD, JPEG, the DICOM ECG,
//! the MIT-BIH record as `.npz` / `.npy` / CSV / WFDB) go through the readers `qoq data check`
//! uses. Each must end in Ok or an error naming the file, within [`TIME_LIMIT`], with no heap
//! allocation above [`ALLOC_LIMIT`] (a counting allocator refuses it and names the file).
//!
//! The damaged files (truncated, bytes flipped, blocks zeroed, length fields set to
//! 0x7fffffff; [`qoq_data::damage`]) are generated into a temporary folder at test time.
//! Without the test-data cache the tests print a notice and pass.

// The allocation limit is enforced by a global allocator wrapping the system one, which needs an
// `unsafe impl GlobalAlloc`; it only forwards to `System` or refuses.
#![allow(unsafe_code)]

use qoq_data::damage::{self, CorpusFile, Damage, DamageKind, Role};
use qoq_data::manifest::{Manifest, ManifestConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

/// The largest single heap allocation a damaged file may cause: 1 GiB. Real inputs of the
/// corpus need at most tens of MB; the `image` crate's own default limit is 512 MiB; a length
/// field of 0x7fffffff taken at its word would ask for 2 GiB.
const ALLOC_LIMIT: usize = 1 << 30;
/// The longest one file may take (a hang otherwise), generous for a loaded debug build.
const TIME_LIMIT: Duration = Duration::from_secs(60);
/// Copies per real file (half for files above 1 MB); `QOQ_CORPUS_PER_FILE` overrides it for a
/// longer local campaign.
const PER_FILE: usize = 12;
/// The damage seed; `QOQ_CORPUS_SEED` overrides it.
const SEED: u64 = 24;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The file being read, for the message of a refused allocation (fixed buffer: the allocator
/// must not allocate).
static CURRENT: Mutex<([u8; 512], usize)> = Mutex::new(([0; 512], 0));
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Allocations refused so far (a reader that reserves with `try_reserve` turns the refusal into
/// an error, so the count, not a crash, is what the test checks).
static REFUSED: AtomicUsize = AtomicUsize::new(0);

struct Counting;

fn write_usize(out: &mut [u8; 24], mut v: usize) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &out[i..]
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            let mut err = std::io::stderr();
            let mut num = [0u8; 24];
            let _ = err.write_all(b"\nrefused an allocation of ");
            let _ = err.write_all(write_usize(&mut num, layout.size()));
            let _ = err.write_all(b" bytes (limit 1 GiB) while reading ");
            if let Ok(c) = CURRENT.try_lock() {
                let _ = err.write_all(&c.0[..c.1]);
            }
            let _ = err.write_all(b"\n");
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_LIMIT {
            // through `alloc`, which refuses and names the file
            return unsafe {
                self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()))
            };
        }
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn set_current(s: &str) {
    let mut c = CURRENT.lock().unwrap();
    let n = s.len().min(512);
    c.0[..n].copy_from_slice(&s.as_bytes()[..n]);
    c.1 = n;
}

/// The test-data cache, or `None` (with a notice) when it is absent.
fn cache() -> Option<PathBuf> {
    damage::testdata_cache(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Run `f` on a fresh thread; fail the test when it takes longer than [`TIME_LIMIT`].
fn timed<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(TIME_LIMIT) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer in {TIME_LIMIT:?} (a hang)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the reader thread panicked"),
    }
}

#[test]
fn every_damaged_real_file_ends_in_ok_or_an_error_naming_it() {
    let Some(cache) = cache() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (files, manifest) = damage::build_corpus(
        &cache,
        dir.path(),
        env_or("QOQ_CORPUS_PER_FILE", PER_FILE),
        env_or("QOQ_CORPUS_SEED", SEED),
    )
    .unwrap();
    assert!(files.len() >= 200, "{} damaged files", files.len());
    let opts = qoq_data::check::CheckOptions::default();

    // One file at a time, each under the time and allocation limits.
    let m = Manifest::open(&manifest, ManifestConfig::default()).unwrap();
    let mut bad_lines = Vec::new();
    let (mut ok, mut contained) = (0, 0);
    let started = Instant::now();
    for (row, file) in m.rows().unwrap().zip(&files) {
        let sample = row.unwrap_or_else(|e| panic!("row of {}: {e}", file.path.display()));
        let what = format!(
            "{} ({}; from {})",
            file.path.display(),
            file.damage,
            file.source.display()
        );
        set_current(&what);
        let o = opts.clone();
        let refused = REFUSED.load(Ordering::Relaxed);
        let problems = timed(&what, move || qoq_data::check::check_sample(&sample, &o));
        assert_eq!(
            REFUSED.load(Ordering::Relaxed),
            refused,
            "{what}: an allocation above {ALLOC_LIMIT} bytes was asked for"
        );
        let name = file.path.file_name().unwrap().to_string_lossy().to_string();
        for p in &problems {
            assert!(
                p.contains(&name),
                "{what}: the error does not name the file: {p}"
            );
            if p.contains("panicked") {
                contained += 1;
            }
        }
        if problems.is_empty() {
            ok += 1;
        } else {
            bad_lines.push(bad_line(&files, file));
        }
    }
    set_current("(none)");
    eprintln!(
        "{} damaged files: {ok} read, {} refused with an error naming the file ({contained} of them contained panics of a decoder), in {:.1?}; largest allocation {} bytes",
        files.len(),
        files.len() - ok,
        started.elapsed(),
        LARGEST.load(Ordering::Relaxed)
    );
    assert!(
        bad_lines.len() > files.len() / 4,
        "damage that breaks nothing is no test"
    );

    // The same manifest through `qoq data check`'s parallel path (rayon workers): it finishes,
    // and reports exactly the same rows.
    set_current("the parallel data check");
    let m2 = manifest.clone();
    let report = timed("data check", move || {
        qoq_data::check::check_manifest_with(&m2, ManifestConfig::default(), &opts, |_, _| {})
    })
    .unwrap();
    let lines: Vec<u64> = report.bad.iter().map(|b| b.line).collect();
    assert_eq!(lines, bad_lines);
    assert_eq!(REFUSED.load(Ordering::Relaxed), 0);
}

fn bad_line(files: &[CorpusFile], f: &CorpusFile) -> u64 {
    files.iter().position(|g| g.path == f.path).unwrap() as u64 + 1
}

/// The damage that reproduces the panic of `dicom-transfer-syntax-registry` 0.10.1's RLE
/// decoder (`adapters/rle_lossless.rs:119`, index out of bounds): a zeroed block inside the
/// first RLE segment of the pixel data. PackBits reads a 0 byte as "copy the next byte", so the
/// segment decodes to fewer bytes than rows x columns and the decoder indexes past its end.
fn zero_first_segment(bytes: &[u8]) -> (Vec<u8>, Damage) {
    // the pixel data element (7FE0,0010) OB with undefined length, then the offset table item
    // and the first fragment item; the fragment starts with the 64-byte RLE header.
    let pd = bytes
        .windows(8)
        .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0])
        .expect("pixel data element");
    let mut at = pd + 12;
    let item_len =
        |at: usize| u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    at += 8 + item_len(at); // basic offset table
    let fragment = at + 8;
    let seg0 = fragment
        + u32::from_le_bytes(bytes[fragment + 4..fragment + 8].try_into().unwrap()) as usize;
    let seg1 = fragment
        + u32::from_le_bytes(bytes[fragment + 8..fragment + 12].try_into().unwrap()) as usize;
    let seg_end = if seg1 > seg0 {
        seg1
    } else {
        fragment + item_len(at)
    };
    let start = seg0 + (seg_end - seg0) / 4;
    let len = ((seg_end - seg0) / 2).max(16);
    let mut out = bytes.to_vec();
    out[start..start + len].fill(0);
    (
        out,
        Damage {
            kind: DamageKind::ZeroBlock,
            at: start,
            len,
        },
    )
}

#[test]
fn damaged_rle_dicoms_reproduce_the_upstream_panic_as_an_error_naming_them() {
    let Some(cache) = cache() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for name in [
        "MR_small_RLE.dcm",
        "emri_small_RLE.dcm",
        "SC_rgb_rle_2frame.dcm",
    ] {
        let src = cache.join("dicom").join(name);
        if !src.is_file() {
            eprintln!("skipping {name}: not in the cache");
            continue;
        }
        let (bytes, d) = zero_first_segment(&std::fs::read(&src).unwrap());
        std::fs::create_dir_all(dir.path().join("rle")).unwrap();
        let path = dir.path().join("rle").join(format!("damaged_{name}"));
        std::fs::write(&path, bytes).unwrap();
        set_current(&path.to_string_lossy());
        let p = path.clone();
        let r = timed(name, move || {
            qoq_data::dicom::read_image(&p, qoq_data::dicom::Windowing::FromFile)
        });
        match r {
            Err(qoq_data::Error::DecoderPanic {
                path: at,
                decoder,
                message,
            }) => {
                assert_eq!(at, path);
                assert_eq!(decoder, "DICOM pixel data (RLE Lossless)");
                assert!(message.contains("index out of bounds"), "{message}");
                assert!(message.contains("rle_lossless.rs"), "{message}");
                let text = qoq_data::Error::DecoderPanic {
                    path: at,
                    decoder,
                    message,
                }
                .to_string();
                assert!(text.starts_with(&path.display().to_string()), "{text}");
                seen += 1;
            }
            Err(e) => panic!(
                "{name} ({d}): the upstream RLE panic no longer reproduces (now: {e}); update the known-issues note of README.md and src/guard.rs"
            ),
            Ok(_) => panic!("{name} ({d}) decoded"),
        }
        // the same file in a manifest: `data check` reports the row and goes on
        let manifest = dir.path().join(format!("{name}.jsonl"));
        let file = CorpusFile {
            path: path.clone(),
            source: src,
            role: Role::Image,
            damage: d,
        };
        damage::write_corpus_manifest(&[file], &manifest).unwrap();
        let report =
            qoq_data::check::check_manifest(&manifest, ManifestConfig::default(), |_, _| {})
                .unwrap();
        assert_eq!(report.bad.len(), 1);
        assert!(
            report.bad[0].reason.contains(&path.display().to_string()),
            "{}",
            report.bad[0].reason
        );
    }
    if seen > 0 {
        eprintln!(
            "{seen} damaged RLE files reproduce the upstream panic, each an error naming the file"
        );
    }
}

/// The inputs of the first fuzz campaign (`fuzz/regressions/`, kept there with their reproduce
/// command) on which dicom-rs's parser asked for more than 1 GiB: an element with a damaged
/// VR and an undefined length, which the parser reads as a sequence (in the file's own transfer
/// syntax) and the DICOM length walk did not follow, holding an element whose length runs past
/// the end of the file. Each must now be refused by the walk
/// (`qoq_data::dicom::check_lengths`), naming the element and its length, with no allocation
/// above the limit.
#[test]
fn fuzz_regressions_are_refused_naming_the_element_without_a_large_allocation() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    // (file, the reader of its fuzz target (ECG or image), the refused element, its length)
    let cases: [(&str, bool, &str, &str); 2] = [
        // (0008,1090) at byte 814 has VR `LQ` and an undefined length; read as a sequence it
        // leads, through its item, to (0000,0000) at byte 2190 (a second file's preamble
        // spliced in by the fuzzer): an unknown VR whose length field reads `\0DIC`
        (
            "dicom-oom-1128875008.bin",
            false,
            "element (0000,0000) at byte 2190",
            "declares 1128875008 bytes",
        ),
        // (0040,0343) at byte 6326 has VR `\0Q` and an undefined length, inside the nested
        // sequences of the waveform's annotations; inside it, (0008,BB03) at byte 8758 has VR
        // `\xBB\xBB` and a length of 0xBBBBBBBB
        (
            "dicom_ecg-oom-3149642683.bin",
            true,
            "element (0008,BB03) at byte 8758",
            "declares 3149642683 bytes",
        ),
    ];
    for (name, ecg, element, len) in cases {
        let path = dir.join(name);
        assert!(path.is_file(), "{} is missing", path.display());
        set_current(&path.to_string_lossy());
        let refused = REFUSED.load(Ordering::Relaxed);
        let p = path.clone();
        let err = timed(name, move || {
            if ecg {
                qoq_data::dicom::read_ecg(&p, 0).map(|_| ())
            } else {
                qoq_data::dicom::read_image(&p, qoq_data::dicom::Windowing::FromFile).map(|_| ())
            }
        })
        .expect_err(name);
        assert_eq!(
            REFUSED.load(Ordering::Relaxed),
            refused,
            "{name}: an allocation above {ALLOC_LIMIT} bytes was asked for"
        );
        let text = err.to_string();
        assert!(
            !matches!(err, qoq_data::Error::DecoderPanic { .. }),
            "{text}"
        );
        assert!(text.starts_with(&path.display().to_string()), "{text}");
        assert!(text.contains("cannot read DICOM"), "{text}");
        assert!(
            text.contains(element) && text.contains(len),
            "{name}: {text}"
        );
    }
    set_current("(none)");
}
