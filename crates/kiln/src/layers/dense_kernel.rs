//! The Dense layer as one fused CPU kernel with its own backward: the bias is written into the
//! output first and the matrix product accumulates onto it (no broadcast pass), ReLU is applied
//! in the same buffer, and the backward pass produces dX, dW and db directly instead of
//! differentiating three separate graph nodes. The products read transposes in place, run on
//! all cores (split by output columns or by `gemm` itself, whichever measured faster for the
//! layout; a layer's dX and dW side by side), skip dX when the input needs no gradient, and
//! hand dW and db to the training step ([`crate::gradients`]), accumulating onto earlier ones.

use crate::activations::Activation;
use crate::cpu::{contiguous, vectorized, Real};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

/// `activation(x · w + b)` for 2-D `x`, with `activation` linear or ReLU.
pub(crate) struct FusedDense {
    pub(crate) relu: bool,
}

impl FusedDense {
    /// The fused op, when it applies: CPU, f32 or f64, 2-D contiguous input, a bias, and a
    /// linear or ReLU activation.
    pub(crate) fn for_call(
        x: &Tensor,
        kernel: &Tensor,
        bias: Option<&Tensor>,
        activation: Activation,
    ) -> Option<Self> {
        let relu = match activation {
            Activation::Relu => true,
            Activation::Linear => false,
            _ => return None,
        };
        let bias = bias?;
        let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().is_cpu() && t.is_contiguous();
        let ok = matches!(x.dtype(), DType::F32 | DType::F64)
            && x.device().is_cpu()
            && x.rank() == 2
            && x.is_contiguous()
            && same(kernel)
            && same(bias);
        ok.then_some(Self { relu })
    }
}

/// The element types the kernel runs on.
pub(crate) trait Element: WithDType + Real + std::ops::AddAssign {
    const ONE: Self;
}
impl Element for f32 {
    const ONE: Self = 1.0;
}
impl Element for f64 {
    const ONE: Self = 1.0;
}

/// A matrix operand: its first element and its row and column strides, in elements.
#[derive(Clone, Copy)]
pub(crate) struct Operand<T> {
    ptr: *const T,
    row_stride: usize,
    col_stride: usize,
}

impl<T> Operand<T> {
    /// A row-major `rows × cols` matrix.
    pub(crate) fn rows(v: &[T], cols: usize) -> Self {
        Self {
            ptr: v.as_ptr(),
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns, read in place.
    pub(crate) fn transposed(v: &[T], cols: usize) -> Self {
        Self {
            ptr: v.as_ptr(),
            row_stride: 1,
            col_stride: cols,
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread, and a layer's dX and dW
/// one after the other: waking the pool costs more than it saves (a 128×512·512×10 product ran
/// at 65 GFLOP/s on one thread, 34 on two).
const PARALLEL_MIN_MACS: usize = 1 << 21;

/// `dst (m×n, row-major) = lhs · rhs`, or `dst += lhs · rhs` with `accumulate`, on up to
/// `threads` threads.
///
/// # Safety
/// `lhs` must address `m×k` readable elements and `rhs` `k×n` with their strides, and `dst`
/// must hold `m×n` elements (initialized when `accumulate`).
pub(crate) unsafe fn product<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: dst holds m×n elements; all-zero bits are 0.0.
            unsafe { std::ptr::write_bytes(dst, 0, m * n) };
        }
        return;
    }
    let parallel = threads > 1 && m * n * k >= PARALLEL_MIN_MACS;
    if parallel && lhs.row_stride != 1 && n >= 2 * COLUMN_BLOCK {
        // SAFETY: as for this function; the pieces write disjoint columns of `dst`.
        unsafe { product_by_columns((m, n, k), dst, accumulate, lhs, rhs, threads) };
        return;
    }
    // SAFETY: the caller guarantees the extents; strides fit in isize for any allocation.
    unsafe {
        gemm_call(
            (m, n, k),
            (dst, n, 1),
            accumulate,
            lhs,
            rhs,
            gemm_threads(parallel, threads),
        )
    };
}

/// `dst (m×n, column-major) = lhs · rhs`, or `+=` with `accumulate`, on the calling thread.
/// `gemm`'s kernels write columns of the output and read the left operand by columns, so with
/// a column-major left operand and a narrow output (at most 48 columns) it packs neither
/// operand: for the products a recurrent layer makes at every step, whose operands are a
/// kernel read in place and a few rows of states (packing had been 22% of an LSTM step).
///
/// # Safety
/// As for [`product`], with `dst` holding `m×n` elements at column stride `m`.
pub(crate) unsafe fn product_column_major<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: dst holds m×n elements; all-zero bits are 0.0.
            unsafe { std::ptr::write_bytes(dst, 0, m * n) };
        }
        return;
    }
    // SAFETY: the caller guarantees the extents.
    unsafe {
        gemm_call(
            (m, n, k),
            (dst, 1, m),
            accumulate,
            lhs,
            rhs,
            gemm::Parallelism::None,
        )
    };
}

/// `gemm`'s threading for a product: its own split on `threads` threads when `parallel`, unless
/// kiln's kernels must stay on this thread. `gemm` splits the output only, never the sum, so the
/// result is the same either way.
fn gemm_threads(parallel: bool, threads: usize) -> gemm::Parallelism {
    match parallel && crate::runtime::parallel_now() {
        true => gemm::Parallelism::Rayon(threads),
        false => gemm::Parallelism::None,
    }
}

/// Products with a dimension at most this small (a 10-class output layer) keep `gemm`'s
/// row-major output even with a transposed right operand: there is too little to pack.
const SKINNY: usize = 16;

/// Output columns per piece are a multiple of this (the matrix kernels' register width).
const COLUMN_BLOCK: usize = 16;

/// `product`, split by output columns into one single-threaded product per thread. Measured on
/// 2 cores against `gemm`'s own threading: 128×784·784×512 (forward) went from 218–262 to
/// 279–286 GFLOP/s; products whose left operand is read transposed (dW) lose, and keep
/// `gemm`'s split.
///
/// # Safety
/// As for [`product`].
unsafe fn product_by_columns<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    threads: usize,
) {
    /// A pointer that may cross to the pool's threads: each piece touches its own columns.
    #[derive(Clone, Copy)]
    struct Shared<P>(P);
    // SAFETY: the pieces read shared operands and write disjoint columns of `dst`.
    unsafe impl<P> Send for Shared<P> {}
    // SAFETY: as above; the wrapped value is only copied out.
    unsafe impl<P> Sync for Shared<P> {}
    let width = n.div_ceil(threads).next_multiple_of(COLUMN_BLOCK);
    let (dst, lhs, rhs) = (Shared(dst), Shared(lhs), Shared(rhs));
    let piece = move |first: usize| {
        // Bind the wrappers whole, so that the closure captures them and not their fields.
        let (dst, lhs, rhs) = (dst, lhs, rhs);
        let (lhs, rhs) = (lhs.0, rhs.0);
        let cols = width.min(n - first);
        // SAFETY: column `first` of dst and of rhs lie inside their matrices.
        let (dst, rhs) = unsafe {
            (
                dst.0.add(first),
                Operand {
                    ptr: rhs.ptr.add(first * rhs.col_stride),
                    ..rhs
                },
            )
        };
        // SAFETY: an m×cols block of dst (row stride n) and a k×cols block of rhs.
        unsafe {
            gemm_call(
                (m, cols, k),
                (dst, n, 1),
                accumulate,
                lhs,
                rhs,
                gemm::Parallelism::None,
            )
        };
    };
    // The same pieces either way: `gemm` sums in an order that depends on a call's shape.
    if !crate::runtime::parallel_now() {
        (0..n).step_by(width).for_each(piece);
    } else {
        rayon::scope(|scope| {
            for first in (0..n).step_by(width) {
                scope.spawn(move |_| piece(first));
            }
        });
    }
}

/// One `gemm` call: `dst (m×n, row stride dst.1, column stride dst.2) (+)= lhs · rhs`.
///
/// # Safety
/// As for [`product`], with `dst`'s elements at those strides.
unsafe fn gemm_call<T: Element>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_row_stride, dst_col_stride): (*mut T, usize, usize),
    accumulate: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller guarantees the extents; strides fit in isize for any allocation.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A fresh `m×n` matrix holding `lhs · rhs` (on up to `threads` threads), written by the
/// product without a zero-fill.
pub(crate) fn product_new<T: Element>(
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    threads: usize,
) -> Vec<T> {
    if rhs.row_stride == 1 && m.min(n).min(k) > SKINNY {
        // A right operand read transposed (the kernel, for dX): `gemm` packs it with strided
        // reads when it writes the output by rows, but reads it in place when it writes the
        // output by columns, and the output is the smaller matrix to transpose afterwards
        // (128×512·512×784 on 2 cores: 130 GFLOP/s by rows, 277 by columns).
        let parallelism = gemm_threads(threads > 1 && m * n * k >= PARALLEL_MIN_MACS, threads);
        let mut by_columns: Vec<T> = Vec::with_capacity(m * n);
        // SAFETY: `by_columns` has room for m×n elements, written column by column (column
        // stride m) by the product, which reads none of them; lhs and rhs are as the caller
        // guarantees.
        unsafe {
            gemm_call(
                (m, n, k),
                (by_columns.as_mut_ptr(), 1, m),
                false,
                lhs,
                rhs,
                parallelism,
            );
            by_columns.set_len(m * n);
        }
        return crate::cpu::transpose(&by_columns, n, m, threads);
    }
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: `out` has room for m×n elements; with `accumulate` off the product writes every
    // one of them (zeros when k = 0) before `set_len` exposes them, and reads none.
    unsafe {
        product((m, n, k), out.as_mut_ptr(), false, lhs, rhs, threads);
        out.set_len(m * n);
    }
    out
}

/// `out[i, :] = b; out += x · w; relu`, with `x: m×k`, `w: k×n`.
fn forward<T: Element>(
    x: &[T],
    w: &[T],
    b: &[T],
    m: usize,
    k: usize,
    n: usize,
    relu: bool,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    for _ in 0..m {
        out.extend_from_slice(b);
    }
    // SAFETY: x is m×k, w is k×n and out m×n (initialized), all row-major.
    unsafe {
        product(
            (m, n, k),
            out.as_mut_ptr(),
            true,
            Operand::rows(x, k),
            Operand::rows(w, n),
            crate::runtime::matmul_threads(),
        );
    }
    if relu {
        relu_in_place(&mut out);
    }
    out
}

vectorized! {
    /// `v = 0` where `v < 0` (NaN stays NaN, as Keras' ReLU).
    pub(crate) fn relu_in_place<T>(out: &mut [T]) {
        let zero = T::default();
        for v in out.iter_mut() {
            *v = if *v < zero { zero } else { *v };
        }
    }
}

vectorized! {
    /// `dz = g` where the ReLU output is positive, else 0.
    pub(crate) fn relu_mask<T>(dz: &mut [T], g: &[T], out: &[T]) {
        let zero = T::default();
        for ((d, &g), &y) in dz.iter_mut().zip(g).zip(out) {
            *d = if y > zero { g } else { zero };
        }
    }
}

/// A parameter's gradient, written by `compute(dst, accumulate)` (dst holds `len` elements,
/// initialized when `accumulate`): added straight into the gradient already handed over for
/// the parameter when there is one (then `None`), else computed into fresh memory and handed
/// over, or returned for candle's store.
pub(crate) fn parameter_gradient<T: Element>(
    param: &Tensor,
    compute: impl Fn(*mut T, bool),
) -> candle_core::Result<Option<Tensor>> {
    if crate::gradients::add_into_handed_over::<T>(param, |g| compute(g.as_mut_ptr(), true))? {
        return Ok(None);
    }
    let len = param.elem_count();
    let mut fresh: Vec<T> = Vec::with_capacity(len);
    compute(fresh.as_mut_ptr(), false);
    // SAFETY: `compute` wrote all `len` elements (it must, when not accumulating).
    unsafe { fresh.set_len(len) };
    crate::gradients::hand_over(
        param,
        Tensor::from_vec(fresh, param.shape(), param.device())?,
    )
}

/// `dst (+)= Σ_rows v` for a row-major `v` with `n` columns: the bias gradient.
fn column_sums<T: Element>(v: &[T], n: usize, dst: *mut T, accumulate: bool) {
    let mut sums = vec![T::default(); n];
    for row in v.chunks_exact(n.max(1)) {
        for (s, &x) in sums.iter_mut().zip(row) {
            *s += x;
        }
    }
    for (j, s) in sums.into_iter().enumerate() {
        // SAFETY: the caller's dst holds n elements.
        unsafe {
            let d = dst.add(j);
            *d = if accumulate { *d + s } else { s };
        }
    }
}

impl FusedDense {
    /// dZ = dY masked by ReLU' (0 where the output is 0, as Keras), then dX = dZ·wᵀ,
    /// dW = xᵀ·dZ and db = Σ_batch dZ, each only when wanted; the products read the transposes
    /// in place, and dW and db accumulate onto gradients already handed over in the same step.
    fn backward_typed<T: Element>(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::cpu::with_slice;
        let (m, k) = x.dims2()?;
        let n = w.dim(1)?;
        let relu = self.relu;
        with_slice::<T, _>(x, "kiln-dense: x", |xs| {
            with_slice::<T, _>(w, "kiln-dense: kernel", |ws| {
                with_slice::<T, _>(res, "kiln-dense: output", |out| {
                    with_slice::<T, _>(grad, "kiln-dense: output gradient", |g| {
                        let masked: Vec<T>;
                        let dz: &[T] = if relu {
                            let mut dz = vec![T::default(); g.len()];
                            relu_mask(&mut dz, g, out);
                            masked = dz;
                            &masked
                        } else {
                            g
                        };
                        let want_dx = x.track_op();
                        let want_dw = crate::gradients::wanted(w);
                        let want_db = crate::gradients::wanted(b);
                        let dx_product = |threads: usize| {
                            want_dx.then(|| {
                                product_new(
                                    (m, k, n),
                                    Operand::rows(dz, n),
                                    Operand::transposed(ws, n),
                                    threads,
                                )
                            })
                        };
                        // dW and db accumulate onto gradients handed over on this thread, so
                        // they run here (rayon's `join`, called on a pool thread, runs its first
                        // closure on the caller).
                        let parameters = |threads: usize| -> candle_core::Result<_> {
                            let dw = match want_dw {
                                // SAFETY: dst holds k×n elements; xᵀ is k×m and dZ m×n.
                                true => parameter_gradient::<T>(w, |dst, accumulate| unsafe {
                                    product(
                                        (k, n, m),
                                        dst,
                                        accumulate,
                                        Operand::transposed(xs, k),
                                        Operand::rows(dz, n),
                                        threads,
                                    )
                                })?,
                                false => None,
                            };
                            let db = match want_db {
                                true => parameter_gradient::<T>(b, |dst, accumulate| {
                                    column_sums(dz, n, dst, accumulate)
                                })?,
                                false => None,
                            };
                            Ok((dw, db))
                        };
                        // dX and dW side by side, each on half the threads (one core each on
                        // two): two products of these sizes scale better apart than each split
                        // across all cores (a 512-wide layer on 2 cores: 405 µs against 530 in
                        // isolation; W2 +6%). At once only on a pool thread, where `join` keeps
                        // the parameters' closure on this thread and its hand-over.
                        let threads = crate::runtime::matmul_threads();
                        let apart =
                            want_dx && want_dw && threads > 1 && m * n * k >= PARALLEL_MIN_MACS;
                        let ((dw, db), dx) = if apart {
                            let half = threads / 2;
                            // Split the same way whether or not the halves run at once.
                            let together = rayon::current_thread_index().is_some()
                                && crate::runtime::parallel_now();
                            match together {
                                true => {
                                    let (parameters, dx) = rayon::join(
                                        || parameters(half),
                                        || dx_product(threads - half),
                                    );
                                    (parameters?, dx)
                                }
                                false => (parameters(half)?, dx_product(threads - half)),
                            }
                        } else {
                            (parameters(threads)?, dx_product(threads))
                        };
                        // An input that is a variable (the inputs of an adversarial step)
                        // gets its gradient handed over too, sparing candle's zero-filled copy.
                        let dx = match dx {
                            Some(dx) => crate::gradients::hand_over(
                                x,
                                Tensor::from_vec(dx, (m, k), x.device())?,
                            )?,
                            None => None,
                        };
                        Ok((dx, dw, db))
                    })
                })
            })
        })
    }
}

impl CustomOp3 for FusedDense {
    fn name(&self) -> &'static str {
        "kiln-dense"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (k2, n) = lw.shape().dims2()?;
        if k != k2 || lb.shape().dims() != [n] {
            candle_core::bail!(
                "kiln-dense: shapes {:?} · {:?} + {:?} do not fit",
                lx.shape(),
                lw.shape(),
                lb.shape()
            );
        }
        let out = match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(forward(
                    contiguous(x, lx, "kiln-dense: x")?,
                    contiguous(w, lw, "kiln-dense: kernel")?,
                    contiguous(b, lb, "kiln-dense: bias")?,
                    m,
                    k,
                    n,
                    self.relu,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(forward(
                    contiguous(x, lx, "kiln-dense: x")?,
                    contiguous(w, lw, "kiln-dense: kernel")?,
                    contiguous(b, lb, "kiln-dense: bias")?,
                    m,
                    k,
                    n,
                    self.relu,
                ))
            }
            _ => candle_core::bail!("kiln-dense: x, kernel and bias must all be f32 or all f64"),
        };
        Ok((out, Shape::from((m, n))))
    }

    /// dX, dW and db straight from the matrix kernels; the parameter gradients go to
    /// [`crate::gradients`] when a training step is collecting them.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        match x.dtype() {
            DType::F32 => self.backward_typed::<f32>(&x, &w, b, res, &grad),
            DType::F64 => self.backward_typed::<f64>(&x, &w, b, res, &grad),
            other => candle_core::bail!("kiln-dense: unsupported dtype {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn grads_of(y: &Tensor, vars: &[&Var]) -> Vec<Vec<f64>> {
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        vars.iter()
            .map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    }

    /// Inside a training step's backward pass the kernel hands its parameter gradients over
    /// directly; they must add up with candle's own (a shared layer used twice, a penalty on
    /// the kernel) to exactly the gradients of the ordinary backward pass. With only the inputs
    /// wanted, the input gradient is unchanged and no parameter gradient is produced.
    #[test]
    fn handed_over_gradients_equal_the_ordinary_ones() {
        // Small, and large enough that a layer's dX and dW run side by side on kiln's pool.
        for (m, k) in [(6, 4), (160, 200)] {
            shared_layer_gradients_are_handed_over(m, k);
        }
    }

    fn shared_layer_gradients_are_handed_over(m: usize, k: usize) {
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (m, k), &d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (k, k), &d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, k, &d).unwrap()).unwrap();
        let layer = |input: &Tensor| {
            let op =
                FusedDense::for_call(input, w.as_tensor(), Some(b.as_tensor()), Activation::Relu)
                    .expect("fused path applies");
            input.apply_op3(w.as_tensor(), b.as_tensor(), op).unwrap()
        };
        let y = layer(&layer(x.as_tensor()));
        use crate::regularizers::Regularizer;
        let penalty = crate::regularizers::L1L2::new(0.05, 0.1)
            .penalty(w.as_tensor())
            .unwrap();
        let loss = (y.sqr().unwrap().sum_all().unwrap() + penalty).unwrap();
        let ordinary = loss.backward().unwrap();
        // As a training step runs it: on kiln's pool, where the second use of the layer adds
        // its dW onto the first one's while its dX is computed beside it.
        let mut handed = crate::runtime::on_matmul_pool(|| {
            let mut handed = crate::gradients::Gradients::default();
            handed.backward(&loss).unwrap();
            handed
        });
        for t in [w.as_tensor(), b.as_tensor()] {
            assert!(!handed.in_candle_store(t), "{m}×{k}: not handed over");
        }
        for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
            let a: Vec<f64> = ordinary
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let h: Vec<f64> = handed
                .take(t)
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a.len(), h.len());
            for (a, h) in a.iter().zip(&h) {
                assert!(
                    (a - h).abs() < 1e-10 * (1.0 + a.abs()),
                    "gradient {a} vs {h}"
                );
            }
        }
        let inputs_only =
            crate::gradients::backward_for_inputs(&y.sqr().unwrap().sum_all().unwrap()).unwrap();
        assert!(inputs_only.get(w.as_tensor()).is_none());
        assert!(inputs_only.get(b.as_tensor()).is_none());
        let full = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (a, h): (Vec<f64>, Vec<f64>) = (
            full.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            inputs_only
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
        );
        assert_eq!(a, h);
    }

    /// The fused kernel gives the values and gradients of matmul + bias + ReLU as separate ops.
    #[test]
    fn fused_dense_matches_the_unfused_graph() {
        let d = Device::Cpu;
        // A small case (one thread), and one large enough to be split across threads, by
        // columns into uneven pieces (200 = 112 + 88) or by gemm itself.
        // In f32 as well: its transposes take the AVX-512 path, and 37, 45 and 29 leave
        // remainders after every 16-lane block.
        use candle_core::DType::{F32, F64};
        let cases = [
            (5, 3, 4, true, F64),
            (5, 3, 4, false, F64),
            (64, 300, 200, true, F64),
            (64, 300, 200, false, F64),
            (64, 300, 200, true, F32),
            (37, 45, 29, false, F32),
            (37, 45, 29, true, F64),
        ];
        for (m, k, n, relu, dtype) in cases {
            let random = |shape: &[usize]| {
                let t = Tensor::randn(0f64, 1.0, shape, &d).unwrap();
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
            };
            let (x, w, b) = (random(&[m, k]), random(&[k, n]), random(&[n]));
            let act = if relu {
                Activation::Relu
            } else {
                Activation::Linear
            };
            let op = FusedDense::for_call(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), act)
                .expect("fused path applies");
            let fused = x
                .as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), op)
                .unwrap();
            let plain = act
                .apply(
                    &x.as_tensor()
                        .matmul(w.as_tensor())
                        .unwrap()
                        .broadcast_add(b.as_tensor())
                        .unwrap(),
                )
                .unwrap();
            let values =
                |t: &Tensor| -> Vec<Vec<f64>> { t.to_dtype(F64).unwrap().to_vec2().unwrap() };
            let (fv, pv) = (values(&fused), values(&plain));
            let tolerance = if dtype == F64 { 1e-12 } else { 1e-4 };
            let close = |a: f64, b: f64| (a - b).abs() <= tolerance * (1.0 + b.abs());
            for (a, b) in fv.iter().flatten().zip(pv.iter().flatten()) {
                assert!(close(*a, *b), "value {a} vs {b}");
            }
            let (gf, gp) = (
                grads_of(&fused, &[&x, &w, &b]),
                grads_of(&plain, &[&x, &w, &b]),
            );
            for (g, p) in gf.iter().zip(&gp) {
                assert_eq!(g.len(), p.len());
                for (a, b) in g.iter().zip(p) {
                    assert!(close(*a, *b), "gradient {a} vs {b}");
                }
            }
        }
    }

    /// Degenerate shapes (no input features, no rows) give empty or zero gradients, not panics.
    #[test]
    fn empty_shapes_have_empty_gradients() {
        let d = Device::Cpu;
        for (m, k, n) in [(32, 0, 4), (0, 8, 4), (32, 0, 40), (0, 40, 40)] {
            let x = Var::from_tensor(&Tensor::zeros((m, k), candle_core::DType::F32, &d).unwrap())
                .unwrap();
            let w = Var::from_tensor(&Tensor::ones((k, n), candle_core::DType::F32, &d).unwrap())
                .unwrap();
            let b =
                Var::from_tensor(&Tensor::ones(n, candle_core::DType::F32, &d).unwrap()).unwrap();
            let op = FusedDense::for_call(
                x.as_tensor(),
                w.as_tensor(),
                Some(b.as_tensor()),
                Activation::Linear,
            )
            .expect("fused path applies");
            let y = x
                .as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), op)
                .unwrap();
            assert_eq!(y.dims(), &[m, n]);
            let g = y.sum_all().unwrap().backward().unwrap();
            assert_eq!(g.get(w.as_tensor()).unwrap().dims(), &[k, n]);
            let db: Vec<f32> = g.get(b.as_tensor()).unwrap().to_vec1().unwrap();
            assert_eq!(db, vec![m as f32; n]);
        }
    }
}
