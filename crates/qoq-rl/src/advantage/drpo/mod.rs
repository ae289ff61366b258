//! DRPO (domain-aware GRPO): `core_algos.py::compute_drpo_outcome_advantage` (spec §9.6), the
//! paper's variants (§9.7 KL-aware damping, §14, §16.2 switches) and a bounded-cost engine.
//!
//! Per step: GRPO-normalise each question's rollouts, add the questions' reward vectors to their
//! domain's history, cluster each domain's history (k-means, elbow rule), scale each question by
//! `T_d·√N_c·μ_c` with `T_d = max(√N_d·μ_d, ε)`, then divide by the batch std.
//!
//! * [`DrpoConfig::reference`] reproduces the released function (cumulative history, sklearn-exact
//!   k-means on the whole history of every domain in the batch). Domains absent from the batch are
//!   not re-clustered: their result never reaches the output, so skipping them changes nothing.
//! * [`ClusterEngine::Summary`] keeps the same result with per-step cost bounded in the history
//!   size: below `summary_exact_below` rows a domain is clustered exactly as the reference does;
//!   above it, the history is an incrementally updated grid summary (cell counts and exact sums,
//!   at most `summary_max_cells` cells, the grid coarsened by 2 when full) and Lloyd is
//!   warm-started from the previous step's centroids for every k. Inertias differ from the exact
//!   ones by the within-cell scatter (added back), partitions agree whenever no cell straddles a
//!   cluster boundary. Domains are clustered in parallel (rayon).
//! * Both engines fit k = 1, 2, ... only until the elbow condition fires (the reference fits every
//!   k up to k_cap; later fits cannot change the chosen k, and each fit is independent).
//! * Robust by default: no NaN or infinity leaves the estimator; each guard is counted in
//!   [`DrpoMetrics`]. `reference_nan = true` disables every guard, reproducing the reference's NaNs.

use super::{
    AdvantageMetrics, Groups, RolloutReward, StepAdvantages, check_rows, mean_std_unbiased,
};
use crate::error::{Error, Result};
use crate::kmeans::{self, KMeansFit, Points, RandomState};
use qoq_core::sample::DomainKey;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

mod history;
use history::{DomainClusters, DomainHistory};

/// Which questions make up a domain's statistics (`drpo.mode`, spec §16.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum DrpoMode {
    /// The released code: every question seen since the start (N_d cumulative).
    #[default]
    Reference,
    /// The paper's notation: only this step's questions.
    PerStep,
    /// The questions of the last `steps` steps.
    Window {
        /// Number of steps kept (>= 1).
        steps: u64,
    },
}

/// How `μ_d` is formed from the clusters (`drpo.mu_d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MuD {
    /// The released code: `Σ_c (m_c/N_c) / Σ_c (1/N_c)`.
    #[default]
    InvSizeWeighted,
    /// The paper: the plain mean reward of the domain's questions.
    PlainMean,
}

/// Which reading of the elbow rule picks k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElbowRule {
    /// The released `_select_k_elbow` (one lower than the paper's wording).
    #[default]
    Code,
    /// The paper's App. B.1 wording.
    Paper,
}

/// KL-aware damping (paper App. B.2, spec §9.7; off in the release).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlDamping {
    /// Released behaviour (DRPO_NoKL).
    #[default]
    Off,
    /// `z = relu(s·kl)` (paper Eq. 5, [DEV] 6ff95ea).
    Relu,
    /// `z = |s|·kl` (later [DEV] variant).
    Abs,
}

/// Where the damping multiplies the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlPosition {
    /// Paper: before the batch-std division.
    #[default]
    BeforeStd,
    /// Where the commented block sits in the release: after it.
    AfterStd,
}

/// How each domain's history is clustered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterEngine {
    /// sklearn-exact k-means on the whole history each step (cost grows with the history).
    Exact,
    /// Exact below `summary_exact_below` rows, then a bounded grid summary with warm-started
    /// Lloyd (cumulative mode only; windowed modes are bounded already and stay exact).
    #[default]
    Summary,
}

/// DRPO switches (spec §16.2). Defaults are the released code's values with the robust guards
/// and the bounded-cost engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrpoConfig {
    /// Statistics window.
    pub mode: DrpoMode,
    /// Clustering engine.
    pub engine: ClusterEngine,
    /// Which sample field the caller used as the domain string (recorded, not read here).
    pub domain_key: DomainKey,
    /// Largest k tried by the elbow rule (10).
    pub k_max: usize,
    /// Elbow tolerance τ (0.10).
    pub tol: f64,
    /// ε of the GRPO std, `T_d` floor and batch std (1e-6).
    pub eps: f64,
    /// Paper: `T_c = max(√N_c·μ_c, ε)`; release: no floor.
    pub cluster_eps_floor: bool,
    /// `μ_d` definition.
    pub mu_d: MuD,
    /// Elbow reading.
    pub elbow: ElbowRule,
    /// KL-aware damping.
    pub kl_damping: KlDamping,
    /// Quantile of the damping threshold `t_p` (0.75).
    pub kl_q: f64,
    /// Position of the damping.
    pub kl_position: KlPosition,
    /// Sort each question's reward vector before it enters the history (the release keeps
    /// batch order).
    pub sort_rollout_vectors: bool,
    /// Reproduce the reference's NaNs (testing only): disables every guard.
    pub reference_nan: bool,
    /// Summary engine: domains with at most this many rows are clustered exactly.
    pub summary_exact_below: usize,
    /// Summary engine: most grid cells per domain.
    pub summary_max_cells: usize,
}

impl Default for DrpoConfig {
    fn default() -> Self {
        Self {
            mode: DrpoMode::Reference,
            engine: ClusterEngine::Summary,
            domain_key: DomainKey::Dataset,
            k_max: 10,
            tol: 0.10,
            eps: 1e-6,
            cluster_eps_floor: false,
            mu_d: MuD::InvSizeWeighted,
            elbow: ElbowRule::Code,
            kl_damping: KlDamping::Off,
            kl_q: 0.75,
            kl_position: KlPosition::BeforeStd,
            sort_rollout_vectors: false,
            reference_nan: false,
            summary_exact_below: 256,
            summary_max_cells: 512,
        }
    }
}

impl DrpoConfig {
    /// The released function: cumulative history, exact clustering, all paper options off.
    /// Guards stay on (they never fire on inputs where the reference is finite).
    pub fn reference() -> Self {
        Self {
            engine: ClusterEngine::Exact,
            ..Self::default()
        }
    }

    /// The paper's reading: per-step statistics, ε floor on the cluster term, plain-mean μ_d,
    /// the paper's elbow, relu KL damping before the std division, the clinical domain as key.
    pub fn paper() -> Self {
        Self {
            mode: DrpoMode::PerStep,
            domain_key: DomainKey::DataSource,
            cluster_eps_floor: true,
            mu_d: MuD::PlainMean,
            elbow: ElbowRule::Paper,
            kl_damping: KlDamping::Relu,
            ..Self::default()
        }
    }
}

/// Per-domain statistics of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainStepMetrics {
    /// Domain key.
    pub domain: String,
    /// Chosen number of clusters k*.
    pub k: usize,
    /// `N_d`: questions in the domain's statistics window.
    pub n_d: u64,
    /// `μ_d`.
    pub mu_d: f64,
    /// `T_d`.
    pub t_d: f64,
    /// Inertia for k = 1, 2, ... up to the k where the elbow rule fired (k_cap at most).
    pub inertias: Vec<f64>,
}

/// Guard counters and per-domain statistics of one DRPO step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrpoMetrics {
    /// Questions with one rollout (std undefined): scores set to 0.
    pub singleton_groups: u64,
    /// Domains whose `√N_d·μ_d` fell below ε and was floored (the reference does this too).
    pub temperature_floors: u64,
    /// Rollouts whose scale factor was zero or not finite (e.g. a zero-mean cluster): left unscaled.
    pub zero_factor_guards: u64,
    /// Rollouts whose scale factor was negative (negative rewards): its absolute value was used.
    pub negative_factor_guards: u64,
    /// 1 when the batch std was not finite or zero (e.g. one rollout): scores not divided.
    pub batch_std_guards: u64,
    /// Values still not finite at the end, set to 0.
    pub nonfinite_zeroed: u64,
    /// Per-domain statistics, for the domains of this batch.
    pub domains: Vec<DomainStepMetrics>,
}

/// The DRPO estimator: configuration plus the cross-step state that checkpoints save.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Drpo {
    /// Switches.
    pub config: DrpoConfig,
    /// Steps done.
    step: u64,
    /// Per-domain history.
    domains: BTreeMap<String, DomainHistory>,
}

impl Drpo {
    /// A fresh estimator (empty history).
    pub fn new(config: DrpoConfig) -> Self {
        Self {
            config,
            step: 0,
            domains: BTreeMap::new(),
        }
    }

    /// Steps processed so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Questions in a domain's statistics window (None for an unseen domain).
    pub fn domain_questions(&self, domain: &str) -> Option<u64> {
        self.domains.get(domain).map(|h| {
            if h.summary.is_some() {
                h.count
            } else {
                h.n_rows() as u64
            }
        })
    }

    /// Items held in memory for the history (stored question rows, uid lookups, summary cells),
    /// summed over domains: grows with the history for the exact engine, stays bounded for the
    /// summary engine.
    pub fn stored_items(&self) -> usize {
        self.domains
            .values()
            .map(|h| {
                h.q_ids.len() + h.first_row.len() + h.summary.as_ref().map_or(0, |s| s.counts.len())
            })
            .sum()
    }

    /// Rebuilds the lookup tables not stored in checkpoints (call after deserialising).
    pub fn rebuild_indices(&mut self) {
        for h in self.domains.values_mut() {
            h.rebuild_first_row();
            if let Some(s) = &mut h.summary {
                s.rebuild_index(h.n);
            }
        }
    }

    /// Saves the estimator (config and history) as JSON.
    pub fn save(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Restores an estimator saved by [`Drpo::save`].
    pub fn load(s: &str) -> Result<Self> {
        let mut d: Drpo = serde_json::from_str(s)?;
        d.rebuild_indices();
        Ok(d)
    }

    /// Advantages of one step (batch order in and out); updates the history.
    pub fn step(&mut self, rows: &[RolloutReward]) -> Result<StepAdvantages> {
        self.step_inner(rows, true)
            .map(|r| r.expect("advantages computed"))
    }

    /// Adds one step's questions to the history without computing advantages (replaying logged
    /// steps after a restart without a checkpoint; pre-filling a benchmark).
    pub fn record(&mut self, rows: &[RolloutReward]) -> Result<()> {
        self.step_inner(rows, false).map(|_| ())
    }

    fn step_inner(
        &mut self,
        rows: &[RolloutReward],
        compute: bool,
    ) -> Result<Option<StepAdvantages>> {
        let step = self.step;
        check_rows(step, rows)?;
        let cfg = self.config.clone();
        let guard = !cfg.reference_nan;
        let groups = Groups::of(rows);
        let n = groups.members[0].len();
        for (g, m) in groups.members.iter().enumerate() {
            if m.len() != n {
                return Err(Error::GroupSize {
                    step,
                    uid: groups.uids[g].clone(),
                    got: m.len(),
                    expected: n,
                });
            }
        }
        if compute
            && cfg.kl_damping != KlDamping::Off
            && let Some(i) = rows
                .iter()
                .position(|r| r.kl.is_none_or(|k| !k.is_finite()))
        {
            return Err(Error::BadInput {
                step,
                row: i,
                reason: "KL damping needs a finite `kl` per rollout".into(),
            });
        }
        let mut metrics = DrpoMetrics::default();
        // 1-2. raw rewards as float32; question vectors; q2domain = last domain seen.
        let raw: Vec<f64> = rows.iter().map(|r| r.reward as f32 as f64).collect();
        let q_domain: Vec<&str> = groups
            .members
            .iter()
            .map(|m| rows[*m.last().expect("non-empty")].domain.as_str())
            .collect();
        // 3. history update (checked first, so a rejected step leaves the state untouched).
        if cfg.mode != DrpoMode::PerStep {
            for d in &q_domain {
                if let Some(h) = self.domains.get(*d)
                    && h.n != n
                {
                    return Err(Error::HistoryWidth {
                        step,
                        domain: d.to_string(),
                        got: n,
                        expected: h.n,
                    });
                }
            }
        }
        if let DrpoMode::PerStep = cfg.mode {
            self.domains.clear();
        }
        for (g, m) in groups.members.iter().enumerate() {
            let mut v: Vec<f32> = m.iter().map(|&i| raw[i] as f32).collect();
            if cfg.sort_rollout_vectors {
                v.sort_by(|a, b| a.total_cmp(b));
            }
            let h = self.domains.entry(q_domain[g].to_string()).or_default();
            if h.n == 0 {
                h.n = n;
            } else if h.n != n {
                return Err(Error::HistoryWidth {
                    step,
                    domain: q_domain[g].to_string(),
                    got: n,
                    expected: h.n,
                });
            }
            h.push(&groups.uids[g], &v, step, &cfg);
        }
        if let DrpoMode::Window { steps } = cfg.mode {
            let first = (step + 1).saturating_sub(steps.max(1));
            for h in self.domains.values_mut() {
                h.trim_before(first);
            }
            self.domains.retain(|_, h| h.n_rows() > 0);
        }
        if !compute {
            self.step += 1;
            return Ok(None);
        }
        // 4. GRPO normalisation.
        let mut s = vec![0.0; rows.len()];
        for m in &groups.members {
            let r: Vec<f64> = m.iter().map(|&i| raw[i]).collect();
            if r.len() < 2 && guard {
                metrics.singleton_groups += 1;
                continue;
            }
            let (mean, std) = mean_std_unbiased(&r);
            for &i in m {
                s[i] = (raw[i] - mean) / (std + cfg.eps);
            }
        }
        // 5. cluster the domains of this batch.
        let use_summary = cfg.engine == ClusterEngine::Summary && cfg.mode == DrpoMode::Reference;
        let mut present: Vec<&str> = q_domain.clone();
        present.sort_unstable();
        present.dedup();
        let mut work: Vec<(&String, &mut DomainHistory)> = self
            .domains
            .iter_mut()
            .filter(|(d, _)| present.binary_search(&d.as_str()).is_ok())
            .collect();
        let clusters: Vec<(String, DomainClusters)> = work
            .par_iter_mut()
            .map(|(d, h)| {
                let c = if use_summary {
                    h.maybe_summarise(&cfg);
                    if h.summary.is_some() {
                        h.cluster_summary(&cfg)
                    } else {
                        h.cluster_exact(&cfg, true)
                    }
                } else {
                    h.cluster_exact(&cfg, false)
                };
                ((*d).clone(), c)
            })
            .collect();
        drop(work);
        let clusters: HashMap<String, DomainClusters> = clusters.into_iter().collect();
        // μ_d and T_d per domain.
        let mut temps: HashMap<&str, f64> = HashMap::new();
        for d in &present {
            let c = &clusters[*d];
            let mu_d = match cfg.mu_d {
                MuD::InvSizeWeighted => {
                    let num: f64 = c.means.iter().zip(&c.sizes).map(|(m, s)| m / s).sum();
                    let den: f64 = c.sizes.iter().map(|s| 1.0 / s).sum();
                    num / den
                }
                MuD::PlainMean => {
                    let num: f64 = c.means.iter().zip(&c.sizes).map(|(m, s)| m * s).sum();
                    num / c.sizes.iter().sum::<f64>()
                }
            };
            let raw_t = (c.n_d as f64).sqrt() * mu_d;
            let t_d = raw_t.max(cfg.eps);
            if raw_t.is_nan() || raw_t < cfg.eps {
                metrics.temperature_floors += 1;
            }
            temps.insert(d, t_d);
            metrics.domains.push(DomainStepMetrics {
                domain: d.to_string(),
                k: c.k,
                n_d: c.n_d,
                mu_d,
                t_d,
                inertias: c.inertias.clone(),
            });
        }
        // 6. scaling.
        for (g, m) in groups.members.iter().enumerate() {
            let d = q_domain[g];
            let c = &clusters[d];
            let h = &self.domains[d];
            let label = if c.labels.is_empty() {
                let v: Vec<f64> = m.iter().map(|&i| raw[i]).collect();
                let mut v = v;
                if cfg.sort_rollout_vectors {
                    v.sort_by(|a, b| a.total_cmp(b));
                }
                nearest(&v, &c.centers, n)
            } else {
                c.labels[h.first_row[&groups.uids[g]]]
            };
            let (n_c, mu_c) = (c.sizes[label], c.means[label]);
            let t_c = if cfg.cluster_eps_floor {
                (n_c.sqrt() * mu_c).max(cfg.eps)
            } else {
                n_c.sqrt() * mu_c
            };
            let mut f = temps[d] * t_c;
            if guard {
                if !f.is_finite() || f == 0.0 {
                    metrics.zero_factor_guards += m.len() as u64;
                    f = 1.0;
                } else if f < 0.0 {
                    metrics.negative_factor_guards += m.len() as u64;
                    f = -f;
                }
            }
            for &i in m {
                s[i] /= f;
            }
        }
        // 7-8. damping and batch-std normalisation.
        if cfg.kl_position == KlPosition::BeforeStd {
            damp(&cfg, rows, &mut s);
        }
        let (_, sigma) = mean_std_unbiased(&s);
        let mut adv: Vec<f64> = if guard && (!sigma.is_finite() || sigma == 0.0) {
            metrics.batch_std_guards += 1;
            s
        } else {
            s.iter().map(|v| v / (sigma + cfg.eps)).collect()
        };
        if cfg.kl_position == KlPosition::AfterStd {
            damp(&cfg, rows, &mut adv);
        }
        if guard {
            for a in adv.iter_mut() {
                if !a.is_finite() {
                    *a = 0.0;
                    metrics.nonfinite_zeroed += 1;
                }
            }
        }
        self.step += 1;
        Ok(Some(StepAdvantages {
            advantages: adv,
            metrics: AdvantageMetrics {
                singleton_groups: metrics.singleton_groups,
                drpo: Some(metrics),
            },
        }))
    }
}

/// Whether the elbow condition holds at the last drop of `inertias`: both elbow readings then
/// pick a k <= inertias.len(), so fits for larger k cannot change the choice and are skipped
/// (the reference fits every k up to k_cap; the chosen k and its fit are identical).
fn elbow_fired(inertias: &[f64], tol: f64) -> bool {
    let m = inertias.len();
    m >= 3 && {
        let last = inertias[m - 2] - inertias[m - 1];
        let prev = inertias[m - 3] - inertias[m - 2];
        last < tol * prev
    }
}

fn set_warm(warm: &mut Vec<Vec<f64>>, i: usize, centers: &[f64]) {
    if warm.len() <= i {
        warm.resize(i + 1, Vec::new());
    }
    warm[i] = centers.to_vec();
}

fn nearest(v: &[f64], centers: &[f64], n: usize) -> usize {
    let mut best = (f64::INFINITY, 0);
    for (j, c) in centers.chunks_exact(n).enumerate() {
        let d: f64 = v.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum();
        if d < best.0 {
            best = (d, j);
        }
    }
    best.1
}

/// KL-aware damping: `m = t/(z + t)` with `z = relu(s·kl)` or `|s|·kl` and `t` the `kl_q`
/// quantile of z (linear interpolation, floored at ε; ε when all z are ~0).
fn damp(cfg: &DrpoConfig, rows: &[RolloutReward], s: &mut [f64]) {
    if cfg.kl_damping == KlDamping::Off {
        return;
    }
    let z: Vec<f64> = s
        .iter()
        .zip(rows)
        .map(|(v, r)| {
            let kl = r.kl.unwrap_or(0.0);
            match cfg.kl_damping {
                KlDamping::Relu => (v * kl).max(0.0),
                _ => v.abs() * kl,
            }
        })
        .collect();
    let all_zero = z.iter().all(|v| v.abs() <= 1e-8);
    let t = if all_zero {
        cfg.eps
    } else {
        quantile(&z, cfg.kl_q).max(cfg.eps)
    };
    for (v, zi) in s.iter_mut().zip(&z) {
        *v *= t / (zi + t);
    }
}

/// `torch.quantile(x, q)` with linear interpolation.
fn quantile(x: &[f64], q: f64) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_linearly() {
        assert!((quantile(&[0.0, 1.0, 2.0, 3.0], 0.75) - 2.25).abs() < 1e-12);
    }
}
