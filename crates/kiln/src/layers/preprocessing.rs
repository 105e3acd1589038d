//! Preprocessing that travels with the model: [`Normalization`], whose statistics are weights,
//! so that a saved model (and every checkpoint) standardizes its inputs as training did.

use super::util::{built, make_weight, one_input};
use super::{BuildContext, CallContext, Layer, Weight};
use crate::error::{invalid, Error, Result};
use crate::initializers::Initializer;
use candle_core::{DType, Device, Tensor};

/// Keras' `backend.epsilon()`: the smallest standard deviation Normalization divides by.
pub const NORMALIZATION_EPSILON: f64 = 1e-7;

/// Shifts and scales inputs to mean 0 and variance 1 per feature, with statistics computed once
/// from the training data ([`Normalization::adapt`]) or given ([`Normalization::mean_variance`]),
/// as Keras 3's `keras.layers.Normalization`:
///
/// `y = (x - mean) / max(sqrt(variance), 1e-7)`, or with [`Normalization::invert`]
/// `y = mean + x · max(sqrt(variance), 1e-7)`.
///
/// `axis` numbers the axes as Keras does, the batch axis being 0: the default `-1` keeps one
/// mean and variance per index of the last axis and reduces over every other axis (the batch
/// included); [`Normalization::axes`] keeps several, [`Normalization::all_axes`] one scalar mean
/// and variance (Keras' `axis=None`). `adapt` uses the population variance (`np.var`).
///
/// Weights: `<name>/mean`, `<name>/variance` (the kept axes' shape) and `<name>/count` (a
/// scalar), none of them trainable: the optimizer never touches them, and they are saved with
/// the model and in checkpoints. Keras 3 keeps `count` only for older saved models and leaves
/// it 0; kiln stores in it the number of values each statistic was computed from (0 when the
/// statistics were given). A layer neither adapted nor given statistics starts with mean 0 and
/// variance 1, as in Keras, until weights are loaded into it.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let train = Tensor::new(&[[0f32, 7., 4.], [2., 9., 6.], [0., 7., 4.], [2., 9., 6.]], &Device::Cpu)?;
/// let x = Input::new([3]);
/// let y = Normalization::new().with_name("norm").adapt(&train)?.apply(&x)?;
/// let model = Model::new(&[x], &[y])?;
/// let out = model.predict(&[Tensor::new(&[[0f32, 7., 4.]], &Device::Cpu)?], 1)?;
/// assert_eq!(out[0].to_vec2::<f32>()?, vec![vec![-1f32, -1., -1.]]);
/// assert_eq!(model.weight("norm/mean")?.var.as_tensor().to_vec1::<f32>()?, vec![1f32, 8., 5.]);
/// assert!(!model.weight("norm/variance")?.trainable());
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Normalization {
    /// The kept axes as given (Keras numbering, batch axis 0); empty for a scalar statistic.
    axis: Vec<isize>,
    invert: bool,
    name: Option<String>,
    /// Statistics from `adapt` or given: values in f64, with their shape (the kept axes', or a
    /// shape that broadcasts to it as Keras allows for given values).
    stats: Option<Stats>,
    mean: Option<Weight>,
    variance: Option<Weight>,
    count: Option<Weight>,
}

struct Stats {
    shape: Vec<usize>,
    mean: Vec<f64>,
    variance: Vec<f64>,
    count: f64,
    /// The shape of the samples `adapt` saw (without the batch axis), checked against the
    /// model's input when the layer is built; `None` for given statistics.
    adapted_on: Option<Vec<usize>>,
}

impl Default for Normalization {
    fn default() -> Self {
        Self::new()
    }
}

impl Normalization {
    /// One mean and variance per index of the last axis (Keras' `axis=-1`).
    pub fn new() -> Self {
        Self {
            axis: vec![-1],
            invert: false,
            name: None,
            stats: None,
            mean: None,
            variance: None,
            count: None,
        }
    }

    /// Keeps one mean and variance per index of `axis` (Keras numbering: 1 is the first axis
    /// after the batch axis, -1 the last).
    pub fn axis(self, axis: isize) -> Self {
        self.axes(&[axis])
    }

    /// Keeps one mean and variance per index of these axes (Keras' `axis=(1, 2)`); an empty list
    /// is [`Normalization::all_axes`].
    pub fn axes(mut self, axes: &[isize]) -> Self {
        self.axis = axes.to_vec();
        self
    }

    /// One scalar mean and variance over every value (Keras' `axis=None`).
    pub fn all_axes(mut self) -> Self {
        self.axis.clear();
        self
    }

    /// Applies the inverse: turns standardized values back into the original scale.
    pub fn invert(mut self, invert: bool) -> Self {
        self.invert = invert;
        self
    }

    /// The layer's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The old spelling of `with_name`.
    #[deprecated(
        since = "0.1.0",
        note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)"
    )]
    pub fn name(self, name: impl Into<String>) -> Self {
        self.with_name(name)
    }

    /// Given statistics instead of adapted ones (Keras' `mean=`, `variance=`): both of the same
    /// shape, a scalar or a shape that matches the kept axes from the right.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let d = Device::Cpu;
    /// let x = Input::new([1]);
    /// let layer = Normalization::new().mean_variance(&Tensor::new(3f32, &d)?, &Tensor::new(2f32, &d)?)?;
    /// let model = Model::new(&[x.clone()], &[layer.apply(&x)?])?;
    /// let out = model.predict(&[Tensor::new(&[[1f32], [3.]], &d)?], 2)?;
    /// let v = out[0].flatten_all()?.to_vec1::<f32>()?;
    /// assert!((v[0] + std::f32::consts::SQRT_2).abs() < 1e-6 && v[1] == 0.0);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// When the shapes differ, a variance is negative, or a value is not finite.
    pub fn mean_variance(mut self, mean: &Tensor, variance: &Tensor) -> Result<Self> {
        if mean.dims() != variance.dims() {
            return Err(invalid(format!(
                "Normalization: mean and variance must have the same shape, got {:?} and {:?}",
                mean.dims(),
                variance.dims()
            )));
        }
        let m = flat_f64(mean)?;
        let v = flat_f64(variance)?;
        if let Some(bad) = m.iter().chain(&v).find(|x| !x.is_finite()) {
            return Err(invalid(format!(
                "Normalization: mean and variance must be finite, got {bad}"
            )));
        }
        if let Some(bad) = v.iter().find(|x| **x < 0.0) {
            return Err(invalid(format!(
                "Normalization: a variance must be >= 0, got {bad}"
            )));
        }
        self.stats = Some(Stats {
            shape: mean.dims().to_vec(),
            mean: m,
            variance: v,
            count: 0.0,
            adapted_on: None,
        });
        Ok(self)
    }

    /// Computes the mean and the (population) variance of `data` (shape `[samples, ...]`) for
    /// each index of the kept axes, as Keras' `adapt`. Call it before applying the layer, on the
    /// training data only.
    ///
    /// # Errors
    /// When `data` has no samples, an axis does not exist, or a value is not finite.
    pub fn adapt(mut self, data: &Tensor) -> Result<Self> {
        let dims = data.dims();
        let layer = self.label();
        if dims.is_empty() || dims[0] == 0 {
            return Err(Error::Data(format!(
                "{layer}: adapt needs at least one sample, got data of shape {dims:?}"
            )));
        }
        let keep = kept_axes(&self.axis, dims.len(), &layer)?;
        // The batch axis is always reduced, so every sample maps its values onto the kept
        // cells the same way: `cell_of[i]` for the sample's i-th value.
        let sample = &dims[1..];
        let kept_shape: Vec<usize> = keep.iter().map(|&a| dims[a]).collect();
        let cells: usize = kept_shape.iter().product();
        let per_sample: usize = sample.iter().product();
        let mut cell_of = vec![0usize; per_sample];
        {
            let mut strides = vec![0usize; sample.len()];
            let mut s = 1;
            for &a in keep.iter().rev() {
                strides[a - 1] = s;
                s *= dims[a];
            }
            let mut index = vec![0usize; sample.len()];
            for c in cell_of.iter_mut() {
                *c = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
                for d in (0..sample.len()).rev() {
                    index[d] += 1;
                    if index[d] < sample[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
        }
        // Two passes in f64 (mean, then squared deviations), a block of samples at a time.
        let samples = dims[0];
        let block = (1 << 20) / per_sample.max(1) + 1;
        let for_each_block = |f: &mut dyn FnMut(usize, &[f64]) -> Result<()>| -> Result<()> {
            let mut start = 0;
            while start < samples {
                let len = block.min(samples - start);
                f(start, &flat_f64(&data.narrow(0, start, len)?)?)?;
                start += len;
            }
            Ok(())
        };
        let count = (samples * per_sample / cells.max(1)) as f64;
        let mut mean = vec![0f64; cells];
        for_each_block(&mut |start, values| {
            if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                return Err(Error::Data(format!(
                    "{layer}: adapt found a non-finite value ({}) in sample {} of data of shape \
                     {dims:?}",
                    values[i],
                    start + i / per_sample
                )));
            }
            for (v, &c) in values.iter().zip(cell_of.iter().cycle()) {
                mean[c] += v;
            }
            Ok(())
        })?;
        mean.iter_mut().for_each(|m| *m /= count);
        let mut variance = vec![0f64; cells];
        for_each_block(&mut |_, values| {
            for (v, &c) in values.iter().zip(cell_of.iter().cycle()) {
                variance[c] += (v - mean[c]).powi(2);
            }
            Ok(())
        })?;
        variance.iter_mut().for_each(|s| *s /= count);
        self.stats = Some(Stats {
            shape: kept_shape,
            mean,
            variance,
            count,
            adapted_on: Some(dims[1..].to_vec()),
        });
        Ok(self)
    }

    fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("Normalization `{n}`"),
            None => "Normalization".to_string(),
        }
    }

    /// The kept axes' shape for samples of `shape` (without the batch axis).
    fn stat_shape(&self, shape: &[usize]) -> Result<Vec<usize>> {
        let keep = kept_axes(&self.axis, shape.len() + 1, &self.label())?;
        Ok(keep.iter().map(|&a| shape[a - 1]).collect())
    }

    /// The statistics as the layer divides by them, in the shape that broadcasts against a
    /// batch of rank `rank`: 1 on reduced axes.
    fn broadcast(&self, w: &Weight, rank: usize) -> Result<Tensor> {
        let keep = kept_axes(&self.axis, rank, &self.label())?;
        let mut shape = vec![1usize; rank];
        for (&a, &n) in keep.iter().zip(w.var.dims()) {
            shape[a] = n;
        }
        Ok(w.var.as_tensor().detach().reshape(shape)?)
    }
}

/// The kept axes for data of rank `rank` (the batch axis included), sorted, non-negative.
fn kept_axes(axis: &[isize], rank: usize, layer: &str) -> Result<Vec<usize>> {
    let mut keep = Vec::with_capacity(axis.len());
    for &a in axis {
        let r = rank as isize;
        if a < -r || a >= r {
            return Err(invalid(format!(
                "{layer}: axis {a} does not exist for data of rank {rank} (batch axis included): \
                 use an axis in [{}, {})",
                -r, r
            )));
        }
        let a = if a < 0 { (a + r) as usize } else { a as usize };
        if a == 0 {
            return Err(invalid(format!(
                "{layer}: axis {a} is the batch axis, which is always reduced: keep feature axes \
                 (1 to {}, or -1 for the last)",
                rank - 1
            )));
        }
        if keep.contains(&a) {
            return Err(invalid(format!("{layer}: axis {a} is given twice")));
        }
        keep.push(a);
    }
    keep.sort_unstable();
    Ok(keep)
}

fn flat_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Broadcasts given statistics of `from` shape to `to` (Keras: a scalar everywhere, otherwise the
/// dimensions aligned from the right, each equal or 1).
fn broadcast_values(values: &[f64], from: &[usize], to: &[usize]) -> Option<Vec<f64>> {
    if from.len() > to.len() {
        return None;
    }
    let offset = to.len() - from.len();
    for (i, &n) in from.iter().enumerate() {
        if n != 1 && n != to[offset + i] {
            return None;
        }
    }
    let t = Tensor::from_vec(values.to_vec(), from, &Device::Cpu).ok()?;
    let mut shape = vec![1usize; offset];
    shape.extend_from_slice(from);
    let t = t.reshape(shape).ok()?.broadcast_as(to).ok()?;
    t.flatten_all().ok()?.to_vec1::<f64>().ok()
}

impl Layer for Normalization {
    fn samples_independent(&self) -> bool {
        true
    }
    /// The statistics travel as weights (`mean`, `variance`, `count`), as after Keras' `adapt`.
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        let axis = if self.axis.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(self.axis)
        };
        Some((
            "Normalization",
            serde_json::json!({
                "axis": axis,
                "invert": self.invert,
                "mean": null,
                "variance": null,
            }),
        ))
    }
    fn kind(&self) -> &'static str {
        "normalization"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let shape = one_input("Normalization", input_shapes)?;
        let kept = self.stat_shape(shape)?;
        if let Some(s) = &self.stats {
            if let Some(seen) = &s.adapted_on {
                let seen_kept = self.stat_shape(seen)?;
                if seen_kept != kept {
                    return Err(Error::Graph(format!(
                        "{} was adapted on samples of shape {seen:?} but is applied to samples \
                         of shape {shape:?}: adapt it on data shaped like its input",
                        self.label()
                    )));
                }
            } else if broadcast_values(&s.mean, &s.shape, &kept).is_none() {
                return Err(Error::Graph(format!(
                    "{}: the given mean and variance of shape {:?} do not broadcast to the kept \
                     axes' shape {kept:?}",
                    self.label(),
                    s.shape
                )));
            }
        }
        Ok(shape.clone())
    }
    fn build(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        ctx: &mut BuildContext,
    ) -> Result<()> {
        let kept = self.stat_shape(&input_shapes[0])?;
        let mean = make_weight(name, "mean", &kept, Initializer::Zeros, false, None, ctx)?;
        let variance = make_weight(name, "variance", &kept, Initializer::Ones, false, None, ctx)?;
        let count = make_weight(name, "count", &[], Initializer::Zeros, false, None, ctx)?;
        if let Some(s) = &self.stats {
            let fill = |w: &Weight, v: &[f64]| -> Result<()> {
                let v = broadcast_values(v, &s.shape, &kept).ok_or_else(|| {
                    Error::Graph(format!("{}: statistics do not fit {kept:?}", self.label()))
                })?;
                let t = Tensor::from_vec(v, kept.as_slice(), ctx.device)?.to_dtype(ctx.dtype)?;
                w.var.set(&t)?;
                Ok(())
            };
            fill(&mean, &s.mean)?;
            fill(&variance, &s.variance)?;
            count
                .var
                .set(&Tensor::new(s.count, ctx.device)?.to_dtype(ctx.dtype)?)?;
        }
        self.mean = Some(mean);
        self.variance = Some(variance);
        self.count = Some(count);
        Ok(())
    }
    fn weights(&self) -> Vec<Weight> {
        [&self.mean, &self.variance, &self.count]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let x = &inputs[0];
        let mean = built(&self.mean, "Normalization")?;
        let variance = built(&self.variance, "Normalization")?;
        let kept = self.stat_shape(&x.dims()[1..])?;
        if kept != mean.var.dims() {
            return Err(Error::Data(format!(
                "layer `{}` normalizes samples whose kept axes have shape {:?}, got a batch of \
                 shape {:?}",
                mean.name.trim_end_matches("/mean"),
                mean.var.dims(),
                x.dims()
            )));
        }
        let m = self.broadcast(mean, x.rank())?;
        let sd = self
            .broadcast(variance, x.rank())?
            .sqrt()?
            .maximum(NORMALIZATION_EPSILON)?;
        Ok(if self.invert {
            x.broadcast_mul(&sd)?.broadcast_add(&m)?
        } else {
            x.broadcast_sub(&m)?.broadcast_div(&sd)?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Input;
    use crate::layers::LayerExt;
    use crate::model::Model;

    #[test]
    fn adapt_keeps_the_population_statistics_of_each_feature() -> Result<()> {
        let d = Device::Cpu;
        let data = Tensor::new(&[[1f64, 10.], [3., 10.], [8., 10.]], &d)?;
        let layer = Normalization::new().adapt(&data)?;
        let s = layer.stats.as_ref().expect("adapted");
        assert_eq!(s.mean, vec![4.0, 10.0]);
        // np.var([1, 3, 8]) = ((−3)² + (−1)² + 4²) / 3
        assert_eq!(s.variance, vec![26.0 / 3.0, 0.0]);
        assert_eq!(s.count, 3.0);
        Ok(())
    }

    #[test]
    fn a_constant_feature_is_divided_by_keras_epsilon() -> Result<()> {
        let d = Device::Cpu;
        let data = Tensor::new(&[[1f64, 5.], [3., 5.]], &d)?;
        let x = Input::new([2]);
        let y = Normalization::new().adapt(&data)?.apply(&x)?;
        let model = Model::builder(&[x], &[y]).dtype(DType::F64).build()?;
        let out = model.predict(&[Tensor::new(&[[2f64, 5.5]], &d)?], 1)?;
        let v = out[0].to_vec2::<f64>()?;
        assert_eq!(v[0][0], 0.0);
        assert!((v[0][1] - 0.5 / 1e-7).abs() < 1e-3, "{}", v[0][1]);
        Ok(())
    }

    #[test]
    fn impossible_axes_and_shapes_are_errors_naming_the_layer() -> Result<()> {
        let d = Device::Cpu;
        let data = Tensor::zeros((4, 3), DType::F32, &d)?;
        let e = Normalization::new()
            .with_name("n")
            .axis(2)
            .adapt(&data)
            .err()
            .expect("no axis 2");
        assert!(e.to_string().contains("Normalization `n`: axis 2"), "{e}");
        let e = Normalization::new()
            .axis(0)
            .adapt(&data)
            .err()
            .expect("batch");
        assert!(e.to_string().contains("batch axis"), "{e}");
        let adapted = Normalization::new().with_name("n").adapt(&data)?;
        let e = adapted.apply(&Input::new([4])).expect_err("other shape");
        assert!(
            e.to_string().contains("adapted on samples of shape [3]"),
            "{e}"
        );
        let bad = Normalization::new()
            .mean_variance(&Tensor::new(&[1f32, 2.], &d)?, &Tensor::new(&[1f32], &d)?)
            .err()
            .expect("shapes differ");
        assert!(bad.to_string().contains("same shape"), "{bad}");
        let neg = Normalization::new()
            .mean_variance(&Tensor::new(1f32, &d)?, &Tensor::new(-1f32, &d)?)
            .err()
            .expect("negative");
        assert!(neg.to_string().contains(">= 0"), "{neg}");
        let empty = Tensor::zeros((0, 3), DType::F32, &d)?;
        assert!(Normalization::new().adapt(&empty).is_err());
        Ok(())
    }
}
