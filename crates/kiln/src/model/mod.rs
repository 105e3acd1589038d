//! Models: the functional graph made runnable, `Sequential`, compile, fit, evaluate, predict.

mod added;
mod compile;
pub(crate) mod contract;
mod history;
mod manual;
mod nested;
mod progress;
mod sequential;
mod summary;
pub(crate) mod term_gradients;
mod train;

pub use added::{AddedLoss, Tensors};
pub(crate) use compile::not_compiled;
pub use compile::{Compile, ProbabilityRule};
pub use history::{History, Logs};
pub use manual::BatchGradients;
pub(crate) use nested::Application;
pub(crate) use nested::ModelScope;
use nested::Nesting;
pub use sequential::Sequential;
pub use term_gradients::{TermGradient, TermGradients};
pub use train::{Fit, SharedCallback};

use crate::error::{Error, Result};
use crate::graph::{NodeOp, SharedLayer, SymbolicTensor};
use crate::layers::{BuildContext, CallContext, Weight};
use crate::random::{SampleStreams, StepRandom};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// One layer application in execution order.
struct Step {
    node: SymbolicTensor,
    layer: SharedLayer,
    layer_name: String,
    inputs: Vec<usize>,
    /// The explicit masks' ids, one per input (`None`: the input's own mask); empty if none.
    masks: Vec<Option<usize>>,
}

/// A model: a graph of layers from inputs to named outputs, plus its added losses and, once
/// compiled, its optimizer and compile-time losses.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([4]);
/// let h = Dense::new(8).activation(Activation::Relu).apply(&x)?;
/// let y = Dense::new(2).with_name("out").apply(&h)?;
/// let model = Model::new(&[x], &[y])?;
/// assert_eq!(model.output_names(), &["out".to_string()]);
/// assert_eq!(model.weights().len(), 4);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct Model {
    inputs: Vec<SymbolicTensor>,
    outputs: Vec<SymbolicTensor>,
    output_names: Vec<String>,
    input_names: Vec<String>,
    steps: Vec<Step>,
    layers: Vec<(String, SharedLayer)>,
    device: Device,
    dtype: DType,
    added: Vec<(String, Arc<dyn AddedLoss>)>,
    pub(crate) compiled: Option<compile::Compiled>,
    /// The callbacks' states at the current epoch end, for checkpoints.
    pub(crate) callback_states: Vec<Option<serde_json::Value>>,
    /// The callbacks' tensors at the current epoch end (early stopping's best weights).
    pub(crate) callback_tensors: Vec<Vec<(String, Tensor)>>,
    /// Whether a callback has asked `fit` to stop (Keras' `stop_training`), so that a
    /// checkpoint written at that epoch records the run as finished.
    pub(crate) stop_requested: bool,
    /// What run file and data trained this model, recorded in its checkpoints.
    pub(crate) run_identity: Option<serde_json::Value>,
    /// Whether training steps run split across kiln's pool or on one thread.
    pub(crate) thread_choice: crate::runtime::ThreadChoice,
    /// The global batch of the data-parallel step under way (`None` outside one).
    pub(crate) shard: Option<crate::distributed::StepShard>,
    /// The Keras file this model was imported from, for [`Model::save_keras`].
    pub(crate) keras: Option<Arc<crate::keras::Source>>,
    /// Per step, whether the next step is a ReLU layer that reads this step's output alone and
    /// that the step may apply itself ([`relu_fusions`]).
    relu_follows: Vec<bool>,
    /// The model as a layer of others ([`Model::apply`]).
    pub(crate) scope: Arc<ModelScope>,
    /// The models applied in this one, by name.
    pub(crate) nesting: Nesting,
    /// Per layer id, what goes before its weights' names: `<model>/` for a nested model's.
    weight_prefix: HashMap<usize, String>,
    /// Whether `train_on_batch` records gradient diagnostics ([`Model::set_gradient_diagnostics`]).
    pub(crate) batch_diagnostics: bool,
}

/// A model prints its inputs, layers, outputs, weights count and whether it is compiled; see
/// [`Model::summary`] for the whole table. `Model` is not `Clone`: a copy would share the
/// weights' storage with the original (candle variables), so that training one would train
/// both; build a second model from the same graph instead (`Model::builder(..).build()`).
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("inputs", &self.input_names)
            .field("layers", &self.layer_names())
            .field("outputs", &self.output_names)
            .field("weights", &self.weights().len())
            .field("frozen_layers", &self.frozen_layers())
            .field(
                "nested_models",
                &self
                    .nesting
                    .models
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field(
                "added_losses",
                &self
                    .added
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("compiled", &self.compiled.is_some())
            .finish()
    }
}

/// Options for building a [`Model`]: seed, device, dtype.
///
/// ```
/// use kiln::prelude::*;
/// let x = Input::new([2]);
/// let y = Dense::new(1).apply(&x)?;
/// let a = Model::builder(&[x.clone()], &[y.clone()]).seed(7).build()?;
/// let w = a.weights()[0].var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
/// let b = Model::builder(&[x], &[y]).seed(7).build()?;
/// assert_eq!(w, b.weights()[0].var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), kiln::Error>(())
/// ```
pub struct ModelBuilder {
    name: Option<String>,
    inputs: Vec<SymbolicTensor>,
    outputs: Vec<SymbolicTensor>,
    seed: u64,
    device: Device,
    dtype: DType,
}

impl ModelBuilder {
    /// The model's name (Keras' `name=`): what it is called where it is applied in another
    /// model ([`Model::apply`]), before its layers' and weights' names there.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The seed weights are drawn from (default 0): the same seed gives the same model.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// The device the weights live on (default CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
    /// The dtype of the weights (default f32).
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
    /// Builds the model, creating every layer's weights.
    ///
    /// # Errors
    /// As [`Model::new`].
    pub fn build(self) -> Result<Model> {
        Model::assemble(self)
    }
}

impl Model {
    /// A model from inputs to outputs, built on the CPU in f32 with seed 0. Pass the symbolic
    /// tensors by value (`&[x]`) or, to keep using them, by reference (`&[&x]`).
    ///
    /// # Errors
    /// [`Error::Graph`] when an output depends on an input not listed, an input is listed
    /// twice, two layers share a name, or a layer cannot be built for its input shapes.
    pub fn new<I, O>(inputs: &[I], outputs: &[O]) -> Result<Model>
    where
        I: Borrow<SymbolicTensor>,
        O: Borrow<SymbolicTensor>,
    {
        Self::builder(inputs, outputs).build()
    }

    /// A builder for a model with a chosen seed, device or dtype.
    pub fn builder<I, O>(inputs: &[I], outputs: &[O]) -> ModelBuilder
    where
        I: Borrow<SymbolicTensor>,
        O: Borrow<SymbolicTensor>,
    {
        ModelBuilder {
            name: None,
            inputs: inputs.iter().map(|t| t.borrow().clone()).collect(),
            outputs: outputs.iter().map(|t| t.borrow().clone()).collect(),
            seed: 0,
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    fn assemble(b: ModelBuilder) -> Result<Model> {
        if b.inputs.is_empty() || b.outputs.is_empty() {
            return Err(Error::Graph(
                "a model needs at least one input and one output".into(),
            ));
        }
        let input_ids: HashSet<usize> = b.inputs.iter().map(|t| t.id()).collect();
        if input_ids.len() != b.inputs.len() {
            return Err(Error::Graph("the same input is listed twice".into()));
        }
        // Depth-first, parents before children: an execution order.
        let mut order: Vec<SymbolicTensor> = Vec::new();
        let mut seen = HashSet::new();
        fn visit(
            t: &SymbolicTensor,
            inputs: &HashSet<usize>,
            seen: &mut HashSet<usize>,
            order: &mut Vec<SymbolicTensor>,
        ) -> Result<()> {
            if !seen.insert(t.id()) {
                return Ok(());
            }
            if let NodeOp::Input { name } = &t.0.op {
                if !inputs.contains(&t.id()) {
                    return Err(Error::Graph(format!(
                        "an output depends on input {} ({:?}) that was not passed to Model::new",
                        name.as_deref().unwrap_or("(unnamed)"),
                        t.shape()
                    )));
                }
                return Ok(());
            }
            for p in t.parents() {
                visit(p, inputs, seen, order)?;
            }
            order.push(t.clone());
            Ok(())
        }
        for out in &b.outputs {
            visit(out, &input_ids, &mut seen, &mut order)?;
        }

        // Name layers: the given name, or `<kind>`, `<kind>_1`, … in execution order.
        let mut names: HashMap<usize, String> = HashMap::new();
        let mut layers: Vec<(String, SharedLayer)> = Vec::new();
        let mut taken: HashSet<String> = HashSet::new();
        // Given names are reserved up front so an automatic name never takes one.
        let given: HashSet<String> = order
            .iter()
            .filter_map(|t| match (&t.0.op, t.0.within.first()) {
                (_, Some(app)) => app.scope.given_name.clone(),
                (NodeOp::Layer { layer, .. }, None) => {
                    layer.lock().given_name().map(str::to_string)
                }
                (NodeOp::Input { .. } | NodeOp::Output { .. }, None) => None,
            })
            .collect();
        let mut next_suffix: HashMap<&'static str, usize> = HashMap::new();
        // Nested models take a name as a layer does; their layers, `<model>/<layer>`.
        let mut scope_names: HashMap<usize, String> = HashMap::new();
        let mut nested_models: Vec<(String, Arc<ModelScope>)> = Vec::new();
        let mut weight_prefix: HashMap<usize, String> = HashMap::new();
        let mut unique = |wanted: Option<&str>,
                          kind: &'static str,
                          taken: &mut HashSet<String>|
         -> Result<String> {
            match wanted {
                Some(n) => {
                    if !taken.insert(n.to_string()) {
                        return Err(Error::Graph(format!(
                            "two layers are named `{n}`: layer names must be unique in a model"
                        )));
                    }
                    Ok(n.to_string())
                }
                None => loop {
                    let k = next_suffix.entry(kind).or_insert(0);
                    let candidate = if *k == 0 {
                        kind.to_string()
                    } else {
                        format!("{kind}_{k}")
                    };
                    *k += 1;
                    if !taken.contains(&candidate) && !given.contains(&candidate) {
                        taken.insert(candidate.clone());
                        break Ok(candidate);
                    }
                },
            }
        };
        for t in &order {
            let NodeOp::Layer { layer, .. } = &t.0.op else {
                continue;
            };
            if names.contains_key(&layer.id) {
                continue;
            }
            if let Some(app) = t.0.within.first() {
                let scope = &app.scope;
                let model = match scope_names.get(&scope.id) {
                    Some(n) => n.clone(),
                    None => {
                        let n = unique(scope.given_name.as_deref(), ModelScope::KIND, &mut taken)?;
                        scope_names.insert(scope.id, n.clone());
                        nested_models.push((n.clone(), scope.clone()));
                        n
                    }
                };
                let (inner, prefix) = &scope.names[&layer.id];
                let name = format!("{model}/{inner}");
                taken.insert(name.clone());
                weight_prefix.insert(layer.id, format!("{model}/{prefix}"));
                names.insert(layer.id, name.clone());
                layers.push((name, layer.clone()));
                continue;
            }
            let guard = layer.lock();
            let name = unique(guard.given_name(), guard.kind(), &mut taken)?;
            drop(guard);
            names.insert(layer.id, name.clone());
            layers.push((name, layer.clone()));
        }

        // Keras' order (`model.layers`, hence `model.weights` and `get_weights`).
        // A nested model is one layer there, its own layers in its own order.
        let rank = keras_layer_order(&b.outputs, &input_ids);
        let place = |l: &SharedLayer| -> (usize, usize) {
            match nested_models
                .iter()
                .find(|(_, s)| s.names.contains_key(&l.id))
            {
                Some((_, s)) => (
                    rank.get(&s.id).copied().unwrap_or(usize::MAX),
                    s.layers.iter().position(|x| x.id == l.id).unwrap_or(0),
                ),
                None => (rank.get(&l.id).copied().unwrap_or(usize::MAX), 0),
            }
        };
        layers.sort_by_key(|(_, l)| place(l));

        // Build every layer once, from the shapes of its first application.
        let mut rng = StdRng::seed_from_u64(b.seed);
        let mut built = HashSet::new();
        crate::initializers::begin_model();
        let mut steps = Vec::new();
        for t in &order {
            let NodeOp::Layer { layer, inputs, .. } = &t.0.op else {
                continue;
            };
            let name = names[&layer.id].clone();
            // A layer that already has weights belongs to another model too: share them. A
            // nested model's layers were built with it.
            if built.insert(layer.id) && t.0.within.is_empty() && layer.lock().weights().is_empty()
            {
                let shapes: Vec<Vec<usize>> = inputs.iter().map(|i| i.shape().to_vec()).collect();
                let mut ctx = BuildContext {
                    device: &b.device,
                    dtype: b.dtype,
                    rng: &mut rng,
                };
                crate::initializers::building_layer(Some(&name));
                let result = layer.lock_mut().build(&name, &shapes, &mut ctx);
                crate::initializers::building_layer(None);
                result?;
            }
            steps.push(Step {
                node: t.clone(),
                layer: layer.clone(),
                layer_name: name,
                inputs: inputs.iter().map(|i| i.id()).collect(),
                masks: t
                    .explicit_masks()
                    .iter()
                    .map(|m| m.as_ref().map(SymbolicTensor::id))
                    .collect(),
            });
        }

        let input_names: Vec<String> = b
            .inputs
            .iter()
            .enumerate()
            .map(|(i, t)| match &t.0.op {
                NodeOp::Input { name: Some(n) } => n.clone(),
                _ if i == 0 => "input".to_string(),
                _ => format!("input_{i}"),
            })
            .collect();
        let mut output_names = Vec::new();
        for out in &b.outputs {
            // As in Keras, an output a nested model makes is named by the model.
            let name = match (&out.0.op, out.0.within.first()) {
                (_, Some(app)) if app.output_ids().contains(&out.id()) => {
                    scope_names[&app.scope.id].clone()
                }
                (NodeOp::Layer { layer, .. }, _) => names[&layer.id].clone(),
                // A layer's later output (an LSTM's state) is named by the layer too.
                (NodeOp::Output { of, .. }, _) => match &of.0.op {
                    NodeOp::Layer { layer, .. } => names[&layer.id].clone(),
                    _ => unreachable!("an output's source is a layer application"),
                },
                (NodeOp::Input { .. }, _) => {
                    let i = b
                        .inputs
                        .iter()
                        .position(|t| t.id() == out.id())
                        .expect("checked above");
                    input_names[i].clone()
                }
            };
            // A shared layer making two outputs: the later ones get a numbered name.
            let mut unique = name.clone();
            let mut k = 1;
            while output_names.contains(&unique) || (unique != name && taken.contains(&unique)) {
                unique = format!("{name}_{k}");
                k += 1;
            }
            output_names.push(unique);
        }

        let relu_follows = relu_fusions(&steps, &b.outputs);
        let added = nested::nested_terms(&order, &scope_names);
        let view = GraphView::new(&b.inputs, &input_names, &steps, &b.outputs, &scope_names);
        let scope = Arc::new(ModelScope {
            view,
            id: crate::graph::next_id(),
            given_name: b.name,
            output_names: output_names.clone(),
            outputs: b.outputs.clone(),
            names: layers
                .iter()
                .map(|(n, l)| {
                    let prefix = weight_prefix.get(&l.id).cloned().unwrap_or_default();
                    (l.id, (n.clone(), prefix))
                })
                .collect(),
            layers: layers.iter().map(|(_, l)| l.clone()).collect(),
        });
        Ok(Model {
            scope,
            nesting: Nesting {
                models: nested_models,
            },
            weight_prefix,
            relu_follows,
            inputs: b.inputs,
            outputs: b.outputs,
            output_names,
            input_names,
            steps,
            layers,
            device: b.device,
            dtype: b.dtype,
            added,
            compiled: None,
            callback_states: Vec::new(),
            callback_tensors: Vec::new(),
            stop_requested: false,
            run_identity: None,
            thread_choice: Default::default(),
            shard: None,
            keras: None,
            batch_diagnostics: false,
        })
    }

    /// The outputs' names, in order: the names of the layers that make them.
    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// The inputs' names, in order.
    pub fn input_names(&self) -> &[String] {
        &self.input_names
    }

    /// The inputs' sample shapes (without the batch axis), in order.
    pub(crate) fn input_shapes(&self) -> Vec<Vec<usize>> {
        self.inputs.iter().map(|x| x.shape().to_vec()).collect()
    }

    /// The layers' names, in Keras' `model.layers` order: by depth from the outputs, deepest
    /// first (the execution order, for a chain of layers).
    pub fn layer_names(&self) -> Vec<&str> {
        self.layers.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The symbolic output of the layer named `name` (its first application), for added losses.
    ///
    /// # Errors
    /// [`Error::Graph`] when there is no such layer; the message lists them.
    pub fn layer_output(&self, name: &str) -> Result<SymbolicTensor> {
        self.steps
            .iter()
            .find(|s| s.layer_name == name)
            .map(|s| s.node.clone())
            .ok_or_else(|| self.no_layer(name))
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the model's weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every weight, in layer order (Keras' `model.weights`): its name `<layer>/<weight>`, its
    /// shape, whether it is trainable (its layer not frozen), its regularizer and its variable.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let y = BatchNormalization::new().with_name("bn").apply(&Dense::new(3).apply(&x)?)?;
    /// let model = Model::new(&[x], &[y])?;
    /// let listed: Vec<(String, Vec<usize>, bool)> = model
    ///     .weights()
    ///     .iter()
    ///     .map(|w| (w.name.clone(), w.shape().to_vec(), w.trainable()))
    ///     .collect();
    /// assert_eq!(listed[0], ("dense/kernel".to_string(), vec![4, 3], true));
    /// assert_eq!(listed[5], ("bn/moving_variance".to_string(), vec![3], false));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn weights(&self) -> Vec<Weight> {
        self.layers
            .iter()
            .flat_map(|(_, l)| {
                let trainable = l.is_trainable();
                let prefix = self.weight_prefix.get(&l.id).map(String::as_str);
                l.lock().weights().into_iter().map(move |mut w| {
                    if let Some(p) = prefix {
                        w.name = format!("{p}{}", w.name);
                    }
                    w.frozen_unless(trainable)
                })
            })
            .collect()
    }

    /// The weights the optimizer updates (Keras' `trainable_weights`).
    pub fn trainable_weights(&self) -> Vec<Weight> {
        self.weights()
            .into_iter()
            .filter(Weight::trainable)
            .collect()
    }

    /// The weights it does not: frozen layers' and state such as moving statistics (Keras'
    /// `non_trainable_weights`).
    pub fn non_trainable_weights(&self) -> Vec<Weight> {
        self.weights()
            .into_iter()
            .filter(|w| !w.trainable())
            .collect()
    }

    /// Freezes (`false`) or unfreezes the layer named `layer`, as Keras' `layer.trainable = …`:
    /// its weights get no update from any optimizer (the fused Adam and Dense kernels
    /// included) and add no regularization term, and a frozen BatchNormalization runs in
    /// inference mode. Takes effect at the next step, without compiling again; a layer shared
    /// with another model is frozen there too.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let h = Dense::new(8).with_name("base").apply(&x)?;
    /// let y = Dense::new(1).with_name("head").apply(&h)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.set_trainable("base", false)?;
    /// assert_eq!(model.trainable_weights().len(), 2); // head/kernel, head/bias
    /// assert!(model.set_trainable("nope", false).is_err());
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Graph`] when the model has no layer of that name; the message lists them.
    pub fn set_trainable(&mut self, layer: &str, trainable: bool) -> Result<()> {
        if let Some(scope) = self.nesting.find(layer) {
            for l in &scope.layers {
                l.set_trainable(trainable);
            }
            return Ok(());
        }
        let (_, l) = self
            .layers
            .iter()
            .find(|(n, _)| n == layer)
            .ok_or_else(|| self.no_layer(layer))?;
        l.set_trainable(trainable);
        Ok(())
    }

    /// Whether the layer named `layer` is trainable (not frozen).
    ///
    /// # Errors
    /// [`Error::Graph`] when the model has no layer of that name.
    pub fn is_trainable(&self, layer: &str) -> Result<bool> {
        if let Some(scope) = self.nesting.find(layer) {
            return Ok(scope.layers.iter().all(SharedLayer::is_trainable));
        }
        self.layers
            .iter()
            .find(|(n, _)| n == layer)
            .map(|(_, l)| l.is_trainable())
            .ok_or_else(|| self.no_layer(layer))
    }

    /// The names of the frozen layers, in layer order.
    pub(crate) fn frozen_layers(&self) -> Vec<String> {
        self.layers
            .iter()
            .filter(|(_, l)| !l.is_trainable())
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn no_layer(&self, name: &str) -> Error {
        Error::Graph(format!(
            "the model has no layer `{name}`; its layers are {:?}",
            self.layer_names()
        ))
    }

    /// Each parameter's constraint, by the weight that owns it (the trainer applies them after
    /// every update, in one place for every optimizer and for data-parallel training).
    pub(crate) fn constraints_of(
        &self,
        params: &[candle_core::Var],
    ) -> Vec<Option<crate::constraints::Constraint>> {
        let weights = self.weights();
        params
            .iter()
            .map(|p| {
                let id = p.as_tensor().id();
                weights
                    .iter()
                    .find(|w| w.var.as_tensor().id() == id)
                    .and_then(|w| w.constraint.clone())
            })
            .collect()
    }

    /// The weight named `<layer>/<weight>`, such as `dense/kernel`.
    ///
    /// # Errors
    /// [`Error::Graph`] when there is no such weight; the message lists them.
    pub fn weight(&self, name: &str) -> Result<Weight> {
        self.weights()
            .into_iter()
            .find(|w| w.name == name)
            .ok_or_else(|| {
                let known: Vec<String> = self.weights().into_iter().map(|w| w.name).collect();
                Error::Graph(format!(
                    "the model has no weight `{name}`; its weights are {known:?}"
                ))
            })
    }

    /// Adds a named loss term computed from the model's own tensors at every step: any
    /// intermediate tensor, the weights, the inputs and targets. It is summed into the total as
    /// it is (no loss weight) and reported under its name. The closure's argument needs no
    /// type annotation. It must return a scalar: reduce per-sample values yourself
    /// (`mean_all()`), so that the term does not grow with the batch size.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let hidden = Dense::new(8).activation(Activation::Relu).apply(&x)?;
    /// let y = Dense::new(1).apply(&hidden)?;
    /// let mut model = Model::new(&[&x], &[&y])?;
    /// model.add_loss("sparsity", move |t| Ok((t.get(&hidden)?.abs()?.mean_all()? * 1e-3)?))?;
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Compile`] when the name is empty, `loss`, starts with `val_` or is taken.
    /// At each step, [`Error::AddedLossShape`] when the closure returns more than one value.
    pub fn add_loss<F>(&mut self, name: impl Into<String>, loss: F) -> Result<()>
    where
        F: Fn(&Tensors) -> Result<Tensor> + Send + Sync + 'static,
    {
        self.add_loss_term(name, loss)
    }

    /// Adds a term that is not a closure: an [`crate::adversarial::Adversarial`] regularizer,
    /// or your own [`AddedLoss`].
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(1).apply(&x)?;
    /// let mut model = Model::new(&[x], &[y])?;
    /// model.add_loss_term("adversarial", Adversarial::fgsm(0.05).multiplier(0.5))?;
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Model::add_loss`].
    pub fn add_loss_term(
        &mut self,
        name: impl Into<String>,
        loss: impl AddedLoss + 'static,
    ) -> Result<()> {
        let name = name.into();
        if name.is_empty() || name == "loss" || name.starts_with("val_") {
            return Err(Error::Compile(format!(
                "add_loss: `{name}` cannot name a term: use a non-empty name other than `loss` that \
                 does not start with `val_`"
            )));
        }
        if self.added.iter().any(|(n, _)| *n == name) {
            return Err(Error::Compile(format!(
                "add_loss: a term named `{name}` was already added"
            )));
        }
        self.added.push((name, Arc::new(loss)));
        Ok(())
    }

    /// The names of the terms added with [`Model::add_loss`].
    pub(crate) fn added_term_names(&self) -> Vec<&str> {
        self.added.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The layers given an explicit mask ([`SharedLayer::apply_with_mask`]) and the nested
    /// models applied with one ([`Model::apply_with_mask`]), by name, each once.
    pub(crate) fn explicitly_masked_layers(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for step in &self.steps {
            let app = step.node.0.within.first();
            let name = match app {
                Some(app) if app.masks.iter().any(Option::is_some) => self
                    .nesting
                    .models
                    .iter()
                    .find(|(_, s)| s.id == app.scope.id)
                    .map_or(step.layer_name.as_str(), |(n, _)| n.as_str()),
                _ if step.masks.iter().any(Option::is_some) => step.layer_name.as_str(),
                _ => continue,
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// The graph as a list, for export: see [`GraphView`].
    pub(crate) fn graph_view(&self) -> &GraphView {
        &self.scope.view
    }

    /// Runs the graph on a batch: one forward pass of the step whose randomness is `random`
    /// (each pass draws its own masks; a data-parallel rank's samples keep their index in the
    /// global batch).
    pub(crate) fn run(
        &self,
        inputs: &[Tensor],
        training: bool,
        random: &mut StepRandom,
    ) -> Result<ForwardPass> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Data(format!(
                "the model takes {} inputs ({:?}) but got {}",
                self.inputs.len(),
                self.input_names,
                inputs.len()
            )));
        }
        let mut pass = ForwardPass::default();
        let keys = random.next_pass();
        let first_row = self.shard.as_ref().map_or(0, |s| s.first_row());
        // Added terms may read any intermediate tensor, so no output is skipped when there are.
        let may_fuse = self.added.is_empty();
        let mut skip_next = false;
        for ((sym, x), name) in self.inputs.iter().zip(inputs).zip(&self.input_names) {
            if x.rank() == 0 || &x.dims()[1..] != sym.shape() {
                return Err(Error::Data(format!(
                    "input `{name}` expects samples of shape {:?} (batch first), got a tensor of shape {:?}",
                    sym.shape(),
                    x.dims()
                )));
            }
            pass.values.insert(sym.id(), x.to_dtype(self.dtype)?);
        }
        for (i, step) in self.steps.iter().enumerate() {
            if std::mem::take(&mut skip_next) {
                continue;
            }
            let xs: Vec<Tensor> = step
                .inputs
                .iter()
                .map(|id| pass.values[id].clone())
                .collect();
            // An explicit mask replaces the input's own (nonzero = kept, as Keras' bool masks).
            let masks: Vec<Option<Tensor>> = step
                .inputs
                .iter()
                .enumerate()
                .map(|(i, id)| match step.masks.get(i).copied().flatten() {
                    Some(m) => Ok(Some(pass.values[&m].ne(0.0)?)),
                    None => Ok(pass.masks.get(id).cloned()),
                })
                .collect::<Result<_>>()?;
            let layer = step.layer.lock();
            let mut ctx = CallContext::new(training, keys.streams(&step.layer_name, i, first_row));
            ctx.layer_trainable = step.layer.is_trainable();
            ctx.ranks = self.shard.as_ref().map(|s| s.communicator().clone());
            ctx.relu_follows = may_fuse && self.relu_follows[i];
            let failed = |e| match e {
                Error::Candle(c) => {
                    Error::Graph(format!("layer `{}` failed: {c}", step.layer_name))
                }
                other => other,
            };
            let others = step.node.others();
            let mut ys = if others.is_empty() {
                vec![layer
                    .call_with_masks(&xs, &masks, &mut ctx)
                    .map_err(failed)?]
            } else {
                layer.call_outputs(&xs, &masks, &mut ctx).map_err(failed)?
            };
            if ys.len() != others.len() + 1 {
                return Err(Error::Graph(format!(
                    "layer `{}` returned {} tensors but declared {} outputs when it was applied: \
                     make call_outputs and output_shapes agree",
                    step.layer_name,
                    ys.len(),
                    others.len() + 1
                )));
            }
            let added = std::mem::take(&mut ctx.added);
            let ids: Vec<usize> = std::iter::once(step.node.id())
                .chain(others.iter().map(|(id, _)| *id))
                .collect();
            let out_masks = if others.is_empty() {
                vec![layer.compute_mask(&xs, &masks)?]
            } else {
                layer.compute_output_masks(&xs, &masks)?
            };
            for (id, mask) in ids.iter().zip(out_masks) {
                if let Some(mask) = mask {
                    pass.masks.insert(*id, mask);
                }
            }
            if let Some(reg) = layer.activity_regularizer() {
                // Keras 3 penalizes every output of the layer, each divided by the batch size.
                for y in &ys {
                    let batch = y.dims().first().copied().unwrap_or(1).max(1);
                    let value = (reg.penalty(y)? / batch as f64)?;
                    pass.layer_losses
                        .push((format!("activity_{}", reg.name()), value));
                }
            }
            pass.layer_losses.extend(added);
            for (id, y) in ids[1..].iter().zip(ys.drain(1..)) {
                pass.values.insert(*id, y);
            }
            let y = ys.remove(0);
            let mut node = step.node.id();
            if ctx.relu_applied {
                // The output is the ReLU layer's, which keeps the mask; this step's own output
                // is read by nothing else.
                node = self.steps[i + 1].node.id();
                if let Some(mask) = pass.masks.get(&step.node.id()).cloned() {
                    pass.masks.insert(node, mask);
                }
                skip_next = true;
            }
            pass.values.insert(node, y);
        }
        Ok(pass)
    }

    /// The step that makes output `output`, if a layer makes it (not an input passed through).
    fn output_step(&self, output: usize) -> Option<&Step> {
        let id = self.outputs[output].id();
        self.steps.iter().find(|s| s.node.id() == id)
    }

    /// The activation the layer making output `output` ends in, if it has one.
    pub(crate) fn output_activation(&self, output: usize) -> Option<crate::Activation> {
        self.output_step(output)?.layer.lock().final_activation()
    }

    /// The output `output` of a forward pass before its layer's final activation (the logits
    /// behind a softmax or sigmoid), computed again from the layer's inputs in the pass (Dense
    /// and Activation layers do not depend on the training flag).
    pub(crate) fn output_logits(&self, pass: &ForwardPass, output: usize) -> Result<Tensor> {
        let step = self.output_step(output).ok_or_else(|| {
            Error::State(format!(
                "output `{}` is not made by a layer",
                self.output_names[output]
            ))
        })?;
        let xs: Vec<Tensor> = step
            .inputs
            .iter()
            .map(|id| pass.values[id].clone())
            .collect();
        let mut ctx = CallContext::new(false, SampleStreams::new(0, 0));
        ctx.layer_trainable = step.layer.is_trainable();
        let layer = step.layer.lock();
        layer.call_before_activation(&xs, &mut ctx)
    }

    /// The output tensors of a forward pass, in output order.
    pub(crate) fn outputs_of<'p>(&self, pass: &'p ForwardPass) -> Vec<&'p Tensor> {
        self.outputs.iter().map(|o| &pass.values[&o.id()]).collect()
    }

    /// The masks that reach each output, if any.
    pub(crate) fn output_masks<'p>(&self, pass: &'p ForwardPass) -> Vec<Option<&'p Tensor>> {
        self.outputs
            .iter()
            .map(|o| pass.masks.get(&o.id()))
            .collect()
    }

    /// Runs the model on inputs in inference mode, in batches, and returns one tensor per output.
    ///
    /// ```
    /// use kiln::candle::{Device, Tensor};
    /// use kiln::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).apply(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// let out = model.predict(&[Tensor::ones((5, 3), kiln::candle::DType::F32, &Device::Cpu)?], 2)?;
    /// assert_eq!(out[0].dims(), &[5, 2]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Data`] when the inputs' count or sample shapes do not fit the model;
    /// [`Error::Graph`] when a layer fails.
    pub fn predict(&self, inputs: &[Tensor], batch_size: usize) -> Result<Vec<Tensor>> {
        // On kiln's pool, as training: its kernels' parallel pieces stay there.
        crate::runtime::on_matmul_pool(|| self.predict_here(inputs, batch_size))
    }

    /// [`Self::predict`] on the calling thread.
    fn predict_here(&self, inputs: &[Tensor], batch_size: usize) -> Result<Vec<Tensor>> {
        let data = crate::Dataset::inputs_only(inputs.to_vec())?;
        let batch_size = batch_size.max(1);
        // Inference draws nothing; the key is a placeholder.
        let mut random = StepRandom::new(0, 0);
        let mut chunks: Vec<Vec<Tensor>> = vec![Vec::new(); self.outputs.len()];
        let mut start = 0;
        let piece = self.inference_piece();
        while start < data.len() {
            let len = batch_size.min(data.len() - start);
            let batch = data.slice(start, len)?;
            for (i, y) in self
                .infer(&batch, piece, &mut random)?
                .into_iter()
                .enumerate()
            {
                chunks[i].push(y);
            }
            start += len;
        }
        chunks
            .into_iter()
            .map(|c| Ok(Tensor::cat(&c, 0)?))
            .collect()
    }

    /// The model's outputs in inference for one `predict` batch. Where every layer computes
    /// each sample from that sample alone, a batch larger than `piece` samples runs as pieces
    /// of `piece`, one per pool thread at a time, each on its thread alone: a piece's
    /// activations stay in the core's cache from one layer to the next, where the whole
    /// batch's (88 MB after C1's first convolution at batch 1024) went out to memory and back
    /// at every layer, and were faulted in afresh at every batch.
    fn infer(
        &self,
        batch: &crate::Dataset,
        piece: Option<usize>,
        random: &mut StepRandom,
    ) -> Result<Vec<Tensor>> {
        let whole = |data: &crate::Dataset, random: &mut StepRandom| -> Result<Vec<Tensor>> {
            let pass = self.run(data.inputs(), false, random)?;
            Ok(self
                .outputs_of(&pass)
                .into_iter()
                .map(Tensor::detach)
                .collect())
        };
        let piece = match piece {
            Some(p) if batch.len() > p && crate::runtime::parallel_now() => p,
            _ => return whole(batch, random),
        };
        use rayon::prelude::*;
        let starts: Vec<usize> = (0..batch.len()).step_by(piece).collect();
        let parts = starts
            .par_iter()
            .map(|&start| {
                let part = batch.slice(start, piece.min(batch.len() - start))?;
                // Inference draws nothing; the key is a placeholder.
                let mut random = StepRandom::new(0, 0);
                crate::runtime::on_calling_thread(|| whole(&part, &mut random))
            })
            .collect::<Result<Vec<_>>>()?;
        (0..self.outputs.len())
            .map(|i| {
                let ys: Vec<&Tensor> = parts.iter().map(|p| &p[i]).collect();
                Ok(Tensor::cat(&ys, 0)?)
            })
            .collect()
    }

    /// The samples per piece of an inference batch ([`Self::infer`]): as many as keep the
    /// largest activation within [`INFERENCE_PIECE_BYTES`], or `None` when some layer may mix
    /// samples in inference ([`crate::Layer::samples_independent`]).
    fn inference_piece(&self) -> Option<usize> {
        let independent = self
            .steps
            .iter()
            .all(|s| s.layer.lock().samples_independent());
        if !independent {
            return None;
        }
        let largest = self
            .steps
            .iter()
            .map(|s| s.node.shape().iter().product::<usize>())
            .max()
            .unwrap_or(1)
            .max(1);
        Some((INFERENCE_PIECE_BYTES / (largest * self.dtype.size_in_bytes())).max(1))
    }

    /// Saves every weight to a safetensors file (written to a temporary name, then renamed).
    /// With a loss weighting strategy, its state (its weights, variables and counters) goes
    /// into the file's metadata, for [`Model::load_loss_weighting`]; the tensors are the
    /// model's weights alone either way.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file when it cannot be written.
    pub fn save_weights(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors = self
            .weights()
            .into_iter()
            .map(|w| (w.name, w.var.as_tensor().detach()))
            .collect();
        let metadata = self
            .loss_weighting_state()?
            .map(|state| [(META_LOSS_WEIGHTING.to_string(), state.to_string())].into());
        crate::io::write_safetensors(path, &tensors, metadata)
    }

    /// The name of the loss weighting strategy the model is compiled with, if any.
    ///
    /// ```
    /// use kiln::loss_weighting::PCGrad;
    /// use kiln::prelude::*;
    /// let x = Input::new([2]);
    /// let (a, b) = (Dense::new(1).with_name("a").apply(&x)?, Dense::new(1).with_name("b").apply(&x)?);
    /// let mut m = Model::new(&[x], &[a, b])?;
    /// assert_eq!(m.loss_weighting(), None);
    /// m.compile(Compile::new(Sgd::new(0.1)).loss("mse").loss_weighting(PCGrad::new()))?;
    /// assert_eq!(m.loss_weighting().as_deref(), Some("pcgrad"));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn loss_weighting(&self) -> Option<String> {
        let w = self.compiled.as_ref()?.weighting.as_ref()?;
        let name = w.lock().name().to_string();
        Some(name)
    }

    /// The loss weighting strategy's name, terms, state and variables (floats as bits).
    fn loss_weighting_state(&self) -> Result<Option<serde_json::Value>> {
        let Some(w) = self.compiled.as_ref().and_then(|c| c.weighting.as_ref()) else {
            return Ok(None);
        };
        let mut variables = serde_json::Map::new();
        for (name, var) in &w.variables {
            let values: Vec<f64> = var
                .as_tensor()
                .flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1()?;
            variables.insert(name.clone(), crate::loss_weighting::bits(&values));
        }
        let s = w.lock();
        Ok(Some(serde_json::json!({
            "strategy": s.name(),
            "terms": w.terms,
            "state": s.state(),
            "variables": variables,
        })))
    }

    /// Restores the loss weighting strategy's state that [`Model::save_weights`] wrote into
    /// `path` (a run's `model.safetensors`), so that `evaluate` weighs the terms as training
    /// ended, not as a fresh strategy would. Returns whether the file had a state; a model
    /// compiled without a strategy ignores it.
    ///
    /// ```
    /// use kiln::loss_weighting::Uncertainty;
    /// use kiln::prelude::*;
    /// let build = || -> kiln::Result<Model> {
    ///     let x = Input::new([2]);
    ///     let a = Dense::new(1).with_name("a").apply(&x)?;
    ///     let b = Dense::new(1).with_name("b").apply(&x)?;
    ///     let mut m = Model::new(&[x], &[a, b])?;
    ///     m.compile(Compile::new(Sgd::new(0.1)).loss("mse").loss_weighting(Uncertainty::new()))?;
    ///     Ok(m)
    /// };
    /// let mut model = build()?;
    /// let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
    /// let y = Tensor::new(&[[1f32], [0.]], &Device::Cpu)?;
    /// let data = Dataset::multi(vec![x], vec![y.clone(), y])?;
    /// model.fit(&data, Fit::new().epochs(3).quiet())?;
    /// let path = std::env::temp_dir().join("kiln-doc-loss-weighting.safetensors");
    /// model.save_weights(&path)?;
    /// let fresh = build()?;
    /// fresh.load_weights(&path)?;
    /// assert!(fresh.load_loss_weighting(&path)?);
    /// assert_eq!(fresh.evaluate(&data, 8)?.get("loss"), model.evaluate(&data, 8)?.get("loss"));
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// When the file cannot be read, or its state is another strategy's or for other terms
    /// (the message names both).
    pub fn load_loss_weighting(&self, path: impl AsRef<std::path::Path>) -> Result<bool> {
        let path = path.as_ref();
        let bad = |msg: String| Error::Data(format!("{}: {msg}", path.display()));
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors weights file: {e}")))?;
        let Some(text) = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_LOSS_WEIGHTING))
        else {
            return Ok(false);
        };
        let Some(w) = self.compiled.as_ref().and_then(|c| c.weighting.as_ref()) else {
            return Ok(true);
        };
        let saved: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| bad(format!("its loss weighting state is not valid JSON: {e}")))?;
        let mut s = w.lock();
        let name = saved["strategy"].as_str().unwrap_or_default();
        if name != s.name() {
            return Err(bad(format!(
                "the weights were saved with loss weighting `{name}`, and this model is \
                 compiled with `{}`: use the run's own strategy",
                s.name()
            )));
        }
        let terms: Vec<String> = serde_json::from_value(saved["terms"].clone()).unwrap_or_default();
        if terms != w.terms {
            return Err(bad(format!(
                "its loss weighting `{name}` weighed the terms {terms:?}, and this model's \
                 weighs {:?}",
                w.terms
            )));
        }
        for (var_name, var) in &w.variables {
            let values = crate::loss_weighting::from_bits(
                &saved["variables"],
                name,
                var_name,
                var.elem_count(),
            )
            .map_err(|e| bad(e.to_string()))?;
            let t = Tensor::from_vec(values, var.dims(), var.device())?.to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        s.load_state(&saved["state"])
            .map_err(|e| bad(e.to_string()))?;
        Ok(true)
    }

    /// Loads weights saved by [`Model::save_weights`]: every weight must be present with its
    /// shape, and the file may hold no tensor the model lacks.
    ///
    /// # Errors
    /// When the file cannot be read or is not safetensors, or a weight is missing, has
    /// another shape or cannot be decoded; the message names the file and the tensor.
    pub fn load_weights(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        use candle_core::safetensors::Load;
        let path = path.as_ref();
        let bad = |msg: String| Error::Data(format!("{}: {msg}", path.display()));
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors weights file: {e}")))?;
        let weights = self.weights();
        if let Some(extra) = file
            .names()
            .into_iter()
            .find(|n| !weights.iter().any(|w| w.name == **n))
        {
            return Err(bad(format!(
                "tensor `{extra}` is not a weight of this model: the file is from another model"
            )));
        }
        let mut loaded = Vec::with_capacity(weights.len());
        for w in &weights {
            let view = file
                .tensor(&w.name)
                .map_err(|_| bad(format!("no weight `{}` in the file", w.name)))?;
            if view.shape() != w.var.dims() {
                return Err(bad(format!(
                    "weight `{}` has shape {:?} in the file but {:?} in the model",
                    w.name,
                    view.shape(),
                    w.var.dims()
                )));
            }
            let t = view
                .load(&self.device)
                .and_then(|t| t.to_dtype(self.dtype))
                .map_err(|e| bad(format!("weight `{}` cannot be read: {e}", w.name)))?;
            loaded.push(t);
        }
        // Only once every weight has been read: a bad file changes nothing.
        for (w, t) in weights.iter().zip(&loaded) {
            w.var.set(t)?;
        }
        Ok(())
    }
}

/// The metadata key of a weights file's loss weighting state ([`Model::save_weights`]).
const META_LOSS_WEIGHTING: &str = "kiln.loss_weighting";

/// The largest activation a piece of an inference batch may have ([`Model::infer`]): about a
/// core's share of the last-level cache on the machines kiln is measured on, so that a layer's
/// output is still cached when the next layer reads it.
const INFERENCE_PIECE_BYTES: usize = 2 << 20;

/// Each layer's place in Keras' `model.layers` order: by depth from the outputs (deepest
/// first), then by when a walk from the outputs first meets it, as Keras' functional graph
/// (`keras.src.ops.function.map_graph`) sorts its operations. Keyed by layer id; a nested
/// model is one operation there, keyed by its scope id, each application one node.
fn keras_layer_order(outputs: &[SymbolicTensor], inputs: &HashSet<usize>) -> HashMap<usize, usize> {
    /// A node of the coarse graph: its key, its operation's key and its parents.
    struct Coarse {
        node: usize,
        op: usize,
        parents: Vec<SymbolicTensor>,
    }
    fn coarse(t: &SymbolicTensor) -> Option<Coarse> {
        if let Some(app) = t.0.within.first() {
            return Some(Coarse {
                node: app.id,
                op: app.scope.id,
                parents: app.inputs.clone(),
            });
        }
        match &t.0.op {
            NodeOp::Layer { layer, .. } => Some(Coarse {
                node: t.id(),
                op: layer.id,
                parents: t.parents().into_iter().cloned().collect(),
            }),
            // A layer's later output belongs to the node of its first.
            NodeOp::Output { of, .. } => coarse(of),
            NodeOp::Input { .. } => None,
        }
    }
    struct Walk<'a> {
        inputs: &'a HashSet<usize>,
        first_seen: HashMap<usize, usize>,
        finished: HashSet<usize>,
        post_order: Vec<Coarse>,
    }
    fn walk(w: &mut Walk, t: &SymbolicTensor) {
        let Some(c) = coarse(t) else {
            return;
        };
        if w.inputs.contains(&t.id()) || w.finished.contains(&c.node) {
            return;
        }
        let next = w.first_seen.len();
        w.first_seen.entry(c.op).or_insert(next);
        for p in &c.parents {
            walk(w, p);
        }
        w.finished.insert(c.node);
        w.post_order.push(c);
    }
    let mut w = Walk {
        inputs,
        first_seen: HashMap::new(),
        finished: HashSet::new(),
        post_order: Vec::new(),
    };
    for o in outputs {
        walk(&mut w, o);
    }
    // A node's depth is one more than its deepest consumer's; a layer's, its deepest node's.
    // Depths are kept per tensor id (a parent) and per node key.
    let key = |t: &SymbolicTensor| coarse(t).map_or(t.id(), |c| c.node);
    let mut node_depth: HashMap<usize, usize> = HashMap::new();
    let mut layer_depth: HashMap<usize, usize> = HashMap::new();
    for c in w.post_order.iter().rev() {
        let depth = node_depth
            .get(&c.node)
            .copied()
            .unwrap_or(0)
            .max(layer_depth.get(&c.op).copied().unwrap_or(0));
        layer_depth.insert(c.op, depth);
        node_depth.insert(c.node, depth);
        for p in &c.parents {
            let d = node_depth.entry(key(p)).or_insert(0);
            *d = (*d).max(depth + 1);
        }
    }
    let mut order: Vec<usize> = layer_depth.keys().copied().collect();
    order.sort_by_key(|l| (std::cmp::Reverse(layer_depth[l]), w.first_seen[l]));
    order.into_iter().enumerate().map(|(i, l)| (l, i)).collect()
}

/// The graph of a model as plain lists: see [`Model::graph_view`].
pub(crate) struct GraphView {
    pub(crate) inputs: Vec<(String, usize, Vec<usize>)>,
    pub(crate) steps: Vec<StepView>,
    pub(crate) outputs: Vec<usize>,
}

/// One layer application of a [`GraphView`], or one application of a nested model.
pub(crate) struct StepView {
    pub(crate) layer_name: String,
    pub(crate) op: StepOp,
    pub(crate) inputs: Vec<usize>,
    /// The ids and sample shapes of its outputs (one for a layer).
    pub(crate) outputs: Vec<(usize, Vec<usize>)>,
}

/// What a [`StepView`] applies.
pub(crate) enum StepOp {
    Layer(SharedLayer),
    Nested(Arc<ModelScope>),
}

impl GraphView {
    /// The graph of `steps`, each nested model's application one step, in an order where
    /// every step comes after the steps that make its inputs.
    fn new(
        inputs: &[SymbolicTensor],
        input_names: &[String],
        steps: &[Step],
        outputs: &[SymbolicTensor],
        model_names: &HashMap<usize, String>,
    ) -> GraphView {
        let mut pending: Vec<StepView> = Vec::new();
        let mut applications = HashSet::new();
        for s in steps {
            match s.node.0.within.first() {
                None => pending.push(StepView {
                    layer_name: s.layer_name.clone(),
                    op: StepOp::Layer(s.layer.clone()),
                    inputs: s.inputs.clone(),
                    outputs: std::iter::once((s.node.id(), s.node.shape().to_vec()))
                        .chain(s.node.others().iter().cloned())
                        .collect(),
                }),
                Some(app) if applications.insert(app.id) => pending.push(StepView {
                    layer_name: model_names[&app.scope.id].clone(),
                    op: StepOp::Nested(app.scope.clone()),
                    inputs: app.inputs.iter().map(SymbolicTensor::id).collect(),
                    outputs: app
                        .output_ids()
                        .into_iter()
                        .zip(&app.scope.outputs)
                        .map(|(id, o)| (id, o.shape().to_vec()))
                        .collect(),
                }),
                Some(_) => {}
            }
        }
        // Steps in execution order, except that an application may have to wait for an input
        // made after its first layer ran: each step once all it reads is made.
        let mut made: HashSet<usize> = inputs.iter().map(SymbolicTensor::id).collect();
        let mut ordered = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let ready = pending
                .iter()
                .position(|s| s.inputs.iter().all(|i| made.contains(i)))
                .unwrap_or(0);
            let step = pending.remove(ready);
            made.extend(step.outputs.iter().map(|(id, _)| *id));
            ordered.push(step);
        }
        GraphView {
            inputs: inputs
                .iter()
                .zip(input_names)
                .map(|(t, n)| (n.clone(), t.id(), t.shape().to_vec()))
                .collect(),
            steps: ordered,
            outputs: outputs.iter().map(|t| t.id()).collect(),
        }
    }
}

/// The values of one forward pass: every tensor by node id, masks, and layer-added losses.
#[derive(Default)]
pub(crate) struct ForwardPass {
    pub(crate) values: HashMap<usize, Tensor>,
    pub(crate) masks: HashMap<usize, Tensor>,
    pub(crate) layer_losses: Vec<(String, Tensor)>,
}

/// Per step, whether the next step is a ReLU layer ([`crate::layers::ActivationLayer`] with
/// ReLU, no activity regularizer) whose only input is this step's output, where nothing else
/// reads that output: no other step, no explicit mask, no activity regularizer of this step, and
/// neither step makes a model output (an output's logits are read from its layer's inputs). Then
/// this step may apply the ReLU in its own kernel ([`CallContext`]).
fn relu_fusions(steps: &[Step], outputs: &[SymbolicTensor]) -> Vec<bool> {
    let is_output = |id: usize| outputs.iter().any(|o| o.id() == id);
    let readers = |id: usize| {
        steps
            .iter()
            .map(|s| {
                let inputs = s.inputs.iter().filter(|&&i| i == id).count();
                inputs + s.masks.iter().filter(|m| **m == Some(id)).count()
            })
            .sum::<usize>()
    };
    let mut follows = vec![false; steps.len()];
    for (i, pair) in steps.windows(2).enumerate() {
        let (step, next) = (&pair[0], &pair[1]);
        let id = step.node.id();
        let relu = {
            let layer = next.layer.lock();
            layer.kind() == "activation"
                && layer.final_activation() == Some(crate::Activation::Relu)
                && layer.activity_regularizer().is_none()
        };
        follows[i] = relu
            && next.inputs == [id]
            && next.masks.iter().all(Option::is_none)
            && readers(id) == 1
            && !is_output(id)
            && !is_output(next.node.id())
            && step.layer.lock().activity_regularizer().is_none();
    }
    follows
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    fn relu() -> ActivationLayer {
        ActivationLayer::new(Activation::Relu)
    }

    /// Which steps may take the next ReLU layer into their own kernel.
    #[test]
    fn a_relu_is_fused_only_where_nothing_else_reads_the_output_before_it() -> Result<()> {
        // A chain: the normalization's output is read by the ReLU alone.
        let x = Input::new([4]);
        let n = BatchNormalization::new().apply(&Dense::new(3).apply(&x)?)?;
        let y = Dense::new(2).apply(&relu().apply(&n)?)?;
        let model = Model::new(&[&x], &[&y])?;
        assert_eq!(model.relu_follows, [false, true, false, false]);

        // The output before the ReLU is read by another layer too.
        let x = Input::new([4]);
        let n = BatchNormalization::new().apply(&x)?;
        let r = relu().apply(&n)?;
        let y = Add::new().apply_many(&[&r, &n])?;
        assert_eq!(Model::new(&[&x], &[&y])?.relu_follows, [false; 3]);

        // The ReLU makes a model output (its logits would be read from its input), or the step
        // before it does.
        let x = Input::new([4]);
        let r = relu().apply(&BatchNormalization::new().apply(&x)?)?;
        assert_eq!(Model::new(&[&x], &[&r])?.relu_follows, [false; 2]);
        let x = Input::new([4]);
        let n = BatchNormalization::new().apply(&x)?;
        let r = relu().apply(&n)?;
        assert_eq!(Model::new(&[&x], &[&r, &n])?.relu_follows, [false; 2]);

        // Another activation is not taken in.
        let x = Input::new([4]);
        let n = BatchNormalization::new().apply(&x)?;
        let y = ActivationLayer::new(Activation::Tanh).apply(&n)?;
        let y = Dense::new(1).apply(&y)?;
        assert_eq!(Model::new(&[&x], &[&y])?.relu_follows, [false; 3]);
        Ok(())
    }
}
