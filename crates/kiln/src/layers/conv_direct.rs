//! A convolution's forward pass straight from its input, and the kernel gradient of one with a
//! small window (a first layer over grey or RGB images: 3·3·1 = 9 or 3·3·3 = 27 elements).
//!
//! The forward pass keeps a block of output positions × up to 64 filters of sums in registers
//! (24 of the 32) and broadcasts each window element of each position against the kernel's
//! row: no window matrix is written or read back, and no operand is packed. In `predict` of C1
//! it ran at about 150 (first layer) and 240 (second) GFLOP/s on one core, where the window
//! matrix with `gemm` had run the first layer at 11. The kernel gradient of a small window
//! sums, per block of window elements, over blocks of output rows; wider windows keep the
//! window matrix and `gemm`, whose products are then long enough to pay. A plain product whose
//! left operand `gemm` would have to pack whole (the recurrent layers' input gradient) runs
//! through the forward kernel too, each row of the left operand one window.
//!
//! The kernels are written with AVX-512 intrinsics, for f32: the same loops in plain Rust were
//! vectorized across the positions (gathers and scatters) and ran 4× slower than `gemm`. Where
//! the CPU lacks AVX-512, or for f64, the caller keeps the window matrix.

use std::any::TypeId;
use std::mem::MaybeUninit;

/// The largest window (`kh·kw·c` elements) whose kernel gradient is computed here; wider ones
/// go through the window matrix and `gemm`, which pays once each gradient element sums enough
/// products.
const GRADIENT_MAX_WINDOW: usize = 32;

/// Filters per register: one AVX-512 register of f32.
const LANES: usize = 16;

/// Window elements whose kernel-gradient sums stay in registers together, one register each.
const BLOCK: usize = 8;

/// Output rows whose gradient rows the kernel gradient reads once per block of window
/// elements: 64 rows of 16 filters are 4 KiB, still in L1 for the next block.
const GRADIENT_ROWS: usize = 64;

/// Where each output row of a convolution reads its window.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    /// Input height, width and channels.
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c: usize,
    /// Output height and width.
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) strides: [usize; 2],
}

impl Geometry {
    /// The input offset of the first window element of output row `row` (batch-major, then
    /// out_h, out_w).
    #[inline(always)]
    fn base(&self, row: usize) -> usize {
        let (b, rest) = (row / (self.oh * self.ow), row % (self.oh * self.ow));
        let (i, j) = (rest / self.ow, rest % self.ow);
        ((b * self.h + i * self.strides[0]) * self.w + j * self.strides[1]) * self.c
    }

    /// The window bases of output rows `first, first + 1, …`, stepped along: the divisions
    /// of [`Geometry::base`] per row were among the forward kernel's hottest instructions.
    fn bases_from(&self, first: usize) -> impl Iterator<Item = usize> + '_ {
        let (b, rest) = (first / (self.oh * self.ow), first % (self.oh * self.ow));
        let (mut b, mut i, mut j) = (b, rest / self.ow, rest % self.ow);
        std::iter::from_fn(move || {
            let base = ((b * self.h + i * self.strides[0]) * self.w + j * self.strides[1]) * self.c;
            j += 1;
            if j == self.ow {
                j = 0;
                i += 1;
                if i == self.oh {
                    i = 0;
                    b += 1;
                }
            }
            Some(base)
        })
    }

    /// Panics unless every window of output rows `first..first + count` lies inside an input
    /// of `len` elements; window bases grow with the row, so the last row reads furthest.
    fn check_reach(&self, taps: &[usize], first: usize, count: usize, len: usize) {
        let reach = self.base(first + count - 1) + taps.iter().copied().max().unwrap_or(0);
        assert!(reach < len, "kiln-conv2d: a window reaches past the input");
    }
}

/// Whether the forward kernel runs for elements `T` here.
pub(super) fn available<T: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<f32>() && has_avx512()
}

/// Whether the kernel-gradient kernel runs for elements `T` and a window of `window` elements.
pub(super) fn gradient_available<T: 'static>(window: usize) -> bool {
    window <= GRADIENT_MAX_WINDOW && available::<T>()
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `s` as f32, when `T` is f32.
pub(super) fn as_f32<T: 'static>(s: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32, checked.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) })
}

/// `s` as f32, writable, when `T` is f32.
fn as_f32_mut<T: 'static>(s: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32, checked.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) })
}

/// `out = a · b` for `a` `[rows, k]` and `b` `[k, n]`, row-major, through the forward kernel
/// (each row of `a` a window of `k` elements), when [`available`] for `T` and `n` is a
/// multiple of 16 (so `b` needs no padded copy); `false`, with `out` untouched, otherwise.
/// `gemm` would pack all of `a` first.
pub(super) fn product<T: 'static>(
    out: &mut [T],
    a: &[T],
    b: &[T],
    (rows, k, n): (usize, usize, usize),
) -> bool {
    if !available::<T>() || n % LANES != 0 || k == 0 || rows == 0 {
        return false;
    }
    let (Some(a), Some(b), Some(out)) = (as_f32(a), as_f32(b), as_f32_mut(out)) else {
        return false;
    };
    let g = Geometry {
        h: 1,
        w: 1,
        c: k,
        oh: 1,
        ow: 1,
        strides: [1, 1],
    };
    let taps: Vec<usize> = (0..k).collect();
    let zeros = vec![0.0; n];
    let out = &mut out[..rows * n];
    // SAFETY: f32 and MaybeUninit<f32> have one layout, and the kernel writes only
    // initialized values.
    let out = unsafe {
        std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<f32>>(), out.len())
    };
    rows_kernel(
        &g,
        &a[..rows * k],
        &taps,
        &b[..k * n],
        &zeros,
        false,
        0,
        n,
        out,
    );
    true
}

/// `f` filters rounded up to whole registers, as the kernels lay them out.
pub(super) fn padded_filters(f: usize) -> usize {
    f.div_ceil(LANES) * LANES
}

/// The kernel `[k, f]` and bias `[f]` with the filters padded with zeros to whole registers,
/// as [`rows_kernel`] reads them.
pub(super) fn padded(kernel: &[f32], bias: &[f32], f: usize) -> (Vec<f32>, Vec<f32>) {
    let fp = padded_filters(f);
    let mut k = vec![0.0; kernel.len() / f.max(1) * fp];
    for (dst, src) in k.chunks_exact_mut(fp).zip(kernel.chunks_exact(f.max(1))) {
        dst[..f].copy_from_slice(src);
    }
    let mut b = vec![0.0; fp];
    b[..f].copy_from_slice(bias);
    (k, b)
}

/// `ys = relu?(bias + windows · kernel)` for output rows `first..first + ys.len() / f`, with
/// `taps` the offset of each window element from the window's first (in the kernel's row
/// order), and the kernel and bias from [`padded`].
///
/// # Panics
/// Unless [`available`]; when a window reaches past `x`, or the kernel does not fit the taps.
#[allow(clippy::too_many_arguments)]
pub(super) fn rows_kernel(
    g: &Geometry,
    x: &[f32],
    taps: &[usize],
    kernel: &[f32],
    bias: &[f32],
    relu: bool,
    first: usize,
    f: usize,
    ys: &mut [MaybeUninit<f32>],
) {
    let (fp, count) = (bias.len(), ys.len() / f.max(1));
    if count == 0 {
        return;
    }
    assert!(fp == padded_filters(f) && taps.len() * fp == kernel.len() && ys.len() == count * f);
    g.check_reach(taps, first, count, x.len());
    assert!(has_avx512(), "kiln-conv2d: the direct kernel needs AVX-512");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present; the extents were checked above.
    unsafe {
        avx512::rows(g, x, taps, kernel, bias, relu, first, f, ys)
    }
}

/// `dk += windowsᵀ · dz` over output rows `first..first + dz.len() / f`, for a `dk` of
/// `[k, padded_filters(f)]`.
///
/// # Panics
/// Unless [`available`]; when a window reaches past `x`, or `dk` does not fit the taps.
pub(super) fn kernel_gradient(
    g: &Geometry,
    x: &[f32],
    taps: &[usize],
    dz: &[f32],
    first: usize,
    f: usize,
    dk: &mut [f32],
) {
    let count = dz.len() / f.max(1);
    if count == 0 || taps.is_empty() {
        return;
    }
    assert!(taps.len() * padded_filters(f) == dk.len() && dz.len() == count * f);
    g.check_reach(taps, first, count, x.len());
    assert!(has_avx512(), "kiln-conv2d: the direct kernel needs AVX-512");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present; the extents were checked above.
    unsafe {
        avx512::kernel_gradient(g, x, taps, dz, first, f, dk)
    }
}

// The register arrays are indexed by position and register on purpose: the loops read as the
// block of sums they compute, and the compiler unrolls them into registers.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Geometry, BLOCK, GRADIENT_ROWS, LANES};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// The lanes `0..lanes` of a register.
    #[inline(always)]
    fn lane_mask(lanes: usize) -> __mmask16 {
        ((1u32 << lanes) - 1) as __mmask16
    }

    /// See [`super::rows_kernel`]: the filters in groups of up to four registers, each group over
    /// every row.
    ///
    /// # Safety
    /// AVX-512F; the extents [`super::rows_kernel`] checks.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows(
        g: &Geometry,
        x: &[f32],
        taps: &[usize],
        kernel: &[f32],
        bias: &[f32],
        relu: bool,
        first: usize,
        f: usize,
        ys: &mut [MaybeUninit<f32>],
    ) {
        let a = Rows {
            g,
            x,
            taps,
            kernel,
            bias,
            relu,
            first,
            f,
            ys: ys.as_mut_ptr().cast::<f32>(),
            count: ys.len() / f,
        };
        let registers = bias.len() / LANES;
        let mut r0 = 0;
        // SAFETY: as for this function; each group's registers are inside the padded filters.
        unsafe {
            while r0 < registers {
                // Positions × registers of sums: 24 of the 32 vector registers, with room for
                // the kernel's registers and a broadcast.
                r0 += match registers - r0 {
                    1 => group::<16, 1>(&a, r0),
                    2 => group::<10, 2>(&a, r0),
                    3 => group::<8, 3>(&a, r0),
                    _ => group::<6, 4>(&a, r0),
                };
            }
        }
    }

    /// The arguments of [`rows_kernel`], with the output as a pointer to `count` rows of `f`.
    struct Rows<'a> {
        g: &'a Geometry,
        x: &'a [f32],
        taps: &'a [usize],
        kernel: &'a [f32],
        bias: &'a [f32],
        relu: bool,
        first: usize,
        f: usize,
        ys: *mut f32,
        count: usize,
    }

    /// The filters of registers `r0..r0 + F` over every row, `P` rows at a time, their
    /// `P·F` sums in registers; returns `F`.
    ///
    /// # Safety
    /// AVX-512F; the extents [`super::rows_kernel`] checks, and `r0 + F` registers inside the
    /// padded filters.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn group<const P: usize, const F: usize>(a: &Rows, r0: usize) -> usize {
        let fp = a.bias.len();
        let (xp, kp) = (a.x.as_ptr(), a.kernel.as_ptr());
        let c0 = r0 * LANES;
        let zero = _mm512_setzero_ps();
        // SAFETY (all pointer reads and writes below): registers r0..r0 + F lie inside the
        // padded filters of the bias and of each of the taps × fp kernel rows, every base +
        // tap is inside x, and rows row..row + n of f outputs are inside ys, the stores
        // masked to the real filters (each register holds at least one).
        unsafe {
            let mut bias = [zero; F];
            let mut masks = [0; F];
            for r in 0..F {
                bias[r] = _mm512_loadu_ps(a.bias.as_ptr().add(c0 + r * LANES));
                masks[r] = lane_mask(LANES.min(a.f - (c0 + r * LANES)));
            }
            let mut next_base = a.g.bases_from(a.first);
            let mut row = 0;
            while row < a.count {
                let n = P.min(a.count - row);
                // A short last block repeats its last position; those sums are not stored.
                let mut bases = [0; P];
                for p in 0..P {
                    bases[p] = if p < n {
                        next_base.next().unwrap_or(0)
                    } else {
                        bases[p - 1]
                    };
                }
                let mut acc = [bias; P];
                for (t, &off) in a.taps.iter().enumerate() {
                    let mut w = [zero; F];
                    for r in 0..F {
                        w[r] = _mm512_loadu_ps(kp.add(t * fp + c0 + r * LANES));
                    }
                    for p in 0..P {
                        let v = _mm512_set1_ps(*xp.add(bases[p] + off));
                        for r in 0..F {
                            acc[p][r] = _mm512_fmadd_ps(v, w[r], acc[p][r]);
                        }
                    }
                }
                for (p, sums) in acc.iter().enumerate().take(n) {
                    for r in 0..F {
                        // max(0, z) is z for a NaN z, as `if z < 0 { 0 } else { z }`.
                        let z = if a.relu {
                            _mm512_max_ps(zero, sums[r])
                        } else {
                            sums[r]
                        };
                        let at = a.ys.add((row + p) * a.f + c0 + r * LANES);
                        _mm512_mask_storeu_ps(at, masks[r], z);
                    }
                }
                row += n;
            }
        }
        F
    }

    /// See [`super::kernel_gradient`].
    ///
    /// # Safety
    /// AVX-512F; the extents [`super::kernel_gradient`] checks.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_gradient(
        g: &Geometry,
        x: &[f32],
        taps: &[usize],
        dz: &[f32],
        first: usize,
        f: usize,
        dk: &mut [f32],
    ) {
        let count = dz.len() / f;
        let fp = dk.len() / taps.len();
        let (xp, dzp, dkp) = (x.as_ptr(), dz.as_ptr(), dk.as_mut_ptr());
        let mut next_base = g.bases_from(first);
        let mut bases = [0usize; GRADIENT_ROWS];
        for r0 in (0..count).step_by(GRADIENT_ROWS) {
            let n = GRADIENT_ROWS.min(count - r0);
            for (base, next) in bases.iter_mut().take(n).zip(&mut next_base) {
                *base = next;
            }
            for c0 in (0..f).step_by(LANES) {
                let mask = lane_mask(LANES.min(f - c0));
                for t0 in (0..taps.len()).step_by(BLOCK) {
                    let mut offs = [taps[t0]; BLOCK];
                    let block = BLOCK.min(taps.len() - t0);
                    offs[..block].copy_from_slice(&taps[t0..t0 + block]);
                    // SAFETY (all pointer reads and writes below): rows r0..r0 + n of f
                    // gradients are inside dz (the loads masked to the real filters), every
                    // base + tap is inside x, and dk is taps × fp with c0 + LANES ≤ fp.
                    unsafe {
                        let mut acc = [_mm512_setzero_ps(); BLOCK];
                        for (r, &base) in bases.iter().enumerate().take(n) {
                            let d = _mm512_maskz_loadu_ps(mask, dzp.add((r0 + r) * f + c0));
                            for t in 0..BLOCK {
                                let v = _mm512_set1_ps(*xp.add(base + offs[t]));
                                acc[t] = _mm512_fmadd_ps(v, d, acc[t]);
                            }
                        }
                        for (t, &a) in acc.iter().enumerate().take(block) {
                            let at = dkp.add((t0 + t) * fp + c0);
                            _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), a));
                        }
                    }
                }
            }
        }
    }
}
