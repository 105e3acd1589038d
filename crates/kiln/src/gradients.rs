//! Parameter gradients that fused kernels hand over directly during a backward pass.
//!
//! candle's backward pass stores every gradient as `zeros + g` in a freshly zeroed buffer, one
//! per contribution. A fused kernel (the Dense layer, the L1/L2 penalty) computes its
//! parameters' gradients whole, so while [`Gradients::backward`] runs it hands them over here
//! instead, or adds straight onto one already handed over in the same step (a second backward
//! pass, a shared layer); the training step then adds the two sources for each variable.
//! Outside [`Gradients::backward`] (a user calling `Tensor::backward` directly) nothing
//! changes: the kernels return their gradients to candle as usual.

use crate::cpu::{contiguous, contiguous_mut, in_parallel, vectorized, Real};
use crate::Result;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor, TensorId};
use std::cell::RefCell;
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

/// The collection a backward pass found on its thread, put back however the pass ends. A pool
/// thread waiting inside one training step's backward pass can pick up another step's work
/// (rayon's work stealing; two models trained at once), so collections nest, and the inner one
/// must leave the outer one as it was.
struct Restore(Option<Option<Collecting>>);

impl Restore {
    /// Starts collecting in `mode` on this thread.
    fn begin(mode: Collecting) -> Self {
        Self(Some(COLLECTING.with(|c| c.borrow_mut().replace(mode))))
    }

    /// Ends collecting: returns this pass's collection and puts the previous one back.
    fn end(mut self) -> Option<Collecting> {
        let previous = self.0.take().flatten();
        COLLECTING.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous))
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(previous) = self.0.take() {
            COLLECTING.with(|c| *c.borrow_mut() = previous);
        }
    }
}

impl Gradients {
    /// Runs `loss.backward()`, fused kernels handing their parameter gradients over directly,
    /// and adds the result to these gradients.
    pub(crate) fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let direct = self.direct.take().unwrap_or_default();
        let collecting = Restore::begin(Collecting::Parameters(direct));
        let store = loss.backward();
        if let Some(Collecting::Parameters(direct)) = collecting.end() {
            self.direct = Some(direct);
        }
        self.stores.push(store?);
        Ok(())
    }

    /// [`Self::take`] for each variable, in order.
    pub(crate) fn take_each(&mut self, vars: &[candle_core::Var]) -> Result<Vec<Option<Tensor>>> {
        vars.iter().map(|v| self.take(v.as_tensor())).collect()
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

impl Gradients {
    /// Whether candle's own stores hold a gradient for `t` (one not handed over).
    #[cfg(test)]
    pub(crate) fn in_candle_store(&self, t: &Tensor) -> bool {
        self.stores.iter().any(|s| s.get(t).is_some())
    }
}

/// `loss.backward()` for the gradients of non-parameter tensors (the inputs of an attack):
/// fused kernels skip their parameters' gradients, which nobody reads.
pub(crate) fn backward_for_inputs(loss: &Tensor) -> Result<GradStore> {
    let collecting = Restore::begin(Collecting::InputsOnly);
    let store = loss.backward();
    collecting.end();
    Ok(store?)
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
    // The collection is borrowed only for the lookups: the sum below may split across the pool,
    // and a pool thread waiting there can run another step's backward pass on this thread.
    let earlier = COLLECTING.with(|c| match &mut *c.borrow_mut() {
        Some(Collecting::Parameters(direct)) => Some(direct.remove(&param.id())),
        _ => None,
    });
    let Some(earlier) = earlier else {
        return Ok(Some(grad));
    };
    let sum = match earlier {
        Some(earlier) => add_into(earlier, &grad)?,
        None => grad,
    };
    COLLECTING.with(|c| {
        if let Some(Collecting::Parameters(direct)) = &mut *c.borrow_mut() {
            direct.insert(param.id(), sum);
        }
    });
    Ok(None)
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
        if let Some(elements) = T::elements_mut(s) {
            let elements = contiguous_mut(elements, l, "kiln-with-elements: the gradient")?;
            if let Some(f) = self.0.borrow_mut().take() {
                f(elements);
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
            let a = contiguous_mut(a, la, "kiln-add-into: the sum")?;
            let b = contiguous(b, lb, "kiln-add-into: the addend")?;
            in_parallel(a, &[b], |a, [b]| add_assign(a, b));
            Ok(())
        }
        match (a, b) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => add(a, la, b, lb),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => add(a, la, b, lb),
            _ => candle_core::bail!("kiln-add-into: f32 or f64 tensors of one dtype only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Gradients;
    use crate::regularizers::{Regularizer, L2};
    use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};

    /// An identity op whose backward pass runs a whole other collection first, as a pool thread
    /// does when it picks up another training step while waiting inside this one.
    struct NestedStep(Var);

    impl CustomOp1 for NestedStep {
        fn name(&self) -> &'static str {
            "nested-step"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            Ok((s.clone(), l.shape().clone()))
        }
        fn bwd(
            &self,
            _x: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<Option<Tensor>> {
            let mut inner = Gradients::default();
            let penalty = L2::new(0.5).penalty(self.0.as_tensor()).unwrap();
            inner.backward(&penalty).unwrap();
            let g: Vec<f64> = inner
                .take(self.0.as_tensor())
                .unwrap()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(g, vec![1.0, -2.0]);
            Ok(Some(grad.clone()))
        }
    }

    /// A collection nested inside another leaves the outer one's handed-over gradients intact.
    #[test]
    fn nested_collections_keep_the_outer_gradients() {
        let d = Device::Cpu;
        let w = Var::new(&[1f64, 2.0], &d).unwrap();
        let other = Var::new(&[1f64, -2.0], &d).unwrap();
        let first = L2::new(1.0).penalty(w.as_tensor()).unwrap();
        let second = L2::new(3.0).penalty(w.as_tensor()).unwrap();
        let loss = (first.apply_op1(NestedStep(other)).unwrap() + second).unwrap();
        let mut outer = Gradients::default();
        outer.backward(&loss).unwrap();
        let g: Vec<f64> = outer
            .take(w.as_tensor())
            .unwrap()
            .unwrap()
            .to_vec1()
            .unwrap();
        // d/dw (Σw² + 3Σw²) = 8w
        assert_eq!(g, vec![8.0, 16.0]);
    }

    /// Two models trained at once share kiln's pool: a thread waiting inside one step's
    /// backward pass (here while adding two handed-over gradients of an input used twice, split
    /// across the pool) can run the other model's step. That must neither panic nor disturb
    /// either step's gradients.
    #[test]
    fn concurrent_steps_on_the_pool_do_not_interfere() {
        use crate::activations::Activation;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let d = Device::Cpu;
        let stop = Arc::new(AtomicBool::new(false));
        let others: Vec<_> = (0..3)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let v = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        crate::runtime::on_matmul_pool(|| {
                            let mut g = Gradients::default();
                            g.backward(&L2::new(0.5).penalty(v.as_tensor()).unwrap())
                                .unwrap();
                            let got: Vec<f32> =
                                g.take(v.as_tensor()).unwrap().unwrap().to_vec1().unwrap();
                            assert_eq!(got, vec![1.0, 2.0]);
                        });
                    }
                })
            })
            .collect();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (256, 256), &d).unwrap()).unwrap();
        let w1 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (256, 16), &d).unwrap()).unwrap();
        let w2 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (256, 16), &d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::zeros(16, candle_core::DType::F32, &d).unwrap()).unwrap();
        let dense = |w: &Var| {
            crate::layers::dense_forward(
                x.as_tensor(),
                w.as_tensor(),
                Some(b.as_tensor()),
                Activation::Linear,
            )
            .unwrap()
            .sum_all()
            .unwrap()
        };
        let loss = (dense(&w1) + dense(&w2)).unwrap();
        // d/dx of Σ(x·w1) + Σ(x·w2): every row is the row sums of w1 + w2.
        let expected = (w1.as_tensor() + w2.as_tensor()).unwrap().sum(1).unwrap();
        let expected: Vec<f32> = expected.to_vec1().unwrap();
        for _ in 0..300 {
            crate::runtime::on_matmul_pool(|| {
                let mut g = Gradients::default();
                g.backward(&loss).unwrap();
                let dx: Vec<Vec<f32>> = g.take(x.as_tensor()).unwrap().unwrap().to_vec2().unwrap();
                for (a, e) in dx[17].iter().zip(&expected) {
                    assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "{a} vs {e}");
                }
            });
        }
        stop.store(true, Ordering::Relaxed);
        for t in others {
            t.join().unwrap();
        }
    }
}
