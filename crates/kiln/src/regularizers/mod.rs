//! Weight and activity regularizers with Keras 3's formulas. Each is an added loss: a layer that
//! owns a regularized weight (or output) contributes its value to the step's total.

use crate::error::{invalid, Result};
use candle_core::Tensor;
use std::sync::Arc;

mod norm_kernel;
use norm_kernel::norm_penalty;

/// A penalty on a tensor (a weight, or a layer's output), added to the total loss.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::regularizers::{Regularizer, L2};
/// let w = Tensor::new(&[1f32, -2.], &Device::Cpu)?;
/// assert_eq!(L2::new(0.5).penalty(&w)?.to_scalar::<f32>()?, 2.5);
/// # Ok::<(), kiln::Error>(())
/// ```
pub trait Regularizer: Send + Sync + std::fmt::Debug {
    /// The term's name in logs (`l1`, `l2`, `l1_l2`, `orthogonal`).
    fn name(&self) -> &str;
    /// The penalty, a scalar tensor.
    fn penalty(&self, x: &Tensor) -> Result<Tensor>;
    /// The Keras class and config of the same regularizer, for export; `None` when Keras has
    /// no such regularizer.
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
}

/// A regularizer as Keras serializes it, or `None`.
pub(crate) fn keras_object(r: &Option<SharedRegularizer>) -> Option<Option<serde_json::Value>> {
    match r {
        None => Some(None),
        Some(r) => r.keras_config().map(|(class, config)| {
            Some(serde_json::json!({
                "module": "keras.regularizers",
                "class_name": class,
                "config": config,
                "registered_name": null,
            }))
        }),
    }
}

fn check_factor(name: &str, what: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(invalid(format!(
            "{name}: {what} must be finite and >= 0, got {v}"
        )));
    }
    Ok(())
}

/// `l1 · Σ|x|`.
#[derive(Debug, Clone)]
pub struct L1 {
    l1: f64,
}

impl L1 {
    /// An L1 penalty with factor `l1` (Keras' default is 0.01).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::regularizers::{Regularizer, L1};
    /// let w = Tensor::new(&[1f32, -2.], &Device::Cpu)?;
    /// assert_eq!(L1::new(0.5).penalty(&w)?.to_scalar::<f32>()?, 1.5);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn new(l1: f64) -> Self {
        Self { l1 }
    }
}

impl Regularizer for L1 {
    fn name(&self) -> &str {
        "l1"
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("L1", serde_json::json!({ "l1": self.l1 })))
    }
    fn penalty(&self, x: &Tensor) -> Result<Tensor> {
        check_factor("L1", "l1", self.l1)?;
        norm_penalty(x, self.l1, 0.0)
    }
}

/// `l2 · Σx²`.
#[derive(Debug, Clone)]
pub struct L2 {
    l2: f64,
}

impl L2 {
    /// An L2 penalty with factor `l2` (Keras' default is 0.01).
    ///
    /// ```
    /// let reg = kiln::regularizers::L2::new(1e-4);
    /// ```
    pub fn new(l2: f64) -> Self {
        Self { l2 }
    }
}

impl Regularizer for L2 {
    fn name(&self) -> &str {
        "l2"
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("L2", serde_json::json!({ "l2": self.l2 })))
    }
    fn penalty(&self, x: &Tensor) -> Result<Tensor> {
        check_factor("L2", "l2", self.l2)?;
        norm_penalty(x, 0.0, self.l2)
    }
}

/// `l1 · Σ|x| + l2 · Σx²`.
#[derive(Debug, Clone)]
pub struct L1L2 {
    l1: f64,
    l2: f64,
}

impl L1L2 {
    /// Both penalties (Keras' defaults are 0 and 0).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::regularizers::{Regularizer, L1L2};
    /// let w = Tensor::new(&[1f32, -2.], &Device::Cpu)?;
    /// assert_eq!(L1L2::new(1.0, 1.0).penalty(&w)?.to_scalar::<f32>()?, 8.0);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn new(l1: f64, l2: f64) -> Self {
        Self { l1, l2 }
    }
}

impl Regularizer for L1L2 {
    fn name(&self) -> &str {
        "l1_l2"
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("L1L2", serde_json::json!({ "l1": self.l1, "l2": self.l2 })))
    }
    fn penalty(&self, x: &Tensor) -> Result<Tensor> {
        check_factor("L1L2", "l1", self.l1)?;
        check_factor("L1L2", "l2", self.l2)?;
        norm_penalty(x, self.l1, self.l2)
    }
}

/// Which vectors of a 2-D weight [`Orthogonal`] keeps apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrthogonalMode {
    /// The rows (Keras' default).
    Rows,
    /// The columns.
    Columns,
}

/// Keras' `OrthogonalRegularizer`: the mean absolute cosine similarity between distinct rows (or
/// columns) of a 2-D weight, times `factor`.
#[derive(Debug, Clone)]
pub struct Orthogonal {
    factor: f64,
    mode: OrthogonalMode,
}

impl Orthogonal {
    /// An orthogonality penalty on rows with the given factor (Keras' default is 0.01).
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::regularizers::{Orthogonal, Regularizer};
    /// let orthonormal = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?;
    /// assert_eq!(Orthogonal::new(1.0).penalty(&orthonormal)?.to_scalar::<f32>()?, 0.0);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn new(factor: f64) -> Self {
        Self {
            factor,
            mode: OrthogonalMode::Rows,
        }
    }
    /// Penalize the columns instead of the rows.
    pub fn mode(mut self, mode: OrthogonalMode) -> Self {
        self.mode = mode;
        self
    }
}

impl Regularizer for Orthogonal {
    fn name(&self) -> &str {
        "orthogonal"
    }
    fn penalty(&self, x: &Tensor) -> Result<Tensor> {
        check_factor("OrthogonalRegularizer", "factor", self.factor)?;
        if x.rank() != 2 {
            return Err(invalid(format!(
                "OrthogonalRegularizer needs a 2-D weight, got shape {:?}",
                x.dims()
            )));
        }
        let (axis, x) = match self.mode {
            OrthogonalMode::Rows => (1, x.clone()),
            OrthogonalMode::Columns => (1, x.t()?),
        };
        // l2-normalize each vector: x / sqrt(max(Σx², 1e-12))
        let norm = x.sqr()?.sum_keepdim(axis)?.maximum(1e-12)?.sqrt()?;
        let unit = x.broadcast_div(&norm)?;
        let product = unit.matmul(&unit.t()?)?;
        let size = product.dims()[0];
        let off_diagonal =
            Tensor::eye(size, product.dtype(), product.device())?.affine(-1.0, 1.0)?;
        let pairs = size as f64 * (size as f64 - 1.0) / 2.0;
        let total = product.mul(&off_diagonal)?.abs()?.sum_all()?;
        Ok((total * (self.factor * 0.5 / pairs))?)
    }
}

/// A shareable regularizer, as layers hold them.
pub type SharedRegularizer = Arc<dyn Regularizer>;

/// Anything a layer builder accepts as a regularizer.
pub trait IntoRegularizer {
    /// Wraps the value for sharing.
    fn into_regularizer(self) -> SharedRegularizer;
}

impl<R: Regularizer + 'static> IntoRegularizer for R {
    fn into_regularizer(self) -> SharedRegularizer {
        Arc::new(self)
    }
}

impl IntoRegularizer for SharedRegularizer {
    fn into_regularizer(self) -> SharedRegularizer {
        self
    }
}

/// Builds a regularizer from its Keras class name (`L1`, `L2`, `L1L2`,
/// `OrthogonalRegularizer`) and parameters, strictly: each factor must be a finite number
/// `>= 0` (an integer is fine), `mode` must be `"rows"` or `"columns"`, and unknown keys are
/// errors. Absent keys take Keras' defaults.
///
/// ```
/// use kiln::losses::config::JsonParams;
/// use kiln::regularizers::regularizer_from_config;
/// let ok = serde_json::json!({ "l2": 0.5 });
/// assert_eq!(regularizer_from_config("L2", &JsonParams::new(&ok, "reg"))?.name(), "l2");
/// let bad = serde_json::json!({ "l2": -1 });
/// let msg = regularizer_from_config("L2", &JsonParams::new(&bad, "reg")).unwrap_err().to_string();
/// assert!(msg.contains("reg.l2") && msg.contains(">= 0"), "{msg}");
/// # Ok::<(), kiln::Error>(())
/// ```
///
/// # Errors
///
/// [`crate::Error::InvalidArgument`] naming the place of the value, the key, the value and what
/// is allowed; or the unknown class.
pub fn regularizer_from_config(
    name: &str,
    params: &dyn crate::losses::config::Params,
) -> Result<SharedRegularizer> {
    use crate::losses::config::{Bounds, Reader};
    let r = Reader::new(params, name);
    let factor = Bounds::non_negative();
    Ok(match name {
        "L1" => {
            r.only(&["l1"])?;
            Arc::new(L1::new(r.float("l1", 0.01, factor)?))
        }
        "L2" => {
            r.only(&["l2"])?;
            Arc::new(L2::new(r.float("l2", 0.01, factor)?))
        }
        "L1L2" => {
            r.only(&["l1", "l2"])?;
            Arc::new(L1L2::new(
                r.float("l1", 0.0, factor)?,
                r.float("l2", 0.0, factor)?,
            ))
        }
        "OrthogonalRegularizer" => {
            r.only(&["factor", "mode"])?;
            let mode = match r.string("mode", "rows")?.as_str() {
                "rows" => OrthogonalMode::Rows,
                "columns" => OrthogonalMode::Columns,
                m => {
                    return Err(params.error(
                        Some("mode"),
                        &format!(
                        "got {m:?}; OrthogonalRegularizer's `mode` must be \"rows\" or \"columns\""
                    ),
                    ))
                }
            };
            Arc::new(Orthogonal::new(r.float("factor", 0.01, factor)?).mode(mode))
        }
        other => {
            return Err(params.error(
                None,
                &format!(
                    "kiln has no regularizer `{other}`: use L1, L2, L1L2 or OrthogonalRegularizer"
                ),
            ))
        }
    })
}
