//! Stochastic gradient descent with optional (Nesterov) momentum.

use super::{optimizer_common, Clipping, Optimizer, Slots};
use crate::error::Result;
use candle_core::{Tensor, TensorId, Var};

/// SGD, as Keras: `m = μ·m - lr·g; w += m` (or `w += μ·m - lr·g` with Nesterov).
///
/// ```
/// use kiln::optimizers::Sgd;
/// let opt = Sgd::new(0.01).momentum(0.9).nesterov(true).clipnorm(1.0);
/// ```
#[derive(Clone, Debug)]
pub struct Sgd {
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: Option<f64>,
    clipping: Clipping,
    velocity: Slots,
}

impl Sgd {
    /// Plain SGD with learning rate `lr` (Keras' default is 0.01).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            momentum: 0.0,
            nesterov: false,
            weight_decay: None,
            clipping: Clipping::default(),
            velocity: Slots::default(),
        }
    }
    /// The momentum, in `[0, 1]`.
    pub fn momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }
    /// Nesterov momentum.
    pub fn nesterov(mut self, nesterov: bool) -> Self {
        self.nesterov = nesterov;
        self
    }
}
optimizer_common!(Sgd);

impl Optimizer for Sgd {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "SGD",
            "sgd",
            self.lr,
            self.weight_decay,
            self.clipping,
            serde_json::json!({ "momentum": self.momentum, "nesterov": self.nesterov }),
        ))
    }
    fn name(&self) -> &str {
        "sgd"
    }
    fn validate(&self) -> Result<()> {
        // Keras: "`momentum` must be a float between [0, 1]".
        let unit = crate::losses::config::Bounds::closed(0.0, 1.0);
        super::check("sgd", "momentum", self.momentum, unit)
    }
    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn clipping(&self) -> Clipping {
        self.clipping
    }
    fn weight_decay(&self) -> Option<f64> {
        self.weight_decay
    }
    fn state(&self) -> Vec<(String, TensorId, Tensor)> {
        let mut out = Vec::new();
        self.velocity.export("velocity", &mut out);
        out
    }
    fn set_state(&mut self, slot: &str, param: &Var, value: Tensor) -> Result<()> {
        match slot {
            "velocity" => self.velocity.set(param, value),
            other => {
                return Err(crate::error::invalid(format!(
                    "{}: no optimizer state named `{other}`",
                    self.name()
                )))
            }
        }
        Ok(())
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], _t: u64) -> Result<()> {
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(crate::error::invalid(format!(
                "sgd: momentum must be in [0, 1], got {}",
                self.momentum
            )));
        }
        if self.momentum == 0.0 {
            for (p, g) in params.iter().zip(grads) {
                p.set(&(p.as_tensor() - (g * self.lr)?)?)?;
            }
            return Ok(());
        }
        for (p, g) in params.iter().zip(grads) {
            let step = (g * self.lr)?;
            let m = ((self.velocity.get(p)? * self.momentum)? - &step)?;
            let delta = if self.nesterov {
                ((&m * self.momentum)? - step)?
            } else {
                m.clone()
            };
            p.set(&(p.as_tensor() + delta)?)?;
            self.velocity.set(p, m);
        }
        Ok(())
    }
}
