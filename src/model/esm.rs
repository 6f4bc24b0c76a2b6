//! ESM-2 encoder: pre-LayerNorm transformer with rotary positions, `token_dropout`
//! embedding scaling and a final `emb_layer_norm_after`. Tensor names follow Hugging Face
//! `EsmModel`.

use candle_core::{DType, Result, Tensor};
use rand_chacha::ChaCha8Rng;

use super::bert::linear_activation;
use super::config::EncoderConfig;
use super::dropout::dropout_add;
use super::kernels::{self, Act};
use super::nn::{self, Embedding, LayerNorm, Linear};
use super::params::Builder;
use super::rotary::{self, RotaryTables};

/// ESM-2 was pretrained masking 15% of tokens, 80% of those with `<mask>`; with
/// `token_dropout` the embeddings are rescaled by the observed mask ratio.
const MASK_RATIO_TRAIN: f64 = 0.15 * 0.8;

#[derive(Clone)]
struct Layer {
    attn_norm: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    ffn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    /// Rotary frequencies as stored in the checkpoint (ESM-2 releases store them at reduced
    /// precision, and transformers uses the stored values); computed when absent.
    inv_freq: Vec<f32>,
}

/// An ESM-2 encoder; `forward` returns the last hidden states [B, T, hidden].
#[derive(Clone)]
pub struct Esm {
    cfg: EncoderConfig,
    word: Embedding,
    emb_norm_before: Option<LayerNorm>,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
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
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = b.pp("encoder.layer").pp(i);
                let a = l.pp("attention");
                Ok(Layer {
                    attn_norm: LayerNorm::new(&a.pp("LayerNorm"), h, eps)?,
                    query: Linear::projection(&a.pp("self.query"), h, h, std)?,
                    key: Linear::projection(&a.pp("self.key"), h, h, std)?,
                    value: Linear::projection(&a.pp("self.value"), h, h, std)?,
                    attn_out: Linear::projection(&a.pp("output.dense"), h, h, std)?,
                    ffn_norm: LayerNorm::new(&l.pp("LayerNorm"), h, eps)?,
                    intermediate: Linear::projection(
                        &l.pp("intermediate.dense"),
                        h,
                        cfg.intermediate_size,
                        std,
                    )?,
                    output: Linear::projection(
                        &l.pp("output.dense"),
                        cfg.intermediate_size,
                        h,
                        std,
                    )?,
                    inv_freq: match a.pp("self.rotary_embeddings").buffer("inv_freq")? {
                        Some(t) => t.to_dtype(DType::F32)?.to_vec1()?,
                        None => default_inv_freq(cfg.head_dim()),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::new(&b.pp("encoder.emb_layer_norm_after"), h, eps)?;
        Ok(Self {
            cfg: cfg.clone(),
            word,
            emb_norm_before,
            layers,
            final_norm,
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
            *l = Layer {
                attn_norm: l.attn_norm.detached(),
                query: l.query.detached(),
                key: l.key.detached(),
                value: l.value.detached(),
                attn_out: l.attn_out.detached(),
                ffn_norm: l.ffn_norm.detached(),
                intermediate: l.intermediate.detached(),
                output: l.output.detached(),
                inv_freq: l.inv_freq.clone(),
            };
        }
    }

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

    /// The embeddings and layers `..until`, then the final LayerNorm if `final_norm`.
    fn forward_range(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        until: usize,
        final_norm: bool,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let until = until.min(self.layers.len());
        if rng.is_none()
            && ids.device().is_cpu()
            && kernels::packed_inference_enabled()
            && self.is_detached()
        {
            if let Some(out) = self.forward_packed(ids, attention_mask, until, final_norm)? {
                return Ok(out);
            }
        }
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
        let mut x = x.clone();
        let mask = nn::AttentionMask::new(attention_mask)?;
        // Every layer of a released checkpoint stores the same frequencies: build the tables
        // once and rebuild only if a layer differs.
        let mut tables: Option<(&[f32], RotaryTables)> = None;
        for layer in &self.layers[from.min(until)..until] {
            if tables
                .as_ref()
                .is_none_or(|(f, _)| *f != layer.inv_freq.as_slice())
            {
                let rot = RotaryTables::new(t, &layer.inv_freq, x.device())?;
                tables = Some((&layer.inv_freq, rot));
            }
            let (_, rot) = tables.as_ref().expect("set above");
            x = self.layer_forward(layer, &x, &mask, rot, rng.as_deref_mut())?;
        }
        if final_norm {
            self.final_norm.forward(&x)
        } else {
            Ok(x)
        }
    }

    /// True when no weight is part of an autograd graph (a [`Esm::detached`] copy): then
    /// nobody can ask for gradients and the packed inference kernels may be used.
    fn is_detached(&self) -> bool {
        let mut tensors = vec![
            &self.word.weight,
            &self.final_norm.weight,
            &self.final_norm.bias,
        ];
        if let Some(n) = &self.emb_norm_before {
            tensors.extend([&n.weight, &n.bias]);
        }
        for l in &self.layers {
            for lin in [
                &l.query,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.output,
            ] {
                if lin.lora.is_some() {
                    return false; // adapters run in the general path (merged when detached)
                }
                tensors.push(&lin.weight);
                tensors.extend(lin.bias.as_ref());
            }
            for n in [&l.attn_norm, &l.ffn_norm] {
                tensors.extend([&n.weight, &n.bias]);
            }
        }
        tensors.iter().all(|t| !t.track_op())
    }

    /// Inference on packed real tokens (see [`kernels`]): no padding rows, fused attention
    /// over each sequence's own keys, rotary and scaling in one pass. Returns `None` (use the
    /// general path) for non-f32 weights or masks that are not "ones then zeros".
    fn forward_packed(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        until: usize,
        final_norm: bool,
    ) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        if self.word.weight.dtype() != DType::F32 {
            return Ok(None);
        }
        let (_, t) = ids.dims2()?;
        let mask: Vec<Vec<f32>> = attention_mask.to_dtype(DType::F32)?.to_vec2()?;
        let Some(lengths) = kernels::prefix_lengths(&mask) else {
            return Ok(None);
        };
        let ids: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let segs = kernels::segments(&lengths);
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (heads, d) = (cfg.num_attention_heads, cfg.head_dim());
        let eps = cfg.layer_norm_eps as f32;
        let n: usize = lengths.iter().sum();

        let mut x = kernels::take(n * h);
        {
            let word = kernels::view(&self.word.weight)?;
            let word = word.get();
            let vocab = word.len() / h;
            for (row, s) in ids.iter().zip(&segs) {
                let row = &row[..s.len];
                let mask_id = cfg.mask_token_id.filter(|_| cfg.token_dropout);
                // Same arithmetic as `token_dropout_scale`, per sequence.
                let scale = match mask_id {
                    Some(m) => {
                        let observed = row.iter().filter(|&&id| id == m).count() as f32
                            / (s.len.max(1) as f32);
                        (1.0 - observed).recip() * (1.0 - MASK_RATIO_TRAIN) as f32
                    }
                    None => 1.0,
                };
                for (j, &id) in row.iter().enumerate() {
                    let id = id as usize;
                    if id >= vocab {
                        candle_core::bail!("token id {id} out of range for vocab {vocab}");
                    }
                    if mask_id == Some(id as u32) {
                        continue; // `<mask>` embeddings are zeroed
                    }
                    let dst = &mut x[(s.start + j) * h..][..h];
                    for (o, &w) in dst.iter_mut().zip(&word[id * h..][..h]) {
                        *o = w * scale;
                    }
                }
            }
        }
        if let Some(norm) = &self.emb_norm_before {
            let (w, b) = (kernels::view(&norm.weight)?, kernels::view(&norm.bias)?);
            kernels::layer_norm_inplace(&mut x, w.get(), b.get(), eps);
        }
        let act = Act::from_name(&cfg.hidden_act);
        let scale = 1.0 / (d as f64).sqrt();
        let max_len = lengths.iter().copied().max().unwrap_or(0);
        let mut tables: Option<(&[f32], Vec<f32>, Vec<f32>)> = None;
        for l in &self.layers[..until] {
            if tables
                .as_ref()
                .is_none_or(|(fr, _, _)| *fr != l.inv_freq.as_slice())
            {
                let (cos, sin) = rotary::half_tables(max_len, &l.inv_freq);
                tables = Some((&l.inv_freq, cos, sin));
            }
            let (_, cos, sin) = tables.as_ref().expect("set above");
            let hn = {
                let (w, b) = (
                    kernels::view(&l.attn_norm.weight)?,
                    kernels::view(&l.attn_norm.bias)?,
                );
                kernels::layer_norm(&x, w.get(), b.get(), eps)
            };
            let mut q = packed_linear(&hn, &l.query, h, h)?;
            let mut k = packed_linear(&hn, &l.key, h, h)?;
            let v = packed_linear(&hn, &l.value, h, h)?;
            kernels::recycle(hn);
            kernels::rotary_inplace(&mut q, &segs, heads, d, cos, sin, scale as f32);
            kernels::rotary_inplace(&mut k, &segs, heads, d, cos, sin, 1.0);
            let ctx = kernels::attention(&q, &k, &v, &segs, heads, d);
            for buf in [q, k, v] {
                kernels::recycle(buf);
            }
            packed_linear_acc(&ctx, &l.attn_out, &mut x, h, h)?;
            kernels::recycle(ctx);
            let hn = {
                let (w, b) = (
                    kernels::view(&l.ffn_norm.weight)?,
                    kernels::view(&l.ffn_norm.bias)?,
                );
                kernels::layer_norm(&x, w.get(), b.get(), eps)
            };
            let mut inter = packed_linear(&hn, &l.intermediate, h, f)?;
            kernels::recycle(hn);
            kernels::activation_inplace(&mut inter, act);
            packed_linear_acc(&inter, &l.output, &mut x, f, h)?;
            kernels::recycle(inter);
        }
        if final_norm {
            let n = &self.final_norm;
            let (w, b) = (kernels::view(&n.weight)?, kernels::view(&n.bias)?);
            kernels::layer_norm_inplace(&mut x, w.get(), b.get(), eps);
        }
        let out = kernels::unpack(&x, &segs, t, h)?;
        kernels::recycle(x);
        Ok(Some(out))
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
        mask: &nn::AttentionMask,
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
        let ctx = nn::self_attention(&q, &k, &v, heads, mask, p_attn, rng.as_deref_mut())?;
        let p = self.cfg.hidden_dropout_prob;
        let x = dropout_add(&l.attn_out.forward(&ctx)?, x, p, rng.as_deref_mut())?;
        let h = l.ffn_norm.forward(&x)?;
        let inter = linear_activation(&l.intermediate, &h, &self.cfg.hidden_act)?;
        dropout_add(&l.output.forward(&inter)?, &x, p, rng)
    }

    /// Every layer's linear layers in [`super::lora::LAYER_LINEARS`] order: what LoRA
    /// adapts ([`super::lora::LoraConfig::attach`]).
    pub fn layer_linears(&mut self) -> Vec<[&mut Linear; 6]> {
        self.layers
            .iter_mut()
            .map(|l| {
                [
                    &mut l.query,
                    &mut l.key,
                    &mut l.value,
                    &mut l.attn_out,
                    &mut l.intermediate,
                    &mut l.output,
                ]
            })
            .collect()
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

/// `x @ W^T + b` of a [`Linear`] on packed rows.
pub(crate) fn packed_linear(
    x: &[f32],
    l: &Linear,
    in_dim: usize,
    out_dim: usize,
) -> Result<Vec<f32>> {
    packed_linear_scaled(x, l, in_dim, out_dim, 1.0)
}

/// `(x @ W^T + b) * scale` of a [`Linear`] on packed rows (BERT's attention queries).
pub(crate) fn packed_linear_scaled(
    x: &[f32],
    l: &Linear,
    in_dim: usize,
    out_dim: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    let (w, layout) = kernels::weight_view(&l.weight)?;
    let b = l.bias.as_ref().map(kernels::view).transpose()?;
    Ok(kernels::linear_scaled(
        x,
        w.get(),
        layout,
        b.as_ref().map(|b| b.get()),
        in_dim,
        out_dim,
        scale,
    ))
}

/// `acc += x @ W^T + b` (a residual connection fused into the GEMM's accumulation).
pub(crate) fn packed_linear_acc(
    x: &[f32],
    l: &Linear,
    acc: &mut [f32],
    in_dim: usize,
    out_dim: usize,
) -> Result<()> {
    if let Some(b) = &l.bias {
        kernels::add_bias_rows(acc, kernels::view(b)?.get());
    }
    let (w, layout) = kernels::weight_view(&l.weight)?;
    kernels::gemm_acc_wt(x, w.get(), layout, acc, in_dim, out_dim);
    Ok(())
}
