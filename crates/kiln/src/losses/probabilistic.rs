//! Crossentropy losses and their focal variants, with Keras' numerics: stable log-sum-exp when
//! `from_logits`, probabilities clipped to `[ε, 1 - ε]` otherwise.

use super::{align, loss_common, resolve_axis, softplus, Loss};
use crate::activations::Activation;
use crate::error::{invalid, Result};
use crate::reduction::{Reduction, EPSILON};
use candle_core::{DType, Tensor};
use std::sync::Arc;

fn check_smoothing(loss: &str, label_smoothing: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(invalid(format!(
            "{loss}: label_smoothing must be in [0, 1], got {label_smoothing}"
        )));
    }
    Ok(())
}

fn check_gamma(loss: &str, gamma: f64) -> Result<()> {
    if !(gamma.is_finite() && gamma >= 0.0) {
        return Err(invalid(format!(
            "{loss}: gamma must be finite and >= 0, got {gamma}"
        )));
    }
    Ok(())
}

/// Elementwise binary crossentropy, as `keras.ops.binary_crossentropy`.
fn binary_crossentropy_elements(
    target: &Tensor,
    output: &Tensor,
    from_logits: bool,
) -> Result<Tensor> {
    if from_logits {
        // -t·log σ(x) - (1-t)·log σ(-x) = t·softplus(-x) + (1-t)·softplus(x)
        let pos = softplus(&output.neg()?)?;
        let neg = softplus(output)?;
        let one_minus_t = target.affine(-1.0, 1.0)?;
        Ok((target.mul(&pos)? + one_minus_t.mul(&neg)?)?)
    } else {
        // One fused pass on the CPU, the same values as the graph below.
        if let Some(v) = super::crossentropy_kernel::fused_binary(target, output)? {
            return Ok(v);
        }
        let p = output.clamp(EPSILON, 1.0 - EPSILON)?;
        let one_minus_t = target.affine(-1.0, 1.0)?;
        let ll = (target.mul(&p.log()?)? + one_minus_t.mul(&p.affine(-1.0, 1.0)?.log()?)?)?;
        Ok(ll.neg()?)
    }
}

/// Log-probabilities along `axis`: log-softmax of logits, or the log of normalized, clipped
/// probabilities (Keras divides by the sum along the axis first).
fn log_probabilities(y_pred: &Tensor, from_logits: bool, axis: usize) -> Result<Tensor> {
    if from_logits {
        Ok(candle_nn::ops::log_softmax(y_pred, axis)?)
    } else {
        Ok(normalized_probabilities(y_pred, axis)?.log()?)
    }
}

fn normalized_probabilities(y_pred: &Tensor, axis: usize) -> Result<Tensor> {
    let sum = y_pred.sum_keepdim(axis)?;
    Ok(y_pred.broadcast_div(&sum)?.clamp(EPSILON, 1.0 - EPSILON)?)
}

/// Label smoothing towards the uniform distribution over `classes` values.
fn smooth(y_true: &Tensor, label_smoothing: f64, classes: usize) -> Result<Tensor> {
    if label_smoothing == 0.0 {
        return Ok(y_true.clone());
    }
    Ok(y_true.affine(1.0 - label_smoothing, label_smoothing / classes as f64)?)
}

/// Binary crossentropy between labels in `[0, 1]` and probabilities (or logits), averaged over
/// `axis` (default the last).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{BinaryCrossentropy, Loss};
/// let t = Tensor::new(&[[1f32, 0.]], &Device::Cpu)?;
/// let logits = Tensor::new(&[[0f32, 0.]], &Device::Cpu)?;
/// let v = BinaryCrossentropy::new().from_logits(true).per_sample(&t, &logits)?;
/// assert!((v.to_vec1::<f32>()?[0] - std::f32::consts::LN_2).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BinaryCrossentropy {
    name: String,
    reduction: Reduction,
    from_logits: bool,
    label_smoothing: f64,
    axis: isize,
}

impl BinaryCrossentropy {
    /// Probabilities in, no smoothing, mean over the last axis.
    pub fn new() -> Self {
        Self {
            name: "binary_crossentropy".into(),
            reduction: Reduction::default(),
            from_logits: false,
            label_smoothing: 0.0,
            axis: -1,
        }
    }
    /// Whether `y_pred` holds logits rather than probabilities.
    pub fn from_logits(mut self, from_logits: bool) -> Self {
        self.from_logits = from_logits;
        self
    }
    /// Squeezes labels towards 0.5 by this amount, in `[0, 1]`.
    pub fn label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.label_smoothing = label_smoothing;
        self
    }
    /// The axis the elementwise values are averaged over.
    pub fn axis(mut self, axis: isize) -> Self {
        self.axis = axis;
        self
    }
}

impl Default for BinaryCrossentropy {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(BinaryCrossentropy);

impl Loss for BinaryCrossentropy {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "BinaryCrossentropy",
            &self.name,
            self.reduction,
            serde_json::json!({ "from_logits": self.from_logits, "label_smoothing": self.label_smoothing, "axis": self.axis }),
        ))
    }
    fn logits_twin(&self) -> Option<(Activation, Arc<dyn Loss>)> {
        (!self.from_logits).then(|| {
            let twin: Arc<dyn Loss> = Arc::new(self.clone().from_logits(true));
            (Activation::Sigmoid, twin)
        })
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn validate(&self) -> Result<()> {
        check_smoothing(&self.name, self.label_smoothing)
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (t, p) = align(y_true, y_pred)?;
        let axis = resolve_axis(self.axis, p.rank(), &self.name)?;
        let t = smooth(&t, self.label_smoothing, 2)?;
        Ok(binary_crossentropy_elements(&t, &p, self.from_logits)?.mean(axis)?)
    }
}

/// Binary focal crossentropy (Lin et al. 2017): crossentropy scaled by `(1 - p_t)^gamma`, with
/// optional class balancing by `alpha`.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{BinaryFocalCrossentropy, Loss};
/// let t = Tensor::new(&[[1f32]], &Device::Cpu)?;
/// let p = Tensor::new(&[[0.5f32]], &Device::Cpu)?;
/// let v = BinaryFocalCrossentropy::new().gamma(2.0).per_sample(&t, &p)?.to_vec1::<f32>()?;
/// assert!((v[0] - 0.25 * std::f32::consts::LN_2).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BinaryFocalCrossentropy {
    name: String,
    reduction: Reduction,
    apply_class_balancing: bool,
    alpha: f64,
    gamma: f64,
    from_logits: bool,
    label_smoothing: f64,
    axis: isize,
}

impl BinaryFocalCrossentropy {
    /// Keras' defaults: no class balancing, `alpha = 0.25`, `gamma = 2`, probabilities in.
    pub fn new() -> Self {
        Self {
            name: "binary_focal_crossentropy".into(),
            reduction: Reduction::default(),
            apply_class_balancing: false,
            alpha: 0.25,
            gamma: 2.0,
            from_logits: false,
            label_smoothing: 0.0,
            axis: -1,
        }
    }
    /// Weights positives by `alpha` and negatives by `1 - alpha`.
    pub fn apply_class_balancing(mut self, on: bool) -> Self {
        self.apply_class_balancing = on;
        self
    }
    /// The balancing weight of the positive class (used with class balancing).
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }
    /// The focusing exponent, `>= 0`; 0 gives plain crossentropy.
    pub fn gamma(mut self, gamma: f64) -> Self {
        self.gamma = gamma;
        self
    }
    /// Whether `y_pred` holds logits.
    pub fn from_logits(mut self, from_logits: bool) -> Self {
        self.from_logits = from_logits;
        self
    }
    /// Squeezes labels towards 0.5 by this amount, in `[0, 1]`.
    pub fn label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.label_smoothing = label_smoothing;
        self
    }
    /// The axis the elementwise values are averaged over.
    pub fn axis(mut self, axis: isize) -> Self {
        self.axis = axis;
        self
    }
}

impl Default for BinaryFocalCrossentropy {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(BinaryFocalCrossentropy);

impl Loss for BinaryFocalCrossentropy {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "BinaryFocalCrossentropy",
            &self.name,
            self.reduction,
            serde_json::json!({ "apply_class_balancing": self.apply_class_balancing, "alpha": self.alpha, "gamma": self.gamma, "from_logits": self.from_logits, "label_smoothing": self.label_smoothing, "axis": self.axis }),
        ))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn validate(&self) -> Result<()> {
        check_smoothing(&self.name, self.label_smoothing)?;
        check_gamma(&self.name, self.gamma)
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (t, p) = align(y_true, y_pred)?;
        let axis = resolve_axis(self.axis, p.rank(), &self.name)?;
        let t = smooth(&t, self.label_smoothing, 2)?;
        let p = if self.from_logits {
            candle_nn::ops::sigmoid(&p)?
        } else {
            p
        };
        let bce = binary_crossentropy_elements(&t, &p, false)?;
        let one_minus_t = t.affine(-1.0, 1.0)?;
        let p_t = (t.mul(&p)? + one_minus_t.mul(&p.affine(-1.0, 1.0)?)?)?;
        let focal = p_t.affine(-1.0, 1.0)?.relu()?.powf(self.gamma)?;
        let mut value = focal.mul(&bce)?;
        if self.apply_class_balancing {
            let weight = t
                .affine(self.alpha, 0.0)?
                .add(&one_minus_t.affine(1.0 - self.alpha, 0.0)?)?;
            value = weight.mul(&value)?;
        }
        Ok(value.mean(axis)?)
    }
}

/// Categorical crossentropy between one-hot (or soft) labels and probabilities or logits.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{CategoricalCrossentropy, Loss};
/// let t = Tensor::new(&[[0f32, 1.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu)?;
/// let v = CategoricalCrossentropy::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
/// assert!((v[0] - std::f32::consts::LN_2).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CategoricalCrossentropy {
    name: String,
    reduction: Reduction,
    from_logits: bool,
    label_smoothing: f64,
    axis: isize,
}

impl CategoricalCrossentropy {
    /// Probabilities in, no smoothing, classes on the last axis.
    pub fn new() -> Self {
        Self {
            name: "categorical_crossentropy".into(),
            reduction: Reduction::default(),
            from_logits: false,
            label_smoothing: 0.0,
            axis: -1,
        }
    }
    /// Whether `y_pred` holds logits.
    pub fn from_logits(mut self, from_logits: bool) -> Self {
        self.from_logits = from_logits;
        self
    }
    /// Mixes the labels with the uniform distribution by this amount, in `[0, 1]`.
    pub fn label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.label_smoothing = label_smoothing;
        self
    }
    /// The class axis.
    pub fn axis(mut self, axis: isize) -> Self {
        self.axis = axis;
        self
    }
}

impl Default for CategoricalCrossentropy {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(CategoricalCrossentropy);

impl Loss for CategoricalCrossentropy {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "CategoricalCrossentropy",
            &self.name,
            self.reduction,
            serde_json::json!({ "from_logits": self.from_logits, "label_smoothing": self.label_smoothing, "axis": self.axis }),
        ))
    }
    fn logits_twin(&self) -> Option<(Activation, Arc<dyn Loss>)> {
        (!self.from_logits && self.axis == -1).then(|| {
            let twin: Arc<dyn Loss> = Arc::new(self.clone().from_logits(true));
            (Activation::Softmax, twin)
        })
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn validate(&self) -> Result<()> {
        check_smoothing(&self.name, self.label_smoothing)
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (t, p) = align(y_true, y_pred)?;
        check_same_shape(&self.name, &t, &p)?;
        let axis = resolve_axis(self.axis, p.rank(), &self.name)?;
        let classes = t.dims()[t.rank() - 1];
        let t = smooth(&t, self.label_smoothing, classes)?;
        if !self.from_logits {
            // One fused pass on the CPU, the same values as the graph below.
            if let Some(v) = super::crossentropy_kernel::fused(&t, &p, axis)? {
                return Ok(v);
            }
        }
        let log_p = log_probabilities(&p, self.from_logits, axis)?;
        Ok(t.mul(&log_p)?.sum(axis)?.neg()?)
    }
}

fn check_same_shape(loss: &str, t: &Tensor, p: &Tensor) -> Result<()> {
    if t.dims() != p.dims() {
        return Err(invalid(format!(
            "{loss}: y_true {:?} and y_pred {:?} must have the same shape (one-hot labels); for \
             integer labels use the sparse variant",
            t.dims(),
            p.dims()
        )));
    }
    Ok(())
}

/// Categorical focal crossentropy: `-Σ alpha · (1 - p)^gamma · y · log p` over the classes.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{CategoricalFocalCrossentropy, Loss};
/// let t = Tensor::new(&[[0f32, 1.]], &Device::Cpu)?;
/// let p = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu)?;
/// let v = CategoricalFocalCrossentropy::new().per_sample(&t, &p)?.to_vec1::<f32>()?;
/// assert!((v[0] - 0.25 * 0.25 * std::f32::consts::LN_2).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CategoricalFocalCrossentropy {
    name: String,
    reduction: Reduction,
    alpha: f64,
    gamma: f64,
    from_logits: bool,
    label_smoothing: f64,
    axis: isize,
}

impl CategoricalFocalCrossentropy {
    /// Keras' defaults: `alpha = 0.25`, `gamma = 2`, probabilities in, classes last.
    pub fn new() -> Self {
        Self {
            name: "categorical_focal_crossentropy".into(),
            reduction: Reduction::default(),
            alpha: 0.25,
            gamma: 2.0,
            from_logits: false,
            label_smoothing: 0.0,
            axis: -1,
        }
    }
    /// The constant weighting factor.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }
    /// The focusing exponent, `>= 0`.
    pub fn gamma(mut self, gamma: f64) -> Self {
        self.gamma = gamma;
        self
    }
    /// Whether `y_pred` holds logits.
    pub fn from_logits(mut self, from_logits: bool) -> Self {
        self.from_logits = from_logits;
        self
    }
    /// Mixes the labels with the uniform distribution by this amount, in `[0, 1]`.
    pub fn label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.label_smoothing = label_smoothing;
        self
    }
    /// The class axis.
    pub fn axis(mut self, axis: isize) -> Self {
        self.axis = axis;
        self
    }
}

impl Default for CategoricalFocalCrossentropy {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(CategoricalFocalCrossentropy);

impl Loss for CategoricalFocalCrossentropy {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "CategoricalFocalCrossentropy",
            &self.name,
            self.reduction,
            serde_json::json!({ "alpha": self.alpha, "gamma": self.gamma, "from_logits": self.from_logits, "label_smoothing": self.label_smoothing, "axis": self.axis }),
        ))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn validate(&self) -> Result<()> {
        check_smoothing(&self.name, self.label_smoothing)?;
        check_gamma(&self.name, self.gamma)
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let (t, p) = align(y_true, y_pred)?;
        check_same_shape(&self.name, &t, &p)?;
        let axis = resolve_axis(self.axis, p.rank(), &self.name)?;
        let classes = t.dims()[t.rank() - 1];
        let t = smooth(&t, self.label_smoothing, classes)?;
        let p = if self.from_logits {
            candle_nn::ops::softmax(&p, axis)?
        } else {
            p
        };
        let output = normalized_probabilities(&p, axis)?;
        let cce = t.mul(&output.log()?)?.neg()?;
        let modulating = output.affine(-1.0, 1.0)?.powf(self.gamma)?;
        Ok((modulating.mul(&cce)? * self.alpha)?.sum(axis)?)
    }
}

/// Crossentropy between integer labels and probabilities or logits over the last axis, with
/// Keras' `ignore_class` (those entries get loss 0 and are masked out of the reduction).
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::losses::{Loss, SparseCategoricalCrossentropy};
/// let labels = Tensor::new(&[1f32, 0.], &Device::Cpu)?;
/// let logits = Tensor::new(&[[0f32, 0.], [0., 0.]], &Device::Cpu)?;
/// let scce = SparseCategoricalCrossentropy::new().from_logits(true);
/// let v = scce.per_sample(&labels, &logits)?.to_vec1::<f32>()?;
/// assert!((v[0] - std::f32::consts::LN_2).abs() < 1e-6);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SparseCategoricalCrossentropy {
    name: String,
    reduction: Reduction,
    from_logits: bool,
    ignore_class: Option<i64>,
}

impl SparseCategoricalCrossentropy {
    /// Probabilities in, no ignored class.
    pub fn new() -> Self {
        Self {
            name: "sparse_categorical_crossentropy".into(),
            reduction: Reduction::default(),
            from_logits: false,
            ignore_class: None,
        }
    }
    /// Whether `y_pred` holds logits.
    pub fn from_logits(mut self, from_logits: bool) -> Self {
        self.from_logits = from_logits;
        self
    }
    /// A label value (such as -1 for padding) whose entries are left out of the loss.
    pub fn ignore_class(mut self, class: Option<i64>) -> Self {
        self.ignore_class = class;
        self
    }

    /// Labels with the trailing unit axis removed, as f32, and the valid-entry mask.
    fn labels(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let mut labels = y_true.to_dtype(DType::F32)?;
        if labels.rank() == y_pred.rank() && labels.dims()[labels.rank() - 1] == 1 {
            labels = labels.squeeze(labels.rank() - 1)?;
        }
        let expected = &y_pred.dims()[..y_pred.rank() - 1];
        if labels.dims() != expected {
            // Targets shaped like the predictions are one-hot rows: the loss for those is
            // categorical crossentropy (Keras' usual mix-up).
            let hint = match y_true.dims() == y_pred.dims() {
                true => ", or, for these one-hot targets, use categorical_crossentropy",
                false => "",
            };
            return Err(invalid(format!(
                "{}: labels of shape {:?} do not fit predictions of shape {:?}: give one integer \
                 label per sample (shape {:?}){hint}",
                self.name,
                y_true.dims(),
                y_pred.dims(),
                expected
            )));
        }
        match self.ignore_class {
            None => Ok((labels, None)),
            Some(c) => {
                let valid = labels.ne(c as f64)?;
                let labels = labels.mul(&valid.to_dtype(DType::F32)?)?;
                Ok((labels, Some(valid)))
            }
        }
    }
}

impl Default for SparseCategoricalCrossentropy {
    fn default() -> Self {
        Self::new()
    }
}
loss_common!(SparseCategoricalCrossentropy);

impl Loss for SparseCategoricalCrossentropy {
    fn keras_config(&self) -> Option<serde_json::Value> {
        Some(super::keras_object(
            "SparseCategoricalCrossentropy",
            &self.name,
            self.reduction,
            serde_json::json!({ "from_logits": self.from_logits, "ignore_class": self.ignore_class }),
        ))
    }
    fn logits_twin(&self) -> Option<(Activation, Arc<dyn Loss>)> {
        (!self.from_logits).then(|| {
            let twin: Arc<dyn Loss> = Arc::new(self.clone().from_logits(true));
            (Activation::Softmax, twin)
        })
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn reduction(&self) -> Reduction {
        self.reduction
    }
    fn own_mask(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.labels(y_true, y_pred)?.1)
    }
    fn per_sample(&self, y_true: &Tensor, y_pred: &Tensor) -> Result<Tensor> {
        let (labels, valid) = self.labels(y_true, y_pred)?;
        let axis = y_pred.rank() - 1;
        let classes = y_pred.dims()[axis];
        let flat = labels.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = flat
            .iter()
            .find(|&&l| l < 0.0 || l >= classes as f32 || l.fract() != 0.0)
        {
            return Err(invalid(format!(
                "{}: label {bad} is not a class index in [0, {classes}) for predictions of shape \
                 {:?}",
                self.name,
                y_pred.dims()
            )));
        }
        // Ignored entries read label 0 and are then zeroed and masked, so their predictions never
        // reach the value or the gradient.
        let log_p = log_probabilities(y_pred, self.from_logits, axis)?;
        let index = labels.to_dtype(DType::U32)?.unsqueeze(axis)?;
        let picked = log_p.gather(&index, axis)?.squeeze(axis)?.neg()?;
        match valid {
            Some(v) => Ok(v.where_cond(&picked, &picked.zeros_like()?)?),
            None => Ok(picked),
        }
    }
}
