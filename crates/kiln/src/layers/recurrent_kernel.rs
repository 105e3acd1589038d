//! LSTM and GRU over a whole sequence as one CPU op each, with backpropagation through time.
//!
//! The plain candle graph takes one `narrow` of the input projection per step, and the
//! backward pass of each pads its gradient with zeros back to the whole `[batch, steps,
//! gates·units]` tensor and adds it: a cost in the square of the sequence length (40 ms of a
//! 107 ms R1 step). Here the forward pass runs the steps over the projection in place and keeps
//! what the backward pass needs (every step's states and gates, time-major so each step's rows
//! are adjacent) inside the op, not in its output: the output is the layer's own (the state
//! sequence or the last state), so autograd never pads, zero-fills or adds a gradient the size
//! of all the gates. The backward pass walks the steps back, one product with the recurrent
//! kernel per step, and forms the recurrent kernel's gradient in one product over all steps.
//! The gate nonlinearities run as vectorized polynomials on f32 ([`crate::cpu_math`]).
//!
//! Only Keras' default activations (tanh, sigmoid), and the GRU with `reset_after`, on the CPU
//! in f32 or f64; the layer keeps its plain graph otherwise. Masked steps carry the state.

use super::dense_kernel::{product, Element, Operand};
use crate::cpu::{contiguous, vectorized, with_slice, Real};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use std::sync::{Arc, Mutex};

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

/// The sizes, the mask (per sequence then step, `true` where the step counts) and the output
/// form of a run.
#[derive(Clone)]
pub(crate) struct Sequence {
    pub(crate) batch: usize,
    pub(crate) steps: usize,
    pub(crate) units: usize,
    pub(crate) mask: Option<Arc<Vec<bool>>>,
    /// The output is every step's state `[batch, steps, units]`, else the last `[batch, units]`.
    pub(crate) return_sequences: bool,
}

impl Sequence {
    fn counts(&self, b: usize, t: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[b * self.steps + t])
    }

    fn output_shape(&self) -> Shape {
        if self.return_sequences {
            Shape::from((self.batch, self.steps, self.units))
        } else {
            Shape::from((self.batch, self.units))
        }
    }

    /// The layer's output: the states (the first `units` of each `width`-wide record of `saved`)
    /// of every step, batch-major, or of the last step.
    fn output<T: Element>(&self, saved: &[T], width: usize) -> Vec<T> {
        let (b, t, u) = (self.batch, self.steps, self.units);
        let first = if self.return_sequences { 0 } else { t - 1 };
        let mut out = Vec::with_capacity(b * (t - first) * u);
        for row in 0..b {
            for s in first..t {
                out.extend_from_slice(&saved[(s * b + row) * width..][..u]);
            }
        }
        out
    }

    /// The output's gradient for the state of `row` at step `s`, or `zeros` where the output
    /// does not contain that state.
    fn grad_at<'a, T>(&self, grad: &'a [T], zeros: &'a [T], row: usize, s: usize) -> &'a [T] {
        let (t, u) = (self.steps, self.units);
        if self.return_sequences {
            &grad[(row * t + s) * u..][..u]
        } else if s == t - 1 {
            &grad[row * u..][..u]
        } else {
            zeros
        }
    }

    /// `Σ_t h_{t-1}ᵀ · d_t` for the states `h` of `saved` (`width` per row, h first) and the
    /// time-major `d` `[steps·batch, gates]`: the recurrent kernel's gradient `[units, gates]`.
    /// The first step's `h_{-1}` is zero, so the sum pairs the records of steps `0..t-1`,
    /// read in place with their stride, with the `d` of steps `1..t`.
    fn kernel_grad<T: Element>(&self, saved: &[T], width: usize, d: &[T], gates: usize) -> Vec<T> {
        let (b, t, u) = (self.batch, self.steps, self.units);
        let mut g = vec![T::default(); u * gates];
        // SAFETY: g holds u×gates; the lhs reads h (u values) of (t-1)·b records of `width`
        // elements, transposed; the rhs the (t-1)·b rows of d after the first step's.
        unsafe {
            product(
                (u, gates, (t - 1) * b),
                g.as_mut_ptr(),
                false,
                Operand::transposed(saved, width),
                Operand::rows(&d[b * gates..], gates),
                crate::runtime::matmul_threads(),
            )
        };
        g
    }

    /// The time-major `d` `[steps·batch, gates]` as the input projection's `[batch, steps,
    /// gates]` gradient.
    fn batch_major<T: Element>(&self, d: &[T], gates: usize) -> Vec<T> {
        let (b, t) = (self.batch, self.steps);
        let mut out = Vec::with_capacity(d.len());
        for r in 0..b {
            for s in 0..t {
                out.extend_from_slice(&d[(s * b + r) * gates..][..gates]);
            }
        }
        out
    }
}

/// What a forward pass keeps for its backward pass: the time-major per-step records.
#[derive(Default)]
struct Saved(Mutex<Option<CpuStorage>>);

impl Saved {
    fn keep<T: WithDType>(&self, records: Vec<T>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(T::to_cpu_storage_owned(records));
        }
    }

    fn with<T: WithDType, R>(
        &self,
        what: &str,
        f: impl FnOnce(&[T]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let slot = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{what}: a forward pass panicked")))?;
        match slot.as_ref() {
            Some(storage) => f(T::cpu_storage_as_slice(storage)?),
            None => candle_core::bail!("{what}: backward before the forward pass"),
        }
    }
}

vectorized! {
    /// One LSTM step of one sequence: the gate pre-activations `x + z` (`[4·units]`, Keras'
    /// order i, f, g, o) update `h` and `c` in place; `record` gets h, c, tanh c, i, f, g, o.
    fn lstm_cell<T>(x: &[T], z: &[T], h: &mut [T], c: &mut [T], record: &mut [T]) {
        let u = h.len();
        let (x, z) = (&x[..4 * u], &z[..4 * u]);
        let (c, record) = (&mut c[..u], &mut record[..7 * u]);
        let (rh, rest) = record.split_at_mut(u);
        let (rc, rest) = rest.split_at_mut(u);
        let (rt, rest) = rest.split_at_mut(u);
        let (ri, rest) = rest.split_at_mut(u);
        let (rf, rest) = rest.split_at_mut(u);
        let (rg, ro) = rest.split_at_mut(u);
        for j in 0..u {
            let i = (x[j] + z[j]).logistic();
            let f = (x[u + j] + z[u + j]).logistic();
            let g = (x[2 * u + j] + z[2 * u + j]).fast_tanh();
            let o = (x[3 * u + j] + z[3 * u + j]).logistic();
            let cn = f * c[j] + i * g;
            let tc = cn.fast_tanh();
            let hn = o * tc;
            c[j] = cn;
            h[j] = hn;
            rh[j] = hn;
            rc[j] = cn;
            rt[j] = tc;
            ri[j] = i;
            rf[j] = f;
            rg[j] = g;
            ro[j] = o;
        }
    }
}

vectorized! {
    /// The backward of [`lstm_cell`] for one sequence and step: from the record, the previous
    /// cell state, the output's gradient `gh` and the carried `dh`, `dc`, the gates' gradient
    /// `d`; `dc` becomes the previous step's.
    fn lstm_cell_grad<T>(rec: &[T], c_prev: &[T], gh: &[T], dh: &[T], dc: &mut [T], d: &mut [T]) {
        let u = dc.len();
        let rec = &rec[..7 * u];
        let (c_prev, gh, dh, d) = (&c_prev[..u], &gh[..u], &dh[..u], &mut d[..4 * u]);
        let one = T::from_f64(1.0);
        for j in 0..u {
            let dht = dh[j] + gh[j];
            let (tc, i, f, g, o) =
                (rec[2 * u + j], rec[3 * u + j], rec[4 * u + j], rec[5 * u + j], rec[6 * u + j]);
            let dct = dc[j] + dht * o * (one - tc * tc);
            d[j] = dct * g * i * (one - i);
            d[u + j] = dct * c_prev[j] * f * (one - f);
            d[2 * u + j] = dct * i * (one - g * g);
            d[3 * u + j] = dht * tc * o * (one - o);
            dc[j] = dct * f;
        }
    }
}

/// LSTM over `x_proj` `[batch, steps, 4·units]` (the input projection with the bias) and the
/// recurrent kernel `[units, 4·units]`; the output is the layer's (see [`Sequence`]).
pub(crate) struct LstmOp {
    seq: Sequence,
    saved: Saved,
}

impl LstmOp {
    /// Per step and sequence: h, c, tanh c, then the gates i, f, g, o.
    const WIDTH: usize = 7;

    pub(crate) fn new(seq: Sequence) -> Self {
        Self {
            seq,
            saved: Saved::default(),
        }
    }

    fn fwd<T: Element>(&self, x: &[T], r: &[T]) -> Vec<T> {
        let (b, t, u) = (self.seq.batch, self.seq.steps, self.seq.units);
        let w = Self::WIDTH * u;
        let mut saved = vec![T::default(); t * b * w];
        let mut h = vec![T::default(); b * u];
        let mut c = vec![T::default(); b * u];
        let mut z = vec![T::default(); b * 4 * u];
        for s in 0..t {
            matmul(&mut z, &h, r, (b, u, 4 * u), false);
            for row in 0..b {
                let rec = &mut saved[(s * b + row) * w..][..w];
                let (hr, cr) = (&mut h[row * u..][..u], &mut c[row * u..][..u]);
                if !self.seq.counts(row, s) {
                    rec[..u].copy_from_slice(hr);
                    rec[u..2 * u].copy_from_slice(cr);
                    continue;
                }
                let xr = &x[(row * t + s) * 4 * u..][..4 * u];
                lstm_cell(xr, &z[row * 4 * u..][..4 * u], hr, cr, rec);
            }
        }
        let out = self.seq.output(&saved, w);
        self.saved.keep(saved);
        out
    }

    fn bwd_typed<T: Element>(
        &self,
        r: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let seq = &self.seq;
        let (b, t, u) = (seq.batch, seq.steps, seq.units);
        let w = Self::WIDTH * u;
        let (r, grad) = (r.contiguous()?, grad.contiguous()?);
        with_slice::<T, _>(&r, "kiln-lstm: kernel", |rk| {
            self.saved.with::<T, _>("kiln-lstm", |saved| {
                with_slice::<T, _>(&grad, "kiln-lstm: gradient", |gr| {
                    let zeros = vec![T::default(); u];
                    let mut dz = vec![T::default(); t * b * 4 * u];
                    let mut dh = vec![T::default(); b * u];
                    let mut dc = vec![T::default(); b * u];
                    let mut carried = vec![T::default(); b * u];
                    for s in (0..t).rev() {
                        let dzs = &mut dz[s * b * 4 * u..][..b * 4 * u];
                        for row in 0..b {
                            let gh = seq.grad_at(gr, &zeros, row, s);
                            let (dhr, dcr) = (&dh[row * u..][..u], &mut dc[row * u..][..u]);
                            let car = &mut carried[row * u..][..u];
                            if !seq.counts(row, s) {
                                for ((c, &d), &g) in car.iter_mut().zip(dhr).zip(gh) {
                                    *c = d + g;
                                }
                                continue;
                            }
                            let c_prev = if s == 0 {
                                &zeros[..]
                            } else {
                                &saved[((s - 1) * b + row) * w + u..][..u]
                            };
                            let rec = &saved[(s * b + row) * w..][..w];
                            let d = &mut dzs[row * 4 * u..][..4 * u];
                            lstm_cell_grad(rec, c_prev, gh, dhr, dcr, d);
                            car.fill(T::default());
                        }
                        // dh_{t-1} = dz_t · Rᵀ, plus what masked steps carry.
                        matmul(&mut dh, dzs, rk, (b, 4 * u, u), true);
                        for (d, c) in dh.iter_mut().zip(&carried) {
                            *d += *c;
                        }
                    }
                    let dr = seq.kernel_grad(saved, w, &dz, 4 * u);
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
    if t == 0 || lx.shape().dims() != [b, t, gates * u] || lr.shape().dims() != [u, gates * u] {
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
        check("kiln-lstm", lx, lr, &self.seq, 4)?;
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
        Ok((out, self.seq.output_shape()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dr) = match r.dtype() {
            DType::F32 => self.bwd_typed::<f32>(r, grad_res)?,
            DType::F64 => self.bwd_typed::<f64>(r, grad_res)?,
            other => candle_core::bail!("kiln-lstm: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dr)))
    }
}

vectorized! {
    /// One GRU (`reset_after`) step of one sequence: from the input projection `x` and the
    /// recurrent product `inner` (`[3·units]`, Keras' order z, r, h) and its bias `rb`, `h`
    /// is updated in place; `record` gets h, z, r, the candidate, and the candidate's
    /// recurrent part with its bias.
    fn gru_cell<T>(x: &[T], inner: &[T], rb: &[T], h: &mut [T], record: &mut [T]) {
        let u = h.len();
        let (x, inner, rb) = (&x[..3 * u], &inner[..3 * u], &rb[..3 * u]);
        let record = &mut record[..5 * u];
        let (rh, rest) = record.split_at_mut(u);
        let (rz, rest) = rest.split_at_mut(u);
        let (rr, rest) = rest.split_at_mut(u);
        let (rc, ri) = rest.split_at_mut(u);
        let one = T::from_f64(1.0);
        for j in 0..u {
            let z = (x[j] + (inner[j] + rb[j])).logistic();
            let r = (x[u + j] + (inner[u + j] + rb[u + j])).logistic();
            let i2 = inner[2 * u + j] + rb[2 * u + j];
            let cand = (x[2 * u + j] + r * i2).fast_tanh();
            let hn = z * h[j] + (one - z) * cand;
            h[j] = hn;
            rh[j] = hn;
            rz[j] = z;
            rr[j] = r;
            rc[j] = cand;
            ri[j] = i2;
        }
    }
}

vectorized! {
    /// The backward of [`gru_cell`] for one sequence and step: from the record, the previous
    /// state, the output's gradient `gh` and the carried `dh`: the recurrent product's
    /// gradient `d`, the input projection's `dx` and the part of `dh_{t-1}` that skips the
    /// recurrent kernel, `direct`.
    fn gru_cell_grad<T>(
        rec: &[T],
        h_prev: &[T],
        gh: &[T],
        dh: &[T],
        d: &mut [T],
        dx: &mut [T],
        direct: &mut [T],
    ) {
        let u = direct.len();
        let rec = &rec[..5 * u];
        let (h_prev, gh, dh) = (&h_prev[..u], &gh[..u], &dh[..u]);
        let (d, dx) = (&mut d[..3 * u], &mut dx[..3 * u]);
        let one = T::from_f64(1.0);
        for j in 0..u {
            let dht = dh[j] + gh[j];
            let (z, r, cand, i2) = (rec[u + j], rec[2 * u + j], rec[3 * u + j], rec[4 * u + j]);
            let dz = dht * (h_prev[j] - cand) * z * (one - z);
            let da = dht * (one - z) * (one - cand * cand);
            let dr = da * i2 * r * (one - r);
            d[j] = dz;
            d[u + j] = dr;
            d[2 * u + j] = da * r;
            dx[j] = dz;
            dx[u + j] = dr;
            dx[2 * u + j] = da;
            direct[j] = dht * z;
        }
    }
}

/// GRU (`reset_after`) over `x_proj` `[batch, steps, 3·units]` (the input projection with the
/// input bias), the recurrent kernel `[units, 3·units]` and the recurrent bias `[3·units]`;
/// the output is the layer's (see [`Sequence`]).
pub(crate) struct GruOp {
    seq: Sequence,
    saved: Saved,
}

impl GruOp {
    /// Per step and sequence: h, then z, r, the candidate and the recurrent product's
    /// candidate part (with its bias).
    const WIDTH: usize = 5;

    pub(crate) fn new(seq: Sequence) -> Self {
        Self {
            seq,
            saved: Saved::default(),
        }
    }

    fn fwd<T: Element>(&self, x: &[T], r: &[T], rb: &[T]) -> Vec<T> {
        let (b, t, u) = (self.seq.batch, self.seq.steps, self.seq.units);
        let w = Self::WIDTH * u;
        let mut saved = vec![T::default(); t * b * w];
        let mut h = vec![T::default(); b * u];
        let mut inner = vec![T::default(); b * 3 * u];
        for s in 0..t {
            matmul(&mut inner, &h, r, (b, u, 3 * u), false);
            for row in 0..b {
                let rec = &mut saved[(s * b + row) * w..][..w];
                let hr = &mut h[row * u..][..u];
                if !self.seq.counts(row, s) {
                    rec[..u].copy_from_slice(hr);
                    continue;
                }
                let xr = &x[(row * t + s) * 3 * u..][..3 * u];
                gru_cell(xr, &inner[row * 3 * u..][..3 * u], rb, hr, rec);
            }
        }
        let out = self.seq.output(&saved, w);
        self.saved.keep(saved);
        out
    }

    fn bwd_typed<T: Element>(
        &self,
        r: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let seq = &self.seq;
        let (b, t, u) = (seq.batch, seq.steps, seq.units);
        let w = Self::WIDTH * u;
        let (r, grad) = (r.contiguous()?, grad.contiguous()?);
        with_slice::<T, _>(&r, "kiln-gru: kernel", |rk| {
            self.saved.with::<T, _>("kiln-gru", |saved| {
                with_slice::<T, _>(&grad, "kiln-gru: gradient", |gr| {
                    let zeros = vec![T::default(); u];
                    // dInner per step (time-major): the recurrent product's gradient.
                    let mut di = vec![T::default(); t * b * 3 * u];
                    let mut dx = vec![T::default(); t * b * 3 * u];
                    let mut dh = vec![T::default(); b * u];
                    let mut direct = vec![T::default(); b * u];
                    for s in (0..t).rev() {
                        let dis = &mut di[s * b * 3 * u..][..b * 3 * u];
                        for row in 0..b {
                            let gh = seq.grad_at(gr, &zeros, row, s);
                            let dhr = &dh[row * u..][..u];
                            let dir = &mut direct[row * u..][..u];
                            if !seq.counts(row, s) {
                                for ((c, &d), &g) in dir.iter_mut().zip(dhr).zip(gh) {
                                    *c = d + g;
                                }
                                continue;
                            }
                            let h_prev = if s == 0 {
                                &zeros[..]
                            } else {
                                &saved[((s - 1) * b + row) * w..][..u]
                            };
                            let rec = &saved[(s * b + row) * w..][..w];
                            let d = &mut dis[row * 3 * u..][..3 * u];
                            let dxr = &mut dx[(s * b + row) * 3 * u..][..3 * u];
                            gru_cell_grad(rec, h_prev, gh, dhr, d, dxr, dir);
                        }
                        matmul(&mut dh, dis, rk, (b, 3 * u, u), true);
                        for (d, c) in dh.iter_mut().zip(&direct) {
                            *d += *c;
                        }
                    }
                    let dr = seq.kernel_grad(saved, w, &di, 3 * u);
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
        check("kiln-gru", lx, lr, &self.seq, 3)?;
        if lb.shape().dims() != [3 * self.seq.units] {
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
        Ok((out, self.seq.output_shape()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        r: &Tensor,
        _rb: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dr, drb) = match r.dtype() {
            DType::F32 => self.bwd_typed::<f32>(r, grad_res)?,
            DType::F64 => self.bwd_typed::<f64>(r, grad_res)?,
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
