//! Per-domain history of question reward vectors and its clustering (exact, or via a bounded grid summary).

use super::*;

/// The grid summary of a large domain history: cells with counts and exact coordinate sums.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Summary {
    /// Cell width.
    pub(super) h: f64,
    /// Count of each cell.
    pub(super) counts: Vec<f64>,
    /// Coordinate sums of each cell (`cells × n`).
    pub(super) sums: Vec<f64>,
    /// Cell keys (`cells × n`), parallel to `counts`.
    pub(super) keys: Vec<i64>,
    #[serde(skip)]
    pub(super) index: HashMap<Vec<i64>, usize>,
}

impl Summary {
    pub(super) fn key(&self, v: &[f64]) -> Vec<i64> {
        v.iter().map(|x| (x / self.h).floor() as i64).collect()
    }

    pub(super) fn rebuild_index(&mut self, n: usize) {
        self.index = self
            .keys
            .chunks_exact(n)
            .enumerate()
            .map(|(i, k)| (k.to_vec(), i))
            .collect();
    }

    /// The index of the cell with `key`, created empty when new.
    fn cell(&mut self, key: Vec<i64>, n: usize) -> usize {
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        self.counts.push(0.0);
        self.sums.extend(std::iter::repeat_n(0.0, n));
        self.keys.extend_from_slice(&key);
        self.index.insert(key, self.counts.len() - 1);
        self.counts.len() - 1
    }

    pub(super) fn add(&mut self, v: &[f64], count: f64, max_cells: usize) {
        let n = v.len();
        let idx = self.cell(self.key(v), n);
        self.counts[idx] += count;
        for (s, x) in self.sums[idx * n..(idx + 1) * n].iter_mut().zip(v) {
            *s += x * count;
        }
        while self.counts.len() > max_cells {
            self.coarsen(n);
        }
    }

    /// Doubles the cell width and merges cells by their means (counts and sums stay exact).
    pub(super) fn coarsen(&mut self, n: usize) {
        let old_counts = std::mem::take(&mut self.counts);
        let old_sums = std::mem::take(&mut self.sums);
        self.keys.clear();
        self.index.clear();
        self.h *= 2.0;
        for (c, s) in old_counts.iter().zip(old_sums.chunks_exact(n)) {
            let mean: Vec<f64> = s.iter().map(|v| v / c).collect();
            let idx = self.cell(self.key(&mean), n);
            self.counts[idx] += c;
            for (a, b) in self.sums[idx * n..(idx + 1) * n].iter_mut().zip(s) {
                *a += b;
            }
        }
    }
}

/// One domain's history (`domain_qstats[d]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct DomainHistory {
    /// Rollouts per question (vector length).
    pub(super) n: usize,
    /// Question reward vectors, `rows × n`, stored as f32 values (`np.float32`).
    pub(super) rows: Vec<f32>,
    /// uid of each row.
    pub(super) q_ids: Vec<String>,
    /// Step of each row (for windowed modes).
    pub(super) row_step: Vec<u64>,
    /// Questions ever added (the reference's `count`).
    pub(super) count: u64,
    /// Summary engine: the grid summary once the history outgrew `summary_exact_below`.
    pub(super) summary: Option<Summary>,
    /// Summary engine: `Σx` and `Σx²` per coordinate over the whole history.
    pub(super) sum: Vec<f64>,
    pub(super) sumsq: Vec<f64>,
    /// Summary engine: up to `k_max` distinct rows seen (for `k_cap`).
    pub(super) distinct: Vec<Vec<f32>>,
    /// Summary engine: last centroids for each k (index k−1), for warm starts.
    pub(super) warm: Vec<Vec<f64>>,
    /// First row of each uid in `rows` (`q_ids.index(q)`).
    #[serde(skip)]
    pub(super) first_row: HashMap<String, usize>,
}

/// Clustering result of one domain for this step.
#[derive(Debug, Clone)]
pub(super) struct DomainClusters {
    pub(super) k: usize,
    pub(super) inertias: Vec<f64>,
    pub(super) centers: Vec<f64>,
    /// `N_c` per cluster.
    pub(super) sizes: Vec<f64>,
    /// `m_c` per cluster.
    pub(super) means: Vec<f64>,
    /// Row labels (exact path; empty for the summary path).
    pub(super) labels: Vec<usize>,
    pub(super) n_d: u64,
}

impl DomainHistory {
    pub(super) fn rebuild_first_row(&mut self) {
        self.first_row.clear();
        for (i, q) in self.q_ids.iter().enumerate() {
            self.first_row.entry(q.clone()).or_insert(i);
        }
    }

    pub(super) fn n_rows(&self) -> usize {
        self.q_ids.len()
    }

    pub(super) fn rows_f64(&self) -> Vec<f64> {
        self.rows.iter().map(|&v| v as f64).collect()
    }

    pub(super) fn trim_before(&mut self, first_step: u64) {
        let drop = self
            .row_step
            .iter()
            .take_while(|&&s| s < first_step)
            .count();
        if drop > 0 {
            self.rows.drain(..drop * self.n);
            self.q_ids.drain(..drop);
            self.row_step.drain(..drop);
            self.rebuild_first_row();
        }
    }

    pub(super) fn push(&mut self, uid: &str, v: &[f32], step: u64, cfg: &DrpoConfig) {
        self.count += 1;
        let vf: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        if self.sum.is_empty() {
            self.sum = vec![0.0; self.n];
            self.sumsq = vec![0.0; self.n];
        }
        for j in 0..self.n {
            self.sum[j] += vf[j];
            self.sumsq[j] += vf[j] * vf[j];
        }
        if self.distinct.len() < cfg.k_max && !self.distinct.iter().any(|d| d == v) {
            self.distinct.push(v.to_vec());
        }
        if let Some(s) = &mut self.summary {
            s.add(&vf, 1.0, cfg.summary_max_cells);
        } else {
            let idx = self.q_ids.len();
            self.first_row.entry(uid.to_string()).or_insert(idx);
            self.rows.extend_from_slice(v);
            self.q_ids.push(uid.to_string());
            self.row_step.push(step);
        }
    }

    /// Switches to the summary once the exact history is too large (summary engine, cumulative).
    pub(super) fn maybe_summarise(&mut self, cfg: &DrpoConfig) {
        if self.summary.is_some() || self.n_rows() <= cfg.summary_exact_below {
            return;
        }
        let mut s = Summary {
            h: 1.0 / 1024.0,
            ..Summary::default()
        };
        let x = self.rows_f64();
        for r in x.chunks_exact(self.n) {
            s.add(r, 1.0, cfg.summary_max_cells);
        }
        self.summary = Some(s);
        self.rows = Vec::new();
        self.q_ids = Vec::new();
        self.row_step = Vec::new();
        self.first_row = HashMap::new();
    }

    pub(super) fn pick_k(cfg: &DrpoConfig, inertias: &[f64]) -> usize {
        match cfg.elbow {
            ElbowRule::Code => kmeans::elbow_code(inertias, cfg.tol),
            ElbowRule::Paper => kmeans::elbow_paper(inertias, cfg.tol),
        }
    }

    /// `_cluster_info_question` on the exact rows.
    pub(super) fn cluster_exact(&mut self, cfg: &DrpoConfig, keep_warm: bool) -> DomainClusters {
        let x = self.rows_f64();
        let p = Points {
            x: &x,
            d: self.n,
            w: None,
        };
        let k_cap = cfg
            .k_max
            .min(kmeans::count_unique_rows(&p, cfg.k_max))
            .max(1);
        let mut fits: Vec<KMeansFit> = Vec::with_capacity(k_cap);
        let mut inertias = Vec::with_capacity(k_cap);
        for k in 1..=k_cap {
            let f = kmeans::kmeans(&p, k, 0);
            inertias.push(f.inertia);
            fits.push(f);
            if elbow_fired(&inertias, cfg.tol) {
                break;
            }
        }
        let k = Self::pick_k(cfg, &inertias);
        if keep_warm {
            for (i, f) in fits.iter().enumerate() {
                set_warm(&mut self.warm, i, &f.centers);
            }
        }
        let fit = &fits[k - 1];
        let mut sizes = vec![0.0; k];
        for &l in &fit.labels {
            sizes[l] += 1.0;
        }
        let means = fit
            .centers
            .chunks_exact(self.n)
            .map(|c| c.iter().map(|&v| v as f32 as f64).sum::<f64>() / self.n as f64)
            .collect();
        DomainClusters {
            k,
            inertias,
            centers: fit.centers.clone(),
            sizes,
            means,
            labels: fit.labels.clone(),
            n_d: self.n_rows() as u64,
        }
    }

    /// Warm-started weighted clustering of the summary.
    pub(super) fn cluster_summary(&mut self, cfg: &DrpoConfig) -> DomainClusters {
        let s = self.summary.as_ref().expect("summary present");
        let n = self.n;
        let means: Vec<f64> = s
            .sums
            .chunks_exact(n)
            .zip(&s.counts)
            .flat_map(|(r, c)| r.iter().map(move |v| v / c))
            .collect();
        let p = Points {
            x: &means,
            d: n,
            w: Some(&s.counts),
        };
        let total = self.count as f64;
        // Within-cell scatter: total scatter minus the scatter of the cell means.
        let total_scatter: f64 = (0..n)
            .map(|j| self.sumsq[j] - self.sum[j] * self.sum[j] / total)
            .sum();
        let mean_all: Vec<f64> = self.sum.iter().map(|v| v / total).collect();
        let between: f64 = means
            .chunks_exact(n)
            .zip(&s.counts)
            .map(|(r, c)| {
                c * r
                    .iter()
                    .zip(&mean_all)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
            })
            .sum();
        let within = (total_scatter - between).max(0.0);
        let tol_abs = total_scatter / total / n as f64 * 1e-4;
        let n_cells = s.counts.len();
        let k_cap = cfg.k_max.min(self.distinct.len()).min(n_cells).max(1);
        let mut fits = Vec::with_capacity(k_cap);
        let mut inertias = Vec::with_capacity(k_cap);
        for k in 1..=k_cap {
            let init = match self.warm.get(k - 1) {
                Some(c) if c.len() == k * n => c.clone(),
                _ => {
                    let mut rs = RandomState::new(0);
                    kmeans::kmeans_plusplus(&p, k, &mut rs)
                }
            };
            let f = kmeans::lloyd(&p, &init, 300, tol_abs);
            inertias.push(f.inertia + within);
            fits.push(f);
            if elbow_fired(&inertias, cfg.tol) {
                break;
            }
        }
        let k = Self::pick_k(cfg, &inertias);
        for (i, f) in fits.iter().enumerate() {
            set_warm(&mut self.warm, i, &f.centers);
        }
        let fit = &fits[k - 1];
        let mut sizes = vec![0.0; k];
        for (l, c) in fit.labels.iter().zip(&s.counts) {
            sizes[*l] += c;
        }
        let cmeans = fit
            .centers
            .chunks_exact(n)
            .map(|c| c.iter().sum::<f64>() / n as f64)
            .collect();
        DomainClusters {
            k,
            inertias,
            centers: fit.centers.clone(),
            sizes,
            means: cmeans,
            labels: Vec::new(),
            n_d: self.count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_coarsening_keeps_counts_and_sums() {
        let mut s = Summary {
            h: 1.0 / 1024.0,
            ..Summary::default()
        };
        for i in 0..100 {
            s.add(&[i as f64 / 100.0, 0.5], 1.0, 8);
        }
        assert!(s.counts.len() <= 8);
        assert_eq!(s.counts.iter().sum::<f64>(), 100.0);
        let sx: f64 = s.sums.chunks_exact(2).map(|r| r[0]).sum();
        assert!((sx - 49.5).abs() < 1e-9);
    }
}
