//! Optimizers with Keras 3's update rules and defaults, and gradient clipping.

mod adam;
mod fused;
mod more;
mod rmsprop;
mod schedule;
mod sgd;

pub use adam::{Adam, AdamW};
pub use more::{Adadelta, Adagrad, Adamax, Lion, Nadam};
pub use rmsprop::RmsProp;
pub use schedule::{LearningRateSchedule, Scheduled};
pub use sgd::Sgd;

use crate::error::{invalid, Result};
use crate::losses::config::Bounds;
use candle_core::{Tensor, TensorId, Var};

/// Updates weights from their gradients.
///
/// `step` receives the trainable variables and their gradients in a fixed order (the same
/// every call), so an optimizer can keep its state by position. `Send + Sync`: a model, its
/// optimizer included, runs its steps, evaluations and predictions on kiln's worker threads.
pub trait Optimizer: Send + Sync + std::fmt::Debug + CloneOptimizer {
    /// The optimizer's name (`adam`, `sgd`, …).
    fn name(&self) -> &str;
    /// The current learning rate.
    fn learning_rate(&self) -> f64;
    /// Changes the learning rate (schedules and callbacks use this).
    fn set_learning_rate(&mut self, lr: f64);
    /// The learning-rate schedule the rate follows, if any ([`Optimizer::with_schedule`]): the
    /// trainer then sets the rate of every iteration itself, and refuses callbacks or calls
    /// that set it.
    fn schedule(&self) -> Option<&LearningRateSchedule> {
        None
    }
    /// This optimizer with its learning rate following `schedule` (Keras'
    /// `learning_rate=keras.optimizers.schedules.…`), whatever rate it was built with.
    ///
    /// ```
    /// use kiln::optimizers::{LearningRateSchedule, Optimizer, Sgd};
    /// let opt = Sgd::new(0.1).momentum(0.9).with_schedule(LearningRateSchedule::PiecewiseConstantDecay {
    ///     boundaries: vec![100.0], values: vec![0.1, 0.01],
    /// });
    /// assert_eq!(opt.learning_rate(), 0.1f32 as f64);
    /// assert!(opt.schedule().is_some());
    /// ```
    fn with_schedule(self, schedule: LearningRateSchedule) -> Scheduled
    where
        Self: Sized + 'static,
    {
        Scheduled::new(Box::new(self), schedule)
    }
    /// The gradient clipping applied before each update.
    fn clipping(&self) -> Clipping;
    /// Decoupled weight decay (`var -= var · wd · lr` before the update), if any.
    fn weight_decay(&self) -> Option<f64> {
        None
    }
    /// Checks the optimizer's own hyperparameters (decay rates, epsilon, momentum, weight decay)
    /// before the first step; `compile` calls it. The default accepts everything.
    ///
    /// ```
    /// use kiln::optimizers::{Adam, Optimizer};
    /// assert!(Adam::new(1e-3).validate().is_ok());
    /// assert!(Adam::new(1e-3).beta_1(1.5).validate().is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidArgument`] naming the optimizer, the hyperparameter, its value and
    /// the allowed range.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    /// The optimizer as Keras 3 serializes it in a `compile_config` (`{"module",
    /// "class_name", "config", "registered_name"}`, with every hyperparameter and the current
    /// learning rate), for [`crate::Model::save_keras`]; `None` (the default) for an optimizer
    /// Keras has no class for, which `save_keras` refuses, naming it.
    ///
    /// ```
    /// use kiln::optimizers::{Optimizer, Sgd};
    /// let c = Sgd::new(0.1).momentum(0.9).keras_config().unwrap();
    /// assert_eq!(c["class_name"], "SGD");
    /// assert_eq!(c["config"]["momentum"], 0.9);
    /// ```
    fn keras_config(&self) -> Option<serde_json::Value> {
        None
    }
    /// Applies one update with already clipped gradients; `t` is the 1-based step number.
    fn update(&mut self, params: &[Var], grads: &[Tensor], t: u64) -> Result<()>;

    /// The per-variable state, as `(slot name, variable id, value)`, for checkpoints.
    fn state(&self) -> Vec<(String, TensorId, Tensor)> {
        Vec::new()
    }

    /// Restores one slot of one variable from a checkpoint.
    fn set_state(&mut self, slot: &str, _param: &Var, _value: Tensor) -> Result<()> {
        Err(invalid(format!(
            "{}: no optimizer state named `{slot}`",
            self.name()
        )))
    }
}

/// Cloning a boxed optimizer, so that [`crate::Compile`] is `Clone`. Implemented for every
/// `Optimizer + Clone`: derive `Clone` (and `Debug`) on your optimizer and you have it.
pub trait CloneOptimizer {
    /// A boxed copy.
    fn clone_optimizer(&self) -> Box<dyn Optimizer>;
}

impl<T: Optimizer + Clone + 'static> CloneOptimizer for T {
    fn clone_optimizer(&self) -> Box<dyn Optimizer> {
        Box::new(self.clone())
    }
}

impl Clone for Box<dyn Optimizer> {
    fn clone(&self) -> Self {
        self.clone_optimizer()
    }
}

/// Gradient clipping, at most one kind at a time, as in Keras.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Clipping {
    /// Rescale each gradient so its L2 norm is at most this.
    pub clipnorm: Option<f64>,
    /// Rescale all gradients together so their joint L2 norm is at most this.
    pub global_clipnorm: Option<f64>,
    /// Clip every gradient entry to `[-v, v]`.
    pub clipvalue: Option<f64>,
}

impl Clipping {
    /// Each gradient rescaled to an L2 norm of at most `c` (Keras' `clipnorm`).
    pub fn norm(c: f64) -> Self {
        Self {
            clipnorm: Some(c),
            ..Self::default()
        }
    }
    /// All gradients rescaled together to a joint L2 norm of at most `c` (Keras'
    /// `global_clipnorm`, `tf.clip_by_global_norm`), for a step of your own.
    ///
    /// ```
    /// use kiln::optimizers::Clipping;
    /// use kiln::prelude::*;
    /// let g = vec![Tensor::new(&[3f32], &Device::Cpu)?, Tensor::new(&[4f32], &Device::Cpu)?];
    /// let clipped = Clipping::global_norm(1.0).apply(g)?; // joint norm 5 → 1
    /// assert!((clipped[1].to_vec1::<f32>()?[0] - 0.8).abs() < 1e-6);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn global_norm(c: f64) -> Self {
        Self {
            global_clipnorm: Some(c),
            ..Self::default()
        }
    }
    /// Every gradient entry clipped to `[-v, v]` (Keras' `clipvalue`).
    pub fn value(v: f64) -> Self {
        Self {
            clipvalue: Some(v),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self, optimizer: &str) -> Result<()> {
        let set = [self.clipnorm, self.global_clipnorm, self.clipvalue];
        if set.iter().filter(|c| c.is_some()).count() > 1 {
            return Err(invalid(format!(
                "{optimizer}: only one of clipnorm, clipvalue and global_clipnorm can be set"
            )));
        }
        if let Some(v) = set.iter().flatten().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(invalid(format!(
                "{optimizer}: clipping thresholds must be > 0, got {v}"
            )));
        }
        Ok(())
    }

    /// Applies the clipping to a set of gradients.
    pub fn apply(&self, grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let norm = |g: &Tensor| -> Result<f64> {
            Ok(g.to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?
                .sqrt())
        };
        if let Some(c) = self.clipnorm {
            return grads
                .into_iter()
                .map(|g| {
                    let n = norm(&g)?;
                    if n > c {
                        Ok((g * (c / n))?)
                    } else {
                        Ok(g)
                    }
                })
                .collect();
        }
        if let Some(c) = self.global_clipnorm {
            let total = grads
                .iter()
                .map(|g| norm(g).map(|n| n * n))
                .sum::<Result<f64>>()?
                .sqrt();
            let scale = c * (1.0 / total).min(1.0 / c);
            return grads.into_iter().map(|g| Ok((g * scale)?)).collect();
        }
        if let Some(v) = self.clipvalue {
            return grads.into_iter().map(|g| Ok(g.clamp(-v, v)?)).collect();
        }
        Ok(grads)
    }
}

/// Clipping and weight-decay fields every optimizer shares, with their builder methods.
macro_rules! optimizer_common {
    ($ty:ty) => {
        impl $ty {
            /// Clip each gradient to at most this L2 norm.
            pub fn clipnorm(mut self, c: f64) -> Self {
                self.clipping.clipnorm = Some(c);
                self
            }
            /// Clip all gradients together to at most this joint L2 norm.
            pub fn global_clipnorm(mut self, c: f64) -> Self {
                self.clipping.global_clipnorm = Some(c);
                self
            }
            /// Clip every gradient entry to `[-v, v]`.
            pub fn clipvalue(mut self, v: f64) -> Self {
                self.clipping.clipvalue = Some(v);
                self
            }
            /// Decoupled weight decay, as Keras' `weight_decay`: every trainable variable
            /// shrinks by `var · wd · lr` before each update.
            pub fn weight_decay(mut self, wd: f64) -> Self {
                self.weight_decay = Some(wd);
                self
            }
        }
    };
}
pub(crate) use optimizer_common;

/// An optimizer as Keras serializes it: the settings every Keras optimizer has (learning rate,
/// weight decay, clipping; no EMA, loss scaling or gradient accumulation, which kiln lacks)
/// and the class's own `params`.
pub(crate) fn keras_object(
    class: &str,
    name: &str,
    lr: f64,
    weight_decay: Option<f64>,
    clipping: Clipping,
    params: serde_json::Value,
) -> serde_json::Value {
    let mut config = serde_json::json!({
        "name": name, "learning_rate": lr, "weight_decay": weight_decay,
        "clipnorm": clipping.clipnorm, "global_clipnorm": clipping.global_clipnorm,
        "clipvalue": clipping.clipvalue, "use_ema": false, "ema_momentum": 0.99,
        "ema_overwrite_frequency": null, "loss_scale_factor": null,
        "gradient_accumulation_steps": null,
    });
    if let (Some(c), serde_json::Value::Object(p)) = (config.as_object_mut(), params) {
        c.extend(p);
    }
    serde_json::json!({
        "module": "keras.optimizers", "class_name": class, "config": config,
        "registered_name": null,
    })
}

fn check_lr(name: &str, lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(invalid(format!(
            "{name}: learning rate must be finite and >= 0, got {lr}"
        )));
    }
    Ok(())
}

/// Runs one optimizer step: clip, decay, update, then each weight's constraint (`constraints`
/// lines up with `params`; as Keras, right after the update). Validates the settings first.
pub(crate) fn apply_step(
    opt: &mut dyn Optimizer,
    params: &[Var],
    grads: Vec<Tensor>,
    t: u64,
    constraints: &[Option<crate::constraints::Constraint>],
) -> Result<()> {
    // A schedule gives the rate of this update (Keras: `schedule(iterations)` before the
    // increment, so `t - 1`), which weight decay uses too.
    let scheduled = opt
        .schedule()
        .map(|s| (s.rate(t.saturating_sub(1)), s.rate(t)));
    if let Some((now, _)) = scheduled {
        opt.set_learning_rate(now);
    }
    validate(opt)?;
    // Gradients (and so the optimizer state made from them) must not keep the step's graph alive.
    let grads: Vec<Tensor> = grads.into_iter().map(|g| g.detach()).collect();
    let grads = opt.clipping().apply(grads)?;
    if let Some(wd) = opt.weight_decay() {
        let lr = opt.learning_rate();
        for p in params {
            p.set(&p.as_tensor().affine(1.0 - wd * lr, 0.0)?)?;
        }
    }
    opt.update(params, &grads, t)?;
    for (p, c) in params.iter().zip(constraints) {
        if let Some(c) = c {
            p.set(&c.apply(p.as_tensor())?)?;
        }
    }
    // Afterwards the rate of the next update, as Keras' `optimizer.learning_rate` reads.
    if let Some((_, next)) = scheduled {
        opt.set_learning_rate(next);
    }
    Ok(())
}

/// Checks an optimizer's settings (compile calls this).
pub(crate) fn validate(opt: &dyn Optimizer) -> Result<()> {
    check_lr(opt.name(), opt.learning_rate())?;
    if let Some(wd) = opt.weight_decay() {
        check(opt.name(), "weight_decay", wd, Bounds::non_negative())?;
    }
    opt.validate()?;
    opt.clipping().validate(opt.name())
}

/// Fails unless `value` of the hyperparameter `what` lies in `bounds`.
pub(crate) fn check(optimizer: &str, what: &str, value: f64, bounds: Bounds) -> Result<()> {
    if bounds.contains(value) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{optimizer}: {what} must be {bounds}, got {value}"
        )))
    }
}

/// Per-variable optimizer state, keyed by the variable's identity, created as zeros on first use.
#[derive(Default, Clone)]
pub(crate) struct Slots(std::collections::HashMap<TensorId, Tensor>);

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slots({} variables)", self.0.len())
    }
}

impl Slots {
    /// The state of `param`, zeros if it has none yet.
    pub(crate) fn get(&mut self, param: &Var) -> Result<Tensor> {
        let id = param.as_tensor().id();
        if let Some(t) = self.0.get(&id) {
            return Ok(t.clone());
        }
        let zeros = param.as_tensor().zeros_like()?;
        self.0.insert(id, zeros.clone());
        Ok(zeros)
    }
    /// Takes the state of `param` out, if it has one.
    pub(crate) fn remove(&mut self, param: &Var) -> Option<Tensor> {
        self.0.remove(&param.as_tensor().id())
    }
    /// The state of `param`, filled with `value` if it has none yet (Adagrad's accumulators).
    pub(crate) fn get_filled(&mut self, param: &Var, value: f64) -> Result<Tensor> {
        let id = param.as_tensor().id();
        if let Some(t) = self.0.get(&id) {
            return Ok(t.clone());
        }
        let filled = param.as_tensor().ones_like()?.affine(value, 0.0)?;
        self.0.insert(id, filled.clone());
        Ok(filled)
    }
    /// Stores the new state of `param`.
    pub(crate) fn set(&mut self, param: &Var, value: Tensor) {
        self.0.insert(param.as_tensor().id(), value.detach());
    }
    /// Every stored state under the slot name `slot`.
    pub(crate) fn export(&self, slot: &str, out: &mut Vec<(String, TensorId, Tensor)>) {
        out.extend(
            self.0
                .iter()
                .map(|(id, t)| (slot.to_string(), *id, t.clone())),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Gradients come out of backward still attached to the graph; the optimizer state built
    /// from them must not be, or every step's graph stays in memory.
    #[test]
    fn optimizer_state_holds_no_graph() {
        let w = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap().get(w.as_tensor()).unwrap().clone();
        let g = (g * w.as_tensor()).unwrap(); // a gradient that tracks the graph
        assert!(g.track_op());
        let mut opts: Vec<Box<dyn Optimizer>> = vec![
            Box::new(Adam::new(0.1)),
            Box::new(Sgd::new(0.1).momentum(0.9)),
            Box::new(RmsProp::new(0.1).momentum(0.5).centered(true)),
        ];
        for opt in &mut opts {
            apply_step(
                opt.as_mut(),
                std::slice::from_ref(&w),
                vec![g.clone()],
                1,
                &[],
            )
            .unwrap();
            let state = opt.state();
            assert!(!state.is_empty());
            assert!(
                state.iter().all(|(_, _, t)| !t.track_op()),
                "{} keeps the graph",
                opt.name()
            );
        }
    }
}
