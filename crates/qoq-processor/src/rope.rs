//! M-RoPE position ids (spec §5.5): transformers 4.51.3
//! `Qwen2_5_VLForConditionalGeneration.get_rope_index` (the reference's
//! `verl/models/transformers/qwen2_vl.py::get_rope_index` is its per-sample copy), and the
//! continuation of positions over generated tokens (`vllm_rollout_spmd.py`).
//!
//! Text tokens get `(p, p, p)`. A vision block (the run of `<|image_pad|>` / `<|video_pad|>` tokens
//! that starts where the pad token is first found) gets, over its merged grid `(t, h/m, w/m)`,
//! `(⌊t·second_per_grid_t·tokens_per_second⌋ + s, h + s, w + s)` with `s` one past the previous
//! maximum plus the text run before it; the text after it starts at the block's maximum + 1.
//! The ECG token `<|time_series_pad|>` is ordinary text (one position).
//! Padded positions (attention mask 0) are set to 1, as HF does; positions are computed over the
//! unpadded tokens only, so left padding does not shift them.
//!
//! ```
//! use qoq_processor::rope::{RopeIndexConfig, continuation_positions, get_rope_index};
//! let cfg = RopeIndexConfig {
//!     image_token_id: 151655,
//!     video_token_id: 151656,
//!     vision_start_token_id: 151652,
//!     spatial_merge_size: 2,
//!     tokens_per_second: 2.0,
//! };
//! // text, <|vision_start|>, 4 image pads (a 1x4x4 patch grid merges to 2x2), <|vision_end|>, text
//! let ids = vec![9, 151652, 151655, 151655, 151655, 151655, 151653, 9];
//! let r = get_rope_index(&cfg, &[ids], None, &[[1, 4, 4]], &[], &[]).unwrap();
//! assert_eq!(r.position_ids[0][1], vec![0, 1, 2, 2, 3, 3, 4, 5]); // height axis
//! assert_eq!(r.position_ids[0][2], vec![0, 1, 2, 3, 2, 3, 4, 5]); // width axis
//! let next = continuation_positions(r.last_positions(0).unwrap(), 2);
//! assert_eq!(next[0], vec![6, 7]);
//! ```

use crate::error::{Error, Result};
use qoq_core::hf_config::QwenVlConfig;

/// The config values `get_rope_index` reads.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeIndexConfig {
    /// `<|image_pad|>` (151655).
    pub image_token_id: u32,
    /// `<|video_pad|>` (151656).
    pub video_token_id: u32,
    /// `<|vision_start|>` (151652).
    pub vision_start_token_id: u32,
    /// `vision_config.spatial_merge_size` (2).
    pub spatial_merge_size: usize,
    /// `vision_config.tokens_per_second` (2).
    pub tokens_per_second: f64,
}

impl RopeIndexConfig {
    /// Take the values from a model config.
    pub fn from_config(cfg: &QwenVlConfig) -> Self {
        Self {
            image_token_id: cfg.image_token_id,
            video_token_id: cfg.video_token_id,
            vision_start_token_id: cfg.vision_start_token_id,
            spatial_merge_size: cfg.vision.spatial_merge_size,
            tokens_per_second: cfg.vision.tokens_per_second,
        }
    }
}

/// The result of [`get_rope_index`].
#[derive(Debug, Clone, PartialEq)]
pub struct RopeIndex {
    /// Per batch row, the 3 axes (temporal, height, width), each of the row's length `s`;
    /// padded positions are 1, as HF sets them.
    pub position_ids: Vec<[Vec<i64>; 3]>,
    /// Per batch row, `max position + 1 - s` (HF `mrope_position_deltas`, shape [b, 1]).
    pub deltas: Vec<i64>,
}

impl RopeIndex {
    /// The positions `[t, h, w]` of the last column of row `row` (the last prompt token under
    /// left padding), which [`continuation_positions`] continues from.
    pub fn last_positions(&self, row: usize) -> Option<[i64; 3]> {
        let p = self.position_ids.get(row)?;
        Some([*p[0].last()?, *p[1].last()?, *p[2].last()?])
    }

    /// Positions as `[3][b][s]` (axis-major, HF's `position_ids` layout), flattened.
    pub fn to_axis_major(&self) -> Vec<i64> {
        let mut out = Vec::new();
        for axis in 0..3 {
            for row in &self.position_ids {
                out.extend_from_slice(&row[axis]);
            }
        }
        out
    }
}

/// Positions of `n` generated tokens after a prompt whose last column has positions
/// `last_prompt_pos` (`[t, h, w]`): `last + 1 ..= last + n` on each axis (spec §5.5,
/// `vllm_rollout_spmd.py`: `position_ids[..., -1:] + arange(1, n + 1)`).
pub fn continuation_positions(last_prompt_pos: [i64; 3], n: usize) -> [Vec<i64>; 3] {
    last_prompt_pos.map(|last| (1..=n as i64).map(|k| last + k).collect())
}

/// HF `get_rope_index` for a batch of token rows of equal length.
///
/// `attention_mask` (same shape as `input_ids`, 1 = real token) selects the tokens positions are
/// computed over; `None` means all ones. `image_grid_thw` / `video_grid_thw` list the grids of
/// all images / videos of the batch in order (not per row). `second_per_grid_ts` gives one value
/// per video; empty means HF's `None` (1.0 per video). With no grids at all, the text-only
/// fallback applies (cumulative positions over the mask).
pub fn get_rope_index(
    cfg: &RopeIndexConfig,
    input_ids: &[Vec<u32>],
    attention_mask: Option<&[Vec<u32>]>,
    image_grid_thw: &[[usize; 3]],
    video_grid_thw: &[[usize; 3]],
    second_per_grid_ts: &[f64],
) -> Result<RopeIndex> {
    let seq = input_ids.first().map_or(0, Vec::len);
    for (i, row) in input_ids.iter().enumerate() {
        if row.len() != seq {
            return Err(Error::invalid(
                format!("input_ids row {i}"),
                format!("length {} differs from row 0's {seq}", row.len()),
            ));
        }
    }
    if let Some(mask) = attention_mask {
        if mask.len() != input_ids.len() {
            return Err(Error::invalid(
                "attention_mask",
                format!("{} rows for {} input rows", mask.len(), input_ids.len()),
            ));
        }
        for (i, row) in mask.iter().enumerate() {
            if row.len() != seq {
                return Err(Error::invalid(
                    format!("attention_mask row {i}"),
                    format!("length {} differs from input length {seq}", row.len()),
                ));
            }
        }
    }
    if !second_per_grid_ts.is_empty() && second_per_grid_ts.len() != video_grid_thw.len() {
        return Err(Error::invalid(
            "second_per_grid_ts",
            format!(
                "{} values for {} videos",
                second_per_grid_ts.len(),
                video_grid_thw.len()
            ),
        ));
    }
    if cfg.spatial_merge_size == 0 {
        return Err(Error::invalid("spatial_merge_size", "must be positive"));
    }

    if image_grid_thw.is_empty() && video_grid_thw.is_empty() {
        return Ok(text_only(input_ids, attention_mask, seq));
    }

    let mut position_ids = Vec::with_capacity(input_ids.len());
    let mut deltas = Vec::with_capacity(input_ids.len());
    let mut image_index = 0usize;
    let mut video_index = 0usize;
    for (i, full) in input_ids.iter().enumerate() {
        let keep: Vec<bool> = match attention_mask {
            Some(m) => m[i].iter().map(|&v| v == 1).collect(),
            None => vec![true; seq],
        };
        let tokens: Vec<u32> = full
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(t, _)| *t)
            .collect();
        let what = || format!("input_ids row {i}");

        // Count the blocks by the token right after each <|vision_start|>.
        let (mut image_nums, mut video_nums) = (0usize, 0usize);
        for (j, &t) in tokens.iter().enumerate() {
            if t == cfg.vision_start_token_id {
                let next = tokens
                    .get(j + 1)
                    .ok_or_else(|| Error::invalid(what(), "<|vision_start|> is the last token"))?;
                if *next == cfg.image_token_id {
                    image_nums += 1;
                } else if *next == cfg.video_token_id {
                    video_nums += 1;
                }
            }
        }
        let has_image = tokens.contains(&cfg.image_token_id);
        let has_video = tokens.contains(&cfg.video_token_id);
        let find = |id: u32, from: usize| -> Result<usize> {
            tokens
                .iter()
                .skip(from)
                .position(|&t| t == id)
                .map(|p| p + from)
                .ok_or_else(|| {
                    Error::invalid(what(), format!("no token {id} at or after position {from}"))
                })
        };

        let mut axes: [Vec<i64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        let mut max_pos: Option<i64> = None;
        let mut st = 0usize;
        let (mut remain_images, mut remain_videos) = (image_nums, video_nums);
        for _ in 0..image_nums + video_nums {
            let ed_image = if has_image && remain_images > 0 {
                find(cfg.image_token_id, st)?
            } else {
                tokens.len() + 1
            };
            let ed_video = if has_video && remain_videos > 0 {
                find(cfg.video_token_id, st)?
            } else {
                tokens.len() + 1
            };
            let (thw, second_per_grid_t, ed) = if ed_image < ed_video {
                let g = image_grid_thw.get(image_index).ok_or_else(|| {
                    Error::invalid(
                        "image_grid_thw",
                        format!(
                            "row {i} needs image {image_index}, only {} given",
                            image_grid_thw.len()
                        ),
                    )
                })?;
                image_index += 1;
                remain_images -= 1;
                (*g, 0.0, ed_image)
            } else {
                let g = video_grid_thw.get(video_index).ok_or_else(|| {
                    Error::invalid(
                        "video_grid_thw",
                        format!(
                            "row {i} needs video {video_index}, only {} given",
                            video_grid_thw.len()
                        ),
                    )
                })?;
                let s = second_per_grid_ts.get(video_index).copied().unwrap_or(1.0);
                video_index += 1;
                remain_videos -= 1;
                (*g, s, ed_video)
            };
            let (gt, gh, gw) = (
                thw[0],
                thw[1] / cfg.spatial_merge_size,
                thw[2] / cfg.spatial_merge_size,
            );
            if gt * gh * gw == 0 {
                return Err(Error::invalid(
                    format!("grid {thw:?}"),
                    "merged grid is empty (HF fails on it too)",
                ));
            }
            let text_len = ed - st;
            let st_idx = max_pos.map_or(0, |m| m + 1);
            for k in 0..text_len as i64 {
                for a in &mut axes {
                    a.push(st_idx + k);
                }
            }
            let base = st_idx + text_len as i64;
            let mut block_max = base;
            for t in 0..gt {
                // HF: (arange(t) * second_per_grid_t * tokens_per_second).long()
                let t_pos = (t as f64 * second_per_grid_t * cfg.tokens_per_second) as i64 + base;
                for h in 0..gh {
                    for w in 0..gw {
                        axes[0].push(t_pos);
                        axes[1].push(h as i64 + base);
                        axes[2].push(w as i64 + base);
                        block_max = block_max
                            .max(t_pos)
                            .max(h as i64 + base)
                            .max(w as i64 + base);
                    }
                }
            }
            max_pos = Some(block_max);
            st = ed + gt * gh * gw;
        }
        if st < tokens.len() {
            let st_idx = max_pos.map_or(0, |m| m + 1);
            for k in 0..(tokens.len() - st) as i64 {
                for a in &mut axes {
                    a.push(st_idx + k);
                }
            }
        }
        if axes[0].len() != tokens.len() {
            return Err(Error::invalid(
                what(),
                format!(
                    "vision blocks cover {} positions but the row has {} unpadded tokens \
                     (pad-token count does not match the grids)",
                    axes[0].len(),
                    tokens.len()
                ),
            ));
        }
        let llm_max = axes.iter().flat_map(|a| a.iter().copied()).max();
        let mut row: [Vec<i64>; 3] = [vec![1; seq], vec![1; seq], vec![1; seq]];
        let mut k = 0usize;
        for (j, &kept) in keep.iter().enumerate() {
            if kept {
                for a in 0..3 {
                    row[a][j] = axes[a][k];
                }
                k += 1;
            }
        }
        // HF: llm_positions.max() + 1 - len(total_input_ids[i]); an empty row has no max (HF
        // raises there), we use -1.
        deltas.push(llm_max.unwrap_or(-1) + 1 - seq as i64);
        position_ids.push(row);
    }
    Ok(RopeIndex {
        position_ids,
        deltas,
    })
}

/// HF's branch without vision grids.
fn text_only(input_ids: &[Vec<u32>], attention_mask: Option<&[Vec<u32>]>, seq: usize) -> RopeIndex {
    let mut position_ids = Vec::with_capacity(input_ids.len());
    let mut deltas = Vec::with_capacity(input_ids.len());
    match attention_mask {
        Some(mask) => {
            for row in mask {
                // cumsum(mask) - 1, then positions where mask == 0 set to 1.
                let mut cum = 0i64;
                let pos: Vec<i64> = row
                    .iter()
                    .map(|&m| {
                        cum += m as i64;
                        if m == 0 { 1 } else { cum - 1 }
                    })
                    .collect();
                let max = pos.iter().copied().max().unwrap_or(0);
                deltas.push(max + 1 - seq as i64);
                position_ids.push([pos.clone(), pos.clone(), pos]);
            }
        }
        None => {
            let pos: Vec<i64> = (0..seq as i64).collect();
            for _ in input_ids {
                deltas.push(0);
                position_ids.push([pos.clone(), pos.clone(), pos.clone()]);
            }
        }
    }
    RopeIndex {
        position_ids,
        deltas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 151655;
    const VID: u32 = 151656;
    const VS: u32 = 151652;
    const VE: u32 = 151653;

    fn cfg() -> RopeIndexConfig {
        RopeIndexConfig {
            image_token_id: IMG,
            video_token_id: VID,
            vision_start_token_id: VS,
            spatial_merge_size: 2,
            tokens_per_second: 2.0,
        }
    }

    #[test]
    fn image_block_gets_grid_positions_and_text_continues_after_max() {
        // 2 text, vision_start, 6 image pads (grid 1x4x6 -> merged 1x2x3), vision_end, 2 text.
        let mut ids = vec![10, 11, VS];
        ids.extend(std::iter::repeat_n(IMG, 6));
        ids.extend([VE, 12, 13]);
        let r = get_rope_index(&cfg(), &[ids], None, &[[1, 4, 6]], &[], &[]).unwrap();
        let p = &r.position_ids[0];
        assert_eq!(p[0], vec![0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]);
        assert_eq!(p[1], vec![0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]);
        assert_eq!(p[2], vec![0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]);
        // max 8, +1, - 12 tokens
        assert_eq!(r.deltas, vec![-3]);
        assert_eq!(r.last_positions(0), Some([8, 8, 8]));
    }

    #[test]
    fn left_padding_is_skipped_and_set_to_one() {
        let ids = vec![0, 0, 10, VS, IMG, VE, 12];
        let mask = vec![0, 0, 1, 1, 1, 1, 1];
        let r = get_rope_index(&cfg(), &[ids], Some(&[mask]), &[[1, 2, 2]], &[], &[]).unwrap();
        let p = &r.position_ids[0];
        assert_eq!(p[0], vec![1, 1, 0, 1, 2, 3, 4]);
        assert_eq!(p[1], vec![1, 1, 0, 1, 2, 3, 4]);
        assert_eq!(r.deltas, vec![4 + 1 - 7]);
    }

    #[test]
    fn images_are_indexed_across_the_batch_and_videos_use_seconds() {
        let row0 = vec![VS, IMG, VE, 5];
        let mut row1 = vec![VS, VID, VID, VE];
        row1.truncate(4);
        // row 1: video grid t=2, 2x2 -> merged 2x1x1 = 2 tokens.
        let r = get_rope_index(
            &cfg(),
            &[row0, row1],
            None,
            &[[1, 2, 2]],
            &[[2, 2, 2]],
            &[1.5],
        )
        .unwrap();
        assert_eq!(r.position_ids[0][0], vec![0, 1, 2, 3]);
        // video: t positions floor(t * 1.5 * 2) = 0, 3, offset by 1.
        assert_eq!(r.position_ids[1][0], vec![0, 1, 4, 5]);
        assert_eq!(r.position_ids[1][1], vec![0, 1, 1, 5]);
        assert_eq!(r.deltas, vec![0, 2]);
    }

    #[test]
    fn text_only_fallback_matches_hf() {
        let ids = vec![vec![1, 2, 3, 4], vec![0, 0, 3, 4]];
        let r = get_rope_index(&cfg(), &ids, None, &[], &[], &[]).unwrap();
        assert_eq!(r.position_ids[1][2], vec![0, 1, 2, 3]);
        assert_eq!(r.deltas, vec![0, 0]);
        let mask = vec![vec![1, 1, 1, 1], vec![0, 0, 1, 1]];
        let r = get_rope_index(&cfg(), &ids, Some(&mask), &[], &[], &[]).unwrap();
        assert_eq!(r.position_ids[1][0], vec![1, 1, 0, 1]);
        assert_eq!(r.deltas, vec![0, -2]);
    }

    #[test]
    fn mismatched_pad_count_is_an_error() {
        // Grid 1x4x4 needs 4 pads; the row has 1 (HF fails on the shape there too).
        let ids = vec![VS, IMG, VE];
        let err = get_rope_index(&cfg(), &[ids], None, &[[1, 4, 4]], &[], &[]).unwrap_err();
        assert!(err.to_string().contains("row 0"), "{err}");
        let ids = vec![VS, IMG, VE];
        let err =
            get_rope_index(&cfg(), &[ids.clone(), ids], None, &[[1, 2, 2]], &[], &[]).unwrap_err();
        assert!(err.to_string().contains("image_grid_thw"), "{err}");
    }

    #[test]
    fn continuation_adds_one_per_generated_token() {
        assert_eq!(
            continuation_positions([8, 6, 7], 3),
            [vec![9, 10, 11], vec![7, 8, 9], vec![8, 9, 10]]
        );
    }

    proptest::proptest! {
        /// Left padding never changes the positions of the real tokens, padded positions are 1,
        /// and (with vision blocks) the delta is the real tokens' max position + 1 - the padded
        /// length. (HF's text-only branch takes the max over the padded 1s too.)
        #[test]
        fn padding_is_transparent(
            blocks in proptest::collection::vec((0usize..4, 1usize..3, 1usize..4, 1usize..4), 0..4),
            tail in 0usize..5,
            pad in 0usize..6,
        ) {
            let mut ids = Vec::new();
            let mut grids = Vec::new();
            for (text, t, h, w) in &blocks {
                ids.extend(std::iter::repeat_n(7u32, *text));
                ids.push(VS);
                ids.extend(std::iter::repeat_n(IMG, t * h * w));
                ids.push(VE);
                grids.push([*t, 2 * h, 2 * w]);
            }
            ids.extend(std::iter::repeat_n(8u32, tail));
            let alone = get_rope_index(&cfg(), std::slice::from_ref(&ids), None, &grids, &[], &[]).unwrap();
            let mut padded = vec![0u32; pad];
            padded.extend(&ids);
            let mask: Vec<u32> = (0..padded.len()).map(|i| u32::from(i >= pad)).collect();
            let r = get_rope_index(&cfg(), &[padded.clone()], Some(&[mask]), &grids, &[], &[]).unwrap();
            for a in 0..3 {
                proptest::prop_assert!(r.position_ids[0][a][..pad].iter().all(|&p| p == 1));
                proptest::prop_assert_eq!(&r.position_ids[0][a][pad..], &alone.position_ids[0][a][..]);
            }
            if !grids.is_empty() {
                let max = alone.position_ids[0].iter().flatten().copied().max().unwrap();
                proptest::prop_assert_eq!(r.deltas[0], max + 1 - padded.len() as i64);
            }
        }
    }
}
