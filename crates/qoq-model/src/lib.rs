//! qoq-model: Qwen2.5-VL with the QoQ-Med ECG path, in candle.

/// ECG-JEPA encoder and projector (spec §5.2-§5.3).
pub mod ecg;
/// Composed (differentiable) and fused numerical blocks, selected by [`ForwardMode`].
pub mod ops;

pub use ops::ForwardMode;
