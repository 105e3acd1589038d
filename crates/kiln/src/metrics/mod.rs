//! Metrics: per-sample values averaged over an epoch, as Keras' `MeanMetricWrapper`.

use crate::error::{invalid, Result};
use crate::reduction::squeeze_or_expand_to_same_rank;
use candle_core::{DType, Tensor, D};
use std::sync::Arc;

/// A quantity reported during training; it is not optimized.
pub trait Metric: Send + Sync {
    /// The name in logs (`accuracy`, `mae`, …).
    fn name(&self) -> &str;
    /// One value per sample (or per sample and step, for sequence outputs); the epoch value is
    /// their mean over all samples, leaving out the entries a mask marks as padding.
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor>;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AccuracyKind {
    Auto,
    Binary(f64),
    Categorical,
    Sparse,
}

/// Accuracy in its binary, categorical and sparse forms.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use kiln::metrics::{Accuracy, Metric};
/// let labels = Tensor::new(&[1f32, 0.], &Device::Cpu)?;
/// let probs = Tensor::new(&[[0.2f32, 0.8], [0.3, 0.7]], &Device::Cpu)?;
/// let acc = Accuracy::sparse().per_sample(&labels, &probs)?;
/// assert_eq!(acc.to_vec1::<f32>()?, vec![1.0, 0.0]);
/// # Ok::<(), kiln::Error>(())
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
    /// Overrides the name in logs.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

fn matches(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.eq(b)?.to_dtype(DType::F32)?)
}

impl Metric for Accuracy {
    fn name(&self) -> &str {
        &self.name
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
            AccuracyKind::Sparse | AccuracyKind::Auto => {
                let mut t = y_true.to_dtype(DType::F32)?;
                if t.rank() == y_pred.rank() && t.dims().last() == Some(&1) {
                    t = t.squeeze(t.rank() - 1)?;
                }
                let p = y_pred.argmax(D::Minus1)?.to_dtype(DType::F32)?;
                matches(&t, &p)?
            }
        };
        Ok(values)
    }
}

/// Mean absolute error as a metric.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use kiln::metrics::{MeanAbsoluteError, Metric};
/// let t = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[2f32], [2.]], &Device::Cpu)?;
/// assert_eq!(MeanAbsoluteError.per_sample(&t, &p)?.to_vec1::<f32>()?, vec![1.0, 0.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct MeanAbsoluteError;

impl Metric for MeanAbsoluteError {
    fn name(&self) -> &str {
        "mae"
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        use crate::losses::Loss;
        crate::losses::MeanAbsoluteError::new().per_sample(y_true, y_pred)
    }
}

/// Mean squared error as a metric.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use kiln::metrics::{MeanSquaredError, Metric};
/// let t = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[3f32], [2.]], &Device::Cpu)?;
/// assert_eq!(MeanSquaredError.per_sample(&t, &p)?.to_vec1::<f32>()?, vec![4.0, 0.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct MeanSquaredError;

impl Metric for MeanSquaredError {
    fn name(&self) -> &str {
        "mse"
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        use crate::losses::Loss;
        crate::losses::MeanSquaredError::new().per_sample(y_true, y_pred)
    }
}

/// A metric as `compile` accepts it: a value, or a Keras name.
#[derive(Clone)]
pub enum MetricSpec {
    /// A metric value.
    Metric(Arc<dyn Metric>),
    /// A Keras name (`accuracy`, `mae`, `mse`, …).
    Named(String),
}

impl std::fmt::Debug for MetricSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricSpec::Metric(m) => write!(f, "Metric({})", m.name()),
            MetricSpec::Named(n) => write!(f, "Named({n})"),
        }
    }
}

impl MetricSpec {
    /// Resolves a name to its metric.
    pub fn resolve(&self) -> Result<Arc<dyn Metric>> {
        match self {
            MetricSpec::Metric(m) => Ok(m.clone()),
            MetricSpec::Named(n) => Ok(match n.as_str() {
                "accuracy" | "acc" => Arc::new(Accuracy::auto().with_name(n.clone())),
                "binary_accuracy" => Arc::new(Accuracy::binary()),
                "categorical_accuracy" => Arc::new(Accuracy::categorical()),
                "sparse_categorical_accuracy" => Arc::new(Accuracy::sparse()),
                "mae" | "mean_absolute_error" => Arc::new(MeanAbsoluteError),
                "mse" | "mean_squared_error" => Arc::new(MeanSquaredError),
                other => {
                    return Err(invalid(format!(
                        "unknown metric `{other}`: use accuracy, binary_accuracy, \
                         categorical_accuracy, sparse_categorical_accuracy, mae or mse"
                    )))
                }
            }),
        }
    }
}

impl<M: Metric + 'static> From<M> for MetricSpec {
    fn from(m: M) -> Self {
        MetricSpec::Metric(Arc::new(m))
    }
}

impl From<&str> for MetricSpec {
    fn from(name: &str) -> Self {
        MetricSpec::Named(name.to_string())
    }
}
