//! ESM-2 encoder: pre-LayerNorm transformer with rotary positions, `token_dropout`
//! embedding scaling and a final `emb_layer_norm_after`. Tensor names follow Hugging Face
//! `EsmModel`.

use candle_core::{DType, Result, Tensor};
use rand_chacha::ChaCha8Rng;

use super::config::EncoderConfig;
use super::layers::{
    all_detached, linear_activation, Embedding, LayerNorm, Linear, TransformerLayer,
};
use super::params::Builder;
use crate::kernels::attention::{self_attention, AttentionMask};
use crate::kernels::dropout::dropout_add;
use crate::kernels::rotary::{self, RotaryTables};

/// ESM-2 was pretrained masking 15% of tokens, 80% of those with `<mask>`; with
/// `token_dropout` the embeddings are rescaled by the observed mask ratio.
pub(super) const MASK_RATIO_TRAIN: f64 = 0.15 * 0.8;

/// ESM-2's layer: pre-LayerNorm, `attention.LayerNorm` before the attention and `LayerNorm`
/// before the feed-forward.
pub(super) type Layer = TransformerLayer;

/// An ESM-2 encoder; `forward` returns the last hidden states [B, T, hidden].
#[derive(Clone)]
pub struct Esm {
    pub(super) cfg: EncoderConfig,
    pub(super) word: Embedding,
    pub(super) emb_norm_before: Option<LayerNorm>,
    pub(super) layers: Vec<Layer>,
    /// Each layer's rotary frequencies as stored in the checkpoint (ESM-2 releases store
    /// them at reduced precision, and transformers uses the stored values); computed when
    /// absent.
    pub(super) inv_freqs: Vec<Vec<f32>>,
    pub(super) final_norm: LayerNorm,
    /// The dtype of the hidden states between layers ([`super::Precision`]).
    pub(super) compute: DType,
}

impl Esm {
    pub fn new(b: &Builder, cfg: &EncoderConfig) -> Result<Self> {
        let std = cfg.initializer_range;
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let word = Embedding::new(&b.pp("embeddings.word_embeddings"), cfg.vocab_size, h, std)?;
        let emb_norm_before = if cfg.emb_layer_norm_before.unwrap_or(false) {
            Some(LayerNorm::new(&b.pp("embeddings.layer_norm"), h, eps)?)
        } else {
            None
        };
        let layer = |i: usize| b.pp("encoder.layer").pp(i);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(&layer(i), cfg, ["attention.LayerNorm", "LayerNorm"]))
            .collect::<Result<Vec<_>>>()?;
        let inv_freqs = (0..cfg.num_hidden_layers)
            .map(|i| {
                let rotary = layer(i).pp("attention.self.rotary_embeddings");
                Ok(match rotary.buffer("inv_freq")? {
                    Some(t) => t.to_dtype(DType::F32)?.to_vec1()?,
                    None => default_inv_freq(cfg.head_dim()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::new(&b.pp("encoder.emb_layer_norm_after"), h, eps)?;
        Ok(Self {
            cfg: cfg.clone(),
            word,
            emb_norm_before,
            layers,
            inv_freqs,
            final_norm,
            compute: DType::F32,
        })
    }

    /// A copy sharing the weights' storage but outside the autograd graph, for inference
    /// (see `Bert::detached`).
    pub fn detached(&self) -> Self {
        let mut m = self.clone();
        m.freeze(m.layers.len());
        m.final_norm = m.final_norm.detached();
        m
    }

    /// Cuts the embeddings and the first `n` layers out of the autograd graph.
    pub fn freeze(&mut self, n: usize) {
        self.word = self.word.detached();
        if let Some(norm) = &self.emb_norm_before {
            self.emb_norm_before = Some(norm.detached());
        }
        for l in self.layers.iter_mut().take(n) {
            *l = l.detached();
        }
    }

    /// Last hidden states on the differentiable path ([`Encoder`](super::Encoder) picks the
    /// path).
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        self.forward_range(ids, attention_mask, self.layers.len(), true, rng)
    }

    /// Hidden states after the embeddings and the first `until` layers [B, T, H] (before the
    /// final LayerNorm, which [`Self::forward_from`] applies).
    pub fn forward_until(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        until: usize,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        self.forward_range(ids, attention_mask, until, false, rng)
    }

    /// The embeddings and layers `..until`, then the final LayerNorm if `final_norm`
    /// (differentiable path).
    pub(super) fn forward_range(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        until: usize,
        final_norm: bool,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let until = until.min(self.layers.len());
        let mask = attention_mask.to_dtype(DType::F32)?;
        let mut x = self.word.forward(ids)?;
        if self.cfg.token_dropout {
            x = self.token_dropout_scale(ids, &mask, &x)?;
        }
        if let Some(norm) = &self.emb_norm_before {
            x = norm.forward(&x)?;
        }
        // Padding positions are zeroed, as in HF `EsmEmbeddings`.
        x = x.broadcast_mul(&mask.unsqueeze(2)?.to_dtype(x.dtype())?)?;
        self.run_layers(&x, attention_mask, 0, until, final_norm, rng)
    }

    /// The layers from `from` on (and the final LayerNorm), applied to hidden states `x`
    /// [B, T, H] that the first `from` layers produced ([`Self::forward_until`]).
    pub fn forward_from(
        &self,
        x: &Tensor,
        attention_mask: &Tensor,
        from: usize,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        self.run_layers(x, attention_mask, from, self.layers.len(), true, rng)
    }

    /// Layers `from..until` on `x`, then the final LayerNorm if `final_norm`.
    fn run_layers(
        &self,
        x: &Tensor,
        attention_mask: &Tensor,
        from: usize,
        until: usize,
        final_norm: bool,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let mut x = x.to_dtype(self.compute)?;
        let mask = AttentionMask::new(attention_mask)?;
        // Every layer of a released checkpoint stores the same frequencies: build the tables
        // once and rebuild only if a layer differs.
        let mut tables: Option<(&[f32], RotaryTables)> = None;
        let range = from.min(until)..until;
        for (layer, inv_freq) in self.layers[range.clone()]
            .iter()
            .zip(&self.inv_freqs[range])
        {
            if tables
                .as_ref()
                .is_none_or(|(f, _)| *f != inv_freq.as_slice())
            {
                let rot = RotaryTables::new(t, inv_freq, x.device())?;
                tables = Some((inv_freq, rot));
            }
            let (_, rot) = tables.as_ref().expect("set above");
            x = self.layer_forward(layer, &x, &mask, rot, rng.as_deref_mut())?;
        }
        // The output is f32 whatever the compute dtype (heads, losses and caches are), and
        // so is the final LayerNorm's.
        let x = x.to_dtype(DType::F32)?;
        if final_norm {
            self.final_norm.forward(&x)
        } else {
            Ok(x)
        }
    }

    /// True when no weight is part of an autograd graph (a [`Esm::detached`] copy): then
    /// nobody can ask for gradients and the packed inference path may be used
    /// ([`packed::forward_path`](super::packed::forward_path)).
    pub(super) fn is_detached(&self) -> bool {
        let mut tensors = vec![
            &self.word.weight,
            &self.final_norm.weight,
            &self.final_norm.bias,
        ];
        if let Some(n) = &self.emb_norm_before {
            tensors.extend([&n.weight, &n.bias]);
        }
        let linears = self.layers.iter().flat_map(Layer::linears);
        tensors.extend(self.layers.iter().flat_map(Layer::norm_tensors));
        all_detached(linears, tensors)
    }

    /// Zeroes `<mask>` embeddings and rescales by (1 - 0.12) / (1 - observed mask ratio).
    fn token_dropout_scale(&self, ids: &Tensor, mask: &Tensor, x: &Tensor) -> Result<Tensor> {
        let Some(mask_id) = self.cfg.mask_token_id else {
            return Ok(x.clone());
        };
        let is_mask = ids.eq(mask_id)?.to_dtype(DType::F32)?; // [B, T]
        let keep = (1.0 - &is_mask)?;
        let lengths = mask.sum_keepdim(1)?.clamp(1.0, f64::MAX)?; // [B, 1]
        let observed = is_mask.sum_keepdim(1)?.broadcast_div(&lengths)?;
        let scale = ((1.0 - observed)?.recip()? * (1.0 - MASK_RATIO_TRAIN))?; // [B, 1]
        let factor = keep
            .broadcast_mul(&scale)?
            .unsqueeze(2)?
            .to_dtype(x.dtype())?;
        x.broadcast_mul(&factor)
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: &AttentionMask,
        rot: &RotaryTables,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let heads = self.cfg.num_attention_heads;
        let scale = 1.0 / (self.cfg.head_dim() as f64).sqrt();
        let h = l.attn_norm.forward(x)?;
        let q = rotary::apply(&l.query.forward(&h)?, heads, rot, scale)?;
        let k = rotary::apply(&l.key.forward(&h)?, heads, rot, 1.0)?;
        let v = l.value.forward(&h)?;
        let p_attn = self.cfg.attention_probs_dropout_prob;
        let ctx = self_attention(&q, &k, &v, heads, mask, p_attn, rng.as_deref_mut())?;
        let p = self.cfg.hidden_dropout_prob;
        let x = dropout_add(&l.attn_out.forward(&ctx)?, x, p, rng.as_deref_mut())?;
        let h = l.ffn_norm.forward(&x)?;
        let inter = linear_activation(&l.intermediate, &h, self.cfg.hidden_act)?;
        dropout_add(&l.output.forward(&inter)?, &x, p, rng)
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

fn default_inv_freq(dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / dim as f32))
        .collect()
}
