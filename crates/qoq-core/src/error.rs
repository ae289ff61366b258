//! Errors of the vocabulary layer (invariants of the types).

/// Errors raised when a vocabulary type's invariant would be broken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rollout group must hold at least one rollout.
    #[error("rollout group {group} is empty: a group owns its n >= 1 rollouts")]
    EmptyGroup { group: String },
    /// A scored group needs exactly one score per rollout.
    #[error("group {group} has {rollouts} rollouts but {scores} reward scores")]
    ScoreCount {
        group: String,
        rollouts: usize,
        scores: usize,
    },
    /// A mask's pixel buffer does not match its declared size.
    #[error("segmentation mask of {width}x{height} needs {} pixels, got {len}", width * height)]
    MaskSize {
        width: usize,
        height: usize,
        len: usize,
    },
    /// A model config file could not be parsed.
    #[error("config {path}: {message}")]
    Config { path: String, message: String },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
