//! What kiln's fused CPU kernels share: direct access to a tensor's memory (backward passes get
//! tensors, not storages), splitting a pass across the matrix-product threads, and compiling a
//! loop for AVX-512 where the CPU has it.

use candle_core::{CpuStorage, Layout, Storage, Tensor, WithDType};
use std::mem::MaybeUninit;

/// The elements of a storage that `l` lays out contiguously; `what` names it in errors.
pub(crate) fn contiguous<'a, T>(
    v: &'a [T],
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
    Ok(&v[start..end])
}

/// [`contiguous`], writable.
pub(crate) fn contiguous_mut<'a, T>(
    v: &'a mut [T],
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
    Ok(&mut v[start..end])
}

/// Calls `f` with the elements of `t`, a contiguous CPU tensor of element type `T`; `what`
/// names the tensor in errors.
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{what} must be on the CPU");
    };
    f(contiguous(cpu.as_slice::<T>()?, layout, what)?)
}

/// The float types the kernels run on.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::SubAssign
    + PartialOrd
    + Default
    + Into<f64>
    + 'static
{
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// `tanh`, as a polynomial the compiler vectorizes for f32 (a few ulps; [`crate::cpu_math`]).
    fn fast_tanh(self) -> Self;
    /// The logistic sigmoid, vectorizable for f32 like [`Real::fast_tanh`].
    fn logistic(self) -> Self;
    fn from_f64(v: f64) -> Self;
    /// The elements of a CPU storage of this type.
    fn elements_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}
impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn fast_tanh(self) -> Self {
        crate::cpu_math::tanh_f32(self)
    }
    #[inline(always)]
    fn logistic(self) -> Self {
        crate::cpu_math::sigmoid_f32(self)
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn elements_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}
impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn fast_tanh(self) -> Self {
        f64::tanh(self)
    }
    fn logistic(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn elements_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// Below this many elements a pass stays on the calling thread.
pub(crate) const PARALLEL_MIN_LEN: usize = 1 << 15;

/// Runs `f` on matching pieces of `target` and `sources`, one piece per matrix-product thread.
pub(crate) fn in_parallel<T: Real, const N: usize>(
    target: &mut [T],
    sources: &[&[T]; N],
    f: impl Fn(&mut [T], [&[T]; N]) + Sync,
) {
    in_parallel_many([target], sources, |[t], s| f(t, s));
}

/// Runs `f` on matching pieces of several `targets` (written) and `sources` (read), all of one
/// length, one piece per matrix-product thread.
pub(crate) fn in_parallel_many<T: Real, const M: usize, const N: usize>(
    targets: [&mut [T]; M],
    sources: &[&[T]; N],
    f: impl Fn([&mut [T]; M], [&[T]; N]) + Sync,
) {
    let len = targets.first().map_or(0, |t| t.len());
    let threads = crate::runtime::matmul_threads();
    if len < PARALLEL_MIN_LEN || !crate::runtime::parallel_now() {
        return f(targets, *sources);
    }
    let piece = len.div_ceil(threads).next_multiple_of(64);
    rayon::scope(|scope| {
        let mut rest = targets;
        let mut start = 0;
        while start < len {
            let take = piece.min(len - start);
            let heads: [&mut [T]; M] = std::array::from_fn(|i| {
                let (head, tail) = std::mem::take(&mut rest[i]).split_at_mut(take);
                rest[i] = tail;
                head
            });
            let parts = sources.map(|s| &s[start..start + take]);
            let f = &f;
            scope.spawn(move |_| f(heads, parts));
            start += take;
        }
    });
}

/// Calls `f(i, chunk)` for the `i`-th `size`-long chunk of `target`, the chunks split across
/// the matrix-product threads when `target` is large enough (a batch's samples, whose outputs
/// are disjoint), else in order on this thread.
pub(crate) fn for_each_chunk<T: Send>(
    target: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    use rayon::prelude::*;
    let size = size.max(1);
    if target.len() < PARALLEL_MIN_LEN || target.len() <= size || !crate::runtime::parallel_now() {
        target
            .chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        target
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// A `len`-element vector whose `size`-long chunks (the last one shorter) are written by
/// `fill(i, first, chunk_len)` through a pointer to their first element, across the
/// matrix-product threads as [`for_each_chunk`] splits: spares the zero fill of
/// `vec![0; len]` for outputs that kernels write whole.
///
/// # Safety
/// `fill` must initialize all `chunk_len` elements of its chunk before it forms a reference
/// to any of them, and read none it has not written.
pub(crate) unsafe fn written_in_chunks<T: Send + Sync>(
    len: usize,
    size: usize,
    fill: impl Fn(usize, *mut T, usize) + Sync + Send,
) -> Vec<T> {
    use rayon::prelude::*;
    /// The vector's buffer, shared by the chunks, which write disjoint parts of it.
    struct Buffer<T>(*mut T);
    // SAFETY: the threads write disjoint chunks only.
    unsafe impl<T: Send> Sync for Buffer<T> {}
    let size = size.max(1);
    let mut out: Vec<T> = Vec::with_capacity(len);
    let buffer = Buffer(out.as_mut_ptr());
    let chunks = len.div_ceil(size);
    let chunk = |i: usize| {
        let buffer = &buffer;
        // SAFETY: chunk i lies inside the allocation of `len` elements.
        fill(
            i,
            unsafe { buffer.0.add(i * size) },
            size.min(len - i * size),
        )
    };
    if len < PARALLEL_MIN_LEN || len <= size || !crate::runtime::parallel_now() {
        (0..chunks).for_each(chunk);
    } else {
        (0..chunks).into_par_iter().for_each(chunk);
    }
    // SAFETY: every chunk was initialized by `fill`, as the caller guarantees.
    unsafe { out.set_len(len) };
    out
}

/// Defines `$name` as its `body`, compiled twice: for the baseline CPU and with AVX-512, the
/// latter chosen at run time where the CPU has it.
macro_rules! vectorized_kernel {
    ($(#[$doc:meta])* $vis:vis fn $name:ident<T>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        $vis fn $name<T: Real>($($arg: $ty),*) {
            #[inline(always)]
            fn body<T: Real>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide<T: Real>($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized_kernel as vectorized;

/// The transpose of a row-major `rows × cols` matrix, as a row-major `cols × rows` one, split
/// by output rows across up to `threads` threads.
///
/// The Dense backward has `gemm` write dX by columns (it then reads the transposed kernel in
/// place, 130 against 277 GFLOP/s) and turns the result, the smaller matrix, around here.
pub(crate) fn transpose<T: Real>(src: &[T], rows: usize, cols: usize, threads: usize) -> Vec<T> {
    use rayon::prelude::*;
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose: {rows}×{cols} from {} elements",
        src.len()
    );
    let mut out: Vec<T> = Vec::with_capacity(rows * cols);
    if rows == 0 || cols == 0 {
        return out;
    }
    let piece = if threads > 1 && src.len() >= PARALLEL_MIN_LEN && crate::runtime::parallel_now() {
        cols.div_ceil(threads)
    } else {
        cols
    };
    let whole = &mut out.spare_capacity_mut()[..rows * cols];
    if piece == cols {
        // One piece stays on this thread (rayon would hand it to a pool from outside one).
        transpose_columns(src, rows, cols, 0, whole);
    } else {
        whole
            .par_chunks_mut(piece * rows)
            .enumerate()
            .for_each(|(i, part)| transpose_columns(src, rows, cols, i * piece, part));
    }
    // SAFETY: the pieces cover the rows·cols elements whole, and `transpose_columns` writes
    // every element of its piece.
    unsafe { out.set_len(rows * cols) };
    out
}

/// Rows `first..` of the transpose of `src` (`rows × cols`), into `out` (whole rows): writes
/// every element of `out`.
fn transpose_columns<T: Real>(
    src: &[T],
    rows: usize,
    cols: usize,
    first: usize,
    out: &mut [MaybeUninit<T>],
) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && std::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: T is f32 (checked above), so both slices reinterpret as f32 (possibly
        // uninitialized in `out`) unchanged; the CPU has AVX-512F.
        unsafe {
            let src = std::slice::from_raw_parts(src.as_ptr().cast::<f32>(), src.len());
            let out = std::slice::from_raw_parts_mut(
                out.as_mut_ptr().cast::<MaybeUninit<f32>>(),
                out.len(),
            );
            return transpose_columns_avx512(src, rows, cols, first, out);
        }
    }
    /// Square tiles: a tile's source rows and target rows stay in cache while it is copied.
    const TILE: usize = 16;
    let count = out.len() / rows;
    for j0 in (0..count).step_by(TILE) {
        for i0 in (0..rows).step_by(TILE) {
            for j in j0..(j0 + TILE).min(count) {
                for i in i0..(i0 + TILE).min(rows) {
                    out[j * rows + i].write(src[i * cols + first + j]);
                }
            }
        }
    }
}

/// [`transpose_columns`] for f32 with AVX-512: each 16 source rows of a column are one gather.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose_columns_avx512(
    src: &[f32],
    rows: usize,
    cols: usize,
    first: usize,
    out: &mut [MaybeUninit<f32>],
) {
    use std::arch::x86_64::{
        _mm512_i32gather_ps, _mm512_mullo_epi32, _mm512_set1_epi32, _mm512_setr_epi32,
        _mm512_storeu_ps,
    };
    const LANES: usize = 16;
    let count = out.len() / rows;
    let whole = rows / LANES * LANES;
    // Offsets of 16 consecutive source rows; a gather reads one column's 16 elements.
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(i32::try_from(cols).unwrap_or(i32::MAX)),
    );
    let gather_fits = cols
        .checked_mul(LANES)
        .is_some_and(|v| v <= i32::MAX as usize);
    for i0 in (0..whole)
        .step_by(LANES)
        .filter(|_| gather_fits && count > 0)
    {
        // The last gather and store of this block lie inside `src` and `out`.
        assert!(
            (i0 + LANES - 1) * cols + first + count - 1 < src.len()
                && (count - 1) * rows + i0 + LANES <= out.len()
        );
        for j in 0..count {
            // SAFETY: the 16 gathered elements `(i0 + r)·cols + first + j` (r < 16) lie inside
            // `src` and the 16 stored ones inside `out`, both bounded by the assertion above.
            unsafe {
                let column =
                    _mm512_i32gather_ps::<4>(offsets, src.as_ptr().add(i0 * cols + first + j));
                _mm512_storeu_ps(out.as_mut_ptr().add(j * rows + i0).cast::<f32>(), column);
            }
        }
    }
    let done = if gather_fits { whole } else { 0 };
    for j in 0..count {
        for i in done..rows {
            out[j * rows + i].write(src[i * cols + first + j]);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every element lands at its transposed place: f32 (the AVX-512 path where the CPU has it)
    /// and f64, shapes that leave remainders after 16-row blocks, one thread and split.
    #[test]
    fn transpose_moves_every_element() {
        fn check<T: super::Real + std::fmt::Debug>(of: impl Fn(usize) -> T) {
            for (rows, cols) in [(1, 1), (3, 17), (16, 16), (37, 45), (200, 171)] {
                let src: Vec<T> = (0..rows * cols).map(&of).collect();
                for threads in [1, 2] {
                    let t = super::transpose(&src, rows, cols, threads);
                    for i in 0..rows {
                        for j in 0..cols {
                            assert_eq!(
                                t[j * rows + i],
                                src[i * cols + j],
                                "{rows}×{cols} at {i},{j}"
                            );
                        }
                    }
                }
            }
        }
        check(|i| i as f32);
        check(|i| i as f64 * 0.5);
        assert!(super::transpose::<f32>(&[], 0, 7, 2).is_empty());
    }
}
