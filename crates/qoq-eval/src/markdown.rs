//! The Markdown table of a [`MetricsReport`]: one row per dataset, a mean row per data source (in
//! the paper's domain order) and an overall row, with the columns of the paper's appendix tables (Acc, Sens, Spec, F1, Prec;
//! spec §13.6) followed by exact match, mean IoU and counts.

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
