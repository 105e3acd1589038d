//! Losses on integer labels: Circle loss for metric learning, and the noise-robust generalized
//! cross entropy.

use super::{align, loss_common, Loss};
use crate::error::{invalid, Result};
use crate::reduction::Reduction;
use candle_core::{DType, Tensor, D};

/// Integer labels as Keras reads them (`cast(y, "int32")`): truncated towards zero, kept in `x`'s
/// float dtype so they can be compared on the device.
fn truncate(x: &Tensor) -> Result<Tensor> {
    Ok(x.abs()?.floor()?.mul(&x.sign()?)?)
}

/// `log(1 + exp(x))` with `log1p` accuracy for very negative `x`, where `log(1 + tiny)` would
/// round to 0 (Circle masks values that are exactly 0, so the difference matters).
fn softplus_accurate(x: &Tensor) -> Result<Tensor> {
    let tiny = x.abs()?.neg()?.exp()?; // exp(-|x|), in (0, 1]
    let plain = tiny.affine(1.0, 1.0)?.log()?;
    // log1p(y) = y - y²/2 + … ; below 1e-4 the second term is already under f32 precision.
    let series = tiny.sub(&(tiny.sqr()? * 0.5)?)?;
    let tail = tiny.lt(1e-4)?.where_cond(&series, &plain)?;
    Ok(x.relu()?.add(&tail)?)
}

/// Log-sum-exp over the last axis of the entries of `x` where `mask` (0/1, same shape) is set.
/// Returns the values (0 where a row has no entry, rather than -inf) and the rows that have one.
fn masked_logsumexp(x: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let on = mask.gt(0.0)?;
    let has_any = mask.max_keepdim(D::Minus1)?.gt(0.0)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, x.shape(), x.device())?.to_dtype(x.dtype())?;
    let masked = on.where_cond(x, &neg_inf)?;
    let max = masked.max_keepdim(D::Minus1)?;
    // The shift cancels out of the value and the gradient, so it is taken as a constant.
    let shift = has_any.where_cond(&max, &max.zeros_like()?)?.detach();
    // Masked entries are sent to -inf *before* exp, so exp never overflows and no NaN can reach
    // the gradient.
    let shifted = on.where_cond(&x.broadcast_sub(&shift)?, &neg_inf)?;
    let sum = shifted.exp()?.sum_keepdim(D::Minus1)?;
    let sum = has_any.where_cond(&sum, &sum.ones_like()?)?;
    let lse = sum.log()?.add(&shift)?.squeeze(D::Minus1)?;
    Ok((lse, has_any.squeeze(D::Minus1)?))
}

/// Circle loss (Sun et al. 2020) between integer labels `[batch]` and L2-normalized embeddings
/// `[batch, dim]`: every pair of samples in the batch with the same label is a positive pair,
/// every pair with different labels a negative one.
///
/// As in Keras, the cosine distances `d = max(1 - e_i·e_j, 0)` are weighted per pair, and sample
/// `i` gets `softplus(lse_pos(-gamma·max(margin + d, 0)·(margin - d)) +
/// lse_neg(gamma·max(1 + margin - d, 0)·(1 - margin - d)))`. A sample with no positive or no
/// negative partner gets 0, and Keras masks every sample whose loss is 0 out of the reduction:
/// [`Loss::own_mask`] returns `loss > 0`, so `sum_over_batch_size` averages over the samples
/// that have a loss. With `remove_diagonal` (the default) a sample is not its own positive.
///
/// The embeddings are used as given: normalize them first (e.g. a unit-normalization layer).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{Circle, Loss};
/// let labels = Tensor::new(&[0f32, 0., 1.], &Device::Cpu)?;
/// let emb = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 0.]], &Device::Cpu)?;
/// let loss = Circle::new().gamma(1.0).margin(0.0);
/// let v = loss.per_sample(&labels, &emb)?.to_vec1::<f32>()?;
/// // Sample 0: positive at distance 1 (weight 1, -1·(0 - 1) = 1), negative at distance 0
/// // (weight 1, 1·(1 - 0) = 1): softplus(2). Sample 2 has no positive: 0, and masked out.
/// assert!((v[0] - 2.126928).abs() < 1e-5 && v[2] == 0.0);
/// let mask = loss.own_mask(&labels, &emb)?.unwrap().to_vec1::<u8>()?;
/// assert_eq!(mask, vec![1, 1, 0]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Circle {
    name: String,
    reduction: Reduction,
    gamma: f64,
    margin: f64,
    remove_diagonal: bool,
}

impl Circle {
    /// Keras' defaults: `gamma = 80`, `margin = 0.4`, `remove_diagonal = true`.
    pub fn new() -> Self {
        Self {
            name: "circle".into(),
            reduction: Reduction::default(),
            gamma: 80.0,
            margin: 0.4,
            remove_diagonal: true,
        }
    }
    /// The scale of the similarity scores, finite and `>= 0`.
    pub fn gamma(mut self, gamma: f64) -> Self {
        self.gamma = gamma;
        self
    }
    /// The relaxation margin (finite): the optimum is `margin` away for positives and
    /// `1 - margin` for negatives.
    pub fn margin(mut self, margin: f64) -> Self {
        self.margin = margin;
        self
    }
    /// Whether a sample's similarity with itself is left out of its positives.
    pub fn remove_diagonal(mut self, remove: bool) -> Self {
        self.remove_diagonal = remove;
        self
    }
}

impl Default for Circle {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(Circle);

impl Loss for Circle {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "Circle",
            &self.name,
            self.reduction,
            serde_json::json!({ "gamma": self.gamma, "margin": self.margin, "remove_diagonal": self.remove_diagonal }),
        ))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn validate(&self) -> Result<()> {
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(invalid(format!(
                "{}: gamma must be finite and >= 0, got {}",
                self.name, self.gamma
            )));
        }
        if !self.margin.is_finite() {
            return Err(invalid(format!(
                "{}: margin must be finite, got {}",
                self.name, self.margin
            )));
        }
        Ok(())
    }
    /// Keras sets the mask `loss > 0` on the circle loss values.
    fn own_mask(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.per_sample(y_true, &y_pred.detach())?.gt(0.0)?))
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (t, p) = align(y_true, y_pred)?;
        if p.rank() != 2 {
            return Err(invalid(format!(
                "{}: y_pred must be embeddings of shape [batch, dim], got {:?}",
                self.name,
                y_pred.dims()
            )));
        }
        let batch = p.dims()[0];
        if t.elem_count() != batch {
            return Err(invalid(format!(
                "{}: y_true must hold one integer label per sample (shape [{batch}]), got {:?} \
                 for y_pred {:?}",
                self.name,
                y_true.dims(),
                y_pred.dims()
            )));
        }
        let dtype = p.dtype();
        let labels = truncate(&t.flatten_all()?)?;
        let same = labels
            .reshape((batch, 1))?
            .broadcast_eq(&labels.reshape((1, batch))?)?
            .to_dtype(dtype)?;
        let negative = same.affine(-1.0, 1.0)?;
        let positive = if self.remove_diagonal {
            let off_diagonal = Tensor::eye(batch, dtype, p.device())?.affine(-1.0, 1.0)?;
            same.mul(&off_diagonal)?
        } else {
            same
        };

        let similarity = p.matmul(&p.t()?.contiguous()?)?;
        let distance = similarity.affine(-1.0, 1.0)?.relu()?;
        let (m, g) = (self.margin, self.gamma);
        let pos_weight = distance.affine(1.0, m)?.mul(&positive)?.relu()?;
        let neg_weight = distance.affine(-1.0, 1.0 + m)?.mul(&negative)?.relu()?;
        let pos_logits = pos_weight
            .mul(&distance.affine(-1.0, m)?)?
            .affine(-g, 0.0)?;
        let neg_logits = neg_weight
            .mul(&distance.affine(-1.0, 1.0 - m)?)?
            .affine(g, 0.0)?;

        let (pos_lse, has_pos) = masked_logsumexp(&pos_logits, &positive)?;
        let (neg_lse, has_neg) = masked_logsumexp(&neg_logits, &negative)?;
        let value = softplus_accurate(&pos_lse.add(&neg_lse)?)?;
        // No positive or no negative: Keras' log-sum-exp is -inf and softplus(-inf) = 0.
        let both = has_pos
            .to_dtype(DType::U8)?
            .mul(&has_neg.to_dtype(DType::U8)?)?;
        Ok(both.where_cond(&value, &value.zeros_like()?)?)
    }
}

/// Generalized cross entropy (Zhang & Sabuncu 2018) between integer labels and class
/// probabilities: `(1 - p_y^q) / q`, where `p_y` is the predicted probability of the true class.
/// `q` in `(0, 1)` moves it from crossentropy-like (`q → 0`) to MAE-like (`q → 1`).
///
/// Labels are read as Keras does (truncated to integers); a label outside `[0, classes)` selects
/// no class, so `p_y = 0` and the loss is `1/q`. Labels of shape `[batch, 1]` are squeezed to
/// `[batch]` (Keras 3.15.1 would broadcast them against the batch into a `[batch, batch]` result).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{CategoricalGeneralizedCrossEntropy, Loss};
/// let labels = Tensor::new(&[1f32], &Device::Cpu)?;
/// let probs = Tensor::new(&[[0.75f32, 0.25]], &Device::Cpu)?;
/// let v = CategoricalGeneralizedCrossEntropy::new().per_sample(&labels, &probs)?;
/// // (1 - 0.25^0.5) / 0.5
/// assert!((v.to_vec1::<f32>()?[0] - 1.0).abs() < 1e-6);
/// assert!(CategoricalGeneralizedCrossEntropy::new().q(1.0).validate().is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CategoricalGeneralizedCrossEntropy {
    name: String,
    reduction: Reduction,
    q: f64,
}

impl CategoricalGeneralizedCrossEntropy {
    /// Keras' default `q = 0.5`.
    pub fn new() -> Self {
        Self {
            name: "categorical_generalized_cross_entropy".into(),
            reduction: Reduction::default(),
            q: 0.5,
        }
    }
    /// The noise parameter, strictly between 0 and 1.
    pub fn q(mut self, q: f64) -> Self {
        self.q = q;
        self
    }
}

impl Default for CategoricalGeneralizedCrossEntropy {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(CategoricalGeneralizedCrossEntropy);

impl Loss for CategoricalGeneralizedCrossEntropy {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "CategoricalGeneralizedCrossEntropy",
            &self.name,
            self.reduction,
            serde_json::json!({ "q": self.q }),
        ))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn validate(&self) -> Result<()> {
        if !(self.q > 0.0 && self.q < 1.0) {
            return Err(invalid(format!(
                "{}: q must be in the interval (0, 1), got {}",
                self.name, self.q
            )));
        }
        Ok(())
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (mut labels, p) = align(y_true, y_pred)?;
        if p.rank() == 0 {
            return Err(invalid(format!(
                "{}: y_pred must have a class axis, got a scalar",
                self.name
            )));
        }
        if labels.rank() == p.rank() && labels.rank() > 0 && labels.dims()[labels.rank() - 1] == 1 {
            labels = labels.squeeze(labels.rank() - 1)?;
        }
        let expected = &p.dims()[..p.rank() - 1];
        if labels.dims() != expected {
            return Err(invalid(format!(
                "{}: labels of shape {:?} do not fit predictions of shape {:?}: give one integer \
                 label per sample (shape {:?})",
                self.name,
                y_true.dims(),
                y_pred.dims(),
                expected
            )));
        }
        let classes = p.dims()[p.rank() - 1];
        let class_ids = Tensor::arange(0u32, classes as u32, p.device())?.to_dtype(p.dtype())?;
        let one_hot = truncate(&labels)?
            .unsqueeze(labels.rank())?
            .broadcast_eq(&class_ids)?
            .to_dtype(p.dtype())?;
        let p_true = p.mul(&one_hot)?.sum(D::Minus1)?;
        Ok(p_true.powf(self.q)?.affine(-1.0 / self.q, 1.0 / self.q)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reduction::reduce_weighted;
    use candle_core::Device;

    fn close(got: &[f32], want: &[f32], rtol: f32) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-6 + rtol * w.abs(),
                "{got:?} vs {want:?}"
            );
        }
    }

    fn embeddings() -> Tensor {
        // Unit vectors at angles 0.1, 0.5, 2.0, 2.4, 4.0, 0.3 radians.
        let rows: Vec<Vec<f32>> = [0.1f32, 0.5, 2.0, 2.4, 4.0, 0.3]
            .iter()
            .map(|a| vec![a.cos(), a.sin()])
            .collect();
        Tensor::new(rows, &Device::Cpu).unwrap()
    }

    // Reference values (the *_REF constants at the end) come from keras 3.15.1 (JAX backend):
    // `loss.call(y_true, y_pred)` for per-sample values and `loss(y_true, y_pred)` for the reduced
    // value, which includes Keras' `loss > 0` mask.

    #[test]
    fn circle_matches_keras_with_defaults() {
        let labels = Tensor::new(&[0f32, 0., 1., 1., 2., 0.], &Device::Cpu).unwrap();
        let loss = Circle::new();
        let v = loss
            .per_sample(&labels, &embeddings())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Tiny values (well-separated classes): compare relatively, they decide Keras' mask.
        for (g, w) in v.iter().zip(CIRCLE_DEFAULT_REF) {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs(),
                "{v:?} vs {CIRCLE_DEFAULT_REF:?}"
            );
        }
        let mask = loss.own_mask(&labels, &embeddings()).unwrap().unwrap();
        assert_eq!(mask.to_vec1::<u8>().unwrap(), vec![1, 1, 1, 1, 0, 1]);
    }

    #[test]
    fn circle_mask_matches_keras_reduction() {
        // Label 2 appears once: that sample has no positive, loss 0, masked out of the mean.
        let labels = Tensor::new(&[0f32, 0., 1., 1., 2., 0.], &Device::Cpu).unwrap();
        let emb = embeddings();
        let loss = Circle::new().gamma(32.0).margin(0.25);
        let v = loss.per_sample(&labels, &emb).unwrap();
        close(&v.to_vec1::<f32>().unwrap(), &CIRCLE_G32_REF, 1e-4);
        let mask = loss.own_mask(&labels, &emb).unwrap().unwrap();
        assert_eq!(mask.to_vec1::<u8>().unwrap(), vec![1, 1, 1, 1, 0, 1]);
        let reduced = loss
            .reduced(&labels, &emb, None, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        close(&[reduced], &[CIRCLE_G32_REDUCED_REF], 1e-4);
        let sw = Tensor::new(&[1f32, 0.5, 2., 1., 3., 0.], &Device::Cpu).unwrap();
        let m = mask.to_dtype(DType::F32).unwrap();
        let r = reduce_weighted(&v, Some(&sw), Some(&m), Reduction::SumOverBatchSize).unwrap();
        close(
            &[r.to_scalar::<f32>().unwrap()],
            &[CIRCLE_G32_WEIGHTED_REF],
            1e-4,
        );
    }

    #[test]
    fn circle_without_diagonal_removal_matches_keras() {
        let labels = Tensor::new(&[0f32, 0., 1., 1., 2., 0.], &Device::Cpu).unwrap();
        let loss = Circle::new().gamma(10.0).margin(0.1).remove_diagonal(false);
        let v = loss
            .per_sample(&labels, &embeddings())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &CIRCLE_DIAG_REF, 1e-4);
    }

    #[test]
    fn circle_has_finite_gradients_with_lonely_samples() {
        let labels = Tensor::new(&[0f32, 0., 1., 1., 2., 0.], &Device::Cpu).unwrap();
        let var = candle_core::Var::from_tensor(&embeddings()).unwrap();
        let loss = Circle::new().gamma(32.0).margin(0.25);
        let total = loss.reduced(&labels, var.as_tensor(), None, None).unwrap();
        let grads = total.backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "{g:?}");
    }

    #[test]
    fn generalized_cross_entropy_matches_keras() {
        let p = Tensor::new(
            &[[0.7f32, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.25, 0.5]],
            &Device::Cpu,
        )
        .unwrap();
        let labels = Tensor::new(&[0f32, 2., 1.], &Device::Cpu).unwrap();
        let v = CategoricalGeneralizedCrossEntropy::new()
            .per_sample(&labels, &p)
            .unwrap();
        close(
            &v.to_vec1::<f32>().unwrap(),
            &[0.32667995, 0.4508066, 1.0],
            1e-5,
        );
        // Out-of-range labels select nothing (loss 1/q); fractional labels are truncated.
        let odd = Tensor::new(&[0f32, 3., -1.], &Device::Cpu).unwrap();
        let loss = CategoricalGeneralizedCrossEntropy::new().q(0.2);
        close(
            &loss.per_sample(&odd, &p).unwrap().to_vec1::<f32>().unwrap(),
            &[0.3442505, 5.0, 5.0],
            1e-5,
        );
        let frac = Tensor::new(&[0f32, 2.7, 1.2], &Device::Cpu).unwrap();
        close(
            &loss
                .per_sample(&frac, &p)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            &[0.3442505, 0.48559785, 1.2107086],
            1e-5,
        );
        // [batch, 1] labels: the per-sample values of [batch] labels.
        let column = labels.unsqueeze(1).unwrap();
        let v = CategoricalGeneralizedCrossEntropy::new()
            .per_sample(&column, &p)
            .unwrap();
        close(
            &v.to_vec1::<f32>().unwrap(),
            &[0.32667995, 0.4508066, 1.0],
            1e-5,
        );
    }

    #[test]
    fn bad_parameters_are_errors() {
        for q in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
            assert!(
                CategoricalGeneralizedCrossEntropy::new()
                    .q(q)
                    .validate()
                    .is_err(),
                "q = {q}"
            );
        }
        assert!(Circle::new().gamma(-1.0).validate().is_err());
        assert!(Circle::new().margin(f64::INFINITY).validate().is_err());
        let labels = Tensor::new(&[0f32, 1.], &Device::Cpu).unwrap();
        let emb = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu).unwrap();
        assert!(Circle::new()
            .gamma(f64::NAN)
            .per_sample(&labels, &emb)
            .is_err());
    }

    const CIRCLE_DEFAULT_REF: [f32; 6] = [
        1.4877019e-5,
        7.482246e-6,
        4.598699e-6,
        9.143579e-6,
        0.0,
        1.1399742e-5,
    ];
    const CIRCLE_G32_REF: [f32; 6] = [0.6454276, 0.502317, 0.33265856, 0.41777363, 0.0, 0.47708857];
    const CIRCLE_G32_REDUCED_REF: f32 = 0.47505307;
    const CIRCLE_G32_WEIGHTED_REF: f32 = 0.39593542;
    const CIRCLE_DIAG_REF: [f32; 6] = [
        2.2331145, 2.2185047, 2.125893, 2.1172347, 1.6947144, 2.2154083,
    ];
}
