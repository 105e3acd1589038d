//! Added losses (`add_loss`): terms computed from the network itself.

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
}

impl<'a> Tensors<'a> {
    /// The value of a symbolic tensor of the model (an input, an intermediate or an output).
    pub fn get(&self, t: &SymbolicTensor) -> Result<&'a Tensor> {
        self.pass.values.get(&t.id()).ok_or_else(|| {
            Error::Graph(format!(
                "{t:?} is not part of this model's graph, so add_loss cannot read it"
            ))
        })
    }

    /// The output named `name`.
    pub fn output(&self, name: &str) -> Result<&'a Tensor> {
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
        Ok(self.model.weight(name)?.var.as_tensor().clone())
    }

    /// The batch's inputs, in model order.
    pub fn inputs(&self) -> &'a [Tensor] {
        self.inputs
    }

    /// The batch's targets, in output order (empty in `predict`).
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
