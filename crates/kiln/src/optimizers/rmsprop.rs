//! RMSprop.

use super::{optimizer_common, Clipping, Optimizer, Slots};
use crate::error::Result;
use candle_core::{Tensor, TensorId, Var};

/// RMSprop, as Keras: `v = ρ·v + (1-ρ)·g²`, `w -= lr·g / √(v + ε)`, with optional momentum and
/// centering.
///
/// ```
/// use kiln::optimizers::RmsProp;
/// let opt = RmsProp::new(1e-3).rho(0.9).momentum(0.5).centered(true);
/// ```
#[derive(Clone, Debug)]
pub struct RmsProp {
    lr: f64,
    rho: f64,
    momentum: f64,
    epsilon: f64,
    centered: bool,
    weight_decay: Option<f64>,
    clipping: Clipping,
    velocity: Slots,
    average_gradient: Slots,
    momentum_buffer: Slots,
}

impl RmsProp {
    /// RMSprop with learning rate `lr` and Keras' defaults (ρ 0.9, no momentum, ε 1e-7).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-7,
            centered: false,
            weight_decay: None,
            clipping: Clipping::default(),
            velocity: Slots::default(),
            average_gradient: Slots::default(),
            momentum_buffer: Slots::default(),
        }
    }
    /// Decay rate of the squared-gradient average.
    pub fn rho(mut self, rho: f64) -> Self {
        self.rho = rho;
        self
    }
    /// Momentum on the increments.
    pub fn momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }
    /// The constant added under the square root.
    pub fn epsilon(mut self, e: f64) -> Self {
        self.epsilon = e;
        self
    }
    /// Normalize by the centered second moment (the variance estimate).
    pub fn centered(mut self, centered: bool) -> Self {
        self.centered = centered;
        self
    }
}
optimizer_common!(RmsProp);

impl Optimizer for RmsProp {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "RMSprop",
            "rmsprop",
            self.lr,
            self.weight_decay,
            self.clipping,
            serde_json::json!({
                "rho": self.rho, "momentum": self.momentum, "epsilon": self.epsilon,
                "centered": self.centered,
            }),
        ))
    }
    fn name(&self) -> &str {
        "rmsprop"
    }
    fn validate(&self) -> Result<()> {
        use crate::losses::config::Bounds;
        // ρ = 1 never updates the average (0), so every step divides by √ε.
        super::check("rmsprop", "rho", self.rho, Bounds::closed_open(0.0, 1.0))?;
        super::check(
            "rmsprop",
            "momentum",
            self.momentum,
            Bounds::closed_open(0.0, 1.0),
        )?;
        super::check("rmsprop", "epsilon", self.epsilon, Bounds::positive())
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
        self.average_gradient.export("average_gradient", &mut out);
        self.momentum_buffer.export("momentum", &mut out);
        out
    }
    fn set_state(&mut self, slot: &str, param: &Var, value: Tensor) -> Result<()> {
        match slot {
            "velocity" => self.velocity.set(param, value),
            "average_gradient" => self.average_gradient.set(param, value),
            "momentum" => self.momentum_buffer.set(param, value),
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
        for (p, g) in params.iter().zip(grads) {
            let v = self
                .velocity
                .get(p)?
                .affine(self.rho, 0.0)?
                .add(&g.sqr()?.affine(1.0 - self.rho, 0.0)?)?;
            let denominator = if self.centered {
                let a = self
                    .average_gradient
                    .get(p)?
                    .affine(self.rho, 0.0)?
                    .add(&g.affine(1.0 - self.rho, 0.0)?)?;
                let d = v.sub(&a.sqr()?)?.affine(1.0, self.epsilon)?;
                self.average_gradient.set(p, a);
                d
            } else {
                v.affine(1.0, self.epsilon)?
            };
            let increment = g.div(&denominator.sqrt()?)?.affine(self.lr, 0.0)?;
            let delta = if self.momentum > 0.0 {
                let m = self
                    .momentum_buffer
                    .get(p)?
                    .affine(self.momentum, 0.0)?
                    .add(&increment)?;
                self.momentum_buffer.set(p, m.clone());
                m
            } else {
                increment
            };
            p.set(&p.as_tensor().sub(&delta)?)?;
            self.velocity.set(p, v);
        }
        Ok(())
    }
}
