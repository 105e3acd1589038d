//! The progress display of `fit`, as Keras' `Progbar` shows it: on a terminal, a live bar per
//! epoch with the elapsed time, the ETA, the time per step and the running values, then the
//! validation pass's own bar; after each epoch, one plain line with the epoch's duration, the
//! time per step and every value. Off a terminal (a log file, a pipe) only the epoch lines are
//! written: no bar, no control characters.

use super::Logs;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::time::Instant;

/// A value as Keras' progress bar writes it: four decimals, or scientific notation with four
/// when its magnitude is 1e-3 or less (`0.1235`, `1.2346e-04`, `0.0000e+00`, `nan`).
pub(crate) fn format_value(v: f64) -> String {
    if v.abs() > 1e-3 {
        format!("{v:.4}")
    } else if v.is_nan() {
        "nan".to_string()
    } else {
        python_exp(v, 4)
    }
}

/// `v` as Python's `f"{v:.{digits}e}"`: the exponent signed and of at least two digits.
fn python_exp(v: f64, digits: usize) -> String {
    let s = format!("{v:.digits$e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// A remaining time as Keras writes its ETA: `7s`, `2:05`, `1:02:05` (whole seconds, cut).
pub(crate) fn format_eta(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    if secs > 3600.0 {
        format!("{}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
    } else if secs > 60.0 {
        format!("{}:{:02}", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The time one step takes, as Keras writes it: `2s/step`, `15ms/step`, `850us/step`.
pub(crate) fn format_step_time(secs: f64) -> String {
    if secs >= 1.0 || secs == 0.0 {
        format!("{secs:.0}s/step")
    } else if secs >= 1e-3 {
        format!("{:.0}ms/step", secs * 1e3)
    } else {
        format!("{:.0}us/step", secs * 1e6)
    }
}

/// An elapsed time, with the precision a short epoch needs (Keras' whole seconds would say
/// `0s` for most of kiln's epochs): `420ms`, `3.2s`, then Keras' `1:05` and `1:00:05`.
pub(crate) fn format_duration(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0}ms", secs.max(0.0) * 1e3)
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format_eta(secs)
    }
}

/// The values of an epoch line or of the bar: `loss: 0.1234 - l2: 1.2340e-04`, without
/// `epoch_time_s` (the line shows the duration in its own place) and without the gradient
/// cosines (one per pair of terms: too many for a line; the history and `grad_cos.png` have
/// them). The gradient norms are shown, the validation ones too.
pub(crate) fn format_logs(logs: &Logs) -> String {
    logs.iter()
        .filter(|(k, _)| *k != "epoch_time_s" && !is_cosine(k))
        .map(|(k, v)| format!("{k}: {}", format_value(v)))
        .collect::<Vec<_>>()
        .join(" - ")
}

/// A gradient cosine, on the training or the validation data.
fn is_cosine(key: &str) -> bool {
    key.strip_prefix("val_")
        .unwrap_or(key)
        .starts_with("grad_cos/")
}

/// Keras' estimate of one step's duration: the first step (compilation, warm-up) is left out
/// once there are others.
#[derive(Debug, Clone)]
struct StepClock {
    start: Instant,
    after_first: Option<Instant>,
}

impl StepClock {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            after_first: None,
        }
    }

    fn per_step(&mut self, done: usize, now: Instant) -> f64 {
        if done == 0 {
            return 0.0;
        }
        let per_step = match self.after_first {
            Some(t) if done > 1 => (now - t).as_secs_f64() / (done - 1) as f64,
            _ => (now - self.start).as_secs_f64() / done as f64,
        };
        if done == 1 {
            self.after_first = Some(now);
        }
        per_step
    }
}

/// How often the bar's running values are rebuilt at most (Keras' `interval`); the times are
/// computed whenever the bar is drawn.
const REDRAW_SECONDS: f64 = 0.05;

/// The bar's times, computed as it is drawn so they always match its position: the epoch's
/// elapsed time, then the ETA and the time per step of the phase shown (training or validation).
fn timing(epoch_start: Instant) -> impl Fn(&ProgressState, &mut dyn std::fmt::Write) + Clone {
    move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
        let done = state.pos();
        let per_step = if done == 0 {
            0.0
        } else {
            state.elapsed().as_secs_f64() / done as f64
        };
        let left = state.len().unwrap_or(done).saturating_sub(done);
        let _ = write!(
            w,
            "{} elapsed, ETA {}, {}",
            format_duration(epoch_start.elapsed().as_secs_f64()),
            format_eta(per_step * left as f64),
            format_step_time(per_step)
        );
    }
}

/// The display of one epoch: its bar (hidden off a terminal or when quiet) and its clocks.
pub(crate) struct EpochProgress {
    verbose: bool,
    header: String,
    bar: ProgressBar,
    start: Instant,
    train: StepClock,
    train_step_time: f64,
    last_message: Option<Instant>,
}

impl EpochProgress {
    /// Starts epoch `epoch` (from 0) of `epochs`, with `steps` training batches.
    pub(crate) fn new(verbose: bool, steps: usize, epoch: usize, epochs: usize) -> Self {
        let bar = if verbose {
            ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        let header = format!("Epoch {}/{}", epoch + 1, epochs);
        let now = Instant::now();
        if let Ok(style) =
            ProgressStyle::with_template("{prefix} {pos}/{len} [{bar:20}] {timing}{wide_msg}")
        {
            bar.set_style(style.progress_chars("=> ").with_key("timing", timing(now)));
        }
        bar.set_prefix(header.clone());
        Self {
            verbose,
            header,
            bar,
            start: now,
            train: StepClock::new(now),
            train_step_time: 0.0,
            last_message: None,
        }
    }

    /// `done` training batches of the epoch are finished; `running` holds the running means.
    pub(crate) fn train_step(&mut self, done: usize, running: &Logs) {
        let now = Instant::now();
        self.train_step_time = self.train.per_step(done, now);
        if !self.verbose || self.bar.is_hidden() {
            return;
        }
        self.bar.set_position(done as u64);
        let due = self
            .last_message
            .is_none_or(|t| (now - t).as_secs_f64() >= REDRAW_SECONDS);
        if due {
            self.last_message = Some(now);
            self.bar.set_message(format!(" - {}", format_logs(running)));
        }
    }

    /// The validation pass begins, with `steps` batches: the bar shows its progress instead.
    pub(crate) fn start_validation(&mut self, steps: usize) {
        if self.bar.is_hidden() {
            return;
        }
        // The prefix last: each change may draw, and the bar should never show the training
        // count under the validation prefix.
        self.bar.set_message("");
        self.bar.set_length(steps as u64);
        self.bar.set_position(0);
        self.bar.reset_elapsed();
        self.bar.set_prefix(format!("{} validation", self.header));
    }

    /// `done` validation batches are finished.
    pub(crate) fn validation_step(&mut self, done: usize) {
        self.bar.set_position(done as u64);
    }

    /// Seconds since the epoch began: training and validation (recorded as `epoch_time_s`).
    pub(crate) fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Clears the bar and writes the epoch's line (when verbose): `Epoch 3/40 - 420ms -
    /// 9ms/step - loss: 0.1234 - …`, the duration taken from `epoch_time_s` when set.
    pub(crate) fn finish(self, logs: &Logs) {
        self.bar.finish_and_clear();
        if self.verbose {
            let secs = logs.get("epoch_time_s").unwrap_or_else(|| self.elapsed_s());
            eprintln!(
                "{}",
                epoch_line(&self.header, secs, self.train_step_time, logs)
            );
        }
    }
}

/// The line written after each epoch.
pub(crate) fn epoch_line(header: &str, secs: f64, step_secs: f64, logs: &Logs) -> String {
    let values = format_logs(logs);
    let mut line = format!(
        "{header} - {} - {}",
        format_duration(secs),
        format_step_time(step_secs)
    );
    if !values.is_empty() {
        line.push_str(" - ");
        line.push_str(&values);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn values_are_written_as_keras_writes_them() {
        // Expected strings from Python: f"{v:.4f}" if abs(v) > 1e-3 else f"{v:.4e}".
        assert_eq!(format_value(0.123456), "0.1235");
        assert_eq!(format_value(12345.678), "12345.6780");
        assert_eq!(format_value(-0.5), "-0.5000");
        assert_eq!(format_value(0.0011), "0.0011");
        assert_eq!(format_value(0.001), "1.0000e-03");
        assert_eq!(format_value(0.00012345), "1.2345e-04");
        assert_eq!(format_value(-2.5e-7), "-2.5000e-07");
        assert_eq!(format_value(1e-123), "1.0000e-123");
        assert_eq!(format_value(0.0), "0.0000e+00");
        assert_eq!(format_value(f64::NAN), "nan");
        assert_eq!(format_value(f64::INFINITY), "inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn times_are_written_as_keras_writes_them() {
        assert_eq!(format_eta(0.0), "0s");
        assert_eq!(format_eta(7.9), "7s");
        assert_eq!(format_eta(60.0), "60s");
        assert_eq!(format_eta(125.0), "2:05");
        assert_eq!(format_eta(3725.0), "1:02:05");
        assert_eq!(format_step_time(2.4), "2s/step");
        assert_eq!(format_step_time(0.0), "0s/step");
        assert_eq!(format_step_time(0.0153), "15ms/step");
        assert_eq!(format_step_time(0.00085), "850us/step");
        assert_eq!(format_duration(0.4204), "420ms");
        assert_eq!(format_duration(3.24), "3.2s");
        assert_eq!(format_duration(65.0), "1:05");
    }

    #[test]
    fn the_step_time_leaves_out_the_first_step() {
        let t0 = Instant::now();
        let mut clock = StepClock::new(t0);
        // A slow first step (1 s), then steps of 10 ms.
        assert!((clock.per_step(1, t0 + Duration::from_secs(1)) - 1.0).abs() < 1e-9);
        let later = t0 + Duration::from_millis(1030);
        assert!((clock.per_step(4, later) - 0.010).abs() < 1e-9);
    }

    #[test]
    fn the_epoch_line_has_the_duration_step_time_and_every_value() {
        let mut logs = Logs::default();
        logs.set("loss", 0.25);
        logs.set("l2", 0.000321);
        logs.set("val_loss", 0.5);
        logs.set("epoch_time_s", 0.42);
        assert_eq!(
            epoch_line("Epoch 3/40", 0.42, 0.009, &logs),
            "Epoch 3/40 - 420ms - 9ms/step - loss: 0.2500 - l2: 3.2100e-04 - val_loss: 0.5000"
        );
    }
}
