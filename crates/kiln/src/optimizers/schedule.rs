//! Keras 3's learning-rate schedules: the rate of each update as a function of the optimizer's
//! iteration count, computed in float32 in Keras' operation order so that a model trained with
//! a schedule in Keras trains the same in kiln.

use super::{Clipping, Optimizer};
use crate::error::{invalid, Result};
use candle_core::{Tensor, TensorId, Var};
use serde_json::{json, Value};

/// A learning rate that changes with the optimizer's iteration count, as Keras'
/// `keras.optimizers.schedules` classes (same names, parameters and float32 arithmetic).
///
/// `rate(step)` is the rate of the update made when `step` updates have already been applied
/// (0 for the first), as Keras calls `schedule(optimizer.iterations)`. Give one to any
/// optimizer with [`Optimizer::with_schedule`].
///
/// ```
/// use kiln::optimizers::LearningRateSchedule;
/// let s = LearningRateSchedule::ExponentialDecay {
///     initial_learning_rate: 0.1, decay_steps: 10.0, decay_rate: 0.5, staircase: false,
/// };
/// assert!((s.rate(10) - 0.05).abs() < 1e-8);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum LearningRateSchedule {
    /// `initial · decay_rate^(step / decay_steps)` (the exponent floored with `staircase`).
    ExponentialDecay {
        /// The rate at step 0.
        initial_learning_rate: f64,
        /// Steps over which the rate is multiplied by `decay_rate` once; > 0.
        decay_steps: f64,
        /// The factor per `decay_steps`.
        decay_rate: f64,
        /// Decay at whole multiples of `decay_steps` only.
        staircase: bool,
    },
    /// `values[0]` while `step <= boundaries[0]`, …, `values[n]` once `step > boundaries[n-1]`.
    PiecewiseConstantDecay {
        /// Increasing step counts (compared as integers, as Keras casts them to the step's type).
        boundaries: Vec<f64>,
        /// One more rate than boundaries.
        values: Vec<f64>,
    },
    /// `(initial - end) · (1 - step / decay_steps)^power + end`, the step held at
    /// `decay_steps`, or with `cycle` the decay restarted over the next multiple of it.
    PolynomialDecay {
        /// The rate at step 0.
        initial_learning_rate: f64,
        /// Steps to reach `end_learning_rate`; > 0.
        decay_steps: f64,
        /// The final rate (Keras' default 0.0001).
        end_learning_rate: f64,
        /// The polynomial's power (Keras' default 1).
        power: f64,
        /// Decay again over each following multiple of `decay_steps`.
        cycle: bool,
    },
    /// `initial / (1 + decay_rate · step / decay_steps)` (the quotient floored with `staircase`).
    InverseTimeDecay {
        /// The rate at step 0.
        initial_learning_rate: f64,
        /// The step unit; > 0.
        decay_steps: f64,
        /// The decay per unit.
        decay_rate: f64,
        /// Decay at whole multiples of `decay_steps` only.
        staircase: bool,
    },
    /// An optional linear warmup from `initial` to `warmup_target` over `warmup_steps`, then a
    /// cosine decay over `decay_steps` down to `alpha` times the rate it started from.
    CosineDecay {
        /// The rate at step 0.
        initial_learning_rate: f64,
        /// Steps of the cosine decay; > 0.
        decay_steps: f64,
        /// The final fraction of the rate (Keras' default 0).
        alpha: f64,
        /// The rate reached after the warmup; `None`: no warmup.
        warmup_target: Option<f64>,
        /// Steps of the warmup (Keras' default 0).
        warmup_steps: f64,
    },
    /// Cosine decay with warm restarts (SGDR): periods of `first_decay_steps · t_mul^i` steps,
    /// the `i`-th starting at `initial · m_mul^i`.
    CosineDecayRestarts {
        /// The rate at step 0.
        initial_learning_rate: f64,
        /// Steps of the first period; > 0.
        first_decay_steps: f64,
        /// Growth of each period's length (Keras' default 2).
        t_mul: f64,
        /// Factor on each period's starting rate (Keras' default 1).
        m_mul: f64,
        /// The final fraction of each period's rate (Keras' default 0).
        alpha: f64,
    },
}

/// Rounds to float32, as Keras converts a Python float to a float32 tensor.
fn f(x: f64) -> f32 {
    x as f32
}

impl LearningRateSchedule {
    /// Keras' class name (`ExponentialDecay`, …).
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::ExponentialDecay { .. } => "ExponentialDecay",
            Self::PiecewiseConstantDecay { .. } => "PiecewiseConstantDecay",
            Self::PolynomialDecay { .. } => "PolynomialDecay",
            Self::InverseTimeDecay { .. } => "InverseTimeDecay",
            Self::CosineDecay { .. } => "CosineDecay",
            Self::CosineDecayRestarts { .. } => "CosineDecayRestarts",
        }
    }

    /// Checks the parameters as Keras' constructors do (positive decay steps, one more value
    /// than boundaries), and that every number is finite.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidArgument`] naming the class, the parameter and its value.
    pub fn validate(&self) -> Result<()> {
        let class = self.class_name();
        let bad = |what: &str, v: f64, need: &str| {
            Err(invalid(format!(
                "{class}: `{what}` must be {need}, got {v}"
            )))
        };
        let finite = |what: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                bad(what, v, "finite")
            }
        };
        let steps = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                bad(what, v, "> 0")
            }
        };
        match self {
            Self::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                ..
            }
            | Self::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                ..
            } => {
                finite("initial_learning_rate", *initial_learning_rate)?;
                steps("decay_steps", *decay_steps)?;
                finite("decay_rate", *decay_rate)
            }
            Self::PiecewiseConstantDecay { boundaries, values } => {
                if boundaries.len() + 1 != values.len() {
                    return Err(invalid(format!(
                        "{class}: `values` must have one more entry than `boundaries`, got {} \
                         boundaries and {} values",
                        boundaries.len(),
                        values.len()
                    )));
                }
                for b in boundaries {
                    finite("boundaries", *b)?;
                }
                for v in values {
                    finite("values", *v)?;
                }
                Ok(())
            }
            Self::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                ..
            } => {
                finite("initial_learning_rate", *initial_learning_rate)?;
                steps("decay_steps", *decay_steps)?;
                finite("end_learning_rate", *end_learning_rate)?;
                finite("power", *power)
            }
            Self::CosineDecay {
                initial_learning_rate,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
            } => {
                finite("initial_learning_rate", *initial_learning_rate)?;
                steps("decay_steps", *decay_steps)?;
                finite("alpha", *alpha)?;
                if let Some(t) = warmup_target {
                    finite("warmup_target", *t)?;
                }
                if !(warmup_steps.is_finite() && *warmup_steps >= 0.0) {
                    return bad("warmup_steps", *warmup_steps, ">= 0");
                }
                Ok(())
            }
            Self::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
            } => {
                finite("initial_learning_rate", *initial_learning_rate)?;
                steps("first_decay_steps", *first_decay_steps)?;
                if !(t_mul.is_finite() && *t_mul > 0.0) {
                    return bad("t_mul", *t_mul, "> 0");
                }
                finite("m_mul", *m_mul)?;
                finite("alpha", *alpha)
            }
        }
    }

    /// The rate of the update made after `step` updates, in Keras' float32 arithmetic.
    pub fn rate(&self, step: u64) -> f64 {
        let s = step as f32;
        let r: f32 = match self {
            Self::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            } => {
                let mut p = s / f(*decay_steps);
                if *staircase {
                    p = p.floor();
                }
                f(*initial_learning_rate) * f(*decay_rate).powf(p)
            }
            Self::PiecewiseConstantDecay { boundaries, values } => {
                // Keras casts the boundaries to the step's integer type.
                let step = step as i64;
                let b: Vec<i64> = boundaries.iter().map(|b| b.trunc() as i64).collect();
                let mut out = 0f32;
                if b.is_empty() {
                    out = f(values[0]);
                } else {
                    if step <= b[0] {
                        out += f(values[0]);
                    }
                    if step > b[b.len() - 1] {
                        out += f(values[values.len() - 1]);
                    }
                    for (i, w) in b.windows(2).enumerate() {
                        if step > w[0] && step <= w[1] {
                            out += f(values[i + 1]);
                        }
                    }
                }
                out
            }
            Self::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                cycle,
            } => {
                let (init, end) = (f(*initial_learning_rate), f(*end_learning_rate));
                let mut ds = f(*decay_steps);
                let mut s = s;
                if *cycle {
                    let multiplier = if s == 0.0 {
                        1.0
                    } else {
                        (s / f(*decay_steps)).ceil()
                    };
                    ds *= multiplier;
                } else {
                    s = s.min(ds);
                }
                let p = s / ds;
                (init - end) * (1.0 - p).powf(f(*power)) + end
            }
            Self::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            } => {
                let mut p = s / f(*decay_steps);
                if *staircase {
                    p = p.floor();
                }
                f(*initial_learning_rate) / (1.0 + f(*decay_rate) * p)
            }
            Self::CosineDecay {
                initial_learning_rate,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
            } => {
                let init = f(*initial_learning_rate);
                let ds = f(*decay_steps);
                // `(1 - alpha)` is Python float arithmetic, then one float32 rounding.
                let decay = |step: f32, from: f32| {
                    let fraction = step / ds;
                    let cosine = 0.5 * (1.0 + (std::f32::consts::PI * fraction).cos());
                    from * (f(1.0 - alpha) * cosine + f(*alpha))
                };
                match warmup_target {
                    None => decay(s.min(ds), init),
                    Some(target) => {
                        let (target, ws) = (f(*target), f(*warmup_steps));
                        let s = s.min(ds + ws);
                        if s < ws {
                            (target - init) * (s / ws) + init
                        } else {
                            decay(s - ws, target)
                        }
                    }
                }
            }
            Self::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
            } => {
                let (alpha, t_mul, m_mul) = (f(*alpha), f(*t_mul), f(*m_mul));
                let mut fraction = s / f(*first_decay_steps);
                let i_restart = if t_mul == 1.0 {
                    let i = fraction.floor();
                    fraction -= i;
                    i
                } else {
                    let i = ((1.0 - fraction * (1.0 - t_mul)).ln() / t_mul.ln()).floor();
                    let sum_r = (1.0 - t_mul.powf(i)) / (1.0 - t_mul);
                    fraction = (fraction - sum_r) / t_mul.powf(i);
                    i
                };
                let m_fac = m_mul.powf(i_restart);
                let cosine = 0.5 * m_fac * (1.0 + (std::f32::consts::PI * fraction).cos());
                f(*initial_learning_rate) * ((1.0 - alpha) * cosine + alpha)
            }
        };
        f64::from(r)
    }

    /// The schedule as Keras serializes it inside an optimizer's config
    /// (`{"module": "keras.optimizers.schedules", "class_name", "config", "registered_name"}`),
    /// with Keras' default `name` for the class.
    ///
    /// ```
    /// use kiln::optimizers::LearningRateSchedule;
    /// let s = LearningRateSchedule::PiecewiseConstantDecay {
    ///     boundaries: vec![2.0], values: vec![0.1, 0.01],
    /// };
    /// assert_eq!(s.keras_config()["config"]["boundaries"][0], 2);
    /// ```
    pub fn keras_config(&self) -> Value {
        // Whole numbers as Keras writes Python ints (steps, boundaries).
        let int = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 9e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        let config = match self {
            Self::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            } => json!({
                "initial_learning_rate": initial_learning_rate, "decay_steps": int(*decay_steps),
                "decay_rate": decay_rate, "staircase": staircase, "name": "ExponentialDecay",
            }),
            Self::PiecewiseConstantDecay { boundaries, values } => json!({
                "boundaries": boundaries.iter().map(|b| int(*b)).collect::<Vec<_>>(),
                "values": values, "name": "PiecewiseConstant",
            }),
            Self::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                cycle,
            } => json!({
                "initial_learning_rate": initial_learning_rate, "decay_steps": int(*decay_steps),
                "end_learning_rate": end_learning_rate, "power": power, "cycle": cycle,
                "name": "PolynomialDecay",
            }),
            Self::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            } => json!({
                "initial_learning_rate": initial_learning_rate, "decay_steps": int(*decay_steps),
                "decay_rate": decay_rate, "staircase": staircase, "name": "InverseTimeDecay",
            }),
            Self::CosineDecay {
                initial_learning_rate,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
            } => json!({
                "initial_learning_rate": initial_learning_rate, "decay_steps": int(*decay_steps),
                "alpha": alpha, "name": "CosineDecay", "warmup_target": warmup_target,
                "warmup_steps": int(*warmup_steps),
            }),
            Self::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
            } => json!({
                "initial_learning_rate": initial_learning_rate,
                "first_decay_steps": int(*first_decay_steps), "t_mul": t_mul, "m_mul": m_mul,
                "alpha": alpha, "name": "SGDRDecay",
            }),
        };
        json!({
            "module": "keras.optimizers.schedules", "class_name": self.class_name(),
            "config": config, "registered_name": null,
        })
    }
}

/// An optimizer whose learning rate follows a [`LearningRateSchedule`]: before every applied
/// update the rate of that iteration is set (weight decay uses it too), and afterwards the
/// rate of the next one, which is what [`Optimizer::learning_rate`] reports, as Keras'
/// `optimizer.learning_rate`. Made by [`Optimizer::with_schedule`]; the iteration count is the
/// model's, which checkpoints keep, so a resumed run continues the schedule.
///
/// ```
/// use kiln::optimizers::{Adam, LearningRateSchedule, Optimizer};
/// let opt = Adam::new(0.1).with_schedule(LearningRateSchedule::InverseTimeDecay {
///     initial_learning_rate: 0.1, decay_steps: 1.0, decay_rate: 0.5, staircase: false,
/// });
/// assert_eq!(opt.keras_config().unwrap()["config"]["learning_rate"]["class_name"],
///            "InverseTimeDecay");
/// ```
#[derive(Debug, Clone)]
pub struct Scheduled {
    inner: Box<dyn Optimizer>,
    schedule: LearningRateSchedule,
}

impl Scheduled {
    /// `inner` with its rate following `schedule` (the rate of step 0 set now).
    pub fn new(mut inner: Box<dyn Optimizer>, schedule: LearningRateSchedule) -> Self {
        inner.set_learning_rate(schedule.rate(0));
        Self { inner, schedule }
    }
}

impl Optimizer for Scheduled {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr);
    }
    fn schedule(&self) -> Option<&LearningRateSchedule> {
        Some(&self.schedule)
    }
    fn clipping(&self) -> Clipping {
        self.inner.clipping()
    }
    fn weight_decay(&self) -> Option<f64> {
        self.inner.weight_decay()
    }
    fn validate(&self) -> Result<()> {
        self.schedule
            .validate()
            .map_err(|e| invalid(format!("{}: learning_rate: {e}", self.inner.name())))?;
        self.inner.validate()
    }
    fn keras_config(&self) -> Option<Value> {
        let mut c = self.inner.keras_config()?;
        c["config"]["learning_rate"] = self.schedule.keras_config();
        Some(c)
    }
    fn update(&mut self, params: &[Var], grads: &[Tensor], t: u64) -> Result<()> {
        self.inner.update(params, grads, t)
    }
    fn state(&self) -> Vec<(String, TensorId, Tensor)> {
        self.inner.state()
    }
    fn set_state(&mut self, slot: &str, param: &Var, value: Tensor) -> Result<()> {
        self.inner.set_state(slot, param, value)
    }
}

#[cfg(test)]
mod tests {
    use super::LearningRateSchedule as S;

    /// Keras 3.15.1's values of each schedule at steps 0..=12 (and a few further), generated by
    /// tests/fixtures/keras/make_keras_schedules.py into keras_schedules_values.json.
    #[test]
    fn schedules_match_keras_values() {
        let text = include_str!("../../../../tests/fixtures/keras/keras_schedules_values.json");
        let cases: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut worst = 0f64;
        for case in cases.as_array().unwrap() {
            let s = crate::keras::compile::schedule_from_json(&case["schedule"]).unwrap();
            for pair in case["values"].as_array().unwrap() {
                let step = pair[0].as_u64().unwrap();
                let want = pair[1].as_f64().unwrap();
                let got = s.rate(step);
                let rel = (got - want).abs() / want.abs().max(1e-12);
                worst = worst.max(rel);
                assert!(
                    rel < 1e-6,
                    "{}: step {step}: kiln {got}, Keras {want}",
                    case["name"]
                );
            }
        }
        eprintln!("worst relative difference vs Keras: {worst:e}");
    }

    #[test]
    fn validation_names_class_and_parameter() {
        let s = S::ExponentialDecay {
            initial_learning_rate: 0.1,
            decay_steps: 0.0,
            decay_rate: 0.5,
            staircase: false,
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("ExponentialDecay") && e.contains("decay_steps"),
            "{e}"
        );
        let s = S::PiecewiseConstantDecay {
            boundaries: vec![1.0, 2.0],
            values: vec![0.1],
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("PiecewiseConstantDecay") && e.contains("values"),
            "{e}"
        );
    }
}
