//! Errors of the world generator.

use std::path::PathBuf;

/// What can go wrong while writing a synthetic world.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An image could not be encoded.
    #[error("{path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    /// The ECG record writer refused a record.
    #[error(transparent)]
    Data(#[from] qoq_data::Error),
    /// The configuration is unusable.
    #[error("synthetic world config: {0}")]
    Config(String),
}

/// Result with the generator's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
