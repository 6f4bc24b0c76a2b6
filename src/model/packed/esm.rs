//! ESM-2 inference on packed tokens: the same computation as [`Esm`]'s differentiable
//! forward, on raw f32 rows of the real tokens only (see [`super`] for when it runs).

use candle_core::{DType, Result, Tensor};

use super::{packed_linear, packed_linear_acc, sizes, PackedTokens};
use crate::kernels::activation;
use crate::kernels::packed_attention;
use crate::kernels::{buffers, norm, rotary};
use crate::model::esm::{Esm, MASK_RATIO_TRAIN};

/// ESM-2's forward (embeddings, the first `until` layers, then the final LayerNorm if
/// `final_norm`) on packed real tokens (see [`crate::kernels::packed_attention`]): no padding rows,
/// fused attention over each sequence's own keys, rotary and scaling in one pass. Returns
/// `None` (use the differentiable path) for non-f32 weights or masks that are not "ones then
/// zeros".
pub(crate) fn forward_range(
    m: &Esm,
    ids: &Tensor,
    attention_mask: &Tensor,
    until: usize,
    final_norm: bool,
) -> Result<Option<Tensor>> {
    let until = until.min(m.layers.len());
    let cfg = &m.cfg;
    if m.word.weight.dtype() != DType::F32 {
        return Ok(None);
    }
    let Some(PackedTokens {
        ids,
        lengths,
        segs,
        padded_len: t,
        tokens: n,
    }) = PackedTokens::new(ids, attention_mask)?
    else {
        return Ok(None);
    };
    let (h, f, heads, d, eps) = sizes(cfg);

    let mut x = buffers::take(n * h);
    {
        let word = buffers::view(&m.word.weight)?;
        let word = word.get();
        let vocab = word.len() / h;
        for (row, s) in ids.iter().zip(&segs) {
            let row = &row[..s.len];
            let mask_id = cfg.mask_token_id.filter(|_| cfg.token_dropout);
            // Same arithmetic as `token_dropout_scale`, per sequence.
            let scale = match mask_id {
                Some(mask) => {
                    let observed =
                        row.iter().filter(|&&id| id == mask).count() as f32 / (s.len.max(1) as f32);
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
    if let Some(norm) = &m.emb_norm_before {
        let (w, b) = (buffers::view(&norm.weight)?, buffers::view(&norm.bias)?);
        norm::layer_norm_inplace(&mut x, w.get(), b.get(), eps);
    }
    let act = cfg.hidden_act.kernel();
    let scale = 1.0 / (d as f64).sqrt();
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let mut tables: Option<(&[f32], Vec<f32>, Vec<f32>)> = None;
    for (l, inv_freq) in m.layers[..until].iter().zip(&m.inv_freqs) {
        if tables
            .as_ref()
            .is_none_or(|(fr, _, _)| *fr != inv_freq.as_slice())
        {
            let (cos, sin) = rotary::half_tables(max_len, inv_freq);
            tables = Some((inv_freq, cos, sin));
        }
        let (_, cos, sin) = tables.as_ref().expect("set above");
        let hn = {
            let (w, b) = (
                buffers::view(&l.attn_norm.weight)?,
                buffers::view(&l.attn_norm.bias)?,
            );
            norm::layer_norm_rows(&x, w.get(), b.get(), eps)
        };
        let mut q = packed_linear(&hn, &l.query, h, h)?;
        let mut k = packed_linear(&hn, &l.key, h, h)?;
        let v = packed_linear(&hn, &l.value, h, h)?;
        buffers::recycle(hn);
        rotary::rotary_inplace(&mut q, &segs, heads, d, cos, sin, scale as f32);
        rotary::rotary_inplace(&mut k, &segs, heads, d, cos, sin, 1.0);
        let ctx = packed_attention::attention(&q, &k, &v, &segs, heads, d);
        for buf in [q, k, v] {
            buffers::recycle(buf);
        }
        packed_linear_acc(&ctx, &l.attn_out, &mut x, h, h)?;
        buffers::recycle(ctx);
        let hn = {
            let (w, b) = (
                buffers::view(&l.ffn_norm.weight)?,
                buffers::view(&l.ffn_norm.bias)?,
            );
            norm::layer_norm_rows(&x, w.get(), b.get(), eps)
        };
        let mut inter = packed_linear(&hn, &l.intermediate, h, f)?;
        buffers::recycle(hn);
        activation::activation_inplace(&mut inter, act);
        packed_linear_acc(&inter, &l.output, &mut x, f, h)?;
        buffers::recycle(inter);
    }
    if final_norm {
        let n = &m.final_norm;
        let (w, b) = (buffers::view(&n.weight)?, buffers::view(&n.bias)?);
        norm::layer_norm_inplace(&mut x, w.get(), b.get(), eps);
    }
    let out = packed_attention::unpack(&x, &segs, t, h)?;
    buffers::recycle(x);
    Ok(Some(out))
}
