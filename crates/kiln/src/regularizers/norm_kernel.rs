//! `l1·Σ|x| + l2·Σx²` as one CPU kernel with its own backward: one vectorized pass for the
//! value, and one for the gradient `l1·s(x) + 2·l2·x`, added in place to the gradient the
//! training step already holds for `x` when `x` is a weight ([`crate::gradients`]). The tensor
//! expression it replaces made five allocating passes plus candle's zero-filled accumulation.
//!
//! `s(x)` is the derivative JAX gives `|x|`: 1 for `x >= 0`, -1 below, so that a weight at
//! exactly zero (a fresh bias) takes the step Keras 3 on JAX takes (checked on the random
//! models of tests/fixtures/keras/make_keras_random.py), and the same as candle's own `abs`
//! (the unfused path). TensorFlow's `abs` has a zero gradient at zero instead.

use crate::cpu::{contiguous, in_parallel, vectorized, with_slice, Real};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// The penalty of `x`, fused where it can be (a contiguous f32/f64 CPU tensor), else as tensor
/// operations.
pub(crate) fn norm_penalty(x: &Tensor, l1: f64, l2: f64) -> crate::Result<Tensor> {
    let fused =
        x.device().is_cpu() && x.is_contiguous() && matches!(x.dtype(), DType::F32 | DType::F64);
    if fused {
        return Ok(x.apply_op1(NormPenalty { l1, l2 })?);
    }
    let mut total: Option<Tensor> = None;
    if l1 != 0.0 {
        total = Some((x.abs()?.sum_all()? * l1)?);
    }
    if l2 != 0.0 || total.is_none() {
        let term = (x.sqr()?.sum_all()? * l2)?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    Ok(total.expect("at least one term"))
}

struct NormPenalty {
    l1: f64,
    l2: f64,
}

/// Lanes of independent partial sums: they let the compiler vectorize the reductions.
const LANES: usize = 16;
/// Elements summed in `T` before the partial sums move to f64: short enough that the f32
/// rounding of each lane stays far below the tolerance of the Keras reference cases.
const BLOCK: usize = 1024;

/// `Σ f(v)` over `x`: blocks summed in lanes of `T`, the blocks' sums added in f64.
#[inline(always)]
fn lane_sum<T: Real>(x: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        let mut lanes = [T::default(); LANES];
        let chunks = block.chunks_exact(LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (s, &v) in lanes.iter_mut().zip(chunk) {
                *s = *s + f(v);
            }
        }
        for (s, &v) in lanes.iter_mut().zip(rest) {
            *s = *s + f(v);
        }
        total += lanes.iter().map(|&v| v.into()).sum::<f64>();
    }
    total
}

vectorized! {
    /// `*out = Σ|x|`.
    fn sum_abs<T>(x: &[T], out: &mut f64) {
        *out = lane_sum(x, |v| v.abs());
    }
}

vectorized! {
    /// `*out = Σx²`.
    fn sum_squares<T>(x: &[T], out: &mut f64) {
        *out = lane_sum(x, |v| v * v);
    }
}

vectorized! {
    /// `target += l1·s(x) + l2x2·x`, `s(x)` 1 at and above zero, -1 below.
    fn add_gradient<T>(target: &mut [T], x: &[T], l1: T, l2x2: T) {
        let zero = T::default();
        for (t, &v) in target.iter_mut().zip(x) {
            let sign = if v < zero { zero - l1 } else { l1 };
            *t = *t + (sign + l2x2 * v);
        }
    }
}

/// `l1·Σ|x| + l2·Σx²`. Large tensors are summed as two halves (split at a block boundary) on
/// two threads when there are two, so the result is the same with one thread or several.
fn value<T: Real>(x: &[T], l1: f64, l2: f64) -> T {
    let sums = |x: &[T]| {
        let (mut abs, mut squares) = (0.0, 0.0);
        if l1 != 0.0 {
            sum_abs(x, &mut abs);
        }
        if l2 != 0.0 {
            sum_squares(x, &mut squares);
        }
        (abs, squares)
    };
    let (abs, squares) = if x.len() >= crate::cpu::PARALLEL_MIN_LEN {
        let (left, right) = x.split_at((x.len() / 2).next_multiple_of(BLOCK).min(x.len()));
        let (a, b) = match crate::runtime::parallel_now() {
            true => rayon::join(|| sums(left), || sums(right)),
            false => (sums(left), sums(right)),
        };
        (a.0 + b.0, a.1 + b.1)
    } else {
        sums(x)
    };
    T::from_f64(l1 * abs + l2 * squares)
}

/// `target += l1·s(x) + 2·l2·x`, in place, on all matrix-product threads.
struct AddGradient {
    l1: f64,
    l2: f64,
}

impl AddGradient {
    fn run<T: Real>(&self, target: &mut [T], x: &[T]) {
        let (l1, l2x2) = (T::from_f64(self.l1), T::from_f64(2.0 * self.l2));
        in_parallel(target, &[x], |t, [x]| add_gradient(t, x, l1, l2x2));
    }

    /// The gradient for `x`: added to the one already handed over for it when there is one
    /// (then `None`), else a fresh tensor, handed over or returned.
    fn apply<T: Real + candle_core::WithDType>(
        &self,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        with_slice::<T, _>(x, "kiln-norm-penalty: x", |xs| {
            if crate::gradients::add_into_handed_over::<T>(x, |t| self.run(t, xs))? {
                return Ok(None);
            }
            let mut g = vec![T::default(); xs.len()];
            self.run(&mut g, xs);
            crate::gradients::hand_over(x, Tensor::from_vec(g, x.shape(), x.device())?)
        })
    }
}

impl CustomOp1 for NormPenalty {
    fn name(&self) -> &'static str {
        "kiln-norm-penalty"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = "kiln-norm-penalty: x";
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(vec![value(contiguous(x, l, what)?, self.l1, self.l2)])
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(vec![value(contiguous(x, l, what)?, self.l1, self.l2)])
            }
            _ => candle_core::bail!("kiln-norm-penalty: f32 or f64 only"),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if !crate::gradients::wanted(x) {
            return Ok(None);
        }
        let scale = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let op = AddGradient {
            l1: self.l1 * scale,
            l2: self.l2 * scale,
        };
        match x.dtype() {
            DType::F32 => op.apply::<f32>(x),
            DType::F64 => op.apply::<f64>(x),
            other => candle_core::bail!("kiln-norm-penalty: unsupported dtype {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and gradient equal the tensor expression's (away from zero, where the two agree),
    /// and the gradient at exactly zero is `l1`, as JAX's (and candle's) `abs` gives it.
    #[test]
    fn fused_penalty_matches_the_tensor_expression() {
        let d = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::new(&[[0.5f64, -1.5, 2.0], [-0.25, 3.0, -4.0]], &d).unwrap())
                .unwrap();
        let (l1, l2) = (0.3, 0.7);
        let fused = norm_penalty(x.as_tensor(), l1, l2).unwrap();
        let plain = ((x.as_tensor().abs().unwrap().sum_all().unwrap() * l1).unwrap()
            + (x.as_tensor().sqr().unwrap().sum_all().unwrap() * l2).unwrap())
        .unwrap();
        let (f, p) = (
            fused.to_scalar::<f64>().unwrap(),
            plain.to_scalar::<f64>().unwrap(),
        );
        assert!((f - p).abs() < 1e-12, "{f} vs {p}");
        let scaled = (fused * 3.0).unwrap();
        let g: Vec<f64> = scaled
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected: Vec<f64> = [0.5f64, -1.5, 2.0, -0.25, 3.0, -4.0]
            .iter()
            .map(|v| 3.0 * (l1 * v.signum() + 2.0 * l2 * v))
            .collect();
        for (a, b) in g.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let zero = Var::from_tensor(&Tensor::new(&[0f32, 0.0], &d).unwrap()).unwrap();
        let g0 = norm_penalty(zero.as_tensor(), 0.5, 1.0)
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            g0.get(zero.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.5, 0.5]
        );
        // The unfused path (candle's `abs`) agrees.
        let plain_zero = (zero.as_tensor().abs().unwrap().sum_all().unwrap() * 0.5)
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            plain_zero
                .get(zero.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![0.5, 0.5]
        );
    }
}
