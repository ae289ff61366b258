//! qoq-rl: advantage estimators, policy loss, optimiser and trainer.

/// Advantage estimators (tensor-free): GRPO, Dr.GRPO, RLOO, REINFORCE++, ReMax, GAE, DRPO.
pub mod advantage;
/// Policy loss (clipped surrogate, dual clip), KL estimators and controllers (candle).
pub mod loss;
