//! What kiln's fused CPU kernels share: direct access to a tensor's memory (backward passes get
//! tensors, not storages), splitting a pass across the matrix-product threads, and compiling a
//! loop for AVX-512 where the CPU has it.

use candle_core::{CpuStorage, Layout, Storage, Tensor, WithDType};

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
    if threads < 2 || len < PARALLEL_MIN_LEN {
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

/// Defines `$name` as its `body`, compiled twice: for the baseline CPU and with AVX-512, the
/// latter chosen at run time where the CPU has it.
macro_rules! vectorized_kernel {
    ($(#[$doc:meta])* fn $name:ident<T>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        fn $name<T: Real>($($arg: $ty),*) {
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
