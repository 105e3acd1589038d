//! Conv2D on the CPU, channels last, with its bias and ReLU, as one op with its own backward.
//!
//! candle's conv2d is channels-first: the layer transposes around it, and candle builds one
//! im2col tile and one small product per sample, with the input gradient through
//! `conv_transpose2d`, a direct loop. Here the windows of the (already padded) batch are
//! gathered a tile of output rows at a time into a `[rows, kh·kw·in]` matrix, whose product
//! with Keras' kernel `[kh, kw, in, out]` (as it is laid out, a `[kh·kw·in, out]` matrix) is the
//! output, channels last; the bias and ReLU run on the tile while it is in cache. For f32 on
//! AVX-512 the forward pass skips the window matrix altogether ([`super::conv_direct`]). One
//! op instead of three also spares candle's backward two zero-filled gradients and two
//! additions over the whole activation.
//!
//! The backward pass, a tile of samples at a time: dZ = dY masked by ReLU', db = Σ dZ,
//! dW = colsᵀ·dZ (for a small window straight from the input too), and dX scatters dZ·Wᵀ back onto the windows, each only when wanted (the
//! first layer's input needs none); dW and db go straight to the training step's gradients.

use super::conv_direct::{self as direct, Geometry};
use super::dense_kernel::{parameter_gradient, product, product_new, Element, Operand};
use crate::cpu::{contiguous, for_each_chunk, vectorized, with_slice, written_in_chunks, Real};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use std::mem::MaybeUninit;

/// A convolution's geometry over an input that is already padded (kernel size, strides and
/// dilation per axis), and whether ReLU follows the bias.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Conv2dOp {
    pub(crate) kernel: [usize; 2],
    pub(crate) strides: [usize; 2],
    pub(crate) dilation: [usize; 2],
    pub(crate) relu: bool,
}

/// The sizes of one call: batch, input height, width, channels, output height, width, filters.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    oh: usize,
    ow: usize,
    f: usize,
}

/// Which gradients a backward pass computes.
#[derive(Clone, Copy)]
struct Wanted {
    x: bool,
    kernel: bool,
    bias: bool,
}

/// One tile's share of the parameter gradients, summed over tiles in tile order.
#[derive(Default)]
struct Part<T> {
    kernel: Vec<T>,
    bias: Vec<f64>,
}

impl Conv2dOp {
    fn dims(&self, x: &[usize], k: &[usize], b: &[usize]) -> candle_core::Result<Dims> {
        let ([bs, h, w, c], [kh, kw, kc, f]) = (x, k) else {
            candle_core::bail!("kiln-conv2d: input {x:?} and kernel {k:?} must be rank 4");
        };
        let span = |a: usize| (self.kernel[a] - 1) * self.dilation[a] + 1;
        if [*kh, *kw] != self.kernel || kc != c || *h < span(0) || *w < span(1) || b != [*f] {
            candle_core::bail!("kiln-conv2d: input {x:?}, kernel {k:?} and bias {b:?} do not fit");
        }
        Ok(Dims {
            b: *bs,
            h: *h,
            w: *w,
            c: *c,
            oh: (h - span(0)) / self.strides[0] + 1,
            ow: (w - span(1)) / self.strides[1] + 1,
            f: *f,
        })
    }

    /// Calls `f(col_offset, x_offset)` for every window row (of `c` elements) of output
    /// position `row` (batch-major, then out_h, out_w).
    #[inline(always)]
    fn windows(&self, d: &Dims, row: usize, mut f: impl FnMut(usize, usize)) {
        let (b, rest) = (row / (d.oh * d.ow), row % (d.oh * d.ow));
        let (i, j) = (rest / d.ow, rest % d.ow);
        let mut col = 0;
        for p in 0..self.kernel[0] {
            let y = i * self.strides[0] + p * self.dilation[0];
            for q in 0..self.kernel[1] {
                let x = j * self.strides[1] + q * self.dilation[1];
                f(col, ((b * d.h + y) * d.w + x) * d.c);
                col += d.c;
            }
        }
    }

    /// The windows of output rows `first..first + count`, as rows of `k = kh·kw·c`: a
    /// tile's window matrix, written once (not over a zero-filled buffer).
    fn im2col_rows<T: Element>(&self, x: &[T], d: &Dims, first: usize, count: usize) -> Vec<T> {
        let k = self.kernel[0] * self.kernel[1] * d.c;
        // Room for the last run's overrun ([`gather_windows`]).
        let mut cols: Vec<T> = Vec::with_capacity(count * k + COPY_LANES);
        gather_windows(self, d, x, first, count, &mut cols);
        cols
    }

    /// Output rows per tile: a window matrix of about [`TILE_ELEMENTS`], so that it is still
    /// in cache when the product reads it, and at least one tile per thread.
    fn tile_rows(&self, d: &Dims) -> usize {
        let k = self.kernel[0] * self.kernel[1] * d.c;
        let rows = d.b * d.oh * d.ow;
        let threads = crate::runtime::matmul_threads();
        (TILE_ELEMENTS / k.max(1))
            .min(rows.div_ceil(threads))
            .max(1)
    }

    /// `y = relu(bias + windows · kernel)`, one tile of output rows at a time (tiles across
    /// threads): the batch's whole window matrix (143 MB for C1's second layer at batch 1024 in
    /// `predict`) is never built.
    fn fwd<T: Element>(&self, x: &[T], kernel: &[T], bias: &[T], d: &Dims) -> Vec<T> {
        let k = self.kernel[0] * self.kernel[1] * d.c;
        let m = d.b * d.oh * d.ow;
        let tile = self.tile_rows(d);
        if direct::available::<T>() {
            return self.fwd_direct(x, kernel, bias, d, tile);
        }
        // SAFETY: the product writes each tile's n×f elements (cols is n×k and the kernel k×f)
        // before the slice over them is formed.
        unsafe {
            written_in_chunks(m * d.f, tile * d.f, |t, ys: *mut T, len| {
                let n = len / d.f.max(1);
                let cols = self.im2col_rows(x, d, t * tile, n);
                product(
                    (n, d.f, k),
                    ys,
                    false,
                    Operand::rows(&cols, k),
                    Operand::rows(kernel, d.f),
                    1,
                );
                add_bias(std::slice::from_raw_parts_mut(ys, len), bias, self.relu);
            })
        }
    }

    /// What the direct kernels need of the geometry: where each output row's window starts,
    /// and the offset of each window element from that start, in the kernel's row order.
    fn direct_geometry(&self, d: &Dims) -> (Geometry, Vec<usize>) {
        let geometry = Geometry {
            h: d.h,
            w: d.w,
            c: d.c,
            oh: d.oh,
            ow: d.ow,
            strides: self.strides,
        };
        let mut taps = Vec::with_capacity(self.kernel[0] * self.kernel[1] * d.c);
        for p in 0..self.kernel[0] {
            for q in 0..self.kernel[1] {
                let at = (p * self.dilation[0] * d.w + q * self.dilation[1]) * d.c;
                taps.extend(at..at + d.c);
            }
        }
        (geometry, taps)
    }

    /// [`Conv2dOp::fwd`] for a small window, straight from the input ([`direct::rows_kernel`]);
    /// `T` is f32 ([`direct::available`]).
    fn fwd_direct<T: Element>(
        &self,
        x: &[T],
        kernel: &[T],
        bias: &[T],
        d: &Dims,
        tile: usize,
    ) -> Vec<T> {
        let f32s = |v| direct::as_f32(v).expect("the direct kernels run on f32");
        let (geometry, taps) = self.direct_geometry(d);
        let (kernel, bias) = direct::padded(f32s(kernel), f32s(bias), d.f);
        let x = f32s(x);
        // SAFETY: direct::rows writes every element of its chunk (f per output row), and T
        // is f32.
        unsafe {
            written_in_chunks(d.b * d.oh * d.ow * d.f, tile * d.f, |t, ys: *mut T, len| {
                let ys = std::slice::from_raw_parts_mut(ys.cast::<MaybeUninit<f32>>(), len);
                direct::rows_kernel(
                    &geometry,
                    x,
                    &taps,
                    &kernel,
                    &bias,
                    self.relu,
                    t * tile,
                    d.f,
                    ys,
                );
            })
        }
    }

    /// The wanted gradients, a tile of whole samples at a time (tiles across threads). A
    /// sample's windows stay inside the sample, so tiles write disjoint parts of dX; the parts
    /// of dW and db are summed in tile order, so the result does not depend on the threads.
    #[allow(clippy::too_many_arguments)]
    fn bwd_slices<T: Element>(
        &self,
        xs: &[T],
        ks: &[T],
        ys: &[T],
        gs: &[T],
        d: &Dims,
        want: Wanted,
    ) -> (Option<Vec<T>>, Vec<T>, Vec<f64>) {
        let k = self.kernel[0] * self.kernel[1] * d.c;
        let (per_sample, sample_len) = (d.oh * d.ow, d.h * d.w * d.c);
        let samples = (self.tile_rows(d) / per_sample.max(1)).max(1);
        let tiles = d.b.div_ceil(samples);
        let mut parts: Vec<Part<T>> = (0..tiles).map(|_| Part::default()).collect();
        let work = |t: usize, dxs: Option<&mut [T]>, part: &mut Part<T>| {
            let n = samples.min(d.b - t * samples);
            let (first, m) = (t * samples * per_sample, n * per_sample);
            let g = &gs[first * d.f..][..m * d.f];
            let masked: Vec<T>;
            let dz: &[T] = if self.relu {
                let zero = T::default();
                let y = &ys[first * d.f..][..m * d.f];
                masked = g
                    .iter()
                    .zip(y)
                    .map(|(&g, &y)| if y > zero { g } else { zero })
                    .collect();
                &masked
            } else {
                g
            };
            if want.bias {
                part.bias = vec![0.0; d.f];
                super::channels::add_rows(&mut part.bias, dz);
            }
            if want.kernel && direct::gradient_available::<T>(k) {
                let fp = direct::padded_filters(d.f);
                let mut padded = vec![0.0f32; k * fp];
                let (geometry, taps) = self.direct_geometry(d);
                let f32s = |v| direct::as_f32(v).expect("the direct kernels run on f32");
                direct::kernel_gradient(
                    &geometry,
                    f32s(xs),
                    &taps,
                    f32s(dz),
                    first,
                    d.f,
                    &mut padded,
                );
                part.kernel = padded
                    .chunks_exact(fp)
                    .flat_map(|row| &row[..d.f])
                    .map(|&v| <T as Real>::from_f64(v.into()))
                    .collect();
            } else if want.kernel {
                let cols = self.im2col_rows(xs, d, first, m);
                part.kernel = vec![T::default(); k * d.f];
                // SAFETY: part is k×f = colsᵀ (k×m, read transposed) · dZ (m×f).
                unsafe {
                    product(
                        (k, d.f, m),
                        part.kernel.as_mut_ptr(),
                        false,
                        Operand::transposed(&cols, k),
                        Operand::rows(dz, d.f),
                        1,
                    )
                };
            }
            let Some(dxs) = dxs else { return };
            // m×k = dZ (m×f) · Wᵀ (f×k, the k×f kernel read transposed).
            let cols = product_new(
                (m, k, d.f),
                Operand::rows(dz, d.f),
                Operand::transposed(ks, d.f),
                1,
            );
            for (i, dc) in cols.chunks_exact(k.max(1)).enumerate() {
                self.windows(d, first + i, |col, at| {
                    let at = at - t * samples * sample_len;
                    for (v, &g) in dxs[at..at + d.c].iter_mut().zip(&dc[col..col + d.c]) {
                        *v += g;
                    }
                });
            }
        };
        let mut dx = want.x.then(|| vec![T::default(); xs.len()]);
        let chunk = samples * sample_len;
        let parallel = tiles > 1 && crate::runtime::parallel_now();
        use rayon::prelude::*;
        match (dx.as_mut(), parallel) {
            (Some(dx), true) => dx
                .par_chunks_mut(chunk)
                .zip(parts.par_iter_mut())
                .enumerate()
                .for_each(|(t, (dxs, part))| work(t, Some(dxs), part)),
            (Some(dx), false) => dx
                .chunks_mut(chunk)
                .zip(parts.iter_mut())
                .enumerate()
                .for_each(|(t, (dxs, part))| work(t, Some(dxs), part)),
            (None, true) => parts
                .par_iter_mut()
                .enumerate()
                .for_each(|(t, part)| work(t, None, part)),
            (None, false) => parts
                .iter_mut()
                .enumerate()
                .for_each(|(t, part)| work(t, None, part)),
        }
        let mut dk = vec![T::default(); if want.kernel { k * d.f } else { 0 }];
        let mut db = vec![0.0; if want.bias { d.f } else { 0 }];
        for part in parts {
            for (a, b) in dk.iter_mut().zip(part.kernel) {
                *a += b;
            }
            for (a, b) in db.iter_mut().zip(part.bias) {
                *a += b;
            }
        }
        (dx, dk, db)
    }

    fn bwd_typed<T: Element>(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.dims(), kernel.dims(), bias.dims())?;
        let want = Wanted {
            x: x.track_op(),
            kernel: crate::gradients::wanted(kernel),
            bias: crate::gradients::wanted(bias),
        };
        let (x, kernel, grad) = (x.contiguous()?, kernel.contiguous()?, grad.contiguous()?);
        let (dx, dk, db) = with_slice::<T, _>(&x, "kiln-conv2d: x", |xs| {
            with_slice::<T, _>(&kernel, "kiln-conv2d: kernel", |ks| {
                with_slice::<T, _>(res, "kiln-conv2d: output", |ys| {
                    with_slice::<T, _>(&grad, "kiln-conv2d: gradient", |gs| {
                        Ok(self.bwd_slices(xs, ks, ys, gs, &d, want))
                    })
                })
            })
        })?;
        let dx = match dx {
            Some(dx) => Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None => None,
        };
        let dk = match want.kernel {
            true => parameter_gradient::<T>(&kernel, |dst, accumulate| {
                add_or_write(dst, &dk, accumulate)
            })?,
            false => None,
        };
        let db = match want.bias {
            true => {
                let db: Vec<T> = db.into_iter().map(<T as Real>::from_f64).collect();
                parameter_gradient::<T>(bias, |dst, accumulate| add_or_write(dst, &db, accumulate))?
            }
            false => None,
        };
        Ok((dx, dk, db))
    }
}

/// `dst (+)= v`.
fn add_or_write<T: Element>(dst: *mut T, v: &[T], accumulate: bool) {
    for (j, &x) in v.iter().enumerate() {
        // SAFETY: the caller's dst holds v.len() elements (initialized when accumulating).
        unsafe {
            let d = dst.add(j);
            *d = if accumulate { *d + x } else { x };
        }
    }
}

vectorized! {
    /// `rows += bias` on every row, then ReLU when asked, while the tile is in cache.
    fn add_bias<T>(rows: &mut [T], bias: &[T], relu: bool) {
        let zero = T::default();
        for row in rows.chunks_exact_mut(bias.len().max(1)) {
            for (v, &b) in row.iter_mut().zip(bias) {
                let z = *v + b;
                *v = if relu && z < zero { zero } else { z };
            }
        }
    }
}

/// The elements [`gather_windows`] moves at a time: one AVX-512 register of f32.
const COPY_LANES: usize = 16;

vectorized! {
    /// The window matrix of output rows `first..first + count` ([`Conv2dOp::im2col_rows`]) at
    /// `cols`. A window's row of kernel columns is one run of `kw·c` contiguous input
    /// elements (of `c` with dilation), copied in whole registers: a `memcpy` call per run had
    /// cost more than the copy (a third of C1's `predict`, and 15% when it went element by
    /// element for a grey image's one channel).
    ///
    /// `cols` is empty, with room for `count·k + COPY_LANES` elements.
    fn gather_windows<T>(
        op: &Conv2dOp,
        d: &Dims,
        x: &[T],
        first: usize,
        count: usize,
        cols: &mut Vec<T>,
    ) {
        let k = op.kernel[0] * op.kernel[1] * d.c;
        assert!(cols.is_empty() && cols.capacity() >= count * k + COPY_LANES);
        let (run, runs) = match op.dilation[1] {
            1 => (op.kernel[1] * d.c, 1),
            _ => (d.c, op.kernel[1]),
        };
        // The output position (sample, row, column) of `first`, then stepped along: a division
        // per row had cost more than its copies for a grey image's three-element runs.
        let (mut b, rest) = (first / (d.oh * d.ow), first % (d.oh * d.ow));
        let (mut i, mut j) = (rest / d.ow, rest % d.ow);
        // Each run is copied as whole registers: `span` elements read, `run` kept.
        let span = run.div_ceil(COPY_LANES) * COPY_LANES;
        let mut out = 0;
        for _ in 0..count {
            let base = ((b * d.h + i * op.strides[0]) * d.w + j * op.strides[1]) * d.c;
            for p in 0..op.kernel[0] {
                for q in 0..runs {
                    let at = base + (p * op.dilation[0] * d.w + q * op.dilation[1]) * d.c;
                    let dst = cols.as_mut_ptr().wrapping_add(out);
                    if at + span <= x.len() {
                        // SAFETY: `x` holds `span` elements from `at`; `out + span` is within
                        // the `count·k` elements and the `COPY_LANES` more (the overrun is
                        // written over by the next run).
                        unsafe {
                            let src = x.as_ptr().add(at);
                            if span == COPY_LANES {
                                // One register, copied inline.
                                std::ptr::copy_nonoverlapping(src, dst, COPY_LANES);
                            } else {
                                // Long enough for a `memcpy` call to pay (the compiler turns a
                                // loop of register copies into one anyway).
                                std::ptr::copy_nonoverlapping(src, dst, run);
                            }
                        }
                    } else {
                        // The batch's last runs, whose registers would read past its end.
                        for (e, &v) in x[at..at + run].iter().enumerate() {
                            // SAFETY: `out + e` is within the `count·k` elements.
                            unsafe { dst.add(e).write(v) };
                        }
                    }
                    out += run;
                }
            }
            j += 1;
            if j == d.ow {
                j = 0;
                i += 1;
                if i == d.oh {
                    i = 0;
                    b += 1;
                }
            }
        }
        // SAFETY: the runs wrote each of the `count·k` elements, row after row.
        unsafe { cols.set_len(count * k) };
    }
}

/// The window-matrix elements per tile of [`Conv2dOp`]: 512 KiB of f32, about a core's L2.
const TILE_ELEMENTS: usize = 1 << 17;

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(lx.shape().dims(), lk.shape().dims(), lb.shape().dims())?;
        let out = match (x, k, b) {
            (CpuStorage::F32(x), CpuStorage::F32(k), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.fwd(
                    contiguous(x, lx, "kiln-conv2d: x")?,
                    contiguous(k, lk, "kiln-conv2d: kernel")?,
                    contiguous(b, lb, "kiln-conv2d: bias")?,
                    &d,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(k), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.fwd(
                    contiguous(x, lx, "kiln-conv2d: x")?,
                    contiguous(k, lk, "kiln-conv2d: kernel")?,
                    contiguous(b, lb, "kiln-conv2d: bias")?,
                    &d,
                ))
            }
            _ => candle_core::bail!("kiln-conv2d: x, kernel and bias must all be f32 or all f64"),
        };
        Ok((out, Shape::from((d.b, d.oh, d.ow, d.f))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, k, b, res, grad_res),
            DType::F64 => self.bwd_typed::<f64>(x, k, b, res, grad_res),
            other => candle_core::bail!("kiln-conv2d: unsupported dtype {other:?}"),
        }
    }
}

/// `relu?(x ⊛ kernel + bias)` for the padded channels-last `x` `[b, h, w, c]`, the Keras kernel
/// `[kh, kw, c, f]` and a bias `[f]` (a constant zero one for a layer without), when the CPU op
/// applies (CPU, f32 or f64); `None` otherwise.
pub(crate) fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    op: Conv2dOp,
) -> candle_core::Result<Option<Tensor>> {
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().is_cpu();
    let ok = matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu()
        && same(kernel)
        && bias.is_none_or(same)
        && x.rank() == 4
        && kernel.rank() == 4
        && x.elem_count() > 0
        && kernel.elem_count() > 0;
    if !ok {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(kernel.dim(3)?, x.dtype(), x.device())?,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &kernel.contiguous()?,
        &bias,
        op,
    )?))
}

/// Max pooling over the padded channels-last `x` `[b, h, w, c]` in one pass; the backward pass
/// finds each window's first largest element again and hands it the window's gradient (as
/// TensorFlow does), where candle's `max` backward compares, converts, multiplies and adds
/// over whole tensors (and gives a tie's gradient to every tied element).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaxPool2dOp {
    pub(crate) pool: [usize; 2],
    pub(crate) strides: [usize; 2],
}

impl MaxPool2dOp {
    fn out_dims(&self, x: &[usize]) -> candle_core::Result<[usize; 4]> {
        let [b, h, w, c] = x else {
            candle_core::bail!("kiln-max-pool: input {x:?} must be rank 4");
        };
        if *h < self.pool[0] || *w < self.pool[1] {
            candle_core::bail!("kiln-max-pool: input {x:?} is smaller than the pool");
        }
        Ok([
            *b,
            (h - self.pool[0]) / self.strides[0] + 1,
            (w - self.pool[1]) / self.strides[1] + 1,
            *c,
        ])
    }

    /// Calls `f(out_offset, first_x_offset)` for every output position of one sample
    /// `[h, w, c]`: the output's `c` values start at `out_offset`, its window's first row of `c`
    /// values at `first_x_offset` (the window's other rows follow at `(p·w + q)·c`).
    fn each_window(&self, dims: &[usize], mut f: impl FnMut(usize, usize)) {
        let (w, c) = (dims[2], dims[3]);
        let [_, oh, ow, _] = self.out_dims(dims).expect("checked by the caller");
        let mut out = 0;
        for i in 0..oh {
            for j in 0..ow {
                f(out, (i * self.strides[0] * w + j * self.strides[1]) * c);
                out += c;
            }
        }
    }

    /// The sizes of one sample's input and output, and the dims of a one-sample batch.
    fn per_sample(&self, dims: &[usize]) -> (usize, usize, [usize; 4]) {
        let [_, oh, ow, c] = self.out_dims(dims).expect("checked by the caller");
        let one = [1, dims[1], dims[2], dims[3]];
        (dims[1] * dims[2] * dims[3], oh * ow * c, one)
    }

    /// Each window's largest value ([`pool_sample`]), a sample at a time across threads.
    fn fwd<T: Element>(&self, x: &[T], dims: &[usize]) -> Vec<T> {
        let (x_len, y_len, one) = self.per_sample(dims);
        // SAFETY: `pool_sample` writes each window's `c` outputs (through `MaybeUninit`, read
        // by no one before), and the windows cover the sample's whole output.
        unsafe {
            written_in_chunks(dims[0] * y_len, y_len, |n, ys: *mut T, len| {
                let xs = &x[n * x_len..][..x_len];
                let ys = std::slice::from_raw_parts_mut(ys.cast::<MaybeUninit<T>>(), len);
                pool_sample(self, &one, xs, ys);
            })
        }
    }

    /// Each window's gradient goes to the first element that equals the window's maximum, the
    /// one the forward pass kept (to the first element when the maximum is NaN).
    fn bwd_typed<T: Element>(
        &self,
        x: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (x, res, grad) = (x.contiguous()?, res.contiguous()?, grad.contiguous()?);
        let (x_len, y_len, one) = self.per_sample(x.dims());
        let (w, c) = (x.dims()[2], x.dims()[3]);
        with_slice::<T, _>(&x, "kiln-max-pool: x", |xs| {
            with_slice::<T, _>(&res, "kiln-max-pool: output", |ys| {
                with_slice::<T, _>(&grad, "kiln-max-pool: gradient", |gs| {
                    let mut dx = vec![T::default(); xs.len()];
                    for_each_chunk(&mut dx, x_len, |n, dxs| {
                        let xn = &xs[n * x_len..][..x_len];
                        let (yn, gn) = (&ys[n * y_len..][..y_len], &gs[n * y_len..][..y_len]);
                        let mut taken = vec![false; c];
                        self.each_window(&one, |o, first| {
                            taken.fill(false);
                            let (yr, gr) = (&yn[o..o + c], &gn[o..o + c]);
                            for p in 0..self.pool[0] {
                                for q in 0..self.pool[1] {
                                    let at = first + (p * w + q) * c;
                                    let (xr, dr) = (&xn[at..at + c], &mut dxs[at..at + c]);
                                    route_to_first_max(dr, &mut taken, xr, yr, gr);
                                }
                            }
                            for ((d, &t), &g) in
                                dxs[first..first + c].iter_mut().zip(&taken).zip(gr)
                            {
                                if !t {
                                    *d += g;
                                }
                            }
                        });
                    });
                    Tensor::from_vec(dx, x.shape(), x.device())
                })
            })
        })
    }
}

vectorized! {
    /// One sample's max pooling into `ys` (uninitialized), a row of `c` channels at a time: a
    /// value replaces the best so far only when greater, so the first of tied values wins and
    /// NaN wins only as the window's first element, as with TensorFlow's max pooling. Compiled
    /// whole for the CPU's vector width: a call per window row had cost more than its
    /// comparisons (14% of C1's `predict`).
    fn pool_sample<T>(op: &MaxPool2dOp, dims: &[usize], xs: &[T], ys: &mut [MaybeUninit<T>]) {
        let (w, c) = (dims[2], dims[3]);
        let [_, oh, ow, _] = op.out_dims(dims).expect("checked by the caller");
        // The window's elements after its first, as offsets from it, in row-major order.
        let rest: Vec<usize> = (0..op.pool[0])
            .flat_map(|p| (0..op.pool[1]).map(move |q| (p * w + q) * c))
            .skip(1)
            .collect();
        // The windows' loops written out (no closure called per window: it would be compiled
        // for the baseline CPU, outside this function's vector width).
        let mut o = 0;
        for i in 0..oh {
            for j in 0..ow {
                let first = (i * op.strides[0] * w + j * op.strides[1]) * c;
                // Channels in groups of `COPY_LANES`, each group's best kept in a local array
                // the compiler holds in a register; the channels past the last group one at a
                // time.
                let mut start = 0;
                while start + COPY_LANES <= c {
                    let group = |at: usize| -> &[T; COPY_LANES] {
                        let lanes = &xs[first + start + at..][..COPY_LANES];
                        lanes.try_into().expect("a whole group")
                    };
                    let mut best = *group(0);
                    for &at in &rest {
                        for (b, &x) in best.iter_mut().zip(group(at)) {
                            *b = if x > *b { x } else { *b };
                        }
                    }
                    for (y, b) in ys[o + start..][..COPY_LANES].iter_mut().zip(best) {
                        y.write(b);
                    }
                    start += COPY_LANES;
                }
                for ch in start..c {
                    let mut b = xs[first + ch];
                    for &at in &rest {
                        let x = xs[first + at + ch];
                        b = if x > b { x } else { b };
                    }
                    ys[o + ch].write(b);
                }
                o += c;
            }
        }
    }
}

vectorized! {
    /// `d += g` where `x` is the window's maximum `y` and no earlier element was.
    fn route_to_first_max<T>(d: &mut [T], taken: &mut [bool], x: &[T], y: &[T], g: &[T]) {
        let zero = T::default();
        for ((((d, t), &x), &y), &g) in d.iter_mut().zip(taken.iter_mut()).zip(x).zip(y).zip(g) {
            let hit = !*t & (x == y);
            *d = *d + if hit { g } else { zero };
            *t |= hit;
        }
    }
}

impl candle_core::CustomOp1 for MaxPool2dOp {
    fn name(&self) -> &'static str {
        "kiln-max-pool"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let out = self.out_dims(dims)?;
        let y = match x {
            CpuStorage::F32(x) => {
                CpuStorage::F32(self.fwd(contiguous(x, l, "kiln-max-pool")?, dims))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(self.fwd(contiguous(x, l, "kiln-max-pool")?, dims))
            }
            _ => candle_core::bail!("kiln-max-pool: x must be f32 or f64"),
        };
        Ok((y, Shape::from(out.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, res, grad_res)?,
            DType::F64 => self.bwd_typed::<f64>(x, res, grad_res)?,
            other => candle_core::bail!("kiln-max-pool: unsupported dtype {other:?}"),
        }))
    }
}

/// Max pooling of the padded `x` `[b, h, w, c]`, when the CPU op applies; `None` otherwise.
pub(crate) fn max_pool2d(x: &Tensor, op: MaxPool2dOp) -> candle_core::Result<Option<Tensor>> {
    let ok = matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu()
        && x.rank() == 4
        && x.elem_count() > 0;
    if !ok {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}
