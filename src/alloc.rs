//! Allocator tuning for tensor workloads.
//!
//! candle allocates a fresh buffer for every op output. glibc serves requests above its
//! mmap threshold (128 KB to start) with `mmap` and returns them with `munmap`, so every
//! activation of every layer of every step is page-faulted and zeroed by the kernel again:
//! measured at 15-20% of an ESM-2 8M training step (batch 8 x 256). Raising the threshold
//! to glibc's maximum (32 MB) and never trimming the heap keeps freed buffers for reuse;
//! the price is that peak heap memory stays mapped until exit.

/// Applies the tuning once, before the first large allocation. No-op off glibc.
pub fn tune_for_tensors() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; called before threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
