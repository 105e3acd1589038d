//! Regression losses: mean squared, absolute, percentage and logarithmic errors, Huber, log-cosh.

use super::{align, loss_common, parameterless_loss, softplus, Loss};
use crate::error::{invalid, Result};
use crate::reduction::{Reduction, EPSILON};
use candle_core::{Tensor, D};

/// Defines a parameterless regression loss from its per-element formula (mean over the last axis).
macro_rules! elementwise_loss {
    ($(#[$doc:meta])* $ty:ident, $keras:literal, |$t:ident, $p:ident| $body:expr) => {
        parameterless_loss!($(#[$doc])* $ty, $keras, |$t, $p| {
            let per_element: Tensor = $body;
            per_element.mean(D::Minus1)?
        });
    };
}

elementwise_loss!(
    /// `mean((y_pred - y_true)², axis=-1)`.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::losses::{Loss, MeanSquaredError};
    /// let t = Tensor::new(&[[1f32, 2.]], &Device::Cpu)?;
    /// let p = Tensor::new(&[[2f32, 4.]], &Device::Cpu)?;
    /// assert_eq!(MeanSquaredError::new().per_sample(&t, &p)?.to_vec1::<f32>()?, vec![2.5]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    MeanSquaredError, "mean_squared_error", |t, p| (p - t)?.sqr()?
);

elementwise_loss!(
    /// `mean(|y_pred - y_true|, axis=-1)`.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::losses::{Loss, MeanAbsoluteError};
    /// let t = Tensor::new(&[[1f32, 2.]], &Device::Cpu)?;
    /// let p = Tensor::new(&[[2f32, 4.]], &Device::Cpu)?;
    /// assert_eq!(MeanAbsoluteError::new().per_sample(&t, &p)?.to_vec1::<f32>()?, vec![1.5]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    MeanAbsoluteError, "mean_absolute_error", |t, p| (p - t)?.abs()?
);

elementwise_loss!(
    /// `100 · mean(|y_true - y_pred| / max(|y_true|, ε), axis=-1)`.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::losses::{Loss, MeanAbsolutePercentageError};
    /// let t = Tensor::new(&[[2f32, 4.]], &Device::Cpu)?;
    /// let p = Tensor::new(&[[1f32, 4.]], &Device::Cpu)?;
    /// let v = MeanAbsolutePercentageError::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
    /// assert_eq!(v, vec![25.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    MeanAbsolutePercentageError, "mean_absolute_percentage_error",
    |t, p| (t.sub(&p)?.abs()?.div(&t.abs()?.maximum(EPSILON)?)? * 100.0)?
);

elementwise_loss!(
    /// `mean((log(max(y_pred, ε) + 1) - log(max(y_true, ε) + 1))², axis=-1)`.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::losses::{Loss, MeanSquaredLogarithmicError};
    /// let t = Tensor::new(&[[0f32]], &Device::Cpu)?;
    /// let p = Tensor::new(&[[1.718281828f32]], &Device::Cpu)?;
    /// let v = MeanSquaredLogarithmicError::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
    /// assert!((v[0] - 1.0).abs() < 1e-5);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    MeanSquaredLogarithmicError, "mean_squared_logarithmic_error",
    |t, p| {
        let a = p.maximum(EPSILON)?.affine(1.0, 1.0)?.log()?;
        let b = t.maximum(EPSILON)?.affine(1.0, 1.0)?.log()?;
        (a - b)?.sqr()?
    }
);

elementwise_loss!(
    /// `mean(x + softplus(-2x) - log 2, axis=-1)` with `x = y_pred - y_true`: log(cosh(x)) computed
    /// without overflow.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::losses::{Loss, LogCosh};
    /// let t = Tensor::new(&[[0f32]], &Device::Cpu)?;
    /// let p = Tensor::new(&[[1f32]], &Device::Cpu)?;
    /// let v = LogCosh::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
    /// assert!((v[0] - 1f32.cosh().ln()).abs() < 1e-6);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    LogCosh, "log_cosh",
    |t, p| {
        let x = (p - t)?;
        (x.clone() + softplus(&x.affine(-2.0, 0.0)?)?)?.affine(1.0, -std::f64::consts::LN_2)?
    }
);

/// Huber loss: quadratic within `delta` of the target, linear beyond it.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{Huber, Loss};
/// let t = Tensor::new(&[[0f32, 0.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[0.5f32, 3.]], &Device::Cpu)?;
/// // (0.125 + (3 - 0.5)) / 2
/// assert_eq!(Huber::new().per_sample(&t, &p)?.to_vec1::<f32>()?, vec![1.3125]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Huber {
    name: String,
    reduction: Reduction,
    delta: f64,
}

impl Huber {
    /// Huber loss with `delta = 1.0`.
    pub fn new() -> Self {
        Self {
            name: "huber_loss".into(),
            reduction: Reduction::default(),
            delta: 1.0,
        }
    }
    /// Sets the point where the loss turns from quadratic to linear.
    pub fn delta(mut self, delta: f64) -> Self {
        self.delta = delta;
        self
    }
}

impl Default for Huber {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(Huber);

impl Loss for Huber {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Huber",
            &self.name,
            self.reduction,
            serde_json::json!({ "delta": self.delta }),
        ))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn validate(&self) -> Result<()> {
        if !(self.delta.is_finite() && self.delta > 0.0) {
            return Err(invalid(format!(
                "Huber: delta must be finite and > 0 (0 makes the loss zero), got {}",
                self.delta
            )));
        }
        Ok(())
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (t, p) = align(y_true, y_pred)?;
        let err = (p - t)?;
        let abs = err.abs()?;
        let quadratic = (err.sqr()? * 0.5)?;
        let linear = abs.affine(self.delta, -0.5 * self.delta * self.delta)?;
        let inside = abs.le(self.delta)?;
        Ok(inside.where_cond(&quadratic, &linear)?.mean(D::Minus1)?)
    }
}
