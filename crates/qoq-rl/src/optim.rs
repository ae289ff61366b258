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
//! they could not be checkpointed, and exact resume needs them. Moments are f32 whatever the
//! weights' dtype; a parameter in bf16 is updated in f32 and rounded back.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Learning-rate schedule over optimiser updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// HF `get_constant_schedule_with_warmup` (the reference's, with warmup 0).
    Constant {
        #[serde(default)]
        warmup_steps: u64,
    },
    /// HF `get_cosine_schedule_with_warmup` (half a cosine) with a floor of `min_lr_ratio`.
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        #[serde(default)]
        min_lr_ratio: f64,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::Constant { warmup_steps: 0 }
    }
}

impl LrSchedule {
    /// The multiplier of the base learning rate for update number `step` (0-based), as the HF
    /// `LambdaLR` gives it: the first update of a warmup uses multiplier 0.
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant { warmup_steps } => {
                if step < warmup_steps {
                    step as f64 / warmup_steps.max(1) as f64
                } else {
                    1.0
                }
            }
            LrSchedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => {
                if step < warmup_steps {
                    return step as f64 / warmup_steps.max(1) as f64;
                }
                let progress = (step - warmup_steps) as f64
                    / (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (min_lr_ratio + (1.0 - min_lr_ratio) * cos).max(0.0)
            }
        }
    }
}

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

/// AdamW over named parameters.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
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
        if !(cfg.lr >= 0.0 && (0.0..1.0).contains(&cfg.beta1) && (0.0..1.0).contains(&cfg.beta2)) {
            candle_core::bail!("adamw: lr must be >= 0 and betas in [0, 1), got {cfg:?}");
        }
        let mut names = Vec::new();
        let mut vars = Vec::new();
        let mut m = Vec::new();
        let mut v = Vec::new();
        for (n, p) in params {
            m.push(Tensor::zeros(p.shape(), DType::F32, p.device())?);
            v.push(Tensor::zeros(p.shape(), DType::F32, p.device())?);
            names.push(n);
            vars.push(p);
        }
        Ok(AdamW {
            cfg,
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

    /// The state as named tensors: `m.{name}`, `v.{name}`, `t.{name}` (i64 scalar-vector), and
    /// `__adamw_counts__` = [step, skipped].
    pub fn state_tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            out.insert(format!("m.{n}"), self.m[i].clone());
            out.insert(format!("v.{n}"), self.v[i].clone());
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
        let mut ts = Vec::new();
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
            for (key, dst) in [(format!("m.{n}"), &mut m), (format!("v.{n}"), &mut v)] {
                let x = t.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: missing {key}", path.display()))
                })?;
                if x.dims() != self.params[i].dims() {
                    candle_core::bail!(
                        "{}: {key} has shape {:?}, the parameter {:?}",
                        path.display(),
                        x.dims(),
                        self.params[i].dims()
                    );
                }
                dst.push(x.to_dtype(DType::F32)?.to_device(dev)?);
            }
        }
        self.m = m;
        self.v = v;
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
    fn schedules_match_the_hf_lambdas() {
        let c = LrSchedule::Constant { warmup_steps: 4 };
        assert_eq!(
            (0..6).map(|s| c.factor(s)).collect::<Vec<_>>(),
            vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
        );
        let cos = LrSchedule::WarmupCosine {
            warmup_steps: 2,
            total_steps: 12,
            min_lr_ratio: 0.0,
        };
        assert_eq!(cos.factor(1), 0.5);
        assert_eq!(cos.factor(2), 1.0);
        assert!((cos.factor(7) - 0.5).abs() < 1e-12);
        assert!(cos.factor(12).abs() < 1e-12);
        let floor = LrSchedule::WarmupCosine {
            warmup_steps: 0,
            total_steps: 10,
            min_lr_ratio: 0.1,
        };
        assert!((floor.factor(10) - 0.1).abs() < 1e-12);
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
}
