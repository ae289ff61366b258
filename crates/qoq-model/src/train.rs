//! Training support: parameters as `Var`s where trainable, freezing switches per component, and
//! saving (with LoRA adapters merged) under the checkpoint's key names (spec §6).
//!
//! Reference: `verl/workers/fsdp_workers.py::_build_model_optimizer` (`freeze_vision_tower`,
//! `freeze_llm`, `freeze_time_series_encoder`, all false by default).

use crate::error::{Error, Result};
use crate::model::ClinicalVlm;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Which components are frozen (their parameters are plain tensors and get no gradient).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Freeze {
    /// `visual.*`.
    #[serde(default)]
    pub vision_tower: bool,
    /// `time_series_embedding.*` (ECG-JEPA encoder and projector).
    #[serde(default)]
    pub time_series_encoder: bool,
    /// `model.*` and `lm_head.*` (the decoder; also freeze it when training LoRA adapters).
    #[serde(default)]
    pub llm: bool,
}

/// The component a parameter (flat-layout name) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `visual.*`.
    VisionTower,
    /// `time_series_embedding.*`.
    TimeSeriesEncoder,
    /// Everything else (`model.*`, `lm_head.*`).
    Llm,
    /// The value model's scalar head (`score.*`, [`crate::value::ValueModel`]); always trained.
    ValueHead,
}

impl Component {
    /// Component of a parameter name.
    pub fn of(name: &str) -> Self {
        if name.starts_with("visual.") {
            Component::VisionTower
        } else if name.starts_with("time_series_embedding.") {
            Component::TimeSeriesEncoder
        } else if name.starts_with("score.") {
            Component::ValueHead
        } else {
            Component::Llm
        }
    }
}

impl Freeze {
    /// Whether the parameter `name` is trained. ECG-JEPA's fixed sin-cos table (`pos_embed`, a
    /// `requires_grad=False` parameter upstream) never is.
    pub fn trains(&self, name: &str) -> bool {
        if name.ends_with(".pos_embed") {
            return false;
        }
        match Component::of(name) {
            Component::VisionTower => !self.vision_tower,
            Component::TimeSeriesEncoder => !self.time_series_encoder,
            Component::Llm => !self.llm,
            Component::ValueHead => true,
        }
    }
}

/// One model parameter.
#[derive(Debug, Clone)]
pub enum Param {
    /// Receives gradients.
    Trainable(Var),
    /// Fixed.
    Frozen(Tensor),
}

impl Param {
    /// The value.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Trainable(v) => v.as_tensor(),
            Param::Frozen(t) => t,
        }
    }
}

/// All parameters the model took, by checkpoint (flat-layout) name.
#[derive(Debug, Clone, Default)]
pub struct ParamStore(Arc<Mutex<BTreeMap<String, Param>>>);

impl ParamStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Param>>> {
        self.0
            .lock()
            .map_err(|_| Error::Config("parameter store poisoned".into()))
    }

    /// `(name, var)` of every trainable parameter, sorted by name.
    pub fn trainable(&self) -> Result<Vec<(String, Var)>> {
        Ok(self
            .lock()?
            .iter()
            .filter_map(|(n, p)| match p {
                Param::Trainable(v) => Some((n.clone(), v.clone())),
                Param::Frozen(_) => None,
            })
            .collect())
    }

    /// `(name, value)` of every parameter, sorted by name.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .lock()?
            .iter()
            .map(|(n, p)| (n.clone(), p.tensor().clone()))
            .collect())
    }
}

struct TrainBackend<'a> {
    inner: VarBuilder<'a>,
    store: ParamStore,
    freeze: Freeze,
}

impl SimpleBackend for TrainBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut m = self
            .store
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter store poisoned".into()))?;
        if let Some(p) = m.get(name) {
            return Ok(p.tensor().clone());
        }
        let t = self
            .inner
            .get_with_hints_dtype(s, name, h, dtype)?
            .to_device(dev)?;
        let p = if self.freeze.trains(name) {
            Param::Trainable(Var::from_tensor(&t)?)
        } else {
            Param::Frozen(t.detach())
        };
        let out = p.tensor().clone();
        m.insert(name.to_string(), p);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked_dtype(name, dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Wrap a weight source (checkpoint or `VarMap`, at its root) so that every parameter the model
/// takes becomes a `Var` unless its component is frozen; the returned store lists them.
pub fn trainable_var_builder<'a>(
    inner: VarBuilder<'a>,
    freeze: Freeze,
) -> (VarBuilder<'a>, ParamStore) {
    let store = ParamStore::default();
    let dtype = inner.dtype();
    let dev = inner.device().clone();
    let backend = TrainBackend {
        inner,
        store: store.clone(),
        freeze,
    };
    (
        VarBuilder::from_backend(Box::new(backend), dtype, dev),
        store,
    )
}

struct CastBackend {
    store: ParamStore,
    copies: ComputeCopies,
}

/// The compute copies of a mixed-precision model ([`cast_var_builder`]): for every trained
/// parameter, the `Var` the model's forward reads (the master cast to the compute dtype, a leaf
/// of its own) and its master `Var`, by checkpoint name.
///
/// [`crate::checkpoint::backward_onto_copies`] brings the copies' gradients to the masters: the
/// CPU projections and the token embedding add theirs straight into the masters' f32 sums as
/// the backward reaches them, the others (norms, biases, candle's paths) are converted and added
/// when the backward ends. A tracked cast (`master.to_dtype(bf16)` in the graph) would instead
/// keep every weight's bf16 gradient until the end of the backward, the casts being the graph's
/// first nodes, and then add each into a zeroed f32 tensor: a compute-dtype copy of every
/// gradient and an f32 one more at the peak.
#[derive(Debug, Clone, Default)]
pub struct ComputeCopies(Arc<Mutex<BTreeMap<String, (Var, Var)>>>);

impl ComputeCopies {
    /// `(copy, master)` of every trained parameter, sorted by name.
    pub fn pairs(&self) -> Result<Vec<(Var, Var)>> {
        Ok(self
            .0
            .lock()
            .map_err(|_| Error::Config("compute copies poisoned".into()))?
            .values()
            .cloned()
            .collect())
    }

    /// Writes every master's current value into its copy, in place (after an optimiser step):
    /// one parameter's cast at a time, no second set of copies.
    pub fn refresh(&self) -> Result<()> {
        for (copy, master) in self.pairs()? {
            copy.set(&master.as_tensor().to_dtype(copy.dtype())?)?;
        }
        Ok(())
    }
}

impl SimpleBackend for CastBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "parameter {name}: shape {:?} in the store, {s:?} asked",
                t.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        fn poisoned<T>(_: T) -> candle_core::Error {
            candle_core::Error::Msg("parameter store poisoned".into())
        }
        let mut copies = self.copies.0.lock().map_err(poisoned)?;
        // A parameter taken twice (tied embeddings) has one copy.
        if let Some((copy, _)) = copies.get(name) {
            return Ok(copy.as_tensor().clone());
        }
        let m = self.store.0.lock().map_err(poisoned)?;
        let p = m.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("parameter {name} is not in the master store"))
        })?;
        match p {
            Param::Trainable(master) => {
                let cast = master
                    .as_tensor()
                    .detach()
                    .to_dtype(dtype)?
                    .to_device(dev)?;
                let copy = Var::from_tensor(&cast)?;
                copies.insert(name.to_string(), (copy.clone(), master.clone()));
                Ok(copy.as_tensor().clone())
            }
            Param::Frozen(t) => t.to_dtype(dtype)?.to_device(dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.store.0.lock().is_ok_and(|m| m.contains_key(name))
    }
}

/// Mixed precision (FSDP `MixedPrecision(param_dtype=compute)`): a builder whose every tensor is
/// the cast to `dtype` of the parameter of the same name in `store` (the master weights, filled
/// by building a model over [`trainable_var_builder`]'s builder). A trained parameter's cast is a
/// `Var` of its own, listed with its master in the returned [`ComputeCopies`]: a model built
/// over this builder computes in `dtype`, and
/// [`crate::checkpoint::backward_onto_copies`] brings its gradients to the master `Var`s, in the
/// masters' dtype (a plain `backward` leaves them on the copies). Frozen parameters are plain
/// casts. The casts are taken when the model is built: after an optimiser step,
/// [`ComputeCopies::refresh`] writes the new masters into them.
pub fn cast_var_builder(
    store: &ParamStore,
    dtype: DType,
    dev: &Device,
) -> (VarBuilder<'static>, ComputeCopies) {
    let copies = ComputeCopies::default();
    let backend = CastBackend {
        store: store.clone(),
        copies: copies.clone(),
    };
    (
        VarBuilder::from_backend(Box::new(backend), dtype, dev.clone()),
        copies,
    )
}

/// Write every parameter of `store` to a safetensors file under its checkpoint name, with the
/// LoRA adapters of `model` merged into their base weights (`W + alpha/r · B A`).
pub fn save_merged(model: &ClinicalVlm, store: &ParamStore, path: &Path) -> Result<()> {
    write_safetensors(&merged_tensors(model, store)?, path)
}

/// Every parameter of `store` by checkpoint name, LoRA adapters merged (what [`save_merged`]
/// writes). The adapters are merged onto the store's own weights (the masters when `model`
/// computes on cast copies, [`cast_var_builder`]), in their dtype.
pub fn merged_tensors(model: &ClinicalVlm, store: &ParamStore) -> Result<HashMap<String, Tensor>> {
    merged_tensors_in(model, store, None)
}

/// [`merged_tensors`] with every weight first cast to `dtype` when given (a LoRA run whose
/// frozen base is held in bf16 exports f32 weights: the base exactly, the adapters' update
/// unrounded).
pub fn merged_tensors_in(
    model: &ClinicalVlm,
    store: &ParamStore,
    dtype: Option<DType>,
) -> Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in store.tensors()? {
        let t = match dtype {
            Some(d) => t.to_dtype(d)?,
            None => t,
        };
        out.insert(name, t);
    }
    for p in model.adapted_projs() {
        let name = format!("{}.weight", p.name());
        let base = out
            .get(&name)
            .ok_or_else(|| Error::Config(format!("adapter base weight {name} not in the store")))?;
        if let Some(w) = p.merged_onto(base)? {
            out.insert(name, w);
        }
    }
    Ok(out)
}

fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot write: {e}"),
    })
}

/// Write a randomly initialised checkpoint of `cfg` into `dir`: `config.json` and
/// `model.safetensors` in the QoQ key layout, initialised as HF's `_init_weights` does: every
/// matrix (linear, embedding, patch projection) from N(0, 0.02), biases zero, norm weights one,
/// ECG-JEPA's fixed sin-cos table. Deterministic: seed 0 (see [`write_random_checkpoint_seeded`]).
/// For tiny demo and test models; `load_model` reads it.
pub fn write_random_checkpoint(cfg: &qoq_core::hf_config::QwenVlConfig, dir: &Path) -> Result<()> {
    write_random_checkpoint_seeded(cfg, dir, 0)
}

/// [`write_random_checkpoint`] with a seed: the same seed gives byte-identical weights (candle's
/// own CPU random generator cannot be seeded, so the values come from a splitmix64 stream per
/// parameter name, turned normal by Box-Muller).
pub fn write_random_checkpoint_seeded(
    cfg: &qoq_core::hf_config::QwenVlConfig,
    dir: &Path,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let vm = candle_nn::VarMap::new();
    // A file writer: the values are generated on the host and written out, never computed with.
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let (vb, store) = trainable_var_builder(vb, Freeze::default());
    let model = ClinicalVlm::new(cfg, vb)?;
    for (name, var) in store.trainable()? {
        let t = var.as_tensor();
        let value = if t.rank() >= 2 {
            let n = t.elem_count();
            let mut state = seed ^ fnv1a(name.as_bytes());
            let v: Vec<f32> = (0..n).map(|_| 0.02 * normal(&mut state)).collect();
            Tensor::from_vec(v, t.shape(), t.device())?
        } else if name.ends_with("bias") {
            t.zeros_like()?
        } else {
            continue; // norm weights keep their hint (one)
        };
        var.set(&value)?;
    }
    let mut tensors = merged_tensors(&model, &store)?;
    // ECG-JEPA's fixed 2-D sin-cos table is a buffer, not a learnt weight.
    let key = "time_series_embedding.encoder.pos_embed";
    if let Some(old) = tensors.get(key) {
        let ts = &cfg.time_series;
        let table = crate::ecg::sincos_pos_embed(
            ts.embed_dim,
            ts.leads,
            ts.patches_per_lead,
            &Device::Cpu, // written to the file, as the weights above
        )?
        .reshape(old.shape())?;
        tensors.insert(key.to_string(), table);
    }
    write_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(cfg).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
}

/// A deterministic `N(0, std²)` tensor of `shape` for the parameter `name` (the stream of
/// [`write_random_checkpoint_seeded`]: splitmix64 seeded by `seed` and the name, Box-Muller).
pub fn seeded_normal(
    name: &str,
    shape: &[usize],
    std: f64,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed ^ fnv1a(name.as_bytes());
    let v: Vec<f32> = (0..n).map(|_| std as f32 * normal(&mut state)).collect();
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)
}

/// A deterministic `U(-bound, bound)` tensor of `shape` for the parameter `name` (the stream of
/// [`seeded_normal`]).
pub fn seeded_uniform(
    name: &str,
    shape: &[usize],
    bound: f64,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed ^ fnv1a(name.as_bytes());
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            (bound * (2.0 * u - 1.0)) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A standard normal draw (Box-Muller on two uniform doubles in (0, 1]).
fn normal(state: &mut u64) -> f32 {
    let u = |s: &mut u64| ((splitmix64(s) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let (a, b) = (u(state), u(state));
    ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
}
