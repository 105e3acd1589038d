//! Conv2D on the CPU, channels last, as one matrix product per batch.
//!
//! candle's conv2d is channels-first: the layer transposes around it, and candle builds one
//! im2col tile and one small product per sample, with the input gradient through
//! `conv_transpose2d`, a direct loop. Here the windows of the whole (already padded) batch are
//! gathered into one `[batch·out_h·out_w, kh·kw·in]` matrix, whose product with Keras' kernel
//! `[kh, kw, in, out]` (as it is laid out, a `[kh·kw·in, out]` matrix) is the output, channels
//! last. The backward pass: dW = colsᵀ·dY, and dX scatters dY·Wᵀ back onto the windows.

use super::dense_kernel::{product, Element, Operand};
use crate::cpu::{contiguous, for_each_chunk, with_slice};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// A convolution's geometry over an input that is already padded: kernel size, strides and
/// dilation per axis.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Conv2dOp {
    pub(crate) kernel: [usize; 2],
    pub(crate) strides: [usize; 2],
    pub(crate) dilation: [usize; 2],
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

impl Conv2dOp {
    fn dims(&self, x: &[usize], k: &[usize]) -> candle_core::Result<Dims> {
        let ([b, h, w, c], [kh, kw, kc, f]) = (x, k) else {
            candle_core::bail!("kiln-conv2d: input {x:?} and kernel {k:?} must be rank 4");
        };
        let span = |a: usize| (self.kernel[a] - 1) * self.dilation[a] + 1;
        if [*kh, *kw] != self.kernel || kc != c || *h < span(0) || *w < span(1) {
            candle_core::bail!("kiln-conv2d: input {x:?} and kernel {k:?} do not fit");
        }
        Ok(Dims {
            b: *b,
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

    /// The windows of output rows `first..first + rows.len() / k` as rows of `k = kh·kw·c`.
    fn im2col_rows<T: Element>(&self, x: &[T], d: &Dims, first: usize, rows: &mut [T]) {
        let k = self.kernel[0] * self.kernel[1] * d.c;
        for (i, out) in rows.chunks_exact_mut(k.max(1)).enumerate() {
            self.windows(d, first + i, |col, at| {
                out[col..col + d.c].copy_from_slice(&x[at..at + d.c]);
            });
        }
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

    /// `y = windows · kernel`, one tile of output rows at a time (tiles across threads): the
    /// batch's whole window matrix (143 MB for C1's second layer at batch 1024) is never built.
    fn fwd<T: Element>(&self, x: &[T], kernel: &[T], d: &Dims) -> Vec<T> {
        let k = self.kernel[0] * self.kernel[1] * d.c;
        let m = d.b * d.oh * d.ow;
        let tile = self.tile_rows(d);
        let mut y = vec![T::default(); m * d.f];
        for_each_chunk(&mut y, tile * d.f, |t, ys| {
            let n = ys.len() / d.f;
            let mut cols = vec![T::default(); n * k];
            self.im2col_rows(x, d, t * tile, &mut cols);
            // SAFETY: ys holds n×f elements; cols is n×k and the kernel k×f, row-major.
            unsafe {
                product(
                    (n, d.f, k),
                    ys.as_mut_ptr(),
                    false,
                    Operand::rows(&cols, k),
                    Operand::rows(kernel, d.f),
                    1,
                )
            };
        });
        y
    }

    /// The gradients, a tile of whole samples at a time (tiles across threads): the tile's
    /// windows give its part of dW = colsᵀ·dY, and dX gets dY·Wᵀ added back onto the windows
    /// (a sample's windows stay inside the sample, so tiles write disjoint parts of dX). The
    /// parts of dW are summed in tile order, so the result does not depend on the threads.
    fn bwd_slices<T: Element>(&self, xs: &[T], ks: &[T], gs: &[T], d: &Dims) -> (Vec<T>, Vec<T>) {
        let k = self.kernel[0] * self.kernel[1] * d.c;
        let (per_sample, sample_len) = (d.oh * d.ow, d.h * d.w * d.c);
        let samples = (self.tile_rows(d) / per_sample.max(1)).max(1);
        let mut dx = vec![T::default(); xs.len()];
        let tiles = d.b.div_ceil(samples);
        let mut parts: Vec<Vec<T>> = (0..tiles).map(|_| Vec::new()).collect();
        let work = |t: usize, dxs: &mut [T], part: &mut Vec<T>| {
            let n = dxs.len() / sample_len;
            let (first, m) = (t * samples * per_sample, n * per_sample);
            let mut cols = vec![T::default(); m * k];
            self.im2col_rows(xs, d, first, &mut cols);
            let g = &gs[first * d.f..][..m * d.f];
            *part = vec![T::default(); k * d.f];
            // SAFETY: part is k×f = colsᵀ (k×m, read transposed) · dY (m×f); cols is then
            // overwritten with m×k = dY (m×f) · Wᵀ (f×k, the k×f kernel read transposed).
            unsafe {
                product(
                    (k, d.f, m),
                    part.as_mut_ptr(),
                    false,
                    Operand::transposed(&cols, k),
                    Operand::rows(g, d.f),
                    1,
                );
                product(
                    (m, k, d.f),
                    cols.as_mut_ptr(),
                    false,
                    Operand::rows(g, d.f),
                    Operand::transposed(ks, d.f),
                    1,
                );
            }
            for (i, dc) in cols.chunks_exact(k.max(1)).enumerate() {
                self.windows(d, first + i, |col, at| {
                    let at = at - t * samples * sample_len;
                    for (v, &g) in dxs[at..at + d.c].iter_mut().zip(&dc[col..col + d.c]) {
                        *v += g;
                    }
                });
            }
        };
        let chunk = samples * sample_len;
        if tiles > 1 && crate::runtime::parallel_now() {
            use rayon::prelude::*;
            dx.par_chunks_mut(chunk)
                .zip(parts.par_iter_mut())
                .enumerate()
                .for_each(|(t, (dxs, part))| work(t, dxs, part));
        } else {
            for (t, (dxs, part)) in dx.chunks_mut(chunk).zip(parts.iter_mut()).enumerate() {
                work(t, dxs, part);
            }
        }
        let mut parts = parts.into_iter();
        let mut dk = parts.next().unwrap_or_else(|| vec![T::default(); k * d.f]);
        for part in parts {
            for (a, b) in dk.iter_mut().zip(part) {
                *a += b;
            }
        }
        (dx, dk)
    }

    fn bwd_typed<T: Element>(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.dims(x.dims(), kernel.dims())?;
        let (x, kernel, grad) = (x.contiguous()?, kernel.contiguous()?, grad.contiguous()?);
        with_slice::<T, _>(&x, "kiln-conv2d: x", |xs| {
            with_slice::<T, _>(&kernel, "kiln-conv2d: kernel", |ks| {
                with_slice::<T, _>(&grad, "kiln-conv2d: gradient", |gs| {
                    let (dx, dk) = self.bwd_slices(xs, ks, gs, &d);
                    Ok((
                        Tensor::from_vec(dx, x.shape(), x.device())?,
                        Tensor::from_vec(dk, kernel.shape(), x.device())?,
                    ))
                })
            })
        })
    }
}

/// The window-matrix elements per tile of [`Conv2dOp`]: 512 KiB of f32, about a core's L2.
const TILE_ELEMENTS: usize = 1 << 17;

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        k: &CpuStorage,
        lk: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(lx.shape().dims(), lk.shape().dims())?;
        let out = match (x, k) {
            (CpuStorage::F32(x), CpuStorage::F32(k)) => CpuStorage::F32(self.fwd(
                contiguous(x, lx, "kiln-conv2d: x")?,
                contiguous(k, lk, "kiln-conv2d: kernel")?,
                &d,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(k)) => CpuStorage::F64(self.fwd(
                contiguous(x, lx, "kiln-conv2d: x")?,
                contiguous(k, lk, "kiln-conv2d: kernel")?,
                &d,
            )),
            _ => candle_core::bail!("kiln-conv2d: x and kernel must both be f32 or both f64"),
        };
        Ok((out, Shape::from((d.b, d.oh, d.ow, d.f))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dk) = match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, k, grad_res)?,
            DType::F64 => self.bwd_typed::<f64>(x, k, grad_res)?,
            other => candle_core::bail!("kiln-conv2d: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dk)))
    }
}

/// The convolution of the padded channels-last `x` `[b, h, w, c]` with the Keras kernel
/// `[kh, kw, c, f]`, when the CPU op applies (CPU, f32 or f64); `None` otherwise.
pub(crate) fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    op: Conv2dOp,
) -> candle_core::Result<Option<Tensor>> {
    let ok = matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu()
        && kernel.device().is_cpu()
        && kernel.dtype() == x.dtype()
        && x.rank() == 4
        && kernel.rank() == 4
        && x.elem_count() > 0
        && kernel.elem_count() > 0;
    if !ok {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(&kernel.contiguous()?, op)?))
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

    /// Calls `f(out_index, x_index_of_the_first_max)` for every output element.
    fn each_max<T: Element>(&self, x: &[T], dims: &[usize], mut f: impl FnMut(usize, usize)) {
        let (h, w, c) = (dims[1], dims[2], dims[3]);
        let [b, oh, ow, _] = self.out_dims(dims).expect("checked by the caller");
        let mut best: Vec<usize> = vec![0; c];
        let mut out = 0;
        for n in 0..b {
            for i in 0..oh {
                for j in 0..ow {
                    let first = ((n * h + i * self.strides[0]) * w + j * self.strides[1]) * c;
                    best.iter_mut()
                        .enumerate()
                        .for_each(|(ch, b)| *b = first + ch);
                    for p in 0..self.pool[0] {
                        for q in 0..self.pool[1] {
                            let at = first + (p * w + q) * c;
                            for (ch, b) in best.iter_mut().enumerate() {
                                if x[at + ch] > x[*b] {
                                    *b = at + ch;
                                }
                            }
                        }
                    }
                    for &b in &best {
                        f(out, b);
                        out += 1;
                    }
                }
            }
        }
    }

    /// The sizes of one sample's input and output, and the dims of a one-sample batch.
    fn per_sample(&self, dims: &[usize]) -> (usize, usize, [usize; 4]) {
        let [_, oh, ow, c] = self.out_dims(dims).expect("checked by the caller");
        let one = [1, dims[1], dims[2], dims[3]];
        (dims[1] * dims[2] * dims[3], oh * ow * c, one)
    }

    fn fwd<T: Element>(&self, x: &[T], dims: &[usize]) -> Vec<T> {
        let (x_len, y_len, one) = self.per_sample(dims);
        let mut y = vec![T::default(); dims[0] * y_len];
        for_each_chunk(&mut y, y_len, |n, ys| {
            let xs = &x[n * x_len..][..x_len];
            self.each_max(xs, &one, |o, i| ys[o] = xs[i]);
        });
        y
    }

    fn bwd_typed<T: Element>(&self, x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (x_len, y_len, one) = self.per_sample(x.dims());
        with_slice::<T, _>(&x, "kiln-max-pool: x", |xs| {
            with_slice::<T, _>(&grad, "kiln-max-pool: gradient", |gs| {
                let mut dx = vec![T::default(); xs.len()];
                for_each_chunk(&mut dx, x_len, |n, dxs| {
                    let (xn, gn) = (&xs[n * x_len..][..x_len], &gs[n * y_len..][..y_len]);
                    self.each_max(xn, &one, |o, i| dxs[i] += gn[o]);
                });
                Tensor::from_vec(dx, x.shape(), x.device())
            })
        })
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
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, grad_res)?,
            DType::F64 => self.bwd_typed::<f64>(x, grad_res)?,
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
