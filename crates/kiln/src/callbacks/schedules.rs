//! Learning-rate schedules and plateaus.

use super::{improved, monitored, Callback, Control, Mode};
use crate::error::Result;
use crate::model::{Logs, Model};

/// A learning rate as a function of the epoch.
///
/// ```
/// use kiln::callbacks::Schedule;
/// let step = Schedule::Step { initial: 0.1, factor: 0.5, every: 10 };
/// assert_eq!(step.learning_rate(25), 0.025);
/// let cosine = Schedule::Cosine { initial: 1.0, decay_epochs: 10, alpha: 0.0 };
/// assert!((cosine.learning_rate(5) - 0.5).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// `initial · factor^(epoch / every)` (integer division).
    Step {
        /// The first learning rate.
        initial: f64,
        /// The factor applied every `every` epochs.
        factor: f64,
        /// Epochs between drops.
        every: usize,
    },
    /// `initial · rate^(epoch / decay_epochs)`.
    Exponential {
        /// The first learning rate.
        initial: f64,
        /// The decay over `decay_epochs`.
        rate: f64,
        /// Epochs over which the rate is applied once.
        decay_epochs: f64,
    },
    /// Cosine decay from `initial` to `alpha · initial` over `decay_epochs`, then constant.
    Cosine {
        /// The first learning rate.
        initial: f64,
        /// Epochs to decay over.
        decay_epochs: usize,
        /// The final fraction of `initial`.
        alpha: f64,
    },
}

impl Schedule {
    /// The learning rate of `epoch` (0-based).
    pub fn learning_rate(&self, epoch: usize) -> f64 {
        match *self {
            Schedule::Step {
                initial,
                factor,
                every,
            } => initial * factor.powi((epoch / every.max(1)) as i32),
            Schedule::Exponential {
                initial,
                rate,
                decay_epochs,
            } => initial * rate.powf(epoch as f64 / decay_epochs),
            Schedule::Cosine {
                initial,
                decay_epochs,
                alpha,
            } => {
                let progress = (epoch.min(decay_epochs) as f64) / (decay_epochs.max(1) as f64);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                initial * ((1.0 - alpha) * cosine + alpha)
            }
        }
    }
}

/// Sets the learning rate from a [`Schedule`] at the start of every epoch, and logs it as `learning_rate` (Keras 3's key).
pub struct LearningRateScheduler {
    schedule: Schedule,
}

impl LearningRateScheduler {
    /// Follows `schedule`.
    pub fn new(schedule: Schedule) -> Self {
        Self { schedule }
    }
}

/// Refuses a callback that sets the learning rate of an optimizer that follows a schedule.
fn refuse_scheduled(callback: &str, model: &Model) -> Result<()> {
    match model.learning_rate_schedule() {
        Some(s) => Err(crate::error::invalid(format!(
            "{callback}: the optimizer's learning rate follows the schedule {}, which sets every \
             step's rate; use the callback or the schedule, not both",
            s.class_name()
        ))),
        None => Ok(()),
    }
}

impl Callback for LearningRateScheduler {
    fn on_train_begin(&mut self, model: &mut Model) -> Result<()> {
        refuse_scheduled("LearningRateScheduler", model)
    }
    fn on_epoch_begin(&mut self, epoch: usize, model: &mut Model) -> Result<()> {
        model.set_learning_rate(self.schedule.learning_rate(epoch))
    }
    fn on_epoch_end(
        &mut self,
        _epoch: usize,
        logs: &mut Logs,
        model: &mut Model,
    ) -> Result<Control> {
        if let Some(lr) = model.learning_rate() {
            logs.set("learning_rate", lr);
        }
        Ok(Control::Continue)
    }
}

/// Multiplies the learning rate by `factor` when a monitored value stops improving, and logs it
/// as `learning_rate` at every epoch end (Keras 3's key, in the history and the CSV log).
///
/// ```
/// let plateau = kiln::callbacks::ReduceLROnPlateau::new("val_loss").factor(0.5).patience(2);
/// ```
pub struct ReduceLROnPlateau {
    monitor: String,
    factor: f64,
    patience: usize,
    min_delta: f64,
    cooldown: usize,
    min_lr: f64,
    mode: Mode,
    best: Option<f64>,
    wait: usize,
    cooldown_left: usize,
}

impl ReduceLROnPlateau {
    /// Keras' defaults: factor 0.1, patience 10, min_delta 1e-4, no cooldown, min_lr 0.
    pub fn new(monitor: impl Into<String>) -> Self {
        Self {
            monitor: monitor.into(),
            factor: 0.1,
            patience: 10,
            min_delta: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
            mode: Mode::Auto,
            best: None,
            wait: 0,
            cooldown_left: 0,
        }
    }
    /// The factor applied to the learning rate, in (0, 1).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }
    /// Epochs without improvement before reducing.
    pub fn patience(mut self, patience: usize) -> Self {
        self.patience = patience;
        self
    }
    /// Epochs to wait after a reduction before counting again.
    pub fn cooldown(mut self, cooldown: usize) -> Self {
        self.cooldown = cooldown;
        self
    }
    /// The learning rate is never reduced below this.
    pub fn min_lr(mut self, min_lr: f64) -> Self {
        self.min_lr = min_lr;
        self
    }
    /// The smallest change that counts as an improvement.
    pub fn min_delta(mut self, min_delta: f64) -> Self {
        self.min_delta = min_delta;
        self
    }
    /// Whether smaller or larger is better.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

impl Callback for ReduceLROnPlateau {
    fn on_train_begin(&mut self, model: &mut Model) -> Result<()> {
        refuse_scheduled("ReduceLROnPlateau", model)
    }
    fn state(&self) -> Option<serde_json::Value> {
        Some(
            serde_json::json!({ "best": self.best, "wait": self.wait, "cooldown_left": self.cooldown_left }),
        )
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.best = super::state_field(state, "best", "ReduceLROnPlateau")?;
        self.wait = super::state_field(state, "wait", "ReduceLROnPlateau")?;
        self.cooldown_left = super::state_field(state, "cooldown_left", "ReduceLROnPlateau")?;
        Ok(())
    }
    fn on_epoch_end(
        &mut self,
        _epoch: usize,
        logs: &mut Logs,
        model: &mut Model,
    ) -> Result<Control> {
        if !(self.factor > 0.0 && self.factor < 1.0) {
            return Err(crate::error::invalid(format!(
                "ReduceLROnPlateau: factor must be in (0, 1), got {}",
                self.factor
            )));
        }
        let current = monitored(logs, &self.monitor, "ReduceLROnPlateau")?;
        let larger = self.mode.larger_is_better(&self.monitor);
        if self.cooldown_left > 0 {
            self.cooldown_left -= 1;
            self.wait = 0;
        }
        if self
            .best
            .is_none_or(|b| improved(current, b, self.min_delta, larger))
        {
            self.best = Some(current);
            self.wait = 0;
        } else if self.cooldown_left == 0 {
            self.wait += 1;
            if self.wait >= self.patience {
                if let Some(lr) = model.learning_rate() {
                    let new_lr = (lr * self.factor).max(self.min_lr);
                    if new_lr < lr {
                        model.set_learning_rate(new_lr)?;
                    }
                }
                self.cooldown_left = self.cooldown;
                self.wait = 0;
            }
        }
        if let Some(lr) = model.learning_rate() {
            logs.set("learning_rate", lr);
        }
        Ok(Control::Continue)
    }
}
