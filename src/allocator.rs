//! The allocator of the `kiln` command, shared with the benchmark binary (bench/src/main.rs
//! includes this file), so that both run with the same memory behaviour.

/// A caching allocator: tensors of the same sizes are made every step, and the system allocator
/// returns them to the kernel and faults them back in (measured in bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc hands freed memory back to the kernel a moment after it is freed (its `purge_delay`, 10
/// ms in v2, 1 s in v3). A training step frees and allocates the same large buffers every 20 to 200
/// ms, and each hand-back makes the kernel zero those pages again on the next touch: a third of a
/// convolutional or LSTM training step (bench/README.md). With purging off, the buffers are reused
/// from step to step; the peak resident memory stays the same (the step's working set is the peak),
/// but memory freed after the peak stays with the process until it exits. A `MIMALLOC_PURGE_DELAY`
/// the user set is left alone.
pub fn keep_freed_memory_between_steps() {
    // `mi_option_purge_delay`, the 16th option in mimalloc's v2 and v3 headers (the order
    // `MIMALLOC_VERBOSE=1` prints); libmimalloc-sys has no name for it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain option call, made before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    }
}
