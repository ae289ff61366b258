//! Synthetic 12-lead ECGs from the ECGSYN model (McSharry, Clifford, Tarassenko, Smith, "A dynamical
//! model for generating synthetic electrocardiogram signals", IEEE TBME 50(3), 2003), in its
//! phase-domain form (Sameni et al., "Multichannel ECG and noise modeling", IEEE TBME 54(12), 2007):
//! each beat is a trajectory of the cardiac phase theta from -pi to pi, and every lead is a sum of
//! Gaussian waves (P, Q, R, S, T) centred at fixed phases, with the ECGSYN heart-rate scaling of
//! the wave positions and widths. The RR tachogram follows ECGSYN's bimodal spectrum (Mayer waves at
//! 0.1 Hz, respiratory sinus arrhythmia at 0.25 Hz) with random phases.
//!
//! Written by hand: no Rust crate generates ECGs.
//!
//! Rhythm and morphology classes: normal sinus rhythm, atrial fibrillation (irregularly irregular
//! RR, no P waves, 4-8 Hz fibrillatory waves), sinus bradycardia, sinus tachycardia, and ST
//! elevation (an extra wave between S and T in the anterior leads).

use rand::Rng;
use rand_distr::{Distribution, Normal};
use std::f64::consts::PI;

/// The 12 standard leads, in the order written to files.
pub const LEADS_12: [&str; 12] = [
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
];

/// Rhythm / morphology class of a synthetic ECG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcgClass {
    NormalSinus,
    AtrialFibrillation,
    SinusBradycardia,
    SinusTachycardia,
    StElevation,
}

/// The generator's output: 12 leads in mV at `fs`.
#[derive(Debug, Clone)]
pub struct SynthEcg {
    pub fs: f64,
    pub leads: Vec<Vec<f32>>,
    /// Times (s) of the R peaks.
    pub r_peaks: Vec<f64>,
    /// Mean heart rate (bpm) actually produced.
    pub heart_rate: f64,
}

// Wave phases (rad), widths (rad) at 60 bpm, and ECGSYN's per-wave heart-rate scaling exponents.
const THETA: [f64; 5] = [-PI / 3.0, -PI / 12.0, 0.0, PI / 12.0, PI / 2.0];
const WIDTH: [f64; 5] = [0.25, 0.1, 0.1, 0.1, 0.4];
// Lead II-like amplitudes (mV) of P, Q, R, S, T for the 8 independent leads I, II, V1-V6.
const AMP: [[f64; 5]; 8] = [
    [0.10, -0.05, 0.60, -0.10, 0.20],
    [0.15, -0.08, 1.00, -0.20, 0.30],
    [0.08, 0.00, 0.25, -0.90, -0.05],
    [0.10, 0.00, 0.45, -1.10, 0.45],
    [0.10, -0.02, 0.75, -0.70, 0.45],
    [0.10, -0.05, 1.20, -0.40, 0.40],
    [0.10, -0.07, 1.10, -0.20, 0.30],
    [0.10, -0.07, 0.90, -0.10, 0.25],
];
// ST-elevation amplitude multipliers per independent lead (anterior: I, V1-V4).
const ST_LEADS: [f64; 8] = [0.5, 0.0, 0.8, 1.0, 1.0, 0.7, 0.2, 0.0];
// Fibrillatory-wave multipliers per independent lead (strongest in V1 and II).
const F_LEADS: [f64; 8] = [0.4, 1.0, 1.4, 1.0, 0.7, 0.5, 0.4, 0.3];

/// Generate `seconds` of a 12-lead ECG at `fs` Hz for `class`.
pub fn generate<R: Rng>(rng: &mut R, class: EcgClass, fs: f64, seconds: f64) -> SynthEcg {
    let n = (fs * seconds).round() as usize;
    let (hr, cv): (f64, f64) = match class {
        EcgClass::NormalSinus | EcgClass::StElevation => {
            (rng.random_range(60.0..95.0), rng.random_range(0.03..0.06))
        }
        EcgClass::AtrialFibrillation => {
            (rng.random_range(80.0..130.0), rng.random_range(0.25..0.35))
        }
        EcgClass::SinusBradycardia => (rng.random_range(40.0..55.0), rng.random_range(0.02..0.04)),
        EcgClass::SinusTachycardia => (
            rng.random_range(105.0..150.0),
            rng.random_range(0.015..0.03),
        ),
    };
    let mean_rr = 60.0 / hr;
    let af = class == EcgClass::AtrialFibrillation;

    // RR tachogram: ECGSYN's bimodal spectrum, sum of cosines with random phases, unit variance.
    let tachogram = Tachogram::new(rng);

    // Per-record morphology jitter.
    let mut amp = AMP;
    for lead in &mut amp {
        let s: f64 = rng.random_range(0.85..1.15);
        for a in lead.iter_mut() {
            *a *= s;
        }
    }
    if af {
        for lead in &mut amp {
            lead[0] = 0.0;
        }
    }
    let st = if class == EcgClass::StElevation {
        rng.random_range(0.2..0.35)
    } else {
        0.0
    };
    let hrfact = (hr / 60.0).sqrt();
    let hrfact2 = hrfact.sqrt();
    let scale = [hrfact2, hrfact, 1.0, hrfact, hrfact2];
    let theta: Vec<f64> = (0..5).map(|i| THETA[i] * scale[i]).collect();
    let width: Vec<f64> = (0..5).map(|i| WIDTH[i] * hrfact).collect();

    // Phase trajectory: theta advances by 2 pi / RR; a new RR is drawn at each wrap (mid-diastole).
    let dt = 1.0 / fs;
    let start: f64 = rng.random_range(-PI..PI);
    let mut phase = start;
    let mut rr = next_rr(rng, af, mean_rr, cv, &tachogram, 0.0);
    let mut phases = Vec::with_capacity(n);
    let mut r_peaks = Vec::new();
    for i in 0..n {
        let t = i as f64 * dt;
        phases.push(phase);
        let next = phase + 2.0 * PI * dt / rr;
        if phase < 0.0 && next >= 0.0 {
            r_peaks.push(t + (0.0 - phase) / (2.0 * PI / rr));
        }
        phase = next;
        if phase >= PI {
            phase -= 2.0 * PI;
            rr = next_rr(rng, af, mean_rr, cv, &tachogram, t);
        }
    }

    // Noise sources shared across leads (respiration baseline) and per lead.
    let resp_f: f64 = rng.random_range(0.2..0.35);
    let resp_phase: f64 = rng.random_range(0.0..2.0 * PI);
    let f_waves: Vec<(f64, f64, f64)> = (0..4)
        .map(|_| {
            (
                rng.random_range(4.0..8.0),
                rng.random_range(0.0..2.0 * PI),
                rng.random_range(0.02..0.05),
            )
        })
        .collect();
    let white = Normal::new(0.0, 0.012).expect("finite");

    let mut indep = vec![vec![0f32; n]; 8];
    for (l, out) in indep.iter_mut().enumerate() {
        let wander: f64 = rng.random_range(0.03..0.1);
        for (i, &ph) in phases.iter().enumerate() {
            let t = i as f64 * dt;
            let mut v = 0.0;
            for w in 0..5 {
                let d = wrap(ph - theta[w]);
                v += amp[l][w] * (-d * d / (2.0 * width[w] * width[w])).exp();
            }
            if st > 0.0 {
                let d = wrap(ph - PI / 5.0 * hrfact);
                v += st * ST_LEADS[l] * (-d * d / (2.0 * 0.3 * 0.3)).exp();
            }
            if af {
                v += F_LEADS[l]
                    * f_waves
                        .iter()
                        .map(|&(f, p, a)| a * (2.0 * PI * f * t + p).sin())
                        .sum::<f64>();
            }
            v += wander * (2.0 * PI * resp_f * t + resp_phase).sin();
            v += white.sample(rng);
            out[i] = v as f32;
        }
    }
    // Einthoven and Goldberger: III = II - I, aVR = -(I + II)/2, aVL = I - II/2, aVF = II - I/2.
    let (li, lii) = (&indep[0], &indep[1]);
    let iii: Vec<f32> = (0..n).map(|i| lii[i] - li[i]).collect();
    let avr: Vec<f32> = (0..n).map(|i| -(li[i] + lii[i]) / 2.0).collect();
    let avl: Vec<f32> = (0..n).map(|i| li[i] - lii[i] / 2.0).collect();
    let avf: Vec<f32> = (0..n).map(|i| lii[i] - li[i] / 2.0).collect();
    let mut leads = vec![indep[0].clone(), indep[1].clone(), iii, avr, avl, avf];
    leads.extend(indep[2..].iter().cloned());

    let heart_rate = if r_peaks.len() >= 2 {
        60.0 * (r_peaks.len() - 1) as f64 / (r_peaks[r_peaks.len() - 1] - r_peaks[0])
    } else {
        hr
    };
    SynthEcg {
        fs,
        leads,
        r_peaks,
        heart_rate,
    }
}

fn wrap(d: f64) -> f64 {
    (d + PI).rem_euclid(2.0 * PI) - PI
}

fn next_rr<R: Rng>(rng: &mut R, af: bool, mean: f64, cv: f64, tach: &Tachogram, t: f64) -> f64 {
    if af {
        // Irregularly irregular: independent intervals.
        let n = Normal::new(0.0, 1.0).expect("finite");
        let z: f64 = n.sample(rng);
        (mean * (1.0 + cv * z)).clamp(0.3, 1.8)
    } else {
        (mean * (1.0 + cv * tach.at(t))).clamp(0.3, 2.0)
    }
}

/// A unit-variance RR modulation with ECGSYN's spectrum: two Gaussians at 0.1 Hz (sd 0.01 Hz) and
/// 0.25 Hz (sd 0.01 Hz) with LF/HF power ratio 0.5.
struct Tachogram {
    terms: Vec<(f64, f64, f64)>,
}

impl Tachogram {
    fn new<R: Rng>(rng: &mut R) -> Tachogram {
        let df = 1.0 / 256.0;
        let (f1, f2, c1, c2, ratio) = (0.1, 0.25, 0.01, 0.01, 0.5);
        let mut terms = Vec::new();
        let mut power = 0.0;
        for k in 1..128 {
            let f = k as f64 * df;
            let s = ratio * (-(f - f1).powi(2) / (2.0 * c1 * c1)).exp() / c1
                + (-(f - f2).powi(2) / (2.0 * c2 * c2)).exp() / c2;
            let a = s.sqrt();
            power += a * a / 2.0;
            terms.push((f, a, rng.random_range(0.0..2.0 * PI)));
        }
        let norm = power.sqrt();
        for t in &mut terms {
            t.1 /= norm;
        }
        Tachogram { terms }
    }

    fn at(&self, t: f64) -> f64 {
        self.terms
            .iter()
            .map(|&(f, a, p)| a * (2.0 * PI * f * t + p).cos())
            .sum()
    }
}

/// R peaks of one lead by a simple detector (local maxima above half the record's maximum, at
/// least 250 ms apart). Used by tests and by `qoq synth`'s sanity report.
pub fn detect_r_peaks(x: &[f32], fs: f64) -> Vec<usize> {
    let max = x.iter().cloned().fold(f32::MIN, f32::max);
    let thr = 0.5 * max;
    let refractory = (0.25 * fs) as usize;
    let mut peaks: Vec<usize> = Vec::new();
    for i in 1..x.len().saturating_sub(1) {
        if x[i] > thr && x[i] >= x[i - 1] && x[i] > x[i + 1] {
            match peaks.last() {
                Some(&p) if i - p < refractory => {
                    if x[i] > x[p] {
                        *peaks.last_mut().expect("non-empty") = i;
                    }
                }
                _ => peaks.push(i),
            }
        }
    }
    peaks
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn rr_stats(class: EcgClass, seed: u64) -> (f64, f64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let e = generate(&mut rng, class, 250.0, 10.0);
        let p = detect_r_peaks(&e.leads[1], e.fs);
        let rr: Vec<f64> = p.windows(2).map(|w| (w[1] - w[0]) as f64 / e.fs).collect();
        let mean = rr.iter().sum::<f64>() / rr.len() as f64;
        let sd = (rr.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rr.len() as f64).sqrt();
        (60.0 / mean, sd / mean)
    }

    #[test]
    fn rhythm_classes_have_their_heart_rate_and_rr_regularity() {
        for seed in 0..5 {
            let (hr, cv) = rr_stats(EcgClass::NormalSinus, seed);
            assert!((55.0..100.0).contains(&hr) && cv < 0.1, "NSR {hr} {cv}");
            let (hr, _) = rr_stats(EcgClass::SinusBradycardia, seed);
            assert!(hr < 60.0, "brady {hr}");
            let (hr, _) = rr_stats(EcgClass::SinusTachycardia, seed);
            assert!(hr > 100.0, "tachy {hr}");
            let (_, cv) = rr_stats(EcgClass::AtrialFibrillation, seed);
            assert!(cv > 0.1, "AF cv {cv}");
        }
    }

    #[test]
    fn detected_peaks_match_the_generated_r_times() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let e = generate(&mut rng, EcgClass::NormalSinus, 250.0, 10.0);
        let p = detect_r_peaks(&e.leads[1], e.fs);
        assert!((e.r_peaks.len() as i64 - p.len() as i64).abs() <= 1);
        for &i in &p {
            let t = i as f64 / e.fs;
            let near = e
                .r_peaks
                .iter()
                .map(|r| (r - t).abs())
                .fold(f64::MAX, f64::min);
            assert!(near < 0.02, "peak at {t} s is {near} s from any R time");
        }
    }

    #[test]
    fn st_elevation_raises_the_st_segment_in_v2() {
        let st_level = |class| {
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let e = generate(&mut rng, class, 250.0, 10.0);
            let v2 = &e.leads[7];
            // 80 ms after each R peak.
            let mut s = 0.0;
            let mut k = 0;
            for r in &e.r_peaks {
                let i = ((r + 0.08) * e.fs) as usize;
                if i < v2.len() {
                    s += v2[i] as f64;
                    k += 1;
                }
            }
            s / k as f64
        };
        let normal = st_level(EcgClass::NormalSinus);
        let stemi = st_level(EcgClass::StElevation);
        assert!(stemi - normal > 0.1, "ST {stemi} vs {normal}");
    }

    #[test]
    fn limb_leads_obey_einthoven() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let e = generate(&mut rng, EcgClass::AtrialFibrillation, 250.0, 2.0);
        for i in 0..e.leads[0].len() {
            assert!((e.leads[2][i] - (e.leads[1][i] - e.leads[0][i])).abs() < 1e-6);
        }
    }
}
