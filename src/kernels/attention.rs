//! Multi-head self-attention of the differentiable (training) path on padded batches: the
//! fused CPU kernel ([`fused_attention`](super::fused_attention)) when the mask allows it,
//! the composition of candle ops otherwise.

use candle_core::{DType, Result, Tensor};

use super::dropout::{dropout, DropMask};
use super::ops;

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
            lengths: super::packed_attention::prefix_lengths(&rows),
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
        super::fused_on(q.device()),
        q.dtype() == candle_core::DType::F32,
        mask.lengths.as_ref(),
    ) {
        let dropout = DropMask::draw(dropout_p, rng);
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
/// `q`, `k`, `v`: [B, heads, T, head_dim] (q already scaled); `mask_bias`: [B, 1, 1, T] f32
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
    // Scores, mask and softmax in f32 (a no-op in fp32; with bf16 activations the softmax
    // sums stay exact enough and the padding bias stays finite), probabilities back in the
    // activations' dtype for the value product.
    let scores = q.matmul(&k.t()?.contiguous()?)?.to_dtype(DType::F32)?;
    let scores = scores.broadcast_add(mask_bias)?;
    let probs = ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    let probs = dropout(&probs, dropout_p, rng)?;
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
