//! Errors of the reward crate: configuration and mask loading only. Scoring itself is total.

use std::path::PathBuf;

/// Errors raised while building a reward or loading its inputs (never while scoring).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A reward configuration is inconsistent.
    #[error("reward config: {0}")]
    Config(String),
    /// A segmentation mask image could not be read.
    #[error("segmentation mask {path}: {message}")]
    Mask { path: PathBuf, message: String },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
