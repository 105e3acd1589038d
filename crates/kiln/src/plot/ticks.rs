//! Axis ticks a person can read: round values (1, 2 or 5 times a power of ten), integer epochs,
//! and labels written with as many digits as the step needs and no more (never
//! `0.30000000000000004`). Pure functions, so the properties are tested on their own.

/// One labelled tick of a value axis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tick {
    /// Where the tick sits, in data units (on a log axis, the value itself, not its log).
    pub(crate) value: f64,
    pub(crate) label: String,
}

/// A value axis: its range (padded around the data), labelled ticks, and unlabelled minor ticks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValueAxis {
    pub(crate) lo: f64,
    pub(crate) hi: f64,
    /// Logarithmic: curves and ticks are placed at `log10(value)`.
    pub(crate) log: bool,
    pub(crate) major: Vec<Tick>,
    pub(crate) minor: Vec<f64>,
}

impl ValueAxis {
    /// The axis for values between `min` and `max` (finite, `min <= max`): logarithmic when
    /// every value is positive and they span more than `LOG_RATIO`, so that a term near 1e-3
    /// stays readable beside a total near 0.5; linear otherwise.
    pub(crate) fn fit(min: f64, max: f64) -> ValueAxis {
        if min > 0.0 && max / min > LOG_RATIO {
            let pad = (max / min).powf(0.04);
            let (lo, hi) = (min / pad, max * pad);
            let (major, minor) = log_ticks(lo, hi);
            ValueAxis {
                lo,
                hi,
                log: true,
                major,
                minor,
            }
        } else {
            // At least 1% of the largest magnitude, so a flat curve still gets a few ticks.
            let magnitude = min.abs().max(max.abs());
            let span = (max - min).max(if magnitude > 0.0 {
                magnitude * 0.01
            } else {
                1.0
            });
            let center = (min + max) / 2.0;
            let (lo, hi) = (center - span * 0.55, center + span * 0.55);
            // A loss never below zero gets no negative half-axis from the padding.
            let lo = if min >= 0.0 && lo < 0.0 { 0.0 } else { lo };
            ValueAxis {
                lo,
                hi,
                log: false,
                major: linear_ticks(lo, hi, 8),
                minor: Vec::new(),
            }
        }
    }

    /// Where `value` sits on the drawn axis (its log10 on a log axis).
    pub(crate) fn place(&self, value: f64) -> f64 {
        if self.log {
            value.log10()
        } else {
            value
        }
    }

    /// Whether `value` can be drawn on this axis (finite, and positive on a log axis).
    pub(crate) fn shows(&self, value: f64) -> bool {
        value.is_finite() && (!self.log || value > 0.0)
    }
}

/// Values spanning more than this ratio get a log axis.
pub(crate) const LOG_RATIO: f64 = 20.0;

/// Round ticks inside `[lo, hi]`, at most `max_ticks` of them (at least two for any range wider
/// than zero): multiples of the smallest step 1, 2 or 5 × 10^k that gives no more than
/// `max_ticks`.
pub(crate) fn linear_ticks(lo: f64, hi: f64, max_ticks: usize) -> Vec<Tick> {
    let max_ticks = max_ticks.max(2);
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return Vec::new();
    }
    let mut exp = ((hi - lo) / max_ticks as f64).log10().floor() as i32 - 1;
    loop {
        for m in [1i64, 2, 5] {
            let step = m as f64 * 10f64.powi(exp);
            let first = (lo / step).ceil() as i64;
            let last = (hi / step).floor() as i64;
            if last - first < max_ticks as i64 {
                // Parsed from the decimal, so 3 × 0.1 is the double nearest 0.3.
                let values: Vec<f64> = (first..=last)
                    .map(|i| decimal(i * m, exp))
                    .filter(|v| *v >= lo && *v <= hi)
                    .collect();
                return label_linear(&values, exp);
            }
        }
        exp += 1;
    }
}

/// Labels for multiples of a step of 10^`exp` (times 1, 2 or 5): plain decimals with the
/// step's digits, or scientific notation for very small steps and very large values.
fn label_linear(values: &[f64], exp: i32) -> Vec<Tick> {
    let largest = values.iter().fold(0f64, |m, v| m.max(v.abs()));
    let scientific = exp < -4 || largest >= 1e5;
    values
        .iter()
        .map(|&v| {
            let label = if v == 0.0 && scientific {
                "0".to_string()
            } else if scientific {
                let digits = (largest.log10().floor() as i32 - exp).max(0) as usize;
                trim_exponent(&format!("{v:.digits$e}"))
            } else {
                format!("{v:.*}", (-exp).max(0) as usize)
            };
            Tick { value: v, label }
        })
        .collect()
}

/// The double nearest `m` × 10^`k`.
fn decimal(m: i64, k: i32) -> f64 {
    format!("{m}e{k}").parse().unwrap_or(f64::NAN)
}

/// Rust writes `1.5e-4`, already short; only `e0` is dropped to keep `2.5e0` as `2.5`.
fn trim_exponent(s: &str) -> String {
    s.strip_suffix("e0")
        .map(str::to_string)
        .unwrap_or_else(|| s.to_string())
}

/// `m` × 10^`k` written short: plain for 10^-3 to 10^4, else `me k` (`2e-5`, `1e6`).
fn round_label(m: u32, k: i32) -> String {
    if (-3..=4).contains(&k) {
        format!("{:.*}", (-k).max(0) as usize, m as f64 * 10f64.powi(k))
    } else {
        format!("{m}e{k}")
    }
}

/// Ticks of a log axis over `[lo, hi]` (`0 < lo < hi`): the decades are labelled (every
/// second or third one on very long axes), and 2 × and 5 × 10^k too when fewer than four
/// decades show, so a short log axis still reads; the other multiples are minor ticks.
pub(crate) fn log_ticks(lo: f64, hi: f64) -> (Vec<Tick>, Vec<f64>) {
    if !(lo > 0.0 && hi > lo && hi.is_finite()) {
        return (Vec::new(), Vec::new());
    }
    let k_lo = lo.log10().floor() as i32;
    let k_hi = hi.log10().ceil() as i32;
    let inside = |v: f64| v >= lo && v <= hi;
    let decades: Vec<i32> = (k_lo..=k_hi).filter(|&k| inside(decimal(1, k))).collect();
    let with_25 = decades.len() < 4;
    let every = decades.len().div_ceil(8).max(1) as i32;
    let mut major = Vec::new();
    let mut minor = Vec::new();
    for k in k_lo..=k_hi {
        for m in 1..=9u32 {
            let v = decimal(m as i64, k);
            if !inside(v) {
                continue;
            }
            let labelled = if m == 1 {
                k.rem_euclid(every) == 0
            } else {
                with_25 && (m == 2 || m == 5)
            };
            if labelled {
                major.push(Tick {
                    value: v,
                    label: round_label(m, k),
                });
            } else {
                minor.push(v);
            }
        }
    }
    // A curve beyond the outer labels by more than a factor 3 gets the nearest round value
    // labelled too, so that no curve is left below (or above) every label.
    let round: Vec<f64> = minor
        .iter()
        .copied()
        .filter(|v| {
            let m = v / decimal(1, v.log10().floor() as i32);
            [1.0, 2.0, 5.0].iter().any(|r| (m - r).abs() < 1e-9)
        })
        .collect();
    let first = major.first().map(|t| t.value).unwrap_or(hi);
    let last = major.last().map(|t| t.value).unwrap_or(lo);
    let mut extra = Vec::new();
    if first / lo > 3.0 {
        extra.extend(round.iter().copied().find(|v| *v < first));
    }
    if hi / last > 3.0 {
        extra.extend(round.iter().copied().rev().find(|v| *v > last));
    }
    for v in extra {
        let k = v.log10().floor() as i32;
        let m = (v / decimal(1, k)).round() as u32;
        minor.retain(|x| *x != v);
        major.push(Tick {
            value: v,
            label: round_label(m, k),
        });
    }
    major.sort_by(|a, b| a.value.total_cmp(&b.value));
    (major, minor)
}

/// Integer epoch ticks in `1..=epochs`, at most `max_ticks`: every epoch for short runs, else
/// the multiples of 2, 5, 10, 20, 50, … that fit.
pub(crate) fn epoch_ticks(epochs: usize, max_ticks: usize) -> Vec<usize> {
    let epochs = epochs.max(1);
    let max_ticks = max_ticks.max(2);
    let mut step = 1usize;
    let mut factors = [2usize, 5, 10].iter().cycle();
    let mut decade = 1usize;
    while epochs / step > max_ticks {
        let f = *factors.next().unwrap_or(&10);
        if f == 10 {
            decade *= 10;
            step = decade;
        } else {
            step = decade * f;
        }
    }
    if step == 1 {
        (1..=epochs).collect()
    } else {
        (1..=epochs / step).map(|i| i * step).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(ticks: &[Tick]) -> Vec<&str> {
        ticks.iter().map(|t| t.label.as_str()).collect()
    }

    #[test]
    fn linear_ticks_are_round_and_written_short() {
        assert_eq!(
            labels(&linear_ticks(0.3, 0.95, 8)),
            ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
        );
        assert_eq!(
            labels(&linear_ticks(0.0, 1.0, 6)),
            ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
        );
        assert_eq!(labels(&linear_ticks(-3.0, 12.0, 4)), ["0", "5", "10"]);
        assert_eq!(
            labels(&linear_ticks(1.2e-6, 2.1e-6, 8)),
            ["1.2e-6", "1.4e-6", "1.6e-6", "1.8e-6", "2.0e-6"]
        );
        assert_eq!(
            labels(&linear_ticks(0.0, 3e5, 4)),
            ["0", "1e5", "2e5", "3e5"]
        );
    }

    #[test]
    fn log_ticks_label_decades_and_show_minor_ticks() {
        let (major, minor) = log_ticks(0.95e-6, 1.1);
        assert_eq!(
            labels(&major),
            ["1e-6", "1e-5", "1e-4", "0.001", "0.01", "0.1", "1"]
        );
        assert_eq!(minor.len(), 6 * 8);
        // Under four decades: 2 and 5 are labelled too.
        let (major, minor) = log_ticks(0.0019, 0.95);
        assert_eq!(
            labels(&major),
            ["0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5"]
        );
        assert_eq!(minor.len(), 18);
        assert!(minor.contains(&0.003) && minor.contains(&0.9));
        // Very long axes label every second decade, and the outermost values when a curve
        // would lie beyond every label.
        let (major, _) = log_ticks(1e-12, 10.0);
        assert_eq!(
            labels(&major),
            ["1e-12", "1e-10", "1e-8", "1e-6", "1e-4", "0.01", "1", "10"]
        );
        let (major, _) = log_ticks(1.5e-4, 3.0);
        assert_eq!(labels(&major), ["2e-4", "0.001", "0.01", "0.1", "1"]);
    }

    #[test]
    fn epoch_ticks_are_integers_that_fit() {
        assert_eq!(epoch_ticks(1, 10), [1]);
        assert_eq!(epoch_ticks(3, 10), [1, 2, 3]);
        assert_eq!(epoch_ticks(10, 10), (1..=10).collect::<Vec<_>>());
        assert_eq!(epoch_ticks(25, 10), [5, 10, 15, 20, 25]);
        assert_eq!(epoch_ticks(300, 10), [50, 100, 150, 200, 250, 300]);
        assert_eq!(
            epoch_ticks(1000, 10),
            (1..=10).map(|i| i * 100).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_axis_is_log_only_for_wide_positive_ranges() {
        assert!(ValueAxis::fit(1e-3, 0.5).log);
        assert!(!ValueAxis::fit(0.34, 0.9).log);
        assert!(!ValueAxis::fit(-0.9, 0.5).log);
        let flat = ValueAxis::fit(0.25, 0.25);
        assert!(flat.major.len() >= 2 && flat.lo < 0.25 && flat.hi > 0.25);
        let zero = ValueAxis::fit(0.0, 0.0);
        assert!(zero.major.len() >= 2);
    }

    fn check_ticks(ticks: &[Tick], lo: f64, hi: f64) -> Result<(), TestCaseError> {
        prop_assert!(ticks.len() >= 2, "{lo}..{hi}: {ticks:?}");
        for w in ticks.windows(2) {
            prop_assert!(w[0].value < w[1].value, "{ticks:?}");
            prop_assert!(w[0].label != w[1].label, "{ticks:?}");
        }
        for t in ticks {
            prop_assert!(t.value >= lo && t.value <= hi, "{t:?} outside {lo}..{hi}");
            prop_assert!(t.label.len() <= 9, "{t:?} too long");
            // The label reads back as the tick's value, to the label's own precision.
            let read: f64 = t.label.parse().unwrap();
            prop_assert!(
                (read - t.value).abs() <= 1e-9 * t.value.abs().max(1e-300),
                "{t:?} reads as {read}"
            );
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn linear_ticks_are_round_increasing_unique_inside(
            a in -1e6f64..1e6, exp in -9i32..6, frac in 0.001f64..1.0,
        ) {
            let scale = 10f64.powi(exp);
            let (lo, hi) = (a * scale, a * scale + frac * scale * 10.0);
            let axis = ValueAxis::fit(lo, hi);
            prop_assume!(!axis.log);
            check_ticks(&axis.major, axis.lo, axis.hi)?;
            prop_assert!(axis.major.len() <= 8);
            // Round: each value is 1, 2 or 5 times a power of ten times an integer, i.e. the
            // step between ticks is.
            if axis.major.len() >= 2 {
                let step = axis.major[1].value - axis.major[0].value;
                let m = step / 10f64.powf(step.log10().floor());
                prop_assert!(
                    [1.0, 2.0, 5.0, 10.0].iter().any(|r| (m - r).abs() < 1e-6),
                    "step {step}"
                );
            }
        }

        #[test]
        fn log_ticks_are_decades_increasing_unique_inside(
            lo_exp in -15.0f64..5.0, decades in 1.31f64..14.0,
        ) {
            let lo = 10f64.powf(lo_exp);
            let hi = lo * 10f64.powf(decades);
            let (major, minor) = log_ticks(lo, hi);
            check_ticks(&major, lo, hi)?;
            prop_assert!(major.len() <= 12, "{major:?}");
            for v in &minor {
                prop_assert!(*v >= lo && *v <= hi);
                prop_assert!(major.iter().all(|t| t.value != *v));
            }
            // Every labelled tick is 1, 2 or 5 × 10^k.
            for t in &major {
                let m = t.value / 10f64.powf(t.value.log10().floor());
                prop_assert!([1.0, 2.0, 5.0].iter().any(|r| (m - r).abs() < 1e-9), "{t:?}");
            }
        }

        #[test]
        fn epoch_ticks_are_integers_increasing_inside(epochs in 1usize..100_000, max in 2usize..15) {
            let ticks = epoch_ticks(epochs, max);
            prop_assert!(!ticks.is_empty() && ticks.len() <= max, "{ticks:?}");
            prop_assert!(ticks.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(ticks.iter().all(|&t| (1..=epochs).contains(&t)));
        }
    }
}
