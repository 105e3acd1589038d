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
    /// The masks given to the application, one per input (`None`: the mask that input
    /// carries); empty when none was given ([`Model::apply_many_with_masks`]).
    pub(crate) masks: Vec<Option<SymbolicTensor>>,
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
    /// adversarial term (it perturbs its model's inputs along that model's compiled loss, which
    /// a nested model has not: add the term to the outer model, which attacks the outer
    /// inputs), or when a layer cannot take the masks the tensors carry.
    pub fn apply_many(&self, inputs: &[&SymbolicTensor]) -> Result<Vec<SymbolicTensor>> {
        self.apply_many_with_masks(inputs, &[])
    }

    /// Applies the model to one tensor with an explicit mask, as Keras' `encoder(x, mask=m)`,
    /// and returns its one output. See [`Model::apply_many_with_masks`].
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let steps = Input::new([6, 3]);
    /// let h = Dense::new(4).apply(&steps)?;
    /// let h = Lstm::new(2).return_sequences(true).apply(&h)?;
    /// let reader = Model::builder(&[steps], &[h]).name("reader").build()?;
    ///
    /// let (x, keep) = (Input::named("x", [6, 3]), Input::named("keep", [6]));
    /// let y = reader.apply_with_mask(&x, &keep)?; // the LSTM reads `keep` through the Dense
    /// assert_eq!(y.mask().map(|m| m.shape().to_vec()), Some(vec![6])); // and its mask flows out
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Model::apply_many_with_masks`], and [`Error::Graph`] when the model has several
    /// outputs (use [`Model::apply_many_with_masks`]).
    pub fn apply_with_mask(
        &self,
        input: &SymbolicTensor,
        mask: &SymbolicTensor,
    ) -> Result<SymbolicTensor> {
        let mut outputs = self.apply_many_with_masks(&[input], &[Some(mask)])?;
        if outputs.len() != 1 {
            return Err(Error::Graph(format!(
                "model `{}` has {} outputs {:?}: apply it with apply_many_with_masks, which \
                 returns them all",
                self.shown_name(),
                outputs.len(),
                self.output_names
            )));
        }
        Ok(outputs.remove(0))
    }

    /// Applies the model to several tensors with explicit masks, one per input (`None` keeps
    /// the mask that input carries), as Keras' `model(inputs, mask=[…])`, and returns all its
    /// outputs. As Keras' `Functional.call`, a mask given for an input is the mask that input
    /// carries inside the model: every layer that reads the input sees it (a Dense passes it
    /// on, an LSTM reads it), unless the layer was itself given an explicit mask when the model
    /// was built. A mask a layer inside makes flows out with the output it reaches (an LSTM
    /// with `return_sequences`), as it does from any layer. A mask is a tensor whose samples
    /// have its input's shape without the last (feature) axis, as for
    /// [`SharedLayer::apply_many_with_masks`]: a model [`Input`](crate::Input) the data fills
    /// (nonzero = the step counts), another tensor's [`SymbolicTensor::mask`] or a
    /// [`NotEqual`](crate::layers::NotEqual). An output that is one of the model's inputs,
    /// passed through unchanged, is the tensor it was applied to, with that tensor's own mask.
    ///
    /// ```
    /// use kiln::prelude::*;
    /// let (a, b) = (Input::new([4, 2]), Input::new([4, 2]));
    /// let pooled = GlobalAveragePooling1D::new().apply(&a)?;
    /// let pair = Model::builder(&[&a, &b], &[&pooled, &b]).name("pair").build()?;
    ///
    /// let (x, z, keep) = (Input::new([4, 2]), Input::new([4, 2]), Input::new([4]));
    /// let outs = pair.apply_many_with_masks(&[&x, &z], &[Some(&keep), None])?;
    /// assert_eq!(outs[0].shape(), &[2]); // the mean over the steps `keep` keeps
    /// assert!(pair.apply_many_with_masks(&[&x, &z], &[Some(&x), None]).is_err()); // shape [4, 2]
    /// # Ok::<(), kiln::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Model::apply_many`], and [`Error::Graph`] when the count of masks differs from the
    /// inputs' or a mask's shape is not its input's without the last axis (the message names
    /// the model, the input and the shapes).
    pub fn apply_many_with_masks(
        &self,
        inputs: &[&SymbolicTensor],
        masks: &[Option<&SymbolicTensor>],
    ) -> Result<Vec<SymbolicTensor>> {
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
        self.check_application_masks(inputs, masks)?;
        if let Some((name, _)) = self.added.iter().find(|(_, l)| l.adversarial().is_some()) {
            return Err(Error::Graph(format!(
                "model `{who}` has the adversarial term `{name}`, which perturbs the model's \
                 inputs along the gradient of its compiled loss; applied inside another model it \
                 has neither its own data nor a compiled loss. Build `{who}` without `{name}`, \
                 apply it, build the outer model, then add the term there: \
                 `outer.add_loss_term(\"{name}\", Adversarial::fgsm(epsilon))` (or pgd), which \
                 perturbs the outer model's inputs along the gradient of the outer model's loss \
                 (the [[added]] terms of a run file are the outer model's)"
            )));
        }
        let masks: Vec<Option<SymbolicTensor>> = if masks.iter().any(Option::is_some) {
            masks.iter().map(|m| m.cloned()).collect()
        } else {
            Vec::new()
        };
        let app = Arc::new(Application {
            id: crate::graph::next_id(),
            scope: self.scope.clone(),
            inputs: inputs.iter().map(|t| (*t).clone()).collect(),
            masks: masks.clone(),
            map: OnceLock::new(),
            added: self.added.clone(),
        });
        let mut made: HashMap<usize, SymbolicTensor> = self
            .inputs
            .iter()
            .zip(inputs)
            .map(|(inner, outer)| (inner.id(), (*outer).clone()))
            .collect();
        // The mask given for each of the model's inputs, by the input's id in the model.
        let given_masks: HashMap<usize, &SymbolicTensor> = self
            .inputs
            .iter()
            .zip(&masks)
            .filter_map(|(inner, m)| Some((inner.id(), m.as_ref()?)))
            .collect();
        for step in &self.steps {
            let node = &step.node;
            let NodeOp::Layer { inputs, masks, .. } = &node.0.op else {
                continue;
            };
            let xs: Vec<&SymbolicTensor> = inputs.iter().map(|i| &made[&i.id()]).collect();
            // The layer's own explicit masks first, then those given for the inputs it reads.
            let ms: Vec<Option<&SymbolicTensor>> = inputs
                .iter()
                .enumerate()
                .map(|(k, input)| match masks.get(k).and_then(Option::as_ref) {
                    Some(m) => Some(&made[&m.id()]),
                    None => given_masks.get(&input.id()).copied(),
                })
                .collect();
            let ms = if ms.iter().any(Option::is_some) {
                ms
            } else {
                Vec::new()
            };
            let within = std::iter::once(app.clone())
                .chain(node.0.within.iter().cloned())
                .collect();
            let ys = step
                .layer
                .apply_within(&xs, &ms, false, within)
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

    /// Checks the masks given to an application: one per input (or none), each of its input's
    /// shape without the feature axis.
    fn check_application_masks(
        &self,
        inputs: &[&SymbolicTensor],
        masks: &[Option<&SymbolicTensor>],
    ) -> Result<()> {
        let who = self.shown_name();
        if !masks.is_empty() && masks.len() != inputs.len() {
            return Err(Error::Graph(format!(
                "model `{who}` takes {} input(s) {:?} but was given {} mask(s): give one mask \
                 (or None) per input",
                inputs.len(),
                self.input_names,
                masks.len()
            )));
        }
        for ((x, m), name) in inputs.iter().zip(masks).zip(&self.input_names) {
            let Some(m) = m else { continue };
            let want = &x.shape()[..x.shape().len().saturating_sub(1)];
            if m.shape() != want {
                return Err(Error::Graph(format!(
                    "model `{who}`: the mask given for input `{name}` has samples of shape {:?}, \
                     but an input of shape {:?} takes a mask of shape {want:?} (the input's \
                     shape without its feature axis)",
                    m.shape(),
                    x.shape()
                )));
            }
        }
        Ok(())
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
