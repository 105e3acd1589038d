//! The Dense layer as one fused CPU kernel with its own backward: the bias is written into the
//! output first and the matrix product accumulates onto it (one `gemm` call, no broadcast
//! pass), ReLU is applied in the same buffer, and the backward pass produces dX, dW and db
//! directly instead of differentiating three separate graph nodes.

use crate::activations::Activation;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// `activation(x · w + b)` for 2-D `x`, with `activation` linear or ReLU.
pub(crate) struct FusedDense {
    pub(crate) relu: bool,
}

impl FusedDense {
    /// The fused op, when it applies: CPU, f32 or f64, 2-D contiguous input, a bias, and a
    /// linear or ReLU activation.
    pub(crate) fn for_call(
        x: &Tensor,
        kernel: &Tensor,
        bias: Option<&Tensor>,
        activation: Activation,
    ) -> Option<Self> {
        let relu = match activation {
            Activation::Relu => true,
            Activation::Linear => false,
            _ => return None,
        };
        let bias = bias?;
        let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().is_cpu() && t.is_contiguous();
        let ok = matches!(x.dtype(), DType::F32 | DType::F64)
            && x.device().is_cpu()
            && x.rank() == 2
            && x.is_contiguous()
            && same(kernel)
            && same(bias);
        ok.then_some(Self { relu })
    }
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("kiln-dense: {what} must be contiguous")))?;
    Ok(&v[start..end])
}

/// `out[i, :] = b; out += x · w; relu`, with `x: m×k`, `w: k×n`.
fn forward<T>(x: &[T], w: &[T], b: &[T], m: usize, k: usize, n: usize, relu: bool) -> Vec<T>
where
    T: Copy + PartialOrd + Default + num_like::One + 'static,
{
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    for _ in 0..m {
        out.extend_from_slice(b);
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers cover m×k, k×n and m×n elements laid out row-major with the strides
    // given; `out` is exclusively borrowed for the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
    if relu {
        let zero = T::default();
        for v in &mut out {
            if *v < zero {
                *v = zero;
            }
        }
    }
    out
}

/// The one constant the kernel needs from its element type.
mod num_like {
    pub trait One {
        fn one() -> Self;
    }
    impl One for f32 {
        fn one() -> Self {
            1.0
        }
    }
    impl One for f64 {
        fn one() -> Self {
            1.0
        }
    }
}

impl CustomOp3 for FusedDense {
    fn name(&self) -> &'static str {
        "kiln-dense"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (k2, n) = lw.shape().dims2()?;
        if k != k2 || lb.shape().dims() != [n] {
            candle_core::bail!(
                "kiln-dense: shapes {:?} · {:?} + {:?} do not fit",
                lx.shape(),
                lw.shape(),
                lb.shape()
            );
        }
        let out = match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(forward(
                    contiguous(x, lx, "x")?,
                    contiguous(w, lw, "kernel")?,
                    contiguous(b, lb, "bias")?,
                    m,
                    k,
                    n,
                    self.relu,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(forward(
                    contiguous(x, lx, "x")?,
                    contiguous(w, lw, "kernel")?,
                    contiguous(b, lb, "bias")?,
                    m,
                    k,
                    n,
                    self.relu,
                ))
            }
            _ => candle_core::bail!("kiln-dense: x, kernel and bias must all be f32 or all f64"),
        };
        Ok((out, Shape::from((m, n))))
    }

    /// dZ = dY masked by ReLU' (0 where the output is 0, as Keras), then dX = dZ·wᵀ,
    /// dW = xᵀ·dZ, db = Σ_batch dZ.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dz = if self.relu {
            (grad_res * res.gt(0.0)?.to_dtype(res.dtype())?)?
        } else {
            grad_res.clone()
        };
        let dx = dz.matmul(&w.t()?)?;
        let dw = x.t()?.matmul(&dz)?;
        let db = dz.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn grads_of(y: &Tensor, vars: &[&Var]) -> Vec<Vec<f64>> {
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        vars.iter()
            .map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    }

    /// The fused kernel gives the values and gradients of matmul + bias + ReLU as separate ops.
    #[test]
    fn fused_dense_matches_the_unfused_graph() {
        let d = Device::Cpu;
        for relu in [true, false] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 3), &d).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 4), &d).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 4, &d).unwrap()).unwrap();
            let act = if relu {
                Activation::Relu
            } else {
                Activation::Linear
            };
            let op = FusedDense::for_call(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), act)
                .expect("fused path applies");
            let fused = x
                .as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), op)
                .unwrap();
            let plain = act
                .apply(
                    &x.as_tensor()
                        .matmul(w.as_tensor())
                        .unwrap()
                        .broadcast_add(b.as_tensor())
                        .unwrap(),
                )
                .unwrap();
            let (fv, pv): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
                (fused.to_vec2().unwrap(), plain.to_vec2().unwrap());
            for (a, b) in fv.iter().flatten().zip(pv.iter().flatten()) {
                assert!((a - b).abs() < 1e-12, "value {a} vs {b}");
            }
            let (gf, gp) = (
                grads_of(&fused, &[&x, &w, &b]),
                grads_of(&plain, &[&x, &w, &b]),
            );
            for (a, b) in gf.iter().flatten().zip(gp.iter().flatten()) {
                assert!((a - b).abs() < 1e-12, "gradient {a} vs {b}");
            }
        }
    }
}
