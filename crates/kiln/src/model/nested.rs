//! A built [`Model`] used as a layer of another model (Keras' `encoder(x)` on a functional
//! model): its layers are applied again to the new tensors, so the weights are the same
//! variables, however many times and in however many models it is applied.
//!
//! An application adds the model's layers to the graph of the caller, each node remembering
//! the application it belongs to ([`Application`]). The outer model names those layers
//! `<model>/<layer>` and their weights `<model>/<layer>/<weight>` (Keras' paths), shows the
//! model as one row of its summary, freezes it as a whole, and evaluates the model's added
//! terms once per application.

use super::added::{AddedLoss, Tensors};
use super::Model;
use crate::error::{Error, Result};
use crate::graph::{NodeOp, SharedLayer, SymbolicTensor};
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// What a built model is as a layer of others: its identity, its graph and the names it gave
/// its layers and weights. Shared by all its applications.
pub(crate) struct ModelScope {
    pub(crate) id: usize,
    pub(crate) given_name: Option<String>,
    pub(crate) output_names: Vec<String>,
    pub(crate) outputs: Vec<SymbolicTensor>,
    /// Per layer id: its name in this model and the prefix of its weights' names (empty for
    /// the model's own layers, `inner/` for those of a model nested in it).
    pub(crate) names: HashMap<usize, (String, String)>,
    /// Every layer, those of nested models included, in the model's layer order.
    pub(crate) layers: Vec<SharedLayer>,
    /// The model's graph, each nested model one step, for export.
    pub(crate) view: super::GraphView,
}

impl ModelScope {
    /// The name a model that was given none takes, as Keras' `Functional` models.
    pub(crate) const KIND: &'static str = "functional";
}

/// One application of a nested model: the tensors it was applied to, and, once its layers are
/// applied, which new tensor stands for each of the model's own.
pub(crate) struct Application {
    pub(crate) id: usize,
    pub(crate) scope: Arc<ModelScope>,
    pub(crate) inputs: Vec<SymbolicTensor>,
    /// The new tensor id of each tensor id of the model.
    pub(crate) map: OnceLock<HashMap<usize, usize>>,
    /// The model's added terms when it was applied.
    pub(crate) added: Vec<(String, Arc<dyn AddedLoss>)>,
}

impl Application {
    /// The ids of the application's outputs, in the model's output order.
    pub(crate) fn output_ids(&self) -> Vec<usize> {
        let map = self.map.get();
        self.scope
            .outputs
            .iter()
            .map(|o| map.and_then(|m| m.get(&o.id()).copied()).unwrap_or(o.id()))
            .collect()
    }
}

impl Model {
    /// The name given with [`super::ModelBuilder::name`], if any. Applied in another model
    /// ([`Model::apply`]), a model without one is named `functional`, `functional_1`, … there,
    /// as Keras names its functional models.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).apply(&x)?;
    /// let encoder = Model::builder(&[x], &[y]).name("encoder").build()?;
    /// assert_eq!(encoder.name(), Some("encoder"));
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn name(&self) -> Option<&str> {
        self.scope.given_name.as_deref()
    }

    /// Applies the model, as a layer, to one tensor of another graph, and returns its one
    /// output (Keras' `y = encoder(x)`). The layers are the model's own: applying it twice,
    /// or in several models, shares its weights, and training any of them trains them all.
    ///
    /// In the model that takes the result, the layers are named `<model>/<layer>` and their
    /// weights `<model>/<layer>/<weight>`, as Keras' paths, and an output the model makes is
    /// named by the model (Keras' `output_names`); the model is one row of its
    /// [`Model::summary`] and is frozen as a whole by [`Model::set_trainable`] with its name.
    /// Masks pass into it, the training flag reaches its Dropout and BatchNormalization layers,
    /// and its added terms (activity regularizers, [`Model::add_loss`]) count once per
    /// application, under `<model>/<term>` for its `add_loss` terms. Add those terms before
    /// applying the model.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let h = Dense::new(3).activation(Activation::Relu).apply(&x)?;
    /// let encoder = Model::builder(&[x], &[h]).name("encoder").build()?;
    ///
    /// let (a, b) = (Input::named("a", [4]), Input::named("b", [4]));
    /// let (ea, eb) = (encoder.apply(&a)?, encoder.apply(&b)?); // one set of weights
    /// let y = Dense::new(1).with_name("score").apply_many(&[&Add::new().apply_many(&[&ea, &eb])?])?;
    /// let model = Model::new(&[a, b], &[y])?;
    /// let names: Vec<String> = model.weights().into_iter().map(|w| w.name).collect();
    /// assert_eq!(names, ["encoder/dense/kernel", "encoder/dense/bias", "score/kernel", "score/bias"]);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Graph`] when the model has several outputs (use [`Model::apply_many`]), or as
    /// [`Model::apply_many`].
    pub fn apply(&self, input: &SymbolicTensor) -> Result<SymbolicTensor> {
        let mut outputs = self.apply_many(&[input])?;
        if outputs.len() != 1 {
            return Err(Error::Graph(format!(
                "model `{}` has {} outputs {:?}: apply it with apply_many, which returns them all",
                self.shown_name(),
                outputs.len(),
                self.output_names
            )));
        }
        Ok(outputs.remove(0))
    }

    /// Applies the model, as a layer, to several tensors (one per model input, in order) and
    /// returns all its outputs, in order. See [`Model::apply`].
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let (p, q) = (Input::named("p", [2]), Input::named("q", [3]));
    /// let both = Concatenate::new().apply_many(&[&p, &q])?;
    /// let tower = Model::new(&[&p, &q], &[&both, &p])?;
    /// let (x, z) = (Input::new([2]), Input::new([3]));
    /// let outs = tower.apply_many(&[&x, &z])?;
    /// assert_eq!((outs[0].shape(), outs[1].shape()), (&[5][..], &[2][..]));
    /// assert!(tower.apply_many(&[&z, &x]).is_err()); // shapes [3], [2] where [2], [3] go
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Graph`] when the count of tensors or a shape differs from the model's inputs
    /// (the message names the model, its inputs and the shapes given), when the model has an
    /// adversarial term (it needs the outer model's data: add it there), or when a layer
    /// cannot take the masks the tensors carry.
    pub fn apply_many(&self, inputs: &[&SymbolicTensor]) -> Result<Vec<SymbolicTensor>> {
        let who = self.shown_name();
        let expected: Vec<&[usize]> = self.inputs.iter().map(|t| t.shape()).collect();
        let given: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
        if inputs.len() != self.inputs.len() || expected != given {
            return Err(Error::Graph(format!(
                "model `{who}` takes {} input(s) {:?} of sample shapes {expected:?}, but was \
                 applied to {} tensor(s) of shapes {given:?}: give one tensor per input, in \
                 order, each with its input's shape (the batch axis left out)",
                self.inputs.len(),
                self.input_names,
                inputs.len(),
            )));
        }
        if let Some((name, _)) = self.added.iter().find(|(_, l)| l.adversarial().is_some()) {
            return Err(Error::Graph(format!(
                "model `{who}` has the adversarial term `{name}`, which needs the data and \
                 losses of the model it is applied in: add it to the outer model instead"
            )));
        }
        let app = Arc::new(Application {
            id: crate::graph::next_id(),
            scope: self.scope.clone(),
            inputs: inputs.iter().map(|t| (*t).clone()).collect(),
            map: OnceLock::new(),
            added: self.added.clone(),
        });
        let mut made: HashMap<usize, SymbolicTensor> = self
            .inputs
            .iter()
            .zip(inputs)
            .map(|(inner, outer)| (inner.id(), (*outer).clone()))
            .collect();
        for step in &self.steps {
            let node = &step.node;
            let NodeOp::Layer { inputs, masks, .. } = &node.0.op else {
                continue;
            };
            let xs: Vec<&SymbolicTensor> = inputs.iter().map(|i| &made[&i.id()]).collect();
            let ms: Vec<Option<&SymbolicTensor>> = masks
                .iter()
                .map(|m| m.as_ref().map(|m| &made[&m.id()]))
                .collect();
            let within = std::iter::once(app.clone())
                .chain(node.0.within.iter().cloned())
                .collect();
            let ys = step
                .layer
                .apply_within(&xs, &ms, within)
                .map_err(|e| e.within(format!("model `{who}`, layer `{}`", step.layer_name)))?;
            // The step's outputs in order: its node, then the others a multi-output layer makes.
            let ids = std::iter::once(node.id()).chain(node.others().iter().map(|(id, _)| *id));
            for (id, y) in ids.zip(ys) {
                made.insert(id, y);
            }
        }
        let outputs = self.outputs.iter().map(|o| made[&o.id()].clone()).collect();
        let map = made.into_iter().map(|(k, v)| (k, v.id())).collect();
        app.map.set(map).ok();
        Ok(outputs)
    }

    /// The model's name, or Keras' default.
    pub(crate) fn shown_name(&self) -> &str {
        self.name().unwrap_or(ModelScope::KIND)
    }

    /// Freezes (`false`) or unfreezes every layer of the model, those of nested models
    /// included, as Keras' `model.trainable = …`. The layers are shared with every model the
    /// model is applied in: freezing an encoder before or after applying it freezes it there.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let x = Input::new([4]);
    /// let encoder = Model::builder(&[&x], &[Dense::new(3).apply(&x)?]).name("encoder").build()?;
    /// let z = Input::new([4]);
    /// let y = Dense::new(1).apply(&encoder.apply(&z)?)?;
    /// let model = Model::new(&[z], &[y])?;
    /// encoder.set_all_trainable(false);
    /// assert_eq!(model.trainable_weights().len(), 2); // dense/kernel, dense/bias
    /// assert!(!model.is_trainable("encoder")?);
    /// # Ok::<(), kiln::Error>(())
    /// ```
    pub fn set_all_trainable(&self, trainable: bool) {
        for (_, l) in &self.layers {
            l.set_trainable(trainable);
        }
    }
}

/// An added term of a nested model, evaluated on each of its applications and summed.
pub(crate) struct NestedTerm {
    pub(crate) term: Arc<dyn AddedLoss>,
    pub(crate) applications: Vec<Arc<Application>>,
    /// `<model>/`: the nested model's name in the outer model, for its weights.
    pub(crate) prefix: String,
}

impl AddedLoss for NestedTerm {
    fn compute(&self, tensors: &Tensors) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for app in &self.applications {
            let inputs: Vec<Tensor> = app
                .inputs
                .iter()
                .map(|t| tensors.get(t).cloned())
                .collect::<Result<_>>()?;
            let view = tensors.within(app, &self.prefix, &inputs);
            let value = self.term.compute(&view)?;
            total = Some(match total {
                Some(t) => (t + value)?,
                None => value,
            });
        }
        total.ok_or_else(|| Error::State("a nested term with no application".into()))
    }
}

/// The outer model's view of the nested applications in its graph: names and added terms.
pub(crate) struct Nesting {
    /// Each nested model's name in the outer model, with its scope, in the order first met.
    pub(crate) models: Vec<(String, Arc<ModelScope>)>,
}

impl Nesting {
    /// The nested model named `name`, if there is one.
    pub(crate) fn find(&self, name: &str) -> Option<&Arc<ModelScope>> {
        self.models.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }
}

/// The terms of the nested models applied in a graph, one per model and term, each summed over
/// that model's applications: `(name, term)`.
pub(crate) fn nested_terms(
    order: &[SymbolicTensor],
    scope_names: &HashMap<usize, String>,
) -> Vec<(String, Arc<dyn AddedLoss>)> {
    let mut apps: Vec<Arc<Application>> = Vec::new();
    for t in order {
        if let Some(app) = t.0.within.first() {
            if !apps.iter().any(|a| a.id == app.id) {
                apps.push(app.clone());
            }
        }
    }
    let mut terms: Vec<(String, NestedTerm)> = Vec::new();
    for app in &apps {
        let model = &scope_names[&app.scope.id];
        for (name, term) in &app.added {
            let full = format!("{model}/{name}");
            match terms.iter_mut().find(|(n, _)| *n == full) {
                Some((_, t)) => t.applications.push(app.clone()),
                None => terms.push((
                    full,
                    NestedTerm {
                        term: term.clone(),
                        applications: vec![app.clone()],
                        prefix: format!("{model}/"),
                    },
                )),
            }
        }
    }
    terms
        .into_iter()
        .map(|(n, t)| (n, Arc::new(t) as Arc<dyn AddedLoss>))
        .collect()
}
