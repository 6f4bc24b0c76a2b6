//! Process-wide tuning for tensor workloads, applied once at start-up (CLI and benchmarks).
//!
//! **Allocator.** candle allocates a fresh buffer for every op output. glibc serves requests
//! above its mmap threshold (128 KB to start) with `mmap` and returns them with `munmap`, so
//! every activation of every layer of every step is page-faulted and zeroed by the kernel
//! again: measured at 15-20% of an ESM-2 8M training step (batch 8 x 256). Raising the
//! threshold to glibc's maximum (32 MB) and never trimming the heap keeps freed buffers for
//! reuse; the price is that peak heap memory stays mapped until exit.
//!
//! **candle's element-wise thread pool.** candle 0.11 runs element-wise ops (the gradient
//! additions of every backward) on its own pool (`candle-bp-*` threads) beside rayon's, and
//! after each op its threads spin 25,000 rounds before parking. With as many threads as
//! cores that spin takes a core from the rayon threads running the next GEMM: 6.6% of the
//! CPU samples of an ESM-2 8M training step. Parking at once (a futex wake of a few
//! microseconds per op instead) made that step 0.79 -> 0.74 s (means of 8 interleaved pairs,
//! 7 of them faster) and left AntiBERTy and ProtBERT-shape steps unchanged within noise.

/// Applies the tuning once, before the first tensor op and before other threads start
/// (the allocator part is a no-op off glibc).
pub fn tune_for_tensors() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; called before threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    // Read once, when candle's pool starts (its first element-wise op); a user's own
    // setting wins.
    if std::env::var_os(CANDLE_SPIN_VAR).is_none() {
        std::env::set_var(CANDLE_SPIN_VAR, "0");
    }
}

/// How many rounds candle's element-wise pool spins before parking (candle's default 25,000).
pub const CANDLE_SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
