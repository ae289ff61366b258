//! The Markdown table of a [`MetricsReport`]: one row per dataset, a mean row per data source (in
//! the paper's domain order) and an overall row, with the columns of the paper's appendix tables (Acc, Sens, Spec, F1, Prec;
//! spec §13.6) followed by exact match, mean IoU and counts; and [`paper_table`], the paper's
//! Table 2 layout comparing several models.

use crate::metrics::{MetricsReport, Summary};
use qoq_core::Domain;
use std::fmt::Write;

/// Escape a name for a Markdown table cell.
fn cell(name: &str) -> String {
    name.replace('|', "\\|")
}

fn row(out: &mut String, domain: &str, dataset: &str, classes: &str, s: &Summary) {
    let m = &s.metrics;
    let iou = s.mean_iou.map_or("-".to_string(), |v| format!("{v:.4}"));
    let _ = writeln!(
        out,
        "| {domain} | {dataset} | {} | {classes} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {iou} | {} |",
        s.count,
        m.accuracy,
        m.sensitivity,
        m.specificity,
        m.f1,
        m.precision,
        s.exact_match,
        s.iou_count,
    );
}

impl MetricsReport {
    /// The report as a GitHub-flavoured Markdown table, 4 decimals, `-` where a mean IoU is not
    /// defined. Domain mean rows say `(mean)` in the dataset column; then comes `val` (all domains)
    /// and, when ECG or fusion domains are present beside vision ones, the paper's vision-only
    /// Overall.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "| Domain | Dataset | N | Classes | Acc | Sens | Spec | F1 | Prec | Exact | mIoU | N(IoU) |\n",
        );
        out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        // Domains in the paper's order (ECG, CXR, Mammo, Derm, CT, Fundus, US, MRI, Path), others
        // after them by name.
        let mut sources: Vec<_> = self.sources.iter().collect();
        sources.sort_by_key(|s| (Domain::from_source(&s.name).paper_rank(), s.name.clone()));
        for src in sources {
            let domain = cell(&src.name);
            for ds in &src.datasets {
                row(
                    &mut out,
                    &domain,
                    &cell(&ds.name),
                    &ds.active_classes.to_string(),
                    &ds.summary,
                );
            }
            if let Some(s) = &src.summary {
                row(&mut out, &format!("**{domain}**"), "(mean)", "", s);
            }
        }
        if let Some(s) = &self.overall {
            row(&mut out, "**val**", "(mean of domains)", "", s);
        }
        // The paper's Overall leaves out ECG and fusion tasks; show it when that differs.
        let n_vision = self
            .sources
            .iter()
            .filter(|s| s.summary.is_some() && Domain::from_source(&s.name).is_vision())
            .count();
        let n_all = self.sources.iter().filter(|s| s.summary.is_some()).count();
        if n_vision > 0
            && n_vision < n_all
            && let Some(s) = self.overall_vision()
        {
            row(
                &mut out,
                "**Overall (vision)**",
                "(mean of vision domains)",
                "",
                &s,
            );
        }
        out
    }
}

/// Percent with one decimal, `-` when absent.
fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{:.1}", 100.0 * x))
}

/// The paper's Table 2 layout (spec §13.6): one row per domain in the paper's order with its
/// training rows, then a mean row over the `rare` domains, the overall mean of the vision domains
/// (ECG excluded) and the overall mean of all domains (unweighted means of the per-domain
/// summaries, like the paper's overall rows); per model (`(label, report)`, in column order)
/// accuracy, macro-F1 and mean IoU in percent. In each row the highest macro-F1 is bold (every
/// model that reaches it, as printed; none when fewer than two models have a value or all of them
/// print the same). `train_rows` is keyed by the domain's source name.
pub fn paper_table(
    models: &[(&str, &MetricsReport)],
    train_rows: &std::collections::BTreeMap<String, usize>,
    rare: &[Domain],
) -> String {
    let mut s = String::from("| domain | train rows |");
    let mut sep = String::from("|---|---:|");
    for (label, _) in models {
        let label = cell(label);
        let _ = write!(s, " {label} acc | {label} F1 | {label} IoU |");
        sep.push_str("---:|---:|---:|");
    }
    s.push('\n');
    s.push_str(&sep);
    s.push('\n');
    let mut row = |name: &str, rows: usize, get: &dyn Fn(&MetricsReport) -> Option<Summary>| {
        let _ = write!(s, "| {name} | {rows} |");
        let values: Vec<Option<Summary>> = models.iter().map(|(_, r)| get(r)).collect();
        // Compared as printed, so that two models shown as 16.7 are both best or neither.
        let f1s: Vec<String> = values
            .iter()
            .map(|v| pct(v.map(|x| x.metrics.f1)))
            .collect();
        let best = values
            .iter()
            .filter_map(|v| v.map(|x| x.metrics.f1))
            .reduce(f64::max)
            .map(|b| pct(Some(b)));
        // Bold only where models disagree: among the models with a value, not all print alike.
        let present: Vec<&String> = f1s.iter().filter(|f| f.as_str() != "-").collect();
        let all_same = present.len() < 2 || present.iter().all(|f| *f == present[0]);
        for (v, f1) in values.iter().zip(&f1s) {
            let f1 = if !all_same && Some(f1) == best.as_ref() {
                format!("**{f1}**")
            } else {
                f1.clone()
            };
            let _ = write!(
                s,
                " {} | {f1} | {} |",
                pct(v.map(|x| x.metrics.accuracy)),
                pct(v.and_then(|x| x.mean_iou)),
            );
        }
        s.push('\n');
    };
    let rows_of = |d: &Domain| train_rows.get(d.as_source()).copied().unwrap_or(0);
    for d in Domain::PAPER_ORDER {
        row(d.as_source(), rows_of(&d), &|r| {
            r.sources
                .iter()
                .find(|x| x.name == d.as_source())
                .and_then(|x| x.summary)
        });
    }
    if !rare.is_empty() {
        let names: Vec<&str> = rare.iter().map(Domain::as_source).collect();
        row(
            &format!("**rare ({})**", names.join(", ")),
            rare.iter().map(rows_of).sum(),
            &|r| r.overall_where(|x| rare.iter().any(|d| d.as_source() == x)),
        );
    }
    let total: usize = train_rows.values().sum();
    let ecg = train_rows
        .get(Domain::Ecg.as_source())
        .copied()
        .unwrap_or(0);
    let vision = Domain::PAPER_ORDER.len() - 1;
    row(
        &format!("**overall, {vision} vision domains**"),
        total - ecg,
        &MetricsReport::overall_vision,
    );
    row(
        &format!("**overall, {} domains**", Domain::PAPER_ORDER.len()),
        total,
        &|r| r.overall,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Extraction;
    use crate::metrics::{Prediction, compute_metrics};
    use std::collections::BTreeMap;

    fn pred(source: &str, answer: &str, response: &str, iou: Option<f64>) -> Prediction {
        Prediction {
            response: format!("<think></think>\\boxed{{{response}}}"),
            answer: answer.into(),
            data_source: source.into(),
            dataset: format!("{source}-set"),
            iou,
        }
    }

    #[test]
    fn paper_table_rows_columns_and_means() {
        // Model A: ECG all right, derm half right (IoU 0.5), mri wrong. Model B: all wrong.
        let a = compute_metrics(
            &[
                pred("ecg", "AF", "AF", None),
                pred("ecg", "Normal", "Normal", None),
                pred("derm", "benign", "benign", Some(0.5)),
                pred("derm", "malignant", "benign", Some(0.5)),
                pred("mri", "tumor", "normal", None),
            ],
            Extraction::Evaluation,
        );
        let b = compute_metrics(
            &[
                pred("ecg", "AF", "Normal", None),
                pred("derm", "benign", "malignant", None),
            ],
            Extraction::Evaluation,
        );
        let rows: BTreeMap<String, usize> = [("ecg", 100), ("derm", 10), ("mri", 1)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let t = paper_table(&[("A", &a), ("B|x", &b)], &rows, &[Domain::Mri]);
        let lines: Vec<&str> = t.lines().collect();
        // Header, separator, nine domains, rare, two overall rows.
        assert_eq!(lines.len(), 2 + 9 + 3, "{t}");
        assert!(lines[0].contains(" A acc | A F1 | A IoU |"), "{}", lines[0]);
        assert!(
            lines[0].contains(" B\\|x acc |"),
            "names are escaped: {}",
            lines[0]
        );
        assert_eq!(
            lines[2],
            "| ecg | 100 | 100.0 | **100.0** | - | 0.0 | 0.0 | - |"
        );
        let derm = lines.iter().find(|l| l.starts_with("| derm |")).unwrap();
        assert!(derm.starts_with("| derm | 10 | 50.0 |"), "{derm}");
        assert!(
            derm.contains("| 50.0 | 0.0 |"),
            "IoU of A, accuracy of B: {derm}"
        );
        let fundus = lines.iter().find(|l| l.starts_with("| fundus |")).unwrap();
        assert_eq!(*fundus, "| fundus | 0 | - | - | - | - | - | - |");
        // Best F1 in bold: A's derm F1 beats B's; the rare row (both 0.0) marks nobody.
        assert!(derm.contains(" | **"), "{derm}");
        assert!(!lines[11].contains("**0.0**"), "{}", lines[11]);
        assert!(
            lines[11].starts_with("| **rare (mri)** | 1 | 0.0 |"),
            "{}",
            lines[11]
        );
        assert!(
            lines[12].starts_with("| **overall, 8 vision domains** | 11 | 25.0 |"),
            "{}",
            lines[12]
        );
        assert!(
            lines[13].starts_with("| **overall, 9 domains** | 111 |"),
            "{}",
            lines[13]
        );
    }
}
