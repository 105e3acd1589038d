//! Process-wide settings for the CPU engine, chosen from measurements (bench/README.md).

/// Runs candle's elementwise kernels on the calling thread (`CANDLE_NUM_THREADS=1`) unless the
/// user set that variable. On the 2-core machines measured, this costs nothing on a quiet machine
/// and keeps training fast when another process holds a core (W1 went from 32 to 87 steps/s),
/// because candle's elementwise worker pool spins instead of yielding. kiln's own kernels (the
/// matrix products, the optimizer and penalty passes) use every core through their own pool.
///
/// Call it first thing in `main`, before any tensor exists and before other threads start:
/// candle reads the variable once, when its pool is first used.
///
/// ```
/// kiln::runtime::configure_cpu_threads();
/// ```
pub fn configure_cpu_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called at start-up, before any other thread exists.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Threads for kiln's own matrix products (the fused Dense kernels): `RAYON_NUM_THREADS` when
/// set, else the cores this process may use. Read once: candle's own helper re-reads
/// `/proc/cpuinfo` on every product.
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

/// Runs `f` on a thread of kiln's matrix-product pool, so that the products inside it split
/// their work with the calling worker taking a share, rather than waking the pool and sleeping
/// until it is done (two thread switches per product). Falls back to the calling thread when
/// the pool cannot be built.
pub(crate) fn on_matmul_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(matmul_threads())
            .thread_name(|i| format!("kiln-matmul-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(pool) if matmul_threads() > 1 => pool.install(f),
        _ => f(),
    }
}
