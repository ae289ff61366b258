//! The demo's report: the paper's Table 2 layout (one row per domain, accuracy / macro-F1 / IoU
//! per model, then the overall means), `demo_metrics.json`, `report.md`, `curves.png` (SFT loss,
//! GRPO vs DRPO training reward, rare-domain reward) and `boxes/*.png` (the DRPO model's boxes on
//! a few test images, ground truth in green).

use super::{Curve, MODELS};
use anyhow::Context;
use qoq_core::{ClinicalSample, Domain};
use qoq_eval::answer::Extraction;
use qoq_eval::metrics::{MetricsReport, Prediction, Summary, compute_metrics};
use qoq_eval::plot::{Raster, line_chart};
use qoq_rl::metrics_log::names;
use qoq_rl::trainer::SFT_LOSS;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;

/// The rarest domains of the world (the last three of its size rank).
pub fn rare_domains() -> Vec<Domain> {
    qoq_synth::world::DOMAIN_RANK[6..].to_vec()
}

/// Everything the report is made of.
pub struct Inputs<'a> {
    pub out: &'a Path,
    pub preset: Value,
    pub model_config: Value,
    pub seed: u64,
    pub world: &'a qoq_synth::WorldSummary,
    pub test: &'a [ClinicalSample],
    /// In [`MODELS`] order.
    pub reports: &'a [MetricsReport],
    /// The models' mean rewards on the test split, in [`MODELS`] order.
    pub rewards: &'a [RewardMeans],
    /// The DRPO model's evaluation traces (its boxes are drawn).
    pub drpo_traces: &'a [qoq_eval::run::Trace],
    /// The ECG warm-up's curve (empty without the phase).
    pub sft_ecg: &'a Curve,
    pub sft: &'a Curve,
    pub grpo: &'a Curve,
    pub drpo: &'a Curve,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

/// A model's mean overall reward (the configured QoQ medical reward, what RL optimises) on the
/// test split, over all rows and per domain, from its evaluation traces.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RewardMeans {
    pub mean: f64,
    pub domains: BTreeMap<String, f64>,
}

impl RewardMeans {
    pub fn of(traces: &[qoq_eval::run::Trace]) -> Self {
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for t in traces {
            let e = sums.entry(t.data_source.clone()).or_default();
            e.0 += t.reward.overall;
            e.1 += 1;
        }
        let total: f64 = traces.iter().map(|t| t.reward.overall).sum();
        RewardMeans {
            mean: total / traces.len().max(1) as f64,
            domains: sums
                .into_iter()
                .map(|(d, (s, n))| (d, s / n as f64))
                .collect(),
        }
    }
}

/// One line naming each trained model's mean test reward (after the table).
pub fn reward_line(rewards: &[RewardMeans]) -> String {
    let parts: Vec<String> = MODELS
        .iter()
        .zip(rewards)
        .filter(|((name, _, _), _)| *name != "untrained")
        .map(|((_, label, _), r)| format!("{label} {:.3}", r.mean))
        .collect();
    format!(
        "Mean reward on the test split (greedy, the reward RL optimises): {}",
        parts.join(", ")
    )
}

fn summary_json(s: Option<&Summary>) -> Value {
    match s {
        Some(s) => json!({
            "accuracy": s.metrics.accuracy,
            "f1": s.metrics.f1,
            "precision": s.metrics.precision,
            "recall": s.metrics.recall,
            "specificity": s.metrics.specificity,
            "exact_match": s.exact_match,
            "iou": s.mean_iou,
            "count": s.count,
        }),
        None => Value::Null,
    }
}

/// A report's summaries as `demo_metrics.json` holds them: per domain in the paper's order, the
/// rare domains' mean, and the overall means (all domains; vision domains).
fn scores_json(r: &MetricsReport) -> serde_json::Map<String, Value> {
    let domains: serde_json::Map<String, Value> = Domain::PAPER_ORDER
        .iter()
        .map(|d| (d.as_source().to_string(), summary_json(source(r, d))))
        .collect();
    let mut m = serde_json::Map::new();
    m.insert("domains".into(), Value::Object(domains));
    m.insert(
        "rare".into(),
        summary_json(mean_over(r, &rare_domains()).as_ref()),
    );
    m.insert("overall".into(), summary_json(r.overall.as_ref()));
    m.insert(
        "overall_vision".into(),
        summary_json(r.overall_vision().as_ref()),
    );
    m
}

fn source<'r>(r: &'r MetricsReport, d: &Domain) -> Option<&'r Summary> {
    r.sources
        .iter()
        .find(|s| s.name == d.as_source())
        .and_then(|s| s.summary.as_ref())
}

/// Mean of per-domain summaries over `domains` (unweighted, like the paper's overall rows).
fn mean_over(r: &MetricsReport, domains: &[Domain]) -> Option<Summary> {
    r.overall_where(|s| domains.iter().any(|d| d.as_source() == s))
}

/// The label-prior baseline: every test row answered with its dataset's most frequent training
/// class (what a model that ignores the images and ECGs learns), scored as the models are.
pub fn label_prior(world: &qoq_synth::WorldSummary, test: &[ClinicalSample]) -> MetricsReport {
    let majority: BTreeMap<&str, &str> = world
        .datasets
        .iter()
        .filter_map(|d| {
            let (i, _) = d
                .train
                .counts
                .iter()
                .enumerate()
                .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))?;
            Some((d.dataset.as_str(), d.train.labels[i].as_str()))
        })
        .collect();
    let predictions: Vec<Prediction> = test
        .iter()
        .map(|s| {
            let label = majority.get(s.dataset.as_str()).copied().unwrap_or("");
            Prediction::from_sample(s, format!("<think>\n</think>\n\\boxed{{{label}}}"))
        })
        .collect();
    compute_metrics(&predictions, Extraction::Evaluation)
}

/// The models of the table, in column order: the label prior, then the trained models (the
/// untrained one answers nothing parseable; it stays in `demo_metrics.json` and `eval/`).
fn table_models<'r>(
    prior: &'r MetricsReport,
    reports: &'r [MetricsReport],
) -> Vec<(&'static str, &'r MetricsReport)> {
    let mut models = vec![("Label prior", prior)];
    models.extend(
        MODELS
            .iter()
            .zip(reports)
            .filter(|((name, _, _), _)| *name != "untrained")
            .map(|((_, label, _), r)| (*label, r)),
    );
    models
}

/// The Markdown table ([`qoq_eval::markdown::paper_table`]): rows per domain in the paper's
/// order, then the rare domains' and the overall means, one column group per model (the label
/// prior first), the best macro-F1 of each row in bold.
pub fn table(
    world: &qoq_synth::WorldSummary,
    prior: &MetricsReport,
    reports: &[MetricsReport],
) -> String {
    let train_rows: BTreeMap<String, usize> = world.train_rows_per_domain().into_iter().collect();
    qoq_eval::markdown::paper_table(&table_models(prior, reports), &train_rows, &rare_domains())
}

fn curve_points(c: &Curve, key: &str) -> Vec<(f64, f64)> {
    c.iter()
        .filter_map(|(step, m)| m.get(key).map(|v| (*step as f64, *v)))
        .filter(|p| p.1.is_finite())
        .collect()
}

/// Running mean of the rare domains' step rewards (`reward_by_domain/<d>`), from the first step
/// that drew a rare-domain prompt.
fn rare_points(c: &Curve) -> Vec<(f64, f64)> {
    let keys: Vec<String> = rare_domains()
        .iter()
        .map(|d| names::domain_reward(d.as_source()))
        .collect();
    let (mut sum, mut n) = (0.0, 0usize);
    let mut out = Vec::new();
    for (step, m) in c {
        for k in &keys {
            if let Some(v) = m.get(k).filter(|v| v.is_finite()) {
                sum += v;
                n += 1;
            }
        }
        if n > 0 {
            out.push((*step as f64, sum / n as f64));
        }
    }
    out
}

fn curves_json(c: &Curve) -> Value {
    Value::Array(
        c.iter()
            .map(|(step, m)| {
                let mut o = serde_json::Map::new();
                o.insert("step".into(), json!(step));
                for (k, v) in m {
                    o.insert(k.clone(), json!(v));
                }
                Value::Object(o)
            })
            .collect(),
    )
}

/// Stacks rasters vertically on white.
fn stack(parts: &[Raster]) -> Raster {
    let w = parts.iter().map(|r| r.width).max().unwrap_or(1);
    let h = parts.iter().map(|r| r.height).sum::<u32>().max(1);
    let mut out = Raster::new(w, h);
    let mut y0 = 0u32;
    for p in parts {
        for y in 0..p.height {
            for x in 0..p.width {
                out.put(i64::from(x), i64::from(y0 + y), p.get(x, y));
            }
        }
        y0 += p.height;
    }
    out
}

fn write_curves(i: &Inputs<'_>, path: &Path) -> anyhow::Result<()> {
    let mut parts = vec![line_chart(
        "SFT loss (token cross-entropy)",
        "step",
        &[("SFT loss".to_string(), curve_points(i.sft, SFT_LOSS))],
    )];
    if !i.grpo.is_empty() || !i.drpo.is_empty() {
        parts.push(line_chart(
            "RL reward per step",
            "step",
            &[
                (
                    "GRPO".to_string(),
                    curve_points(i.grpo, names::REWARD_OVERALL),
                ),
                (
                    "DRPO".to_string(),
                    curve_points(i.drpo, names::REWARD_OVERALL),
                ),
            ],
        ));
        let (g, d) = (rare_points(i.grpo), rare_points(i.drpo));
        if g.len() > 1 || d.len() > 1 {
            parts.push(line_chart(
                "Rare-domain reward (running mean)",
                "step",
                &[("GRPO".to_string(), g), ("DRPO".to_string(), d)],
            ));
        }
    }
    stack(&parts)
        .save_png(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Draws `b` as a 1-pixel outline in `color`, clipped to the image.
fn outline(img: &mut image::RgbImage, b: [f64; 4], color: image::Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let c = |v: f64, hi: i64| (v.round() as i64).clamp(0, hi - 1);
    let (x1, x2) = (c(b[0].min(b[2]), w), c(b[0].max(b[2]), w));
    let (y1, y2) = (c(b[1].min(b[3]), h), c(b[1].max(b[3]), h));
    for x in x1..=x2 {
        img.put_pixel(x as u32, y1 as u32, color);
        img.put_pixel(x as u32, y2 as u32, color);
    }
    for y in y1..=y2 {
        img.put_pixel(x1 as u32, y as u32, color);
        img.put_pixel(x2 as u32, y as u32, color);
    }
}

/// One test image per 2-D dataset with a finding (a gold box), as the DRPO model saw it,
/// enlarged 4x: its predicted boxes in red, the gold box in green. Returns the files written.
fn write_boxes(i: &Inputs<'_>, dir: &Path) -> anyhow::Result<Vec<String>> {
    const SCALE: u32 = 4;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let by_id: BTreeMap<&str, &qoq_eval::run::Trace> =
        i.drpo_traces.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut written = Vec::new();
    for s in i.test {
        let (Some(img_path), Some(gold)) = (s.images.first(), s.bbox) else {
            continue;
        };
        if !seen.insert(s.dataset.clone()) {
            continue;
        }
        let Some(t) = by_id.get(s.id.0.as_str()) else {
            continue;
        };
        let img = image::open(img_path)
            .with_context(|| format!("reading {}", img_path.display()))?
            .to_rgb8();
        let (w, h) = img.dimensions();
        let (nw, nh) = qoq_data::vision::dataset_resize_dims(w, h, i.min_pixels, i.max_pixels);
        let gold = qoq_data::vision::rescale_bbox(gold, (w, h), (nw, nh));
        let mut big = image::imageops::resize(
            &img,
            nw * SCALE,
            nh * SCALE,
            image::imageops::FilterType::Nearest,
        );
        let k = f64::from(SCALE);
        let scaled = |b: [f64; 4]| {
            [
                b[0] * k,
                b[1] * k,
                (b[2] + 1.0) * k - 1.0,
                (b[3] + 1.0) * k - 1.0,
            ]
        };
        outline(&mut big, scaled(gold), image::Rgb([40, 200, 60]));
        let predicted: Vec<[f64; 4]> = t.boxes.iter().map(|b| scaled(*b)).collect();
        crate::cmd::infer::draw_boxes(&mut big, &predicted);
        let name = format!("{}.png", s.id.0);
        let path = dir.join(&name);
        big.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(name);
    }
    Ok(written)
}

/// Writes every artefact of the report and returns the Markdown table.
pub fn write_all(
    i: &Inputs<'_>,
    timings: &BTreeMap<String, f64>,
    wall_s: f64,
) -> anyhow::Result<String> {
    let prior = label_prior(i.world, i.test);
    let table = table(i.world, &prior, i.reports);
    let curves = i.out.join("curves.png");
    write_curves(i, &curves)?;
    let boxes = write_boxes(i, &i.out.join("boxes"))?;

    let mut models = serde_json::Map::new();
    let mut prior_entry = scores_json(&prior);
    prior_entry.insert("label".into(), json!("Label prior"));
    models.insert("label_prior".into(), Value::Object(prior_entry));
    for (((name, label, dir), r), reward) in MODELS.iter().zip(i.reports).zip(i.rewards) {
        let mut entry = scores_json(r);
        entry.insert("reward".into(), serde_json::to_value(reward)?);
        entry.insert("label".into(), json!(label));
        entry.insert("model_dir".into(), json!(dir));
        entry.insert("eval_dir".into(), json!(format!("eval/{name}")));
        entry.insert("flat".into(), r.to_flat_json());
        models.insert(name.to_string(), Value::Object(entry));
    }
    let metrics = json!({
        "seed": i.seed,
        "preset": i.preset,
        "model_config": i.model_config,
        "world": {
            "config": i.world.config,
            "train_rows_per_domain": i.world.train_rows_per_domain(),
            "test_rows": i.test.len(),
        },
        "rare_domains": rare_domains().iter().map(|d| d.as_source()).collect::<Vec<_>>(),
        "models": models,
        "training": {
            "sft_ecg": curves_json(i.sft_ecg),
            "sft": curves_json(i.sft),
            "grpo": curves_json(i.grpo),
            "drpo": curves_json(i.drpo),
        },
        "artefacts": {
            "curves": "curves.png",
            "boxes": boxes.iter().map(|b| format!("boxes/{b}")).collect::<Vec<_>>(),
            "report": "report.md",
        },
        "timings_s": timings,
        "wall_s": wall_s,
    });
    let path = i.out.join("demo_metrics.json");
    std::fs::write(&path, serde_json::to_string_pretty(&metrics)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;

    let md = format!(
        "# qoq demo (seed {seed})\n\n\
         Per-domain accuracy (the paper's balanced one-vs-rest accuracy), macro-F1 and IoU (%) on \
         the balanced test split, greedy decoding; `train rows` is the domain's share of the \
         imbalanced training split. Columns: the label prior (each dataset's most frequent \
         training class, whatever the input: what a model that does not read its inputs scores), \
         the SFT warm-up, and GRPO and DRPO from the SFT model with the same steps, seeds and \
         batches; the best macro-F1 of each row in bold (the untrained model's scores are in \
         `demo_metrics.json`).\n\n{table}\n\
         Training curves: `curves.png`; traces: `eval/<model>/traces.jsonl`; boxes of the DRPO \
         model: `boxes/`.\n\n{rewards}.\n",
        seed = i.seed,
        rewards = reward_line(i.rewards),
    );
    let path = i.out.join("report.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(format!("{table}\n{}.", reward_line(i.rewards)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoq_synth::world::{DatasetSummary, SplitCounts};

    fn sample(id: usize, dataset: &str, domain: Domain, answer: &str) -> ClinicalSample {
        ClinicalSample {
            id: qoq_core::sample::SampleId(format!("{dataset}-{id}")),
            line: id as u64 + 1,
            problem: "q".into(),
            system: None,
            answer: answer.into(),
            images: Vec::new(),
            videos: Vec::new(),
            time_series: Vec::new(),
            segmentation_path: None,
            bbox: None,
            dataset: dataset.into(),
            data_source: domain,
            extra: Default::default(),
        }
    }

    /// The mean reward is over every test row, and per domain over that domain's rows.
    #[test]
    fn reward_means_are_over_all_rows_and_per_domain() {
        let trace = |source: &str, overall: f64| qoq_eval::run::Trace {
            id: "i".into(),
            line: 1,
            data_source: source.into(),
            dataset: "d".into(),
            problem: "q".into(),
            answer: "a".into(),
            response: "r".into(),
            reasoning: String::new(),
            predicted: Vec::new(),
            gold: Vec::new(),
            exact_match: false,
            parse_failure: true,
            boxes: Vec::new(),
            reward: qoq_core::reward::RewardScore {
                overall,
                ..Default::default()
            },
            iou: None,
            tokens: 1,
            finish: qoq_core::rollout::FinishReason::Stop,
        };
        let r = RewardMeans::of(&[trace("ecg", 0.5), trace("ecg", 0.1), trace("derm", 0.9)]);
        assert!((r.mean - 0.5).abs() < 1e-12, "{r:?}");
        assert!((r.domains["ecg"] - 0.3).abs() < 1e-12, "{r:?}");
        assert!((r.domains["derm"] - 0.9).abs() < 1e-12, "{r:?}");
        let none = RewardMeans {
            mean: 0.25,
            domains: BTreeMap::new(),
        };
        let line = reward_line(&[none.clone(), r.clone(), none, r]);
        assert_eq!(
            line,
            "Mean reward on the test split (greedy, the reward RL optimises): SFT 0.500, GRPO 0.250, DRPO 0.500"
        );
    }

    /// The prior answers each dataset's most frequent training class: on a balanced test split
    /// of k classes its macro-F1 is 2 / (k (k + 1)) (one class with precision 1/k and recall 1,
    /// the others 0), whatever order the labels are listed in.
    #[test]
    fn label_prior_answers_the_majority_class_of_each_dataset() {
        let split = |labels: &[&str], counts: &[usize]| SplitCounts {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            counts: counts.to_vec(),
        };
        let world = qoq_synth::WorldSummary {
            config: Default::default(),
            datasets: vec![
                DatasetSummary {
                    data_source: "derm".into(),
                    dataset: "d".into(),
                    // The second label is the most frequent.
                    train: split(&["Nevus", "Melanoma", "BCC"], &[3, 9, 1]),
                    test: split(&["Nevus", "Melanoma", "BCC"], &[2, 2, 2]),
                },
                DatasetSummary {
                    data_source: "ecg".into(),
                    dataset: "e".into(),
                    train: split(&["Normal", "AF"], &[5, 2]),
                    test: split(&["Normal", "AF"], &[1, 1]),
                },
            ],
        };
        let mut test = Vec::new();
        for (i, a) in ["Nevus", "Nevus", "Melanoma", "Melanoma", "BCC", "BCC"]
            .iter()
            .enumerate()
        {
            test.push(sample(i, "d", Domain::Dermoscopy, a));
        }
        test.push(sample(0, "e", Domain::Ecg, "Normal"));
        test.push(sample(1, "e", Domain::Ecg, "AF"));
        let r = label_prior(&world, &test);
        let f1 = |d: Domain| source(&r, &d).unwrap().metrics.f1;
        assert!(
            (f1(Domain::Dermoscopy) - 2.0 / 12.0).abs() < 1e-9,
            "{}",
            f1(Domain::Dermoscopy)
        );
        assert!(
            (f1(Domain::Ecg) - 2.0 / 6.0).abs() < 1e-9,
            "{}",
            f1(Domain::Ecg)
        );
        // In the table the prior comes first and the untrained model is left out.
        let models = table_models(&r, std::slice::from_ref(&r));
        assert_eq!(models[0].0, "Label prior");
        assert!(models.iter().all(|(l, _)| *l != "Untrained"));
    }
}
