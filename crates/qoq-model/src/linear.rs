//! The linear layers of the model, `x · Wᵀ (+ b)`, with a backward that computes what the
//! gradient store needs and nothing else.
//!
//! candle's `Linear` is a matrix product with the transposed weight and a broadcast bias add.
//! Its backward computes the gradient of both factors, whether they are trained or not, and
//! gives the weight's gradient as the transpose of a `(in, out)` product, which candle's
//! backward then adds, element by element through the transposed strides (one cache miss per
//! element), into a fresh zeroed `(out, in)` tensor; the bias add keeps its own `(rows, out)`
//! gradient; and an input that is not contiguous (the response positions that `lm_head` reads)
//! makes candle broadcast the weight over the batch, whose backward builds a `(b, in, out)`
//! tensor before summing it. [`linear`] runs the layer as one custom op instead:
//!
//! * a trained weight ([`TrainedLinear`]): the forward is one product (and the bias added in
//!   place); the backward gives the input's gradient `g · W` only when the input is tracked
//!   (not for pixel values), the weight's as `gᵀ · x` directly in the weight's `(out, in)`
//!   layout, and the bias's as the column sums of `g`;
//! * a frozen weight (a LoRA base, a frozen LLM under a trained tower; [`FrozenMatmul`]): the
//!   op is over the input alone and its backward gives `g · W`; the weight gets no gradient
//!   (candle would keep a weight-sized gradient of it until the backward ends). Inference
//!   (nothing tracked) takes the same op, which then records nothing.
//!
//! Every f32 product picks its path by shape: up to `FEW_ROWS` rows (decoding), a pass over the
//! weights that reads each weight row once for all rows (`few_rows_product`); beyond, with few
//! rows or a weight wider in its input than its output, `(W · xᵀ)ᵀ`, several times faster than
//! `x · Wᵀ` with candle's CPU product (`transposed_is_faster`).
//!
//! Written here because candle has no "no gradient for this operand" switch. CPU only;
//! elsewhere (and for a trained weight in another dtype than its input) candle's `Linear` runs.

use crate::matmul::matmul;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use candle_nn::Linear;

/// `x · Wᵀ (+ b)` of `lin` for `x: (..., in)` → `(..., out)` (see the module docs for the paths).
pub fn linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    let w = lin.weight();
    let cpu = x.device().is_cpu() && w.device().is_cpu();
    let trained = w.track_op() || lin.bias().is_some_and(Tensor::track_op);
    if !cpu || (trained && x.dtype() != w.dtype()) {
        return lin.forward(x);
    }
    // The ops take `x` with all its leading dimensions (the product is over its rows): a reshape
    // to rows and back would be two more graph nodes, whose gradients candle's backward adds
    // into fresh zeroed tensors the activation's size (a third of the elements of such sums in
    // a demo SFT step).
    let x2 = x.contiguous()?;
    let y = if trained {
        match lin.bias() {
            Some(b) => x2.apply_op3_arc(w, b, std::sync::Arc::new(Box::new(TrainedLinear)))?,
            None => x2.apply_op2(w, TrainedLinear)?,
        }
    } else {
        let y = x2.apply_op1(FrozenMatmul {
            w: w.to_dtype(x.dtype())?,
        })?;
        match lin.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }
    };
    Ok(y)
}

/// `x (..., in) → x · Wᵀ (+ b) (..., out)` for a trained `W: (out, in)` (and `b: (out,)`):
/// the op's inputs are `x`, `W` and, when there is one, `b`.
struct TrainedLinear;

/// `x · Wᵀ` of the storages of `x: (rows, in)` and `W: (out, in)`, by candle's CPU product with
/// the weight's layout transposed (no copy); in f32, as `(W · xᵀ)ᵀ` where that is faster
/// ([`transposed_is_faster`]).
fn product(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let dims = xl.dims();
    let Some(&k) = dims.last() else {
        candle_core::bail!("linear: a scalar input");
    };
    let m = xl.shape().elem_count() / k.max(1);
    // `x (..., k)` as rows `(m, k)`: a 2-D layout as it is (any strides), another rank when
    // contiguous.
    let xl = &if dims.len() == 2 {
        xl.clone()
    } else if xl.is_contiguous() {
        Layout::contiguous_with_offset((m, k), xl.start_offset())
    } else {
        candle_core::bail!("linear: a non-contiguous input {dims:?}");
    };
    let (n, kw) = wl.shape().dims2()?;
    if k != kw {
        candle_core::bail!("linear: input {dims:?} for weight {:?}", wl.dims());
    }
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    let out = Shape::from(out);
    if (1..=FEW_ROWS).contains(&m)
        && let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w)
        && let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
    {
        let y = few_rows_product(&xs[x0..x1], &ws[w0..w1], m, k, n);
        return Ok((CpuStorage::F32(y), out));
    }
    if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (x, w)
        && transposed_is_faster(m, k, n)
        && let CpuStorage::F32(yt) =
            crate::matmul::storage_matmul(w, wl, x, &xl.transpose(0, 1)?, (1, n, m, k))?
    {
        return Ok((CpuStorage::F32(transpose(&yt, n, m)), out));
    }
    let y = crate::matmul::storage_matmul(x, xl, w, &wl.transpose(0, 1)?, (1, m, n, k))?;
    Ok((y, out))
}

/// Rows of `x` up to which [`few_rows_product`] computes `x · Wᵀ`: decoding (one row per
/// sequence) and the rollouts of a small RL step.
const FEW_ROWS: usize = 4;

/// `x · Wᵀ` for `x: (m, k)` with few rows and `W: (n, k)`, both row-major f32: each weight row is
/// read once, for all of `x`'s rows, with the output's rows split over the threads.
///
/// Written here because such a product is a pass over the weights (memory-bound: 2 flops per
/// weight read per row) and candle's CPU product (the `gemm` crate) reads them at about half the
/// speed MKL does (1 x 896 x 4864: 9.6 vs 19.4 GFLOP/s, README "CPU matrix products"); every
/// decoding step of every row is such a product. The dot products keep 16 partial sums, which
/// the compiler turns into vector registers (AVX-512 or AVX2 when the CPU has them, chosen at
/// run time), so the sums are taken in another order than a plain loop's.
fn few_rows_product(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    // Weight rows per task: about 256 KiB of weights, whole cache lines of output.
    let rows_per_task = ((1 << 16) / k.max(1)).clamp(16, 4096);
    let dot = dot_kernel();
    let mut yt = vec![0f32; n * m]; // (n, m): row j holds x_i · w_j for every i
    yt.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(t, out)| {
            let first = t * rows_per_task;
            for (j, o) in out.chunks_mut(m).enumerate() {
                let wj = &w[(first + j) * k..(first + j + 1) * k];
                for (i, v) in o.iter_mut().enumerate() {
                    *v = dot.call(&x[i * k..(i + 1) * k], wj);
                }
            }
        });
    if m == 1 { yt } else { transpose(&yt, n, m) }
}

/// The dot product compiled for the widest vector instructions this CPU has, chosen once per
/// product (the features are checked here, not per dot product).
#[derive(Clone, Copy)]
struct DotKernel(unsafe fn(&[f32], &[f32]) -> f32);

impl DotKernel {
    #[allow(unsafe_code)] // the kernel was chosen for features this CPU has (dot_kernel)
    fn call(self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: dot_kernel picks a target-feature variant only after detecting its features.
        unsafe { (self.0)(a, b) }
    }
}

fn dot_kernel() -> DotKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return DotKernel(dot_avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return DotKernel(dot_avx2);
        }
    }
    DotKernel(dot_lanes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// The dot product with 16 independent partial sums (vectorisable; multiply then add, as
/// `mul_add` would call a library routine where the CPU has no FMA), then the tail.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in at.iter().zip(bt) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// Whether `x (m, k) · Wᵀ (k, n)` is faster computed as `W · xᵀ` and transposed back, with
/// candle's CPU product (the `gemm` crate's AVX-512 kernels): when `x` has few rows, the plain
/// orientation packs the whole weight for a product that uses each packed element a few times,
/// and when the weight is wide in `k` (an MLP's down projection) it is slow at every row count.
/// From one throwaway benchmark, both orientations per shape in the same run, 2 threads on the
/// development machine (GFLOP/s, plain vs transposed): the 0.5B model's down projection
/// (4864 -> 896) at 32 rows 17-39 vs 49-135, at 80 rows 35-81 vs 78-173, at 512 rows 43-118 vs
/// 47-167; its up projection (896 -> 4864) at 32 rows 35-102 vs 78-180, at 512 rows 114-169 vs
/// 98-155 (plain kept). Up to [`FEW_ROWS`] rows [`product`] takes [`few_rows_product`] first.
fn transposed_is_faster(m: usize, k: usize, n: usize) -> bool {
    m > 1 && (m < 256 || k > n)
}

/// The `(cols, rows)` transpose of the row-major `(rows, cols)` matrix `a`, by tiles (each tile's
/// reads and writes stay in cache), in parallel over the output's row blocks.
/// Written into memory that is not zeroed first (as [`crate::matmul`]'s products).
#[allow(unsafe_code)] // `assume_init` of an output whose every element is written
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let mut out = crate::matmul::uninit(rows * cols);
    out.par_chunks_mut((TILE * rows).max(1))
        .enumerate()
        .for_each(|(cb, block)| {
            let c0 = cb * TILE;
            let c1 = (c0 + TILE).min(cols);
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let src = &a[r * cols..];
                    for c in c0..c1 {
                        block[(c - c0) * rows + r].write(src[c]);
                    }
                }
            }
        });
    // SAFETY: the blocks cover `out` (TILE columns of the input each, the last one the rest),
    // and each writes its columns' every row.
    unsafe { crate::matmul::assume_init(out) }
}

/// Adds `b` (contiguous `(out,)`) to every row of `y` in place.
fn add_bias(y: &mut CpuStorage, b: &CpuStorage, bl: &Layout) -> Result<()> {
    fn rows<T: Copy + std::ops::AddAssign + Send + Sync>(y: &mut [T], b: &[T]) {
        use rayon::prelude::*;
        if b.is_empty() {
            return;
        }
        y.par_chunks_mut(b.len().max(1 << 14).next_multiple_of(b.len()))
            .for_each(|c| {
                for row in c.chunks_mut(b.len()) {
                    for (v, &x) in row.iter_mut().zip(b) {
                        *v += x;
                    }
                }
            });
    }
    let Some((lo, hi)) = bl.contiguous_offsets() else {
        candle_core::bail!("linear: a non-contiguous bias");
    };
    match (y, b) {
        (CpuStorage::F32(y), CpuStorage::F32(b)) => rows(y, &b[lo..hi]),
        (CpuStorage::F64(y), CpuStorage::F64(b)) => rows(y, &b[lo..hi]),
        (CpuStorage::BF16(y), CpuStorage::BF16(b)) => rows(y, &b[lo..hi]),
        (CpuStorage::F16(y), CpuStorage::F16(b)) => rows(y, &b[lo..hi]),
        _ => candle_core::bail!("linear: the bias's dtype differs from the input's"),
    }
    Ok(())
}

/// The gradients of `x · Wᵀ` for the output gradient `g: (rows, out)`: the input's `g · W` when
/// `x` is tracked, the weight's `gᵀ · x` (`(out, in)`, contiguous) when `W` is.
///
/// Under [`crate::checkpoint::backward`] a trained weight that is a variable gets its gradient
/// added to the backward's sums directly ([`crate::checkpoint::add_to_sum`]: in place from the
/// second use or micro-batch on), not through candle's store.
///
/// The products run on detached views of `x` and `W`: a gradient computed from the tracked
/// tensors would itself record a graph over them, and candle never detaches what it stores for
/// a variable, so every weight's gradient would keep its layer's input and output gradient
/// (and the zeros it was added to) alive until the backward ends (a 0.5B step ran out of
/// 24 GiB that way).
///
/// `g` is the output gradient as rows `(rows, out)`, detached (taken once per backward, for the
/// bias's gradient too); `x` has its own shape `(..., in)`, which `dx` takes.
fn product_grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let xr = as_rows(&x.detach())?;
    let dx = if x.track_op() {
        Some(matmul(g, &w.detach())?.reshape(x.shape())?)
    } else {
        None
    };
    let dw_of = || matmul(&g.t()?, &xr);
    // The weight's gradient, in the dtype of the sum it goes to (a compute copy's master's).
    let delivered = |w: &Tensor| {
        crate::checkpoint::add_to_sum(w, |sum, dtype| match sum {
            Some(sum) => add_weight_grad_into(sum, g, &xr, WEIGHT_GRAD_BLOCK),
            None => dw_of()?.to_dtype(dtype).map(Some),
        })
    };
    let dw = if !w.track_op() || delivered(w)? {
        None
    } else {
        Some(dw_of()?)
    };
    Ok((dx, dw))
}

/// `t (..., n)` as `(rows, n)`.
fn as_rows(t: &Tensor) -> Result<Tensor> {
    let n = t.dims().last().copied().unwrap_or(1);
    t.reshape((t.elem_count() / n.max(1), n))
}

/// Elements of one block of a weight gradient added into its sum by [`add_weight_grad_into`].
const WEIGHT_GRAD_BLOCK: usize = 1 << 22;

/// `sum += gᵀ · x` for a weight's running gradient sum `sum: (out, in)`, the output gradient
/// `g: (rows, out)` and the input `x: (rows, in)`. Where the sum can be written in place
/// ([`crate::checkpoint::add_into`]'s condition) the product is computed and added in blocks of
/// at most `block` elements (whole rows of the weight), each block added into its rows of the
/// sum: the whole product was a transient the size of the weight beside its sum, the largest
/// one of the training step (a 0.5B's tied embedding / `lm_head`, 136M elements, sat at the
/// bf16 recipe's peak). Returns `None` when added in place, otherwise the new sum.
fn add_weight_grad_into(
    sum: &Tensor,
    g: &Tensor,
    x: &Tensor,
    block: usize,
) -> Result<Option<Tensor>> {
    let (out, inp) = sum.dims2()?;
    let rows_per_block = (block / inp.max(1)).max(1);
    if out <= rows_per_block || !crate::checkpoint::adds_in_place(sum) {
        return crate::checkpoint::add_into(sum, &matmul(&g.t()?, x)?);
    }
    let gt = g.t()?;
    for r0 in (0..out).step_by(rows_per_block) {
        let n = rows_per_block.min(out - r0);
        let part = matmul(&gt.narrow(0, r0, n)?, x)?;
        // A row block of a contiguous sum is contiguous: always added in place.
        if crate::checkpoint::add_into(&sum.narrow(0, r0, n)?, &part)?.is_some() {
            candle_core::bail!("linear: a weight gradient's row block was not added in place");
        }
    }
    Ok(None)
}

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "qoq-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        product(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        product_grads(x, w, &as_rows(&g.detach())?)
    }
}

impl CustomOp3 for TrainedLinear {
    fn name(&self) -> &'static str {
        "qoq-linear-bias"
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
        let (mut y, shape) = product(s1, l1, s2, l2)?;
        if l3.dims() != [*shape.dims().last().unwrap_or(&0)] {
            candle_core::bail!("linear: bias {:?} for output {:?}", l3.dims(), shape.dims());
        }
        add_bias(&mut y, s3, l3)?;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = as_rows(&g.detach())?;
        let (dx, dw) = product_grads(x, w, &g)?;
        let db = if b.track_op() {
            Some(crate::fused::sum_rows(&g)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `x (..., in) → x · Wᵀ (..., out)` with `W: (out, in)` frozen.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "qoq-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen linear: the weight left the CPU");
        };
        product(s, l, ws, wl)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        matmul(&as_rows(grad)?, &self.w)?
            .reshape(x.shape())
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::wave;
    use candle_core::{DType, Device, Var};

    /// The input's gradient equals the plain product's, the forward too, and the frozen weight
    /// (and its transpose) get no entry in the gradient store.
    #[test]
    fn the_input_gets_the_plain_gradient_and_the_weight_none() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::randn(0f32, 1.0, 5, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let lin = Linear::new(w.clone(), Some(b));
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, 4, 3), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let g = Tensor::randn(0f32, 1.0, (2, 4, 5), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let plain = candle_core::Module::forward(&lin, x.as_tensor()).unwrap();
            let ours = linear(&lin, x.as_tensor()).unwrap();
            assert!(max_diff(&plain, &ours) < 1e-5, "{dtype:?}");
            let gp = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (
                gp.get(x.as_tensor()).unwrap(),
                go.get(x.as_tensor()).unwrap(),
            );
            assert!(max_diff(a, b) < 1e-5, "{dtype:?}");
            // The plain product holds a weight-sized gradient for the frozen factor; ours none.
            let weight_sized = |gs: &candle_core::backprop::GradStore| {
                gs.get_ids()
                    .filter(|id| {
                        gs.get_id(**id)
                            .is_some_and(|t| t.dims() == [3, 5] || t.dims() == [5, 3])
                    })
                    .count()
            };
            assert!(weight_sized(&gp) > 0);
            assert_eq!(weight_sized(&go), 0);
        }
    }

    /// A weight gradient added into its sum in row blocks (block sizes that split the rows
    /// unevenly, one row per block, more than all rows) equals the sum plus the whole product,
    /// f32 and bf16, in place; a strided sum gets the whole product as a new sum.
    #[test]
    fn weight_gradient_added_in_row_blocks_equals_the_whole_product() {
        let dev = Device::Cpu;
        let (rows, out, inp) = (6, 37, 5);
        let g = Tensor::randn(0f32, 1.0, (rows, out), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
        let start = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (g, x) = (g.to_dtype(dtype).unwrap(), x.to_dtype(dtype).unwrap());
            let whole = g.t().unwrap().matmul(&x).unwrap();
            let want = (start.to_dtype(dtype).unwrap() + &whole).unwrap();
            for block in [4 * inp + 3, inp, 1, 1000] {
                // A copy: f32's `to_dtype` shares `start`'s storage, which the add writes.
                let sum = start.to_dtype(dtype).unwrap().copy().unwrap();
                let new = add_weight_grad_into(&sum, &g, &x, block).unwrap();
                assert!(new.is_none(), "{dtype:?} block {block}: not in place");
                let d = max_diff(&sum, &want);
                assert!(d < 1e-6, "{dtype:?} block {block}: {d}");
            }
        }
        let strided = start.t().unwrap().contiguous().unwrap().t().unwrap();
        let new = add_weight_grad_into(&strided, &g, &x, inp)
            .unwrap()
            .expect("a new sum");
        let want = (&start + g.t().unwrap().matmul(&x).unwrap()).unwrap();
        assert!(max_diff(&new, &want) < 1e-6);
    }

    /// Inference products in both orientations (few rows, wide inputs, many rows with narrow
    /// inputs, one row) equal candle's `Linear`, the bias included, and the tiled transpose
    /// handles sizes that are not multiples of its tile.
    #[test]
    fn products_in_either_orientation_equal_candles() {
        let dev = Device::Cpu;
        // (rows, in, out) and whether the product runs transposed.
        for (m, k, n, transposed) in [
            (1, 7, 5, false),
            (40, 70, 33, true),
            (300, 20, 50, false),
            (300, 50, 20, true),
            (257, 33, 65, false),
        ] {
            assert_eq!(transposed_is_faster(m, k, n), transposed, "{m}x{k}x{n}");
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
            let lin = Linear::new(w, Some(b));
            let plain = candle_core::Module::forward(&lin, &x).unwrap();
            let ours = linear(&lin, &x).unwrap();
            assert_eq!(ours.dims(), plain.dims());
            let d = max_diff(&plain, &ours);
            assert!(d < 1e-4, "{m}x{k}x{n}: {d}");
        }
        let a: Vec<f32> = (0..37 * 70).map(|v| v as f32).collect();
        let t = transpose(&a, 37, 70);
        for r in 0..37 {
            for c in 0..70 {
                assert_eq!(t[c * 37 + r], a[r * 70 + c]);
            }
        }
    }

    /// Up to four rows, over inputs that are not a multiple of the 16 lanes and outputs that span
    /// several tasks, the few-rows product equals the f64 product (f32 rounding only), and the
    /// layer takes it for trained and frozen weights alike (with the bias added once).
    #[test]
    fn few_rows_products_equal_the_f64_product() {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 7, 5),
            (2, 33, 2100),
            (3, 896, 300),
            (4, 16, 4097),
            (1, 4864, 70),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.11).cos()).collect();
            let y = few_rows_product(&x, &w, m, k, n);
            assert_eq!(y.len(), m * n);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|l| f64::from(x[i * k + l]) * f64::from(w[j * k + l]))
                        .sum();
                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + exact.abs());
                    let got = f64::from(y[i * n + j]);
                    assert!(
                        (got - exact).abs() < tol,
                        "{m}x{k}x{n} [{i},{j}]: {got} vs {exact}"
                    );
                }
            }
            let wt = Tensor::from_vec(w, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let xt = Tensor::from_vec(x, (1, m, k), &dev).unwrap();
            let plain = (xt.matmul(&wt.t().unwrap().unsqueeze(0).unwrap()).unwrap())
                .broadcast_add(&b)
                .unwrap();
            let frozen = linear(&Linear::new(wt.clone(), Some(b.clone())), &xt).unwrap();
            let wv = Var::from_tensor(&wt).unwrap();
            let trained = linear(&Linear::new(wv.as_tensor().clone(), Some(b)), &xt).unwrap();
            for (what, t) in [("frozen", frozen), ("trained", trained)] {
                let d = max_diff(&plain, &t);
                assert!(d < 1e-3, "{what} {m}x{k}x{n}: {d}");
            }
        }
        // No rows (an empty batch) stays candle's product.
        let w = Tensor::ones((5, 7), DType::F32, &dev).unwrap();
        let empty = Tensor::zeros((1, 0, 7), DType::F32, &dev).unwrap();
        let y = linear(&Linear::new(w, None), &empty).unwrap();
        assert_eq!(y.dims(), &[1, 0, 5]);
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// A trained weight and bias: the op's output and the gradients of the input, the weight
    /// and the bias equal candle's `Linear`'s, for a contiguous input and for the
    /// non-contiguous response positions `lm_head` reads; no transposed `(in, out)` tensor is
    /// left in the gradient store.
    #[test]
    fn a_trained_layer_gives_the_plain_values_and_gradients() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for bias in [true, false] {
                let w = Var::from_tensor(&wave(&[5, 3], 0.37, dtype)).unwrap();
                let b = Var::from_tensor(&wave(&[5], 0.91, dtype)).unwrap();
                let lin = Linear::new(w.as_tensor().clone(), bias.then(|| b.as_tensor().clone()));
                let x = Var::from_tensor(&wave(&[2, 6, 3], 0.53, dtype)).unwrap();
                for narrow in [false, true] {
                    let run = |ours: bool| {
                        let xin = if narrow {
                            x.as_tensor().narrow(1, 2, 3).unwrap()
                        } else {
                            x.as_tensor().clone()
                        };
                        let y = if ours {
                            linear(&lin, &xin).unwrap()
                        } else {
                            candle_core::Module::forward(&lin, &xin).unwrap()
                        };
                        let up = wave(y.dims(), 0.23, dtype);
                        let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                        let transposed = g
                            .get_ids()
                            .filter(|id| g.get_id(**id).is_some_and(|t| t.dims() == [3, 5]))
                            .count();
                        let grads: Vec<Option<Tensor>> = [&x, &w, &b]
                            .iter()
                            .map(|v| g.get(v.as_tensor()).cloned())
                            .collect();
                        (y, grads, transposed)
                    };
                    let (yp, gp, _) = run(false);
                    let (yo, go, transposed) = run(true);
                    let what = format!("{dtype:?} bias {bias} narrow {narrow}");
                    assert_eq!(yp.dims(), yo.dims(), "{what}");
                    assert!(max_diff(&yp, &yo) <= tol, "{what}: values");
                    for (name, (p, o)) in ["x", "w", "b"].iter().zip(gp.iter().zip(&go)) {
                        match (p, o) {
                            (Some(p), Some(o)) => {
                                assert!(max_diff(p, o) <= tol, "{what}: d{name} {}", max_diff(p, o))
                            }
                            (None, None) => {}
                            _ => panic!("{what}: d{name} present on one side only"),
                        }
                    }
                    assert_eq!(transposed, 0, "{what}: a transposed weight gradient");
                    for g in go.iter().flatten() {
                        assert!(!g.track_op(), "{what}: a gradient that records a graph");
                    }
                }
            }
        }
    }

    /// Under `checkpoint::backward` a trained weight used twice gets candle's gradient (both
    /// uses summed) without a store entry from candle's path, and continued onto a handed-over
    /// sum it is added into that sum's own buffer.
    #[test]
    fn a_trained_weight_adds_its_gradient_to_the_backwards_sums() {
        use crate::checkpoint::{backward, backward_onto};
        let addr = |t: &Tensor| {
            let (s, _) = t.storage_and_layout();
            match &*s {
                Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
                _ => 0,
            }
        };
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let w = Var::from_tensor(&wave(&[5, 3], 0.37, dtype)).unwrap();
            let lin = Linear::new(w.as_tensor().clone(), None);
            let x = Var::from_tensor(&wave(&[2, 6, 3], 0.53, dtype)).unwrap();
            let loss = || {
                let a = linear(&lin, x.as_tensor()).unwrap().sqr().unwrap();
                let b = linear(&lin, &x.as_tensor().narrow(1, 1, 4).unwrap()).unwrap();
                (a.sum_all().unwrap() + b.sin().unwrap().sum_all().unwrap()).unwrap()
            };
            let plain = loss().backward().unwrap();
            let sums = backward(&loss()).unwrap();
            for v in [&w, &x] {
                let (p, o) = (
                    plain.get(v.as_tensor()).unwrap(),
                    sums.get(v.as_tensor()).unwrap(),
                );
                assert!(max_diff(p, o) <= tol, "{dtype:?}: {}", max_diff(p, o));
                assert!(!o.track_op());
            }
            let seed = plain.get(w.as_tensor()).unwrap().copy().unwrap();
            let mut store = candle_core::backprop::GradStore::default();
            store.insert(w.as_tensor(), seed.copy().unwrap());
            let at = addr(store.get(w.as_tensor()).unwrap());
            let onto = backward_onto(&loss(), store).unwrap();
            let got = onto.get(w.as_tensor()).unwrap();
            let want = (&seed + plain.get(w.as_tensor()).unwrap()).unwrap();
            assert!(max_diff(got, &want) <= 2.0 * tol, "{dtype:?} continued");
            if dtype == DType::F32 {
                assert_eq!(addr(got), at, "the f32 sum is written in place");
            }
        }
    }

    /// Pixel values (an untracked input) under a trained weight: the weight gets the plain
    /// gradient and no input gradient is computed or stored; a bf16 cast of a trained weight
    /// (mixed precision) trains through the op too, close to the plain bf16 product.
    #[test]
    fn an_untracked_input_gets_no_gradient_and_bf16_trains() {
        let w = Var::from_tensor(&wave(&[5, 3], 0.37, DType::F32)).unwrap();
        let x = wave(&[4, 3], 0.53, DType::F32);
        let lin = Linear::new(w.as_tensor().clone(), None);
        let grads_of_sq = |y: Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads_of_sq(linear(&lin, &x).unwrap());
        let gp = grads_of_sq(candle_core::Module::forward(&lin, &x).unwrap());
        let dw = g.get(w.as_tensor()).expect("the weight's gradient");
        assert!(max_diff(dw, gp.get(w.as_tensor()).unwrap()) < 1e-5);
        assert!(g.get(&x).is_none());
        assert!(
            g.get_ids()
                .all(|id| g.get_id(*id).is_some_and(|t| t.dims() != [4, 3]))
        );

        let wb = w.as_tensor().to_dtype(DType::BF16).unwrap();
        let lin = Linear::new(wb, None);
        let xb = Var::from_tensor(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        let run = |ours: bool| {
            let y = if ours {
                linear(&lin, xb.as_tensor()).unwrap()
            } else {
                candle_core::Module::forward(&lin, xb.as_tensor()).unwrap()
            };
            let g = y
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (
                y,
                g.get(w.as_tensor()).unwrap().clone(),
                g.get(xb.as_tensor()).unwrap().clone(),
            )
        };
        let (yp, wp, xp) = run(false);
        let (yo, wo, xo) = run(true);
        assert_eq!(yo.dtype(), DType::BF16);
        for (p, o) in [(yp, yo), (wp, wo), (xp, xo)] {
            assert!(max_diff(&p, &o) < 2e-2, "bf16 {}", max_diff(&p, &o));
        }
    }

    /// Inference (nothing tracked) takes candle's own layer.
    #[test]
    fn an_untracked_layer_and_input_take_the_plain_path() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let lin = Linear::new(w, None);
        let x = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let y = linear(&lin, &x).unwrap();
        assert!(!y.track_op());
    }
}
