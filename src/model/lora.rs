//! LoRA (Hu et al. 2021): low-rank adapters on an encoder's frozen linear layers: which
//! layers get one ([`LoraConfig`]) and attaching them; the adapter itself is
//! [`layers::Lora`](super::layers::Lora).
//!
//! Fine-tuning with adapters trains `r (in + out)` numbers per adapted layer instead of
//! `in x out`, and no optimizer state for the encoder's own weights. Saving merges every
//! adapter into the weight it adapts ([`ParamStore::merged_tensors`](super::params::ParamStore::merged_tensors)),
//! so a run directory trained with LoRA is an ordinary model: `eval`, `predict`, `serve`
//! and the packed inference kernels need no change and cost nothing extra.

use candle_core::Result;
use serde::{Deserialize, Serialize};

use super::layers::Linear;
use super::params::Builder;

/// Which linear layers of each encoder layer get an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// Both feed-forward projections (intermediate and output).
    Ffn,
}

impl LoraTarget {
    /// Every target: all projections of attention and feed-forward.
    pub const ALL: [LoraTarget; 5] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Ffn,
    ];

    /// Sub-module paths (HF names, under `encoder.layer.N`) of the layers this target adapts.
    pub fn paths(self) -> &'static [&'static str] {
        match self {
            LoraTarget::Q => &["attention.self.query"],
            LoraTarget::K => &["attention.self.key"],
            LoraTarget::V => &["attention.self.value"],
            LoraTarget::O => &["attention.output.dense"],
            LoraTarget::Ffn => &["intermediate.dense", "output.dense"],
        }
    }
}

/// Where adapters go and how large they are. Saved in `training_args.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r of every adapter (0: no adapters, the frozen encoder).
    pub rank: usize,
    /// Adapter outputs are scaled by `alpha / rank`.
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
    /// Encoder layers below this index get no adapter (and, being frozen, no backward pass).
    pub from_layer: usize,
}

/// The linear layers of an encoder layer that adapters can target, in the order
/// [`LoraConfig::attach`] takes them (HF sub-module paths under `encoder.layer.N`).
pub const LAYER_LINEARS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

impl LoraConfig {
    /// Adds adapters to the linear layers this config selects: `layers` holds each encoder
    /// layer's linears in [`LAYER_LINEARS`] order, `b` is the encoder's builder (under its
    /// `bert.`/`esm.` prefix). Adapted layers' own weights leave the autograd graph.
    pub fn attach<'a>(
        &self,
        b: &Builder,
        layers: impl IntoIterator<Item = [&'a mut Linear; 6]>,
    ) -> Result<()> {
        for (index, linears) in layers.into_iter().enumerate() {
            let layer = b.pp("encoder.layer").pp(index);
            for (path, lin) in LAYER_LINEARS.into_iter().zip(linears) {
                if self.adapts(index, path) {
                    *lin = lin.with_lora(&layer.pp(path), self.rank, self.alpha)?;
                }
            }
        }
        Ok(())
    }

    /// Whether encoder layer `layer`'s sub-module at `path` (see [`LoraTarget::paths`]) is
    /// adapted.
    pub fn adapts(&self, layer: usize, path: &str) -> bool {
        self.rank > 0
            && layer >= self.from_layer
            && self.targets.iter().any(|t| t.paths().contains(&path))
    }
}
