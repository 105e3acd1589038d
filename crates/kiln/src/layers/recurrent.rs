//! Recurrent layers: LSTM and GRU, with Keras 3's gate order, defaults and masking.
//!
//! Both read sequences `[batch, steps, features]`. Where a step is masked (the mask from
//! `Embedding(mask_zero)` or `Masking`), the state carries over unchanged and the step's output is
//! the previous output, exactly as Keras 3 does (`zero_output_for_mask=False`). With
//! `return_sequences(true)` the output keeps the time axis and the mask flows on; otherwise the
//! output is the last state and the mask stops here. With `return_state(true)` the layer returns
//! its final states after its output (`[output, h, c]` for LSTM, `[output, h]` for GRU, as
//! Keras 3), and the inputs after the sequence are its initial states (Keras' `initial_state`).

use super::dense::dense_forward;
use super::recurrent_kernel::{GruOp, LstmOp, Projection, Sequence};
use super::util::{built, input_of_rank, make_weight};
use super::{BuildContext, CallContext, Layer, Weight};
use crate::activations::Activation;
use crate::error::{invalid, Error, Result};
use crate::initializers::Initializer;
use crate::regularizers::{IntoRegularizer, SharedRegularizer};
use candle_core::{Tensor, Var};

/// What LSTM and GRU share: sizes, activations, initializers, regularizers, weights.
struct Recurrent {
    units: usize,
    activation: Activation,
    recurrent_activation: Activation,
    use_bias: bool,
    kernel_initializer: Initializer,
    recurrent_initializer: Initializer,
    bias_initializer: Initializer,
    kernel_regularizer: Option<SharedRegularizer>,
    recurrent_regularizer: Option<SharedRegularizer>,
    bias_regularizer: Option<SharedRegularizer>,
    activity_regularizer: Option<SharedRegularizer>,
    kernel_constraint: Option<crate::constraints::Constraint>,
    recurrent_constraint: Option<crate::constraints::Constraint>,
    bias_constraint: Option<crate::constraints::Constraint>,
    return_sequences: bool,
    /// Keras' `return_state`: the final states are outputs too, after the output.
    return_state: bool,
    go_backwards: bool,
    /// Keras' `dropout`: the fraction of input features dropped in training.
    dropout: f64,
    /// Keras' `recurrent_dropout`: the fraction of the state's units dropped in training.
    recurrent_dropout: f64,
    name: Option<String>,
    kernel: Option<Weight>,
    recurrent_kernel: Option<Weight>,
    bias: Option<Weight>,
}

impl Recurrent {
    fn new(units: usize) -> Self {
        Self {
            units,
            activation: Activation::Tanh,
            recurrent_activation: Activation::Sigmoid,
            use_bias: true,
            kernel_initializer: Initializer::GlorotUniform,
            recurrent_initializer: Initializer::Orthogonal { gain: 1.0 },
            bias_initializer: Initializer::Zeros,
            kernel_regularizer: None,
            recurrent_regularizer: None,
            bias_regularizer: None,
            activity_regularizer: None,
            kernel_constraint: None,
            recurrent_constraint: None,
            bias_constraint: None,
            return_sequences: false,
            return_state: false,
            go_backwards: false,
            dropout: 0.0,
            recurrent_dropout: 0.0,
            name: None,
            kernel: None,
            recurrent_kernel: None,
            bias: None,
        }
    }

    /// In training, the input with `dropout` applied as Keras applies it: one mask per sequence
    /// and feature, the same at every step (kept features scaled by `1 / (1 - dropout)`).
    fn input_dropout(&self, x: &Tensor, ctx: &mut CallContext) -> Result<Tensor> {
        if !ctx.training || self.dropout == 0.0 || x.rank() != 3 {
            return Ok(x.clone());
        }
        let (batch, _, features) = x.dims3()?;
        let mask = dropout_mask(INPUT_DRAW, self.dropout, (batch, 1, features), x, ctx)?;
        Ok(x.broadcast_mul(&mask)?)
    }

    /// In training with `recurrent_dropout`, the masks Keras draws then (its
    /// `implementation = 1`): for each of the `gates`, one mask per sequence on the input
    /// features (with `dropout`; `[batch, 1, features]`) and one on the state's units
    /// (`[batch, units]`), the same at every step. `None` otherwise: no recurrent dropout, and
    /// the input dropout of [`Recurrent::input_dropout`], one mask for all gates.
    fn gate_dropout(
        &self,
        x: &Tensor,
        gates: usize,
        ctx: &mut CallContext,
    ) -> Result<Option<GateDropout>> {
        if !ctx.training || self.recurrent_dropout == 0.0 || x.rank() != 3 {
            return Ok(None);
        }
        let (batch, _, features) = x.dims3()?;
        let input = match self.dropout {
            0.0 => None,
            rate => Some(
                (0..gates)
                    .map(|g| {
                        dropout_mask(INPUT_DRAW + g as u32, rate, (batch, 1, features), x, ctx)
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        let state = (0..gates)
            .map(|g| {
                let draw = STATE_DRAW + g as u32;
                dropout_mask(draw, self.recurrent_dropout, (batch, self.units), x, ctx)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(GateDropout { input, state }))
    }

    /// The input projected by the kernel (and bias), each gate's block from the input under
    /// that gate's dropout mask when there are per-gate masks.
    fn project(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: Option<&Tensor>,
        drop: Option<&GateDropout>,
    ) -> Result<Tensor> {
        let Some(masks) = drop.and_then(|d| d.input.as_ref()) else {
            return dense_forward(x, kernel, bias, Activation::Linear);
        };
        let u = self.units;
        let blocks = masks
            .iter()
            .enumerate()
            .map(|(g, m)| {
                let b = bias.map(|b| b.narrow(0, g * u, u)).transpose()?;
                dense_forward(
                    &x.broadcast_mul(m)?,
                    &kernel.narrow(1, g * u, u)?,
                    b.as_ref(),
                    Activation::Linear,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&blocks, 2)?)
    }

    /// The shapes of the outputs (the output, then with `return_state` one `[units]` per
    /// state), checking the sequence and the initial states that may follow it. `states`
    /// names the layer's states in order (`h`, `c`).
    fn output_shapes(
        &self,
        layer: &str,
        input_shapes: &[Vec<usize>],
        states: &[&str],
    ) -> Result<Vec<Vec<usize>>> {
        let (sequence, initial) = match input_shapes.split_first() {
            Some(split) => split,
            None => {
                return Err(Error::Graph(format!(
                    "{layer} takes a sequence, got no input"
                )))
            }
        };
        let output = self.output_shape(layer, std::slice::from_ref(sequence))?;
        let u = self.units;
        if !initial.is_empty() && initial.len() != states.len() {
            return Err(Error::Graph(format!(
                "{layer} takes a sequence and, as its initial state (Keras' initial_state), {} \
                 tensor(s) [{}] of shape [{u}] (its units); got {} tensor(s) after the sequence",
                states.len(),
                states.join(", "),
                initial.len()
            )));
        }
        for (shape, name) in initial.iter().zip(states) {
            if shape.as_slice() != [u] {
                return Err(Error::Graph(format!(
                    "{layer}: the initial state `{name}` has samples of shape {shape:?}, but the \
                     layer's states have shape [{u}] (its units)"
                )));
            }
        }
        let mut shapes = vec![output];
        if self.return_state {
            shapes.extend(states.iter().map(|_| vec![u]));
        }
        Ok(shapes)
    }

    /// The layer's outputs as [`Layer::call_outputs`] returns them: `[output]`, or with
    /// `return_state` `[output, states…]`, from the run's output and final states.
    fn outputs(&self, output: Tensor, states: Vec<Tensor>) -> Vec<Tensor> {
        let mut all = vec![output];
        if self.return_state {
            all.extend(states);
        }
        all
    }

    /// The output masks: the sequence's mask on the output with `return_sequences`, and none
    /// on the states, as Keras' `RNN.compute_mask`.
    fn output_masks(&self, masks: &[Option<Tensor>], states: usize) -> Vec<Option<Tensor>> {
        let output = match self.return_sequences {
            true => masks.first().cloned().flatten(),
            false => None,
        };
        let states = if self.return_state { states } else { 0 };
        std::iter::once(output)
            .chain(std::iter::repeat_n(None, states))
            .collect()
    }

    /// The initial states: zeros, or the ones given (checked against the batch and units).
    fn initial_states(
        &self,
        layer: &str,
        x: &Tensor,
        given: &[Tensor],
        count: usize,
    ) -> Result<Vec<Tensor>> {
        let batch = x.dim(0)?;
        let u = self.units;
        if given.is_empty() {
            let zeros = Tensor::zeros((batch, u), x.dtype(), x.device())?;
            return Ok(vec![zeros; count]);
        }
        if given.len() != count {
            return Err(Error::Data(format!(
                "layer `{layer}` takes {count} initial state(s), got {}",
                given.len()
            )));
        }
        given
            .iter()
            .enumerate()
            .map(|(i, h)| {
                if h.dims() != [batch, u] {
                    return Err(Error::Data(format!(
                        "layer `{layer}`: initial state {i} has shape {:?}, but the batch has \
                         {batch} sequences and the layer {u} units: give [{batch}, {u}]",
                        h.dims()
                    )));
                }
                Ok(h.to_dtype(x.dtype())?)
            })
            .collect()
    }

    /// The layer's name in messages: its weights' name, once built.
    fn shown(&self, class: &str) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.kernel.as_ref().map_or(class.to_string(), |k| {
                k.name.trim_end_matches("/kernel").to_string()
            })
        })
    }

    fn output_shape(&self, layer: &str, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        for (what, rate) in [
            ("dropout", self.dropout),
            ("recurrent_dropout", self.recurrent_dropout),
        ] {
            if !(0.0..1.0).contains(&rate) {
                return Err(invalid(format!(
                    "{layer}: {what} must be in [0, 1), got {rate}"
                )));
            }
        }
        let shape = input_of_rank(layer, input_shapes, 2, "[steps, features]")?;
        if self.units == 0 {
            return Err(invalid(format!("{layer}: units must be at least 1")));
        }
        Ok(if self.return_sequences {
            vec![shape[0], self.units]
        } else {
            vec![self.units]
        })
    }

    /// Creates kernel `[features, gates·units]`, recurrent kernel `[units, gates·units]`; the bias
    /// is left to the layer.
    fn build_kernels(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        gates: usize,
        ctx: &mut BuildContext,
    ) -> Result<()> {
        let features = input_shapes[0][1];
        let width = gates.checked_mul(self.units).ok_or_else(|| {
            invalid(format!(
                "layer `{name}`: a kernel {gates} × {} units wide has more elements than can be \
                 counted, so more bytes than any machine has: use fewer units",
                self.units
            ))
        })?;
        self.kernel = Some(
            make_weight(
                name,
                "kernel",
                &[features, width],
                self.kernel_initializer,
                true,
                self.kernel_regularizer.clone(),
                ctx,
            )?
            .with_constraint(self.kernel_constraint.clone()),
        );
        self.recurrent_kernel = Some(
            make_weight(
                name,
                "recurrent_kernel",
                &[self.units, width],
                self.recurrent_initializer,
                true,
                self.recurrent_regularizer.clone(),
                ctx,
            )?
            .with_constraint(self.recurrent_constraint.clone()),
        );
        Ok(())
    }

    /// The config Keras' LSTM and GRU share, for the options kiln has.
    fn keras_config(&self) -> Option<serde_json::Value> {
        use crate::regularizers::keras_object;
        Some(serde_json::json!({
            "units": self.units,
            "activation": self.activation.as_str(),
            "recurrent_activation": self.recurrent_activation.as_str(),
            "use_bias": self.use_bias,
            "kernel_regularizer": keras_object(&self.kernel_regularizer)?,
            "recurrent_regularizer": keras_object(&self.recurrent_regularizer)?,
            "bias_regularizer": keras_object(&self.bias_regularizer)?,
            "activity_regularizer": keras_object(&self.activity_regularizer)?,
            "kernel_constraint": self.kernel_constraint.as_ref().map(|c| c.keras_config()),
            "recurrent_constraint": self.recurrent_constraint.as_ref().map(|c| c.keras_config()),
            "bias_constraint": self.bias_constraint.as_ref().map(|c| c.keras_config()),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
            "go_backwards": self.go_backwards,
            "stateful": false,
            "unroll": false,
        }))
    }

    fn bias_weight(&self, name: &str, value: Tensor) -> Result<Weight> {
        Ok(
            Weight::new(format!("{name}/bias"), Var::from_tensor(&value)?, true)
                .with_regularizer(self.bias_regularizer.clone())
                .with_constraint(self.bias_constraint.clone()),
        )
    }

    fn weights(&self) -> Vec<Weight> {
        self.kernel
            .iter()
            .chain(self.recurrent_kernel.iter())
            .chain(self.bias.iter())
            .cloned()
            .collect()
    }

    /// The input and its mask in the order the layer reads them: reversed in time with
    /// `go_backwards`, as Keras does (the outputs then come in that reversed order too).
    fn oriented(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        if !self.go_backwards || x.rank() != 3 {
            return Ok((x.clone(), mask.cloned()));
        }
        let steps = x.dims()[1];
        let back: Vec<u32> = (0..steps as u32).rev().collect();
        let back = Tensor::new(back.as_slice(), x.device())?;
        let flip = |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&back, 1)?) };
        Ok((flip(x)?, mask.map(flip).transpose()?))
    }

    /// Checks the input and the mask, and returns `(batch, steps, per-step 0/1 masks)`.
    fn prepare(
        &self,
        layer: &str,
        x: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(usize, usize, Option<Vec<Tensor>>)> {
        let kernel = built(&self.kernel, layer)?;
        let (batch, steps, features) = x.dims3()?;
        if features != kernel.var.dims()[0] {
            return Err(Error::Data(format!(
                "layer `{}` expects {} features per step, got shape {:?}",
                kernel.name.trim_end_matches("/kernel"),
                kernel.var.dims()[0],
                x.dims()
            )));
        }
        let masks = match mask {
            None => None,
            Some(m) => {
                if m.dims() != [batch, steps] {
                    return Err(Error::Data(format!(
                        "layer `{}`: the mask has shape {:?} but the input has {batch} sequences \
                         of {steps} steps",
                        kernel.name.trim_end_matches("/kernel"),
                        m.dims()
                    )));
                }
                let m = m.ne(0.0)?;
                let per_step = (0..steps)
                    .map(|t| {
                        Ok(m.narrow(1, t, 1)?
                            .broadcast_as((batch, self.units))?
                            .contiguous()?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(per_step)
            }
        };
        Ok((batch, steps, masks))
    }

    /// The fused op's description of the run on the input `x`, when the fused CPU ops apply:
    /// Keras' default activations, a CPU float input, at least one step.
    fn fused(
        &self,
        x: &Tensor,
        params: &[&Tensor],
        mask: Option<&Tensor>,
    ) -> Result<Option<Sequence>> {
        let (batch, steps, _) = x.dims3()?;
        #[cfg(test)]
        if tests::PLAIN.with(|p| p.get()) {
            return Ok(None);
        }
        let defaults =
            self.activation == Activation::Tanh && self.recurrent_activation == Activation::Sigmoid;
        if !defaults || steps == 0 || !super::recurrent_kernel::applies(x, params) {
            return Ok(None);
        }
        let mask = match mask {
            None => None,
            Some(m) => {
                let counts = m.ne(0.0)?.flatten_all()?.to_vec1::<u8>()?;
                Some(std::sync::Arc::new(
                    counts.into_iter().map(|c| c != 0).collect(),
                ))
            }
        };
        Ok(Some(Sequence {
            batch,
            steps,
            units: self.units,
            mask,
            return_sequences: self.return_sequences,
            final_cell: false,
        }))
    }

    /// Runs `step` over the sequence, carrying the states where a step is masked, and returns
    /// the sequence of outputs or the last one, with the final states.
    fn scan(
        &self,
        x_proj: &Tensor,
        masks: Option<&[Tensor]>,
        mut states: Vec<Tensor>,
        step: impl Fn(&Tensor, &[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let steps = x_proj.dims()[1];
        let mut outputs = Vec::with_capacity(if self.return_sequences { steps } else { 0 });
        for t in 0..steps {
            let x_t = x_proj.narrow(1, t, 1)?.squeeze(1)?;
            let mut next = step(&x_t, &states)?;
            if let Some(masks) = masks {
                for (new, old) in next.iter_mut().zip(&states) {
                    *new = masks[t].where_cond(new, old)?;
                }
            }
            states = next;
            if self.return_sequences {
                outputs.push(states[0].clone());
            }
        }
        if self.return_sequences {
            Ok((Tensor::stack(&outputs, 1)?, states))
        } else {
            Ok((states[0].clone(), states))
        }
    }
}

/// The per-gate dropout masks of one training call with `recurrent_dropout`
/// ([`Recurrent::gate_dropout`]).
struct GateDropout {
    /// Per gate, the input features' mask `[batch, 1, features]` (with `dropout`).
    input: Option<Vec<Tensor>>,
    /// Per gate, the previous state's mask `[batch, units]`.
    state: Vec<Tensor>,
}

impl GateDropout {
    /// The previous state `h` as gate `g` reads it.
    fn state(&self, h: &Tensor, g: usize) -> Result<Tensor> {
        Ok(h.mul(&self.state[g])?)
    }
    /// `h` under each gate's mask times that gate's block of the recurrent kernel, joined:
    /// what `h · recurrent` is without dropout, for the gates `0..gates`.
    fn recurrent(
        &self,
        h: &Tensor,
        recurrent: &Tensor,
        units: usize,
        gates: usize,
    ) -> Result<Tensor> {
        let blocks = (0..gates)
            .map(|g| {
                Ok(self
                    .state(h, g)?
                    .matmul(&recurrent.narrow(1, g * units, units)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&blocks, 1)?)
    }
}

/// A dropout mask as Keras draws one (`backend.random.dropout` of ones): each entry
/// `1 / (1 - rate)` with probability `1 - rate`, else 0, in `like`'s dtype and device, from each
/// sample's own stream (`crate::random`) under the layer's draw number `draw`. The LSTM and GRU
/// input and recurrent masks are all drawn here.
fn dropout_mask(
    draw: u32,
    rate: f64,
    shape: impl Into<candle_core::Shape>,
    like: &Tensor,
    ctx: &mut CallContext,
) -> Result<Tensor> {
    let shape = shape.into();
    ctx.random()
        .dropout_mask(draw, shape.dims(), rate, like.dtype(), like.device())
}

/// The draw numbers of the masks: the input's (gate `g`'s is `INPUT_DRAW + g` with recurrent
/// dropout), then the state's (`STATE_DRAW + g`), apart for any gate count Keras has.
const INPUT_DRAW: u32 = 0;
const STATE_DRAW: u32 = 16;

macro_rules! recurrent_builders {
    ($ty:ident) => {
        impl $ty {
            /// The fraction of input features dropped in training (Keras' `dropout`, default
            /// 0): one mask per sequence and feature, the same at every step, the kept ones
            /// scaled by `1 / (1 - dropout)`. Inference is unchanged.
            ///
            /// ```
            /// use kiln::prelude::*;
            /// let x = Input::new([6, 2]);
            #[doc = concat!("let y = ", stringify!($ty), "::new(3).dropout(0.25).apply(&x)?;")]
            /// assert_eq!(y.shape(), &[3]);
            /// # Ok::<(), kiln::Error>(())
            /// ```
            pub fn dropout(mut self, dropout: f64) -> Self {
                self.rnn.dropout = dropout;
                self
            }
            /// The fraction of the state's units dropped in training (Keras'
            /// `recurrent_dropout`, default 0), as Keras 3 does: each gate reads the previous
            /// state under its own mask, one per sequence and unit, the same at every step, the
            /// kept units scaled by `1 / (1 - recurrent_dropout)` (and, with `dropout`, each
            /// gate its own input mask too). Inference is unchanged. Training takes the plain
            /// candle graph, not the fused CPU op, when this is set.
            ///
            /// ```
            /// use kiln::prelude::*;
            /// let x = Input::new([6, 2]);
            #[doc = concat!("let y = ", stringify!($ty), "::new(3).recurrent_dropout(0.25).apply(&x)?;")]
            /// assert_eq!(y.shape(), &[3]);
            /// # Ok::<(), kiln::Error>(())
            /// ```
            pub fn recurrent_dropout(mut self, recurrent_dropout: f64) -> Self {
                self.rnn.recurrent_dropout = recurrent_dropout;
                self
            }
            /// The activation of the candidate state and of the output (default tanh).
            pub fn activation(mut self, activation: Activation) -> Self {
                self.rnn.activation = activation;
                self
            }
            /// The activation of the gates (default sigmoid).
            pub fn recurrent_activation(mut self, activation: Activation) -> Self {
                self.rnn.recurrent_activation = activation;
                self
            }
            /// Whether the gates have biases (default true).
            pub fn use_bias(mut self, use_bias: bool) -> Self {
                self.rnn.use_bias = use_bias;
                self
            }
            /// Whether the output is the whole sequence of states (and keeps the mask) or only
            /// the last one (default false).
            pub fn return_sequences(mut self, return_sequences: bool) -> Self {
                self.rnn.return_sequences = return_sequences;
                self
            }
            /// Whether the layer returns its final states after its output (Keras'
            /// `return_state`, default false): `[output, h, c]` for LSTM and `[output, h]` for
            /// GRU, as Keras 3 orders them, with or without `return_sequences`. Apply it with
            /// [`crate::LayerExt::apply_outputs`]; the states carry no mask. Its initial states
            /// are the inputs after the sequence (Keras' `initial_state`), with or without this.
            ///
            /// ```
            /// use kiln::prelude::*;
            /// let x = Input::new([6, 2]);
            #[doc = concat!("let outs = ", stringify!($ty), "::new(3).return_state(true).apply_outputs(&[&x])?;")]
            /// assert!(outs.iter().all(|t| t.shape() == [3]));
            /// let model = Model::new(&[&x], &outs)?;
            /// let seq = Tensor::ones((2, 6, 2), DType::F32, &Device::Cpu)?;
            /// let ys = model.predict(&[seq], 2)?;
            /// // Without return_sequences the output is the last h.
            /// assert_eq!(ys[0].to_vec2::<f32>()?, ys[1].to_vec2::<f32>()?);
            /// # Ok::<(), kiln::Error>(())
            /// ```
            pub fn return_state(mut self, return_state: bool) -> Self {
                self.rnn.return_state = return_state;
                self
            }
            /// Whether the sequence is read from its last step to its first (default false), as
            /// Keras' `go_backwards`: with `return_sequences`, the outputs come in that reversed
            /// order.
            ///
            /// ```
            /// use kiln::prelude::*;
            /// let x = Input::new([3, 1]);
            #[doc = concat!("let back = ", stringify!($ty), "::new(2).go_backwards(true).with_name(\"r\").apply(&x)?;")]
            #[doc = concat!("let ahead = ", stringify!($ty), "::new(2).with_name(\"r\").apply(&x)?;")]
            /// let back = Model::builder(&[x.clone()], &[back]).seed(0).build()?;
            /// let ahead = Model::builder(&[x], &[ahead]).seed(0).build()?;
            /// let seq = Tensor::new(&[[[1f32], [2.], [3.]]], &Device::Cpu)?;
            /// let reversed = Tensor::new(&[[[3f32], [2.], [1.]]], &Device::Cpu)?;
            /// assert_eq!(
            ///     back.predict(&[seq], 1)?[0].to_vec2::<f32>()?,
            ///     ahead.predict(&[reversed], 1)?[0].to_vec2::<f32>()?
            /// );
            /// # Ok::<(), kiln::Error>(())
            /// ```
            pub fn go_backwards(mut self, go_backwards: bool) -> Self {
                self.rnn.go_backwards = go_backwards;
                self
            }
            /// How the input kernel is initialized (default Glorot uniform).
            pub fn kernel_initializer(mut self, init: Initializer) -> Self {
                self.rnn.kernel_initializer = init;
                self
            }
            /// How the recurrent kernel is initialized (default orthogonal).
            pub fn recurrent_initializer(mut self, init: Initializer) -> Self {
                self.rnn.recurrent_initializer = init;
                self
            }
            /// How the bias is initialized (default zeros).
            pub fn bias_initializer(mut self, init: Initializer) -> Self {
                self.rnn.bias_initializer = init;
                self
            }
            /// A penalty on the input kernel, added to the total loss.
            pub fn kernel_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
                self.rnn.kernel_regularizer = Some(reg.into_regularizer());
                self
            }
            /// A penalty on the recurrent kernel, added to the total loss.
            pub fn recurrent_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
                self.rnn.recurrent_regularizer = Some(reg.into_regularizer());
                self
            }
            /// A penalty on the bias, added to the total loss.
            pub fn bias_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
                self.rnn.bias_regularizer = Some(reg.into_regularizer());
                self
            }
            /// A penalty on the layer's output, added to the total loss.
            pub fn activity_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
                self.rnn.activity_regularizer = Some(reg.into_regularizer());
                self
            }
            /// A projection of the input kernel (`[features, gates · units]`, as Keras) after
            /// every update (Keras' `kernel_constraint`).
            pub fn kernel_constraint(mut self, c: crate::constraints::Constraint) -> Self {
                self.rnn.kernel_constraint = Some(c);
                self
            }
            /// A projection of the recurrent kernel after every update (Keras'
            /// `recurrent_constraint`).
            pub fn recurrent_constraint(mut self, c: crate::constraints::Constraint) -> Self {
                self.rnn.recurrent_constraint = Some(c);
                self
            }
            /// A projection of the bias after every update (Keras' `bias_constraint`).
            pub fn bias_constraint(mut self, c: crate::constraints::Constraint) -> Self {
                self.rnn.bias_constraint = Some(c);
                self
            }
            /// The layer's name.
            pub fn with_name(mut self, name: impl Into<String>) -> Self {
                self.rnn.name = Some(name.into());
                self
            }
            /// The old spelling of `with_name`.
            #[deprecated(since = "0.1.0", note = "use `with_name`, the name setter of every kiln builder (layers, losses, metrics)")]
            pub fn name(self, name: impl Into<String>) -> Self {
                self.with_name(name)
            }
        }
    };
}

/// Long short-term memory (Hochreiter & Schmidhuber 1997) with Keras 3's layout: kernel
/// `[features, 4·units]`, recurrent kernel `[units, 4·units]` and bias `[4·units]`, gates in the
/// order input, forget, candidate, output; tanh and sigmoid; the forget bias starts at 1
/// (`unit_forget_bias`), the recurrent kernel orthogonal.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let ids = Input::new([5]);
/// let e = Embedding::new(20, 4).mask_zero(true).apply(&ids)?;
/// let seq = Lstm::new(3).return_sequences(true).with_name("lstm").apply(&e)?;
/// assert_eq!(seq.shape(), &[5, 3]);
/// let model = Model::new(&[ids], &[seq])?;
/// assert_eq!(model.weight("lstm/bias")?.var.as_tensor().to_vec1::<f32>()?,
///            vec![0., 0., 0., 1., 1., 1., 0., 0., 0., 0., 0., 0.]);
/// // Padding (id 0) carries the state: the masked steps repeat the last real output.
/// let out = model.predict(&[Tensor::new(&[[4f32, 7., 0., 0., 0.]], &Device::Cpu)?], 1)?;
/// let steps = out[0].to_vec3::<f32>()?;
/// assert_eq!(steps[0][4], steps[0][1]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Lstm {
    rnn: Recurrent,
    unit_forget_bias: bool,
}

impl Lstm {
    /// An LSTM with `units` units, returning the last state.
    pub fn new(units: usize) -> Self {
        Self {
            rnn: Recurrent::new(units),
            unit_forget_bias: true,
        }
    }
    /// Whether the forget gate's bias starts at 1 (default true, as Keras).
    pub fn unit_forget_bias(mut self, unit_forget_bias: bool) -> Self {
        self.unit_forget_bias = unit_forget_bias;
        self
    }
}
recurrent_builders!(Lstm);

impl Layer for Lstm {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        let mut c = self.rnn.keras_config()?;
        c["unit_forget_bias"] = self.unit_forget_bias.into();
        Some(("LSTM", c))
    }
    fn kind(&self) -> &'static str {
        "lstm"
    }
    fn given_name(&self) -> Option<&str> {
        self.rnn.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        Ok(self.output_shapes(input_shapes)?.swap_remove(0))
    }
    fn output_shapes(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        self.rnn.output_shapes("LSTM", input_shapes, &["h", "c"])
    }
    fn build(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        ctx: &mut BuildContext,
    ) -> Result<()> {
        self.rnn.build_kernels(name, input_shapes, 4, ctx)?;
        if self.rnn.use_bias {
            let u = self.rnn.units;
            let init = self.rnn.bias_initializer;
            let value = if self.unit_forget_bias {
                let input = init.init(&[u], ctx.dtype, ctx.device, ctx.rng)?;
                let forget = Tensor::ones(u, ctx.dtype, ctx.device)?;
                let rest = init.init(&[2 * u], ctx.dtype, ctx.device, ctx.rng)?;
                Tensor::cat(&[input, forget, rest], 0)?
            } else {
                init.init(&[4 * u], ctx.dtype, ctx.device, ctx.rng)?
            };
            self.rnn.bias = Some(self.rnn.bias_weight(name, value)?);
        }
        Ok(())
    }
    fn weights(&self) -> Vec<Weight> {
        self.rnn.weights()
    }
    fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor> {
        // Masks arrive through `call_with_masks`; called directly, every step counts.
        Ok(self.call_dropped(inputs, None, false, ctx)?.swap_remove(0))
    }
    fn call_with_masks(
        &self,
        inputs: &[Tensor],
        masks: &[Option<Tensor>],
        ctx: &mut CallContext,
    ) -> Result<Tensor> {
        let mask = masks.first().and_then(Option::as_ref);
        Ok(self.call_dropped(inputs, mask, false, ctx)?.swap_remove(0))
    }
    fn call_outputs(
        &self,
        inputs: &[Tensor],
        masks: &[Option<Tensor>],
        ctx: &mut CallContext,
    ) -> Result<Vec<Tensor>> {
        let mask = masks.first().and_then(Option::as_ref);
        self.call_dropped(inputs, mask, self.rnn.return_state, ctx)
    }
    fn takes_mask(&self) -> bool {
        true
    }
    fn compute_mask(&self, _inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        Ok(self.rnn.output_masks(masks, 0).swap_remove(0))
    }
    fn compute_output_masks(
        &self,
        _inputs: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(self.rnn.output_masks(masks, 2))
    }
    fn activity_regularizer(&self) -> Option<&SharedRegularizer> {
        self.rnn.activity_regularizer.as_ref()
    }
}

/// `matrix` with `row` below it, when there is one, as the fused ops take a kernel and its
/// bias (`[x, 1] · [W; b] = x · W + b`).
fn with_row(matrix: &Tensor, row: Option<&Tensor>) -> Result<Tensor> {
    Ok(match row {
        Some(row) => Tensor::cat(&[matrix, &row.unsqueeze(0)?], 0)?,
        None => matrix.contiguous()?,
    })
}

impl Lstm {
    /// The layer on `inputs` (the sequence, then any initial states) with its dropout:
    /// per-gate masks with `recurrent_dropout` in training (the plain graph), else the input
    /// dropout and the fused op where it applies. Returns `[output]`, or `[output, h, c]` when
    /// `states` and `return_state`.
    fn call_dropped(
        &self,
        inputs: &[Tensor],
        mask: Option<&Tensor>,
        states: bool,
        ctx: &mut CallContext,
    ) -> Result<Vec<Tensor>> {
        let (x, initial) = inputs.split_first().ok_or_else(|| {
            Error::Data(format!("layer `{}` got no input", self.rnn.shown("LSTM")))
        })?;
        let run = Run {
            initial,
            states: states && self.rnn.return_state,
        };
        match self.rnn.gate_dropout(x, 4, ctx)? {
            Some(drop) => self.call_masked(x, mask, Some(&drop), run),
            None => self.call_masked(&self.rnn.input_dropout(x, ctx)?, mask, None, run),
        }
    }

    fn call_masked(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        drop: Option<&GateDropout>,
        run: Run,
    ) -> Result<Vec<Tensor>> {
        let rnn = &self.rnn;
        let (x, mask) = rnn.oriented(x, mask)?;
        let (x, mask) = (&x, mask.as_ref());
        let (_, _, masks) = rnn.prepare("LSTM", x, mask)?;
        let kernel = built(&rnn.kernel, "LSTM")?.var.as_tensor();
        let recurrent = built(&rnn.recurrent_kernel, "LSTM")?.var.as_tensor();
        let bias = rnn.bias.as_ref().map(|b| b.var.as_tensor());
        let u = rnn.units;
        let params: Vec<&Tensor> = [kernel, recurrent].into_iter().chain(bias).collect();
        // The fused op takes no dropout masks and starts from zero states.
        let fused = match drop {
            None if run.initial.is_empty() => rnn.fused(x, &params, mask)?,
            _ => None,
        };
        if let Some(mut seq) = fused {
            let projection = Projection {
                features: kernel.dim(0)?,
                bias: bias.is_some(),
            };
            // With the states wanted, the op's output ends in the final cell state.
            seq.final_cell = run.states;
            let all = x.contiguous()?.apply_op3(
                &with_row(kernel, bias)?,
                &recurrent.contiguous()?,
                LstmOp::new(seq, projection),
            )?;
            if !run.states {
                return Ok(vec![all]);
            }
            let steps = all.dim(1)? - 1;
            let output = match rnn.return_sequences {
                true => all.narrow(1, 0, steps)?,
                false => all.get_on_dim(1, 0)?,
            };
            // A masked step repeats the previous output, so the last output is the final h.
            let h = all.get_on_dim(1, steps - 1)?;
            let c = all.get_on_dim(1, steps)?;
            return Ok(rnn.outputs(output, vec![h, c]));
        }
        let initial = rnn.initial_states(&rnn.shown("LSTM"), x, run.initial, 2)?;
        let x_proj = rnn.project(x, kernel, bias, drop)?;
        let (act, gate) = (rnn.activation, rnn.recurrent_activation);
        let (output, states) = rnn.scan(&x_proj, masks.as_deref(), initial, |x_t, states| {
            let (h, c) = (&states[0], &states[1]);
            let hr = match drop {
                None => h.matmul(recurrent)?,
                Some(d) => d.recurrent(h, recurrent, u, 4)?,
            };
            let z = (x_t + hr)?;
            let i = gate.apply(&z.narrow(1, 0, u)?)?;
            let f = gate.apply(&z.narrow(1, u, u)?)?;
            let g = act.apply(&z.narrow(1, 2 * u, u)?)?;
            let o = gate.apply(&z.narrow(1, 3 * u, u)?)?;
            let c = ((f * c)? + (i * g)?)?;
            let h = (o * act.apply(&c)?)?;
            Ok(vec![h, c])
        })?;
        Ok(match run.states {
            true => rnn.outputs(output, states),
            false => vec![output],
        })
    }
}

/// What one call of a recurrent layer starts from and returns: the initial states given (none:
/// zeros) and whether the final states are wanted.
#[derive(Clone, Copy)]
struct Run<'a> {
    initial: &'a [Tensor],
    states: bool,
}

/// Gated recurrent unit (Cho et al. 2014) with Keras 3's layout: kernel `[features, 3·units]`,
/// recurrent kernel `[units, 3·units]`, gates in the order update, reset, candidate. By default
/// the reset gate applies after the recurrent matrix product (`reset_after`, Keras' default), with
/// separate input and recurrent biases (bias `[2, 3·units]`); otherwise the bias is `[3·units]`.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([6, 2]);
/// let last = Gru::new(4).with_name("gru").apply(&x)?;
/// assert_eq!(last.shape(), &[4]);
/// let model = Model::new(&[x], &[last])?;
/// assert_eq!(model.weight("gru/bias")?.var.dims(), &[2, 12]);
/// assert_eq!(model.weight("gru/recurrent_kernel")?.var.dims(), &[4, 12]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Gru {
    rnn: Recurrent,
    reset_after: bool,
}

impl Gru {
    /// A GRU with `units` units, returning the last state.
    pub fn new(units: usize) -> Self {
        Self {
            rnn: Recurrent::new(units),
            reset_after: true,
        }
    }
    /// Whether the reset gate applies after the recurrent matrix product (default true).
    pub fn reset_after(mut self, reset_after: bool) -> Self {
        self.reset_after = reset_after;
        self
    }
}
recurrent_builders!(Gru);

impl Layer for Gru {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        let mut c = self.rnn.keras_config()?;
        c["reset_after"] = self.reset_after.into();
        Some(("GRU", c))
    }
    fn kind(&self) -> &'static str {
        "gru"
    }
    fn given_name(&self) -> Option<&str> {
        self.rnn.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        Ok(self.output_shapes(input_shapes)?.swap_remove(0))
    }
    fn output_shapes(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        self.rnn.output_shapes("GRU", input_shapes, &["h"])
    }
    fn build(
        &mut self,
        name: &str,
        input_shapes: &[Vec<usize>],
        ctx: &mut BuildContext,
    ) -> Result<()> {
        self.rnn.build_kernels(name, input_shapes, 3, ctx)?;
        if self.rnn.use_bias {
            let width = 3 * self.rnn.units;
            let shape: &[usize] = if self.reset_after {
                &[2, width]
            } else {
                &[width]
            };
            let value = self
                .rnn
                .bias_initializer
                .init(shape, ctx.dtype, ctx.device, ctx.rng)?;
            self.rnn.bias = Some(self.rnn.bias_weight(name, value)?);
        }
        Ok(())
    }
    fn weights(&self) -> Vec<Weight> {
        self.rnn.weights()
    }
    fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor> {
        Ok(self.call_dropped(inputs, None, false, ctx)?.swap_remove(0))
    }
    fn call_with_masks(
        &self,
        inputs: &[Tensor],
        masks: &[Option<Tensor>],
        ctx: &mut CallContext,
    ) -> Result<Tensor> {
        let mask = masks.first().and_then(Option::as_ref);
        Ok(self.call_dropped(inputs, mask, false, ctx)?.swap_remove(0))
    }
    fn call_outputs(
        &self,
        inputs: &[Tensor],
        masks: &[Option<Tensor>],
        ctx: &mut CallContext,
    ) -> Result<Vec<Tensor>> {
        let mask = masks.first().and_then(Option::as_ref);
        self.call_dropped(inputs, mask, self.rnn.return_state, ctx)
    }
    fn takes_mask(&self) -> bool {
        true
    }
    fn compute_mask(&self, _inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        Ok(self.rnn.output_masks(masks, 0).swap_remove(0))
    }
    fn compute_output_masks(
        &self,
        _inputs: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(self.rnn.output_masks(masks, 1))
    }
    fn activity_regularizer(&self) -> Option<&SharedRegularizer> {
        self.rnn.activity_regularizer.as_ref()
    }
}

impl Gru {
    /// As [`Lstm::call_dropped`], with the GRU's three gates and one state.
    fn call_dropped(
        &self,
        inputs: &[Tensor],
        mask: Option<&Tensor>,
        states: bool,
        ctx: &mut CallContext,
    ) -> Result<Vec<Tensor>> {
        let (x, initial) = inputs.split_first().ok_or_else(|| {
            Error::Data(format!("layer `{}` got no input", self.rnn.shown("GRU")))
        })?;
        let run = Run {
            initial,
            states: states && self.rnn.return_state,
        };
        match self.rnn.gate_dropout(x, 3, ctx)? {
            Some(drop) => self.call_masked(x, mask, Some(&drop), run),
            None => self.call_masked(&self.rnn.input_dropout(x, ctx)?, mask, None, run),
        }
    }

    fn call_masked(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        drop: Option<&GateDropout>,
        run: Run,
    ) -> Result<Vec<Tensor>> {
        let rnn = &self.rnn;
        let (x, mask) = rnn.oriented(x, mask)?;
        let (x, mask) = (&x, mask.as_ref());
        let (_, _, masks) = rnn.prepare("GRU", x, mask)?;
        let kernel = built(&rnn.kernel, "GRU")?.var.as_tensor();
        let recurrent = built(&rnn.recurrent_kernel, "GRU")?.var.as_tensor();
        let u = rnn.units;
        let (input_bias, recurrent_bias) = match (&rnn.bias, self.reset_after) {
            (None, _) => (None, None),
            (Some(b), true) => {
                let b = b.var.as_tensor();
                (Some(b.get(0)?), Some(b.get(1)?))
            }
            (Some(b), false) => (Some(b.var.as_tensor().clone()), None),
        };
        let params: Vec<&Tensor> = [kernel, recurrent]
            .into_iter()
            .chain(rnn.bias.as_ref().map(|b| b.var.as_tensor()))
            .collect();
        // The fused op starts from a zero state; its final state is its last output.
        if self.reset_after && drop.is_none() && run.initial.is_empty() {
            if let Some(seq) = rnn.fused(x, &params, mask)? {
                let projection = Projection {
                    features: kernel.dim(0)?,
                    bias: input_bias.is_some(),
                };
                let rb = match &recurrent_bias {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(3 * u, x.dtype(), x.device())?,
                };
                let output = x.contiguous()?.apply_op3(
                    &with_row(kernel, input_bias.as_ref())?,
                    &with_row(recurrent, Some(&rb))?,
                    GruOp::new(seq, projection),
                )?;
                if !run.states {
                    return Ok(vec![output]);
                }
                // A masked step repeats the previous output, so the last output is the final
                // state even where the sequence ends in padding.
                let h = match rnn.return_sequences {
                    true => output.narrow(1, output.dim(1)? - 1, 1)?.squeeze(1)?,
                    false => output.clone(),
                };
                return Ok(rnn.outputs(output, vec![h]));
            }
        }
        let initial = rnn.initial_states(&rnn.shown("GRU"), x, run.initial, 1)?;
        let x_proj = rnn.project(x, kernel, input_bias.as_ref(), drop)?;
        let (act, gate) = (rnn.activation, rnn.recurrent_activation);
        let reset_after = self.reset_after;
        let (output, states) = rnn.scan(&x_proj, masks.as_deref(), initial, |x_t, states| {
            let h = &states[0];
            let (z, hh) = if reset_after {
                let mut inner = match drop {
                    None => h.matmul(recurrent)?,
                    Some(d) => d.recurrent(h, recurrent, u, 3)?,
                };
                if let Some(b) = &recurrent_bias {
                    inner = inner.broadcast_add(b)?;
                }
                let z = gate.apply(&(x_t.narrow(1, 0, u)? + inner.narrow(1, 0, u)?)?)?;
                let r = gate.apply(&(x_t.narrow(1, u, u)? + inner.narrow(1, u, u)?)?)?;
                let hh =
                    act.apply(&(x_t.narrow(1, 2 * u, u)? + (r * inner.narrow(1, 2 * u, u)?)?)?)?;
                (z, hh)
            } else {
                let (inner, h_candidate) = match drop {
                    None => (h.matmul(&recurrent.narrow(1, 0, 2 * u)?)?, h.clone()),
                    Some(d) => (d.recurrent(h, recurrent, u, 2)?, d.state(h, 2)?),
                };
                let z = gate.apply(&(x_t.narrow(1, 0, u)? + inner.narrow(1, 0, u)?)?)?;
                let r = gate.apply(&(x_t.narrow(1, u, u)? + inner.narrow(1, u, u)?)?)?;
                let candidate = (r * h_candidate)?.matmul(&recurrent.narrow(1, 2 * u, u)?)?;
                let hh = act.apply(&(x_t.narrow(1, 2 * u, u)? + candidate)?)?;
                (z, hh)
            };
            // h = z · h_prev + (1 - z) · candidate
            let h = ((&z * h)? + (z.affine(-1.0, 1.0)? * hh)?)?;
            Ok(vec![h])
        })?;
        Ok(match run.states {
            true => rnn.outputs(output, states),
            false => vec![output],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::util::fused_check::{max_diff, random};
    use candle_core::{DType, Device};
    use rand::SeedableRng;

    thread_local! {
        /// Set to make the layers take their plain candle graph.
        pub(super) static PLAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Runs `layer` on `x` (and `mask`) fused and plain: every output (the states too, with
    /// `return_state`) and the gradients of Σ out·w over them for the input and every weight
    /// agree.
    fn compare(layer: &mut dyn Layer, x: &Var, mask: Option<&Tensor>, dtype: DType, seed: u64) {
        let dims = x.dims().to_vec();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut ctx = BuildContext {
            device: &Device::Cpu,
            dtype,
            rng: &mut rng,
        };
        layer.build("rnn", &[dims[1..].to_vec()], &mut ctx).unwrap();
        // Random weights rather than the zero bias, to exercise every gate.
        for (i, w) in layer.weights().iter().enumerate() {
            let r = random(w.var.dims(), 50 + seed + i as u64, dtype);
            w.var.set(&(r.as_tensor() * 0.5).unwrap()).unwrap();
        }
        let run = |plain: bool| {
            PLAIN.with(|p| p.set(plain));
            let mut ctx = CallContext::new(true, crate::random::SampleStreams::new(0, 0));
            let masks = [mask.cloned()];
            let outs = layer
                .call_outputs(&[x.as_tensor().clone()], &masks, &mut ctx)
                .unwrap();
            PLAIN.with(|p| p.set(false));
            outs
        };
        let (fused, plain) = (run(false), run(true));
        assert_eq!(fused.len(), plain.len());
        let tol = if dtype == DType::F32 { 2e-5 } else { 1e-11 };
        let weighted = |outs: &[Tensor]| -> Tensor {
            let mut total: Option<Tensor> = None;
            for (k, o) in outs.iter().enumerate() {
                let w = random(o.dims(), 7 + seed + 100 * k as u64, dtype);
                let term = (o * w.as_tensor()).unwrap().sum_all().unwrap();
                total = Some(match total {
                    Some(t) => (t + term).unwrap(),
                    None => term,
                });
            }
            total.unwrap()
        };
        for (f, p) in fused.iter().zip(&plain) {
            assert_eq!(f.dims(), p.dims());
            assert!(max_diff(f, p) < tol, "{dims:?}: {}", max_diff(f, p));
        }
        let gf = weighted(&fused).backward().unwrap();
        let gp = weighted(&plain).backward().unwrap();
        let mut vars = vec![x.clone()];
        vars.extend(layer.weights().into_iter().map(|w| w.var));
        for v in &vars {
            let (f, p) = (gf.get(v).unwrap(), gp.get(v).unwrap());
            let d = max_diff(f, p);
            assert!(d < tol * 10.0, "{dims:?} {:?}: {d}", v.dims());
        }
    }

    const CASES: &[(usize, usize, usize, usize)] = &[
        // (batch, steps, features, units)
        (1, 1, 1, 1),
        (1, 5, 3, 2),
        (3, 7, 4, 5),
        (4, 9, 6, 17),
        // More rows than one block of the fused ops (32): two full blocks and a short one.
        (70, 4, 3, 6),
        // Features in whole registers (16), whose input gradient the direct product forms
        // in f32 on AVX-512, over a full block and a short one.
        (40, 6, 16, 7),
    ];

    fn mask_for(batch: usize, steps: usize, dtype: DType) -> Tensor {
        // Sequence b keeps its first steps - b steps (a later one padded too), the rest 0.
        let v: Vec<f64> = (0..batch * steps)
            .map(|i| {
                let (b, t) = (i / steps, i % steps);
                f64::from(t + b < steps && !(t == 1 && b % 2 == 1))
            })
            .collect();
        Tensor::from_vec(v, (batch, steps), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Input dropout as Keras draws it: with one feature held constant over the steps, each
    /// sequence's training output is the inference output of either a zero input (dropped) or
    /// the input scaled by 1 / (1 - rate) (kept), never a mix (the mask is the same at every
    /// step); about `rate` of them are dropped. Inference ignores the rate.
    #[test]
    fn input_dropout_is_one_scaled_mask_per_sequence_and_feature() {
        let (batch, steps, rate) = (400, 5, 0.25);
        let build = |layer: &mut dyn Layer| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let mut ctx = BuildContext {
                device: &Device::Cpu,
                dtype: DType::F64,
                rng: &mut rng,
            };
            layer.build("rnn", &[vec![steps, 1]], &mut ctx).unwrap();
            for (i, w) in layer.weights().iter().enumerate() {
                w.var
                    .set(random(w.var.dims(), 9 + i as u64, DType::F64).as_tensor())
                    .unwrap();
            }
        };
        let run = |layer: &dyn Layer, x: &Tensor, training: bool| {
            let mut ctx = CallContext::new(training, crate::random::SampleStreams::new(5, 0));
            layer
                .call(std::slice::from_ref(x), &mut ctx)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap()
        };
        let layers: Vec<Box<dyn Layer>> = vec![
            Box::new(Lstm::new(2).dropout(rate)),
            Box::new(Gru::new(2).dropout(rate)),
        ];
        for mut layer in layers {
            build(layer.as_mut());
            let x = Tensor::full(0.7f64, (batch, steps, 1), &Device::Cpu).unwrap();
            let kept = run(layer.as_ref(), &(&x / (1.0 - rate)).unwrap(), false)[0].clone();
            let dropped = run(layer.as_ref(), &x.zeros_like().unwrap(), false)[0].clone();
            let inference = run(layer.as_ref(), &x, false);
            assert!(inference.iter().all(|r| *r == inference[0]));
            assert!(kept != dropped && kept != inference[0]);
            let near = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-12);
            let mut n_dropped = 0;
            for row in run(layer.as_ref(), &x, true) {
                if near(&row, &dropped) {
                    n_dropped += 1;
                } else {
                    assert!(
                        near(&row, &kept),
                        "{row:?}: neither {kept:?} nor {dropped:?}"
                    );
                }
            }
            let share = n_dropped as f64 / batch as f64;
            assert!((share - rate).abs() < 0.07, "dropped share {share}");
        }
    }

    fn sigmoid(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    /// Keras 3's LSTM and GRU cells with recurrent dropout (`implementation = 1`), written out
    /// entry by entry: each gate `g` reads the input under `input[g]` and the previous state
    /// under `state[g]`; the GRU mixes the unmasked previous state. The last state of each
    /// sequence.
    #[allow(clippy::too_many_arguments)]
    fn keras_cell_reference(
        kind: &str,
        x: &[Vec<Vec<f64>>],
        k: &[Vec<f64>],
        r: &[Vec<f64>],
        bias: &[f64],
        rec_bias: Option<&[f64]>,
        input: &[Vec<Vec<f64>>],
        state: &[Vec<Vec<f64>>],
        u: usize,
    ) -> Vec<Vec<f64>> {
        let proj = |v: &[f64], w: &[Vec<f64>], col: usize| -> f64 {
            v.iter().zip(w).map(|(a, row)| a * row[col]).sum()
        };
        let masked =
            |v: &[f64], m: &[f64]| -> Vec<f64> { v.iter().zip(m).map(|(a, b)| a * b).collect() };
        x.iter()
            .enumerate()
            .map(|(b, seq)| {
                let (mut h, mut c) = (vec![0.0; u], vec![0.0; u]);
                for x_t in seq {
                    let xg = |g: usize, j: usize| {
                        proj(&masked(x_t, &input[g][b]), k, g * u + j) + bias[g * u + j]
                    };
                    let hg = |g: usize, j: usize, h: &[f64]| {
                        proj(&masked(h, &state[g][b]), r, g * u + j)
                    };
                    if kind == "lstm" {
                        let mut next_h = vec![0.0; u];
                        for j in 0..u {
                            let z: Vec<f64> = (0..4).map(|g| xg(g, j) + hg(g, j, &h)).collect();
                            c[j] = sigmoid(z[1]) * c[j] + sigmoid(z[0]) * z[2].tanh();
                            next_h[j] = sigmoid(z[3]) * c[j].tanh();
                        }
                        h = next_h;
                    } else if let Some(rb) = rec_bias {
                        // reset_after
                        let next: Vec<f64> = (0..u)
                            .map(|j| {
                                let rec = |g: usize| hg(g, j, &h) + rb[g * u + j];
                                let z = sigmoid(xg(0, j) + rec(0));
                                let rr = sigmoid(xg(1, j) + rec(1));
                                let hh = (xg(2, j) + rr * rec(2)).tanh();
                                z * h[j] + (1.0 - z) * hh
                            })
                            .collect();
                        h = next;
                    } else {
                        let rr: Vec<f64> =
                            (0..u).map(|j| sigmoid(xg(1, j) + hg(1, j, &h))).collect();
                        let reset: Vec<f64> = h.iter().zip(&rr).map(|(a, b)| a * b).collect();
                        let next: Vec<f64> = (0..u)
                            .map(|j| {
                                let z = sigmoid(xg(0, j) + hg(0, j, &h));
                                let hh = (xg(2, j) + hg(2, j, &reset)).tanh();
                                z * h[j] + (1.0 - z) * hh
                            })
                            .collect();
                        h = next;
                    }
                }
                h
            })
            .collect()
    }

    /// Recurrent dropout as Keras 3 applies it: the layer in training equals the cell written
    /// out above with the masks it draws (per gate, one per sequence, the same at every step),
    /// and in inference the cell with no masks.
    #[test]
    fn recurrent_dropout_is_keras_per_gate_masks_on_the_state() {
        let (batch, steps, features, u) = (3, 4, 2, 3);
        let (rate, rec_rate) = (0.3, 0.4);
        let to3 = |t: &Tensor| t.to_vec3::<f64>().unwrap();
        let to2 = |t: &Tensor| t.to_vec2::<f64>().unwrap();
        for kind in ["lstm", "gru", "gru_before"] {
            let gates = if kind == "lstm" { 4 } else { 3 };
            let mut layer: Box<dyn Layer> = match kind {
                "lstm" => Box::new(Lstm::new(u).dropout(rate).recurrent_dropout(rec_rate)),
                "gru" => Box::new(Gru::new(u).dropout(rate).recurrent_dropout(rec_rate)),
                _ => Box::new(
                    Gru::new(u)
                        .reset_after(false)
                        .dropout(rate)
                        .recurrent_dropout(rec_rate),
                ),
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let mut ctx = BuildContext {
                device: &Device::Cpu,
                dtype: DType::F64,
                rng: &mut rng,
            };
            layer
                .build("rnn", &[vec![steps, features]], &mut ctx)
                .unwrap();
            for (i, w) in layer.weights().iter().enumerate() {
                w.var
                    .set(random(w.var.dims(), 20 + i as u64, DType::F64).as_tensor())
                    .unwrap();
            }
            let weights = layer.weights();
            let (k, r) = (
                to2(weights[0].var.as_tensor()),
                to2(weights[1].var.as_tensor()),
            );
            let b = weights[2].var.as_tensor();
            let (bias, rec_bias) = match kind {
                "gru" => (to2(b)[0].clone(), Some(to2(b)[1].clone())),
                _ => (b.to_vec1::<f64>().unwrap(), None),
            };
            let x = random(&[batch, steps, features], 3, DType::F64);
            let xs = to3(x.as_tensor());
            // The masks the layer draws, in its order: the inputs' per gate, then the state's.
            let streams = || crate::random::SampleStreams::new(9, 0);
            let mut ctx = CallContext::new(true, streams());
            let input: Vec<Vec<Vec<f64>>> = (0..gates)
                .map(|g| {
                    let draw = INPUT_DRAW + g as u32;
                    let m = dropout_mask(draw, rate, (batch, 1, features), x.as_tensor(), &mut ctx);
                    to3(&m.unwrap()).into_iter().map(|s| s[0].clone()).collect()
                })
                .collect();
            let state: Vec<Vec<Vec<f64>>> = (0..gates)
                .map(|g| {
                    let draw = STATE_DRAW + g as u32;
                    to2(&dropout_mask(draw, rec_rate, (batch, u), x.as_tensor(), &mut ctx).unwrap())
                })
                .collect();
            assert!(state.iter().flatten().flatten().any(|v| *v == 0.0));
            let run = |training: bool| {
                let mut ctx = CallContext::new(training, streams());
                to2(&layer.call(&[x.as_tensor().clone()], &mut ctx).unwrap())
            };
            let want = keras_cell_reference(
                kind,
                &xs,
                &k,
                &r,
                &bias,
                rec_bias.as_deref(),
                &input,
                &state,
                u,
            );
            let ones = |n: usize| vec![vec![vec![1.0; n]; batch]; gates];
            let plain = keras_cell_reference(
                kind,
                &xs,
                &k,
                &r,
                &bias,
                rec_bias.as_deref(),
                &ones(features),
                &ones(u),
                u,
            );
            for (got, want, what) in [
                (run(true), want, "training"),
                (run(false), plain, "inference"),
            ] {
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert!(
                        (g - w).abs() < 1e-12,
                        "{kind} {what}: {got:?} against {want:?}"
                    );
                }
            }
        }
    }

    /// The fused LSTM and GRU equal their plain graphs, forward and backward, last output or
    /// sequences, with and without masks, in f32 and f64.
    #[test]
    fn fused_recurrent_layers_match_the_plain_graph() {
        for dtype in [DType::F64, DType::F32] {
            for (i, &(b, t, f, u)) in CASES.iter().enumerate() {
                for sequences in [false, true] {
                    for masked in [false, true] {
                        let x = random(&[b, t, f], i as u64, dtype);
                        let mask = masked.then(|| mask_for(b, t, dtype));
                        let seed = i as u64 * 4 + u64::from(sequences) * 2 + u64::from(masked);
                        let mut lstm = Lstm::new(u).return_sequences(sequences);
                        compare(&mut lstm, &x, mask.as_ref(), dtype, seed);
                        let mut lstm = Lstm::new(u).return_sequences(sequences).use_bias(false);
                        compare(&mut lstm, &x, mask.as_ref(), dtype, seed);
                        // The fused LSTM's output ends in the final cell state.
                        let mut lstm = Lstm::new(u).return_sequences(sequences).return_state(true);
                        compare(&mut lstm, &x, mask.as_ref(), dtype, seed);
                        let mut gru = Gru::new(u).return_sequences(sequences);
                        compare(&mut gru, &x, mask.as_ref(), dtype, seed);
                        let mut gru = Gru::new(u).return_sequences(sequences).use_bias(false);
                        compare(&mut gru, &x, mask.as_ref(), dtype, seed);
                        // The fused GRU's final state is its last output.
                        let mut gru = Gru::new(u).return_sequences(sequences).return_state(true);
                        compare(&mut gru, &x, mask.as_ref(), dtype, seed);
                    }
                }
            }
        }
    }
}
