//! Errors of the processor; each names the input (file, sample, row, field) it concerns.

use std::path::PathBuf;

/// A processor error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file (tokenizer, template, config, image) could not be read or parsed.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// The tokenizer failed or lacks a token the processor needs.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A prompt template failed to compile or render.
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
    /// An input is inconsistent (placeholder counts, grid sizes, shapes); `what` names it.
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    /// A prompt is longer than the limit and the truncation policy refuses to cut it.
    #[error(
        "sample {sample}: prompt has {len} tokens, more than max_prompt_length {max}; {reason}"
    )]
    TooLong {
        sample: String,
        len: usize,
        max: usize,
        reason: String,
    },
    /// An error of the data layer (image, ECG record, manifest).
    #[error(transparent)]
    Data(#[from] qoq_data::Error),
}

impl Error {
    pub(crate) fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
