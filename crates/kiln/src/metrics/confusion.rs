//! Metrics from confusion counts summed over the epoch: precision, recall and the area under the
//! ROC or precision-recall curve (Keras' `Precision`, `Recall`, `AUC`).

use super::{divide_no_nan, host, weights_for, Metric};
use crate::error::{invalid, Error, Result};
use crate::reduction::squeeze_or_expand_to_same_rank;
use candle_core::{DType, Tensor};

/// Keras' `NEG_INF`: the threshold when only `top_k` decides, and the score given to the
/// predictions outside the top k.
const NEG_INF: f64 = -1e10;

/// One batch as flat label and prediction values of rows of `width`, with one weight per entry.
struct Flat {
    width: usize,
    labels: Vec<f64>,
    preds: Vec<f64>,
    weights: Vec<f64>,
}

fn flat(
    what: &str,
    y_true: &Tensor,
    y_pred: &Tensor,
    sample_weight: Option<&Tensor>,
) -> Result<Flat> {
    let (p, t) = squeeze_or_expand_to_same_rank(y_pred, &y_true.to_dtype(y_pred.dtype())?)?;
    if t.dims() != p.dims() {
        return Err(Error::Data(format!(
            "{what}: y_true {:?} and y_pred {:?} must have the same shape (one label per \
             prediction; give one-hot labels for several classes)",
            y_true.dims(),
            y_pred.dims()
        )));
    }
    let dims = p.dims().to_vec();
    Ok(Flat {
        width: if dims.len() >= 2 {
            *dims.last().expect("rank >= 2")
        } else {
            1
        },
        labels: host(&t)?,
        preds: host(&p)?,
        weights: weights_for(sample_weight, &dims)?,
    })
}

/// Keeps the `k` largest predictions of each row and gives the others [`NEG_INF`] (Keras'
/// `_filter_top_k`; among equal scores the first columns are kept, as `top_k` does).
fn filter_top_k(preds: &mut [f64], width: usize, k: usize) {
    for row in preds.chunks_mut(width) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &j in order.iter().skip(k) {
            row[j] = NEG_INF;
        }
    }
}

/// Confusion counts at given thresholds: what `Precision` and `Recall` share.
#[derive(Debug, Clone)]
struct Counts {
    thresholds: Vec<f64>,
    top_k: Option<usize>,
    class_id: Option<usize>,
    tp: Vec<f64>,
    fp: Vec<f64>,
    fn_: Vec<f64>,
}

impl Counts {
    fn new(thresholds: Option<Vec<f64>>, top_k: Option<usize>, class_id: Option<usize>) -> Self {
        let thresholds = thresholds.unwrap_or_else(|| match top_k {
            None => vec![0.5],
            Some(_) => vec![NEG_INF],
        });
        let n = thresholds.len();
        Self {
            thresholds,
            top_k,
            class_id,
            tp: vec![0.0; n],
            fp: vec![0.0; n],
            fn_: vec![0.0; n],
        }
    }

    fn update(
        &mut self,
        what: &str,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()> {
        let mut f = flat(what, y_true, y_pred, sample_weight)?;
        if let Some(k) = self.top_k {
            filter_top_k(&mut f.preds, f.width, k);
        }
        let keep = |i: usize| match self.class_id {
            Some(c) => i % f.width == c,
            None => true,
        };
        if let Some(c) = self.class_id {
            if c >= f.width {
                return Err(invalid(format!(
                    "{what}: class_id {c} is not a class of predictions with {} columns",
                    f.width
                )));
            }
        }
        for i in (0..f.preds.len()).filter(|&i| keep(i)) {
            let (label, w) = (f.labels[i] != 0.0, f.weights[i]);
            for (k, &t) in self.thresholds.iter().enumerate() {
                match (label, f.preds[i] > t) {
                    (true, true) => self.tp[k] += w,
                    (false, true) => self.fp[k] += w,
                    (true, false) => self.fn_[k] += w,
                    (false, false) => {}
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        for v in [&mut self.tp, &mut self.fp, &mut self.fn_] {
            v.iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

fn check_thresholds(what: &str, thresholds: &[f64]) -> Result<()> {
    if thresholds.is_empty() || thresholds.iter().any(|t| !(0.0..=1.0).contains(t)) {
        return Err(invalid(format!(
            "{what}: thresholds must be numbers in [0, 1], got {thresholds:?}"
        )));
    }
    Ok(())
}

macro_rules! counting_metric {
    ($name:ident, $keras:literal, $log:literal, $doc:literal, $other:ident) => {
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $name {
            name: String,
            /// The thresholds as given (`None`: 0.5, or every top-k prediction with `top_k`).
            given: Option<Vec<f64>>,
            counts: Counts,
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl $name {
            #[doc = concat!("Threshold 0.5, all classes, named `", $log, "` (Keras' `", $keras, "()`).")]
            pub fn new() -> Self {
                Self {
                    name: $log.into(),
                    given: None,
                    counts: Counts::new(None, None, None),
                }
            }
            /// A prediction above `threshold` counts as positive.
            pub fn threshold(self, threshold: f64) -> Result<Self> {
                self.thresholds(vec![threshold])
            }
            /// One value per threshold, logged as `<name>_0`, `<name>_1`, … when several.
            pub fn thresholds(mut self, thresholds: Vec<f64>) -> Result<Self> {
                check_thresholds(&self.name, &thresholds)?;
                self.given = Some(thresholds);
                self.counts = Counts::new(self.given.clone(), self.counts.top_k, self.counts.class_id);
                Ok(self)
            }
            /// Only the `k` largest predictions of each sample can count as positive (with no
            /// threshold given, all of them do, as Keras).
            pub fn top_k(mut self, k: usize) -> Result<Self> {
                if k == 0 {
                    return Err(invalid(format!("{}: top_k must be at least 1", self.name)));
                }
                self.counts = Counts::new(self.given.clone(), Some(k), self.counts.class_id);
                Ok(self)
            }
            /// Only the column `class_id` of the predictions counts (one class against the rest).
            pub fn class_id(mut self, class_id: usize) -> Self {
                self.counts.class_id = Some(class_id);
                self
            }
            /// Overrides the name in logs.
            pub fn with_name(mut self, name: impl Into<String>) -> Self {
                self.name = name.into();
                self
            }
        }

        impl Metric for $name {
            fn name(&self) -> &str {
                &self.name
            }
            fn keras_config(&self) -> Option<serde_json::Value> {
                let thresholds = match self.given.as_deref() {
                    None => serde_json::Value::Null,
                    Some([t]) => (*t).into(),
                    Some(ts) => ts.to_vec().into(),
                };
                Some(crate::metrics::keras_metric($keras, &self.name, serde_json::json!({
                    "thresholds": thresholds,
                    "top_k": self.counts.top_k,
                    "class_id": self.counts.class_id,
                })))
            }
            fn update(
                &mut self,
                y_true: &Tensor,
                y_pred: &Tensor,
                sample_weight: Option<&Tensor>,
            ) -> Result<()> {
                self.counts.update(&self.name, y_true, y_pred, sample_weight)
            }
            fn result(&self) -> Vec<f64> {
                let c = &self.counts;
                (0..c.tp.len())
                    .map(|k| divide_no_nan(c.tp[k], c.tp[k] + c.$other[k]))
                    .collect()
            }
            fn reset(&mut self) {
                self.counts.reset();
            }
            fn state(&self) -> Option<Vec<f64>> {
                let c = &self.counts;
                Some([&c.tp, &c.fp, &c.fn_].into_iter().flatten().copied().collect())
            }
            fn set_state(&mut self, state: &[f64]) -> Result<()> {
                let c = &mut self.counts;
                let mut slots: Vec<&mut f64> =
                    [&mut c.tp, &mut c.fp, &mut c.fn_].into_iter().flatten().collect();
                crate::metrics::set_slots(&self.name, &mut slots, state)
            }
            fn fresh(&self) -> Box<dyn Metric> {
                let mut m = self.clone();
                m.reset();
                Box::new(m)
            }
        }
    };
}

counting_metric!(
    Precision,
    "Precision",
    "precision",
    "TP / (TP + FP) over the epoch (Keras' `Precision`): predictions above the threshold \
     count as positive, labels other than 0 are positive, each entry of a multi-column output is \
     one decision.\n\n```\nuse candle_core::{Device, Tensor};\nuse kiln::metrics::{Metric, \
     Precision};\nlet d = Device::Cpu;\nlet mut p = Precision::new().threshold(0.3)?;\np.update(&\
     Tensor::new(&[1f32, 0., 1.], &d)?, &Tensor::new(&[0.4f32, 0.35, 0.2], &d)?, None)?;\n\
     assert_eq!(p.result(), vec![0.5]);\n# Ok::<(), kiln::Error>(())\n```",
    fp
);

counting_metric!(
    Recall,
    "Recall",
    "recall",
    "TP / (TP + FN) over the epoch (Keras' `Recall`), counted as [`Precision`] counts.\n\n\
     ```\nuse candle_core::{Device, Tensor};\nuse kiln::metrics::{Metric, Recall};\nlet d = \
     Device::Cpu;\nlet mut r = Recall::new();\nr.update(&Tensor::new(&[1f32, 0., 1.], &d)?, &\
     Tensor::new(&[0.9f32, 0.8, 0.2], &d)?, None)?;\nassert_eq!(r.result(), vec![0.5]);\n# \
     Ok::<(), kiln::Error>(())\n```",
    fn_
);

/// Which curve [`Auc`] integrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AucCurve {
    /// True positive rate against false positive rate.
    Roc,
    /// Precision against recall.
    Pr,
    /// Precision gain against recall gain (Flach & Kull 2015), as Keras' `PRGAIN`.
    PrGain,
}

/// How [`Auc`] sums the area between thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummationMethod {
    /// Trapezoids for ROC; for PR, Davis & Goadrich's interpolation of precision (Keras'
    /// default).
    Interpolation,
    /// The lower of the two heights (a lower Riemann sum).
    Minoring,
    /// The higher of the two heights.
    Majoring,
}

/// The area under the ROC or precision-recall curve, over the whole epoch, exactly as Keras'
/// `AUC` computes it: confusion counts at `num_thresholds` (200) evenly spaced thresholds
/// (0 − ε, 1/(n−1), …, 1 + ε, predictions clipped to [0, 1]), summed over all batches, then
/// the area under the piecewise curve through those points.
///
/// **How it differs from scikit-learn's exact AUC** (`roc_auc_score`,
/// `average_precision_score`): sklearn uses every distinct score as a threshold; Keras and kiln
/// put the scores into `num_thresholds − 1` buckets. The two agree (to rounding) when no bucket
/// holds both a positive and a negative sample, for instance when the scores are multiples of
/// 1/(n − 1) or far apart; otherwise the bucketed ROC AUC counts the pairs inside a bucket as
/// ties (½), and the bucketed PR AUC interpolates precision inside a bucket, where sklearn's
/// average precision is a step function. With more thresholds the difference shrinks.
///
/// With several prediction columns, every entry is one decision (micro-averaged), unless
/// `multi_label` asks for one AUC per column, averaged (optionally with `label_weights`).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::metrics::{Auc, AucCurve, Metric};
/// let d = Device::Cpu;
/// let mut pr = Auc::new().curve(AucCurve::Pr).with_name("pr_auc");
/// pr.update(&Tensor::new(&[[1f32], [0.], [1.]], &d)?, &Tensor::new(&[[0.9f32], [0.1], [0.8]], &d)?, None)?;
/// assert!((pr.result()[0] - 1.0).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Auc {
    name: String,
    num_thresholds: usize,
    curve: AucCurve,
    summation: SummationMethod,
    multi_label: bool,
    label_weights: Option<Vec<f64>>,
    from_logits: bool,
    /// Per label (one when not multi-label), per bucket: the weight of the positive and of the
    /// negative labels whose prediction fell there.
    pos: Vec<Vec<f64>>,
    neg: Vec<Vec<f64>>,
}

impl Default for Auc {
    fn default() -> Self {
        Self::new()
    }
}

impl Auc {
    /// The most thresholds an `Auc` takes: enough to give every float32 score in [0, 1] a
    /// bucket of width 1e-7, few enough that the counts of one label fit in 160 MB.
    pub const MAX_THRESHOLDS: usize = 10_000_001;
    /// ROC, 200 thresholds, interpolation, named `auc`, as Keras' `AUC()`.
    pub fn new() -> Self {
        Self {
            name: "auc".into(),
            num_thresholds: 200,
            curve: AucCurve::Roc,
            summation: SummationMethod::Interpolation,
            multi_label: false,
            label_weights: None,
            from_logits: false,
            pos: Vec::new(),
            neg: Vec::new(),
        }
    }
    /// The number of thresholds (at least 2, at most [`Auc::MAX_THRESHOLDS`]; more is closer
    /// to the exact area).
    pub fn num_thresholds(mut self, n: usize) -> Result<Self> {
        if !(2..=Self::MAX_THRESHOLDS).contains(&n) {
            return Err(invalid(format!(
                "{}: num_thresholds must be an integer in [2, {}] (the counts take 16 bytes per \
                 threshold and label), got {n}",
                self.name,
                Self::MAX_THRESHOLDS
            )));
        }
        self.num_thresholds = n;
        Ok(self)
    }
    /// The curve: ROC (default), PR or PR gain.
    pub fn curve(mut self, curve: AucCurve) -> Self {
        self.curve = curve;
        self
    }
    /// How the area is summed.
    pub fn summation_method(mut self, method: SummationMethod) -> Self {
        self.summation = method;
        self
    }
    /// One AUC per column of the predictions, averaged, instead of one over all entries.
    pub fn multi_label(mut self, multi_label: bool) -> Self {
        self.multi_label = multi_label;
        self
    }
    /// Weights of the columns: in the average of the per-column AUCs with `multi_label`, or of
    /// each column's entries in the counts without.
    pub fn label_weights(mut self, weights: Vec<f64>) -> Result<Self> {
        if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(invalid(format!(
                "{}: label_weights must be finite numbers >= 0, got {weights:?}",
                self.name
            )));
        }
        self.label_weights = Some(weights);
        Ok(self)
    }
    /// The predictions are logits: a sigmoid is applied first.
    pub fn from_logits(mut self, from_logits: bool) -> Self {
        self.from_logits = from_logits;
        self
    }
    /// Overrides the name in logs.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The bucket of a prediction, as Keras' `ceil(p · (n − 1)) − 1` in float32, so that a
    /// prediction lands where it does in Keras: bucket b counts as positive at thresholds 0..=b.
    fn bucket(&self, p: f64) -> usize {
        let p = (p as f32).clamp(0.0, 1.0);
        let b = (p * (self.num_thresholds - 1) as f32).ceil() - 1.0;
        (b.max(0.0) as usize).min(self.num_thresholds - 1)
    }

    /// TP, FP, TN, FN at every threshold for one label's buckets.
    fn counts(&self, label: usize) -> [Vec<f64>; 4] {
        let n = self.num_thresholds;
        let (mut tp, mut fp) = (vec![0.0; n], vec![0.0; n]);
        let (mut acc_p, mut acc_n) = (0.0, 0.0);
        for i in (0..n).rev() {
            acc_p += self.pos[label][i];
            acc_n += self.neg[label][i];
            tp[i] = acc_p;
            fp[i] = acc_n;
        }
        let fn_ = tp.iter().map(|t| acc_p - t).collect();
        let tn = fp.iter().map(|f| acc_n - f).collect();
        [tp, fp, tn, fn_]
    }

    fn area(&self, label: usize) -> f64 {
        let [tp, fp, tn, fn_] = self.counts(label);
        let n = self.num_thresholds;
        if self.curve == AucCurve::Pr && self.summation == SummationMethod::Interpolation {
            // Davis & Goadrich: precision interpolated linearly in TP between thresholds.
            let p: Vec<f64> = (0..n).map(|i| tp[i] + fp[i]).collect();
            return (0..n - 1)
                .map(|i| {
                    let dtp = tp[i] - tp[i + 1];
                    let dp = p[i] - p[i + 1];
                    let slope = divide_no_nan(dtp, dp.max(0.0));
                    let intercept = tp[i + 1] - slope * p[i + 1];
                    let ratio = if p[i] > 0.0 && p[i + 1] > 0.0 {
                        divide_no_nan(p[i], p[i + 1].max(0.0))
                    } else {
                        1.0
                    };
                    divide_no_nan(
                        slope * (dtp + intercept * ratio.ln()),
                        (tp[i + 1] + fn_[i + 1]).max(0.0),
                    )
                })
                .sum();
        }
        let recall: Vec<f64> = (0..n)
            .map(|i| divide_no_nan(tp[i], tp[i] + fn_[i]))
            .collect();
        let (x, y): (Vec<f64>, Vec<f64>) = match self.curve {
            AucCurve::Roc => (
                (0..n)
                    .map(|i| divide_no_nan(fp[i], fp[i] + tn[i]))
                    .collect(),
                recall,
            ),
            AucCurve::Pr => {
                let precision = (0..n)
                    .map(|i| divide_no_nan(tp[i], tp[i] + fp[i]))
                    .collect();
                (recall, precision)
            }
            AucCurve::PrGain => {
                // As Keras: with no true positive the recall gain is 0 and the precision gain 1;
                // a negative recall gain counts as 0.
                let scale = |i: usize| divide_no_nan(tp[i] + fn_[i], tn[i] + fp[i]);
                let gain = |i: usize, other: f64| match tp[i] == 0.0 {
                    true => None,
                    false => Some(1.0 - scale(i) * divide_no_nan(other, tp[i])),
                };
                (0..n)
                    .map(|i| {
                        (
                            gain(i, fn_[i]).unwrap_or(0.0).max(0.0),
                            gain(i, fp[i]).unwrap_or(1.0),
                        )
                    })
                    .unzip()
            }
        };
        (0..n - 1)
            .map(|i| {
                let h = match self.summation {
                    SummationMethod::Interpolation => (y[i] + y[i + 1]) / 2.0,
                    SummationMethod::Minoring => y[i].min(y[i + 1]),
                    SummationMethod::Majoring => y[i].max(y[i + 1]),
                };
                (x[i] - x[i + 1]) * h
            })
            .sum()
    }
}

impl Metric for Auc {
    fn name(&self) -> &str {
        &self.name
    }
    fn keras_config(&self) -> Option<serde_json::Value> {
        let curve = match self.curve {
            AucCurve::Roc => "ROC",
            AucCurve::Pr => "PR",
            AucCurve::PrGain => "PRGAIN",
        };
        let summation = match self.summation {
            SummationMethod::Interpolation => "interpolation",
            SummationMethod::Minoring => "minoring",
            SummationMethod::Majoring => "majoring",
        };
        let num_labels = self
            .label_weights
            .as_ref()
            .filter(|_| self.multi_label)
            .map(Vec::len);
        Some(super::keras_metric(
            "AUC",
            &self.name,
            serde_json::json!({
                "num_thresholds": self.num_thresholds,
                "curve": curve,
                "summation_method": summation,
                "multi_label": self.multi_label,
                "num_labels": num_labels,
                "label_weights": self.label_weights,
                "from_logits": self.from_logits,
            }),
        ))
    }
    fn update(
        &mut self,
        y_true: &Tensor,
        y_pred: &Tensor,
        sample_weight: Option<&Tensor>,
    ) -> Result<()> {
        let y_pred = if self.from_logits {
            candle_nn::ops::sigmoid(&y_pred.to_dtype(DType::F32)?)?
        } else {
            y_pred.clone()
        };
        let f = flat(&self.name, y_true, &y_pred, sample_weight)?;
        let labels = if self.multi_label { f.width } else { 1 };
        if let Some(lw) = &self.label_weights {
            if lw.len() != f.width {
                return Err(invalid(format!(
                    "{}: {} label_weights for predictions with {} columns",
                    self.name,
                    lw.len(),
                    f.width
                )));
            }
        }
        if self.pos.is_empty() {
            self.pos = vec![vec![0.0; self.num_thresholds]; labels];
            self.neg = vec![vec![0.0; self.num_thresholds]; labels];
        } else if self.pos.len() != labels {
            return Err(invalid(format!(
                "{}: this batch has {labels} label columns, earlier ones had {}",
                self.name,
                self.pos.len()
            )));
        }
        for i in 0..f.preds.len() {
            let column = i % f.width;
            let mut w = f.weights[i];
            if let (Some(lw), false) = (&self.label_weights, self.multi_label) {
                w *= lw[column];
            }
            let label = if self.multi_label { column } else { 0 };
            let b = self.bucket(f.preds[i]);
            if f.labels[i] != 0.0 {
                self.pos[label][b] += w;
            } else {
                self.neg[label][b] += w;
            }
        }
        Ok(())
    }
    fn result(&self) -> Vec<f64> {
        if self.pos.is_empty() {
            return vec![0.0];
        }
        let areas: Vec<f64> = (0..self.pos.len()).map(|l| self.area(l)).collect();
        let value = match (&self.label_weights, self.multi_label) {
            (Some(lw), true) => divide_no_nan(
                areas.iter().zip(lw).map(|(a, w)| a * w).sum(),
                lw.iter().sum(),
            ),
            _ => areas.iter().sum::<f64>() / areas.len() as f64,
        };
        vec![value]
    }
    fn reset(&mut self) {
        self.pos.clear();
        self.neg.clear();
    }
    fn state(&self) -> Option<Vec<f64>> {
        Some(
            self.pos
                .iter()
                .chain(&self.neg)
                .flatten()
                .copied()
                .collect(),
        )
    }
    fn set_state(&mut self, state: &[f64]) -> Result<()> {
        let mut slots: Vec<&mut f64> = self
            .pos
            .iter_mut()
            .chain(self.neg.iter_mut())
            .flatten()
            .collect();
        crate::metrics::set_slots(&self.name, &mut slots, state)
    }
    fn fresh(&self) -> Box<dyn Metric> {
        let mut m = self.clone();
        m.reset();
        Box::new(m)
    }
}
