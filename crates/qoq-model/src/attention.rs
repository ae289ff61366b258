//! Chunked differentiable attention for the training forward: `softmax(q kᵀ · scale + mask) v`
//! without the `(b, heads, s, t)` score matrix, forward or backward.
//!
//! A candle custom op (CPU, f32 and f64) in the manner of FlashAttention-2 (Dao 2023), in
//! blocks of 64 rows whose products run through candle's matrix multiply: the forward,
//! per (batch row, head) and block of query rows (rayon over both), computes the block's scores
//! over the keys it may see (`BLOCK × t` values, not `s × t`), their softmax and `P · V`, and
//! saves each query row's log-sum-exp `lse = max + ln Σ exp(score − max)`. The backward
//! recomputes the probabilities `p_ij = exp(score_ij − lse_i)` from `q`, `k` and `lse`, with
//! `D_i = do_i · o_i` and `ds_ij = p_ij (do_i · v_j − D_i)`: per block of query rows
//! `dq_i = scale Σ_j ds_ij k_j`, and per (batch row, key-value head) and block of keys
//! `dk_j = scale Σ_i ds_ij q_i`, `dv_j = Σ_i p_ij do_i` over every query row of the group that
//! may see them. What the graph keeps is `q`, `k`, `v`, the output and `lse` (`(b, heads, s)`),
//! so memory grows with `s`, not `s · t`. The work is the eager path's two products forward and
//! six instead of four backward (the scores and `do · vᵀ` are recomputed once per pass).
//!
//! Grouped-query attention reads key-value head `h / n_rep` for query head `h` (transformers'
//! `repeat_kv`) without a per-head copy of the keys. The mask is causal (query `i` of `s` sees keys
//! `j <= t - s + i`: the queries are the last `s` positions) and/or a key padding mask `(b, t)`,
//! and in packed rows keeps each response to the prompt and itself ([`AttentionMask::segments`]),
//! as [`crate::text::KeyMask`] builds it; a query with no visible key attends
//! uniformly to all `t` keys and passes no gradient to `q`, `k` (the eager path's `finfo.min`
//! fill, [`crate::text`]). On another device or dtype callers use the eager path
//! ([`available`]).

use crate::matmul::{matmul, mm, mm_t};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Multiply-adds of the score product per sequence (`heads · queries · keys · head size`) from
/// which the training forward uses the chunked op.
///
/// The eager path ([`eager_attention`], one graph node) keeps the `heads · s · t` f32
/// probabilities per layer for the backward; the chunked op keeps none but recomputes the
/// scores and pays a fixed cost per block of rows and head. Forward + backward of one layer's
/// attention, 2 rows, causal (`cargo bench -p qoq-model --bench attention`, 2 threads, quiet
/// machine, two runs, 2026-12-07), chunked / eager speed: Qwen2.5-0.5B's shapes (14 heads over
/// 2, head 64) 0.64-0.87x at 64 tokens (3.7M multiply-adds), 0.82-0.83x at 128 (14.7M),
/// 0.57-0.58x at 351 (110M; the 0.5B train-step bench), 1.06-1.09x at 700 (439M); the tiny
/// model's (4 over 2, head 16) 0.24-0.35x at 64, 0.30-0.39x at 128, 0.52-0.53x at 351 (7.9M),
/// 1.06-1.18x at 700 (31M). But in the whole 0.5B train-step bench (351 tokens) a threshold of
/// 2^27 (the eager node for its decoder) gained nothing: update 26.1 / 26.2 s against 25.8 /
/// 24.7 s with this one, alternated, and 317 MiB more peak (the kept probabilities, 14 MB per
/// layer and row). So the threshold stays where the tiny model's shapes (367 tokens, 8.6M)
/// still take the eager node, whose train step it made 28 % faster; beyond these lengths the
/// eager path's memory grows quadratically (7.5 GiB per layer at 8k tokens). Tests compare
/// both paths with [`with_min_macs`].
pub const CHUNKED_MIN_MACS: usize = 12_000_000;

/// `softmax(q kᵀ · scale + mask) v` as one graph node, keeping the probabilities: the eager
/// path's work and memory without its five nodes (two products, `kᵀ`, the softmax), each of
/// whose gradients candle's backward would sum into fresh zeros, two of them as large as the
/// scores. `q: (b, hk, r · s, d)` (grouped-query attention's `r` query heads of a key-value head
/// stacked as rows, [`crate::ops::attention_probs`]), `k`, `v: (b, hk, t, d)`, `mask: (b or 1,
/// 1, s, t)` u8 → `(b, hk, r · s, d)`. The backward computes `dP = g vᵀ`, the scores' gradient
/// from the kept probabilities (scaled, 0 where masked), `dq = dS k`, `dk = dSᵀ q`, `dv = Pᵀ g`.
/// Off the CPU, or when nothing needs a gradient, the composed ops.
pub fn eager_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    mode: crate::ops::ForwardMode,
) -> Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if !tracked || !crate::fused::available(q) {
        let probs = crate::ops::attention_probs(&matmul(q, &k.t()?)?, scale, mask, mode)?;
        return matmul(&probs, v);
    }
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let work = crate::ops::compute_dtype(q.dtype());
    let p_work = crate::fused::scaled_masked_softmax(&matmul(&qd, &kd.t()?)?, scale, mask, work)?;
    let out = matmul(&p_work.to_dtype(q.dtype())?, &vd)?;
    let op = EagerAttention {
        p_work,
        mask: mask.cloned(),
        scale,
        out: crate::checkpoint::Handover::new(out, "eager attention"),
    };
    q.apply_op3(k, v, op)
}

/// The node of [`eager_attention`]: its forward hands over the output computed beforehand.
struct EagerAttention {
    /// The probabilities in the compute dtype (f32, f64 for f64).
    p_work: Tensor,
    mask: Option<Tensor>,
    scale: f64,
    out: crate::checkpoint::Handover,
}

impl CustomOp3 for EagerAttention {
    fn name(&self) -> &'static str {
        "qoq-eager-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match self.out.storage()? {
            (candle_core::Storage::Cpu(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("eager attention: output off the CPU"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dtype = q.dtype();
        let track = [q.track_op(), k.track_op(), v.track_op()];
        let (q, k, v, g) = (q.detach(), k.detach(), v.detach(), g.detach());
        let dp = matmul(&g, &v.t()?)?; // (b, hk, r·s, t)
        let ds = crate::fused::scaled_masked_softmax_bwd(
            &self.p_work,
            &dp,
            self.scale,
            self.mask.as_ref(),
        )?
        .to_dtype(dtype)?;
        // Only the inputs that need one get a gradient: candle's backward would keep one for
        // every `Some`, as large as the input, until the whole backward ends.
        let dq = if track[0] {
            Some(matmul(&ds, &k)?)
        } else {
            None
        };
        let dk = if track[1] {
            Some(matmul(&ds.t()?, &q)?)
        } else {
            None
        };
        let dv = if track[2] {
            Some(matmul(&self.p_work.to_dtype(dtype)?.t()?, &g)?)
        } else {
            None
        };
        Ok((dq, dk, dv))
    }
}

/// Calls of [`chunked_attention`] in this process so far (all threads).
static CALLS: AtomicU64 = AtomicU64::new(0);

/// How many times [`chunked_attention`] has run in this process: a caller can tell which path
/// its forward took.
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

thread_local! {
    /// A test's override of [`CHUNKED_MIN_MACS`] on this thread.
    static MIN_MACS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` with the chunked op used from `min_macs` multiply-adds per sequence on (0: always,
/// `usize::MAX`: never) for the forwards it makes on this thread (tests: the same model forward
/// both ways).
pub fn with_min_macs<R>(min_macs: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            MIN_MACS.with(|m| m.set(self.0));
        }
    }
    let _restore = Restore(MIN_MACS.with(|m| m.replace(Some(min_macs))));
    f()
}

/// Whether a training forward of `q: (b, heads, s, d)` over `t` keys uses the chunked op: on
/// the CPU from [`CHUNKED_MIN_MACS`] multiply-adds per sequence (`heads · s · t · d`).
pub fn use_chunked(q: &Tensor, t: usize) -> bool {
    let min = MIN_MACS.with(Cell::get).unwrap_or(CHUNKED_MIN_MACS);
    let [_, heads, s, d] = q.dims() else {
        return false;
    };
    available(q)
        && [*heads, *s, t, *d]
            .iter()
            .fold(1usize, |a, &x| a.saturating_mul(x))
            >= min
}

/// Whether the op can run on `q`'s device and dtype (CPU; f32 or f64, or bf16 / f16 computed
/// in f32).
pub fn available(q: &Tensor) -> bool {
    q.device().is_cpu()
        && matches!(
            q.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        )
}

/// Which keys each query sees.
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    /// Query `i` of `s` sees keys `j <= t - s + i` only.
    pub causal: bool,
    /// `(b, t)`, 1 = a real key, 0 = padding; `None`: every key is real.
    pub key_keep: Option<Tensor>,
    /// `(b, t)` u32 segments of packed rows ([`crate::ModelInputs::segments`]): the query at
    /// position `p` sees key `j` only where `segments[j]` is 0 or `segments[p]`; `None`: no
    /// such rule.
    pub segments: Option<Tensor>,
}

impl AttentionMask {
    /// The rules of `s` queries over `t` keys in `b` rows, on the host.
    fn resolve(&self, b: usize, s: usize, t: usize) -> Result<Visible> {
        if self.causal && t < s {
            candle_core::bail!("attention mask: causal with {s} queries over {t} keys");
        }
        let host = |m: &Tensor, what: &str| -> Result<Vec<u32>> {
            if m.dims2()? != (b, t) {
                candle_core::bail!(
                    "attention mask: {what} {:?}, expected ({b}, {t})",
                    m.shape()
                );
            }
            m.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()
        };
        let key_keep = match &self.key_keep {
            Some(m) => Some(host(m, "key mask")?.into_iter().map(|x| x != 0).collect()),
            None => None,
        };
        let segments = match &self.segments {
            Some(m) => Some(host(m, "segments")?),
            None => None,
        };
        Ok(Visible {
            s,
            t,
            causal: self.causal,
            key_keep,
            segments,
        })
    }

    /// `(b, 1, s, t)` u8, 1 where query `i` (position `t - s + i`) sees key `j`: the form of
    /// [`eager_attention`]'s mask.
    pub fn dense(&self, b: usize, s: usize, t: usize, dev: &candle_core::Device) -> Result<Tensor> {
        let vis = self.resolve(b, s, t)?;
        let mut allowed = vec![0u8; b * s * t];
        for (r, row) in allowed.chunks_mut(t).enumerate() {
            let (bi, i) = (r / s, r % s);
            for (j, a) in row.iter_mut().enumerate().take(vis.last_key(i) + 1) {
                *a = u8::from(vis.sees(bi, i, j));
            }
        }
        Tensor::from_vec(allowed, (b, 1, s, t), dev)
    }
}

/// [`AttentionMask`] resolved for one call: which keys each query sees.
#[derive(Debug, Clone)]
struct Visible {
    s: usize,
    t: usize,
    causal: bool,
    /// `b · t`, true = a real key.
    key_keep: Option<Vec<bool>>,
    /// `b · t` segments.
    segments: Option<Vec<u32>>,
}

impl Visible {
    /// Last key query row `i` may see (inclusive) under the causal rule.
    fn last_key(&self, i: usize) -> usize {
        if self.causal {
            self.t - self.s + i
        } else {
            self.t - 1
        }
    }

    /// Whether query `i` of batch row `bi` sees key `j`.
    fn sees(&self, bi: usize, i: usize, j: usize) -> bool {
        let row = bi * self.t;
        j <= self.last_key(i)
            && self.key_keep.as_ref().is_none_or(|k| k[row + j])
            && self.segments.as_ref().is_none_or(|g| {
                let key = g[row + j];
                key == 0 || key == g[row + self.t - self.s + i]
            })
    }
}

/// Attention of `q: (b, heads, s, d)` over `k`, `v: (b, kv_heads, t, d)` (`heads` a multiple of
/// `kv_heads`), scores scaled by `scale`, under `mask` → `(b, heads, s, d)`. Differentiable in
/// `q`, `k` and `v`; CPU ([`available`]). Half-precision inputs are widened to f32 (tracked
/// casts: their gradients come back in their dtype) and the output narrowed back: a bf16
/// training forward keeps f32 copies of `q`, `k`, `v` instead of the eager path's f32 scores,
/// mask fill and probabilities, `(b, heads, s, t)` each.
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &AttentionMask,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (bk, hk, t, dk) = k.dims4()?;
    if bk != b || dk != d || hk == 0 || !h.is_multiple_of(hk) || v.dims4()? != (b, hk, t, d) {
        candle_core::bail!(
            "chunked attention: q {:?}, k {:?}, v {:?} do not fit (b, heads, s, d) over \
             (b, kv_heads, t, d) with heads a multiple of kv_heads",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    if matches!(q.dtype(), DType::BF16 | DType::F16) {
        let wide = |x: &Tensor| x.to_dtype(DType::F32);
        return chunked_attention(&wide(q)?, &wide(k)?, &wide(v)?, scale, mask)?
            .to_dtype(q.dtype());
    }
    let vis = mask.resolve(b, s, t)?;
    let op = Chunked {
        geo: Geometry {
            b,
            h,
            hk,
            s,
            t,
            d,
            scale,
            vis,
        },
        lse: Default::default(),
    };
    CALLS.fetch_add(1, Ordering::Relaxed);
    let dtype = q.dtype();
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (k, v) = (k.to_dtype(dtype)?, v.to_dtype(dtype)?);
    q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))
}

/// Shapes and mask of one call.
#[derive(Debug, Clone)]
struct Geometry {
    b: usize,
    h: usize,
    hk: usize,
    s: usize,
    t: usize,
    d: usize,
    scale: f64,
    vis: Visible,
}

impl Geometry {
    /// Last key query row `i` may see (inclusive) under the causal rule.
    fn last_key(&self, i: usize) -> usize {
        self.vis.last_key(i)
    }

    /// Flat index of key row `j` of the key-value head read by query head `hi` of batch row `bi`.
    fn key_row(&self, bi: usize, hi: usize, j: usize) -> usize {
        (bi * self.hk + hi / (self.h / self.hk)) * self.t + j
    }
}

/// The float types the op runs in.
trait Float: candle_core::WithDType + crate::matmul::Gemm {
    fn to64(self) -> f64;
    fn of64(v: f64) -> Self;
    /// `x ← exp(x)` for every element, `x <= 0`, 0 far below the type's normal range (f32:
    /// [`crate::expf::exp_or_zero_in_place`]; f64: [`crate::expf::exp_or_zero64`]).
    fn exp_neg_in_place(xs: &mut [Self]);
}

impl Float for f32 {
    fn to64(self) -> f64 {
        f64::from(self)
    }
    fn of64(v: f64) -> Self {
        v as f32
    }
    fn exp_neg_in_place(xs: &mut [f32]) {
        crate::expf::exp_or_zero_in_place(xs);
    }
}

impl Float for f64 {
    fn to64(self) -> f64 {
        self
    }
    fn of64(v: f64) -> Self {
        v
    }
    fn exp_neg_in_place(xs: &mut [f64]) {
        xs.iter_mut()
            .for_each(|x| *x = crate::expf::exp_or_zero64(*x));
    }
}

/// Query rows per block of the forward and of `dq`; key rows per block of `dk`, `dv`.
const BLOCK: usize = 64;

/// A score `q·k` as the eager path rounds it: scaled in the data's precision.
fn scaled<T: Float>(dot: T, scale: f64) -> f64 {
    T::of64(dot.to64() * scale).to64()
}

/// Forward: the output `(b, h, s, d)` and each query row's log-sum-exp (NaN for a row that sees
/// no key and attends uniformly). Per (batch row, head), blocks of [`BLOCK`] query rows: their
/// scores over the keys the block may see (`BLOCK × t` values), the softmax, `P · V`.
fn forward<T: Float>(g: &Geometry, q: &[T], k: &[T], v: &[T]) -> Result<(Vec<T>, Vec<f64>)> {
    let (s, t, d) = (g.s, g.t, g.d);
    let mut out = vec![T::zero(); q.len()];
    let mut lse = vec![0f64; g.b * g.h * s];
    out.par_chunks_mut(s * d)
        .zip(lse.par_chunks_mut(s))
        .enumerate()
        .try_for_each(|(bh, (out, lse))| -> Result<()> {
            let (bi, hi) = (bh / g.h, bh % g.h);
            let base = g.key_row(bi, hi, 0);
            let (kh, vh) = (&k[base * d..(base + t) * d], &v[base * d..(base + t) * d]);
            out.par_chunks_mut(BLOCK * d)
                .zip(lse.par_chunks_mut(BLOCK))
                .enumerate()
                .try_for_each(|(blk, (o, l))| -> Result<()> {
                    let (i0, n) = (blk * BLOCK, l.len());
                    let tk = g.last_key(i0 + n - 1) + 1;
                    let r0 = bh * s + i0;
                    let scores = mm_t(&q[r0 * d..(r0 + n) * d], n, &kh[..tk * d], tk, d)?;
                    let mut p = vec![T::zero(); n * tk];
                    for (ii, (row, prow)) in scores.chunks(tk).zip(p.chunks_mut(tk)).enumerate() {
                        let (i, last) = (i0 + ii, g.last_key(i0 + ii));
                        let mut max = f64::NEG_INFINITY;
                        for (j, &sc) in row.iter().enumerate().take(last + 1) {
                            if g.vis.sees(bi, i, j) {
                                max = max.max(scaled(sc, g.scale));
                            }
                        }
                        if max == f64::NEG_INFINITY {
                            l[ii] = f64::NAN; // no visible key: uniform, below
                            continue;
                        }
                        // The visible keys' terms (masked ones at -inf: 0), then their sum in
                        // order.
                        let seen = &mut prow[..=last];
                        for (j, (&sc, pv)) in row.iter().zip(seen.iter_mut()).enumerate() {
                            *pv = T::of64(if g.vis.sees(bi, i, j) {
                                scaled(sc, g.scale) - max
                            } else {
                                f64::NEG_INFINITY
                            });
                        }
                        T::exp_neg_in_place(seen);
                        let sum = seen.iter().fold(0f64, |a, &e| a + e.to64());
                        for pv in prow.iter_mut() {
                            *pv = T::of64(pv.to64() / sum);
                        }
                        l[ii] = max + sum.ln();
                    }
                    o.copy_from_slice(&mm(&p, n, &vh[..tk * d], tk, d)?);
                    for (orow, &li) in o.chunks_mut(d).zip(l.iter()) {
                        if li.is_nan() {
                            // The eager path's finfo.min fill: 1/t to every one of the t keys.
                            let mut acc = vec![0f64; d];
                            for vr in vh.chunks(d) {
                                for (a, &x) in acc.iter_mut().zip(vr) {
                                    *a += x.to64();
                                }
                            }
                            for (ov, a) in orow.iter_mut().zip(&acc) {
                                *ov = T::of64(a / t as f64);
                            }
                        }
                    }
                    Ok(())
                })
        })?;
    Ok((out, lse))
}

/// Backward: `(dq, dk, dv)` from the inputs, the output, its gradient and the saved `lse`. `dq`
/// per (batch row, head) and block of query rows; `dk`, `dv` per (batch row, key-value head)
/// and block of [`BLOCK`] keys against every query row of the group's heads that may see them.
fn backward<T: Float>(
    g: &Geometry,
    (q, k, v): (&[T], &[T], &[T]),
    o: &[T],
    go: &[T],
    lse: &[f64],
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let (s, t, d) = (g.s, g.t, g.d);
    // D_i = do_i · o_i.
    let delta: Vec<f64> = go
        .par_chunks(d)
        .zip(o.par_chunks(d))
        .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| x.to64() * y.to64()).sum())
        .collect();
    // Whether query row r (of batch row bi) sees key j: 0 for `p` and `ds` where it does not,
    // and for every key of a uniform row.
    let sees = |r: usize, bi: usize, j: usize| !lse[r].is_nan() && g.vis.sees(bi, r % s, j);
    // The exponent of `p = exp(·)` from row r's score `sc` against key j (-inf: p = 0). The
    // probabilities of a block are its exponents through [`Float::exp_neg_in_place`].
    let exponent = |r: usize, bi: usize, j: usize, sc: T| {
        T::of64(if sees(r, bi, j) {
            scaled(sc, g.scale) - lse[r]
        } else {
            f64::NEG_INFINITY
        })
    };
    // `scale · p (dp − D)` of query row r against key j, 0 where it does not see it.
    let ds = |r: usize, bi: usize, j: usize, p: T, dp: T| {
        T::of64(if sees(r, bi, j) {
            p.to64() * (dp.to64() - delta[r]) * g.scale
        } else {
            0.0
        })
    };
    let mut dq = vec![T::zero(); q.len()];
    dq.par_chunks_mut(s * d)
        .enumerate()
        .try_for_each(|(bh, dq)| -> Result<()> {
            let (bi, hi) = (bh / g.h, bh % g.h);
            let base = g.key_row(bi, hi, 0);
            let (kh, vh) = (&k[base * d..(base + t) * d], &v[base * d..(base + t) * d]);
            dq.par_chunks_mut(BLOCK * d)
                .enumerate()
                .try_for_each(|(blk, dqb)| -> Result<()> {
                    let (i0, n) = (blk * BLOCK, dqb.len() / d);
                    let tk = g.last_key(i0 + n - 1) + 1;
                    let r0 = bh * s + i0;
                    let scores = mm_t(&q[r0 * d..(r0 + n) * d], n, &kh[..tk * d], tk, d)?;
                    let dp = mm_t(&go[r0 * d..(r0 + n) * d], n, &vh[..tk * d], tk, d)?;
                    let mut dsb: Vec<T> = (0..n * tk)
                        .map(|e| exponent(r0 + e / tk, bi, e % tk, scores[e]))
                        .collect();
                    T::exp_neg_in_place(&mut dsb);
                    for (e, x) in dsb.iter_mut().enumerate() {
                        *x = ds(r0 + e / tk, bi, e % tk, *x, dp[e]);
                    }
                    dqb.copy_from_slice(&mm(&dsb, n, &kh[..tk * d], tk, d)?);
                    Ok(())
                })
        })?;
    let n_rep = g.h / g.hk;
    let mut dk = vec![T::zero(); k.len()];
    let mut dv = vec![T::zero(); v.len()];
    dk.par_chunks_mut(t * d)
        .zip(dv.par_chunks_mut(t * d))
        .enumerate()
        .try_for_each(|(bg, (dk, dv))| -> Result<()> {
            let (bi, gi) = (bg / g.hk, bg % g.hk);
            let heads = gi * n_rep..(gi + 1) * n_rep;
            // Uniform rows give every key 1/t of their output gradient.
            let mut uniform = vec![0f64; d];
            for hi in heads.clone() {
                for i in 0..s {
                    let r = (bi * g.h + hi) * s + i;
                    if lse[r].is_nan() {
                        for (a, &x) in uniform.iter_mut().zip(&go[r * d..(r + 1) * d]) {
                            *a += x.to64() / t as f64;
                        }
                    }
                }
            }
            dk.par_chunks_mut(BLOCK * d)
                .zip(dv.par_chunks_mut(BLOCK * d))
                .enumerate()
                .try_for_each(|(blk, (dkb, dvb))| -> Result<()> {
                    let (j0, nb) = (blk * BLOCK, dkb.len() / d);
                    // Query rows before `first` see none of the block's keys (causal).
                    let first = if g.vis.causal {
                        j0.saturating_sub(t - s)
                    } else {
                        0
                    };
                    let rows: Vec<usize> = heads
                        .clone()
                        .flat_map(|hi| (first..s).map(move |i| (bi * g.h + hi) * s + i))
                        .collect();
                    let m = rows.len();
                    let (mut dkv, mut dvv) = (vec![T::zero(); nb * d], vec![T::zero(); nb * d]);
                    if m > 0 {
                        let gather = |x: &[T]| -> Vec<T> {
                            rows.iter()
                                .flat_map(|&r| x[r * d..(r + 1) * d].iter().copied())
                                .collect()
                        };
                        let (qg, gog) = (gather(q), gather(go));
                        let kr = (bg * t + j0) * d..(bg * t + j0 + nb) * d;
                        let st = mm_t(&k[kr.clone()], nb, &qg, m, d)?; // (nb, m)
                        let dpt = mm_t(&v[kr], nb, &gog, m, d)?;
                        let mut pt: Vec<T> = (0..nb * m)
                            .map(|e| exponent(rows[e % m], bi, j0 + e / m, st[e]))
                            .collect();
                        T::exp_neg_in_place(&mut pt);
                        let dst: Vec<T> = (0..nb * m)
                            .map(|e| ds(rows[e % m], bi, j0 + e / m, pt[e], dpt[e]))
                            .collect();
                        dvv = mm(&pt, nb, &gog, m, d)?;
                        dkv = mm(&dst, nb, &qg, m, d)?;
                    }
                    dkb.copy_from_slice(&dkv);
                    for (row, vrow) in dvb.chunks_mut(d).zip(dvv.chunks(d)) {
                        for ((x, &y), &u) in row.iter_mut().zip(vrow).zip(&uniform) {
                            *x = T::of64(y.to64() + u);
                        }
                    }
                    Ok(())
                })
        })?;
    Ok((dq, dk, dv))
}

/// The op: the geometry and, after the forward, the saved log-sum-exp `(b, heads, s)`.
struct Chunked {
    geo: Geometry,
    lse: Arc<Mutex<Option<Vec<f64>>>>,
}

/// The contiguous slice of a CPU tensor's storage.
fn slice<'a, T: candle_core::WithDType>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("chunked attention: non-contiguous input"),
    }
}

/// A float tensor's values as a `Vec<T>`.
fn values<T: Float>(x: &Tensor) -> Result<Vec<T>> {
    x.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()
}

impl Chunked {
    fn bwd_typed<T: Float>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        o: &Tensor,
        go: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("chunked attention: poisoned lock".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("chunked attention: no forward".into()))?;
        let (qv, kv, vv) = (values::<T>(q)?, values::<T>(k)?, values::<T>(v)?);
        let (ov, gv) = (values::<T>(o)?, values::<T>(go)?);
        let (dq, dk, dv) = backward(&self.geo, (&qv, &kv, &vv), &ov, &gv, &lse)?;
        let dev = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), dev)?,
            Tensor::from_vec(dk, k.shape(), dev)?,
            Tensor::from_vec(dv, v.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for Chunked {
    fn name(&self) -> &'static str {
        "qoq-chunked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, lse) = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (o, lse) = forward(&self.geo, slice(q, l1)?, slice(k, l2)?, slice(v, l3)?)?;
                (CpuStorage::F32(o), lse)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (o, lse) = forward(&self.geo, slice(q, l1)?, slice(k, l2)?, slice(v, l3)?)?;
                (CpuStorage::F64(o), lse)
            }
            _ => candle_core::bail!("chunked attention: f32 or f64 inputs of one dtype"),
        };
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("chunked attention: poisoned lock".into()))? =
            Some(lse);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.bwd_typed::<f32>((q, k, v), o, go)?,
            DType::F64 => self.bwd_typed::<f64>((q, k, v), o, go)?,
            other => candle_core::bail!("chunked attention: dtype {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    /// The eager attention (as the text model's): scores, `finfo.min` fill, softmax, `@ v`.
    fn eager(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &AttentionMask) -> Tensor {
        let (b, h, s, _) = q.dims4().unwrap();
        let (_, hk, t, _) = k.dims4().unwrap();
        let rep = |x: &Tensor| {
            // repeat_kv: head hi reads kv head hi / n_rep.
            let idx: Vec<u32> = (0..h).map(|hi| (hi / (h / hk)) as u32).collect();
            x.index_select(&Tensor::new(idx, x.device()).unwrap(), 1)
                .unwrap()
        };
        let (k, v) = (rep(k), rep(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let allowed = dense(mask, b, s, t).broadcast_as(scores.shape()).unwrap();
        let neg = Tensor::new(f64::from(f32::MIN), q.device())
            .unwrap()
            .to_dtype(q.dtype())
            .unwrap()
            .broadcast_as(scores.shape())
            .unwrap();
        let scores = allowed.where_cond(&scores, &neg).unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&v).unwrap()
    }

    /// `(b, 1, s, t)` u8, 1 where query `i` may see key `j`.
    fn dense(mask: &AttentionMask, b: usize, s: usize, t: usize) -> Tensor {
        let keep: Vec<u8> = match &mask.key_keep {
            Some(m) => m.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![1; b * t],
        };
        let seg: Vec<u32> = match &mask.segments {
            Some(m) => m.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0; b * t],
        };
        let mut allowed = vec![0u8; b * s * t];
        for bi in 0..b {
            for i in 0..s {
                let own = seg[bi * t + t - s + i];
                for j in 0..t {
                    let causal_ok = !mask.causal || j <= t - s + i;
                    let segment_ok = seg[bi * t + j] == 0 || seg[bi * t + j] == own;
                    allowed[(bi * s + i) * t + j] =
                        u8::from(causal_ok && segment_ok && keep[bi * t + j] != 0);
                }
            }
        }
        let dense = Tensor::from_vec(allowed, (b, 1, s, t), &Device::Cpu).unwrap();
        // The op's own dense form agrees.
        let ours = mask.dense(b, s, t, &Device::Cpu).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            dense.flatten_all().unwrap().to_vec1::<u8>().unwrap()
        );
        dense
    }

    fn wave(shape: (usize, usize, usize, usize), f: f64, dtype: DType) -> Var {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..n).map(|i| ((i as f64) * f + 0.3).sin()).collect();
        Var::from_tensor(
            &Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Values and gradients of the chunked op and of [`eager_attention`] (the query heads of a
    /// key-value head stacked as rows, the dense mask) against the composed eager path,
    /// `b = 2`, `heads = 4` over `kv_heads = 2`, `d = 6`, `s` queries over `t` keys, with left
    /// padding in row 1.
    fn check(s: usize, t: usize, causal: bool, pad: usize, dtype: DType, tol: f64) {
        check_segments(s, t, causal, pad, None, dtype, tol)
    }

    /// [`check`] with `segments` (`b · t`, row after row) in the mask.
    fn check_segments(
        s: usize,
        t: usize,
        causal: bool,
        pad: usize,
        segments: Option<Vec<u32>>,
        dtype: DType,
        tol: f64,
    ) {
        let (b, h, hk, d) = (2, 4, 2, 6);
        let q = wave((b, h, s, d), 0.37, dtype);
        let k = wave((b, hk, t, d), 0.53, dtype);
        let v = wave((b, hk, t, d), 0.71, dtype);
        let mut keep = vec![1u8; b * t];
        for j in 0..pad {
            keep[t + j] = 0;
        }
        let mask = AttentionMask {
            causal,
            key_keep: Some(Tensor::from_vec(keep, (b, t), &Device::Cpu).unwrap()),
            segments: segments.map(|g| Tensor::from_vec(g, (b, t), &Device::Cpu).unwrap()),
        };
        let scale = 1.0 / (d as f64).sqrt();
        let w = wave((b, h, s, d), 0.11, dtype);
        let run = |f: &dyn Fn() -> Tensor| {
            let o = f();
            let loss = (&o * w.as_tensor()).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let grads: Vec<Tensor> = [&q, &k, &v]
                .iter()
                .map(|x| g.get(x.as_tensor()).unwrap().clone())
                .collect();
            (o, grads)
        };
        let (oe, ge) = run(&|| eager(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, &mask));
        let (oc, gc) = run(&|| {
            chunked_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, &mask).unwrap()
        });
        let allowed = dense(&mask, b, s, t);
        let (of, gf) = run(&|| {
            let stacked = q.as_tensor().reshape((b, hk, h / hk * s, d)).unwrap();
            let mode = crate::ops::ForwardMode::Train;
            eager_attention(
                &stacked,
                k.as_tensor(),
                v.as_tensor(),
                scale,
                Some(&allowed),
                mode,
            )
            .unwrap()
            .reshape((b, h, s, d))
            .unwrap()
        });
        for (op, o, g) in [("chunked", &oc, &gc), ("one-node eager", &of, &gf)] {
            let what = format!(
                "{op}: s {s} t {t} causal {causal} pad {pad} {dtype:?} segments {}",
                mask.segments.is_some()
            );
            assert!(
                max_diff(&oe, o) <= tol,
                "{what}: values {}",
                max_diff(&oe, o)
            );
            for (name, (a, c)) in ["dq", "dk", "dv"].iter().zip(ge.iter().zip(g)) {
                assert!(max_diff(a, c) <= tol, "{what}: {name} {}", max_diff(a, c));
            }
        }
    }

    /// [`eager_attention`] gives a gradient to the inputs that track one only (frozen keys and
    /// values get no entry in the store), and without any tracked input it builds no node.
    #[test]
    fn one_node_eager_attention_gives_gradients_to_tracked_inputs_only() {
        let (b, hk, rs, t, d) = (1, 2, 6, 5, 4);
        let q = wave((b, hk, rs, d), 0.37, DType::F32);
        let k = wave((b, hk, t, d), 0.53, DType::F32).as_tensor().detach();
        let v = wave((b, hk, t, d), 0.71, DType::F32).as_tensor().detach();
        let mode = crate::ops::ForwardMode::Train;
        let o = eager_attention(q.as_tensor(), &k, &v, 0.5, None, mode).unwrap();
        let g = o.sum_all().unwrap().backward().unwrap();
        assert!(g.get(q.as_tensor()).is_some());
        assert!(g.get(&k).is_none() && g.get(&v).is_none());
        let plain = eager_attention(&q.as_tensor().detach(), &k, &v, 0.5, None, mode).unwrap();
        assert!(!plain.track_op());
        assert!(max_diff(&plain, &o) == 0.0);
    }

    #[test]
    fn values_and_gradients_equal_the_eager_path() {
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
            // Causal self-attention with padded rows (the first `pad` queries of row 1 see no
            // key: uniform rows), causal over a longer past (s != t), and no mask at all.
            check(7, 7, true, 3, dtype, tol);
            check(5, 9, true, 2, dtype, tol);
            check(6, 10, false, 0, dtype, tol);
            check(4, 11, false, 4, dtype, tol);
        }
        // Packed rows: a 4-key prompt (segment 0) and responses of 3, 2 and 4 tokens (segments
        // 1, 2, 3); row 1 left-padded by 2 with responses of 4 and 5 (its padding segment 0).
        let segments = [
            vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3],
            vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2],
        ]
        .concat();
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
            check_segments(13, 13, true, 2, Some(segments.clone()), dtype, tol);
            // The last 7 positions as queries over all 13 keys.
            check_segments(7, 13, true, 2, Some(segments.clone()), dtype, tol);
        }
        // bf16 and f16, computed in f32 against the eager path in the half type itself.
        for dtype in [DType::BF16, DType::F16] {
            check(7, 7, true, 3, dtype, 3e-2);
            check(6, 10, false, 0, dtype, 3e-2);
        }
    }

    #[test]
    fn an_8k_sequence_keeps_no_score_matrix() -> Result<()> {
        // 8192 queries over 8192 keys, 2 heads: the op's graph keeps q, k, v, the output and
        // one log-sum-exp per query row, nothing of (heads, s, s).
        let (b, h, s, d) = (1, 2, 8192, 4);
        let dev = Device::Cpu;
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, s, d), &dev)?)?;
        let k = Tensor::randn(0f32, 1.0, (b, 1, s, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, 1, s, d), &dev)?;
        let lse = Arc::new(Mutex::new(None));
        let op: Arc<Box<dyn CustomOp3 + Send + Sync>> = Arc::new(Box::new(Chunked {
            geo: Geometry {
                b,
                h,
                hk: 1,
                s,
                t: s,
                d,
                scale: 0.5,
                vis: Visible {
                    s,
                    t: s,
                    causal: true,
                    key_keep: None,
                    segments: None,
                },
            },
            lse: lse.clone(),
        }));
        let o = q.as_tensor().apply_op3_arc(&k, &v, op)?;
        assert_eq!(o.dims4()?, (b, h, s, d));
        // What the op saved besides the graph's tensors: one log-sum-exp per query row.
        let saved = lse.lock().unwrap().as_ref().map(Vec::len);
        assert_eq!(saved, Some(b * h * s));
        let loss = o.sum_all()?;
        let largest = loss
            .sorted_nodes()
            .iter()
            .map(|t| t.elem_count())
            .max()
            .unwrap_or(0);
        assert_eq!(largest, b * h * s * d, "no tensor beyond (b, heads, s, d)");
        // And the backward runs without an (s, t) buffer either.
        let g = loss.backward()?;
        assert_eq!(
            g.get(q.as_tensor()).map(|t| t.dims4()).transpose()?,
            Some((b, h, s, d))
        );
        Ok(())
    }
}
