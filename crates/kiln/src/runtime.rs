//! Process-wide settings for the CPU engine, chosen from measurements (bench/README.md).

/// Runs candle's elementwise kernels on the calling thread (`CANDLE_NUM_THREADS=1`) unless the
/// user set that variable. On the 2-core machines measured, this costs nothing on a quiet machine
/// and keeps training fast when another process holds a core (W1 went from 32 to 87 steps/s),
/// because candle's elementwise worker pool spins instead of yielding. kiln's own kernels (the
/// matrix products, the optimizer and penalty passes) use every core through their own pool,
/// or one, where a training step measured faster so (another process holding a core).
///
/// It also sets `RAYON_NUM_THREADS` to the thread count kiln's kernels split their work for
/// (the cores this process may use) unless the user set it: candle's matrix product (used by the
/// convolutions and the recurrent layers) asks for its thread count on every product, and
/// without the variable that means reading `/proc/cpuinfo` each time (17% of the instructions of
/// a convolutional `predict`). rayon's own pools default to the same count, so only that
/// re-reading changes.
///
/// Call it first thing in `main`, before any tensor exists and before other threads start:
/// candle reads the variable once, when its pool is first used.
///
/// ```
/// kiln::runtime::configure_cpu_threads();
/// assert!(std::env::var("RAYON_NUM_THREADS").is_ok());
/// ```
pub fn configure_cpu_threads() {
    // Called at start-up, before any other thread exists.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", matmul_threads().to_string());
    }
}

mod choice;
pub(crate) use choice::ThreadChoice;

thread_local! {
    /// Set while [`on_one_thread`] runs: kiln's kernels then stay on this thread.
    static ONE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Threads kiln's kernels split their work for: `RAYON_NUM_THREADS` when set, else the cores
/// this process may use. Read once: candle's own helper re-reads `/proc/cpuinfo` on every
/// product. The split depends on this alone, so results do not depend on whether the pieces
/// then run in parallel or, inside [`on_one_thread`], one after another.
pub(crate) fn matmul_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// Whether kiln's kernels may run their pieces on several threads now: there are several, and
/// this is not inside [`on_one_thread`], where the same pieces run one after another.
pub(crate) fn parallel_now() -> bool {
    matmul_threads() > 1 && !ONE_THREAD.with(|one| one.get())
}

/// Runs `f` on a thread of kiln's matrix-product pool, so that the products inside it split
/// their work with the calling worker taking a share, rather than waking the pool and sleeping
/// until it is done (two thread switches per product). Falls back to the calling thread when
/// the pool cannot be built.
///
/// Training flushes subnormal floats to zero, as TensorFlow and XLA do on the CPU: once a model
/// fits, gradients and Adam's moments drift into the subnormal range, where every x86
/// arithmetic instruction takes a slow path (W2 fell from 180 to 9.5 steps/s by step 3000
/// before this). The pool's threads run that way; on the calling thread the setting is
/// restored afterwards. Rust's documentation counts changing this mode as undefined behaviour
/// for code compiled under the default floating-point assumptions; the practical difference is
/// that a subnormal value folded at compile time can differ from the same value computed at run
/// time. Set `KILN_KEEP_SUBNORMALS=1` to train with IEEE subnormals instead.
pub(crate) fn on_matmul_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(matmul_threads())
            .thread_name(|i| format!("kiln-matmul-{i}"))
            .start_handler(|_| {
                if flush_subnormals() {
                    subnormals::flush_to_zero();
                }
            })
            .build()
            .ok()
    });
    match pool {
        Some(pool) if matmul_threads() > 1 => pool.install(f),
        _ if flush_subnormals() => subnormals::flushed_while(f),
        _ => f(),
    }
}

/// Runs `f` on one thread of kiln's pool, alone: kiln's kernels inside it run their pieces one
/// after another, split exactly as on the whole pool, so the results are the same bit for bit.
/// (A pool thread rather than the caller's: its memory and caches are warm from earlier steps,
/// where on the caller the first such step ran 10× slower, and candle's own parallel ops stay
/// on kiln's pool, with subnormals flushed, instead of reaching rayon's global pool.)
pub(crate) fn on_one_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    on_matmul_pool(|| {
        /// Puts the thread's previous setting back however `f` ends.
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                ONE_THREAD.with(|one| one.set(self.0));
            }
        }
        let _restore = Restore(ONE_THREAD.with(|one| one.replace(true)));
        f()
    })
}

/// Runs `f` on the calling thread, alone, as [`on_one_thread`] does on a pool thread (same
/// pieces, same results, subnormals flushed alike). For data-parallel ranks that are threads of
/// one process: a rank waits for the others inside its step, and must not hold a pool thread
/// that another rank's step needs.
pub(crate) fn on_calling_thread<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the thread's previous setting back however `f` ends.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ONE_THREAD.with(|one| one.set(self.0));
        }
    }
    let _restore = Restore(ONE_THREAD.with(|one| one.replace(true)));
    match flush_subnormals() {
        true => subnormals::flushed_while(f),
        false => f(),
    }
}

/// Whether training flushes subnormals to zero: yes unless `KILN_KEEP_SUBNORMALS` is set to
/// something other than `0`. Read once.
fn flush_subnormals() -> bool {
    static FLUSH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLUSH.get_or_init(|| std::env::var("KILN_KEEP_SUBNORMALS").map_or(true, |v| v == "0"))
}

#[cfg(test)]
mod tests {
    /// Work run for training (on the pool, or on the caller with one thread) flushes subnormal
    /// results to zero.
    #[test]
    fn training_work_flushes_subnormals() {
        let product = super::on_matmul_pool(|| {
            std::hint::black_box(1e-30f32) * std::hint::black_box(1e-10f32)
        });
        #[cfg(target_arch = "x86_64")]
        assert_eq!(product, 0.0);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = product;
    }
}

/// Flush-to-zero (FTZ) and denormals-are-zero (DAZ) for the current thread's SSE/AVX unit
/// (the MXCSR register, read and written with `stmxcsr`/`ldmxcsr`).
mod subnormals {
    /// The thread's previous control word, to restore.
    pub(super) struct Saved(#[allow(dead_code)] u32);

    #[cfg(target_arch = "x86_64")]
    fn read() -> u32 {
        let mut csr: u32 = 0;
        // SAFETY: stores this thread's MXCSR into a local.
        unsafe {
            std::arch::asm!(
                "stmxcsr [{}]",
                in(reg) &mut csr as *mut u32,
                options(nostack, preserves_flags)
            )
        };
        csr
    }

    #[cfg(target_arch = "x86_64")]
    fn write(csr: u32) {
        // SAFETY: loads a control word that differs from one read on this thread only in the
        // FTZ and DAZ bits, valid on every x86_64 CPU; it changes this thread's float control.
        unsafe {
            std::arch::asm!(
                "ldmxcsr [{}]",
                in(reg) &csr as *const u32,
                // Not `preserves_flags`: MXCSR's exception flags count as flags, and this
                // writes them.
                options(nostack, readonly)
            )
        };
    }

    /// Makes the current thread flush subnormal results and inputs to zero.
    pub(super) fn flush_to_zero() -> Saved {
        #[cfg(target_arch = "x86_64")]
        {
            const FTZ: u32 = 1 << 15;
            const DAZ: u32 = 1 << 6;
            let saved = read();
            write(saved | FTZ | DAZ);
            Saved(saved)
        }
        #[cfg(not(target_arch = "x86_64"))]
        Saved(0)
    }

    /// Runs `f` with subnormals flushed on this thread, then restores the thread's setting
    /// however `f` ends, panics included.
    pub(super) fn flushed_while<R>(f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Saved>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(saved) = self.0.take() {
                    restore(saved);
                }
            }
        }
        let _restore = Restore(Some(flush_to_zero()));
        f()
    }

    /// Puts back a control word saved by [`flush_to_zero`].
    pub(super) fn restore(saved: Saved) {
        #[cfg(target_arch = "x86_64")]
        write(saved.0);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = saved;
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    mod tests {
        /// With the flag set, a product that would be subnormal is zero; restored, it is not.
        #[test]
        fn subnormal_results_flush_to_zero_and_the_setting_restores() {
            let tiny = std::hint::black_box(1e-30f32);
            let saved = super::flush_to_zero();
            let flushed = std::hint::black_box(tiny) * std::hint::black_box(1e-10f32);
            super::restore(saved);
            let kept = std::hint::black_box(tiny) * std::hint::black_box(1e-10f32);
            assert_eq!(flushed, 0.0);
            assert!(kept > 0.0 && kept < f32::MIN_POSITIVE);
        }

        /// A panic inside the flushed region (a user's loss failing) leaves the caller's
        /// thread as it was.
        #[test]
        fn a_panic_restores_the_setting() {
            let result =
                std::panic::catch_unwind(|| super::flushed_while(|| panic!("loss failed")));
            assert!(result.is_err());
            let kept = std::hint::black_box(1e-30f32) * std::hint::black_box(1e-10f32);
            assert!(kept > 0.0);
        }
    }
}
