//! Softmax over the last axis as one fused CPU op with its own backward.
//!
//! candle's `softmax` is five graph nodes (max, subtract, exp, sum, divide), each with its own
//! allocation and its own backward, and `softmax_last_dim` has no backward at all. For a small
//! model the graph's bookkeeping is the step: a softmax output with crossentropy on
//! probabilities took 374k instructions a step against 236k for the same model with logits
//! (bench/README.md, T1). Here the forward is one pass per row with candle's arithmetic
//! (`exp(x - max) / Σ exp(x - max)`, summed left to right: bit for bit candle's on rows of up to
//! 10 classes, within float rounding on long rows, where candle sums in vector lanes), and the
//! backward is `dx = y · (g - Σ g·y)` in one pass.

use crate::cpu::{contiguous, Real};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

/// Softmax over the last axis: the fused op on the CPU for f32 and f64, candle's elsewhere.
pub(crate) fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() > 0;
    match fused {
        true => x.contiguous()?.apply_op1(Softmax),
        false => candle_nn::ops::softmax(x, D::Minus1),
    }
}

struct Softmax;

fn forward<T: Real>(x: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    for (row, y) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mut max = row[0];
        for &v in &row[1..] {
            if v > max {
                max = v;
            }
        }
        let mut sum = T::default();
        for (o, &v) in y.iter_mut().zip(row) {
            *o = (v - max).exp();
            sum = sum + *o;
        }
        for o in y.iter_mut() {
            *o = *o / sum;
        }
    }
    out
}

/// `dx = y · (g - Σ_row g·y)`.
fn backward<T: Real>(y: &[T], g: &[T], n: usize) -> Vec<T> {
    let mut dx = vec![T::default(); y.len()];
    for ((y, g), d) in y
        .chunks_exact(n)
        .zip(g.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
    {
        let mut dot = T::default();
        for (&a, &b) in y.iter().zip(g) {
            dot = dot + a * b;
        }
        for ((d, &a), &b) in d.iter_mut().zip(y).zip(g) {
            *d = a * (b - dot);
        }
    }
    dx
}

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "kiln-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = last_dim(l);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(forward(contiguous(v, l, "kiln-softmax")?, n)),
            CpuStorage::F64(v) => CpuStorage::F64(forward(contiguous(v, l, "kiln-softmax")?, n)),
            _ => candle_core::bail!("kiln-softmax: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&grad, &SoftmaxGrad)?))
    }
}

/// The backward pass as an op of its own (no second derivative is needed).
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "kiln-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if ly.shape() != lg.shape() {
            candle_core::bail!(
                "kiln-softmax-grad: shapes {:?} and {:?}",
                ly.shape(),
                lg.shape()
            );
        }
        let n = last_dim(ly);
        let what = "kiln-softmax-grad";
        let out = match (y, g) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(backward(
                contiguous(y, ly, what)?,
                contiguous(g, lg, what)?,
                n,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(backward(
                contiguous(y, ly, what)?,
                contiguous(g, lg, what)?,
                n,
            )),
            _ => candle_core::bail!("kiln-softmax-grad: f32 or f64, the same for both"),
        };
        Ok((out, ly.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random::<f32>() * 20.0 - 10.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Bit for bit with candle's softmax on rows as short as classifiers' outputs; on long rows
    /// candle sums in vector lanes, so the last bit may differ.
    #[test]
    fn forward_is_candles_softmax() -> candle_core::Result<()> {
        for (shape, seed) in [((7, 3), 1), ((32, 10), 2), ((5, 1), 3), ((3, 257), 4)] {
            let x = random(shape, seed);
            let ours = softmax_last(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let theirs = candle_nn::ops::softmax(&x, D::Minus1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (a, b) in ours.iter().zip(&theirs) {
                match shape.1 <= 10 {
                    true => assert_eq!(a.to_bits(), b.to_bits(), "{shape:?}"),
                    false => assert!((a - b).abs() <= 1e-6 * b.abs(), "{shape:?}: {a} vs {b}"),
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_candles_graph() -> candle_core::Result<()> {
        let x = Var::from_tensor(&random((6, 4), 5).to_dtype(DType::F64)?)?;
        let w = random((6, 4), 6).to_dtype(DType::F64)?;
        let ours = softmax_last(x.as_tensor())?
            .mul(&w)?
            .sum_all()?
            .backward()?;
        let theirs = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?
            .mul(&w)?
            .sum_all()?
            .backward()?;
        let a = ours
            .get(&x)
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let b = theirs
            .get(&x)
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f64>()?;
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        Ok(())
    }
}
