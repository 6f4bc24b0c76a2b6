//! BERT inference on packed tokens: the same computation as [`Bert`]'s differentiable
//! forward, on raw f32 rows of the real tokens only (see [`super`] for when it runs).

use candle_core::{DType, Result, Tensor};

use super::{packed_linear, packed_linear_acc, packed_linear_scaled, sizes, PackedTokens};
use crate::kernels::activation;
use crate::kernels::packed_attention;
use crate::kernels::{buffers, norm};
use crate::model::bert::Bert;

/// BERT's forward (embeddings and the first `until` layers) on packed real tokens (see
/// [`crate::kernels::packed_attention`]): post-LayerNorm layers, the residuals summed inside
/// the GEMMs.
/// Returns `None` (use the differentiable path) for non-f32 weights or masks that are not
/// "ones then zeros". The caller has checked the length against the model's positions
/// ([`Bert::check_positions`]).
pub(crate) fn forward_until(
    m: &Bert,
    ids: &Tensor,
    attention_mask: &Tensor,
    until: usize,
) -> Result<Option<Tensor>> {
    let until = until.min(m.layers.len());
    let cfg = &m.cfg;
    let e = &m.embeddings;
    if e.word.weight.dtype() != DType::F32 {
        return Ok(None);
    }
    let Some(PackedTokens {
        ids,
        segs,
        padded_len: t,
        tokens: n,
        ..
    }) = PackedTokens::new(ids, attention_mask)?
    else {
        return Ok(None);
    };
    let (h, f, heads, d, eps) = sizes(cfg);

    let mut x = buffers::take(n * h);
    {
        let (word, pos, tt) = (
            buffers::view(&e.word.weight)?,
            buffers::view(&e.position.weight)?,
            buffers::view(&e.token_type.weight)?,
        );
        let (word, pos, tt) = (word.get(), pos.get(), &tt.get()[..h]);
        let vocab = word.len() / h;
        for (row, s) in ids.iter().zip(&segs) {
            for (j, &id) in row[..s.len].iter().enumerate() {
                let id = id as usize;
                if id >= vocab {
                    candle_core::bail!("token id {id} out of range for vocab {vocab}");
                }
                let dst = &mut x[(s.start + j) * h..][..h];
                let (w, p) = (&word[id * h..][..h], &pos[j * h..][..h]);
                for c in 0..h {
                    // Same order as the general path: (word + position) + token type.
                    dst[c] = (w[c] + p[c]) + tt[c];
                }
            }
        }
        let (w, b) = (buffers::view(&e.norm.weight)?, buffers::view(&e.norm.bias)?);
        norm::layer_norm_inplace(&mut x, w.get(), b.get(), eps);
    }
    let act = cfg.hidden_act.kernel();
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    for l in &m.layers[..until] {
        let q = packed_linear_scaled(&x, &l.query, h, h, scale)?;
        let k = packed_linear(&x, &l.key, h, h)?;
        let v = packed_linear(&x, &l.value, h, h)?;
        let ctx = packed_attention::attention(&q, &k, &v, &segs, heads, d);
        for buf in [q, k, v] {
            buffers::recycle(buf);
        }
        // Post-LayerNorm: x = LN(x + attn_out(ctx)), the residual summed inside the GEMM.
        packed_linear_acc(&ctx, &l.attn_out, &mut x, h, h)?;
        buffers::recycle(ctx);
        {
            let (w, b) = (
                buffers::view(&l.attn_norm.weight)?,
                buffers::view(&l.attn_norm.bias)?,
            );
            norm::layer_norm_inplace(&mut x, w.get(), b.get(), eps);
        }
        let mut inter = packed_linear(&x, &l.intermediate, h, f)?;
        activation::activation_inplace(&mut inter, act);
        packed_linear_acc(&inter, &l.output, &mut x, f, h)?;
        buffers::recycle(inter);
        let (w, b) = (
            buffers::view(&l.ffn_norm.weight)?,
            buffers::view(&l.ffn_norm.bias)?,
        );
        norm::layer_norm_inplace(&mut x, w.get(), b.get(), eps);
    }
    let out = packed_attention::unpack(&x, &segs, t, h)?;
    buffers::recycle(x);
    Ok(Some(out))
}
