//! Token-level estimators: REINFORCE++ (`compute_reinforce_plus_plus_outcome_advantage`,
//! spec §9.3) and GAE (`compute_gae_advantage_return`, §9.5), with verl's `masked_whiten`.
//!
//! Shapes: `rewards`, `values` and `mask` are `(B, L)` as `&[Vec<f64>]` (rows of equal length);
//! the mask holds 1.0 for response tokens and 0.0 for padding.

use crate::error::{Error, Result};

fn check_shape(what: &'static str, a: &[Vec<f64>], like: &[Vec<f64>]) -> Result<()> {
    if a.len() != like.len() {
        return Err(Error::Shape {
            what,
            row: 0,
            got: a.len(),
            expected: like.len(),
        });
    }
    for (i, (x, y)) in a.iter().zip(like).enumerate() {
        if x.len() != y.len() {
            return Err(Error::Shape {
                what,
                row: i,
                got: x.len(),
                expected: y.len(),
            });
        }
    }
    Ok(())
}

/// Right-pads rows of different lengths with zeros to `(B, L)`, `L` the longest row, and
/// returns the padded matrix with its 0/1 mask.
pub fn pad(rows: &[Vec<f64>]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let l = rows.iter().map(Vec::len).max().unwrap_or(0);
    let padded = rows
        .iter()
        .map(|r| {
            let mut v = r.clone();
            v.resize(l, 0.0);
            v
        })
        .collect();
    let mask = rows
        .iter()
        .map(|r| {
            (0..l)
                .map(|t| if t < r.len() { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    (padded, mask)
}

/// `masked_whiten(x, mask)`: `(x − mean)·rsqrt(var + 1e-8)` with the masked mean
/// (`Σ x·m / (Σ m + 1e-8)`) and the Bessel-corrected masked variance; the mean is not added back.
pub fn masked_whiten(x: &[Vec<f64>], mask: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
    check_shape("mask", mask, x)?;
    let msum: f64 = mask.iter().flatten().sum();
    let masked_mean = |v: &dyn Fn(usize, usize) -> f64| -> f64 {
        let mut s = 0.0;
        for (i, row) in mask.iter().enumerate() {
            for (t, m) in row.iter().enumerate() {
                s += v(i, t) * m;
            }
        }
        s / (msum + 1e-8)
    };
    let mean = masked_mean(&|i, t| x[i][t]);
    let mut var = masked_mean(&|i, t| (x[i][t] - mean).powi(2));
    // verl masked_var(unbiased=True): var * n/(n−1).
    if msum > 1.0 {
        var *= msum / (msum - 1.0);
    }
    let scale = 1.0 / (var + 1e-8).sqrt();
    Ok(x.iter()
        .map(|row| row.iter().map(|v| (v - mean) * scale).collect())
        .collect())
}

/// REINFORCE++: discounted return-to-go `R_t = r_t + γ·R_{t+1}` reset after the response
/// (`running = R_t·mask_t`), whitened over all valid tokens. Returns `(advantages, returns)`.
pub fn reinforce_plus_plus(
    rewards: &[Vec<f64>],
    mask: &[Vec<f64>],
    gamma: f64,
) -> Result<(Vec<Vec<f64>>, Vec<Vec<f64>>)> {
    check_shape("mask", mask, rewards)?;
    let returns: Vec<Vec<f64>> = rewards
        .iter()
        .zip(mask)
        .map(|(r, m)| {
            let mut out = vec![0.0; r.len()];
            let mut running = 0.0;
            for t in (0..r.len()).rev() {
                let ret = r[t] + gamma * running;
                out[t] = ret;
                running = ret * m[t];
            }
            out
        })
        .collect();
    let white = masked_whiten(&returns, mask)?;
    let adv = white
        .into_iter()
        .zip(mask)
        .map(|(a, m)| a.iter().zip(m).map(|(x, k)| x * k).collect())
        .collect();
    Ok((adv, returns))
}

/// GAE: `δ_t = r_t + γ·V_{t+1} − V_t` (`V_L = 0`, padding not masked in the recursion),
/// `gae_t = δ_t + γλ·gae_{t+1}`, `returns = gae + V`, `advantages = masked_whiten(gae)`.
/// Returns `(advantages, returns)`.
pub fn gae(
    rewards: &[Vec<f64>],
    values: &[Vec<f64>],
    mask: &[Vec<f64>],
    gamma: f64,
    lam: f64,
) -> Result<(Vec<Vec<f64>>, Vec<Vec<f64>>)> {
    check_shape("values", values, rewards)?;
    check_shape("mask", mask, rewards)?;
    let mut adv = Vec::with_capacity(rewards.len());
    let mut ret = Vec::with_capacity(rewards.len());
    for (r, v) in rewards.iter().zip(values) {
        let l = r.len();
        let mut g = vec![0.0; l];
        let mut last = 0.0;
        for t in (0..l).rev() {
            let next_v = if t + 1 < l { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next_v - v[t];
            last = delta + gamma * lam * last;
            g[t] = last;
        }
        ret.push(g.iter().zip(v).map(|(a, b)| a + b).collect::<Vec<f64>>());
        adv.push(g);
    }
    let white = masked_whiten(&adv, mask)?;
    let adv = white
        .into_iter()
        .zip(mask)
        .map(|(a, m)| a.iter().zip(m).map(|(x, k)| x * k).collect())
        .collect();
    Ok((adv, ret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reinforce_pp_returns_reset_after_the_response() {
        let r = vec![vec![0.0, 0.0, 1.0, 0.0], vec![0.0, 2.0, 0.0, 0.0]];
        let m = vec![vec![1.0, 1.0, 1.0, 0.0], vec![1.0, 1.0, 0.0, 0.0]];
        let (a, ret) = reinforce_plus_plus(&r, &m, 1.0).unwrap();
        assert_eq!(ret[0], vec![1.0, 1.0, 1.0, 0.0]);
        assert_eq!(ret[1], vec![2.0, 2.0, 0.0, 0.0]);
        // valid returns [1,1,1,2,2]: mean 1.4, unbiased var 0.3
        let s = 1.0 / (0.3f64 + 1e-8).sqrt();
        assert!((a[0][0] - (-0.4 * s)).abs() < 1e-6);
        assert!((a[1][1] - 0.6 * s).abs() < 1e-6);
        assert_eq!(a[0][3], 0.0);
    }

    #[test]
    fn gae_with_unit_gamma_lambda_is_return_minus_value() {
        let r = vec![vec![0.0, 0.0, 1.0]];
        let v = vec![vec![0.2, 0.4, 0.6]];
        let m = vec![vec![1.0, 1.0, 1.0]];
        let (_a, ret) = gae(&r, &v, &m, 1.0, 1.0).unwrap();
        for t in 0..3 {
            assert!((ret[0][t] - 1.0).abs() < 1e-12);
        }
        assert!(gae(&r, &[], &m, 1.0, 1.0).is_err());
    }
}
