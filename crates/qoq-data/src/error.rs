//! Errors of the data layer; each names the file and, where there is one, the line.

use std::path::PathBuf;

/// A data-layer error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file (image, mask, ECG record) is unreadable or malformed as a whole.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// A DICOM file whose pixel data is encoded in a transfer syntax this build cannot decode.
    #[error("{path}: unsupported transfer syntax {uid} ({name})")]
    UnsupportedTransferSyntax {
        /// The DICOM file.
        path: PathBuf,
        /// The transfer syntax UID.
        uid: String,
        /// Its name in the DICOM standard.
        name: String,
    },
    /// A decoder panicked on a file (a decoder bug met with damaged input); the panic was
    /// contained by [`crate::guard::contain`].
    #[error("{path}: the {decoder} decoder failed on this file (it panicked: {message})")]
    DecoderPanic {
        /// The file being decoded.
        path: PathBuf,
        /// Which decoder (`"DICOM pixel data (RLE Lossless)"`, `"NIfTI"`, ...).
        decoder: String,
        /// The panic message and its location.
        message: String,
    },
    /// A line of a text file (manifest row, header line) is invalid.
    #[error("{path}:{line}: {message}")]
    Row {
        path: PathBuf,
        line: u64,
        message: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
