//! [`ModelInputs`]: what one forward pass of [`crate::ClinicalVlm`] consumes (spec §4.2, §5.1,
//! §5.5). Position ids are supplied by the caller (the processor's `get_rope_index`), as in the
//! reference actor, which passes them explicitly.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// Inputs of one forward pass.
#[derive(Debug, Clone)]
pub struct ModelInputs {
    /// `(b, s)` token ids, u32 or i64.
    pub input_ids: Tensor,
    /// `(b, s)`, 1 for real tokens and 0 for (left) padding; `None` means no padding.
    pub attention_mask: Option<Tensor>,
    /// `(3, b, s)` M-RoPE position ids (temporal, height, width).
    pub position_ids: Tensor,
    /// `(patches, 1176)` flattened image patches of all images, in order.
    pub pixel_values: Option<Tensor>,
    /// `(t, h, w)` patch grid of each image.
    pub image_grid_thw: Vec<[usize; 3]>,
    /// `(patches, 1176)` flattened video patches of all videos, in order.
    pub pixel_values_videos: Option<Tensor>,
    /// `(t, h, w)` patch grid of each video.
    pub video_grid_thw: Vec<[usize; 3]>,
    /// `(b, 8, 2500)` ECG of each sample (one `<|time_series_pad|>` token per sample).
    pub time_series_data: Option<Tensor>,
    /// `(b, s)` u32 segments of packed rows ([`crate::batch::rollout_tensors_packed`]): a token
    /// sees the earlier tokens of segment 0 (a prompt shared by several responses) and of its own
    /// segment (one response), as causality and padding allow; `None`: every earlier token.
    /// Full forwards only ([`crate::ClinicalVlm::forward_hidden`]; the kv-cache paths refuse it).
    pub segments: Option<Tensor>,
}

impl ModelInputs {
    /// Text-only inputs.
    pub fn text(input_ids: Tensor, attention_mask: Option<Tensor>, position_ids: Tensor) -> Self {
        Self {
            input_ids,
            attention_mask,
            position_ids,
            pixel_values: None,
            image_grid_thw: Vec::new(),
            pixel_values_videos: None,
            video_grid_thw: Vec::new(),
            time_series_data: None,
            segments: None,
        }
    }

    /// `(b, s)`, after checking that all shapes agree.
    pub fn validate(&self) -> Result<(usize, usize)> {
        let bad = |field: &'static str, message: String| Error::Input { field, message };
        let (b, s) = self.input_ids.dims2().map_err(|_| {
            bad(
                "input_ids",
                format!("must be (b, s), got {:?}", self.input_ids.shape()),
            )
        })?;
        if !matches!(self.input_ids.dtype(), DType::U32 | DType::I64) {
            return Err(bad(
                "input_ids",
                format!("integer dtype expected, got {:?}", self.input_ids.dtype()),
            ));
        }
        if let Some(m) = &self.attention_mask
            && m.dims() != [b, s]
        {
            return Err(bad(
                "attention_mask",
                format!("must be ({b}, {s}), got {:?}", m.shape()),
            ));
        }
        if let Some(g) = &self.segments
            && (g.dims() != [b, s] || g.dtype() != DType::U32)
        {
            return Err(bad(
                "segments",
                format!(
                    "must be ({b}, {s}) u32, got {:?} {:?}",
                    g.shape(),
                    g.dtype()
                ),
            ));
        }
        if self.position_ids.dims() != [3, b, s] {
            return Err(bad(
                "position_ids",
                format!("must be (3, {b}, {s}), got {:?}", self.position_ids.shape()),
            ));
        }
        for (field, pv, grids) in [
            ("pixel_values", &self.pixel_values, &self.image_grid_thw),
            (
                "pixel_values_videos",
                &self.pixel_values_videos,
                &self.video_grid_thw,
            ),
        ] {
            let patches: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
            match pv {
                Some(p) => {
                    let rows = p
                        .dims2()
                        .map_err(|_| {
                            bad(
                                field,
                                format!("must be (patches, dim), got {:?}", p.shape()),
                            )
                        })?
                        .0;
                    if rows != patches {
                        return Err(bad(
                            field,
                            format!("{rows} patch rows but the grids hold {patches}"),
                        ));
                    }
                }
                None if !grids.is_empty() => {
                    return Err(bad(field, "grids given without pixel values".into()));
                }
                None => {}
            }
        }
        if let Some(ts) = &self.time_series_data {
            let (tb, _, _) = ts.dims3().map_err(|_| {
                bad(
                    "time_series_data",
                    format!("must be (b, leads, samples), got {:?}", ts.shape()),
                )
            })?;
            if tb != b {
                return Err(bad(
                    "time_series_data",
                    format!("{tb} series for a batch of {b}"),
                ));
            }
        }
        Ok((b, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn base() -> ModelInputs {
        let dev = Device::Cpu;
        ModelInputs::text(
            Tensor::zeros((2, 5), DType::I64, &dev).unwrap(),
            Some(Tensor::ones((2, 5), DType::I64, &dev).unwrap()),
            Tensor::zeros((3, 2, 5), DType::I64, &dev).unwrap(),
        )
    }

    #[test]
    fn inconsistent_shapes_name_the_field() {
        assert_eq!(base().validate().unwrap(), (2, 5));
        let dev = Device::Cpu;
        let mut m = base();
        m.position_ids = Tensor::zeros((2, 5), DType::I64, &dev).unwrap();
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("position_ids")
        );
        let mut m = base();
        m.pixel_values = Some(Tensor::zeros((16, 1176), DType::F32, &dev).unwrap());
        m.image_grid_thw = vec![[1, 2, 4]];
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("pixel_values") && e.contains("16"), "{e}");
        let mut m = base();
        m.video_grid_thw = vec![[1, 2, 2]];
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("pixel_values_videos")
        );
        let mut m = base();
        m.time_series_data = Some(Tensor::zeros((1, 8, 2500), DType::F32, &dev).unwrap());
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("time_series_data")
        );
        let mut m = base();
        m.segments = Some(Tensor::zeros((2, 4), DType::U32, &dev).unwrap());
        assert!(m.validate().unwrap_err().to_string().contains("segments"));
        let mut m = base();
        m.input_ids = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        assert!(m.validate().unwrap_err().to_string().contains("input_ids"));
    }
}
