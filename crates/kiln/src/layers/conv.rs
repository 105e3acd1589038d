//! Convolutions over steps (Conv1D) and images (Conv2D), channels last as in Keras.
//!
//! Keras' kernel layout is kept (`[k, in, out]` and `[kh, kw, in, out]`) so weights move between
//! the two as they are; candle's convolutions are channels-first, so the layer transposes around
//! them. `same` padding follows TensorFlow: the output has `ceil(n / stride)` positions and the
//! odd padding element goes to the end.

use super::util::{
    built, check_positive, input_of_rank, make_weight, pad_axis, strided, window_axis, Padding,
};
use super::{BuildContext, CallContext, Layer, Weight};
use crate::activations::Activation;
use crate::error::{invalid, Error, Result};
use crate::initializers::Initializer;
use crate::regularizers::{IntoRegularizer, SharedRegularizer};
use candle_core::Tensor;

/// The configuration and weights shared by Conv1D and Conv2D; spatial sizes are given per axis.
struct Conv {
    filters: usize,
    kernel_size: Vec<usize>,
    strides: Vec<usize>,
    dilation: Vec<usize>,
    /// Keras' `groups`: the channels and filters split into this many groups, each filter
    /// seeing only its group's channels.
    groups: usize,
    padding: Padding,
    activation: Activation,
    use_bias: bool,
    kernel_initializer: Initializer,
    bias_initializer: Initializer,
    kernel_regularizer: Option<SharedRegularizer>,
    bias_regularizer: Option<SharedRegularizer>,
    activity_regularizer: Option<SharedRegularizer>,
    kernel_constraint: Option<crate::constraints::Constraint>,
    bias_constraint: Option<crate::constraints::Constraint>,
    name: Option<String>,
    kernel: Option<Weight>,
    bias: Option<Weight>,
}

impl Conv {
    fn new(filters: usize, kernel_size: Vec<usize>) -> Self {
        let rank = kernel_size.len();
        Self {
            filters,
            kernel_size,
            strides: vec![1; rank],
            dilation: vec![1; rank],
            groups: 1,
            padding: Padding::Valid,
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

    /// Keras' class and config of the same convolution.
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        use crate::regularizers::keras_object;
        Some((
            self.layer(),
            serde_json::json!({
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": "channels_last",
                "dilation_rate": self.dilation,
                "groups": self.groups,
                "activation": self.activation.as_str(),
                "use_bias": self.use_bias,
                "kernel_regularizer": keras_object(&self.kernel_regularizer)?,
                "bias_regularizer": keras_object(&self.bias_regularizer)?,
                "activity_regularizer": keras_object(&self.activity_regularizer)?,
                "kernel_constraint": self.kernel_constraint.as_ref().map(|c| c.keras_config()),
                "bias_constraint": self.bias_constraint.as_ref().map(|c| c.keras_config()),
            }),
        ))
    }

    fn layer(&self) -> &'static str {
        if self.kernel_size.len() == 1 {
            "Conv1D"
        } else {
            "Conv2D"
        }
    }

    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let layer = self.layer();
        let rank = self.kernel_size.len();
        let layout = if rank == 1 {
            "[steps, channels]"
        } else {
            "[height, width, channels]"
        };
        let shape = input_of_rank(layer, input_shapes, rank + 1, layout)?;
        if self.filters == 0 {
            return Err(invalid(format!("{layer}: filters must be at least 1")));
        }
        let channels = shape[rank];
        if self.groups == 0
            || !channels.is_multiple_of(self.groups)
            || !self.filters.is_multiple_of(self.groups)
        {
            return Err(invalid(format!(
                "{layer}: groups = {} must divide both the input channels ({channels}) and the \
                 filters ({}), as in Keras",
                self.groups, self.filters
            )));
        }
        check_positive(layer, "kernel_size", &self.kernel_size)?;
        check_positive(layer, "strides", &self.strides)?;
        check_positive(layer, "dilation_rate", &self.dilation)?;
        if self.strides.iter().any(|&s| s > 1) && self.dilation.iter().any(|&d| d > 1) {
            return Err(invalid(format!(
                "{layer}: strides > 1 cannot be combined with dilation_rate > 1 (as in Keras)"
            )));
        }
        if self.padding == Padding::Causal && rank != 1 {
            return Err(invalid("causal padding is only for Conv1D"));
        }
        let mut out = Vec::with_capacity(rank + 1);
        for (i, &n) in shape[..rank].iter().enumerate() {
            let axis = window_axis(
                n,
                self.kernel_size[i],
                self.strides[i],
                self.dilation[i],
                self.padding,
            )
            .ok_or_else(|| {
                Error::Graph(format!(
                    "{layer}: a kernel of {:?} with dilation {:?} does not fit an input of \
                     {shape:?} with `valid` padding",
                    self.kernel_size, self.dilation
                ))
            })?;
            out.push(axis.out);
        }
        out.push(self.filters);
        Ok(out)
    }

    fn build(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        ctx: &mut BuildContext,
    ) -> Result<()> {
        let channels = *input_shapes[0].last().expect("checked by output_shape") / self.groups;
        let mut shape = self.kernel_size.clone();
        shape.extend([channels, self.filters]);
        self.kernel = Some(
            make_weight(
                name,
                "kernel",
                &shape,
                self.kernel_initializer,
                true,
                self.kernel_regularizer.clone(),
                ctx,
            )?
            .with_constraint(self.kernel_constraint.clone()),
        );
        if self.use_bias {
            self.bias = Some(
                make_weight(
                    name,
                    "bias",
                    &[self.filters],
                    self.bias_initializer,
                    true,
                    self.bias_regularizer.clone(),
                    ctx,
                )?
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

    /// The layer's output, with the ReLU of a following layer applied inside the op when
    /// `then_relu` asks for it (see [`CallContext`]); the flag returned says whether it was.
    fn call(&self, x: &Tensor, then_relu: bool) -> Result<(Tensor, bool)> {
        let layer = self.layer();
        let kernel = built(&self.kernel, layer)?;
        let per_group = kernel.var.dims()[kernel.var.rank() - 2];
        let channels = per_group * self.groups;
        let rank = self.kernel_size.len();
        if x.rank() != rank + 2 || x.dims()[rank + 1] != channels {
            return Err(Error::Data(format!(
                "layer `{}` expects inputs of rank {} with {channels} channels last, got shape {:?}",
                kernel.name.trim_end_matches("/kernel"),
                rank + 2,
                x.dims()
            )));
        }
        let k = kernel.var.as_tensor();
        let bias = self.bias.as_ref().map(|b| b.var.as_tensor());
        if self.groups == 1 {
            return self.convolve(x, k, bias, self.activation, then_relu);
        }
        // Each group: its channels, its filters (the kernel's last axis, in order), its bias.
        // An activation over the channels (softmax) runs over all filters once the groups are
        // joined, as in Keras; an elementwise one runs in each group's op.
        let across = matches!(
            self.activation,
            Activation::Softmax | Activation::LogSoftmax
        );
        let inside = if across {
            Activation::Linear
        } else {
            self.activation
        };
        let out = self.filters / self.groups;
        let last = x.rank() - 1;
        let mut parts = Vec::with_capacity(self.groups);
        for g in 0..self.groups {
            let xg = x.narrow(last, g * per_group, per_group)?.contiguous()?;
            let kg = k.narrow(k.rank() - 1, g * out, out)?.contiguous()?;
            let bg = bias.map(|b| b.narrow(0, g * out, out)).transpose()?;
            parts.push(self.convolve(&xg, &kg, bg.as_ref(), inside, false)?.0);
        }
        let y = Tensor::cat(&parts, last)?;
        Ok((
            if across {
                self.activation.apply(&y)?
            } else {
                y
            },
            false,
        ))
    }

    /// One convolution of `x` with the Keras-layout kernel `kernel` (one group's), then
    /// `activation`, with a following layer's ReLU inside the op when `then_relu` and the
    /// activation is linear.
    fn convolve(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: Option<&Tensor>,
        activation: Activation,
        then_relu: bool,
    ) -> Result<(Tensor, bool)> {
        let layer = self.layer();
        let rank = self.kernel_size.len();
        // A 1-D convolution is a 2-D one over a height of 1.
        let (x, k, ks, st, dl) = if rank == 1 {
            let (s, d) = (self.strides[0], self.dilation[0]);
            (
                x.unsqueeze(1)?,
                kernel.unsqueeze(0)?,
                [1, self.kernel_size[0]],
                [s, s],
                [d, d],
            )
        } else {
            (
                x.clone(),
                kernel.clone(),
                [self.kernel_size[0], self.kernel_size[1]],
                [self.strides[0], self.strides[1]],
                [self.dilation[0], self.dilation[1]],
            )
        };
        let paddings = [
            if rank == 1 {
                Padding::Valid
            } else {
                self.padding
            },
            self.padding,
        ];
        let mut x = x;
        let mut outs = [0usize; 2];
        for a in 0..2 {
            let n = x.dims()[1 + a];
            let axis = window_axis(n, ks[a], st[a], dl[a], paddings[a]).ok_or_else(|| {
                Error::Data(format!(
                    "{layer}: input {:?} is too short for the kernel",
                    x.dims()
                ))
            })?;
            x = pad_axis(&x, 1 + a, axis.before, axis.after, 0.0)?;
            outs[a] = axis.out;
        }
        #[cfg(test)]
        let fused = !tests::PLAIN.with(|p| p.get());
        #[cfg(not(test))]
        let fused = true;
        // ReLU and a linear activation run inside the op, others after it; a linear layer
        // followed by a ReLU layer may run that ReLU inside too.
        let fold = then_relu && activation == Activation::Linear;
        let relu = match activation {
            Activation::Relu => Some(true),
            Activation::Linear => Some(fold),
            _ => None,
        };
        let op = super::conv_kernel::Conv2dOp {
            kernel: ks,
            strides: st,
            dilation: dl,
            relu: relu == Some(true),
        };
        let direct = if fused {
            super::conv_kernel::conv2d(&x, &k, bias, op)?
        } else {
            None
        };
        let (y, folded) = match direct {
            Some(y) if relu.is_some() => (y, fold),
            Some(y) => (activation.apply(&y)?, false),
            None => {
                // The op skips the trailing positions no window reaches by itself; candle's
                // strided backward passes line up only without them.
                let mut x = x;
                for a in 0..2 {
                    let used = (outs[a] - 1) * st[a] + (ks[a] - 1) * dl[a] + 1;
                    x = x.narrow(1 + a, 0, used)?;
                }
                let mut y = Self::candle_conv(&x, &k, st, dl, outs)?;
                if let Some(b) = bias {
                    y = super::channels::bias_add(&y, b)?;
                }
                (activation.apply(&y)?, false)
            }
        };
        Ok((if rank == 1 { y.squeeze(1)? } else { y }, folded))
    }

    /// candle's channels-first convolution of the padded `x` `[b, h, w, c]` with the Keras
    /// kernel, transposed around it; the output channels last (a view).
    fn candle_conv(
        x: &Tensor,
        k: &Tensor,
        st: [usize; 2],
        dl: [usize; 2],
        outs: [usize; 2],
    ) -> Result<Tensor> {
        // candle dilates both axes alike: rates differing per axis become a kernel with the
        // gaps written out as zeros, run undilated.
        let (k, dl) = if dl[0] == dl[1] {
            (k.clone(), dl[0])
        } else {
            (dilate_kernel(&dilate_kernel(k, 0, dl[0])?, 1, dl[1])?, 1)
        };
        let x = x.permute((0, 3, 1, 2))?.contiguous()?;
        let k = k.permute((3, 2, 0, 1))?.contiguous()?;
        let y = if st[0] == st[1] {
            x.conv2d(&k, 0, st[0], dl, 1)?
        } else {
            let full = x.conv2d(&k, 0, 1, dl, 1)?;
            let rows = strided(&full, 2, 0, st[0], outs[0])?;
            strided(&rows, 3, 0, st[1], outs[1])?
        };
        Ok(y.permute((0, 2, 3, 1))?)
    }
}

/// The kernel `k` (`[h, w, in, out]`) with `d - 1` zero taps between its taps along `axis`.
fn dilate_kernel(k: &Tensor, axis: usize, d: usize) -> Result<Tensor> {
    if d == 1 {
        return Ok(k.clone());
    }
    let n = k.dims()[axis];
    let mut gap_shape = k.dims().to_vec();
    gap_shape[axis] = d - 1;
    let gap = Tensor::zeros(gap_shape, k.dtype(), k.device())?;
    let mut parts = Vec::with_capacity(2 * n - 1);
    for i in 0..n {
        if i > 0 {
            parts.push(gap.clone());
        }
        parts.push(k.narrow(axis, i, 1)?);
    }
    Ok(Tensor::cat(&parts, axis)?)
}

macro_rules! conv_builders {
    ($ty:ident, $shape:expr, $kernel:expr, $dims:expr) => {
        impl $ty {
            /// Splits the input channels and the filters into `groups` groups, each filter
            /// convolving only its group's channels (Keras' `groups`, default 1); both must be
            /// divisible by it. The kernel is `[…, channels / groups, filters]`.
            ///
            /// ```
            /// use kiln::prelude::*;
            #[doc = concat!("let x = Input::new(", stringify!($shape), ");")]
            #[doc = concat!("let y = ", stringify!($ty), "::new(6, ", stringify!($kernel), ").groups(2).with_name(\"c\").apply(&x)?;")]
            /// let model = Model::new(&[x], &[y])?;
            #[doc = concat!("assert_eq!(model.weight(\"c/kernel\")?.var.dims(), &", stringify!($dims), ");")]
            /// # Ok::<(), kiln::Error>(())
            /// ```
            pub fn groups(mut self, groups: usize) -> Self {
                self.conv.groups = groups;
                self
            }
            /// How the borders are treated (default `Valid`).
            pub fn padding(mut self, padding: Padding) -> Self {
                self.conv.padding = padding;
                self
            }
            /// The activation applied to the output.
            pub fn activation(mut self, activation: Activation) -> Self {
                self.conv.activation = activation;
                self
            }
            /// Whether the layer adds a bias (default true).
            pub fn use_bias(mut self, use_bias: bool) -> Self {
                self.conv.use_bias = use_bias;
                self
            }
            /// How the kernel is initialized (default Glorot uniform).
            pub fn kernel_initializer(mut self, init: Initializer) -> Self {
                self.conv.kernel_initializer = init;
                self
            }
            /// How the bias is initialized (default zeros).
            pub fn bias_initializer(mut self, init: Initializer) -> Self {
                self.conv.bias_initializer = init;
                self
            }
            /// A penalty on the kernel, added to the total loss.
            pub fn kernel_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
                self.conv.kernel_regularizer = Some(reg.into_regularizer());
                self
            }
            /// A penalty on the bias, added to the total loss.
            pub fn bias_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
                self.conv.bias_regularizer = Some(reg.into_regularizer());
                self
            }
            /// A penalty on the layer's output, added to the total loss.
            pub fn activity_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
                self.conv.activity_regularizer = Some(reg.into_regularizer());
                self
            }
            /// A projection of the kernel (`[kernel size…, in / groups, filters]`, as Keras)
            /// after every update (Keras' `kernel_constraint`).
            pub fn kernel_constraint(mut self, c: crate::constraints::Constraint) -> Self {
                self.conv.kernel_constraint = Some(c);
                self
            }
            /// A projection of the bias after every update (Keras' `bias_constraint`).
            pub fn bias_constraint(mut self, c: crate::constraints::Constraint) -> Self {
                self.conv.bias_constraint = Some(c);
                self
            }
            /// The layer's name.
            pub fn with_name(mut self, name: impl Into<String>) -> Self {
                self.conv.name = Some(name.into());
                self
            }
            /// The old spelling of `with_name`.
            #[deprecated(since = "0.1.0", note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)")]
            pub fn name(self, name: impl Into<String>) -> Self {
                self.with_name(name)
            }
        }

        impl Layer for $ty {
            fn samples_independent(&self) -> bool {
                true
            }
            fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
                self.conv.keras_config()
            }
            fn kind(&self) -> &'static str {
                if self.conv.kernel_size.len() == 1 {
                    "conv1d"
                } else {
                    "conv2d"
                }
            }
            fn given_name(&self) -> Option<&str> {
                self.conv.name.as_deref()
            }
            fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
                self.conv.output_shape(input_shapes)
            }
            fn build(
                &mut self,
                name: &str,
                input_shapes: &[Vec<usize>],
                ctx: &mut BuildContext,
            ) -> Result<()> {
                self.conv.build(name, input_shapes, ctx)
            }
            fn weights(&self) -> Vec<Weight> {
                self.conv.weights()
            }
            fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor> {
                let (y, relu_applied) = self.conv.call(&inputs[0], ctx.relu_follows)?;
                ctx.relu_applied = relu_applied;
                Ok(y)
            }
            fn compute_mask(
                &self,
                _inputs: &[Tensor],
                _masks: &[Option<Tensor>],
            ) -> Result<Option<Tensor>> {
                // Keras' convolutions do not support masking: the mask stops here.
                Ok(None)
            }
            fn activity_regularizer(&self) -> Option<&SharedRegularizer> {
                self.conv.activity_regularizer.as_ref()
            }
        }
    };
}

/// A 1-D convolution over `[steps, channels]` samples with kernel `[kernel_size, channels,
/// filters]`: strides, dilation, and `valid`, `same` or `causal` padding.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([10, 3]);
/// let y = Conv1D::new(4, 3).strides(2).padding(Padding::Same).with_name("conv").apply(&x)?;
/// assert_eq!(y.shape(), &[5, 4]);
/// let model = Model::new(&[x], &[y])?;
/// assert_eq!(model.weight("conv/kernel")?.var.dims(), &[3, 3, 4]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Conv1D {
    conv: Conv,
}

impl Conv1D {
    /// `filters` output channels, a window of `kernel_size` steps, stride 1, `valid` padding.
    pub fn new(filters: usize, kernel_size: usize) -> Self {
        Self {
            conv: Conv::new(filters, vec![kernel_size]),
        }
    }
    /// The step between windows (default 1).
    pub fn strides(mut self, strides: usize) -> Self {
        self.conv.strides = vec![strides];
        self
    }
    /// The gap between the kernel's taps (default 1).
    pub fn dilation_rate(mut self, dilation: usize) -> Self {
        self.conv.dilation = vec![dilation];
        self
    }
}
conv_builders!(Conv1D, [5, 4], 3, [3, 2, 6]);

/// A 2-D convolution over `[height, width, channels]` samples with kernel `[kh, kw, channels,
/// filters]`: strides per axis, dilation, `valid` or `same` padding.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([8, 8, 1]);
/// let y = Conv2D::new(6, (3, 3)).strides((2, 1)).padding(Padding::Same).apply(&x)?;
/// assert_eq!(y.shape(), &[4, 8, 6]);
/// let z = Conv2D::new(2, (3, 3)).dilation_rate(2).apply(&x)?;
/// assert_eq!(z.shape(), &[4, 4, 2]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Conv2D {
    conv: Conv,
}

/// A size given once for both axes or as `(height, width)`.
///
/// ```
/// use kiln::layers::Size2;
/// assert_eq!(3usize.pair(), (3, 3));
/// assert_eq!((2usize, 5usize).pair(), (2, 5));
/// ```
pub trait Size2 {
    /// `(height, width)`.
    fn pair(self) -> (usize, usize);
}

impl Size2 for usize {
    fn pair(self) -> (usize, usize) {
        (self, self)
    }
}

impl Size2 for (usize, usize) {
    fn pair(self) -> (usize, usize) {
        self
    }
}

impl Conv2D {
    /// `filters` output channels, a `kernel_size` window, stride 1, `valid` padding.
    pub fn new(filters: usize, kernel_size: impl Size2) -> Self {
        let (h, w) = kernel_size.pair();
        Self {
            conv: Conv::new(filters, vec![h, w]),
        }
    }
    /// The step between windows, per axis or for both (default 1).
    pub fn strides(mut self, strides: impl Size2) -> Self {
        let (h, w) = strides.pair();
        self.conv.strides = vec![h, w];
        self
    }
    /// The gap between the kernel's taps, per axis or for both (default 1), as Keras'
    /// `dilation_rate=(2, 1)`.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([8, 8, 1]);
    /// let y = Conv2D::new(2, (3, 3)).dilation_rate((2, 1)).apply(&x)?;
    /// assert_eq!(y.shape(), &[4, 6, 2]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn dilation_rate(mut self, dilation: impl Size2) -> Self {
        let (h, w) = dilation.pair();
        self.conv.dilation = vec![h, w];
        self
    }
}
conv_builders!(Conv2D, [5, 5, 4], (3, 3), [3, 3, 2, 6]);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::util::fused_check::{max_diff, random, weighted_sum_grads};
    use crate::layers::{BuildContext, CallContext};
    use candle_core::{DType, Device};
    use rand::SeedableRng;

    thread_local! {
        /// Set to make the layers take candle's convolution.
        pub(super) static PLAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The layer through the direct kernel and through candle's convolution: outputs and the
    /// gradients of Σ out·w for the input, kernel and bias agree.
    fn compare(layer: &mut dyn Layer, input: &[usize], dtype: DType, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut ctx = BuildContext {
            device: &Device::Cpu,
            dtype,
            rng: &mut rng,
        };
        layer
            .build("conv", &[input[1..].to_vec()], &mut ctx)
            .unwrap();
        for (i, w) in layer.weights().iter().enumerate() {
            w.var
                .set(random(w.var.dims(), 90 + seed + i as u64, dtype).as_tensor())
                .unwrap();
        }
        let x = random(input, seed, dtype);
        let run = |plain: bool| {
            PLAIN.with(|p| p.set(plain));
            let mut ctx = CallContext::new(true, crate::random::SampleStreams::new(0, 0));
            let out = layer.call(&[x.as_tensor().clone()], &mut ctx).unwrap();
            PLAIN.with(|p| p.set(false));
            out
        };
        let (fused, plain) = (run(false), run(true));
        assert_eq!(fused.dims(), plain.dims(), "{input:?}");
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-11 };
        assert!(max_diff(&fused, &plain) < tol, "{input:?}");
        let w = random(fused.dims(), 7 + seed, dtype);
        let gf = weighted_sum_grads(fused, w.as_tensor());
        let gp = weighted_sum_grads(plain, w.as_tensor());
        let mut vars = vec![x.clone()];
        vars.extend(layer.weights().into_iter().map(|w| w.var));
        for v in &vars {
            let (f, p) = (gf.get(v).unwrap(), gp.get(v).unwrap());
            let d = max_diff(f, p);
            assert!(d < tol * 10.0, "{input:?} {:?}: {d}", v.dims());
        }
    }

    type MakeConv = Box<dyn Fn() -> Conv2D>;

    /// A grouped convolution ending in softmax or log-softmax normalizes over all its filters,
    /// as Keras does (found by a random Keras model: log-softmax per group was off by a
    /// constant per group): its output is the linear grouped convolution's, then the
    /// activation over the last axis.
    #[test]
    fn grouped_softmax_normalizes_over_every_filter() {
        for act in [Activation::Softmax, Activation::LogSoftmax] {
            let run = |activation: Activation| {
                let mut layer = Conv1D::new(6, 2)
                    .groups(2)
                    .padding(Padding::Causal)
                    .dilation_rate(2)
                    .activation(activation);
                let mut rng = rand::rngs::StdRng::seed_from_u64(4);
                let mut ctx = BuildContext {
                    device: &Device::Cpu,
                    dtype: DType::F64,
                    rng: &mut rng,
                };
                layer.build("conv", &[vec![3, 4]], &mut ctx).unwrap();
                for (i, w) in layer.weights().iter().enumerate() {
                    w.var
                        .set(random(w.var.dims(), 11 + i as u64, DType::F64).as_tensor())
                        .unwrap();
                }
                let x = random(&[2, 3, 4], 5, DType::F64);
                let mut ctx = CallContext::new(false, crate::random::SampleStreams::new(0, 0));
                layer.call(&[x.as_tensor().clone()], &mut ctx).unwrap()
            };
            let want = act.apply(&run(Activation::Linear)).unwrap();
            assert!(max_diff(&run(act), &want) < 1e-12, "{act:?}");
        }
        let sums = Activation::Softmax
            .apply(&Tensor::new(&[[1f64, 2., 3., 4.]], &Device::Cpu).unwrap())
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!((sums[0] - 1.0).abs() < 1e-12);
    }

    /// The direct convolution equals candle's on odd shapes: batch 1, one channel, sizes not
    /// multiples of 16, strides, dilation, `same` and `valid` padding, Conv1D too, and a batch
    /// large enough to split across threads.
    #[test]
    fn direct_convolution_matches_candle() {
        for dtype in [DType::F64, DType::F32] {
            let cases: Vec<(MakeConv, [usize; 4])> = vec![
                (Box::new(|| Conv2D::new(1, (1, 1))), [1, 1, 1, 1]),
                (Box::new(|| Conv2D::new(3, (3, 3))), [1, 7, 9, 1]),
                (Box::new(|| Conv2D::new(17, (3, 2))), [2, 9, 7, 5]),
                (
                    Box::new(|| Conv2D::new(5, (3, 3)).padding(Padding::Same)),
                    [3, 8, 11, 2],
                ),
                (
                    Box::new(|| {
                        Conv2D::new(4, (3, 3))
                            .strides((2, 1))
                            .padding(Padding::Same)
                    }),
                    [2, 9, 10, 3],
                ),
                (
                    Box::new(|| Conv2D::new(6, (2, 3)).strides(2)),
                    [2, 11, 13, 3],
                ),
                (
                    Box::new(|| Conv2D::new(2, (3, 3)).dilation_rate(2)),
                    [2, 9, 9, 3],
                ),
                (
                    Box::new(|| Conv2D::new(2, (3, 2)).dilation_rate((2, 1))),
                    [2, 9, 7, 3],
                ),
                (
                    Box::new(|| {
                        Conv2D::new(3, (2, 3))
                            .dilation_rate((1, 3))
                            .padding(Padding::Same)
                    }),
                    [1, 6, 10, 2],
                ),
                (
                    Box::new(|| {
                        Conv2D::new(33, (5, 5))
                            .padding(Padding::Same)
                            .use_bias(false)
                    }),
                    [2, 6, 6, 19],
                ),
                // A small window (27 elements, computed straight from the input in f32 on
                // AVX-512) over enough rows for two tiles, with 40 filters (a short register).
                (Box::new(|| Conv2D::new(40, (3, 3))), [9, 30, 31, 3]),
                // Above the threading threshold (32,768 elements): samples on several threads.
                (
                    Box::new(|| Conv2D::new(8, (3, 3)).strides((2, 1))),
                    [9, 30, 31, 16],
                ),
            ];
            for (i, (make, input)) in cases.iter().enumerate() {
                compare(&mut make(), input, dtype, i as u64);
                let relu = make().activation(crate::Activation::Relu);
                compare(&mut { relu }, input, dtype, 100 + i as u64);
            }
            let conv1d: Vec<(Conv1D, [usize; 3])> = vec![
                (Conv1D::new(3, 3), [2, 10, 4]),
                (
                    Conv1D::new(2, 3).strides(2).padding(Padding::Same),
                    [1, 9, 1],
                ),
                (
                    Conv1D::new(4, 2).padding(Padding::Causal).dilation_rate(2),
                    [3, 8, 2],
                ),
            ];
            for (i, (mut layer, input)) in conv1d.into_iter().enumerate() {
                compare(&mut layer, &input, dtype, 200 + i as u64);
            }
        }
    }
}
