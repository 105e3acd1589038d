//! Overlap losses for segmentation: Dice and Tversky.
//!
//! Both take Keras' `axis` argument as `Option<Vec<isize>>`:
//!
//! * `None` (the default, as in Keras) sums over **every** axis, the batch axis included, so the
//!   loss is one scalar for the whole batch (shape `[]`), exactly as Keras returns it. Keras'
//!   reductions (and [`crate::reduction::reduce_weighted`]) accept such a scalar, and so does
//!   `fit`: the loss declares [`Loss::whole_batch`], which the one-value-per-sample check
//!   honours. Sample weights then cannot weigh samples separately; pick the non-batch axes to
//!   get one value per sample.
//! * `Some(axes)` sums over those axes (negative values count from the end), like a Keras int or
//!   tuple: `vec![-1]` gives one value per row of a `[batch, classes]` tensor, `vec![1, 2, 3]` one
//!   value per image of a `[batch, h, w, c]` tensor. An empty list sums nothing.

use super::{align, loss_common, resolve_axis, Loss};
use crate::error::{invalid, Result};
use crate::reduction::{Reduction, EPSILON};
use candle_core::Tensor;

/// Sums `x` over `axes` (all axes when `None`).
fn sum_over(x: &Tensor, axes: &Option<Vec<isize>>, loss: &str) -> Result<Tensor> {
    let Some(axes) = axes else {
        return Ok(x.sum_all()?);
    };
    if axes.is_empty() {
        return Ok(x.clone());
    }
    let mut dims = Vec::with_capacity(axes.len());
    for &a in axes {
        let d = resolve_axis(a, x.rank(), loss)?;
        if dims.contains(&d) {
            return Err(invalid(format!(
                "{loss}: axis {axes:?} names dimension {d} twice for a tensor of rank {}",
                x.rank()
            )));
        }
        dims.push(d);
    }
    Ok(x.sum(dims)?)
}

/// Dice loss: `1 - 2·Σ(y_true·y_pred) / (Σy_true + Σy_pred + ε)`, the sums over `axis`
/// (`None`, the default, sums over every axis, batch included, as Keras does).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{Dice, Loss};
/// let t = Tensor::new(&[[1f32, 1., 0., 0.], [1., 1., 0., 0.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[0f32, 1., 0., 1.], [0.4, 0., 0., 0.9]], &Device::Cpu)?;
/// // One value per sample over the last axis: 1 - 2·1/(2+2), 1 - 2·0.4/(2+1.3).
/// let v = Dice::new().axis(vec![-1]).per_sample(&t, &p)?.to_vec1::<f32>()?;
/// assert!((v[0] - 0.5).abs() < 1e-6 && (v[1] - 0.7575758).abs() < 1e-6);
/// // Keras' default (axis None): one scalar for the whole batch, 1 - 2·1.4/(4+3.3).
/// let all = Dice::new().per_sample(&t, &p)?;
/// assert!((all.to_scalar::<f32>()? - 0.6164384).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Dice {
    name: String,
    reduction: Reduction,
    axis: Option<Vec<isize>>,
}

impl Dice {
    /// Keras' defaults: sums over every axis (`axis=None`).
    pub fn new() -> Self {
        Self {
            name: "dice".into(),
            reduction: Reduction::default(),
            axis: None,
        }
    }
    /// The axes the overlap is summed over: `None` for all of them (batch included), or a list
    /// such as `vec![1, 2, 3]` for one value per sample.
    pub fn axis(mut self, axis: impl Into<Option<Vec<isize>>>) -> Self {
        self.axis = axis.into();
        self
    }
}

impl Default for Dice {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(Dice);

impl Loss for Dice {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Dice",
            &self.name,
            self.reduction,
            serde_json::json!({ "axis": self.axis }),
        ))
    }
    fn whole_batch(&self) -> bool {
        self.axis.is_none()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        let (t, p) = align(y_true, y_pred)?;
        let intersection = sum_over(&t.broadcast_mul(&p)?, &self.axis, &self.name)?;
        let total = sum_over(&t, &self.axis, &self.name)?
            .broadcast_add(&sum_over(&p, &self.axis, &self.name)?)?
            .affine(1.0, EPSILON)?;
        let dice = intersection.affine(2.0, 0.0)?.broadcast_div(&total)?;
        Ok(dice.affine(-1.0, 1.0)?)
    }
}

/// Tversky loss (Salehi et al. 2017): `1 - I / (I + alpha·A + beta·B + ε)` with, exactly as in
/// Keras 3.15.1, `I = Σ y_true·y_pred`, `A = Σ y_true·(1 - y_pred)` and
/// `B = Σ (1 - y_true)·y_pred`, the sums over `axis` (`None`, the default, sums over every axis,
/// batch included, as Keras does).
///
/// So in 3.15.1 `alpha` weighs the positives the prediction misses and `beta` the predicted
/// positives that are not in the labels (later Keras versions swap the two roles). With
/// `alpha = beta = 0.5` it equals the Dice loss.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{Loss, Tversky};
/// let t = Tensor::new(&[[1f32, 1., 0., 0.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[1f32, 0., 1., 1.]], &Device::Cpu)?;
/// // I = 1, A = 1 (a missed positive), B = 2 (two extra predictions): 1 - 1/(1 + 0.7 + 0.6).
/// let v = Tversky::new().alpha(0.7).beta(0.3).axis(vec![-1]).per_sample(&t, &p)?;
/// assert!((v.to_vec1::<f32>()?[0] - 0.5652174).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Tversky {
    name: String,
    reduction: Reduction,
    alpha: f64,
    beta: f64,
    axis: Option<Vec<isize>>,
}

impl Tversky {
    /// Keras' defaults: `alpha = beta = 0.5`, sums over every axis (`axis=None`).
    pub fn new() -> Self {
        Self {
            name: "tversky".into(),
            reduction: Reduction::default(),
            alpha: 0.5,
            beta: 0.5,
            axis: None,
        }
    }
    /// The weight of `Σ y_true·(1 - y_pred)`, finite and `>= 0`.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }
    /// The weight of `Σ (1 - y_true)·y_pred`, finite and `>= 0`.
    pub fn beta(mut self, beta: f64) -> Self {
        self.beta = beta;
        self
    }
    /// The axes the overlap is summed over: `None` for all of them (batch included), or a list
    /// such as `vec![1, 2, 3]` for one value per sample.
    pub fn axis(mut self, axis: impl Into<Option<Vec<isize>>>) -> Self {
        self.axis = axis.into();
        self
    }
}

impl Default for Tversky {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(Tversky);

impl Loss for Tversky {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Tversky",
            &self.name,
            self.reduction,
            serde_json::json!({ "alpha": self.alpha, "beta": self.beta, "axis": self.axis }),
        ))
    }
    fn whole_batch(&self) -> bool {
        self.axis.is_none()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn validate(&self) -> Result<()> {
        for (what, v) in [("alpha", self.alpha), ("beta", self.beta)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(format!(
                    "{}: {what} must be finite and >= 0, got {v}",
                    self.name
                )));
            }
        }
        Ok(())
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (t, p) = align(y_true, y_pred)?;
        let intersection = sum_over(&t.broadcast_mul(&p)?, &self.axis, &self.name)?;
        let missed = sum_over(
            &p.affine(-1.0, 1.0)?.broadcast_mul(&t)?,
            &self.axis,
            &self.name,
        )?;
        let extra = sum_over(
            &p.broadcast_mul(&t.affine(-1.0, 1.0)?)?,
            &self.axis,
            &self.name,
        )?;
        let denominator = intersection
            .broadcast_add(&missed.affine(self.alpha, 0.0)?)?
            .broadcast_add(&extra.affine(self.beta, 0.0)?)?
            .affine(1.0, EPSILON)?;
        Ok(intersection
            .broadcast_div(&denominator)?
            .affine(-1.0, 1.0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                "{got:?} vs {want:?}"
            );
        }
    }

    fn inputs() -> (Tensor, Tensor) {
        let t = Tensor::new(
            &[[[1f32, 0., 1.], [0., 1., 1.]], [[0., 0., 1.], [1., 1., 0.]]],
            &Device::Cpu,
        )
        .unwrap();
        let p = Tensor::new(
            &[
                [[0.9f32, 0.2, 0.6], [0.1, 0.7, 0.4]],
                [[0.3, 0.5, 0.8], [0.6, 0.2, 0.1]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        (t, p)
    }

    // Reference values (the *_REF constants at the end) come from keras 3.15.1 (JAX backend),
    // `loss.call(y_true, y_pred)`.

    #[test]
    fn dice_matches_keras_for_none_tuple_and_int_axes() {
        let (t, p) = inputs();
        let all = Dice::new().per_sample(&t, &p).unwrap();
        assert_eq!(all.rank(), 0);
        close(&[all.to_scalar::<f32>().unwrap()], &[DICE_NONE_REF]);
        let v = Dice::new().axis(vec![1, 2]).per_sample(&t, &p).unwrap();
        close(&v.to_vec1::<f32>().unwrap(), &DICE_12_REF);
        let v = Dice::new().axis(vec![-1]).per_sample(&t, &p).unwrap();
        close(
            &v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &DICE_LAST_REF,
        );
    }

    #[test]
    fn tversky_matches_keras_3_15_1_roles() {
        let (t, p) = inputs();
        let loss = Tversky::new().alpha(0.7).beta(0.2);
        let all = loss.per_sample(&t, &p).unwrap();
        close(&[all.to_scalar::<f32>().unwrap()], &[TVERSKY_NONE_REF]);
        let v = loss.clone().axis(vec![1, 2]).per_sample(&t, &p).unwrap();
        close(&v.to_vec1::<f32>().unwrap(), &TVERSKY_12_REF);
        let v = loss.axis(vec![-1]).per_sample(&t, &p).unwrap();
        close(
            &v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &TVERSKY_LAST_REF,
        );
    }

    #[test]
    fn bad_parameters_are_errors() {
        let (t, p) = inputs();
        assert!(Tversky::new().alpha(-0.1).validate().is_err());
        assert!(Tversky::new().beta(f64::NAN).per_sample(&t, &p).is_err());
        assert!(Dice::new().axis(vec![3]).per_sample(&t, &p).is_err());
        assert!(Dice::new().axis(vec![1, -2]).per_sample(&t, &p).is_err());
    }

    const DICE_NONE_REF: f32 = 0.32258064;
    const DICE_12_REF: [f32; 2] = [0.24637687, 0.41818184];
    const DICE_LAST_REF: [f32; 4] = [0.1891892, 0.3125, 0.38461536, 0.44827586];
    const TVERSKY_NONE_REF: f32 = 0.34375;
    const TVERSKY_12_REF: [f32; 2] = [0.28571427, 0.42028987];
    const TVERSKY_LAST_REF: [f32; 4] = [0.20634925, 0.3714286, 0.27272737, 0.51807237];
}
