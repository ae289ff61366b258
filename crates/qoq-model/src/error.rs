//! Errors of the model crate: tensor failures, checkpoint files, inputs and splicing.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A checkpoint file (single file, shard or index) is missing, truncated or malformed.
    #[error("checkpoint file {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The number of multimodal features differs from the number of placeholder tokens.
    #[error(
        "{kind} features and placeholder tokens do not match: {features} features, {placeholders} `{kind}` tokens (id {token_id}) in input_ids"
    )]
    SpliceCount {
        /// `image`, `video` or `time_series`.
        kind: &'static str,
        /// The placeholder token id.
        token_id: u32,
        /// Feature rows produced by the encoder.
        features: usize,
        /// Placeholder tokens found.
        placeholders: usize,
    },
    /// A model input has the wrong shape, dtype or is inconsistent with another one.
    #[error("model input `{field}`: {message}")]
    Input {
        /// The `ModelInputs` field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A configuration value cannot be used.
    #[error("config: {0}")]
    Config(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
