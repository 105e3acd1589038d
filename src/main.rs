//! The `kiln` command; its code is `kiln::cli`, so programs that register custom losses can
//! offer the same command.

/// A caching allocator: tensors of the same sizes are made every step, and the system allocator
/// returns them to the kernel and faults them back in (measured in bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keep_freed_memory_between_steps();
    kiln::cli::main()
}

/// mimalloc hands freed memory back to the kernel after 10 ms (its
/// `purge_delay`). A training step frees and allocates the same large buffers every 20 to 200 ms,
/// and each hand-back makes the kernel zero those pages again on the next touch: a third of a
/// convolutional or LSTM training step (bench/README.md). With purging off, the buffers are
/// reused from step to step; the peak resident memory stays the same (the step's working set is
/// the peak), but memory freed after the peak stays with the process until it exits. A
/// `MIMALLOC_PURGE_DELAY` the user set is left alone.
fn keep_freed_memory_between_steps() {
    // `mi_option_purge_delay` in mimalloc's v2 and v3 headers; libmimalloc-sys has no name for it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: plain option calls, made before any other thread exists. The documented default
    // (10 ms) confirms the index before the value is changed.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DELAY) == 10 {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}
