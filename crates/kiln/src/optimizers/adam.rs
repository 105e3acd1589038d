//! Adam and AdamW.

use super::fused::{AdamUpdate, Moments};
use super::{optimizer_common, Clipping, Optimizer, Slots};
use crate::error::Result;
use crate::losses::config::Bounds;
use candle_core::{Tensor, TensorId, Var};
use std::collections::HashMap;

/// Adam, as Keras: `α = lr·√(1-β₂ᵗ)/(1-β₁ᵗ)`, `w -= α·m / (√v + ε)`.
///
/// ```
/// use kiln::optimizers::Adam;
/// let opt = Adam::new(1e-3).beta_1(0.9).beta_2(0.999).epsilon(1e-7).global_clipnorm(1.0);
/// ```
#[derive(Clone, Debug)]
pub struct Adam {
    lr: f64,
    beta_1: f64,
    beta_2: f64,
    epsilon: f64,
    amsgrad: bool,
    weight_decay: Option<f64>,
    clipping: Clipping,
    m: Slots,
    v: Slots,
    v_hat: Slots,
    /// The moments of parameters updated by the fused CPU kernel, with each parameter.
    fused: HashMap<TensorId, (Tensor, Moments)>,
}

impl Adam {
    /// Adam with learning rate `lr` and Keras' defaults (β₁ 0.9, β₂ 0.999, ε 1e-7).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            amsgrad: false,
            weight_decay: None,
            clipping: Clipping::default(),
            m: Slots::default(),
            v: Slots::default(),
            v_hat: Slots::default(),
            fused: HashMap::new(),
        }
    }
    /// Decay rate of the first moment.
    pub fn beta_1(mut self, b: f64) -> Self {
        self.beta_1 = b;
        self
    }
    /// Decay rate of the second moment.
    pub fn beta_2(mut self, b: f64) -> Self {
        self.beta_2 = b;
        self
    }
    /// The constant added to `√v`.
    pub fn epsilon(mut self, e: f64) -> Self {
        self.epsilon = e;
        self
    }
    /// AMSGrad, as Keras' `amsgrad=True`: the update divides by the running maximum of the
    /// second moment (`v̂ = max(v̂, v)`), so steps never grow from a shrinking `v`.
    ///
    /// ```
    /// use kiln::optimizers::{Adam, Optimizer};
    /// let opt = Adam::new(1e-3).amsgrad(true);
    /// assert_eq!(opt.keras_config().unwrap()["config"]["amsgrad"], true);
    /// ```
    pub fn amsgrad(mut self, on: bool) -> Self {
        self.amsgrad = on;
        self
    }
}
optimizer_common!(Adam);

impl Adam {
    /// The moments of `p` for the fused kernel, when it applies (a contiguous f32/f64 CPU
    /// parameter and gradient): zeros at first, or the tensor slots' values (restored from a
    /// checkpoint), moved over once.
    fn fused_moments(&mut self, p: &Var, g: &Tensor) -> Result<Option<&mut Moments>> {
        if !super::fused::supported(&[p.as_tensor(), g]) {
            return Ok(None);
        }
        let id = p.as_tensor().id();
        if !self.fused.contains_key(&id) {
            let moments = match (self.m.remove(p), self.v.remove(p)) {
                (None, None) => Moments::zeros(p.dtype(), p.elem_count()),
                (m, v) => {
                    let zeros = || p.as_tensor().zeros_like();
                    let (m, v) = (m.map_or_else(zeros, Ok)?, v.map_or_else(zeros, Ok)?);
                    Some(Moments::from_tensors(&m, &v, p.dtype())?)
                }
            };
            let Some(moments) = moments else {
                return Ok(None);
            };
            self.fused.insert(id, (p.as_tensor().clone(), moments));
        }
        Ok(self.fused.get_mut(&id).map(|(_, m)| m))
    }
}

impl Adam {
    /// Keras' Adam or AdamW (the same update, weight decay set or not) with these settings.
    fn keras_object(&self, class: &str, name: &str) -> serde_json::Value {
        super::keras_object(
            class,
            name,
            self.lr,
            self.weight_decay,
            self.clipping,
            serde_json::json!({
                "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
            }),
        )
    }
    fn check(&self, name: &str) -> Result<()> {
        // β = 1 never updates the moment (and divides by 1 - βᵗ = 0).
        let decay = Bounds::closed_open(0.0, 1.0);
        super::check(name, "beta_1", self.beta_1, decay)?;
        super::check(name, "beta_2", self.beta_2, decay)?;
        super::check(name, "epsilon", self.epsilon, Bounds::positive())
    }
}

impl Optimizer for Adam {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(self.keras_object("Adam", "adam"))
    }
    fn name(&self) -> &str {
        "adam"
    }
    fn validate(&self) -> Result<()> {
        self.check("adam")
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
        self.m.export("m", &mut out);
        self.v.export("v", &mut out);
        self.v_hat.export("velocity_hat", &mut out);
        for (id, (param, moments)) in &self.fused {
            // Copies of memory kiln owns: only a device error could fail them.
            if let Ok((m, v)) = moments.to_tensors(param) {
                out.push(("m".to_string(), *id, m));
                out.push(("v".to_string(), *id, v));
            }
        }
        out
    }
    fn set_state(&mut self, slot: &str, param: &Var, value: Tensor) -> Result<()> {
        // A parameter's fused moments go back to the tensor slots, which the next update
        // takes them from again.
        if let Some((p, moments)) = self.fused.remove(&param.as_tensor().id()) {
            let (m, v) = moments.to_tensors(&p)?;
            self.m.set(param, m);
            self.v.set(param, v);
        }
        match slot {
            "m" => self.m.set(param, value),
            "v" => self.v.set(param, value),
            "velocity_hat" => self.v_hat.set(param, value),
            other => {
                return Err(crate::error::invalid(format!(
                    "{}: no optimizer state named `{other}`",
                    self.name()
                )))
            }
        }
        Ok(())
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], t: u64) -> Result<()> {
        let t = t as i32;
        let alpha = self.lr * (1.0 - self.beta_2.powi(t)).sqrt() / (1.0 - self.beta_1.powi(t));
        let (beta_1, beta_2, epsilon) = (self.beta_1, self.beta_2, self.epsilon);
        for (p, g) in params.iter().zip(grads) {
            // AMSGrad's third slot is not in the fused kernel.
            let fused = if self.amsgrad {
                None
            } else {
                self.fused_moments(p, g)?
            };
            if let Some(moments) = fused {
                p.as_tensor().inplace_op2(
                    g,
                    &AdamUpdate {
                        moments: std::sync::Mutex::new(moments),
                        beta_1,
                        beta_2,
                        alpha,
                        epsilon,
                    },
                )?;
                continue;
            }
            let (m, v) = (self.m.get(p)?, self.v.get(p)?);
            let m = m
                .affine(self.beta_1, 0.0)?
                .add(&g.affine(1.0 - self.beta_1, 0.0)?)?;
            let v = v
                .affine(self.beta_2, 0.0)?
                .add(&g.sqr()?.affine(1.0 - self.beta_2, 0.0)?)?;
            let denominator = if self.amsgrad {
                let v_hat = self.v_hat.get(p)?.maximum(&v)?;
                let d = v_hat.sqrt()?.affine(1.0, self.epsilon)?;
                self.v_hat.set(p, v_hat);
                d
            } else {
                v.sqrt()?.affine(1.0, self.epsilon)?
            };
            let step = m.div(&denominator)?.affine(alpha, 0.0)?;
            p.set(&p.as_tensor().sub(&step)?)?;
            self.m.set(p, m);
            self.v.set(p, v);
        }
        Ok(())
    }
}

/// Adam with decoupled weight decay (Keras' default decay 0.004).
///
/// ```
/// use kiln::optimizers::AdamW;
/// let opt = AdamW::new(1e-3).weight_decay(0.01);
/// ```
#[derive(Clone, Debug)]
pub struct AdamW(Adam);

impl AdamW {
    /// AdamW with learning rate `lr` and weight decay 0.004.
    pub fn new(lr: f64) -> Self {
        Self(Adam::new(lr).weight_decay(0.004))
    }
    /// The decoupled weight decay.
    pub fn weight_decay(self, wd: f64) -> Self {
        Self(self.0.weight_decay(wd))
    }
    /// Decay rate of the first moment.
    pub fn beta_1(self, b: f64) -> Self {
        Self(self.0.beta_1(b))
    }
    /// Decay rate of the second moment.
    pub fn beta_2(self, b: f64) -> Self {
        Self(self.0.beta_2(b))
    }
    /// The constant added to `√v`.
    pub fn epsilon(self, e: f64) -> Self {
        Self(self.0.epsilon(e))
    }
    /// AMSGrad (Keras' `amsgrad=True`): divide by the running maximum of the second moment.
    pub fn amsgrad(self, on: bool) -> Self {
        Self(self.0.amsgrad(on))
    }
    /// Clip each gradient to at most this L2 norm.
    pub fn clipnorm(self, c: f64) -> Self {
        Self(self.0.clipnorm(c))
    }
    /// Clip all gradients together to at most this joint L2 norm.
    pub fn global_clipnorm(self, c: f64) -> Self {
        Self(self.0.global_clipnorm(c))
    }
    /// Clip every gradient entry to `[-v, v]`.
    pub fn clipvalue(self, v: f64) -> Self {
        Self(self.0.clipvalue(v))
    }
}

impl Optimizer for AdamW {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(self.0.keras_object("AdamW", "adamw"))
    }
    fn name(&self) -> &str {
        "adamw"
    }
    fn validate(&self) -> Result<()> {
        self.0.check("adamw")
    }
    fn learning_rate(&self) -> f64 {
        self.0.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.0.lr = lr;
    }
    fn clipping(&self) -> Clipping {
        self.0.clipping
    }
    fn weight_decay(&self) -> Option<f64> {
        self.0.weight_decay
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], t: u64) -> Result<()> {
        self.0.update(params, grads, t)
    }
    fn state(&self) -> Vec<(String, TensorId, Tensor)> {
        self.0.state()
    }
    fn set_state(&mut self, slot: &str, param: &Var, value: Tensor) -> Result<()> {
        self.0.set_state(slot, param, value)
    }
}
