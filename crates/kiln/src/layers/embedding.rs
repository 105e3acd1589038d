//! Layers that make masks: Embedding (with `mask_zero`), Masking, and NotEqual, ReduceAny and
//! LogicalOr (a mask as a tensor of its own, for an explicit mask).

use super::util::{built, make_weight, one_input};
use super::{BuildContext, CallContext, Layer, Weight};
use crate::error::{invalid, Error, Result};
use crate::initializers::Initializer;
use crate::regularizers::{IntoRegularizer, SharedRegularizer};
use candle_core::{DType, Tensor};

/// Maps integer ids in `[0, input_dim)` to learned vectors of size `output_dim`: samples of shape
/// `[steps]` become `[steps, output_dim]`.
///
/// With `mask_zero(true)`, id 0 is padding: the layer makes the mask `ids != 0` (shape
/// `[batch, steps]`), which flows to the layers that keep the time axis and on to the loss, as
/// in Keras. The weight is `<name>/embeddings`, drawn uniformly from ±0.05 like Keras.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let ids = Input::new([4]);
/// let vectors = Embedding::new(10, 3).mask_zero(true).with_name("emb").apply(&ids)?;
/// assert_eq!(vectors.shape(), &[4, 3]);
/// let model = Model::new(&[ids], &[vectors])?;
/// let x = Tensor::new(&[[3f32, 1., 0., 0.]], &Device::Cpu)?;
/// let y = model.predict(&[x], 1)?;
/// let table = model.weight("emb/embeddings")?.var.as_tensor().to_vec2::<f32>()?;
/// assert_eq!(y[0].to_vec3::<f32>()?[0][0], table[3]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Embedding {
    input_dim: usize,
    output_dim: usize,
    mask_zero: bool,
    initializer: Initializer,
    regularizer: Option<SharedRegularizer>,
    activity_regularizer: Option<SharedRegularizer>,
    constraint: Option<crate::constraints::Constraint>,
    name: Option<String>,
    embeddings: Option<Weight>,
}

impl Embedding {
    /// A table of `input_dim` vectors of size `output_dim`.
    pub fn new(input_dim: usize, output_dim: usize) -> Self {
        Self {
            input_dim,
            output_dim,
            mask_zero: false,
            initializer: Initializer::RandomUniform { limit: 0.05 },
            regularizer: None,
            activity_regularizer: None,
            constraint: None,
            name: None,
            embeddings: None,
        }
    }
    /// Whether id 0 is padding that masks its step (default false).
    pub fn mask_zero(mut self, mask_zero: bool) -> Self {
        self.mask_zero = mask_zero;
        self
    }
    /// How the table is initialized.
    pub fn embeddings_initializer(mut self, init: Initializer) -> Self {
        self.initializer = init;
        self
    }
    /// A penalty on the table, added to the total loss.
    pub fn embeddings_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.regularizer = Some(reg.into_regularizer());
        self
    }
    /// A projection of the table (`[input_dim, output_dim]`) after every update (Keras'
    /// `embeddings_constraint`); `axis = 1` bounds each token's vector.
    pub fn embeddings_constraint(mut self, c: crate::constraints::Constraint) -> Self {
        self.constraint = Some(c);
        self
    }
    /// A penalty on the layer's output, added to the total loss.
    pub fn activity_regularizer(mut self, reg: impl IntoRegularizer) -> Self {
        self.activity_regularizer = Some(reg.into_regularizer());
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
}

impl Layer for Embedding {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        use crate::regularizers::keras_object;
        Some((
            "Embedding",
            serde_json::json!({
                "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                "embeddings_regularizer": keras_object(&self.regularizer)?,
                "activity_regularizer": keras_object(&self.activity_regularizer)?,
                "embeddings_constraint": self.constraint.as_ref().map(|c| c.keras_config()),
                "mask_zero": self.mask_zero,
            }),
        ))
    }
    fn kind(&self) -> &'static str {
        "embedding"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let shape = one_input("Embedding", input_shapes)?;
        if self.input_dim == 0 || self.output_dim == 0 {
            return Err(invalid(format!(
                "Embedding: input_dim and output_dim must be at least 1, got {} and {}",
                self.input_dim, self.output_dim
            )));
        }
        let mut out = shape.clone();
        out.push(self.output_dim);
        Ok(out)
    }
    fn build(&mut self, name: &str, _: &[Vec<usize>], ctx: &mut BuildContext) -> Result<()> {
        self.embeddings = Some(
            make_weight(
                name,
                "embeddings",
                &[self.input_dim, self.output_dim],
                self.initializer,
                true,
                self.regularizer.clone(),
                ctx,
            )?
            .with_constraint(self.constraint.clone()),
        );
        Ok(())
    }
    fn weights(&self) -> Vec<Weight> {
        self.embeddings.iter().cloned().collect()
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let table = built(&self.embeddings, "Embedding")?;
        let x = &inputs[0];
        let ids: Vec<f64> = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let mut index = Vec::with_capacity(ids.len());
        for &id in &ids {
            if !(id >= 0.0 && id < self.input_dim as f64 && id.fract() == 0.0) {
                return Err(Error::Data(format!(
                    "layer `{}`: id {id} is not an integer in [0, {})",
                    table.name.trim_end_matches("/embeddings"),
                    self.input_dim
                )));
            }
            index.push(id as u32);
        }
        let index = Tensor::from_vec(index, ids.len(), x.device())?;
        let rows = table.var.as_tensor().index_select(&index, 0)?;
        let mut shape = x.dims().to_vec();
        shape.push(self.output_dim);
        Ok(rows.reshape(shape)?)
    }
    fn compute_mask(&self, inputs: &[Tensor], _masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        if !self.mask_zero {
            return Ok(None);
        }
        Ok(Some(inputs[0].ne(0.0)?))
    }
    fn activity_regularizer(&self) -> Option<&SharedRegularizer> {
        self.activity_regularizer.as_ref()
    }
}

/// Marks the steps whose features all equal `mask_value` as padding: those steps are zeroed and
/// masked (mask `any(x != mask_value)` over the last axis), as Keras' `Masking`.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let x = Input::new([3, 2]);
/// let y = Masking::new(-1.0).apply(&x)?;
/// let model = Model::new(&[x], &[y])?;
/// let batch = Tensor::new(&[[[1f32, -1.], [-1., -1.], [2., 3.]]], &Device::Cpu)?;
/// let out = model.predict(&[batch], 1)?[0].to_vec3::<f32>()?;
/// assert_eq!(out[0], vec![vec![1., -1.], vec![0., 0.], vec![2., 3.]]);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Masking {
    mask_value: f64,
    name: Option<String>,
}

impl Masking {
    /// Steps whose features all equal `mask_value` are masked (Keras' default value is 0).
    pub fn new(mask_value: f64) -> Self {
        Self {
            mask_value,
            name: None,
        }
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

    /// `any(x != mask_value)` over the last axis, keeping it (0/1, u8).
    fn keep(&self, x: &Tensor) -> Result<Tensor> {
        let differs = x.ne(self.mask_value)?.to_dtype(DType::F32)?;
        Ok(differs.max_keepdim(x.rank() - 1)?.ne(0.0)?)
    }
}

impl Layer for Masking {
    fn samples_independent(&self) -> bool {
        true
    }
    fn keras_config(&self) -> Option<(&'static str, serde_json::Value)> {
        Some((
            "Masking",
            serde_json::json!({ "mask_value": self.mask_value }),
        ))
    }
    fn kind(&self) -> &'static str {
        "masking"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let shape = one_input("Masking", input_shapes)?;
        if shape.is_empty() {
            return Err(Error::Graph(
                "Masking needs samples with a feature axis".into(),
            ));
        }
        Ok(shape.clone())
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let x = &inputs[0];
        let keep = self.keep(x)?.broadcast_as(x.shape())?.contiguous()?;
        Ok(keep.where_cond(x, &x.zeros_like()?)?)
    }
    fn compute_mask(&self, inputs: &[Tensor], _masks: &[Option<Tensor>]) -> Result<Option<Tensor>> {
        let x = &inputs[0];
        Ok(Some(self.keep(x)?.squeeze(x.rank() - 1)?))
    }
}

/// A mask as a tensor of its own: 1 where the input differs from `value`, 0 where it equals it
/// (u8, the input's shape), as `keras.ops.not_equal(x, value)`. Give it to a layer that reads
/// masks with [`crate::SharedLayer::apply_with_mask`], for example the padding of one input as
/// the mask of another. It carries no mask itself.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let tokens = Input::new([4]);
/// let keep = NotEqual::new(0.0).apply(&tokens)?;
/// let model = Model::new(&[tokens], &[keep])?;
/// let ids = Tensor::new(&[[3f32, 1., 0., 0.]], &Device::Cpu)?;
/// assert_eq!(model.predict(&[ids], 1)?[0].to_vec2::<u8>()?, vec![vec![1, 1, 0, 0]]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NotEqual {
    value: f64,
    name: Option<String>,
}

impl NotEqual {
    /// Entries equal to `value` become 0 (masked), the others 1.
    pub fn new(value: f64) -> Self {
        Self { value, name: None }
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
}

impl Layer for NotEqual {
    fn samples_independent(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "not_equal"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        Ok(one_input("NotEqual", input_shapes)?.clone())
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        Ok(inputs[0].ne(self.value)?)
    }
    fn compute_mask(
        &self,
        _inputs: &[Tensor],
        _masks: &[Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A mask reduced along one axis: 1 where any entry along `axis` is nonzero, else 0 (u8), as
/// `keras.ops.any(x, axis, keepdims)`. Keras writes `any(not_equal(x, value), axis=-1)` into a
/// model's config for the mask of a `Masking` layer that it passes to the next layer
/// explicitly, so that a Keras file's Masking → LSTM reads back exactly. Like Keras, `axis`
/// counts the batch as axis 0 (negative from the end) and must not be the batch axis.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let x = Input::new([3, 2]);
/// let keep = ReduceAny::new(-1).apply(&NotEqual::new(0.0).apply(&x)?)?;
/// assert_eq!(keep.shape(), &[3]);
/// let model = Model::new(&[x], &[keep])?;
/// let steps = Tensor::new(&[[[1f32, 0.], [0., 0.], [0., 2.]]], &Device::Cpu)?;
/// assert_eq!(model.predict(&[steps], 1)?[0].to_vec2::<u8>()?, vec![vec![1, 0, 1]]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ReduceAny {
    axis: isize,
    keepdims: bool,
    name: Option<String>,
}

impl ReduceAny {
    /// Reduces along `axis` (Keras' counting: the batch is axis 0, negative from the end).
    pub fn new(axis: isize) -> Self {
        Self {
            axis,
            keepdims: false,
            name: None,
        }
    }
    /// Keeps the reduced axis with size 1 (Keras' `keepdims`; default false).
    pub fn keepdims(mut self, keep: bool) -> Self {
        self.keepdims = keep;
        self
    }
    /// The layer's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The reduced axis among the sample's `rank` axes (the batch not counted).
    fn sample_axis(&self, rank: usize) -> Result<usize> {
        let full = rank as isize + 1;
        let a = if self.axis < 0 {
            full + self.axis
        } else {
            self.axis
        };
        if a < 1 || a >= full {
            return Err(invalid(format!(
                "ReduceAny: axis {} is not a feature axis of a sample of rank {rank}: give one \
                 of 1..={rank} or -1..=-{rank}",
                self.axis
            )));
        }
        Ok(a as usize - 1)
    }
}

impl Layer for ReduceAny {
    fn samples_independent(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "reduce_any"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        let mut shape = one_input("ReduceAny", input_shapes)?.clone();
        let a = self.sample_axis(shape.len())?;
        if self.keepdims {
            shape[a] = 1;
        } else {
            shape.remove(a);
        }
        Ok(shape)
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let x = &inputs[0];
        let a = self.sample_axis(x.rank() - 1)? + 1;
        let nonzero = x.ne(0f64)?;
        Ok(if self.keepdims {
            nonzero.max_keepdim(a)?
        } else {
            nonzero.max(a)?
        })
    }
    fn compute_mask(
        &self,
        _inputs: &[Tensor],
        _masks: &[Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Masks joined: 1 where any input is nonzero, else 0 (u8, the inputs' common shape), as
/// `keras.ops.logical_or(a, b)`. Keras writes it into a model's config for the mask of an
/// `Add` or `Multiply` of masked tensors that it passes to the next layer explicitly.
///
/// ```
/// use kiln::candle::{Device, Tensor};
/// use kiln::prelude::*;
/// let (a, b) = (Input::new([3]), Input::new([3]));
/// let either = LogicalOr::new().apply_many(&[&a, &b])?;
/// let model = Model::new(&[a, b], &[either])?;
/// let x = Tensor::new(&[[1f32, 0., 0.]], &Device::Cpu)?;
/// let y = Tensor::new(&[[0f32, 0., 2.]], &Device::Cpu)?;
/// assert_eq!(model.predict(&[x, y], 1)?[0].to_vec2::<u8>()?, vec![vec![1, 0, 1]]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct LogicalOr {
    name: Option<String>,
}

impl LogicalOr {
    /// Joins two or more masks of one shape.
    pub fn new() -> Self {
        Self::default()
    }
    /// The layer's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

impl Layer for LogicalOr {
    fn samples_independent(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "logical_or"
    }
    fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn output_shape(&self, input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        match input_shapes {
            [first, rest @ ..] if !rest.is_empty() && rest.iter().all(|s| s == first) => {
                Ok(first.clone())
            }
            _ => Err(Error::Graph(format!(
                "LogicalOr joins two or more masks of one shape, got shapes {input_shapes:?}"
            ))),
        }
    }
    fn call(&self, inputs: &[Tensor], _ctx: &mut CallContext) -> Result<Tensor> {
        let mut out = inputs[0].ne(0f64)?;
        for x in &inputs[1..] {
            out = out.maximum(&x.ne(0f64)?)?;
        }
        Ok(out)
    }
    fn compute_mask(
        &self,
        _inputs: &[Tensor],
        _masks: &[Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}
