//! `qoq eval` on the synthetic world with precomputed responses: artefacts, resume, compare.

mod support;

use std::io::Write;
use std::process::Command;

fn qoq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
}

#[test]
fn eval_scores_responses_resumes_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    let cfg = qoq_synth::WorldConfig {
        image_size: 28,
        volume_slices: 2,
        largest_domain_rows: 10,
        domain_imbalance: 5.0,
        test_per_class: 2,
        ecg_seconds: 1.0,
        ..Default::default()
    };
    qoq_synth::generate(&cfg, &world).unwrap();
    let test = world.join("test.jsonl");
    // Answer every row correctly except the first of each dataset (given a wrong label).
    let mut seen = std::collections::BTreeSet::new();
    let mut out = std::fs::File::create(dir.path().join("gens.jsonl")).unwrap();
    let mut n = 0;
    for line in std::fs::read_to_string(&test).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ds = v["dataset"].as_str().unwrap().to_string();
        let ans = if seen.insert(ds) {
            "Wrong label"
        } else {
            v["answer"].as_str().unwrap()
        };
        let bbox = v
            .get("bbox")
            .cloned()
            .unwrap_or(serde_json::json!([0, 0, 1, 1]));
        let resp = format!(
            "<think>I see the finding.</think>\n```json\n[{{\"bbox_2d\": {bbox}, \"label\": \"finding\"}}]\n```\n\\boxed{{{ans}}}"
        );
        writeln!(
            out,
            "{}",
            serde_json::json!({"id": v["id"], "response": resp})
        )
        .unwrap();
        n += 1;
    }
    drop(out);
    let run = dir.path().join("run");
    // `qoq eval` of the responses in `dir/responses` on the test split, into `out`.
    let score = |responses: &str, out: &std::path::Path| {
        let mut c = qoq();
        c.args(["eval", "--data"])
            .arg(&test)
            .arg("--responses")
            .arg(dir.path().join(responses))
            .arg("--out")
            .arg(out);
        c
    };
    let args = |limit: Option<&str>| {
        let mut c = score("gens.jsonl", &run);
        if let Some(l) = limit {
            c.args(["--limit", l]);
        }
        c.output().unwrap()
    };
    // A first, limited run stands in for an interrupted one; the second completes it.
    let o = args(Some("5"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = args(None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("{n} rows evaluated (5 resumed)")),
        "{stderr}"
    );
    let traces = std::fs::read_to_string(run.join("traces.jsonl")).unwrap();
    assert_eq!(traces.lines().count(), n);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    let acc = metrics["val/accuracy"].as_f64().unwrap();
    assert!(acc > 0.6 && acc < 1.0, "accuracy {acc}");
    // The ground-truth box around a round lesion covers it with IoU pi/4 or so.
    let iou = metrics["chest_xray/mean_iou"].as_f64().unwrap();
    assert!(iou > 0.6 && iou < 1.0, "iou {iou}");
    assert!(run.join("report.md").exists() && run.join("domains.png").exists());
    assert!(run.join("confusion/ecg__synth-ecg-rhythm.png").exists());

    let o = qoq()
        .arg("eval")
        .arg("--compare")
        .arg(&run)
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success());
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("| val/accuracy |") && table.contains("+0.0000"),
        "{table}"
    );
    // A run against itself: every paired interval is [0, 0].
    assert!(
        table.contains("| val/f1 | ") && table.contains("[+0.0000, +0.0000] |"),
        "{table}"
    );
    assert!(
        table.contains("overall: B - A macro-F1 +0.0 [+0.0, +0.0]; B - A balanced accuracy +0.0"),
        "{table}"
    );

    // Against a run answering every row right: B - A is positive with an interval above 0,
    // and the same seed gives the same output.
    let mut perfect = std::fs::File::create(dir.path().join("perfect.jsonl")).unwrap();
    for line in std::fs::read_to_string(&test).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let resp = format!("\\boxed{{{}}}", v["answer"].as_str().unwrap());
        writeln!(
            perfect,
            "{}",
            serde_json::json!({"id": v["id"], "response": resp})
        )
        .unwrap();
    }
    drop(perfect);
    let better = dir.path().join("better");
    let o = score("perfect.jsonl", &better).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let compare = |b: &std::path::Path, extra: &[&str]| {
        qoq()
            .arg("eval")
            .arg("--compare")
            .arg(&run)
            .arg(b)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = compare(&better, &["--bootstrap", "300", "--seed", "7"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("300 replicates (seed 7)"), "{text}");
    let overall = text
        .lines()
        .find(|l| l.starts_with("overall: "))
        .unwrap_or_else(|| panic!("{text}"));
    // "overall: B - A macro-F1 +12.3 [+4.5, +20.1]; ...": the lower end is above 0.
    let lo: f64 = overall
        .split('[')
        .nth(1)
        .and_then(|x| x.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(lo > 0.0, "{overall}");
    let again = compare(&better, &["--bootstrap", "300", "--seed", "7"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), text);

    // Runs over different cases are refused; so are the bootstrap flags without --compare.
    let partial = dir.path().join("partial");
    let o = score("perfect.jsonl", &partial)
        .args(["--limit", "5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = compare(&partial, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not evaluated on the same cases"), "{err}");
    // Without intervals the table alone is still available.
    let o = compare(&partial, &["--bootstrap", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("interval"));
    for flags in [["--bootstrap", "10"], ["--seed", "3"]] {
        let o = score("perfect.jsonl", &dir.path().join("refused"))
            .args(flags)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(flags[0]), "{err}");
    }

    // A response file without a row's id is an error naming the sample.
    std::fs::write(dir.path().join("empty.jsonl"), "").unwrap();
    let o = score("empty.jsonl", &dir.path().join("run2"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no response for sample"));
}

#[test]
fn eval_generates_with_a_model_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    let cfg = qoq_synth::WorldConfig {
        image_size: 28,
        volume_slices: 2,
        largest_domain_rows: 10,
        domain_imbalance: 5.0,
        test_per_class: 1,
        ecg_seconds: 10.0,
        ..Default::default()
    };
    qoq_synth::generate(&cfg, &world).unwrap();
    let model = support::tiny_model(dir.path());
    let run = dir.path().join("run");
    let eval = |limit: &str| {
        qoq()
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(world.join("test.jsonl"))
            .arg("--out")
            .arg(&run)
            .args([
                "--max-new-tokens",
                "4",
                "--batch-size",
                "3",
                "--limit",
                limit,
            ])
            .output()
            .unwrap()
    };
    let o = eval("4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = eval("7");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("7 rows evaluated (4 resumed)"), "{stderr}");
    let traces = std::fs::read_to_string(run.join("traces.jsonl")).unwrap();
    assert_eq!(traces.lines().count(), 7);
    for l in traces.lines() {
        let t: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(t["tokens"].as_u64().unwrap() <= 4);
    }
    assert!(run.join("metrics.json").exists() && run.join("report.md").exists());
}
