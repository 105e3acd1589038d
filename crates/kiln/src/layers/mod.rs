//! Layers: the [`Layer`] trait, the weights layers own, and the layers themselves.
//!
//! A layer is configured with a builder, then applied to symbolic tensors to make a graph
//! ([`LayerExt::apply`]). Its weights are created when the model is built, from the model's seed.

mod channels;
pub(crate) mod channels_first;
mod conv;
mod conv_direct;
mod conv_kernel;
mod core_layers;
mod dense;
mod dense_kernel;
mod embedding;
mod merge;
mod normalization;
mod pooling;
mod preprocessing;
mod recurrent;
mod recurrent_kernel;
pub(crate) mod relu_kernel;
mod reshape;
mod util;

pub use channels_first::ChannelsFirst;
pub use conv::{Conv1D, Conv2D, Size2};
pub use core_layers::{ActivationLayer, Dropout, Flatten};
pub use dense::{dense_forward, Dense};
pub use embedding::{Embedding, LogicalOr, Masking, NotEqual, ReduceAny};
pub use merge::{Add, Concatenate, Multiply};
pub use normalization::{BatchNormalization, LayerNormalization};
pub use pooling::{
    AveragePooling1D, AveragePooling2D, GlobalAveragePooling1D, GlobalAveragePooling2D,
    GlobalMaxPooling1D, GlobalMaxPooling2D, MaxPooling1D, MaxPooling2D,
};
pub use preprocessing::{Normalization, NORMALIZATION_EPSILON};
pub use recurrent::{Gru, Lstm};
pub use reshape::{Permute, Reshape};
pub use util::Padding;

use crate::error::Result;
use crate::graph::{SharedLayer, SymbolicTensor};
use crate::random::SampleStreams;
use crate::regularizers::SharedRegularizer;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;

/// A weight owned by a layer: a variable, its name, its regularizer and whether the optimizer
/// updates it.
///
/// Whether it is trainable is read, not set, here: a copy cannot freeze the weight it was copied
/// from. Freeze layers with [`LayerExt::trainable`] or [`crate::Model::set_trainable`].
///
/// ```
/// use kiln::candle::{DType, Device, Tensor, Var};
/// use kiln::layers::Weight;
/// let var = Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?)?;
/// let w = Weight::new("mine/kernel", var, true);
/// assert_eq!((w.name.as_str(), w.shape(), w.trainable()), ("mine/kernel", &[2, 3][..], true));
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Weight {
    /// `<layer>/<weight>`, such as `dense/kernel`.
    pub name: String,
    /// The variable; cloning shares its storage.
    pub var: Var,
    /// A penalty added to the total loss at every step (trainable weights only, as Keras).
    pub regularizer: Option<SharedRegularizer>,
    /// A projection applied right after every optimizer update (Keras' `*_constraint`).
    pub constraint: Option<crate::constraints::Constraint>,
    trainable: bool,
}

impl Weight {
    /// A weight named `<layer>/<weight>`; `trainable` is false for state the optimizer must never
    /// touch (BatchNormalization's moving statistics).
    pub fn new(name: impl Into<String>, var: Var, trainable: bool) -> Self {
        Self {
            name: name.into(),
            var,
            regularizer: None,
            constraint: None,
            trainable,
        }
    }

    /// The same weight with a constraint, applied after every update.
    pub fn with_constraint(mut self, constraint: Option<crate::constraints::Constraint>) -> Self {
        self.constraint = constraint;
        self
    }

    /// The same weight with a regularizer.
    pub fn with_regularizer(mut self, regularizer: Option<SharedRegularizer>) -> Self {
        self.regularizer = regularizer;
        self
    }

    /// Whether the optimizer updates it: the weight is trainable and its layer is not frozen.
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        self.var.dims()
    }

    /// This copy as its frozen layer lists it.
    pub(crate) fn frozen_unless(mut self, layer_trainable: bool) -> Self {
        self.trainable &= layer_trainable;
        self
    }
}

/// What a layer needs to create its weights.
pub struct BuildContext<'a> {
    /// The device weights live on.
    pub device: &'a Device,
    /// The dtype of the weights.
    pub dtype: DType,
    /// The seeded generator initializers draw from.
    pub rng: &'a mut StdRng,
}

/// What a layer sees while it runs.
pub struct CallContext {
    /// Training mode (dropout active) or inference.
    pub training: bool,
    /// The per-sample random streams of this layer in this step ([`CallContext::random`]).
    random: SampleStreams,
    pub(crate) added: Vec<(String, Tensor)>,
    pub(crate) layer_trainable: bool,
    /// The ranks of a data-parallel training step (more than one), for the layers whose
    /// batch statistics are synchronised across them.
    pub(crate) ranks: Option<crate::distributed::SharedCommunicator>,
    /// Set by the model when the layer's output feeds only a ReLU layer, whose output is all
    /// that is read: a layer with a fused kernel may apply the ReLU itself and say so in
    /// `relu_applied`, sparing a pass over the output and a gradient the size of it (candle
    /// zero-fills and adds every intermediate gradient).
    pub(crate) relu_follows: bool,
    pub(crate) relu_applied: bool,
}

impl CallContext {
    pub(crate) fn new(training: bool, random: SampleStreams) -> Self {
        Self {
            training,
            random,
            added: Vec::new(),
            layer_trainable: true,
            ranks: None,
            relu_follows: false,
            relu_applied: false,
        }
    }

    /// The streams a stochastic layer draws from (dropout masks, noise): in a training step
    /// keyed by the run's seed, the step, the layer and each sample's index in the global
    /// batch, so that a sample's draws are the same whichever rank or shard holds it. A layer
    /// that must draw differently at every call draws from these, never from a generator of
    /// its own.
    ///
    /// ```
    /// use kiln::candle::Tensor;
    /// use kiln::layers::{CallContext, Layer};
    /// use kiln::prelude::*;
    /// /// Adds uniform noise in [-0.1, 0.1) in training (a layer of the user's own).
    /// struct Jitter;
    /// impl Layer for Jitter {
    ///     fn kind(&self) -> &'static str { "jitter" }
    ///     fn given_name(&self) -> Option<&str> { None }
    ///     fn output_shape(&self, shapes: &[Vec<usize>]) -> kiln::Result<Vec<usize>> {
    ///         Ok(shapes[0].clone())
    ///     }
    ///     fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> kiln::Result<Tensor> {
    ///         let x = &inputs[0];
    ///         if !ctx.training {
    ///             return Ok(x.clone());
    ///         }
    ///         let noise = ctx.random().uniform(0, x.dims(), -0.1, 0.1, x.dtype(), x.device())?;
    ///         Ok((x + noise)?)
    ///     }
    /// }
    /// let x = Input::new([3]);
    /// let model = Model::new(&[x.clone()], &[Jitter.apply(&x)?])?;
    /// let ones = Tensor::ones((2, 3), kiln::candle::DType::F32, &kiln::candle::Device::Cpu)?;
    /// let y = model.call(&[ones], true)?[0].flatten_all()?.to_vec1::<f32>()?;
    /// assert!(y.iter().all(|v| (0.9..1.1).contains(v)) && y.iter().any(|v| *v != 1.0));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn random(&self) -> &SampleStreams {
        &self.random
    }

    /// Whether the running layer is trainable (not frozen). As in Keras, a frozen
    /// BatchNormalization runs in inference mode even in a training step.
    pub fn layer_trainable(&self) -> bool {
        self.layer_trainable
    }

    /// Adds a loss term while the layer runs (Keras' `self.add_loss` inside `call`). Terms of the
    /// same name are summed and reported together.
    pub fn add_loss(&mut self, name: impl Into<String>, value: Tensor) {
        self.added.push((name.into(), value));
    }
}

/// A building block of a model.
///
/// Implement it to write your own layer; the provided methods cover layers without weights
/// or masks. A layer is `Sync` because `predict` calls it on several threads at once, one
/// piece of the batch each ([`Layer::samples_independent`]); `call` takes `&self`.
pub trait Layer: Send + Sync {
    /// The kind, used for automatic names (`dense`, `dense_1`, …).
    fn kind(&self) -> &'static str;
    /// The name the user gave, if any.
    fn given_name(&self) -> Option<&str>;
    /// The output shape (without the batch axis) for these input shapes, or a clear error.
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>>;
    /// Creates the weights, named `<name>/<weight>`. Called once, when the model is built.
    fn build(
        &mut self,
        _name: &str,
        _input_shapes: &[Vec<usize>],
        _ctx: &mut BuildContext,
    ) -> Result<()> {
        Ok(())
    }
    /// The layer's weights (clones share storage).
    fn weights(&self) -> Vec<Weight> {
        Vec::new()
    }
    /// Runs the layer on a batch.
    fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor>;
    /// Runs the layer on a batch whose inputs carry masks (`None` where an input has none), as
    /// Keras passes `mask=` to `call`. Layers that read masks (recurrent layers, global average
    /// pooling, batch normalization, Multiply) override it; by default the masks are ignored.
    fn call_with_masks(
        &self,
        inputs: &[Tensor],
        _masks: &[Option<Tensor>],
        ctx: &mut CallContext,
    ) -> Result<Tensor> {
        self.call(inputs, ctx)
    }
    /// The sample shapes of every output, for a layer that returns several tensors (an LSTM
    /// with `return_state` returns its output and its states); by default the one of
    /// [`Layer::output_shape`]. Such a layer is applied with [`LayerExt::apply_outputs`] and
    /// overrides [`Layer::call_outputs`] and [`Layer::compute_output_masks`] to match.
    fn output_shapes(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        Ok(vec![self.output_shape(input_shapes)?])
    }
    /// Runs the layer on a batch and returns every output, in the order of
    /// [`Layer::output_shapes`]; by default the one of [`Layer::call_with_masks`].
    fn call_outputs(
        &self,
        inputs: &[Tensor],
        masks: &[Option<Tensor>],
        ctx: &mut CallContext,
    ) -> Result<Vec<Tensor>> {
        Ok(vec![self.call_with_masks(inputs, masks, ctx)?])
    }
    /// The mask of every output, in the order of [`Layer::output_shapes`]; by default the one
    /// of [`Layer::compute_mask`].
    fn compute_output_masks(
        &self,
        inputs: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![self.compute_mask(inputs, masks)?])
    }
    /// Whether the layer reads masks, so that it can be given one explicitly
    /// ([`crate::SharedLayer::apply_with_mask`]), as Keras layers whose `call` has a `mask`
    /// argument. Layers that override [`Layer::call_with_masks`] to read masks return `true`.
    fn takes_mask(&self) -> bool {
        false
    }
    /// The mask of the output, given the inputs' masks. By default a layer keeps its first
    /// input's mask when it keeps its shape, as Keras' layers that support masking do.
    fn compute_mask(&self, _inputs: &[Tensor], masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        Ok(masks.first().cloned().flatten())
    }
    /// The activation the layer ends in (Dense's, Activation's), for
    /// [`crate::ProbabilityRule::Logits`]; `None` by default.
    fn final_activation(&self) -> Option<crate::Activation> {
        None
    }
    /// The layer's output before its [`Layer::final_activation`] (the logits behind a softmax
    /// or sigmoid), from the same inputs.
    fn call_before_activation(&self, _inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        Err(crate::Error::State(format!(
            "layer `{}` has no final activation to leave out",
            self.given_name().unwrap_or(self.kind())
        )))
    }
    /// Whether, in inference, each sample's output depends on that sample's inputs alone, as
    /// for every layer kiln has. [`crate::Model::predict`] then runs a large batch as pieces that
    /// stay in cache, on several threads at once, with the same results. `false` by default, so
    /// that a layer of your own that mixes samples in inference sees the whole batch; return
    /// `true` when it does not.
    fn samples_independent(&self) -> bool {
        false
    }
    /// A penalty on the layer's output, added to the total loss.
    fn activity_regularizer(&self) -> Option<&SharedRegularizer> {
        None
    }
    /// The Keras class and `config` (without `name`) of an equivalent Keras layer, for
    /// [`crate::Model::save_keras`]; `None` for a layer Keras' format cannot describe yet.
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
}

/// Applying a layer to symbolic tensors: the functional API.
pub trait LayerExt: Layer + Sized + 'static {
    /// Applies the layer to one tensor, returning the symbolic output.
    ///
    /// # Errors
    /// [`crate::Error::Graph`] when the layer cannot take inputs of that shape (the message
    /// names the layer and the shapes).
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(3).apply(&x)?;
    /// assert_eq!(y.shape(), &[3]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    fn apply(self, input: &SymbolicTensor) -> Result<SymbolicTensor> {
        self.shared().apply(input)
    }
    /// Applies the layer to several tensors.
    ///
    /// # Errors
    /// As [`LayerExt::apply`].
    fn apply_many(self, inputs: &[&SymbolicTensor]) -> Result<SymbolicTensor> {
        self.shared().apply_many(inputs)
    }
    /// Applies the layer to one tensor with an explicit mask (Keras' `layer(x, mask=m)`).
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let steps = Input::named("steps", [6, 3]);
    /// let keep = Input::named("keep", [6]); // the data gives the mask, 1 = the step counts
    /// let h = Lstm::new(4).apply_with_mask(&steps, &keep)?;
    /// assert_eq!(h.shape(), &[4]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`SharedLayer::apply_many_with_masks`].
    fn apply_with_mask(
        self,
        input: &SymbolicTensor,
        mask: &SymbolicTensor,
    ) -> Result<SymbolicTensor> {
        self.shared().apply_with_mask(input, mask)
    }
    /// Applies the layer to several tensors with explicit masks, one per input.
    ///
    /// # Errors
    /// As [`SharedLayer::apply_many_with_masks`].
    fn apply_many_with_masks(
        self,
        inputs: &[&SymbolicTensor],
        masks: &[Option<&SymbolicTensor>],
    ) -> Result<SymbolicTensor> {
        self.shared().apply_many_with_masks(inputs, masks)
    }
    /// Applies a layer that may return several tensors (an LSTM or GRU with `return_state`)
    /// and returns them all: see [`SharedLayer::apply_outputs`].
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([5, 3]);
    /// let outs = Gru::new(4).return_sequences(true).return_state(true).apply_outputs(&[&x])?;
    /// assert_eq!((outs[0].shape(), outs[1].shape()), (&[5, 4][..], &[4][..]));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`SharedLayer::apply_many_with_masks`].
    fn apply_outputs(self, inputs: &[&SymbolicTensor]) -> Result<Vec<SymbolicTensor>> {
        self.shared().apply_outputs(inputs)
    }
    /// [`LayerExt::apply_outputs`] with explicit masks, one per input.
    ///
    /// # Errors
    /// As [`SharedLayer::apply_many_with_masks`].
    fn apply_outputs_with_masks(
        self,
        inputs: &[&SymbolicTensor],
        masks: &[Option<&SymbolicTensor>],
    ) -> Result<Vec<SymbolicTensor>> {
        self.shared().apply_outputs_with_masks(inputs, masks)
    }
    /// Makes the layer shareable: apply the result several times to reuse the same weights.
    fn shared(self) -> SharedLayer {
        SharedLayer::new(Box::new(self))
    }
    /// Freezes the layer (`false`, Keras' `trainable=False`) or not: a frozen layer's weights
    /// get no update from any optimizer and add no regularization term, and a frozen
    /// BatchNormalization runs in inference mode. Call it last, then `apply`.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let h = Dense::new(8).with_name("base").trainable(false).apply(&x)?;
    /// let y = Dense::new(1).apply(&h)?;
    /// let model = Model::new(&[x], &[y])?;
    /// assert!(!model.weight("base/kernel")?.trainable());
    /// assert!(model.weight("dense/kernel")?.trainable());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    fn trainable(self, trainable: bool) -> SharedLayer {
        let layer = self.shared();
        layer.set_trainable(trainable);
        layer
    }
}

impl<L: Layer + Sized + 'static> LayerExt for L {}
