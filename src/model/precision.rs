//! The encoder's compute precision: fp32, or bf16 compute on fp32 master weights.
//!
//! With bf16 the weights stay f32 (what the optimizer updates and checkpoints hold); each
//! linear layer casts its weight to the activations' dtype when it uses it (the cast's
//! backward returns an f32 gradient), the hidden states between layers are bf16, and the
//! numerically delicate parts run in f32: LayerNorm statistics and its affine, the attention
//! softmax (with the finite padding mask [`crate::kernels::ops::MASK_NEG`]), and everything
//! after the encoder (heads, losses).

use candle_core::DType;
use serde::{Deserialize, Serialize};

/// `--precision`: the dtype of the encoder's activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere.
    #[default]
    Fp32,
    /// bf16 activations and matrix products, f32 master weights, norms, softmax and loss.
    Bf16,
}

impl Precision {
    /// The activations' dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
