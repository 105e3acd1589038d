//! Reductions, sample weights, class weights and masks, with Keras 3's exact arithmetic.
//!
//! Every compile-time loss goes through [`reduce_weighted`]: mask and sample weight are merged
//! into one weight, the per-sample values are weighted, then reduced. Keeping this in one place
//! is what makes kiln's numbers match Keras' for every loss at once.

use crate::error::{invalid, Result};
use candle_core::{DType, Tensor};
use std::fmt;
use std::str::FromStr;

/// The fuzz factor Keras uses everywhere (`keras.config.epsilon()`).
pub const EPSILON: f64 = 1e-7;

/// How per-sample loss values become the value that is optimized.
///
/// ```
/// use kiln::Reduction;
/// let r: Reduction = "sum".parse().unwrap();
/// assert_eq!(r, Reduction::Sum);
/// assert_eq!(Reduction::default(), Reduction::SumOverBatchSize);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Sum of the weighted values divided by their number (Keras' default).
    #[default]
    SumOverBatchSize,
    /// Sum of the weighted values.
    Sum,
    /// Same arithmetic as `SumOverBatchSize` (Keras 3 keeps both names).
    Mean,
    /// Sum of the weighted values divided by the sum of the weights.
    MeanWithSampleWeight,
    /// No reduction: the weighted per-sample values.
    None,
}

impl Reduction {
    /// Keras' name for this reduction.
    pub fn as_str(self) -> &'static str {
        match self {
            Reduction::SumOverBatchSize => "sum_over_batch_size",
            Reduction::Sum => "sum",
            Reduction::Mean => "mean",
            Reduction::MeanWithSampleWeight => "mean_with_sample_weight",
            Reduction::None => "none",
        }
    }
}

impl fmt::Display for Reduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Reduction {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "sum_over_batch_size" | "auto" => Reduction::SumOverBatchSize,
            "sum" => Reduction::Sum,
            "mean" => Reduction::Mean,
            "mean_with_sample_weight" => Reduction::MeanWithSampleWeight,
            "none" => Reduction::None,
            other => {
                return Err(invalid(format!(
                    "unknown reduction `{other}`: use one of sum_over_batch_size, sum, mean, \
                     mean_with_sample_weight, none"
                )))
            }
        })
    }
}

/// Brings two tensors whose ranks differ by one to the same rank, as Keras does: a trailing axis
/// of size 1 is squeezed, or a rank-1 tensor gets one appended.
pub fn squeeze_or_expand_to_same_rank(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (ra, rb) = (a.rank(), b.rank());
    let (mut a, mut b) = (a.clone(), b.clone());
    if ra == rb + 1 && a.dims()[ra - 1] == 1 {
        if rb == 1 {
            b = b.unsqueeze(1)?;
        } else {
            a = a.squeeze(ra - 1)?;
        }
    } else if rb == ra + 1 && b.dims()[rb - 1] == 1 {
        if ra == 1 {
            a = a.unsqueeze(1)?;
        } else {
            b = b.squeeze(rb - 1)?;
        }
    }
    Ok((a, b))
}

/// Multiplies `values` by `weights`, where `weights` may have fewer axes. Where numpy's trailing
/// alignment fits, it is used, exactly as Keras does; otherwise the weights are aligned from the
/// left (a per-sample weight of shape `[batch]` applies to every step of a `[batch, steps]` loss),
/// which is what a sample weight means and where Keras would raise a shape error.
pub(crate) fn mul_weights(values: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (high, low) = if weights.rank() <= values.rank() {
        (values, weights)
    } else {
        (weights, values)
    };
    let (h, l) = (high.dims(), low.dims());
    let trailing_fits = l
        .iter()
        .rev()
        .zip(h.iter().rev())
        .all(|(a, b)| a == b || *a == 1 || *b == 1);
    if trailing_fits {
        return Ok(high.broadcast_mul(low)?);
    }
    let mut low = low.clone();
    while low.rank() < high.rank() {
        low = low.unsqueeze(low.rank())?;
    }
    Ok(high.broadcast_mul(&low)?)
}

/// Merges a mask into the sample weights. For the averaging reductions Keras rescales valid
/// entries by `total / valid` so that the mean is over valid entries only.
fn apply_mask(
    sample_weight: Option<&Tensor>,
    mask: Option<&Tensor>,
    dtype: DType,
    reduction: Reduction,
) -> Result<Option<Tensor>> {
    let Some(mask) = mask else {
        return Ok(sample_weight.map(|w| w.to_dtype(dtype)).transpose()?);
    };
    let mut mask = mask.to_dtype(dtype)?;
    if matches!(reduction, Reduction::Mean | Reduction::SumOverBatchSize) {
        // divide_no_nan(total, valid): an all-masked batch weighs nothing.
        let total = mask.elem_count() as f64;
        let valid = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        let scale = if valid == 0.0 { 0.0 } else { total / valid };
        mask = mask.affine(scale, 0.0)?;
    }
    Ok(Some(match sample_weight {
        Some(w) => {
            let w = w.to_dtype(dtype)?;
            let (m, w) = squeeze_or_expand_to_same_rank(&mask, &w)?;
            mul_weights(&w, &m)?
        }
        None => mask,
    }))
}

/// Reduces already weighted values.
fn reduce_values(
    values: &Tensor,
    weights: Option<&Tensor>,
    reduction: Reduction,
) -> Result<Tensor> {
    if reduction == Reduction::None || values.rank() == 0 || values.dims() == [0] {
        return Ok(values.clone());
    }
    let total = values.sum_all()?;
    let divisor = match reduction {
        Reduction::Sum | Reduction::None => return Ok(total),
        Reduction::MeanWithSampleWeight if weights.is_some() => weights
            .expect("checked above")
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?,
        _ => values.elem_count() as f64,
    };
    // divide_no_nan: a zero divisor gives zero, not NaN.
    if divisor == 0.0 {
        Ok(total.zeros_like()?)
    } else {
        Ok(total.affine(1.0 / divisor, 0.0)?)
    }
}

/// Keras 3's `reduce_weighted_values`: merge `mask` into `sample_weight`, weight `values`, reduce.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::{reduction::reduce_weighted, Reduction};
/// let values = Tensor::new(&[1.0f32, 2.0, 3.0, 4.0], &Device::Cpu)?;
/// let weights = Tensor::new(&[1.0f32, 0.0, 1.0, 0.0], &Device::Cpu)?;
/// let mean = reduce_weighted(&values, Some(&weights), None, Reduction::SumOverBatchSize)?;
/// assert_eq!(mean.to_scalar::<f32>()?, 1.0); // (1 + 3) / 4
/// let mws = reduce_weighted(&values, Some(&weights), None, Reduction::MeanWithSampleWeight)?;
/// assert_eq!(mws.to_scalar::<f32>()?, 2.0); // (1 + 3) / 2
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn reduce_weighted(
    values: &Tensor,
    sample_weight: Option<&Tensor>,
    mask: Option<&Tensor>,
    reduction: Reduction,
) -> Result<Tensor> {
    let weights = apply_mask(sample_weight, mask, values.dtype(), reduction)?;
    let mut values = values.clone();
    if let Some(w) = &weights {
        let (v, w2) = squeeze_or_expand_to_same_rank(&values, w)?;
        values = mul_weights(&v, &w2)?;
    }
    reduce_values(&values, weights.as_ref(), reduction)
}

/// A reduction split into its weighted sum and its divisor, so that a batch split across
/// several processes can be reduced with the divisor of the whole batch (the global count or
/// weight sum): Σ over processes of `sum / global divisor` is the one-process value.
#[derive(Debug, Clone)]
pub(crate) struct ReductionParts {
    /// Σ of the weighted values (the values themselves for `none`).
    pub(crate) sum: Tensor,
    /// What the averaging reductions divide by: the number of values (masked: the valid ones)
    /// or the sum of the weights; `None` for `sum` and `none`.
    pub(crate) divisor: Option<f64>,
}

/// [`reduce_weighted`] as its two parts. The mask is merged unscaled: Keras' `total / valid`
/// rescaling and its division by `total` together divide by the valid count, which is the
/// divisor given here.
pub(crate) fn reduce_weighted_parts(
    values: &Tensor,
    sample_weight: Option<&Tensor>,
    mask: Option<&Tensor>,
    reduction: Reduction,
) -> Result<ReductionParts> {
    let masked = mask.is_some();
    let weights = apply_mask(sample_weight, mask, values.dtype(), Reduction::Sum)?;
    let mut values = values.clone();
    if let Some(w) = &weights {
        let (v, w2) = squeeze_or_expand_to_same_rank(&values, w)?;
        values = mul_weights(&v, &w2)?;
    }
    if reduction == Reduction::None || values.rank() == 0 || values.dims() == [0] {
        return Ok(ReductionParts {
            sum: values,
            divisor: None,
        });
    }
    let sum = values.sum_all()?;
    let f64_sum =
        |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    let divisor = match reduction {
        Reduction::Sum | Reduction::None => None,
        Reduction::MeanWithSampleWeight if weights.is_some() => {
            Some(f64_sum(weights.as_ref().expect("checked above"))?)
        }
        Reduction::Mean | Reduction::SumOverBatchSize if masked => {
            Some(f64_sum(mask.expect("checked above"))?)
        }
        _ => Some(values.elem_count() as f64),
    };
    Ok(ReductionParts { sum, divisor })
}

/// Keras' `divide_no_nan(sum, divisor)` as [`reduce_weighted`] computes it.
pub(crate) fn divide_no_nan(sum: &Tensor, divisor: f64) -> Result<Tensor> {
    if divisor == 0.0 {
        Ok(sum.zeros_like()?)
    } else {
        Ok(sum.affine(1.0 / divisor, 0.0)?)
    }
}

/// Turns a `class_weight` table into per-sample weights, as Keras does: the class of a sample is
/// its integer label, or the arg-max of a one-hot label.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// let y = Tensor::new(&[0f32, 2., 1.], &Device::Cpu)?;
/// let w = kiln::reduction::class_weights_to_sample_weights(&y, &[(0, 1.0), (1, 2.0), (2, 5.0)])?;
/// assert_eq!(w.to_vec1::<f32>()?, vec![1.0, 5.0, 2.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn class_weights_to_sample_weights(
    y_true: &Tensor,
    class_weight: &[(usize, f64)],
) -> Result<Tensor> {
    let classes: Vec<u32> = if y_true.rank() >= 2 && y_true.dims()[y_true.rank() - 1] > 1 {
        y_true
            .argmax(y_true.rank() - 1)?
            .flatten_all()?
            .to_vec1::<u32>()?
    } else {
        y_true
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|c| c.round() as u32)
            .collect()
    };
    let weights = classes
        .iter()
        .map(|&c| {
            class_weight
                .iter()
                .find(|(k, _)| *k == c as usize)
                .map(|(_, w)| *w as f32)
                .ok_or_else(|| {
                    invalid(format!(
                        "class_weight has no entry for class {c} found in the labels: give a \
                         weight for every class"
                    ))
                })
        })
        .collect::<Result<Vec<f32>>>()?;
    let n = weights.len();
    Ok(Tensor::from_vec(weights, n, y_true.device())?)
}
