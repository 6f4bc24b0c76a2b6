//! protloc: fine-tune protein language models (ProtBERT, ESM-2) to predict subcellular
//! localization from sequence, evaluate them, and predict at scale.
//!
//! Layout: `data` (readers, splits, stats) -> `tokenize` (vocab, truncation, batching) ->
//! `model` (BERT / ESM-2 encoders, heads, checkpoint loading) -> `train` / `eval` / `infer`,
//! with `cli` wiring them to the `protloc` binary. `kernels` is the CPU compute under the
//! models (autograd ops, GEMM and attention tiles, packed inference), independent of them.

pub mod artifacts;
pub mod cache;
pub mod cli;
pub mod data;
pub mod demo;
pub mod device;
pub mod dist;
pub mod eval;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod serve;
pub mod tokenize;
pub mod train;
