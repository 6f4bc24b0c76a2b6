//! BERT encoder (ProtBERT, AntiBERTy): post-LayerNorm transformer with learned absolute
//! positions. Tensor names follow Hugging Face `BertModel`.

use candle_core::{DType, Result, Tensor};
use rand_chacha::ChaCha8Rng;

use super::config::EncoderConfig;
use super::layers::{
    all_detached, linear_activation, Embedding, LayerNorm, Linear, TransformerLayer,
};
use super::params::Builder;
use crate::kernels::attention::{self_attention, AttentionMask};
use crate::kernels::dropout::{dropout, dropout_add};

#[derive(Clone)]
pub(super) struct Embeddings {
    pub(super) word: Embedding,
    pub(super) position: Embedding,
    pub(super) token_type: Embedding,
    pub(super) norm: LayerNorm,
}

/// BERT's layer: post-LayerNorm, `attention.output.LayerNorm` after the attention's
/// residual and `output.LayerNorm` after the feed-forward's.
pub(super) type Layer = TransformerLayer;

/// A BERT encoder; `forward` returns the last hidden states [B, T, hidden].
#[derive(Clone)]
pub struct Bert {
    pub(super) cfg: EncoderConfig,
    pub(super) embeddings: Embeddings,
    pub(super) layers: Vec<Layer>,
    /// The dtype of the hidden states between layers ([`super::Precision`]).
    pub(super) compute: DType,
}

impl Bert {
    pub fn new(b: &Builder, cfg: &EncoderConfig) -> Result<Self> {
        let std = cfg.initializer_range;
        let h = cfg.hidden_size;
        let e = b.pp("embeddings");
        let embeddings = Embeddings {
            word: Embedding::new(&e.pp("word_embeddings"), cfg.vocab_size, h, std)?,
            position: Embedding::new(
                &e.pp("position_embeddings"),
                cfg.max_position_embeddings,
                h,
                std,
            )?,
            token_type: Embedding::new(
                &e.pp("token_type_embeddings"),
                cfg.type_vocab_size,
                h,
                std,
            )?,
            norm: LayerNorm::new(&e.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = b.pp("encoder.layer").pp(i);
                Layer::new(&l, cfg, ["attention.output.LayerNorm", "output.LayerNorm"])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embeddings,
            layers,
            compute: DType::F32,
        })
    }

    /// A copy sharing the weights' storage but outside the autograd graph, for inference:
    /// ops on trainable variables record their inputs, which would keep every activation of
    /// a forward pass alive until its end.
    pub fn detached(&self) -> Self {
        let mut m = self.clone();
        m.freeze(m.layers.len());
        m
    }

    /// Cuts the embeddings and the first `n` layers out of the autograd graph.
    pub fn freeze(&mut self, n: usize) {
        let e = &mut self.embeddings;
        e.word = e.word.detached();
        e.position = e.position.detached();
        e.token_type = e.token_type.detached();
        e.norm = e.norm.detached();
        for l in self.layers.iter_mut().take(n) {
            *l = l.detached();
        }
    }

    /// `ids` [B, T] u32, `attention_mask` [B, T] (1 = token, 0 = padding), on the
    /// differentiable path ([`Encoder`](super::Encoder) picks the path).
    /// `rng` enables dropout (training); `None` is deterministic inference.
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        self.forward_until(ids, attention_mask, self.layers.len(), rng)
    }

    /// The number of tokens of `ids` [B, T], or an error when the model has fewer positions.
    pub(super) fn check_positions(&self, ids: &Tensor) -> Result<usize> {
        let (_, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            );
        }
        Ok(t)
    }

    /// Hidden states after the embeddings and the first `until` layers [B, T, H].
    pub fn forward_until(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        until: usize,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let until = until.min(self.layers.len());
        let t = self.check_positions(ids)?;
        let e = &self.embeddings;
        let positions = e.position.weight.narrow(0, 0, t)?;
        let token_type = e.token_type.weight.narrow(0, 0, 1)?;
        let x = e
            .word
            .forward(ids)?
            .broadcast_add(&positions)?
            .broadcast_add(&token_type)?;
        let mut x = dropout(
            &e.norm.forward(&x)?,
            self.cfg.hidden_dropout_prob,
            rng.as_deref_mut(),
        )?;
        x = x.to_dtype(self.compute)?;
        let mask = AttentionMask::new(attention_mask)?;
        for layer in &self.layers[..until] {
            x = self.layer_forward(layer, &x, &mask, rng.as_deref_mut())?;
        }
        // The output is f32 whatever the compute dtype (heads, losses and caches are).
        x.to_dtype(DType::F32)
    }

    /// The layers from `from` on, applied to hidden states `x` [B, T, H] that the first
    /// `from` layers produced ([`Self::forward_until`]): the encoder's output.
    pub fn forward_from(
        &self,
        x: &Tensor,
        attention_mask: &Tensor,
        from: usize,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let mask = AttentionMask::new(attention_mask)?;
        let mut x = x.to_dtype(self.compute)?;
        for layer in &self.layers[from.min(self.layers.len())..] {
            x = self.layer_forward(layer, &x, &mask, rng.as_deref_mut())?;
        }
        x.to_dtype(DType::F32)
    }

    /// True when no weight is part of an autograd graph (see `Esm::is_detached`): what lets
    /// [`packed::forward_path`](super::packed::forward_path) pick the packed path.
    pub(super) fn is_detached(&self) -> bool {
        let e = &self.embeddings;
        let mut tensors = vec![
            &e.word.weight,
            &e.position.weight,
            &e.token_type.weight,
            &e.norm.weight,
            &e.norm.bias,
        ];
        let linears = self.layers.iter().flat_map(Layer::linears);
        tensors.extend(self.layers.iter().flat_map(Layer::norm_tensors));
        all_detached(linears, tensors)
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: &AttentionMask,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let heads = self.cfg.num_attention_heads;
        let scale = 1.0 / (self.cfg.head_dim() as f64).sqrt();
        let q = l.query.forward_scaled(x, scale)?;
        let k = l.key.forward(x)?;
        let v = l.value.forward(x)?;
        let attn_p = self.cfg.attention_probs_dropout_prob;
        let ctx = self_attention(&q, &k, &v, heads, mask, attn_p, rng.as_deref_mut())?;
        let p = self.cfg.hidden_dropout_prob;
        let x = dropout_add(&l.attn_out.forward(&ctx)?, x, p, rng.as_deref_mut())?;
        let x = l.attn_norm.forward(&x)?;
        let inter = linear_activation(&l.intermediate, &x, self.cfg.hidden_act)?;
        l.ffn_norm
            .forward(&dropout_add(&l.output.forward(&inter)?, &x, p, rng)?)
    }

    /// Every layer's linear layers in [`super::lora::LAYER_LINEARS`] order: what LoRA
    /// adapts ([`super::lora::LoraConfig::attach`]).
    pub fn layer_linears(&mut self) -> Vec<[&mut Linear; 6]> {
        self.layers.iter_mut().map(Layer::linears_mut).collect()
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }
}
