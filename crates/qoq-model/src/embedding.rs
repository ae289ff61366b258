//! The token embedding lookup with a backward that writes only the rows it read.
//!
//! candle's embedding is `index_select`, whose backward builds the weight's gradient as a
//! zeroed `(vocab, hidden)` tensor, copies it to add the looked-up rows (`index_add` is not in
//! place), and candle's backward then adds that into another fresh zeroed tensor: three passes
//! over a tensor of the whole vocabulary (0.5B: 544 MB; 7B: 2.2 GB) for a few hundred rows,
//! each a new allocation whose pages the kernel zeroes again. [`embedding`] runs the lookup as a
//! custom op instead: under [`crate::checkpoint::backward`] the rows' gradients are added into
//! the backward's sum for the weight in place (a tied `lm_head`'s gradient, or the earlier
//! micro-batches'), and into a zeroed tensor whose untouched pages are never written when there
//! is none; under a plain `backward` it returns that zeroed tensor with the rows added.
//!
//! Written here because candle has no sparse or in-place embedding gradient. CPU only; elsewhere,
//! and in inference (an untracked weight), candle's `index_select` runs.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Result, Shape, Tensor};

/// `weight: (vocab, hidden)` rows at `ids` (any shape, integer dtype) → `(ids..., hidden)`.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (vocab, hidden) = weight.dims2()?;
    let mut out_dims = ids.dims().to_vec();
    out_dims.push(hidden);
    if !(weight.device().is_cpu() && weight.track_op()) {
        return weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(out_dims);
    }
    let rows: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= vocab) {
        candle_core::bail!("embedding: token id {bad} is outside the vocabulary of {vocab}");
    }
    weight.apply_op1(Lookup { rows })?.reshape(out_dims)
}

/// The lookup of `rows` in the op's input `(vocab, hidden)`.
struct Lookup {
    rows: Vec<u32>,
}

fn gather<T: Copy>(w: &[T], hidden: usize, rows: &[u32]) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * hidden);
    for &r in rows {
        let r = r as usize * hidden;
        out.extend_from_slice(&w[r..r + hidden]);
    }
    out
}

impl CustomOp1 for Lookup {
    fn name(&self) -> &'static str {
        "qoq-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, hidden) = l.shape().dims2()?;
        let Some((lo, hi)) = l.contiguous_offsets() else {
            candle_core::bail!("embedding: a non-contiguous weight");
        };
        let out = match s {
            CpuStorage::F32(w) => CpuStorage::F32(gather(&w[lo..hi], hidden, &self.rows)),
            CpuStorage::F64(w) => CpuStorage::F64(gather(&w[lo..hi], hidden, &self.rows)),
            CpuStorage::BF16(w) => CpuStorage::BF16(gather(&w[lo..hi], hidden, &self.rows)),
            CpuStorage::F16(w) => CpuStorage::F16(gather(&w[lo..hi], hidden, &self.rows)),
            _ => candle_core::bail!("embedding: a weight of dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((self.rows.len(), hidden))))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.detach();
        // The rows added to a sum of `dtype` (the weight's, or its master's for a compute copy).
        let add_rows = |sum: &Tensor| -> Result<()> {
            let g = grad.to_dtype(sum.dtype())?.contiguous()?;
            sum.inplace_op2(&g, &ScatterAdd { rows: &self.rows })
        };
        let fresh = |dtype: DType| -> Result<Tensor> {
            // Zeroed pages that are never written stay unbacked until something reads them.
            let z = Tensor::zeros(w.shape(), dtype, w.device())?;
            add_rows(&z)?;
            Ok(z)
        };
        let delivered = crate::checkpoint::add_to_sum(w, |sum, dtype| match sum {
            Some(sum) if sum.dtype() == dtype && sum.is_contiguous() && sum.device().is_cpu() => {
                add_rows(sum)?;
                Ok(None)
            }
            Some(sum) => (sum + fresh(dtype)?.to_dtype(sum.dtype())?).map(Some),
            None => fresh(dtype).map(Some),
        })?;
        if delivered {
            Ok(None)
        } else {
            fresh(w.dtype()).map(Some)
        }
    }
}

/// `sum[r] += Σ grad[i]` over the looked-up rows `i` with id `r`, in place: a token's rows are
/// summed first (in order), then added to the sum, so a micro-batch's gradient enters the sum
/// as one addend per element, as when adding a dense gradient (the order of the additions does
/// not depend on how the micro-batches are spread over processes).
struct ScatterAdd<'a> {
    rows: &'a [u32],
}

fn scatter<T: Copy + std::ops::AddAssign>(sum: &mut [T], grad: &[T], rows: &[u32]) {
    let hidden = grad.len() / rows.len().max(1);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i]);
    let mut acc: Vec<T> = Vec::with_capacity(hidden);
    for group in order.chunk_by(|&a, &b| rows[a] == rows[b]) {
        let row = |i: usize| &grad[i * hidden..(i + 1) * hidden];
        acc.clear();
        acc.extend_from_slice(row(group[0]));
        for &i in &group[1..] {
            for (a, &g) in acc.iter_mut().zip(row(i)) {
                *a += g;
            }
        }
        let r = rows[group[0]] as usize;
        for (d, &a) in sum[r * hidden..(r + 1) * hidden].iter_mut().zip(&acc) {
            *d += a;
        }
    }
}

impl InplaceOp2 for ScatterAdd<'_> {
    fn name(&self) -> &'static str {
        "qoq-embedding-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("embedding gradient: non-contiguous tensors");
        };
        let (_, hidden) = l1.shape().dims2()?;
        if l2.dims() != [self.rows.len(), hidden] {
            candle_core::bail!(
                "embedding gradient: {:?} for {} rows of {hidden}",
                l2.dims(),
                self.rows.len()
            );
        }
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(g)) => {
                scatter(&mut d[a0..a1], &g[b0..b1], self.rows)
            }
            (CpuStorage::F64(d), CpuStorage::F64(g)) => {
                scatter(&mut d[a0..a1], &g[b0..b1], self.rows)
            }
            (CpuStorage::BF16(d), CpuStorage::BF16(g)) => {
                scatter(&mut d[a0..a1], &g[b0..b1], self.rows)
            }
            (CpuStorage::F16(d), CpuStorage::F16(g)) => {
                scatter(&mut d[a0..a1], &g[b0..b1], self.rows)
            }
            _ => candle_core::bail!(
                "embedding gradient: the sum's dtype differs from the gradient's"
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{bits, wave};
    use candle_core::{Device, Var};

    /// Values and the weight's gradient equal `index_select`'s (a repeated id included), through
    /// a plain backward and through the backward's sums, also for a weight tied to a product
    /// (`lm_head`) and continued onto handed-over sums (in place).
    #[test]
    fn the_lookup_and_its_gradient_equal_index_select() -> Result<()> {
        let ids = Tensor::new(&[[3u32, 0, 3], [5, 1, 2]], &Device::Cpu)?;
        for dtype in [DType::F32, DType::F64] {
            let w = Var::from_tensor(&wave(&[7, 4], 0.37, dtype))?;
            let up = wave(&[2, 3, 4], 0.61, dtype);
            let head = wave(&[3, 4], 0.29, dtype);
            let loss_of = |ours: bool| -> Result<Tensor> {
                let e = if ours {
                    embedding(w.as_tensor(), &ids)?
                } else {
                    w.as_tensor()
                        .index_select(&ids.flatten_all()?, 0)?
                        .reshape((2, 3, 4))?
                };
                // Tied: the same weight as a product's factor.
                let logits = head.matmul(&w.as_tensor().t()?)?;
                (e * &up)?.sum_all()? + logits.sqr()?.sum_all()?
            };
            let plain = loss_of(false)?.backward()?;
            let want = plain.get(w.as_tensor()).expect("plain");
            assert_eq!(
                bits(&embedding(w.as_tensor(), &ids)?),
                bits(
                    &w.as_tensor()
                        .index_select(&ids.flatten_all()?, 0)?
                        .reshape((2, 3, 4))?
                )
            );
            let direct = loss_of(true)?.backward()?;
            let sums = crate::checkpoint::backward(&loss_of(true)?)?;
            for (g, what) in [(&direct, "plain backward"), (&sums, "the sums")] {
                let g = g.get(w.as_tensor()).expect("gradient");
                let d = (g - want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_dtype(DType::F64)?;
                assert!(d.to_scalar::<f64>()? < 1e-6, "{dtype:?} {what}");
                assert!(!g.track_op());
            }
            // Continued onto a handed-over sum: written in place, the two gradients added.
            let seed = sums.get(w.as_tensor()).expect("sum").copy()?;
            let mut store = candle_core::backprop::GradStore::default();
            store.insert(w.as_tensor(), seed.copy()?);
            let onto = crate::checkpoint::backward_onto(&loss_of(true)?, store)?;
            let got = onto.get(w.as_tensor()).expect("continued");
            let twice = (&seed + sums.get(w.as_tensor()).expect("sum"))?;
            let d = (got - twice)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(DType::F64)?;
            assert!(d.to_scalar::<f64>()? < 1e-6, "{dtype:?} continued");
        }
        Ok(())
    }

    #[test]
    fn an_id_outside_the_vocabulary_is_an_error() -> Result<()> {
        let w = Var::from_tensor(&wave(&[7, 4], 0.37, DType::F32))?;
        let ids = Tensor::new(&[1u32, 7], &Device::Cpu)?;
        let e = embedding(w.as_tensor(), &ids).unwrap_err().to_string();
        assert!(
            e.contains("token id 7") && e.contains("vocabulary of 7"),
            "{e}"
        );
        Ok(())
    }

    /// Inference (an untracked weight) takes `index_select`.
    #[test]
    fn an_untracked_weight_takes_index_select() -> Result<()> {
        let w = wave(&[7, 4], 0.37, DType::F32);
        let ids = Tensor::new(&[[1u32, 6]], &Device::Cpu)?;
        let e = embedding(&w, &ids)?;
        assert_eq!(e.dims(), [1, 2, 4]);
        assert_eq!(
            bits(&e),
            bits(&w.index_select(&ids.flatten_all()?, 0)?.reshape((1, 2, 4))?)
        );
        Ok(())
    }
}
