//! Parameter gradients that fused kernels hand over directly during a backward pass.
//!
//! candle's backward pass stores every gradient as `zeros + g` in a freshly zeroed buffer, one
//! per contribution. A fused kernel (the Dense layer) computes its parameters' gradients whole,
//! so while [`backward`] runs it hands them over here instead; the training step then adds the
//! two sources for each variable. Outside [`backward`] (a user calling `Tensor::backward`
//! directly) nothing changes: the kernels return their gradients to candle as usual.

use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

/// What the backward pass running on this thread wants from fused kernels.
enum Collecting {
    /// Parameter gradients, handed over by variable.
    Parameters(HashMap<TensorId, Tensor>),
    /// Only the gradients that flow to the inputs: the kernels skip their parameters' products.
    InputsOnly,
}

thread_local! {
    static COLLECTING: RefCell<Option<Collecting>> = const { RefCell::new(None) };
}

/// The gradients of one backward pass: candle's store plus the ones handed over directly.
pub(crate) struct Gradients {
    store: GradStore,
    direct: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// The gradient of the loss with respect to `t`, if the loss depends on it.
    pub(crate) fn get(&self, t: &Tensor) -> Result<Option<Tensor>> {
        Ok(match (self.store.get(t), self.direct.get(&t.id())) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b).cloned(),
        })
    }
}

/// Clears this thread's collection however the backward pass ends.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        COLLECTING.with(|c| c.borrow_mut().take());
    }
}

fn run(loss: &Tensor, mode: Collecting) -> Result<(GradStore, Option<Collecting>)> {
    COLLECTING.with(|c| *c.borrow_mut() = Some(mode));
    let _reset = Reset;
    let store = loss.backward()?;
    Ok((store, COLLECTING.with(|c| c.borrow_mut().take())))
}

/// `loss.backward()`, with fused kernels handing their parameter gradients over directly.
pub(crate) fn backward(loss: &Tensor) -> Result<Gradients> {
    let (store, collected) = run(loss, Collecting::Parameters(HashMap::new()))?;
    let direct = match collected {
        Some(Collecting::Parameters(direct)) => direct,
        _ => HashMap::new(),
    };
    Ok(Gradients { store, direct })
}

/// `loss.backward()` for the gradients of non-parameter tensors (the inputs of an attack):
/// fused kernels skip their parameters' gradients, which nobody reads.
pub(crate) fn backward_for_inputs(loss: &Tensor) -> Result<GradStore> {
    Ok(run(loss, Collecting::InputsOnly)?.0)
}

/// Whether a fused kernel's backward pass must compute the gradient of `param`.
pub(crate) fn wanted(param: &Tensor) -> bool {
    if !param.track_op() {
        return false;
    }
    let inputs_only = COLLECTING.with(|c| matches!(*c.borrow(), Some(Collecting::InputsOnly)));
    !(inputs_only && param.is_variable())
}

/// Called by a fused kernel's backward pass with a parameter's gradient: keeps it when a
/// [`backward`] is collecting and `param` is a variable, and gives it back (for candle's store)
/// otherwise.
pub(crate) fn hand_over(param: &Tensor, grad: Tensor) -> candle_core::Result<Option<Tensor>> {
    if !param.is_variable() {
        return Ok(Some(grad));
    }
    COLLECTING.with(|c| {
        let mut c = c.borrow_mut();
        let Some(Collecting::Parameters(direct)) = c.as_mut() else {
            return Ok(Some(grad));
        };
        match direct.entry(param.id()) {
            Entry::Occupied(mut e) => {
                let sum = (e.get() + &grad)?;
                e.insert(sum);
            }
            Entry::Vacant(e) => {
                e.insert(grad);
            }
        }
        Ok(None)
    })
}
