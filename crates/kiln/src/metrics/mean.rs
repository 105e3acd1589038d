//! Mean metrics: one value per sample, averaged over the epoch with the sample weights (Keras'
//! `MeanMetricWrapper`): accuracy in its forms, MAE, MSE, top-k accuracy, and closures.

use super::{host, weights_for, Metric};
use crate::error::{invalid, Result};
use crate::reduction::squeeze_or_expand_to_same_rank;
use candle_core::{DType, Tensor, D};
use std::sync::Arc;

/// A metric with one value per sample (or per sample and step, for sequence outputs), whose
/// epoch value is the weighted mean of those values: wrap it in [`MeanMetric`] (`compile` does
/// that for the built-in ones).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{Accuracy, SampleMetric};
/// let labels = Tensor::new(&[1f32, 0.], &Device::Cpu)?;
/// let probs = Tensor::new(&[[0.2f32, 0.8], [0.3, 0.7]], &Device::Cpu)?;
/// let acc = Accuracy::sparse().per_sample(&labels, &probs)?;
/// assert_eq!(acc.to_vec1::<f32>()?, vec![1.0, 0.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub trait SampleMetric: Clone + Send + Sync + 'static {
    /// The name in logs.
    fn name(&self) -> &str;
    /// One value per sample (`[batch]`), or per sample and step (`[batch, steps]`).
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor>;
    /// The Keras name of this metric with its parameters ([`Metric::keras_name`]); `None`
    /// (the default) when a Keras name does not give them.
    fn keras_name(&self) -> Option<String> {
        None
    }
    /// The Keras metric object of this metric ([`Metric::keras_config`]), logged under
    /// [`SampleMetric::name`]; `None` (the default) when Keras has no such class.
    fn keras_config(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The weighted mean over the epoch of a [`SampleMetric`] (Keras' `MeanMetricWrapper`): each
/// sample's values are averaged over its steps, then Σ wᵢ·vᵢ / Σ wᵢ over the samples; a mask
/// (weight 0) leaves a step out of both sums.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{MeanAbsoluteError, MeanMetric, Metric};
/// let d = Device::Cpu;
/// let mut mae = MeanMetric::new(MeanAbsoluteError);
/// mae.update(&Tensor::new(&[[1f32], [2.]], &d)?, &Tensor::new(&[[2f32], [2.]], &d)?, None)?;
/// mae.update(&Tensor::new(&[[0f32]], &d)?, &Tensor::new(&[[4f32]], &d)?, None)?;
/// assert_eq!(mae.result(), vec![5.0 / 3.0]); // the mean of 1, 0, 4, not of the batch means
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub struct MeanMetric<S: SampleMetric> {
    metric: S,
    name: Option<String>,
    total: f64,
    count: f64,
}

impl<S: SampleMetric> MeanMetric<S> {
    /// The mean of `metric` over the epoch.
    pub fn new(metric: S) -> Self {
        Self {
            metric,
            name: None,
            total: 0.0,
            count: 0.0,
        }
    }
    /// Overrides the name in logs.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The per-sample metric inside.
    pub fn metric(&self) -> &S {
        &self.metric
    }
}

impl<S: SampleMetric> Metric for MeanMetric<S> {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.metric.name())
    }
    fn keras_name(&self) -> Option<String> {
        // A name of your own is not a Keras name.
        self.name
            .is_none()
            .then(|| self.metric.keras_name())
            .flatten()
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::with_keras_name(
            self.metric.keras_config()?,
            self.name(),
        ))
    }
    fn update(
        &mut self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()> {
        let values = self.metric.per_sample(y_true, y_pred)?;
        let dims = values.dims().to_vec();
        let v = host(&values)?;
        let w = weights_for(sample_weight, &dims)?;
        // As Keras' `Mean`: a sample's steps are averaged, then samples are weighted.
        let steps: usize = dims.iter().skip(1).product::<usize>().max(1);
        for (vs, ws) in v.chunks(steps).zip(w.chunks(steps)) {
            let s = steps as f64;
            self.total += vs.iter().zip(ws).map(|(v, w)| v * w).sum::<f64>() / s;
            self.count += ws.iter().sum::<f64>() / s;
        }
        Ok(())
    }
    fn result(&self) -> Vec<f64> {
        vec![super::divide_no_nan(self.total, self.count)]
    }
    fn reset(&mut self) {
        self.total = 0.0;
        self.count = 0.0;
    }
    fn state(&self) -> Option<Vec<f64>> {
        Some(vec![self.total, self.count])
    }
    fn set_state(&mut self, state: &[f64]) -> Result<()> {
        let name = self.name().to_string();
        super::set_slots(&name, &mut [&mut self.total, &mut self.count], state)
    }
    fn fresh(&self) -> Box<dyn Metric> {
        Box::new(Self {
            name: self.name.clone(),
            ..Self::new(self.metric.clone())
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AccuracyKind {
    Auto,
    Binary(f64),
    Categorical,
    Sparse,
    Exact,
}

/// Accuracy in its binary, categorical and sparse forms.
///
/// ```
/// use kiln::prelude::*;
/// let compile = Compile::new(Adam::new(1e-3)).loss("mse").metric(Accuracy::binary_threshold(0.7));
/// ```
#[derive(Debug, Clone)]
pub struct Accuracy {
    kind: AccuracyKind,
    name: String,
}

impl Accuracy {
    /// Chooses the form from the shapes on each call, as Keras' `"accuracy"` string does:
    /// binary for one output unit, sparse for integer labels, categorical for one-hot labels.
    pub fn auto() -> Self {
        Self {
            kind: AccuracyKind::Auto,
            name: "accuracy".into(),
        }
    }
    /// Predictions above 0.5 count as class 1.
    pub fn binary() -> Self {
        Self::binary_threshold(0.5)
    }
    /// Predictions above `threshold` count as class 1.
    pub fn binary_threshold(threshold: f64) -> Self {
        Self {
            kind: AccuracyKind::Binary(threshold),
            name: "binary_accuracy".into(),
        }
    }
    /// Arg-max of one-hot labels against arg-max of predictions.
    pub fn categorical() -> Self {
        Self {
            kind: AccuracyKind::Categorical,
            name: "categorical_accuracy".into(),
        }
    }
    /// Integer labels against arg-max of predictions.
    pub fn sparse() -> Self {
        Self {
            kind: AccuracyKind::Sparse,
            name: "sparse_categorical_accuracy".into(),
        }
    }
    /// Keras' `Accuracy` class: a prediction counts when it equals its label exactly, entry by
    /// entry (for predictions that are class numbers or rounded values already; the
    /// `"accuracy"` string is [`Accuracy::auto`]). Logged as `accuracy`.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::metrics::{Accuracy, SampleMetric};
    /// let t = Tensor::new(&[[1f32], [2.], [3.]], &Device::Cpu)?;
    /// let p = Tensor::new(&[[1f32], [2.5], [3.]], &Device::Cpu)?;
    /// assert_eq!(Accuracy::exact().per_sample(&t, &p)?.flatten_all()?.to_vec1::<f32>()?, [1., 0., 1.]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn exact() -> Self {
        Self {
            kind: AccuracyKind::Exact,
            name: "accuracy".into(),
        }
    }
    /// Overrides the name in logs.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

fn matches(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.eq(b)?.to_dtype(DType::F32)?)
}

/// Integer labels as a float tensor without a trailing axis of 1 (`[batch, 1]` → `[batch]`).
fn sparse_labels(y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
    let mut t = y_true.to_dtype(DType::F32)?;
    if t.rank() == y_pred.rank() && t.dims().last() == Some(&1) {
        t = t.squeeze(t.rank() - 1)?;
    }
    Ok(t)
}

impl SampleMetric for Accuracy {
    fn name(&self) -> &str {
        &self.name
    }
    fn keras_name(&self) -> Option<String> {
        let default = match self.kind {
            AccuracyKind::Auto => "accuracy",
            AccuracyKind::Binary(0.5) => "binary_accuracy",
            AccuracyKind::Binary(_) => return None,
            AccuracyKind::Categorical => "categorical_accuracy",
            AccuracyKind::Sparse => "sparse_categorical_accuracy",
            // Keras' `"accuracy"` string is the automatic form; this one is its class.
            AccuracyKind::Exact => return None,
        };
        (self.name == default).then(|| default.to_string())
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        let (class, params) = match self.kind {
            // Keras' `"accuracy"` picks its form from the shapes; no class does.
            AccuracyKind::Auto => return None,
            AccuracyKind::Binary(t) => ("BinaryAccuracy", serde_json::json!({ "threshold": t })),
            AccuracyKind::Categorical => ("CategoricalAccuracy", serde_json::json!({})),
            AccuracyKind::Sparse => ("SparseCategoricalAccuracy", serde_json::json!({})),
            AccuracyKind::Exact => ("Accuracy", serde_json::json!({})),
        };
        Some(super::keras_metric(class, &self.name, params))
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        let kind = match self.kind {
            AccuracyKind::Auto => {
                let last = y_pred.dims().last().copied().unwrap_or(1);
                if last == 1 {
                    AccuracyKind::Binary(0.5)
                } else if y_true.rank() < y_pred.rank() || y_true.dims().last() == Some(&1) {
                    AccuracyKind::Sparse
                } else {
                    AccuracyKind::Categorical
                }
            }
            k => k,
        };
        let values = match kind {
            AccuracyKind::Binary(threshold) => {
                let (t, p) = squeeze_or_expand_to_same_rank(&y_true.to_dtype(DType::F32)?, y_pred)?;
                let p = p.gt(threshold)?.to_dtype(DType::F32)?;
                matches(&t, &p)?
            }
            AccuracyKind::Categorical => {
                matches(&y_true.argmax(D::Minus1)?, &y_pred.argmax(D::Minus1)?)?
            }
            AccuracyKind::Exact => {
                let (t, p) = squeeze_or_expand_to_same_rank(&y_true.to_dtype(DType::F32)?, y_pred)?;
                matches(&t, &p.to_dtype(DType::F32)?)?
            }
            AccuracyKind::Sparse | AccuracyKind::Auto => {
                let t = sparse_labels(y_true, y_pred)?;
                let p = y_pred.argmax(D::Minus1)?.to_dtype(DType::F32)?;
                matches(&t, &p)?
            }
        };
        Ok(values)
    }
}

/// Mean absolute error as a metric (`mae`).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{MeanAbsoluteError, SampleMetric};
/// let t = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[2f32], [2.]], &Device::Cpu)?;
/// assert_eq!(MeanAbsoluteError.per_sample(&t, &p)?.to_vec1::<f32>()?, vec![1.0, 0.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct MeanAbsoluteError;

impl SampleMetric for MeanAbsoluteError {
    fn name(&self) -> &str {
        "mae"
    }
    fn keras_name(&self) -> Option<String> {
        Some("mae".into())
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_metric(
            "MeanAbsoluteError",
            "mae",
            serde_json::json!({}),
        ))
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        use crate::losses::Loss;
        crate::losses::MeanAbsoluteError::new().per_sample(y_true, y_pred)
    }
}

/// Mean squared error as a metric (`mse`).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{MeanSquaredError, SampleMetric};
/// let t = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[3f32], [2.]], &Device::Cpu)?;
/// assert_eq!(MeanSquaredError.per_sample(&t, &p)?.to_vec1::<f32>()?, vec![4.0, 0.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct MeanSquaredError;

impl SampleMetric for MeanSquaredError {
    fn name(&self) -> &str {
        "mse"
    }
    fn keras_name(&self) -> Option<String> {
        Some("mse".into())
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_metric(
            "MeanSquaredError",
            "mse",
            serde_json::json!({}),
        ))
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        use crate::losses::Loss;
        crate::losses::MeanSquaredError::new().per_sample(y_true, y_pred)
    }
}

/// Whether the label is among the `k` largest predictions (Keras' `TopKCategoricalAccuracy`,
/// and `SparseTopKCategoricalAccuracy` with [`TopKCategoricalAccuracy::sparse`]). As Keras'
/// `in_top_k`, a label's rank is 1 + the number of classes scored strictly higher, so ties
/// count in the label's favour.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{SampleMetric, TopKCategoricalAccuracy};
/// let labels = Tensor::new(&[2f32, 0.], &Device::Cpu)?;
/// let scores = Tensor::new(&[[0.5f32, 0.2, 0.3], [0.1, 0.6, 0.3]], &Device::Cpu)?;
/// let top2 = TopKCategoricalAccuracy::sparse(2).per_sample(&labels, &scores)?;
/// assert_eq!(top2.to_vec1::<f32>()?, vec![1.0, 0.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TopKCategoricalAccuracy {
    k: usize,
    sparse: bool,
    name: String,
}

impl TopKCategoricalAccuracy {
    /// One-hot labels, the label among the `k` best scores (Keras' default `k` is 5).
    pub fn new(k: usize) -> Self {
        Self {
            k,
            sparse: false,
            name: "top_k_categorical_accuracy".into(),
        }
    }
    /// Integer labels (`sparse_top_k_categorical_accuracy`).
    pub fn sparse(k: usize) -> Self {
        Self {
            k,
            sparse: true,
            name: "sparse_top_k_categorical_accuracy".into(),
        }
    }
    /// Overrides the name in logs.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// `k`.
    pub fn k(&self) -> usize {
        self.k
    }
}

impl SampleMetric for TopKCategoricalAccuracy {
    fn name(&self) -> &str {
        &self.name
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        let class = if self.sparse {
            "SparseTopKCategoricalAccuracy"
        } else {
            "TopKCategoricalAccuracy"
        };
        Some(super::keras_metric(
            class,
            &self.name,
            serde_json::json!({ "k": self.k }),
        ))
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        if self.k == 0 {
            return Err(invalid(format!("{}: k must be at least 1", self.name)));
        }
        let labels = if self.sparse {
            sparse_labels(y_true, y_pred)?
        } else {
            y_true.argmax(D::Minus1)?.to_dtype(DType::F32)?
        };
        let classes = y_pred.dims().last().copied().unwrap_or(1);
        let index = labels.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?;
        let max = labels.max_all()?.to_scalar::<f32>()?;
        if labels.min_all()?.to_scalar::<f32>()? < 0.0 || max >= classes as f32 {
            return Err(invalid(format!(
                "{}: labels must be class indices in [0, {classes}), got {max}",
                self.name
            )));
        }
        let y_pred = y_pred.to_dtype(DType::F32)?.contiguous()?;
        let at_label = y_pred.gather(&index.contiguous()?, D::Minus1)?;
        let higher = y_pred
            .broadcast_gt(&at_label)?
            .to_dtype(DType::F32)?
            .sum(D::Minus1)?;
        Ok(higher.lt(self.k as f64)?.to_dtype(DType::F32)?)
    }
}

/// A per-sample metric from a closure, averaged over the epoch: Keras' `MeanMetricWrapper(fn)`.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{metric_fn, Metric};
/// let mut within = metric_fn("within_one", |t, p| {
///     Ok((p - t)?.abs()?.le(1.0)?.to_dtype(kiln::candle::DType::F32)?.squeeze(1)?)
/// });
/// let d = Device::Cpu;
/// within.update(&Tensor::new(&[[0f32], [0.]], &d)?, &Tensor::new(&[[0.5f32], [3.]], &d)?, None)?;
/// assert_eq!((within.name(), within.result()), ("within_one", vec![0.5]));
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn metric_fn<F>(name: impl Into<String>, f: F) -> MeanMetric<FnMetric>
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    MeanMetric::new(FnMetric {
        name: name.into(),
        f: Arc::new(f),
    })
}

/// The per-sample closure behind [`metric_fn`].
#[derive(Clone)]
pub struct FnMetric {
    name: String,
    #[allow(clippy::type_complexity)]
    f: Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>,
}

impl SampleMetric for FnMetric {
    fn name(&self) -> &str {
        &self.name
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        (self.f)(y_true, y_pred)
    }
}
