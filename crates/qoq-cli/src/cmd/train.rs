//! `qoq train`: the RL loop of a run file (spec §10-§12) — rollouts, rewards, advantages, policy
//! updates, validation every `trainer.val_freq` steps (`<out_dir>/val_generations_{step}.jsonl`),
//! metrics (`<out_dir>/metrics.jsonl`, TensorBoard) and checkpoints
//! (`<out_dir>/checkpoint_step_N`); `--resume` continues a run from one of its checkpoints (its
//! saved config, `--set` overrides on top); `--init-from` starts a new run from another run's
//! weights (the paper's Stage 1 → Stage 2). A run with `trainer.early_stopping` ends at the
//! validation that exhausts its patience, printing the reason. At the end the training curves
//! are drawn to `<out_dir>/curves/*.png` (as `qoq plot` does), and a LoRA run (`[model.lora]`)
//! exports the merged model to `<out_dir>/export` (an HF model folder) and its adapter in PEFT's
//! layout to `<out_dir>/export/adapter` (`adapter_config.json`, `adapter_model.safetensors`;
//! every checkpoint holds the same two files).
//!
//! Launched by `mpirun -np N` (a binary built with `--features mpi`), each process is one rank
//! of data-parallel training ([`qoq_rl::dist`]); N must equal `trainer.nnodes ·
//! trainer.n_gpus_per_node`. Rank 0 locks and writes the run folder and prints the progress;
//! an error on any rank ends the whole job (`MPI_Abort`).

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use qoq_rl::config::RunConfig;
use qoq_rl::dist::Collective;
use qoq_rl::metrics_log::names;
use qoq_rl::run_dir::RunLock;
use qoq_rl::trainer::{ResumeOptions, Trainer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run file (TOML; see configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key, e.g. `--set trainer.max_steps=2` (repeatable; with --resume it applies on
    /// top of the checkpoint's config, except `model.*` other than `model.device`, and
    /// `algorithm.estimator`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from a checkpoint folder (`<out_dir>/checkpoint_step_N`), or from the latest
    /// checkpoint of a run folder; its saved config (and mode, RL or SFT) is used.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Supervised fine-tuning on the manifest's answers (`<think>\n</think>\n\boxed{answer}`)
    /// instead of RL (as `trainer.sft = true` in the run file). Stored in checkpoints: a resumed
    /// SFT run stays SFT.
    #[arg(long)]
    sft: bool,
    /// Do not draw the curves at the end.
    #[arg(long)]
    no_plot: bool,
    /// With --resume: continue even when a manifest differs from the size, row count and
    /// sha256 the checkpoint recorded (the change is written to `<out_dir>/events.jsonl`).
    #[arg(long)]
    allow_changed_data: bool,
    /// Start a new run (--config) from another run's weights: a checkpoint folder, or a run
    /// folder, whose best checkpoint (early stopping's `best_checkpoint.json`) or else latest
    /// one is taken. Optimiser, estimator state and data cursor start fresh; the source (path,
    /// step, sha256 of its weights and manifest) is recorded in the run's events.jsonl and
    /// checkpoints. Its weights must fit model.model_path's architecture.
    #[arg(long, value_name = "RUN_OR_CHECKPOINT")]
    init_from: Option<PathBuf>,
    /// Where the run computes: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`; overrides the run file's
    /// `model.device` (default `cpu`), also with --resume. The checkpoints' config records the
    /// device used. CUDA needs a binary built with `cargo build --release -p qoq-cli --features
    /// cuda`.
    #[arg(long, value_parser = qoq_model::DeviceSpec::parse)]
    device: Option<qoq_model::DeviceSpec>,
    /// Load nothing and train nothing: print the run's memory estimate on its device
    /// (parameters; weights, reference, optimiser, gradients, activations, kv cache) for prompts
    /// of `data.max_prompt_length` tokens with `rollout.limit_images` images of
    /// `data.max_pixels`, and exit 1 when it does not fit the memory available (CPU: MemAvailable;
    /// GPU: the device's free memory).
    #[arg(long)]
    dry_run: bool,
    /// Under mpirun: the longest a rank waits in one collective (for its peers' rollouts, a
    /// checkpoint being written) before it ends the job (MPI_Abort, exit code 124).
    #[arg(long, value_name = "SECONDS", default_value_t = 1800)]
    dist_timeout: u64,
}

/// The ranks of this launch: MPI's when `mpirun` started the process, else one process.
fn collective(timeout: Duration) -> anyhow::Result<Rc<dyn Collective>> {
    let Some((size, rank)) = qoq_rl::dist::launched_world() else {
        return Ok(Rc::new(qoq_rl::dist::Single));
    };
    #[cfg(feature = "mpi")]
    {
        let _ = rank;
        let c = qoq_rl::dist::mpi::MpiCollective::init(timeout)?;
        if c.size() != size {
            bail!(
                "MPI reports {} ranks, the launcher's environment {size}",
                c.size()
            );
        }
        Ok(Rc::new(c))
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = timeout;
        if size > 1 {
            bail!(
                "rank {rank} of {size} under an MPI launcher, but this qoq was built without \
                 data-parallel training: build it with `cargo build --release -p qoq-cli \
                 --features mpi` (needs libopenmpi-dev and libclang-dev)"
            );
        }
        Ok(Rc::new(qoq_rl::dist::Single))
    }
}

pub fn run(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let dist = collective(Duration::from_secs(a.dist_timeout))?;
    let out = run_ranked(a, dist.clone());
    if let Err(e) = &out
        && dist.size() > 1
    {
        // The peers would wait for this rank in their next collective: end the job now.
        eprintln!("rank {}: error: {e:#}", dist.rank());
        dist.abort(1);
    }
    out
}

fn run_ranked(a: TrainArgs, dist: Rc<dyn Collective>) -> anyhow::Result<ExitCode> {
    let rank0 = dist.rank() == 0;
    if a.allow_changed_data && a.resume.is_none() {
        bail!("--allow-changed-data applies to --resume only");
    }
    if a.init_from.is_some() && a.resume.is_some() {
        bail!(
            "--init-from starts a new run from another run's weights and --resume continues a              run: give one of them"
        );
    }
    // `--device` is the override `model.device=...`, after the `--set` ones.
    let mut overrides = a.overrides.clone();
    if let Some(d) = a.device {
        overrides.push(format!("model.device={d}"));
    }
    if a.dry_run {
        if a.init_from.is_some() || a.allow_changed_data || a.sft || a.no_plot {
            bail!("--dry-run takes --config or --resume, with --set and --device only");
        }
        return dry_run(&a, &overrides);
    }
    // The run folder is locked before anything in it is opened (a resume truncates the metrics
    // log): a second `qoq train` on it stops here, naming the first.
    let _lock;
    let mut trainer = match (&a.resume, &a.config) {
        (Some(dir), _) => {
            let ck = qoq_rl::checkpoint::latest_or_self(dir)?;
            let run_dir = ck.parent().unwrap_or(Path::new("."));
            _lock = rank0.then(|| RunLock::acquire(run_dir)).transpose()?;
            let opts = ResumeOptions {
                overrides,
                allow_changed_data: a.allow_changed_data,
            };
            let t = Trainer::resume_dist(&ck, None, &opts, dist.clone())
                .with_context(|| format!("resuming from {}", ck.display()))?;
            if a.sft && !t.is_sft() {
                bail!(
                    "--sft: {} is a checkpoint of an RL run; start an SFT run with --config",
                    ck.display()
                );
            }
            t
        }
        (None, Some(path)) => {
            let cfg = RunConfig::load(path, &overrides)
                .with_context(|| format!("reading {}", path.display()))?;
            _lock = rank0
                .then(|| RunLock::acquire(Path::new(&cfg.trainer.out_dir)))
                .transpose()?;
            if let Some(ck) = previous_checkpoint(&cfg)? {
                if a.init_from.is_some() {
                    bail!(
                        "--init-from starts a new run, but trainer.out_dir {} holds this run's \
                         checkpoint {} to continue (trainer.find_last_checkpoint / \
                         trainer.load_checkpoint_path): choose another trainer.out_dir",
                        cfg.trainer.out_dir,
                        ck.display()
                    );
                }
                let saved = RunConfig::load(&ck.join(qoq_rl::checkpoint::files::CONFIG), &[])
                    .with_context(|| format!("reading the config saved in {}", ck.display()))?;
                // The run file's current values, on top of the saved run's.
                let diff = cfg
                    .overrides_from(&saved, &FIND_KEYS)
                    .with_context(|| format!("continuing {}", ck.display()))?;
                eprintln!(
                    "continuing the run in {} from {} (trainer.find_last_checkpoint){}",
                    cfg.trainer.out_dir,
                    ck.display(),
                    if diff.is_empty() {
                        String::new()
                    } else {
                        format!(" with the run file's {}", diff.join(", "))
                    }
                );
                let opts = ResumeOptions {
                    overrides: diff,
                    allow_changed_data: false,
                };
                let t = Trainer::resume_dist(&ck, None, &opts, dist.clone())
                    .with_context(|| format!("continuing from {}", ck.display()))?;
                // The run file's trainer.sft is in the overrides; --sft asks for SFT too.
                if a.sft && !t.is_sft() {
                    bail!(
                        "--sft: {} is a checkpoint of an RL run; start an SFT run in another \
                         trainer.out_dir",
                        ck.display()
                    );
                }
                t
            } else {
                let mut t = match &a.init_from {
                    Some(src) => {
                        let t = Trainer::init_from_dist(cfg, src, dist.clone())
                            .with_context(|| format!("--init-from {}", src.display()))?;
                        if let Some(s) = t.init_source() {
                            eprintln!(
                                "initialised from {} (step {}, the {} checkpoint; weights sha256 {})",
                                s.checkpoint, s.step, s.chosen, s.model_sha256
                            );
                        }
                        t
                    }
                    None => {
                        Trainer::new_dist(cfg, None, dist.clone()).context("setting up the run")?
                    }
                };
                if a.sft {
                    t.set_sft(true);
                }
                t
            }
        }
        (None, None) => bail!("give --config RUN.toml or --resume CHECKPOINT"),
    };
    let sft = trainer.is_sft();
    let total = trainer.total_steps();
    tracing::info!(
        from = trainer.step_count(),
        to = total,
        sft,
        out = %trainer.out_dir().display(),
        "training"
    );
    // The other ranks train silently: rank 0 reports the (global) step.
    let bar = if rank0 {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step_count());
    while !trainer.is_finished() {
        let o = trainer.train_step()?;
        let get = |k: &str| o.metrics.get(k).copied();
        let fmt = |k: &str| get(k).map_or("-".to_string(), |v| format!("{v:.4}"));
        let mut line = if sft {
            format!("sft loss {}", fmt(qoq_rl::trainer::SFT_LOSS))
        } else {
            format!(
                "reward {} kl {} pg_loss {}",
                fmt(names::REWARD_OVERALL),
                get(names::KL_LOSS)
                    .or(get(qoq_rl::trainer::CRITIC_KL))
                    .map_or("-".into(), |v| format!("{v:.4}")),
                fmt(names::PG_LOSS),
            )
        };
        line.push_str(&format!(
            ", grad_norm {}, gen {}s, update {}s, step {}s",
            fmt(names::GRAD_NORM),
            get(qoq_rl::trainer::TIMING_GEN).map_or("-".into(), |v| format!("{v:.1}")),
            get(qoq_rl::trainer::TIMING_UPDATE).map_or("-".into(), |v| format!("{v:.1}")),
            get(names::TIME_PER_STEP).map_or("-".into(), |v| format!("{v:.1}")),
        ));
        if let Some(v) = get(names::VAL_REWARD_SCORE) {
            line.push_str(&format!(
                " | val reward {v:.4}, val acc {}, val f1 {}",
                fmt("val/accuracy"),
                fmt("val/f1")
            ));
        }
        bar.set_position(o.step);
        bar.set_message(line.clone());
        // One plain line per step as well: logs of non-interactive runs keep every step.
        if !rank0 {
            continue;
        }
        bar.suspend(|| eprintln!("step {}/{total}: {line}", o.step));
        if let Some(dir) = &o.checkpoint {
            bar.suspend(|| eprintln!("checkpoint {}", dir.display()));
        }
    }
    bar.finish_and_clear();
    if !rank0 {
        return Ok(ExitCode::SUCCESS);
    }
    if trainer.config().model.lora.is_some() {
        // A LoRA run's end product: the merged model and the adapter for PEFT / vLLM.
        let dir = trainer.out_dir().join(EXPORT_DIR);
        let adapter = trainer
            .export(&dir)
            .with_context(|| format!("exporting to {}", dir.display()))?;
        eprintln!("merged model exported to {}", dir.display());
        if let Some(a) = adapter {
            eprintln!("LoRA adapter (PEFT layout) exported to {}", a.display());
        }
    }
    if let Some(reason) = trainer.stop_reason() {
        eprintln!("stopped after step {}: {reason}", trainer.step_count());
        if let Some(best) = trainer.best_checkpoint() {
            eprintln!("best checkpoint: {}", best.display());
        }
    }
    if !a.no_plot {
        let args = crate::cmd::plot::PlotArgs {
            run_dir: trainer.out_dir().to_path_buf(),
            metrics: None,
            out: None,
            only: None,
        };
        if let Err(e) = crate::cmd::plot::run(args) {
            eprintln!("curves not drawn: {e:#}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--dry-run`: the memory estimate of the run file (or of the checkpoint's saved run), against
/// the memory its device has free now, and the bytes each data-parallel rank all-reduces per
/// optimiser step.
fn dry_run(a: &TrainArgs, overrides: &[String]) -> anyhow::Result<ExitCode> {
    let (cfg, model_dir) = match (&a.resume, &a.config) {
        (Some(dir), _) => {
            let ck = qoq_rl::checkpoint::latest_or_self(dir)?;
            let path = ck.join(qoq_rl::checkpoint::files::CONFIG);
            let cfg = RunConfig::load(&path, overrides)
                .with_context(|| format!("reading {}", path.display()))?;
            let dir = if ck.join("config.json").is_file() {
                ck
            } else {
                PathBuf::from(&cfg.model.model_path)
            };
            (cfg, dir)
        }
        (None, Some(path)) => {
            let cfg = RunConfig::load(path, overrides)
                .with_context(|| format!("reading {}", path.display()))?;
            let dir = PathBuf::from(&cfg.model.model_path);
            (cfg, dir)
        }
        (None, None) => bail!("give --config RUN.toml or --resume CHECKPOINT"),
    };
    let model = qoq_model::loading::read_config(&model_dir).with_context(|| {
        format!(
            "model.model_path: reading {}/config.json",
            model_dir.display()
        )
    })?;
    // The worst case the run file allows: prompts of max_prompt_length tokens, holding
    // limit_images images of max_pixels (as many as the prompt can hold).
    let v = &model.vision;
    let per_image = cfg.data.max_pixels / (v.patch_size * v.patch_size).max(1);
    let merge = (v.spatial_merge_size * v.spatial_merge_size).max(1);
    let images = cfg
        .rollout
        .limit_images
        .min(cfg.data.max_prompt_length * merge / per_image.max(1));
    let plan = qoq_rl::memory::MemoryPlan::estimate(
        &cfg,
        &model,
        cfg.data.max_prompt_length,
        &vec![per_image; images],
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let spec = cfg.device()?;
    let device = spec.device()?;
    let mem = qoq_model::device::memory(&device).map_err(|e| anyhow::anyhow!("{spec}: {e}"))?;
    let gib = qoq_rl::memory::gib;
    println!(
        "memory estimate of {} on {spec} (prompts of {} tokens with {images} image(s) of {} \
         patches, responses of {} tokens):",
        model_dir.display(),
        cfg.data.max_prompt_length,
        per_image,
        cfg.data.max_response_length
    );
    print!("{}", plan.table());
    // Per rank of the data-parallel launch the run file implies (`mpirun -np N`).
    print!(
        "{}",
        plan.traffic(cfg.trainer.world_size()).report(
            cfg.trainer.nnodes,
            cfg.trainer.n_gpus_per_node,
            cfg.optimizer_steps_per_step()
        )
    );
    println!(
        "{spec}: {:.2} GiB available of {:.2} GiB",
        gib(mem.free),
        gib(mem.total)
    );
    if plan.peak() > mem.free {
        eprintln!(
            "the run does not fit: it needs about {:.2} GiB, {spec} has {:.2} GiB available",
            gib(plan.peak()),
            gib(mem.free)
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("the run fits");
    Ok(ExitCode::SUCCESS)
}

/// Where a LoRA run's merged model (and, in `adapter/`, its PEFT adapter) is exported at the
/// end, under `trainer.out_dir`.
pub const EXPORT_DIR: &str = "export";

/// The keys that choose where a run continues from: not part of the run's identity.
const FIND_KEYS: [&str; 2] = [
    "trainer.find_last_checkpoint",
    "trainer.load_checkpoint_path",
];

/// The checkpoint a `--config` run continues from: `trainer.load_checkpoint_path` (a checkpoint,
/// or a run folder's newest), else with `trainer.find_last_checkpoint` the newest complete one
/// in `trainer.out_dir`. A folder that holds checkpoints with `find_last_checkpoint = false` is
/// refused: a fresh run would empty its metrics log and overwrite its checkpoints.
fn previous_checkpoint(cfg: &RunConfig) -> anyhow::Result<Option<PathBuf>> {
    let out_dir = Path::new(&cfg.trainer.out_dir);
    let latest_in_out = qoq_rl::checkpoint::latest(out_dir)
        .with_context(|| format!("listing the checkpoints in {}", out_dir.display()))?;
    if let Some(p) = &cfg.trainer.load_checkpoint_path {
        let p = PathBuf::from(p);
        let ck = qoq_rl::checkpoint::latest_or_self(&p)?;
        let same_dir = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !ck.join(qoq_rl::checkpoint::files::CONFIG).is_file() {
            bail!(
                "trainer.load_checkpoint_path {}: no checkpoint there (no {})",
                p.display(),
                qoq_rl::checkpoint::files::CONFIG
            );
        }
        if !ck.parent().is_some_and(|d| same_dir(d, out_dir)) {
            bail!(
                "trainer.load_checkpoint_path {} is not a checkpoint of trainer.out_dir {}: a run \
                 continues in its own folder (to start a new run from another run's weights, \
                 use qoq train --init-from)",
                ck.display(),
                out_dir.display()
            );
        }
        return Ok(Some(ck));
    }
    match latest_in_out {
        Some((_, ck)) if cfg.trainer.find_last_checkpoint => Ok(Some(ck)),
        Some((_, ck)) => bail!(
            "trainer.out_dir {} already holds a run (checkpoint {}) and \
             trainer.find_last_checkpoint is false: a new run there would overwrite it; \
             continue it (trainer.find_last_checkpoint = true, or qoq train --resume) or choose \
             another trainer.out_dir",
            out_dir.display(),
            ck.display()
        ),
        None => Ok(None),
    }
}
