//! Normalization over the batch (BatchNormalization) and over the features (LayerNormalization).

use super::util::{built, make_weight, mask_as, one_input};
use super::{BuildContext, CallContext, Layer, Weight};
use crate::error::{invalid, Error, Result};
use crate::initializers::Initializer;
use crate::regularizers::{IntoRegularizer, SharedRegularizer};
use candle_core::Tensor;

/// Normalizes each feature (the last axis, or the one [`axis`](Self::axis) names) with the
/// batch's statistics while training and with moving averages of them at inference, then scales
/// by `gamma` and shifts by `beta`, as Keras' `BatchNormalization`.
///
/// Weights: `<name>/gamma`, `<name>/beta` (trained), `<name>/moving_mean` and
/// `<name>/moving_variance` (not trainable: the optimizer never touches them; each training call
/// updates them as `moving = moving · momentum + batch · (1 - momentum)`, with the biased batch
/// variance). With a mask (shape of the input without its last axis), the statistics are taken
/// over the unmasked positions, as Keras does.
///
/// In data-parallel training ([`crate::Fit::distributed`]) each rank normalizes its shard
/// with the shard's own statistics by default, as Keras and PyTorch DDP do;
/// [`BatchNormalization::synchronized`] takes them over the global batch instead.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let x = Input::new([2]);
/// let y = BatchNormalization::new().momentum(0.5).with_name("bn").apply(&x)?;
/// let mut model = Model::new(&[x], &[y.clone()])?;
/// model.compile(Compile::new(Sgd::new(0.0)).loss("mse"))?;
/// let xs = Tensor::new(&[[1f32, 10.], [3., 30.]], &Device::Cpu)?;
/// model.fit(&Dataset::new(xs.clone(), xs.zeros_like()?)?, Fit::new().batch_size(2).quiet())?;
/// // One training step: moving_mean = 0·0.5 + batch mean·0.5.
/// let mean = model.weight("bn/moving_mean")?.var.as_tensor().to_vec1::<f32>()?;
/// assert_eq!(mean, vec![1.0, 10.0]);
/// assert!(!model.weight("bn/moving_variance")?.trainable());
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct BatchNormalization {
    axis: isize,
    momentum: f64,
    epsilon: f64,
    center: bool,
    scale: bool,
    synchronized: bool,
    gamma_regularizer: Option<SharedRegularizer>,
    beta_regularizer: Option<SharedRegularizer>,
    gamma_constraint: Option<crate::constraints::Constraint>,
    beta_constraint: Option<crate::constraints::Constraint>,
    name: Option<String>,
    gamma: Option<Weight>,
    beta: Option<Weight>,
    moving_mean: Option<Weight>,
    moving_variance: Option<Weight>,
}

impl Default for BatchNormalization {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchNormalization {
    /// Momentum 0.99, epsilon 1e-3, with `gamma` and `beta` (Keras' defaults).
    pub fn new() -> Self {
        Self {
            axis: -1,
            momentum: 0.99,
            epsilon: 1e-3,
            center: true,
            scale: true,
            synchronized: false,
            gamma_regularizer: None,
            beta_regularizer: None,
            gamma_constraint: None,
            beta_constraint: None,
            name: None,
            gamma: None,
            beta: None,
            moving_mean: None,
            moving_variance: None,
        }
    }
    /// The feature axis, counted as Keras counts it: with the batch axis as 0, and -1 the last
    /// (the default). `axis(1)` on images `[h, w, c]` normalizes each row; on sequences
    /// `[channels, steps]` each channel (Keras' channels-first BatchNormalization).
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([2, 3]);
    /// let y = BatchNormalization::new().axis(1).with_name("bn").apply(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// assert_eq!(model.weight("bn/gamma")?.var.dims(), &[2]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn axis(mut self, axis: isize) -> Self {
        self.axis = axis;
        self
    }
    /// How much of the moving statistics each training step keeps (default 0.99).
    pub fn momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }
    /// Added to the variance before the square root (default 1e-3).
    pub fn epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = epsilon;
        self
    }
    /// Whether to add the learned offset `beta` (default true).
    pub fn center(mut self, center: bool) -> Self {
        self.center = center;
        self
    }
    /// Whether to multiply by the learned scale `gamma` (default true).
    pub fn scale(mut self, scale: bool) -> Self {
        self.scale = scale;
        self
    }
    /// Whether, in data-parallel training, the batch statistics are those of the global
    /// batch rather than of each rank's shard (default false), as Keras'
    /// `BatchNormalization(synchronized=True)`: N ranks then normalize, update the moving
    /// statistics and differentiate exactly as one process on the global batch, up to float
    /// summation order. Outside data-parallel training (one process, or one rank) it changes
    /// nothing.
    ///
    /// The cost: in each training step's forward pass, one all-reduce of `2 · features + 1`
    /// values per layer (the per-feature sums of x and x², and the count), and one more of
    /// the same size in each backward pass through the layer; and the layer's statistics run
    /// as a plain candle graph (in f64) instead of the fused CPU pass.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([8]);
    /// let y = BatchNormalization::new().synchronized(true).apply(&x)?;
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn synchronized(mut self, synchronized: bool) -> Self {
        self.synchronized = synchronized;
        self
    }
    /// A penalty on `gamma`, added to the total loss.
    pub fn gamma_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.gamma_regularizer = Some(reg.into_regularizer());
        self
    }
    /// A penalty on `beta`, added to the total loss.
    pub fn beta_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.beta_regularizer = Some(reg.into_regularizer());
        self
    }
    /// A projection of `gamma` after every update (Keras' `gamma_constraint`).
    pub fn gamma_constraint(mut self, c: crate::constraints::Constraint) -> Self {
        self.gamma_constraint = Some(c);
        self
    }
    /// A projection of `beta` after every update (Keras' `beta_constraint`).
    pub fn beta_constraint(mut self, c: crate::constraints::Constraint) -> Self {
        self.beta_constraint = Some(c);
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

    /// The batch mean and (biased) variance of each feature, over the unmasked positions when
    /// there is a mask; both of shape `[features]`.
    fn moments(x: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let features = x.dims()[x.rank() - 1];
        let flat = x.reshape(((), features))?;
        match mask {
            None => {
                let mean = flat.mean_keepdim(0)?;
                let var = flat.broadcast_sub(&mean)?.sqr()?.mean(0)?;
                Ok((mean.squeeze(0)?, var))
            }
            Some(mask) => {
                let m = mask_as(mask, x.dtype())?.reshape(((), 1))?;
                if m.dims()[0] != flat.dims()[0] {
                    return Err(Error::Data(format!(
                        "BatchNormalization: a mask of shape {:?} does not fit inputs of shape {:?}",
                        mask.dims(),
                        x.dims()
                    )));
                }
                // Keras adds its epsilon (1e-7) to the count of unmasked positions.
                let count = (m.sum_keepdim(0)? + crate::reduction::EPSILON)?;
                let mean = flat
                    .broadcast_mul(&m)?
                    .sum_keepdim(0)?
                    .broadcast_div(&count)?;
                let centered = flat.broadcast_sub(&mean)?.broadcast_mul(&m)?;
                let var = centered.sqr()?.sum_keepdim(0)?.broadcast_div(&count)?;
                Ok((mean.squeeze(0)?, var.squeeze(0)?))
            }
        }
    }

    /// The mean and (biased) variance of each feature over the global batch of a
    /// data-parallel step: the per-feature sums of x and x² and the count (of unmasked
    /// positions, with Keras' epsilon added, under a mask) of this rank's shard, summed over
    /// the ranks by one all-reduce whose backward pass sums the ranks' gradients of those sums
    /// (so that each rank's input gradient is the one-process gradient). Summed in f64: the
    /// one-pass variance E[x²] - E[x]² then loses nothing that matters against f32 data.
    fn global_moments(
        x: &Tensor,
        mask: Option<&Tensor>,
        ranks: &crate::distributed::SharedCommunicator,
    ) -> Result<(Tensor, Tensor)> {
        use candle_core::DType;
        let features = x.dims()[x.rank() - 1];
        let flat = x.reshape(((), features))?.to_dtype(DType::F64)?;
        let (sum, sum_sq, count) = match mask {
            None => {
                let rows = flat.dims()[0] as f64;
                let count = Tensor::new(&[rows], x.device())?;
                (flat.sum(0)?, flat.sqr()?.sum(0)?, count)
            }
            Some(mask) => {
                let m = mask_as(mask, DType::F64)?.reshape(((), 1))?;
                if m.dims()[0] != flat.dims()[0] {
                    return Err(Error::Data(format!(
                        "BatchNormalization: a mask of shape {:?} does not fit inputs of shape {:?}",
                        mask.dims(),
                        x.dims()
                    )));
                }
                let weighted = flat.broadcast_mul(&m)?;
                let sum_sq = (&weighted * &flat)?.sum(0)?;
                (weighted.sum(0)?, sum_sq, m.sum(0)?)
            }
        };
        let packed = Tensor::cat(&[&sum, &sum_sq, &count], 0)?;
        let global =
            crate::distributed::all_reduce(&packed, ranks, crate::distributed::Adjoint::Sum)?;
        let mut count = global.narrow(0, 2 * features, 1)?;
        if mask.is_some() {
            count = (count + crate::reduction::EPSILON)?;
        }
        let mean = global.narrow(0, 0, features)?.broadcast_div(&count)?;
        let mean_sq = global
            .narrow(0, features, features)?
            .broadcast_div(&count)?;
        // Rounding can leave a constant feature's variance a hair below 0.
        let var = (mean_sq - mean.sqr()?)?.relu()?;
        Ok((mean.to_dtype(x.dtype())?, var.to_dtype(x.dtype())?))
    }

    /// Moves a moving statistic toward the batch's by `1 - momentum`.
    fn update_moving(&self, w: &Weight, batch: &Tensor) -> Result<()> {
        let keep = self.momentum;
        let moved = ((w.var.as_tensor() * keep)? + (batch.detach() * (1.0 - keep))?)?;
        w.var.set(&moved)?;
        Ok(())
    }

    /// Training without a mask takes the fused CPU pass where it applies
    /// ([`super::channels::batch_norm_train`]), else this plain candle graph. The fused pass
    /// applies the ReLU of a following layer when `relu` asks for it; the flag returned says
    /// whether it did.
    ///
    /// `ranks`: the ranks of a data-parallel step, whose global batch gives the statistics
    /// when the layer is synchronised.
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        training: bool,
        ranks: Option<&crate::distributed::SharedCommunicator>,
        relu: bool,
    ) -> Result<(Tensor, bool)> {
        // Another feature axis: swapped with the last (the statistics are over every other
        // axis, whose order does not matter), normalized there, and swapped back.
        let last = x.rank().saturating_sub(1);
        let axis = resolve_axis("BatchNormalization", self.axis, x.rank())?;
        if axis != last {
            if mask.is_some() {
                return Err(Error::Data(format!(
                    "BatchNormalization over axis {} takes no mask: a mask covers every axis \
                     but the last",
                    self.axis
                )));
            }
            let swapped = x.transpose(axis, last)?.contiguous()?;
            let (y, _) = self.forward_last(&swapped, None, training, ranks, false)?;
            return Ok((y.transpose(axis, last)?.contiguous()?, false));
        }
        self.forward_last(x, mask, training, ranks, relu)
    }

    /// [`Self::forward`] with the features on the last axis.
    fn forward_last(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        training: bool,
        ranks: Option<&crate::distributed::SharedCommunicator>,
        relu: bool,
    ) -> Result<(Tensor, bool)> {
        let moving_mean = built(&self.moving_mean, "BatchNormalization")?;
        let moving_variance = built(&self.moving_variance, "BatchNormalization")?;
        let features = moving_mean.var.dims()[0];
        if x.rank() < 2 || x.dims()[x.rank() - 1] != features {
            return Err(Error::Data(format!(
                "layer `{}` expects {features} features on the last axis, got shape {:?}",
                moving_mean.name.trim_end_matches("/moving_mean"),
                x.dims()
            )));
        }
        let ranks = ranks.filter(|_| training && self.synchronized);
        if training && mask.is_none() && ranks.is_none() {
            let ones;
            let zeros;
            let gamma = match &self.gamma {
                Some(g) => g.var.as_tensor(),
                None => {
                    ones = Tensor::ones(features, x.dtype(), x.device())?;
                    &ones
                }
            };
            let beta = match &self.beta {
                Some(b) => b.var.as_tensor(),
                None => {
                    zeros = Tensor::zeros(features, x.dtype(), x.device())?;
                    &zeros
                }
            };
            if let Some((y, mean, var)) =
                super::channels::batch_norm_train(x, gamma, beta, self.epsilon, relu)?
            {
                self.update_moving(moving_mean, &mean)?;
                self.update_moving(moving_variance, &var)?;
                return Ok((y, relu));
            }
        }
        let (mean, var) = if training {
            let (mean, var) = match ranks {
                Some(ranks) => Self::global_moments(x, mask, ranks)?,
                None => Self::moments(x, mask)?,
            };
            self.update_moving(moving_mean, &mean)?;
            self.update_moving(moving_variance, &var)?;
            (mean, var)
        } else {
            (
                moving_mean.var.as_tensor().clone(),
                moving_variance.var.as_tensor().clone(),
            )
        };
        let inv = (var + self.epsilon)?.sqrt()?.recip()?;
        let factor = match &self.gamma {
            Some(g) => (inv * g.var.as_tensor())?,
            None => inv,
        };
        let mut y = x.broadcast_sub(&mean)?.broadcast_mul(&factor)?;
        if let Some(b) = &self.beta {
            y = y.broadcast_add(b.var.as_tensor())?;
        }
        Ok((y, false))
    }
}

impl Layer for BatchNormalization {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        use crate::regularizers::keras_object;
        Some((
            "BatchNormalization",
            serde_json::json!({
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "gamma_regularizer": keras_object(&self.gamma_regularizer)?,
                "beta_regularizer": keras_object(&self.beta_regularizer)?,
                "beta_constraint": self.beta_constraint.as_ref().map(|c| c.keras_config()),
                "gamma_constraint": self.gamma_constraint.as_ref().map(|c| c.keras_config()),
                "synchronized": self.synchronized,
            }),
        ))
    }
    fn kind(&self) -> &'static str {
        "batch_normalization"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let shape = one_input("BatchNormalization", input_shapes)?;
        if shape.is_empty() {
            return Err(Error::Graph(
                "BatchNormalization needs samples with a feature axis".into(),
            ));
        }
        resolve_axis("BatchNormalization", self.axis, shape.len() + 1)?;
        if !(0.0..=1.0).contains(&self.momentum) || self.epsilon.is_nan() || self.epsilon <= 0.0 {
            return Err(invalid(format!(
                "BatchNormalization: momentum must be in [0, 1] and epsilon > 0, got {} and {}",
                self.momentum, self.epsilon
            )));
        }
        Ok(shape.clone())
    }
    fn build(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        ctx: &mut BuildContext,
    ) -> Result<()> {
        let shape = &input_shapes[0];
        let axis = resolve_axis("BatchNormalization", self.axis, shape.len() + 1)?;
        let f = [shape[axis - 1]];
        if self.scale {
            self.gamma = Some(
                make_weight(
                    name,
                    "gamma",
                    &f,
                    Initializer::Ones,
                    true,
                    self.gamma_regularizer.clone(),
                    ctx,
                )?
                .with_constraint(self.gamma_constraint.clone()),
            );
        }
        if self.center {
            self.beta = Some(
                make_weight(
                    name,
                    "beta",
                    &f,
                    Initializer::Zeros,
                    true,
                    self.beta_regularizer.clone(),
                    ctx,
                )?
                .with_constraint(self.beta_constraint.clone()),
            );
        }
        self.moving_mean = Some(make_weight(
            name,
            "moving_mean",
            &f,
            Initializer::Zeros,
            false,
            None,
            ctx,
        )?);
        self.moving_variance = Some(make_weight(
            name,
            "moving_variance",
            &f,
            Initializer::Ones,
            false,
            None,
            ctx,
        )?);
        Ok(())
    }
    fn weights(&self) -> Vec<Weight> {
        [
            &self.gamma,
            &self.beta,
            &self.moving_mean,
            &self.moving_variance,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }
    fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor> {
        self.call_with_masks(inputs, &[], ctx)
    }
    fn call_with_masks(
        &self,
        inputs: &[Tensor],
        masks: &[Option<Tensor>],
        ctx: &mut CallContext,
    ) -> Result<Tensor> {
        let training = ctx.training && ctx.layer_trainable();
        let mask = masks.first().and_then(Option::as_ref);
        let ranks = ctx.ranks.as_ref();
        let (y, relu_applied) =
            self.forward(&inputs[0], mask, training, ranks, ctx.relu_follows)?;
        ctx.relu_applied = relu_applied;
        Ok(y)
    }
    fn takes_mask(&self) -> bool {
        true
    }
}

/// A Keras axis (batch axis 0, negative from the end) of an input of `rank` axes (batch
/// included) as an index; the batch axis itself is refused (its size is not fixed).
fn resolve_axis(layer: &str, axis: isize, rank: usize) -> Result<usize> {
    let r = rank as isize;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 1 || a >= r {
        return Err(invalid(format!(
            "{layer}: axis {axis} is not a feature axis of inputs with {} axes besides the batch \
             (give 1..{} or -1..-{})",
            rank - 1,
            rank - 1,
            rank - 1
        )));
    }
    Ok(a as usize)
}

/// Normalizes each sample over its last axis (or the axes [`axes`](Self::axes) names),
/// `(x - mean) / sqrt(variance + epsilon)`, then scales by `gamma` and shifts by `beta`, as
/// Keras' `LayerNormalization` (epsilon 1e-3). It keeps the shape, so a mask passes through.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let x = Input::new([4]);
/// let y = LayerNormalization::new().epsilon(1e-12).apply(&x)?;
/// let model = Model::builder(&[x], &[y]).dtype(kiln::candle::DType::F64).build()?;
/// let out = model.predict(&[Tensor::new(&[[1f64, 2., 3., 4.]], &Device::Cpu)?], 1)?;
/// let v = out[0].to_vec2::<f64>()?[0].clone();
/// let expected = [-1.3416407864998738, -0.4472135954999579, 0.4472135954999579, 1.3416407864998738];
/// assert!(v.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-9));
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct LayerNormalization {
    axes: Vec<isize>,
    epsilon: f64,
    center: bool,
    scale: bool,
    gamma_regularizer: Option<SharedRegularizer>,
    beta_regularizer: Option<SharedRegularizer>,
    gamma_constraint: Option<crate::constraints::Constraint>,
    beta_constraint: Option<crate::constraints::Constraint>,
    name: Option<String>,
    gamma: Option<Weight>,
    beta: Option<Weight>,
}

impl Default for LayerNormalization {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerNormalization {
    /// Epsilon 1e-3, with `gamma` and `beta` (Keras' defaults).
    pub fn new() -> Self {
        Self {
            axes: vec![-1],
            epsilon: 1e-3,
            center: true,
            scale: true,
            gamma_regularizer: None,
            beta_regularizer: None,
            gamma_constraint: None,
            beta_constraint: None,
            name: None,
            gamma: None,
            beta: None,
        }
    }
    /// The axes each sample is normalized over, counted as Keras counts them (batch axis 0, -1
    /// the last; default `[-1]`). `gamma` and `beta` have the sizes of these axes, in the order
    /// given, as Keras' `LayerNormalization(axis=[…])` stores them.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([3, 4]);
    /// let y = LayerNormalization::new().axes(&[1, 2]).with_name("ln").apply(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// assert_eq!(model.weight("ln/gamma")?.var.dims(), &[3, 4]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn axes(mut self, axes: &[isize]) -> Self {
        self.axes = axes.to_vec();
        self
    }
    /// Added to the variance before the square root (default 1e-3).
    pub fn epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = epsilon;
        self
    }
    /// Whether to add the learned offset `beta` (default true).
    pub fn center(mut self, center: bool) -> Self {
        self.center = center;
        self
    }
    /// Whether to multiply by the learned scale `gamma` (default true).
    pub fn scale(mut self, scale: bool) -> Self {
        self.scale = scale;
        self
    }
    /// A penalty on `gamma`, added to the total loss.
    pub fn gamma_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.gamma_regularizer = Some(reg.into_regularizer());
        self
    }
    /// A penalty on `beta`, added to the total loss.
    pub fn beta_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.beta_regularizer = Some(reg.into_regularizer());
        self
    }
    /// A projection of `gamma` after every update (Keras' `gamma_constraint`).
    pub fn gamma_constraint(mut self, c: crate::constraints::Constraint) -> Self {
        self.gamma_constraint = Some(c);
        self
    }
    /// A projection of `beta` after every update (Keras' `beta_constraint`).
    pub fn beta_constraint(mut self, c: crate::constraints::Constraint) -> Self {
        self.beta_constraint = Some(c);
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

    /// The axes as indices of an input of `rank` axes (batch included), in the order given;
    /// none twice, none the batch axis.
    fn resolved(&self, rank: usize) -> Result<Vec<usize>> {
        if self.axes.is_empty() {
            return Err(invalid("LayerNormalization: give at least one axis"));
        }
        let mut out = Vec::new();
        for &a in &self.axes {
            let a = resolve_axis("LayerNormalization", a, rank)?;
            if out.contains(&a) {
                return Err(invalid(format!(
                    "LayerNormalization: axis {a} is given twice in {:?}",
                    self.axes
                )));
            }
            out.push(a);
        }
        Ok(out)
    }
}

impl Layer for LayerNormalization {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        use crate::regularizers::keras_object;
        Some((
            "LayerNormalization",
            serde_json::json!({
                "axis": self.axes,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "rms_scaling": false,
                "gamma_regularizer": keras_object(&self.gamma_regularizer)?,
                "beta_regularizer": keras_object(&self.beta_regularizer)?,
                "beta_constraint": self.beta_constraint.as_ref().map(|c| c.keras_config()),
                "gamma_constraint": self.gamma_constraint.as_ref().map(|c| c.keras_config()),
            }),
        ))
    }
    fn kind(&self) -> &'static str {
        "layer_normalization"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let shape = one_input("LayerNormalization", input_shapes)?;
        if shape.is_empty() {
            return Err(Error::Graph(
                "LayerNormalization needs samples with a feature axis".into(),
            ));
        }
        self.resolved(shape.len() + 1)?;
        if self.epsilon.is_nan() || self.epsilon <= 0.0 {
            return Err(invalid(format!(
                "LayerNormalization: epsilon must be > 0, got {}",
                self.epsilon
            )));
        }
        Ok(shape.clone())
    }
    fn build(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        ctx: &mut BuildContext,
    ) -> Result<()> {
        let shape = &input_shapes[0];
        let f: Vec<usize> = self
            .resolved(shape.len() + 1)?
            .into_iter()
            .map(|a| shape[a - 1])
            .collect();
        if self.scale {
            self.gamma = Some(
                make_weight(
                    name,
                    "gamma",
                    &f,
                    Initializer::Ones,
                    true,
                    self.gamma_regularizer.clone(),
                    ctx,
                )?
                .with_constraint(self.gamma_constraint.clone()),
            );
        }
        if self.center {
            self.beta = Some(
                make_weight(
                    name,
                    "beta",
                    &f,
                    Initializer::Zeros,
                    true,
                    self.beta_regularizer.clone(),
                    ctx,
                )?
                .with_constraint(self.beta_constraint.clone()),
            );
        }
        Ok(())
    }
    fn weights(&self) -> Vec<Weight> {
        self.gamma.iter().chain(self.beta.iter()).cloned().collect()
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let x = &inputs[0];
        let axes = self.resolved(x.rank())?;
        // gamma and beta, stored with the sizes of the axes in the order given, reshaped onto
        // the input's axes as Keras does.
        let mut broadcast = vec![1; x.rank()];
        for &a in &axes {
            broadcast[a] = x.dims()[a];
        }
        let param_shape: Vec<usize> = axes.iter().map(|&a| x.dims()[a]).collect();
        if let Some(g) = &self.gamma {
            if g.var.dims() != param_shape.as_slice() {
                return Err(Error::Data(format!(
                    "layer `{}` normalizes axes {:?} of size {:?}, got shape {:?}",
                    g.name.trim_end_matches("/gamma"),
                    self.axes,
                    g.var.dims(),
                    x.dims()
                )));
            }
        }
        let mean = x.mean_keepdim(axes.clone())?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(axes)?;
        let inv = (var + self.epsilon)?.sqrt()?.recip()?;
        let mut y = centered.broadcast_mul(&inv)?;
        if let Some(g) = &self.gamma {
            y = y.broadcast_mul(&g.var.as_tensor().reshape(broadcast.as_slice())?)?;
        }
        if let Some(b) = &self.beta {
            y = y.broadcast_add(&b.var.as_tensor().reshape(broadcast.as_slice())?)?;
        }
        Ok(y)
    }
}
