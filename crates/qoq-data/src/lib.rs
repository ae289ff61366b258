//! qoq-data: readers for the clinical inputs of qoq-med-rs.
//!
//! * [`manifest`]: JSONL manifests in the released schema (spec §2.1), with the reference's
//!   derivation of `data_source` / `dataset` and its `<image>` placeholder rules, streamed through
//!   a byte-offset index with a seeded shuffle and a resumable [`manifest::Cursor`].
//! * [`convert`]: CLIMB annotation files to the training schema.
//! * [`wfdb`]: WFDB ECG records (formats 16 and 212), read and written.
//! * [`vision`]: the reference's dataset-side image resize, masks and box rescaling.
//! * [`ecg`]: ECG lead selection, scipy-equal FFT resampling, the model's (8, 2500) input.
//! * [`ecg_io`]: ECG files (WFDB, DICOM waveform, `.npy` / `.npz`, CSV) to one signal type.
//! * [`dicom`]: DICOM images (windowed 8-bit frames) and 12-lead ECG waveforms.
//! * [`volume`]: NIfTI-1/2 and NRRD volumes to the reference's sampled frames and masks.
//! * [`npy`]: NumPy `.npy` / `.npz` arrays.
//! * [`damage`]: seeded damage of real files (truncation, flipped bytes, zeroed blocks,
//!   length fields set to `0x7fffffff`) for robustness tests.
//! * [`guard`]: the boundary every decoder runs behind (a panic becomes an error naming the
//!   file and the decoder) and the per-file decoding limit.
//! * [`check`]: validation of every row of a manifest, with a per-domain / per-dataset summary.

pub mod check;
pub mod convert;
pub mod damage;
pub mod dicom;
pub mod ecg;
pub mod ecg_io;
pub mod error;
pub mod guard;
pub mod manifest;
pub mod npy;
pub mod vision;
pub mod volume;
pub mod wfdb;

pub use error::{Error, Result};
