//! `exp`, `tanh` and the logistic sigmoid for f32 as branch-free polynomials that the compiler
//! can vectorize.
//!
//! The recurrent kernels evaluate five of these per unit, step and sample (an R1 step: 2 million);
//! glibc's `tanhf`/`expm1f` calls are opaque to the vectorizer and were 21% of an LSTM step.
//! These follow the classic range reductions (Cody–Waite for `exp`, an odd minimax polynomial
//! for small `tanh`), accurate to a few float32 ulps, which the tests check over the whole range.

/// `log2(e)`.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split so that `n · LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5 · 2²³ rounds a float32 of magnitude below 2²² to an integer.
const ROUND: f32 = 12_582_912.0;

/// `eˣ`, for `x` clamped to [-87, 88] (so `2ⁿ` stays a normal float32).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2ⁿ built from its exponent bits; n is in [-126, 127] after the clamp. Its integer is read
    // from the low bits of `shifted` (spaced 1 apart there) rather than with `n as i32`, whose
    // saturating conversion the vectorizer turns into one compare per lane.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `tanh x`: an odd polynomial below |x| = 0.625 (where `1 - 2/(e²ˣ + 1)` would cancel), the
/// exponential form above.
#[inline(always)]
pub(crate) fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let mut p = -5.704_988_7e-3_f32;
    p = p * z + 2.063_909e-2;
    p = p * z - 5.373_971_6e-2;
    p = p * z + 1.333_144_2e-1;
    p = p * z - 3.333_328e-1;
    let small = p * z * x + x;
    let large = (1.0 - 2.0 / (exp_f32(2.0 * a) + 1.0)).copysign(x);
    if a < 0.625 {
        small
    } else {
        large
    }
}

/// The logistic sigmoid `1 / (1 + e⁻ˣ)`.
#[inline(always)]
pub(crate) fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `step`-th float32 in [-lo, lo] and its neighbours around zero.
    fn samples(lo: f32, count: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..=count)
            .map(|i| -lo + 2.0 * lo * i as f32 / count as f32)
            .collect();
        v.extend([
            0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 0.625, -0.625, 0.6249999,
        ]);
        v
    }

    /// The largest error relative to `max(|exact|, floor)`, in units of f32 epsilon.
    fn worst(f: impl Fn(f32) -> f32, exact: impl Fn(f64) -> f64, xs: &[f32], floor: f64) -> f64 {
        xs.iter()
            .map(|&x| {
                let (got, want) = (f(x) as f64, exact(x as f64));
                (got - want).abs() / want.abs().max(floor) / f32::EPSILON as f64
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn exp_is_within_a_few_ulps() {
        let xs = samples(87.0, 400_000);
        let e = worst(exp_f32, f64::exp, &xs, 0.0);
        assert!(e < 4.0, "exp: {e} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(200.0).is_finite() && exp_f32(-200.0) >= 0.0);
    }

    #[test]
    fn tanh_is_within_a_few_ulps_and_odd() {
        let xs = samples(20.0, 400_000);
        let e = worst(tanh_f32, f64::tanh, &xs, f64::MIN_POSITIVE);
        assert!(e < 4.0, "tanh: {e} ulp");
        for &x in &xs {
            assert_eq!(tanh_f32(-x), -tanh_f32(x), "{x}");
        }
        assert_eq!(tanh_f32(100.0), 1.0);
        assert_eq!(tanh_f32(-1e4), -1.0);
    }

    #[test]
    fn sigmoid_is_within_a_few_ulps() {
        let xs = samples(80.0, 400_000);
        let exact = |x: f64| 1.0 / (1.0 + (-x).exp());
        let e = worst(sigmoid_f32, exact, &xs, 1e-30);
        assert!(e < 4.0, "sigmoid: {e} ulp");
        assert_eq!(sigmoid_f32(0.0), 0.5);
        assert_eq!(sigmoid_f32(100.0), 1.0);
        assert!(sigmoid_f32(-100.0) < 1e-37);
    }
}
