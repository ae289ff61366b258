//! `exp` of f32 slices in vector registers, giving the same bits as glibc's `expf`.
//!
//! The softmax rows of attention and of the chosen tokens' log-probabilities call `exp` once per
//! score: through libm that is one call per element (glibc's `__expf_fma`, about a tenth of a
//! tiny model's training step in a one-thread profile). [`exp_or_zero_in_place`] evaluates the
//! same algorithm over a slice, a vector register of elements at a time: glibc's (ARM's
//! optimized-routines) `expf`, `2^(k/32) · 2^(r/32)` with a 32-entry table and a cubic in `r`,
//! all in f64, with the fused multiply-adds of glibc's FMA build (`__expf_fma`, the variant its
//! resolver picks on a CPU with FMA), so each result is glibc's to the bit on such CPUs. An
//! approximation with other rounding (a Cephes-style f32 `expf`, within 2 ulp) was tried and
//! reverted: a model trained with it scored differently, and a 1,000-step run cannot tell which
//! last bits are right; with glibc's bits, training with or without this kernel is the same.
//!
//! Written here because no maintained crate gives a vectorised `expf` with glibc's rounding
//! (SIMD math crates choose their own polynomials); no `unsafe` SIMD intrinsics: the loop is
//! plain Rust compiled for AVX-512 or AVX2 + FMA, chosen at run time, and the compiler
//! vectorises it (the table lookup becomes a gather). On a CPU without FMA (where glibc takes
//! its non-FMA variant) and off x86-64 the slice goes through `f32::exp`.

/// `x ← exp(x)` for each element: 0 below -87 (see [`exp_or_zero`], whose values
/// these are, element for element), NaN for NaN. Meant for `x <= 0` (scores minus their row's
/// maximum); a slice holding a value above 87 is computed by `f32::exp` element by element.
#[allow(unsafe_code)] // calls of the target-feature variants after detecting the features
pub fn exp_or_zero_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { exp_avx512(xs) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            unsafe { exp_avx2(xs) };
            return;
        }
    }
    by_libm(xs);
}

/// Each element through [`exp_or_zero`] (libm).
fn by_libm(xs: &mut [f32]) {
    for x in xs {
        *x = exp_or_zero(*x);
    }
}

/// `exp(d)` for `d <= 0` in f32, 0 below f32's normal range without calling libm's underflow
/// path (errno, a function call per element: about ten times a normal `exp`; masked attention
/// logits and the tail of a vocabulary land there). The terms dropped are below 1e-37.
pub fn exp_or_zero(d: f32) -> f32 {
    if d < -87.0 { 0.0 } else { d.exp() }
}

/// `exp(d)` for `d <= 0` in f64, 0 below -708 (f64's normal range ends near -708.4; the terms
/// dropped change no sum of a softmax row).
pub fn exp_or_zero64(d: f64) -> f64 {
    if d < -708.0 { 0.0 } else { d.exp() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn exp_avx512(xs: &mut [f32]) {
    exp_lanes(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_avx2(xs: &mut [f32]) {
    exp_lanes(xs)
}

/// The slice loop: every element through [`expf_fma`], those below -87 evaluated at 0 (a
/// masked score, `f32::MIN`, would otherwise make subnormal and infinite intermediates, several
/// times slower) and replaced by 0.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn exp_lanes(xs: &mut [f32]) {
    // Above 87 (never a score minus its row's maximum) glibc leaves the main path: libm. The
    // test is a vector OR over the slice, not an early exit (which would compare one by one).
    if xs.iter().fold(false, |big, &x| big | (x > 87.0)) {
        return by_libm(xs);
    }
    for x in xs {
        let low = *x < -87.0;
        let e = expf_fma(if low { 0.0 } else { *x });
        *x = if low { 0.0 } else { e };
    }
}

/// `2^(i/32)` as f64 bits minus `i << 47` (the exponent `k / 32` adds back), glibc's
/// `__exp2f_data.tab`.
const TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// `32 / ln 2`.
const INV_LN2_N: f64 = f64::from_bits(0x40471547652b82fe);
/// `1.5 · 2^52`: adding it rounds to an integer held in the low bits.
const SHIFT: f64 = f64::from_bits(0x4338000000000000);
/// The cubic's coefficients for `2^(r/32)`, highest first.
const C0: f64 = f64::from_bits(0x3ebc6af84b912394);
const C1: f64 = f64::from_bits(0x3f2ebfce50fac4f3);
const C2: f64 = f64::from_bits(0x3f962e42ff0c52d6);

/// glibc's `expf` main path (|x| below 88) in the operation order and fused multiply-adds of
/// `__expf_fma`: `z = x · 32/ln2 = k + r`, `exp(x) = 2^(k/32) · (C0 r³ + C1 r² + C2 r + 1)`.
#[inline(always)]
fn expf_fma(x: f32) -> f32 {
    let xd = f64::from(x);
    let kd = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let s = f64::from_bits(TAB[(ki & 31) as usize].wrapping_add(ki << 47));
    let z = r.mul_add(C0, C1);
    let r2 = r * r;
    let y = r.mul_add(C2, 1.0);
    let y = z.mul_add(r2, y);
    (y * s) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `step`-th f32 from `lo` to `hi` (by bit pattern, both signs' orders handled).
    fn sweep(step: u32) -> Vec<f32> {
        // Non-positive floats from -0 down to -90 are the bit patterns 0x8000_0000 upwards.
        let top = (-90.0f32).to_bits();
        let mut v: Vec<f32> = (0x8000_0000u32..=top)
            .step_by(step as usize)
            .map(f32::from_bits)
            .collect();
        v.extend([
            0.0,
            -0.0,
            -87.0,
            -86.99999,
            -87.00001,
            f32::MIN,
            f32::NEG_INFINITY,
        ]);
        v.extend((0..=1000).map(|i| -(i as f32) * 0.087));
        v
    }

    /// glibc's bits where the CPU takes the FMA path (the development and CI machines); within
    /// an ulp of f64's `exp` everywhere.
    #[test]
    fn equals_glibc_expf_to_the_bit() {
        let xs = sweep(997);
        let mut ours = xs.clone();
        exp_or_zero_in_place(&mut ours);
        let fma = cfg!(target_arch = "x86_64")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avx2");
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        let mut ulp_max = 0i64;
        for (&x, &e) in xs.iter().zip(&ours) {
            let want = exp_or_zero(x);
            if glibc && fma {
                assert_eq!(
                    e.to_bits(),
                    want.to_bits(),
                    "exp({x:e}): {e:e} vs libm {want:e}"
                );
            }
            let exact = (f64::from(x)).exp() as f32;
            if x >= -87.0 {
                ulp_max = ulp_max.max((i64::from(e.to_bits()) - i64::from(exact.to_bits())).abs());
            } else {
                assert_eq!(e, 0.0);
            }
        }
        assert!(ulp_max <= 1, "{ulp_max} ulp");
        assert!(xs.len() > 1_000_000);
    }

    #[test]
    fn nan_stays_nan_and_large_values_take_libm() {
        let mut xs = vec![-1.0, f32::NAN, -3.0];
        exp_or_zero_in_place(&mut xs);
        assert!(xs[1].is_nan());
        assert_eq!(xs[0], (-1.0f32).exp());
        let mut big = vec![-1.0, 88.5, 10.0];
        exp_or_zero_in_place(&mut big);
        assert_eq!(big, vec![(-1.0f32).exp(), 88.5f32.exp(), 10.0f32.exp()]);
        let mut none: Vec<f32> = Vec::new();
        exp_or_zero_in_place(&mut none);
    }
}
