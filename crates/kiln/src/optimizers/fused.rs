//! In-place, single-pass optimizer kernels for the CPU: no tensor is allocated per step, and
//! each parameter's state is read and written once. The arithmetic is the same, operation for
//! operation, as the tensor path it replaces, so results are bit-identical: large tensors are
//! split across the matrix-product threads, and each piece runs as AVX-512 code where the CPU
//! has it (IEEE arithmetic gives the same bits at any vector width).

use crate::cpu::{in_parallel, vectorized, Real};
use candle_core::{CpuStorage, DType, Layout, Tensor};

/// Whether the fused kernels apply: every tensor on the CPU, contiguous, of one float dtype.
pub(crate) fn supported(tensors: &[&Tensor]) -> bool {
    let dtype = tensors[0].dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && tensors.iter().all(|t| {
            t.device().is_cpu()
                && t.is_contiguous()
                && t.dtype() == dtype
                && t.dims() == tensors[0].dims()
        })
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused optimizer: non-contiguous source".into()))?;
    Ok(&v[start..end])
}

fn slice_mut<'a, T>(v: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused optimizer: non-contiguous target".into()))?;
    Ok(&mut v[start..end])
}

vectorized! {
    /// `s = decay·s + rest·g` (or `g²`).
    fn moving_average<T>(s: &mut [T], g: &[T], decay: T, rest: T, square: bool) {
        if square {
            for (s, &g) in s.iter_mut().zip(g) {
                *s = *s * decay + g * g * rest;
            }
        } else {
            for (s, &g) in s.iter_mut().zip(g) {
                *s = *s * decay + g * rest;
            }
        }
    }
}

vectorized! {
    /// `p -= m / (√v + ε) · α`.
    fn adam_step<T>(p: &mut [T], m: &[T], v: &[T], alpha: T, eps: T) {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            *p -= m / (v.sqrt() + eps) * alpha;
        }
    }
}

/// `s = decay·s + (1 - decay)·g` (or `g²`): a moment estimate, updated in place.
pub(crate) struct MovingAverage {
    pub(crate) decay: f64,
    pub(crate) square: bool,
}

impl candle_core::InplaceOp2 for MovingAverage {
    fn name(&self) -> &'static str {
        "kiln-moving-average"
    }
    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        ls: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        macro_rules! run {
            ($s:expr, $g:expr, $t:ty) => {{
                let (decay, rest) = (self.decay as $t, (1.0 - self.decay) as $t);
                let square = self.square;
                let (s, g) = (slice_mut($s, ls)?, slice($g, lg)?);
                in_parallel(s, &[g], |s, [g]| moving_average(s, g, decay, rest, square));
            }};
        }
        match (s, g) {
            (CpuStorage::F32(s), CpuStorage::F32(g)) => run!(s, g, f32),
            (CpuStorage::F64(s), CpuStorage::F64(g)) => run!(s, g, f64),
            _ => candle_core::bail!("kiln-moving-average: f32 or f64 tensors of one dtype only"),
        }
        Ok(())
    }
}

/// `p -= alpha · m / (√v + ε)`: Adam's parameter update, in place.
pub(crate) struct AdamStep {
    pub(crate) alpha: f64,
    pub(crate) epsilon: f64,
}

impl candle_core::InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "kiln-adam-step"
    }
    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        lp: &Layout,
        m: &CpuStorage,
        lm: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<()> {
        macro_rules! run {
            ($p:expr, $m:expr, $v:expr, $t:ty) => {{
                let (alpha, eps) = (self.alpha as $t, self.epsilon as $t);
                let (p, m, v) = (slice_mut($p, lp)?, slice($m, lm)?, slice($v, lv)?);
                in_parallel(p, &[m, v], |p, [m, v]| adam_step(p, m, v, alpha, eps));
            }};
        }
        match (p, m, v) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => run!(p, m, v, f32),
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => run!(p, m, v, f64),
            _ => candle_core::bail!("kiln-adam-step: f32 or f64 tensors of one dtype only"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused kernels give exactly the bits of the tensor operations they replace, on a
    /// handful of edge values (serial path) and on a tensor large enough to be split across
    /// threads.
    #[test]
    fn fused_adam_matches_the_tensor_path_bit_for_bit() {
        let device = Device::Cpu;
        let small = [
            [0.3f32, -1.7, 2.5e-3, 40.0, -0.0],
            [0.01, 0.2, -0.3, 0.0, 1.0],
            [0.5, 0.1, 0.0, 2.0, 1e-9],
            [1.0, -2.0, 0.5, 3.0, -0.25],
        ]
        .map(|v| Tensor::new(&v, &device).unwrap());
        let n = 3 * crate::cpu::PARALLEL_MIN_LEN + 17;
        let large = [0.0, 0.0, 1.0, 0.0].map(|mean| {
            Tensor::randn(mean, 1f32, n, &device)
                .unwrap()
                .abs()
                .unwrap()
        });
        for [g, m0, v0, p0] in [small, large] {
            let (b1, b2, eps, alpha) = (0.9, 0.999, 1e-7, 0.00123);
            let m = m0
                .affine(b1, 0.0)
                .unwrap()
                .add(&g.affine(1.0 - b1, 0.0).unwrap())
                .unwrap();
            let v = v0
                .affine(b2, 0.0)
                .unwrap()
                .add(&g.sqr().unwrap().affine(1.0 - b2, 0.0).unwrap())
                .unwrap();
            let step = m
                .div(&v.sqrt().unwrap().affine(1.0, eps).unwrap())
                .unwrap()
                .affine(alpha, 0.0)
                .unwrap();
            let expected = p0.sub(&step).unwrap().to_vec1::<f32>().unwrap();

            let (m, v, p) = (
                m0.copy().unwrap(),
                v0.copy().unwrap(),
                Var::from_tensor(&p0).unwrap(),
            );
            assert!(supported(&[p.as_tensor(), &g, &m, &v]));
            m.inplace_op2(
                &g,
                &MovingAverage {
                    decay: b1,
                    square: false,
                },
            )
            .unwrap();
            v.inplace_op2(
                &g,
                &MovingAverage {
                    decay: b2,
                    square: true,
                },
            )
            .unwrap();
            p.as_tensor()
                .inplace_op3(
                    &m,
                    &v,
                    &AdamStep {
                        alpha,
                        epsilon: eps,
                    },
                )
                .unwrap();
            let got = p.as_tensor().to_vec1::<f32>().unwrap();
            assert!(got
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
