//! The functional graph: symbolic tensors made by [`Input`] and by applying layers.
//!
//! A [`SymbolicTensor`] records which layer made it from which inputs; a model walks back from
//! its outputs to find the layers it runs, in order. Handles double as keys into a forward pass,
//! so an added loss can read any intermediate tensor.

use crate::error::{Error, Result};
use crate::layers::{CallContext, Layer};
use crate::model::Application;
use candle_core::{DType, Device, Tensor};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn next_id() -> usize {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// A layer that can be applied several times, sharing its weights.
///
/// ```
/// use kiln::prelude::*;
/// let (a, b) = (Input::new([4]), Input::new([4]));
/// let shared = Dense::new(2).shared();
/// let ya = shared.apply(&a)?;
/// let yb = shared.apply(&b)?;
/// let model = Model::new(&[a, b], &[ya, yb])?;
/// assert_eq!(model.weights().len(), 2); // one kernel, one bias
/// assert_eq!(model.output_names(), &["dense".to_string(), "dense_1".to_string()]);
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub struct SharedLayer {
    pub(crate) id: usize,
    pub(crate) layer: Arc<RwLock<Box<dyn Layer>>>,
    trainable: Arc<AtomicBool>,
}

impl SharedLayer {
    pub(crate) fn new(layer: Box<dyn Layer>) -> Self {
        Self {
            id: next_id(),
            layer: Arc::new(RwLock::new(layer)),
            trainable: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Freezes (`false`) or unfreezes the layer in every model that holds it, as Keras'
    /// `layer.trainable = …`.
    pub fn set_trainable(&self, trainable: bool) {
        self.trainable.store(trainable, Ordering::Relaxed);
    }

    /// Whether the layer is trainable (not frozen).
    pub fn is_trainable(&self) -> bool {
        self.trainable.load(Ordering::Relaxed)
    }

    /// The layer, to read or call: calls take `&self`, so the pieces of a `predict` batch
    /// run the same layer on several threads at once.
    pub(crate) fn lock(&self) -> RwLockReadGuard<'_, Box<dyn Layer>> {
        // A panic inside a layer cannot leave it half-updated in a way we rely on.
        self.layer.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The layer, to build or change.
    pub(crate) fn lock_mut(&self) -> RwLockWriteGuard<'_, Box<dyn Layer>> {
        self.layer.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the layer to one symbolic tensor.
    pub fn apply(&self, input: &SymbolicTensor) -> Result<SymbolicTensor> {
        self.apply_many(&[input])
    }

    /// Applies the layer to several symbolic tensors.
    pub fn apply_many(&self, inputs: &[&SymbolicTensor]) -> Result<SymbolicTensor> {
        self.apply_many_with_masks(inputs, &[])
    }

    /// Applies the layer to one tensor with an explicit mask, as Keras' `layer(x, mask=m)`:
    /// `mask` replaces the mask `input` carries. See [`SharedLayer::apply_many_with_masks`].
    ///
    /// # Errors
    /// As [`SharedLayer::apply_many_with_masks`].
    pub fn apply_with_mask(
        &self,
        input: &SymbolicTensor,
        mask: &SymbolicTensor,
    ) -> Result<SymbolicTensor> {
        self.apply_many_with_masks(&[input], &[Some(mask)])
    }

    /// Applies the layer to several tensors with explicit masks, one per input (`None` keeps
    /// the mask that input carries), as Keras' `layer(inputs, mask=[…])`.
    ///
    /// A mask is any tensor whose samples have the input's shape without its last (feature)
    /// axis: the [`SymbolicTensor::mask`] of another tensor, a model [`Input`] that the data
    /// fills, or a [`crate::layers::NotEqual`] of another input. Nonzero entries are kept. As in
    /// Keras, only layers that read masks take one ([`Layer::takes_mask`]: LSTM, GRU,
    /// GlobalAveragePooling1D, BatchNormalization), and the layer's output mask is computed from
    /// the explicit mask (an LSTM with `return_sequences` passes it on).
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let tokens = Input::named("tokens", [6]);
    /// let steps = Input::named("steps", [6, 3]);
    /// let keep = NotEqual::new(0.0).apply(&tokens)?; // the padding of another input
    /// let h = Lstm::new(4).return_sequences(true).shared().apply_with_mask(&steps, &keep)?;
    /// assert_eq!(h.mask().map(|m| m.shape().to_vec()), Some(vec![6]));
    /// assert!(Dense::new(2).shared().apply_with_mask(&steps, &keep).is_err()); // Dense reads no mask
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Graph`] when the layer cannot take inputs of these shapes, when masks are given
    /// to a layer that reads none, when their count differs from the inputs', or when a mask's
    /// shape is not its input's without the last axis.
    pub fn apply_many_with_masks(
        &self,
        inputs: &[&SymbolicTensor],
        masks: &[Option<&SymbolicTensor>],
    ) -> Result<SymbolicTensor> {
        let mut outputs = self.apply_within(inputs, masks, true, Vec::new())?;
        if outputs.len() != 1 {
            let layer = self.lock();
            return Err(Error::Graph(format!(
                "layer `{}` returns {} tensors (an LSTM or GRU with return_state returns its \
                 output and its states): apply it with apply_outputs, which returns them all",
                layer.given_name().unwrap_or(layer.kind()),
                outputs.len()
            )));
        }
        Ok(outputs.remove(0))
    }

    /// Applies a layer that returns several tensors (Keras' `out, h, c = lstm(x)` with
    /// `return_state=True`) and returns them all, in the layer's order; for any other layer,
    /// its one output. Recurrent layers read their initial states as the inputs after the
    /// sequence (Keras' `initial_state=[h, c]`).
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([5, 3]);
    /// let encoded = Lstm::new(4).return_state(true).shared().apply_outputs(&[&x])?;
    /// let (h, c) = (&encoded[1], &encoded[2]);
    /// assert_eq!((encoded[0].shape(), h.shape(), c.shape()), (&[4][..], &[4][..], &[4][..]));
    /// let y = Input::new([7, 2]);
    /// let decoded = Lstm::new(4).return_sequences(true).apply_outputs(&[&y, h, c])?;
    /// assert_eq!(decoded[0].shape(), &[7, 4]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`SharedLayer::apply_many_with_masks`].
    pub fn apply_outputs(&self, inputs: &[&SymbolicTensor]) -> Result<Vec<SymbolicTensor>> {
        self.apply_within(inputs, &[], true, Vec::new())
    }

    /// [`SharedLayer::apply_outputs`] with explicit masks, one per input (`None` keeps the mask
    /// that input carries): see [`SharedLayer::apply_many_with_masks`].
    ///
    /// # Errors
    /// As [`SharedLayer::apply_many_with_masks`].
    pub fn apply_outputs_with_masks(
        &self,
        inputs: &[&SymbolicTensor],
        masks: &[Option<&SymbolicTensor>],
    ) -> Result<Vec<SymbolicTensor>> {
        self.apply_within(inputs, masks, true, Vec::new())
    }

    /// [`SharedLayer::apply_many_with_masks`] for a layer of a nested model: `within` lists
    /// the nested model applications the new node belongs to, outermost first. `from_user`
    /// says the user gives these masks to this layer now, so it must read masks; otherwise
    /// the layer is applied again as part of a nested model, with the explicit masks it was
    /// given when that model was built (checked then) and the masks given to the model's
    /// application for the inputs the layer reads, which any layer takes as the masks its
    /// inputs carry (as Keras sets them on the nested model's inputs).
    pub(crate) fn apply_within(
        &self,
        inputs: &[&SymbolicTensor],
        masks: &[Option<&SymbolicTensor>],
        from_user: bool,
        within: Vec<Arc<Application>>,
    ) -> Result<Vec<SymbolicTensor>> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let layer = self.lock();
        let who = layer.given_name().unwrap_or(layer.kind()).to_string();
        let out_shapes = layer.output_shapes(&shapes).map_err(|e| match e {
            Error::Graph(m) => {
                Error::Graph(format!("{who} applied to inputs of shapes {shapes:?}: {m}"))
            }
            other => other,
        })?;
        if out_shapes.is_empty() {
            return Err(Error::Graph(format!(
                "layer `{who}` declares no output (its output_shapes is empty): a layer returns \
                 at least one tensor"
            )));
        }
        let explicit = masks.iter().any(Option::is_some);
        if explicit && from_user && !layer.takes_mask() {
            return Err(Error::Graph(format!(
                "layer `{who}` does not read a mask, so it cannot be given one (in Keras its call \
                 has no `mask` argument): give the mask to a layer that reads it (LSTM, GRU, \
                 GlobalAveragePooling1D, BatchNormalization); the other layers pass the mask of \
                 their input on"
            )));
        }
        if explicit && masks.len() != inputs.len() {
            return Err(Error::Graph(format!(
                "layer `{who}` takes {} inputs but was given {} masks: give one mask (or None) per \
                 input",
                inputs.len(),
                masks.len()
            )));
        }
        // The masks the layer sees: the explicit one, else the one its input carries.
        let mut seen: Vec<Option<Vec<usize>>> = Vec::with_capacity(inputs.len());
        for (i, x) in inputs.iter().enumerate() {
            match masks.get(i).copied().flatten() {
                Some(m) => {
                    let want = &x.shape()[..x.shape().len().saturating_sub(1)];
                    if m.shape() != want {
                        return Err(Error::Graph(format!(
                            "layer `{who}`: the mask given for input {i} has samples of shape \
                             {:?}, but an input of shape {:?} takes a mask of shape {want:?} (the \
                             input's shape without its feature axis)",
                            m.shape(),
                            x.shape()
                        )));
                    }
                    seen.push(Some(m.shape().to_vec()));
                }
                None => seen.push(x.0.mask.clone()),
            }
        }
        let out_masks = probe_masks(layer.as_ref(), &shapes, &seen)
            .map_err(|e| Error::Graph(format!("layer `{who}`: computing its output mask: {e}")))?;
        if out_masks.len() != out_shapes.len() {
            return Err(Error::Graph(format!(
                "layer `{who}` declares {} outputs but computes {} output masks: make \
                 output_shapes and compute_output_masks agree",
                out_shapes.len(),
                out_masks.len()
            )));
        }
        drop(layer);
        // Every output's id is known up front: the first output's node runs the layer and
        // says where the others go.
        let ids: Vec<usize> = out_shapes.iter().map(|_| next_id()).collect();
        let others = ids[1..]
            .iter()
            .zip(&out_shapes[1..])
            .map(|(id, s)| (*id, s.clone()))
            .collect();
        let mut shapes_masks = out_shapes.into_iter().zip(out_masks);
        let (shape, mask) = shapes_masks.next().expect("checked non-empty above");
        let first = SymbolicTensor(Arc::new(Node {
            id: ids[0],
            shape,
            mask,
            op: NodeOp::Layer {
                layer: self.clone(),
                inputs: inputs.iter().map(|t| (*t).clone()).collect(),
                masks: if explicit {
                    masks.iter().map(|m| m.cloned()).collect()
                } else {
                    Vec::new()
                },
                others,
            },
            within: within.clone(),
        }));
        let mut outputs = vec![first.clone()];
        for (index, ((shape, mask), id)) in shapes_masks.zip(&ids[1..]).enumerate() {
            outputs.push(SymbolicTensor(Arc::new(Node {
                id: *id,
                shape,
                mask,
                op: NodeOp::Output {
                    of: first.clone(),
                    index: index + 1,
                },
                within: within.clone(),
            })));
        }
        Ok(outputs)
    }
}

/// The shapes of a layer's output masks, one per output, found by running its
/// [`Layer::compute_output_masks`] on one sample of zeros with masks that keep everything:
/// whether a mask exists and its shape depend on the shapes and on which inputs carry masks,
/// never on the values, so one probe answers for every batch (as Keras computes masks on its
/// symbolic tensors).
fn probe_masks(
    layer: &dyn Layer,
    shapes: &[Vec<usize>],
    masks: &[Option<Vec<usize>>],
) -> Result<Vec<Option<Vec<usize>>>> {
    let dev = Device::Cpu;
    let batch = |s: &[usize]| [&[1usize][..], s].concat();
    let xs: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::zeros(batch(s), DType::F32, &dev))
        .collect::<std::result::Result<_, _>>()?;
    let ms: Vec<Option<Tensor>> = masks
        .iter()
        .map(|m| {
            m.as_ref()
                .map(|s| Tensor::ones(batch(s), DType::U8, &dev))
                .transpose()
        })
        .collect::<std::result::Result<_, _>>()?;
    Ok(layer
        .compute_output_masks(&xs, &ms)?
        .into_iter()
        .map(|m| m.map(|m| m.dims().get(1..).unwrap_or_default().to_vec()))
        .collect())
}

/// The mask a tensor carries, as a tensor of its own: what [`SymbolicTensor::mask`] gives.
struct MaskOf {
    shape: Vec<usize>,
}

impl Layer for MaskOf {
    fn samples_independent(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "mask"
    }
    fn given_name(&self) -> Option<&str> {
        None
    }
    fn output_shape(&self, _input_shapes: &[Vec<usize>]) -> Result<Vec<usize>> {
        Ok(self.shape.clone())
    }
    fn call(&self, inputs: &[Tensor], ctx: &mut CallContext) -> Result<Tensor> {
        // Called without masks, the tensor's mask is missing: the error below says so.
        self.call_with_masks(inputs, &[], ctx)
    }
    fn call_with_masks(
        &self,
        _inputs: &[Tensor],
        masks: &[Option<Tensor>],
        _ctx: &mut CallContext,
    ) -> Result<Tensor> {
        masks.first().cloned().flatten().ok_or_else(|| {
            Error::Graph(
                "the tensor whose mask was read carries none in this pass: a layer's \
                 compute_mask made a mask when the graph was built but not at run time; make \
                 both agree"
                    .into(),
            )
        })
    }
    fn compute_mask(
        &self,
        _inputs: &[Tensor],
        _masks: &[Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        // A mask carries no mask of its own.
        Ok(None)
    }
}

pub(crate) enum NodeOp {
    Input {
        name: Option<String>,
    },
    Layer {
        layer: SharedLayer,
        inputs: Vec<SymbolicTensor>,
        /// The explicit masks, one per input (`None`: the mask that input carries); empty
        /// when none was given.
        masks: Vec<Option<SymbolicTensor>>,
        /// The ids and sample shapes of the application's outputs after this, its first
        /// (an LSTM's states with `return_state`); empty for a layer of one output.
        others: Vec<(usize, Vec<usize>)>,
    },
    /// Output `index` (1 or more) of a layer application that returns several tensors: the
    /// step that makes `of`, its first output, makes this one too.
    Output {
        of: SymbolicTensor,
        index: usize,
    },
}

pub(crate) struct Node {
    pub(crate) id: usize,
    pub(crate) shape: Vec<usize>,
    /// The shape of the mask this tensor carries (batch axis left out), if it carries one.
    pub(crate) mask: Option<Vec<usize>>,
    pub(crate) op: NodeOp,
    /// The nested model applications this node was made by, outermost first (empty for a
    /// layer applied directly): see [`crate::Model::apply`].
    pub(crate) within: Vec<Arc<Application>>,
}

/// A tensor in the functional graph: its shape (without the batch axis) and how it is made.
/// Cloning is cheap and keeps the identity.
#[derive(Clone)]
pub struct SymbolicTensor(pub(crate) Arc<Node>);

impl SymbolicTensor {
    /// The shape of one sample (the batch axis left out).
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    /// A number unique to this tensor, the key of its value in a forward pass.
    pub fn id(&self) -> usize {
        self.0.id
    }

    /// The mask this tensor carries, as a tensor of 0/1 values whose samples have the mask's
    /// shape (Keras' `x._keras_mask`), or `None` when it carries none. Use it in an added loss,
    /// or pass it to another layer with [`SharedLayer::apply_with_mask`]. Each call adds a small
    /// layer (`mask`, `mask_1`, …) that reads the mask: call it once and keep the result.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let ids = Input::new([5]);
    /// let vectors = Embedding::new(10, 3).mask_zero(true).apply(&ids)?;
    /// assert_eq!(vectors.mask().unwrap().shape(), &[5]);
    /// let pooled = GlobalAveragePooling1D::new().apply(&vectors)?;
    /// assert!(pooled.mask().is_none()); // pooling over time drops the mask, as in Keras
    /// assert!(ids.mask().is_none());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn mask(&self) -> Option<SymbolicTensor> {
        let shape = self.0.mask.clone()?;
        let layer = SharedLayer::new(Box::new(MaskOf {
            shape: shape.clone(),
        }));
        Some(SymbolicTensor(Arc::new(Node {
            id: next_id(),
            shape,
            mask: None,
            op: NodeOp::Layer {
                layer,
                inputs: vec![self.clone()],
                masks: Vec::new(),
                others: Vec::new(),
            },
            within: Vec::new(),
        })))
    }

    /// The tensors this one is made from: the layer's inputs, then its explicit masks.
    pub(crate) fn parents(&self) -> Vec<&SymbolicTensor> {
        match &self.0.op {
            NodeOp::Input { .. } => Vec::new(),
            NodeOp::Layer { inputs, masks, .. } => {
                inputs.iter().chain(masks.iter().flatten()).collect()
            }
            NodeOp::Output { of, .. } => vec![of],
        }
    }

    /// The ids and sample shapes of the other outputs of the layer application whose first
    /// output this tensor is (empty for a layer of one output).
    pub(crate) fn others(&self) -> &[(usize, Vec<usize>)] {
        match &self.0.op {
            NodeOp::Layer { others, .. } => others,
            NodeOp::Input { .. } | NodeOp::Output { .. } => &[],
        }
    }

    /// The explicit masks of the layer application that made this tensor, one per input
    /// (empty when none was given).
    pub(crate) fn explicit_masks(&self) -> &[Option<SymbolicTensor>] {
        match &self.0.op {
            NodeOp::Input { .. } | NodeOp::Output { .. } => &[],
            NodeOp::Layer { masks, .. } => masks,
        }
    }
}

impl fmt::Debug for SymbolicTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.0.op {
            NodeOp::Input { name } => format!("input {}", name.as_deref().unwrap_or("")),
            NodeOp::Layer { layer, .. } => {
                let l = layer.lock();
                l.given_name().unwrap_or(l.kind()).to_string()
            }
            NodeOp::Output { of, index } => format!("output {index} of #{}", of.id()),
        };
        write!(
            f,
            "SymbolicTensor(#{} {what} {:?})",
            self.0.id, self.0.shape
        )
    }
}

/// Where data enters a model.
pub struct Input;

impl Input {
    /// A model input whose samples have `shape` (the batch axis left out).
    ///
    /// ```
    /// let x = kiln::Input::new([28, 28]);
    /// assert_eq!(x.shape(), &[28, 28]);
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new(shape: impl Into<Vec<usize>>) -> SymbolicTensor {
        Self::build(shape.into(), None)
    }

    /// A named model input.
    ///
    /// ```
    /// let x = kiln::Input::named("pixels", [64]);
    /// assert_eq!(x.shape(), &[64]);
    /// ```
    pub fn named(name: impl Into<String>, shape: impl Into<Vec<usize>>) -> SymbolicTensor {
        Self::build(shape.into(), Some(name.into()))
    }

    fn build(shape: Vec<usize>, name: Option<String>) -> SymbolicTensor {
        SymbolicTensor(Arc::new(Node {
            id: next_id(),
            shape,
            mask: None,
            op: NodeOp::Input { name },
            within: Vec::new(),
        }))
    }
}
