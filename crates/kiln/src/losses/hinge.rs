//! Maximum-margin losses: hinge, squared hinge and categorical hinge.
//!
//! The binary ones follow Keras' `convert_binary_labels_to_hinge`: when *every* label of the batch
//! is 0 or 1 the labels become -1/+1 (`2y - 1`); any other label set (for example already -1/+1)
//! is used as it is.

use super::{align, loss_common, parameterless_loss, Loss};
use crate::error::Result;
use crate::reduction::Reduction;
use candle_core::{Tensor, D};

/// Keras' `convert_binary_labels_to_hinge`, decided on the device for the whole tensor: with
/// `b = 1` when every label is 0 or 1 (else 0), the labels become `y·(1 + b) - b`.
fn hinge_labels(y_true: &Tensor) -> Result<Tensor> {
    if y_true.elem_count() == 0 {
        return Ok(y_true.clone());
    }
    let dtype = y_true.dtype();
    let zero_or_one = (y_true.eq(0.0)?.to_dtype(dtype)? + y_true.eq(1.0)?.to_dtype(dtype)?)?;
    let all_binary = zero_or_one.flatten_all()?.min(0)?;
    let scale = all_binary.affine(1.0, 1.0)?;
    Ok(y_true.broadcast_mul(&scale)?.broadcast_sub(&all_binary)?)
}

/// `max(1 - y_true · y_pred, 0)` elementwise, after the label conversion.
fn margins(y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
    let t = hinge_labels(y_true)?;
    Ok(t.broadcast_mul(y_pred)?.affine(-1.0, 1.0)?.relu()?)
}

parameterless_loss!(
    /// Hinge loss: `mean(max(1 - y_true · y_pred, 0), axis=-1)`, with labels -1/+1 (labels that
    /// are all 0/1 are converted, as Keras does).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::losses::{Hinge, Loss};
    /// let t = Tensor::new(&[[0f32, 1.]], &Device::Cpu)?; // becomes [-1, 1]
    /// let p = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu)?;
    /// // (max(1 + 0.5, 0) + max(1 - 0.5, 0)) / 2
    /// assert_eq!(Hinge::new().per_sample(&t, &p)?.to_vec1::<f32>()?, vec![1.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    Hinge, "hinge", |t, p| margins(&t, &p)?.mean(D::Minus1)?
);

parameterless_loss!(
    /// Squared hinge loss: `mean(max(1 - y_true · y_pred, 0)², axis=-1)`, with labels -1/+1
    /// (labels that are all 0/1 are converted, as Keras does).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::losses::{Loss, SquaredHinge};
    /// let t = Tensor::new(&[[0f32, 1.]], &Device::Cpu)?; // becomes [-1, 1]
    /// let p = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu)?;
    /// // (1.5² + 0.5²) / 2
    /// assert_eq!(SquaredHinge::new().per_sample(&t, &p)?.to_vec1::<f32>()?, vec![1.25]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    SquaredHinge, "squared_hinge", |t, p| margins(&t, &p)?.sqr()?.mean(D::Minus1)?
);

parameterless_loss!(
    /// Categorical hinge loss over the last axis: `max(neg - pos + 1, 0)` with
    /// `pos = Σ y_true · y_pred` and `neg = max((1 - y_true) · y_pred)`, for one-hot labels.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::losses::{CategoricalHinge, Loss};
    /// let t = Tensor::new(&[[0f32, 1., 0.]], &Device::Cpu)?;
    /// let p = Tensor::new(&[[0.25f32, 0.5, 0.375]], &Device::Cpu)?;
    /// // pos = 0.5, neg = 0.375: 0.375 - 0.5 + 1
    /// let v = CategoricalHinge::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
    /// assert_eq!(v, vec![0.875]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    CategoricalHinge, "categorical_hinge", |t, p| {
        let pos = t.broadcast_mul(&p)?.sum(D::Minus1)?;
        let neg = t.affine(-1.0, 1.0)?.broadcast_mul(&p)?.max(D::Minus1)?;
        (neg - pos)?.affine(1.0, 1.0)?.relu()?
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t2(rows: &[&[f32]]) -> Tensor {
        let data: Vec<Vec<f32>> = rows.iter().map(|r| r.to_vec()).collect();
        Tensor::new(data, &Device::Cpu).unwrap()
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                "{got:?} vs {want:?}"
            );
        }
    }

    // Reference values below come from keras 3.15.1 (JAX backend), `loss.call(y_true, y_pred)`.

    #[test]
    fn hinge_matches_keras_binary_and_signed_labels() {
        let p = t2(&[&[0.3, -0.8, 1.7], &[-1.2, 0.4, 0.05]]);
        let binary = t2(&[&[1., 0., 1.], &[0., 1., 1.]]);
        let v = Hinge::new()
            .per_sample(&binary, &p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &[0.3, 0.5166667]);
        // Not all labels in {0, 1}: used unchanged.
        let signed = t2(&[&[1., -1., 1.], &[-1., 1., 0.]]);
        let v = Hinge::new()
            .per_sample(&signed, &p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &[0.3, 0.53333336]);
    }

    #[test]
    fn squared_hinge_matches_keras() {
        let p = t2(&[&[0.3, -0.8, 1.7], &[-1.2, 0.4, 0.05]]);
        let binary = t2(&[&[1., 0., 1.], &[0., 1., 1.]]);
        let v = SquaredHinge::new()
            .per_sample(&binary, &p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &[0.17666666, 0.42083335]);
    }

    #[test]
    fn categorical_hinge_matches_keras() {
        let t = t2(&[&[0., 1., 0.], &[1., 0., 0.]]);
        let p = t2(&[&[0.2, 0.5, 0.3], &[0.1, 0.7, 0.2]]);
        let v = CategoricalHinge::new()
            .per_sample(&t, &p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &[0.8, 1.6]);
    }
}
