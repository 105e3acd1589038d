//! Metrics: quantities reported during training and evaluation, never optimized.
//!
//! Every metric is **streaming**, as Keras' stateful metrics are: [`Metric::update`] folds one
//! batch into the metric's state, [`Metric::result`] computes the value from the state of the
//! whole epoch, and [`Metric::reset`] starts again. For the mean metrics (accuracy, MAE, MSE,
//! top-k) that is the sample-weighted mean of per-sample values ([`MeanMetric`], Keras'
//! `MeanMetricWrapper`); for the others it is not a mean of batch values: AUC, precision,
//! recall and F-scores sum confusion counts over the epoch, R² sums moments, RMSE takes the root
//! of the epoch's mean square.
//!
//! | module | metrics |
//! |---|---|
//! | [`mean`] | [`Accuracy`] (binary, categorical, sparse), [`MeanAbsoluteError`], [`MeanSquaredError`], [`TopKCategoricalAccuracy`] (and sparse), [`metric_fn`] |
//! | [`loss_metrics`] | [`LossMetric`]: a loss as a metric (`binary_crossentropy`, `mape`, `poisson`, cosine similarity, …) |
//! | [`regression`] | [`RootMeanSquaredError`], [`R2Score`] |
//! | [`confusion`] | [`Precision`], [`Recall`], [`Auc`] (ROC and PR) |
//! | [`f_score`] | [`FBetaScore`], [`F1Score`] |
//! | [`config`] | the strict parser from a Keras name and parameters to a metric |
//!
//! ```
//! use kiln::candle::{Device, Tensor};
//! use kiln::metrics::{Auc, Metric};
//! let d = Device::Cpu;
//! let mut auc = Auc::new();
//! // Two batches; the result is the AUC of all four samples, not the mean of two batch AUCs.
//! auc.update(&Tensor::new(&[[0f32], [1.]], &d)?, &Tensor::new(&[[0.1f32], [0.4]], &d)?, None)?;
//! auc.update(&Tensor::new(&[[0f32], [1.]], &d)?, &Tensor::new(&[[0.5f32], [0.8]], &d)?, None)?;
//! // Each batch alone ranks perfectly (AUC 1); over the four samples, 0.4 < 0.5 costs a pair.
//! assert!((auc.result()[0] - 0.75).abs() < 1e-6);
//! # Ok::<(), kiln::Error>(())
//! ```

pub mod config;
pub mod confusion;
pub mod f_score;
pub mod loss_metrics;
pub mod mean;
pub mod regression;

pub use confusion::{Auc, AucCurve, Precision, Recall, SummationMethod};
pub use f_score::{Average, F1Score, FBetaScore};
pub use loss_metrics::LossMetric;
pub use mean::{
    metric_fn, Accuracy, MeanAbsoluteError, MeanMetric, MeanSquaredError, SampleMetric,
    TopKCategoricalAccuracy,
};
pub use regression::{ClassAggregation, R2Score, RootMeanSquaredError};

use crate::error::Result;
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// A streaming metric: state updated batch by batch, a result from the state of all batches.
///
/// `sample_weight`, when given, has one weight per sample (`[batch]`) or per sample and step
/// (`[batch, steps]`, for sequence outputs); it applies to every entry of that sample (it is
/// aligned from the left). The training loop passes the data's sample weights to the metrics
/// given as weighted metrics ([`crate::Compile::weighted_metric`]) and not to the others, as
/// Keras does; a mask (padding) always comes in as weight 0.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{Metric, Precision};
/// let d = Device::Cpu;
/// let mut p = Precision::new();
/// let y_true = Tensor::new(&[1f32, 0., 1.], &d)?;
/// let y_pred = Tensor::new(&[0.9f32, 0.8, 0.2], &d)?;
/// p.update(&y_true, &y_pred, None)?;
/// assert_eq!(p.result(), vec![0.5]); // one true positive, one false positive
/// p.reset();
/// assert_eq!(p.result(), vec![0.0]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub trait Metric: Send + Sync {
    /// The name in logs (`accuracy`, `auc`, …), before any `<output>_` or `val_` prefix.
    fn name(&self) -> &str;
    /// Folds one batch into the state.
    fn update(
        &mut self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()>;
    /// The value from the state so far: one number for most metrics, one per class for those
    /// that average nothing (`F1Score` with `average = None`, `R2Score` without aggregation),
    /// logged as `<name>_0`, `<name>_1`, …. Zero before any update, as Keras' `divide_no_nan`.
    fn result(&self) -> Vec<f64>;
    /// Clears the state (the configuration stays).
    fn reset(&mut self);
    /// A copy of this metric's configuration with a cleared state, one for each output and for
    /// each of training and validation.
    fn fresh(&self) -> Box<dyn Metric>;
    /// The state as numbers that add up across data shards (sums and counts), so that
    /// data-parallel training ([`crate::distributed`]) can sum the ranks' states; `None` (the
    /// default) for a metric whose state does not add up, which distributed training refuses.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::metrics::{Metric, MetricSpec};
    /// let mut mae = MetricSpec::from("mae").resolve()?;
    /// mae.update(&Tensor::new(&[[0f32], [0.]], &Device::Cpu)?, &Tensor::new(&[[1f32], [3.]], &Device::Cpu)?, None)?;
    /// let mut other = mae.fresh();
    /// other.set_state(&mae.state().unwrap())?;
    /// assert_eq!(other.result(), vec![2.0]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    fn state(&self) -> Option<Vec<f64>> {
        None
    }
    /// The name Keras 3 resolves to this same metric in a `compile_config` (`"accuracy"`,
    /// `"mae"`, …), for [`crate::Model::save_keras`]; `None` (the default) for a metric
    /// whose configuration a Keras name does not give (parameters other than the defaults, a
    /// name of your own), which `save_keras` refuses, naming it. A metric given to `compile`
    /// by name is written by that name.
    ///
    /// ```
    /// use kiln::metrics::{Accuracy, MeanMetric, Metric};
    /// assert_eq!(MeanMetric::new(Accuracy::sparse()).keras_name().as_deref(), Some("sparse_categorical_accuracy"));
    /// assert_eq!(MeanMetric::new(Accuracy::binary_threshold(0.7)).keras_name(), None);
    /// ```
    fn keras_name(&self) -> Option<String> {
        None
    }
    /// The metric as Keras 3 serializes a metric object in a `compile_config`
    /// (`{"module": "keras.metrics", "class_name", "config": {"name", "dtype", …}}`, every
    /// parameter included), for [`crate::Model::save_keras`] when no Keras name
    /// ([`Metric::keras_name`]) gives it; `None` (the default) for a metric Keras has no class
    /// for, which `save_keras` refuses, naming it.
    ///
    /// ```
    /// use kiln::metrics::{Accuracy, MeanMetric, Metric};
    /// let c = MeanMetric::new(Accuracy::binary_threshold(0.7)).keras_config().unwrap();
    /// assert_eq!(c["class_name"], "BinaryAccuracy");
    /// assert_eq!(c["config"]["threshold"], 0.7);
    /// ```
    fn keras_config(&self) -> Option<serde_json::Value> {
        None
    }
    /// Replaces the state by one [`Metric::state`] gave (possibly summed over ranks).
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] when `state` does not have this metric's length, or
    /// the metric has no such state.
    fn set_state(&mut self, state: &[f64]) -> Result<()> {
        let _ = state;
        Err(crate::error::invalid(format!(
            "metric `{}` has no state that can be set",
            self.name()
        )))
    }
}

/// A Keras metric object: `class` with `params`, logged under `name`.
pub(crate) fn keras_metric(
    class: &str,
    name: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    let mut config = serde_json::Map::new();
    config.insert("name".into(), name.into());
    config.insert("dtype".into(), "float32".into());
    if let serde_json::Value::Object(p) = params {
        config.extend(p);
    }
    serde_json::json!({
        "module": "keras.metrics",
        "class_name": class,
        "config": config,
        "registered_name": null,
    })
}

/// `config` (a Keras metric object) logged under `name` instead.
pub(crate) fn with_keras_name(mut config: serde_json::Value, name: &str) -> serde_json::Value {
    config["config"]["name"] = name.into();
    config
}

/// Copies `state` into `slots`, or says that its length is wrong.
pub(crate) fn set_slots(name: &str, slots: &mut [&mut f64], state: &[f64]) -> Result<()> {
    if state.len() != slots.len() {
        return Err(crate::error::invalid(format!(
            "metric `{name}`: a state of {} numbers given where {} belong",
            state.len(),
            slots.len()
        )));
    }
    for (slot, v) in slots.iter_mut().zip(state) {
        **slot = *v;
    }
    Ok(())
}

/// A metric as `compile` accepts it: a value, or a Keras name.
///
/// ```
/// use kiln::metrics::{MetricSpec, TopKCategoricalAccuracy};
/// let by_name = MetricSpec::from("top_k_categorical_accuracy").resolve()?;
/// assert_eq!(by_name.name(), "top_k_categorical_accuracy");
/// let value = MetricSpec::from(TopKCategoricalAccuracy::new(3)).resolve()?;
/// assert_eq!(value.name(), "top_k_categorical_accuracy");
/// assert!(MetricSpec::from("top5").resolve().is_err());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub enum MetricSpec {
    /// A metric value (its state is never used: each output gets a [`Metric::fresh`] copy).
    Metric(Arc<dyn Metric>),
    /// A Keras name (`accuracy`, `mae`, `auc`, `f1_score`, …) with Keras' default parameters.
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
    /// A metric of your own (any [`Metric`]).
    pub fn custom(metric: impl Metric + 'static) -> Self {
        MetricSpec::Metric(Arc::new(metric))
    }
    /// Resolves a name to its metric (a fresh copy for a value).
    pub fn resolve(&self) -> Result<Box<dyn Metric>> {
        match self {
            MetricSpec::Metric(m) => Ok(m.fresh()),
            MetricSpec::Named(n) => config::metric_by_name(n),
        }
    }
}

impl From<&str> for MetricSpec {
    fn from(name: &str) -> Self {
        MetricSpec::Named(name.to_string())
    }
}

impl From<String> for MetricSpec {
    fn from(name: String) -> Self {
        MetricSpec::Named(name)
    }
}

impl From<Box<dyn Metric>> for MetricSpec {
    fn from(metric: Box<dyn Metric>) -> Self {
        MetricSpec::Metric(Arc::from(metric))
    }
}

/// `From<T> for MetricSpec` for the built-in metrics.
macro_rules! spec_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for MetricSpec {
            fn from(m: $t) -> Self {
                MetricSpec::Metric(Arc::new(m))
            }
        }
    )*};
}
spec_from!(
    RootMeanSquaredError,
    R2Score,
    Precision,
    Recall,
    Auc,
    FBetaScore,
    F1Score
);

impl<S: SampleMetric> From<MeanMetric<S>> for MetricSpec {
    fn from(m: MeanMetric<S>) -> Self {
        MetricSpec::Metric(Arc::new(m))
    }
}

/// Per-sample metrics become their mean over the epoch (Keras' `MeanMetricWrapper`).
macro_rules! spec_from_sample {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for MetricSpec {
            fn from(m: $t) -> Self {
                MetricSpec::Metric(Arc::new(MeanMetric::new(m)))
            }
        }
    )*};
}
spec_from_sample!(
    Accuracy,
    MeanAbsoluteError,
    MeanSquaredError,
    TopKCategoricalAccuracy
);

/// A tensor's values as `f64`, in row-major order.
pub(crate) fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// One weight per entry of a tensor of shape `dims`: `weight` aligned from the left (a weight of
/// shape `[batch]` applies to every entry of its sample), or all ones.
pub(crate) fn weights_for(weight: Option<&Tensor>, dims: &[usize]) -> Result<Vec<f64>> {
    let n: usize = dims.iter().product();
    let Some(w) = weight else {
        return Ok(vec![1.0; n]);
    };
    let mut wd = w.dims().to_vec();
    // A trailing axis of 1 on the weights ([batch, 1]) is the per-sample weight written as a
    // column.
    while wd.len() > dims.len() && wd.last() == Some(&1) {
        wd.pop();
    }
    if wd.len() > dims.len() || wd.iter().zip(dims).any(|(a, b)| a != b && *a != 1) {
        return Err(crate::error::Error::Data(format!(
            "sample weights of shape {:?} do not fit values of shape {dims:?}: give one weight \
             per sample ([batch]) or per sample and step",
            w.dims()
        )));
    }
    let mut shape = wd.clone();
    shape.resize(dims.len(), 1);
    let w = w.reshape(shape)?.broadcast_as(dims)?.contiguous()?;
    host(&w)
}

/// `a / b`, or 0 where `b` is 0 (Keras' `divide_no_nan`).
pub(crate) fn divide_no_nan(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

/// The weights a metric sees: the sample weights (for weighted metrics) times the mask, each
/// optional; `None` when neither applies.
pub(crate) fn metric_weights(
    sample_weight: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let mask = mask.map(|m| m.to_dtype(DType::F32)).transpose()?;
    let sample_weight = sample_weight.map(|w| w.to_dtype(DType::F32)).transpose()?;
    Ok(match (sample_weight, mask) {
        (Some(w), Some(m)) => Some(crate::reduction::mul_weights(&m, &w)?),
        (w, m) => w.or(m),
    })
}

/// `metric` logged under another name (a run file's `as = "…"`).
///
/// ```
/// let auc = kiln::metrics::renamed(Box::new(kiln::metrics::Auc::new()), "roc");
/// assert_eq!(auc.name(), "roc");
/// assert_eq!(auc.fresh().name(), "roc");
/// ```
pub fn renamed(metric: Box<dyn Metric>, name: impl Into<String>) -> Box<dyn Metric> {
    Box::new(Renamed {
        name: name.into(),
        inner: metric,
    })
}

struct Renamed {
    name: String,
    inner: Box<dyn Metric>,
}

impl Metric for Renamed {
    fn name(&self) -> &str {
        &self.name
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(with_keras_name(self.inner.keras_config()?, &self.name))
    }
    fn update(
        &mut self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()> {
        self.inner.update(y_true, y_pred, sample_weight)
    }
    fn result(&self) -> Vec<f64> {
        self.inner.result()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn fresh(&self) -> Box<dyn Metric> {
        renamed(self.inner.fresh(), self.name.clone())
    }
    fn state(&self) -> Option<Vec<f64>> {
        self.inner.state()
    }
    fn set_state(&mut self, state: &[f64]) -> Result<()> {
        self.inner.set_state(state)
    }
}

#[cfg(test)]
mod tests {
    use super::config::{metric_by_name, metric_from_config, METRICS};
    use super::*;
    use crate::losses::config::JsonParams;
    use candle_core::Device;
    use proptest::prelude::*;

    fn column(v: &[f32]) -> Tensor {
        Tensor::from_vec(v.to_vec(), (v.len(), 1), &Device::Cpu).unwrap()
    }

    /// Analytic AUCs: a perfect ranking scores 1, a reversed one 0, one constant score ½.
    #[test]
    fn auc_of_known_rankings() {
        let labels = column(&[0., 0., 1., 1.]);
        for (scores, want) in [
            ([0.1f32, 0.2, 0.8, 0.9], 1.0),
            ([0.9, 0.8, 0.2, 0.1], 0.0),
            ([0.5, 0.5, 0.5, 0.5], 0.5),
        ] {
            let mut auc = Auc::new();
            auc.update(&labels, &column(&scores), None).unwrap();
            assert!((auc.result()[0] - want).abs() < 1e-12, "{scores:?}");
        }
        // PR of a perfect ranking is 1; with a constant score it is the positive rate.
        let mut pr = Auc::new().curve(AucCurve::Pr);
        pr.update(&labels, &column(&[0.1, 0.2, 0.8, 0.9]), None)
            .unwrap();
        assert!((pr.result()[0] - 1.0).abs() < 1e-12);
    }

    /// Every built-in name resolves, under its own name.
    #[test]
    fn every_name_resolves() {
        for (name, _) in METRICS {
            assert_eq!(metric_by_name(name).unwrap().name(), *name);
        }
    }

    fn metrics_under_test() -> Vec<Box<dyn Metric>> {
        vec![
            Box::new(Auc::new()),
            Box::new(Auc::new().curve(AucCurve::Pr)),
            Box::new(Precision::new()),
            Box::new(Recall::new().threshold(0.3).unwrap()),
            Box::new(F1Score::new().threshold(0.5).unwrap()),
            Box::new(R2Score::new()),
            Box::new(RootMeanSquaredError::new()),
            Box::new(MeanMetric::new(MeanAbsoluteError)),
            Box::new(MeanMetric::new(Accuracy::binary())),
        ]
    }

    proptest! {
        /// Streaming: the result of any split into batches is the result of one batch of all.
        #[test]
        fn any_split_gives_the_one_batch_result(
            rows in prop::collection::vec((0u8..2, 0f32..1.0, 0f32..2.0), 2..60),
            cuts in prop::collection::vec(0usize..60, 0..5),
            weighted in any::<bool>(),
        ) {
            let n = rows.len();
            let t: Vec<f32> = rows.iter().map(|r| f32::from(r.0)).collect();
            let p: Vec<f32> = rows.iter().map(|r| r.1).collect();
            let w: Vec<f32> = rows.iter().map(|r| r.2).collect();
            let (t, p) = (column(&t), column(&p));
            let w = Tensor::new(w, &Device::Cpu).unwrap();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % n).collect();
            cuts.extend([0, n]);
            cuts.sort_unstable();
            cuts.dedup();
            for metric in metrics_under_test() {
                let mut whole = metric.fresh();
                let mut split = metric.fresh();
                whole.update(&t, &p, weighted.then_some(&w)).unwrap();
                for pair in cuts.windows(2) {
                    let (a, len) = (pair[0], pair[1] - pair[0]);
                    let wb = w.narrow(0, a, len).unwrap();
                    split
                        .update(&t.narrow(0, a, len).unwrap(), &p.narrow(0, a, len).unwrap(), weighted.then_some(&wb))
                        .unwrap();
                }
                for (a, b) in whole.result().iter().zip(split.result()) {
                    prop_assert!((a - b).abs() <= 1e-9 * (1.0 + a.abs()), "{}: {a} vs {b}", metric.name());
                }
                split.reset();
                prop_assert_eq!(split.result(), metric.fresh().result());
            }
        }

        /// The constructors accept exactly the values Keras does, and say so otherwise.
        #[test]
        fn constructors_check_their_ranges(x in prop_oneof![
            -2.0f64..3.0, Just(0.0), Just(1.0), Just(f64::NAN), Just(f64::INFINITY)
        ]) {
            prop_assert_eq!(FBetaScore::new(x).is_ok(), x.is_finite() && x > 0.0);
            prop_assert_eq!(F1Score::new().threshold(x).is_ok(), x > 0.0 && x <= 1.0);
            prop_assert_eq!(Precision::new().threshold(x).is_ok(), (0.0..=1.0).contains(&x));
            prop_assert_eq!(
                Recall::new().thresholds(vec![0.5, x]).is_ok(),
                (0.0..=1.0).contains(&x)
            );
            prop_assert_eq!(
                Auc::new().label_weights(vec![1.0, x]).is_ok(),
                x.is_finite() && x >= 0.0
            );
            if let Err(e) = Auc::new().label_weights(vec![x]) {
                prop_assert!(e.to_string().contains("label_weights"));
            }
        }

        /// The parser never panics on any value of any key: it builds the metric or names the
        /// key in its error.
        #[test]
        fn the_parser_names_the_key_it_refuses(
            which in 0usize..METRICS.len(),
            key in prop::sample::select(vec![
                "threshold", "thresholds", "k", "top_k", "class_id", "num_thresholds", "curve",
                "summation_method", "multi_label", "num_labels", "label_weights", "from_logits",
                "average", "beta", "class_aggregation", "num_regressors", "bogus",
            ]),
            value in prop_oneof![
                Just(serde_json::json!(null)),
                any::<bool>().prop_map(serde_json::Value::from),
                (-5i64..300).prop_map(serde_json::Value::from),
                (-2.0f64..3.0).prop_map(serde_json::Value::from),
                prop::sample::select(vec!["PR", "ROC", "macro", "none", "x", "interpolation"])
                    .prop_map(serde_json::Value::from),
                prop::collection::vec(-1.0f64..2.0, 0..4).prop_map(|v| serde_json::json!(v)),
            ],
        ) {
            let (name, allowed) = METRICS[which];
            let params = serde_json::json!({ key: value });
            match metric_from_config(name, &JsonParams::new(&params, "p")) {
                Ok(m) => {
                    prop_assert!(allowed.contains(&key), "{name} accepted {key}");
                    prop_assert_eq!(m.name(), name);
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains(&format!("p.{key}")), "{name}.{key} = {value}: {msg}");
                }
            }
        }
    }
}
