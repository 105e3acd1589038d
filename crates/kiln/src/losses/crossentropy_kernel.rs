//! Categorical and binary crossentropy on probabilities, Keras' clipped rule, as fused CPU ops
//! with their own backward.
//!
//! Binary: `-(t · log q + (1 - t) · log(1 - q))` elementwise with `q = clip(p, ε, 1 - ε)`, ten
//! candle nodes before; the backward is `g · (-t / q + (1 - t) / (1 - q))` where `p` is inside
//! the clip range (bounds included, as candle's clamp), else 0.
//!
//! Keras normalizes the probabilities by their sum, clips them to `[ε, 1 - ε]` and takes
//! `-Σ t · log q`; as candle ops that is eight graph nodes (sum, divide, maximum, minimum, log,
//! multiply, sum, negate), each with its allocation and backward, which for a small model costs
//! more than the layers (bench/README.md, T1). Here each row takes one pass forward, with the
//! same arithmetic in the same order, and one backward: with `u = p / Σp`, `a_j = -t_j / u_j`
//! where `ε ≤ u_j ≤ 1 - ε` (candle's clamp passes the gradient there, bounds included) and 0
//! where clipped, `dp_j = g · (a_j - Σ_i a_i u_i) / Σp`.

use crate::cpu::{contiguous, Real};
use crate::reduction::EPSILON;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// `-Σ_last t · log(clip(p / Σ_last p))` per row, fused on the CPU for f32/f64 tensors of the
/// same shape reduced over their last axis; `None` where it does not apply.
pub(crate) fn fused(t: &Tensor, p: &Tensor, axis: usize) -> candle_core::Result<Option<Tensor>> {
    let applies = p.device().is_cpu()
        && matches!(p.dtype(), DType::F32 | DType::F64)
        && t.dtype() == p.dtype()
        && t.dims() == p.dims()
        && p.rank() > 0
        && axis == p.rank() - 1
        && !t.track_op();
    if !applies {
        return Ok(None);
    }
    Ok(Some(
        t.contiguous()?
            .apply_op2(&p.contiguous()?, ProbabilityCrossentropy)?,
    ))
}

struct ProbabilityCrossentropy;

fn bounds<T: Real>() -> (T, T) {
    (T::from_f64(EPSILON), T::from_f64(1.0 - EPSILON))
}

fn forward<T: Real>(t: &[T], p: &[T], n: usize) -> Vec<T> {
    let (lo, hi) = bounds::<T>();
    let mut q = vec![T::default(); n];
    t.chunks_exact(n)
        .zip(p.chunks_exact(n))
        .map(|(t, p)| {
            let mut sum = T::default();
            for &v in p {
                sum = sum + v;
            }
            for (q, &v) in q.iter_mut().zip(p) {
                let u = v / sum;
                let u = if u < lo { lo } else { u };
                *q = if u > hi { hi } else { u };
            }
            let mut total = T::default();
            for (&t, &q) in t.iter().zip(&q) {
                total = total + t * q.ln();
            }
            T::default() - total
        })
        .collect()
}

fn backward<T: Real>(t: &[T], p: &[T], g: &[T], n: usize) -> Vec<T> {
    let (lo, hi) = bounds::<T>();
    let mut dp = vec![T::default(); p.len()];
    let mut a = vec![T::default(); n];
    for (((t, p), d), &g) in t
        .chunks_exact(n)
        .zip(p.chunks_exact(n))
        .zip(dp.chunks_exact_mut(n))
        .zip(g)
    {
        let mut sum = T::default();
        for &v in p {
            sum = sum + v;
        }
        let mut dot = T::default();
        for ((a, &t), &v) in a.iter_mut().zip(t).zip(p) {
            let u = v / sum;
            *a = if u >= lo && u <= hi {
                T::default() - t / u
            } else {
                T::default()
            };
            dot = dot + *a * u;
        }
        for (d, &a) in d.iter_mut().zip(&a) {
            *d = g * (a - dot) / sum;
        }
    }
    dp
}

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

impl CustomOp2 for ProbabilityCrossentropy {
    fn name(&self) -> &'static str {
        "kiln-probability-crossentropy"
    }

    fn cpu_fwd(
        &self,
        t: &CpuStorage,
        lt: &Layout,
        p: &CpuStorage,
        lp: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = last_dim(lp);
        let what = "kiln-probability-crossentropy";
        let out = match (t, p) {
            (CpuStorage::F32(t), CpuStorage::F32(p)) => CpuStorage::F32(forward(
                contiguous(t, lt, what)?,
                contiguous(p, lp, what)?,
                n,
            )),
            (CpuStorage::F64(t), CpuStorage::F64(p)) => CpuStorage::F64(forward(
                contiguous(t, lt, what)?,
                contiguous(p, lp, what)?,
                n,
            )),
            _ => candle_core::bail!("{what}: f32 or f64, the same for both"),
        };
        let dims = lp.shape().dims();
        Ok((out, Shape::from(&dims[..dims.len() - 1])))
    }

    fn bwd(
        &self,
        t: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let n = p.dims().last().copied().unwrap_or(1).max(1);
        let what = "kiln-probability-crossentropy";
        let dp = match p.dtype() {
            DType::F32 => Tensor::from_vec(
                with3::<f32>(t, p, &grad, what, |t, p, g| backward(t, p, g, n))?,
                p.shape(),
                p.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                with3::<f64>(t, p, &grad, what, |t, p, g| backward(t, p, g, n))?,
                p.shape(),
                p.device(),
            )?,
            other => candle_core::bail!("{what}: unsupported dtype {other:?}"),
        };
        Ok((None, Some(dp)))
    }
}

fn with3<T: Real + candle_core::WithDType>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    what: &str,
    f: impl FnOnce(&[T], &[T], &[T]) -> Vec<T>,
) -> candle_core::Result<Vec<T>> {
    use crate::cpu::with_slice;
    with_slice::<T, _>(a, what, |a| {
        with_slice::<T, _>(b, what, |b| with_slice::<T, _>(c, what, |c| Ok(f(a, b, c))))
    })
}

/// Keras' binary crossentropy of probabilities, elementwise (the caller averages over the
/// axis), fused on the CPU for f32/f64 tensors of the same shape; `None` where it does not apply.
pub(crate) fn fused_binary(t: &Tensor, p: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let applies = p.device().is_cpu()
        && matches!(p.dtype(), DType::F32 | DType::F64)
        && t.dtype() == p.dtype()
        && t.dims() == p.dims()
        && !t.track_op();
    if !applies {
        return Ok(None);
    }
    Ok(Some(t.contiguous()?.apply_op2(
        &p.contiguous()?,
        BinaryProbabilityCrossentropy,
    )?))
}

struct BinaryProbabilityCrossentropy;

fn binary_forward<T: Real>(t: &[T], p: &[T]) -> Vec<T> {
    let (lo, hi) = bounds::<T>();
    let one = T::from_f64(1.0);
    let minus_one = T::from_f64(-1.0);
    t.iter()
        .zip(p)
        .map(|(&t, &p)| {
            let q = if p < lo { lo } else { p };
            let q = if q > hi { hi } else { q };
            // As candle's affine(-1, 1): v · -1 + 1.
            let one_minus_t = t * minus_one + one;
            let one_minus_q = q * minus_one + one;
            let ll = t * q.ln() + one_minus_t * one_minus_q.ln();
            T::default() - ll
        })
        .collect()
}

fn binary_backward<T: Real>(t: &[T], p: &[T], g: &[T]) -> Vec<T> {
    let (lo, hi) = bounds::<T>();
    let one = T::from_f64(1.0);
    t.iter()
        .zip(p)
        .zip(g)
        .map(|((&t, &p), &g)| {
            if p >= lo && p <= hi {
                g * ((one - t) / (one - p) - t / p)
            } else {
                T::default()
            }
        })
        .collect()
}

impl CustomOp2 for BinaryProbabilityCrossentropy {
    fn name(&self) -> &'static str {
        "kiln-binary-probability-crossentropy"
    }

    fn cpu_fwd(
        &self,
        t: &CpuStorage,
        lt: &Layout,
        p: &CpuStorage,
        lp: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = "kiln-binary-probability-crossentropy";
        let out = match (t, p) {
            (CpuStorage::F32(t), CpuStorage::F32(p)) => CpuStorage::F32(binary_forward(
                contiguous(t, lt, what)?,
                contiguous(p, lp, what)?,
            )),
            (CpuStorage::F64(t), CpuStorage::F64(p)) => CpuStorage::F64(binary_forward(
                contiguous(t, lt, what)?,
                contiguous(p, lp, what)?,
            )),
            _ => candle_core::bail!("{what}: f32 or f64, the same for both"),
        };
        Ok((out, lp.shape().clone()))
    }

    fn bwd(
        &self,
        t: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let what = "kiln-binary-probability-crossentropy";
        let dp = match p.dtype() {
            DType::F32 => with3::<f32>(t, p, &grad, what, binary_backward)
                .and_then(|v| Tensor::from_vec(v, p.shape(), p.device()))?,
            DType::F64 => with3::<f64>(t, p, &grad, what, binary_backward)
                .and_then(|v| Tensor::from_vec(v, p.shape(), p.device()))?,
            other => candle_core::bail!("{what}: unsupported dtype {other:?}"),
        };
        Ok((None, Some(dp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The composed candle graph the fused op replaces.
    fn composed(t: &Tensor, p: &Tensor) -> candle_core::Result<Tensor> {
        let sum = p.sum_keepdim(D::Minus1)?;
        let q = p.broadcast_div(&sum)?.clamp(EPSILON, 1.0 - EPSILON)?;
        t.mul(&q.log()?)?.sum(D::Minus1)?.neg()
    }

    /// Rows with ordinary probabilities, a saturated one (clipped at 1 - ε and at ε), an
    /// unnormalized one and soft labels.
    fn cases() -> (Tensor, Tensor) {
        let p = [
            [0.2, 0.5, 0.3],
            [1.0, 0.0, 0.0],
            [2.0, 1.0, 1.0],
            [1e-9, 0.6, 0.4],
        ];
        let t = [
            [0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.25, 0.25, 0.5],
            [1.0, 0.0, 0.0],
        ];
        let d = Device::Cpu;
        (Tensor::new(&t, &d).unwrap(), Tensor::new(&p, &d).unwrap())
    }

    #[test]
    fn values_are_the_composed_graphs_bit_for_bit() -> candle_core::Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let (t, p) = cases();
            let (t, p) = (t.to_dtype(dtype)?, p.to_dtype(dtype)?);
            let ours = fused(&t, &p, 1)?.expect("applies").to_dtype(DType::F64)?;
            let theirs = composed(&t, &p)?.to_dtype(DType::F64)?;
            assert_eq!(
                ours.to_vec1::<f64>()?,
                theirs.to_vec1::<f64>()?,
                "{dtype:?}"
            );
        }
        Ok(())
    }

    /// The gradients for `var` of Σ w·ours and Σ w·theirs agree to 1e-9 (relative above 1).
    fn assert_same_gradient(
        ours: Tensor,
        theirs: Tensor,
        var: &Var,
        w: &Tensor,
    ) -> candle_core::Result<()> {
        let grad = |out: Tensor| -> candle_core::Result<Vec<f64>> {
            out.mul(w)?
                .sum_all()?
                .backward()?
                .get(var)
                .expect("grad")
                .flatten_all()?
                .to_vec1::<f64>()
        };
        let (a, b) = (grad(ours)?, grad(theirs)?);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "[{i}] {a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn gradient_is_the_composed_graphs() -> candle_core::Result<()> {
        let (t, p) = cases();
        let (t, p) = (t.to_dtype(DType::F64)?, p.to_dtype(DType::F64)?);
        let w = Tensor::new(&[1.0f64, -2.0, 0.5, 3.0], &Device::Cpu)?;
        let var = Var::from_tensor(&p)?;
        let ours = fused(&t, var.as_tensor(), 1)?.expect("applies");
        assert_same_gradient(ours, composed(&t, var.as_tensor())?, &var, &w)
    }

    fn binary_composed(t: &Tensor, p: &Tensor) -> candle_core::Result<Tensor> {
        let q = p.clamp(EPSILON, 1.0 - EPSILON)?;
        let one_minus_t = t.affine(-1.0, 1.0)?;
        let ll = (t.mul(&q.log()?)? + one_minus_t.mul(&q.affine(-1.0, 1.0)?.log()?)?)?;
        ll.neg()
    }

    #[test]
    fn binary_values_and_gradient_are_the_composed_graphs() -> candle_core::Result<()> {
        let d = Device::Cpu;
        // Ordinary, saturated (0 and 1, clipped), tiny and soft-label entries.
        let p = [[0.3, 1.0, 0.0], [1e-9, 0.999, 0.5]];
        let t = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.25]];
        for dtype in [DType::F32, DType::F64] {
            let t = Tensor::new(&t, &d)?.to_dtype(dtype)?;
            let p = Tensor::new(&p, &d)?.to_dtype(dtype)?;
            let ours = fused_binary(&t, &p)?
                .expect("applies")
                .to_dtype(DType::F64)?;
            let theirs = binary_composed(&t, &p)?.to_dtype(DType::F64)?;
            assert_eq!(
                ours.to_vec2::<f64>()?,
                theirs.to_vec2::<f64>()?,
                "{dtype:?}"
            );
        }
        let t = Tensor::new(&t, &d)?;
        let var = Var::from_tensor(&Tensor::new(&p, &d)?)?;
        let w = Tensor::new(&[[1.0f64, -2.0, 0.5], [3.0, 1.5, -1.0]], &d)?;
        let ours = fused_binary(&t, var.as_tensor())?.expect("applies");
        assert_same_gradient(ours, binary_composed(&t, var.as_tensor())?, &var, &w)
    }
}
