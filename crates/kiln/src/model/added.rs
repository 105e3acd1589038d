//! Added losses (`add_loss`): terms computed from the network itself.

use super::nested::Application;
use super::{ForwardPass, Model};
use crate::error::{Error, Result};
use crate::graph::SymbolicTensor;
use candle_core::Tensor;

/// What an added loss can read during a step: every tensor of the forward pass, the weights,
/// the inputs and the targets.
pub struct Tensors<'a> {
    pub(crate) model: &'a Model,
    pub(crate) pass: &'a ForwardPass,
    pub(crate) inputs: &'a [Tensor],
    pub(crate) targets: &'a [Tensor],
    pub(crate) training: bool,
    /// Set when the term is a nested model's, evaluated on one of its applications.
    pub(crate) within: Option<Within<'a>>,
}

/// A nested model's application, as its added terms see the outer model's pass.
pub(crate) struct Within<'a> {
    app: &'a Application,
    parent: &'a Tensors<'a>,
    /// `<model>/`, before the nested model's weight names.
    prefix: &'a str,
}

impl<'a> Tensors<'a> {
    /// The value of a symbolic tensor of the model (an input, an intermediate or an output).
    pub fn get(&self, t: &SymbolicTensor) -> Result<&'a Tensor> {
        self.get_id(t.id()).ok_or_else(|| {
            Error::Graph(format!(
                "{t:?} is not part of this model's graph, so add_loss cannot read it"
            ))
        })
    }

    /// The value of the tensor with this id, seen from a nested model through its application.
    fn get_id(&self, id: usize) -> Option<&'a Tensor> {
        match &self.within {
            None => self.pass.values.get(&id),
            Some(w) => w.parent.get_id(*w.app.map.get()?.get(&id)?),
        }
    }

    /// The view of a nested model's term on its application `app`, whose inputs are `inputs`.
    pub(crate) fn within<'b>(
        &'b self,
        app: &'b Application,
        prefix: &'b str,
        inputs: &'b [Tensor],
    ) -> Tensors<'b> {
        Tensors {
            model: self.model,
            pass: self.pass,
            inputs,
            targets: &[],
            training: self.training,
            within: Some(Within {
                app,
                parent: self,
                prefix,
            }),
        }
    }

    /// The output named `name`.
    pub fn output(&self, name: &str) -> Result<&'a Tensor> {
        if let Some(w) = &self.within {
            let scope = &w.app.scope;
            let i = scope
                .output_names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| {
                    Error::Graph(format!(
                        "no output named `{name}`; outputs are {:?}",
                        scope.output_names
                    ))
                })?;
            return self.get(&scope.outputs[i]);
        }
        let i = self
            .model
            .output_names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| {
                Error::Graph(format!(
                    "no output named `{name}`; outputs are {:?}",
                    self.model.output_names
                ))
            })?;
        self.get(&self.model.outputs[i])
    }

    /// The current value of the weight named `<layer>/<weight>`.
    pub fn weight(&self, name: &str) -> Result<Tensor> {
        if let Some(w) = &self.within {
            return w.parent.weight(&format!("{}{name}", w.prefix));
        }
        Ok(self.model.weight(name)?.var.as_tensor().clone())
    }

    /// The batch's inputs, in model order.
    pub fn inputs(&self) -> &'a [Tensor] {
        self.inputs
    }

    /// The batch's targets, in output order (empty in `predict`, and for the terms of a model
    /// applied inside another, whose targets are the outer model's).
    pub fn targets(&self) -> &'a [Tensor] {
        self.targets
    }

    /// Whether this is a training step.
    pub fn training(&self) -> bool {
        self.training
    }
}

/// A term added to the total loss, computed from the model's own tensors.
///
/// Any closure `Fn(&Tensors) -> Result<Tensor>` is one. A non-scalar result is summed.
pub trait AddedLoss: Send + Sync {
    /// The term's value for this step.
    fn compute(&self, tensors: &Tensors) -> Result<Tensor>;

    /// The adversarial regularizer, when this term is one: it needs the input gradient, so the
    /// training loop computes it instead of [`AddedLoss::compute`].
    fn adversarial(&self) -> Option<&crate::adversarial::Adversarial> {
        None
    }
}

impl<F> AddedLoss for F
where
    F: Fn(&Tensors) -> Result<Tensor> + Send + Sync,
{
    fn compute(&self, tensors: &Tensors) -> Result<Tensor> {
        self(tensors)
    }
}
