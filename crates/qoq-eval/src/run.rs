//! Evaluation runs: generate for every sample, score, keep every reasoning trace, report.
//!
//! A run directory holds
//! * `traces.jsonl`: one [`Trace`] per sample, appended batch by batch and flushed, so an
//!   interrupted run resumes where it stopped: rows already traced are never redone or lost, and a
//!   half-written last line (a kill mid-write) is cut off and its sample redone;
//! * `metrics.json`: the flat metric keys of [`crate::MetricsReport::to_flat_json`] plus
//!   `{src}/{ds}/parse_failure_rate`, `{src}/{ds}/mean_response_chars` and their means per source
//!   and overall (`val/...`);
//! * `report.md`: the Markdown table of [`crate::MetricsReport::to_markdown`] and a table of
//!   parse failures and response lengths;
//! * `confusion/<data_source>__<dataset>.png` and `domains.png` (per-domain accuracy and F1).
//!
//! Generation is behind [`Responder`] so the same run logic drives the model engine, a served
//! model or a file of precomputed responses.

use crate::answer::{Extraction, gold_conditions, predicted_conditions};
use crate::bootstrap::{METRICS, OVERALL, PairedBootstrap};
use crate::error::{Error, Result};
use crate::metrics::{MetricsAccumulator, MetricsReport, Prediction};
use crate::plot;
use qoq_core::{ClinicalSample, FinishReason, RewardScore, SegMask};
use qoq_reward::{MaskIndex, RewardFn, RewardInput};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// One generated response.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    /// Generated tokens (0 when unknown).
    pub tokens: usize,
    pub finish: FinishReason,
}

/// Anything that answers samples: the engine over a model, a server, a file.
pub trait Responder {
    /// One generation per sample, in order.
    fn respond(&mut self, batch: &[ClinicalSample]) -> Result<Vec<Generation>>;
}

/// The trace of one evaluated sample (the schema of `traces.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The sample's id.
    pub id: String,
    /// Its 1-based manifest line.
    pub line: u64,
    pub data_source: String,
    pub dataset: String,
    /// The question as in the manifest (before the format prompt).
    pub problem: String,
    /// The gold answer.
    pub answer: String,
    /// The full response.
    pub response: String,
    /// The reasoning: the text inside `<think>...</think>` when present, else the response up to
    /// the last `\boxed{`.
    pub reasoning: String,
    /// The labels the evaluation extracts from the response (spec §8.9) and the gold labels.
    pub predicted: Vec<String>,
    pub gold: Vec<String>,
    /// Whether the predicted label set equals the gold set.
    pub exact_match: bool,
    /// Whether no `\boxed{...}` answer could be found.
    pub parse_failure: bool,
    /// Boxes `[x1, y1, x2, y2]` parsed from the response's JSON block.
    pub boxes: Vec<[f64; 4]>,
    /// The reward's components (what training optimises).
    pub reward: RewardScore,
    /// IoU against the sample's mask or box, present only where the sample has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iou: Option<f64>,
    pub tokens: usize,
    pub finish: FinishReason,
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Samples per [`Responder::respond`] call (and per flush of `traces.jsonl`).
    pub batch_size: usize,
    /// Answer extraction for the metrics.
    pub extraction: Extraction,
    /// Stop after this many samples (all when `None`).
    pub limit: Option<usize>,
    /// Write the PNG charts.
    pub charts: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: 8,
            extraction: Extraction::Evaluation,
            limit: None,
            charts: true,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    /// Samples traced before this call (resumed).
    pub resumed: usize,
    /// Samples generated in this call.
    pub generated: usize,
    pub report: MetricsReport,
    pub metrics_path: PathBuf,
    /// Every trace of the run (resumed and generated), in `traces.jsonl`'s order.
    pub traces: Vec<Trace>,
}

/// The reasoning part of a response: inside `<think>...</think>` when present, else the text
/// before the last `\boxed{`.
pub fn reasoning_of(response: &str) -> String {
    if let (Some(a), Some(b)) = (response.find("<think>"), response.rfind("</think>"))
        && a + 7 <= b
    {
        return response[a + 7..b].trim().to_string();
    }
    match response.rfind("\\boxed{") {
        Some(i) => response[..i].trim().to_string(),
        None => response.trim().to_string(),
    }
}

/// The `bbox_2d` boxes of the first parseable JSON block of a response.
pub fn boxes_of(response: &str) -> Vec<[f64; 4]> {
    match qoq_reward::iou::extract_json(response) {
        Ok(Some(v)) => qoq_reward::iou::collect_bboxes(&v)
            .iter()
            .filter_map(qoq_reward::iou::box_coords)
            .collect(),
        _ => Vec::new(),
    }
}

/// Build the trace of one sample's generation.
pub fn make_trace(
    sample: &ClinicalSample,
    g: &Generation,
    reward: &dyn RewardFn,
    mask: Option<&SegMask>,
    extraction: Extraction,
) -> Trace {
    let index = mask.map(MaskIndex::new);
    let score = reward.score(&RewardInput {
        response: &g.text,
        sample,
        mask: index.as_ref(),
    });
    let predicted = predicted_conditions(&g.text, extraction);
    let gold = gold_conditions(&sample.answer);
    let has_target = mask.is_some_and(|m| m.any()) || sample.bbox.is_some();
    Trace {
        id: sample.id.to_string(),
        line: sample.line,
        data_source: sample.data_source.as_source().to_string(),
        dataset: sample.dataset.clone(),
        problem: sample.problem.clone(),
        answer: sample.answer.clone(),
        response: g.text.clone(),
        reasoning: reasoning_of(&g.text),
        exact_match: predicted == gold,
        parse_failure: qoq_reward::extract_boxed(&g.text).is_none(),
        predicted: predicted.into_iter().collect(),
        gold: gold.into_iter().collect(),
        boxes: boxes_of(&g.text),
        iou: has_target.then_some(score.iou_score),
        reward: score,
        tokens: g.tokens,
        finish: g.finish,
    }
}

/// Read the traces already in `path`, cutting off a torn last line. Returns them in file order.
pub fn read_traces(path: &Path) -> Result<Vec<Trace>> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(Vec::new());
    };
    let mut reader = std::io::BufReader::new(file);
    let mut out = Vec::new();
    let mut good_bytes = 0u64;
    let mut line = String::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|e| Error::file(path, e.to_string()))?;
        if read == 0 {
            break;
        }
        n += 1;
        let complete = line.ends_with('\n');
        match serde_json::from_str::<Trace>(line.trim_end()) {
            Ok(t) if complete => {
                out.push(t);
                good_bytes += read as u64;
            }
            // A torn final line: drop it (its sample is redone).
            _ if !complete => break,
            Err(e) => {
                return Err(Error::file(
                    path,
                    format!("line {n}: not a trace ({e}); refusing to resume over it"),
                ));
            }
            Ok(_) => unreachable!("guarded by `complete`"),
        }
    }
    let len = std::fs::metadata(path)
        .map_err(|e| Error::file(path, e.to_string()))?
        .len();
    if len != good_bytes {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::file(path, e.to_string()))?;
        f.set_len(good_bytes)
            .map_err(|e| Error::file(path, e.to_string()))?;
    }
    Ok(out)
}

/// Run (or resume) an evaluation into `out_dir`.
///
/// `samples` yields the evaluation rows (errors are returned as they come: a bad manifest row
/// stops the run with its line, after the traces so far are safely on disk). `mask_of` loads a
/// sample's mask in the coordinates the model's boxes use (the processed image size).
pub fn run_eval<I>(
    samples: I,
    responder: &mut dyn Responder,
    reward: &dyn RewardFn,
    mask_of: &dyn Fn(&ClinicalSample) -> Option<SegMask>,
    out_dir: &Path,
    opts: &EvalOptions,
) -> Result<EvalOutcome>
where
    I: IntoIterator<Item = Result<ClinicalSample>>,
{
    std::fs::create_dir_all(out_dir).map_err(|e| Error::file(out_dir, e.to_string()))?;
    let trace_path = out_dir.join("traces.jsonl");
    let mut traces = read_traces(&trace_path)?;
    let resumed = traces.len();
    let done: HashSet<String> = traces.iter().map(|t| t.id.clone()).collect();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&trace_path)
        .map_err(|e| Error::file(&trace_path, e.to_string()))?;
    let mut generated = 0usize;
    let mut batch: Vec<ClinicalSample> = Vec::new();
    let limit = opts.limit.unwrap_or(usize::MAX);
    let mut seen = 0usize;
    let mut flush = |batch: &mut Vec<ClinicalSample>,
                     traces: &mut Vec<Trace>,
                     generated: &mut usize|
     -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let gens = responder.respond(batch)?;
        if gens.len() != batch.len() {
            return Err(Error::Other(format!(
                "the responder returned {} generations for {} samples",
                gens.len(),
                batch.len()
            )));
        }
        let mut text = String::new();
        for (s, g) in batch.iter().zip(&gens) {
            let mask = mask_of(s);
            let t = make_trace(s, g, reward, mask.as_ref(), opts.extraction);
            text.push_str(&serde_json::to_string(&t).map_err(|e| Error::Other(e.to_string()))?);
            text.push('\n');
            traces.push(t);
        }
        file.write_all(text.as_bytes())
            .and_then(|_| file.flush())
            .map_err(|e| Error::file(&trace_path, e.to_string()))?;
        *generated += batch.len();
        batch.clear();
        Ok(())
    };
    for s in samples {
        if seen >= limit {
            break;
        }
        let s = s?;
        seen += 1;
        if done.contains(&s.id.to_string()) {
            continue;
        }
        batch.push(s);
        if batch.len() >= opts.batch_size.max(1) {
            flush(&mut batch, &mut traces, &mut generated)?;
        }
    }
    flush(&mut batch, &mut traces, &mut generated)?;
    let report = write_report(&traces, out_dir, opts)?;
    Ok(EvalOutcome {
        resumed,
        generated,
        report,
        metrics_path: out_dir.join("metrics.json"),
        traces,
    })
}

/// Per-(source, dataset) parse-failure rate and mean response length in characters.
fn extras(traces: &[Trace]) -> Vec<(String, f64)> {
    let mut by: BTreeMap<(String, String), (usize, usize, usize)> = BTreeMap::new();
    for t in traces {
        let e = by
            .entry((t.data_source.clone(), t.dataset.clone()))
            .or_default();
        e.0 += 1;
        e.1 += usize::from(t.parse_failure);
        e.2 += t.response.chars().count();
    }
    let mut out = Vec::new();
    let mut per_src: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for ((src, ds), (n, fail, chars)) in &by {
        let rate = *fail as f64 / *n as f64;
        let len = *chars as f64 / *n as f64;
        out.push((format!("{src}/{ds}/parse_failure_rate"), rate));
        out.push((format!("{src}/{ds}/mean_response_chars"), len));
        per_src.entry(src.clone()).or_default().push((rate, len));
    }
    let mut val = Vec::new();
    for (src, v) in &per_src {
        let r = v.iter().map(|x| x.0).sum::<f64>() / v.len() as f64;
        let l = v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
        out.push((format!("{src}/parse_failure_rate"), r));
        out.push((format!("{src}/mean_response_chars"), l));
        val.push((r, l));
    }
    if !val.is_empty() {
        let k = val.len() as f64;
        out.push((
            "val/parse_failure_rate".into(),
            val.iter().map(|x| x.0).sum::<f64>() / k,
        ));
        out.push((
            "val/mean_response_chars".into(),
            val.iter().map(|x| x.1).sum::<f64>() / k,
        ));
    }
    out
}

/// Metrics, report and charts from a set of traces (also usable on a finished run's traces).
pub fn write_report(traces: &[Trace], out_dir: &Path, opts: &EvalOptions) -> Result<MetricsReport> {
    let mut acc = MetricsAccumulator::new(opts.extraction);
    for t in traces {
        acc.push(&Prediction {
            response: t.response.clone(),
            answer: t.answer.clone(),
            data_source: t.data_source.clone(),
            dataset: t.dataset.clone(),
            iou: t.iou,
        });
    }
    let report = acc.finish();
    let mut flat = match report.to_flat_json() {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let extra = extras(traces);
    for (k, v) in &extra {
        flat.insert(k.clone(), serde_json::json!(v));
    }
    let path = out_dir.join("metrics.json");
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(flat))
        .map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::file(&path, e.to_string()))?;

    let mut md = String::from("# Evaluation report\n\n");
    md.push_str(&format!("{} samples.\n\n", traces.len()));
    md.push_str(&report.to_markdown());
    md.push_str("\n\n## Parsing and length\n\n| key | value |\n|---|---|\n");
    for (k, v) in &extra {
        md.push_str(&format!("| {k} | {v:.4} |\n"));
    }
    let path = out_dir.join("report.md");
    std::fs::write(&path, md).map_err(|e| Error::file(&path, e.to_string()))?;

    if opts.charts {
        write_charts(traces, &report, out_dir)?;
    }
    Ok(report)
}

fn write_charts(traces: &[Trace], report: &MetricsReport, out_dir: &Path) -> Result<()> {
    let dir = out_dir.join("confusion");
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e.to_string()))?;
    let mut groups: BTreeMap<(String, String), Vec<&Trace>> = BTreeMap::new();
    for t in traces {
        groups
            .entry((t.data_source.clone(), t.dataset.clone()))
            .or_default()
            .push(t);
    }
    for ((src, ds), ts) in &groups {
        let gold: BTreeSet<String> = ts.iter().flat_map(|t| t.gold.iter().cloned()).collect();
        let rows: Vec<String> = gold.iter().cloned().collect();
        let mut cols = rows.clone();
        cols.push("(other)".into());
        cols.push("(none)".into());
        let mut counts = vec![vec![0u64; cols.len()]; rows.len()];
        for t in ts {
            for g in &t.gold {
                let i = rows.iter().position(|r| r == g).unwrap_or(0);
                if t.predicted.is_empty() {
                    counts[i][cols.len() - 1] += 1;
                }
                for p in &t.predicted {
                    let j = rows.iter().position(|r| r == p).unwrap_or(cols.len() - 2);
                    counts[i][j] += 1;
                }
            }
        }
        let safe = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        };
        let png = dir.join(format!("{}__{}.png", safe(src), safe(ds)));
        plot::confusion_matrix(&format!("{src} / {ds}"), &rows, &cols, &counts)
            .save_png(&png)
            .map_err(|e| Error::file(&png, e.to_string()))?;
    }
    let flat: BTreeMap<String, f64> = report.to_flat().into_iter().collect();
    let mut sources: Vec<String> = traces
        .iter()
        .map(|t| t.data_source.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    sources.sort_by_key(|s| {
        let d = qoq_core::Domain::from_source(s);
        (d.paper_rank(), s.clone())
    });
    let get = |m: &str| -> Vec<f64> {
        sources
            .iter()
            .map(|s| flat.get(&format!("{s}/{m}")).copied().unwrap_or(f64::NAN))
            .collect()
    };
    let png = out_dir.join("domains.png");
    plot::grouped_bars(
        "Per-domain accuracy and F1",
        &sources,
        &[
            ("accuracy".into(), get("accuracy")),
            ("f1".into(), get("f1")),
        ],
    )
    .save_png(&png)
    .map_err(|e| Error::file(&png, e.to_string()))?;
    Ok(())
}

/// A side-by-side comparison of two runs' `metrics.json`: every key present in either, with
/// both values and B - A, as a Markdown table. With `intervals` (a
/// [`crate::bootstrap::paired_bootstrap`] of the same two runs) the table gains a column with
/// the interval of B - A where there is one, and the text ends with one statement per domain
/// and overall, e.g. `B - A macro-F1 +3.1 [-1.2, +7.5]` (percentage points).
pub fn compare_runs(a: &Path, b: &Path, intervals: Option<&PairedBootstrap>) -> Result<String> {
    let load = |dir: &Path| -> Result<BTreeMap<String, f64>> {
        let p = dir.join("metrics.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, e.to_string()))?;
        let v: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| Error::file(&p, e.to_string()))?;
        Ok(v.into_iter()
            .filter_map(|(k, v)| v.as_f64().map(|f| (k, f)))
            .collect())
    };
    let (ma, mb) = (load(a)?, load(b)?);
    let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let mut out = format!(
        "| key | A ({}) | B ({}) | B - A |",
        a.display(),
        b.display()
    );
    match intervals {
        Some(bs) => out.push_str(&format!(
            " B - A {:.0} % interval |\n|---|---|---|---|---|\n",
            100.0 * bs.options.level
        )),
        None => out.push_str("\n|---|---|---|---|\n"),
    }
    // `val/*` first, then per source, then per dataset.
    let mut keys: Vec<&String> = keys.into_iter().collect();
    keys.sort_by_key(|k| {
        (
            !k.starts_with("val/"),
            k.matches('/').count(),
            k.to_string(),
        )
    });
    for k in keys {
        let (va, vb) = (ma.get(k), mb.get(k));
        let f = |v: Option<&f64>| v.map_or("-".to_string(), |x| format!("{x:.4}"));
        let d = match (va, vb) {
            (Some(x), Some(y)) => format!("{:+.4}", y - x),
            _ => "-".into(),
        };
        out.push_str(&format!("| {k} | {} | {} | {d} |", f(va), f(vb)));
        if let Some(bs) = intervals {
            let ci = bs
                .for_key(k)
                .map_or("-".to_string(), |i| format!("[{:+.4}, {:+.4}]", i.lo, i.hi));
            out.push_str(&format!(" {ci} |"));
        }
        out.push('\n');
    }
    if let Some(bs) = intervals {
        out.push_str(&format!(
            "\nPaired bootstrap of B - A: {} replicates (seed {}) of the {} cases, resampled \
             within each dataset; {:.0} % percentile intervals, in percentage points.\n",
            bs.options.replicates,
            bs.options.seed,
            bs.cases,
            100.0 * bs.options.level
        ));
        // Overall first, then the domains in the paper's order.
        let mut levels: Vec<&String> = bs
            .intervals
            .keys()
            .map(|(l, _)| l)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        levels.sort_by_key(|l| {
            (
                l.as_str() != OVERALL,
                qoq_core::Domain::from_source(l).paper_rank(),
                l.to_string(),
            )
        });
        for level in levels {
            let parts: Vec<String> = METRICS
                .iter()
                .filter_map(|(m, _)| bs.intervals.get(&(level.clone(), *m)))
                .map(|i| i.statement())
                .collect();
            let name = if level == OVERALL { "overall" } else { level };
            out.push_str(&format!("{name}: {}\n", parts.join("; ")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_prefers_think_tags_then_text_before_the_answer() {
        assert_eq!(reasoning_of("<think> a b </think> \\boxed{X}"), "a b");
        assert_eq!(reasoning_of("because Y. \\boxed{X}"), "because Y.");
        assert_eq!(reasoning_of("</think><think>"), "</think><think>");
    }

    #[test]
    fn boxes_are_parsed_from_the_json_block() {
        let r =
            "```json\n[{\"bbox_2d\": [1, 2, 3, 4], \"label\": \"n\"}, {\"bbox_2d\": [5, 6]}]\n```";
        assert_eq!(boxes_of(r), vec![[1.0, 2.0, 3.0, 4.0]]);
        assert!(boxes_of("no json").is_empty());
    }
}
