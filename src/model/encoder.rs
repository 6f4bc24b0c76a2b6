//! The encoder of a model: BERT or ESM-2, and the one place where a forward pass picks the
//! packed inference path or the differentiable one ([`packed::forward_path`]).

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;

use super::config::{Activation, Arch, EncoderConfig, PositionEmbedding};
use super::packed::{self, ForwardPath};
use super::{bert, esm, lora, params, Precision};
use crate::kernels::ops;
use crate::tokenize::TokenBatch;

/// A BERT or ESM-2 encoder.
pub enum Encoder {
    Bert(bert::Bert),
    Esm(esm::Esm),
}

impl Encoder {
    pub fn new(b: &params::Builder, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let arch = cfg.arch();
        let b = b.pp(arch.prefix());
        Ok(match arch {
            Arch::Bert => Encoder::Bert(bert::Bert::new(&b, cfg)?),
            Arch::Esm => Encoder::Esm(esm::Esm::new(&b, cfg)?),
        })
    }

    /// Last hidden states [B, T, H]. `rng` enables dropout (training). Runs the packed
    /// inference path or the differentiable one as [`packed::forward_path`] decides.
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Encoder::Bert(m) => self.forward_until(ids, attention_mask, m.layers.len(), rng),
            Encoder::Esm(m) => self.forward_esm(m, ids, attention_mask, m.layers.len(), true, rng),
        }
    }

    /// The compute precision of the differentiable path ([`Precision`]: bf16 hidden states on
    /// f32 weights). The packed inference path (CPU) always computes in f32.
    pub fn set_precision(&mut self, precision: Precision) {
        match self {
            Encoder::Bert(m) => m.compute = precision.dtype(),
            Encoder::Esm(m) => m.compute = precision.dtype(),
        }
    }

    /// Adds LoRA adapters (see [`lora`]) with parameters from `b` (the model's root builder).
    pub fn attach_lora(&mut self, b: &params::Builder, cfg: &lora::LoraConfig) -> Result<()> {
        let arch = self.config().arch();
        let b = b.pp(arch.prefix());
        let layers = match self {
            Encoder::Bert(m) => m.layer_linears(),
            Encoder::Esm(m) => m.layer_linears(),
        };
        Ok(cfg.attach(&b, layers)?)
    }

    /// Hidden states [B, T, H] after the embeddings and the first `until` layers (before
    /// ESM-2's final LayerNorm, which [`Self::forward_from`] applies). What
    /// `train --train-top-layers` caches.
    pub fn forward_until(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        until: usize,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Encoder::Bert(m) => {
                m.check_positions(ids)?;
                if packed::forward_path(rng.is_some(), ids, || m.is_detached())
                    == ForwardPath::Packed
                {
                    if let Some(out) = packed::bert::forward_until(m, ids, attention_mask, until)? {
                        return Ok(out);
                    }
                }
                m.forward_until(ids, attention_mask, until, rng)
            }
            Encoder::Esm(m) => self.forward_esm(m, ids, attention_mask, until, false, rng),
        }
    }

    /// ESM-2's embeddings and layers `..until`, then its final LayerNorm if `final_norm`, on
    /// the path [`packed::forward_path`] picks.
    fn forward_esm(
        &self,
        m: &esm::Esm,
        ids: &Tensor,
        attention_mask: &Tensor,
        until: usize,
        final_norm: bool,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        if packed::forward_path(rng.is_some(), ids, || m.is_detached()) == ForwardPath::Packed {
            if let Some(out) =
                packed::esm::forward_range(m, ids, attention_mask, until, final_norm)?
            {
                return Ok(out);
            }
        }
        m.forward_range(ids, attention_mask, until, final_norm, rng)
    }

    /// The rest of the encoder from layer `from` on, applied to the states that
    /// [`Self::forward_until`] gave for `from`: the last hidden states [B, T, H].
    pub fn forward_from(
        &self,
        x: &Tensor,
        attention_mask: &Tensor,
        from: usize,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Encoder::Bert(m) => m.forward_from(x, attention_mask, from, rng),
            Encoder::Esm(m) => m.forward_from(x, attention_mask, from, rng),
        }
    }

    /// Freezes the embeddings and the first `n` layers (they get no gradient).
    pub fn freeze(&mut self, n: usize) {
        match self {
            Encoder::Bert(m) => m.freeze(n),
            Encoder::Esm(m) => m.freeze(n),
        }
    }

    pub fn config(&self) -> &EncoderConfig {
        match self {
            Encoder::Bert(m) => m.config(),
            Encoder::Esm(m) => m.config(),
        }
    }

    /// The same encoder outside the autograd graph (shared weights), for inference.
    pub fn detached(&self) -> Self {
        match self {
            Encoder::Bert(m) => Encoder::Bert(m.detached()),
            Encoder::Esm(m) => Encoder::Esm(m.detached()),
        }
    }

    /// Mean of the last hidden states over residue tokens: [B, H] (inference).
    pub fn embed(&self, batch: &TokenBatch) -> candle_core::Result<Tensor> {
        let hidden = self
            .detached()
            .forward(&batch.ids, &batch.attention_mask, None)?;
        ops::masked_mean(&hidden, &batch.residue_mask)
    }
}

/// Encoder sizes for `scratch:SIZE` (ProtBERT-style BERT from random initialisation;
/// `protbert` is ProtBERT's own shape).
pub fn scratch_config(size: &str) -> Result<EncoderConfig> {
    let (hidden, layers, heads) = match size {
        "tiny" => (64, 2, 4),
        "small" => (128, 4, 4),
        "base" => (256, 6, 8),
        // ProtBERT's shape (420M parameters), for benchmarks.
        "protbert" => (1024, 30, 16),
        other => bail!(
            "unknown scratch size {other:?} (choose scratch:tiny, scratch:small, scratch:base, \
             scratch:protbert, or scratch:DIR for the architecture of the model directory DIR \
             with random weights)"
        ),
    };
    Ok(EncoderConfig {
        model_type: Arch::Bert,
        vocab_size: crate::tokenize::PROTBERT_VOCAB.len(),
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: hidden * 4,
        max_position_embeddings: 1026,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.0,
        pad_token_id: Some(0),
        type_vocab_size: 2,
        hidden_act: Activation::Gelu,
        position_embedding_type: PositionEmbedding::Absolute,
        initializer_range: 0.02,
        token_dropout: false,
        mask_token_id: None,
        emb_layer_norm_before: None,
    })
}
