//! numpy's legacy `RandomState` (MT19937) and scikit-learn's `KMeans` as the released DRPO calls
//! it: `KMeans(n_clusters=k, n_init="auto", random_state=0).fit(X)` (spec §9.6, §16.3).
//!
//! Reproduced from sklearn 1.7 `cluster/_kmeans.py::_kmeans_plusplus` and
//! `_kmeans_single_lloyd` (greedy k-means++ with `2 + floor(ln k)` local trials, the first centre
//! drawn by `random_state.choice(n, p=w/sum(w))`, candidates by
//! `searchsorted(cumsum(w·d²), uniform()·pot)`, Lloyd iterations with strict or
//! `tol·mean(var(X))` convergence, empty-cluster relocation, a final E-step), and the elbow rule
//! `core_algos.py::_select_k_elbow`. Arithmetic is f64 on f32-valued data; sklearn computes in
//! f32 with f64 distance upcasts, so results agree except at exact floating-point ties.

/// numpy's legacy `np.random.RandomState(seed)` for an integer seed: MT19937 with
/// `init_genrand`, 53-bit doubles from two 32-bit draws, masked rejection for `randint`.
#[derive(Clone)]
pub struct RandomState {
    key: [u32; 624],
    pos: usize,
}

impl std::fmt::Debug for RandomState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RandomState")
            .field("pos", &self.pos)
            .finish()
    }
}

impl RandomState {
    /// `RandomState(seed)` (numpy `mt19937_seed`).
    pub fn new(seed: u32) -> Self {
        let mut key = [0u32; 624];
        let mut s = seed;
        for (pos, k) in key.iter_mut().enumerate() {
            *k = s;
            s = 1_812_433_253u32
                .wrapping_mul(s ^ (s >> 30))
                .wrapping_add(pos as u32 + 1);
        }
        Self { key, pos: 624 }
    }

    fn generate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..624 {
            let y = (self.key[i] & UPPER) | (self.key[(i + 1) % 624] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.key[i] = self.key[(i + 397) % 624] ^ (y >> 1) ^ mag;
        }
        self.pos = 0;
    }

    /// The next raw 32-bit output (tempered).
    pub fn next_u32(&mut self) -> u32 {
        if self.pos == 624 {
            self.generate();
        }
        let mut y = self.key[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random_sample()` / `uniform(0, 1)`: a double in [0, 1) with 53 random bits.
    pub fn random_sample(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }

    /// `randint(high)`: an integer in `[0, high)` by masked rejection sampling on 32-bit draws
    /// (legacy `RandomState`; `high - 1 < 2^32`).
    pub fn randint(&mut self, high: u64) -> u64 {
        assert!(high >= 1 && high - 1 <= u32::MAX as u64, "randint range");
        let rng = (high - 1) as u32;
        if rng == 0 {
            return 0;
        }
        let mut mask = rng;
        mask |= mask >> 1;
        mask |= mask >> 2;
        mask |= mask >> 4;
        mask |= mask >> 8;
        mask |= mask >> 16;
        loop {
            let v = self.next_u32() & mask;
            if v <= rng {
                return v as u64;
            }
        }
    }

    /// `choice(len(p), p=p)` with replacement: one `random_sample` searched (side right) in the
    /// normalised cumulative sum of `p`.
    pub fn choice_p(&mut self, p: &[f64]) -> usize {
        let mut cdf = Vec::with_capacity(p.len());
        let mut acc = 0.0;
        for &v in p {
            acc += v;
            cdf.push(acc);
        }
        let last = acc;
        for c in cdf.iter_mut() {
            *c /= last;
        }
        let u = self.random_sample();
        cdf.partition_point(|&c| c <= u)
    }
}

/// A point set: `n` rows of `d` coordinates, row-major, with optional sample weights.
#[derive(Debug, Clone, Copy)]
pub struct Points<'a> {
    /// Row-major coordinates, `n * d` values.
    pub x: &'a [f64],
    /// Number of coordinates per row.
    pub d: usize,
    /// Per-row weights (`sample_weight`); `None` means all ones.
    pub w: Option<&'a [f64]>,
}

impl Points<'_> {
    /// Number of rows.
    pub fn n(&self) -> usize {
        self.x.len().checked_div(self.d).unwrap_or(0)
    }
    fn row(&self, i: usize) -> &[f64] {
        &self.x[i * self.d..(i + 1) * self.d]
    }
    fn weight(&self, i: usize) -> f64 {
        self.w.map_or(1.0, |w| w[i])
    }
}

/// Result of one k-means fit (sklearn's `cluster_centers_`, `labels_`, `inertia_`, `n_iter_`).
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansFit {
    /// `k * d` centroid coordinates, row-major.
    pub centers: Vec<f64>,
    /// Cluster of each row.
    pub labels: Vec<usize>,
    /// Weighted sum of squared distances to the assigned centroid.
    pub inertia: f64,
    /// Lloyd iterations run.
    pub n_iter: usize,
}

impl KMeansFit {
    /// Number of clusters.
    pub fn k(&self, d: usize) -> usize {
        self.centers.len() / d
    }
}

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// sklearn's `_tolerance(X, tol)`: `tol` times the mean over features of the (population)
/// variance of X (unweighted, as sklearn computes it).
pub fn sklearn_tolerance(p: &Points<'_>, tol: f64) -> f64 {
    let n = p.n();
    if n == 0 || tol == 0.0 {
        return 0.0;
    }
    let mut total = 0.0;
    for j in 0..p.d {
        let mean = (0..n).map(|i| p.x[i * p.d + j]).sum::<f64>() / n as f64;
        let var = (0..n)
            .map(|i| (p.x[i * p.d + j] - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        total += var;
    }
    total / p.d as f64 * tol
}

/// sklearn's greedy k-means++ seeding (`_kmeans_plusplus`): returns the `k * d` initial centres.
pub fn kmeans_plusplus(p: &Points<'_>, k: usize, rs: &mut RandomState) -> Vec<f64> {
    let n = p.n();
    let d = p.d;
    let n_local_trials = 2 + (k as f64).ln().floor() as usize;
    let wsum: f32 = (0..n).map(|i| p.weight(i) as f32).sum();
    let prob: Vec<f64> = (0..n).map(|i| (p.weight(i) as f32 / wsum) as f64).collect();
    let first = rs.choice_p(&prob);
    let mut centers = Vec::with_capacity(k * d);
    centers.extend_from_slice(p.row(first));
    // sklearn stores these squared distances as float32.
    let mut closest: Vec<f64> = (0..n)
        .map(|i| sq_dist(p.row(i), p.row(first)) as f32 as f64)
        .collect();
    let mut pot: f64 = (0..n).map(|i| closest[i] * p.weight(i)).sum();
    let mut cum = vec![0.0; n];
    let mut cand_d = vec![0.0; n];
    let mut best_d = vec![0.0; n];
    for _c in 1..k {
        let mut acc = 0.0;
        for i in 0..n {
            acc += p.weight(i) * closest[i];
            cum[i] = acc;
        }
        let mut best: Option<(f64, usize)> = None;
        let rand_vals: Vec<f64> = (0..n_local_trials)
            .map(|_| rs.random_sample() * pot)
            .collect();
        for r in rand_vals {
            // np.searchsorted default side='left': first index with cum >= r.
            let id = cum.partition_point(|&c| c < r).min(n - 1);
            let mut cpot = 0.0;
            for i in 0..n {
                let dd = (sq_dist(p.row(i), p.row(id)) as f32 as f64).min(closest[i]);
                cand_d[i] = dd;
                cpot += dd * p.weight(i);
            }
            if best.is_none_or(|(bp, _)| cpot < bp) {
                best = Some((cpot, id));
                std::mem::swap(&mut best_d, &mut cand_d);
            }
        }
        let (bp, id) = best.expect("at least two local trials");
        pot = bp;
        std::mem::swap(&mut closest, &mut best_d);
        centers.extend_from_slice(p.row(id));
    }
    centers
}

/// Nearest centre by sklearn's E-step expression `||c||² − 2 x·c` (first minimum wins).
fn assign(x: &[f64], centers: &[f64], norms: &[f64], d: usize) -> usize {
    let mut best = 0;
    let mut best_v = f64::INFINITY;
    for (j, c) in centers.chunks_exact(d).enumerate() {
        let dot: f64 = x.iter().zip(c).map(|(a, b)| a * b).sum();
        let v = norms[j] - 2.0 * dot;
        if v < best_v {
            best_v = v;
            best = j;
        }
    }
    best
}

/// Lloyd's algorithm as `_kmeans_single_lloyd` runs it, from the given initial centres,
/// with the absolute tolerance `tol_abs` on the summed squared centre shift.
pub fn lloyd(p: &Points<'_>, init: &[f64], max_iter: usize, tol_abs: f64) -> KMeansFit {
    let n = p.n();
    let d = p.d;
    let k = init.len() / d;
    let mut centers = init.to_vec();
    let mut centers_new = vec![0.0; k * d];
    let mut labels = vec![usize::MAX; n];
    let mut labels_old = labels.clone();
    let mut weight_in = vec![0.0; k];
    let mut strict = false;
    let mut n_iter = 0;
    let norms_of = |c: &[f64]| -> Vec<f64> {
        c.chunks_exact(d)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect()
    };
    for it in 0..max_iter {
        n_iter = it + 1;
        let norms = norms_of(&centers);
        centers_new.iter_mut().for_each(|v| *v = 0.0);
        weight_in.iter_mut().for_each(|v| *v = 0.0);
        for i in 0..n {
            let x = p.row(i);
            let l = assign(x, &centers, &norms, d);
            labels[i] = l;
            let w = p.weight(i);
            weight_in[l] += w;
            for (c, v) in centers_new[l * d..(l + 1) * d].iter_mut().zip(x) {
                *c += v * w;
            }
        }
        // _relocate_empty_clusters_dense
        let empty: Vec<usize> = (0..k).filter(|&j| weight_in[j] == 0.0).collect();
        if !empty.is_empty() {
            let mut far: Vec<(f64, usize)> = (0..n)
                .map(|i| (sq_dist(p.row(i), &centers[labels[i] * d..][..d]), i))
                .collect();
            far.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (e, &(_, fi)) in empty.iter().zip(&far) {
                let w = p.weight(fi);
                let old = labels[fi];
                for t in 0..d {
                    let xv = p.x[fi * d + t];
                    centers_new[old * d + t] -= xv * w;
                    centers_new[e * d + t] = xv * w;
                }
                weight_in[*e] = w;
                weight_in[old] -= w;
            }
        }
        for j in 0..k {
            if weight_in[j] > 0.0 {
                let a = 1.0 / weight_in[j];
                centers_new[j * d..(j + 1) * d]
                    .iter_mut()
                    .for_each(|v| *v *= a);
            }
        }
        let shift_tot: f64 = (0..k)
            .map(|j| {
                sq_dist(
                    &centers_new[j * d..(j + 1) * d],
                    &centers[j * d..(j + 1) * d],
                )
            })
            .sum();
        std::mem::swap(&mut centers, &mut centers_new);
        if labels == labels_old {
            strict = true;
            break;
        } else if shift_tot <= tol_abs {
            break;
        }
        labels_old.copy_from_slice(&labels);
    }
    if !strict {
        let norms = norms_of(&centers);
        for i in 0..n {
            labels[i] = assign(p.row(i), &centers, &norms, d);
        }
    }
    let inertia = (0..n)
        .map(|i| p.weight(i) * sq_dist(p.row(i), &centers[labels[i] * d..][..d]))
        .sum();
    KMeansFit {
        centers,
        labels,
        inertia,
        n_iter,
    }
}

/// `KMeans(n_clusters=k, n_init="auto", random_state=seed, max_iter=300, tol=1e-4).fit(X)`
/// (one k-means++ run; X is centred before seeding and the centres shifted back).
pub fn kmeans(p: &Points<'_>, k: usize, seed: u32) -> KMeansFit {
    let n = p.n();
    let d = p.d;
    assert!(k >= 1 && k <= n, "k-means needs 1 <= k <= n");
    let tol_abs = sklearn_tolerance(p, 1e-4);
    let mut mean = vec![0.0; d];
    for i in 0..n {
        for j in 0..d {
            mean[j] += p.x[i * d + j];
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let centred: Vec<f64> =
        p.x.chunks_exact(d)
            .flat_map(|r| r.iter().zip(&mean).map(|(v, m)| v - m))
            .collect();
    let cp = Points {
        x: &centred,
        d,
        w: p.w,
    };
    let mut rs = RandomState::new(seed);
    let init = kmeans_plusplus(&cp, k, &mut rs);
    let mut fit = lloyd(&cp, &init, 300, tol_abs);
    for c in fit.centers.chunks_exact_mut(d) {
        c.iter_mut().zip(&mean).for_each(|(v, m)| *v += m);
    }
    fit
}

/// Number of distinct rows (`len(np.unique(X, axis=0))`), counting at most `cap`.
pub fn count_unique_rows(p: &Points<'_>, cap: usize) -> usize {
    let mut seen: Vec<&[f64]> = Vec::new();
    for i in 0..p.n() {
        let r = p.row(i);
        if !seen.contains(&r) {
            seen.push(r);
            if seen.len() >= cap {
                break;
            }
        }
    }
    seen.len()
}

/// The released elbow rule (`_select_k_elbow`): given inertias for k = 1..k_cap, the smallest
/// k >= 2 with `Δ_k < tol·Δ_{k−1}` where `Δ_j = I_j − I_{j+1}`; k_cap if none; 1 if k_cap = 1.
pub fn elbow_code(inertias: &[f64], tol: f64) -> usize {
    let k_cap = inertias.len();
    if k_cap <= 1 {
        return k_cap.max(1);
    }
    let drops: Vec<f64> = inertias.windows(2).map(|w| w[0] - w[1]).collect();
    for i in 1..drops.len() {
        if drops[i] < tol * drops[i - 1] {
            return i + 1;
        }
    }
    k_cap
}

/// The paper's reading (App. B.1): the k at which `ΔI_k < τ·ΔI_{k−1}` first holds, with
/// `ΔI_k = I_{k−1} − I_k` (one more than [`elbow_code`] when the condition fires).
pub fn elbow_paper(inertias: &[f64], tol: f64) -> usize {
    let k_cap = inertias.len();
    if k_cap <= 1 {
        return k_cap.max(1);
    }
    let drops: Vec<f64> = inertias.windows(2).map(|w| w[0] - w[1]).collect();
    for i in 1..drops.len() {
        if drops[i] < tol * drops[i - 1] {
            return i + 2;
        }
    }
    k_cap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_seed_5489_matches_the_reference_sequence() {
        // First outputs of the reference MT19937 with init_genrand(5489).
        let mut rs = RandomState::new(5489);
        assert_eq!(rs.next_u32(), 3_499_211_612);
        assert_eq!(rs.next_u32(), 581_869_302);
        assert_eq!(rs.next_u32(), 3_890_346_734);
    }

    #[test]
    fn elbow_unit_cases_of_spec_9_9() {
        assert_eq!(elbow_code(&[10.0, 4.0, 3.5, 3.4], 0.1), 2);
        assert_eq!(elbow_code(&[0.70375, 0.413333, 0.1225, 0.0], 0.1), 4);
        assert_eq!(elbow_code(&[5.0, 3.0], 0.1), 2);
        assert_eq!(elbow_code(&[5.0], 0.1), 1);
        assert_eq!(elbow_paper(&[10.0, 4.0, 3.5, 3.4], 0.1), 3);
    }

    #[test]
    fn two_separated_blobs_are_found() {
        let x = [0.0, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0, 0.0, 0.1];
        let p = Points {
            x: &x,
            d: 2,
            w: None,
        };
        let f = kmeans(&p, 2, 0);
        assert_eq!(f.labels[0], f.labels[1]);
        assert_eq!(f.labels[0], f.labels[4]);
        assert_ne!(f.labels[0], f.labels[2]);
        assert!(f.inertia < 0.02, "{}", f.inertia);
    }
}
