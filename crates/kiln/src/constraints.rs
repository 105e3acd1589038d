//! Keras' weight constraints: projections applied to a variable right after every optimizer
//! update (as Keras' optimizer does), so that a ported model keeps its weights in the same set.
//!
//! The axes count over the weight's own shape, which kiln stores as Keras does (a Dense kernel
//! is `[inputs, units]`, a Conv2D kernel `[height, width, in, filters]`), so `axis = 0` of a
//! Dense kernel constrains each unit's incoming weights, as in Keras.

use crate::error::{invalid, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};

/// Keras' `backend.epsilon()`, added to the norm before dividing.
const EPSILON: f64 = 1e-7;

/// The axes a norm is taken over: one (`axis = 0`) or several (`axis = [0, 1, 2]`), negative
/// counting from the end, as Keras writes them.
#[derive(Debug, Clone, PartialEq)]
pub enum Axis {
    /// One axis.
    One(i64),
    /// Several axes.
    Many(Vec<i64>),
}

impl From<i64> for Axis {
    fn from(a: i64) -> Self {
        Axis::One(a)
    }
}

impl From<Vec<i64>> for Axis {
    fn from(a: Vec<i64>) -> Self {
        Axis::Many(a)
    }
}

impl<const N: usize> From<[i64; N]> for Axis {
    fn from(a: [i64; N]) -> Self {
        Axis::Many(a.to_vec())
    }
}

impl Axis {
    fn to_json(&self) -> Value {
        match self {
            Axis::One(a) => json!(a),
            Axis::Many(a) => json!(a),
        }
    }

    /// The axes as indices into a shape of `rank` dimensions, each once, in order.
    fn resolve(&self, rank: usize, class: &str) -> Result<Vec<usize>> {
        let list = match self {
            Axis::One(a) => vec![*a],
            Axis::Many(a) => a.clone(),
        };
        let mut out = Vec::new();
        for a in list {
            let r = rank as i64;
            let i = if a < 0 { a + r } else { a };
            if !(0..r).contains(&i) {
                return Err(invalid(format!(
                    "{class}: axis {a} does not exist in a weight of {rank} dimensions"
                )));
            }
            if !out.contains(&(i as usize)) {
                out.push(i as usize);
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// A weight constraint, as Keras' `keras.constraints` classes.
///
/// ```
/// use kiln::constraints::Constraint;
/// use kiln::prelude::*;
/// let w = Tensor::new(&[[3f32, 0.0], [4.0, 1.0]], &Device::Cpu)?;
/// // The column norms are 5 and 1: the first is scaled down to 2.
/// let c = Constraint::max_norm(2.0).apply(&w)?.to_vec2::<f32>()?;
/// assert!((c[0][0] - 1.2).abs() < 1e-6 && (c[1][1] - 1.0).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Norms over `axis` above `max_value` scaled down to it.
    MaxNorm {
        /// The largest norm (Keras' default 2).
        max_value: f64,
        /// The axes of the norm (Keras' default 0).
        axis: Axis,
    },
    /// Norms over `axis` moved towards `[min_value, max_value]`:
    /// `rate · clip(norm) + (1 - rate) · norm`.
    MinMaxNorm {
        /// The smallest norm (Keras' default 0).
        min_value: f64,
        /// The largest norm (Keras' default 1).
        max_value: f64,
        /// How far to move (1: all the way; Keras' default).
        rate: f64,
        /// The axes of the norm (Keras' default 0).
        axis: Axis,
    },
    /// Negative entries set to 0.
    NonNeg,
    /// Every norm over `axis` scaled to 1.
    UnitNorm {
        /// The axes of the norm (Keras' default 0).
        axis: Axis,
    },
}

impl Constraint {
    /// `MaxNorm(max_value)` over axis 0.
    pub fn max_norm(max_value: f64) -> Self {
        Constraint::MaxNorm {
            max_value,
            axis: Axis::One(0),
        }
    }
    /// `MinMaxNorm(min_value, max_value)`, rate 1, over axis 0.
    pub fn min_max_norm(min_value: f64, max_value: f64) -> Self {
        Constraint::MinMaxNorm {
            min_value,
            max_value,
            rate: 1.0,
            axis: Axis::One(0),
        }
    }
    /// `UnitNorm()` over axis 0.
    pub fn unit_norm() -> Self {
        Constraint::UnitNorm { axis: Axis::One(0) }
    }
    /// The same constraint over other axes (no effect on `NonNeg`).
    pub fn axis(mut self, a: impl Into<Axis>) -> Self {
        match &mut self {
            Constraint::MaxNorm { axis, .. }
            | Constraint::MinMaxNorm { axis, .. }
            | Constraint::UnitNorm { axis } => *axis = a.into(),
            Constraint::NonNeg => {}
        }
        self
    }
    /// `MinMaxNorm` with this rate (no effect on the others).
    pub fn rate(mut self, r: f64) -> Self {
        if let Constraint::MinMaxNorm { rate, .. } = &mut self {
            *rate = r;
        }
        self
    }

    /// Keras' class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            Constraint::MaxNorm { .. } => "MaxNorm",
            Constraint::MinMaxNorm { .. } => "MinMaxNorm",
            Constraint::NonNeg => "NonNeg",
            Constraint::UnitNorm { .. } => "UnitNorm",
        }
    }

    /// Checks the values (finite; `0 <= min_value <= max_value` is not required by Keras and
    /// not here either).
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] naming the class and the value.
    pub fn validate(&self) -> Result<()> {
        let class = self.class_name();
        let finite = |what: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{class}: `{what}` must be finite, got {v}"
                )))
            }
        };
        match self {
            Constraint::MaxNorm { max_value, .. } => finite("max_value", *max_value),
            Constraint::MinMaxNorm {
                min_value,
                max_value,
                rate,
                ..
            } => {
                finite("min_value", *min_value)?;
                finite("max_value", *max_value)?;
                finite("rate", *rate)
            }
            _ => Ok(()),
        }
    }

    /// The constrained value of `w`, in `w`'s dtype (computed in f32 or wider, as Keras).
    ///
    /// # Errors
    /// An axis outside `w`'s shape, or a tensor error.
    pub fn apply(&self, w: &Tensor) -> Result<Tensor> {
        let dtype = w.dtype();
        let x = match dtype {
            DType::F64 => w.clone(),
            _ => w.to_dtype(DType::F32)?,
        };
        let norms = |axis: &Axis| -> Result<Tensor> {
            let axes = axis.resolve(x.rank(), self.class_name())?;
            Ok(x.sqr()?.sum_keepdim(axes)?.sqrt()?)
        };
        let out = match self {
            Constraint::NonNeg => x.relu()?,
            Constraint::MaxNorm { max_value, axis } => {
                let n = norms(axis)?;
                let desired = n.clamp(0.0, *max_value)?;
                x.broadcast_mul(&(desired / (n + EPSILON)?)?)?
            }
            Constraint::MinMaxNorm {
                min_value,
                max_value,
                rate,
                axis,
            } => {
                let n = norms(axis)?;
                let desired = ((n.clamp(*min_value, *max_value)? * *rate)? + (&n * (1.0 - rate))?)?;
                x.broadcast_mul(&(desired / (n + EPSILON)?)?)?
            }
            Constraint::UnitNorm { axis } => {
                let n = norms(axis)?;
                x.broadcast_div(&(n + EPSILON)?)?
            }
        };
        Ok(out.to_dtype(dtype)?)
    }

    /// The constraint as Keras serializes it (`{"module": "keras.constraints", "class_name",
    /// "config", "registered_name"}`).
    ///
    /// ```
    /// use kiln::constraints::Constraint;
    /// let c = Constraint::max_norm(2.0).axis([0, 1, 2]).keras_config();
    /// assert_eq!(c["class_name"], "MaxNorm");
    /// assert_eq!(c["config"]["axis"][2], 2);
    /// ```
    pub fn keras_config(&self) -> Value {
        let config = match self {
            Constraint::MaxNorm { max_value, axis } => {
                json!({ "max_value": max_value, "axis": axis.to_json() })
            }
            Constraint::MinMaxNorm {
                min_value,
                max_value,
                rate,
                axis,
            } => json!({
                "min_value": min_value, "max_value": max_value, "rate": rate,
                "axis": axis.to_json(),
            }),
            Constraint::NonNeg => json!({}),
            Constraint::UnitNorm { axis } => json!({ "axis": axis.to_json() }),
        };
        json!({
            "module": "keras.constraints", "class_name": self.class_name(), "config": config,
            "registered_name": null,
        })
    }

    /// A constraint from Keras' class name and config (every key read, unknown ones refused,
    /// Keras' defaults for those it may omit); `place` names where it sits, for messages.
    ///
    /// ```
    /// use kiln::constraints::Constraint;
    /// let c = Constraint::from_keras("MaxNorm", &serde_json::json!({"max_value": 3.0, "axis": 1}), "here")?;
    /// assert_eq!(c, Constraint::max_norm(3.0).axis(1));
    /// assert!(Constraint::from_keras("MaxNorm", &serde_json::json!({"max": 3.0}), "here").is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`crate::Error::Data`] naming `place`, the class and the key.
    pub fn from_keras(class: &str, config: &Value, place: &str) -> Result<Self> {
        let bad = |msg: String| crate::Error::Data(format!("{place}: {class}: {msg}"));
        let map = config
            .as_object()
            .ok_or_else(|| bad(format!("the config must be an object, got {config}")))?;
        let known: &[&str] = match class {
            "MaxNorm" => &["max_value", "axis"],
            "MinMaxNorm" => &["min_value", "max_value", "rate", "axis"],
            "NonNeg" => &[],
            "UnitNorm" => &["axis"],
            other => {
                return Err(crate::Error::Data(format!(
                    "{place}: kiln has no constraint `{other}`: use MaxNorm, MinMaxNorm, NonNeg \
                     or UnitNorm"
                )))
            }
        };
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(bad(format!(
                "unknown option `{k}`: kiln does not know what it means"
            )));
        }
        let num = |k: &str, default: f64| -> Result<f64> {
            match map.get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| bad(format!("`{k}` must be a finite number, got {v}"))),
            }
        };
        let axis = || -> Result<Axis> {
            match map.get("axis") {
                None => Ok(Axis::One(0)),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_i64()
                            .ok_or_else(|| bad(format!("`axis` must hold integers, got {x}")))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Axis::Many),
                Some(v) => v
                    .as_i64()
                    .map(Axis::One)
                    .ok_or_else(|| bad(format!("`axis` must be an integer or a list, got {v}"))),
            }
        };
        let c = match class {
            "MaxNorm" => Constraint::MaxNorm {
                max_value: num("max_value", 2.0)?,
                axis: axis()?,
            },
            "MinMaxNorm" => Constraint::MinMaxNorm {
                min_value: num("min_value", 0.0)?,
                max_value: num("max_value", 1.0)?,
                rate: num("rate", 1.0)?,
                axis: axis()?,
            },
            "NonNeg" => Constraint::NonNeg,
            _ => Constraint::UnitNorm { axis: axis()? },
        };
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Keras 3.15.1's output of each constraint on fixed 2-D and 4-D tensors, several axes
    /// (make_keras_schedules.py → keras_constraints_values.json).
    #[test]
    fn constraints_match_keras_outputs() {
        let text = include_str!("../../../tests/fixtures/keras/keras_constraints_values.json");
        let cases: Value = serde_json::from_str(text).unwrap();
        let mut worst = 0f64;
        for case in cases.as_array().unwrap() {
            let c = &case["constraint"];
            let class = c["class_name"].as_str().unwrap();
            let constraint = Constraint::from_keras(class, &c["config"], "test").unwrap();
            assert_eq!(constraint.keras_config(), *c, "{class} serializes as Keras");
            let shape: Vec<usize> = case["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let input: Vec<f32> = case["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let w = Tensor::from_vec(input, shape, &Device::Cpu).unwrap();
            let got: Vec<f32> = constraint
                .apply(&w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (g, k) in got.iter().zip(case["output"].as_array().unwrap()) {
                let d = (f64::from(*g) - k.as_f64().unwrap()).abs();
                worst = worst.max(d);
                assert!(d < 1e-6, "{class} {}: kiln {g}, Keras {k}", c["config"]);
            }
        }
        eprintln!("constraints: worst difference vs Keras {worst:e}");
    }

    #[test]
    fn a_bad_axis_names_the_constraint() {
        let w = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let e = Constraint::unit_norm().axis(2).apply(&w).unwrap_err();
        assert!(e.to_string().contains("UnitNorm"), "{e}");
    }
}
