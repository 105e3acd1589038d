//! Whether a training step runs split across kiln's pool or on the calling thread alone,
//! chosen from measured step times.
//!
//! A split step waits at every parallel region for its slowest thread. When another process
//! keeps a core busy, the thread that shares that core now and then loses it for a whole time
//! slice, and the step stalls: on the 2-core machine measured, W1 with one core busy (W4) ran
//! at 194–334 steps/s from one run to the next, while one thread alone kept 331–335, its speed
//! on a quiet machine. So kiln times its steps, now and then tries two the other way, and
//! switches when that is clearly faster. Both ways split the work into the same pieces (see
//! [`crate::runtime::matmul_threads`]), so they give the same results, bit for bit, and the
//! choice never changes what is learned.

use std::collections::VecDeque;
use std::time::Instant;

/// Steps timed in a row when trying the other way; the slower of them counts, so that one
/// lucky step does not switch.
const PROBE_STEPS: usize = 2;
/// Steps before the first try, and after a switch.
const FIRST_INTERVAL: u64 = 64;
/// The longest wait between tries: a core taken later is noticed within this many steps.
const LONGEST_INTERVAL: u64 = 1024;
/// The other way must take at most this share of the current way's time to win: step times
/// vary by a few per cent from step to step.
const SWITCH_BELOW: f64 = 0.9;
/// Recent steps the current way is judged by, on their mean: a step split across the pool now
/// and then stalls for a whole time slice when a busy process takes its core, and those stalls
/// are most of what a busy core costs (on W4 the median step split across the pool was as fast
/// as one thread alone, 21–23 µs a sample, while the mean made the run 20% slower).
const RECENT: usize = 32;

/// How training steps run, and the timings that decide it (one per model).
#[derive(Debug, Clone)]
pub(crate) struct ThreadChoice {
    /// Whether steps run split across the pool (else on the calling thread).
    pooled: bool,
    /// Seconds per sample of the latest steps run the current way.
    recent: VecDeque<f64>,
    /// Seconds per sample of the steps of the try in progress.
    trial: Vec<f64>,
    /// Steps to run the current way before the next try.
    until_trial: u64,
    /// The wait between tries: doubled each time a try loses.
    interval: u64,
    /// The batch size steps are timed at (the largest seen): a smaller last batch of an epoch
    /// costs nearly a whole step, and its time per sample would mislead.
    usual: usize,
}

impl Default for ThreadChoice {
    fn default() -> Self {
        Self {
            pooled: true,
            recent: VecDeque::new(),
            trial: Vec::new(),
            until_trial: FIRST_INTERVAL,
            interval: FIRST_INTERVAL,
            usual: 0,
        }
    }
}

impl ThreadChoice {
    /// Runs one training step of `samples` samples, the way chosen so far or, now and then,
    /// the other way, and records how long it took.
    pub(crate) fn run<R: Send>(&mut self, samples: usize, step: impl FnOnce() -> R + Send) -> R {
        if super::matmul_threads() < 2 {
            return super::on_matmul_pool(step);
        }
        let (pooled, timed) = self.plan(samples);
        let start = Instant::now();
        let result = match pooled {
            true => super::on_matmul_pool(step),
            false => super::on_one_thread(step),
        };
        if timed {
            self.record(start.elapsed().as_secs_f64() / samples.max(1) as f64);
        }
        result
    }

    /// How a step of `samples` samples runs: on the pool or not, and whether it is timed (then
    /// [`Self::record`] must follow). Only steps of the usual batch size are timed.
    fn plan(&mut self, samples: usize) -> (bool, bool) {
        if samples > self.usual {
            // A new batch size: earlier times per sample do not compare.
            self.usual = samples;
            self.recent.clear();
            self.trial.clear();
        }
        match samples < self.usual {
            true => (self.pooled, false),
            false => (self.next_pooled(), true),
        }
    }

    /// Whether the next step runs on the pool.
    fn next_pooled(&self) -> bool {
        self.pooled != self.trying()
    }

    /// Whether a try of the other way is in progress (or due).
    fn trying(&self) -> bool {
        self.until_trial == 0
    }

    /// Records the time per sample of the step just run the way [`Self::next_pooled`] said.
    fn record(&mut self, seconds_per_sample: f64) {
        if !self.trying() {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(seconds_per_sample);
            self.until_trial -= 1;
            return;
        }
        self.trial.push(seconds_per_sample);
        if self.trial.len() < PROBE_STEPS {
            return;
        }
        let other = self.trial.iter().copied().fold(0.0, f64::max);
        // No history (never the case after FIRST_INTERVAL steps) is no reason to switch.
        let current = match self.recent.len() {
            0 => 0.0,
            n => self.recent.iter().sum::<f64>() / n as f64,
        };
        self.trial.clear();
        if other < SWITCH_BELOW * current {
            self.pooled = !self.pooled;
            self.recent.clear();
            self.interval = FIRST_INTERVAL;
        } else {
            self.interval = (self.interval * 2).min(LONGEST_INTERVAL);
        }
        self.until_trial = self.interval;
    }

    /// A choice that never tries the other way, for tests.
    #[cfg(test)]
    pub(crate) fn fixed(pooled: bool) -> Self {
        Self {
            pooled,
            until_trial: u64::MAX,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `choice` steps that take `pooled` or `alone` seconds per sample, the way it asks
    /// for, and returns how many of them ran on the pool.
    fn feed(choice: &mut ThreadChoice, steps: usize, pooled: f64, alone: f64) -> usize {
        let mut on_pool = 0;
        for _ in 0..steps {
            let (p, timed) = choice.plan(100);
            assert!(timed);
            on_pool += usize::from(p);
            choice.record(if p { pooled } else { alone });
        }
        on_pool
    }

    /// A busy core (one thread alone clearly faster) moves steps off the pool; on a quiet
    /// machine the pool stays, tries grow rare, and a core freed later brings steps back.
    #[test]
    fn switches_only_when_the_other_way_is_clearly_faster() {
        let mut choice = ThreadChoice::default();
        // Quiet: the pool at 2.1 ms, one thread at 3.0. Tries lose; each costs 2 steps, after
        // 64, 128, 256, 512 and 1024 steps.
        let on_pool = feed(&mut choice, 2000, 2.1, 3.0);
        assert!(choice.pooled);
        assert_eq!(2000 - on_pool, 5 * PROBE_STEPS);
        assert_eq!(choice.interval, LONGEST_INTERVAL);
        // A core gets busy: the pool drops to 4.0 ms a step, one thread keeps 3.0. Noticed at
        // the next try, at most 1024 steps on.
        feed(
            &mut choice,
            LONGEST_INTERVAL as usize + 2 * PROBE_STEPS,
            4.0,
            3.0,
        );
        assert!(!choice.pooled);
        // Within 10% of each other: no switch back.
        feed(&mut choice, 500, 2.9, 3.0);
        assert!(!choice.pooled);
        // The core is free again: back to the pool within one interval.
        feed(
            &mut choice,
            LONGEST_INTERVAL as usize + 2 * PROBE_STEPS,
            2.1,
            3.0,
        );
        assert!(choice.pooled);
    }

    /// The small last batch of each epoch (here every 10th step, 2 samples for a step's fixed
    /// cost of 100 samples) is not timed, so it cannot make the other way look faster.
    #[test]
    fn small_last_batches_are_not_timed() {
        let mut choice = ThreadChoice::default();
        for step in 0..2000 {
            let samples = if step % 10 == 9 { 2 } else { 100 };
            let (pooled, timed) = choice.plan(samples);
            assert_eq!(timed, samples == 100);
            if timed {
                // Per sample: 2.1 on the pool, 3.0 alone; a 2-sample batch would read 50×.
                choice.record(if pooled { 2.1 } else { 3.0 });
            }
        }
        assert!(choice.pooled);
        assert_eq!(choice.interval, LONGEST_INTERVAL);
    }

    /// One lucky step in a try does not flip the choice: the slower step of the try counts.
    #[test]
    fn one_fast_step_does_not_switch() {
        let mut choice = ThreadChoice::default();
        feed(&mut choice, FIRST_INTERVAL as usize, 2.0, 0.0);
        assert!(choice.trying());
        assert!(!choice.plan(100).0);
        choice.record(1.0);
        choice.record(2.5);
        assert!(choice.pooled);
        assert!(!choice.trying());
    }
}
