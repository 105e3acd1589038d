//! Automatic loss weighting: strategies that set the weights of the total's terms while the
//! model trains, given to [`crate::Compile::loss_weighting`].
//!
//! A strategy sees the compiled per-output losses (each already multiplied by its fixed
//! `loss_weight`, default 1) and, with [`crate::Compile::weight_added_terms`], the added terms
//! too; it returns the objective the step differentiates. Every epoch's logs get each term's
//! current weight as `loss_weight/<term>`: the factor its gradient had in the epoch's last step.
//!
//! | strategy | what it weighs by | extra cost per step |
//! |---|---|---|
//! | [`Uncertainty`] | learned log-variances (Kendall et al. 2018) | none |
//! | [`DynamicWeightAverage`] | the terms' rates of descent over epochs (Liu et al. 2019) | none |
//! | [`Famo`] | task logits fitted to equalize the terms' log-descent (Liu et al. 2023) | one forward pass |
//! | [`PCGrad`] | none (weights 1): conflicting gradients projected apart (Yu et al. 2020) | one backward pass per term |
//! | [`GradNorm`] | weights learned to balance gradient norms at a shared layer (Chen et al. 2018) | one backward pass per term |
//!
//! A strategy that combines gradients ([`Strategy::combines_gradients`]) cannot be used with
//! gradient accumulation or data-parallel training (its combination is of one whole batch's
//! gradients); `fit` says so.
//!
//! ```
//! use kiln::prelude::*;
//! use kiln::loss_weighting::Uncertainty;
//! let x = Input::new([4]);
//! let h = Dense::new(8).activation(Activation::Relu).apply(&x)?;
//! let a = Dense::new(3).with_name("a").apply(&h)?;
//! let b = Dense::new(1).with_name("b").apply(&h)?;
//! let mut model = Model::new(&[x], &[a, b])?;
//! model.compile(
//!     Compile::new(Adam::new(1e-3))
//!         .loss_for("a", SparseCategoricalCrossentropy::new().from_logits(true))
//!         .loss_for("b", "mse")
//!         .loss_weighting(Uncertainty::new()),
//! )?;
//! # Ok::<(), kiln::Error>(())
//! ```

mod dwa;
mod famo;
mod gradnorm;
mod pcgrad;
mod uncertainty;

pub use dwa::DynamicWeightAverage;
pub use famo::Famo;
pub use gradnorm::GradNorm;
pub use pcgrad::PCGrad;
pub use uncertainty::Uncertainty;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};

/// A loss weighting strategy: sets the weights of the terms of the total as training runs.
///
/// The trainer calls [`Strategy::begin`] once (at `compile`), then every step
/// [`Strategy::combine`] on the terms' values and, after the update, [`Strategy::observe`]
/// (and [`Strategy::after_update`] for strategies that ask for the terms after the update),
/// and [`Strategy::end_epoch`] after every epoch. Its state goes into checkpoints through
/// [`Strategy::state`] and [`Strategy::variables`].
pub trait Strategy: Send + Sync + std::fmt::Debug + CloneStrategy {
    /// The strategy's name (`uncertainty`, `dwa`, …), as run files spell it.
    fn name(&self) -> &str;
    /// Checks the hyperparameters; `compile` calls it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the strategy, the hyperparameter and its range.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    /// Prepares a fresh state for these terms (at least two), in the order `combine` gets them.
    ///
    /// # Errors
    /// When the state cannot be created on `device`.
    fn begin(&mut self, terms: &[String], dtype: DType, device: &Device) -> Result<()>;
    /// Variables the model's optimizer trains with the model's weights, by name
    /// (`log_var/<term>`): saved in checkpoints with their optimizer state.
    fn variables(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// The objective one training step differentiates, from the terms' values (scalars, with
    /// their graphs); it sets the weights [`Strategy::weights`] returns. (The reported `loss`
    /// is Σ weight · term, which for [`Uncertainty`] leaves out its ½·s terms.)
    ///
    /// # Errors
    /// When a tensor operation fails or a term is not finite where the strategy needs it.
    fn combine(&mut self, terms: &[Tensor]) -> Result<Tensor>;
    /// Each term's current weight: the factor of its gradient in the last step.
    ///
    /// # Errors
    /// When a variable cannot be read.
    fn weights(&self) -> Result<Vec<f64>>;
    /// A step's term values (before its update) over `samples` samples.
    ///
    /// # Errors
    /// Never by default.
    fn observe(&mut self, _terms: &[f64], _samples: f64) -> Result<()> {
        Ok(())
    }
    /// Whether [`Strategy::after_update`] wants the terms recomputed on the same batch after
    /// the update (one more forward pass per step).
    fn needs_terms_after_update(&self) -> bool {
        false
    }
    /// The terms on the step's batch after the update.
    ///
    /// # Errors
    /// Never by default.
    fn after_update(&mut self, _terms: &[f64]) -> Result<()> {
        Ok(())
    }
    /// The end of an epoch.
    ///
    /// # Errors
    /// When the epoch's values leave the weights undefined (the message says which term).
    fn end_epoch(&mut self) -> Result<()> {
        Ok(())
    }
    /// The state besides [`Strategy::variables`], for checkpoints (exact: floats as bits).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores what [`Strategy::state`] returned.
    ///
    /// # Errors
    /// When the state is not this strategy's, or is for another number of terms.
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// Whether the strategy combines the terms' gradients ([`PCGrad`], [`GradNorm`]): each
    /// training step then runs one backward pass per weighed term (and one for the rest of the
    /// total) and applies [`Strategy::combine_gradients`]'s result instead of the gradient of
    /// [`Strategy::combine`]'s objective.
    fn combines_gradients(&self) -> bool {
        false
    }
    /// The step's gradient over the trainable weights from the weighed terms' own gradients
    /// (the rest of the total is added by the trainer). `advance` is false outside training
    /// steps (`term_gradients`): the strategy's state must not move then.
    ///
    /// # Errors
    /// By default, since only strategies that say [`Strategy::combines_gradients`] are asked.
    fn combine_gradients(
        &mut self,
        _step: &GradientStep<'_>,
        _advance: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        Err(Error::State(format!(
            "loss weighting `{}` does not combine gradients",
            self.name()
        )))
    }
    /// Shown the model's optimizer at `compile` (before [`Strategy::begin`]), for strategies
    /// that train their own weights with an optimizer of the same family ([`GradNorm`]).
    ///
    /// # Errors
    /// Never by default.
    fn adopt_optimizer(&mut self, _optimizer: &dyn crate::optimizers::Optimizer) -> Result<()> {
        Ok(())
    }
}

/// What a gradient-combining strategy ([`Strategy::combine_gradients`]) gets from one step.
#[derive(Debug)]
pub struct GradientStep<'a> {
    /// The trainable weights' names (`<layer>/<weight>`), in the order of the gradients.
    pub weights: &'a [String],
    /// Each weighed term's value (before the strategy's weights), in the strategy's order.
    pub values: &'a [f64],
    /// Each weighed term's gradient over each trainable weight (`None`: it does not depend
    /// on it), before the strategy's weights.
    pub gradients: &'a [Vec<Option<Tensor>>],
    /// A seed drawn for this step from the run's seed (the same on a resumed run), for
    /// strategies that randomize (PCGrad's projection order).
    pub seed: u64,
}

impl GradientStep<'_> {
    /// Which weights are shared: those at least two terms depend on.
    pub fn shared(&self) -> Vec<bool> {
        crate::model::term_gradients::shared(self.gradients, self.weights.len())
    }

    /// Term `term`'s gradient over the weights `keep` selects, in f64, concatenated (zeros
    /// where it does not depend on a selected weight).
    ///
    /// # Errors
    /// When a gradient cannot be read.
    pub fn flat(&self, term: usize, keep: &[bool]) -> Result<Vec<f64>> {
        crate::model::term_gradients::flat(self.gradients, term, keep)
    }

    /// Some term's gradient of weight `i` (for its shape), if any term has one.
    fn like(&self, i: usize) -> Option<&Tensor> {
        crate::model::term_gradients::like(self.gradients, i)
    }

    /// The inverse of [`GradientStep::flat`]: `flat` cut into the selected weights' shapes
    /// and dtypes (`None` for a weight no term depends on).
    ///
    /// # Errors
    /// When a tensor cannot be built.
    pub(crate) fn unflatten(&self, flat: &[f64], keep: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut at = 0;
        let mut out = Vec::with_capacity(keep.len());
        for (i, k) in keep.iter().enumerate() {
            let like = match (k, self.like(i)) {
                (true, Some(l)) => l,
                _ => {
                    out.push(None);
                    continue;
                }
            };
            let n = like.elem_count();
            let t = Tensor::from_slice(&flat[at..at + n], like.dims(), like.device())?
                .to_dtype(like.dtype())?;
            at += n;
            out.push(Some(t));
        }
        Ok(out)
    }
}

pub(crate) use crate::model::term_gradients::dot;

/// Σ_i scale_i · gradients_i over each weight (`None` where no term has a gradient).
pub(crate) fn scaled_sum(
    gradients: &[Vec<Option<Tensor>>],
    scale: &[f64],
    weights: usize,
) -> Result<Vec<Option<Tensor>>> {
    (0..weights)
        .map(|i| {
            let mut total: Option<Tensor> = None;
            for (g, s) in gradients.iter().zip(scale) {
                let Some(g) = &g[i] else { continue };
                let part = match *s {
                    1.0 => g.clone(),
                    s => (g * s)?,
                };
                total = Some(match total.take() {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
            Ok(total)
        })
        .collect()
}

/// Cloning a boxed strategy, so that [`crate::Compile`] is `Clone`; implemented for every
/// `Strategy + Clone`.
pub trait CloneStrategy {
    /// A boxed copy.
    fn clone_strategy(&self) -> Box<dyn Strategy>;
}

impl<T: Strategy + Clone + 'static> CloneStrategy for T {
    fn clone_strategy(&self) -> Box<dyn Strategy> {
        Box::new(self.clone())
    }
}

impl Clone for Box<dyn Strategy> {
    fn clone(&self) -> Self {
        self.clone_strategy()
    }
}

/// Σ weights_i · terms_i, as a tensor with the terms' graphs.
pub(crate) fn weighted_sum(terms: &[Tensor], weights: &[f64]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (t, w) in terms.iter().zip(weights) {
        let part = (t * *w)?;
        total = Some(match total.take() {
            Some(acc) => (acc + part)?,
            None => part,
        });
    }
    total.ok_or_else(|| Error::Compile("a loss weighting strategy got no terms".into()))
}

/// A scalar tensor's value.
pub(crate) fn value(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Floats as their bits, so that a checkpoint restores them exactly.
pub(crate) fn bits(values: &[f64]) -> serde_json::Value {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The floats [`bits`] wrote under `key` of `state`, `n` of them.
pub(crate) fn from_bits(
    state: &serde_json::Value,
    strategy: &str,
    key: &str,
    n: usize,
) -> Result<Vec<f64>> {
    let bad = || {
        Error::Data(format!(
            "the checkpoint's `{strategy}` loss weighting state has no valid `{key}` for {n} \
             terms: it was written by another strategy or model"
        ))
    };
    let list = state.get(key).and_then(|v| v.as_array()).ok_or_else(bad)?;
    if list.len() != n {
        return Err(bad());
    }
    list.iter()
        .map(|v| v.as_u64().map(f64::from_bits).ok_or_else(bad))
        .collect()
}

/// Fails unless `value` is finite and > 0.
pub(crate) fn positive(strategy: &str, what: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "loss weighting `{strategy}`: {what} must be a finite number > 0, got {value}"
        )))
    }
}
