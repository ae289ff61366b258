//! Errors of the evaluation crate: reading prediction files, writing run artefacts.

use std::path::PathBuf;

/// Errors raised while reading predictions; each names the file and, where it applies, the
/// 1-based line and the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The predictions file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line is not a JSON object of the prediction schema.
    #[error("{path} line {line}: malformed prediction: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A field parsed but holds a value the metrics cannot use.
    #[error("{path} line {line}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        line: usize,
        field: &'static str,
        message: String,
    },
    /// A file of an evaluation run could not be read or written.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// Anything else that stops a run (e.g. a responder failure), with its reason.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A file-level error naming the path.
    pub fn file(path: &std::path::Path, message: impl Into<String>) -> Self {
        Error::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
