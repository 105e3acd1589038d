//! Connectionist temporal classification (CTC) loss, as Keras' `CTC` with the JAX backend.

use super::{align, loss_common, Loss};
use crate::error::{invalid, Result};
use crate::reduction::Reduction;
use candle_core::{Tensor, D};

/// Keras' stand-in for `log 0` in the forward recursion (finite, so no NaN can appear).
const LOG_EPSILON: f64 = -1e5;

/// `log(exp(a) + exp(b))` elementwise, stable for any magnitudes.
fn logaddexp(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let max = a.maximum(b)?;
    let gap = a.sub(b)?.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok(max.add(&gap)?)
}

/// Keras' `update_phi_score`: `phi[:, 1:] = logaddexp(phi[:, 1:], added)`, column 0 unchanged.
fn update_phi(phi: &Tensor, added: &Tensor) -> Result<Tensor> {
    let n = added.dims()[1];
    let head = phi.narrow(1, 0, 1)?;
    let tail = logaddexp(&phi.narrow(1, 1, n)?, added)?;
    Ok(Tensor::cat(&[&head, &tail], 1)?)
}

/// CTC loss between label sequences and per-step logits, one value per sample (Keras' `CTC`).
///
/// * `y_true`: `[batch, max_label_length]` class indices, the blank/padding index is **0**: the
///   label length of a sample is its number of non-zero entries, and its first that-many entries
///   are its label sequence, so pack labels to the left and pad with 0 on the right.
/// * `y_pred`: `[batch, steps, classes]` unnormalized logits (a log-softmax is applied over the
///   classes); every sample uses all `steps` time steps. Class 0 is the blank.
///
/// The value is `-log p(labels | logits)`, computed with Keras' (optax') forward recursion in log
/// space from tensor operations, so it is differentiable with respect to the logits. Labels are
/// read as integers by truncation, as Keras does.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{Loss, Ctc};
/// // One step, classes {blank, 1}, equal logits: p("1") = 1/2.
/// let labels = Tensor::new(&[[1f32]], &Device::Cpu)?;
/// let logits = Tensor::new(&[[[0f32, 0.]]], &Device::Cpu)?;
/// let v = Ctc::new().per_sample(&labels, &logits)?.to_vec1::<f32>()?;
/// assert!((v[0] - std::f32::consts::LN_2).abs() < 1e-5);
/// // Two steps: "1" is emitted by the paths 1-1, 1-blank and blank-1, 3 of 4 equally likely.
/// let logits = Tensor::new(&[[[0f32, 0.], [0., 0.]]], &Device::Cpu)?;
/// let v = Ctc::new().per_sample(&labels, &logits)?.to_vec1::<f32>()?;
/// assert!((v[0] - (4f32 / 3.).ln()).abs() < 1e-5);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Ctc {
    name: String,
    reduction: Reduction,
}

impl Ctc {
    /// The loss with Keras' defaults (blank index 0).
    pub fn new() -> Self {
        Self {
            name: "ctc".into(),
            reduction: Reduction::default(),
        }
    }
}

impl Default for Ctc {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(Ctc);

impl Loss for Ctc {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "CTC",
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
        if t.rank() != 2 {
            return Err(invalid(format!(
                "{}: y_true must be integer labels of shape [batch, max_label_length], got {:?}",
                self.name,
                y_true.dims()
            )));
        }
        if p.rank() != 3 {
            return Err(invalid(format!(
                "{}: y_pred must be logits of shape [batch, steps, classes], got {:?}",
                self.name,
                y_pred.dims()
            )));
        }
        let (batch, steps, classes) = p.dims3()?;
        let labels_len = t.dims()[1];
        if t.dims()[0] != batch {
            return Err(invalid(format!(
                "{}: y_true {:?} and y_pred {:?} have different batch sizes",
                self.name,
                y_true.dims(),
                y_pred.dims()
            )));
        }
        if steps == 0 || classes == 0 {
            return Err(invalid(format!(
                "{}: y_pred {:?} needs at least one time step and one class",
                self.name,
                y_pred.dims()
            )));
        }
        let dtype = p.dtype();
        let device = p.device();
        // [B, T, K] log-probabilities, and [T, B, 1] the blank's at each step.
        let log_probs = candle_nn::ops::log_softmax(&p, D::Minus1)?;
        let blank = log_probs.narrow(2, 0, 1)?.transpose(0, 1)?.contiguous()?;
        if labels_len == 0 {
            // Only the all-blank path is left.
            return Ok(blank.sum(0)?.squeeze(1)?.neg()?);
        }

        // Label lengths count the non-blank entries (before truncation, as Keras does).
        let label_length = t.ne(0.0)?.to_dtype(dtype)?.sum(1)?; // [B]
        let ids = t.abs()?.floor()?.mul(&t.sign()?)?; // [B, N], truncated like int32
        let class_ids = Tensor::arange(0u32, classes as u32, device)?.to_dtype(dtype)?;
        let one_hot = ids
            .unsqueeze(2)?
            .broadcast_eq(&class_ids.reshape((1, 1, classes))?)?
            .to_dtype(dtype)?;
        // [B, T, N] -> [T, B, N]: log-probability of emitting the n-th label at step t.
        let emit_lp = log_probs
            .matmul(&one_hot.transpose(1, 2)?.contiguous()?)?
            .transpose(0, 1)?
            .contiguous()?;

        // repeat[b, n] = 1 when label n equals label n + 1 (last column 0).
        let repeat = if labels_len > 1 {
            let same =
                ids.narrow(1, 0, labels_len - 1)?
                    .eq(&ids.narrow(1, 1, labels_len - 1)?)?;
            Tensor::cat(
                &[
                    &same.to_dtype(dtype)?,
                    &Tensor::zeros((batch, 1), dtype, device)?,
                ],
                1,
            )?
        } else {
            Tensor::zeros((batch, 1), dtype, device)?
        };
        let repeat_penalty = (&repeat * LOG_EPSILON)?;
        let no_repeat_penalty = repeat.affine(-LOG_EPSILON, LOG_EPSILON)?;

        // phi[b, n]: log-prob of having emitted n labels and being in a blank; emit[b, n]: of
        // having just emitted label n.
        let mut phi = Tensor::cat(
            &[
                &Tensor::zeros((batch, 1), dtype, device)?,
                &Tensor::full(LOG_EPSILON, (batch, labels_len), device)?.to_dtype(dtype)?,
            ],
            1,
        )?;
        let mut emit = Tensor::full(LOG_EPSILON, (batch, labels_len), device)?.to_dtype(dtype)?;
        for step in 0..steps {
            let lp_emit = emit_lp.get(step)?; // [B, N]
            let lp_blank = blank.get(step)?; // [B, 1]

            // Emit -> blank epsilon transition, except into a repeated label.
            let phi_in = update_phi(&phi, &emit.add(&repeat_penalty)?)?;
            // Blank -> emit and emit self-loop.
            let next_emit = logaddexp(
                &phi_in.narrow(1, 0, labels_len)?.add(&lp_emit)?,
                &emit.add(&lp_emit)?,
            )?;
            // Blank self-loop, then emit -> blank only where the next label is a repeat.
            let next_phi = phi_in.broadcast_add(&lp_blank)?;
            let next_phi = update_phi(
                &next_phi,
                &emit.broadcast_add(&lp_blank)?.add(&no_repeat_penalty)?,
            )?;
            phi = next_phi;
            emit = next_emit;
        }
        let phi_last = update_phi(&phi, &emit)?; // [B, N + 1]

        let positions = Tensor::arange(0u32, labels_len as u32 + 1, device)?.to_dtype(dtype)?;
        let pick = label_length
            .unsqueeze(1)?
            .broadcast_eq(&positions.unsqueeze(0)?)?
            .to_dtype(dtype)?;
        Ok(phi_last.mul(&pick)?.sum(1)?.neg()?)
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
                (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "{got:?} vs {want:?}"
            );
        }
    }

    fn logits() -> Tensor {
        // [2, 5, 4], a fixed pseudo-random pattern.
        let data: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 5.0)
            .collect();
        Tensor::from_vec(data, (2, 5, 4), &Device::Cpu).unwrap()
    }

    // Reference values (the *_REF constants at the end) come from keras 3.15.1 (JAX backend),
    // `keras.losses.CTC().call(y_true, y_pred)`.

    #[test]
    fn ctc_matches_keras_with_repeats_and_padding() {
        let labels = Tensor::new(&[[1f32, 1., 2.], [3., 0., 0.]], &Device::Cpu).unwrap();
        let v = Ctc::new()
            .per_sample(&labels, &logits())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &CTC_REF);
    }

    #[test]
    fn ctc_matches_keras_for_empty_labels_and_gaps() {
        // An all-zero row is an empty label; a 0 inside a row still counts positions by the
        // number of non-zero entries (Keras reads the first that-many entries).
        let labels = Tensor::new(&[[0f32, 0., 0.], [2., 0., 3.]], &Device::Cpu).unwrap();
        let v = Ctc::new()
            .per_sample(&labels, &logits())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(&v, &CTC_EDGE_REF);
    }

    #[test]
    fn ctc_gradient_is_finite_and_matches_finite_differences() {
        let labels = Tensor::new(&[[1f32, 1., 2.], [3., 0., 0.]], &Device::Cpu).unwrap();
        let x = logits();
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let total = Ctc::new()
            .per_sample(&labels, var.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = total.backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
        // Central difference on a few coordinates.
        let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for &i in &[0usize, 5, 13, 22, 39] {
            let h = 1e-2f32;
            let eval = |delta: f32| {
                let mut d = base.clone();
                d[i] += delta;
                let t = Tensor::from_vec(d, (2, 5, 4), &Device::Cpu).unwrap();
                Ctc::new()
                    .per_sample(&labels, &t)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (numeric - g[i]).abs() < 2e-3,
                "coordinate {i}: {numeric} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let labels = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        assert!(Ctc::new().per_sample(&labels, &logits()).is_err());
        let labels = Tensor::new(&[[1f32], [2.], [1.]], &Device::Cpu).unwrap();
        assert!(Ctc::new().per_sample(&labels, &logits()).is_err());
    }

    const CTC_REF: [f32; 2] = [3.698625, 5.80561];
    const CTC_EDGE_REF: [f32; 2] = [10.626544, 5.0536437];
}
