//! Adversarial regularization (Goodfellow et al. 2015; the semantics of TensorFlow's Neural
//! Structured Learning wrapper) as an added loss.
//!
//! Each training step perturbs the inputs along the normalized input gradient of the loss,
//! `x_adv = clip(x + ε · normalize(∇ₓ L))`, holds the perturbation constant, and adds
//! `multiplier · L(x_adv, y)` with the same compiled losses, loss weights and sample weights.
//! FGSM costs two forward and two backward passes: the clean backward pass of the compiled
//! losses gives both the input gradient and their parameter gradients, and the second backward
//! pass covers the adversarial term together with the other added terms. PGD repeats the perturbation step `k`
//! times, projecting back into the ε-ball.

mod sign_step;

use crate::error::{invalid, Result};
use crate::model::{AddedLoss, Tensors};
use crate::random::SampleStreams;
use candle_core::{DType, Tensor};

/// The most steps a PGD attack may take.
pub const MAX_PGD_STEPS: usize = 10_000;

/// How the input gradient is turned into a perturbation direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerturbationNorm {
    /// `sign(g)`: the infinity-norm steepest direction (FGSM).
    Infinity,
    /// `g / ‖g‖₂`, the norm taken per sample over every non-batch axis of every input jointly.
    L2,
}

/// An adversarial-regularization term for [`crate::Model::add_loss`].
///
/// ```
/// use kiln::adversarial::{Adversarial, PerturbationNorm};
/// let fgsm = Adversarial::fgsm(0.05).multiplier(0.5).clip(0.0, 1.0);
/// let pgd = Adversarial::pgd(0.1, 5, 0.03).norm(PerturbationNorm::Infinity).random_start(true);
/// assert_eq!(fgsm.steps(), 1);
/// assert_eq!(pgd.steps(), 5);
/// ```
#[derive(Debug, Clone)]
pub struct Adversarial {
    epsilon: f64,
    step_size: f64,
    steps: usize,
    norm: PerturbationNorm,
    multiplier: f64,
    clip: Option<(f64, f64)>,
    feature_masks: Option<Vec<Tensor>>,
    random_start: bool,
    seed: u64,
}

impl Default for Adversarial {
    /// The Neural Structured Learning defaults: one step of size 0.001 along the L2-normalized
    /// gradient, multiplier 0.2.
    fn default() -> Self {
        Self {
            epsilon: 0.001,
            step_size: 0.001,
            steps: 1,
            norm: PerturbationNorm::L2,
            multiplier: 0.2,
            clip: None,
            feature_masks: None,
            random_start: false,
            seed: 0,
        }
    }
}

impl Adversarial {
    /// The fast gradient sign method: one step of size `epsilon` along `sign(∇ₓ L)`.
    pub fn fgsm(epsilon: f64) -> Self {
        Self {
            epsilon,
            step_size: epsilon,
            norm: PerturbationNorm::Infinity,
            ..Self::default()
        }
    }

    /// Projected gradient descent: `steps` steps of `step_size` along the normalized gradient
    /// (L2 by default, as in NSL), each projected back into the `epsilon`-ball around `x`.
    pub fn pgd(epsilon: f64, steps: usize, step_size: f64) -> Self {
        Self {
            epsilon,
            step_size,
            steps,
            ..Self::default()
        }
    }

    /// The weight of the term in the total loss (default 0.2).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The perturbation direction (FGSM: infinity norm; otherwise L2).
    pub fn norm(mut self, norm: PerturbationNorm) -> Self {
        self.norm = norm;
        self
    }

    /// Clips the perturbed inputs to `[min, max]` (for pixels, say `[0, 1]`).
    pub fn clip(mut self, min: f64, max: f64) -> Self {
        self.clip = Some((min, max));
        self
    }

    /// One mask per input, broadcast over the batch: only features where the mask is non-zero
    /// are perturbed (the gradient is multiplied by it before normalization).
    pub fn feature_masks(mut self, masks: Vec<Tensor>) -> Self {
        self.feature_masks = Some(masks);
        self
    }

    /// PGD starts from a uniformly random point of the ε-ball (infinity norm) instead of `x`.
    pub fn random_start(mut self, on: bool) -> Self {
        self.random_start = on;
        self
    }

    /// Seed of the random start, mixed into the key of its per-sample streams (with the run's
    /// seed and the step) in training.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The seed of the random start.
    pub fn random_start_seed(&self) -> u64 {
        self.seed
    }

    /// The number of perturbation steps (1 for FGSM).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Whether PGD starts from a random point.
    pub fn random_start_enabled(&self) -> bool {
        self.random_start
    }

    /// The term's multiplier.
    pub fn weight(&self) -> f64 {
        self.multiplier
    }

    /// Checks the settings.
    pub fn validate(&self, n_inputs: usize) -> Result<()> {
        let finite_pos = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_pos(self.epsilon) || !finite_pos(self.step_size) || !finite_pos(self.multiplier)
        {
            return Err(invalid(format!(
                "adversarial: epsilon ({}), step size ({}) and multiplier ({}) must be finite and >= 0",
                self.epsilon, self.step_size, self.multiplier
            )));
        }
        if self.steps == 0 {
            return Err(invalid("adversarial: PGD needs at least one step"));
        }
        // Each step is a forward and a backward pass per batch: far beyond the tens of steps
        // PGD is used with, a count is a typo that would never finish.
        if self.steps > MAX_PGD_STEPS {
            return Err(invalid(format!(
                "adversarial: PGD with {} steps would not finish: use at most {MAX_PGD_STEPS} (PGD is usually run with 7 to 100)",
                self.steps
            )));
        }
        if let Some((lo, hi)) = self.clip {
            if lo > hi {
                return Err(invalid(format!(
                    "adversarial: clip range [{lo}, {hi}] is empty"
                )));
            }
        }
        if let Some(m) = &self.feature_masks {
            if m.len() != n_inputs {
                return Err(invalid(format!(
                    "adversarial: {} feature masks for a model with {n_inputs} inputs",
                    m.len()
                )));
            }
        }
        Ok(())
    }

    /// The perturbation direction for these input gradients: non-finite entries zeroed, feature
    /// masks applied, then sign or joint per-sample L2 normalization.
    pub fn direction(&self, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut cleaned = Vec::with_capacity(grads.len());
        for (i, g) in grads.iter().enumerate() {
            let finite = g.abs()?.lt(f64::INFINITY)?;
            let mut g = finite.where_cond(g, &g.zeros_like()?)?;
            if let Some(masks) = &self.feature_masks {
                let mask = masks[i].to_dtype(g.dtype())?.to_device(g.device())?;
                g = g.broadcast_mul(&mask)?;
            }
            cleaned.push(g.detach());
        }
        match self.norm {
            PerturbationNorm::Infinity => cleaned.iter().map(|g| Ok(g.sign()?)).collect(),
            PerturbationNorm::L2 => {
                let squared = per_sample_squared_norm(&cleaned)?;
                let inv = squared.maximum(1e-12)?.sqrt()?.recip()?;
                cleaned
                    .iter()
                    .map(|g| Ok(g.broadcast_mul(&batch_shaped(&inv, g.rank())?)?))
                    .collect()
            }
        }
    }

    /// One step from `current` along `direction`, projected into the ε-ball around `clean` and
    /// clipped.
    pub fn step(
        &self,
        clean: &[Tensor],
        current: &[Tensor],
        direction: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        let moved: Vec<Tensor> = current
            .iter()
            .zip(direction)
            .map(|(x, d)| Ok((x + (d * self.step_size)?)?))
            .collect::<Result<_>>()?;
        self.project(clean, &moved)
    }

    /// [`Self::direction`] then [`Self::step`]: one attack step from `current` along the input
    /// gradients `grads`. The infinity-norm step without feature masks runs as one fused pass
    /// per input on the CPU, with the same result.
    pub fn step_along(
        &self,
        clean: &[Tensor],
        current: &[Tensor],
        grads: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        let fused = self.norm == PerturbationNorm::Infinity
            && self.feature_masks.is_none()
            && clean.len() == current.len()
            && clean.len() == grads.len()
            && clean
                .iter()
                .zip(current)
                .zip(grads)
                .all(|((x, c), g)| sign_step::SignStep::applies(x, c, g));
        if !fused {
            let direction = self.direction(grads)?;
            return self.step(clean, current, &direction);
        }
        let step = sign_step::SignStep {
            step_size: self.step_size,
            epsilon: self.epsilon,
            clip: self.clip,
        };
        clean
            .iter()
            .zip(current)
            .zip(grads)
            .map(|((x, c), g)| Ok(x.apply_op3_no_bwd(c, &g.detach(), &step)?))
            .collect()
    }

    /// Projects `candidate` into the ε-ball around `clean` (the norm's ball), then clips.
    pub fn project(&self, clean: &[Tensor], candidate: &[Tensor]) -> Result<Vec<Tensor>> {
        let deltas: Vec<Tensor> = clean
            .iter()
            .zip(candidate)
            .map(|(x, c)| Ok((c - x)?))
            .collect::<Result<_>>()?;
        let deltas: Vec<Tensor> = match self.norm {
            PerturbationNorm::Infinity => deltas
                .iter()
                .map(|d| Ok(d.clamp(-self.epsilon, self.epsilon)?))
                .collect::<Result<_>>()?,
            PerturbationNorm::L2 => {
                let norm = per_sample_squared_norm(&deltas)?.sqrt()?;
                // scale = min(1, ε / ‖δ‖)
                let scale = norm
                    .maximum(1e-12)?
                    .recip()?
                    .affine(self.epsilon, 0.0)?
                    .minimum(1.0)?;
                deltas
                    .iter()
                    .map(|d| Ok(d.broadcast_mul(&batch_shaped(&scale, d.rank())?)?))
                    .collect::<Result<_>>()?
            }
        };
        clean
            .iter()
            .zip(deltas)
            .map(|(x, d)| {
                let x_adv = (x + d)?;
                let x_adv = match self.clip {
                    Some((lo, hi)) => x_adv.clamp(lo, hi)?,
                    None => x_adv,
                };
                Ok(x_adv.detach())
            })
            .collect()
    }

    /// The starting point of the attack: `x`, or a random point of the ε-ball (PGD), each
    /// sample's from its own stream (input `i` is draw `i`), so that a data-parallel rank
    /// starts each of its samples where one process does.
    ///
    /// ```
    /// use kiln::adversarial::Adversarial;
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::random::SampleStreams;
    /// let pgd = Adversarial::pgd(0.1, 3, 0.02).random_start(true);
    /// let x = Tensor::zeros((4, 5), kiln::candle::DType::F32, &Device::Cpu)?;
    /// let start = pgd.start(&[x], &SampleStreams::new(1, 0))?;
    /// let v = start[0].flatten_all()?.to_vec1::<f32>()?;
    /// assert!(v.iter().all(|d| d.abs() <= 0.1) && v.iter().any(|d| *d != 0.0));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// A tensor error (an input without a batch axis).
    pub fn start(&self, clean: &[Tensor], random: &SampleStreams) -> Result<Vec<Tensor>> {
        if !self.random_start {
            return Ok(clean.to_vec());
        }
        let noisy: Vec<Tensor> = clean
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let (e, dtype, device) = (self.epsilon, x.dtype(), x.device());
                let noise = random.uniform(i as u32, x.dims(), -e, e, dtype, device)?;
                Ok((x + noise)?)
            })
            .collect::<Result<_>>()?;
        self.project(clean, &noisy)
    }
}

/// Σ over every non-batch axis of every tensor of g², shape `[batch]`.
fn per_sample_squared_norm(tensors: &[Tensor]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for t in tensors {
        let batch = t.dims()[0];
        let s = t
            .to_dtype(DType::F64)?
            .sqr()?
            .reshape((batch, t.elem_count() / batch.max(1)))?
            .sum(1)?;
        total = Some(match total {
            Some(acc) => (acc + s)?,
            None => s,
        });
    }
    let total = total.ok_or_else(|| invalid("adversarial: the model has no inputs"))?;
    Ok(total.to_dtype(tensors[0].dtype())?)
}

/// Reshapes a `[batch]` tensor to `[batch, 1, …]` with `rank` axes, for broadcasting.
fn batch_shaped(t: &Tensor, rank: usize) -> Result<Tensor> {
    let mut shape = vec![t.dims()[0]];
    shape.resize(rank, 1);
    Ok(t.reshape(shape)?)
}

impl AddedLoss for Adversarial {
    fn compute(&self, _tensors: &Tensors) -> Result<Tensor> {
        Err(invalid(
            "the adversarial term is computed by the training loop, not as a closure",
        ))
    }
    fn adversarial(&self) -> Option<&Adversarial> {
        Some(self)
    }
}
