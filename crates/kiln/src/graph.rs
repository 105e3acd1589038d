//! The functional graph: symbolic tensors made by [`Input`] and by applying layers.
//!
//! A [`SymbolicTensor`] records which layer made it from which inputs; a model walks back from
//! its outputs to find the layers it runs, in order. Handles double as keys into a forward pass,
//! so an added loss can read any intermediate tensor.

use crate::error::{Error, Result};
use crate::layers::Layer;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn next_id() -> usize {
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
    pub(crate) layer: Arc<Mutex<Box<dyn Layer>>>,
    trainable: Arc<AtomicBool>,
}

impl SharedLayer {
    pub(crate) fn new(layer: Box<dyn Layer>) -> Self {
        Self {
            id: next_id(),
            layer: Arc::new(Mutex::new(layer)),
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

    pub(crate) fn lock(&self) -> MutexGuard<'_, Box<dyn Layer>> {
        // A panic inside a layer cannot leave it half-updated in a way we rely on.
        self.layer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the layer to one symbolic tensor.
    pub fn apply(&self, input: &SymbolicTensor) -> Result<SymbolicTensor> {
        self.apply_many(&[input])
    }

    /// Applies the layer to several symbolic tensors.
    pub fn apply_many(&self, inputs: &[&SymbolicTensor]) -> Result<SymbolicTensor> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let layer = self.lock();
        let shape = layer.output_shape(&shapes).map_err(|e| match e {
            Error::Graph(m) => Error::Graph(format!(
                "{} applied to inputs of shapes {shapes:?}: {m}",
                layer.given_name().unwrap_or(layer.kind())
            )),
            other => other,
        })?;
        drop(layer);
        Ok(SymbolicTensor(Arc::new(Node {
            id: next_id(),
            shape,
            op: NodeOp::Layer {
                layer: self.clone(),
                inputs: inputs.iter().map(|t| (*t).clone()).collect(),
            },
        })))
    }
}

pub(crate) enum NodeOp {
    Input {
        name: Option<String>,
    },
    Layer {
        layer: SharedLayer,
        inputs: Vec<SymbolicTensor>,
    },
}

pub(crate) struct Node {
    pub(crate) id: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) op: NodeOp,
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

    pub(crate) fn parents(&self) -> &[SymbolicTensor] {
        match &self.0.op {
            NodeOp::Input { .. } => &[],
            NodeOp::Layer { inputs, .. } => inputs,
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
            op: NodeOp::Input { name },
        }))
    }
}
