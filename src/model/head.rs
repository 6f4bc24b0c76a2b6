//! Classification heads on top of an encoder's hidden states.

use candle_core::{Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::nn::Linear;
use super::ops;
use super::params::Builder;

/// How per-token hidden states become one vector per protein.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The first (`[CLS]`/`<cls>`) token, as the reference workflow does.
    Cls,
    /// Mean over residue tokens (special tokens and padding excluded): the ProtTrans
    /// convention, usually better for frozen or lightly tuned encoders.
    Mean,
}

/// Pools `hidden` [B, T, H] with `residue_mask` [B, T] (1.0 on residues).
pub fn pool(hidden: &Tensor, residue_mask: &Tensor, pool: Pool) -> Result<Tensor> {
    match pool {
        Pool::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
        Pool::Mean => ops::masked_mean(hidden, residue_mask),
    }
}

/// Dropout + linear layer (`classifier.weight` [C, H], `classifier.bias` [C]).
pub struct ClassifierHead {
    pub dropout: f64,
    pub linear: Linear,
}

impl ClassifierHead {
    pub fn new(b: &Builder, hidden: usize, num_labels: usize, dropout: f64) -> Result<Self> {
        Ok(Self {
            dropout,
            linear: Linear::new(b, hidden, num_labels, 0.02)?,
        })
    }

    /// A copy outside the autograd graph, for inference.
    pub fn detached(&self) -> Self {
        Self {
            dropout: self.dropout,
            linear: self.linear.detached(),
        }
    }

    /// `pooled` [B, H] -> logits [B, C]; `rng` enables dropout (training).
    pub fn forward(&self, pooled: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        self.linear
            .forward(&ops::dropout(pooled, self.dropout, rng)?)
    }
}
