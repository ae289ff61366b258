//! [`ValueModel`]: the critic of PPO (spec §9.5): the policy's architecture with a scalar head.
//!
//! Reference: transformers 4.51.3 `Qwen2ForTokenClassification` with `num_labels = 1` (a
//! `score = nn.Linear(hidden_size, 1)` on the final hidden states), which EasyR1 / verl build for
//! the critic from the actor's checkpoint (`AutoModelForTokenClassification`, the token-level
//! head freshly initialised). Here the body is the whole [`ClinicalVlm`] without `lm_head`
//! (vision tower, ECG encoder and decoder, so the critic sees what the policy sees), and
//! [`value_weights_from_policy`] makes its initial weights: the policy's, `lm_head` dropped,
//! `score.weight` from `N(0, initializer_range²)` (HF `_init_weights`, 0.02) and `score.bias` 0.
//! The head uses no dropout (the critic's `classifier_dropout` is 0 in the reference config).
//!
//! Keys: the policy's (`visual.*`, `model.*`, `time_series_embedding.*`) plus `score.weight`
//! `(1, hidden)` and `score.bias` `(1,)`.

use crate::error::{Error, Result};
use crate::inputs::ModelInputs;
use crate::model::ClinicalVlm;
use crate::ops::ForwardMode;
use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use qoq_core::hf_config::QwenVlConfig;
use std::collections::HashMap;

/// Standard deviation of the fresh head (HF `initializer_range`).
pub const HEAD_INIT_STD: f64 = 0.02;

/// The value model: [`ClinicalVlm`]'s body and a scalar head per position.
#[derive(Debug, Clone)]
pub struct ValueModel {
    body: ClinicalVlm,
    score: Linear,
}

impl ValueModel {
    /// Build from `vb` at the checkpoint root (keys above).
    pub fn new(cfg: &QwenVlConfig, vb: VarBuilder) -> Result<Self> {
        let body = ClinicalVlm::new_backbone(cfg, vb.clone())?;
        let score = candle_nn::linear(cfg.text.hidden_size, 1, vb.pp("score"))?;
        Ok(Self { body, score })
    }

    /// The body (its config, dtype, device).
    pub fn body(&self) -> &ClinicalVlm {
        &self.body
    }

    /// Values on hidden states: `(b, s, hidden)` → `(b, s)`, f32.
    pub fn values_from_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self
            .score
            .forward(hidden)? // (b, s, 1)
            .squeeze(2)?
            .to_dtype(DType::F32)?)
    }

    /// The value of every position, `(b, s)` in f32: `score(final hidden state)`.
    pub fn forward(&self, inputs: &ModelInputs, mode: ForwardMode) -> Result<Tensor> {
        let h = self.body.forward_hidden(inputs, mode)?; // (b, s, hidden)
        self.values_from_hidden(&h)
    }
}

struct FreshHead<'a> {
    policy: VarBuilder<'a>,
    seed: u64,
}

impl candle_nn::var_builder::SimpleBackend for FreshHead<'_> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        match name {
            "score.weight" => {
                crate::train::seeded_normal(name, s.dims(), HEAD_INIT_STD, self.seed, dtype, dev)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
            "score.bias" => Tensor::zeros(s, dtype, dev),
            _ => self
                .policy
                .get_with_hints_dtype(s, name, h, dtype)?
                .to_device(dev),
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        self.policy.get_unchecked_dtype(name, dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        name.starts_with("score.") || self.policy.contains_tensor(name)
    }
}

/// A weight source for a fresh [`ValueModel`] over a policy checkpoint's (any layout the policy
/// loader reads): the policy's tensors, and the fresh head of [`value_weights_from_policy`].
pub fn value_var_builder(policy: VarBuilder<'_>, seed: u64) -> VarBuilder<'_> {
    let (dtype, dev) = (policy.dtype(), policy.device().clone());
    VarBuilder::from_backend(Box::new(FreshHead { policy, seed }), dtype, dev)
}

/// The initial weights of a value model from a policy's weights (by checkpoint name): every
/// tensor but `lm_head.*`, plus a fresh head, `score.weight` `(1, hidden)` from
/// `N(0, 0.02²)` (deterministic in `seed`, see [`crate::train::seeded_normal`]) and
/// `score.bias` zero, in the dtype of the policy's embedding.
pub fn value_weights_from_policy(
    mut policy: HashMap<String, Tensor>,
    cfg: &QwenVlConfig,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let embed = policy
        .get("model.embed_tokens.weight")
        .ok_or_else(|| Error::Config("policy weights lack model.embed_tokens.weight".into()))?;
    let (dtype, dev) = (embed.dtype(), embed.device().clone());
    policy.retain(|k, _| !k.starts_with("lm_head."));
    let hidden = cfg.text.hidden_size;
    let w = crate::train::seeded_normal(
        "score.weight",
        &[1, hidden],
        HEAD_INIT_STD,
        seed,
        dtype,
        &dev,
    )?;
    policy.insert("score.weight".into(), w);
    policy.insert("score.bias".into(), Tensor::zeros(1, dtype, &dev)?);
    Ok(policy)
}
