//! [`ClinicalVlm`]: Qwen2.5-VL (vision tower + Qwen2 decoder) with QoQ-Med's ECG path.
//!
//! Reference: transformers 4.51.3 `Qwen2_5_VLForConditionalGeneration.forward` and QoQ-Med's
//! `TimeSeriesQwen2_5_VLForConditionalGeneration.forward` (spec §5.3): embed the tokens, splice
//! image, video, then ECG features at their placeholder tokens, run the decoder with the supplied
//! M-RoPE position ids, apply `lm_head`. Weights use the QoQ (transformers 4.51) key layout:
//! `model.*`, `visual.*`, `lm_head.weight`, `time_series_embedding.*` (see [`crate::loading`] for
//! the newer layout).

use crate::ecg::TimeSeriesEmbedding;
use crate::error::{Error, Result};
use crate::inputs::ModelInputs;
use crate::lora::{LoraBuilder, Proj};
use crate::ops::ForwardMode;
use crate::splice::{Placeholder, splice_features};
use crate::text::{KvCache, TextModel};
use crate::vision::VisionTower;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};
use qoq_core::hf_config::QwenVlConfig;

/// The whole clinical vision-language model.
#[derive(Debug, Clone)]
pub struct ClinicalVlm {
    cfg: QwenVlConfig,
    visual: VisionTower,
    model: TextModel,
    /// `None` for a backbone without the language-model head ([`ClinicalVlm::new_backbone`]).
    lm_head: Option<Linear>,
    time_series_embedding: Option<TimeSeriesEmbedding>,
    dtype: DType,
    device: Device,
}

impl ClinicalVlm {
    /// Build from `vb` at the checkpoint root. Stock checkpoints (no `time_series_token_id`) get no
    /// ECG module.
    pub fn new(cfg: &QwenVlConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with_lora(cfg, vb, None)
    }

    /// The model without `lm_head` (the body of [`crate::value::ValueModel`]): everything up to
    /// the final norm; [`ClinicalVlm::logits_from_hidden`] and generation fail on it.
    pub fn new_backbone(cfg: &QwenVlConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, vb, None, false)
    }

    /// As [`ClinicalVlm::new`], with LoRA adapters on the decoder's projections.
    pub fn new_with_lora(
        cfg: &QwenVlConfig,
        vb: VarBuilder,
        lora: Option<&LoraBuilder>,
    ) -> Result<Self> {
        Self::build(cfg, vb, lora, true)
    }

    fn build(
        cfg: &QwenVlConfig,
        vb: VarBuilder,
        lora: Option<&LoraBuilder>,
        with_head: bool,
    ) -> Result<Self> {
        let t = &cfg.text;
        if cfg.vision.out_hidden_size != t.hidden_size {
            return Err(Error::Config(format!(
                "vision_config.out_hidden_size {} differs from hidden_size {}",
                cfg.vision.out_hidden_size, t.hidden_size
            )));
        }
        let visual = VisionTower::new(&cfg.vision, vb.pp("visual"))?;
        let model = TextModel::new(t, vb.pp("model"), lora)?;
        let lm_head = if !with_head {
            None
        } else if t.tie_word_embeddings {
            Some(Linear::new(model.embed_weight().clone(), None))
        } else {
            Some(candle_nn::linear_no_bias(
                t.hidden_size,
                t.vocab_size,
                vb.pp("lm_head"),
            )?)
        };
        let time_series_embedding = if cfg.has_time_series() {
            Some(TimeSeriesEmbedding::new(
                &cfg.time_series,
                t.hidden_size,
                vb.pp("time_series_embedding"),
            )?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            visual,
            model,
            lm_head,
            time_series_embedding,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &QwenVlConfig {
        &self.cfg
    }

    /// Parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings with image, video and ECG features spliced in: `(b, s, hidden)`.
    pub fn embed_inputs(&self, inputs: &ModelInputs, mode: ForwardMode) -> Result<Tensor> {
        inputs.validate()?;
        let ids = inputs.input_ids.to_dtype(DType::U32)?;
        let embeds = self.model.embed(&ids)?; // (b, s, hidden)
        let image = match &inputs.pixel_values {
            Some(pv) => Some(self.visual.forward(
                &pv.to_dtype(self.dtype)?,
                &inputs.image_grid_thw,
                mode,
            )?),
            None => None,
        };
        let video = match &inputs.pixel_values_videos {
            Some(pv) => Some(self.visual.forward(
                &pv.to_dtype(self.dtype)?,
                &inputs.video_grid_thw,
                mode,
            )?),
            None => None,
        };
        let ecg = match (&inputs.time_series_data, &self.time_series_embedding) {
            (Some(ts), Some(enc)) => Some(enc.forward(&ts.to_dtype(self.dtype)?, mode)?),
            (Some(_), None) => {
                return Err(Error::Input {
                    field: "time_series_data",
                    message: "this checkpoint has no ECG encoder (no time_series_token_id)".into(),
                });
            }
            _ => None,
        };
        let mut places = Vec::new();
        if let Some(f) = &image {
            places.push(Placeholder {
                kind: "image",
                token_id: self.cfg.image_token_id,
                features: f,
            });
        }
        if let Some(f) = &video {
            places.push(Placeholder {
                kind: "video",
                token_id: self.cfg.video_token_id,
                features: f,
            });
        }
        if let (Some(f), Some(id)) = (&ecg, self.cfg.time_series_token_id) {
            places.push(Placeholder {
                kind: "time_series",
                token_id: id,
                features: f,
            });
        }
        splice_features(&embeds, &ids, &places)
    }

    /// Last hidden states after the final norm, `(b, s, hidden)`.
    pub fn forward_hidden(&self, inputs: &ModelInputs, mode: ForwardMode) -> Result<Tensor> {
        let embeds = self.embed_inputs(inputs, mode)?;
        let mask = inputs
            .attention_mask
            .as_ref()
            .map(|m| m.to_dtype(DType::F32))
            .transpose()?;
        Ok(self.model.forward_embeds(
            &embeds,
            &inputs.position_ids,
            mask.as_ref(),
            inputs.segments.as_ref(),
            mode,
        )?)
    }

    /// `lm_head` on hidden states: `(..., hidden)` → `(..., vocab)`.
    pub fn logits_from_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(crate::linear::linear(self.lm_head()?, hidden)?)
    }

    /// The `lm_head` projection (the token embedding's matrix where tied).
    pub fn lm_head(&self) -> Result<&Linear> {
        self.lm_head.as_ref().ok_or_else(|| {
            Error::Config("this model was built without lm_head (a value-model backbone)".into())
        })
    }

    /// Logits `(b, s, vocab)`.
    pub fn forward(&self, inputs: &ModelInputs, mode: ForwardMode) -> Result<Tensor> {
        let h = self.forward_hidden(inputs, mode)?;
        self.logits_from_hidden(&h)
    }

    /// Run the prompt and fill `cache` (which must be empty): logits of the last position of each
    /// row, `(b, vocab)`. Rows are left-padded, so the last position is every row's last token.
    /// Image, video and ECG features are computed here once.
    pub fn prefill(
        &self,
        inputs: &ModelInputs,
        cache: &mut KvCache,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        if !cache.is_empty() {
            return Err(Error::Config("prefill needs an empty kv cache".into()));
        }
        if inputs.segments.is_some() {
            return Err(Error::Input {
                field: "segments",
                message: "packed rows are for full forwards, not a kv-cache prefill".into(),
            });
        }
        let embeds = self.embed_inputs(inputs, mode)?;
        self.prefill_chunk(
            &embeds,
            &inputs.position_ids,
            inputs.attention_mask.as_ref(),
            cache,
            mode,
        )
    }

    /// One piece of a prefill run in pieces (chunked prefill): `embeds: (b, s, hidden)` are
    /// positions `past..past + s` of the prompt's embeddings ([`Self::embed_inputs`], computed
    /// once for the whole prompt), `position_ids: (3, b, s)` and `attention_mask: (b, s)` the same
    /// positions' slices; `cache` holds the `past` positions before and all after. Returns the
    /// logits of the piece's last position, `(b, vocab)`. [`Self::prefill`] is one piece.
    pub fn prefill_chunk(
        &self,
        embeds: &Tensor,
        position_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let h =
            self.model
                .forward_embeds_cached(embeds, position_ids, attention_mask, cache, mode)?; // (b, s, hidden)
        let s = h.dim(1)?;
        self.logits_from_hidden(&h.narrow(1, s - 1, 1)?.squeeze(1)?)
    }

    /// One decoding step: `input_ids: (b, 1)` (the tokens sampled last), `position_ids:
    /// (3, b, 1)` → logits `(b, vocab)`; `cache` grows by one position.
    pub fn decode_step(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let embeds = self.model.embed(&input_ids.to_dtype(DType::U32)?)?; // (b, 1, hidden)
        let h = self
            .model
            .forward_embeds_cached(&embeds, position_ids, None, cache, mode)?;
        self.logits_from_hidden(&h.squeeze(1)?)
    }

    /// Decoder projections that carry LoRA adapters.
    pub fn adapted_projs(&self) -> Vec<&Proj> {
        self.model.adapted_projs()
    }
}
