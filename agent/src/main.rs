//! `lbs`: thin entry point; everything lives in the `lbs_agent` library.

fn main() -> std::process::ExitCode {
    tune_malloc();
    lbs_agent::cli::main()
}

/// Fixes glibc's thresholds for giving memory back. By default they adapt: after the first
/// 256 KiB sync buffer is freed, such buffers come from the heap, whose top is trimmed as soon
/// as 512 KiB of it is free — so each new buffer faulted its pages in again. A 256 MiB pull
/// spent an eighth of its time in page faults and `brk` (0.25 s → 0.21 s with fixed
/// thresholds, the receiver's peak memory 1.5 MB higher).
// `unsafe` for the one C call that sets the allocator's parameters.
#[allow(unsafe_code)]
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets two of the allocator's parameters; called before any thread
    // starts.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 4 << 20);
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}
