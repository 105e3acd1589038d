//! Regression metrics that are not means of per-sample values: RMSE (the root of the epoch's
//! mean square) and R² (from the epoch's sums of y, y² and squared residuals).

use super::{divide_no_nan, host, weights_for, Metric};
use crate::error::{invalid, Error, Result};
use crate::reduction::squeeze_or_expand_to_same_rank;
use candle_core::{DType, Tensor};

/// y_true and y_pred of one batch as rows of equal width (`[batch, outputs]`; a sequence output
/// `[batch, steps, outputs]` gives one row per step), with one weight per row entry.
struct Rows {
    width: usize,
    y_true: Vec<f64>,
    y_pred: Vec<f64>,
    weight: Vec<f64>,
}

fn rows(
    what: &str,
    y_true: &Tensor,
    y_pred: &Tensor,
    sample_weight: Option<&Tensor>,
) -> Result<Rows> {
    let (t, p) = squeeze_or_expand_to_same_rank(&y_true.to_dtype(DType::F64)?, y_pred)?;
    let (t, p) = match p.rank() {
        0 => (t.reshape((1, 1))?, p.reshape((1, 1))?),
        1 => (t.unsqueeze(1)?, p.unsqueeze(1)?),
        _ => (t, p),
    };
    if t.dims() != p.dims() {
        return Err(Error::Data(format!(
            "{what}: y_true {:?} and y_pred {:?} must have the same shape",
            y_true.dims(),
            y_pred.dims()
        )));
    }
    let dims = p.dims().to_vec();
    let width = *dims.last().expect("rank >= 2");
    Ok(Rows {
        width,
        y_true: host(&t)?,
        y_pred: host(&p)?,
        weight: weights_for(sample_weight, &dims)?,
    })
}

/// The root of the mean squared error over the epoch (Keras' `RootMeanSquaredError`): each
/// sample's squared errors are averaged over its outputs, weighted by its sample weight, and the
/// root is taken of the epoch's weighted mean, not of each batch's.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{Metric, RootMeanSquaredError};
/// let d = Device::Cpu;
/// let mut rmse = RootMeanSquaredError::new();
/// rmse.update(&Tensor::new(&[[0f32], [0.]], &d)?, &Tensor::new(&[[1f32], [1.]], &d)?, None)?;
/// rmse.update(&Tensor::new(&[[0f32]], &d)?, &Tensor::new(&[[4f32]], &d)?, None)?;
/// assert_eq!(rmse.result(), vec![6f64.sqrt()]); // √((1 + 1 + 16) / 3)
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RootMeanSquaredError {
    name: String,
    total: f64,
    count: f64,
}

impl Default for RootMeanSquaredError {
    fn default() -> Self {
        Self::new()
    }
}

impl RootMeanSquaredError {
    /// Named `root_mean_squared_error`, as Keras.
    pub fn new() -> Self {
        Self {
            name: "root_mean_squared_error".into(),
            total: 0.0,
            count: 0.0,
        }
    }
    /// Overrides the name in logs.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl Metric for RootMeanSquaredError {
    fn name(&self) -> &str {
        &self.name
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_metric(
            "RootMeanSquaredError",
            &self.name,
            serde_json::json!({}),
        ))
    }
    fn update(
        &mut self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()> {
        let r = rows(&self.name, y_true, y_pred, sample_weight)?;
        let w = r.width as f64;
        for i in 0..r.y_true.len() / r.width {
            let span = i * r.width..(i + 1) * r.width;
            let (t, p, ws) = (
                &r.y_true[span.clone()],
                &r.y_pred[span.clone()],
                &r.weight[span],
            );
            self.total += (0..r.width)
                .map(|j| (p[j] - t[j]).powi(2) * ws[j])
                .sum::<f64>()
                / w;
            self.count += ws.iter().sum::<f64>() / w;
        }
        Ok(())
    }
    fn result(&self) -> Vec<f64> {
        vec![divide_no_nan(self.total, self.count).sqrt()]
    }
    fn reset(&mut self) {
        self.total = 0.0;
        self.count = 0.0;
    }
    fn state(&self) -> Option<Vec<f64>> {
        Some(vec![self.total, self.count])
    }
    fn set_state(&mut self, state: &[f64]) -> Result<()> {
        super::set_slots(&self.name, &mut [&mut self.total, &mut self.count], state)
    }
    fn fresh(&self) -> Box<dyn Metric> {
        Box::new(Self::new().with_name(self.name.clone()))
    }
}

/// How [`R2Score`] combines the scores of several outputs (Keras' `class_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassAggregation {
    /// The plain mean of the per-output scores (Keras' default, sklearn's `uniform_average`).
    UniformAverage,
    /// The per-output scores weighted by the variance of each output's labels.
    VarianceWeightedAverage,
    /// No aggregation: one score per output, logged as `r2_score_0`, `r2_score_1`, ….
    None,
}

/// The coefficient of determination R² = 1 − Σw(y − ŷ)² / Σw(y − ȳ)² over the whole epoch
/// (Keras' `R2Score`, scikit-learn's `r2_score`), per output column and then aggregated.
///
/// With `num_regressors = p > 0` it is the adjusted R², 1 − (1 − R²)(n − 1)/(n − p − 1), where
/// n counts the samples seen; as Keras, it falls back to the plain R² when n − 1 ≤ p. (Keras
/// counts n as the number of label entries, which differs from the samples for several output
/// columns; kiln counts samples, the textbook n.) A column whose labels are all equal scores 0,
/// as Keras (its denominator is 0), or 1 when it is also predicted exactly (scikit-learn's
/// choice; Keras gives NaN there).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{Metric, R2Score};
/// let d = Device::Cpu;
/// let mut r2 = R2Score::new();
/// r2.update(&Tensor::new(&[1f32, 2.], &d)?, &Tensor::new(&[1f32, 2.5], &d)?, None)?;
/// r2.update(&Tensor::new(&[3f32], &d)?, &Tensor::new(&[3f32], &d)?, None)?;
/// assert!((r2.result()[0] - 0.875).abs() < 1e-12); // 1 − 0.25 / 2
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct R2Score {
    name: String,
    aggregation: ClassAggregation,
    num_regressors: usize,
    sum: Vec<f64>,
    squared_sum: Vec<f64>,
    residual: Vec<f64>,
    count: Vec<f64>,
    samples: f64,
}

impl Default for R2Score {
    fn default() -> Self {
        Self::new()
    }
}

impl R2Score {
    /// Uniform average over outputs, no adjustment, named `r2_score`.
    pub fn new() -> Self {
        Self {
            name: "r2_score".into(),
            aggregation: ClassAggregation::UniformAverage,
            num_regressors: 0,
            sum: Vec::new(),
            squared_sum: Vec::new(),
            residual: Vec::new(),
            count: Vec::new(),
            samples: 0.0,
        }
    }
    /// How several outputs' scores are combined.
    pub fn class_aggregation(mut self, aggregation: ClassAggregation) -> Self {
        self.aggregation = aggregation;
        self
    }
    /// The number of independent variables, for the adjusted R² (0: plain R²).
    pub fn num_regressors(mut self, p: usize) -> Self {
        self.num_regressors = p;
        self
    }
    /// Overrides the name in logs.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl Metric for R2Score {
    fn name(&self) -> &str {
        &self.name
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        let aggregation = match self.aggregation {
            ClassAggregation::UniformAverage => Some("uniform_average"),
            ClassAggregation::VarianceWeightedAverage => Some("variance_weighted_average"),
            ClassAggregation::None => None,
        };
        Some(super::keras_metric(
            "R2Score",
            &self.name,
            serde_json::json!({
                "class_aggregation": aggregation,
                "num_regressors": self.num_regressors,
            }),
        ))
    }
    fn update(
        &mut self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()> {
        let r = rows(&self.name, y_true, y_pred, sample_weight)?;
        if self.sum.is_empty() {
            for v in [
                &mut self.sum,
                &mut self.squared_sum,
                &mut self.residual,
                &mut self.count,
            ] {
                *v = vec![0.0; r.width];
            }
        } else if self.sum.len() != r.width {
            return Err(invalid(format!(
                "{}: this batch has {} output columns, earlier ones had {}",
                self.name,
                r.width,
                self.sum.len()
            )));
        }
        for (i, ((t, p), w)) in r.y_true.iter().zip(&r.y_pred).zip(&r.weight).enumerate() {
            let j = i % r.width;
            self.sum[j] += w * t;
            self.squared_sum[j] += w * t * t;
            self.residual[j] += w * (t - p).powi(2);
            self.count[j] += w;
        }
        self.samples += (r.y_true.len() / r.width) as f64;
        Ok(())
    }
    fn result(&self) -> Vec<f64> {
        if self.sum.is_empty() {
            return vec![0.0];
        }
        let totals: Vec<f64> = (0..self.sum.len())
            .map(|j| self.squared_sum[j] - self.sum[j] * divide_no_nan(self.sum[j], self.count[j]))
            .collect();
        let raw: Vec<f64> = (0..self.sum.len())
            .map(|j| match (totals[j] == 0.0, self.residual[j] == 0.0) {
                (false, _) => 1.0 - self.residual[j] / totals[j],
                (true, false) => 0.0,
                (true, true) => 1.0,
            })
            .collect();
        let scores = match self.aggregation {
            ClassAggregation::UniformAverage => vec![raw.iter().sum::<f64>() / raw.len() as f64],
            ClassAggregation::VarianceWeightedAverage => vec![divide_no_nan(
                raw.iter().zip(&totals).map(|(r, t)| r * t).sum(),
                totals.iter().sum(),
            )],
            ClassAggregation::None => raw,
        };
        let (n, p) = (self.samples, self.num_regressors as f64);
        if p == 0.0 || p >= n - 1.0 {
            return scores;
        }
        scores
            .into_iter()
            .map(|r2| 1.0 - (1.0 - r2) * (n - 1.0) / (n - p - 1.0))
            .collect()
    }
    fn state(&self) -> Option<Vec<f64>> {
        let mut state = vec![self.samples];
        for v in [&self.sum, &self.squared_sum, &self.residual, &self.count] {
            state.extend_from_slice(v);
        }
        Some(state)
    }
    fn set_state(&mut self, state: &[f64]) -> Result<()> {
        let name = self.name.clone();
        let mut slots = vec![&mut self.samples];
        for v in [
            &mut self.sum,
            &mut self.squared_sum,
            &mut self.residual,
            &mut self.count,
        ] {
            slots.extend(v.iter_mut());
        }
        super::set_slots(&name, &mut slots, state)
    }
    fn reset(&mut self) {
        for v in [
            &mut self.sum,
            &mut self.squared_sum,
            &mut self.residual,
            &mut self.count,
        ] {
            v.clear();
        }
        self.samples = 0.0;
    }
    fn fresh(&self) -> Box<dyn Metric> {
        let mut m = self.clone();
        m.reset();
        Box::new(m)
    }
}
