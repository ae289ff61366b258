//! qoq-model: Qwen2.5-VL with the QoQ-Med ECG path, in candle.

/// Composed (differentiable) and fused numerical blocks, selected by [`ForwardMode`].
pub mod ops;

pub use ops::ForwardMode;
