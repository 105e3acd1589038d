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

use super::dense_kernel::{product, product_column_major, Element, Operand};
use crate::cpu::{contiguous, vectorized, with_slice, Real};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use std::sync::{Arc, Mutex};

/// The gates' pre-activations of a step, `z = h · R`, for `rows` states `h` `[rows, units]`
/// and the recurrent kernel `R` `[units, gates]`, on the calling thread. Formed as `zᵀ = Rᵀ ·
/// hᵀ`, all three read or written in place by columns (see [`product_column_major`]).
fn step_product<T: Element>(
    z: &mut [T],
    h: &[T],
    r: &[T],
    (rows, units, gates): (usize, usize, usize),
) {
    assert!(z.len() >= rows * gates && h.len() >= rows * units && r.len() >= units * gates);
    // SAFETY: z holds gates×rows elements, R is units×gates and h rows×units, checked above.
    unsafe {
        product_column_major(
            (gates, rows, units),
            z.as_mut_ptr(),
            false,
            Operand::transposed(r, gates),
            Operand::transposed(h, units),
        )
    };
}

/// The states' gradient from a step's gate gradients, `dh = dz · Rᵀ`, for `dz` `[rows,
/// gates]` and `rt`, the recurrent kernel's transpose `[gates, units]` (row-major), on the
/// calling thread. Formed as `dhᵀ = R · dzᵀ`, read and written by columns.
fn step_gradient<T: Element>(
    dh: &mut [T],
    dz: &[T],
    rt: &[T],
    (rows, gates, units): (usize, usize, usize),
) {
    assert!(dh.len() >= rows * units && dz.len() >= rows * gates && rt.len() >= units * gates);
    // SAFETY: dh holds units×rows elements, Rᵀ is gates×units and dz rows×gates, checked above.
    unsafe {
        product_column_major(
            (units, rows, gates),
            dh.as_mut_ptr(),
            false,
            Operand::transposed(rt, units),
            Operand::transposed(dz, gates),
        )
    };
}

/// Rows of the batch whose recurrence runs as one piece. Each sequence's steps need only its
/// own states, so the pieces run side by side on the pool's threads with no meeting point at
/// each step: one split per pass instead of a parallel product and a serial cell loop per step
/// (R1 used 1.15 of 2 cores before). Fixed rather than derived from the thread count, so the
/// products, and with them the results, are the same on any number of threads.
const BLOCK_ROWS: usize = 32;

/// Runs `piece` on each of `pieces`, on the pool's threads when kiln may use several.
fn for_each_block<P: Send>(pieces: Vec<P>, piece: impl Fn(P) + Sync + Send) {
    use rayon::prelude::*;
    if pieces.len() > 1 && crate::runtime::parallel_now() {
        pieces.into_par_iter().for_each(piece);
    } else {
        pieces.into_iter().for_each(piece);
    }
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

    /// Where the record of `row` at step `s` starts, for records `width` long. Records are
    /// block-major: the rows of each [`BLOCK_ROWS`] block, step by step (time-major inside the
    /// block, so that a step's rows are adjacent for its product).
    fn record(&self, row: usize, s: usize, width: usize) -> usize {
        let first = row / BLOCK_ROWS * BLOCK_ROWS;
        let rows = BLOCK_ROWS.min(self.batch - first);
        (first * self.steps + s * rows + (row - first)) * width
    }

    /// The records of each block, `width` long per row and step, with the block's first row.
    fn blocks_mut<'a, T>(&self, records: &'a mut [T], width: usize) -> Vec<(usize, &'a mut [T])> {
        let size = BLOCK_ROWS * self.steps * width;
        records
            .chunks_mut(size)
            .enumerate()
            .map(|(k, block)| (k * BLOCK_ROWS, block))
            .collect()
    }

    /// The layer's output: the states (the first `units` of each `width`-wide record of `saved`)
    /// of every step, batch-major, or of the last step.
    fn output<T: Element>(&self, saved: &[T], width: usize) -> Vec<T> {
        let (b, t, u) = (self.batch, self.steps, self.units);
        let first = if self.return_sequences { 0 } else { t - 1 };
        let mut out = Vec::with_capacity(b * (t - first) * u);
        for row in 0..b {
            for s in first..t {
                out.extend_from_slice(&saved[self.record(row, s, width)..][..u]);
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
    /// block-major `d` (`gates` per row and step): the recurrent kernel's gradient `[units,
    /// gates]`. The first step's `h_{-1}` is zero, so each block's sum pairs its records of
    /// steps `0..t-1`, read in place with their stride, with its `d` of steps `1..t`: one
    /// product per block, added up.
    fn kernel_grad<T: Element>(&self, saved: &[T], width: usize, d: &[T], gates: usize) -> Vec<T> {
        let (b, t, u) = (self.batch, self.steps, self.units);
        let mut g = vec![T::default(); u * gates];
        for (k, first) in (0..b).step_by(BLOCK_ROWS).enumerate() {
            let rows = BLOCK_ROWS.min(b - first);
            let (h, d) = (&saved[first * t * width..], &d[first * t * gates..]);
            // SAFETY: g holds u×gates; the lhs reads h (u values) of (t-1)·rows records of
            // `width` elements, transposed; the rhs the (t-1)·rows rows of d after the first
            // step's, all inside this block.
            unsafe {
                product(
                    (u, gates, (t - 1) * rows),
                    g.as_mut_ptr(),
                    k > 0,
                    Operand::transposed(h, width),
                    Operand::rows(&d[rows * gates..], gates),
                    crate::runtime::matmul_threads(),
                )
            };
        }
        g
    }

    /// The block-major `d` (`gates` per row and step) as the input projection's `[batch,
    /// steps, gates]` gradient.
    fn batch_major<T: Element>(&self, d: &[T], gates: usize) -> Vec<T> {
        let (b, t) = (self.batch, self.steps);
        let mut out = Vec::with_capacity(d.len());
        for row in 0..b {
            for s in 0..t {
                out.extend_from_slice(&d[self.record(row, s, gates)..][..gates]);
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

/// Lanes per pass of the cells' loops: one AVX-512 register of f32. The cells work on local
/// arrays of this many units and then copy them out, because the loop over the record's nine
/// separate output slices was not vectorized at all (the compiler gives up on that many
/// possible overlaps): the polynomials ran one float at a time, 14% of an R1 step.
const LANES: usize = 16;

vectorized! {
    /// One LSTM step of one sequence: the gate pre-activations `x + z` (`[4·units]`, Keras'
    /// order i, f, g, o) update `h` and `c` in place; `record` gets h, c, tanh c, i, f, g, o.
    fn lstm_cell<T>(x: &[T], z: &[T], h: &mut [T], c: &mut [T], record: &mut [T]) {
        let u = h.len();
        let (x, z) = (&x[..4 * u], &z[..4 * u]);
        let (c, record) = (&mut c[..u], &mut record[..7 * u]);
        let mut j = 0;
        while j < u {
            let n = LANES.min(u - j);
            // The lanes' inputs, zero past the units' end (computed on, never stored).
            let mut a = [[T::default(); LANES]; 5];
            for (gate, lanes) in a[..4].iter_mut().enumerate() {
                for ((l, &xv), &zv) in lanes.iter_mut().zip(&x[gate * u + j..][..n]).zip(&z[gate * u + j..][..n]) {
                    *l = xv + zv;
                }
            }
            a[4][..n].copy_from_slice(&c[j..j + n]);
            let mut v = [[T::default(); LANES]; 7];
            for l in 0..LANES {
                let i = a[0][l].logistic();
                let f = a[1][l].logistic();
                let g = a[2][l].fast_tanh();
                let o = a[3][l].logistic();
                let cn = f * a[4][l] + i * g;
                let tc = cn.fast_tanh();
                let [vh, vc, vt, vi, vf, vg, vo] = &mut v;
                (vh[l], vc[l], vt[l]) = (o * tc, cn, tc);
                (vi[l], vf[l], vg[l], vo[l]) = (i, f, g, o);
            }
            h[j..j + n].copy_from_slice(&v[0][..n]);
            c[j..j + n].copy_from_slice(&v[1][..n]);
            for (field, values) in v.iter().enumerate() {
                record[field * u + j..][..n].copy_from_slice(&values[..n]);
            }
            j += n;
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
        let seq = &self.seq;
        let (t, u) = (seq.steps, seq.units);
        let w = Self::WIDTH * u;
        let mut saved = vec![T::default(); t * seq.batch * w];
        for_each_block(seq.blocks_mut(&mut saved, w), |(first, records)| {
            let n = records.len() / (t * w);
            let mut h = vec![T::default(); n * u];
            let mut c = vec![T::default(); n * u];
            let mut z = vec![T::default(); n * 4 * u];
            for s in 0..t {
                step_product(&mut z, &h, r, (n, u, 4 * u));
                for i in 0..n {
                    let row = first + i;
                    let rec = &mut records[(s * n + i) * w..][..w];
                    let (hr, cr) = (&mut h[i * u..][..u], &mut c[i * u..][..u]);
                    if !seq.counts(row, s) {
                        rec[..u].copy_from_slice(hr);
                        rec[u..2 * u].copy_from_slice(cr);
                        continue;
                    }
                    let xr = &x[(row * t + s) * 4 * u..][..4 * u];
                    lstm_cell(xr, &z[i * 4 * u..][..4 * u], hr, cr, rec);
                }
            }
        });
        let out = seq.output(&saved, w);
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
                    let rt = crate::cpu::transpose(rk, u, 4 * u, 1);
                    let mut dz = vec![T::default(); t * b * 4 * u];
                    for_each_block(seq.blocks_mut(&mut dz, 4 * u), |(first, dz)| {
                        let n = dz.len() / (t * 4 * u);
                        let records = &saved[first * t * w..][..n * t * w];
                        let mut dh = vec![T::default(); n * u];
                        let mut dc = vec![T::default(); n * u];
                        let mut carried = vec![T::default(); n * u];
                        for s in (0..t).rev() {
                            let dzs = &mut dz[s * n * 4 * u..][..n * 4 * u];
                            for i in 0..n {
                                let row = first + i;
                                let gh = seq.grad_at(gr, &zeros, row, s);
                                let (dhr, dcr) = (&dh[i * u..][..u], &mut dc[i * u..][..u]);
                                let car = &mut carried[i * u..][..u];
                                if !seq.counts(row, s) {
                                    for ((c, &d), &g) in car.iter_mut().zip(dhr).zip(gh) {
                                        *c = d + g;
                                    }
                                    continue;
                                }
                                let c_prev = if s == 0 {
                                    &zeros[..]
                                } else {
                                    &records[((s - 1) * n + i) * w + u..][..u]
                                };
                                let rec = &records[(s * n + i) * w..][..w];
                                let d = &mut dzs[i * 4 * u..][..4 * u];
                                lstm_cell_grad(rec, c_prev, gh, dhr, dcr, d);
                                car.fill(T::default());
                            }
                            // dh_{t-1} = dz_t · Rᵀ, plus what masked steps carry.
                            step_gradient(&mut dh, dzs, &rt, (n, 4 * u, u));
                            for (d, c) in dh.iter_mut().zip(&carried) {
                                *d += *c;
                            }
                        }
                    });
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
        let one = T::from_f64(1.0);
        let mut j = 0;
        while j < u {
            let n = LANES.min(u - j);
            // The lanes' inputs, zero past the units' end (computed on, never stored): the
            // input projection's z, r and h parts, the recurrent ones with their bias, and h.
            let mut a = [[T::default(); LANES]; 7];
            for gate in 0..3 {
                a[gate][..n].copy_from_slice(&x[gate * u + j..][..n]);
                let parts = inner[gate * u + j..][..n].iter().zip(&rb[gate * u + j..][..n]);
                for (l, (&iv, &bv)) in a[3 + gate].iter_mut().zip(parts) {
                    *l = iv + bv;
                }
            }
            a[6][..n].copy_from_slice(&h[j..j + n]);
            let mut v = [[T::default(); LANES]; 5];
            for l in 0..LANES {
                let z = (a[0][l] + a[3][l]).logistic();
                let r = (a[1][l] + a[4][l]).logistic();
                let i2 = a[5][l];
                let cand = (a[2][l] + r * i2).fast_tanh();
                let hn = z * a[6][l] + (one - z) * cand;
                let [vh, vz, vr, vc, vi] = &mut v;
                (vh[l], vz[l], vr[l], vc[l], vi[l]) = (hn, z, r, cand, i2);
            }
            h[j..j + n].copy_from_slice(&v[0][..n]);
            for (field, values) in v.iter().enumerate() {
                record[field * u + j..][..n].copy_from_slice(&values[..n]);
            }
            j += n;
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
        let seq = &self.seq;
        let (t, u) = (seq.steps, seq.units);
        let w = Self::WIDTH * u;
        let mut saved = vec![T::default(); t * seq.batch * w];
        for_each_block(seq.blocks_mut(&mut saved, w), |(first, records)| {
            let n = records.len() / (t * w);
            let mut h = vec![T::default(); n * u];
            let mut inner = vec![T::default(); n * 3 * u];
            for s in 0..t {
                step_product(&mut inner, &h, r, (n, u, 3 * u));
                for i in 0..n {
                    let row = first + i;
                    let rec = &mut records[(s * n + i) * w..][..w];
                    let hr = &mut h[i * u..][..u];
                    if !seq.counts(row, s) {
                        rec[..u].copy_from_slice(hr);
                        continue;
                    }
                    let xr = &x[(row * t + s) * 3 * u..][..3 * u];
                    gru_cell(xr, &inner[i * 3 * u..][..3 * u], rb, hr, rec);
                }
            }
        });
        let out = seq.output(&saved, w);
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
                    let rt = crate::cpu::transpose(rk, u, 3 * u, 1);
                    // dInner per step: the recurrent product's gradient; dx the projection's.
                    let mut di = vec![T::default(); t * b * 3 * u];
                    let mut dx = vec![T::default(); t * b * 3 * u];
                    let pieces: Vec<_> = seq
                        .blocks_mut(&mut di, 3 * u)
                        .into_iter()
                        .zip(seq.blocks_mut(&mut dx, 3 * u))
                        .map(|((first, di), (_, dx))| (first, di, dx))
                        .collect();
                    for_each_block(pieces, |(first, di, dx)| {
                        let n = di.len() / (t * 3 * u);
                        let records = &saved[first * t * w..][..n * t * w];
                        let mut dh = vec![T::default(); n * u];
                        let mut direct = vec![T::default(); n * u];
                        for s in (0..t).rev() {
                            let dis = &mut di[s * n * 3 * u..][..n * 3 * u];
                            for i in 0..n {
                                let row = first + i;
                                let gh = seq.grad_at(gr, &zeros, row, s);
                                let dhr = &dh[i * u..][..u];
                                let dir = &mut direct[i * u..][..u];
                                if !seq.counts(row, s) {
                                    for ((c, &d), &g) in dir.iter_mut().zip(dhr).zip(gh) {
                                        *c = d + g;
                                    }
                                    continue;
                                }
                                let h_prev = if s == 0 {
                                    &zeros[..]
                                } else {
                                    &records[((s - 1) * n + i) * w..][..u]
                                };
                                let rec = &records[(s * n + i) * w..][..w];
                                let d = &mut dis[i * 3 * u..][..3 * u];
                                let dxr = &mut dx[(s * n + i) * 3 * u..][..3 * u];
                                gru_cell_grad(rec, h_prev, gh, dhr, d, dxr, dir);
                            }
                            step_gradient(&mut dh, dis, &rt, (n, 3 * u, u));
                            for (d, c) in dh.iter_mut().zip(&direct) {
                                *d += *c;
                            }
                        }
                    });
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
