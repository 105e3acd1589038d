//! Keras 3's other optimizers: Nadam, Adamax, Adagrad, Adadelta and Lion, with Keras' update
//! rules, defaults and slot names.

use super::{check, optimizer_common, Clipping, Optimizer, Slots};
use crate::error::{invalid, Result};
use crate::losses::config::Bounds;
use candle_core::{Tensor, TensorId, Var};

/// The common trait methods of an optimizer whose settings live in `lr`, `weight_decay` and
/// `clipping` fields, and whose state is the listed `(slot name, field)` pairs.
macro_rules! optimizer_basics {
    ($name:literal, $($slot:literal => $field:ident),*) => {
        fn name(&self) -> &str {
            $name
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
            $(self.$field.export($slot, &mut out);)*
            out
        }
        fn set_state(&mut self, slot: &str, param: &Var, value: Tensor) -> Result<()> {
            match slot {
                $($slot => self.$field.set(param, value),)*
                other => {
                    return Err(invalid(format!(
                        "{}: no optimizer state named `{other}` (it has {})",
                        $name,
                        [$($slot),*].join(", ")
                    )))
                }
            }
            Ok(())
        }
    };
}

/// `m + (g - m)·(1 - β)`, Keras' moving average.
fn toward(m: &Tensor, g: &Tensor, beta: f64) -> Result<Tensor> {
    Ok(m.add(&g.sub(m)?.affine(1.0 - beta, 0.0)?)?)
}

/// Nadam (Adam with Nesterov momentum), as Keras 3: the momentum schedule
/// `μₜ = β₁·(1 - ½·0.96ᵗ)` and its running product, for users porting Keras models that train
/// with it.
///
/// ```
/// use kiln::optimizers::{Nadam, Optimizer};
/// let opt = Nadam::new(2e-3).beta_1(0.8).beta_2(0.99).epsilon(1e-6).weight_decay(0.01);
/// assert!(opt.validate().is_ok());
/// assert_eq!(opt.keras_config().unwrap()["class_name"], "Nadam");
/// ```
#[derive(Clone, Debug)]
pub struct Nadam {
    lr: f64,
    beta_1: f64,
    beta_2: f64,
    epsilon: f64,
    weight_decay: Option<f64>,
    clipping: Clipping,
    m: Slots,
    v: Slots,
    /// `(t, μ₁·…·μₜ)` of the last step, so the product grows by one factor a step.
    u_product: (u64, f64),
}

impl Nadam {
    /// Nadam with learning rate `lr` and Keras' defaults (β₁ 0.9, β₂ 0.999, ε 1e-7).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            weight_decay: None,
            clipping: Clipping::default(),
            m: Slots::default(),
            v: Slots::default(),
            u_product: (0, 1.0),
        }
    }
    /// Decay rate of the first moment, in `[0, 1)`.
    pub fn beta_1(mut self, b: f64) -> Self {
        self.beta_1 = b;
        self
    }
    /// Decay rate of the second moment, in `[0, 1)`.
    pub fn beta_2(mut self, b: f64) -> Self {
        self.beta_2 = b;
        self
    }
    /// The constant added to `√v̂`.
    pub fn epsilon(mut self, e: f64) -> Self {
        self.epsilon = e;
        self
    }
    fn mu(&self, t: u64) -> f64 {
        self.beta_1 * (1.0 - 0.5 * 0.96f64.powf(t as f64))
    }
    /// `μ₁·…·μₜ`, from the last step's product when `t` follows it (a resumed run starts over).
    fn product(&mut self, t: u64) -> f64 {
        let p = if t > 0 && self.u_product.0 == t - 1 {
            self.u_product.1 * self.mu(t)
        } else {
            (1..=t).map(|i| self.mu(i)).product()
        };
        self.u_product = (t, p);
        p
    }
}
optimizer_common!(Nadam);

impl Optimizer for Nadam {
    optimizer_basics!("nadam", "momentum" => m, "velocity" => v);
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Nadam",
            "nadam",
            self.lr,
            self.weight_decay,
            self.clipping,
            serde_json::json!({
                "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
            }),
        ))
    }
    fn validate(&self) -> Result<()> {
        let decay = Bounds::closed_open(0.0, 1.0);
        check("nadam", "beta_1", self.beta_1, decay)?;
        check("nadam", "beta_2", self.beta_2, decay)?;
        check("nadam", "epsilon", self.epsilon, Bounds::positive())
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], t: u64) -> Result<()> {
        let u_t = self.mu(t);
        let u_next = self.mu(t + 1);
        let product = self.product(t);
        let product_next = product * u_next;
        let beta_2_power = self.beta_2.powf(t as f64);
        for (p, g) in params.iter().zip(grads) {
            let m = toward(&self.m.get(p)?, g, self.beta_1)?;
            let v = toward(&self.v.get(p)?, &g.sqr()?, self.beta_2)?;
            let m_hat = m
                .affine(u_next / (1.0 - product_next), 0.0)?
                .add(&g.affine((1.0 - u_t) / (1.0 - product), 0.0)?)?;
            let v_hat = v.affine(1.0 / (1.0 - beta_2_power), 0.0)?;
            let step = m_hat
                .affine(self.lr, 0.0)?
                .div(&v_hat.sqrt()?.affine(1.0, self.epsilon)?)?;
            p.set(&p.as_tensor().sub(&step)?)?;
            self.m.set(p, m);
            self.v.set(p, v);
        }
        Ok(())
    }
}

/// Adamax (Adam with the infinity norm), as Keras 3: `u = max(β₂·u, |g|)`,
/// `w -= lr·m / ((1 - β₁ᵗ)·(u + ε))`.
///
/// ```
/// use kiln::optimizers::{Adamax, Optimizer};
/// let opt = Adamax::new(2e-3).beta_1(0.85).beta_2(0.99).clipvalue(0.5);
/// assert!(opt.validate().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct Adamax {
    lr: f64,
    beta_1: f64,
    beta_2: f64,
    epsilon: f64,
    weight_decay: Option<f64>,
    clipping: Clipping,
    m: Slots,
    u: Slots,
}

impl Adamax {
    /// Adamax with learning rate `lr` and Keras' defaults (β₁ 0.9, β₂ 0.999, ε 1e-7).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            weight_decay: None,
            clipping: Clipping::default(),
            m: Slots::default(),
            u: Slots::default(),
        }
    }
    /// Decay rate of the first moment, in `[0, 1)`.
    pub fn beta_1(mut self, b: f64) -> Self {
        self.beta_1 = b;
        self
    }
    /// Decay rate of the infinity norm, in `[0, 1)`.
    pub fn beta_2(mut self, b: f64) -> Self {
        self.beta_2 = b;
        self
    }
    /// The constant added to the norm.
    pub fn epsilon(mut self, e: f64) -> Self {
        self.epsilon = e;
        self
    }
}
optimizer_common!(Adamax);

impl Optimizer for Adamax {
    optimizer_basics!("adamax", "momentum" => m, "norm" => u);
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Adamax",
            "adamax",
            self.lr,
            self.weight_decay,
            self.clipping,
            serde_json::json!({
                "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
            }),
        ))
    }
    fn validate(&self) -> Result<()> {
        let decay = Bounds::closed_open(0.0, 1.0);
        check("adamax", "beta_1", self.beta_1, decay)?;
        check("adamax", "beta_2", self.beta_2, decay)?;
        check("adamax", "epsilon", self.epsilon, Bounds::positive())
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], t: u64) -> Result<()> {
        let correction = 1.0 - self.beta_1.powf(t as f64);
        for (p, g) in params.iter().zip(grads) {
            let m = toward(&self.m.get(p)?, g, self.beta_1)?;
            let u = self
                .u
                .get(p)?
                .affine(self.beta_2, 0.0)?
                .maximum(&g.abs()?)?;
            let step = m
                .affine(self.lr, 0.0)?
                .div(&u.affine(correction, correction * self.epsilon)?)?;
            p.set(&p.as_tensor().sub(&step)?)?;
            self.m.set(p, m);
            self.u.set(p, u);
        }
        Ok(())
    }
}

/// Adagrad, as Keras 3: `a += g²` (starting at `initial_accumulator_value`),
/// `w -= lr·g / √(a + ε)`.
///
/// ```
/// use kiln::optimizers::{Adagrad, Optimizer};
/// let opt = Adagrad::new(0.05).initial_accumulator_value(0.2).epsilon(1e-6);
/// assert!(opt.validate().is_ok());
/// assert!(Adagrad::new(0.05).initial_accumulator_value(-1.0).validate().is_err());
/// ```
#[derive(Clone, Debug)]
pub struct Adagrad {
    lr: f64,
    initial_accumulator_value: f64,
    epsilon: f64,
    weight_decay: Option<f64>,
    clipping: Clipping,
    accumulator: Slots,
}

impl Adagrad {
    /// Adagrad with learning rate `lr` and Keras' defaults (accumulators start at 0.1, ε 1e-7).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            initial_accumulator_value: 0.1,
            epsilon: 1e-7,
            weight_decay: None,
            clipping: Clipping::default(),
            accumulator: Slots::default(),
        }
    }
    /// The accumulators' starting value, `>= 0`.
    pub fn initial_accumulator_value(mut self, a: f64) -> Self {
        self.initial_accumulator_value = a;
        self
    }
    /// The constant added under the square root.
    pub fn epsilon(mut self, e: f64) -> Self {
        self.epsilon = e;
        self
    }
}
optimizer_common!(Adagrad);

impl Optimizer for Adagrad {
    optimizer_basics!("adagrad", "accumulator" => accumulator);
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Adagrad",
            "adagrad",
            self.lr,
            self.weight_decay,
            self.clipping,
            serde_json::json!({
                "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon,
            }),
        ))
    }
    fn validate(&self) -> Result<()> {
        let v = self.initial_accumulator_value;
        check(
            "adagrad",
            "initial_accumulator_value",
            v,
            Bounds::non_negative(),
        )?;
        check("adagrad", "epsilon", self.epsilon, Bounds::positive())
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], _t: u64) -> Result<()> {
        for (p, g) in params.iter().zip(grads) {
            let a = self
                .accumulator
                .get_filled(p, self.initial_accumulator_value)?
                .add(&g.sqr()?)?;
            let step = g
                .affine(self.lr, 0.0)?
                .div(&a.affine(1.0, self.epsilon)?.sqrt()?)?;
            p.set(&p.as_tensor().sub(&step)?)?;
            self.accumulator.set(p, a);
        }
        Ok(())
    }
}

/// Adadelta, as Keras 3: running averages of squared gradients and squared updates,
/// `Δ = -√(D + ε)·g / √(G + ε)`, `w += lr·Δ`.
///
/// ```
/// use kiln::optimizers::{Adadelta, Optimizer};
/// let opt = Adadelta::new(1.0).rho(0.9).epsilon(1e-6);
/// assert!(opt.validate().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct Adadelta {
    lr: f64,
    rho: f64,
    epsilon: f64,
    weight_decay: Option<f64>,
    clipping: Clipping,
    accumulated_grad: Slots,
    accumulated_delta_var: Slots,
}

impl Adadelta {
    /// Adadelta with learning rate `lr` and Keras' defaults (ρ 0.95, ε 1e-7).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            rho: 0.95,
            epsilon: 1e-7,
            weight_decay: None,
            clipping: Clipping::default(),
            accumulated_grad: Slots::default(),
            accumulated_delta_var: Slots::default(),
        }
    }
    /// Decay rate of both running averages, in `[0, 1]`.
    pub fn rho(mut self, rho: f64) -> Self {
        self.rho = rho;
        self
    }
    /// The constant added under both square roots.
    pub fn epsilon(mut self, e: f64) -> Self {
        self.epsilon = e;
        self
    }
}
optimizer_common!(Adadelta);

impl Optimizer for Adadelta {
    optimizer_basics!("adadelta",
        "accumulated_grad" => accumulated_grad,
        "accumulated_delta_var" => accumulated_delta_var);
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Adadelta",
            "adadelta",
            self.lr,
            self.weight_decay,
            self.clipping,
            serde_json::json!({ "rho": self.rho, "epsilon": self.epsilon }),
        ))
    }
    fn validate(&self) -> Result<()> {
        check("adadelta", "rho", self.rho, Bounds::closed(0.0, 1.0))?;
        check("adadelta", "epsilon", self.epsilon, Bounds::positive())
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], _t: u64) -> Result<()> {
        let (rho, eps) = (self.rho, self.epsilon);
        for (p, g) in params.iter().zip(grads) {
            let acc_g = self
                .accumulated_grad
                .get(p)?
                .affine(rho, 0.0)?
                .add(&g.sqr()?.affine(1.0 - rho, 0.0)?)?;
            let acc_d = self.accumulated_delta_var.get(p)?;
            let delta = acc_d
                .affine(1.0, eps)?
                .sqrt()?
                .mul(g)?
                .div(&acc_g.affine(1.0, eps)?.sqrt()?)?
                .neg()?;
            let acc_d = acc_d
                .affine(rho, 0.0)?
                .add(&delta.sqr()?.affine(1.0 - rho, 0.0)?)?;
            p.set(&p.as_tensor().add(&delta.affine(self.lr, 0.0)?)?)?;
            self.accumulated_grad.set(p, acc_g);
            self.accumulated_delta_var.set(p, acc_d);
        }
        Ok(())
    }
}

/// Lion (evolved sign momentum), as Keras 3: `w -= lr·sign(β₁·m + (1-β₁)·g)`, then
/// `m = β₂·m + (1-β₂)·g`. Its steps are all ±lr, so it wants a smaller learning rate than Adam.
///
/// ```
/// use kiln::optimizers::{Lion, Optimizer};
/// let opt = Lion::new(1e-4).beta_1(0.95).beta_2(0.98).weight_decay(0.1);
/// assert!(opt.validate().is_ok());
/// assert!(Lion::new(1e-4).beta_1(0.0).validate().is_err()); // Keras: that is SignSGD
/// ```
#[derive(Clone, Debug)]
pub struct Lion {
    lr: f64,
    beta_1: f64,
    beta_2: f64,
    weight_decay: Option<f64>,
    clipping: Clipping,
    m: Slots,
}

impl Lion {
    /// Lion with learning rate `lr` and Keras' defaults (β₁ 0.9, β₂ 0.99).
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            beta_1: 0.9,
            beta_2: 0.99,
            weight_decay: None,
            clipping: Clipping::default(),
            m: Slots::default(),
        }
    }
    /// The interpolation between momentum and gradient in the update's sign, in `(0, 1]`.
    pub fn beta_1(mut self, b: f64) -> Self {
        self.beta_1 = b;
        self
    }
    /// Decay rate of the momentum, in `[0, 1]`.
    pub fn beta_2(mut self, b: f64) -> Self {
        self.beta_2 = b;
        self
    }
}
optimizer_common!(Lion);

impl Optimizer for Lion {
    optimizer_basics!("lion", "momentum" => m);
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Lion",
            "lion",
            self.lr,
            self.weight_decay,
            self.clipping,
            serde_json::json!({ "beta_1": self.beta_1, "beta_2": self.beta_2 }),
        ))
    }
    fn validate(&self) -> Result<()> {
        // Keras: "`beta_1` must be in the [0, 1] range. Otherwise, the optimizer degenerates
        // to SignSGD" (it refuses 0).
        let open_closed = Bounds {
            lo_inclusive: false,
            ..Bounds::closed(0.0, 1.0)
        };
        check("lion", "beta_1", self.beta_1, open_closed)?;
        check("lion", "beta_2", self.beta_2, Bounds::closed(0.0, 1.0))
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], _t: u64) -> Result<()> {
        let (b1, b2) = (self.beta_1, self.beta_2);
        for (p, g) in params.iter().zip(grads) {
            let m = self.m.get(p)?;
            let c = m.affine(b1, 0.0)?.add(&g.affine(1.0 - b1, 0.0)?)?;
            let sign = c.sign()?;
            p.set(&p.as_tensor().sub(&sign.affine(self.lr, 0.0)?)?)?;
            let m = m.affine(b2, 0.0)?.add(&g.affine(1.0 - b2, 0.0)?)?;
            self.m.set(p, m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run(opt: &mut dyn Optimizer, w0: f32, grads: &[f32]) -> f32 {
        let w = Var::new(&[w0], &Device::Cpu).unwrap();
        for (i, g) in grads.iter().enumerate() {
            let g = Tensor::new(&[*g], &Device::Cpu).unwrap();
            super::super::apply_step(opt, std::slice::from_ref(&w), vec![g], i as u64 + 1, &[])
                .unwrap();
        }
        w.as_tensor().to_vec1::<f32>().unwrap()[0]
    }

    /// Two steps of each optimizer on one weight, against the rule worked by hand in f64.
    #[test]
    fn each_optimizer_takes_keras_steps() {
        let (w0, g1, g2) = (1.0f64, 0.5f64, -0.25f64);
        let close = |got: f32, want: f64, what: &str| {
            assert!((got as f64 - want).abs() < 1e-6, "{what}: {got} vs {want}");
        };
        // Adagrad, lr 0.1, a0 0.1.
        let a1 = 0.1 + g1 * g1;
        let w1 = w0 - 0.1 * g1 / (a1 + 1e-7).sqrt();
        let a2 = a1 + g2 * g2;
        let w2 = w1 - 0.1 * g2 / (a2 + 1e-7).sqrt();
        close(
            run(&mut Adagrad::new(0.1), 1.0, &[0.5, -0.25]),
            w2,
            "adagrad",
        );
        // Adamax, lr 0.1.
        let (m1, u1) = (0.1 * g1, g1.abs());
        let w1 = w0 - 0.1 * m1 / ((1.0 - 0.9) * (u1 + 1e-7));
        let (m2, u2) = (m1 + (g2 - m1) * 0.1, (0.999 * u1).max(g2.abs()));
        let w2 = w1 - 0.1 * m2 / ((1.0 - 0.81) * (u2 + 1e-7));
        close(run(&mut Adamax::new(0.1), 1.0, &[0.5, -0.25]), w2, "adamax");
        // Lion, lr 0.1, wd 0.5: decay first, then the sign step.
        let w1 = w0 * (1.0 - 0.05) - 0.1; // sign(0.1·0.5) = 1
        let m1 = 0.01 * g1;
        let c2 = 0.9 * m1 + 0.1 * g2; // negative
        let w2 = w1 * (1.0 - 0.05) + 0.1 * c2.signum().abs();
        close(
            run(&mut Lion::new(0.1).weight_decay(0.5), 1.0, &[0.5, -0.25]),
            w2,
            "lion",
        );
        // Adadelta, lr 1, ρ 0.95, one step.
        let acc = 0.05 * g1 * g1;
        let delta = -(1e-7f64).sqrt() * g1 / (acc + 1e-7).sqrt();
        close(
            run(&mut Adadelta::new(1.0), 1.0, &[0.5]),
            w0 + delta,
            "adadelta",
        );
        // Nadam, lr 0.1, one step.
        let (u1, u2) = (
            0.9 * (1.0 - 0.5 * 0.96),
            0.9 * (1.0 - 0.5 * 0.96f64.powi(2)),
        );
        let (m, v) = (0.1 * g1, 0.001 * g1 * g1);
        let m_hat = u2 * m / (1.0 - u1 * u2) + (1.0 - u1) * g1 / (1.0 - u1);
        let v_hat = v / (1.0 - 0.999);
        close(
            run(&mut Nadam::new(0.1), 1.0, &[0.5]),
            w0 - 0.1 * m_hat / (v_hat.sqrt() + 1e-7),
            "nadam",
        );
    }

    /// Nadam's momentum product is recomputed when a run does not start at step 1.
    #[test]
    fn nadam_product_restarts_at_any_step() {
        let mut a = Nadam::new(0.1);
        let straight: Vec<f64> = (1..=4).map(|t| a.product(t)).collect();
        let mut b = Nadam::new(0.1);
        assert_eq!(b.product(3), straight[2]);
        assert_eq!(b.product(4), straight[3]);
    }
}
