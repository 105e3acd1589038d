//! Direct access to the memory of CPU tensors, for fused kernels' backward passes (which get
//! tensors, not storages).

use candle_core::{Storage, Tensor, WithDType};

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
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
    f(&cpu.as_slice::<T>()?[start..end])
}
