//! The encoders' packed inference path, and the one place that chooses between it and the
//! differentiable path ([`forward_path`]).
//!
//! Each encoder has two forward passes computing the same function:
//! - the **differentiable** one ([`Bert`](super::bert::Bert), [`Esm`](super::esm::Esm)):
//!   candle tensors on padded `[B, T]` batches, autograd, dropout, any device;
//! - the **packed** one ([`bert`], [`esm`] here): raw f32 rows of the real tokens only
//!   ([`crate::kernels::packed_attention`]), CPU, no gradients, no dropout.
//!
//! [`Encoder`](super::Encoder) asks [`forward_path`] before every forward from the token ids
//! (`forward`, `forward_until`; `forward_from` is always differentiable). What flips it,
//! often without saying so at the call site:
//! - `detached()` (what every inference entry point calls: embed, predict, eval, serve)
//!   cuts all weights out of the autograd graph, which makes the path packed;
//! - training passes an RNG (dropout), which keeps it differentiable;
//! - unmerged LoRA adapters keep it differentiable (`detached()` merges them);
//! - [`set_packed_inference`]`(false)` keeps it differentiable for the whole process;
//! - the packed forward itself falls back to the differentiable one (returns `None`) for
//!   non-f32 weights or an attention mask that is not "ones then zeros".
//!
//! [`Purpose::Inference`](super::Purpose::Inference) changes the weight layout, not the path:
//! its layers' weights are frozen and column-major
//! ([`WeightLayout::InOut`](crate::kernels::buffers::WeightLayout::InOut)), which both paths read.

pub mod bert;
pub mod esm;

use candle_core::{Result, Tensor};

use super::layers::Linear;
use crate::kernels::packed_attention::{self, Segment};
use crate::kernels::{buffers, gemm};

static PACKED_INFERENCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the packed inference path on (the default) or off for the whole process. Off,
/// detached encoders run the general differentiable ops instead: for before/after
/// benchmarks (`bench/rust/encoder.rs --path general`) and for diagnosing a suspected kernel bug.
pub fn set_packed_inference(on: bool) {
    PACKED_INFERENCE.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn packed_inference_enabled() -> bool {
    PACKED_INFERENCE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Which forward pass an encoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPath {
    /// Inference on packed tokens ([`bert`], [`esm`]); it may still fall back to the
    /// differentiable path for inputs it does not take.
    Packed,
    /// The differentiable path (training, and inference the packed path does not cover).
    Differentiable,
}

/// The path of a forward pass over `ids`: packed when nothing can ask for gradients or
/// dropout (no `rng`; `detached`: no weight in the autograd graph and no unmerged adapter), on
/// the CPU, with the packed path enabled ([`set_packed_inference`]). `detached` is evaluated
/// last, only when everything else allows the packed path.
pub fn forward_path(rng_given: bool, ids: &Tensor, detached: impl FnOnce() -> bool) -> ForwardPath {
    if !rng_given
        && crate::kernels::fused_on(ids.device())
        && packed_inference_enabled()
        && detached()
    {
        ForwardPath::Packed
    } else {
        ForwardPath::Differentiable
    }
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
    let (w, layout) = buffers::weight_view(&l.weight)?;
    let b = l.bias.as_ref().map(buffers::view).transpose()?;
    Ok(gemm::linear_rows_scaled(
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
        gemm::add_bias_rows(acc, buffers::view(b)?.get());
    }
    let (w, layout) = buffers::weight_view(&l.weight)?;
    gemm::gemm_acc_wt(x, w.get(), layout, acc, in_dim, out_dim);
    Ok(())
}

/// A batch's real tokens, stacked: each row's token ids, where each row's tokens sit among
/// the stacked rows, the padded width and the number of real tokens.
/// The sizes a packed forward works with: (hidden, feed-forward, heads, head dimension,
/// LayerNorm epsilon).
pub(super) fn sizes(cfg: &crate::model::EncoderConfig) -> (usize, usize, usize, usize, f32) {
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    (
        h,
        f,
        cfg.num_attention_heads,
        cfg.head_dim(),
        cfg.layer_norm_eps as f32,
    )
}

pub(crate) struct PackedTokens {
    pub ids: Vec<Vec<u32>>,
    pub lengths: Vec<usize>,
    pub segs: Vec<Segment>,
    pub padded_len: usize,
    pub tokens: usize,
}

impl PackedTokens {
    /// `None` when a row's attention mask is not a prefix (padding only at the end).
    pub(crate) fn new(ids: &Tensor, attention_mask: &Tensor) -> Result<Option<Self>> {
        let (_, padded_len) = ids.dims2()?;
        let mask: Vec<Vec<f32>> = attention_mask
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        let Some(lengths) = packed_attention::prefix_lengths(&mask) else {
            return Ok(None);
        };
        let ids: Vec<Vec<u32>> = ids.to_dtype(candle_core::DType::U32)?.to_vec2()?;
        let segs = packed_attention::segments(&lengths);
        let tokens = lengths.iter().sum();
        Ok(Some(Self {
            ids,
            lengths,
            segs,
            padded_len,
            tokens,
        }))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use crate::model::config::{Activation, Arch, PositionEmbedding};

    /// A tiny random encoder (trainable weights) of either architecture.
    fn tiny_encoder(
        esm: bool,
        act: Activation,
    ) -> (crate::model::Encoder, crate::model::ParamStore) {
        let mut cfg = crate::model::scratch_config("tiny").unwrap();
        cfg.hidden_act = act;
        if esm {
            cfg.model_type = Arch::Esm;
            cfg.vocab_size = 33;
            cfg.layer_norm_eps = 1e-5;
            cfg.position_embedding_type = PositionEmbedding::Rotary;
            cfg.token_dropout = true;
            cfg.mask_token_id = Some(32);
            cfg.emb_layer_norm_before = Some(true);
        }
        // Larger weights than the 0.02 default so attention is far from uniform.
        cfg.initializer_range = 0.3;
        let store = crate::model::ParamStore::new(
            Default::default(),
            "test",
            7,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        );
        let enc = crate::model::Encoder::new(&store.initialising(), &cfg).unwrap();
        (enc, store)
    }

    /// The packed path (detached weights) against the general differentiable path on a
    /// padded batch of different lengths, on real tokens (padding outputs are unspecified).
    fn packed_matches_general(esm: bool, act: Activation) {
        let (enc, _store) = tiny_encoder(esm, act);
        let lengths = [9usize, 40, 2, 23];
        let t = 40;
        let mut ids = vec![0u32; lengths.len() * t];
        let mut mask = vec![0f32; lengths.len() * t];
        for (r, &len) in lengths.iter().enumerate() {
            for j in 0..len {
                // Token 32 is ESM's <mask>: exercises the token-dropout rescaling.
                ids[r * t + j] = if esm && j % 7 == 3 {
                    32
                } else {
                    2 + ((r * 5 + j * 3) % 25) as u32
                };
                mask[r * t + j] = 1.0;
            }
        }
        let dev = candle_core::Device::Cpu;
        let ids = Tensor::from_vec(ids, (lengths.len(), t), &dev).unwrap();
        let mask = Tensor::from_vec(mask, (lengths.len(), t), &dev).unwrap();
        let general = enc.forward(&ids, &mask, None).unwrap();
        let packed = enc.detached().forward(&ids, &mask, None).unwrap();
        assert_eq!(general.dims(), packed.dims());
        let g: Vec<Vec<Vec<f32>>> = general.to_vec3().unwrap();
        let p: Vec<Vec<Vec<f32>>> = packed.to_vec3().unwrap();
        for (r, &len) in lengths.iter().enumerate() {
            let a: Vec<f32> = g[r][..len].concat();
            let b: Vec<f32> = p[r][..len].concat();
            let num: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum();
            let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
            let err = (num / den).sqrt();
            assert!(
                err < 1e-5,
                "esm={esm} act={act} row {r}: relative error {err:e}"
            );
        }
    }

    #[test]
    fn packed_esm_matches_general_path() {
        packed_matches_general(true, Activation::Gelu);
    }

    #[test]
    fn packed_bert_matches_general_path() {
        packed_matches_general(false, Activation::Gelu);
        packed_matches_general(false, Activation::GeluNew);
        packed_matches_general(false, Activation::Relu);
    }

    #[test]
    fn general_path_when_mask_not_prefix() {
        // A mask with a hole cannot be packed: the general path must handle it (and give
        // the trainable-weight path's result; detached LayerNorm uses candle's fused kernel,
        // hence a rounding-level tolerance rather than equality).
        let (enc, _store) = tiny_encoder(true, Activation::Gelu);
        let dev = candle_core::Device::Cpu;
        let ids = Tensor::new(&[[2u32, 5, 6, 7, 3]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 0., 1., 1.]], &dev).unwrap();
        let a = enc.forward(&ids, &mask, None).unwrap();
        let b = enc.detached().forward(&ids, &mask, None).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }
}
