//! `qoq plot RUN_DIR`: one PNG per metric group from a run's `metrics.jsonl`.
//!
//! The command module is compiled into this test directly, so the test does not depend on the
//! subcommand being wired into the binary.

#[path = "../src/cmd/plot.rs"]
#[allow(dead_code)]
mod plot;

use qoq_rl::metrics_log::{MetricsLog, MetricsRecord, names};
use std::collections::BTreeMap;
use std::io::Write;

fn write_run(dir: &std::path::Path, steps: u64) {
    let mut log = MetricsLog::create(&dir.join("metrics.jsonl")).unwrap();
    for step in 1..=steps {
        let s = step as f64;
        let mut m = BTreeMap::new();
        m.insert(names::REWARD_OVERALL.to_string(), 0.2 + 0.02 * s);
        m.insert(names::REWARD_IOU.to_string(), 0.1 + 0.01 * s);
        m.insert(names::PG_LOSS.to_string(), 0.3 / s);
        m.insert(names::ENTROPY_LOSS.to_string(), 1.2 - 0.01 * s);
        m.insert(names::KL_LOSS.to_string(), 1e-3 * s);
        m.insert(names::PPO_KL.to_string(), 1e-4 * s);
        m.insert(names::LR.to_string(), 1e-6);
        m.insert(names::GRAD_NORM.to_string(), f64::NAN);
        m.insert(names::domain_reward("vindr"), 0.1 * (s / 3.0).sin().abs());
        m.insert(names::domain_reward("ptbxl"), 0.05 * s);
        if step.is_multiple_of(5) {
            m.insert(names::val_test_score("chest_xray"), 0.4 + 0.01 * s);
        }
        log.append(&MetricsRecord {
            step,
            wall_time: 1.0e9 + s,
            metrics: m,
        })
        .unwrap();
    }
}

fn coloured_pixels(path: &std::path::Path) -> (u32, u32, usize) {
    let img = image::open(path).unwrap().to_rgb8();
    let n = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0;
            r.max(g).max(b) - r.min(g).min(b) > 60
        })
        .count();
    (img.width(), img.height(), n)
}

#[test]
fn plot_writes_one_png_per_metric_group() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), 20);
    // a running trainer's torn last line is ignored
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("metrics.jsonl"))
        .unwrap();
    f.write_all(b"{\"step\": 21, \"metr").unwrap();
    drop(f);
    let code = plot::run(plot::PlotArgs {
        run_dir: dir.path().to_path_buf(),
        metrics: None,
        out: None,
        only: None,
    })
    .unwrap();
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let curves = dir.path().join("curves");
    let mut files: Vec<String> = std::fs::read_dir(&curves)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            "kl.png",
            "loss.png",
            "lr.png",
            "reward.png",
            "reward_by_domain.png",
            "val_score_by_domain.png"
        ],
        "grad_norm is all NaN and gets no chart"
    );
    if let Some(keep) = std::env::var_os("QOQ_PLOT_KEEP_DIR") {
        // for looking at the charts: QOQ_PLOT_KEEP_DIR=/tmp/curves cargo test -p qoq-cli --test plot
        std::fs::create_dir_all(&keep).unwrap();
        for f in &files {
            std::fs::copy(curves.join(f), std::path::Path::new(&keep).join(f)).unwrap();
        }
    }
    for f in &files {
        let (w, h, n) = coloured_pixels(&curves.join(f));
        assert_eq!((w, h), (640, 400), "{f}");
        assert!(n > 100, "{f}: only {n} coloured pixels, no curve drawn");
    }
}

#[test]
fn plot_only_filters_groups_and_missing_logs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), 3);
    let out = dir.path().join("charts");
    plot::run(plot::PlotArgs {
        run_dir: dir.path().to_path_buf(),
        metrics: None,
        out: Some(out.clone()),
        only: Some("kl".into()),
    })
    .unwrap();
    let files: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(files.len(), 1);
    assert!(out.join("kl.png").exists());

    let empty = tempfile::tempdir().unwrap();
    let e = plot::run(plot::PlotArgs {
        run_dir: empty.path().to_path_buf(),
        metrics: None,
        out: None,
        only: None,
    })
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("metrics.jsonl"), "{msg}");
}
