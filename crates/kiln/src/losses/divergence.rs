//! Distribution and direction losses: Kullback-Leibler divergence, Poisson, cosine similarity.

use super::{align, loss_common, resolve_axis, Loss};
use crate::error::Result;
use crate::reduction::{Reduction, EPSILON};
use candle_core::{Tensor, D};

/// Kullback-Leibler divergence over the last axis: `Σ y_true · log(y_true / y_pred)`, with both
/// clipped to `[ε, 1]` first (so zero labels contribute `ε·log(ε / y_pred)`, as in Keras).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{KLDivergence, Loss};
/// let t = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu)?;
/// let p = Tensor::new(&[[0.25f32, 0.75]], &Device::Cpu)?;
/// let v = KLDivergence::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
/// // 0.5·ln 2 + 0.5·ln(2/3)
/// assert!((v[0] - 0.1438410).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct KLDivergence {
    name: String,
    reduction: Reduction,
}

impl KLDivergence {
    /// The loss with Keras' defaults.
    pub fn new() -> Self {
        Self {
            name: "kl_divergence".into(),
            reduction: Reduction::default(),
        }
    }
}

impl Default for KLDivergence {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(KLDivergence);

impl Loss for KLDivergence {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "KLDivergence",
            &self.name,
            self.reduction,
            serde_json::json!({}),
        ))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        let (t, p) = align(y_true, y_pred)?;
        let t = t.clamp(EPSILON, 1.0)?;
        let p = p.clamp(EPSILON, 1.0)?;
        let ratio = t.broadcast_div(&p)?.log()?;
        Ok(t.broadcast_mul(&ratio)?.sum(D::Minus1)?)
    }
}

/// Poisson loss over the last axis: `mean(y_pred - y_true · log(y_pred + ε))`, for count targets
/// and positive rate predictions.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{Loss, Poisson};
/// let t = Tensor::new(&[[0f32, 2.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[1f32, 1.]], &Device::Cpu)?;
/// let v = Poisson::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
/// // (1 + (1 - 2·log(1 + ε))) / 2
/// assert!((v[0] - 1.0).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Poisson {
    name: String,
    reduction: Reduction,
}

impl Poisson {
    /// The loss with Keras' defaults.
    pub fn new() -> Self {
        Self {
            name: "poisson".into(),
            reduction: Reduction::default(),
        }
    }
}

impl Default for Poisson {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(Poisson);

impl Loss for Poisson {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Poisson",
            &self.name,
            self.reduction,
            serde_json::json!({}),
        ))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        let (t, p) = align(y_true, y_pred)?;
        let log_rate = p.affine(1.0, EPSILON)?.log()?;
        Ok(p.broadcast_sub(&t.broadcast_mul(&log_rate)?)?
            .mean(D::Minus1)?)
    }
}

/// Negative cosine similarity along `axis` (default the last):
/// `-Σ l2norm(y_true) · l2norm(y_pred)`.
///
/// The result is in `[-1, 1]`; -1 means the same direction. As in Keras, a zero vector gets a
/// similarity of 0 (the inverse norm is capped at `1/ε`), whatever the other vector.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{CosineSimilarity, Loss};
/// let t = Tensor::new(&[[0f32, 1.], [1., 1.], [1., 1.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[1f32, 0.], [1., 1.], [-1., -1.]], &Device::Cpu)?;
/// let v = CosineSimilarity::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
/// assert!(v[0].abs() < 1e-6 && (v[1] + 1.0).abs() < 1e-6 && (v[2] - 1.0).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CosineSimilarity {
    name: String,
    reduction: Reduction,
    axis: isize,
}

impl CosineSimilarity {
    /// Similarity along the last axis.
    pub fn new() -> Self {
        Self {
            name: "cosine_similarity".into(),
            reduction: Reduction::default(),
            axis: -1,
        }
    }
    /// The feature axis the similarity is computed along (negative counts from the end).
    pub fn axis(mut self, axis: isize) -> Self {
        self.axis = axis;
        self
    }
}

impl Default for CosineSimilarity {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(CosineSimilarity);

/// Keras' `ops.normalize(x, axis, order=2)`: `x · min(rsqrt(Σx²), 1/ε)`, written as
/// `x · rsqrt(max(Σx², ε²))` so that a zero vector has a finite gradient.
fn l2_normalize(x: &Tensor, axis: usize) -> Result<Tensor> {
    let square_sum = x.sqr()?.sum_keepdim(axis)?;
    let inv_norm = square_sum.maximum(EPSILON * EPSILON)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv_norm)?)
}

impl Loss for CosineSimilarity {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "CosineSimilarity",
            &self.name,
            self.reduction,
            serde_json::json!({ "axis": self.axis }),
        ))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        let (t, p) = align(y_true, y_pred)?;
        let axis_t = resolve_axis(self.axis, t.rank(), &self.name)?;
        let axis_p = resolve_axis(self.axis, p.rank(), &self.name)?;
        let t = l2_normalize(&t, axis_t)?;
        let p = l2_normalize(&p, axis_p)?;
        let product = t.broadcast_mul(&p)?;
        let axis = resolve_axis(self.axis, product.rank(), &self.name)?;
        Ok(product.sum(axis)?.neg()?)
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

    // Reference values (the *_REF constants at the end) come from keras 3.15.1 (JAX backend),
    // `loss.call(y_true, y_pred)`.

    #[test]
    fn kl_divergence_matches_keras() {
        let t = Tensor::new(&[[0.2f32, 0.8, 0.0], [0.5, 0.25, 0.25]], &Device::Cpu).unwrap();
        let p = Tensor::new(&[[0.1f32, 0.6, 0.3], [0.0, 0.7, 1.2]], &Device::Cpu).unwrap();
        let v = KLDivergence::new()
            .per_sample(&t, &p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &KLD_REF);
    }

    #[test]
    fn poisson_matches_keras() {
        let t = Tensor::new(&[[0f32, 3., 1.], [2., 0., 5.]], &Device::Cpu).unwrap();
        let p = Tensor::new(&[[0.5f32, 2.5, 0.0], [1.5, 0.2, 4.0]], &Device::Cpu).unwrap();
        let v = Poisson::new()
            .per_sample(&t, &p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &POISSON_REF);
    }

    #[test]
    fn cosine_similarity_matches_keras_on_axis_1_and_zero_vectors() {
        let t = Tensor::new(
            &[
                [[1f32, 2.], [0., 1.], [3., -1.]],
                [[0., 0.], [0., 0.], [1., 1.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let p = Tensor::new(
            &[
                [[0.5f32, -1.], [2., 1.], [1., 1.]],
                [[1., 2.], [3., 4.], [5., 6.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let v = CosineSimilarity::new().axis(1).per_sample(&t, &p).unwrap();
        assert_eq!(v.dims(), &[2, 2]);
        close(
            &v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &COSINE_AXIS1_REF,
        );
        let v = CosineSimilarity::new().per_sample(&t, &p).unwrap();
        close(
            &v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &COSINE_LAST_REF,
        );
    }

    #[test]
    fn cosine_similarity_gradient_is_finite_for_zero_vectors() {
        let t = Tensor::new(&[[1f32, 2.], [0., 1.]], &Device::Cpu).unwrap();
        let var = candle_core::Var::new(&[[0f32, 0.], [3., 4.]], &Device::Cpu).unwrap();
        let loss = CosineSimilarity::new()
            .per_sample(&t, var.as_tensor())
            .unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        assert!(g.to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
    }

    const KLD_REF: [f32; 2] = [0.36877358, 7.1084957];
    const POISSON_REF: [f32; 2] = [5.4564075, -0.6808008];
    const COSINE_AXIS1_REF: [f32; 4] = [-0.48304588, 0.47140452, -0.8451542, -0.8017837];
    const COSINE_LAST_REF: [f32; 6] = [0.6, -0.4472136, -0.4472136, 0.0, 0.0, -0.9958931];
}
