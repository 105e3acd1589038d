//! ReLU on the CPU as one op with its own backward pass.
//!
//! candle's `relu` backward builds `x ≥ 0` as a tensor, converts it to floats and multiplies:
//! three passes over the activation and two temporaries, on every ReLU after a convolution or a
//! normalization (the fused Dense kernel has its own). Here the forward pass is one vectorized
//! pass, split across threads, and the backward pass keeps the gradient where the output is
//! positive, reading the output rather than the input. As in Keras (TensorFlow and JAX), the
//! gradient at 0 is 0; candle's is 1 there.

use super::dense_kernel::{relu_in_place, relu_mask};
use crate::cpu::{contiguous, in_parallel, with_slice, Real};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

struct ReluOp;

fn forward<T: Real>(x: &[T]) -> Vec<T> {
    let mut y = x.to_vec();
    in_parallel(&mut y, &[], |y, []| relu_in_place(y));
    y
}

fn backward<T: Real + candle_core::WithDType>(
    y: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<Tensor> {
    let (y, grad) = (y.contiguous()?, grad.contiguous()?);
    with_slice::<T, _>(&y, "kiln-relu: output", |ys| {
        with_slice::<T, _>(&grad, "kiln-relu: gradient", |gs| {
            let mut dx = vec![T::default(); ys.len()];
            in_parallel(&mut dx, &[gs, ys], |d, [g, y]| relu_mask(d, g, y));
            Tensor::from_vec(dx, y.shape(), y.device())
        })
    })
}

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "kiln-relu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = match x {
            CpuStorage::F32(x) => CpuStorage::F32(forward(contiguous(x, l, "kiln-relu")?)),
            CpuStorage::F64(x) => CpuStorage::F64(forward(contiguous(x, l, "kiln-relu")?)),
            _ => candle_core::bail!("kiln-relu: x must be f32 or f64"),
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match y.dtype() {
            DType::F32 => backward::<f32>(y, grad)?,
            DType::F64 => backward::<f64>(y, grad)?,
            other => candle_core::bail!("kiln-relu: unsupported dtype {other:?}"),
        }))
    }
}

/// `max(x, 0)` through the CPU op where it applies (a contiguous CPU tensor, f32 or f64; a
/// strided view stays with candle, which reads it in place); `None` otherwise.
pub(crate) fn relu(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let ok =
        matches!(x.dtype(), DType::F32 | DType::F64) && x.device().is_cpu() && x.is_contiguous();
    if !ok || x.elem_count() == 0 {
        return Ok(None);
    }
    Ok(Some(x.apply_op1(ReluOp)?))
}

/// `max(x, 0)` for any tensor, with Keras' gradient (0 at exactly 0) on every path: the CPU op
/// (a strided view made contiguous first), else `x · [x > 0]` with the mask a constant. candle's
/// own `relu` gives a gradient of 1 at 0, which an LSTM's sliced gates met on zero-padded input.
pub(crate) fn relu_keras(x: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = relu(x)? {
        return Ok(y);
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.elem_count() > 0 {
        if let Some(y) = relu(&x.contiguous()?)? {
            return Ok(y);
        }
    }
    let keep = x.gt(0.0)?.to_dtype(x.dtype())?;
    // `+ 0` turns the `-0.0` of a negative times 0 into `0.0`, as `max` gives.
    (x * keep)?.affine(1.0, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients against the definition, for sizes on both sides of the threading
    /// threshold, with exact zeros (gradient 0, as Keras) and a NaN (kept, as Keras).
    #[test]
    fn relu_and_its_gradient_match_the_definition() {
        for n in [1usize, 7, 100_003] {
            let v: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => 0.0,
                    1 => -(i as f32) * 0.01,
                    _ => i as f32 * 0.001,
                })
                .collect();
            let x = Var::from_vec(v.clone(), n, &Device::Cpu).unwrap();
            let y = relu(x.as_tensor()).unwrap().unwrap();
            let want: Vec<f32> = v.iter().map(|&a| a.max(0.0)).collect();
            assert_eq!(y.to_vec1::<f32>().unwrap(), want);
            let w: Vec<f32> = (0..n).map(|i| 1.0 + i as f32).collect();
            let w = Tensor::from_vec(w.clone(), n, &Device::Cpu).unwrap();
            let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let w = w.to_vec1::<f32>().unwrap();
            for i in 0..n {
                let expect = if v[i] > 0.0 { w[i] } else { 0.0 };
                assert_eq!(g[i], expect, "element {i} of {n}: x = {}", v[i]);
            }
        }
        // A strided view and a dtype the op does not take (bf16) get the same values and the
        // same gradient, 0 at exactly 0 (candle's `relu` gives 1 there).
        let v = [0.0f32, -1.5, 2.0, 0.0, 3.0, -0.0];
        let x = Var::from_vec(v.to_vec(), (2, 3), &Device::Cpu).unwrap();
        for (view, dtype) in [(true, DType::F32), (false, DType::BF16)] {
            let input = x.as_tensor().to_dtype(dtype).unwrap();
            let input = if view { input.t().unwrap() } else { input };
            let y = relu_keras(&input).unwrap();
            let values = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            let values = values.to_vec1::<f32>().unwrap();
            let order: Vec<usize> = if view {
                vec![0, 3, 1, 4, 2, 5]
            } else {
                (0..6).collect()
            };
            let want: Vec<f32> = order.iter().map(|&i| v[i].max(0.0)).collect();
            assert_eq!(values, want, "{dtype:?}, view {view}");
            let grads = y.sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
            let g = g.to_vec1::<f32>().unwrap();
            assert_eq!(g, [0.0, 0.0, 1.0, 0.0, 1.0, 0.0], "{dtype:?}, view {view}");
        }
        let nan = Tensor::new(&[f64::NAN, -1.0, 2.0], &Device::Cpu).unwrap();
        let y = relu(&nan).unwrap().unwrap().to_vec1::<f64>().unwrap();
        assert!(y[0].is_nan() && y[1] == 0.0 && y[2] == 2.0);
    }
}
