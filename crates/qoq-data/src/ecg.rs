//! ECG signals to the model's `(8, 2500)` input (spec §5.1): lead selection by name, FFT
//! resampling equal to `scipy.signal.resample`, crop / zero-pad, optional per-lead z-score.

use serde::{Deserialize, Serialize};

/// The 8 leads the ECG-JEPA encoder takes, in order (indices 0, 1, 6..11 of the 12-lead order).
pub const MODEL_LEADS: [&str; 8] = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"];
/// Samples per lead the encoder takes.
pub const MODEL_SAMPLES: usize = 2500;

/// A loaded multi-lead signal in physical units (mV).
#[derive(Debug, Clone, PartialEq)]
pub struct EcgSignal {
    /// Sampling frequency in Hz.
    pub fs: f64,
    /// Lead names, one per row of `data`.
    pub leads: Vec<String>,
    /// `data[lead][sample]`.
    pub data: Vec<Vec<f32>>,
}

/// How a recording becomes 2500 samples (spec §5.1; the paper's preprocessing is unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EcgConvention {
    /// ECG-JEPA's: the first 10 s, FFT-resampled to 2500 samples (250 Hz).
    #[default]
    EcgJepa,
    /// The released `process_time_series`: resample to 500 Hz, keep the first 2500 (5 s).
    Reference,
}

fn canonical(name: &str) -> String {
    name.trim()
        .to_ascii_uppercase()
        .replace("LEAD", "")
        .replace([' ', '_', '-'], "")
}

/// `scipy.signal.resample(x, num)` for real input: keep the lowest `min(num, len)` frequencies
/// of the FFT (halving or doubling the shared Nyquist bin as scipy does) and invert.
pub fn fft_resample(x: &[f32], num: usize) -> Vec<f32> {
    use rustfft::{FftPlanner, num_complex::Complex};
    let nx = x.len();
    if nx == 0 || num == 0 {
        return vec![0.0; num];
    }
    let mut planner = FftPlanner::<f64>::new();
    let mut spec: Vec<Complex<f64>> = x.iter().map(|&v| Complex::new(v as f64, 0.0)).collect();
    planner.plan_fft_forward(nx).process(&mut spec);
    // Y: the half spectrum of the output (num / 2 + 1 bins).
    let mut y = vec![Complex::new(0.0, 0.0); num / 2 + 1];
    let n = num.min(nx);
    let nyq = n / 2 + 1;
    y[..nyq].copy_from_slice(&spec[..nyq]);
    if n.is_multiple_of(2) {
        if num < nx {
            y[n / 2] *= 2.0;
        } else if nx < num {
            y[n / 2] *= 0.5;
        }
    }
    // irfft: Hermitian spectrum of length num; the DC and (even num) Nyquist bins are real.
    let mut full = vec![Complex::new(0.0, 0.0); num];
    full[0] = Complex::new(y[0].re, 0.0);
    for k in 1..num.div_ceil(2) {
        full[k] = y[k];
        full[num - k] = y[k].conj();
    }
    if num.is_multiple_of(2) {
        full[num / 2] = Complex::new(y[num / 2].re, 0.0);
    }
    planner.plan_fft_inverse(num).process(&mut full);
    // rustfft is unnormalised: irfft divides by num, scipy multiplies by num / nx.
    full.iter().map(|c| (c.re / nx as f64) as f32).collect()
}

/// Select the model's 8 leads by name (case and `lead`/space/underscore insensitive).
pub fn select_leads(sig: &EcgSignal) -> std::result::Result<Vec<Vec<f32>>, String> {
    MODEL_LEADS
        .iter()
        .map(|want| {
            sig.leads
                .iter()
                .position(|l| canonical(l) == *want)
                .map(|i| sig.data[i].clone())
                .ok_or_else(|| format!("lead {want} is missing (the record has {:?})", sig.leads))
        })
        .collect()
}

/// The model's `(8, 2500)` input, row-major, under `convention`, optionally z-scored per lead
/// (unbiased std; a flat lead keeps std 1). Non-finite samples become 0.
pub fn to_model_input(
    sig: &EcgSignal,
    convention: EcgConvention,
    zscore: bool,
) -> std::result::Result<Vec<f32>, String> {
    if !(sig.fs.is_finite() && sig.fs > 0.0) {
        return Err(format!("invalid sampling frequency {}", sig.fs));
    }
    let leads = select_leads(sig)?;
    let mut out = Vec::with_capacity(MODEL_LEADS.len() * MODEL_SAMPLES);
    for lead in leads {
        let clean: Vec<f32> = lead
            .iter()
            .map(|v| if v.is_finite() { *v } else { 0.0 })
            .collect();
        let mut x = match convention {
            EcgConvention::EcgJepa => {
                let ten_s = ((10.0 * sig.fs).round() as usize).min(clean.len());
                fft_resample(
                    &clean[..ten_s],
                    (MODEL_SAMPLES as f64 * ten_s as f64 / (10.0 * sig.fs)).round() as usize,
                )
            }
            EcgConvention::Reference => {
                if (sig.fs - 500.0).abs() < 1e-9 {
                    clean
                } else {
                    let num = (clean.len() as f64 * 500.0 / sig.fs).round();
                    // a damaged (tiny) sampling frequency must not size a huge spectrum
                    if num * 16.0 > crate::guard::MAX_DECODED_BYTES as f64 {
                        return Err(format!(
                            "resampling {} samples from {} Hz to 500 Hz would give {num} samples, beyond the decoding limit",
                            clean.len(),
                            sig.fs
                        ));
                    }
                    fft_resample(&clean, num as usize)
                }
            }
        };
        x.resize(MODEL_SAMPLES, 0.0);
        if zscore {
            let n = x.len() as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let std = if var > 0.0 { var.sqrt() } else { 1.0 };
            x.iter_mut()
                .for_each(|v| *v = ((*v as f64 - mean) / std) as f32);
        }
        out.extend(x);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn fft_resample_equals_scipy() {
        // values printed by scipy.signal.resample (scipy 1.x) for these inputs
        let odd = [0.5f32, -1.0, 2.0, 3.5, -0.25, 1.0, 0.0, -2.0, 1.5];
        close(
            &fft_resample(&odd, 4),
            &[0.103246706, 1.8109929557, 0.8018010367, -0.3827073651],
        );
        close(
            &fft_resample(&odd, 6),
            &[
                0.853246706,
                0.0347682958,
                3.1625080389,
                0.0518010367,
                -0.015754745,
                -0.5865693326,
            ],
        );
        let up = fft_resample(&odd, 18);
        close(
            &up[..6],
            &[0.5, -0.7394699849, -1.0, 0.0505230408, 2.0, 3.6150091036],
        );
        let even = [1.0f32, 2.0, 0.0, -1.0, 3.0, 0.5, -0.5, 2.5];
        close(
            &fft_resample(&even, 3),
            &[1.3213834765, 0.5476252194, 0.9434913041],
        );
        close(
            &fft_resample(&even, 4),
            &[2.4463834765, -0.4160533906, 1.6786165235, 0.0410533906],
        );
        let up = fft_resample(&even, 12);
        close(&up[..4], &[1.0, 1.4873791078, 2.0006485233, 0.0]);
    }

    fn twelve_lead(fs: f64, seconds: f64) -> EcgSignal {
        let names = [
            "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
        ];
        let n = (fs * seconds) as usize;
        EcgSignal {
            fs,
            leads: names.iter().map(|s| s.to_string()).collect(),
            data: (0..12)
                .map(|l| {
                    (0..n)
                        .map(|t| (l as f32) + (t as f32 / fs as f32).sin())
                        .collect()
                })
                .collect(),
        }
    }

    #[test]
    fn model_input_has_8_leads_of_2500_under_both_conventions() {
        let sig = twelve_lead(1000.0, 10.0);
        let jepa = to_model_input(&sig, EcgConvention::EcgJepa, false).unwrap();
        assert_eq!(jepa.len(), 8 * 2500);
        // lead order I, II, V1..V6 = source rows 0, 1, 6..11 (constant offsets survive resampling)
        for (i, src) in [0usize, 1, 6, 7, 8, 9, 10, 11].iter().enumerate() {
            let mean: f32 = jepa[i * 2500..(i + 1) * 2500].iter().sum::<f32>() / 2500.0;
            let want: f32 = sig.data[*src].iter().sum::<f32>() / 10_000.0;
            assert!((mean - want).abs() < 1e-3, "lead {i}: {mean} vs {want}");
        }
        // reference: 5 s at 500 Hz; a 4 s record is zero-padded
        let short = twelve_lead(500.0, 4.0);
        let r = to_model_input(&short, EcgConvention::Reference, false).unwrap();
        assert_eq!(r[1999], short.data[0][1999]);
        assert_eq!(r[2000], 0.0);
        let z = to_model_input(&sig, EcgConvention::EcgJepa, true).unwrap();
        let mean: f32 = z[..2500].iter().sum::<f32>() / 2500.0;
        assert!(mean.abs() < 1e-4);
    }

    #[test]
    fn missing_leads_are_named() {
        let mut sig = twelve_lead(500.0, 1.0);
        sig.leads[9] = "X".into();
        let e = to_model_input(&sig, EcgConvention::EcgJepa, false).unwrap_err();
        assert!(e.contains("lead V4 is missing"), "{e}");
    }
}
