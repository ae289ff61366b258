//! ECG-JEPA time-series encoder and projector (spec §5.2, §5.3).
//!
//! Reference: QoQ-Med `modeling_time_series_qwen2_5_vl.py::TimeSeriesEmbedding`, which wraps the
//! ECG-JEPA `MaskTransformer` (`ecg_jepa.py`) and keeps only its `.encoder`; the forward pass is
//! `Linear(embed_dim -> hidden)(encoder.representation(x))`.
//!
//! `representation(x)` with `x: (b, c = 8 leads, p * t = 2500 samples)`:
//! 1. each lead is cut into `p` patches of `t` samples: `(b, c*p, t)`, lead-major tokens;
//! 2. `W_P: Linear(t -> d)`;
//! 3. for every block: `x = block(x + pos_embed)` (the fixed 2-D sin-cos table is re-added before
//!    every block and is not trainable);
//! 4. pre-norm blocks `x + Attn(LN1(x))`, `x + MLP(LN2(x))` where attention is masked so token
//!    `(l, p)` sees `(l', p')` only if `l == l'` or `p == p'` (cross-attention mask);
//! 5. final LayerNorm and mean over all `c*p` tokens.
//!
//! Checkpoint keys (below the `time_series_embedding` prefix): `encoder.W_P`, `encoder.pos_embed`,
//! `encoder.encoder_blocks.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
//! `encoder.norm`, `linear`.

use crate::ops::{self, ForwardMode};
use candle_core::{DType, Device, Result, Tensor, bail};
use candle_nn::{Linear, VarBuilder};
use qoq_core::hf_config::TimeSeriesConfig;

/// Affine LayerNorm whose implementation follows [`ForwardMode`].
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: ops::norm_weight(&vb, dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// `(.., d) -> (.., d)`.
    fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps, mode)
    }
}

/// `nn.Linear` with an optional bias, loaded under the checkpoint key `vb`.
fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// ECG-JEPA multi-head self-attention (`ecg_jepa.py::Attention`) under the cross-attention mask
/// (`MaskTransformer._cross_attention_mask`): token `(l, p)` (lead-major, index `l * P + p`)
/// sees `(l', p')` only if `l == l'` or `p == p'`.
///
/// Computed factorised rather than as dense `n x n` scores with `-inf` outside the mask, which is
/// the same function (masked entries have probability exactly 0 there): the scores of a query
/// against its own lead's `P` tokens and against the other leads' tokens of its patch (`L`
/// columns, its own lead's masked), one softmax over the `P + L` columns, and the two value
/// products. For ECG-JEPA's 8 leads x 50 patches that is 57 of 400 columns per query: the
/// dense form spent 7x the score work and memory on entries it then zeroed.
#[derive(Debug, Clone)]
struct EcgAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
    leads: usize,
    patches: usize,
    /// `(leads, leads)` additive f32: `-inf` on the diagonal (a query's own lead, already among
    /// its lead's scores), 0 elsewhere.
    own_lead: Tensor,
}

impl EcgAttention {
    fn new(cfg: &TimeSeriesConfig, vb: VarBuilder) -> Result<Self> {
        let (dim, l) = (cfg.embed_dim, cfg.leads);
        Ok(Self {
            qkv: linear(dim, 3 * dim, cfg.qkv_bias, vb.pp("qkv"))?,
            proj: linear(dim, dim, true, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
            head_dim: dim / cfg.num_heads,
            leads: cfg.leads,
            patches: cfg.patches_per_lead,
            own_lead: Tensor::from_vec(
                (0..l * l)
                    .map(|i| {
                        if i / l == i % l {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect::<Vec<f32>>(),
                (l, l),
                vb.device(),
            )?,
        })
    }

    /// `x: (b, n = leads * patches, d)` -> `(b, n, d)`.
    fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (h, hd, l, p) = (self.num_heads, self.head_dim, self.leads, self.patches);
        if n != l * p {
            bail!("ECG attention: {n} tokens, expected {l} leads x {p} patches");
        }
        let qkv = crate::linear::linear(&self.qkv, x)? // (b, n, 3d)
            .reshape((b, n, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?; // (3, b, h, n, hd)
        let part = |i: usize| qkv.get(i)?.contiguous();
        let scale = (hd as f64).powf(-0.5);
        // The scale on the queries (n x hd) rather than on the scores (n x (P + L)).
        let (q, k, v) = ((part(0)? * scale)?, part(1)?, part(2)?);
        // Same lead: (b*h*L, P, hd) batches of one lead's tokens.
        let by_lead = |t: &Tensor| t.reshape((b * h * l, p, hd));
        // Same patch: (b*h*P, L, hd) batches of one patch's tokens across the leads.
        let by_patch = |t: &Tensor| {
            t.reshape((b, h, l, p, hd))?
                .transpose(2, 3)?
                .contiguous()?
                .reshape((b * h * p, l, hd))
        };
        let (vl, vp) = (by_lead(&v)?, by_patch(&v)?);
        let lead_scores = by_lead(&q)?
            .matmul(&by_lead(&k)?.t()?)? // (bhL, P, P)
            .reshape((b, h, l, p, p))?;
        let patch_scores = by_patch(&q)?
            .matmul(&by_patch(&k)?.t()?)? // (bhP, L, L)
            .to_dtype(DType::F32)?
            .broadcast_add(&self.own_lead)? // its own lead is in the first block already
            .reshape((b, h, p, l, l))?
            .transpose(2, 3)?; // (b, h, L, P, L): [lead, patch, other lead]
        let scores = Tensor::cat(&[&lead_scores.to_dtype(DType::F32)?, &patch_scores], 4)?;
        let probs = ops::softmax_last_dim(&scores, mode)?.to_dtype(v.dtype())?; // (b, h, L, P, P+L)
        let lead_out = probs
            .narrow(4, 0, p)?
            .contiguous()?
            .reshape((b * h * l, p, p))?
            .matmul(&vl)? // (bhL, P, hd)
            .reshape((b, h, l, p, hd))?;
        let patch_out = probs
            .narrow(4, p, l)?
            .transpose(2, 3)? // (b, h, P, L, L)
            .contiguous()?
            .reshape((b * h * p, l, l))?
            .matmul(&vp)? // (bhP, L, hd)
            .reshape((b, h, p, l, hd))?
            .transpose(2, 3)?; // (b, h, L, P, hd)
        let out = (lead_out + patch_out)?
            .reshape((b, h, n, hd))?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        crate::linear::linear(&self.proj, &out)
    }
}

/// `Linear -> GELU (exact erf) -> Linear` (`ecg_jepa.py::Mlp`).
#[derive(Debug, Clone)]
struct EcgMlp {
    fc1: Linear,
    fc2: Linear,
}

impl EcgMlp {
    /// `(.., d) -> (.., d)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = crate::linear::linear(&self.fc1, x)?.gelu_erf()?;
        crate::linear::linear(&self.fc2, &hidden)
    }
}

/// Pre-norm transformer block (`ecg_jepa.py::Block`).
#[derive(Debug, Clone)]
struct EcgBlock {
    norm1: LayerNorm,
    attn: EcgAttention,
    norm2: LayerNorm,
    mlp: EcgMlp,
}

impl EcgBlock {
    fn new(cfg: &TimeSeriesConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        let hidden = mlp_hidden(cfg);
        Ok(Self {
            norm1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm1"))?,
            attn: EcgAttention::new(cfg, vb.pp("attn"))?,
            norm2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm2"))?,
            mlp: EcgMlp {
                fc1: linear(d, hidden, true, vb.pp("mlp.fc1"))?,
                fc2: linear(hidden, d, true, vb.pp("mlp.fc2"))?,
            },
        })
    }

    /// `(b, n, d) -> (b, n, d)`.
    fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x, mode)?, mode)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x, mode)?)?
    }
}

/// MLP width of the ECG-JEPA blocks: `int(embed_dim * mlp_ratio)` as in `ecg_jepa.py`.
fn mlp_hidden(cfg: &TimeSeriesConfig) -> usize {
    (cfg.embed_dim as f64 * cfg.mlp_ratio) as usize
}

/// The fixed 2-D sin-cos positional table of ECG-JEPA (`pos_encoding.py::get_2d_sincos_pos_embed`
/// with `grid_h = leads`, `grid_w = patches`), `(leads * patches, dim)` in f64 precision then f32.
///
/// Row `l * patches + p` is `concat(E(p), E(l))` where `E(x) = [sin(x w_k), cos(x w_k)]`,
/// `w_k = 10000^(-k / (dim/4))`, `k = 0..dim/4` (spec §5.2 step 4). `dim` must be a multiple of 4.
pub fn sincos_pos_embed(
    dim: usize,
    leads: usize,
    patches: usize,
    device: &Device,
) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        bail!("ECG-JEPA sin-cos positional embedding needs embed_dim divisible by 4, got {dim}");
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let one_d = |pos: usize, out: &mut Vec<f32>| {
        for w in &omega {
            out.push((pos as f64 * w).sin() as f32);
        }
        for w in &omega {
            out.push((pos as f64 * w).cos() as f32);
        }
    };
    let mut data = Vec::with_capacity(leads * patches * dim);
    for l in 0..leads {
        for p in 0..patches {
            one_d(p, &mut data);
            one_d(l, &mut data);
        }
    }
    Tensor::from_vec(data, (leads * patches, dim), device)
}

/// `encoder.pos_embed`, stored either as `(c*p, d)` or as upstream's `(1, c*p, d)` parameter;
/// returned as `(1, c*p, d)`.
fn load_pos_embed(n: usize, d: usize, vb: &VarBuilder) -> Result<Tensor> {
    match vb.get((n, d), "pos_embed") {
        Ok(t) => t.unsqueeze(0),
        Err(flat_err) => vb.get((1, n, d), "pos_embed").map_err(|_| flat_err),
    }
}

/// The ECG-JEPA encoder (`ecg_jepa.py::MaskTransformer`, `representation` path only).
#[derive(Debug, Clone)]
struct MaskTransformer {
    w_p: Linear,
    /// `(1, c*p, d)`, fixed (detached in every forward, as `requires_grad=False` upstream).
    pos_embed: Tensor,
    blocks: Vec<EcgBlock>,
    norm: LayerNorm,
    cfg: TimeSeriesConfig,
}

impl MaskTransformer {
    fn new(cfg: &TimeSeriesConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        if cfg.num_heads == 0 || !d.is_multiple_of(cfg.num_heads) {
            bail!(
                "time_series_config: embed_dim {d} is not a multiple of num_heads {}",
                cfg.num_heads
            );
        }
        let n = cfg.leads * cfg.patches_per_lead;
        let blocks = (0..cfg.depth)
            .map(|i| EcgBlock::new(cfg, vb.pp(format!("encoder_blocks.blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            w_p: linear(cfg.patch_size, d, true, vb.pp("W_P"))?,
            pos_embed: load_pos_embed(n, d, &vb)?,
            blocks,
            norm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm"))?,
            cfg: cfg.clone(),
        })
    }

    /// `representation(x)`: `(b, c, p*t)` -> `(b, d)`.
    fn representation(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let cfg = &self.cfg;
        let dims = x.dims();
        if dims.len() != 3 || dims[1] != cfg.leads || dims[2] != cfg.samples() {
            bail!(
                "ECG input must have shape (batch, {} leads, {} samples), got {:?}",
                cfg.leads,
                cfg.samples(),
                dims
            );
        }
        let b = dims[0];
        let n = cfg.leads * cfg.patches_per_lead;
        let x = x
            .to_dtype(self.pos_embed.dtype())?
            .reshape((b, n, cfg.patch_size))?; // (b, c*p, t), lead-major
        let mut h = crate::linear::linear(&self.w_p, &x)?; // (b, n, d)
        let pos = self.pos_embed.detach(); // (1, n, d)
        for blk in &self.blocks {
            h = blk.forward(&h.broadcast_add(&pos)?, mode)?;
        }
        self.norm.forward(&h, mode)?.mean(1) // (b, d)
    }
}

/// QoQ-Med's `TimeSeriesEmbedding`: the ECG-JEPA encoder followed by a linear projector into the
/// language model's hidden size (one token per ECG).
#[derive(Debug, Clone)]
pub struct TimeSeriesEmbedding {
    encoder: MaskTransformer,
    linear: Linear,
}

impl TimeSeriesEmbedding {
    /// Load from `vb` at the prefix `time_series_embedding`; `out_dim` is the LLM hidden size.
    pub fn new(cfg: &TimeSeriesConfig, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: MaskTransformer::new(cfg, vb.pp("encoder"))?,
            linear: linear(cfg.embed_dim, out_dim, true, vb.pp("linear"))?,
        })
    }

    /// The encoder representation before the projector: `(b, leads, samples)` -> `(b, embed_dim)`.
    pub fn encode(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        self.encoder.representation(x, mode)
    }

    /// Encoder then projector: `(b, leads, samples)` -> `(b, out_dim)`.
    ///
    /// Rows that repeat an earlier row bit for bit (the zeros every row without an ECG carries,
    /// the `n` rollouts of one prompt) are encoded once and the result repeated
    /// ([`distinct_rows`]; `index_select`, whose backward sums the copies' gradients): each row's
    /// output is what encoding it alone gives, at the cost of the distinct rows only. In the
    /// demo's SFT batches, 32 rows of which a few carry an ECG, the encoder was most of the step.
    pub fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let (keep, map) = distinct_rows(x)?;
        if keep.len() == map.len() {
            return crate::linear::linear(&self.linear, &self.encode(x, mode)?);
        }
        let dev = x.device();
        let kept = x.index_select(&Tensor::new(keep.as_slice(), dev)?, 0)?;
        let y = crate::linear::linear(&self.linear, &self.encode(&kept, mode)?)?;
        y.index_select(&Tensor::new(map.as_slice(), dev)?, 0)
    }

    /// The fixed positional table as loaded from the checkpoint, `(1, c*p, d)`.
    pub fn pos_embed(&self) -> &Tensor {
        &self.encoder.pos_embed
    }
}

/// The distinct rows of `x` (first axis; rows compared bit for bit): `keep`, the index of each
/// distinct row's first occurrence in order, and `map`, for every row the position in `keep` of
/// the row it equals.
pub fn distinct_rows(x: &Tensor) -> Result<(Vec<u32>, Vec<u32>)> {
    let rows = x.flatten_from(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut first: std::collections::HashMap<Vec<u32>, u32> = std::collections::HashMap::new();
    let (mut keep, mut map) = (Vec::new(), Vec::with_capacity(rows.len()));
    for (i, row) in rows.iter().enumerate() {
        let bits: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
        let at = *first.entry(bits).or_insert_with(|| {
            keep.push(i as u32);
            keep.len() as u32 - 1
        });
        map.push(at);
    }
    Ok((keep, map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    #[test]
    fn distinct_rows_keep_first_occurrences_and_map_every_row() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[
                [[0f32, 0.], [0., 0.]],
                [[1., 2.], [3., 4.]],
                [[0., 0.], [0., 0.]],
                [[1., 2.], [3., 5.]],
                [[1., 2.], [3., 4.]],
            ],
            &dev,
        )?;
        let (keep, map) = distinct_rows(&x)?;
        assert_eq!(keep, vec![0, 1, 3]);
        assert_eq!(map, vec![0, 1, 0, 2, 1]);
        let (keep, map) = distinct_rows(&x.narrow(0, 0, 2)?)?;
        assert_eq!((keep, map), (vec![0, 1], vec![0, 1]));
        Ok(())
    }

    /// A batch with repeated rows gives, row for row, the outputs of encoding each row alone, and
    /// the same parameter gradients as the rows encoded one by one.
    #[test]
    fn repeated_ecg_rows_are_encoded_once_with_the_same_outputs_and_gradients() -> Result<()> {
        use candle_nn::VarMap;
        let dev = Device::Cpu;
        let cfg = TimeSeriesConfig {
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            leads: 2,
            patches_per_lead: 4,
            patch_size: 5,
            ..TimeSeriesConfig::default()
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let enc = TimeSeriesEmbedding::new(&cfg, 8, vb.pp("time_series_embedding"))?;
        let a = Tensor::randn(0f32, 1., (1, 2, 20), &dev)?;
        let zero = Tensor::zeros((1, 2, 20), DType::F32, &dev)?;
        let b = Tensor::randn(0f32, 1., (1, 2, 20), &dev)?;
        let rows = [&zero, &a, &zero, &b, &a, &zero];
        let x = Tensor::cat(&rows, 0)?;
        let w = Tensor::randn(0f32, 1., (rows.len(), 8), &dev)?;
        let mode = ForwardMode::Train;
        let together = enc.forward(&x, mode)?;
        let alone = Tensor::cat(
            &rows
                .iter()
                .map(|r| enc.forward(r, mode))
                .collect::<Result<Vec<_>>>()?,
            0,
        )?;
        let diff = (&together - &alone)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "outputs differ by {diff}");
        let g1 = together.mul(&w)?.sum_all()?.backward()?;
        let g2 = alone.mul(&w)?.sum_all()?.backward()?;
        let vars = vm.all_vars();
        assert!(vars.len() > 10);
        for v in &vars {
            let (Some(x1), Some(x2)) = (g1.get(v), g2.get(v)) else {
                // Only the fixed positional table receives none.
                assert!(g1.get(v).is_none() && g2.get(v).is_none());
                continue;
            };
            let scale = x2.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let d = (x1 - x2)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d <= 1e-4 * scale, "gradient differs by {d} (scale {scale})");
        }
        Ok(())
    }

    /// The ECG-JEPA cross-attention mask (`MaskTransformer._cross_attention_mask`) as an additive
    /// `(c*p, c*p)` f32 tensor: 0 where token `(l, p)` may see `(l', p')` (same lead or same time
    /// patch), `-inf` elsewhere. Tokens are lead-major: index `l * p_count + p`.
    fn cross_attention_mask(leads: usize, patches: usize, device: &Device) -> Result<Tensor> {
        let n = leads * patches;
        let mut data = vec![f32::NEG_INFINITY; n * n];
        for i in 0..n {
            let (li, pi) = (i / patches, i % patches);
            for j in 0..n {
                let (lj, pj) = (j / patches, j % patches);
                if li == lj || pi == pj {
                    data[i * n + j] = 0.0;
                }
            }
        }
        Tensor::from_vec(data, (n, n), device)
    }

    /// The dense form of [`EcgAttention`]: `n x n` scores, `-inf` outside the mask.
    fn dense_attention(att: &EcgAttention, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (h, hd) = (att.num_heads, att.head_dim);
        let qkv = att
            .qkv
            .forward(x)?
            .reshape((b, n, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        let mask = cross_attention_mask(att.leads, att.patches, x.device())?;
        let logits = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?.broadcast_add(&mask)?;
        let probs = ops::softmax_last_dim(&logits, ForwardMode::Train)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        att.proj.forward(&out)
    }

    #[test]
    fn factorised_cross_attention_equals_the_dense_masked_one_with_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = TimeSeriesConfig {
            embed_dim: 8,
            num_heads: 2,
            leads: 3,
            patches_per_lead: 4,
            ..TimeSeriesConfig::default()
        };
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let att = EcgAttention::new(&cfg, vb)?;
        for v in vm.all_vars() {
            v.set(&Tensor::randn(0f32, 0.5, v.shape(), &dev)?)?;
        }
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 12, 8), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (2, 12, 8), &dev)?;
        let dense = dense_attention(&att, x.as_tensor())?;
        for mode in [ForwardMode::Train, ForwardMode::Inference] {
            let fact = att.forward(x.as_tensor(), mode)?;
            let diff = (&fact - &dense)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{mode:?}: outputs differ by {diff}");
        }
        let g1 = att
            .forward(x.as_tensor(), ForwardMode::Train)?
            .mul(&w)?
            .sum_all()?
            .backward()?;
        let g2 = dense.mul(&w)?.sum_all()?.backward()?;
        let mut vars = vm.all_vars();
        vars.push(x);
        assert_eq!(vars.len(), 4, "qkv weight, proj weight and bias, input");
        for v in &vars {
            let (a, b) = (g1.get(v).expect("gradient"), g2.get(v).expect("gradient"));
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                scale > 0.0 && d <= 1e-5 * scale.max(1.0),
                "gradient differs by {d}"
            );
        }
        Ok(())
    }

    #[test]
    fn cross_mask_allows_same_lead_or_same_patch_only() -> Result<()> {
        let m = cross_attention_mask(3, 4, &Device::Cpu)?.to_vec2::<f32>()?;
        // token (1, 2) = 6
        let row = &m[6];
        for (j, v) in row.iter().enumerate() {
            let ok = j / 4 == 1 || j % 4 == 2;
            assert_eq!(*v == 0.0, ok, "column {j}");
            assert_eq!(v.is_infinite(), !ok, "column {j}");
        }
        Ok(())
    }

    #[test]
    fn sincos_table_encodes_patch_then_lead() -> Result<()> {
        let t = sincos_pos_embed(8, 2, 3, &Device::Cpu)?.to_vec2::<f32>()?;
        // row for lead 1, patch 2: first half E(2), second half E(1); quarter = 2, w = [1, 0.01]
        let row = &t[3 + 2];
        let e = |x: f64| [x.sin(), (x * 0.01).sin(), x.cos(), (x * 0.01).cos()];
        let want: Vec<f64> = e(2.0).into_iter().chain(e(1.0)).collect();
        for (a, b) in row.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        Ok(())
    }
}
