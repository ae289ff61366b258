//! Paired bootstrap intervals for the difference between two evaluation runs of the same test
//! cases (`qoq eval --compare A B`), so that "B beats A" is a statement with an interval.
//!
//! * **Paired**: the two runs' traces are matched by case id ([`Trace::id`]); runs whose case
//!   sets differ (or whose matched cases disagree on domain, dataset or gold answer) are refused.
//!   Every replicate draws one multiset of case ids and scores *both* runs on it, so the spread
//!   of B − A reflects how the difference depends on which cases were drawn, not the two runs'
//!   separate sampling noise.
//! * **Resampling test cases, within each dataset**: a replicate draws, for every
//!   `(data_source, dataset)`, as many cases as the dataset has, uniformly with replacement from
//!   its cases (a stratified bootstrap). The test split's composition is kept, so every domain is
//!   present in every replicate and the per-domain and overall values (unweighted means over
//!   datasets and domains) are always defined. A replicate that draws no case of some class
//!   averages over the classes it drew (the metrics' own convention), so with a handful of
//!   cases per dataset the intervals are wide and lumpy: they say how little such a split shows.
//! * **Metrics**: each replicate's values come from [`MetricsAccumulator`] on the traces'
//!   extracted `predicted` / `gold` sets and `iou` ([`MetricsAccumulator::push_conditions`]), the
//!   same code as `metrics.json`: macro-F1 ([`MetricValues::f1`]), balanced accuracy
//!   ([`MetricValues::accuracy`]) and mean IoU ([`Summary::mean_iou`]), per data source and overall
//!   (`val`, the mean over data sources).
//! * **Interval**: the percentile method: the 2.5th and 97.5th percentiles of the replicates'
//!   B − A (for a 95 % level), each by linear interpolation between the order statistics at rank
//!   `(R − 1) · q` (numpy's default `percentile`). The point estimate is B − A on the cases as
//!   they are.
//! * **Seeded**: replicate `r` draws from ChaCha8 seeded with `seed`, stream `r`, so the result
//!   depends on `(seed, replicates)` only, not on the number of threads.
//!
//! [`MetricValues::f1`]: crate::metrics::MetricValues::f1
//! [`MetricValues::accuracy`]: crate::metrics::MetricValues::accuracy
//! [`Summary::mean_iou`]: crate::metrics::Summary::mean_iou

use crate::Extraction;
use crate::error::{Error, Result};
use crate::metrics::{MetricsAccumulator, MetricsReport};
use crate::run::Trace;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// The compared metrics: (key suffix in `metrics.json`, name in statements).
pub const METRICS: [(&str, &str); 3] = [
    ("f1", "macro-F1"),
    ("accuracy", "balanced accuracy"),
    ("mean_iou", "IoU"),
];

/// The level name of the overall values (as in `metrics.json`'s `val/*` keys).
pub const OVERALL: &str = "val";

/// Settings of [`paired_bootstrap`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootstrapOptions {
    /// Bootstrap replicates (at least 1).
    pub replicates: usize,
    /// Seed of the resampling.
    pub seed: u64,
    /// Coverage of the interval, e.g. 0.95.
    pub level: f64,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self {
            replicates: 1000,
            seed: 0,
            level: 0.95,
        }
    }
}

/// One interval: B − A of one metric at one level (a data source or [`OVERALL`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DiffInterval {
    /// The data source, or [`OVERALL`].
    pub level: String,
    /// The metric key suffix ([`METRICS`]).
    pub metric: &'static str,
    /// Run A's value on the cases as they are.
    pub a: f64,
    /// Run B's value on the cases as they are.
    pub b: f64,
    /// Lower end of the interval of B − A.
    pub lo: f64,
    /// Upper end of the interval of B − A.
    pub hi: f64,
    /// Replicates in which both runs had the metric (IoU is undefined in a replicate that drew
    /// no case with a mask or box).
    pub replicates: usize,
}

impl DiffInterval {
    /// B − A on the cases as they are.
    pub fn diff(&self) -> f64 {
        self.b - self.a
    }

    /// Whether the interval excludes 0 (the difference is "significant" at the level).
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }

    /// `B - A macro-F1 +3.1 [-1.2, +7.5]` in percentage points.
    pub fn statement(&self) -> String {
        let name = METRICS
            .iter()
            .find(|(k, _)| *k == self.metric)
            .map_or(self.metric, |(_, n)| n);
        format!(
            "B - A {name} {:+.1} [{:+.1}, {:+.1}]",
            100.0 * self.diff(),
            100.0 * self.lo,
            100.0 * self.hi
        )
    }
}

/// The paired bootstrap of two runs: every interval, keyed by `(level, metric)`.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedBootstrap {
    /// The settings used.
    pub options: BootstrapOptions,
    /// Matched cases.
    pub cases: usize,
    /// Intervals by `(level, metric)`; only where both runs have the metric.
    pub intervals: BTreeMap<(String, &'static str), DiffInterval>,
}

impl PairedBootstrap {
    /// The interval of a flat `metrics.json` key such as `val/f1` or `ct/mean_iou`.
    pub fn for_key(&self, key: &str) -> Option<&DiffInterval> {
        let (level, metric) = key.rsplit_once('/')?;
        let metric = METRICS.iter().find(|(k, _)| *k == metric)?.0;
        self.intervals.get(&(level.to_string(), metric))
    }
}

/// One case's outcome in one run.
#[derive(Debug, Clone)]
struct Outcome {
    pred: BTreeSet<String>,
    gold: BTreeSet<String>,
    iou: Option<f64>,
}

impl Outcome {
    fn of(t: &Trace) -> Self {
        Self {
            pred: t.predicted.iter().cloned().collect(),
            gold: t.gold.iter().cloned().collect(),
            iou: t.iou,
        }
    }
}

/// A dataset's matched cases.
#[derive(Debug, Clone)]
struct Stratum {
    data_source: String,
    dataset: String,
    a: Vec<Outcome>,
    b: Vec<Outcome>,
}

/// Matches two runs' traces by case id. `a_name` / `b_name` name the runs in errors.
fn pair(a: &[Trace], b: &[Trace], a_name: &str, b_name: &str) -> Result<Vec<Stratum>> {
    let index = |ts: &[Trace], name: &str| -> Result<HashMap<String, usize>> {
        let mut m = HashMap::with_capacity(ts.len());
        for (i, t) in ts.iter().enumerate() {
            if m.insert(t.id.clone(), i).is_some() {
                return Err(Error::Other(format!(
                    "{name}: case id `{}` is traced twice; a paired comparison needs one trace per case",
                    t.id
                )));
            }
        }
        Ok(m)
    };
    let (ia, ib) = (index(a, a_name)?, index(b, b_name)?);
    let only = |x: &HashMap<String, usize>, y: &HashMap<String, usize>| -> Vec<String> {
        let mut v: Vec<String> = x.keys().filter(|k| !y.contains_key(*k)).cloned().collect();
        v.sort();
        v
    };
    let (only_a, only_b) = (only(&ia, &ib), only(&ib, &ia));
    if !only_a.is_empty() || !only_b.is_empty() {
        let show = |v: &[String]| {
            let head: Vec<&str> = v.iter().take(5).map(String::as_str).collect();
            format!(
                "{}{}",
                head.join(", "),
                if v.len() > 5 { ", ..." } else { "" }
            )
        };
        return Err(Error::Other(format!(
            "the runs were not evaluated on the same cases, so they cannot be paired: {} case(s) \
             only in {a_name} ({}), {} only in {b_name} ({}); evaluate both on the same manifest \
             (or compare without intervals: --bootstrap 0)",
            only_a.len(),
            show(&only_a),
            only_b.len(),
            show(&only_b)
        )));
    }
    let mut strata: Vec<Stratum> = Vec::new();
    let mut where_: HashMap<(String, String), usize> = HashMap::new();
    for ta in a {
        let tb = &b[ib[&ta.id]];
        if (&ta.data_source, &ta.dataset, &ta.gold) != (&tb.data_source, &tb.dataset, &tb.gold) {
            return Err(Error::Other(format!(
                "case `{}` differs between the runs: {a_name} has {}/{} gold {:?}, {b_name} has \
                 {}/{} gold {:?}; the runs were evaluated on different manifests",
                ta.id, ta.data_source, ta.dataset, ta.gold, tb.data_source, tb.dataset, tb.gold
            )));
        }
        let key = (ta.data_source.clone(), ta.dataset.clone());
        let i = *where_.entry(key).or_insert_with(|| {
            strata.push(Stratum {
                data_source: ta.data_source.clone(),
                dataset: ta.dataset.clone(),
                a: Vec::new(),
                b: Vec::new(),
            });
            strata.len() - 1
        });
        strata[i].a.push(Outcome::of(ta));
        strata[i].b.push(Outcome::of(tb));
    }
    Ok(strata)
}

/// The compared values of a report by `(level, metric)`.
fn values(r: &MetricsReport) -> BTreeMap<(String, &'static str), f64> {
    let mut out = BTreeMap::new();
    let levels = r
        .sources
        .iter()
        .filter_map(|s| s.summary.map(|x| (s.name.clone(), x)))
        .chain(r.overall.map(|x| (OVERALL.to_string(), x)));
    for (level, s) in levels {
        out.insert((level.clone(), "f1"), s.metrics.f1);
        out.insert((level.clone(), "accuracy"), s.metrics.accuracy);
        if let Some(v) = s.mean_iou {
            out.insert((level, "mean_iou"), v);
        }
    }
    out
}

/// Both runs' values on the cases picked by `pick(stratum index, stratum size)` (the stratum's
/// case indices, in order).
fn score(
    strata: &[Stratum],
    mut pick: impl FnMut(usize) -> Vec<usize>,
) -> [BTreeMap<(String, &'static str), f64>; 2] {
    // The extraction is irrelevant here: the traces' condition sets are already extracted.
    let mut acc = [
        MetricsAccumulator::new(Extraction::Evaluation),
        MetricsAccumulator::new(Extraction::Evaluation),
    ];
    for (si, s) in strata.iter().enumerate() {
        for i in pick(si) {
            for (acc, o) in acc.iter_mut().zip([&s.a[i], &s.b[i]]) {
                acc.push_conditions(&s.data_source, &s.dataset, &o.pred, &o.gold, o.iou);
            }
        }
    }
    [values(&acc[0].finish()), values(&acc[1].finish())]
}

/// The `q` quantile of sorted values by linear interpolation between the order statistics at
/// rank `(n − 1) · q` (numpy's default).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let r = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (r - lo as f64)
}

/// Paired, stratified, seeded bootstrap intervals of B − A for macro-F1, balanced accuracy and
/// IoU per data source and overall (see the module documentation for the method). `a_name` and
/// `b_name` name the runs in errors.
pub fn paired_bootstrap(
    a: &[Trace],
    b: &[Trace],
    a_name: &str,
    b_name: &str,
    opts: &BootstrapOptions,
) -> Result<PairedBootstrap> {
    if opts.replicates == 0 {
        return Err(Error::Other(
            "the bootstrap needs at least one replicate".into(),
        ));
    }
    if !(opts.level > 0.0 && opts.level < 1.0) {
        return Err(Error::Other(format!(
            "interval level {} is not in (0, 1)",
            opts.level
        )));
    }
    if a.is_empty() {
        return Err(Error::Other(format!(
            "{a_name} and {b_name} have no traced cases to compare"
        )));
    }
    let strata = pair(a, b, a_name, b_name)?;
    let [point_a, point_b] = score(&strata, |si| (0..strata[si].a.len()).collect());
    let diffs: Vec<BTreeMap<(String, &'static str), f64>> = (0..opts.replicates)
        .into_par_iter()
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
            rng.set_stream(r as u64);
            let [va, vb] = score(&strata, |si| {
                let n = strata[si].a.len();
                (0..n).map(|_| rng.random_range(0..n)).collect()
            });
            va.into_iter()
                .filter_map(|(k, x)| vb.get(&k).map(|y| (k, y - x)))
                .collect()
        })
        .collect();
    let tail = (1.0 - opts.level) / 2.0;
    let mut intervals = BTreeMap::new();
    for (key, &va) in &point_a {
        let Some(&vb) = point_b.get(key) else {
            continue;
        };
        let mut d: Vec<f64> = diffs.iter().filter_map(|m| m.get(key).copied()).collect();
        d.sort_by(f64::total_cmp);
        intervals.insert(
            key.clone(),
            DiffInterval {
                level: key.0.clone(),
                metric: key.1,
                a: va,
                b: vb,
                lo: percentile(&d, tail),
                hi: percentile(&d, 1.0 - tail),
                replicates: d.len(),
            },
        );
    }
    Ok(PairedBootstrap {
        options: *opts,
        cases: a.len(),
        intervals,
    })
}

/// [`paired_bootstrap`] on two run directories' `traces.jsonl` (named by their paths in errors).
pub fn paired_bootstrap_runs(
    a: &Path,
    b: &Path,
    opts: &BootstrapOptions,
) -> Result<PairedBootstrap> {
    let load = |dir: &Path| -> Result<Vec<Trace>> {
        let p = dir.join("traces.jsonl");
        if !p.is_file() {
            return Err(Error::file(
                &p,
                "no traces (the bootstrap resamples the traced cases; compare without intervals \
                 with --bootstrap 0)",
            ));
        }
        crate::run::read_traces(&p)
    };
    let (ta, tb) = (load(a)?, load(b)?);
    paired_bootstrap(
        &ta,
        &tb,
        &a.display().to_string(),
        &b.display().to_string(),
        opts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoq_core::{FinishReason, RewardScore};

    /// A trace of case `id` in `src/ds` with gold `gold` answered `pred`.
    fn trace(id: usize, src: &str, ds: &str, gold: &str, pred: &str, iou: Option<f64>) -> Trace {
        Trace {
            id: format!("c{id}"),
            line: id as u64 + 1,
            data_source: src.into(),
            dataset: ds.into(),
            problem: String::new(),
            answer: gold.into(),
            response: format!("\\boxed{{{pred}}}"),
            reasoning: String::new(),
            predicted: vec![pred.to_string()],
            gold: vec![gold.to_string()],
            exact_match: pred == gold,
            parse_failure: false,
            boxes: Vec::new(),
            reward: RewardScore::default(),
            iou,
            tokens: 0,
            finish: FinishReason::Stop,
        }
    }

    /// 40 cases in two domains, classes X / Y alternating. Run A answers X always (the label
    /// prior); run B answers correctly except every 7th case. IoU: A 0.2, B 0.6.
    fn runs() -> (Vec<Trace>, Vec<Trace>) {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..40 {
            let (src, ds) = if i % 2 == 0 {
                ("derm", "d1")
            } else {
                ("ct", "c1")
            };
            let gold = if (i / 2) % 2 == 0 { "X" } else { "Y" };
            a.push(trace(i, src, ds, gold, "X", Some(0.2)));
            let p = if i % 7 == 0 {
                if gold == "X" { "Y" } else { "X" }
            } else {
                gold
            };
            b.push(trace(i, src, ds, gold, p, Some(0.6)));
        }
        (a, b)
    }

    #[test]
    fn a_clear_difference_excludes_zero_and_identical_runs_include_it() {
        let (a, b) = runs();
        let opts = BootstrapOptions {
            replicates: 400,
            ..Default::default()
        };
        let r = paired_bootstrap(&a, &b, "A", "B", &opts).unwrap();
        assert_eq!(r.cases, 40);
        for (level, metric) in [
            ("val", "f1"),
            ("val", "accuracy"),
            ("val", "mean_iou"),
            ("derm", "f1"),
            ("ct", "mean_iou"),
        ] {
            let i = &r.intervals[&(level.to_string(), metric)];
            assert!(i.diff() > 0.0, "{level}/{metric}: {i:?}");
            assert!(i.excludes_zero() && i.lo > 0.0, "{level}/{metric}: {i:?}");
            assert!(
                i.lo <= i.diff() && i.diff() <= i.hi,
                "{level}/{metric}: {i:?}"
            );
            assert_eq!(i.replicates, 400);
        }
        // IoU is constant per run: the interval is the point difference exactly.
        let iou = &r.intervals[&("val".to_string(), "mean_iou")];
        assert!((iou.lo - 0.4).abs() < 1e-12 && (iou.hi - 0.4).abs() < 1e-12);
        // The point values are the metrics of the whole run (metrics.json's).
        let mut acc = MetricsAccumulator::new(Extraction::Evaluation);
        for t in &b {
            acc.push(&crate::Prediction {
                response: t.response.clone(),
                answer: t.answer.clone(),
                data_source: t.data_source.clone(),
                dataset: t.dataset.clone(),
                iou: t.iou,
            });
        }
        let full = acc.finish().overall.unwrap();
        assert_eq!(r.for_key("val/f1").unwrap().b, full.metrics.f1);
        assert_eq!(r.for_key("val/accuracy").unwrap().b, full.metrics.accuracy);

        // Identical runs: every interval is [0, 0], which includes 0.
        let same = paired_bootstrap(&a, &a, "A", "A", &opts).unwrap();
        assert!(!same.intervals.is_empty());
        for i in same.intervals.values() {
            assert_eq!((i.lo, i.hi, i.diff()), (0.0, 0.0, 0.0), "{i:?}");
            assert!(!i.excludes_zero());
        }
    }

    #[test]
    fn a_noisy_small_difference_includes_zero() {
        // B differs from A on two cases of 40 only, one better and one worse.
        let (a, _) = runs();
        let mut b = a.clone();
        assert_eq!((a[2].gold[0].as_str(), a[4].gold[0].as_str()), ("Y", "X"));
        b[2].predicted = vec!["Y".into()]; // A said X: B is right
        b[4].predicted = vec!["Y".into()]; // A said X: B is wrong
        let r = paired_bootstrap(&a, &b, "A", "B", &BootstrapOptions::default()).unwrap();
        let i = r.for_key("val/f1").unwrap();
        assert!(i.lo < 0.0 && i.hi > 0.0, "{i:?}");
    }

    #[test]
    fn resampling_is_deterministic_per_seed() {
        let (a, mut b) = runs();
        // Noise so that the intervals are not degenerate.
        b[3].predicted = vec!["X".into()];
        let opts = |seed| BootstrapOptions {
            replicates: 200,
            seed,
            level: 0.95,
        };
        let r0 = paired_bootstrap(&a, &b, "A", "B", &opts(0)).unwrap();
        let again = paired_bootstrap(&a, &b, "A", "B", &opts(0)).unwrap();
        let r1 = paired_bootstrap(&a, &b, "A", "B", &opts(1)).unwrap();
        assert_eq!(r0, again);
        let ends = |r: &PairedBootstrap| -> Vec<(f64, f64)> {
            r.intervals.values().map(|i| (i.lo, i.hi)).collect()
        };
        assert_ne!(ends(&r0), ends(&r1), "another seed draws other replicates");
    }

    #[test]
    fn different_case_sets_are_refused_naming_the_cases() {
        let (a, b) = runs();
        let e = paired_bootstrap(&a[1..], &b, "runA", "runB", &BootstrapOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not evaluated on the same cases") && e.contains("c0") && e.contains("runB"),
            "{e}"
        );
        let mut c = b.clone();
        c[5].gold = vec!["Z".into()];
        let e = paired_bootstrap(&a, &c, "runA", "runB", &BootstrapOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("case `c5` differs"), "{e}");
        let mut d = a.clone();
        d.push(a[0].clone());
        let e = paired_bootstrap(&d, &b, "runA", "runB", &BootstrapOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("traced twice"), "{e}");
    }

    #[test]
    fn percentile_interpolates_between_order_statistics() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.125), 1.5);
        assert_eq!(percentile(&v, 1.0), 5.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
