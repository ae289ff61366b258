//! Errors of the RL crate.

/// What can go wrong when computing advantages or restoring estimator state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Groups of one step have different sizes; the reference asserts they are all equal.
    #[error("step {step}: group {uid:?} has {got} rollouts, other groups have {expected}")]
    GroupSize {
        step: u64,
        uid: String,
        got: usize,
        expected: usize,
    },
    /// A domain's history holds vectors of another length than this step's groups.
    #[error(
        "step {step}: domain {domain:?} history holds {expected}-rollout vectors, this step has {got}"
    )]
    HistoryWidth {
        step: u64,
        domain: String,
        got: usize,
        expected: usize,
    },
    /// An input is not usable (empty batch, a non-finite reward, ...).
    #[error("step {step}: rollout {row}: {reason}")]
    BadInput {
        step: u64,
        row: usize,
        reason: String,
    },
    /// Token-level inputs have inconsistent shapes.
    #[error("{what}: row {row} has length {got}, expected {expected}")]
    Shape {
        what: &'static str,
        row: usize,
        got: usize,
        expected: usize,
    },
    /// Saving or restoring estimator state failed.
    #[error("estimator state: {0}")]
    State(#[from] serde_json::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
