//! Reinforcement learning: advantage estimators (spec §9) and the policy loss (spec §10).

pub mod advantage;
pub mod error;
pub mod kmeans;
pub mod loss;
pub mod optim;

pub use error::{Error, Result};
