//! Per-channel work on channels-last tensors: the bias add of the convolutions and the
//! BatchNormalization training pass, as CPU ops with their own backward.
//!
//! A channels-last tensor `[.., C]` is a row-major `[M, C]` matrix. Its per-channel sums (a
//! bias gradient, a batch mean) add up the rows; candle's sum over leading axes is a scalar loop
//! with a divide and a modulo per element (28 ms for `[128, 26, 26, 32]` → `[32]`, where the
//! row adds here take well under 1 ms). Other devices and dtypes take the plain candle path.

use super::dense_kernel::{relu_in_place, relu_mask};
use crate::cpu::{contiguous, for_each_chunk, vectorized, with_slice, Real, PARALLEL_MIN_LEN};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

/// The element types the ops run on.
trait Element: WithDType + Real {}
impl Element for f32 {}
impl Element for f64 {}

/// Rows summed into one block of partial sums before it joins the total: keeps the rounding of
/// long sums near that of a pairwise sum.
const BLOCK_ROWS: usize = 256;

/// The sum over blocks of `BLOCK_ROWS` rows of per-column partial sums, `fill(block, sums)`
/// writing block `block`'s into zeroed `sums` (`c` long). The blocks run across threads when
/// the matrix has `len` elements or more than [`PARALLEL_MIN_LEN`], and join the total in
/// order either way, so the result does not depend on the threads.
fn sum_blocks(
    len: usize,
    c: usize,
    blocks: usize,
    fill: impl Fn(usize, &mut [f64]) + Sync,
) -> Vec<f64> {
    use rayon::prelude::*;
    let part = |i: usize| {
        let mut sums = vec![0f64; c];
        fill(i, &mut sums);
        sums
    };
    let parts: Vec<Vec<f64>> =
        if blocks > 1 && len >= PARALLEL_MIN_LEN && crate::runtime::parallel_now() {
            (0..blocks).into_par_iter().map(part).collect()
        } else {
            (0..blocks).map(part).collect()
        };
    let mut total = vec![0f64; c];
    for sums in parts {
        for (t, b) in total.iter_mut().zip(sums) {
            *t += b;
        }
    }
    total
}

/// `Σ_rows v` per column of a row-major matrix with `c` columns, accumulated in f64.
fn column_sums<T: Element>(v: &[T], c: usize) -> Vec<f64> {
    if c == 0 {
        return Vec::new();
    }
    let block = BLOCK_ROWS * c;
    sum_blocks(v.len(), c, v.len().div_ceil(block), |i, sums| {
        let rows = &v[i * block..];
        add_rows(sums, &rows[..rows.len().min(block)]);
    })
}

vectorized! {
    /// `sums += Σ_rows rows` per column (`sums.len()` columns), in f64.
    pub(crate) fn add_rows<T>(sums: &mut [f64], rows: &[T]) {
        for row in rows.chunks_exact(sums.len()) {
            for (s, &x) in sums.iter_mut().zip(row) {
                *s += Into::<f64>::into(x);
            }
        }
    }
}

vectorized! {
    /// `sums += Σ_rows (rows - mean)²` per column, in f64.
    fn add_squared_deviations<T>(sums: &mut [f64], rows: &[T], mean: &[f64]) {
        for row in rows.chunks_exact(sums.len()) {
            for ((s, &x), &m) in sums.iter_mut().zip(row).zip(mean) {
                let d = Into::<f64>::into(x) - m;
                *s += d * d;
            }
        }
    }
}

vectorized! {
    /// `dy_sums += Σ_rows dy` and `dyx_sums += Σ_rows dy·(x - mean)` per column, in f64.
    fn add_gradient_sums<T>(
        dy_sums: &mut [f64],
        dyx_sums: &mut [f64],
        xs: &[T],
        gs: &[T],
        mean: &[f64],
    ) {
        let c = dy_sums.len();
        for (xrow, grow) in xs.chunks_exact(c).zip(gs.chunks_exact(c)) {
            for ((((s, t), &x), &g), &m) in dy_sums
                .iter_mut()
                .zip(dyx_sums.iter_mut())
                .zip(xrow)
                .zip(grow)
                .zip(mean)
            {
                let g = Into::<f64>::into(g);
                *s += g;
                *t += g * (Into::<f64>::into(x) - m);
            }
        }
    }
}

vectorized! {
    /// `out = a·g + b·(x - m) + k` per column, row by row (BatchNormalization's dx).
    fn affine_gradient<T>(out: &mut [T], xs: &[T], gs: &[T], a: &[T], b: &[T], m: &[T], k: &[T]) {
        let c = a.len();
        for ((o, xrow), grow) in out.chunks_exact_mut(c).zip(xs.chunks_exact(c)).zip(gs.chunks_exact(c)) {
            for ((((((o, &x), &g), &a), &b), &m), &k) in
                o.iter_mut().zip(xrow).zip(grow).zip(a).zip(b).zip(m).zip(k)
            {
                *o = a * g + b * (x - m) + k;
            }
        }
    }
}

vectorized! {
    /// `out = (x - m)·f + b` per column, row by row (BatchNormalization's forward pass).
    fn normalize_rows<T>(out: &mut [T], xs: &[T], m: &[T], f: &[T], b: &[T]) {
        let c = m.len();
        for (o, xrow) in out.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
            for ((((o, &x), &m), &f), &b) in o.iter_mut().zip(xrow).zip(m).zip(f).zip(b) {
                *o = (x - m) * f + b;
            }
        }
    }
}

/// `out` (a row-major matrix with `c` columns) written a block of rows at a time, blocks across
/// threads: `f(first_row, rows)`.
fn by_row_blocks<T: Element>(out: &mut [T], c: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    for_each_chunk(out, BLOCK_ROWS * c.max(1), |i, rows| {
        f(i * BLOCK_ROWS, rows)
    });
}

/// `x + b` for `x` `[.., C]` and `b` `[C]`; the backward sums the gradient's rows for `b`.
struct BiasAdd;

impl BiasAdd {
    fn fwd<T: Element>(x: &[T], b: &[T]) -> Vec<T> {
        let c = b.len();
        let mut out = vec![T::default(); x.len()];
        by_row_blocks(&mut out, c, |first, rows| {
            for (o, xr) in rows.chunks_exact_mut(c).zip(x[first * c..].chunks_exact(c)) {
                for ((o, &x), &b) in o.iter_mut().zip(xr).zip(b) {
                    *o = x + b;
                }
            }
        });
        out
    }

    fn bias_grad<T: Element>(grad: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let c = b.elem_count();
        let sums = with_slice::<T, _>(grad, "kiln-bias-add: gradient", |g| Ok(column_sums(g, c)))?;
        let sums: Vec<T> = sums.into_iter().map(<T as Real>::from_f64).collect();
        Tensor::from_vec(sums, b.shape(), b.device())
    }
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "kiln-bias-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = lb.shape().elem_count();
        if lx.shape().dims().last() != Some(&c) || lb.shape().rank() != 1 {
            candle_core::bail!(
                "kiln-bias-add: {:?} + {:?} do not fit",
                lx.shape(),
                lb.shape()
            );
        }
        let out = match (x, b) {
            (CpuStorage::F32(x), CpuStorage::F32(b)) => CpuStorage::F32(Self::fwd(
                contiguous(x, lx, "kiln-bias-add: x")?,
                contiguous(b, lb, "kiln-bias-add: bias")?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(b)) => CpuStorage::F64(Self::fwd(
                contiguous(x, lx, "kiln-bias-add: x")?,
                contiguous(b, lb, "kiln-bias-add: bias")?,
            )),
            _ => candle_core::bail!("kiln-bias-add: x and bias must both be f32 or both f64"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let db = match grad.dtype() {
            DType::F32 => Self::bias_grad::<f32>(&grad, b)?,
            DType::F64 => Self::bias_grad::<f64>(&grad, b)?,
            other => candle_core::bail!("kiln-bias-add: unsupported dtype {other:?}"),
        };
        Ok((Some(grad), Some(db)))
    }
}

/// Whether the CPU ops apply to `x` with per-channel tensors `params`.
fn applies(x: &Tensor, params: &[&Tensor]) -> bool {
    matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu()
        && x.rank() >= 1
        && params
            .iter()
            .all(|p| p.dtype() == x.dtype() && p.device().is_cpu() && p.rank() == 1)
}

/// `x + b`, `b` `[C]` broadcast over the leading axes of `x` `[.., C]`.
pub(crate) fn bias_add(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if applies(x, &[b]) && x.dims().last() == Some(&b.elem_count()) {
        x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
    } else {
        x.broadcast_add(b)
    }
}

/// BatchNormalization's training forward with batch statistics `mean` and `inv` =
/// 1/√(var + ε) computed beforehand: `y = (x - mean)·inv·γ + β` over `[M, C]`, then the ReLU
/// of the layer that follows when `relu` (see [`crate::layers::CallContext`]). The backward is
/// the whole gradient through the ReLU and the statistics.
struct BatchNormTrain {
    mean: Vec<f64>,
    inv: Vec<f64>,
    relu: bool,
}

impl BatchNormTrain {
    fn fwd<T: Element>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let mean: Vec<T> = self
            .mean
            .iter()
            .map(|&m| <T as Real>::from_f64(m))
            .collect();
        let factor: Vec<T> = self
            .inv
            .iter()
            .zip(gamma)
            .map(|(&i, &g)| <T as Real>::from_f64(i) * g)
            .collect();
        let c = mean.len().max(1);
        let mut out = vec![T::default(); x.len()];
        by_row_blocks(&mut out, c, |first, rows| {
            normalize_rows(rows, &x[first * c..][..rows.len()], &mean, &factor, beta);
            if self.relu {
                relu_in_place(rows);
            }
        });
        out
    }

    /// `(dx, dγ, dβ)`: with x̂ = (x - mean)·inv, dβ = Σ dy, dγ = Σ dy·x̂ and
    /// dx = γ·inv·(dy - dβ/M - x̂·dγ/M).
    fn bwd_typed<T: Element>(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = self.mean.len();
        let x = x.contiguous()?;
        let gamma_v: Vec<T> = gamma.to_vec1()?;
        with_slice::<T, _>(&x, "kiln-batch-norm: x", |xs| {
            with_slice::<T, _>(grad, "kiln-batch-norm: gradient", |gs| {
                let rows = xs.len().checked_div(c).unwrap_or(0);
                // Σ dy and Σ dy·x̂ = inv · Σ dy·(x - mean), in one pass over both.
                let block = BLOCK_ROWS * c.max(1);
                let both = sum_blocks(xs.len(), 2 * c, xs.len().div_ceil(block), |i, sums| {
                    let end = ((i + 1) * block).min(xs.len());
                    let (dy, dyx) = sums.split_at_mut(c);
                    let (xr, gr) = (&xs[i * block..end], &gs[i * block..end]);
                    add_gradient_sums(dy, dyx, xr, gr, &self.mean);
                });
                let (dbeta, mut dgamma) = (both[..c].to_vec(), both[c..].to_vec());
                for (d, &i) in dgamma.iter_mut().zip(&self.inv) {
                    *d *= i;
                }
                let n = rows.max(1) as f64;
                // dx = a·dy + b·x + k per channel, with a = γ·inv, b = -a·inv·dγ/M,
                // k = -a·dβ/M - b·mean.
                let mut a = vec![T::default(); c];
                let mut bb = vec![T::default(); c];
                let mut k = vec![T::default(); c];
                let mut mean = vec![T::default(); c];
                for j in 0..c {
                    let g: f64 = gamma_v[j].into();
                    let aj = g * self.inv[j];
                    let bj = -aj * self.inv[j] * dgamma[j] / n;
                    a[j] = <T as Real>::from_f64(aj);
                    bb[j] = <T as Real>::from_f64(bj);
                    k[j] = <T as Real>::from_f64(-aj * dbeta[j] / n);
                    mean[j] = <T as Real>::from_f64(self.mean[j]);
                }
                let mut dx = vec![T::default(); xs.len()];
                by_row_blocks(&mut dx, c, |first, rows| {
                    let (xr, gr) = (
                        &xs[first * c..][..rows.len()],
                        &gs[first * c..][..rows.len()],
                    );
                    affine_gradient(rows, xr, gr, &a, &bb, &mean, &k);
                });
                let to =
                    |v: Vec<f64>| -> Vec<T> { v.into_iter().map(<T as Real>::from_f64).collect() };
                Ok((
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    Tensor::from_vec(to(dgamma), c, x.device())?,
                    Tensor::from_vec(to(dbeta), c, x.device())?,
                ))
            })
        })
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "kiln-batch-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (x, g, b) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.fwd(
                    contiguous(x, lx, "kiln-batch-norm: x")?,
                    contiguous(g, lg, "kiln-batch-norm: gamma")?,
                    contiguous(b, lb, "kiln-batch-norm: beta")?,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.fwd(
                    contiguous(x, lx, "kiln-batch-norm: x")?,
                    contiguous(g, lg, "kiln-batch-norm: gamma")?,
                    contiguous(b, lb, "kiln-batch-norm: beta")?,
                ))
            }
            _ => candle_core::bail!("kiln-batch-norm: x, gamma and beta must all be f32 or f64"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = match self.relu {
            true => relu_gradient(grad_res, res)?,
            false => grad_res.contiguous()?,
        };
        let (dx, dg, db) = match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, gamma, &grad)?,
            DType::F64 => self.bwd_typed::<f64>(x, gamma, &grad)?,
            other => candle_core::bail!("kiln-batch-norm: unsupported dtype {other:?}"),
        };
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// The gradient through a ReLU from its output `y`: `g` where `y > 0`, else 0.
fn relu_gradient(g: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    fn typed<T: Element>(g: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        with_slice::<T, _>(g, "kiln-batch-norm: gradient", |gs| {
            with_slice::<T, _>(y, "kiln-batch-norm: output", |ys| {
                let mut out = vec![T::default(); gs.len()];
                for_each_chunk(&mut out, BLOCK_ROWS * 64, |i, chunk| {
                    let first = i * BLOCK_ROWS * 64;
                    relu_mask(
                        chunk,
                        &gs[first..][..chunk.len()],
                        &ys[first..][..chunk.len()],
                    );
                });
                Tensor::from_vec(out, g.shape(), g.device())
            })
        })
    }
    let (g, y) = (g.contiguous()?, y.contiguous()?);
    match g.dtype() {
        DType::F32 => typed::<f32>(&g, &y),
        DType::F64 => typed::<f64>(&g, &y),
        other => candle_core::bail!("kiln-batch-norm: unsupported dtype {other:?}"),
    }
}

/// BatchNormalization's training pass over `x` `[.., C]` without a mask, when the CPU op
/// applies: `(y, batch mean, batch variance)`, the statistics detached; `y` through a ReLU
/// when `relu`. `gamma` and `beta` are
/// `[C]` (ones and zeros where the layer has none).
pub(crate) fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    epsilon: f64,
    relu: bool,
) -> candle_core::Result<Option<(Tensor, Tensor, Tensor)>> {
    let c = match x.dims().last() {
        Some(&c) if c > 0 && x.elem_count() > 0 => c,
        _ => return Ok(None),
    };
    if !applies(x, &[gamma, beta]) || gamma.elem_count() != c || beta.elem_count() != c {
        return Ok(None);
    }
    let x = x.contiguous()?;
    fn stats<T: Element>(x: &Tensor, c: usize) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
        with_slice::<T, _>(x, "kiln-batch-norm: x", |xs| {
            let n = (xs.len() / c) as f64;
            let mut mean = column_sums(xs, c);
            mean.iter_mut().for_each(|m| *m /= n);
            // The mean as the forward pass uses it, rounded to T, as the plain path does.
            let mean: Vec<f64> = mean
                .into_iter()
                .map(|m| <T as Real>::from_f64(m).into())
                .collect();
            let block = BLOCK_ROWS * c;
            let mut var = sum_blocks(xs.len(), c, xs.len().div_ceil(block), |i, sums| {
                let rows = &xs[i * block..];
                add_squared_deviations(sums, &rows[..rows.len().min(block)], &mean);
            });
            var.iter_mut().for_each(|v| *v /= n);
            Ok((mean, var))
        })
    }
    let (mean, var) = match x.dtype() {
        DType::F32 => stats::<f32>(&x, c)?,
        _ => stats::<f64>(&x, c)?,
    };
    let inv: Vec<f64> = var.iter().map(|&v| 1.0 / (v + epsilon).sqrt()).collect();
    let (dtype, device) = (x.dtype(), x.device().clone());
    let mean_t = Tensor::from_vec(mean.clone(), c, &device)?.to_dtype(dtype)?;
    let var_t = Tensor::from_vec(var, c, &device)?.to_dtype(dtype)?;
    let y = x.apply_op3(gamma, beta, BatchNormTrain { mean, inv, relu })?;
    Ok(Some((y, mean_t, var_t)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64, dtype: DType) -> Var {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 4.0 - 1.5).collect();
        Var::from_tensor(
            &Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .max(1.0);
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            / scale
    }

    const SHAPES: &[&[usize]] = &[
        &[1, 1],
        &[3, 1],
        &[1, 5],
        &[7, 17],
        &[2, 5, 3, 33],
        &[4, 26, 26, 32],
        &[5, 50, 51, 3],
        &[300, 3],
    ];

    /// The bias add and its gradients equal `broadcast_add`'s, on odd shapes too.
    #[test]
    fn bias_add_matches_broadcast_add() {
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            for (i, shape) in SHAPES.iter().enumerate() {
                let x = random(shape, i as u64, dtype);
                let b = random(&shape[shape.len() - 1..], 100 + i as u64, dtype);
                let w = random(shape, 200 + i as u64, dtype);
                let fast = bias_add(x.as_tensor(), b.as_tensor()).unwrap();
                let plain = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
                assert!(max_diff(&fast, &plain) < tol, "{shape:?}");
                let gf = (fast * w.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let gp = (plain * w.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for v in [&x, &b] {
                    let (f, p) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                    assert!(max_diff(f, p) < tol, "{shape:?} {dtype:?}");
                }
            }
        }
    }

    /// The plain candle BatchNormalization training pass, as the layer computes it otherwise.
    fn plain_bn(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
        let c = x.dims()[x.rank() - 1];
        let flat = x.reshape(((), c)).unwrap();
        let mean = flat.mean_keepdim(0).unwrap();
        let var = flat
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .mean(0)
            .unwrap();
        let mean = mean.squeeze(0).unwrap();
        let inv = (&var + eps).unwrap().sqrt().unwrap().recip().unwrap();
        let factor = (inv * g).unwrap();
        let y = x
            .broadcast_sub(&mean)
            .unwrap()
            .broadcast_mul(&factor)
            .unwrap()
            .broadcast_add(b)
            .unwrap();
        (y, mean, var)
    }

    /// The fused pass gives the plain pass's output, statistics and gradients, alone and with
    /// the ReLU of a following layer.
    #[test]
    fn batch_norm_matches_the_plain_graph() {
        for relu in [false, true] {
            for dtype in [DType::F32, DType::F64] {
                batch_norm_cases(dtype, relu);
            }
        }
    }

    fn batch_norm_cases(dtype: DType, relu: bool) {
        let tol = if dtype == DType::F32 { 2e-4 } else { 1e-10 };
        for (i, shape) in SHAPES.iter().enumerate() {
            if shape[..shape.len() - 1].iter().product::<usize>() < 2 {
                continue; // one row: the variance is 0 and dx is rounding noise
            }
            let c = shape[shape.len() - 1];
            let x = random(shape, i as u64, dtype);
            let g = random(&[c], 100 + i as u64, dtype);
            let b = random(&[c], 300 + i as u64, dtype);
            let w = random(shape, 200 + i as u64, dtype);
            let (fy, fm, fv) =
                batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-3, relu)
                    .unwrap()
                    .unwrap();
            let (py, pm, pv) = plain_bn(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-3);
            // The plain ReLU keeps the fused pass's mask: outputs within rounding of 0 could
            // fall on either side, and their gradients with them.
            let py = match relu {
                true => {
                    assert!(max_diff(&fy, &py.relu().unwrap()) < tol, "{shape:?}");
                    let kept = fy.gt(0.0).unwrap().to_dtype(dtype).unwrap();
                    (py * kept).unwrap()
                }
                false => py,
            };
            assert!(max_diff(&fy, &py) < tol, "{shape:?}");
            assert!(max_diff(&fm, &pm) < tol, "{shape:?}");
            assert!(max_diff(&fv, &pv) < tol, "{shape:?}");
            if relu {
                // Both signs occur, so the ReLU's mask is exercised.
                let kept = fy.gt(0.0).unwrap().to_dtype(DType::F64).unwrap();
                let share = kept.mean_all().unwrap().to_scalar::<f64>().unwrap();
                assert!(
                    fy.elem_count() < 4 || (0.0..1.0).contains(&share),
                    "{shape:?}"
                );
            }
            // A loss that is not just Σy (whose dx is 0).
            let gf = (fy * w.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (py * w.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &g, &b] {
                let (f, p) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                assert!(
                    max_diff(f, p) < tol,
                    "{shape:?} {dtype:?} relu {relu}: {}",
                    max_diff(f, p)
                );
            }
        }
    }
}
