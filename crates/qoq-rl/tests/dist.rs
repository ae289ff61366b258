//! Data-parallel training (issue 22) with in-process ranks ([`qoq_rl::dist::InProcess`], one
//! thread per rank) on the tiny random model: two ranks train like one process with the same
//! global batch, agree on the advantages, write one set of files, resume with the same number
//! of ranks (and refuse another), and a rank that dies stops its peer within the timeout.

use qoq_rl::config::RunConfig;
use qoq_rl::dist::{Collective, InProcess};
use qoq_rl::trainer::{ResumeOptions, Trainer};
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

mod support;

use support::{Vowels, config, text_manifest, tiny_model, weights};

const TIMEOUT: Duration = Duration::from_secs(120);

/// `f(rank's collective)` on `n` threads (rank order).
fn on_ranks<T: Send>(
    n: usize,
    timeout: Duration,
    f: impl Fn(Rc<dyn Collective>) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::group(n, timeout)
            .into_iter()
            .map(|c| {
                let f = &f;
                std::thread::Builder::new()
                    .stack_size(64 << 20)
                    .spawn_scoped(s, move || f(Rc::new(c)))
                    .unwrap()
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// DRPO (the paper's settings: KL in the loss, KL-aware damping) on 4 prompts × 4 rollouts,
/// mini-batches of 2 prompts, micro-batches of 2 rollouts, over `ranks` ranks, lr 2e-4.
///
/// The ranks sample their prompts in smaller batches than one process, so the sampler's
/// log-probs (the old log-probs of the loss) differ by float rounding (~1e-7 relative), and so
/// does the gradients' summation order. AdamW divides by `sqrt(v) + eps`: for a parameter whose
/// gradient nearly cancels (|g| near eps = 1e-8) a rounding difference of 1e-10 moves the update
/// by ~1e-2 · lr. Measured after 4 steps: 1e-5 at lr 1e-2, 1.05e-6 at 1e-3, 6.5e-7 at 5e-4; the
/// weights themselves move by ~lr per step, so a wrong reduction shows far above 1e-6.
fn drpo(model: &Path, manifest: &Path, out: &Path, ranks: usize) -> RunConfig {
    let mut cfg = config(model, manifest, out, 4, 4, 6, 2e-4, 4, 2, true);
    cfg.algorithm.estimator = qoq_rl::config::EstimatorKind::Drpo;
    cfg.algorithm.drpo = qoq_rl::advantage::DrpoConfig::paper();
    cfg.trainer.n_gpus_per_node = ranks;
    cfg
}

struct RankRun {
    initial: BTreeMap<String, Vec<f32>>,
    weights: BTreeMap<String, Vec<f32>>,
    advantages: Vec<Vec<f64>>,
    metrics: Vec<BTreeMap<String, f64>>,
    estimator: String,
    checkpoints: Vec<Option<std::path::PathBuf>>,
}

fn train(t: &mut Trainer) -> RankRun {
    let mut run = RankRun {
        initial: weights(t),
        weights: BTreeMap::new(),
        advantages: Vec::new(),
        metrics: Vec::new(),
        estimator: String::new(),
        checkpoints: Vec::new(),
    };
    while !t.is_finished() {
        let o = t.train_step().unwrap();
        run.advantages.push(t.last_advantages().to_vec());
        let mut m = o.metrics;
        m.retain(|k, _| !k.starts_with("perf/") && !k.starts_with("timing_s/"));
        run.metrics.push(m);
        run.checkpoints.push(o.checkpoint);
    }
    run.weights = weights(t);
    run.estimator = t.estimator_state().unwrap();
    run
}

fn max_abs_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, x)| x.iter().zip(&b[k]).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn two_ranks_train_like_one_process_and_resume_with_two_ranks_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);

    // One process, the same global batch.
    let out_one = dir.path().join("one");
    let mut one =
        Trainer::with_reward(drpo(&model, &manifest, &out_one, 1), Box::new(Vowels)).unwrap();
    let one = train(&mut one);

    // Two ranks in one run folder.
    let out_two = dir.path().join("two");
    let cfg = drpo(&model, &manifest, &out_two, 2);
    let two = on_ranks(2, TIMEOUT, |c| {
        let mut t = Trainer::new_dist(cfg.clone(), Some(Box::new(Vowels)), c).unwrap();
        train(&mut t)
    });
    let d = max_abs_diff(&one.weights, &two[0].weights);
    eprintln!("2 ranks vs 1 process: largest weight difference {d:e}");
    assert!(d <= 1e-6, "2 ranks vs 1 process: weights differ by {d}");
    let moved = max_abs_diff(&one.weights, &one.initial);
    assert!(moved > 1e-4, "4 steps moved the weights by {moved} only");
    assert_eq!(two[0].weights, two[1].weights, "the ranks' weights differ");
    for step in 0..4 {
        // Both ranks computed every rollout's advantage, the same ones, as one process did.
        assert!(!two[0].advantages[step].is_empty());
        assert_eq!(
            two[0].advantages[step], two[1].advantages[step],
            "step {step}"
        );
        assert_eq!(one.advantages[step].len(), two[0].advantages[step].len());
        // From step 2 on the weights differ by the ranks' summation order (below 1e-6, above),
        // and DRPO's normalised advantages magnify the log-probabilities' differences that
        // makes (3.3e-6 relative at step 2 of this run): 1e-5.
        for (a, b) in one.advantages[step].iter().zip(&two[0].advantages[step]) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs().max(b.abs())),
                "step {step}: advantage {a} vs {b}"
            );
        }
        // Rank 0's metrics cover the whole step (rewards, losses of every micro-batch).
        for (k, v) in &one.metrics[step] {
            let w = two[0].metrics[step].get(k).copied();
            assert!(
                w.is_some_and(|w| close(*v, w)),
                "step {step}: {k} = {v} in one process, {w:?} on rank 0"
            );
        }
    }
    // DRPO's history is the same on both ranks.
    assert_eq!(two[0].estimator, two[1].estimator);
    // One set of files, written by rank 0; both ranks name the checkpoints.
    let ck2 = out_two.join("checkpoint_step_2");
    assert_eq!(two[0].checkpoints, two[1].checkpoints);
    assert_eq!(two[0].checkpoints[1].as_deref(), Some(ck2.as_path()));
    let logged = qoq_rl::metrics_log::read_records(&out_two.join("metrics.jsonl")).unwrap();
    assert_eq!(
        logged.iter().map(|r| r.step).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck2.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["world_size"], 2);

    // Resuming with two ranks continues the run as it went.
    let resumed = on_ranks(2, TIMEOUT, |c| {
        let mut t =
            Trainer::resume_dist(&ck2, Some(Box::new(Vowels)), &ResumeOptions::default(), c)
                .unwrap();
        assert_eq!(t.step_count(), 2);
        train(&mut t)
    });
    let d = max_abs_diff(&two[0].weights, &resumed[0].weights);
    assert!(d <= 1e-6, "resumed 2-rank run differs by {d}");
    assert_eq!(resumed[0].estimator, resumed[1].estimator);

    // Another number of ranks is refused, naming both numbers.
    let e = Trainer::resume_with_reward(&ck2, Box::new(Vowels))
        .err()
        .expect("one process resuming a 2-rank checkpoint")
        .to_string();
    assert!(e.contains("2 rank(s)") && e.contains("has 1"), "{e}");
    let errs = on_ranks(4, TIMEOUT, |c| {
        let opts = ResumeOptions {
            overrides: vec!["trainer.n_gpus_per_node=4".into()],
            ..ResumeOptions::default()
        };
        Trainer::resume_dist(&ck2, Some(Box::new(Vowels)), &opts, c)
            .err()
            .map(|e| e.to_string())
    });
    for e in errs {
        let e = e.expect("4 ranks resuming a 2-rank checkpoint");
        assert!(e.contains("2 rank(s)") && e.contains("has 4"), "{e}");
    }
    // A launch whose size differs from trainer.nnodes · n_gpus_per_node is refused.
    let out_bad = dir.path().join("bad");
    let cfg = drpo(&model, &manifest, &out_bad, 2);
    let errs = on_ranks(3, TIMEOUT, |c| {
        Trainer::new_dist(cfg.clone(), Some(Box::new(Vowels)), c)
            .err()
            .map(|e| e.to_string())
    });
    for e in errs {
        let e = e.expect("3 ranks for a world size of 2");
        assert!(
            e.contains("3 ranks") && e.contains("= 2") && e.contains("n_gpus_per_node"),
            "{e}"
        );
    }
}

#[test]
fn a_rank_that_dies_stops_its_peer_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);
    let out = dir.path().join("run");
    let cfg = drpo(&model, &manifest, &out, 2);
    let outcomes = on_ranks(2, Duration::from_secs(30), |c| {
        let rank = c.rank();
        let mut t = Trainer::new_dist(cfg.clone(), Some(Box::new(Vowels)), c).unwrap();
        t.train_step().unwrap();
        if rank == 1 {
            // Rank 1 dies: its collective handle goes with it.
            drop(t);
            return None;
        }
        let t0 = Instant::now();
        let e = t.train_step().err().map(|e| e.to_string());
        Some((e, t0.elapsed()))
    });
    let (e, took) = outcomes[0].clone().unwrap();
    let e = e.expect("rank 0's step after rank 1 died");
    assert!(e.contains("rank 1 left the job"), "{e}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}

#[test]
fn sft_and_ppo_with_a_value_model_train_like_one_process_on_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let manifest = text_manifest(dir.path(), 8);
    // SFT: mini-batches of 2 prompts in micro-batches of 1 (one per rank); PPO: GAE with its
    // value model (whose gradients are all-reduced too) and 2 epochs from the policy's own old
    // log-probs.
    let sft = |out: &Path, ranks: usize| {
        let mut cfg = config(&model, &manifest, out, 4, 2, 8, 2e-4, 2, 100, false);
        cfg.actor.micro_batch_size_per_device_for_update = 1;
        cfg.trainer.sft = true;
        cfg.trainer.n_gpus_per_node = ranks;
        cfg
    };
    let ppo = |out: &Path, ranks: usize| {
        let mut cfg = config(&model, &manifest, out, 4, 2, 4, 2e-4, 2, 100, false);
        cfg.algorithm.estimator = qoq_rl::config::EstimatorKind::Gae;
        cfg.algorithm.lam = 0.95;
        cfg.critic.optim.lr = 2e-4;
        cfg.actor.ppo_epochs = 2;
        cfg.trainer.n_gpus_per_node = ranks;
        cfg
    };
    for (name, make) in [
        ("sft", &sft as &(dyn Fn(&Path, usize) -> RunConfig + Sync)),
        ("ppo", &ppo),
    ] {
        let out = dir.path().join(format!("{name}-one"));
        let mut t = Trainer::with_reward(make(&out, 1), Box::new(Vowels)).unwrap();
        let one = train(&mut t);
        let out = dir.path().join(format!("{name}-two"));
        let cfg = make(&out, 2);
        let two = on_ranks(2, TIMEOUT, |c| {
            let mut t = Trainer::new_dist(cfg.clone(), Some(Box::new(Vowels)), c).unwrap();
            train(&mut t)
        });
        let d = max_abs_diff(&one.weights, &two[0].weights);
        eprintln!("{name}: 2 ranks vs 1 process: largest weight difference {d:e}");
        assert!(d <= 1e-6, "{name}: weights differ by {d}");
        assert_eq!(two[0].weights, two[1].weights, "{name}: the ranks differ");
        let moved = max_abs_diff(&one.weights, &one.initial);
        assert!(moved > 1e-4, "{name}: the weights moved by {moved} only");
        for (step, m) in one.metrics.iter().enumerate() {
            for (k, v) in m {
                let w = two[0].metrics[step].get(k).copied();
                assert!(
                    w.is_some_and(|w| close(*v, w)),
                    "{name} step {step}: {k} = {v} in one process, {w:?} on rank 0"
                );
            }
        }
    }
}
