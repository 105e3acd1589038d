//! The Dense layer as one fused CPU kernel with its own backward: the bias is written into the
//! output first and the matrix product accumulates onto it (no broadcast pass), ReLU is applied
//! in the same buffer, and the backward pass produces dX, dW and db directly instead of
//! differentiating three separate graph nodes. The products read transposes in place, run on
//! all cores (split by output columns or by `gemm` itself, whichever measured faster for the
//! layout), skip `gemm` for skinny shapes, skip dX when the input needs no gradient, and hand
//! dW and db to the training step ([`crate::gradients`]), accumulating onto earlier ones.

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
trait Element: WithDType + Real + std::ops::AddAssign {
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
struct Operand<T> {
    ptr: *const T,
    row_stride: usize,
    col_stride: usize,
}

impl<T> Operand<T> {
    /// A row-major `rows × cols` matrix.
    fn rows(v: &[T], cols: usize) -> Self {
        Self {
            ptr: v.as_ptr(),
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns, read in place.
    fn transposed(v: &[T], cols: usize) -> Self {
        Self {
            ptr: v.as_ptr(),
            row_stride: 1,
            col_stride: cols,
        }
    }
    /// The element at row `i`, column `j`.
    ///
    /// # Safety
    /// `(i, j)` must lie inside the matrix.
    unsafe fn at(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        // SAFETY: the caller keeps (i, j) inside the matrix.
        unsafe { *self.ptr.add(i * self.row_stride + j * self.col_stride) }
    }
}

/// Below this many multiply-adds a product runs on the calling thread: waking the pool costs
/// more than it saves (a 128×512·512×10 product ran at 65 GFLOP/s on one thread, 34 on two).
const PARALLEL_MIN_MACS: usize = 1 << 21;

/// `dst (m×n, row-major) = lhs · rhs`, or `dst += lhs · rhs` with `accumulate`.
///
/// # Safety
/// `lhs` must address `m×k` readable elements and `rhs` `k×n` with their strides, and `dst`
/// must hold `m×n` elements (initialized when `accumulate`).
unsafe fn product<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
) {
    let threads = crate::runtime::matmul_threads();
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
    // SAFETY: as for this function.
    if !parallel && unsafe { skinny_product((m, n, k), dst, accumulate, lhs, rhs) } {
        return;
    }
    if parallel && lhs.row_stride != 1 && n >= 2 * COLUMN_BLOCK {
        // SAFETY: as for this function; the pieces write disjoint columns of `dst`.
        unsafe { product_by_columns((m, n, k), dst, accumulate, lhs, rhs, threads) };
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller guarantees the extents; strides fit in isize for any allocation.
    unsafe { gemm_call((m, n, k), (dst, n), accumulate, lhs, rhs, parallelism) };
}

/// Products with an output or inner dimension at most this wide (a 10-class output layer)
/// skip `gemm`: its packing costs more than their arithmetic (128×512·512×10 ran at 21
/// GFLOP/s there).
const SKINNY: usize = 16;

vectorized! {
    /// `*out = Σ a·b`, in lanes the compiler can vectorize.
    fn dot<T>(a: &[T], b: &[T], out: &mut T) {
        const LANES: usize = 16;
        let mut lanes = [T::default(); LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for ((s, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
                *s = *s + x * y;
            }
        }
        for ((s, &x), &y) in lanes.iter_mut().zip(ra).zip(rb) {
            *s = *s + x * y;
        }
        *out = lanes.iter().fold(T::default(), |acc, &v| acc + v);
    }
}

vectorized! {
    /// `y += a·x`.
    fn axpy<T>(y: &mut [T], a: T, x: &[T]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = *y + a * x;
        }
    }
}

/// `product` for skinny shapes, on the calling thread; false (nothing written) when the shape
/// or the operands' layout is not one it handles.
///
/// # Safety
/// As for [`product`].
unsafe fn skinny_product<T: Element>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
) -> bool {
    // SAFETY: dst holds m×n elements (initialized when accumulating); every write below
    // stays inside it and every read of an operand inside its extent.
    let write = |i: usize, j: usize, v: T| unsafe {
        let d = dst.add(i * n + j);
        *d = if accumulate { *d + v } else { v };
    };
    if n <= SKINNY && k > SKINNY {
        // The right operand's columns, contiguous: n·k elements, few.
        let bt: Vec<T> = (0..n)
            .flat_map(|j| (0..k).map(move |p| (j, p)))
            .map(|(j, p)| unsafe { rhs.at(p, j) })
            .collect();
        if lhs.col_stride == 1 {
            // Rows of lhs are contiguous: one dot product per output.
            for i in 0..m {
                // SAFETY: row i of lhs holds k contiguous elements.
                let row = unsafe { std::slice::from_raw_parts(lhs.ptr.add(i * lhs.row_stride), k) };
                for (j, col) in bt.chunks_exact(k).enumerate() {
                    let mut v = T::default();
                    dot(row, col, &mut v);
                    write(i, j, v);
                }
            }
            return true;
        }
        if lhs.row_stride == 1 {
            // Columns of lhs are contiguous: build the output's transpose by columns.
            let mut ct = vec![T::default(); n * m];
            for p in 0..k {
                // SAFETY: column p of lhs holds m contiguous elements.
                let col = unsafe { std::slice::from_raw_parts(lhs.ptr.add(p * lhs.col_stride), m) };
                for (j, out) in ct.chunks_exact_mut(m).enumerate() {
                    axpy(out, bt[j * k + p], col);
                }
            }
            for i in 0..m {
                for j in 0..n {
                    write(i, j, ct[j * m + i]);
                }
            }
            return true;
        }
        return false;
    }
    if k <= SKINNY && n > SKINNY {
        // The right operand's rows, contiguous: k·n elements, few.
        let b: Vec<T> = (0..k)
            .flat_map(|p| (0..n).map(move |j| (p, j)))
            .map(|(p, j)| unsafe { rhs.at(p, j) })
            .collect();
        for i in 0..m {
            if !accumulate {
                // SAFETY: row i of dst holds n elements; all-zero bits are 0.0.
                unsafe { std::ptr::write_bytes(dst.add(i * n), 0, n) };
            }
            // SAFETY: row i of dst holds n contiguous, now initialized elements.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.add(i * n), n) };
            for (p, row) in b.chunks_exact(n).enumerate() {
                // SAFETY: (i, p) lies inside lhs.
                axpy(out, unsafe { lhs.at(i, p) }, row);
            }
        }
        return true;
    }
    false
}

/// Output columns per piece are a multiple of this (the matrix kernels' register width).
const COLUMN_BLOCK: usize = 16;

/// `product`, split by output columns into one single-threaded product per thread. Measured on
/// 2 cores against `gemm`'s own threading: 128×512·512×784 with the right operand read
/// transposed (dX) went from 146 to 232 GFLOP/s, 128×784·784×512 (forward) from 218–262 to
/// 279–286; products whose left operand is read transposed (dW) lose, and keep `gemm`'s
/// split.
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
    rayon::scope(|scope| {
        for first in (0..n).step_by(width) {
            let cols = width.min(n - first);
            scope.spawn(move |_| {
                // Bind the wrappers whole, so that the closure captures them and not their fields.
                let (dst, lhs, rhs) = (dst, lhs, rhs);
                let (lhs, rhs) = (lhs.0, rhs.0);
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
                        (dst, n),
                        accumulate,
                        lhs,
                        rhs,
                        gemm::Parallelism::None,
                    )
                };
            });
        }
    });
}

/// One `gemm` call: `dst (m×n, row stride dst.1) (+)= lhs · rhs`.
///
/// # Safety
/// As for [`product`], with `dst` rows `dst.1` elements apart.
unsafe fn gemm_call<T: Element>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_row_stride): (*mut T, usize),
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
            1,
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

/// A fresh `m×n` matrix holding `lhs · rhs`, written by the product without a zero-fill.
fn product_new<T: Element>(
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: `out` has room for m×n elements; with `accumulate` off the product writes every
    // one of them (zeros when k = 0) before `set_len` exposes them, and reads none.
    unsafe {
        product((m, n, k), out.as_mut_ptr(), false, lhs, rhs);
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
        );
    }
    if relu {
        relu_in_place(&mut out);
    }
    out
}

vectorized! {
    /// `v = 0` where `v < 0` (NaN stays NaN, as Keras' ReLU).
    fn relu_in_place<T>(out: &mut [T]) {
        let zero = T::default();
        for v in out.iter_mut() {
            *v = if *v < zero { zero } else { *v };
        }
    }
}

vectorized! {
    /// `dz = g` where the ReLU output is positive, else 0.
    fn relu_mask<T>(dz: &mut [T], g: &[T], out: &[T]) {
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
fn parameter_gradient<T: Element>(
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
                        // An input that is a variable (the inputs of an adversarial step)
                        // gets its gradient handed over too, sparing candle's zero-filled copy.
                        let dx = match x.track_op() {
                            true => crate::gradients::hand_over(
                                x,
                                Tensor::from_vec(
                                    product_new(
                                        (m, k, n),
                                        Operand::rows(dz, n),
                                        Operand::transposed(ws, n),
                                    ),
                                    (m, k),
                                    x.device(),
                                )?,
                            )?,
                            false => None,
                        };
                        let dw = match crate::gradients::wanted(w) {
                            // SAFETY: dst holds k×n elements; xᵀ is k×m and dZ m×n.
                            true => parameter_gradient::<T>(w, |dst, accumulate| unsafe {
                                product(
                                    (k, n, m),
                                    dst,
                                    accumulate,
                                    Operand::transposed(xs, k),
                                    Operand::rows(dz, n),
                                )
                            })?,
                            false => None,
                        };
                        let db = match crate::gradients::wanted(b) {
                            true => parameter_gradient::<T>(b, |dst, accumulate| {
                                let mut sums = vec![T::default(); n];
                                for row in dz.chunks_exact(n.max(1)) {
                                    for (s, &v) in sums.iter_mut().zip(row) {
                                        *s += v;
                                    }
                                }
                                for (j, s) in sums.into_iter().enumerate() {
                                    // SAFETY: dst holds n elements.
                                    unsafe {
                                        let d = dst.add(j);
                                        *d = if accumulate { *d + s } else { s };
                                    }
                                }
                            })?,
                            false => None,
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
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (6, 4), &d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 4), &d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 4, &d).unwrap()).unwrap();
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
        let mut handed = crate::gradients::Gradients::default();
        handed.backward(&loss).unwrap();
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
                assert!((a - h).abs() < 1e-12, "gradient {a} vs {h}");
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
        let cases = [
            (5, 3, 4, true),
            (5, 3, 4, false),
            (64, 300, 200, true),
            (64, 300, 200, false),
        ];
        for (m, k, n, relu) in cases {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (m, k), &d).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (k, n), &d).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, n, &d).unwrap()).unwrap();
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
            let (fv, pv): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
                (fused.to_vec2().unwrap(), plain.to_vec2().unwrap());
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
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
