//! F-scores from per-class confusion counts summed over the epoch (Keras' `FBetaScore`,
//! `F1Score`): the F-score of the epoch, not the mean of batch F-scores.

use super::{host, weights_for, Metric};
use crate::error::{invalid, Error, Result};
use candle_core::{DType, Tensor};

/// Keras' `backend.epsilon()`, added to the denominators as Keras does.
const EPSILON: f64 = 1e-7;

/// How [`FBetaScore`] averages over classes (Keras' `average`, scikit-learn's `average`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Average {
    /// One score per class, logged as `<name>_0`, `<name>_1`, … (Keras' default, `None`); a
    /// single class (binary) is logged as `<name>`.
    None,
    /// Counts pooled over all classes, then one score.
    Micro,
    /// The plain mean of the per-class scores.
    Macro,
    /// The per-class scores weighted by each class's (weighted) number of true labels.
    Weighted,
}

/// The F-beta score (1 + β²)·P·R / (β²·P + R) from the epoch's true positives, false positives
/// and false negatives, per class (columns of one-hot or multi-label `y_true`), averaged as
/// [`Average`] says.
///
/// A prediction is positive when it is above `threshold`; without a threshold, the largest
/// prediction of each sample is (Keras' default, for one-hot classes). For a binary output (one
/// column) give a threshold: without one, every prediction is its row's largest. Like Keras,
/// the denominators carry ε = 1e-7, so a class never predicted scores 0 (scikit-learn's
/// `zero_division = 0`), and values differ from scikit-learn's by about 1e-7 relative.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{Average, F1Score, Metric};
/// let d = Device::Cpu;
/// let mut f1 = F1Score::new().average(Average::Macro);
/// let y_true = Tensor::new(&[[1f32, 0.], [0., 1.], [0., 1.]], &d)?;
/// let y_pred = Tensor::new(&[[0.8f32, 0.2], [0.6, 0.4], [0.3, 0.7]], &d)?;
/// f1.update(&y_true, &y_pred, None)?;
/// // class 0: P = 1/2, R = 1, F1 = 2/3; class 1: P = 1, R = 1/2, F1 = 2/3
/// assert!((f1.result()[0] - 2.0 / 3.0).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct FBetaScore {
    name: String,
    average: Average,
    beta: f64,
    threshold: Option<f64>,
    tp: Vec<f64>,
    fp: Vec<f64>,
    fn_: Vec<f64>,
    support: Vec<f64>,
}

impl FBetaScore {
    /// β (> 0), no averaging, the arg-max as the prediction, named `fbeta_score`.
    pub fn new(beta: f64) -> Result<Self> {
        if !(beta.is_finite() && beta > 0.0) {
            return Err(invalid(format!(
                "fbeta_score: beta must be a finite number > 0, got {beta}"
            )));
        }
        Ok(Self {
            name: "fbeta_score".into(),
            average: Average::None,
            beta,
            threshold: None,
            tp: Vec::new(),
            fp: Vec::new(),
            fn_: Vec::new(),
            support: Vec::new(),
        })
    }
    /// How the classes are averaged.
    pub fn average(mut self, average: Average) -> Self {
        self.average = average;
        self
    }
    /// Predictions above `threshold` (in (0, 1], as Keras) are positive.
    pub fn threshold(mut self, threshold: f64) -> Result<Self> {
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(invalid(format!(
                "{}: threshold must be in (0, 1], got {threshold}",
                self.name
            )));
        }
        self.threshold = Some(threshold);
        Ok(self)
    }
    /// Overrides the name in logs.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl Metric for FBetaScore {
    fn name(&self) -> &str {
        &self.name
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        let average = match self.average {
            Average::None => None,
            Average::Micro => Some("micro"),
            Average::Macro => Some("macro"),
            Average::Weighted => Some("weighted"),
        };
        Some(super::keras_metric(
            "FBetaScore",
            &self.name,
            serde_json::json!({
                "average": average,
                "beta": self.beta,
                "threshold": self.threshold,
            }),
        ))
    }
    fn update(
        &mut self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()> {
        if y_pred.rank() < 2 || y_true.dims() != y_pred.dims() {
            return Err(Error::Data(format!(
                "{}: expects y_true and y_pred of the same shape [batch, classes] (one-hot or \
                 multi-label y_true; one column for binary), got y_true {:?} and y_pred {:?}; one-hot \
                 encode integer labels (a run file's `[data] one_hot = CLASSES`)",
                self.name,
                y_true.dims(),
                y_pred.dims()
            )));
        }
        let classes = *y_pred.dims().last().expect("rank >= 2");
        let t = host(&y_true.to_dtype(DType::F64)?)?;
        let p = host(y_pred)?;
        let w = weights_for(sample_weight, y_pred.dims())?;
        if self.tp.is_empty() {
            for v in [&mut self.tp, &mut self.fp, &mut self.fn_, &mut self.support] {
                *v = vec![0.0; classes];
            }
        } else if self.tp.len() != classes {
            return Err(invalid(format!(
                "{}: this batch has {classes} classes, earlier ones had {}",
                self.name,
                self.tp.len()
            )));
        }
        for ((ts, ps), ws) in t
            .chunks(classes)
            .zip(p.chunks(classes))
            .zip(w.chunks(classes))
        {
            let max = ps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for j in 0..classes {
                let predicted = match self.threshold {
                    Some(th) => ps[j] > th,
                    // Keras' `y_pred >= max` and `|y_pred| > 1e-9`.
                    None => ps[j] >= max && ps[j].abs() > 1e-9,
                };
                let pv = f64::from(u8::from(predicted));
                self.tp[j] += pv * ts[j] * ws[j];
                self.fp[j] += pv * (1.0 - ts[j]) * ws[j];
                self.fn_[j] += (1.0 - pv) * ts[j] * ws[j];
                self.support[j] += ts[j] * ws[j];
            }
        }
        Ok(())
    }
    fn result(&self) -> Vec<f64> {
        if self.tp.is_empty() {
            return vec![0.0];
        }
        let pool = |v: &[f64]| vec![v.iter().sum::<f64>()];
        let (tp, fp, fn_) = match self.average {
            Average::Micro => (pool(&self.tp), pool(&self.fp), pool(&self.fn_)),
            _ => (self.tp.clone(), self.fp.clone(), self.fn_.clone()),
        };
        let b2 = self.beta * self.beta;
        let scores: Vec<f64> = (0..tp.len())
            .map(|j| {
                let precision = tp[j] / (tp[j] + fp[j] + EPSILON);
                let recall = tp[j] / (tp[j] + fn_[j] + EPSILON);
                (1.0 + b2) * precision * recall / (b2 * precision + recall + EPSILON)
            })
            .collect();
        match self.average {
            Average::None => scores,
            Average::Micro | Average::Macro => {
                vec![scores.iter().sum::<f64>() / scores.len() as f64]
            }
            Average::Weighted => {
                let total: f64 = self.support.iter().sum::<f64>() + EPSILON;
                vec![scores
                    .iter()
                    .zip(&self.support)
                    .map(|(s, n)| s * n / total)
                    .sum()]
            }
        }
    }
    fn reset(&mut self) {
        for v in [&mut self.tp, &mut self.fp, &mut self.fn_, &mut self.support] {
            v.clear();
        }
    }
    fn state(&self) -> Option<Vec<f64>> {
        let parts = [&self.tp, &self.fp, &self.fn_, &self.support];
        Some(parts.into_iter().flatten().copied().collect())
    }
    fn set_state(&mut self, state: &[f64]) -> Result<()> {
        let parts = [&mut self.tp, &mut self.fp, &mut self.fn_, &mut self.support];
        let mut slots: Vec<&mut f64> = parts.into_iter().flatten().collect();
        crate::metrics::set_slots(&self.name, &mut slots, state)
    }
    fn fresh(&self) -> Box<dyn Metric> {
        let mut m = self.clone();
        m.reset();
        Box::new(m)
    }
}

/// The F1 score: [`FBetaScore`] with β = 1, named `f1_score` (Keras' `F1Score`).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{F1Score, Metric};
/// let d = Device::Cpu;
/// let mut f1 = F1Score::new().threshold(0.5)?; // binary: one column
/// f1.update(&Tensor::new(&[[1f32], [0.], [1.]], &d)?, &Tensor::new(&[[0.9f32], [0.7], [0.2]], &d)?, None)?;
/// assert!((f1.result()[0] - 0.5).abs() < 1e-6); // P = 1/2, R = 1/2
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct F1Score(FBetaScore);

impl Default for F1Score {
    fn default() -> Self {
        Self::new()
    }
}

impl F1Score {
    /// No averaging, the arg-max as the prediction, named `f1_score`.
    pub fn new() -> Self {
        Self(
            FBetaScore::new(1.0)
                .expect("beta 1 is valid")
                .with_name("f1_score"),
        )
    }
    /// An F1 score from an [`FBetaScore`] with β = 1 (as the config parser builds it).
    pub(crate) fn from_fbeta(m: FBetaScore) -> Self {
        Self(m)
    }
    /// How the classes are averaged.
    pub fn average(self, average: Average) -> Self {
        Self(self.0.average(average))
    }
    /// Predictions above `threshold` (in (0, 1]) are positive.
    pub fn threshold(self, threshold: f64) -> Result<Self> {
        Ok(Self(self.0.threshold(threshold)?))
    }
    /// Overrides the name in logs.
    pub fn with_name(self, name: impl Into<String>) -> Self {
        Self(self.0.with_name(name))
    }
}

impl Metric for F1Score {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        let mut c = self.0.keras_config()?;
        c["class_name"] = "F1Score".into();
        c["config"].as_object_mut()?.remove("beta");
        Some(c)
    }
    fn update(
        &mut self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()> {
        self.0.update(y_true, y_pred, sample_weight)
    }
    fn result(&self) -> Vec<f64> {
        self.0.result()
    }
    fn reset(&mut self) {
        self.0.reset()
    }
    fn state(&self) -> Option<Vec<f64>> {
        self.0.state()
    }
    fn set_state(&mut self, state: &[f64]) -> Result<()> {
        self.0.set_state(state)
    }
    fn fresh(&self) -> Box<dyn Metric> {
        let mut m = self.clone();
        m.reset();
        Box::new(m)
    }
}
