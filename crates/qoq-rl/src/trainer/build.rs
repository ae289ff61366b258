//! Build and resume: the model, the frozen reference, the optimiser, the estimator, the data
//! cursor and the run log of a [`Trainer`], from a [`RunConfig`] (a fresh run) or from a
//! checkpoint (a resumed one).

use super::{Result, ResumeOptions, Trainer, TrainerError, model_err};
use crate::advantage::Estimator;
use crate::checkpoint::{self, Checkpoint, TrainerState};
use crate::config::{DtypeName, EstimatorKind, RunConfig};
use crate::critic::Critic;
use crate::dist::Collective;
use crate::early_stopping::EarlyStoppingState;
use crate::metrics_log::RunLog;
use crate::optim::AdamW;
use crate::run_dir::{DataFingerprint, data_changes};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use qoq_data::manifest::{Cursor, Manifest, RowOrder};
use qoq_model::ClinicalVlm;
use qoq_model::train::{ComputeCopies, ParamStore, trainable_var_builder};
use qoq_processor::processor::Processor;
use qoq_reward::RewardFn;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The candle dtype of a config dtype name.
pub fn dtype_of(d: DtypeName) -> DType {
    d.dtype()
}

/// The dtype the run holds its base weights in: the master dtype, except for a LoRA run, whose
/// frozen base is held in the compute dtype only (the adapters are its f32 masters).
fn base_dtype(cfg: &RunConfig) -> DType {
    if cfg.model.lora.is_some() {
        dtype_of(cfg.model.compute_dtype)
    } else {
        dtype_of(cfg.model.master_dtype)
    }
}

/// Opens the run's device (`model.device`) and writes its canonical name (`cuda` → `cuda:0`)
/// back into the config, so that the resolved config saved with every checkpoint names the
/// device the run used. With several data-parallel ranks on a machine, each takes its own GPU
/// from `model.device` on ([`qoq_model::device::rank_device`]; the config keeps the launch's
/// `model.device`, the same on every rank).
fn open_device(cfg: &mut RunConfig, dist: &dyn Collective) -> Result<Device> {
    let configured = cfg.device()?;
    let (local_rank, local_ranks) = dist.node();
    let spec = if configured.is_cuda() && local_ranks > 1 {
        let mapped = qoq_model::device::visible_gpus().and_then(|visible| {
            qoq_model::device::rank_device(configured, local_rank, local_ranks, visible)
        });
        let spec = mapped.map_err(|e| TrainerError::Config(format!("model.device: {e}")))?;
        tracing::info!(
            rank = dist.rank(),
            local_rank,
            "rank {} computes on {spec}",
            dist.rank()
        );
        spec
    } else {
        configured
    };
    let device = spec
        .device()
        .map_err(|e| TrainerError::Config(format!("model.device: {e}")))?;
    cfg.model.device = configured.to_string();
    Ok(device)
}

/// A fresh run of `cfg` from the checkpoint at `model.model_path`, writing into
/// `trainer.out_dir`.
pub(super) fn fresh(
    mut cfg: RunConfig,
    reward: Box<dyn RewardFn>,
    dist: Rc<dyn Collective>,
) -> Result<Trainer> {
    let device = open_device(&mut cfg, &*dist)?;
    let out_dir = PathBuf::from(&cfg.trainer.out_dir);
    let model_dir = PathBuf::from(&cfg.model.model_path);
    let dtype = base_dtype(&cfg);
    let (vb, _) = qoq_model::loading::checkpoint_var_builder(&model_dir, dtype, &device)
        .map_err(|e| model_err(format!("{}: {e}", model_dir.display())))?;
    build(cfg, reward, vb, device, out_dir, None, false, None, dist)
}

/// A fresh run of `cfg` whose initial weights are those of another run's checkpoint
/// ([`super::init::InitFrom`]): fresh optimiser, estimator and data cursor.
pub(super) fn init_from(
    mut cfg: RunConfig,
    reward: Box<dyn RewardFn>,
    init: super::init::InitFrom,
    dist: Rc<dyn Collective>,
) -> Result<Trainer> {
    let device = open_device(&mut cfg, &*dist)?;
    let out_dir = PathBuf::from(&cfg.trainer.out_dir);
    let dtype = base_dtype(&cfg);
    let vb = VarBuilder::from_tensors(init.weights.clone(), dtype, &device);
    build(
        cfg,
        reward,
        vb,
        device,
        out_dir,
        None,
        false,
        Some(&init),
        dist,
    )
}

/// The run of the checkpoint `dir`, its config changed by `overrides` (`key=value`), scored by
/// `reward` or the configured reward. `model.device` may change (the saved state does not depend
/// on where it was computed); other `model.*` keys and `algorithm.estimator` may not.
pub(super) fn resume(
    dir: &Path,
    reward: Option<Box<dyn RewardFn>>,
    opts: &ResumeOptions,
    dist: Rc<dyn Collective>,
) -> Result<Trainer> {
    let overrides = &opts.overrides;
    let ck = Checkpoint::open(dir)?;
    let text = ck.config_toml()?;
    for o in overrides {
        let key = o.split('=').next().unwrap_or("").trim();
        if (key.starts_with("model.") && key != "model.device") || key == "algorithm.estimator" {
            return Err(TrainerError::Config(format!(
                "--set {o}: `{key}` cannot change when resuming (the checkpoint's weights and \
                 estimator state depend on it)"
            )));
        }
        if key == "trainer.sft" {
            return Err(TrainerError::Config(format!(
                "--set {o}: `{key}` cannot change when resuming (a resumed run keeps its \
                 checkpoint's mode, SFT or RL)"
            )));
        }
    }
    let mut cfg = RunConfig::from_toml_str_with_overrides(
        &text,
        &dir.join(checkpoint::files::CONFIG).display().to_string(),
        overrides,
    )?;
    let reward = match reward {
        Some(r) => r,
        None => cfg
            .reward
            .build()
            .map_err(|e| TrainerError::Config(format!("reward: {e}")))?,
    };
    let device = open_device(&mut cfg, &*dist)?;
    let dtype = base_dtype(&cfg);
    // A run started with --init-from has the source's weights as its KL reference (and as the
    // frozen base of its LoRA adapters).
    let init = match ck.trainer_state()?.init_from {
        Some(src) if cfg.algorithm.needs_reference() || cfg.model.lora.is_some() => {
            Some(super::init::InitFrom::reopen(&src)?)
        }
        _ => None,
    };
    // A LoRA run's checkpoint holds the adapters beside merged weights; its frozen base is the
    // run's initial weights.
    let vb = if cfg.model.lora.is_some() {
        initial_weights(
            Path::new(&cfg.model.model_path),
            dtype,
            &device,
            init.as_ref(),
        )?
    } else {
        VarBuilder::from_tensors(ck.model(&device)?, dtype, &device)
    };
    let out_dir = dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    build(
        cfg,
        reward,
        vb,
        device,
        out_dir,
        Some(&ck),
        opts.allow_changed_data,
        init.as_ref(),
        dist,
    )
}

/// Refuses the configurations this trainer cannot run (beyond [`RunConfig::validate`]).
fn check(cfg: &RunConfig) -> Result<()> {
    cfg.validate()?;
    if cfg.algorithm.kl.kl_in_reward()
        && cfg.algorithm.kl.kl_penalty == crate::loss::KlEstimator::Full
    {
        return Err(TrainerError::Config(
            "algorithm.kl: kl_penalty = \"full\" needs vocabulary log-probs and works with \
             use_kl_loss = true only; the KL in the reward takes kl, abs, mse or low_var_kl"
                .into(),
        ));
    }
    Ok(())
}

/// Opens a manifest, naming it on failure.
fn open_manifest(path: &Path, cfg: &RunConfig) -> Result<Manifest> {
    Manifest::open(path, cfg.data.manifest.clone()).map_err(|e| TrainerError::Data {
        step: 0,
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The policy's initial weights as a variable builder: the `--init-from` source's, else the
/// checkpoint at `model.model_path` (the KL reference and a fresh critic start from them).
fn initial_weights(
    model_dir: &Path,
    dtype: DType,
    device: &Device,
    init: Option<&super::init::InitFrom>,
) -> Result<VarBuilder<'static>> {
    match init {
        Some(i) => Ok(VarBuilder::from_tensors(i.weights.clone(), dtype, device)),
        None => qoq_model::loading::checkpoint_var_builder(model_dir, dtype, device)
            .map(|(vb, _)| vb)
            .map_err(|e| model_err(format!("{}: {e}", model_dir.display()))),
    }
}

fn build(
    cfg: RunConfig,
    reward: Box<dyn RewardFn>,
    vb: VarBuilder<'static>,
    device: Device,
    out_dir: PathBuf,
    ck: Option<&Checkpoint>,
    allow_changed_data: bool,
    init: Option<&super::init::InitFrom>,
    dist: Rc<dyn Collective>,
) -> Result<Trainer> {
    check(&cfg)?;
    check_world(&cfg, ck, dist.size())?;
    // Every rank opens it here (NCCL's communicator is joined collectively).
    let gradients = crate::dist::GradientPath::open(cfg.trainer.all_reduce, &*dist, &device)
        .map_err(|source| TrainerError::Dist {
            step: 0,
            what: "opening the gradients' all-reduce (trainer.all_reduce)",
            source,
        })?;
    if dist.size() > 1 || !matches!(gradients, crate::dist::GradientPath::Host) {
        tracing::info!(
            rank = dist.rank(),
            "gradients summed over {} rank(s) through {}",
            dist.size(),
            gradients.name()
        );
    }
    // Rank 0 alone writes into the run folder (logs, events, checkpoints).
    let writer = dist.rank() == 0;
    let model_dir = PathBuf::from(&cfg.model.model_path);
    let model_cfg = qoq_model::loading::read_config(&model_dir).map_err(model_err)?;
    let opts = cfg.processor_options()?;
    let processor = Processor::from_model_dir(
        &model_dir,
        cfg.model.tokenizer_path.as_deref().map(Path::new),
        opts,
    )
    .map_err(|e| model_err(format!("processor of {}: {e}", model_dir.display())))?;
    if let Some(i) = init {
        i.check_architecture(&model_cfg, &model_dir)?;
    }
    // LoRA: every base weight is frozen, the adapters alone train (RunConfig::trainable).
    let (groups, freeze) = cfg.trainable().map_err(TrainerError::Config)?;
    let dtype = dtype_of(cfg.model.master_dtype);
    let compute = dtype_of(cfg.model.compute_dtype);
    let adapters = cfg.model.lora.as_ref().map(|l| Adapters {
        cfg: l.lora_config(),
        dropout: l.dropout,
        vars: candle_nn::VarMap::new(),
    });
    let (vb, store) = trainable_var_builder(vb, freeze);
    let master_model = ClinicalVlm::new_with_lora(
        &model_cfg,
        vb,
        adapters
            .as_ref()
            .map(|a| a.builder(dtype, &device))
            .as_ref(),
    )
    .map_err(model_err)?;
    if let Some(a) = &adapters {
        match ck {
            Some(ck) => {
                a.load(&ck.adapters(&device)?, ck.dir())?;
                check_lora_base(ck, &master_model, &store, dtype, &device)?;
            }
            None => qoq_model::lora::seed_adapters(&a.vars, cfg.data.seed).map_err(model_err)?,
        }
    }
    let (model, copies) = compute_model(
        master_model,
        &store,
        adapters.as_ref(),
        base_dtype(&cfg),
        compute,
        &device,
    )?;
    // The KL reference is the run's initial policy (the --init-from source's weights when given),
    // held in the compute dtype; a LoRA run's is its frozen base, whose tensors it shares.
    let ref_model = if !cfg.algorithm.needs_reference() {
        None
    } else if adapters.is_some() {
        // The frozen base: plain casts (no trained parameter, so no compute copies).
        let (vb, _) = qoq_model::train::cast_var_builder(&store, compute, &device);
        Some(ClinicalVlm::new(&model_cfg, vb).map_err(model_err)?)
    } else {
        let vb = initial_weights(&model_dir, compute, &device, init)?;
        Some(ClinicalVlm::new(&model_cfg, vb).map_err(model_err)?)
    };
    let mut params = match &adapters {
        Some(a) => a.named_vars()?,
        None => store.trainable().map_err(model_err)?,
    };
    if let Some(g) = &groups {
        params.retain(|(name, _)| g.trains(name));
    }
    if params.is_empty() {
        return Err(TrainerError::Config(
            "model: every component is frozen; nothing to train".into(),
        ));
    }
    let precision = match cfg.actor.strategy {
        crate::config::OptimizerStrategy::Adamw => crate::optim::Precision::F32,
        crate::config::OptimizerStrategy::AdamwBf16 => crate::optim::Precision::Bf16Kahan,
    };
    let mut opt = AdamW::with_precision(params, cfg.actor.optim.clone(), precision)?;
    // PPO's value model: the saved one on resume, else the policy's checkpoint with a fresh head.
    let mut critic = if cfg.algorithm.estimator == EstimatorKind::Gae {
        let dtype = dtype_of(cfg.model.master_dtype);
        let vb = match ck.filter(|c| c.has_critic()) {
            Some(c) => VarBuilder::from_tensors(c.critic(&device)?, dtype, &device),
            None => {
                let policy = initial_weights(&model_dir, dtype, &device, init)?;
                qoq_model::value::value_var_builder(policy, 0)
            }
        };
        Some(Critic::new(&model_cfg, vb, freeze, groups.as_ref(), &cfg.critic).map_err(model_err)?)
    } else {
        None
    };
    let manifest_path = PathBuf::from(&cfg.data.train_files);
    let manifest = open_manifest(&manifest_path, &cfg)?.with_row_order(RowOrder {
        preshuffle_seed: cfg.data.preshuffle_seed,
        shuffle: cfg.data.shuffle,
    });
    if manifest.len() < cfg.data.rollout_batch_size {
        return Err(TrainerError::Config(format!(
            "{}: {} rows, fewer than data.rollout_batch_size = {}",
            manifest_path.display(),
            manifest.len(),
            cfg.data.rollout_batch_size
        )));
    }
    let val_manifest = open_manifest(Path::new(&cfg.data.val_files), &cfg)?;
    let data = vec![
        DataFingerprint::of("train", &manifest)?,
        DataFingerprint::of("val", &val_manifest)?,
    ];
    let kl_controller = if cfg.algorithm.kl.kl_in_reward() {
        Some(
            crate::loss::KlController::from_config(&cfg.algorithm.kl)
                .map_err(|source| TrainerError::Loss { step: 0, source })?,
        )
    } else {
        None
    };
    let config_toml = cfg.to_toml_string()?;
    let (estimator, cursor, state, resume_step) = match ck {
        Some(ck) => {
            if ck.has_optimizer() {
                ck.load_optimizer(&mut opt)?;
            }
            if let Some(c) = critic.as_mut() {
                if !ck.has_critic() {
                    return Err(TrainerError::Config(format!(
                        "{}: a GAE run's checkpoint without the value model",
                        ck.dir().display()
                    )));
                }
                ck.load_critic_optimizer(c.optimizer_mut())?;
            }
            let est = Estimator::load_state(&ck.estimator_json()?).map_err(|source| {
                TrainerError::Advantage {
                    step: ck.step(),
                    source,
                }
            })?;
            let mut state = ck.trainer_state()?;
            let changes = data_changes(&state.data, &data);
            if !changes.is_empty() {
                if !allow_changed_data {
                    return Err(TrainerError::DataChanged {
                        checkpoint: ck.dir().to_path_buf(),
                        changes,
                    });
                }
                tracing::warn!(?changes, "resuming on changed data (--allow-changed-data)");
                if writer {
                    crate::run_dir::append_event(
                        &out_dir,
                        &serde_json::json!({
                            "event": "resume_with_changed_data",
                            "time": crate::run_dir::utc_now(),
                            "checkpoint": ck.dir().display().to_string(),
                            "step": ck.step(),
                            "changes": changes,
                            "saved": state.data,
                            "now": data,
                        }),
                    )?;
                }
            }
            state.data = data;
            state.early_stopping = super::stopping::resumed_state(
                cfg.trainer.early_stopping.as_ref(),
                state.early_stopping.take(),
                ck.dir(),
            )?;
            if state.kl_controller.is_none() {
                state.kl_controller = kl_controller;
            } else if kl_controller.is_none() {
                state.kl_controller = None;
            }
            (est, ck.cursor()?, state, Some(ck.step()))
        }
        None => (
            cfg.algorithm.build_estimator(),
            Cursor::default(),
            TrainerState {
                sft: cfg.trainer.sft,
                kl_controller,
                data,
                early_stopping: cfg
                    .trainer
                    .early_stopping
                    .as_ref()
                    .map(EarlyStoppingState::new),
                init_from: init.map(|i| i.source.clone()),
                ..TrainerState::default()
            },
            None,
        ),
    };
    let mut state = state;
    state.world_size = (dist.size() > 1).then_some(dist.size());
    let (log, records) = if writer {
        let (log, records) = RunLog::open(&out_dir, cfg.trainer.tensorboard, resume_step)?;
        if let (Some(i), None) = (init, ck) {
            i.record(&out_dir)?;
        }
        (Some(log), records)
    } else {
        (None, Vec::new())
    };
    let backend = super::openai::Backend::connect(&cfg)?;
    Ok(Trainer {
        backend,
        cfg,
        config_toml,
        out_dir,
        device,
        processor,
        model,
        store,
        ref_model,
        opt,
        estimator,
        reward,
        manifest,
        cursor,
        state,
        log,
        records,
        val_manifest,
        critic,
        adapters,
        skipped_rows: 0,
        perf: Default::default(),
        dist,
        gradients,
        copies,
        advantages: Vec::new(),
    })
}

/// The LoRA adapters of a run (`[model.lora]`): their config and their `Var`s, named
/// `<projection>.lora_A.weight` / `.lora_B.weight`, in the master dtype.
pub(super) struct Adapters {
    pub(super) cfg: qoq_model::lora::LoraConfig,
    pub(super) dropout: f64,
    pub(super) vars: candle_nn::VarMap,
}

impl Adapters {
    /// Where the model's projections take their adapters.
    pub(super) fn builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> qoq_model::lora::LoraBuilder<'static> {
        qoq_model::lora::LoraBuilder {
            cfg: self.cfg.clone(),
            vb: VarBuilder::from_varmap(&self.vars, dtype, device),
        }
    }

    /// `(name, var)` of every adapter matrix, sorted by name (the optimiser's parameters).
    pub(super) fn named_vars(&self) -> Result<Vec<(String, candle_core::Var)>> {
        let data = self
            .vars
            .data()
            .lock()
            .map_err(|_| model_err("adapter store poisoned"))?;
        let mut v: Vec<(String, candle_core::Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// The adapters' current values by name.
    pub(super) fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self
            .named_vars()?
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect())
    }

    /// Sets every adapter from `saved` (a checkpoint's, named as here); a missing, extra or
    /// differently shaped matrix is an error naming it and `dir`.
    fn load(&self, saved: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
        let vars = self.named_vars()?;
        let bad = |m: String| model_err(format!("{}: adapters: {m}", dir.display()));
        for (name, var) in &vars {
            let t = saved
                .get(name)
                .ok_or_else(|| bad(format!("missing {name} (another model.lora?)")))?;
            if t.dims() != var.dims() {
                return Err(bad(format!(
                    "{name} has shape {:?}, the model's adapter {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        if let Some(extra) = saved.keys().find(|k| !vars.iter().any(|(n, _)| n == *k)) {
            return Err(bad(format!("{extra} is not an adapter of this model.lora")));
        }
        Ok(())
    }
}

/// A resumed LoRA run re-reads its frozen base from `model.model_path` (or the `--init-from`
/// source): refuses a base that is not the one the checkpoint was trained on, by comparing the
/// first adapted projection's merge (base + adapters) and the token embeddings with the
/// checkpoint's merged weights, bit for bit.
fn check_lora_base(
    ck: &Checkpoint,
    model: &ClinicalVlm,
    store: &ParamStore,
    master: DType,
    device: &Device,
) -> Result<()> {
    let base: HashMap<String, Tensor> = store.tensors().map_err(model_err)?.into_iter().collect();
    let mut pairs = Vec::new();
    if let Some(p) = model.adapted_projs().first() {
        let name = format!("{}.weight", p.name());
        let b = base
            .get(&name)
            .ok_or_else(|| model_err(format!("adapter base weight {name} not in the store")))?;
        if let Some(m) = p.merged_onto(&b.to_dtype(master)?).map_err(model_err)? {
            pairs.push((name, m));
        }
    }
    let embed = "model.embed_tokens.weight";
    if let Some(e) = base.get(embed) {
        pairs.push((embed.to_string(), e.clone()));
    }
    for (name, now) in pairs {
        let saved = ck.model_tensor(&name, device)?;
        let same = saved.dims() == now.dims()
            && saved
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                == now.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if !same {
            return Err(TrainerError::Config(format!(
                "{}: the LoRA run's base weights (model.model_path, or the --init-from source) \
                 are not those this checkpoint was trained on: {name} differs from the \
                 checkpoint's merged weights",
                ck.dir().display()
            )));
        }
    }
    Ok(())
}

/// Refuses a launch whose number of ranks differs from `trainer.nnodes · n_gpus_per_node`
/// (when there is more than one rank), and a resume whose number of ranks differs from the
/// launch that wrote the checkpoint.
fn check_world(cfg: &RunConfig, ck: Option<&Checkpoint>, ranks: usize) -> Result<()> {
    let want = cfg.trainer.world_size();
    if ranks == 1 && want > 1 {
        // One process computes what `want` ranks would (the same global batch, the same
        // update to float summation order); say so rather than pretend to use `want` devices.
        tracing::warn!(
            world_size = want,
            "trainer.nnodes · trainer.n_gpus_per_node = {want}, but this process runs alone (no \
             MPI launcher): it computes the whole step itself on one device; launch it with \
             `mpirun -np {want}` (a `--features mpi` build) to use {want} devices"
        );
    }
    if ranks > 1 && ranks != want {
        return Err(TrainerError::Config(format!(
            "the launch has {ranks} ranks (mpirun -np {ranks}) but trainer.nnodes · \
             trainer.n_gpus_per_node = {} · {} = {want}: launch {want} ranks or set them to match",
            cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node
        )));
    }
    if let Some(ck) = ck {
        let saved = ck.trainer_state()?.world_size.unwrap_or(1);
        if saved != ranks {
            return Err(TrainerError::Config(format!(
                "{}: the checkpoint was written by a launch of {saved} rank(s), this one has \
                 {ranks}: resume with the same number of ranks (mpirun -np {saved}{})",
                ck.dir().display(),
                if saved == 1 {
                    ", or without mpirun"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

/// The model the run computes with: `master` itself when the compute dtype is the master dtype,
/// else the same architecture over casts of `store`'s master weights to `compute`
/// ([`qoq_model::train::cast_var_builder`], mixed precision), with the same adapter `Var`s, and
/// its compute copies (whose gradients the backward brings to the masters).
pub(super) fn compute_model(
    master: ClinicalVlm,
    store: &ParamStore,
    adapters: Option<&Adapters>,
    dtype: DType,
    compute: DType,
    device: &Device,
) -> Result<(ClinicalVlm, Option<ComputeCopies>)> {
    if compute == dtype {
        return Ok((master, None));
    }
    let (vb, copies) = qoq_model::train::cast_var_builder(store, compute, device);
    let model = ClinicalVlm::new_with_lora(
        master.config(),
        vb,
        adapters.map(|a| a.builder(dtype, device)).as_ref(),
    )
    .map_err(model_err)?;
    Ok((model, Some(copies)))
}

impl Trainer {
    /// Mixed precision: writes the master weights (after an optimiser step changed them) into
    /// the compute copies the model reads, in place, one parameter at a time (rebuilding the
    /// model would hold a second set of copies beside the first at the step's peak). Nothing to
    /// do when the run computes in its master dtype (the model holds the master `Var`s, which
    /// the optimiser updates in place), nor for a LoRA run (its base is frozen, its adapters
    /// are cast in every forward).
    pub(super) fn refresh_compute_model(&mut self) -> Result<()> {
        match &self.copies {
            Some(copies) => copies.refresh().map_err(model_err),
            None => Ok(()),
        }
    }
}
