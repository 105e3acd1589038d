//! An all-reduce inside the autodiff graph: the tensor summed over the ranks, with the
//! backward pass each use needs, for the values every rank must share within a step
//! (synchronised BatchNormalization's statistics, the loss terms a weighting strategy sees).

use super::{Communicator, SharedCommunicator};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// What the gradient of the summed tensor becomes on the way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Adjoint {
    /// Summed over the ranks too: each rank's objective is its own part of the global one
    /// (its shard's losses), so a rank's input reaches every rank's objective through the
    /// sum. Synchronised BatchNormalization's statistics.
    Sum,
    /// Passed on as it is: every rank's objective is the same function of the summed value
    /// (a weighting strategy's combination of the global terms), and the ranks' gradients
    /// are summed afterwards with the step's gradients.
    Identity,
}

/// The op: `Σ_ranks x`, element-wise, in f64 (the sums are exact up to the ranks' order).
struct AllReduce {
    comm: SharedCommunicator,
    adjoint: Adjoint,
}

/// The element-wise sum of `x` over the ranks of `comm`, with the gradient `adjoint` says.
/// One all-reduce of `x.elem_count()` values forward, and one more backward for
/// [`Adjoint::Sum`]. The communicator reads host memory: a tensor on another device goes
/// through the CPU (a no-op for CPU tensors).
pub(crate) fn all_reduce(
    x: &Tensor,
    comm: &SharedCommunicator,
    adjoint: Adjoint,
) -> crate::Result<Tensor> {
    let op = AllReduce {
        comm: comm.clone(),
        adjoint,
    };
    let host = x.to_device(&candle_core::Device::Cpu)?.contiguous()?;
    Ok(host.apply_op1(op)?.to_device(x.device())?)
}

fn summed(comm: &dyn Communicator, mut values: Vec<f64>) -> candle_core::Result<Vec<f64>> {
    comm.all_reduce_f64(&mut values)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(values)
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "kiln-all-reduce"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("kiln-all-reduce: not contiguous".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => {
                let values = v[start..end].iter().map(|&x| f64::from(x)).collect();
                let sums = summed(&*self.comm, values)?;
                CpuStorage::F32(sums.into_iter().map(|x| x as f32).collect())
            }
            CpuStorage::F64(v) => CpuStorage::F64(summed(&*self.comm, v[start..end].to_vec())?),
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "kiln-all-reduce: {:?} tensors are not summed across ranks: use f32 or f64",
                    other.dtype()
                )))
            }
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        match self.adjoint {
            Adjoint::Identity => Ok(Some(grad.clone())),
            Adjoint::Sum => {
                let values = grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                let sums = summed(&*self.comm, values)?;
                let summed = Tensor::from_vec(sums, grad.dims(), grad.device())?;
                Ok(Some(summed.to_dtype(grad.dtype())?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::LocalGroup;
    use candle_core::{Device, Var};
    use std::sync::Arc;

    /// Three ranks, rank r holding x_r = r + 1 (two entries), objective on rank r:
    /// (r + 1) · Σ all_reduce(x)². With the summed adjoint, dx_r = Σ_s (s + 1) · 2 · Σ x = 6 ·
    /// 2 · 6 = 72 on every rank; with the identity, (r + 1) · 2 · 6.
    #[test]
    fn forward_sums_and_the_adjoints_are_what_they_say() {
        for (adjoint, want) in [
            (Adjoint::Sum, [72.0, 72.0, 72.0]),
            (Adjoint::Identity, [12.0, 24.0, 36.0]),
        ] {
            let got: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
                let handles: Vec<_> = LocalGroup::new(3)
                    .into_iter()
                    .map(|rank| {
                        s.spawn(move || {
                            let r = rank.rank() as f32;
                            let comm: SharedCommunicator = Arc::new(rank);
                            let x = Var::new(&[r + 1.0, r + 1.0], &Device::Cpu).unwrap();
                            let sum = all_reduce(x.as_tensor(), &comm, adjoint).unwrap();
                            let objective = (sum.sqr().unwrap().sum_all().unwrap()
                                * f64::from(r + 1.0))
                            .unwrap();
                            let grads = objective.backward().unwrap();
                            let g = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
                            (sum.to_vec1().unwrap(), g)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, (sum, grad)) in got.iter().enumerate() {
                assert_eq!(sum, &vec![6.0, 6.0]);
                assert_eq!(grad, &vec![want[r]; 2], "{adjoint:?}, rank {r}");
            }
        }
    }
}
