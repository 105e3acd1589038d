//! The one strict parser from a Keras metric name and its parameters to a metric, for run files
//! (`[compile] metrics = ["auc", { name = "top_k_categorical_accuracy", k = 3 }]`) and the
//! library's names alike. Every parameter's type and range is checked, and an unknown name or
//! key is an error naming it, through the same [`Params`] the losses use.

use super::{
    Accuracy, Auc, AucCurve, Average, ClassAggregation, F1Score, FBetaScore, LossMetric,
    MeanAbsoluteError, MeanMetric, MeanSquaredError, Metric, Precision, R2Score, Recall,
    RootMeanSquaredError, SummationMethod, TopKCategoricalAccuracy,
};
use crate::error::{invalid, Result};
use crate::losses::config::{Bounds, ParamValue, Params, Reader};

/// Every metric name kiln knows (Keras' names and aliases) and its parameters.
///
/// ```
/// let (_, params) = kiln::metrics::config::METRICS.iter().find(|(n, _)| *n == "auc").unwrap();
/// assert!(params.contains(&"num_thresholds"));
/// ```
pub const METRICS: &[(&str, &[&str])] = &[
    ("accuracy", &[]),
    ("acc", &[]),
    ("exact_accuracy", &[]),
    ("binary_accuracy", &["threshold"]),
    ("categorical_accuracy", &[]),
    ("sparse_categorical_accuracy", &[]),
    ("mae", &[]),
    ("mean_absolute_error", &[]),
    ("mse", &[]),
    ("mean_squared_error", &[]),
    ("root_mean_squared_error", &[]),
    ("r2_score", &["class_aggregation", "num_regressors"]),
    ("top_k_categorical_accuracy", &["k"]),
    ("sparse_top_k_categorical_accuracy", &["k"]),
    ("precision", &["thresholds", "top_k", "class_id"]),
    ("recall", &["thresholds", "top_k", "class_id"]),
    (
        "auc",
        &[
            "num_thresholds",
            "curve",
            "summation_method",
            "multi_label",
            "num_labels",
            "label_weights",
            "from_logits",
        ],
    ),
    ("f1_score", &["average", "threshold"]),
    ("f_beta_score", &["average", "beta", "threshold"]),
    // Keras' loss functions as metrics (`LossMetric`).
    ("mape", &[]),
    ("mean_absolute_percentage_error", &[]),
    ("msle", &[]),
    ("mean_squared_logarithmic_error", &[]),
    ("log_cosh_error", &[]),
    ("logcosh", &[]),
    ("hinge", &[]),
    ("squared_hinge", &[]),
    ("categorical_hinge", &[]),
    ("kl_divergence", &[]),
    ("poisson", &[]),
    ("cosine_similarity", &["axis"]),
    ("binary_crossentropy", &["from_logits", "label_smoothing"]),
    (
        "categorical_crossentropy",
        &["from_logits", "label_smoothing", "axis"],
    ),
    ("sparse_categorical_crossentropy", &["from_logits", "axis"]),
];

/// The Keras metric classes kiln has ([`metric_name_of_class`]).
pub const KERAS_METRIC_CLASSES: &[&str] = &[
    "Accuracy",
    "BinaryAccuracy",
    "CategoricalAccuracy",
    "SparseCategoricalAccuracy",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "RootMeanSquaredError",
    "R2Score",
    "TopKCategoricalAccuracy",
    "SparseTopKCategoricalAccuracy",
    "Precision",
    "Recall",
    "AUC",
    "F1Score",
    "FBetaScore",
    "MeanAbsolutePercentageError",
    "MeanSquaredLogarithmicError",
    "LogCoshError",
    "Hinge",
    "SquaredHinge",
    "CategoricalHinge",
    "KLDivergence",
    "Poisson",
    "CosineSimilarity",
    "BinaryCrossentropy",
    "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy",
];

/// The metric name [`metric_from_config`] takes for a Keras metric class (`AUC` → `auc`), for
/// metric objects in a Keras `compile_config`; `None` for a class kiln does not have.
///
/// ```
/// assert_eq!(kiln::metrics::config::metric_name_of_class("AUC"), Some("auc"));
/// assert_eq!(kiln::metrics::config::metric_name_of_class("LogCoshError"), Some("log_cosh_error"));
/// assert_eq!(kiln::metrics::config::metric_name_of_class("MeanIoU"), None);
/// ```
pub fn metric_name_of_class(class: &str) -> Option<&'static str> {
    Some(match class {
        "Accuracy" => "exact_accuracy",
        "BinaryAccuracy" => "binary_accuracy",
        "CategoricalAccuracy" => "categorical_accuracy",
        "SparseCategoricalAccuracy" => "sparse_categorical_accuracy",
        "MeanAbsoluteError" => "mean_absolute_error",
        "MeanSquaredError" => "mean_squared_error",
        "RootMeanSquaredError" => "root_mean_squared_error",
        "R2Score" => "r2_score",
        "TopKCategoricalAccuracy" => "top_k_categorical_accuracy",
        "SparseTopKCategoricalAccuracy" => "sparse_top_k_categorical_accuracy",
        "Precision" => "precision",
        "Recall" => "recall",
        "AUC" => "auc",
        "F1Score" => "f1_score",
        "FBetaScore" => "f_beta_score",
        "MeanAbsolutePercentageError" => "mean_absolute_percentage_error",
        "MeanSquaredLogarithmicError" => "mean_squared_logarithmic_error",
        "LogCoshError" => "log_cosh_error",
        "Hinge" => "hinge",
        "SquaredHinge" => "squared_hinge",
        "CategoricalHinge" => "categorical_hinge",
        "KLDivergence" => "kl_divergence",
        "Poisson" => "poisson",
        "CosineSimilarity" => "cosine_similarity",
        "BinaryCrossentropy" => "binary_crossentropy",
        "CategoricalCrossentropy" => "categorical_crossentropy",
        "SparseCategoricalCrossentropy" => "sparse_categorical_crossentropy",
        _ => return None,
    })
}

/// No parameters: a metric given by name alone.
struct NoParams;

impl Params for NoParams {
    fn keys(&self) -> Vec<String> {
        Vec::new()
    }
    fn value(&self, _: &str) -> Option<ParamValue> {
        None
    }
    fn error(&self, key: Option<&str>, msg: &str) -> crate::Error {
        match key {
            Some(k) => invalid(format!("`{k}`: {msg}")),
            None => invalid(msg.to_string()),
        }
    }
}

/// The metric a Keras name stands for, with Keras' defaults, logged under that name.
///
/// ```
/// let m = kiln::metrics::config::metric_by_name("mean_absolute_error")?;
/// assert_eq!(m.name(), "mean_absolute_error");
/// let err = kiln::metrics::config::metric_by_name("f1").err().unwrap().to_string();
/// assert!(err.contains("unknown metric `f1`") && err.contains("f1_score"), "{err}");
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn metric_by_name(name: &str) -> Result<Box<dyn Metric>> {
    metric_from_config(name, &NoParams)
}

/// The metric `name` with its parameters from `params` (Keras' parameter names), logged under
/// `name`. Fails on an unknown name, an unknown key, a value of the wrong type or out of range.
///
/// ```
/// use kiln::losses::config::JsonParams;
/// let params = serde_json::json!({ "curve": "PR", "num_thresholds": 500 });
/// let m = kiln::metrics::config::metric_from_config("auc", &JsonParams::new(&params, "m"))?;
/// assert_eq!(m.name(), "auc");
/// let bad = serde_json::json!({ "k": 0 });
/// let err = kiln::metrics::config::metric_from_config(
///     "top_k_categorical_accuracy", &JsonParams::new(&bad, "m")).err().unwrap().to_string();
/// assert!(err.contains("m.k"), "{err}");
/// # Ok::<(), kiln::Error>(())
/// ```
pub fn metric_from_config(name: &str, params: &dyn Params) -> Result<Box<dyn Metric>> {
    let Some((_, allowed)) = METRICS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = METRICS.iter().map(|(n, _)| *n).collect();
        return Err(invalid(format!(
            "unknown metric `{name}`: use one of {}",
            names.join(", ")
        )));
    };
    let owner = format!("metric `{name}`");
    let r = Reader::new(params, &owner);
    r.only(allowed)?;
    let count = |key: &str, min: i64| -> Result<Option<usize>> {
        match r.optional_int(key)? {
            Some(i) if i < min => Err(params.error(
                Some(key),
                &format!("got {i}; {owner}'s `{key}` must be an integer >= {min}"),
            )),
            Some(i) => Ok(Some(i as usize)),
            None => Ok(None),
        }
    };
    let at = |e: crate::Error, key: &str| params.error(Some(key), &strip(e));
    let m: Box<dyn Metric> = match name {
        "accuracy" | "acc" => mean(Accuracy::auto().with_name(name)),
        "binary_accuracy" => {
            let t = r.float("threshold", 0.5, Bounds::finite())?;
            mean(Accuracy::binary_threshold(t))
        }
        "categorical_accuracy" => mean(Accuracy::categorical()),
        "exact_accuracy" => mean(Accuracy::exact()),
        "sparse_categorical_accuracy" => mean(Accuracy::sparse()),
        "mae" | "mean_absolute_error" => {
            Box::new(MeanMetric::new(MeanAbsoluteError).with_name(name))
        }
        "mse" | "mean_squared_error" => Box::new(MeanMetric::new(MeanSquaredError).with_name(name)),
        "root_mean_squared_error" => Box::new(RootMeanSquaredError::new()),
        "r2_score" => {
            let aggregation = match params.value("class_aggregation") {
                None => ClassAggregation::UniformAverage,
                Some(ParamValue::Null) => ClassAggregation::None,
                Some(ParamValue::String(s)) => match s.as_str() {
                    "uniform_average" => ClassAggregation::UniformAverage,
                    "variance_weighted_average" => ClassAggregation::VarianceWeightedAverage,
                    "none" => ClassAggregation::None,
                    _ => {
                        return Err(one_of(
                            params,
                            &owner,
                            "class_aggregation",
                            &format!("\"{s}\""),
                            "\"uniform_average\", \"variance_weighted_average\" or \"none\"",
                        ))
                    }
                },
                Some(v) => {
                    return Err(one_of(
                        params,
                        &owner,
                        "class_aggregation",
                        &v.to_string(),
                        "\"uniform_average\", \"variance_weighted_average\" or \"none\"",
                    ))
                }
            };
            let p = count("num_regressors", 0)?.unwrap_or(0);
            Box::new(
                R2Score::new()
                    .class_aggregation(aggregation)
                    .num_regressors(p),
            )
        }
        "top_k_categorical_accuracy" => {
            mean(TopKCategoricalAccuracy::new(count("k", 1)?.unwrap_or(5)))
        }
        "sparse_top_k_categorical_accuracy" => {
            mean(TopKCategoricalAccuracy::sparse(count("k", 1)?.unwrap_or(5)))
        }
        "precision" | "recall" => {
            let thresholds = numbers(params, &owner, "thresholds", Bounds::closed(0.0, 1.0))?;
            let top_k = count("top_k", 1)?;
            let class_id = count("class_id", 0)?;
            macro_rules! build {
                ($t:ty) => {{
                    let mut m = <$t>::new().with_name(name);
                    if let Some(t) = thresholds {
                        m = m.thresholds(t).map_err(|e| at(e, "thresholds"))?;
                    }
                    if let Some(k) = top_k {
                        m = m.top_k(k)?;
                    }
                    if let Some(c) = class_id {
                        m = m.class_id(c);
                    }
                    Box::new(m) as Box<dyn Metric>
                }};
            }
            if name == "precision" {
                build!(Precision)
            } else {
                build!(Recall)
            }
        }
        "auc" => {
            let curve = match r.string("curve", "ROC")?.as_str() {
                "ROC" | "roc" => AucCurve::Roc,
                "PR" | "pr" => AucCurve::Pr,
                "PRGAIN" | "prgain" => AucCurve::PrGain,
                other => {
                    return Err(one_of(
                        params,
                        &owner,
                        "curve",
                        &format!("\"{other}\""),
                        "\"ROC\", \"PR\" or \"PRGAIN\"",
                    ))
                }
            };
            let summation = match r.string("summation_method", "interpolation")?.as_str() {
                "interpolation" => SummationMethod::Interpolation,
                "minoring" => SummationMethod::Minoring,
                "majoring" => SummationMethod::Majoring,
                other => {
                    return Err(one_of(
                        params,
                        &owner,
                        "summation_method",
                        &format!("\"{other}\""),
                        "\"interpolation\", \"minoring\" or \"majoring\"",
                    ))
                }
            };
            let multi_label = r.bool("multi_label", false)?;
            let num_labels = count("num_labels", 1)?;
            if num_labels.is_some() && !multi_label {
                return Err(params.error(
                    Some("num_labels"),
                    &format!("{owner}: `num_labels` is needed only when `multi_label` is true"),
                ));
            }
            let mut m = Auc::new()
                .with_name(name)
                .curve(curve)
                .summation_method(summation)
                .multi_label(multi_label)
                .from_logits(r.bool("from_logits", false)?);
            if let Some(n) = count("num_thresholds", 2)? {
                m = m.num_thresholds(n).map_err(|e| at(e, "num_thresholds"))?;
            }
            if let Some(w) = numbers(params, &owner, "label_weights", Bounds::non_negative())? {
                if let Some(n) = num_labels.filter(|n| *n != w.len()) {
                    return Err(params.error(
                        Some("label_weights"),
                        &format!("{owner}: {} label_weights for num_labels = {n}", w.len()),
                    ));
                }
                m = m.label_weights(w).map_err(|e| at(e, "label_weights"))?;
            }
            Box::new(m)
        }
        "f1_score" | "f_beta_score" => {
            let average = match params.value("average") {
                None | Some(ParamValue::Null) => Average::None,
                Some(ParamValue::String(s)) => match s.as_str() {
                    "none" => Average::None,
                    "micro" => Average::Micro,
                    "macro" => Average::Macro,
                    "weighted" => Average::Weighted,
                    _ => {
                        return Err(one_of(
                            params,
                            &owner,
                            "average",
                            &format!("\"{s}\""),
                            "\"micro\", \"macro\", \"weighted\" or \"none\"",
                        ))
                    }
                },
                Some(v) => {
                    return Err(one_of(
                        params,
                        &owner,
                        "average",
                        &v.to_string(),
                        "\"micro\", \"macro\", \"weighted\" or \"none\"",
                    ))
                }
            };
            let beta = r.float("beta", 1.0, Bounds::positive())?;
            let mut m = FBetaScore::new(beta)?.with_name(name).average(average);
            if params.value("threshold").is_some() {
                m = m.threshold(r.float(
                    "threshold",
                    0.5,
                    Bounds {
                        hi_inclusive: true,
                        ..Bounds::open(0.0, 1.0)
                    },
                )?)?;
            }
            if name == "f1_score" {
                Box::new(F1Score::from_fbeta(m))
            } else {
                Box::new(m)
            }
        }
        "cosine_similarity" => {
            let axis = r.axis()?;
            mean(LossMetric::similarity(axis).with_name(name))
        }
        loss_name => {
            let class = match loss_name {
                "mape" | "mean_absolute_percentage_error" => "MeanAbsolutePercentageError",
                "msle" | "mean_squared_logarithmic_error" => "MeanSquaredLogarithmicError",
                "log_cosh_error" | "logcosh" => "LogCosh",
                "hinge" => "Hinge",
                "squared_hinge" => "SquaredHinge",
                "categorical_hinge" => "CategoricalHinge",
                "kl_divergence" => "KLDivergence",
                "poisson" => "Poisson",
                "binary_crossentropy" => "BinaryCrossentropy",
                "categorical_crossentropy" => "CategoricalCrossentropy",
                "sparse_categorical_crossentropy" => "SparseCategoricalCrossentropy",
                _ => unreachable!("every name in METRICS is built above"),
            };
            let loss = crate::losses::config::loss_from_config(
                class,
                params,
                crate::reduction::Reduction::default(),
            )?;
            mean(LossMetric::from_arc(loss).with_name(name))
        }
    };
    Ok(m)
}

fn mean<S: super::SampleMetric>(m: S) -> Box<dyn Metric> {
    Box::new(MeanMetric::new(m))
}

/// An error's message without its kind prefix, to re-attach it to a key.
fn strip(e: crate::Error) -> String {
    match e {
        crate::Error::InvalidArgument(m) => m,
        other => other.to_string(),
    }
}

fn one_of(params: &dyn Params, owner: &str, key: &str, got: &str, allowed: &str) -> crate::Error {
    params.error(
        Some(key),
        &format!("got {got}; {owner}'s `{key}` must be {allowed}"),
    )
}

/// A number or a list of numbers in `bounds`, if present.
fn numbers(
    params: &dyn Params,
    owner: &str,
    key: &str,
    bounds: Bounds,
) -> Result<Option<Vec<f64>>> {
    let bad = |v: &ParamValue| {
        params.error(
            Some(key),
            &format!(
                "got {v} ({}); {owner}'s `{key}` must be a number or a list of numbers, each {bounds}",
                v.kind()
            ),
        )
    };
    let one = |v: &ParamValue| match v {
        ParamValue::Integer(i) if bounds.contains(*i as f64) => Ok(*i as f64),
        ParamValue::Float(x) if bounds.contains(*x) => Ok(*x),
        other => Err(bad(other)),
    };
    match params.value(key) {
        None | Some(ParamValue::Null) => Ok(None),
        Some(ParamValue::List(items)) if !items.is_empty() => {
            items.iter().map(one).collect::<Result<Vec<_>>>().map(Some)
        }
        Some(v @ ParamValue::List(_)) => Err(bad(&v)),
        Some(v) => one(&v).map(|x| Some(vec![x])),
    }
}
