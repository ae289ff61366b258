//! Matrix products on the CPU whose output is not zeroed before the product writes it.
//!
//! candle's CPU product (`CpuStorage::matmul`, the `gemm` crate) allocates its output with
//! `vec![0; b·m·n]` and has `gemm` overwrite every element (`read_dst = false`): the zeroing is a
//! pass over the output that the product never reads, and glibc's `calloc` does it with `memset`
//! on every recycled heap block. For the attention's score-shaped products it cost more than the
//! product: `(2, 2, 1468, 16) · (2, 2, 16, 367)` (the tiny model's scores and their gradient),
//! 2 threads, best of 20: 0.95 ms with the zeroing, 0.40 ms without; `memset` was the largest
//! leaf of a tiny training step's profile. [`matmul`] and [`storage_matmul`] make candle's own
//! `gemm` call (the same kernels, blocking, batch folding and thread count, so the same values to
//! the bit) into memory they do not zero; they fall back to candle's product for what they do
//! not cover (other devices and dtypes, strides `gemm` cannot take, the `mkl` build, whose
//! products are MKL's).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use std::mem::MaybeUninit;

/// `a · b` for tensors outside the autograd graph: candle's `Tensor::matmul` (same shapes
/// accepted, same values), computed without zeroing the output first on the CPU in f32 / f64.
/// A tensor that records a graph goes to candle's product, which records the op.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    let rank = ad.len();
    if a.track_op()
        || b.track_op()
        || !a.device().is_cpu()
        || !b.device().is_cpu()
        || rank < 2
        || bd.len() != rank
        || ad[..rank - 2] != bd[..rank - 2]
        || ad[rank - 1] != bd[rank - 2]
        || a.dtype() != b.dtype()
    {
        return a.matmul(b);
    }
    let (m, k, n) = (ad[rank - 2], ad[rank - 1], bd[rank - 1]);
    let batch = ad[..rank - 2].iter().product::<usize>();
    let mut shape = ad.to_vec();
    shape[rank - 1] = n;
    let product = {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        match (&*sa, &*sb) {
            (Storage::Cpu(CpuStorage::F32(x)), Storage::Cpu(CpuStorage::F32(y))) => {
                product(x, la, y, lb, (batch, m, n, k)).map(|v| v.map(CpuStorage::F32))
            }
            (Storage::Cpu(CpuStorage::F64(x)), Storage::Cpu(CpuStorage::F64(y))) => {
                product(x, la, y, lb, (batch, m, n, k)).map(|v| v.map(CpuStorage::F64))
            }
            _ => Ok(None),
        }
    };
    match product? {
        Some(CpuStorage::F32(v)) => Tensor::from_vec(v, shape, a.device()),
        Some(CpuStorage::F64(v)) => Tensor::from_vec(v, shape, a.device()),
        _ => a.matmul(b),
    }
}

/// `CpuStorage::matmul` (candle's backend call: `(b, m, n, k)`, the two layouts) without zeroing
/// the output first in f32 / f64; candle's own for the rest.
pub(crate) fn storage_matmul(
    lhs: &CpuStorage,
    ll: &Layout,
    rhs: &CpuStorage,
    rl: &Layout,
    bmnk: (usize, usize, usize, usize),
) -> Result<CpuStorage> {
    let done = match (lhs, rhs) {
        (CpuStorage::F32(x), CpuStorage::F32(y)) => {
            product(x, ll, y, rl, bmnk)?.map(CpuStorage::F32)
        }
        (CpuStorage::F64(x), CpuStorage::F64(y)) => {
            product(x, ll, y, rl, bmnk)?.map(CpuStorage::F64)
        }
        _ => None,
    };
    match done {
        Some(s) => Ok(s),
        None => lhs.matmul(rhs, bmnk, ll, rl),
    }
}

/// `a · bᵀ` for row-major slices `a: (m, k)`, `b: (n, k)` → `(m, n)` row-major (in the `mkl`
/// build MKL's product, through candle).
pub(crate) fn mm_t<T: Gemm>(a: &[T], m: usize, b: &[T], n: usize, k: usize) -> Result<Vec<T>> {
    if cfg!(feature = "mkl") {
        let dev = candle_core::Device::Cpu;
        let b = Tensor::from_slice(b, (n, k), &dev)?;
        return Tensor::from_slice(a, (m, k), &dev)?
            .matmul(&b.t()?)?
            .flatten_all()?
            .to_vec1();
    }
    let ks = k as isize;
    Ok(gemm_batched((a, ks, 1, 0), (b, 1, ks, 0), (1, m, n, k)))
}

/// `a · b` for row-major slices `a: (m, k)`, `b: (k, n)` → `(m, n)` row-major (in the `mkl`
/// build MKL's product, through candle).
pub(crate) fn mm<T: Gemm>(a: &[T], m: usize, b: &[T], k: usize, n: usize) -> Result<Vec<T>> {
    if cfg!(feature = "mkl") {
        let dev = candle_core::Device::Cpu;
        let b = Tensor::from_slice(b, (k, n), &dev)?;
        return Tensor::from_slice(a, (m, k), &dev)?
            .matmul(&b)?
            .flatten_all()?
            .to_vec1();
    }
    Ok(gemm_batched(
        (a, k as isize, 1, 0),
        (b, n as isize, 1, 0),
        (1, m, n, k),
    ))
}

/// The element types the `gemm` crate multiplies that this module hands to it.
pub(crate) trait Gemm: candle_core::WithDType + Copy + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
}

impl Gemm for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
}

impl Gemm for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
}

/// candle's product of `lhs` and `rhs` (storages from their layouts' offsets on), or `None` where
/// its batch strides are not one stride per operand (candle's `ab_skip` rules) or in the `mkl`
/// build: the caller then takes candle's path, which computes or reports it.
fn product<T: Gemm>(
    lhs: &[T],
    ll: &Layout,
    rhs: &[T],
    rl: &Layout,
    (b, m, n, k): (usize, usize, usize, usize),
) -> Result<Option<Vec<T>>> {
    if cfg!(feature = "mkl") {
        return Ok(None);
    }
    let (ls, rs) = (ll.stride(), rl.stride());
    let rank = ls.len();
    if rank < 2 || rs.len() != rank {
        return Ok(None);
    }
    let skip = |l: &Layout, s: &[usize], whole: usize| match s[..rank - 2] {
        [s1, stride] if s1 == stride * l.dims()[1] => Some(stride),
        [_, stride] if l.dims()[0] == 1 => Some(stride),
        [stride, _] if l.dims()[1] == 1 => Some(stride),
        [stride] => Some(stride),
        [] => Some(whole),
        _ => None,
    };
    let (Some(a_skip), Some(b_skip)) = (skip(ll, ls, m * k), skip(rl, rs, n * k)) else {
        return Ok(None);
    };
    let lhs = &lhs[ll.start_offset()..];
    let rhs = &rhs[rl.start_offset()..];
    Ok(Some(gemm_batched(
        (lhs, ls[rank - 2] as isize, ls[rank - 1] as isize, a_skip),
        (rhs, rs[rank - 2] as isize, rs[rank - 1] as isize, b_skip),
        (b, m, n, k),
    )))
}

/// An operand: its elements from the first one on, row stride, column stride, batch stride.
type Operand<'a, T> = (&'a [T], isize, isize, usize);

/// `b` products `(m, k) · (k, n)` into a new row-major `(b, m, n)`: candle's `gemm` call (its
/// thread count, its folding of a batch-invariant right operand into one product of `b · m`
/// rows), into memory that is not zeroed first.
#[allow(unsafe_code)] // the gemm crate's entry point, and an output that gemm writes in full
fn gemm_batched<T: Gemm>(
    (lhs, lhs_rs, lhs_cs, a_skip): Operand<'_, T>,
    (rhs, rhs_rs, rhs_cs, b_skip): Operand<'_, T>,
    (b, m, n, k): (usize, usize, usize, usize),
) -> Vec<T> {
    let len = b * m * n;
    if len == 0 || k == 0 {
        // Nothing to multiply: the product of an empty inner dimension is zeros.
        return vec![T::ZERO; len];
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let (b, m) = if b_skip == 0 && a_skip == m * k {
        (1, b * m)
    } else {
        (b, m)
    };
    let mut dst = uninit(len);
    for step in 0..b {
        let (lhs, rhs) = (&lhs[step * a_skip..], &rhs[step * b_skip..]);
        let out = &mut dst[step * m * n..(step + 1) * m * n];
        // SAFETY: as candle's own call (`CpuStorage::matmul`): the operands' layouts address
        // elements inside the slices (the callers take them from candle layouts of these
        // storages or from row-major slices of their exact sizes), `out` holds the `m · n`
        // outputs of this step, and with `read_dst = false` gemm writes each of them without
        // reading it.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr().cast::<T>(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                lhs_cs,
                lhs_rs,
                rhs.as_ptr(),
                rhs_cs,
                rhs_rs,
                T::ZERO,
                T::ONE,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    // SAFETY: every element was written above (each step's `m · n` outputs, the steps covering
    // `len`); a `Vec<MaybeUninit<T>>` and a `Vec<T>` have the same layout.
    unsafe { assume_init(dst) }
}

/// `len` elements not written yet: an output buffer that its writer fills before
/// [`assume_init`].
pub(crate) fn uninit<T>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    v.resize_with(len, MaybeUninit::uninit);
    v
}

/// `v` as the `Vec<T>` it holds.
///
/// # Safety
/// Every element of `v` must be initialised.
#[allow(unsafe_code)]
pub(crate) unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr().cast::<T>(), v.len(), v.capacity());
    // SAFETY: the allocation is `v`'s (not dropped: `ManuallyDrop`), with the same element
    // size and alignment, and the caller guarantees its `len` elements are initialised.
    unsafe { Vec::from_raw_parts(ptr, len, cap) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{bits, wave};
    use candle_core::{DType, Device};

    /// Every layout the model's products take (contiguous, transposed, narrowed, a batch folded
    /// or not, ranks 2 to 4), with the output in memory that held other values before: the same
    /// bits as candle's product.
    #[test]
    fn products_equal_candles_to_the_bit() {
        for dtype in [DType::F32, DType::F64] {
            let cases: Vec<(Tensor, Tensor)> = vec![
                (wave(&[37, 19], 0.31, dtype), wave(&[19, 23], 0.17, dtype)),
                (
                    wave(&[2, 3, 41, 16], 0.7, dtype),
                    wave(&[2, 3, 29, 16], 0.3, dtype).t().unwrap(),
                ),
                (
                    wave(&[2, 3, 16, 41], 0.7, dtype).t().unwrap(),
                    wave(&[2, 3, 16, 29], 0.3, dtype),
                ),
                (
                    wave(&[4, 50, 33], 0.11, dtype).narrow(1, 3, 40).unwrap(),
                    wave(&[4, 33, 7], 0.23, dtype),
                ),
                (
                    wave(&[5, 64], 0.05, dtype).t().unwrap(),
                    wave(&[5, 70], 0.09, dtype).narrow(1, 2, 66).unwrap(),
                ),
                (wave(&[3, 0, 4], 0.1, dtype), wave(&[3, 4, 6], 0.1, dtype)),
                (wave(&[3, 5, 0], 0.1, dtype), wave(&[3, 0, 6], 0.1, dtype)),
            ];
            for (a, b) in &cases {
                // Dirty the allocator's free blocks so an unwritten output would show.
                drop(vec![f32::NAN; 1 << 16]);
                let ours = matmul(a, b).unwrap();
                let theirs = a.matmul(b).unwrap();
                assert_eq!(ours.dims(), theirs.dims());
                assert_eq!(
                    bits(&ours),
                    bits(&theirs),
                    "{:?} x {:?}",
                    a.dims(),
                    b.dims()
                );
            }
        }
    }

    #[test]
    fn tracked_tensors_keep_their_graph_and_bad_shapes_report_candles_error() {
        let a = candle_core::Var::from_tensor(&wave(&[3, 4], 0.2, DType::F32)).unwrap();
        let b = wave(&[4, 2], 0.3, DType::F32);
        let y = matmul(a.as_tensor(), &b).unwrap();
        assert!(y.track_op());
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(a.as_tensor()).is_some());
        let bad = matmul(
            &wave(&[3, 4], 0.2, DType::F32),
            &wave(&[5, 2], 0.3, DType::F32),
        );
        assert!(bad.is_err());
        // bf16 and mixed dtypes take candle's path.
        let h = wave(&[3, 4], 0.2, DType::BF16);
        assert_eq!(
            bits(&matmul(&h, &wave(&[4, 2], 0.3, DType::BF16)).unwrap()),
            bits(&h.matmul(&wave(&[4, 2], 0.3, DType::BF16)).unwrap())
        );
    }

    #[test]
    fn slice_products_equal_candles() {
        let (m, n, k) = (13, 9, 21);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).cos()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.21).sin()).collect();
        let dev = Device::Cpu;
        let at = Tensor::from_slice(&a, (m, k), &dev).unwrap();
        let bt = Tensor::from_slice(&b, (n, k), &dev).unwrap();
        let want: Vec<f32> = at
            .matmul(&bt.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(mm_t(&a, m, &b, n, k).unwrap(), want);
        let bk = Tensor::from_slice(&b, (k, n), &dev).unwrap();
        let want: Vec<f32> = at
            .matmul(&bk)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(mm(&a, m, &b, k, n).unwrap(), want);
    }
}
