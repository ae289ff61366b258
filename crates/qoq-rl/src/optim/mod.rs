//! AdamW with saveable state, global-norm gradient clipping that skips non-finite steps, learning
//! rate schedules, and gradient accumulation over micro-batches (spec §10.4, §10.5).
//!
//! Reference: `torch.optim.AdamW(lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)` (the
//! single-tensor algorithm: decoupled decay `p *= 1 - lr*wd`, bias-corrected moments,
//! `p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`), `torch.nn.utils.clip_grad_norm_(max_norm=1.0)`
//! (scale by `min(1, max_norm / (norm + 1e-6))`) with verl's rule that a non-finite norm skips the
//! update, and the HF schedules `get_constant_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (with verl's `min_lr_ratio`).
//!
//! Written here rather than using `candle_nn::AdamW` because that optimiser's moments are private:
//! they could not be checkpointed, and exact resume needs them. With [`Precision::F32`] (the 7B
//! recipe's `torch.optim.AdamW`) moments are f32 whatever the weights' dtype and a parameter in
//! bf16 is updated in f32 and rounded back, so an update below half a bf16 ulp is lost. With
//! [`Precision::Bf16Kahan`] (`actor.strategy = "adamw_bf16"`: torchdistx's `AnyPrecisionAdamW`
//! with `use_kahan_summation=True`, spec §6, §10) the moments and a compensation buffer are stored
//! in bf16 and the update goes through the buffer: `c += -lr/bc1 · m/denom; t = p; p += c;
//! c += t − p`, so what rounding drops from the weight stays in `c` and lands later. The
//! arithmetic is f32 with one rounding to storage per tensor (torch rounds after each in-place
//! op; the two agree to bf16 rounding). As in torch, the bf16 buffer itself stops growing once
//! an update is below half its ulp (|c| ≳ 2^9 updates): weights of an LLM's magnitude (≲ 0.1)
//! move well before that at lr 1e-6, a weight near 1.0 does not.

use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Storage, Tensor, Var,
};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

mod schedule;
pub use schedule::LrSchedule;

/// Optimiser settings. Defaults are the reference's (spec §10.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global L2 norm clip; `None` disables clipping (a non-finite norm still skips the step).
    pub max_grad_norm: Option<f64>,
    pub schedule: LrSchedule,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            schedule: LrSchedule::default(),
        }
    }
}

/// What one call of [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping (`actor/grad_norm`); may be non-finite.
    pub grad_norm: f64,
    /// Learning rate used (0 when skipped).
    pub lr: f64,
    /// Whether the update was skipped because the norm was not finite.
    pub skipped: bool,
}

/// Storage precision of the optimiser state (`actor.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 moments, the weight updated in f32 and rounded to its dtype (`torch.optim.AdamW`).
    #[default]
    F32,
    /// bf16 moments and a bf16 Kahan compensation buffer (`AnyPrecisionAdamW`).
    Bf16Kahan,
}

/// AdamW over named parameters.
///
/// A parameter's state (moments, and the Kahan buffer) is allocated at its first update, as
/// torch allocates `state[p]` lazily: a run holds no optimiser state before its first step,
/// and a parameter that never gets a gradient never gets state (its saved state is zeros).
/// On the CPU with f32 weights the update is one pass that writes the weight, the moments and
/// nothing else in place ([`update_in_place`]); the state tensors are this optimiser's own
/// (created here or read from a state file), so no one else sees them change.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    precision: Precision,
    /// Kahan compensation per parameter ([`Precision::Bf16Kahan`]; `None` elsewhere and before
    /// the parameter's first update).
    comp: Vec<Option<Tensor>>,
    names: Vec<String>,
    params: Vec<Var>,
    /// First moments (`None` before the parameter's first update).
    m: Vec<Option<Tensor>>,
    /// Second moments (`None` before the parameter's first update).
    v: Vec<Option<Tensor>>,
    /// Per-parameter update counts (torch keeps `state["step"]` per parameter: a parameter
    /// without a gradient at some update has a smaller `t` in its bias correction).
    t: Vec<u64>,
    /// Updates applied (drives the schedule).
    step: u64,
    /// Updates skipped for a non-finite gradient norm.
    skipped: u64,
}

impl AdamW {
    /// An optimiser for `params` (name, variable); names key the saved state.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> candle_core::Result<Self> {
        Self::with_precision(params, cfg, Precision::F32)
    }

    /// [`Self::new`] with the state stored in `precision`.
    pub fn with_precision(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        precision: Precision,
    ) -> candle_core::Result<Self> {
        if !(cfg.lr >= 0.0 && (0.0..1.0).contains(&cfg.beta1) && (0.0..1.0).contains(&cfg.beta2)) {
            candle_core::bail!("adamw: lr must be >= 0 and betas in [0, 1), got {cfg:?}");
        }
        let (names, params): (Vec<String>, Vec<Var>) = params.into_iter().unzip();
        let n = params.len();
        Ok(AdamW {
            cfg,
            precision,
            comp: vec![None; n],
            names,
            params,
            m: vec![None; n],
            v: vec![None; n],
            t: vec![0; n],
            step: 0,
            skipped: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The state's storage precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    fn state_dtype(precision: Precision) -> DType {
        match precision {
            Precision::F32 => DType::F32,
            Precision::Bf16Kahan => DType::BF16,
        }
    }

    /// Applied updates so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Skipped updates so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The learning rate the next update will use.
    pub fn next_lr(&self) -> f64 {
        self.cfg.lr * self.cfg.schedule.factor(self.step)
    }

    /// The parameters, in the order of [`Self::grads_of`].
    pub fn params(&self) -> &[Var] {
        &self.params
    }

    /// Moves the parameters' gradients out of a backward pass's store, aligned with the
    /// parameters (`None` for a parameter the loss does not reach; like torch, such a parameter
    /// is not updated at all). Taking them out leaves the store without them, so that dropping
    /// the store and then the returned gradients frees them.
    pub fn grads_of(&self, store: &mut GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .map(|p| store.remove(p.as_tensor()))
            .collect()
    }

    /// The state of parameter `i`, `(m, v, compensation)`, allocated (zeros) at its first use.
    fn state_of(&mut self, i: usize) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
        let p = &self.params[i];
        let dtype = Self::state_dtype(self.precision);
        let zeros = || Tensor::zeros(p.shape(), dtype, p.device());
        if self.m[i].is_none() {
            self.m[i] = Some(zeros()?);
            self.v[i] = Some(zeros()?);
            if self.precision == Precision::Bf16Kahan {
                self.comp[i] = Some(zeros()?);
            }
        }
        let get = |x: &Option<Tensor>| {
            x.clone()
                .ok_or_else(|| candle_core::Error::Msg("adamw: state not allocated".into()))
        };
        Ok((get(&self.m[i])?, get(&self.v[i])?, self.comp[i].clone()))
    }

    /// Clip and apply one update from `grads` (aligned with the parameters, e.g. from
    /// [`Self::grads_of`] or a [`GradAccumulator`]). The caller keeps its gradients:
    /// [`Self::step_owned`] frees each as soon as its parameter is updated.
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> candle_core::Result<StepReport> {
        self.step_owned(grads.to_vec())
    }

    /// [`Self::step`], dropping each gradient once its parameter is updated (its memory is
    /// freed there unless the caller kept a handle to it).
    pub fn step_owned(&mut self, grads: Vec<Option<Tensor>>) -> candle_core::Result<StepReport> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "adamw: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            sq += squared_norm(g)?;
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            self.skipped += 1;
            tracing::warn!(grad_norm = norm, "non-finite gradient norm: update skipped");
            return Ok(StepReport {
                grad_norm: norm,
                lr: 0.0,
                skipped: true,
            });
        }
        let scale = match self.cfg.max_grad_norm {
            Some(max) => (max / (norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let lr = self.next_lr();
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        for (i, g) in grads.into_iter().enumerate() {
            let Some(g) = g else { continue };
            self.t[i] += 1;
            let t = self.t[i] as i32;
            let bc1 = 1.0 - b1.powi(t);
            let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
            let (m, v, comp) = self.state_of(i)?;
            let p = &self.params[i];
            let dtype = p.dtype();
            // The weight's value without its variable: arithmetic on the `Var`'s tensor records
            // a graph, and the moments and compensation kept from it would hold every f32
            // temporary of every parameter's update alive (the bf16 0.5B step ran out of 24 GiB).
            let weight = p.as_tensor().detach();
            if let Some(comp) = comp {
                // Chunk by chunk along the flattened parameter, each written back in place: the
                // update's f32 temporaries stay a chunk's size (on whole tensors they were about
                // ten f32 copies of the largest parameter at once, 5 GiB for the 0.5B's
                // embedding, more than the state itself). Element-wise, so the same values.
                let decay = 1.0 - lr * self.cfg.weight_decay;
                let (wf, gf) = (weight.flatten_all()?, g.flatten_all()?);
                let (mf, vf, cf) = (m.flatten_all()?, v.flatten_all()?, comp.flatten_all()?);
                let n = wf.elem_count();
                for start in (0..n).step_by(KAHAN_CHUNK) {
                    let len = KAHAN_CHUNK.min(n - start);
                    let part = |t: &Tensor| t.narrow(0, start, len)?.to_dtype(DType::F32);
                    let g = (part(&gf)? * scale)?;
                    // Decoupled decay in the weight's own dtype, as `p.data.mul_` does.
                    let w = (part(&wf)? * decay)?.to_dtype(dtype)?;
                    let m = ((part(&mf)? * b1)? + (&g * (1.0 - b1))?)?;
                    let v = ((part(&vf)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let denom = ((v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
                    let c = (part(&cf)? - ((&m / &denom)? * (lr / bc1))?)?
                        .to_dtype(DType::BF16)?
                        .to_dtype(DType::F32)?;
                    let before = w.to_dtype(DType::F32)?;
                    let after = (&before + &c)?.to_dtype(dtype)?;
                    let c = (c + (before - after.to_dtype(DType::F32)?)?)?;
                    wf.slice_set(&after, 0, start)?;
                    mf.slice_set(&m.to_dtype(DType::BF16)?, 0, start)?;
                    vf.slice_set(&v.to_dtype(DType::BF16)?, 0, start)?;
                    cf.slice_set(&c.to_dtype(DType::BF16)?, 0, start)?;
                }
                continue;
            }
            if p.device().is_cpu() {
                let h = FusedHyper {
                    scale: scale as f32,
                    decay: (1.0 - lr * self.cfg.weight_decay) as f32,
                    b1: b1 as f32,
                    b2: b2 as f32,
                    bc2_sqrt: bc2_sqrt as f32,
                    eps: self.cfg.eps as f32,
                    step: (lr / bc1) as f32,
                };
                update_in_place(p, &g, &m, &v, &h)?;
                continue;
            }
            let g = (g.to_dtype(DType::F32)? * scale)?;
            let w = weight.to_dtype(DType::F32)?;
            let w = (w * (1.0 - lr * self.cfg.weight_decay))?;
            let m = ((&m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
            let w = (w - ((&m / &denom)? * (lr / bc1))?)?;
            p.set(&w.to_dtype(dtype)?)?;
            self.m[i] = Some(m);
            self.v[i] = Some(v);
        }
        Ok(StepReport {
            grad_norm: norm,
            lr,
            skipped: false,
        })
    }

    /// The state as named tensors: `m.{name}`, `v.{name}` (in the state's precision),
    /// `c.{name}` (the Kahan compensation, [`Precision::Bf16Kahan`]), `t.{name}` (i64
    /// scalar-vector), and `__adamw_counts__` = [step, skipped]. A parameter not updated yet
    /// has zero moments. The moments are the live state, not copies: the next step changes
    /// them (write them out before stepping again, as [`Self::save`] does).
    pub fn state_tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let dtype = Self::state_dtype(self.precision);
        for (i, n) in self.names.iter().enumerate() {
            let p = &self.params[i];
            let or_zeros = |x: &Option<Tensor>| match x {
                Some(x) => Ok(x.clone()),
                None => Tensor::zeros(p.shape(), dtype, p.device()),
            };
            out.insert(format!("m.{n}"), or_zeros(&self.m[i])?);
            out.insert(format!("v.{n}"), or_zeros(&self.v[i])?);
            if self.precision == Precision::Bf16Kahan {
                out.insert(format!("c.{n}"), or_zeros(&self.comp[i])?);
            }
            // Counters are host integers written to the state file: CPU tensors whatever the
            // parameters' device.
            out.insert(
                format!("t.{n}"),
                Tensor::new(&[self.t[i] as i64], &Device::Cpu)?,
            );
        }
        out.insert(
            "__adamw_counts__".into(),
            Tensor::new(&[self.step as i64, self.skipped as i64], &Device::Cpu)?,
        );
        Ok(out)
    }

    /// Write the state to a safetensors file.
    pub fn save(&self, path: &Path) -> candle_core::Result<()> {
        candle_core::safetensors::save(&self.state_tensors()?, path)
    }

    /// Restore the state from [`Self::save`]'s file. Every parameter's moments must be present
    /// with the parameter's shape; the error names the first that is not.
    pub fn load(&mut self, path: &Path) -> candle_core::Result<()> {
        // Read into host memory; the moments are moved to their parameter's device below.
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let counts = t
            .get("__adamw_counts__")
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: no __adamw_counts__", path.display()))
            })?
            .to_vec1::<i64>()?;
        let mut m = Vec::new();
        let mut v = Vec::new();
        let mut comp = Vec::new();
        let mut ts = Vec::new();
        let state = Self::state_dtype(self.precision);
        for (i, n) in self.names.iter().enumerate() {
            let key = format!("t.{n}");
            let tv = t
                .get(&key)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: missing {key}", path.display()))
                })?
                .to_vec1::<i64>()?;
            ts.push(tv.first().copied().unwrap_or(0).max(0) as u64);
            let dev = self.params[i].device();
            let mut keys = vec![(format!("m.{n}"), &mut m), (format!("v.{n}"), &mut v)];
            if self.precision == Precision::Bf16Kahan {
                keys.push((format!("c.{n}"), &mut comp));
            }
            for (key, dst) in keys {
                let x = t.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{}: missing {key}{}",
                        path.display(),
                        if key.starts_with("c.") {
                            " (the run's optimiser state was not saved with `adamw_bf16`)"
                        } else {
                            ""
                        }
                    ))
                })?;
                if x.dtype() != state {
                    candle_core::bail!(
                        "{}: {key} is {:?}, this optimiser keeps its state in {state:?} (was the run's `actor.strategy` changed?)",
                        path.display(),
                        x.dtype()
                    );
                }
                if x.dims() != self.params[i].dims() {
                    candle_core::bail!(
                        "{}: {key} has shape {:?}, the parameter {:?}",
                        path.display(),
                        x.dims(),
                        self.params[i].dims()
                    );
                }
                // The file's tensors are dropped with `t` below: the state is this
                // optimiser's alone, which the in-place update relies on.
                dst.push(Some(x.to_device(dev)?));
            }
        }
        drop(t);
        let n = self.params.len();
        self.m = m;
        self.v = v;
        self.comp = if comp.is_empty() { vec![None; n] } else { comp };
        self.t = ts;
        self.step = counts.first().copied().unwrap_or(0).max(0) as u64;
        self.skipped = counts.get(1).copied().unwrap_or(0).max(0) as u64;
        Ok(())
    }
}

/// Sums gradients over micro-batches (the reference scales each micro-batch loss by
/// `1 / gradient_accumulation` before `backward`, so the sum is the mean of micro-batch means).
/// Each sum is in its parameter's gradient's dtype: f32 for f32 masters (mixed precision
/// accumulates in f32, as FSDP's f32 `.grad`), bf16 for bf16 weights (as torch sums a bf16
/// parameter's `.grad`: the reference's `*_bf16.yaml` runs).
///
/// The first micro-batch's gradients are kept as given (no copy); the second is added into a
/// new buffer per parameter, which the accumulator owns; from the third on, on the CPU, the
/// gradients are added into those buffers in place (elsewhere: `sum + g`, a new tensor). A
/// caller's tensor is therefore never written to by [`Self::add`]; [`Self::take_store`] hands
/// the sums, the first micro-batch's tensors included, to a backward that may.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
    /// Whether `sums[i]` is a buffer this accumulator created (and may write in place).
    owned: Vec<bool>,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one micro-batch's gradients (aligned with the optimiser's parameters); each is
    /// dropped once added.
    pub fn add(&mut self, grads: Vec<Option<Tensor>>) -> candle_core::Result<()> {
        if self.sums.is_empty() {
            self.owned = vec![false; grads.len()];
            self.sums = grads;
            return Ok(());
        }
        if grads.len() != self.sums.len() {
            candle_core::bail!(
                "grad accumulator: {} gradients, expected {}",
                grads.len(),
                self.sums.len()
            );
        }
        for ((s, owned), g) in self.sums.iter_mut().zip(&mut self.owned).zip(grads) {
            let Some(g) = g else { continue };
            *s = Some(match s.take() {
                None => {
                    *owned = false;
                    g
                }
                // Added in place where `add_into` can (host f32 or bf16 sums).
                Some(a) if *owned && !shares_buffer(&a, &g) => {
                    match qoq_model::checkpoint::add_into(&a, &g)? {
                        None => a,
                        Some(sum) => sum,
                    }
                }
                Some(a) => {
                    *owned = true;
                    let g = g.to_dtype(a.dtype())?;
                    (a + g)?
                }
            });
        }
        Ok(())
    }

    /// The sums so far, leaving the accumulator empty.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        self.owned.clear();
        std::mem::take(&mut self.sums)
    }

    /// The sums so far as a gradient store keyed by `params` (aligned with the sums), for
    /// [`qoq_model::checkpoint::backward_onto`] to continue with the next micro-batch's
    /// gradients; `None` before the first micro-batch. The accumulator is left empty:
    /// [`Self::set_sums`] takes the continued sums back. The tensors are handed over:
    /// `backward_onto` adds into them in place, so the caller must hold no other handle to the
    /// gradients it gave to [`Self::add`] (the trainer moves them out of the backward's store).
    pub fn take_store(&mut self, params: &[Var]) -> candle_core::Result<Option<GradStore>> {
        if self.sums.is_empty() {
            return Ok(None);
        }
        if params.len() != self.sums.len() {
            candle_core::bail!(
                "grad accumulator: {} parameters for {} sums",
                params.len(),
                self.sums.len()
            );
        }
        let mut store = GradStore::default();
        for (p, s) in params.iter().zip(self.take()) {
            if let Some(s) = s {
                store.insert(p.as_tensor(), s);
            }
        }
        Ok(Some(store))
    }

    /// Replaces the sums with `sums` (aligned with the parameters: those of a store that
    /// [`qoq_model::checkpoint::backward_onto`] continued from [`Self::take_store`]); they are
    /// not written in place afterwards.
    pub fn set_sums(&mut self, sums: Vec<Option<Tensor>>) {
        self.owned = vec![false; sums.len()];
        self.sums = sums;
    }
}

/// Whether `t` is a contiguous f32 tensor in host memory (what the in-place kernels take).
fn host_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// The address of a host tensor's buffer (`None` elsewhere): two tensors with the same address
/// share their storage. (Tensors of no elements all report the same dangling address, which
/// errs on the side of sharing.)
fn buffer_addr(t: &Tensor) -> Option<usize> {
    let (s, _) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Some(match c {
            CpuStorage::F32(v) => v.as_ptr() as usize,
            CpuStorage::BF16(v) => v.as_ptr() as usize,
            CpuStorage::F16(v) => v.as_ptr() as usize,
            CpuStorage::F64(v) => v.as_ptr() as usize,
            _ => return None,
        }),
        _ => None,
    }
}

/// Whether two host tensors share a buffer (unknown counts as shared).
fn shares_buffer(a: &Tensor, b: &Tensor) -> bool {
    match (buffer_addr(a), buffer_addr(b)) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

/// Elements per rayon task of the element-wise kernels.
const CHUNK: usize = 1 << 15;

/// Elements per piece of the `adamw_bf16` update (a few MiB of f32 temporaries).
const KAHAN_CHUNK: usize = 1 << 20;

/// The f32 elements a contiguous layout addresses in a host storage.
fn f32_of<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

/// [`f32_of`], writable.
fn f32_of_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

/// Σ g² of one gradient, accumulated in f64 (on CPU: contiguous f32 and bf16 values widened one
/// by one, summed in parallel chunks over the tensor's own buffer, without a copy; an f64 copy
/// of a bf16 gradient and its square were 16 bytes per element, 2 GiB for the 0.5B's embedding).
fn squared_norm(g: &Tensor) -> candle_core::Result<f64> {
    use rayon::prelude::*;
    fn sum<T: Copy + Sync>(v: &[T], wide: impl Fn(T) -> f64 + Sync) -> f64 {
        v.par_chunks(1 << 16)
            .map(|c| c.iter().map(|&x| wide(x) * wide(x)).sum::<f64>())
            .sum()
    }
    if host_f32(g) {
        let (s, l) = g.storage_and_layout();
        if let Storage::Cpu(c) = &*s {
            return Ok(sum(f32_of(c, l)?, f64::from));
        }
    }
    if g.device().is_cpu() && g.dtype() == DType::BF16 && g.is_contiguous() {
        let (s, l) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) = (&*s, l.contiguous_offsets()) {
            return Ok(sum(&v[a..b], |x| f64::from(x.to_f32())));
        }
    }
    if g.device().is_cpu() && g.dtype() == DType::F32 {
        return Ok(sum(&g.flatten_all()?.to_vec1::<f32>()?, f64::from));
    }
    g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// The scalars of one AdamW update of one parameter.
struct FusedHyper {
    /// Gradient clip factor.
    scale: f32,
    /// `1 − lr·weight_decay`.
    decay: f32,
    b1: f32,
    b2: f32,
    /// `√(1 − β2^t)`.
    bc2_sqrt: f32,
    eps: f32,
    /// `lr / (1 − β1^t)`.
    step: f32,
}

/// One AdamW update of a parameter on CPU in a single pass over its elements (rayon chunks),
/// instead of a dozen whole-tensor candle ops: the same arithmetic in the same order as the
/// composed path (`w·decay − m/(√v/bc2 + eps)·step` with `m`, `v` updated from the clipped
/// gradient), f32 throughout. Hand-written because candle has no fused optimiser kernel and its
/// CPU element-wise ops run on one thread.
///
/// The moments `m`, `v` (this optimiser's own f32 tensors) are written in place; so is the
/// weight when it is a contiguous f32 tensor, which is what `Var::set` does with the new value
/// (anything holding the variable sees the update either way). A weight in another dtype is
/// updated in an f32 copy and set rounded back. The gradient is only read; one that is not a
/// contiguous f32 tensor, or that shares a buffer with the weight or a moment, is read from an
/// f32 copy.
fn update_in_place(
    p: &Var,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: &FusedHyper,
) -> candle_core::Result<()> {
    let w = p.as_tensor();
    let n = w.elem_count();
    if g.elem_count() != n || m.elem_count() != n || v.elem_count() != n {
        candle_core::bail!(
            "adamw: gradient or moments of {}/{}/{} elements for a parameter of {n}",
            g.elem_count(),
            m.elem_count(),
            v.elem_count()
        );
    }
    if !(host_f32(m) && host_f32(v)) || shares_buffer(m, v) {
        candle_core::bail!("adamw: the moments must be separate contiguous f32 host tensors");
    }
    let g = if host_f32(g) && !shares_buffer(g, w) && !shares_buffer(g, m) && !shares_buffer(g, v) {
        g.clone()
    } else {
        g.to_dtype(DType::F32)?.flatten_all()?.copy()?
    };
    let moments = Moments {
        m,
        v,
        g: &g,
        h,
        w: Cell::new(None),
    };
    if host_f32(w) && !shares_buffer(w, m) && !shares_buffer(w, v) {
        return w.inplace_op1(&OnWeight(&moments));
    }
    let mut wv = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    moments.w.set(Some(&mut wv));
    m.inplace_op1(&moments)?;
    p.set(&Tensor::from_vec(wv, w.shape(), w.device())?.to_dtype(w.dtype())?)
}

/// The update with the weight's elements in hand: writes the moments (below) in place.
struct OnWeight<'a, 'w>(&'a Moments<'a, 'w>);

impl<'w> InplaceOp1 for OnWeight<'_, 'w> {
    fn name(&self) -> &'static str {
        "adamw-weight"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let w = f32_of_mut(s, l)?;
        // Re-borrow for the lifetime the nested op holds it: the slice outlives the call.
        let moments = Moments {
            m: self.0.m,
            v: self.0.v,
            g: self.0.g,
            h: self.0.h,
            w: Cell::new(Some(w)),
        };
        moments.m.inplace_op1(&moments)
    }
}

/// The first moment's storage in hand (the weight's slice in `w`): the second moment and the
/// gradient follow through [`Fused`].
struct Moments<'a, 'w> {
    m: &'a Tensor,
    v: &'a Tensor,
    g: &'a Tensor,
    h: &'a FusedHyper,
    w: Cell<Option<&'w mut [f32]>>,
}

impl InplaceOp1 for Moments<'_, '_> {
    fn name(&self) -> &'static str {
        "adamw-m"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let w = self
            .w
            .take()
            .ok_or_else(|| candle_core::Error::Msg("adamw: weight not in hand".into()))?;
        let fused = Fused {
            w: Cell::new(Some(w)),
            m: Cell::new(Some(f32_of_mut(s, l)?)),
            h: self.h,
        };
        self.v.inplace_op2(self.g, &fused)
    }
}

/// The last level: the second moment written, the gradient read, the kernel run.
struct Fused<'w, 'm> {
    w: Cell<Option<&'w mut [f32]>>,
    m: Cell<Option<&'m mut [f32]>>,
    h: &'w FusedHyper,
}

impl InplaceOp2 for Fused<'_, '_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (Some(w), Some(m)) = (self.w.take(), self.m.take()) else {
            candle_core::bail!("adamw: weight or moment not in hand");
        };
        adamw_kernel(w, m, f32_of_mut(s1, l1)?, f32_of(s2, l2)?, self.h);
        Ok(())
    }
}

/// The AdamW element loop over one parameter (all slices of its length).
fn adamw_kernel(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: &FusedHyper) {
    use rayon::prelude::*;
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((w, m), v), g)| {
            for k in 0..w.len() {
                let gk = g[k] * h.scale;
                let mk = m[k] * h.b1 + gk * (1.0 - h.b1);
                let vk = v[k] * h.b2 + gk * gk * (1.0 - h.b2);
                let denom = vk.sqrt() / h.bc2_sqrt + h.eps;
                w[k] = w[k] * h.decay - mk / denom * h.step;
                m[k] = mk;
                v[k] = vk;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        // A small LCG: reproducible values of both signs, with exact zeros and negative zeros.
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|k| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                match k % 97 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => ((x >> 8) as f32 / (1 << 24) as f32 - 0.5) * scale,
                }
            })
            .collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// The update written out element by element, out of place, one thread (torch's
    /// single-tensor AdamW in f32): what the in-place kernel must reproduce bit for bit.
    fn reference_adamw(
        cfg: &AdamWConfig,
        w: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
        t: i32,
        lr: f64,
        scale: f64,
    ) {
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        let h = FusedHyper {
            scale: scale as f32,
            decay: (1.0 - lr * cfg.weight_decay) as f32,
            b1: b1 as f32,
            b2: b2 as f32,
            bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            eps: cfg.eps as f32,
            step: (lr / (1.0 - b1.powi(t))) as f32,
        };
        let (mut w2, mut m2, mut v2) = (w.to_vec(), m.to_vec(), v.to_vec());
        for k in 0..w.len() {
            let gk = g[k] * h.scale;
            m2[k] = m[k] * h.b1 + gk * (1.0 - h.b1);
            v2[k] = v[k] * h.b2 + gk * gk * (1.0 - h.b2);
            let denom = v2[k].sqrt() / h.bc2_sqrt + h.eps;
            w2[k] = w[k] * h.decay - m2[k] / denom * h.step;
        }
        w.copy_from_slice(&w2);
        m.copy_from_slice(&m2);
        v.copy_from_slice(&v2);
    }

    #[test]
    fn the_in_place_update_equals_the_out_of_place_one_bit_for_bit() {
        let dev = Device::Cpu;
        // Several rayon chunks, and a ragged last one.
        let n = 3 * CHUNK + 123;
        let cfg = AdamWConfig {
            lr: 1e-3,
            max_grad_norm: Some(1.0),
            ..AdamWConfig::default()
        };
        let w0 = seeded(n, 1, 0.2);
        let p = Var::from_vec(w0.clone(), (3, n / 3), &dev).unwrap();
        // A second parameter viewed through a transposed gradient (not contiguous: read
        // from a copy) to cover that path too.
        let q = Var::from_vec(seeded(6, 2, 1.0), (2, 3), &dev).unwrap();
        let mut o = AdamW::new(
            vec![("p".into(), p.clone()), ("q".into(), q.clone())],
            cfg.clone(),
        )
        .unwrap();
        let w_addr = buffer_addr(p.as_tensor());
        let (mut w, mut m, mut v) = (w0, vec![0f32; n], vec![0f32; n]);
        let mut state_addr = None;
        for t in 1..=4 {
            let g = seeded(n, 10 + t as u32, 4.0);
            let gq = Tensor::from_vec(seeded(6, 20 + t as u32, 1.0), (3, 2), &dev)
                .unwrap()
                .t()
                .unwrap();
            let gt = Tensor::from_vec(g.clone(), (3, n / 3), &dev).unwrap();
            let keep = gt.clone();
            let sq = squared_norm(&gt).unwrap() + squared_norm(&gq).unwrap();
            let scale = (1.0 / (sq.sqrt() + 1e-6)).min(1.0);
            assert!(scale < 1.0, "the gradients are clipped");
            let lr = o.next_lr();
            o.step_owned(vec![Some(gt), Some(gq)]).unwrap();
            reference_adamw(&cfg, &mut w, &mut m, &mut v, &g, t, lr, scale);
            assert_eq!(
                bits(p.as_tensor()),
                w.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let st = o.state_tensors().unwrap();
            assert_eq!(
                bits(&st["m.p"]),
                m.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(
                bits(&st["v.p"]),
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            // Written in place: the weight and the moments keep their buffers.
            assert_eq!(
                buffer_addr(p.as_tensor()),
                w_addr,
                "step {t}: weight buffer"
            );
            let addrs = (buffer_addr(&st["m.p"]), buffer_addr(&st["v.p"]));
            assert_eq!(
                *state_addr.get_or_insert(addrs),
                addrs,
                "step {t}: moment buffers"
            );
            // The caller's gradient is read, never written.
            assert_eq!(
                bits(&keep),
                g.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_weight_in_another_dtype_is_updated_as_before() {
        // bf16 weights with f32 state: updated in an f32 copy and rounded back; equal to the
        // composed arithmetic rounded once.
        let dev = Device::Cpu;
        let w0 = seeded(40, 3, 1.0);
        let p = Var::from_tensor(
            &Tensor::from_vec(w0.clone(), 40, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let cfg = AdamWConfig {
            lr: 0.05,
            max_grad_norm: None,
            ..AdamWConfig::default()
        };
        let mut o = AdamW::new(vec![("p".into(), p.clone())], cfg.clone()).unwrap();
        let g = seeded(40, 4, 1.0);
        o.step(&[Some(Tensor::from_vec(g.clone(), 40, &dev).unwrap())])
            .unwrap();
        let mut w: Vec<f32> = Tensor::from_vec(w0, 40, &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mut m, mut v) = (vec![0f32; 40], vec![0f32; 40]);
        reference_adamw(&cfg, &mut w, &mut m, &mut v, &g, 1, 0.05, 1.0);
        let want = Tensor::from_vec(w, 40, &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(p.dtype(), DType::BF16);
        assert_eq!(
            bits(&p.as_tensor().to_dtype(DType::F32).unwrap()),
            bits(&want.to_dtype(DType::F32).unwrap())
        );
    }

    #[test]
    fn state_is_allocated_at_a_parameters_first_update() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let b = Var::new(&[3.0f32], &dev).unwrap();
        let mut o = AdamW::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        assert!(
            o.m.iter().chain(&o.v).all(Option::is_none),
            "nothing before a step"
        );
        o.step(&[Some(Tensor::new(&[1.0f32, 1.0], &dev).unwrap()), None])
            .unwrap();
        assert!(o.m[0].is_some() && o.v[0].is_some());
        assert!(o.m[1].is_none() && o.v[1].is_none(), "b had no gradient");
        // The saved state is what eager zeros were: b's moments are zeros, and they load back.
        let st = o.state_tensors().unwrap();
        assert_eq!(st["m.b"].to_vec1::<f32>().unwrap(), vec![0.0]);
        assert_eq!(st["v.b"].dims(), &[1]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        o.save(&path).unwrap();
        let mut o2 = AdamW::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        o2.load(&path).unwrap();
        assert_eq!(
            o2.state_tensors().unwrap()["m.a"].to_vec1::<f32>().unwrap(),
            st["m.a"].to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn accumulation_is_the_sum_in_owned_buffers_and_leaves_callers_tensors_alone() {
        let dev = Device::Cpu;
        let n = 7 * 10_000; // more than two rayon chunks
        let mb: Vec<Tensor> = (0..4)
            .map(|k| Tensor::from_vec(seeded(n, 30 + k, 1.0), (n / 7, 7), &dev).unwrap())
            .collect();
        let before: Vec<Vec<u32>> = mb.iter().map(bits).collect();
        let small = |x: f32| Some(Tensor::new(&[x], &dev).unwrap());
        let mut acc = GradAccumulator::new();
        // The caller keeps handles on every gradient it hands over.
        acc.add(vec![Some(mb[0].clone()), None, small(1.0)])
            .unwrap();
        acc.add(vec![Some(mb[1].clone()), small(2.0), None])
            .unwrap();
        let addr = buffer_addr(acc.sums[0].as_ref().unwrap());
        acc.add(vec![Some(mb[2].clone()), small(3.0), small(4.0)])
            .unwrap();
        acc.add(vec![Some(mb[3].clone()), None, small(5.0)])
            .unwrap();
        // From the third micro-batch on the sum is written in place.
        assert_eq!(buffer_addr(acc.sums[0].as_ref().unwrap()), addr);
        let sums = acc.take();
        let want = (((&mb[0] + &mb[1]).unwrap() + &mb[2]).unwrap() + &mb[3]).unwrap();
        assert_eq!(bits(sums[0].as_ref().unwrap()), bits(&want));
        assert_eq!(
            sums[1].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![5.0]
        );
        assert_eq!(
            sums[2].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![10.0]
        );
        for (t, b) in mb.iter().zip(&before) {
            assert_eq!(&bits(t), b, "a caller's gradient was written to");
        }
        assert!(acc.take().is_empty());
        // A bf16 gradient (of a bf16 parameter) is summed in bf16, as torch sums a bf16
        // parameter's `.grad`.
        let mut acc = GradAccumulator::new();
        let h = Tensor::new(&[0.5f32, 0.25], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        for _ in 0..3 {
            acc.add(vec![Some(h.clone())]).unwrap();
        }
        let s = acc.take().remove(0).unwrap();
        assert_eq!(s.dtype(), DType::BF16);
        assert_eq!(
            s.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            vec![1.5, 0.75]
        );
        assert_eq!(
            bits(&h.to_dtype(DType::F32).unwrap()),
            bits(&Tensor::new(&[0.5f32, 0.25], &dev).unwrap()),
            "a caller's gradient was written to"
        );
    }

    #[test]
    fn grads_of_moves_the_gradients_out_of_the_store() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let b = Var::new(&[3.0f32], &dev).unwrap();
        let o = AdamW::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let mut store = (a.as_tensor() * 2.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = o.grads_of(&mut store);
        assert_eq!(
            g[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0, 2.0]
        );
        assert!(g[1].is_none(), "b is not reached");
        assert!(
            store.get(a.as_tensor()).is_none(),
            "the store no longer holds it"
        );
    }

    #[test]
    fn a_non_finite_norm_skips_the_update_and_is_counted() {
        let p = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut o = AdamW::new(vec![("p".into(), p.clone())], AdamWConfig::default()).unwrap();
        let g = Tensor::new(&[f32::NAN, 1.0], &Device::Cpu).unwrap();
        let r = o.step(&[Some(g)]).unwrap();
        assert!(r.skipped && r.grad_norm.is_nan());
        assert_eq!((o.steps(), o.skipped()), (0, 1));
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn parameters_without_gradients_are_left_alone() {
        let a = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let b = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            ..AdamWConfig::default()
        };
        let mut o =
            AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg).unwrap();
        o.step(&[Some(Tensor::new(&[1.0f32], &Device::Cpu).unwrap()), None])
            .unwrap();
        assert!(a.as_tensor().to_vec1::<f32>().unwrap()[0] < 1.0);
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0]);
        assert!(o.step(&[None]).is_err(), "gradient count is checked");
    }

    /// bf16 weights of an LLM's typical magnitude (±0.02) trained for `steps` updates of lr 1e-6
    /// with a constant gradient: each update moves them by about 1e-6, far below half a bf16 ulp
    /// there (2^-14 ≈ 6.1e-5).
    fn bf16_run(precision: Precision, steps: usize) -> (f32, AdamW, Var) {
        let p = Var::from_tensor(
            &Tensor::new(&[0.02f32, -0.02], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let cfg = AdamWConfig {
            lr: 1e-6,
            weight_decay: 0.0,
            max_grad_norm: None,
            ..AdamWConfig::default()
        };
        let mut o = AdamW::with_precision(vec![("p".into(), p.clone())], cfg, precision).unwrap();
        let g = Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
        for _ in 0..steps {
            o.step(&[Some(g.clone())]).unwrap();
        }
        let w = p
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        (w, o, p)
    }

    #[test]
    fn kahan_keeps_lr_1e6_updates_on_bf16_weights_that_plain_rounding_loses() {
        let w0 = Tensor::new(&[0.02f32], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        // 300 updates of ~1e-6 move the weight by ~3e-4, about 2.5 bf16 ulps (2^-13) there.
        let (plain, _, _) = bf16_run(Precision::F32, 300);
        assert_eq!(plain, w0, "without compensation every update rounds away");
        let (kahan, o, p) = bf16_run(Precision::Bf16Kahan, 300);
        let ulp = 2f32.powi(-13);
        assert!(
            (kahan - (w0 - 3e-4)).abs() <= ulp,
            "with compensation the weight moved from {w0} to {kahan}, expected {} within {ulp}",
            w0 - 3e-4
        );
        // The kept state is plain values: no graph back to the weight (which would keep every
        // temporary of the update alive).
        for t in [&o.m[0], &o.v[0], &o.comp[0]] {
            assert!(!t.as_ref().unwrap().track_op(), "state records a graph");
        }
        let state = o.state_tensors().unwrap();
        assert_eq!(state["m.p"].dtype(), DType::BF16);
        assert_eq!(state["c.p"].dtype(), DType::BF16);
        // Weight plus compensation carry the update, for either sign, up to the bf16 rounding of
        // each addition to the buffer (a few % of the update at this ratio; 10 % allowed).
        let c = state["c.p"]
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let w = p
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(((w[0] + c[0]) - (w0 - 3e-4)).abs() < 3e-5, "{w:?} + {c:?}");
        assert!(((w[1] + c[1]) - (-w0 + 3e-4)).abs() < 3e-5, "{w:?} + {c:?}");
    }

    /// The squared norm of a bf16 gradient (read in place) is the f64 sum of its squared values,
    /// as the widening path computes it for any other dtype.
    #[test]
    fn squared_norm_of_a_bf16_gradient_is_read_in_place() {
        let g = Tensor::from_vec(
            seeded(3 * (1 << 16) + 11, 5, 3.0),
            3 * (1 << 16) + 11,
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
        let want: f64 = g
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum();
        let got = squared_norm(&g).unwrap();
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        let wide = squared_norm(&g.to_dtype(DType::F16).unwrap()).unwrap();
        assert!(
            (got - wide).abs() <= 1e-3 * want,
            "{got} vs {wide} through f64"
        );
    }

    /// The `adamw_bf16` update runs in pieces of `KAHAN_CHUNK` elements written in place: a
    /// parameter longer than one piece gets, element for element, what its two parts get as
    /// parameters of their own, and its state buffers stay the same buffers.
    #[test]
    fn kahan_update_in_pieces_equals_the_update_of_the_parts() {
        let dev = Device::Cpu;
        let n = KAHAN_CHUNK + 5;
        let bf = |v: Vec<f32>| {
            Tensor::from_vec(v, n, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let w0 = bf(seeded(n, 7, 0.1));
        let cfg = AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            max_grad_norm: None,
            ..AdamWConfig::default()
        };
        let whole = Var::from_tensor(&w0).unwrap();
        let head = Var::from_tensor(&w0.narrow(0, 0, KAHAN_CHUNK).unwrap()).unwrap();
        let tail = Var::from_tensor(&w0.narrow(0, KAHAN_CHUNK, 5).unwrap()).unwrap();
        let mut a = AdamW::with_precision(
            vec![("w".into(), whole.clone())],
            cfg.clone(),
            Precision::Bf16Kahan,
        )
        .unwrap();
        let mut b = AdamW::with_precision(
            vec![("h".into(), head.clone()), ("t".into(), tail.clone())],
            cfg,
            Precision::Bf16Kahan,
        )
        .unwrap();
        let mut addr = None;
        for step in 0..3 {
            let g = Tensor::from_vec(seeded(n, 40 + step, 1.0), n, &dev).unwrap();
            a.step(&[Some(g.clone())]).unwrap();
            b.step(&[
                Some(g.narrow(0, 0, KAHAN_CHUNK).unwrap()),
                Some(g.narrow(0, KAHAN_CHUNK, 5).unwrap()),
            ])
            .unwrap();
            let now: Vec<Option<usize>> = [&a.m[0], &a.v[0], &a.comp[0]]
                .iter()
                .map(|t| buffer_addr(t.as_ref().unwrap()))
                .collect();
            assert_eq!(*addr.get_or_insert(now.clone()), now, "state reallocated");
        }
        let joined = |x: &Tensor, y: &Tensor| {
            bits(
                &Tensor::cat(&[x, y], 0)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        };
        let f32_bits = |t: &Tensor| bits(&t.to_dtype(DType::F32).unwrap());
        assert_eq!(
            f32_bits(whole.as_tensor()),
            joined(head.as_tensor(), tail.as_tensor())
        );
        for (x, y, z) in [
            (&a.m, &b.m, "m"),
            (&a.v, &b.v, "v"),
            (&a.comp, &b.comp, "c"),
        ] {
            assert_eq!(
                f32_bits(x[0].as_ref().unwrap()),
                joined(y[0].as_ref().unwrap(), y[1].as_ref().unwrap()),
                "{z}"
            );
        }
        assert_ne!(
            f32_bits(whole.as_tensor()),
            f32_bits(&w0),
            "the weight moved"
        );
    }

    #[test]
    fn kahan_state_resumes_exactly_and_is_not_mixed_with_f32_state() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut a, pa) = bf16_run(Precision::Bf16Kahan, 700);
        let path = dir.path().join("optim.safetensors");
        a.save(&path).unwrap();
        let pb = Var::from_tensor(pa.as_tensor()).unwrap();
        let mut b = AdamW::with_precision(
            vec![("p".into(), pb.clone())],
            a.config().clone(),
            Precision::Bf16Kahan,
        )
        .unwrap();
        b.load(&path).unwrap();
        let g = Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
        for _ in 0..600 {
            a.step(&[Some(g.clone())]).unwrap();
            b.step(&[Some(g.clone())]).unwrap();
        }
        let bits = |v: &Var| {
            v.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&pa), bits(&pb));
        // An f32 optimiser's state has f32 moments (and no compensation): refused either way.
        let (_, f, _) = bf16_run(Precision::F32, 2);
        let fpath = dir.path().join("f32.safetensors");
        f.save(&fpath).unwrap();
        let err = b.load(&fpath).unwrap_err().to_string();
        assert!(
            err.contains("m.p") && err.contains("actor.strategy"),
            "{err}"
        );
        let mut f2 = AdamW::new(vec![("p".into(), pb)], AdamWConfig::default()).unwrap();
        let err = f2.load(&path).unwrap_err().to_string();
        assert!(err.contains("m.p") && err.contains("BF16"), "{err}");
    }
}
