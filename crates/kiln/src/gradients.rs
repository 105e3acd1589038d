//! Parameter gradients that fused kernels hand over directly during a backward pass.
//!
//! candle's backward pass stores every gradient as `zeros + g` in a freshly zeroed buffer, one
//! per contribution. A fused kernel (the Dense layer, the L1/L2 penalty) computes its
//! parameters' gradients whole, so while [`Gradients::backward`] runs it hands them over here
//! instead, or adds straight onto one already handed over in the same step (a second backward
//! pass, a shared layer); the training step then adds the two sources for each variable.
//! Outside [`Gradients::backward`] (a user calling `Tensor::backward` directly) nothing
//! changes: the kernels return their gradients to candle as usual.

use crate::cpu::{in_parallel, vectorized, Real};
use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor, TensorId};
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

/// The gradients of one or more backward passes: candle's stores plus the ones handed over
/// directly, summed per tensor when read.
#[derive(Default)]
pub(crate) struct Gradients {
    stores: Vec<GradStore>,
    direct: Option<HashMap<TensorId, Tensor>>,
}

/// Clears this thread's collection however the backward pass ends.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        COLLECTING.with(|c| c.borrow_mut().take());
    }
}

impl Gradients {
    /// Runs `loss.backward()`, fused kernels handing their parameter gradients over directly,
    /// and adds the result to these gradients.
    pub(crate) fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let direct = self.direct.take().unwrap_or_default();
        COLLECTING.with(|c| *c.borrow_mut() = Some(Collecting::Parameters(direct)));
        let reset = Reset;
        let store = loss.backward();
        let collected = COLLECTING.with(|c| c.borrow_mut().take());
        drop(reset);
        if let Some(Collecting::Parameters(direct)) = collected {
            self.direct = Some(direct);
        }
        self.stores.push(store?);
        Ok(())
    }

    /// The gradient of the losses with respect to `t`, if they depend on it; taken out, so
    /// that the sum can be formed in place.
    pub(crate) fn take(&mut self, t: &Tensor) -> Result<Option<Tensor>> {
        let mut total = self.direct.as_mut().and_then(|d| d.remove(&t.id()));
        for store in &mut self.stores {
            if let Some(g) = store.remove(t) {
                total = Some(match total {
                    Some(sum) => add_into(sum, &g)?,
                    None => g,
                });
            }
        }
        Ok(total)
    }
}

/// `loss.backward()` for the gradients of non-parameter tensors (the inputs of an attack):
/// fused kernels skip their parameters' gradients, which nobody reads.
pub(crate) fn backward_for_inputs(loss: &Tensor) -> Result<GradStore> {
    COLLECTING.with(|c| *c.borrow_mut() = Some(Collecting::InputsOnly));
    let _reset = Reset;
    Ok(loss.backward()?)
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
/// [`Gradients::backward`] is collecting and `param` is a variable, and gives it back (for candle's store)
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
                let sum = add_into(e.get().clone(), &grad)?;
                e.insert(sum);
            }
            Entry::Vacant(e) => {
                e.insert(grad);
            }
        }
        Ok(None)
    })
}

/// Lets a fused kernel add its contribution straight into the gradient already handed over for
/// `param` in the step being collected (a matrix product accumulating onto it, say): `add` gets
/// that gradient's elements. Returns false, without calling `add`, when there is none.
pub(crate) fn add_into_handed_over<T: Real>(
    param: &Tensor,
    add: impl FnOnce(&mut [T]),
) -> candle_core::Result<bool> {
    if !param.is_variable() {
        return Ok(false);
    }
    let target = COLLECTING.with(|c| match &*c.borrow() {
        Some(Collecting::Parameters(direct)) => direct.get(&param.id()).cloned(),
        _ => None,
    });
    let Some(target) = target else {
        return Ok(false);
    };
    if !target.is_contiguous() || target.shape() != param.shape() {
        return Ok(false);
    }
    let op = WithElements(RefCell::new(Some(add)), std::marker::PhantomData);
    target.inplace_op1(&op)?;
    let ran = op.0.borrow().is_none();
    Ok(ran)
}

/// Runs a closure on a tensor's elements, in place (when they are of type `T`).
struct WithElements<T, F>(RefCell<Option<F>>, std::marker::PhantomData<T>);

impl<T: Real, F: FnOnce(&mut [T])> InplaceOp1 for WithElements<T, F> {
    fn name(&self) -> &'static str {
        "kiln-with-elements"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("kiln-with-elements: not contiguous".into()))?;
        if let Some(elements) = T::elements_mut(s) {
            if let Some(f) = self.0.borrow_mut().take() {
                f(&mut elements[start..end]);
            }
        }
        Ok(())
    }
}

/// `sum + g`, written into `sum`'s memory when it is a contiguous CPU tensor of `g`'s dtype and
/// shape. Callers own `sum`: it is a gradient handed over or taken out of a store, read by no one
/// else.
fn add_into(sum: Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let in_place = sum.device().is_cpu()
        && sum.is_contiguous()
        && g.is_contiguous()
        && sum.dtype() == g.dtype()
        && sum.shape() == g.shape()
        && matches!(sum.dtype(), DType::F32 | DType::F64);
    if !in_place {
        return sum + g;
    }
    sum.inplace_op2(g, &AddInto)?;
    Ok(sum)
}

vectorized! {
    /// `a += b`.
    fn add_assign<T>(a: &mut [T], b: &[T]) {
        for (a, &b) in a.iter_mut().zip(b) {
            *a = *a + b;
        }
    }
}

/// `a += b`, elementwise, on all matrix-product threads.
struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "kiln-add-into"
    }
    fn cpu_fwd(
        &self,
        a: &mut CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<()> {
        fn add<T: Real>(a: &mut [T], la: &Layout, b: &[T], lb: &Layout) -> candle_core::Result<()> {
            match (la.contiguous_offsets(), lb.contiguous_offsets()) {
                (Some((sa, ea)), Some((sb, eb))) => {
                    in_parallel(&mut a[sa..ea], &[&b[sb..eb]], |a, [b]| add_assign(a, b));
                    Ok(())
                }
                _ => candle_core::bail!("kiln-add-into: tensors must be contiguous"),
            }
        }
        match (a, b) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => add(a, la, b, lb),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => add(a, la, b, lb),
            _ => candle_core::bail!("kiln-add-into: f32 or f64 tensors of one dtype only"),
        }
    }
}
