//! The `kiln` command; its code is `kiln::cli`, so programs that register custom losses can
//! offer the same command.

mod allocator;

fn main() -> std::process::ExitCode {
    allocator::keep_freed_memory_between_steps();
    kiln::cli::main()
}
