//! `l1·Σ|x| + l2·Σx²` as one CPU kernel with its own backward: one pass for the value, one for
//! the gradient `l1·sign(x) + 2·l2·x`, handed straight to the training step when `x` is a
//! weight ([`crate::gradients`]), instead of the five allocating passes of the tensor
//! expression and candle's zero-filled accumulation.
//!
//! `sign(0) = 0`, as in Keras (TensorFlow's and JAX's `abs` have a zero gradient at zero).

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

fn value<T: Copy + Into<f64>>(x: &[T], l1: f64, l2: f64) -> f64 {
    let (mut abs, mut sq) = (0.0f64, 0.0f64);
    for &v in x {
        let v: f64 = v.into();
        abs += v.abs();
        sq += v * v;
    }
    l1 * abs + l2 * sq
}

macro_rules! gradient {
    ($x:expr, $t:ty, $l1:expr, $l2:expr) => {{
        let (l1, l2) = ($l1 as $t, (2.0 * $l2) as $t);
        $x.iter()
            .map(|&v| {
                let sign = if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                l1 * sign + l2 * v
            })
            .collect::<Vec<$t>>()
    }};
}

impl CustomOp1 for NormPenalty {
    fn name(&self) -> &'static str {
        "kiln-norm-penalty"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("kiln-norm-penalty: x must be contiguous".into())
        })?;
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(vec![value(&x[start..end], self.l1, self.l2) as f32])
            }
            CpuStorage::F64(x) => CpuStorage::F64(vec![value(&x[start..end], self.l1, self.l2)]),
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
        let (l1, l2) = (self.l1 * scale, self.l2 * scale);
        let what = "kiln-norm-penalty: x";
        let grad = match x.dtype() {
            DType::F32 => crate::cpu::with_slice::<f32, _>(x, what, |v| {
                Tensor::from_vec(gradient!(v, f32, l1, l2), x.shape(), x.device())
            })?,
            DType::F64 => crate::cpu::with_slice::<f64, _>(x, what, |v| {
                Tensor::from_vec(gradient!(v, f64, l1, l2), x.shape(), x.device())
            })?,
            other => candle_core::bail!("kiln-norm-penalty: unsupported dtype {other:?}"),
        };
        crate::gradients::hand_over(x, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and gradient equal the tensor expression's (away from zero, where the two agree),
    /// and the gradient at exactly zero is the L2 part only, as in Keras.
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
            vec![0.0, 0.0]
        );
    }
}
