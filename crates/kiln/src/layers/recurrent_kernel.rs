//! LSTM and GRU over a whole sequence as one CPU op each, with backpropagation through time.
//!
//! The plain candle graph takes one `narrow` of the input projection per step, and the
//! backward pass of each pads its gradient with zeros back to the whole `[batch, steps,
//! gates·units]` tensor and adds it: a cost in the square of the sequence length (40 ms of a
//! 107 ms R1 step). Here the forward pass runs the steps over the projection in place and keeps
//! what the backward pass needs (every step's states and gates, time-major so each step's rows
//! are adjacent) inside the op, not in its output: the output is the layer's own (the state
//! sequence or the last state, and the LSTM's final cell state after it when the layer returns
//! its states), so autograd never pads, zero-fills or adds a gradient the size
//! of all the gates. The backward pass walks the steps back, one product with the recurrent
//! kernel per step, and forms the recurrent kernel's gradient in one product over all steps.
//! The gate nonlinearities run as vectorized polynomials on f32 ([`crate::cpu_math`]).
//!
//! Only Keras' default activations (tanh, sigmoid), and the GRU with `reset_after`, on the CPU
//! in f32 or f64; the layer keeps its plain graph otherwise. Masked steps carry the state.

use super::dense_kernel::{product, product_column_major, product_new, Element, Operand};
use crate::cpu::{contiguous, vectorized, with_slice, Real};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
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
    /// The LSTM's final cell state follows each sequence's output, as one more step: the
    /// output is `[batch, steps + 1, units]` or `[batch, 2, units]` (the layer's `return_state`).
    pub(crate) final_cell: bool,
}

impl Sequence {
    fn counts(&self, b: usize, t: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[b * self.steps + t])
    }

    fn output_shape(&self) -> Shape {
        match (self.return_sequences, self.final_cell) {
            (true, _) => Shape::from((self.batch, self.out_steps(), self.units)),
            (false, true) => Shape::from((self.batch, 2, self.units)),
            (false, false) => Shape::from((self.batch, self.units)),
        }
    }

    /// The states each sequence's output holds: its steps (or the last), then the final cell
    /// state with [`Sequence::final_cell`].
    fn out_steps(&self) -> usize {
        let states = if self.return_sequences { self.steps } else { 1 };
        states + usize::from(self.final_cell)
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

    /// What a forward pass keeps, `saved` (every record `width` long, then the input
    /// `features` wide, each in blocks), cut into each block's first row, records and input.
    fn forward_blocks<'a, T>(
        &self,
        saved: &'a mut [T],
        width: usize,
        features: usize,
    ) -> Vec<(usize, &'a mut [T], &'a mut [T])> {
        let (records, inputs) = saved.split_at_mut(self.steps * self.batch * width);
        self.blocks_mut(records, width)
            .into_iter()
            .zip(self.blocks_mut(inputs, features))
            .map(|((first, records), (_, input))| (first, records, input))
            .collect()
    }

    /// The layer's output: the states (the first `units` of each `width`-wide record of `saved`)
    /// of every step, batch-major, or of the last step; with [`Sequence::final_cell`], each
    /// sequence's last cell state (the record's next `units`) after them.
    fn output<T: Element>(&self, saved: &[T], width: usize) -> Vec<T> {
        let (b, t, u) = (self.batch, self.steps, self.units);
        let first = if self.return_sequences { 0 } else { t - 1 };
        let mut out = Vec::with_capacity(b * self.out_steps() * u);
        for row in 0..b {
            for s in first..t {
                out.extend_from_slice(&saved[self.record(row, s, width)..][..u]);
            }
            if self.final_cell {
                out.extend_from_slice(&saved[self.record(row, t - 1, width) + u..][..u]);
            }
        }
        out
    }

    /// The output's gradient for the final cell state of `row` ([`Sequence::final_cell`]), or
    /// `zeros` without it.
    fn cell_grad_at<'a, T>(&self, grad: &'a [T], zeros: &'a [T], row: usize) -> &'a [T] {
        let (per, u) = (self.out_steps(), self.units);
        match self.final_cell {
            true => &grad[(row * per + per - 1) * u..][..u],
            false => zeros,
        }
    }

    /// The output's gradient for the state of `row` at step `s`, or `zeros` where the output
    /// does not contain that state.
    fn grad_at<'a, T>(&self, grad: &'a [T], zeros: &'a [T], row: usize, s: usize) -> &'a [T] {
        let (t, u, per) = (self.steps, self.units, self.out_steps());
        if self.return_sequences {
            &grad[(row * per + s) * u..][..u]
        } else if s == t - 1 {
            &grad[row * per * u..][..u]
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
}

/// What a forward pass keeps for its backward pass: the per-step records and the input, in
/// blocks.
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

/// The input projection the ops make themselves, `x · W + b`, from the input `x` `[batch,
/// steps, features]` and `wb`, the kernel `[features, gates]` with the bias below it as one more
/// row when there is one. Inside the op, the projection (as wide as all the gates) never becomes
/// a tensor: candle would zero-fill and add its gradient, and the op would turn that gradient
/// from its own order into the tensor's (a third of an R1 backward pass besides the products).
/// Only the input itself, `gates / features` times smaller, is reordered.
#[derive(Clone, Copy)]
pub(crate) struct Projection {
    pub(crate) features: usize,
    pub(crate) bias: bool,
}

impl Projection {
    /// Copies the block's rows of `x` (from row `first`), time-major, into `xt` and returns
    /// their projection, time-major too.
    fn forward<T: Element>(
        &self,
        seq: &Sequence,
        (x, wb): (&[T], &[T]),
        gates: usize,
        first: usize,
        xt: &mut [T],
    ) -> Vec<T> {
        let (t, f) = (seq.steps, self.features);
        let n = xt.len() / (t * f);
        for s in 0..t {
            for i in 0..n {
                xt[(s * n + i) * f..][..f].copy_from_slice(&x[((first + i) * t + s) * f..][..f]);
            }
        }
        let mut proj = match self.bias {
            true => wb[f * gates..][..gates].repeat(n * t),
            false => vec![T::default(); n * t * gates],
        };
        // SAFETY: proj holds (n·t)×gates elements, xt (n·t)×f and the kernel f×gates.
        unsafe {
            product(
                (n * t, gates, f),
                proj.as_mut_ptr(),
                true,
                Operand::rows(xt, f),
                Operand::rows(wb, gates),
                1,
            )
        };
        proj
    }

    /// The input's gradient for one block: its projection's gradient `d` (time-major) times
    /// the kernel's transpose, written into the block's rows of `dx` (batch-major).
    fn input_gradient<T: Element>(
        &self,
        seq: &Sequence,
        d: &[T],
        wb: &[T],
        gates: usize,
        dx: &mut [T],
    ) {
        let (t, f) = (seq.steps, self.features);
        let n = dx.len() / (t * f);
        // d · Wᵀ, with Wᵀ made row-major: the direct kernel reads d in place, where `gemm`
        // packed all of it first (a tenth of R1's CPU time went to packing).
        let mut time_major = vec![T::default(); n * t * f];
        let kernel_t = crate::cpu::transpose(&wb[..f * gates], f, gates, 1);
        if !super::conv_direct::product(&mut time_major, d, &kernel_t, (n * t, gates, f)) {
            time_major = product_new(
                (n * t, f, gates),
                Operand::rows(d, gates),
                Operand::transposed(wb, gates),
                1,
            );
        }
        for s in 0..t {
            for i in 0..n {
                dx[(i * t + s) * f..][..f].copy_from_slice(&time_major[(s * n + i) * f..][..f]);
            }
        }
    }

    /// The gradient of `wb`: `Σ xtᵀ · d` over the blocks, and the bias's, the column sums of
    /// `d`, below it.
    fn parameter_gradient<T: Element>(
        &self,
        seq: &Sequence,
        xt: &[T],
        d: &[T],
        gates: usize,
    ) -> Vec<T> {
        let (b, t, f) = (seq.batch, seq.steps, self.features);
        let mut g = vec![T::default(); (f + usize::from(self.bias)) * gates];
        for (k, first) in (0..b).step_by(BLOCK_ROWS).enumerate() {
            let rows = BLOCK_ROWS.min(b - first);
            let (xb, db) = (&xt[first * t * f..], &d[first * t * gates..]);
            // SAFETY: g holds at least f×gates; xtᵀ is f×(rows·t) and d (rows·t)×gates, both
            // inside this block.
            unsafe {
                product(
                    (f, gates, rows * t),
                    g.as_mut_ptr(),
                    k > 0,
                    Operand::transposed(xb, f),
                    Operand::rows(db, gates),
                    crate::runtime::matmul_threads(),
                )
            };
        }
        if self.bias {
            add_rows_into(&mut g[f * gates..], d);
        }
        g
    }
}

vectorized! {
    /// `sums += Σ rows`, per column (`sums.len()` of them).
    fn add_rows_into<T>(sums: &mut [T], rows: &[T]) {
        for row in rows.chunks_exact(sums.len()) {
            for (a, &v) in sums.iter_mut().zip(row) {
                *a = *a + v;
            }
        }
    }
}

/// What the LSTM and GRU backward passes need of their inputs: the kernel with its bias, and
/// whether the input's gradient is wanted.
struct Inputs<'a, T> {
    wb: &'a [T],
    want_dx: bool,
}

/// LSTM over the input `x` `[batch, steps, features]`, the kernel with its bias (see
/// [`Projection`]) and the recurrent kernel `[units, 4·units]`; the output is the layer's (see
/// [`Sequence`]).
pub(crate) struct LstmOp {
    seq: Sequence,
    projection: Projection,
    saved: Saved,
}

impl LstmOp {
    /// Per step and sequence: h, c, tanh c, then the gates i, f, g, o.
    const WIDTH: usize = 7;

    pub(crate) fn new(seq: Sequence, projection: Projection) -> Self {
        Self {
            seq,
            projection,
            saved: Saved::default(),
        }
    }

    /// The records of every step (block-major), then the input time-major by block.
    fn fwd<T: Element>(&self, x: &[T], wb: &[T], r: &[T]) -> Vec<T> {
        let seq = &self.seq;
        let (t, u, f) = (seq.steps, seq.units, self.projection.features);
        let w = Self::WIDTH * u;
        let mut saved = vec![T::default(); t * seq.batch * (w + f)];
        for_each_block(
            seq.forward_blocks(&mut saved, w, f),
            |(first, records, xt)| {
                let n = records.len() / (t * w);
                let proj = self.projection.forward(seq, (x, wb), 4 * u, first, xt);
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
                        let xr = &proj[(s * n + i) * 4 * u..][..4 * u];
                        lstm_cell(xr, &z[i * 4 * u..][..4 * u], hr, cr, rec);
                    }
                }
            },
        );
        let out = seq.output(&saved, w);
        self.saved.keep(saved);
        out
    }

    fn bwd_typed<T: Element>(
        &self,
        (x, wb, r): (&Tensor, &Tensor, &Tensor),
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let (b, t, w) = (self.seq.batch, self.seq.steps, Self::WIDTH * self.seq.units);
        let (wb, r, grad) = (wb.contiguous()?, r.contiguous()?, grad.contiguous()?);
        with_slice::<T, _>(&wb, "kiln-lstm: kernel", |wb| {
            let inputs = Inputs {
                wb,
                want_dx: crate::gradients::wanted(x),
            };
            with_slice::<T, _>(&r, "kiln-lstm: recurrent kernel", |rk| {
                self.saved.with::<T, _>("kiln-lstm", |saved| {
                    with_slice::<T, _>(&grad, "kiln-lstm: gradient", |gr| {
                        let (records, xts) = saved.split_at(t * b * w);
                        self.backward(&inputs, (records, xts), rk, gr, r.device())
                    })
                })
            })
        })
    }

    /// The gradients of the input (when wanted), the kernel with its bias, and the recurrent
    /// kernel.
    fn backward<T: Element>(
        &self,
        inputs: &Inputs<T>,
        (records, xts): (&[T], &[T]),
        rk: &[T],
        gr: &[T],
        device: &candle_core::Device,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let seq = &self.seq;
        let (b, t, u, f) = (seq.batch, seq.steps, seq.units, self.projection.features);
        let w = Self::WIDTH * u;
        let zeros = vec![T::default(); u];
        let rt = crate::cpu::transpose(rk, u, 4 * u, 1);
        let mut dz = vec![T::default(); t * b * 4 * u];
        let mut dx = vec![T::default(); if inputs.want_dx { t * b * f } else { 0 }];
        let mut dx_blocks = seq.blocks_mut(&mut dx, f).into_iter().map(|(_, d)| d);
        let pieces: Vec<_> = seq
            .blocks_mut(&mut dz, 4 * u)
            .into_iter()
            .map(|(first, dz)| (first, dz, dx_blocks.next()))
            .collect();
        for_each_block(pieces, |(first, dz, dx)| {
            let n = dz.len() / (t * 4 * u);
            let records = &records[first * t * w..][..n * t * w];
            let mut dh = vec![T::default(); n * u];
            // The final cell state's own gradient, when it is an output, starts dc.
            let mut dc: Vec<T> = (0..n)
                .flat_map(|i| seq.cell_grad_at(gr, &zeros, first + i).iter().copied())
                .collect();
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
            if let Some(dx) = dx {
                self.projection
                    .input_gradient(seq, dz, inputs.wb, 4 * u, dx);
            }
        });
        let dr = seq.kernel_grad(records, w, &dz, 4 * u);
        let dwb = self.projection.parameter_gradient(seq, xts, &dz, 4 * u);
        let wb_rows = f + usize::from(self.projection.bias);
        Ok((
            match inputs.want_dx {
                true => Some(Tensor::from_vec(dx, (b, t, f), device)?),
                false => None,
            },
            Tensor::from_vec(dwb, (wb_rows, 4 * u), device)?,
            Tensor::from_vec(dr, (u, 4 * u), device)?,
        ))
    }
}

/// Checks the input, the kernel with its bias and the recurrent kernel (`rows` rows: the
/// units, and one more for the GRU's recurrent bias) against the run.
fn check(
    what: &str,
    (lx, lw, lr): (&Layout, &Layout, &Layout),
    (seq, projection): (&Sequence, &Projection),
    gates: usize,
    rows: usize,
) -> candle_core::Result<()> {
    let (b, t, u, f) = (seq.batch, seq.steps, seq.units, projection.features);
    let wb_rows = f + usize::from(projection.bias);
    if t == 0
        || lx.shape().dims() != [b, t, f]
        || lw.shape().dims() != [wb_rows, gates * u]
        || lr.shape().dims() != [rows, gates * u]
    {
        candle_core::bail!(
            "{what}: shapes {:?}, {:?}, {:?} do not fit",
            lx.shape(),
            lw.shape(),
            lr.shape()
        );
    }
    Ok(())
}

/// The op's three inputs as contiguous slices of one float type, passed to `run`.
macro_rules! with_three {
    ($what:literal, ($a:expr, $la:expr), ($b:expr, $lb:expr), ($c:expr, $lc:expr), $run:expr) => {
        match ($a, $b, $c) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => CpuStorage::F32($run(
                contiguous(a, $la, concat!($what, ": input"))?,
                contiguous(b, $lb, concat!($what, ": kernel"))?,
                contiguous(c, $lc, concat!($what, ": recurrent kernel"))?,
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => CpuStorage::F64($run(
                contiguous(a, $la, concat!($what, ": input"))?,
                contiguous(b, $lb, concat!($what, ": kernel"))?,
                contiguous(c, $lc, concat!($what, ": recurrent kernel"))?,
            )),
            _ => candle_core::bail!(concat!(
                $what,
                ": the input and kernels must all be f32 or all f64"
            )),
        }
    };
}

impl CustomOp3 for LstmOp {
    fn name(&self) -> &'static str {
        "kiln-lstm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        wb: &CpuStorage,
        lw: &Layout,
        r: &CpuStorage,
        lr: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (seq, projection) = (&self.seq, &self.projection);
        check("kiln-lstm", (lx, lw, lr), (seq, projection), 4, seq.units)?;
        let out = with_three!("kiln-lstm", (x, lx), (wb, lw), (r, lr), |x, wb, r| self
            .fwd(x, wb, r));
        Ok((out, self.seq.output_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dwb, dr) = match r.dtype() {
            DType::F32 => self.bwd_typed::<f32>((x, wb, r), grad_res)?,
            DType::F64 => self.bwd_typed::<f64>((x, wb, r), grad_res)?,
            other => candle_core::bail!("kiln-lstm: unsupported dtype {other:?}"),
        };
        Ok((dx, Some(dwb), Some(dr)))
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

/// GRU (`reset_after`) over the input `x` `[batch, steps, features]`, the kernel with the input
/// bias (see [`Projection`]) and the recurrent kernel `[units, 3·units]` with the recurrent
/// bias as one more row (zeros without biases); the output is the layer's (see [`Sequence`]).
pub(crate) struct GruOp {
    seq: Sequence,
    projection: Projection,
    saved: Saved,
}

impl GruOp {
    /// Per step and sequence: h, then z, r, the candidate and the recurrent product's
    /// candidate part (with its bias).
    const WIDTH: usize = 5;

    pub(crate) fn new(seq: Sequence, projection: Projection) -> Self {
        Self {
            seq,
            projection,
            saved: Saved::default(),
        }
    }

    /// The records of every step (block-major), then the input time-major by block.
    fn fwd<T: Element>(&self, x: &[T], wb: &[T], rb: &[T]) -> Vec<T> {
        let seq = &self.seq;
        let (t, u, f) = (seq.steps, seq.units, self.projection.features);
        let w = Self::WIDTH * u;
        let (r, rbias) = rb.split_at(u * 3 * u);
        let mut saved = vec![T::default(); t * seq.batch * (w + f)];
        for_each_block(
            seq.forward_blocks(&mut saved, w, f),
            |(first, records, xt)| {
                let n = records.len() / (t * w);
                let proj = self.projection.forward(seq, (x, wb), 3 * u, first, xt);
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
                        let xr = &proj[(s * n + i) * 3 * u..][..3 * u];
                        gru_cell(xr, &inner[i * 3 * u..][..3 * u], rbias, hr, rec);
                    }
                }
            },
        );
        let out = seq.output(&saved, w);
        self.saved.keep(saved);
        out
    }

    fn bwd_typed<T: Element>(
        &self,
        (x, wb, rb): (&Tensor, &Tensor, &Tensor),
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let (b, t, w) = (self.seq.batch, self.seq.steps, Self::WIDTH * self.seq.units);
        let (wb, rb, grad) = (wb.contiguous()?, rb.contiguous()?, grad.contiguous()?);
        with_slice::<T, _>(&wb, "kiln-gru: kernel", |wb| {
            let inputs = Inputs {
                wb,
                want_dx: crate::gradients::wanted(x),
            };
            with_slice::<T, _>(&rb, "kiln-gru: recurrent kernel", |rb| {
                self.saved.with::<T, _>("kiln-gru", |saved| {
                    with_slice::<T, _>(&grad, "kiln-gru: gradient", |gr| {
                        let saved = saved.split_at(t * b * w);
                        self.backward(&inputs, saved, rb, gr, x.device())
                    })
                })
            })
        })
    }

    /// The gradients of the input (when wanted), the kernel with the input bias, and the
    /// recurrent kernel with the recurrent bias.
    fn backward<T: Element>(
        &self,
        inputs: &Inputs<T>,
        (records, xts): (&[T], &[T]),
        rb: &[T],
        gr: &[T],
        device: &candle_core::Device,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let seq = &self.seq;
        let (b, t, u, f) = (seq.batch, seq.steps, seq.units, self.projection.features);
        let w = Self::WIDTH * u;
        let zeros = vec![T::default(); u];
        let rt = crate::cpu::transpose(&rb[..u * 3 * u], u, 3 * u, 1);
        // Per step: the recurrent product's gradient, and the projection's.
        let mut di = vec![T::default(); t * b * 3 * u];
        let mut dp = vec![T::default(); t * b * 3 * u];
        let mut dx = vec![T::default(); if inputs.want_dx { t * b * f } else { 0 }];
        let mut dx_blocks = seq.blocks_mut(&mut dx, f).into_iter().map(|(_, d)| d);
        let pieces: Vec<_> = seq
            .blocks_mut(&mut di, 3 * u)
            .into_iter()
            .zip(seq.blocks_mut(&mut dp, 3 * u))
            .map(|((first, di), (_, dp))| (first, di, dp, dx_blocks.next()))
            .collect();
        for_each_block(pieces, |(first, di, dp, dx)| {
            let n = di.len() / (t * 3 * u);
            let records = &records[first * t * w..][..n * t * w];
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
                    let dpr = &mut dp[(s * n + i) * 3 * u..][..3 * u];
                    gru_cell_grad(rec, h_prev, gh, dhr, d, dpr, dir);
                }
                step_gradient(&mut dh, dis, &rt, (n, 3 * u, u));
                for (d, c) in dh.iter_mut().zip(&direct) {
                    *d += *c;
                }
            }
            if let Some(dx) = dx {
                self.projection
                    .input_gradient(seq, dp, inputs.wb, 3 * u, dx);
            }
        });
        // The recurrent kernel's gradient with the recurrent bias's below it.
        let mut drb = seq.kernel_grad(records, w, &di, 3 * u);
        drb.resize((u + 1) * 3 * u, T::default());
        add_rows_into(&mut drb[u * 3 * u..], &di);
        let dwb = self.projection.parameter_gradient(seq, xts, &dp, 3 * u);
        let wb_rows = f + usize::from(self.projection.bias);
        Ok((
            match inputs.want_dx {
                true => Some(Tensor::from_vec(dx, (b, t, f), device)?),
                false => None,
            },
            Tensor::from_vec(dwb, (wb_rows, 3 * u), device)?,
            Tensor::from_vec(drb, (u + 1, 3 * u), device)?,
        ))
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
        wb: &CpuStorage,
        lw: &Layout,
        rb: &CpuStorage,
        lr: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (seq, projection) = (&self.seq, &self.projection);
        check(
            "kiln-gru",
            (lx, lw, lr),
            (seq, projection),
            3,
            seq.units + 1,
        )?;
        let out = with_three!("kiln-gru", (x, lx), (wb, lw), (rb, lr), |x, wb, rb| self
            .fwd(x, wb, rb));
        Ok((out, self.seq.output_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        rb: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dwb, drb) = match rb.dtype() {
            DType::F32 => self.bwd_typed::<f32>((x, wb, rb), grad_res)?,
            DType::F64 => self.bwd_typed::<f64>((x, wb, rb), grad_res)?,
            other => candle_core::bail!("kiln-gru: unsupported dtype {other:?}"),
        };
        Ok((dx, Some(dwb), Some(drb)))
    }
}

/// Whether the fused ops apply to the input `x` and the layer's weights.
pub(crate) fn applies(x: &Tensor, params: &[&Tensor]) -> bool {
    matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu()
        && params
            .iter()
            .all(|p| p.dtype() == x.dtype() && p.device().is_cpu())
}
