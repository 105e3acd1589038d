//! Keras' loss functions as metrics (`"binary_crossentropy"`, `"mape"`, `"kl_divergence"`,
//! `CosineSimilarity`, …): a loss's per-sample values, averaged over the epoch as every mean
//! metric is (Keras' `MeanMetricWrapper` around the loss function).

use super::mean::SampleMetric;
use crate::error::Result;
use crate::losses::Loss;
use candle_core::Tensor;
use serde_json::{Map, Value};
use std::sync::Arc;

/// A loss reported as a metric: its per-sample values (unweighted by the loss's own reduction),
/// averaged over the epoch with the sample weights and mask when wrapped in
/// [`super::MeanMetric`], as Keras' `binary_crossentropy`, `mape`, `poisson`, … metrics are.
///
/// [`LossMetric::similarity`] gives Keras' `CosineSimilarity` metric, which reports the cosine
/// similarity itself where the loss reports its negation.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::BinaryCrossentropy;
/// use kiln::metrics::{LossMetric, MeanMetric, Metric};
/// let d = Device::Cpu;
/// let mut bce = MeanMetric::new(LossMetric::new(BinaryCrossentropy::new()));
/// bce.update(&Tensor::new(&[[1f32], [0.]], &d)?, &Tensor::new(&[[0.5f32], [0.5]], &d)?, None)?;
/// assert!((bce.result()[0] - std::f64::consts::LN_2).abs() < 1e-6);
/// assert_eq!(bce.name(), "binary_crossentropy");
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub struct LossMetric {
    loss: Arc<dyn Loss>,
    name: String,
    sign: f64,
}

impl std::fmt::Debug for LossMetric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LossMetric({})", self.name)
    }
}

impl LossMetric {
    /// The per-sample values of `loss`, logged under the loss's name.
    pub fn new(loss: impl Loss + 'static) -> Self {
        Self::from_arc(Arc::new(loss))
    }
    /// [`LossMetric::new`] for a shared loss.
    pub fn from_arc(loss: Arc<dyn Loss>) -> Self {
        Self {
            name: loss.name().to_string(),
            loss,
            sign: 1.0,
        }
    }
    /// Keras' `CosineSimilarity` metric: the similarity, the negation of the cosine loss.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::metrics::{LossMetric, SampleMetric};
    /// let t = Tensor::new(&[[1f32, 0.]], &Device::Cpu)?;
    /// let p = Tensor::new(&[[2f32, 0.]], &Device::Cpu)?;
    /// let cos = LossMetric::similarity(-1);
    /// assert!((cos.per_sample(&t, &p)?.to_vec1::<f32>()?[0] - 1.0).abs() < 1e-6);
    /// assert_eq!(cos.name(), "cosine_similarity");
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn similarity(axis: isize) -> Self {
        Self {
            sign: -1.0,
            name: "cosine_similarity".into(),
            ..Self::new(crate::losses::CosineSimilarity::new().axis(axis))
        }
    }
    /// Logs the metric under `name`.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// The Keras metric class of a loss class, and the loss parameters that class keeps.
fn metric_class(loss_class: &str, sign: f64) -> Option<(&'static str, &'static [&'static str])> {
    Some(match (loss_class, sign > 0.0) {
        ("CosineSimilarity", false) => ("CosineSimilarity", &["axis"]),
        (_, false) | ("CosineSimilarity", true) => return None,
        ("MeanSquaredError", _) => ("MeanSquaredError", &[]),
        ("MeanAbsoluteError", _) => ("MeanAbsoluteError", &[]),
        ("MeanAbsolutePercentageError", _) => ("MeanAbsolutePercentageError", &[]),
        ("MeanSquaredLogarithmicError", _) => ("MeanSquaredLogarithmicError", &[]),
        ("LogCosh", _) => ("LogCoshError", &[]),
        ("Hinge", _) => ("Hinge", &[]),
        ("SquaredHinge", _) => ("SquaredHinge", &[]),
        ("CategoricalHinge", _) => ("CategoricalHinge", &[]),
        ("KLDivergence", _) => ("KLDivergence", &[]),
        ("Poisson", _) => ("Poisson", &[]),
        ("BinaryCrossentropy", _) => ("BinaryCrossentropy", &["from_logits", "label_smoothing"]),
        ("CategoricalCrossentropy", _) => (
            "CategoricalCrossentropy",
            &["from_logits", "label_smoothing", "axis"],
        ),
        ("SparseCategoricalCrossentropy", _) => {
            ("SparseCategoricalCrossentropy", &["from_logits", "axis"])
        }
        _ => return None,
    })
}

impl SampleMetric for LossMetric {
    fn name(&self) -> &str {
        &self.name
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        let v = self.loss.per_sample(y_true, y_pred)?;
        Ok(if self.sign < 0.0 { v.neg()? } else { v })
    }
    fn keras_config(&self) -> Option<Value> {
        let loss = self.loss.keras_config()?;
        let (class, keep) = metric_class(loss["class_name"].as_str()?, self.sign)?;
        let lc = loss["config"].as_object()?;
        // A parameter Keras' metric class lacks (a sparse loss's ignore_class) must be at its
        // default, or the metric has no Keras equivalent.
        if lc.get("ignore_class").is_some_and(|v| !v.is_null()) {
            return None;
        }
        let mut params = Map::new();
        for k in keep {
            params.insert((*k).to_string(), lc.get(*k)?.clone());
        }
        Some(super::keras_metric(
            class,
            &self.name,
            Value::Object(params),
        ))
    }
}
