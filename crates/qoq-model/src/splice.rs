//! Writing encoder features into the placeholder positions of the token embeddings.
//!
//! Reference: `Qwen2_5_VLForConditionalGeneration.forward` (transformers 4.51.3), which runs
//! `inputs_embeds.masked_scatter(input_ids == token_id, features)` for images, then videos, and
//! QoQ-Med's `TimeSeriesQwen2_5_VLForConditionalGeneration.forward` for `<|time_series_pad|>`
//! (spec §5.3). Features fill the placeholders in row-major order of `input_ids`. One helper
//! serves all three modalities; it is a gather, so gradients reach both the embeddings and the
//! features.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// Features of one modality and the token id whose positions they replace.
#[derive(Debug, Clone)]
pub struct Placeholder<'a> {
    /// `image`, `video` or `time_series` (for error messages).
    pub kind: &'static str,
    /// The placeholder token id read from the config.
    pub token_id: u32,
    /// `(n, hidden)`: one row per placeholder token, in order.
    pub features: &'a Tensor,
}

/// `embeds: (b, s, hidden)`, `input_ids: (b, s)` → `embeds` with every placeholder position of
/// each modality replaced by that modality's next feature row.
///
/// Errors with [`Error::SpliceCount`] when a modality's feature count differs from the number of
/// its placeholder tokens.
pub fn splice_features(
    embeds: &Tensor,
    input_ids: &Tensor,
    placeholders: &[Placeholder<'_>],
) -> Result<Tensor> {
    let (b, s, hidden) = embeds.dims3()?;
    let ids: Vec<u32> = input_ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    if ids.len() != b * s {
        return Err(Error::Input {
            field: "input_ids",
            message: format!(
                "{} ids for embeddings of shape {:?}",
                ids.len(),
                embeds.shape()
            ),
        });
    }
    let mut index: Vec<u32> = (0..(b * s) as u32).collect();
    let mut sources = vec![embeds.reshape((b * s, hidden))?];
    let mut offset = b * s;
    for p in placeholders {
        let (n, h) = p.features.dims2()?;
        if h != hidden {
            return Err(Error::Input {
                field: p.kind,
                message: format!("features have width {h}, the decoder expects {hidden}"),
            });
        }
        let positions: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| **id == p.token_id)
            .map(|(i, _)| i)
            .collect();
        if positions.len() != n {
            return Err(Error::SpliceCount {
                kind: p.kind,
                token_id: p.token_id,
                features: n,
                placeholders: positions.len(),
            });
        }
        for (k, pos) in positions.into_iter().enumerate() {
            index[pos] = (offset + k) as u32;
        }
        offset += n;
        sources.push(p.features.to_dtype(embeds.dtype())?);
    }
    if sources.len() == 1 {
        return Ok(embeds.clone());
    }
    let all = Tensor::cat(&sources, 0)?; // (b*s + features, hidden)
    let index = Tensor::from_vec(index, b * s, embeds.device())?;
    Ok(all.index_select(&index, 0)?.reshape((b, s, hidden))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn features_land_in_placeholder_order_and_counts_are_checked() -> Result<()> {
        let dev = Device::Cpu;
        let embeds = Tensor::zeros((2, 3, 2), DType::F32, &dev)?;
        let ids = Tensor::new(&[[1u32, 7, 7], [9, 1, 7]], &dev)?;
        let img = Tensor::new(&[[1f32, 1.], [2., 2.], [3., 3.]], &dev)?;
        let ecg = Tensor::new(&[[5f32, 6.]], &dev)?;
        let out = splice_features(
            &embeds,
            &ids,
            &[
                Placeholder {
                    kind: "image",
                    token_id: 7,
                    features: &img,
                },
                Placeholder {
                    kind: "time_series",
                    token_id: 9,
                    features: &ecg,
                },
            ],
        )?;
        let v: Vec<Vec<Vec<f32>>> = out.to_vec3()?;
        assert_eq!(v[0], vec![vec![0., 0.], vec![1., 1.], vec![2., 2.]]);
        assert_eq!(v[1], vec![vec![5., 6.], vec![0., 0.], vec![3., 3.]]);
        let short = img.narrow(0, 0, 2)?;
        let err = splice_features(
            &embeds,
            &ids,
            &[Placeholder {
                kind: "image",
                token_id: 7,
                features: &short,
            }],
        )
        .unwrap_err();
        assert!(matches!(
            err,
            Error::SpliceCount {
                features: 2,
                placeholders: 3,
                ..
            }
        ));
        assert!(err.to_string().contains("image"), "{err}");
        Ok(())
    }
}
