//! Compile-time losses: computed from `y_true` and `y_pred` alone, one value per sample.
//!
//! A [`Loss`] returns per-sample values; [`Loss::reduced`] then applies sample weights, masks and
//! the loss's [`Reduction`] through [`crate::reduction`]. Users write their own as closures with
//! [`loss_fn`], capturing any hyperparameters.

pub mod check;
pub mod config;
mod crossentropy_kernel;
mod probabilistic;
mod regression;

pub use probabilistic::{
    BinaryCrossentropy, BinaryFocalCrossentropy, CategoricalCrossentropy,
    CategoricalFocalCrossentropy, SparseCategoricalCrossentropy,
};
pub use regression::{
    Huber, LogCosh, MeanAbsoluteError, MeanAbsolutePercentageError, MeanSquaredError,
    MeanSquaredLogarithmicError,
};
mod ctc;
mod divergence;
mod hinge;
mod metric_learning;
mod segmentation;
pub use check::{check, check_in, CheckReport, Domain};
pub use ctc::Ctc;
pub use divergence::{CosineSimilarity, KLDivergence, Poisson};
pub use hinge::{CategoricalHinge, Hinge, SquaredHinge};
pub use metric_learning::{CategoricalGeneralizedCrossEntropy, Circle};
pub use segmentation::{Dice, Tversky};

use crate::error::{invalid, Result};
use crate::reduction::{reduce_weighted, Reduction};
use candle_core::Tensor;
use std::sync::Arc;

/// A loss computed from labels and predictions.
///
/// The contract: [`Loss::per_sample`] returns one value per sample, shape `[batch]` (or
/// `[batch, steps]` for sequence outputs). kiln checks it on the first batch of `fit`.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{Loss, MeanSquaredError};
/// let y_true = Tensor::new(&[[0f32, 1.], [1., 1.]], &Device::Cpu)?;
/// let y_pred = Tensor::new(&[[1f32, 1.], [1., 0.]], &Device::Cpu)?;
/// let mse = MeanSquaredError::new();
/// assert_eq!(mse.per_sample(&y_true, &y_pred)?.to_vec1::<f32>()?, vec![0.5, 0.5]);
/// assert_eq!(mse.reduced(&y_true, &y_pred, None, None)?.to_scalar::<f32>()?, 0.5);
/// # Ok::<(), kiln::Error>(())
/// ```
pub trait Loss: Send + Sync {
    /// The name used in logs and error messages (`mean_squared_error`, `my_focal`, …).
    fn name(&self) -> &str;

    /// One loss value per sample: shape `[batch]` or `[batch, steps, …]`.
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor>;

    /// A mask the loss makes itself (Keras' `ignore_class`), with the per-sample values' shape.
    fn own_mask(&self, _y_true: &Tensor, _y_pred: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// How the weighted per-sample values are reduced.
    fn reduction(&self) -> Reduction {
        Reduction::SumOverBatchSize
    }

    /// Whether the loss returns one value for the whole batch instead of one per sample, as
    /// Keras' Dice and Tversky do with `axis=None`; the per-sample contract then allows a scalar.
    fn whole_batch(&self) -> bool {
        false
    }

    /// For [`crate::ProbabilityRule::Logits`] (Keras 2's rule): the activation whose logits
    /// this loss reads instead of its probabilities, and the same loss on logits. The
    /// crossentropies on probabilities return one (softmax for the categorical ones, sigmoid
    /// for the binary one); every other loss, and these with `from_logits = true`, `None`.
    fn logits_twin(&self) -> Option<(crate::activations::Activation, Arc<dyn Loss>)> {
        None
    }

    /// Checks the hyperparameters; `compile` calls it so bad values fail before training.
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// The loss as Keras 3 serializes it in a `compile_config` (`{"module", "class_name",
    /// "config", "registered_name"}`), for [`crate::Model::save_keras`]. Every built-in loss
    /// has one, with all its parameters; the default, `None`, is a loss Keras has no class for
    /// (register it by name with [`register`] to export it as a Keras custom object).
    ///
    /// ```
    /// use kiln::losses::{Huber, Loss};
    /// let c = Huber::new().delta(0.5).keras_config().unwrap();
    /// assert_eq!(c["class_name"], "Huber");
    /// assert_eq!(c["config"]["delta"], 0.5);
    /// ```
    fn keras_config(&self) -> Option<serde_json::Value> {
        None
    }

    /// The per-sample values, weighted by `sample_weight`, masked by `mask` (and by the loss's
    /// own mask) and reduced with [`Loss::reduction`], exactly as Keras' `Loss.__call__`.
    fn reduced(
        &self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let values = self.per_sample(y_true, y_pred)?;
        reduce_per_sample(self, &values, y_true, y_pred, sample_weight, mask)
    }
}

/// Reduces per-sample values already computed by `loss`, merging the input mask with the loss's
/// own mask (Keras' `in_mask & out_mask`).
pub(crate) fn reduce_per_sample<L: Loss + ?Sized>(
    loss: &L,
    values: &Tensor,
    y_true: &Tensor,
    y_pred: &Tensor,
    sample_weight: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mask = merged_mask(loss, y_true, y_pred, mask)?;
    reduce_weighted(values, sample_weight, mask.as_ref(), loss.reduction())
}

/// The input mask merged with the loss's own mask (Keras' `in_mask & out_mask`).
pub(crate) fn merged_mask<L: Loss + ?Sized>(
    loss: &L,
    y_true: &Tensor,
    y_pred: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let own = loss.own_mask(y_true, y_pred)?;
    Ok(match (mask, own) {
        (Some(a), Some(b)) => Some(
            a.to_dtype(candle_core::DType::F32)?
                .mul(&b.to_dtype(candle_core::DType::F32)?)?,
        ),
        (Some(a), None) => Some(a.clone()),
        (None, b) => b,
    })
}

/// A user-written loss: a closure `(y_true, y_pred) -> per-sample values` with a name.
///
/// Build one with [`loss_fn`]. It is `Clone` when the closure is (when what it captures is), so
/// one loss can be given to several outputs or models.
#[derive(Clone)]
pub struct LossFn<F> {
    name: String,
    reduction: Reduction,
    f: F,
}

/// Wraps a closure as a [`Loss`]. The closure captures its hyperparameters and must return one
/// value per sample.
///
/// ```
/// use kiln::candle::{Device, Tensor, D};
/// use kiln::losses::{loss_fn, Loss};
/// let (scale, offset) = (2.0, 0.5);
/// let shifted_mse = loss_fn("shifted_mse", move |y_true: &Tensor, y_pred: &Tensor| {
///     Ok(((y_pred - y_true)?.affine(1.0, offset)?.sqr()?.mean(D::Minus1)? * scale)?)
/// });
/// let y = Tensor::new(&[[0f32], [1.]], &Device::Cpu)?;
/// let v = shifted_mse.per_sample(&y, &y)?;
/// assert_eq!(v.to_vec1::<f32>()?, vec![0.5, 0.5]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn loss_fn<F>(name: impl Into<String>, f: F) -> LossFn<F>
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync,
{
    LossFn {
        name: name.into(),
        reduction: Reduction::default(),
        f,
    }
}

impl<F> std::fmt::Debug for LossFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossFn")
            .field("name", &self.name)
            .field("reduction", &self.reduction)
            .finish_non_exhaustive()
    }
}

impl<F> LossFn<F> {
    /// Sets how the per-sample values are reduced (default `sum_over_batch_size`).
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }
}

impl<F> Loss for LossFn<F>
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        (self.f)(y_true, y_pred)
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
}

/// A loss as `compile` accepts it: a loss value, or a Keras name resolved when compiling.
#[derive(Clone)]
pub enum LossSpec {
    /// A built-in or user loss.
    Loss(Arc<dyn Loss>),
    /// A Keras name or alias (`"mse"`, `"categorical_crossentropy"`, …).
    Named(String),
}

impl std::fmt::Debug for LossSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossSpec::Loss(l) => write!(f, "Loss({})", l.name()),
            LossSpec::Named(n) => write!(f, "Named({n})"),
        }
    }
}

impl LossSpec {
    /// Resolves a name to its loss, or returns the loss itself.
    pub fn resolve(&self) -> Result<Arc<dyn Loss>> {
        match self {
            LossSpec::Loss(l) => Ok(l.clone()),
            LossSpec::Named(n) => by_name(n),
        }
    }
}

impl<L: Loss + 'static> From<L> for LossSpec {
    fn from(loss: L) -> Self {
        LossSpec::Loss(Arc::new(loss))
    }
}

impl From<&str> for LossSpec {
    fn from(name: &str) -> Self {
        LossSpec::Named(name.to_string())
    }
}

impl From<Arc<dyn Loss>> for LossSpec {
    fn from(loss: Arc<dyn Loss>) -> Self {
        LossSpec::Loss(loss)
    }
}

/// Looks a built-in loss up by its Keras name or alias, with Keras' default parameters.
///
/// ```
/// let loss = kiln::losses::by_name("mse")?;
/// assert_eq!(loss.name(), "mean_squared_error");
/// assert!(kiln::losses::by_name("nope").is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn by_name(name: &str) -> Result<Arc<dyn Loss>> {
    if let Some(custom) = registered(name) {
        return Ok(custom);
    }
    let key = name.to_ascii_lowercase().replace('_', "");
    Ok(match key.as_str() {
        "mse" | "meansquarederror" => Arc::new(MeanSquaredError::new()),
        "mae" | "meanabsoluteerror" => Arc::new(MeanAbsoluteError::new()),
        "mape" | "meanabsolutepercentageerror" => Arc::new(MeanAbsolutePercentageError::new()),
        "msle" | "meansquaredlogarithmicerror" => Arc::new(MeanSquaredLogarithmicError::new()),
        "huber" => Arc::new(Huber::new()),
        "logcosh" => Arc::new(LogCosh::new()),
        "bce" | "binarycrossentropy" => Arc::new(BinaryCrossentropy::new()),
        "cce" | "categoricalcrossentropy" => Arc::new(CategoricalCrossentropy::new()),
        "scce" | "sparsecategoricalcrossentropy" => Arc::new(SparseCategoricalCrossentropy::new()),
        "binaryfocalcrossentropy" => Arc::new(BinaryFocalCrossentropy::new()),
        "categoricalfocalcrossentropy" => Arc::new(CategoricalFocalCrossentropy::new()),
        "hinge" => Arc::new(Hinge::new()),
        "squaredhinge" => Arc::new(SquaredHinge::new()),
        "categoricalhinge" => Arc::new(CategoricalHinge::new()),
        "kld" | "kldivergence" | "kullbackleiblerdivergence" => Arc::new(KLDivergence::new()),
        "poisson" => Arc::new(Poisson::new()),
        "cosinesimilarity" => Arc::new(CosineSimilarity::new()),
        "dice" => Arc::new(Dice::new()),
        "tversky" => Arc::new(Tversky::new()),
        "circle" => Arc::new(Circle::new()),
        "ctc" => Arc::new(Ctc::new()),
        "categoricalgeneralizedcrossentropy" => Arc::new(CategoricalGeneralizedCrossEntropy::new()),
        _ => {
            return Err(invalid(format!(
                "unknown loss `{name}`: use a built-in name such as mse, mae, binary_crossentropy, \
                 categorical_crossentropy, sparse_categorical_crossentropy (`kiln losses` lists \
                 them all), pass a loss value, or register a custom loss under this name with \
                 kiln::losses::register before loading"
            )))
        }
    })
}

/// Registers a custom loss under a name, so run files and saved models can use it by that name.
/// A saved model whose custom loss is not registered fails to load with an error naming it.
///
/// ```
/// use kiln::candle::{Tensor, D};
/// kiln::losses::register("my_l1", kiln::losses::loss_fn("my_l1", |t: &Tensor, p: &Tensor| {
///     Ok((p - t)?.abs()?.mean(D::Minus1)?)
/// }));
/// assert_eq!(kiln::losses::by_name("my_l1")?.name(), "my_l1");
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn register(name: impl Into<String>, loss: impl Loss + 'static) {
    ever_registered().push((name.into(), Arc::new(loss)));
}

/// Every registration ever made, in order; the latest of a name is the one it stands for. The
/// replaced ones stay: a model compiled with a loss that was registered again later (a program
/// that registers at every start-up of a component) still exports it by its name, and holding
/// the values keeps their addresses from being reused.
fn ever_registered() -> std::sync::MutexGuard<'static, Vec<(String, Arc<dyn Loss>)>> {
    static EVER: std::sync::Mutex<Vec<(String, Arc<dyn Loss>)>> = std::sync::Mutex::new(Vec::new());
    EVER.lock().unwrap_or_else(|e| e.into_inner())
}

/// The loss registered under `name` now (its latest registration).
fn registered(name: &str) -> Option<Arc<dyn Loss>> {
    ever_registered()
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, l)| l.clone())
}

/// The name `loss` is registered under ([`register`]), if it is a registered loss: the value
/// itself, as [`by_name`] returns it, now or under an earlier registration of that name.
pub(crate) fn registered_name_of(loss: &Arc<dyn Loss>) -> Option<String> {
    let ptr = Arc::as_ptr(loss) as *const ();
    ever_registered()
        .iter()
        .rev()
        .find(|(_, l)| Arc::as_ptr(l) as *const () == ptr)
        .map(|(n, _)| n.clone())
}

/// Whether some loss is registered under `name` now.
pub(crate) fn is_registered(name: &str) -> bool {
    registered(name).is_some()
}

/// The Keras class name of a built-in loss, from its class name, snake-case name or alias.
///
/// ```
/// assert_eq!(kiln::losses::keras_class_name("mse"), Some("MeanSquaredError"));
/// assert_eq!(kiln::losses::keras_class_name("binary_focal_crossentropy"), Some("BinaryFocalCrossentropy"));
/// ```
pub fn keras_class_name(name: &str) -> Option<&'static str> {
    const CLASSES: [&str; 22] = [
        "MeanSquaredError",
        "MeanAbsoluteError",
        "MeanAbsolutePercentageError",
        "MeanSquaredLogarithmicError",
        "CosineSimilarity",
        "Huber",
        "LogCosh",
        "Hinge",
        "SquaredHinge",
        "CategoricalHinge",
        "KLDivergence",
        "Poisson",
        "BinaryCrossentropy",
        "BinaryFocalCrossentropy",
        "CategoricalCrossentropy",
        "CategoricalFocalCrossentropy",
        "SparseCategoricalCrossentropy",
        "CTC",
        "Dice",
        "Tversky",
        "Circle",
        "CategoricalGeneralizedCrossEntropy",
    ];
    let key = name.to_ascii_lowercase().replace('_', "");
    let key = match key.as_str() {
        "mse" => "meansquarederror",
        "mae" => "meanabsoluteerror",
        "mape" => "meanabsolutepercentageerror",
        "msle" => "meansquaredlogarithmicerror",
        "bce" => "binarycrossentropy",
        "cce" => "categoricalcrossentropy",
        "scce" => "sparsecategoricalcrossentropy",
        "kld" | "kullbackleiblerdivergence" => "kldivergence",
        "huberloss" => "huber",
        k => k,
    };
    CLASSES
        .iter()
        .copied()
        .find(|c| c.to_ascii_lowercase() == key)
}

/// A built-in loss as Keras serializes it: its class, with its name, reduction and parameters.
pub(crate) fn keras_object(
    class: &str,
    name: &str,
    reduction: Reduction,
    params: serde_json::Value,
) -> serde_json::Value {
    let mut config = serde_json::json!({ "name": name, "reduction": reduction.as_str() });
    if let (Some(c), serde_json::Value::Object(p)) = (config.as_object_mut(), params) {
        c.extend(p);
    }
    serde_json::json!({
        "module": "keras.losses", "class_name": class, "config": config, "registered_name": null,
    })
}

/// Implements the builder methods every built-in loss shares: `name` and `reduction`.
macro_rules! loss_common {
    ($ty:ty) => {
        impl $ty {
            /// Overrides the name used in logs.
            pub fn with_name(mut self, name: impl Into<String>) -> Self {
                self.name = name.into();
                self
            }
            /// Sets the reduction (default `sum_over_batch_size`).
            pub fn with_reduction(mut self, reduction: $crate::reduction::Reduction) -> Self {
                self.reduction = reduction;
                self
            }
        }
    };
}
pub(crate) use loss_common;

/// Defines a loss with no hyperparameters besides name and reduction, from its per-sample
/// formula over the aligned `y_true` and `y_pred`.
macro_rules! parameterless_loss {
    ($(#[$doc:meta])* $ty:ident, $keras:literal, |$t:ident, $p:ident| $body:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $ty {
            name: String,
            reduction: Reduction,
        }
        impl $ty {
            /// The loss with Keras' defaults.
            pub fn new() -> Self {
                Self { name: $keras.to_string(), reduction: Reduction::default() }
            }
        }
        impl Default for $ty {
            fn default() -> Self {
                Self::new()
            }
        }
        loss_common!($ty);
        impl Loss for $ty {
            fn name(&self) -> &str {
                &self.name
            }
            fn reduction(&self) -> Reduction {
                self.reduction
            }
            fn keras_config(&self) -> Option<serde_json::Value> {
                let class = $crate::losses::keras_class_name($keras)?;
                Some($crate::losses::keras_object(class, &self.name, self.reduction, serde_json::json!({})))
            }
            fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
                let ($t, $p) = align(y_true, y_pred)?;
                let value: Tensor = $body;
                Ok(value)
            }
        }
    };
}
pub(crate) use parameterless_loss;

/// Brings `y_true` to `y_pred`'s dtype and, where their ranks differ by one trailing unit axis,
/// to the same rank (Keras' `LossFunctionWrapper`).
pub(crate) fn align(y_true: &Tensor, y_pred: &Tensor) -> Result<(Tensor, Tensor)> {
    let y_true = y_true.to_dtype(y_pred.dtype())?;
    crate::reduction::squeeze_or_expand_to_same_rank(&y_true, y_pred)
}

/// Resolves a possibly negative axis against a rank.
pub(crate) fn resolve_axis(axis: isize, rank: usize, loss: &str) -> Result<usize> {
    let a = if axis < 0 { rank as isize + axis } else { axis };
    if a < 0 || a as usize >= rank {
        return Err(invalid(format!(
            "loss `{loss}`: axis {axis} is out of range for a tensor of rank {rank}"
        )));
    }
    Ok(a as usize)
}

/// `log(1 + exp(x))` without overflow: `max(x, 0) + log(1 + exp(-|x|))`.
pub(crate) fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok(x.relu()?.add(&tail)?)
}
