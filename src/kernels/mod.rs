//! CPU compute under the encoders and heads, independent of the models: functions of tensors
//! and raw f32 slices, with no parameters or configs (nothing here imports `crate::model`,
//! and no other part of the crate either).
//!
//! From the bottom up:
//! - [`simd`]: run-time AVX2/FMA dispatch and the vectorisable `exp`/`erf`;
//! - [`buffers`]: read views of tensor storage, weight layouts, the per-thread buffer pool;
//! - `custom_op`: how the CPU ops of three f32 tensors (linear, LayerNorm, fused attention)
//!   become candle custom ops;
//! - [`activation`], [`norm`]: activations and layer normalisation on raw row slices;
//! - [`gemm`]: linear layers on raw row slices (the `gemm` crate);
//! - [`tiles`]: register-tiled products whose one dimension is an attention head's width,
//!   and the block softmax attention built from them;
//! - [`packed_attention`]: the packed-token layout of inference and its attention;
//! - [`rotary`]: rotary position embeddings (tables, fused op, in-place rotation);
//! - [`dropout`]: dropout, one counter-based mask for every place training drops values;
//! - [`ops`], [`linear`]: tensor-level autograd ops with hand-written backwards;
//! - [`fused_attention`]: the training attention as one custom op;
//! - [`attention`]: the differentiable path's self-attention (fused or composed).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

static COMPOSED_ONLY: AtomicBool = AtomicBool::new(false);

/// Whether tensors on `device` take this module's fused CPU kernels. Everywhere else (a GPU)
/// each op has a composed form built from candle's own differentiable ops, which is also
/// what [`set_composed_only`] forces on the CPU.
pub fn fused_on(device: &Device) -> bool {
    device.is_cpu() && !COMPOSED_ONLY.load(Ordering::Relaxed)
}

/// Runs the composed (device-generic) forms on the CPU too: process-wide, for checking the
/// GPU code path against the fused kernels on a machine without a GPU (`protloc
/// check-device --device cpu`, tests/composed_ops.rs).
pub fn set_composed_only(on: bool) {
    COMPOSED_ONLY.store(on, Ordering::Relaxed);
}

pub mod activation;
pub mod attention;
pub mod buffers;
mod custom_op;
pub mod dropout;
pub mod fused_attention;
pub mod gemm;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod packed_attention;
pub mod rotary;
pub mod simd;
#[cfg(test)]
pub(crate) mod test_util;
pub mod tiles;
