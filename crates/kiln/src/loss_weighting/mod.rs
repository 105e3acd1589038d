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
mod uncertainty;

pub use dwa::DynamicWeightAverage;
pub use famo::Famo;
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
