//! Reinforcement learning: advantage estimators (spec §9) and the policy loss (spec §10).

pub mod advantage;
pub mod checkpoint;
pub mod config;
pub mod critic;
pub mod dist;
pub mod early_stopping;
pub mod ecg_pretrain;
pub mod error;
pub mod kmeans;
pub mod loss;
pub mod memory;
pub mod metrics_log;
pub mod optim;
pub mod rng;
pub mod run_dir;
pub mod tensorboard;
pub mod trainable;
pub mod trainer;

pub use error::{Error, Result};
