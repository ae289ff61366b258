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
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
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
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    precision: Precision,
    /// Kahan compensation per parameter ([`Precision::Bf16Kahan`]; empty otherwise).
    comp: Vec<Tensor>,
    names: Vec<String>,
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
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
        let mut names = Vec::new();
        let mut vars = Vec::new();
        let mut m = Vec::new();
        let mut v = Vec::new();
        let mut comp = Vec::new();
        let state = Self::state_dtype(precision);
        for (n, p) in params {
            m.push(Tensor::zeros(p.shape(), state, p.device())?);
            v.push(Tensor::zeros(p.shape(), state, p.device())?);
            if precision == Precision::Bf16Kahan {
                comp.push(Tensor::zeros(p.shape(), state, p.device())?);
            }
            names.push(n);
            vars.push(p);
        }
        Ok(AdamW {
            cfg,
            precision,
            comp,
            names,
            params: vars,
            t: vec![0; m.len()],
            m,
            v,
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

    /// The parameters' gradients from a backward pass, aligned with the parameters (`None` for a
    /// parameter the loss does not reach; like torch, such a parameter is not updated at all).
    pub fn grads_of(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .map(|p| store.get(p.as_tensor()).cloned())
            .collect()
    }

    /// Clip and apply one update from `grads` (aligned with the parameters, e.g. from
    /// [`Self::grads_of`] or a [`GradAccumulator`]).
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> candle_core::Result<StepReport> {
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
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            self.t[i] += 1;
            let t = self.t[i] as i32;
            let bc1 = 1.0 - b1.powi(t);
            let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
            let p = &self.params[i];
            let dtype = p.dtype();
            if self.precision == Precision::Bf16Kahan {
                let g = (g.to_dtype(DType::F32)? * scale)?;
                // Decoupled decay in the weight's own dtype, as `p.data.mul_` does.
                let w = (p.as_tensor().to_dtype(DType::F32)? * (1.0 - lr * self.cfg.weight_decay))?
                    .to_dtype(dtype)?;
                let m = ((self.m[i].to_dtype(DType::F32)? * b1)? + (&g * (1.0 - b1))?)?;
                let v = ((self.v[i].to_dtype(DType::F32)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let denom = ((v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
                let c = (self.comp[i].to_dtype(DType::F32)? - ((&m / &denom)? * (lr / bc1))?)?
                    .to_dtype(DType::BF16)?
                    .to_dtype(DType::F32)?;
                let before = w.to_dtype(DType::F32)?;
                let after = (&before + &c)?.to_dtype(dtype)?;
                let c = (c + (before - after.to_dtype(DType::F32)?)?)?;
                p.set(&after)?;
                self.m[i] = m.to_dtype(DType::BF16)?;
                self.v[i] = v.to_dtype(DType::BF16)?;
                self.comp[i] = c.to_dtype(DType::BF16)?;
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
                let w = fused_cpu_update(p.as_tensor(), g, &mut self.m[i], &mut self.v[i], &h)?;
                p.set(&w.to_dtype(dtype)?)?;
                continue;
            }
            let g = (g.to_dtype(DType::F32)? * scale)?;
            let w = p.as_tensor().to_dtype(DType::F32)?;
            let w = (w * (1.0 - lr * self.cfg.weight_decay))?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
            let w = (w - ((&m / &denom)? * (lr / bc1))?)?;
            p.set(&w.to_dtype(dtype)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(StepReport {
            grad_norm: norm,
            lr,
            skipped: false,
        })
    }

    /// The state as named tensors: `m.{name}`, `v.{name}` (in the state's precision),
    /// `c.{name}` (the Kahan compensation, [`Precision::Bf16Kahan`]), `t.{name}` (i64
    /// scalar-vector), and `__adamw_counts__` = [step, skipped].
    pub fn state_tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            out.insert(format!("m.{n}"), self.m[i].clone());
            out.insert(format!("v.{n}"), self.v[i].clone());
            if let Some(c) = self.comp.get(i) {
                out.insert(format!("c.{n}"), c.clone());
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
                dst.push(x.to_device(dev)?);
            }
        }
        self.m = m;
        self.v = v;
        self.comp = comp;
        self.t = ts;
        self.step = counts.first().copied().unwrap_or(0).max(0) as u64;
        self.skipped = counts.get(1).copied().unwrap_or(0).max(0) as u64;
        Ok(())
    }
}

/// Sums gradients over micro-batches (the reference scales each micro-batch loss by
/// `1 / gradient_accumulation` before `backward`, so the sum is the mean of micro-batch means).
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one micro-batch's gradients (aligned with the optimiser's parameters).
    pub fn add(&mut self, grads: Vec<Option<Tensor>>) -> candle_core::Result<()> {
        if self.sums.is_empty() {
            self.sums = grads
                .into_iter()
                .map(|g| g.map(|g| g.to_dtype(DType::F32)).transpose())
                .collect::<candle_core::Result<_>>()?;
            return Ok(());
        }
        if grads.len() != self.sums.len() {
            candle_core::bail!(
                "grad accumulator: {} gradients, expected {}",
                grads.len(),
                self.sums.len()
            );
        }
        for (s, g) in self.sums.iter_mut().zip(grads) {
            if let Some(g) = g {
                let g = g.to_dtype(DType::F32)?;
                *s = Some(match s.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The sums so far, leaving the accumulator empty.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        std::mem::take(&mut self.sums)
    }
}

/// Σ g² of one gradient, accumulated in f64 (on CPU: f32 and bf16/f16 values widened one by
/// one, summed in parallel chunks without an f64 copy of the tensor).
fn squared_norm(g: &Tensor) -> candle_core::Result<f64> {
    use rayon::prelude::*;
    if g.device().is_cpu() && g.dtype() == DType::F32 {
        let v = g.flatten_all()?.to_vec1::<f32>()?;
        return Ok(v
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
            .sum());
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
/// CPU element-wise ops run on one thread. Returns the new weights (f32); `m` and `v` are
/// replaced.
fn fused_cpu_update(
    w: &Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    h: &FusedHyper,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let shape = w.shape().clone();
    let mut wv = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let gv = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut mv = m.flatten_all()?.to_vec1::<f32>()?;
    let mut vv = v.flatten_all()?.to_vec1::<f32>()?;
    if gv.len() != wv.len() || mv.len() != wv.len() || vv.len() != wv.len() {
        candle_core::bail!(
            "adamw: gradient or moments of {} elements for a parameter of {}",
            gv.len(),
            wv.len()
        );
    }
    const CHUNK: usize = 1 << 15;
    wv.par_chunks_mut(CHUNK)
        .zip(mv.par_chunks_mut(CHUNK))
        .zip(vv.par_chunks_mut(CHUNK))
        .zip(gv.par_chunks(CHUNK))
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
    let dev = w.device();
    *m = Tensor::from_vec(mv, shape.clone(), dev)?;
    *v = Tensor::from_vec(vv, shape.clone(), dev)?;
    Tensor::from_vec(wv, shape, dev)
}

#[cfg(test)]
mod tests {
    use super::*;

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
