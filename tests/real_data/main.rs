//! The real-data suite: tests on the real checkpoints and data sets in `../shared` (beside
//! the repository, not in it): PyTorch parity, training on ESM-2 8M and AntiBERTy, bit-for-bit
//! determinism and resume under load, MPI data parallelism, the DeepLoc readers on the real
//! files, and end-to-end CLI runs.
//!
//! `cargo test --test real_data` runs it (`.ci/run` always does). It is not part of a plain
//! `cargo test` (`test = false` in `Cargo.toml`), which needs only committed files. Every test
//! here **fails**, never skips, when `../shared` or `mpirun` is missing.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod data_readers;
mod determinism;
mod device;
mod distributed;
mod frozen;
mod gradients;
mod imports;
mod lora;
mod parity;
mod reference_head;
mod top_layers;
