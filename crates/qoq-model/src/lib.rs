//! qoq-model: Qwen2.5-VL with the QoQ-Med ECG path, in candle.
//!
//! [`ClinicalVlm`] (spec §5.3-5.5) = the vision tower ([`vision`]), the ECG-JEPA encoder and
//! projector ([`ecg`]) and the Qwen2 decoder with M-RoPE ([`text`]), joined by one splice helper
//! ([`splice`]). [`loading`] reads HF checkpoints in both key layouts; [`train`] and [`lora`] hold
//! the training switches (trainable `Var`s, freezing, LoRA adapters, merged saving); [`value`]
//! the critic of PPO (the same body with a scalar head). [`device`] is the one parser of device
//! names (`--device`, `model.device`).

/// Composed (differentiable) and fused numerical blocks, selected by [`ForwardMode`].
pub mod ops;

pub use ops::ForwardMode;

/// ECG-JEPA encoder and projector.
pub mod ecg;

/// Qwen2.5-VL vision tower.
pub mod vision;

pub mod attention;
pub mod batch;
pub mod checkpoint;
pub mod device;
pub mod embedding;
pub mod error;
pub mod expf;
pub mod fused;
pub mod init;
pub mod inputs;
pub mod linear;
pub mod loading;
pub mod lora;
pub mod matmul;
pub mod model;
pub mod splice;
pub mod text;
pub mod threads;
pub mod train;
pub mod value;

#[cfg(test)]
mod test_util;

pub use batch::{
    ResponseAt, RolloutTensors, batch_to_inputs, prompt_inputs, rollout_tensors,
    rollout_tensors_packed,
};
pub use device::{DeviceError, DeviceSpec, parse_device};
pub use error::{Error, Result};
pub use inputs::ModelInputs;
pub use model::ClinicalVlm;
pub use text::KvCache;
pub use value::ValueModel;
