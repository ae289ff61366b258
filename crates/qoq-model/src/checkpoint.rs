//! Activation checkpointing (`model.gradient_checkpointing`; PyTorch's
//! `torch.utils.checkpoint`, non-reentrant): the training forward keeps only the input of each
//! decoder layer and vision block, and the backward recomputes the layer from it.
//!
//! candle has no checkpoint primitive, so a checkpointed segment is a custom op over the layer's
//! input ([`checkpointed`]). Its forward runs the layer on the detached input and keeps a copy
//! of the output only: the layer's own graph (every activation inside it) is dropped before the
//! op returns. Its backward recomputes the layer from a leaf copy of the input with the graph on,
//! back-propagates the surrogate `sum(out · grad_out)` through it, returns the input's gradient to
//! the outer backward and sets the parameters' gradients aside; [`backward`] runs the outer
//! backward and adds those to its [`GradStore`].
//!
//! Checkpointing is switched on for the forwards run inside [`scope`] (Train mode only, on the
//! calling thread), so the code that computes a loss and its gradients is one path whether the
//! key is on or off: `scope(on, || loss)` then [`backward`]. The recompute must give the forward's
//! values: the layers are deterministic (no dropout).

use candle_core::TensorId;
use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp2, Layout, MetalStorage, Result, Shape,
    Storage, Tensor, Var,
};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Segments recomputed by backward passes in this process so far (all threads).
static RECOMPUTED: AtomicU64 = AtomicU64::new(0);

/// How many checkpointed segments backward passes in this process have recomputed so far: a
/// caller can tell that its update really ran checkpointed.
pub fn recomputed() -> u64 {
    RECOMPUTED.load(Ordering::Relaxed)
}

thread_local! {
    /// Whether Train-mode forwards on this thread checkpoint their layers.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// Parameter gradients of the segments back-propagated so far by the [`backward`] running on
    /// this thread (`None` outside one).
    static PENDING: RefCell<Option<GradStore>> = const { RefCell::new(None) };
    /// The master of each compute copy, by the copy's id, during a [`backward_onto_copies`] on
    /// this thread: [`add_to_sum`] adds a copy's gradient to its master's sum.
    static MASTERS: RefCell<Option<HashMap<TensorId, Tensor>>> = const { RefCell::new(None) };
}

/// Restores [`ACTIVE`] when dropped (also on a panic or an early return).
struct Restore(bool);

impl Drop for Restore {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.0));
    }
}

/// Runs `f` with checkpointing on (`on`) or off for the Train-mode forwards it makes on this
/// thread; the previous setting is restored afterwards.
pub fn scope<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(ACTIVE.with(|a| a.replace(on)));
    f()
}

/// Whether forwards on this thread checkpoint their layers now.
pub fn active() -> bool {
    ACTIVE.with(Cell::get)
}

/// Adds the gradient of the variable `var` from one of its uses to the sums of the [`backward`]
/// running on this thread, bypassing candle's backward, which would add each use's gradient
/// into a fresh zeroed tensor and that into the sum of the other uses (two new tensors of the
/// variable's size per use, each a pass over memory; a 0.5B step spent about a tenth of its
/// update zeroing such pages). `add(Some(sum))` adds into `sum` in place and returns `None`
/// (or returns a new sum, which replaces it); `add(None)` returns the first gradient.
///
/// The gradient goes to the variable's sum in the variable's dtype, or, for the compute copy of
/// a master (mixed precision, [`backward_onto_copies`]), to the master's sum in the master's
/// dtype: `add` gets that sum and the dtype its result must have.
///
/// Returns `false` without calling `add` when `var` is not a variable or no such backward runs
/// on this thread (a plain `loss.backward()`): the caller then hands the gradient to candle as
/// usual. Every sum in the store is the backward's own (see [`backward_onto`]), so writing it
/// in place is safe.
pub(crate) fn add_to_sum(
    var: &Tensor,
    add: impl FnOnce(Option<&Tensor>, DType) -> Result<Option<Tensor>>,
) -> Result<bool> {
    if !var.is_variable() {
        return Ok(false);
    }
    let master = MASTERS.with(|m| m.borrow().as_ref().and_then(|m| m.get(&var.id()).cloned()));
    let key = master.as_ref().unwrap_or(var);
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let Some(store) = p.as_mut() else {
            return Ok(false);
        };
        if let Some(sum) = add(store.get(key), key.dtype())? {
            store.insert(key, sum.to_dtype(key.dtype())?);
        }
        Ok(true)
    })
}

/// Whether [`add_into`] adds into `sum` in place (a contiguous host f32 or bf16 tensor).
pub(crate) fn adds_in_place(sum: &Tensor) -> bool {
    sum.device().is_cpu() && matches!(sum.dtype(), DType::F32 | DType::BF16) && sum.is_contiguous()
}

/// `sum += g` in place where `sum` is a contiguous host f32 or bf16 tensor and `g` one of its
/// shape (returns `None`; `g` is first converted to `sum`'s dtype when it is in another one);
/// otherwise the new sum `sum + g` in `sum`'s dtype.
pub fn add_into(sum: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    if adds_in_place(sum) && sum.dims() == g.dims() {
        let g = g.to_dtype(sum.dtype())?.contiguous()?;
        sum.inplace_op2(&g, &AddAssign)?;
        return Ok(None);
    }
    (sum + g.to_dtype(sum.dtype())?).map(Some)
}

/// `dst += src` on host f32 or bf16 tensors of the same shape and dtype, in place: the same
/// additions as `dst + src` (bf16: each pair added in f32 and rounded, as `half`'s addition
/// that candle's does). Without it a bf16 sum (bf16 weights) was a new tensor per addition,
/// two of the largest gradient alive at once.
struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "qoq-add-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 15;
        if l1.shape() != l2.shape() {
            candle_core::bail!("add into a sum: {:?} onto {:?}", l2.dims(), l1.dims());
        }
        let (Some((d0, d1)), Some((a0, a1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add into a sum: expected a contiguous sum and addend");
        };
        fn add<T: Copy + Send + Sync + std::ops::AddAssign>(d: &mut [T], s: &[T]) {
            d.par_chunks_mut(CHUNK)
                .zip(s.par_chunks(CHUNK))
                .for_each(|(d, s)| {
                    for (d, s) in d.iter_mut().zip(s) {
                        *d += *s;
                    }
                });
        }
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => add(&mut d[d0..d1], &s[a0..a1]),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => add(&mut d[d0..d1], &s[a0..a1]),
            _ => candle_core::bail!("add into a sum: expected f32 or bf16 sum and addend alike"),
        }
        Ok(())
    }
}

/// `loss.backward()`, plus the gradients of the parameters inside checkpointed segments (which
/// their backward computes on the side). Without checkpointed segments in the graph this is
/// exactly `loss.backward()`.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    backward_onto(loss, GradStore::default())
}

/// [`backward`] continuing sums: `sums` holds earlier gradients by tensor (the sum of earlier
/// micro-batches' gradients, gradient accumulation); the returned store holds each tensor's sum
/// plus this loss's gradient (a tensor the loss does not reach keeps its sum). The sums are
/// handed over: ops that deliver their variables' gradients themselves ([`add_to_sum`]: the
/// trained projections of [`crate::linear`], the token embedding) add into them in place, so
/// pass tensors nothing else reads.
///
/// The gradients of the parameters inside checkpointed segments are added to their sums as each
/// segment's backward produces them, so such a parameter never holds its sum and a whole new
/// gradient at once: with checkpointing, accumulating over micro-batches needs one gradient
/// copy of the segments' parameters instead of two at the end of each backward. A tensor reached
/// only inside segments, or only outside them, gets exactly `sum + gradient` (the same single
/// addition as adding the stores afterwards; f32 addition commutes); one reached both ways would
/// get its three terms in another order (no parameter of this crate's models is).
pub fn backward_onto(loss: &Tensor, sums: GradStore) -> Result<GradStore> {
    let outer = PENDING.with(|p| p.borrow_mut().replace(sums));
    let result = loss.backward();
    let pending = PENDING.with(|p| std::mem::replace(&mut *p.borrow_mut(), outer));
    let mut grads = result?;
    if let Some(pending) = pending {
        // Each parameter's gradients from all its uses, checkpointed or not, summed.
        grads.extend(pending)?;
    }
    Ok(grads)
}

/// [`backward_onto`] for a model computing on compute copies of master weights (mixed precision,
/// [`crate::train::cast_var_builder`]): the copies' gradients are summed onto their masters, in
/// the masters' dtype, and the returned store holds no copy. The ops that deliver their
/// variables' gradients ([`add_to_sum`]) add a copy's straight into its master's sum during the
/// backward; the rest reach the masters when it ends.
pub fn backward_onto_copies(
    loss: &Tensor,
    sums: GradStore,
    copies: &crate::train::ComputeCopies,
) -> Result<GradStore> {
    let pairs = copies
        .pairs()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let masters = pairs
        .iter()
        .map(|(c, m)| (c.id(), m.as_tensor().clone()))
        .collect();
    let outer = MASTERS.with(|m| m.borrow_mut().replace(masters));
    let result = backward_onto(loss, sums);
    MASTERS.with(|m| *m.borrow_mut() = outer);
    let mut grads = result?;
    for (copy, master) in &pairs {
        let Some(g) = grads.remove(copy.as_tensor()) else {
            continue;
        };
        let sum = match grads.get(master.as_tensor()) {
            Some(sum) => add_into(sum, &g)?,
            None => Some(g.to_dtype(master.dtype())?),
        };
        if let Some(sum) = sum {
            grads.insert(master.as_tensor(), sum);
        }
    }
    Ok(grads)
}

/// The computation of one segment: the layer with its fixed side inputs (rotary tables, masks).
pub type Segment = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `f(x)`, checkpointed when [`active`]: the result's graph holds `x` and no activation of `f`.
/// `f` must be deterministic and return a tensor (of any shape) that depends on `x`.
pub fn checkpointed(x: &Tensor, f: Segment) -> Result<Tensor> {
    if !active() {
        return f(x);
    }
    let y = scope(false, || f(&x.detach()))?;
    let x = if x.track_op() {
        x.clone()
    } else if y.track_op() {
        // Parameters inside but none before (a frozen embedding): the op must be on the graph
        // for its backward to run, so its input becomes a leaf (whose gradient nobody reads).
        Var::from_tensor(x)?.as_tensor().clone()
    } else {
        // Nothing trainable before or inside: no gradient passes here.
        return Ok(y);
    };
    // The output's values without its graph; `y` (and with it every activation inside `f`) is
    // dropped when this function returns.
    let out = y.detach().force_contiguous()?;
    drop(y);
    let op = Checkpoint {
        f,
        out: Handover::new(out, "checkpoint"),
    };
    x.apply_op1(op)
}

/// An output computed before its custom op exists (a checkpointed segment's,
/// [`crate::attention::eager_attention`]'s), handed to the op's forward once: the op is then a
/// graph node whose backward is its own, over a result the forward did not compute again.
pub(crate) struct Handover {
    out: Mutex<Option<Tensor>>,
    /// The op's name in errors.
    what: &'static str,
}

impl Handover {
    pub(crate) fn new(out: Tensor, what: &'static str) -> Handover {
        Handover {
            out: Mutex::new(Some(out)),
            what,
        }
    }

    fn take(&self) -> Result<Tensor> {
        let what = self.what;
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{what}: poisoned lock")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: forward ran twice")))
    }

    /// The output's storage (a copy: candle's custom ops return owned storage).
    pub(crate) fn storage(&self) -> Result<(Storage, Shape)> {
        let out = self.take()?;
        let (s, l) = out.storage_and_layout();
        let owned = match &*s {
            Storage::Cpu(c) => Storage::Cpu(c.try_clone(l)?),
            Storage::Cuda(c) => Storage::Cuda(c.try_clone(l)?),
            Storage::Metal(c) => Storage::Metal(c.try_clone(l)?),
        };
        Ok((owned, l.shape().clone()))
    }
}

/// The custom op of one checkpointed segment.
struct Checkpoint {
    f: Segment,
    /// The forward's output.
    out: Handover,
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "qoq-checkpoint"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.out.storage()? {
            (Storage::Cpu(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("checkpoint: output on another device than its input"),
        }
    }

    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.out.storage()? {
            (Storage::Cuda(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("checkpoint: output on another device than its input"),
        }
    }

    fn metal_fwd(&self, _s: &MetalStorage, _l: &Layout) -> Result<(MetalStorage, Shape)> {
        match self.out.storage()? {
            (Storage::Metal(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("checkpoint: output on another device than its input"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if PENDING.with(|p| p.borrow().is_none()) {
            candle_core::bail!(
                "a checkpointed forward (model.gradient_checkpointing) must be back-propagated \
                 with qoq_model::checkpoint::backward, which collects its parameters' gradients"
            );
        }
        RECOMPUTED.fetch_add(1, Ordering::Relaxed);
        let x = Var::from_tensor(&arg.detach())?;
        let y = scope(false, || (self.f)(x.as_tensor()))?;
        let surrogate = (y * grad_res.detach())?.sum_all()?;
        // The segment's parameters: candle's backward also leaves a gradient for every operand
        // that does not track (a mask's fill value, `grad_res` itself), as large as the operand
        // and never removed; kept in the pending store they would outlive the segment, one
        // score-sized tensor per layer and attention until the whole backward ends.
        let vars: Vec<Tensor> = surrogate
            .sorted_nodes()
            .into_iter()
            .filter(|n| n.is_variable() && n.id() != x.as_tensor().id())
            .cloned()
            .collect();
        let mut grads = surrogate.backward()?;
        drop(surrogate);
        let gx = grads.remove(x.as_tensor());
        let mut kept = GradStore::default();
        for v in &vars {
            if let Some(g) = grads.remove(v) {
                kept.insert(v, g);
            }
        }
        drop(grads);
        PENDING.with(|p| -> Result<()> {
            match p.borrow_mut().as_mut() {
                Some(store) => store.extend(kept),
                None => Ok(()),
            }
        })?;
        Ok(gx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// `add_into` adds f32 and bf16 sums in place, to the bit what `sum + g` gives (bf16: each
    /// pair added in f32 and rounded), converting the addend to the sum's dtype; a strided sum
    /// gets a new tensor.
    #[test]
    fn add_into_adds_f32_and_bf16_sums_in_place_as_the_plain_sum() {
        let dev = Device::Cpu;
        let n = 3 * (1 << 15) + 7; // several rayon chunks
        let vals = |k: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| ((i.wrapping_mul(2_654_435_761 ^ k) >> 9) as f32 / 8_388_608.0) - 0.25)
                .collect()
        };
        let bits = |t: &Tensor| -> Vec<u32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        for dtype in [DType::F32, DType::BF16] {
            let sum = Tensor::from_vec(vals(1), n, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g = Tensor::from_vec(vals(2), n, &dev).unwrap();
            let want = (&sum + g.to_dtype(dtype).unwrap()).unwrap();
            assert!(
                add_into(&sum, &g).unwrap().is_none(),
                "{dtype:?} not in place"
            );
            assert_eq!(bits(&sum), bits(&want), "{dtype:?}");
        }
        // A strided sum cannot be written in place: the sum comes back as a new tensor.
        let sum = Tensor::zeros((3, 2), DType::BF16, &dev)
            .unwrap()
            .t()
            .unwrap();
        let g = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        let new = add_into(&sum, &g).unwrap().expect("a new sum");
        assert_eq!(
            bits(&new.flatten_all().unwrap()),
            bits(&Tensor::ones(6, DType::F32, &dev).unwrap())
        );
        assert_eq!(bits(&sum.flatten_all().unwrap()), vec![0; 6]);
    }

    /// Identity whose backward records what the running backward's sums hold for `master` (its
    /// dtype) and for `copy` (whether present) at that moment.
    struct Observe {
        master: Tensor,
        copy: Tensor,
        seen: Arc<Mutex<Option<(Option<DType>, bool)>>>,
    }

    impl CustomOp1 for Observe {
        fn name(&self) -> &'static str {
            "observe"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            Ok((s.try_clone(l)?, l.shape().clone()))
        }
        fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let seen = PENDING.with(|p| {
                p.borrow().as_ref().map(|s| {
                    (
                        s.get(&self.master).map(Tensor::dtype),
                        s.get(&self.copy).is_some(),
                    )
                })
            });
            *self.seen.lock().unwrap() = seen;
            Ok(Some(grad.clone()))
        }
    }

    /// A segment's backward hands on its parameters' gradients only: candle's backward also
    /// leaves gradients for operands that do not track (here a fill value broadcast to the
    /// scores' shape), which must not be kept until the whole backward ends.
    #[test]
    fn a_segment_keeps_no_gradient_of_its_untracked_operands() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev)?)?;
        let fill = Tensor::new(-7f32, &dev)?.broadcast_as((3, 2))?;
        let keep = Tensor::new(&[[1u8, 0], [0, 1], [1, 1]], &dev)?;
        let f: Segment = {
            let (w, fill, keep) = (w.as_tensor().clone(), fill.clone(), keep.clone());
            Arc::new(move |x: &Tensor| keep.where_cond(&x.matmul(&w)?, &fill))
        };
        let x0 = Var::from_tensor(&Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev)?)?;
        let loss = scope(true, || checkpointed(x0.as_tensor(), f.clone()))?
            .sqr()?
            .sum_all()?;
        let g = backward(&loss)?;
        assert!(g.get(w.as_tensor()).is_some() && g.get(x0.as_tensor()).is_some());
        assert!(g.get(&fill).is_none(), "the fill value's gradient was kept");
        // The same gradients as without checkpointing.
        let plain = f(x0.as_tensor())?.sqr()?.sum_all()?.backward()?;
        for t in [w.as_tensor(), x0.as_tensor()] {
            let d = (g.get(t).unwrap() - plain.get(t).unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0);
        }
        Ok(())
    }

    /// Mixed precision: a projection over a bf16 compute copy adds its weight's gradient to the
    /// f32 master's sum during the backward (an op earlier in the forward, whose backward runs
    /// later, sees it there and no entry for the copy), and the result equals the copy's own
    /// gradient widened to f32.
    #[test]
    fn a_compute_copys_projection_gradient_reaches_its_master_during_the_backward() -> Result<()> {
        use crate::train::{Freeze, cast_var_builder, trainable_var_builder};
        let dev = Device::Cpu;
        let w = (Tensor::arange(0u32, 12, &dev)?.to_dtype(DType::F32)? * 0.37)?
            .sin()?
            .reshape((3, 4))?;
        let vb = candle_nn::VarBuilder::from_tensors(
            [("model.w".to_string(), w)].into(),
            DType::F32,
            &dev,
        );
        let (vb, store) = trainable_var_builder(vb, Freeze::default());
        let master = vb.get((3, 4), "model.w")?;
        assert!(master.is_variable());
        let (vb16, copies) = cast_var_builder(&store, DType::BF16, &dev);
        let copy = vb16.get((3, 4), "model.w")?;
        assert_eq!(copy.dtype(), DType::BF16);
        let x = Var::from_tensor(
            &(Tensor::arange(0u32, 8, &dev)?.to_dtype(DType::BF16)? * 0.25)?.reshape((2, 4))?,
        )?;
        let seen = Arc::new(Mutex::new(None));
        let loss = |x: &Tensor| -> Result<Tensor> {
            let h = x.apply_op1(Observe {
                master: master.clone(),
                copy: copy.clone(),
                seen: seen.clone(),
            })?;
            let lin = candle_nn::Linear::new(copy.clone(), None);
            crate::linear::linear(&lin, &h)?
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()
        };
        let plain = loss(x.as_tensor())?.backward()?;
        let want = plain
            .get(&copy)
            .expect("the copy's gradient")
            .to_dtype(DType::F32)?;
        let grads = backward_onto_copies(&loss(x.as_tensor())?, GradStore::default(), &copies)?;
        assert_eq!(
            *seen.lock().unwrap(),
            Some((Some(DType::F32), false)),
            "the master's f32 sum, and no copy, while the backward runs"
        );
        assert!(grads.get(&copy).is_none());
        let got = grads.get(&master).expect("the master's gradient");
        assert_eq!(got.dtype(), DType::F32);
        let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    fn layer(w: &Var) -> Segment {
        let w = w.as_tensor().clone();
        Arc::new(move |x: &Tensor| x.matmul(&w)?.tanh()?.matmul(&w))
    }

    fn grads_of(on: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let seed = Tensor::arange(0u32, 12, &dev)?.to_dtype(DType::F64)?;
        let x0 = Var::from_tensor(&(seed.reshape((3, 4))? * 0.1)?.sin()?)?;
        let wave = |f: f64| -> Result<Var> {
            let t = (Tensor::arange(0u32, 16, &dev)?.to_dtype(DType::F64)? * f)?;
            Var::from_tensor(&t.sin()?.reshape((4, 4))?)
        };
        let (w1, w2) = (wave(0.3)?, wave(0.7)?);
        let (l1, l2) = (layer(&w1), layer(&w2));
        let loss = scope(on, || -> Result<Tensor> {
            let h = checkpointed(x0.as_tensor(), l1.clone())?;
            // w1 used again outside the segment: its gradients from both uses add up.
            let h = (checkpointed(&h, l2.clone())? + h.matmul(w1.as_tensor())?)?;
            h.sqr()?.sum_all()
        })?;
        let g = backward(&loss)?;
        Ok((
            g.get(x0.as_tensor()).expect("x0").clone(),
            g.get(w1.as_tensor()).expect("w1").clone(),
            g.get(w2.as_tensor()).expect("w2").clone(),
        ))
    }

    #[test]
    fn checkpointed_segments_give_the_plain_gradients() -> Result<()> {
        let plain = grads_of(false)?;
        let ckpt = grads_of(true)?;
        for (a, b) in [(plain.0, ckpt.0), (plain.1, ckpt.1), (plain.2, ckpt.2)] {
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-12, "gradient differs by {d}");
        }
        Ok(())
    }

    /// Two micro-batches through a checkpointed layer `w2`, a plain one `w3` and an input
    /// gradient `x`: continuing the first's sums equals adding the two stores, bit for bit.
    #[test]
    fn backward_onto_continues_the_sums_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let var = |n: usize, f: f64| -> Result<Var> {
            let t = (Tensor::arange(0u32, n as u32, &dev)?.to_dtype(DType::F32)? * f)?;
            Var::from_tensor(&t.sin()?.reshape((4, n / 4))?)
        };
        let (w2, w3, w4) = (var(16, 0.7)?, var(16, 1.3)?, var(16, 0.4)?);
        // w3 and w4 are trained projections, which add their gradients to the sums themselves
        // (w4 inside a checkpointed segment, from its recompute).
        let lin = |w: &Var| candle_nn::Linear::new(w.as_tensor().clone(), None);
        let w4_layer: Segment = {
            let l = lin(&w4);
            Arc::new(move |x: &Tensor| crate::linear::linear(&l, x)?.tanh())
        };
        let loss_of = |k: f64| -> Result<(Var, Tensor)> {
            let x = var(8, 0.1 * k)?;
            let loss = scope(true, || -> Result<Tensor> {
                let h = checkpointed(&x.as_tensor().t()?, layer(&w2))?;
                let h = checkpointed(&h, w4_layer.clone())?;
                crate::linear::linear(&lin(&w3), &h)?.sqr()?.sum_all()
            })?;
            Ok((x, loss))
        };
        let (x1, l1) = loss_of(1.0)?;
        let first = backward(&l1)?;
        let (x2, l2) = loss_of(2.0)?;
        let second = backward(&l2)?;
        // The seed: copies of the first micro-batch's sums (handed over: they may be written).
        let mut sums = GradStore::default();
        let params = [
            w2.as_tensor(),
            w3.as_tensor(),
            w4.as_tensor(),
            x1.as_tensor(),
        ];
        let kept: Vec<(Tensor, Tensor)> = params
            .into_iter()
            .map(|t| (t.clone(), first.get(t).expect("grad").copy().expect("copy")))
            .collect();
        for (t, g) in &kept {
            sums.insert(t, g.copy()?);
        }
        let (x2b, l2b) = loss_of(2.0)?;
        let onto = backward_onto(&l2b, sums)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect())
        };
        for w in [&w2, &w3, &w4] {
            let want =
                (first.get(w.as_tensor()).expect("1") + second.get(w.as_tensor()).expect("2"))?;
            assert_eq!(bits(onto.get(w.as_tensor()).expect("sum"))?, bits(&want)?);
        }
        // x1 is not reached by the second loss: it keeps its sum; x2's gradient is new.
        assert_eq!(
            bits(onto.get(x1.as_tensor()).expect("x1"))?,
            bits(&kept[3].1)?
        );
        assert_eq!(
            bits(onto.get(x2b.as_tensor()).expect("x2"))?,
            bits(second.get(x2.as_tensor()).expect("x2"))?
        );
        Ok(())
    }

    #[test]
    fn a_checkpointed_graph_keeps_no_activation_of_the_segment() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::ones((4, 4), DType::F32, &dev)?)?;
        let x = Var::from_tensor(&Tensor::ones((2, 4), DType::F32, &dev)?)?;
        let y = scope(true, || checkpointed(x.as_tensor(), layer(&w)))?;
        // The graph behind y is the op over x only: one node more than a sum over x itself.
        let sum = y.sum_all()?;
        let nodes: Vec<_> = sum.sorted_nodes().iter().map(|t| t.id()).collect();
        assert_eq!(
            nodes.len(),
            x.as_tensor().sum_all()?.sorted_nodes().len() + 1
        );
        assert!(nodes.contains(&y.id()) && nodes.contains(&x.as_tensor().id()));
        // A plain backward is refused (it would lose the segment's parameter gradients).
        let e = y.sum_all()?.backward().unwrap_err().to_string();
        assert!(e.contains("checkpoint::backward"), "{e}");
        Ok(())
    }

    #[test]
    fn scope_restores_the_previous_setting() {
        assert!(!active());
        scope(true, || {
            assert!(active());
            scope(false, || assert!(!active()));
            assert!(active());
        });
        assert!(!active());
    }
}
