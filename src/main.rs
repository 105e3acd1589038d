//! The `kiln` command; its code is `kiln::cli`, so programs that register custom losses can
//! offer the same command.

/// A caching allocator: tensors of the same sizes are made every step, and the system allocator
/// returns them to the kernel and faults them back in (measured in bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    kiln::cli::main()
}
