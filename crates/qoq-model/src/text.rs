//! The Qwen2 decoder of Qwen2.5-VL with multimodal rotary embeddings (spec §5.5).
//!
//! Reference: transformers 4.51.3 `models/qwen2_5_vl/modeling_qwen2_5_vl.py`:
//! `Qwen2_5_VLRotaryEmbedding`, `apply_multimodal_rotary_pos_emb`, `Qwen2_5_VLAttention` (eager),
//! `Qwen2MLP`, `Qwen2RMSNorm`, `Qwen2_5_VLDecoderLayer`, `Qwen2_5_VLModel` and its
//! `_update_causal_mask`. Field and `vb.pp` names equal the checkpoint keys under `model.`.

use crate::lora::{LoraBuilder, Proj};
use crate::ops::{self, ForwardMode};
use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use qoq_core::hf_config::TextConfig;

/// M-RoPE frequencies: `inv_freq[k] = theta^(-2k/head_dim)` and the `mrope_section` split of the
/// frequency channels over the temporal, height and width position axes.
#[derive(Debug, Clone)]
pub struct MropeRotary {
    inv_freq: Tensor, // (head_dim/2,) f32
    section: Vec<usize>,
}

/// Per-forward cosine and sine tables.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos_half: Tensor, // (b, s, head_dim/2), model dtype, contiguous
    sin_half: Tensor,
    cos_full: Tensor, // (b, 1, s, head_dim), model dtype
    sin_full: Tensor,
}

impl MropeRotary {
    /// Frequencies for `cfg.head_dim()` and `cfg.rope_theta`.
    pub fn new(cfg: &TextConfig, dev: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| (1.0 / cfg.rope_theta.powf(i as f64 / dim as f64)) as f32)
            .collect();
        let section = cfg.rope_scaling.mrope_section.clone();
        if section.len() != 3 || section.iter().sum::<usize>() != dim / 2 {
            candle_core::bail!(
                "mrope_section {section:?} must have 3 entries summing to {}",
                dim / 2
            );
        }
        Ok(Self {
            inv_freq: Tensor::new(inv, dev)?,
            section,
        })
    }

    /// `position_ids: (3, b, s)` (any integer or float dtype) → tables in `dtype`.
    ///
    /// Channel `j < head_dim/2` takes its angle from axis 0 (t) for `j < section[0]`, axis 1 (h)
    /// for the next `section[1]` channels and axis 2 (w) for the rest; the second half repeats the
    /// first (`rotate_half` convention).
    pub fn tables(&self, position_ids: &Tensor, dtype: DType) -> Result<RopeTables> {
        let (three, _b, _s) = position_ids.dims3()?;
        if three != 3 {
            candle_core::bail!(
                "position_ids must be (3, b, s), got {:?}",
                position_ids.shape()
            );
        }
        let half = self.inv_freq.dim(0)?;
        let pos = position_ids.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (3, b, s, 1)
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, 1, half))?)?; // (3, b, s, half)
        let mut parts = Vec::with_capacity(3);
        let mut off = 0;
        for (axis, &n) in self.section.iter().enumerate() {
            parts.push(freqs.get(axis)?.narrow(D::Minus1, off, n)?);
            off += n;
        }
        let f = Tensor::cat(&parts, D::Minus1)?; // (b, s, half)
        let cos_half = f.cos()?.to_dtype(dtype)?.contiguous()?;
        let sin_half = f.sin()?.to_dtype(dtype)?.contiguous()?;
        let cos_full = Tensor::cat(&[&cos_half, &cos_half], D::Minus1)?.unsqueeze(1)?;
        let sin_full = Tensor::cat(&[&sin_half, &sin_half], D::Minus1)?.unsqueeze(1)?;
        Ok(RopeTables {
            cos_half,
            sin_half,
            cos_full,
            sin_full,
        })
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `x: (b, heads, s, head_dim)` rotated by the tables: `x·cos + rotate_half(x)·sin`.
pub fn apply_rope(x: &Tensor, t: &RopeTables, mode: ForwardMode) -> Result<Tensor> {
    match mode {
        ForwardMode::Inference => {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &t.cos_half, &t.sin_half)
        }
        ForwardMode::Train if crate::fused::available(x) => crate::fused::rope(
            x,
            &t.cos_half,
            &t.sin_half,
            crate::fused::RopeLayout::Bhtd,
            crate::ops::compute_dtype(x.dtype()),
        )?
        .to_dtype(x.dtype()),
        ForwardMode::Train => {
            x.broadcast_mul(&t.cos_full)? + rotate_half(x)?.broadcast_mul(&t.sin_full)?
        }
    }
}

/// Keys and values of every decoder layer for a batch of sequences, with the key padding mask,
/// so that generation runs the prompt once (prefill) and then one token at a time (decode).
/// Keys are stored after rotary embedding and before the grouped-query repeat, in buffers of
/// `(b, kv_heads, capacity, head_dim)` per layer ([`LayerKv`]) that new positions are written
/// into in place: a decode step copies only its own keys, not the whole cache. The capacity
/// grows geometrically when a step would overflow it (a copy of the filled part, amortised over
/// many steps). Not `Clone`: two owners of one buffer would write over each other's positions;
/// [`KvCache::select`] makes an independent copy.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// `(b, t)` u8, 1 = a real key, 0 = left padding.
    key_mask: Option<Tensor>,
}

/// One decoder layer's keys and values: `k`, `v` of `(b, kv_heads, capacity, head_dim)`, the
/// first `len` positions filled.
#[derive(Debug)]
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Capacity for `need` positions: half as much again, in whole blocks of 64, so that a
/// sequence growing one token at a time reallocates O(log n) times. A cache that never holds
/// more than `n` positions never holds buffers larger than `kv_capacity(n)` (memory budgets
/// count this).
pub fn kv_capacity(need: usize) -> usize {
    (need + need / 2).max(1).next_multiple_of(64)
}

impl LayerKv {
    /// A buffer of `capacity` positions holding `k`, `v` (`(b, kv_heads, t, head_dim)`, any
    /// layout) at positions `0..t`.
    fn with_capacity(k: &Tensor, v: &Tensor, capacity: usize) -> Result<LayerKv> {
        let (b, h, t, d) = k.dims4()?;
        let buf = |x: &Tensor| -> Result<Tensor> {
            let out = Tensor::zeros((b, h, capacity, d), x.dtype(), x.device())?;
            out.slice_set(&x.contiguous()?, 2, 0)?;
            Ok(out)
        };
        Ok(LayerKv {
            k: buf(k)?,
            v: buf(v)?,
            len: t,
        })
    }

    /// Append `k`, `v` (`(b, kv_heads, s, head_dim)`) after the filled positions (in place while
    /// the capacity lasts) and return views of all filled keys and values,
    /// `(b, kv_heads, len, head_dim)`.
    fn append(slot: &mut Option<LayerKv>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = k.dim(2)?;
        let l = match slot.take() {
            None => LayerKv::with_capacity(k, v, kv_capacity(s))?,
            Some(l) => {
                let l = if l.len + s > l.k.dim(2)? {
                    let (fk, fv) = l.filled()?;
                    LayerKv::with_capacity(&fk, &fv, kv_capacity(l.len + s))?
                } else {
                    l
                };
                l.k.slice_set(&k.contiguous()?, 2, l.len)?;
                l.v.slice_set(&v.contiguous()?, 2, l.len)?;
                LayerKv {
                    len: l.len + s,
                    ..l
                }
            }
        };
        let out = l.filled()?;
        *slot = Some(l);
        Ok(out)
    }

    /// The filled keys and values, `(b, kv_heads, len, head_dim)` views.
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cached positions per sequence (0 when empty).
    pub fn len(&self) -> usize {
        self.key_mask
            .as_ref()
            .and_then(|m| m.dim(1).ok())
            .unwrap_or(0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequences in the cache (0 when empty).
    pub fn batch_size(&self) -> usize {
        self.key_mask
            .as_ref()
            .and_then(|m| m.dim(0).ok())
            .unwrap_or(0)
    }

    /// Positions the buffers hold without growing (0 when empty).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| l.k.dim(2).unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    /// An independent copy of the given rows (e.g. to free finished sequences, or `[0; n]` to
    /// share one prompt's prefill among its `n` rollouts); with `trim`, without the leading
    /// positions that are padding in every one of them.
    fn gather(&self, rows: &[u32], trim: bool) -> Result<KvCache> {
        let Some(mask) = &self.key_mask else {
            return Ok(KvCache::new());
        };
        if rows.is_empty() {
            return Ok(KvCache::new());
        }
        let idx = Tensor::new(rows, mask.device())?;
        let mask = mask.index_select(&idx, 0)?;
        let t = mask.dim(1)?;
        let start = if trim {
            let any = mask.to_dtype(DType::U8)?.max(0)?.to_vec1::<u8>()?;
            // All padding (not a live row): nothing to trim.
            any.iter().position(|&m| m != 0).unwrap_or(0)
        } else {
            0
        };
        let keep = t - start;
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some(l) => {
                    // Whole rows of the (contiguous) buffers; shifted into new ones if trimmed.
                    let (k, v) = (l.k.index_select(&idx, 0)?, l.v.index_select(&idx, 0)?);
                    Ok(Some(if start == 0 {
                        LayerKv { k, v, len: l.len }
                    } else {
                        LayerKv::with_capacity(
                            &k.narrow(2, start, keep)?,
                            &v.narrow(2, start, keep)?,
                            kv_capacity(keep),
                        )?
                    }))
                }
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let key_mask = if start == 0 {
            mask
        } else {
            mask.narrow(1, start, keep)?.contiguous()?
        };
        Ok(KvCache {
            layers,
            key_mask: Some(key_mask),
        })
    }

    /// The cache of the given rows only, as an independent copy (e.g. to free finished
    /// sequences, or `[0; n]` to share one prompt's prefill among its `n` rollouts).
    pub fn select(&self, rows: &[u32]) -> Result<KvCache> {
        self.gather(rows, false)
    }

    /// The cache of the given rows, without the leading positions that are padding in every
    /// one of them (left after the longest rows left the batch), so that the cache is as long
    /// as its longest kept row: [`KvCache::select`] and the trim in one copy.
    pub fn select_trimmed(&self, rows: &[u32]) -> Result<KvCache> {
        self.gather(rows, true)
    }

    /// Bytes held by the keys and values (their buffers' capacity).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }
}

impl KvCache {
    /// Join caches of different sequences into one batch (rows of `parts[0]` first). Shorter
    /// caches are left-padded with masked zero keys, so every row keeps its own positions.
    pub fn concat(parts: &[&KvCache]) -> Result<KvCache> {
        let parts: Vec<&KvCache> = parts.iter().copied().filter(|c| !c.is_empty()).collect();
        let Some(first) = parts.first() else {
            return Ok(KvCache::new());
        };
        let t = parts.iter().map(|c| c.len()).max().unwrap_or(0);
        let n_layers = first.layers.len();
        if parts.iter().any(|c| c.layers.len() != n_layers) {
            candle_core::bail!("kv caches of different depths cannot be joined");
        }
        let cap = kv_capacity(t);
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let Some(l0) = &first.layers[l] else {
                candle_core::bail!("kv cache layer {l} is empty");
            };
            let (_, h, _, d) = l0.k.dims4()?;
            // Each part's rows in a buffer of the joint capacity, right-aligned at position t
            // (their left padding stays zero), then the parts stacked.
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for c in &parts {
                let Some(lc) = &c.layers[l] else {
                    candle_core::bail!("kv cache layer {l} is empty");
                };
                let (pk, pv) = lc.filled()?;
                let n = c.batch_size();
                let place = |x: Tensor| -> Result<Tensor> {
                    let buf = Tensor::zeros((n, h, cap, d), x.dtype(), x.device())?;
                    buf.slice_set(&x.contiguous()?, 2, t - lc.len)?;
                    Ok(buf)
                };
                ks.push(place(pk)?);
                vs.push(place(pv)?);
            }
            let (k, v) = (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?);
            layers.push(Some(LayerKv { k, v, len: t }));
        }
        let pad = |x: &Tensor| -> Result<Tensor> {
            let have = x.dim(1)?;
            if have == t {
                return Ok(x.clone());
            }
            let z = Tensor::zeros((x.dim(0)?, t - have), x.dtype(), x.device())?;
            Tensor::cat(&[&z, x], 1)
        };
        let masks = parts
            .iter()
            .map(|c| pad(c.key_mask.as_ref().expect("non-empty cache has a mask")))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            key_mask: Some(Tensor::cat(&masks, 0)?),
        })
    }
}

/// Which keys the queries of one forward see: the last `s` of `t` positions, causally, and not
/// the padding keys of `key_keep: (b, t)` u8 (1 = real), nor, in packed rows, the keys of
/// other responses ([`KeyMask::with_segments`]). The eager attention's dense `(b, 1, s, t)` form
/// ([`crate::attention::AttentionMask::dense`]) is built on first use and shared by the layers;
/// the chunked attention ([`crate::attention`]) takes the rules themselves.
#[derive(Debug, Clone)]
pub struct KeyMask {
    key_keep: Tensor,
    s: usize,
    segments: Option<Tensor>,
    dense: std::sync::Arc<std::sync::Mutex<Option<Tensor>>>,
}

impl KeyMask {
    /// The mask of `s` new queries over the keys of `key_keep: (b, t)` (the last `s` of which are
    /// the queries' own).
    pub fn new(key_keep: Tensor, s: usize) -> KeyMask {
        KeyMask {
            key_keep,
            s,
            segments: None,
            dense: Default::default(),
        }
    }

    /// The mask with the segments `(b, t)` u32 of packed rows
    /// ([`crate::ModelInputs::segments`]).
    pub fn with_segments(mut self, segments: Option<Tensor>) -> KeyMask {
        self.segments = segments;
        self.dense = Default::default();
        self
    }

    /// `(b, 1, s, t)` u8, 1 where query `i` may see key `j`.
    pub fn dense(&self) -> Result<Tensor> {
        let mut d = self
            .dense
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention mask: poisoned lock".into()))?;
        if let Some(m) = d.as_ref() {
            return Ok(m.clone());
        }
        let (b, t) = self.key_keep.dims2()?;
        let m = self.chunked().dense(b, self.s, t, self.key_keep.device())?;
        *d = Some(m.clone());
        Ok(m)
    }

    /// The same mask for [`crate::attention::chunked_attention`].
    pub fn chunked(&self) -> crate::attention::AttentionMask {
        crate::attention::AttentionMask {
            causal: true,
            key_keep: Some(self.key_keep.clone()),
            segments: self.segments.clone(),
        }
    }
}

/// `Qwen2RMSNorm`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `weight: (dim,)` at `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
    }

    /// `(..., dim)` → `(..., dim)`.
    pub fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps, mode)
    }
}

/// Grouped-query self-attention with q/k/v biases and M-RoPE.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Projections at `vb` (`self_attn`).
    pub fn new(cfg: &TextConfig, vb: VarBuilder, lora: Option<&LoraBuilder>) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: Proj::new(h, nh * hd, true, "q_proj", vb.clone(), lora)?,
            k_proj: Proj::new(h, nkv * hd, true, "k_proj", vb.clone(), lora)?,
            v_proj: Proj::new(h, nkv * hd, true, "v_proj", vb.clone(), lora)?,
            o_proj: Proj::new(nh * hd, h, false, "o_proj", vb, lora)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x: (b, s, hidden)`, `mask` over the `s` positions → `(b, s, hidden)`.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &KeyMask,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        // No past keys: the cached path with a cache that is dropped afterwards.
        self.forward_cached(x, rope, mask, None, mode)
    }

    /// As [`Attention::forward`] for `s` new tokens after the keys in `cache` (which receives the
    /// new keys and values): `x: (b, s, hidden)`, `rope` for the new positions, `mask` of the
    /// `s` queries over `past + s` keys → `(b, s, hidden)`.
    ///
    /// A training forward (Train mode, no cache) of at least
    /// [`crate::attention::CHUNKED_MIN_MACS`] score multiply-adds per sequence on the CPU (bf16
    /// and f16 computed in f32) uses the chunked attention, which never holds the
    /// `(b, heads, s, t)` scores; otherwise the eager path
    /// ([`crate::attention::eager_attention`]: one graph node on the CPU).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &KeyMask,
        cache: Option<&mut Option<LayerKv>>,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, s, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?, self.num_heads)?; // (b, nh, s, hd)
        let k = split(self.k_proj.forward(x)?, self.num_kv_heads)?; // (b, nkv, s, hd)
        let v = split(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let q = apply_rope(&q, rope, mode)?;
        let k = apply_rope(&k, rope, mode)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let training = mode == ForwardMode::Train && cache.is_none();
        let (k, v) = match cache {
            Some(slot) => LayerKv::append(slot, &k, &v)?,
            None => (k, v),
        }; // (b, nkv, past + s, hd)
        if training && crate::attention::use_chunked(&q, k.dim(2)?) {
            let out = crate::attention::chunked_attention(&q, &k, &v, scale, &mask.chunked())?
                .transpose(1, 2)?
                .reshape((b, s, self.num_heads * self.head_dim))?;
            return self.o_proj.forward(&out);
        }
        // Grouped-query attention without repeating the keys: head `kv * n_rep + r` reads
        // key-value head `kv` (repeat_interleave), so the queries of one group are stacked as
        // `n_rep * s` rows against their shared keys.
        let n_rep = self.num_heads / self.num_kv_heads;
        let q = q
            .contiguous()?
            .reshape((b, self.num_kv_heads, n_rep * s, self.head_dim))?;
        // Row `r` of a key-value head is query `r mod s`; the output is (b, nkv, n_rep * s, hd)
        // = (b, nh, s, hd).
        let dense = mask.dense()?;
        let out = crate::attention::eager_attention(&q, &k, &v, scale, Some(&dense), mode)?;
        let out = out
            .reshape((b, self.num_heads, s, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }

    fn projs(&self) -> [&Proj; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    /// Projections at `vb` (`mlp`).
    pub fn new(cfg: &TextConfig, vb: VarBuilder, lora: Option<&LoraBuilder>) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Proj::new(h, i, false, "gate_proj", vb.clone(), lora)?,
            up_proj: Proj::new(h, i, false, "up_proj", vb.clone(), lora)?,
            down_proj: Proj::new(i, h, false, "down_proj", vb, lora)?,
        })
    }

    /// `(b, s, hidden)` → `(b, s, hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = crate::fused::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

/// Pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// Layer at `vb` (`layers.{i}`).
    pub fn new(cfg: &TextConfig, vb: VarBuilder, lora: Option<&LoraBuilder>) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"), lora)?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), lora)?,
            input_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    /// `(b, s, hidden)` → `(b, s, hidden)`.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &KeyMask,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        self.forward_cached(x, rope, mask, None, mode)
    }
}

impl DecoderLayer {
    /// As [`DecoderLayer::forward`] with this layer's entry of a [`KvCache`].
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &KeyMask,
        cache: Option<&mut Option<LayerKv>>,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x, mode)?;
        let x = (x + self.self_attn.forward_cached(&h, rope, mask, cache, mode)?)?;
        let h = self.post_attention_layernorm.forward(&x, mode)?;
        x + self.mlp.forward(&h)?
    }
}

/// `Qwen2_5_VLModel`: token embeddings, decoder layers and the final norm (checkpoint prefix
/// `model.`).
#[derive(Debug, Clone)]
pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rotary: MropeRotary,
}

impl TextModel {
    /// Build at `vb` (`model`), with LoRA adapters when `lora` is given.
    pub fn new(cfg: &TextConfig, vb: VarBuilder, lora: Option<&LoraBuilder>) -> Result<Self> {
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i), lora))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            rotary: MropeRotary::new(cfg, vb.device())?,
        })
    }

    /// The embedding matrix `(vocab, hidden)` (for tied `lm_head`).
    pub fn embed_weight(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }

    /// `input_ids: (b, s)` u32 → `(b, s, hidden)`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        crate::embedding::embedding(self.embed_tokens.embeddings(), input_ids)
    }

    /// `inputs_embeds: (b, s, hidden)`, `position_ids: (3, b, s)`, `attention_mask: (b, s)`,
    /// `segments: (b, s)` of packed rows ([`crate::ModelInputs::segments`]) → last hidden states
    /// after the final norm, `(b, s, hidden)`.
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        position_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        segments: Option<&Tensor>,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let (b, s, _) = inputs_embeds.dims3()?;
        let rope = self.rotary.tables(position_ids, inputs_embeds.dtype())?;
        let key_keep = match attention_mask {
            Some(m) => m.ne(0.0)?.to_dtype(DType::U8)?,
            None => Tensor::ones((b, s), DType::U8, inputs_embeds.device())?,
        };
        let mask = KeyMask::new(key_keep, s).with_segments(segments.cloned());
        let mut x = inputs_embeds.clone();
        for layer in &self.layers {
            x = if mode == ForwardMode::Train {
                // Recomputed in the backward under activation checkpointing.
                let (layer, rope, mask) = (layer.clone(), rope.clone(), mask.clone());
                crate::checkpoint::checkpointed(
                    &x,
                    std::sync::Arc::new(move |x: &Tensor| layer.forward(x, &rope, &mask, mode)),
                )?
            } else {
                layer.forward(&x, &rope, &mask, mode)?
            };
        }
        self.norm.forward(&x, mode)
    }

    /// As [`TextModel::forward_embeds`] for `s` new positions after those in `cache`, which is
    /// extended: `inputs_embeds: (b, s, hidden)`, `position_ids: (3, b, s)` of the new positions,
    /// `attention_mask: (b, s)` of the new positions (1 = real, 0 = left padding) → `(b, s,
    /// hidden)`. The cache must be empty or hold the same `b` sequences.
    pub fn forward_embeds_cached(
        &self,
        inputs_embeds: &Tensor,
        position_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let (b, s, _) = inputs_embeds.dims3()?;
        if !cache.is_empty() && cache.batch_size() != b {
            candle_core::bail!(
                "kv cache holds {} sequences, the step has {b}",
                cache.batch_size()
            );
        }
        let dev = inputs_embeds.device();
        let new_mask = match attention_mask {
            Some(m) => m.to_dtype(DType::U8)?,
            None => Tensor::ones((b, s), DType::U8, dev)?,
        };
        let key_mask = match cache.key_mask.take() {
            Some(old) => Tensor::cat(&[&old, &new_mask], 1)?,
            None => new_mask,
        };
        let mask = KeyMask::new(key_mask.clone(), s);
        cache.key_mask = Some(key_mask);
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let rope = self.rotary.tables(position_ids, inputs_embeds.dtype())?;
        let mut x = inputs_embeds.clone();
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_cached(&x, &rope, &mask, Some(kv), mode)?;
        }
        self.norm.forward(&x, mode)
    }

    /// All projections that carry a LoRA adapter.
    pub fn adapted_projs(&self) -> Vec<&Proj> {
        self.layers
            .iter()
            .flat_map(|l| {
                let mut v: Vec<&Proj> = l.self_attn.projs().to_vec();
                v.extend([&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]);
                v
            })
            .filter(|p| p.has_adapter())
            .collect()
    }
}
