//! The infinity-norm attack step (FGSM, and each PGD step) as one CPU pass: cleaning the
//! gradient, its sign, the step, the projection into the ε-ball and the clip, with the same
//! arithmetic in the same order as the tensor operations it replaces (ten allocating passes
//! over the batch), so the perturbed inputs are bit-identical.

use crate::cpu::{contiguous, in_parallel, vectorized, Real};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// One sign step from `current` along the gradient `g`, projected around `clean` and clipped.
pub(super) struct SignStep {
    pub(super) step_size: f64,
    pub(super) epsilon: f64,
    pub(super) clip: Option<(f64, f64)>,
}

impl SignStep {
    /// Whether the fused pass applies to these tensors: one float dtype, one shape, contiguous,
    /// on the CPU.
    pub(super) fn applies(clean: &Tensor, current: &Tensor, grad: &Tensor) -> bool {
        [clean, current, grad].iter().all(|t| {
            t.device().is_cpu()
                && t.is_contiguous()
                && t.dtype() == clean.dtype()
                && t.shape() == clean.shape()
        }) && matches!(clean.dtype(), DType::F32 | DType::F64)
    }

    fn run<T: Real>(&self, x: &[T], current: &[T], g: &[T]) -> Vec<T> {
        let (lo, hi) = match self.clip {
            Some((l, h)) => (T::from_f64(l), T::from_f64(h)),
            None => (T::from_f64(f64::NEG_INFINITY), T::from_f64(f64::INFINITY)),
        };
        let c = [
            T::from_f64(self.step_size),
            T::from_f64(self.epsilon),
            lo,
            hi,
        ];
        let clip = self.clip.is_some();
        let mut out = vec![T::default(); x.len()];
        in_parallel(&mut out, &[x, current, g], |out, [x, current, g]| {
            sign_step(out, x, current, g, &c, clip)
        });
        out
    }
}

vectorized! {
    /// `out = clip(x + clamp(c + sign(finite(g))·step - x, ±ε))`, elementwise.
    fn sign_step<T>(out: &mut [T], x: &[T], current: &[T], g: &[T], c: &[T; 4], clip: bool) {
        let [step, eps, lo, hi] = *c;
        let zero = T::default();
        let one = T::from_f64(1.0);
        let infinity = T::from_f64(f64::INFINITY);
        let neg_eps = zero - eps;
        let max = |a: T, b: T| if a < b { b } else { a };
        let min = |a: T, b: T| if a > b { b } else { a };
        for (((o, &x), &c), &g) in out.iter_mut().zip(x).zip(current).zip(g) {
            let g = if g.abs() < infinity { g } else { zero };
            let sign = (if g > zero { one } else { zero }) - (if g < zero { one } else { zero });
            let moved = c + (sign * step + zero);
            let v = x + min(max(moved - x, neg_eps), eps);
            *o = if clip { min(max(v, lo), hi) } else { v };
        }
    }
}

impl CustomOp3 for SignStep {
    fn name(&self) -> &'static str {
        "kiln-sign-step"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        c: &CpuStorage,
        lc: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (x, c, g) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(g)) => {
                CpuStorage::F32(self.run(
                    contiguous(x, lx, "kiln-sign-step: x")?,
                    contiguous(c, lc, "kiln-sign-step: current")?,
                    contiguous(g, lg, "kiln-sign-step: gradient")?,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(c), CpuStorage::F64(g)) => {
                CpuStorage::F64(self.run(
                    contiguous(x, lx, "kiln-sign-step: x")?,
                    contiguous(c, lc, "kiln-sign-step: current")?,
                    contiguous(g, lg, "kiln-sign-step: gradient")?,
                ))
            }
            _ => candle_core::bail!("kiln-sign-step: f32 or f64 tensors of one dtype only"),
        };
        Ok((out, lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Adversarial, PerturbationNorm};
    use candle_core::{DType, Device, Tensor};

    /// The fused step gives the bits of `direction` + `step` (tensor operations), on
    /// gradients with zeros, infinities and NaNs, with and without a clip, in f32 and f64.
    #[test]
    fn fused_sign_step_matches_the_tensor_path_bit_for_bit() {
        let d = Device::Cpu;
        let special = [
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            1e-30,
            -2.5,
        ];
        for dtype in [DType::F32, DType::F64] {
            let clean = Tensor::rand(0f64, 1.0, (7, 13), &d)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let current = (&clean
                + Tensor::randn(0f64, 0.07, (7, 13), &d)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap())
            .unwrap();
            let mut g: Vec<f64> = Tensor::randn(0f64, 1.0, 7 * 13, &d)
                .unwrap()
                .to_vec1()
                .unwrap();
            g[..special.len()].copy_from_slice(&special);
            let grad = Tensor::from_vec(g, (7, 13), &d)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for attack in [
                Adversarial::pgd(0.05, 3, 0.02).norm(PerturbationNorm::Infinity),
                Adversarial::pgd(0.05, 3, 0.02)
                    .norm(PerturbationNorm::Infinity)
                    .clip(0.0, 1.0),
                Adversarial::fgsm(0.1),
            ] {
                let (x, c, g) = (
                    std::slice::from_ref(&clean),
                    std::slice::from_ref(&current),
                    std::slice::from_ref(&grad),
                );
                let fused = attack.step_along(x, c, g).unwrap();
                let plain = attack.step(x, c, &attack.direction(g).unwrap()).unwrap();
                let bits = |t: &Tensor| -> Vec<u64> {
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert_eq!(bits(&fused[0]), bits(&plain[0]), "{attack:?} in {dtype:?}");
            }
        }
    }
}
