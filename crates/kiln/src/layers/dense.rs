//! The densely connected layer.

use super::{BuildContext, CallContext, Layer, Weight};
use crate::activations::Activation;
use crate::constraints::Constraint;
use crate::error::{invalid, Error, Result};
use crate::initializers::Initializer;
use crate::regularizers::{IntoRegularizer, SharedRegularizer};
use candle_core::{Tensor, Var};

/// `activation(x · kernel + bias)` over the last axis.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([8]);
/// let h = Dense::new(4)
///     .activation(Activation::Relu)
///     .kernel_regularizer(L2::new(1e-4))
///     .with_name("hidden")
///     .apply(&x)?;
/// assert_eq!(h.shape(), &[4]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Dense {
    units: usize,
    activation: Activation,
    use_bias: bool,
    kernel_initializer: Initializer,
    bias_initializer: Initializer,
    kernel_regularizer: Option<SharedRegularizer>,
    bias_regularizer: Option<SharedRegularizer>,
    activity_regularizer: Option<SharedRegularizer>,
    kernel_constraint: Option<Constraint>,
    bias_constraint: Option<Constraint>,
    name: Option<String>,
    kernel: Option<Weight>,
    bias: Option<Weight>,
}

impl Dense {
    /// A layer with `units` outputs, no activation, Glorot-uniform kernel and zero bias.
    pub fn new(units: usize) -> Self {
        Self {
            units,
            activation: Activation::Linear,
            use_bias: true,
            kernel_initializer: Initializer::GlorotUniform,
            bias_initializer: Initializer::Zeros,
            kernel_regularizer: None,
            bias_regularizer: None,
            activity_regularizer: None,
            kernel_constraint: None,
            bias_constraint: None,
            name: None,
            kernel: None,
            bias: None,
        }
    }
    /// The activation applied to the output.
    pub fn activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }
    /// Whether the layer adds a bias (default true).
    pub fn use_bias(mut self, use_bias: bool) -> Self {
        self.use_bias = use_bias;
        self
    }
    /// How the kernel is initialized.
    pub fn kernel_initializer(mut self, init: Initializer) -> Self {
        self.kernel_initializer = init;
        self
    }
    /// How the bias is initialized.
    pub fn bias_initializer(mut self, init: Initializer) -> Self {
        self.bias_initializer = init;
        self
    }
    /// A penalty on the kernel, added to the total loss.
    pub fn kernel_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.kernel_regularizer = Some(reg.into_regularizer());
        self
    }
    /// A penalty on the bias, added to the total loss.
    pub fn bias_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.bias_regularizer = Some(reg.into_regularizer());
        self
    }
    /// A penalty on the layer's output, added to the total loss.
    pub fn activity_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.activity_regularizer = Some(reg.into_regularizer());
        self
    }
    /// A projection of the kernel after every update (Keras' `kernel_constraint`), such as
    /// [`Constraint::max_norm`] over axis 0: each unit's incoming weights (the kernel is
    /// `[inputs, units]`, as in Keras).
    ///
    /// ```
    /// use kiln::constraints::Constraint;
    /// use kiln::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(4).kernel_constraint(Constraint::max_norm(2.0)).apply(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// assert!(model.weight("dense/kernel")?.constraint.is_some());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn kernel_constraint(mut self, c: Constraint) -> Self {
        self.kernel_constraint = Some(c);
        self
    }
    /// A projection of the bias after every update (Keras' `bias_constraint`).
    pub fn bias_constraint(mut self, c: Constraint) -> Self {
        self.bias_constraint = Some(c);
        self
    }
    /// The layer's name; outputs are compiled and reported by it.
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
}

/// The Dense computation, kept in one function so a fused kernel can replace it without
/// touching the layer: `activation(x · kernel + bias)` over the last axis of `x`.
pub fn dense_forward(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    activation: Activation,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (in_features, out_features) = kernel.dims2()?;
    let lead: usize = dims[..dims.len() - 1].iter().product();
    // Leading axes fold into the rows, so sequences (a recurrent layer's input projection, a
    // Dense over time steps) take the fused kernel too, with its fast bias gradient.
    let flat = if dims.len() == 2 {
        x.clone()
    } else {
        x.reshape((lead, in_features))?
    };
    let y = match super::dense_kernel::FusedDense::for_call(&flat, kernel, bias, activation) {
        Some(op) => {
            let bias = bias.expect("the fused op needs a bias");
            flat.apply_op3(kernel, bias, op)?
        }
        None => {
            let mut y = flat.matmul(kernel)?;
            if let Some(b) = bias {
                y = y.broadcast_add(b)?;
            }
            activation.apply(&y)?
        }
    };
    if dims.len() == 2 {
        Ok(y)
    } else {
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = out_features;
        Ok(y.reshape(out)?)
    }
}

impl Layer for Dense {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        use crate::regularizers::keras_object;
        Some((
            "Dense",
            serde_json::json!({
                "units": self.units,
                "activation": self.activation.as_str(),
                "use_bias": self.use_bias,
                "kernel_regularizer": keras_object(&self.kernel_regularizer)?,
                "bias_regularizer": keras_object(&self.bias_regularizer)?,
                "activity_regularizer": keras_object(&self.activity_regularizer)?,
                "kernel_constraint": self.kernel_constraint.as_ref().map(Constraint::keras_config),
                "bias_constraint": self.bias_constraint.as_ref().map(Constraint::keras_config),
            }),
        ))
    }
    fn kind(&self) -> &'static str {
        "dense"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let [shape] = input_shapes else {
            return Err(Error::Graph(format!(
                "Dense takes one input, got {}",
                input_shapes.len()
            )));
        };
        if shape.is_empty() {
            return Err(Error::Graph(
                "Dense needs inputs with at least one feature axis".into(),
            ));
        }
        if self.units == 0 {
            return Err(invalid("Dense: units must be at least 1"));
        }
        let mut out = shape.clone();
        *out.last_mut().expect("checked non-empty") = self.units;
        Ok(out)
    }
    fn build(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        ctx: &mut BuildContext,
    ) -> Result<()> {
        let in_features = *input_shapes[0].last().expect("checked by output_shape");
        let kernel = self.kernel_initializer.init(
            &[in_features, self.units],
            ctx.dtype,
            ctx.device,
            ctx.rng,
        )?;
        self.kernel = Some(
            Weight::new(format!("{name}/kernel"), Var::from_tensor(&kernel)?, true)
                .with_regularizer(self.kernel_regularizer.clone())
                .with_constraint(self.kernel_constraint.clone()),
        );
        if self.use_bias {
            let bias = self
                .bias_initializer
                .init(&[self.units], ctx.dtype, ctx.device, ctx.rng)?;
            self.bias = Some(
                Weight::new(format!("{name}/bias"), Var::from_tensor(&bias)?, true)
                    .with_regularizer(self.bias_regularizer.clone())
                    .with_constraint(self.bias_constraint.clone()),
            );
        }
        Ok(())
    }
    fn weights(&self) -> Vec<Weight> {
        self.kernel
            .iter()
            .chain(self.bias.iter())
            .cloned()
            .collect()
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        self.forward(inputs, self.activation)
    }
    fn final_activation(&self) -> Option<Activation> {
        Some(self.activation)
    }
    fn call_before_activation(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        self.forward(inputs, Activation::Linear)
    }
    fn activity_regularizer(&self) -> Option<&SharedRegularizer> {
        self.activity_regularizer.as_ref()
    }
}

impl Dense {
    /// `activation(x · kernel + bias)`: the layer's call, or its logits with `Linear`.
    fn forward(&self, inputs: &[Tensor], activation: Activation) -> Result<Tensor> {
        let kernel = self
            .kernel
            .as_ref()
            .ok_or_else(|| Error::State("Dense used before it was built".into()))?;
        let bias = self.bias.as_ref().map(|b| b.var.as_tensor());
        let x = &inputs[0];
        let in_features = kernel.var.dims()[0];
        if x.dims().last() != Some(&in_features) {
            return Err(Error::Data(format!(
                "layer `{}` expects inputs with {in_features} features on the last axis, got shape {:?}",
                kernel.name.trim_end_matches("/kernel"),
                x.dims()
            )));
        }
        dense_forward(x, kernel.var.as_tensor(), bias, activation)
    }
}
