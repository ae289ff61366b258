//! Qwen2.5-VL vision tower (spec §4.2, §6).
//!
//! Reference: transformers 4.51.3 `models/qwen2_5_vl/modeling_qwen2_5_vl.py`:
//! `Qwen2_5_VisionTransformerPretrainedModel` (`rot_pos_emb`, `get_window_index`, `forward`),
//! `Qwen2_5_VisionPatchEmbed`, `Qwen2_5_VisionRotaryEmbedding`, `Qwen2_5_VLVisionBlock`,
//! `Qwen2_5_VLVisionAttention` (eager, with `cu_seqlens`), `Qwen2_5_VLMLP` and
//! `Qwen2_5_VLPatchMerger`. QoQ-Med does not modify the tower.
//!
//! Pipeline for `pixel_values: (sum t*h*w, C*T*P*P)` and `grid_thw`:
//! 1. patch embedding: the `Conv3d` kernel equals its stride, so it is a linear map of each
//!    flattened 1176-vector (row order `(C, T, P, P)` as produced by the processor, spec §4.2);
//! 2. the groups of `merge^2` consecutive patches (one merged token each) are permuted into window
//!    order (`get_window_index`), and so are their 2-D rotary angles (`rot_pos_emb`);
//! 3. blocks `x + Attn(RMSNorm(x))`, `x + SwiGLU(RMSNorm(x))`; attention is block-diagonal over
//!    windows of `window_size` pixels, or over whole frames for blocks in `fullatt_block_indexes`
//!    (the `cu_seqlens` of the reference);
//! 4. the patch merger (`RMSNorm`, 2x2 concat, `Linear -> GELU -> Linear`), then the inverse window
//!    permutation so merged tokens come back in raster order per image.

// `lin`: the layers' product (in training, no gradient for the pixel values, the weight's in
// its own layout); `linear` below builds a layer.
use crate::linear::linear as lin;
use crate::ops::{self, ForwardMode};
use candle_core::{D, DType, Device, Result, Tensor, bail};
use candle_nn::{Linear, VarBuilder};
use qoq_core::hf_config::VisionConfig;

/// `Qwen2RMSNorm` epsilon used everywhere in the vision tower (hard-coded upstream).
const RMS_EPS: f64 = 1e-6;
/// `Qwen2_5_VisionRotaryEmbedding` theta (hard-coded in transformers 4; transformers 5's
/// `vision_config.rope_parameters` is checked against it by the config reader).
const ROPE_THETA: f32 = qoq_core::hf_config::VISION_ROPE_THETA as f32;

/// Load `nn.Linear(in_dim, out_dim)` (with bias) at `vb`.
fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

/// The activation named by `hidden_act` (transformers `ACT2FN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Silu,
    Gelu,
    GeluTanh,
    QuickGelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            other => bail!("vision_config.hidden_act `{other}` is not supported"),
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// `Qwen2_5_VLMLP` with bias: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct VisionMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl VisionMlp {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(d, i, vb.pp("gate_proj"))?,
            up_proj: linear(d, i, vb.pp("up_proj"))?,
            down_proj: linear(i, d, vb.pp("down_proj"))?,
            act: Activation::parse(&cfg.hidden_act)?,
        })
    }

    /// `(s, d) -> (s, d)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (lin(&self.gate_proj, x)?, lin(&self.up_proj, x)?);
        let h = if self.act == Activation::Silu {
            crate::fused::swiglu(&gate, &up)?
        } else {
            (self.act.apply(&gate)? * up)?
        };
        lin(&self.down_proj, &h)
    }
}

/// Rotary tables for the permuted patch sequence, f32.
#[derive(Debug, Clone)]
struct RotaryTables {
    /// `(s, head_dim / 2)`: cos/sin of the angles (fused `rope_thd` layout).
    cos_half: Tensor,
    sin_half: Tensor,
    /// `(s, 1, head_dim)`: the same duplicated (`cat(emb, emb)`), for the composed path.
    cos: Tensor,
    sin: Tensor,
}

/// `rotate_half`: `cat(-x2, x1)` over the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `apply_rotary_pos_emb_vision` on `x: (s, heads, head_dim)`, computed in f32.
fn apply_rotary(x: &Tensor, rot: &RotaryTables, mode: ForwardMode) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let y = match mode {
        ForwardMode::Train if crate::fused::available(&xf) => crate::fused::rope(
            &xf,
            &rot.cos_half,
            &rot.sin_half,
            crate::fused::RopeLayout::Thd,
            DType::F32,
        )?,
        ForwardMode::Train => {
            (xf.broadcast_mul(&rot.cos)? + rotate_half(&xf)?.broadcast_mul(&rot.sin)?)?
        }
        ForwardMode::Inference => candle_nn::rotary_emb::rope_thd(
            &xf.unsqueeze(0)?.contiguous()?,
            &rot.cos_half,
            &rot.sin_half,
        )?
        .squeeze(0)?,
    };
    y.to_dtype(dtype)
}

/// A contiguous range of the (permuted) sequence attended as `count` independent segments of
/// `len` tokens each (consecutive equal-length `cu_seqlens` segments, batched together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SegmentRun {
    start: usize,
    len: usize,
    count: usize,
}

/// Turn segment boundaries (`cu_seqlens`, zero-length segments allowed) into runs of equal-length
/// consecutive segments.
fn segment_runs(cu: &[usize]) -> Vec<SegmentRun> {
    let mut runs: Vec<SegmentRun> = Vec::new();
    for w in cu.windows(2) {
        let (start, len) = (w[0], w[1] - w[0]);
        if len == 0 {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.len == len && r.start + r.len * r.count == start => r.count += 1,
            _ => runs.push(SegmentRun {
                start,
                len,
                count: 1,
            }),
        }
    }
    runs
}

/// `Qwen2_5_VLVisionAttention`: fused qkv, 2-D rotary, block-diagonal attention, output proj.
#[derive(Debug, Clone)]
struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            qkv: linear(d, 3 * d, vb.pp("qkv"))?,
            proj: linear(d, d, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x: (s, d)`; attention only inside each segment of `runs` -> `(s, d)`.
    fn forward(
        &self,
        x: &Tensor,
        runs: &[SegmentRun],
        rot: &RotaryTables,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let (s, d) = x.dims2()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        let qkv = lin(&self.qkv, x)?.reshape((s, 3, h, hd))?; // (s, 3, h, hd)
        let q = apply_rotary(&qkv.narrow(1, 0, 1)?.squeeze(1)?, rot, mode)?; // (s, h, hd)
        let k = apply_rotary(&qkv.narrow(1, 1, 1)?.squeeze(1)?, rot, mode)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(runs.len());
        for r in runs {
            let n = r.len * r.count;
            // (count, h, len, hd)
            let split = |t: &Tensor| -> Result<Tensor> {
                t.narrow(0, r.start, n)?
                    .reshape((r.count, r.len, h, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (qs, ks, vs) = (split(&q)?, split(&k)?, split(&v)?);
            let o = if mode == ForwardMode::Train && crate::attention::use_chunked(&qs, r.len) {
                // Long segments (whole frames) in training: no (count, h, len, len) scores.
                let none = crate::attention::AttentionMask::default();
                crate::attention::chunked_attention(&qs, &ks, &vs, scale, &none)?
            } else {
                // (count, h, len, hd)
                crate::attention::eager_attention(&qs, &ks, &vs, scale, None, mode)?
            };
            let o = o.transpose(1, 2)?.reshape((n, d))?;
            outs.push(o);
        }
        let out = Tensor::cat(&outs, 0)?; // (s, d)
        lin(&self.proj, &out)
    }
}

/// `Qwen2_5_VLVisionBlock`.
#[derive(Debug, Clone)]
struct VisionBlock {
    norm1: Tensor,
    norm2: Tensor,
    attn: VisionAttention,
    mlp: VisionMlp,
}

impl VisionBlock {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: ops::norm_weight(&vb, cfg.hidden_size, "norm1.weight")?,
            norm2: ops::norm_weight(&vb, cfg.hidden_size, "norm2.weight")?,
            attn: VisionAttention::new(cfg, vb.pp("attn"))?,
            mlp: VisionMlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    /// `(s, d) -> (s, d)`.
    fn forward(
        &self,
        x: &Tensor,
        runs: &[SegmentRun],
        rot: &RotaryTables,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let a = self.attn.forward(
            &ops::rms_norm(x, &self.norm1, RMS_EPS, mode)?,
            runs,
            rot,
            mode,
        )?;
        let x = (x + a)?;
        let m = self
            .mlp
            .forward(&ops::rms_norm(&x, &self.norm2, RMS_EPS, mode)?)?;
        &x + m
    }
}

/// `Qwen2_5_VLPatchMerger`: RMSNorm, concat of `merge^2` patches, `Linear -> GELU -> Linear`.
#[derive(Debug, Clone)]
struct PatchMerger {
    ln_q: Tensor,
    fc1: Linear,
    fc2: Linear,
    merged_dim: usize,
}

impl PatchMerger {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let merged_dim = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            ln_q: ops::norm_weight(&vb, cfg.hidden_size, "ln_q.weight")?,
            fc1: linear(merged_dim, merged_dim, vb.pp("mlp.0"))?,
            fc2: linear(merged_dim, cfg.out_hidden_size, vb.pp("mlp.2"))?,
            merged_dim,
        })
    }

    /// `(s, d) -> (s / merge^2, out_hidden_size)`.
    fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let x = ops::rms_norm(x, &self.ln_q, RMS_EPS, mode)?;
        let s = x.dim(0)?;
        let x = x.reshape((s * x.dim(1)? / self.merged_dim, self.merged_dim))?;
        lin(&self.fc2, &lin(&self.fc1, &x)?.gelu_erf()?)
    }
}

/// Index bookkeeping of one `forward` call, computed on the host from `grid_thw`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowLayout {
    /// Merged-token permutation into window order (`get_window_index`'s `window_index`).
    pub window_index: Vec<usize>,
    /// Patch-level window boundaries (`cu_window_seqlens`, zero-length windows removed).
    pub cu_window_seqlens: Vec<usize>,
    /// Patch-level frame boundaries (`cu_seqlens` of full-attention blocks).
    pub cu_seqlens: Vec<usize>,
    /// `(h, w)` patch position of every patch, in the original (processor) order.
    pub pos_ids: Vec<[usize; 2]>,
}

impl WindowLayout {
    /// Compute the layout for `grid_thw` with the tower's geometry; validates the grid.
    pub fn new(
        grid_thw: &[[usize; 3]],
        merge: usize,
        window_merged: usize,
    ) -> Result<WindowLayout> {
        if grid_thw.is_empty() {
            bail!("vision tower: grid_thw is empty");
        }
        let mut window_index = Vec::new();
        let mut cu_window_seqlens = vec![0usize];
        let mut cu_seqlens = vec![0usize];
        let mut pos_ids = Vec::new();
        let unit = merge * merge;
        let mut base = 0usize;
        for (img, &[t, h, w]) in grid_thw.iter().enumerate() {
            if t == 0 || h == 0 || w == 0 || !h.is_multiple_of(merge) || !w.is_multiple_of(merge) {
                bail!(
                    "vision tower: grid_thw[{img}] = [{t}, {h}, {w}] must be positive with h and w \
                     multiples of spatial_merge_size {merge}"
                );
            }
            // rot_pos_emb: patches ordered (t, h/m, w/m, m, m)
            for _ in 0..t {
                for bh in 0..h / merge {
                    for bw in 0..w / merge {
                        for ih in 0..merge {
                            for iw in 0..merge {
                                pos_ids.push([bh * merge + ih, bw * merge + iw]);
                            }
                        }
                    }
                }
                let last = *cu_seqlens.last().expect("non-empty");
                cu_seqlens.push(last + h * w);
            }
            // get_window_index: windows of window_merged x window_merged merged tokens per frame
            let (lh, lw) = (h / merge, w / merge);
            for ft in 0..t {
                for wy in 0..lh.div_ceil(window_merged) {
                    for wx in 0..lw.div_ceil(window_merged) {
                        let mut count = 0;
                        for y in wy * window_merged..((wy + 1) * window_merged).min(lh) {
                            for x in wx * window_merged..((wx + 1) * window_merged).min(lw) {
                                window_index.push(base + ft * lh * lw + y * lw + x);
                                count += 1;
                            }
                        }
                        let last = *cu_window_seqlens.last().expect("non-empty");
                        cu_window_seqlens.push(last + count * unit);
                    }
                }
            }
            base += t * lh * lw;
        }
        Ok(WindowLayout {
            window_index,
            cu_window_seqlens,
            cu_seqlens,
            pos_ids,
        })
    }

    /// Total number of patches.
    pub fn num_patches(&self) -> usize {
        self.pos_ids.len()
    }
}

/// The Qwen2.5-VL vision transformer with its patch merger (`model.visual`).
#[derive(Debug, Clone)]
pub struct VisionTower {
    /// `patch_embed.proj.weight` viewed as `(hidden, C*T*P*P)`, no bias.
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    /// `1 / theta^(2i / (head_dim/2))`, `i < head_dim / 4`.
    inv_freq: Vec<f32>,
    cfg: VisionConfig,
    window_merged: usize,
}

impl VisionTower {
    /// Load from `vb` at the prefix `visual`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let hd = cfg.head_dim();
        if cfg.num_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            bail!(
                "vision_config: hidden_size {} is not a multiple of num_heads {}",
                cfg.hidden_size,
                cfg.num_heads
            );
        }
        if !hd.is_multiple_of(4) {
            bail!("vision_config: head_dim {hd} must be a multiple of 4 for the 2-D rotary");
        }
        let window_merged = cfg.window_size / cfg.spatial_merge_size / cfg.patch_size;
        if window_merged == 0 {
            bail!(
                "vision_config: window_size {} is smaller than spatial_merge_size * patch_size",
                cfg.window_size
            );
        }
        if let Some(&i) = cfg.fullatt_block_indexes.iter().find(|&&i| i >= cfg.depth) {
            bail!(
                "vision_config: fullatt_block_indexes has {i}, depth is {}",
                cfg.depth
            );
        }
        let patch_embed = vb
            .get(
                (
                    cfg.hidden_size,
                    cfg.in_channels,
                    cfg.temporal_patch_size,
                    cfg.patch_size,
                    cfg.patch_size,
                ),
                "patch_embed.proj.weight",
            )?
            .reshape((cfg.hidden_size, cfg.patch_dim()))?;
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let rot_dim = hd / 2;
        let inv_freq = (0..rot_dim)
            .step_by(2)
            .map(|i| 1.0 / ROPE_THETA.powf(i as f32 / rot_dim as f32))
            .collect();
        Ok(Self {
            patch_embed: Linear::new(patch_embed, None),
            blocks,
            merger: PatchMerger::new(cfg, vb.pp("merger"))?,
            inv_freq,
            cfg: cfg.clone(),
            window_merged,
        })
    }

    /// The tower's configuration.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Window/frame bookkeeping for `grid_thw` (exposed for tests and the M-RoPE builder).
    pub fn layout(&self, grid_thw: &[[usize; 3]]) -> Result<WindowLayout> {
        WindowLayout::new(grid_thw, self.cfg.spatial_merge_size, self.window_merged)
    }

    /// Rotary tables for patches in permuted order `perm` (patch indices).
    fn rotary(&self, layout: &WindowLayout, perm: &[u32], device: &Device) -> Result<RotaryTables> {
        let q = self.inv_freq.len(); // head_dim / 4
        let s = perm.len();
        let mut cos_half = Vec::with_capacity(s * 2 * q);
        let mut sin_half = Vec::with_capacity(s * 2 * q);
        for &p in perm {
            let [ph, pw] = layout.pos_ids[p as usize];
            for pos in [ph, pw] {
                for f in &self.inv_freq {
                    let a = pos as f32 * f;
                    cos_half.push(a.cos());
                    sin_half.push(a.sin());
                }
            }
        }
        let cos_half = Tensor::from_vec(cos_half, (s, 2 * q), device)?;
        let sin_half = Tensor::from_vec(sin_half, (s, 2 * q), device)?;
        let cos = Tensor::cat(&[&cos_half, &cos_half], 1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[&sin_half, &sin_half], 1)?.unsqueeze(1)?;
        Ok(RotaryTables {
            cos_half,
            sin_half,
            cos,
            sin,
        })
    }

    /// `pixel_values: (sum t*h*w, C*T*P*P)`, one `[t, h, w]` patch grid per image or video ->
    /// `(sum t*h*w / merge^2, out_hidden_size)`, merged tokens in raster order per image.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grid_thw: &[[usize; 3]],
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let layout = self.layout(grid_thw)?;
        let want = layout.num_patches();
        let patch_dim = self.cfg.patch_dim();
        match pixel_values.dims() {
            [rows, cols] if *rows == want && *cols == patch_dim => {}
            dims => bail!(
                "vision tower: pixel_values has shape {dims:?}, expected ({want}, {patch_dim}): \
                 rows must equal sum(t*h*w) over grid_thw {grid_thw:?}"
            ),
        }
        let device = pixel_values.device();
        let unit = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let perm: Vec<u32> = layout
            .window_index
            .iter()
            .flat_map(|&m| (0..unit).map(move |i| (m * unit + i) as u32))
            .collect();
        let mut inverse = vec![0u32; layout.window_index.len()];
        for (pos, &m) in layout.window_index.iter().enumerate() {
            inverse[m] = pos as u32;
        }
        let perm_t = Tensor::new(perm.as_slice(), device)?;
        let inverse_t = Tensor::new(inverse.as_slice(), device)?;
        let rot = self.rotary(&layout, &perm, device)?;
        let window_runs = segment_runs(&layout.cu_window_seqlens);
        let full_runs = segment_runs(&layout.cu_seqlens);

        let x = pixel_values.to_dtype(self.patch_embed.weight().dtype())?;
        let x = lin(&self.patch_embed, &x)?; // (s, d)
        let mut x = x.index_select(&perm_t, 0)?; // window order
        for (i, blk) in self.blocks.iter().enumerate() {
            let runs = if self.cfg.fullatt_block_indexes.contains(&i) {
                &full_runs
            } else {
                &window_runs
            };
            x = if mode == ForwardMode::Train {
                // Recomputed in the backward under activation checkpointing.
                let (blk, runs, rot) = (blk.clone(), runs.clone(), rot.clone());
                crate::checkpoint::checkpointed(
                    &x,
                    std::sync::Arc::new(move |x: &Tensor| blk.forward(x, &runs, &rot, mode)),
                )?
            } else {
                blk.forward(&x, runs, &rot, mode)?
            };
        }
        let merged = self.merger.forward(&x, mode)?; // (s / unit, out), window order
        merged.index_select(&inverse_t, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_layout_matches_reference_partition() -> Result<()> {
        // grid 1x4x6 with merge 2: merged grid 2x3; window of 2x2 merged tokens
        let l = WindowLayout::new(&[[1, 4, 6]], 2, 2)?;
        assert_eq!(l.window_index, vec![0, 1, 3, 4, 2, 5]);
        assert_eq!(l.cu_window_seqlens, vec![0, 16, 24]);
        assert_eq!(l.cu_seqlens, vec![0, 24]);
        // first merged token covers patches (0,0) (0,1) (1,0) (1,1)
        assert_eq!(&l.pos_ids[..4], &[[0, 0], [0, 1], [1, 0], [1, 1]]);
        assert_eq!(l.pos_ids[4], [0, 2]);
        Ok(())
    }

    #[test]
    fn video_frames_are_separate_full_attention_segments() -> Result<()> {
        let l = WindowLayout::new(&[[2, 2, 2], [1, 2, 4]], 2, 4)?;
        assert_eq!(l.cu_seqlens, vec![0, 4, 8, 16]);
        assert_eq!(l.cu_window_seqlens, vec![0, 4, 8, 16]);
        assert_eq!(l.window_index, vec![0, 1, 2, 3]);
        Ok(())
    }

    #[test]
    fn equal_consecutive_segments_are_batched() {
        let runs = segment_runs(&[0, 4, 8, 8, 12, 14, 16]);
        assert_eq!(
            runs,
            vec![
                SegmentRun {
                    start: 0,
                    len: 4,
                    count: 3
                },
                SegmentRun {
                    start: 12,
                    len: 2,
                    count: 2
                },
            ]
        );
    }

    #[test]
    fn bad_grid_is_refused() {
        let err = WindowLayout::new(&[[1, 3, 4]], 2, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("grid_thw[0]"), "{err}");
    }
}
