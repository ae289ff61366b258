//! Differentiable fused kernels for the training forward (issue: candle's fused `rms_norm`
//! records no gradient, and the composed op walks and allocates the tensor five times forward and
//! more in the backward).
//!
//! Each op is a candle custom op with its own backward: the forward is one pass per row (rayon
//! over rows) and the backward is one pass for the input's gradient and one for the weight's.
//! Written by hand because no maintained crate offers candle custom ops with a backward for these
//! blocks. CPU only, f32 and f64: on another device or dtype the callers use the composed ops,
//! which give the same values and gradients (tests below).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows below this length are processed serially (rayon's overhead dominates).
const PAR_MIN_ELEMS: usize = 1 << 14;

/// The contiguous slice of a CPU tensor's storage.
fn slice<'a, T: candle_core::WithDType>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused op: non-contiguous input"),
    }
}

/// Runs `$body` on the contiguous slices `$x` of the storages `$s` (layouts `$l`), all f32 or
/// all f64, and wraps the result in the same dtype; `$what` names the op in the error otherwise.
macro_rules! float_kernel {
    ($what:literal, $($x:ident = ($s:expr, $l:expr)),+ => $body:expr) => {
        match ($($s,)+) {
            ($(CpuStorage::F32($x),)+) => {
                $(let $x = slice($x, $l)?;)+
                CpuStorage::F32($body)
            }
            ($(CpuStorage::F64($x),)+) => {
                $(let $x = slice($x, $l)?;)+
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!(concat!($what, ": f32 or f64 inputs of one dtype")),
        }
    };
}

/// The float types the kernels run in.
trait Float: candle_core::WithDType + Send + Sync {
    fn to64(self) -> f64;
    fn of64(v: f64) -> Self;
    /// `x ← exp(x − m)` for every element of `row`, in the type's own precision (f32 `exp` for
    /// f32 data, the f64 one being about twice as slow; a vector register of elements at a
    /// time, [`crate::expf`], with libm's bits). Arguments below the type's smallest normal
    /// result give 0 without calling `exp`: libm's underflow path (errno, a function call per
    /// element) made masked attention logits (`f32::MIN` − max) cost ten times a real one,
    /// and the terms dropped (below 1e-37 against a row maximum's 1) change no sum.
    fn exp_minus_in_place(row: &mut [Self], m: f64);
}

impl Float for f32 {
    fn to64(self) -> f64 {
        f64::from(self)
    }
    fn of64(v: f64) -> Self {
        v as f32
    }
    fn exp_minus_in_place(row: &mut [f32], m: f64) {
        let m = m as f32;
        row.iter_mut().for_each(|v| *v -= m);
        crate::expf::exp_or_zero_in_place(row);
    }
}

impl Float for f64 {
    fn to64(self) -> f64 {
        self
    }
    fn of64(v: f64) -> Self {
        v
    }
    fn exp_minus_in_place(row: &mut [f64], m: f64) {
        row.iter_mut()
            .for_each(|v| *v = crate::expf::exp_or_zero64(*v - m));
    }
}

/// `1 / sqrt(mean(x²) + eps)` of one row, accumulated in f64.
fn inv_rms<T: Float>(row: &[T], eps: f64) -> f64 {
    let ss: f64 = row.iter().map(|&v| v.to64() * v.to64()).sum();
    1.0 / (ss / row.len() as f64 + eps).sqrt()
}

/// A new `len`-element output computed by `f` on every (row index, output row) pair of `dim`
/// elements, in parallel when the output is large. Each row is zeroed just before `f` gets it,
/// in cache, instead of the whole output up front: `vec![0; len]` is a separate pass over memory
/// (glibc's `calloc` memsets every recycled block), as large as an attention's scores.
#[allow(unsafe_code)] // rows written before they are read, and `assume_init` of the whole
fn rows_new<T: Float>(len: usize, dim: usize, f: impl Fn(usize, &mut [T]) + Send + Sync) -> Vec<T> {
    use std::mem::MaybeUninit;
    let mut out = crate::matmul::uninit(len);
    let row = |(i, o): (usize, &mut [MaybeUninit<T>])| {
        o.iter_mut().for_each(|v| {
            v.write(T::of64(0.0));
        });
        // SAFETY: every element of `o` was initialised just above; `MaybeUninit<T>` and `T` have
        // the same layout.
        let o = unsafe { &mut *(std::ptr::from_mut(o) as *mut [T]) };
        f(i, o)
    };
    if len >= PAR_MIN_ELEMS {
        out.par_chunks_mut(dim).enumerate().for_each(row);
    } else {
        out.chunks_mut(dim).enumerate().for_each(row);
    }
    // SAFETY: the rows cover `out`, and each was initialised before `f` ran on it.
    unsafe { crate::matmul::assume_init(out) }
}

/// RMSNorm `x / sqrt(mean(x²) + eps) · w` over the last dimension.
struct RmsNorm {
    eps: f64,
}

fn rms_fwd<T: Float>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    rows_new(x.len(), dim, |i, o| {
        let row = &x[i * dim..(i + 1) * dim];
        let r = inv_rms(row, eps);
        for ((o, &xv), &wv) in o.iter_mut().zip(row).zip(w) {
            *o = T::of64(xv.to64() * r * wv.to64());
        }
    })
}

/// `dx_i = r·w_i·g_i − x_i·r³·(Σ_j g_j·w_j·x_j)/n` per row.
fn rms_bwd_x<T: Float>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    rows_new(x.len(), dim, |i, o| {
        let row = &x[i * dim..(i + 1) * dim];
        let gr = &g[i * dim..(i + 1) * dim];
        let r = inv_rms(row, eps);
        let dot: f64 = row
            .iter()
            .zip(gr)
            .zip(w)
            .map(|((&xv, &gv), &wv)| xv.to64() * gv.to64() * wv.to64())
            .sum();
        let c = r * r * r * dot / dim as f64;
        for (((o, &xv), &gv), &wv) in o.iter_mut().zip(row).zip(gr).zip(w) {
            *o = T::of64(r * wv.to64() * gv.to64() - xv.to64() * c);
        }
    })
}

/// Column sums over the rows of `(x, g)` of `width * dim` per-row terms (`row` adds one row's
/// terms to the accumulator), in f64, in parallel for large tensors.
fn column_sums<T: Float>(
    x: &[T],
    g: &[T],
    dim: usize,
    width: usize,
    row: impl Fn(&mut [f64], &[T], &[T]) + Send + Sync,
) -> Vec<T> {
    let fold = |mut acc: Vec<f64>, (xr, gr): (&[T], &[T])| {
        row(&mut acc, xr, gr);
        acc
    };
    let add = |mut a: Vec<f64>, b: Vec<f64>| {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
        a
    };
    let n = width * dim;
    let sums = if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks(dim)
            .zip(g.par_chunks(dim))
            .fold(|| vec![0.0; n], fold)
            .reduce(|| vec![0.0; n], add)
    } else {
        x.chunks(dim).zip(g.chunks(dim)).fold(vec![0.0; n], fold)
    };
    sums.into_iter().map(T::of64).collect()
}

/// Column sums of a `(rows, dim)` tensor (a bias's gradient), accumulated in f64.
struct RowSum;

impl candle_core::CustomOp1 for RowSum {
    fn name(&self) -> &'static str {
        "qoq-row-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[_, dim] = l.dims() else {
            candle_core::bail!("row sum: expected (rows, dim), got {:?}", l.dims());
        };
        let out = float_kernel!("row sum", x = (s, l) => column_sums(x, x, dim, 1, |acc, r, _| {
            for (a, &v) in acc.iter_mut().zip(r) {
                *a += v.to64();
            }
        }));
        Ok((out, Shape::from(dim)))
    }
}

/// `g.sum(0)` of a `(rows, dim)` tensor, without a graph: on the CPU in f32 / f64 one pass over
/// contiguous rows (candle's sum over the first dimension walks the tensor element by element
/// with index arithmetic: a bias's gradient cost a tenth of the tiny model's update).
pub(crate) fn sum_rows(g: &Tensor) -> Result<Tensor> {
    let g = g.detach();
    if available(&g) && matches!(g.dtype(), DType::F32 | DType::F64) && g.rank() == 2 {
        g.contiguous()?.apply_op1_no_bwd(&RowSum)
    } else {
        g.sum(0)
    }
}

/// `dw_i = Σ_rows g_i·x_i·r`.
fn rms_bwd_w<T: Float>(x: &[T], g: &[T], dim: usize, eps: f64) -> Vec<T> {
    column_sums(x, g, dim, 1, |acc, xr, gr| {
        let r = inv_rms(xr, eps);
        for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
            *a += gv.to64() * xv.to64() * r;
        }
    })
}

fn check_dim(l: &Layout, dim: usize, what: &str) -> Result<()> {
    if l.dims().last() != Some(&dim) {
        candle_core::bail!(
            "fused norm: {what} has shape {:?}, the weight {dim} elements",
            l.dims()
        );
    }
    Ok(())
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "qoq-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = l2.shape().elem_count();
        check_dim(l1, dim, "the input")?;
        let out =
            float_kernel!("fused rms_norm", x = (s1, l1), w = (s2, l2) => rms_fwd(x, w, self.eps));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(
            w,
            &grad,
            &NormBwdX {
                norm: Norm::Rms,
                eps: self.eps,
            },
        )?;
        let dw = x.apply_op2_no_bwd(
            &grad,
            &NormBwdParams {
                norm: Norm::Rms,
                eps: self.eps,
            },
        )?;
        Ok((Some(dx), Some(dw.reshape(w.shape())?)))
    }
}

/// Which normalisation a backward op belongs to.
#[derive(Debug, Clone, Copy)]
enum Norm {
    Rms,
    Layer,
}

/// The input's gradient of a fused norm: `(x, w, g) -> dx`.
struct NormBwdX {
    norm: Norm,
    eps: f64,
}

impl CustomOp3 for NormBwdX {
    fn name(&self) -> &'static str {
        match self.norm {
            Norm::Rms => "qoq-rms-norm-bwd-x",
            Norm::Layer => "qoq-layer-norm-bwd-x",
        }
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
        let dim = l2.shape().elem_count();
        check_dim(l1, dim, "the input")?;
        check_dim(l3, dim, "the gradient")?;
        let eps = self.eps;
        let out = match self.norm {
            Norm::Rms => float_kernel!(
                "fused rms_norm backward",
                x = (s1, l1), w = (s2, l2), g = (s3, l3) => rms_bwd_x(x, w, g, eps)
            ),
            Norm::Layer => float_kernel!(
                "fused layer_norm backward",
                x = (s1, l1), w = (s2, l2), g = (s3, l3) => ln_bwd_x(x, w, g, eps)
            ),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// The affine parameters' gradients of a fused norm: `(x, g) -> dw` (RMSNorm, `(dim,)`) or
/// `[dw; db]` (LayerNorm, `(2, dim)`).
struct NormBwdParams {
    norm: Norm,
    eps: f64,
}

impl CustomOp2 for NormBwdParams {
    fn name(&self) -> &'static str {
        match self.norm {
            Norm::Rms => "qoq-rms-norm-bwd-w",
            Norm::Layer => "qoq-layer-norm-bwd-wb",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = *l1.dims().last().unwrap_or(&1);
        check_dim(l2, dim, "the gradient")?;
        let eps = self.eps;
        Ok(match self.norm {
            Norm::Rms => (
                float_kernel!(
                    "fused rms_norm backward",
                    x = (s1, l1), g = (s2, l2) => rms_bwd_w(x, g, dim, eps)
                ),
                Shape::from(dim),
            ),
            Norm::Layer => (
                float_kernel!(
                    "fused layer_norm backward",
                    x = (s1, l1), g = (s2, l2) => ln_bwd_wb(x, g, dim, eps)
                ),
                Shape::from((2, dim)),
            ),
        })
    }
}

/// Mean and `1 / sqrt(var + eps)` of one row (biased variance, as `nn.LayerNorm`), in f64.
fn mean_rstd<T: Float>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v.to64()).sum::<f64>() / n;
    let var = row
        .iter()
        .map(|&v| (v.to64() - mean) * (v.to64() - mean))
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm `(x − mean) / sqrt(var + eps) · w + b` over the last dimension.
struct LayerNorm {
    eps: f64,
}

fn ln_fwd<T: Float>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    rows_new(x.len(), dim, |i, o| {
        let row = &x[i * dim..(i + 1) * dim];
        let (mean, r) = mean_rstd(row, eps);
        for (((o, &xv), &wv), &bv) in o.iter_mut().zip(row).zip(w).zip(b) {
            *o = T::of64((xv.to64() - mean) * r * wv.to64() + bv.to64());
        }
    })
}

/// `dx = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂))` per row, with `ĝ = g · w` and `x̂` the normalised
/// input.
fn ln_bwd_x<T: Float>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let dim = w.len();
    let n = dim as f64;
    rows_new(x.len(), dim, |i, o| {
        let row = &x[i * dim..(i + 1) * dim];
        let gr = &g[i * dim..(i + 1) * dim];
        let (mean, r) = mean_rstd(row, eps);
        let (mut sg, mut sgx) = (0.0, 0.0);
        for ((&xv, &gv), &wv) in row.iter().zip(gr).zip(w) {
            let gh = gv.to64() * wv.to64();
            sg += gh;
            sgx += gh * (xv.to64() - mean) * r;
        }
        let (mg, mgx) = (sg / n, sgx / n);
        for (((o, &xv), &gv), &wv) in o.iter_mut().zip(row).zip(gr).zip(w) {
            let xh = (xv.to64() - mean) * r;
            *o = T::of64(r * (gv.to64() * wv.to64() - mg - xh * mgx));
        }
    })
}

/// `(dw, db) = (Σ_rows g · x̂, Σ_rows g)`, as one `(2, dim)` buffer.
fn ln_bwd_wb<T: Float>(x: &[T], g: &[T], dim: usize, eps: f64) -> Vec<T> {
    column_sums(x, g, dim, 2, |acc, xr, gr| {
        let (mean, r) = mean_rstd(xr, eps);
        let (dw, db) = acc.split_at_mut(dim);
        for (((a, c), &xv), &gv) in dw.iter_mut().zip(db.iter_mut()).zip(xr).zip(gr) {
            *a += gv.to64() * (xv.to64() - mean) * r;
            *c += gv.to64();
        }
    })
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "qoq-layer-norm"
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
        let dim = l2.shape().elem_count();
        check_dim(l1, dim, "the input")?;
        if l3.shape().elem_count() != dim {
            candle_core::bail!(
                "fused layer_norm: bias of {} elements, weight of {dim}",
                l3.shape().elem_count()
            );
        }
        let out = float_kernel!(
            "fused layer_norm",
            x = (s1, l1), w = (s2, l2), b = (s3, l3) => ln_fwd(x, w, b, self.eps)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(
            w,
            &grad,
            &NormBwdX {
                norm: Norm::Layer,
                eps: self.eps,
            },
        )?;
        let dwb = x.apply_op2_no_bwd(
            &grad,
            &NormBwdParams {
                norm: Norm::Layer,
                eps: self.eps,
            },
        )?;
        Ok((
            Some(dx),
            Some(dwb.get(0)?.reshape(w.shape())?),
            Some(dwb.get(1)?.reshape(b.shape())?),
        ))
    }
}

/// Softmax over the last dimension of `scale · x` where a mask allows, the f32 minimum elsewhere
/// (row max subtracted, sums in f64): attention's scaling, `masked_fill` and softmax in one pass
/// instead of three, and one backward pass instead of about ten (each composed op's gradient is
/// summed into fresh zeros by candle's backward). With `scale` 1 and no mask it is a plain
/// softmax. As a [`candle_core::CustomOp1`] it has no mask; as a [`CustomOp2`] its second input
/// is the mask ([`MaskRows`]), which receives no gradient.
struct Softmax {
    scale: f64,
}

/// An attention mask `(mb, 1, s, t)` u8 (1 = may attend; `mb` 1 or the scores' batch) read
/// against scores `(b, heads, q, t)` flattened to rows of `t`, where `q` is a multiple of `s`:
/// score row `r` of a head is query `r mod s` (grouped-query attention stacks the `n_rep` query
/// heads of one key-value head as `n_rep · s` rows).
#[derive(Clone, Copy)]
struct MaskRows<'a> {
    data: &'a [u8],
    /// Score rows per batch row (`heads · q`).
    per_batch: usize,
    /// The mask's queries `s`.
    queries: usize,
    batched: bool,
}

impl<'a> MaskRows<'a> {
    /// The mask `m` (layout `ml`) for scores of layout `sl`, checked.
    fn new(m: &'a CpuStorage, ml: &Layout, sl: &Layout) -> Result<MaskRows<'a>> {
        let CpuStorage::U8(data) = m else {
            candle_core::bail!("fused softmax: the mask must be u8");
        };
        let data = slice(data, ml)?;
        let (sd, md) = (sl.dims(), ml.dims());
        let ok = sd.len() == 4
            && md.len() == 4
            && md[1] == 1
            && md[2] > 0
            && sd[2].is_multiple_of(md[2])
            && md[3] == sd[3]
            && (md[0] == sd[0] || md[0] == 1);
        if !ok {
            candle_core::bail!("fused softmax: mask {md:?} does not fit scores {sd:?}");
        }
        Ok(MaskRows {
            data,
            per_batch: sd[1] * sd[2],
            queries: md[2],
            batched: md[0] != 1,
        })
    }

    /// The mask of score row `i` (rows of `t`).
    fn row(&self, i: usize, t: usize) -> &'a [u8] {
        let b = if self.batched { i / self.per_batch } else { 0 };
        let r = b * self.queries + i % self.queries;
        &self.data[r * t..(r + 1) * t]
    }
}

/// The positions from the first kept one to the last of a mask row (`0..0` when none is kept):
/// outside them a softmax row is exactly 0 and its terms in the row's sums are zeros, which
/// the kernels skip (a causal row keeps a prefix, a window a block).
fn kept_span(keep: &[u8]) -> std::ops::Range<usize> {
    match keep.iter().position(|&k| k != 0) {
        Some(lo) => lo..keep.iter().rposition(|&k| k != 0).map_or(lo, |hi| hi + 1),
        None => 0..0,
    }
}

fn softmax_fwd<T: Float>(x: &[T], dim: usize, scale: f64, mask: Option<MaskRows>) -> Vec<T> {
    // As the composed ops: `x · scale` in the data's type (candle's affine), the f32 minimum where
    // masked (`mask_scores`).
    let (mul, neg) = (T::of64(scale), T::of64(f64::from(f32::MIN)));
    rows_new(x.len(), dim, |i, o| {
        let row = &x[i * dim..(i + 1) * dim];
        match mask {
            Some(m) => {
                for ((o, &v), &keep) in o.iter_mut().zip(row).zip(m.row(i, dim)) {
                    *o = if keep != 0 { v * mul } else { neg };
                }
            }
            None => o.iter_mut().zip(row).for_each(|(o, &v)| *o = v * mul),
        }
        let max = row_max(o);
        // Masked positions outside the kept span are exp(f32::MIN − max) = 0: written as such,
        // and left out of the sum, where they added zeros. A row with nothing kept is uniform
        // (every score f32::MIN), computed whole.
        let span = match mask {
            Some(m) => kept_span(m.row(i, dim)),
            None => 0..dim,
        };
        let span = if span.is_empty() { 0..dim } else { span };
        o[..span.start].fill(T::of64(0.0));
        o[span.end..].fill(T::of64(0.0));
        let o = &mut o[span];
        T::exp_minus_in_place(o, max);
        // Summed in order, in f64 (as each term was added when computed).
        let sum = o.iter().fold(0.0, |s, &v| s + v.to64());
        for o in o.iter_mut() {
            *o = T::of64(o.to64() / sum);
        }
    })
}

/// `dx = scale · y · (g − Σ g·y)` per row, 0 where masked.
fn softmax_bwd<T: Float>(
    y: &[T],
    g: &[T],
    dim: usize,
    scale: f64,
    mask: Option<MaskRows>,
) -> Vec<T> {
    let mul = T::of64(scale);
    rows_new(y.len(), dim, |i, o| {
        // Outside the mask's kept span the output is 0 (as `rows_new` gives it) and `y` is 0,
        // whose terms the dot product skips.
        let keep = mask.map(|m| m.row(i, dim));
        let span = keep.map_or(0..dim, kept_span);
        let yr = &y[i * dim..(i + 1) * dim][span.clone()];
        let gr = &g[i * dim..(i + 1) * dim][span.clone()];
        let dot: f64 = yr.iter().zip(gr).map(|(&a, &b)| a.to64() * b.to64()).sum();
        let o = &mut o[span.clone()];
        for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
            *o = T::of64(yv.to64() * (gv.to64() - dot)) * mul;
        }
        if let Some(keep) = keep {
            for (o, &keep) in o.iter_mut().zip(&keep[span]) {
                if keep == 0 {
                    *o = T::of64(0.0);
                }
            }
        }
    })
}

impl Softmax {
    fn run(&self, s: &CpuStorage, l: &Layout, mask: Option<MaskRows>) -> Result<CpuStorage> {
        let dim = *l.dims().last().unwrap_or(&1);
        Ok(float_kernel!("fused softmax", x = (s, l) => softmax_fwd(x, dim, self.scale, mask)))
    }
}

impl candle_core::CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "qoq-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.run(s, l, None)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(scaled_masked_softmax_bwd(y, grad, self.scale, None)?))
    }
}

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "qoq-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mask = MaskRows::new(s2, l2, l1)?;
        Ok((self.run(s1, l1, Some(mask))?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        mask: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = scaled_masked_softmax_bwd(y, grad, self.scale, Some(mask))?;
        Ok((Some(dx), None))
    }
}

/// The backward of [`Softmax`]: `(y, g)` or `(y, g, mask)`.
struct SoftmaxBwd {
    scale: f64,
}

impl SoftmaxBwd {
    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        mask: Option<MaskRows>,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = *l1.dims().last().unwrap_or(&1);
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "fused softmax backward: output {:?}, gradient {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let out = float_kernel!(
            "fused softmax backward",
            y = (s1, l1), g = (s2, l2) => softmax_bwd(y, g, dim, self.scale, mask)
        );
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "qoq-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "qoq-masked-softmax-bwd"
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
        let mask = MaskRows::new(s3, l3, l1)?;
        self.run((s1, l1), (s2, l2), Some(mask))
    }
}

/// The gradient of [`scaled_masked_softmax`]'s input from its output `y` and the output's
/// gradient `g` (both in `y`'s dtype, f32 or f64): `scale · y · (g − Σ g·y)` per row, 0 where
/// `mask` hides the key. No graph.
pub(crate) fn scaled_masked_softmax_bwd(
    y: &Tensor,
    g: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (y, g) = (y.contiguous()?, g.to_dtype(y.dtype())?.contiguous()?);
    let op = SoftmaxBwd { scale };
    match mask {
        Some(m) => y.apply_op3_no_bwd(&g, &m.contiguous()?, &op),
        None => y.apply_op2_no_bwd(&g, &op),
    }
}

/// Differentiable softmax over the last dimension in `work` (f32 or f64): one pass forward, one
/// backward (from the saved output). The caller casts back.
pub(crate) fn softmax_last_dim(x: &Tensor, work: DType) -> Result<Tensor> {
    scaled_masked_softmax(x, 1.0, None, work)
}

/// Differentiable `softmax(masked_fill(x · scale, !mask, f32::MIN))` over the last dimension in
/// `work` (f32 or f64), `x: (b, heads, q, t)`, `mask: (b or 1, 1, s, t)` u8 with `q` a multiple
/// of `s` (score row `r` is query `r mod s`, see [`MaskRows`]): attention's probabilities from
/// its raw scores in one pass forward and one backward. The caller casts back. Without a mask
/// `x` may have any shape.
pub(crate) fn scaled_masked_softmax(
    x: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    work: DType,
) -> Result<Tensor> {
    let x = x.to_dtype(work)?.contiguous()?;
    let op = Softmax { scale };
    match mask {
        Some(m) => x.apply_op2(&m.contiguous()?, op),
        None => x.apply_op1(op),
    }
}

/// `log_softmax(logits)[label]` per row: `x[label] − max − log Σ exp(x − max)`, without the
/// `(rows, vocab)` log-softmax tensor; the backward writes `g · (onehot(label) − softmax(x))`.
struct ChosenLogProb;

/// The row's maximum, widened (NaN values ignored).
fn row_max<T: Float>(row: &[T]) -> f64 {
    row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.to64()))
}

fn lse<T: Float>(row: &[T]) -> (f64, f64) {
    let max = row_max(row);
    // The terms by blocks of a stack buffer (vectorised exponentials), summed in order.
    let mut buf = [T::of64(0.0); 256];
    let mut sum = 0.0;
    for part in row.chunks(buf.len()) {
        let b = &mut buf[..part.len()];
        b.copy_from_slice(part);
        T::exp_minus_in_place(b, max);
        sum = b.iter().fold(sum, |s, &v| s + v.to64());
    }
    (max, sum.ln())
}

fn chosen_fwd<T: Float>(x: &[T], labels: &[u32], vocab: usize) -> Vec<T> {
    let one = |i: usize| {
        let row = &x[i * vocab..(i + 1) * vocab];
        let (max, l) = lse(row);
        T::of64(row[labels[i] as usize].to64() - max - l)
    };
    if x.len() >= PAR_MIN_ELEMS {
        (0..labels.len()).into_par_iter().map(one).collect()
    } else {
        (0..labels.len()).map(one).collect()
    }
}

fn chosen_bwd<T: Float>(x: &[T], labels: &[u32], g: &[T], vocab: usize) -> Vec<T> {
    rows_new(x.len(), vocab, |i, o| {
        let row = &x[i * vocab..(i + 1) * vocab];
        let (max, l) = lse(row);
        let gi = g[i].to64();
        o.copy_from_slice(row);
        T::exp_minus_in_place(o, max + l);
        for o in o.iter_mut() {
            *o = T::of64(-gi * o.to64());
        }
        let k = labels[i] as usize;
        o[k] = T::of64(o[k].to64() + gi);
    })
}

fn labels_u32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => slice(v, l),
        _ => candle_core::bail!("fused log-probs: labels must be u32"),
    }
}

impl CustomOp2 for ChosenLogProb {
    fn name(&self) -> &'static str {
        "qoq-chosen-log-prob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let vocab = *l1.dims().last().unwrap_or(&1);
        let labels = labels_u32(s2, l2)?;
        if labels.len() * vocab != l1.shape().elem_count() {
            candle_core::bail!(
                "fused log-probs: logits {:?} for labels {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        if let Some(bad) = labels.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("fused log-probs: label {bad} outside the vocabulary of {vocab}");
        }
        let out = float_kernel!("fused log-probs", x = (s1, l1) => chosen_fwd(x, labels, vocab));
        Ok((out, l2.shape().clone()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        Ok((
            Some(logits.apply_op3_no_bwd(labels, &grad, &ChosenLogProbBwd)?),
            None,
        ))
    }
}

struct ChosenLogProbBwd;

impl CustomOp3 for ChosenLogProbBwd {
    fn name(&self) -> &'static str {
        "qoq-chosen-log-prob-bwd"
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
        let vocab = *l1.dims().last().unwrap_or(&1);
        let labels = labels_u32(s2, l2)?;
        if l3.shape().elem_count() != labels.len() {
            candle_core::bail!("fused log-probs backward: gradient {:?}", l3.dims());
        }
        let out = float_kernel!(
            "fused log-probs backward",
            x = (s1, l1), g = (s3, l3) => chosen_bwd(x, labels, g, vocab)
        );
        Ok((out, l1.shape().clone()))
    }
}

/// Differentiable `log_softmax(logits)[..., labels]` for `logits (..., vocab)` (f32 or f64, on
/// the CPU) and integer `labels (...)` inside the vocabulary: one pass over each row forward and
/// one backward, never the `(..., vocab)` log-softmax.
pub fn chosen_log_probs(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::U32)?.contiguous()?;
    logits.contiguous()?.apply_op2(&labels, ChosenLogProb)
}

/// How the rows of `x` map to rows of the rotary tables.
#[derive(Debug, Clone, Copy)]
pub enum RopeLayout {
    /// `x: (b, heads, t, d)`, tables `(b, t, d/2)` (or `(1, t, d/2)`, shared by the batch).
    Bhtd,
    /// `x: (t, heads, d)`, tables `(t, d/2)`.
    Thd,
}

/// Rotary embedding `y = x·cos + rotate_half(x)·sin·sign` of `x` (the first input) with fixed
/// tables (the second and third, `(rows, d/2)`): linear in `x`, so its backward is the same
/// rotation with the sign flipped (the transpose of a rotation). No gradient reaches the tables.
struct Rope {
    layout: RopeLayout,
    sign: f64,
}

/// The table row of each row of `x` (`d` elements), for `dims` of `x`.
fn table_row(layout: RopeLayout, dims: &[usize], table_rows: usize) -> impl Fn(usize) -> usize {
    let (h, t, shared) = match layout {
        RopeLayout::Bhtd => (dims[1], dims[2], table_rows == dims[2]),
        RopeLayout::Thd => (dims[1], dims[0], true),
    };
    move |r: usize| match layout {
        RopeLayout::Bhtd => {
            let ti = r % t;
            let bi = r / (h * t);
            if shared { ti } else { bi * t + ti }
        }
        RopeLayout::Thd => r / h,
    }
}

fn rope_kernel<T: Float>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    d: usize,
    row_of: impl Fn(usize) -> usize + Send + Sync,
    sign: f64,
) -> Vec<T> {
    let half = d / 2;
    rows_new(x.len(), d, |r, o| {
        let xr = &x[r * d..(r + 1) * d];
        let k = row_of(r) * half;
        let (c, s) = (&cos[k..k + half], &sin[k..k + half]);
        for j in 0..half {
            let (x1, x2) = (xr[j].to64(), xr[j + half].to64());
            let (cj, sj) = (c[j].to64(), sign * s[j].to64());
            o[j] = T::of64(x1 * cj - x2 * sj);
            o[j + half] = T::of64(x2 * cj + x1 * sj);
        }
    })
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "qoq-rope"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let want = match self.layout {
            RopeLayout::Bhtd => 4,
            RopeLayout::Thd => 3,
        };
        let d = *dims.last().unwrap_or(&0);
        let table_rows = cl.shape().elem_count() / (d / 2).max(1);
        if dims.len() != want || !d.is_multiple_of(2) || cl.dims() != sl.dims() {
            candle_core::bail!(
                "fused rope: x {dims:?} ({:?} layout), tables {:?}",
                self.layout,
                cl.dims()
            );
        }
        let rows_needed = match self.layout {
            RopeLayout::Bhtd => [dims[2], dims[0] * dims[2]].contains(&table_rows),
            RopeLayout::Thd => table_rows == dims[0],
        };
        if !rows_needed || cl.dims().last() != Some(&(d / 2)) {
            candle_core::bail!("fused rope: tables {:?} do not fit x {dims:?}", cl.dims());
        }
        let row_of = table_row(self.layout, dims, table_rows);
        let out = float_kernel!(
            "fused rope",
            x = (s, l), c = (cs, cl), sn = (ss, sl) => rope_kernel(x, c, sn, d, row_of, self.sign)
        );
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let transpose = Rope {
            layout: self.layout,
            sign: -self.sign,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &transpose)?;
        Ok((Some(dx), None, None))
    }
}

/// Differentiable rotary embedding of `x` in `work` (f32 or f64) with the half tables
/// `cos_half`/`sin_half` (`(b or 1, t, d/2)` for [`RopeLayout::Bhtd`], `(t, d/2)` for
/// [`RopeLayout::Thd`]); no gradient flows to the tables. One pass forward, one backward.
pub(crate) fn rope(
    x: &Tensor,
    cos_half: &Tensor,
    sin_half: &Tensor,
    layout: RopeLayout,
    work: DType,
) -> Result<Tensor> {
    let cos = cos_half.detach().to_dtype(work)?.contiguous()?;
    let sin = sin_half.detach().to_dtype(work)?.contiguous()?;
    let op = Rope { layout, sign: 1.0 };
    x.to_dtype(work)?.contiguous()?.apply_op3(&cos, &sin, op)
}

/// `silu(gate) · up` (the SwiGLU of the decoder's and the vision tower's MLPs), elementwise.
/// The backward writes both gradients in one pass: `dgate = g·up·σ(gate)·(1 + gate·(1 − σ(gate)))`
/// and `dup = g·silu(gate)`.
struct SwiGlu;

/// Elements per parallel chunk of the elementwise kernels.
const ELEM_CHUNK: usize = 1 << 14;

/// `σ(x)` in the type's own precision (as candle's `silu`), widened.
fn sigmoid<T: Float>(x: T) -> f64 {
    if T::DTYPE == DType::F32 {
        let x = x.to64() as f32;
        f64::from(1.0 / (1.0 + (-x).exp()))
    } else {
        1.0 / (1.0 + (-x.to64()).exp())
    }
}

fn swiglu_fwd<T: Float>(gate: &[T], up: &[T]) -> Vec<T> {
    rows_new(gate.len(), ELEM_CHUNK, |c, o| {
        let base = c * ELEM_CHUNK;
        let (g, u) = (&gate[base..base + o.len()], &up[base..base + o.len()]);
        for ((o, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
            *o = T::of64(gv.to64() * sigmoid(gv) * uv.to64());
        }
    })
}

/// `[dgate; dup]` (twice the input's length) for the output gradient `dy`.
fn swiglu_bwd<T: Float>(gate: &[T], up: &[T], dy: &[T]) -> Vec<T> {
    let n = gate.len();
    let mut out = vec![T::of64(0.0); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    let one = |c: usize, (dg, du): (&mut [T], &mut [T])| {
        let base = c * ELEM_CHUNK;
        let r = base..base + dg.len();
        let (g, u, d) = (&gate[r.clone()], &up[r.clone()], &dy[r]);
        for i in 0..dg.len() {
            let (gv, uv, dv) = (g[i].to64(), u[i].to64(), d[i].to64());
            let sg = sigmoid(g[i]);
            dg[i] = T::of64(dv * uv * sg * (1.0 + gv * (1.0 - sg)));
            du[i] = T::of64(dv * gv * sg);
        }
    };
    if n >= PAR_MIN_ELEMS {
        dg.par_chunks_mut(ELEM_CHUNK)
            .zip(du.par_chunks_mut(ELEM_CHUNK))
            .enumerate()
            .for_each(|(c, p)| one(c, p));
    } else {
        dg.chunks_mut(ELEM_CHUNK)
            .zip(du.chunks_mut(ELEM_CHUNK))
            .enumerate()
            .for_each(|(c, p)| one(c, p));
    }
    out
}

fn same_shape(what: &str, a: &Layout, b: &Layout) -> Result<()> {
    if a.dims() != b.dims() {
        candle_core::bail!(
            "fused swiglu{what}: shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        );
    }
    Ok(())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "qoq-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape("", l1, l2)?;
        let out = float_kernel!("fused swiglu", g = (s1, l1), u = (s2, l2) => swiglu_fwd(g, u));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "qoq-swiglu-bwd"
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
        same_shape(" backward", l1, l2)?;
        same_shape(" backward", l1, l3)?;
        let out = float_kernel!(
            "fused swiglu backward",
            g = (s1, l1), u = (s2, l2), d = (s3, l3) => swiglu_bwd(g, u, d)
        );
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// `silu(gate) · up`, differentiable in both: on the CPU one pass forward and one backward
/// (computed in f32, f64 for f64 inputs, and cast back); elsewhere, or for inputs of different
/// shapes or dtypes, candle's `silu` and product.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !available(gate) || gate.dtype() != up.dtype() || gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    let dtype = gate.dtype();
    let work = crate::ops::compute_dtype(dtype);
    let (g, u) = (
        gate.to_dtype(work)?.contiguous()?,
        up.to_dtype(work)?.contiguous()?,
    );
    g.apply_op2(&u, SwiGlu)?.to_dtype(dtype)
}

/// Whether the fused kernels can run on `x` (CPU, computing in f32 or f64).
pub fn available(x: &Tensor) -> bool {
    x.device().is_cpu()
}

/// Differentiable LayerNorm (affine) over the last dimension in `work` (f32 or f64): one pass
/// forward, two in the backward. The caller casts back.
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    work: DType,
) -> Result<Tensor> {
    let x = x.to_dtype(work)?.contiguous()?;
    let w = weight.to_dtype(work)?.contiguous()?;
    let b = bias.to_dtype(work)?.contiguous()?;
    x.apply_op3(&w, &b, LayerNorm { eps })
}

/// Differentiable RMSNorm over the last dimension in `work` (f32 or f64): one pass forward, two
/// in the backward. The caller casts back.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, work: DType) -> Result<Tensor> {
    let x = x.to_dtype(work)?.contiguous()?;
    let w = weight.to_dtype(work)?.contiguous()?;
    x.apply_op2(&w, RmsNorm { eps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    /// The composed RMSNorm the fused op replaces.
    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .max(1e-30);
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            / scale
    }

    /// Value and both gradients of fused vs composed under a random upstream gradient.
    fn check(dtype: DType, shape: (usize, usize, usize), tol: f64) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 2.0, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w = Tensor::randn(1f64, 0.3, shape.2, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let up = Tensor::randn(0f64, 1.0, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let wv = Var::from_tensor(&w).unwrap();
            let y = if fused {
                rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-6, dtype).unwrap()
            } else {
                composed(xv.as_tensor(), wv.as_tensor(), 1e-6).unwrap()
            };
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            (
                y,
                g.get(xv.as_tensor()).unwrap().clone(),
                g.get(wv.as_tensor()).unwrap().clone(),
            )
        };
        let (yf, dxf, dwf) = run(true);
        let (yc, dxc, dwc) = run(false);
        for (name, a, b) in [("value", &yf, &yc), ("dx", &dxf, &dxc), ("dw", &dwf, &dwc)] {
            let e = max_rel(a, b);
            assert!(e < tol, "{dtype:?} {shape:?} {name}: relative error {e}");
        }
        assert_eq!(dwf.dims(), &[shape.2]);
    }

    #[test]
    fn fused_rms_norm_matches_the_composed_op_and_its_gradients() {
        check(DType::F64, (2, 3, 16), 1e-12);
        check(DType::F32, (2, 3, 16), 1e-5);
        // Large enough for the parallel path.
        check(DType::F64, (4, 64, 96), 1e-12);
        check(DType::F32, (4, 64, 96), 1e-5);
    }

    /// The composed LayerNorm the fused op replaces (`ops::layer_norm`'s off-CPU path).
    fn composed_ln(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    /// Value and the three gradients of the fused LayerNorm vs the composed one.
    fn check_ln(dtype: DType, shape: (usize, usize, usize), tol: f64) {
        let dev = Device::Cpu;
        let rand = |mean: f64, std: f64, s: &[usize]| {
            Tensor::randn(mean, std, s, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        // An offset the normalisation must remove.
        let x = (rand(0.0, 2.0, &[shape.0, shape.1, shape.2]) + 3.0).unwrap();
        let w = rand(1.0, 0.3, &[shape.2]);
        let b = rand(0.0, 0.5, &[shape.2]);
        let up = rand(0.0, 1.0, &[shape.0, shape.1, shape.2]);
        let run = |fused: bool| {
            let (xv, wv, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&w).unwrap(),
                Var::from_tensor(&b).unwrap(),
            );
            let y = if fused {
                layer_norm(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1e-5, dtype).unwrap()
            } else {
                composed_ln(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap()
            };
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            [y, grad(&xv), grad(&wv), grad(&bv)]
        };
        let (f, c) = (run(true), run(false));
        for (name, (a, b)) in ["value", "dx", "dw", "db"].iter().zip(f.iter().zip(&c)) {
            assert_eq!(a.dims(), b.dims(), "{name}");
            let e = max_rel(a, b);
            assert!(e < tol, "{dtype:?} {shape:?} {name}: relative error {e}");
        }
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_op_and_its_gradients() {
        check_ln(DType::F64, (2, 3, 16), 1e-12);
        check_ln(DType::F32, (2, 3, 16), 1e-5);
        // Large enough for the parallel path (the ECG encoder's width, many tokens).
        check_ln(DType::F64, (4, 200, 32), 1e-12);
        check_ln(DType::F32, (4, 200, 32), 1e-5);
    }

    /// `ops::layer_norm` in training takes the fused op on the CPU, also for bf16 input (through
    /// f32 and back, the gradient reaching the bf16 input).
    #[test]
    fn training_layer_norm_is_fused_and_takes_bf16() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 8, &dev).unwrap();
        let y = crate::ops::layer_norm(&x, &w, &b, 1e-5, crate::ops::ForwardMode::Train).unwrap();
        let fused = layer_norm(&x, &w, &b, 1e-5, DType::F32).unwrap();
        assert_eq!(max_rel(&y, &fused), 0.0, "the fused op's values exactly");
        let reference = composed_ln(&x, &w, &b, 1e-5).unwrap();
        assert!(max_rel(&y, &reference) < 1e-5);
        let xb = Var::from_tensor(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let y = crate::ops::layer_norm(
            xb.as_tensor(),
            &bf(&w),
            &bf(&b),
            1e-5,
            crate::ops::ForwardMode::Train,
        )
        .unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        assert!(max_rel(&y, &reference) < 3e-2, "bf16 rounding only");
        let g = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(g.get(xb.as_tensor()).unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn fused_rms_norm_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (3, 5), &dev).unwrap();
        let w = Tensor::randn(1f64, 0.2, 5, &dev).unwrap();
        let up = Tensor::randn(0f64, 1.0, (3, 5), &dev).unwrap();
        let loss = |x: &Tensor, w: &Tensor| {
            (rms_norm(x, w, 1e-6, DType::F64).unwrap() * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let xv = Var::from_tensor(&x).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let g = (rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-6, DType::F64).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx: Vec<f64> = g
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let dw: Vec<f64> = g.get(wv.as_tensor()).unwrap().to_vec1().unwrap();
        let h = 1e-6;
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, 7, 14] {
            let bump = |d: f64| {
                let mut v = xs.clone();
                v[i] += d;
                Tensor::from_vec(v, (3, 5), &dev).unwrap()
            };
            let fd = (loss(&bump(h), &w) - loss(&bump(-h), &w)) / (2.0 * h);
            assert!((fd - dx[i]).abs() < 1e-6, "dx[{i}] {} vs {fd}", dx[i]);
        }
        let ws: Vec<f64> = w.to_vec1().unwrap();
        for i in [0, 4] {
            let bump = |d: f64| {
                let mut v = ws.clone();
                v[i] += d;
                Tensor::from_vec(v, 5, &dev).unwrap()
            };
            let fd = (loss(&x, &bump(h)) - loss(&x, &bump(-h))) / (2.0 * h);
            assert!((fd - dw[i]).abs() < 1e-6, "dw[{i}] {} vs {fd}", dw[i]);
        }
    }

    #[test]
    fn bf16_inputs_go_through_f32_and_back() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let xb = Var::from_tensor(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        let y = crate::ops::rms_norm(
            xb.as_tensor(),
            &w.to_dtype(DType::BF16).unwrap(),
            1e-6,
            crate::ops::ForwardMode::Train,
        )
        .unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let reference = composed(&x, &w, 1e-6).unwrap();
        assert!(max_rel(&y, &reference) < 2e-2, "bf16 rounding only");
        let g = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = g.get(xb.as_tensor()).expect("bf16 input gets a gradient");
        assert_eq!(gx.dtype(), DType::BF16);
    }

    /// Masked attention rows (`f32::MIN` logits, whose `exp` is skipped): a partly masked row
    /// puts all its mass on the real logits, a fully masked one (a left-pad query) is uniform,
    /// as with the reference's additive `finfo.min` mask.
    #[test]
    fn masked_logits_get_no_mass_and_a_fully_masked_row_is_uniform() {
        let m = f32::MIN;
        let x = Tensor::new(
            &[[0.0f32, m, 0.0, m], [m, m, m, m], [1.0, -100.0, m, 2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let y: Vec<Vec<f32>> = softmax_last_dim(&x, DType::F32).unwrap().to_vec2().unwrap();
        assert_eq!(y[0], vec![0.5, 0.0, 0.5, 0.0]);
        assert_eq!(y[1], vec![0.25; 4]);
        let (e1, e2) = ((1.0f64 - 2.0).exp(), 1.0);
        let z = e1 + e2 + (-102.0f64).exp();
        assert!((y[2][0] as f64 - e1 / z).abs() < 1e-7 && (y[2][3] as f64 - e2 / z).abs() < 1e-7);
        assert_eq!(y[2][2], 0.0);
        for dtype in [DType::F32, DType::F64] {
            let y = softmax_last_dim(&x.to_dtype(dtype).unwrap(), dtype).unwrap();
            let sums: Vec<f64> = y
                .sum(1)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                sums.iter().all(|s| (s - 1.0).abs() < 1e-6),
                "{dtype:?}: {sums:?}"
            );
        }
    }

    #[test]
    fn fused_softmax_matches_the_composed_op_and_its_gradient() {
        let dev = Device::Cpu;
        for (dtype, shape, tol) in [
            (DType::F64, (2, 3, 7), 1e-12),
            (DType::F32, (2, 3, 7), 1e-5),
            (DType::F32, (4, 64, 80), 1e-5),
        ] {
            // Large logits and a fully masked-like row (-inf but one) as attention produces.
            let mut x = (Tensor::randn(0f64, 4.0, shape, &dev).unwrap() + 30.0).unwrap();
            let mut row0 = vec![f64::NEG_INFINITY; shape.2];
            row0[1] = 0.5;
            let rest = x.flatten_all().unwrap().to_vec1::<f64>().unwrap()[shape.2..].to_vec();
            row0.extend(rest);
            x = Tensor::from_vec(row0, shape, &dev).unwrap();
            let x = x.to_dtype(dtype).unwrap();
            let up = Tensor::randn(0f64, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |fused: bool| {
                let xv = Var::from_tensor(&x).unwrap();
                let y = if fused {
                    softmax_last_dim(xv.as_tensor(), dtype).unwrap()
                } else {
                    let max = xv.as_tensor().max_keepdim(D::Minus1).unwrap().detach();
                    let e = xv.as_tensor().broadcast_sub(&max).unwrap().exp().unwrap();
                    let s = e.sum_keepdim(D::Minus1).unwrap();
                    e.broadcast_div(&s).unwrap()
                };
                let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(xv.as_tensor()).unwrap().clone())
            };
            let (yf, gf) = run(true);
            let (yc, gc) = run(false);
            assert!(max_rel(&yf, &yc) < tol, "{dtype:?} value");
            assert!(max_rel(&gf, &gc) < tol, "{dtype:?} gradient");
            let g0: Vec<f64> = gf
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                g0[..shape.2].iter().all(|v| v.is_finite() && *v == 0.0),
                "one-hot row"
            );
        }
    }

    /// Attention's scale, mask and softmax in one op against the composed ops it replaces
    /// (`scores · scale` in the data's type, `where_cond` with the f32 minimum, softmax): value
    /// and gradient, f64 and f32 (large enough for the parallel path), a mask per batch row and
    /// one shared, grouped-query rows (`q = n_rep · s`, row `r` reading query `r mod s`), a
    /// fully masked query (uniform, no gradient), and bf16 scores computed in f32.
    #[test]
    fn fused_scaled_masked_softmax_matches_the_composed_ops_and_their_gradient() {
        let dev = Device::Cpu;
        // (dtype, (b, heads, q, t), mask batch, mask queries s, tolerance)
        for (dtype, (b, h, q, t), mb, sq, tol) in [
            (DType::F64, (2, 2, 6, 7), 2, 3, 1e-12),
            (DType::F32, (2, 2, 6, 7), 1, 6, 1e-6),
            (DType::F32, (2, 4, 96, 50), 2, 48, 1e-6),
            (DType::BF16, (2, 2, 6, 7), 2, 3, 2e-2),
        ] {
            let scale = 0.37;
            // Deterministic data (a seedless random draw made the bf16 case flaky).
            let wave = |f: f64, amp: f64, off: f64| {
                let n = b * h * q * t;
                let v: Vec<f64> = (0..n).map(|i| off + amp * (i as f64 * f).sin()).collect();
                Tensor::from_vec(v, (b, h, q, t), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (x, up) = (wave(0.7311, 3.0, 5.0), wave(0.3917, 1.0, 0.0));
            // Causal over the last `sq` keys, a padded first key in batch row 1, and query 0 of
            // batch row 0 with no visible key.
            let mut m = vec![0u8; mb * sq * t];
            for bi in 0..mb {
                for i in 0..sq {
                    for j in 0..t {
                        let causal = j <= t - sq + i;
                        let padded = bi == 1 && j == 0;
                        let blind = bi == 0 && i == 0;
                        m[(bi * sq + i) * t + j] = u8::from(causal && !padded && !blind);
                    }
                }
            }
            let mask = Tensor::from_vec(m, (mb, 1, sq, t), &dev).unwrap();
            let run = |fused: bool| {
                let xv = Var::from_tensor(&x).unwrap();
                let y = if fused {
                    crate::ops::attention_probs(
                        xv.as_tensor(),
                        scale,
                        Some(&mask),
                        crate::ops::ForwardMode::Train,
                    )
                    .unwrap()
                } else {
                    let work = crate::ops::compute_dtype(dtype);
                    let scaled = (xv.as_tensor() * scale)
                        .unwrap()
                        .to_dtype(work)
                        .unwrap()
                        .reshape((b, h * q / sq, sq, t))
                        .unwrap();
                    let neg = Tensor::new(f64::from(f32::MIN), &dev)
                        .unwrap()
                        .to_dtype(work)
                        .unwrap()
                        .broadcast_as(scaled.shape())
                        .unwrap();
                    let masked = mask
                        .broadcast_as(scaled.shape())
                        .unwrap()
                        .where_cond(&scaled, &neg)
                        .unwrap();
                    let max = masked.max_keepdim(D::Minus1).unwrap().detach();
                    let e = masked.broadcast_sub(&max).unwrap().exp().unwrap();
                    let sum = e.sum_keepdim(D::Minus1).unwrap();
                    e.broadcast_div(&sum)
                        .unwrap()
                        .reshape((b, h, q, t))
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(xv.as_tensor()).unwrap().clone())
            };
            let (yf, gf) = run(true);
            let (yc, gc) = run(false);
            assert_eq!(yf.dtype(), dtype);
            assert!(max_rel(&yf, &yc) < tol, "{dtype:?} {mb} value");
            assert!(max_rel(&gf, &gc) < tol, "{dtype:?} {mb} gradient");
            let (y, g): (Vec<f64>, Vec<f64>) = (
                yf.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                gf.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
            let m: Vec<u8> = mask.flatten_all().unwrap().to_vec1().unwrap();
            for (r, (yr, gr)) in y.chunks(t).zip(g.chunks(t)).enumerate() {
                let bi = if mb == 1 { 0 } else { r / (h * q) };
                let mr = &m[(bi * sq + r % sq) * t..][..t];
                if mr.iter().all(|&k| k == 0) {
                    // No visible key: uniform, and no gradient.
                    assert!(
                        yr.iter().all(|&p| (p - 1.0 / t as f64).abs() < 1e-3),
                        "row {r}"
                    );
                    assert!(gr.iter().all(|&d| d == 0.0), "row {r}");
                } else {
                    for ((&p, &d), &k) in yr.iter().zip(gr).zip(mr) {
                        assert!(k != 0 || (p == 0.0 && d == 0.0), "masked key in row {r}");
                    }
                }
            }
        }
    }

    /// The mask must fit the scores: a query count that does not divide the rows is refused.
    #[test]
    fn fused_masked_softmax_refuses_a_mask_of_another_shape() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 5, 4), DType::F32, &dev).unwrap();
        let mask = Tensor::ones((1, 1, 3, 4), DType::U8, &dev).unwrap();
        let e = scaled_masked_softmax(&x, 1.0, Some(&mask), DType::F32).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }

    /// A bias's gradient: the rows' sums as candle's `sum(0)` (f64, f32 serial and parallel), and
    /// bf16 through candle's own sum.
    #[test]
    fn row_sums_equal_candle_sum_over_the_first_dimension() {
        let dev = Device::Cpu;
        for (dtype, rows, tol) in [
            (DType::F64, 7, 1e-12),
            (DType::F32, 7, 1e-6),
            (DType::F32, 300, 1e-6),
            (DType::BF16, 9, 0.0),
        ] {
            let g = Tensor::randn(0f64, 1.0, (rows, 96), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let ours = sum_rows(&g).unwrap();
            assert_eq!(ours.dims(), &[96]);
            assert_eq!(ours.dtype(), dtype);
            let e = max_rel(&ours, &g.sum(0).unwrap());
            assert!(e <= tol, "{dtype:?} {rows}: {e}");
        }
    }

    /// SwiGLU against candle's `silu(gate) * up`: value and both gradients, f64 and f32
    /// (large enough for the parallel path), gates far in both tails (σ saturated), and a bf16
    /// input computed in f32 and cast back.
    #[test]
    fn fused_swiglu_matches_silu_times_up_and_its_gradients() {
        let dev = Device::Cpu;
        for (dtype, shape, tol) in [
            (DType::F64, (2, 3, 7), 1e-12),
            (DType::F32, (2, 3, 7), 1e-6),
            (DType::F32, (2, 40, 700), 1e-6),
            (DType::BF16, (2, 5, 9), 1e-2),
        ] {
            let n = shape.0 * shape.1 * shape.2;
            // Gates from −30 to 30 (and two beyond ±90): both tails of the sigmoid.
            let mut gv: Vec<f64> = (0..n).map(|i| 30.0 * ((i as f64) * 0.61).sin()).collect();
            gv[0] = -95.0;
            gv[1] = 95.0;
            let gate = Tensor::from_vec(gv, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let up = Tensor::randn(0f64, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let dy = Tensor::randn(0f64, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |fused: bool| {
                // The composed side in the work dtype (bf16 too: the fused op computes in f32).
                let work = crate::ops::compute_dtype(dtype);
                let g = Var::from_tensor(&gate).unwrap();
                let u = Var::from_tensor(&up).unwrap();
                let y = if fused {
                    swiglu(g.as_tensor(), u.as_tensor()).unwrap()
                } else {
                    let (gw, uw) = (
                        g.as_tensor().to_dtype(work).unwrap(),
                        u.as_tensor().to_dtype(work).unwrap(),
                    );
                    (gw.silu().unwrap() * uw).unwrap().to_dtype(dtype).unwrap()
                };
                let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    y,
                    grads.get(g.as_tensor()).unwrap().clone(),
                    grads.get(u.as_tensor()).unwrap().clone(),
                )
            };
            let (yf, gf, uf) = run(true);
            let (yc, gc, uc) = run(false);
            assert_eq!(yf.dtype(), dtype);
            assert!(max_rel(&yf, &yc) < tol, "{dtype:?} {shape:?} value");
            assert!(
                max_rel(&gf, &gc) < tol,
                "{dtype:?} {shape:?} dgate {}",
                max_rel(&gf, &gc)
            );
            assert!(
                max_rel(&uf, &uc) < tol,
                "{dtype:?} {shape:?} dup {}",
                max_rel(&uf, &uc)
            );
        }
    }

    #[test]
    fn fused_chosen_log_probs_match_log_softmax_gather_and_its_gradient() {
        let dev = Device::Cpu;
        for (dtype, (b, t, v), tol) in [
            (DType::F64, (2, 3, 11), 1e-12),
            (DType::F32, (2, 3, 11), 1e-5),
            (DType::F32, (2, 16, 1200), 1e-5),
        ] {
            let x = (Tensor::randn(0f64, 3.0, (b, t, v), &dev).unwrap() + 50.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let labels: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
            let labels = Tensor::from_vec(labels, (b, t), &dev).unwrap();
            let up = Tensor::randn(0f64, 1.0, (b, t), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |fused: bool| {
                let xv = Var::from_tensor(&x).unwrap();
                let lp = if fused {
                    chosen_log_probs(xv.as_tensor(), &labels).unwrap()
                } else {
                    let x = xv.as_tensor();
                    let max = x.max_keepdim(D::Minus1).unwrap().detach();
                    let sh = x.broadcast_sub(&max).unwrap();
                    let l = sh
                        .exp()
                        .unwrap()
                        .sum_keepdim(D::Minus1)
                        .unwrap()
                        .log()
                        .unwrap();
                    sh.broadcast_sub(&l)
                        .unwrap()
                        .gather(&labels.unsqueeze(D::Minus1).unwrap(), D::Minus1)
                        .unwrap()
                        .squeeze(D::Minus1)
                        .unwrap()
                };
                let g = (&lp * &up).unwrap().sum_all().unwrap().backward().unwrap();
                (lp, g.get(xv.as_tensor()).unwrap().clone())
            };
            let (lf, gf) = run(true);
            let (lc, gc) = run(false);
            assert_eq!(lf.dims(), &[b, t]);
            assert!(max_rel(&lf, &lc) < tol, "{dtype:?} value");
            assert!(max_rel(&gf, &gc) < tol, "{dtype:?} gradient");
        }
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let bad = Tensor::new(&[1u32, 4], &dev).unwrap();
        assert!(
            chosen_log_probs(&x, &bad).is_err(),
            "label 4 of a vocabulary of 4"
        );
    }

    #[test]
    fn fused_rope_matches_the_composed_rotation_and_its_gradient() {
        let dev = Device::Cpu;
        let rot_half = |x: &Tensor| {
            let d = x.dim(D::Minus1).unwrap();
            let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
            let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
            Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap()
        };
        let full = |t: &Tensor| Tensor::cat(&[t, t], D::Minus1).unwrap();
        // (x shape, table shape, layout)
        let cases: [(&[usize], &[usize], RopeLayout); 3] = [
            (&[2, 3, 5, 8], &[2, 5, 4], RopeLayout::Bhtd),
            (&[2, 3, 5, 8], &[1, 5, 4], RopeLayout::Bhtd),
            (&[6, 2, 8], &[6, 4], RopeLayout::Thd),
        ];
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for (xs, ts, layout) in cases {
                let x = Tensor::randn(0f64, 1.0, xs, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let ang = Tensor::randn(0f64, 2.0, ts, &dev).unwrap();
                let (c, sn) = (
                    ang.cos().unwrap().to_dtype(dtype).unwrap(),
                    ang.sin().unwrap().to_dtype(dtype).unwrap(),
                );
                let up = Tensor::randn(0f64, 1.0, xs, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                // Both layouts broadcast the tables over the heads axis (axis 1 of x or of (t, 1, d)).
                let (cf, sf) = (
                    full(&c).unsqueeze(1).unwrap(),
                    full(&sn).unsqueeze(1).unwrap(),
                );
                let run = |fused: bool| {
                    let xv = Var::from_tensor(&x).unwrap();
                    let y = if fused {
                        rope(xv.as_tensor(), &c, &sn, layout, dtype).unwrap()
                    } else {
                        (xv.as_tensor().broadcast_mul(&cf).unwrap()
                            + rot_half(xv.as_tensor()).broadcast_mul(&sf).unwrap())
                        .unwrap()
                    };
                    let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, g.get(xv.as_tensor()).unwrap().clone())
                };
                let (yf, gf) = run(true);
                let (yc, gc) = run(false);
                assert!(max_rel(&yf, &yc) < tol, "{dtype:?} {xs:?} {ts:?} value");
                assert!(max_rel(&gf, &gc) < tol, "{dtype:?} {xs:?} {ts:?} gradient");
            }
        }
        // Tables that are views into a larger tensor (a storage offset) are read through their
        // layout.
        let x = Tensor::randn(0f32, 1.0, (6, 2, 8), &dev).unwrap();
        let ang = Tensor::randn(0f32, 2.0, (12, 4), &dev).unwrap();
        let (c, sn) = (ang.cos().unwrap(), ang.sin().unwrap());
        let (cv, sv) = (c.narrow(0, 6, 6).unwrap(), sn.narrow(0, 6, 6).unwrap());
        let (cc, sc) = (cv.copy().unwrap(), sv.copy().unwrap());
        let view = rope(&x, &cv, &sv, RopeLayout::Thd, DType::F32).unwrap();
        let copied = rope(&x, &cc, &sc, RopeLayout::Thd, DType::F32).unwrap();
        assert_eq!(max_rel(&view, &copied), 0.0, "offset tables");
        let x = Tensor::zeros((2, 3, 5, 8), DType::F32, &dev).unwrap();
        let t = Tensor::zeros((3, 5, 4), DType::F32, &dev).unwrap();
        assert!(
            rope(&x, &t, &t, RopeLayout::Bhtd, DType::F32).is_err(),
            "3 table batches for 2"
        );
    }
}
