//! PPO's critic as the trainer runs it (spec §9.5; reference `verl/workers/critic/dp_critic.py`):
//! the value model ([`qoq_model::ValueModel`]), its own AdamW (`[critic]`), the values of a
//! micro-batch of rollouts and the clipped value loss of an update micro-batch.
//!
//! Values are read where the policy reads its log-probs: the hidden state at position p values
//! the response token at p + 1, so positions `s − 1 .. s − 1 + r_len` of a prompt of length `s`
//! followed by the response (`values[:, -response_length - 1 : -1]`), masked to the response
//! tokens (`values * response_mask`). Both the scoring-time values and the update's predictions
//! come from the training forward, so the first update's predictions equal the old values
//! exactly and value clipping starts from them.

use crate::config::CriticConfig;
use crate::loss::{ValueLossInputs, ValueLossOutput, compute_value_loss};
use crate::optim::AdamW;
use crate::trainable::TrainableGroups;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use qoq_core::hf_config::QwenVlConfig;
use qoq_model::train::{Freeze, ParamStore, trainable_var_builder};
use qoq_model::{ForwardMode, ModelInputs, ResponseAt, ValueModel};
use std::collections::HashMap;

/// Errors of the critic, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum CriticError {
    /// Building or running the value model failed.
    #[error("value model: {0}")]
    Model(String),
    /// The value loss failed.
    #[error("value loss: {0}")]
    Loss(#[from] crate::loss::LossError),
    /// A tensor operation failed.
    #[error("value model tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result of the critic.
pub type Result<T> = std::result::Result<T, CriticError>;

fn model_err(e: impl std::fmt::Display) -> CriticError {
    CriticError::Model(e.to_string())
}

/// The value model with its optimiser.
pub struct Critic {
    model: ValueModel,
    store: ParamStore,
    opt: AdamW,
    cliprange_value: f64,
}

impl Critic {
    /// A critic over the weights of `vb` (a policy checkpoint through
    /// [`qoq_model::value::value_var_builder`], or a saved critic), with `[model]`'s freezing
    /// switches (the head always trains), `model.trainable`'s groups when set, and `[critic]`'s
    /// optimiser.
    pub fn new(
        model_cfg: &QwenVlConfig,
        vb: VarBuilder<'static>,
        freeze: Freeze,
        groups: Option<&TrainableGroups>,
        cfg: &CriticConfig,
    ) -> Result<Self> {
        let (vb, store) = trainable_var_builder(vb, freeze);
        let model = ValueModel::new(model_cfg, vb).map_err(model_err)?;
        let mut params = store.trainable().map_err(model_err)?;
        if let Some(g) = groups {
            params.retain(|(name, _)| g.trains(name));
        }
        let opt = AdamW::new(params, cfg.optim.clone())?;
        Ok(Self {
            model,
            store,
            opt,
            cliprange_value: cfg.cliprange_value,
        })
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The optimiser, to step or restore.
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// Every parameter by checkpoint name (what a checkpoint saves).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self
            .store
            .tensors()
            .map_err(model_err)?
            .into_iter()
            .collect())
    }

    /// Predicted values of the response tokens, `(b, r_len)` f32, times `mask` (graph attached).
    pub fn predict(&self, inputs: &ModelInputs, at: &ResponseAt, mask: &Tensor) -> Result<Tensor> {
        let r_len = mask.dim(1)?;
        let hidden = self
            .model
            .body()
            .forward_hidden(inputs, ForwardMode::Train)
            .map_err(model_err)?;
        let hidden = at.hidden(&hidden, r_len)?; // (b, r_len, hidden)
        let v = self.model.values_from_hidden(&hidden).map_err(model_err)?; // (b, r_len)
        Ok(v.mul(&mask.to_dtype(v.dtype())?)?)
    }

    /// The clipped value loss of one update micro-batch (graph attached to the critic).
    pub fn micro_loss(
        &self,
        inputs: &ModelInputs,
        at: &ResponseAt,
        mask: &Tensor,
        old_values: &Tensor,
        returns: &Tensor,
    ) -> Result<ValueLossOutput> {
        let vpreds = self.predict(inputs, at, mask)?;
        Ok(compute_value_loss(
            &ValueLossInputs {
                vpreds: &vpreds,
                old_values,
                returns,
                response_mask: mask,
            },
            self.cliprange_value,
        )?)
    }
}
