//! Small layers over [`ops`](super::ops) with parameters from a [`Builder`].

use candle_core::{Result, Tensor};

use super::dropout::DropMask;
use super::lora::Lora;
use super::ops;
use super::params::{Builder, Init};

/// `y = x W^T + b`, with HF names `weight` [out, in] and `bias` [out], plus an optional
/// low-rank adapter ([`Lora`]) on a frozen `W`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(b: &Builder, in_dim: usize, out_dim: usize, init_std: f64) -> Result<Self> {
        Ok(Self {
            weight: b.get((out_dim, in_dim), "weight", Init::Normal(init_std))?,
            bias: Some(b.get(out_dim, "bias", Init::Zeros)?),
            lora: None,
        })
    }

    /// An encoder layer's projection: like [`Self::new`], but a store made for inference
    /// keeps the weight column-major and frozen ([`Builder::linear_weight`]).
    pub fn projection(b: &Builder, in_dim: usize, out_dim: usize, init_std: f64) -> Result<Self> {
        Ok(Self {
            weight: b.linear_weight(out_dim, in_dim, Init::Normal(init_std))?,
            bias: Some(b.get(out_dim, "bias", Init::Zeros)?),
            lora: None,
        })
    }

    /// Adds a LoRA adapter of `rank` (see [`Lora`]) under this layer's builder `b`; the
    /// layer's own weight and bias are cut from the autograd graph (frozen).
    pub fn with_lora(&self, b: &Builder, rank: usize, alpha: f64) -> Result<Self> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let mut frozen = self.detached();
        frozen.lora = Some(Lora::new(b, in_dim, out_dim, rank, alpha)?);
        Ok(frozen)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::linear(x, &self.weight, self.bias.as_ref())?;
        match &self.lora {
            None => Ok(y),
            Some(l) => y + l.forward(x)?,
        }
    }

    /// `forward(x) * scale` in one op (attention queries).
    pub fn forward_scaled(&self, x: &Tensor, scale: f64) -> Result<Tensor> {
        let y = ops::linear_scaled(x, &self.weight, self.bias.as_ref(), scale)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => y + (l.forward(x)? * scale)?,
        }
    }

    /// A copy whose tensors are cut from the autograd graph (frozen). An adapter is merged
    /// into the copy's weight (`W + scale * B A`), so inference runs one product per layer
    /// and the packed kernels apply.
    pub fn detached(&self) -> Self {
        let weight = match &self.lora {
            None => self.weight.detach(),
            Some(l) => l
                .delta()
                .and_then(|d| self.weight.detach() + d)
                .expect("LoRA delta has the weight's shape"),
        };
        Self {
            weight,
            bias: self.bias.as_ref().map(Tensor::detach),
            lora: None,
        }
    }
}

/// Layer normalisation with HF names `weight`/`bias` (old checkpoints' `gamma`/`beta` are
/// renamed on load).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(b: &Builder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: b.get(dim, "weight", Init::Ones)?,
            bias: b.get(dim, "bias", Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }
}

/// Lookup table `weight` [num, dim].
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(b: &Builder, num: usize, dim: usize, init_std: f64) -> Result<Self> {
        Ok(Self {
            weight: b.get((num, dim), "weight", Init::Normal(init_std))?,
        })
    }

    /// `ids` [B, T] (u32) -> [B, T, dim].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = self.weight.index_select(&ids.flatten_all()?, 0)?;
        flat.reshape((b, t, self.weight.dim(1)?))
    }

    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
        }
    }
}

/// Key padding of a batch, in the two forms the attention paths use.
pub struct AttentionMask {
    /// Additive bias [B, 1, 1, T] (0 for real keys, [`ops::MASK_NEG`] for padding).
    pub bias: Tensor,
    /// Real tokens per row when every row is "ones then zeros" (the fused path's input).
    pub lengths: Option<Vec<usize>>,
}

impl AttentionMask {
    /// From an attention mask [B, T] (1 = token, 0 = padding).
    pub fn new(attention_mask: &Tensor) -> Result<Self> {
        let rows: Vec<Vec<f32>> = attention_mask
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        Ok(Self {
            bias: mask_bias(attention_mask)?,
            lengths: super::kernels::prefix_lengths(&rows),
        })
    }
}

/// Multi-head self-attention on unsplit projections `q`, `k`, `v` [B, T, heads*head_dim]
/// (q already scaled). On CPU in f32 with a prefix mask this is the fused kernel
/// ([`fused_attention`](super::fused_attention)); otherwise the composed [`attention`].
pub fn self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &AttentionMask,
    dropout_p: f64,
    rng: Option<&mut rand_chacha::ChaCha8Rng>,
) -> Result<Tensor> {
    if let (true, true, Some(lengths)) = (
        q.device().is_cpu(),
        q.dtype() == candle_core::DType::F32,
        mask.lengths.as_ref(),
    ) {
        use rand::Rng;
        let dropout = match rng {
            Some(rng) if dropout_p > 0.0 => Some(DropMask {
                p: dropout_p as f32,
                seed: rng.random(),
            }),
            _ => None,
        };
        return super::fused_attention::fused_attention(q, k, v, lengths, heads, dropout);
    }
    let split = |x: &Tensor| split_heads(x, heads);
    attention(
        &split(q)?,
        &split(k)?,
        &split(v)?,
        &mask.bias,
        dropout_p,
        rng,
    )
}

/// Multi-head attention core shared by BERT and ESM-2 (composed from differentiable ops).
///
/// `q`, `k`, `v`: [B, heads, T, head_dim] (q already scaled); `mask_bias`: [B, 1, 1, T]
/// additive (0 for real keys, [`ops::MASK_NEG`] for padding). Returns [B, T, heads*head_dim].
/// `rng` enables dropout on the attention probabilities (training only).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    dropout_p: f64,
    rng: Option<&mut rand_chacha::ChaCha8Rng>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(mask_bias)?;
    let probs = ops::dropout(&ops::softmax_last_dim(&scores)?, dropout_p, rng)?;
    let ctx = probs.matmul(v)?; // [B, h, T, d]
    ctx.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}

/// [B, T, heads*head_dim] -> [B, heads, T, head_dim], contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    x.reshape((b, t, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Additive key mask [B, 1, 1, T] from an attention mask [B, T] (1.0 = real token).
pub fn mask_bias(attention_mask: &Tensor) -> Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    let m = attention_mask.to_dtype(candle_core::DType::F32)?;
    // 1 -> 0, 0 -> MASK_NEG
    ((m - 1.0)? * (-(ops::MASK_NEG as f64)))?.reshape((b, 1, 1, t))
}
