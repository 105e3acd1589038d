//! LSTM and GRU over a whole sequence as one CPU op each, with backpropagation through time.
//!
//! The plain candle graph takes one `narrow` of the input projection per step, and the
//! backward pass of each pads its gradient with zeros back to the whole `[batch, steps,
//! gates·units]` tensor and adds it: a cost in the square of the sequence length (40 ms of a
//! 107 ms R1 step). Here the forward pass runs the steps over the projection in place and keeps
//! what the backward pass needs in its output, `[steps, batch, state]` (time-major, so each
//! step's rows are adjacent); the layer reads its states out of it, one `narrow` whose gradient
//! is padded once. The backward pass walks the steps back, one product with the recurrent
//! kernel per step, and forms the recurrent kernel's gradient in one product over all steps.
//!
//! Only Keras' default activations (tanh, sigmoid), and the GRU with `reset_after`, on the CPU
//! in f32 or f64; the layer keeps its plain graph otherwise. Masked steps carry the state.

use super::dense_kernel::{product, Element, Operand};
use crate::cpu::{contiguous, with_slice, Real};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::Arc;

fn sigmoid<T: Element>(x: T) -> T {
    let one = <T as Real>::from_f64(1.0);
    one / (one + (T::default() - x).exp())
}

/// `dst = a · b` for row-major `a` `[m, k]` and `b` `[k, n]` (`b` transposed in place when
/// `b_transposed`, then stored `[n, k]`).
fn matmul<T: Element>(dst: &mut [T], a: &[T], b: &[T], (m, k, n): (usize, usize, usize), bt: bool) {
    debug_assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let rhs = if bt {
        Operand::transposed(b, k)
    } else {
        Operand::rows(b, n)
    };
    // SAFETY: dst holds m×n elements, a m×k and b k×n, as checked above.
    unsafe {
        product(
            (m, n, k),
            dst.as_mut_ptr(),
            false,
            Operand::rows(a, k),
            rhs,
            crate::runtime::matmul_threads(),
        )
    };
}

/// The sizes and the mask (per sequence then step, `true` where the step counts) of a run.
#[derive(Clone)]
pub(crate) struct Sequence {
    pub(crate) batch: usize,
    pub(crate) steps: usize,
    pub(crate) units: usize,
    pub(crate) mask: Option<Arc<Vec<bool>>>,
}

impl Sequence {
    fn counts(&self, b: usize, t: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[b * self.steps + t])
    }

    /// `Σ_t h_{t-1}ᵀ · d_t` for the states `h` of `out` (`width` per row, h first) and the
    /// time-major `d` `[steps·batch, gates]`: the recurrent kernel's gradient `[units, gates]`.
    fn kernel_grad<T: Element>(&self, out: &[T], width: usize, d: &[T], gates: usize) -> Vec<T> {
        let (b, t, u) = (self.batch, self.steps, self.units);
        // h_{t-1} time-major, zeros before the first step.
        let mut prev = vec![T::default(); t * b * u];
        for s in 1..t {
            for r in 0..b {
                let src = &out[((s - 1) * b + r) * width..][..u];
                prev[(s * b + r) * u..][..u].copy_from_slice(src);
            }
        }
        let mut g = vec![T::default(); u * gates];
        // SAFETY: g holds u×gates; prev is (t·b)×u read transposed, d (t·b)×gates.
        unsafe {
            product(
                (u, gates, t * b),
                g.as_mut_ptr(),
                false,
                Operand::transposed(&prev, u),
                Operand::rows(d, gates),
                crate::runtime::matmul_threads(),
            )
        };
        g
    }

    /// The time-major `d` `[steps·batch, gates]` as the input projection's `[batch, steps,
    /// gates]` gradient.
    fn batch_major<T: Element>(&self, d: &[T], gates: usize) -> Vec<T> {
        let (b, t) = (self.batch, self.steps);
        let mut out = vec![T::default(); d.len()];
        for s in 0..t {
            for r in 0..b {
                out[(r * t + s) * gates..][..gates]
                    .copy_from_slice(&d[(s * b + r) * gates..][..gates]);
            }
        }
        out
    }
}

/// LSTM over `x_proj` `[batch, steps, 4·units]` (the input projection with the bias) and the
/// recurrent kernel `[units, 4·units]`; output `[steps, batch, 6·units]`: h, c, then the gates
/// i, f, g, o.
pub(crate) struct LstmOp(pub(crate) Sequence);

impl LstmOp {
    fn fwd<T: Element>(&self, x: &[T], r: &[T]) -> Vec<T> {
        let Sequence {
            batch: b,
            steps: t,
            units: u,
            ..
        } = self.0;
        let w = 6 * u;
        let mut out = vec![T::default(); t * b * w];
        let mut h = vec![T::default(); b * u];
        let mut c = vec![T::default(); b * u];
        let mut z = vec![T::default(); b * 4 * u];
        for s in 0..t {
            matmul(&mut z, &h, r, (b, u, 4 * u), false);
            for row in 0..b {
                let o = &mut out[(s * b + row) * w..][..w];
                let (hr, cr) = (&mut h[row * u..][..u], &mut c[row * u..][..u]);
                if !self.0.counts(row, s) {
                    o[..u].copy_from_slice(hr);
                    o[u..2 * u].copy_from_slice(cr);
                    continue;
                }
                let xr = &x[(row * t + s) * 4 * u..][..4 * u];
                let zr = &z[row * 4 * u..][..4 * u];
                for j in 0..u {
                    let i = sigmoid(xr[j] + zr[j]);
                    let f = sigmoid(xr[u + j] + zr[u + j]);
                    let g = (xr[2 * u + j] + zr[2 * u + j]).tanh();
                    let og = sigmoid(xr[3 * u + j] + zr[3 * u + j]);
                    let cn = f * cr[j] + i * g;
                    let hn = og * cn.tanh();
                    cr[j] = cn;
                    hr[j] = hn;
                    o[j] = hn;
                    o[u + j] = cn;
                    o[2 * u + j] = i;
                    o[3 * u + j] = f;
                    o[4 * u + j] = g;
                    o[5 * u + j] = og;
                }
            }
        }
        out
    }

    fn bwd_typed<T: Element>(
        &self,
        r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let seq = &self.0;
        let (b, t, u) = (seq.batch, seq.steps, seq.units);
        let w = 6 * u;
        let (r, res, grad) = (r.contiguous()?, res.contiguous()?, grad.contiguous()?);
        let one = <T as Real>::from_f64(1.0);
        with_slice::<T, _>(&r, "kiln-lstm: kernel", |rk| {
            with_slice::<T, _>(&res, "kiln-lstm: output", |out| {
                with_slice::<T, _>(&grad, "kiln-lstm: gradient", |gr| {
                    let mut dz = vec![T::default(); t * b * 4 * u];
                    let mut dh = vec![T::default(); b * u];
                    let mut dc = vec![T::default(); b * u];
                    let mut carried = vec![T::default(); b * u];
                    for s in (0..t).rev() {
                        let dzs = &mut dz[s * b * 4 * u..][..b * 4 * u];
                        for row in 0..b {
                            let o = &out[(s * b + row) * w..][..w];
                            let g = &gr[(s * b + row) * w..][..w];
                            let (dhr, dcr) = (&mut dh[row * u..][..u], &mut dc[row * u..][..u]);
                            let car = &mut carried[row * u..][..u];
                            if !seq.counts(row, s) {
                                for j in 0..u {
                                    car[j] = dhr[j] + g[j];
                                    dcr[j] += g[u + j];
                                }
                                continue;
                            }
                            let cprev = |j: usize| {
                                if s == 0 {
                                    T::default()
                                } else {
                                    out[((s - 1) * b + row) * w + u + j]
                                }
                            };
                            let d = &mut dzs[row * 4 * u..][..4 * u];
                            for j in 0..u {
                                let dht = dhr[j] + g[j];
                                let (c, i, f, gg, og) = (
                                    o[u + j],
                                    o[2 * u + j],
                                    o[3 * u + j],
                                    o[4 * u + j],
                                    o[5 * u + j],
                                );
                                let tc = c.tanh();
                                let dct = dcr[j] + g[u + j] + dht * og * (one - tc * tc);
                                d[j] = dct * gg * i * (one - i);
                                d[u + j] = dct * cprev(j) * f * (one - f);
                                d[2 * u + j] = dct * i * (one - gg * gg);
                                d[3 * u + j] = dht * tc * og * (one - og);
                                dcr[j] = dct * f;
                                car[j] = T::default();
                            }
                        }
                        // dh_{t-1} = dz_t · Rᵀ, plus what masked steps carry.
                        matmul(&mut dh, dzs, rk, (b, 4 * u, u), true);
                        for (d, c) in dh.iter_mut().zip(&carried) {
                            *d += *c;
                        }
                    }
                    let dr = seq.kernel_grad(out, w, &dz, 4 * u);
                    let dx = seq.batch_major(&dz, 4 * u);
                    Ok((
                        Tensor::from_vec(dx, (b, t, 4 * u), r.device())?,
                        Tensor::from_vec(dr, (u, 4 * u), r.device())?,
                    ))
                })
            })
        })
    }
}

fn check(
    what: &str,
    lx: &Layout,
    lr: &Layout,
    seq: &Sequence,
    gates: usize,
) -> candle_core::Result<()> {
    let (b, t, u) = (seq.batch, seq.steps, seq.units);
    if lx.shape().dims() != [b, t, gates * u] || lr.shape().dims() != [u, gates * u] {
        candle_core::bail!(
            "{what}: shapes {:?}, {:?} do not fit",
            lx.shape(),
            lr.shape()
        );
    }
    Ok(())
}

impl CustomOp2 for LstmOp {
    fn name(&self) -> &'static str {
        "kiln-lstm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        r: &CpuStorage,
        lr: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        check("kiln-lstm", lx, lr, &self.0, 4)?;
        let out = match (x, r) {
            (CpuStorage::F32(x), CpuStorage::F32(r)) => CpuStorage::F32(self.fwd(
                contiguous(x, lx, "kiln-lstm: x")?,
                contiguous(r, lr, "kiln-lstm: kernel")?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(r)) => CpuStorage::F64(self.fwd(
                contiguous(x, lx, "kiln-lstm: x")?,
                contiguous(r, lr, "kiln-lstm: kernel")?,
            )),
            _ => candle_core::bail!("kiln-lstm: x and kernel must both be f32 or both f64"),
        };
        let s = &self.0;
        Ok((out, Shape::from((s.steps, s.batch, 6 * s.units))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        r: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dr) = match r.dtype() {
            DType::F32 => self.bwd_typed::<f32>(r, res, grad_res)?,
            DType::F64 => self.bwd_typed::<f64>(r, res, grad_res)?,
            other => candle_core::bail!("kiln-lstm: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dr)))
    }
}

/// GRU (`reset_after`) over `x_proj` `[batch, steps, 3·units]` (the input projection with the
/// input bias), the recurrent kernel `[units, 3·units]` and the recurrent bias `[3·units]`;
/// output `[steps, batch, 5·units]`: h, then z, r, the candidate and the recurrent product's
/// candidate part (with its bias).
pub(crate) struct GruOp(pub(crate) Sequence);

impl GruOp {
    fn fwd<T: Element>(&self, x: &[T], r: &[T], rb: &[T]) -> Vec<T> {
        let Sequence {
            batch: b,
            steps: t,
            units: u,
            ..
        } = self.0;
        let w = 5 * u;
        let one = <T as Real>::from_f64(1.0);
        let mut out = vec![T::default(); t * b * w];
        let mut h = vec![T::default(); b * u];
        let mut inner = vec![T::default(); b * 3 * u];
        for s in 0..t {
            matmul(&mut inner, &h, r, (b, u, 3 * u), false);
            for row in 0..b {
                let o = &mut out[(s * b + row) * w..][..w];
                let hr = &mut h[row * u..][..u];
                if !self.0.counts(row, s) {
                    o[..u].copy_from_slice(hr);
                    continue;
                }
                let xr = &x[(row * t + s) * 3 * u..][..3 * u];
                let ir = &inner[row * 3 * u..][..3 * u];
                for j in 0..u {
                    let z = sigmoid(xr[j] + (ir[j] + rb[j]));
                    let rg = sigmoid(xr[u + j] + (ir[u + j] + rb[u + j]));
                    let i2 = ir[2 * u + j] + rb[2 * u + j];
                    let hh = (xr[2 * u + j] + rg * i2).tanh();
                    let hn = z * hr[j] + (one - z) * hh;
                    hr[j] = hn;
                    o[j] = hn;
                    o[u + j] = z;
                    o[2 * u + j] = rg;
                    o[3 * u + j] = hh;
                    o[4 * u + j] = i2;
                }
            }
        }
        out
    }

    fn bwd_typed<T: Element>(
        &self,
        r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let seq = &self.0;
        let (b, t, u) = (seq.batch, seq.steps, seq.units);
        let w = 5 * u;
        let (r, res, grad) = (r.contiguous()?, res.contiguous()?, grad.contiguous()?);
        let one = <T as Real>::from_f64(1.0);
        with_slice::<T, _>(&r, "kiln-gru: kernel", |rk| {
            with_slice::<T, _>(&res, "kiln-gru: output", |out| {
                with_slice::<T, _>(&grad, "kiln-gru: gradient", |gr| {
                    // dInner per step (time-major): the recurrent product's gradient.
                    let mut di = vec![T::default(); t * b * 3 * u];
                    let mut dx = vec![T::default(); t * b * 3 * u];
                    let mut dh = vec![T::default(); b * u];
                    let mut direct = vec![T::default(); b * u];
                    for s in (0..t).rev() {
                        let dis = &mut di[s * b * 3 * u..][..b * 3 * u];
                        for row in 0..b {
                            let o = &out[(s * b + row) * w..][..w];
                            let g = &gr[(s * b + row) * w..][..w];
                            let dhr = &dh[row * u..][..u];
                            let dir = &mut direct[row * u..][..u];
                            if !seq.counts(row, s) {
                                for j in 0..u {
                                    dir[j] = dhr[j] + g[j];
                                }
                                continue;
                            }
                            let hprev = |j: usize| {
                                if s == 0 {
                                    T::default()
                                } else {
                                    out[((s - 1) * b + row) * w + j]
                                }
                            };
                            let d = &mut dis[row * 3 * u..][..3 * u];
                            let dxr = &mut dx[(s * b + row) * 3 * u..][..3 * u];
                            for j in 0..u {
                                let dht = dhr[j] + g[j];
                                let (z, rg, hh, i2) =
                                    (o[u + j], o[2 * u + j], o[3 * u + j], o[4 * u + j]);
                                let dz = dht * (hprev(j) - hh) * z * (one - z);
                                let da = dht * (one - z) * (one - hh * hh);
                                let dr = da * i2 * rg * (one - rg);
                                d[j] = dz;
                                d[u + j] = dr;
                                d[2 * u + j] = da * rg;
                                dxr[j] = dz;
                                dxr[u + j] = dr;
                                dxr[2 * u + j] = da;
                                dir[j] = dht * z;
                            }
                        }
                        matmul(&mut dh, dis, rk, (b, 3 * u, u), true);
                        for (d, c) in dh.iter_mut().zip(&direct) {
                            *d += *c;
                        }
                    }
                    let dr = seq.kernel_grad(out, w, &di, 3 * u);
                    let mut drb = vec![T::default(); 3 * u];
                    for row in di.chunks_exact(3 * u) {
                        for (a, &v) in drb.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                    let dx = seq.batch_major(&dx, 3 * u);
                    Ok((
                        Tensor::from_vec(dx, (b, t, 3 * u), r.device())?,
                        Tensor::from_vec(dr, (u, 3 * u), r.device())?,
                        Tensor::from_vec(drb, 3 * u, r.device())?,
                    ))
                })
            })
        })
    }
}

impl CustomOp3 for GruOp {
    fn name(&self) -> &'static str {
        "kiln-gru"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        r: &CpuStorage,
        lr: &Layout,
        rb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        check("kiln-gru", lx, lr, &self.0, 3)?;
        if lb.shape().dims() != [3 * self.0.units] {
            candle_core::bail!("kiln-gru: recurrent bias {:?} does not fit", lb.shape());
        }
        let out = match (x, r, rb) {
            (CpuStorage::F32(x), CpuStorage::F32(r), CpuStorage::F32(rb)) => {
                CpuStorage::F32(self.fwd(
                    contiguous(x, lx, "kiln-gru: x")?,
                    contiguous(r, lr, "kiln-gru: kernel")?,
                    contiguous(rb, lb, "kiln-gru: bias")?,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(r), CpuStorage::F64(rb)) => {
                CpuStorage::F64(self.fwd(
                    contiguous(x, lx, "kiln-gru: x")?,
                    contiguous(r, lr, "kiln-gru: kernel")?,
                    contiguous(rb, lb, "kiln-gru: bias")?,
                ))
            }
            _ => candle_core::bail!("kiln-gru: x, kernel and bias must all be f32 or all f64"),
        };
        let s = &self.0;
        Ok((out, Shape::from((s.steps, s.batch, 5 * s.units))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        r: &Tensor,
        _rb: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dr, drb) = match r.dtype() {
            DType::F32 => self.bwd_typed::<f32>(r, res, grad_res)?,
            DType::F64 => self.bwd_typed::<f64>(r, res, grad_res)?,
            other => candle_core::bail!("kiln-gru: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dr), Some(drb)))
    }
}

/// Whether the fused ops apply to `x_proj` and the recurrent kernel.
pub(crate) fn applies(x_proj: &Tensor, params: &[&Tensor]) -> bool {
    matches!(x_proj.dtype(), DType::F32 | DType::F64)
        && x_proj.device().is_cpu()
        && params
            .iter()
            .all(|p| p.dtype() == x_proj.dtype() && p.device().is_cpu())
}
