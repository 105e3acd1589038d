//! In-place, single-pass optimizer kernels for the CPU: no tensor is allocated per step, and
//! each parameter's state is read and written once. The arithmetic is the same, operation for
//! operation, as the tensor path it replaces, so results are bit-identical: large tensors are
//! split across the matrix-product threads, and each piece runs as AVX-512 code where the CPU
//! has it (IEEE arithmetic gives the same bits at any vector width).

use crate::cpu::{contiguous, contiguous_mut, in_parallel_many, vectorized, Real};
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

vectorized! {
    /// One Adam step for every element: `m = β₁·m + (1-β₁)·g`, `v = β₂·v + (1-β₂)·g²`,
    /// `p -= m / (√v + ε) · α`, in the operation order of the tensor path.
    fn adam_update<T>(p: &mut [T], m: &mut [T], v: &mut [T], g: &[T], c: &[T; 6]) {
        let [b1, r1, b2, r2, alpha, eps] = *c;
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            *m = *m * b1 + g * r1;
            *v = *v * b2 + g * g * r2;
            *p -= *m / (v.sqrt() + eps) * alpha;
        }
    }
}

/// Adam's two moments of one parameter, kept by the optimizer in plain memory so that one pass
/// can update them together with the parameter (three passes and 10 reads or writes per
/// element became one pass and 7).
#[derive(Clone)]
pub(crate) enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    F64 { m: Vec<f64>, v: Vec<f64> },
}

impl std::fmt::Debug for Moments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = match self {
            Moments::F32 { m, .. } => m.len(),
            Moments::F64 { m, .. } => m.len(),
        };
        write!(f, "Moments({len} elements)")
    }
}

impl Moments {
    /// Zero moments for a parameter of `dtype` with `len` elements (f32 or f64 only).
    pub(crate) fn zeros(dtype: DType, len: usize) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32 {
                m: vec![0.0; len],
                v: vec![0.0; len],
            }),
            DType::F64 => Some(Self::F64 {
                m: vec![0.0; len],
                v: vec![0.0; len],
            }),
            _ => None,
        }
    }

    /// Moments restored from tensors (a checkpoint), converted to `dtype`.
    pub(crate) fn from_tensors(m: &Tensor, v: &Tensor, dtype: DType) -> candle_core::Result<Self> {
        let flat = |t: &Tensor| t.to_dtype(dtype)?.flatten_all();
        let (m, v) = (flat(m)?, flat(v)?);
        match dtype {
            DType::F32 => Ok(Self::F32 {
                m: m.to_vec1()?,
                v: v.to_vec1()?,
            }),
            DType::F64 => Ok(Self::F64 {
                m: m.to_vec1()?,
                v: v.to_vec1()?,
            }),
            other => candle_core::bail!("fused Adam: unsupported dtype {other:?}"),
        }
    }

    /// Copies of the moments as tensors shaped like `param` (to save them).
    pub(crate) fn to_tensors(&self, param: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (shape, device) = (param.shape(), param.device());
        Ok(match self {
            Self::F32 { m, v } => (
                Tensor::from_slice(m, shape, device)?,
                Tensor::from_slice(v, shape, device)?,
            ),
            Self::F64 { m, v } => (
                Tensor::from_slice(m, shape, device)?,
                Tensor::from_slice(v, shape, device)?,
            ),
        })
    }

    fn len(&self) -> usize {
        match self {
            Self::F32 { m, .. } => m.len(),
            Self::F64 { m, .. } => m.len(),
        }
    }
}

/// One Adam step of a parameter (the tensor it is applied to) from its gradient, updating
/// its [`Moments`] in the same pass, on all matrix-product threads.
pub(crate) struct AdamUpdate<'a> {
    pub(crate) moments: std::sync::Mutex<&'a mut Moments>,
    pub(crate) beta_1: f64,
    pub(crate) beta_2: f64,
    pub(crate) alpha: f64,
    pub(crate) epsilon: f64,
}

impl candle_core::InplaceOp2 for AdamUpdate<'_> {
    fn name(&self) -> &'static str {
        "kiln-adam-update"
    }
    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        lp: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        let mut moments = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("kiln-adam-update: moments poisoned".into()))?;
        if moments.len() != lp.shape().elem_count() {
            candle_core::bail!("kiln-adam-update: moments do not match the parameter's size");
        }
        macro_rules! run {
            ($p:expr, $g:expr, $m:expr, $v:expr, $t:ty) => {{
                let c: [$t; 6] = [
                    self.beta_1 as $t,
                    (1.0 - self.beta_1) as $t,
                    self.beta_2 as $t,
                    (1.0 - self.beta_2) as $t,
                    self.alpha as $t,
                    self.epsilon as $t,
                ];
                let (p, g) = (
                    contiguous_mut($p, lp, "kiln-adam-update: parameter")?,
                    contiguous($g, lg, "kiln-adam-update: gradient")?,
                );
                in_parallel_many([p, &mut $m[..], &mut $v[..]], &[g], |[p, m, v], [g]| {
                    adam_update(p, m, v, g, &c)
                });
            }};
        }
        match (p, g, &mut **moments) {
            (CpuStorage::F32(p), CpuStorage::F32(g), Moments::F32 { m, v }) => run!(p, g, m, v, f32),
            (CpuStorage::F64(p), CpuStorage::F64(g), Moments::F64 { m, v }) => run!(p, g, m, v, f64),
            _ => candle_core::bail!("kiln-adam-update: parameter, gradient and moments must share one dtype (f32 or f64)"),
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

            let mut moments = Moments::from_tensors(&m0, &v0, DType::F32).unwrap();
            let p = Var::from_tensor(&p0).unwrap();
            assert!(supported(&[p.as_tensor(), &g]));
            p.as_tensor()
                .inplace_op2(
                    &g,
                    &AdamUpdate {
                        moments: std::sync::Mutex::new(&mut moments),
                        beta_1: b1,
                        beta_2: b2,
                        alpha,
                        epsilon: eps,
                    },
                )
                .unwrap();
            let (got_m, got_v) = moments.to_tensors(p.as_tensor()).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(&got_m), bits(&m));
            assert_eq!(bits(&got_v), bits(&v));
            let got = p.as_tensor().to_vec1::<f32>().unwrap();
            assert!(got
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
