//! Differentiable building blocks.
//!
//! candle's fused `ops::layer_norm`, `softmax_last_dim` and `rms_norm` have no backward
//! pass: gradients silently stop at them. Everything here is composed from primitive ops
//! that do have one, so the same code serves inference and training. A test
//! (`tests/gradients.rs`) checks every trainable tensor receives a gradient.

use candle_core::{DType, Result, Tensor, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Additive attention-mask value for padded keys. Finite on purpose: `f32::MIN` becomes
/// `-inf` in bf16 and `0 * -inf` gives NaN.
pub const MASK_NEG: f32 = -1e9;

/// Layer normalisation over the last dimension, computed in f32. When no input needs a
/// gradient (inference, frozen layers) candle's fused kernel is used; otherwise the
/// differentiable composition.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !(x.track_op() || weight.track_op() || bias.track_op()) && x.dtype() == DType::F32 {
        return candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax over the last dimension. On CPU in f32 this is one fused pass with its own
/// backward ([`SoftmaxLastDim`]); elsewhere a differentiable composition summed in f32, with
/// the max detached (it only stabilises the exponent and cancels out of the gradient).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(SoftmaxLastDim);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)?.to_dtype(dtype)
}

/// Fused softmax over the last dimension (CPU, f32) with an analytic backward:
/// `dx = y * (dy - sum(dy * y))`. Attention probabilities are the largest activations in
/// training; the composed version allocates five full-size temporaries forward and more
/// backward, this one allocates one forward and three backward.
pub struct SoftmaxLastDim;

impl candle_core::CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "protloc-softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("softmax: f32 only")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax: contiguous input only")
        };
        let x = &data[start..end];
        let d = *layout.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; x.len()];
        if let Some(rows_per_task) = 4096usize.checked_div(d) {
            // Several rows per task so short rows do not drown in scheduling overhead.
            let rows_per_task = rows_per_task.max(1);
            out.par_chunks_mut(d * rows_per_task)
                .zip(x.par_chunks(d * rows_per_task))
                .for_each(|(o, xs)| {
                    for (o, row) in o.chunks_mut(d).zip(xs.chunks(d)) {
                        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0f32;
                        for (oi, &xi) in o.iter_mut().zip(row) {
                            *oi = (xi - max).exp();
                            sum += *oi;
                        }
                        let inv = 1.0 / sum;
                        o.iter_mut().for_each(|v| *v *= inv);
                    }
                });
        }
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
}

/// GELU, erf form (HF "gelu"). On CPU in f32 one fused vectorised pass forward and one
/// backward ([`GeluErf`]); candle's own `gelu_erf` evaluates a scalar f64 `erf` per element
/// and builds its gradient from about ten full-size temporaries, which made the activation
/// a visible share of an ESM-2 training step.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(GeluErf);
    }
    x.gelu_erf()
}

/// The contiguous f32 slice of a CPU storage.
fn f32_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("f32 only")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("contiguous input only")
    };
    Ok(&data[start..end])
}

/// Fused GELU (erf form) with an analytic backward ([`GeluErfGrad`]).
pub struct GeluErf;

impl candle_core::CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "protloc-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let mut out = f32_slice(storage, layout)?.to_vec();
        super::kernels::activation_inplace(&mut out, super::kernels::Act::GeluErf);
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &GeluErfGrad)?;
        Ok(Some(g))
    }
}

/// `grad * gelu_erf'(x)` for `(x, grad)`, one pass (no gradient of its own: second-order
/// derivatives are never taken here).
struct GeluErfGrad;

impl candle_core::CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "protloc-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_slice(s1, l1)?;
        let mut g = f32_slice(s2, l2)?.to_vec();
        if x.len() != g.len() {
            candle_core::bail!("gelu backward: {} inputs, {} gradients", x.len(), g.len());
        }
        super::kernels::gelu_erf_backward_inplace(x, &mut g);
        Ok((candle_core::CpuStorage::F32(g), l1.shape().clone()))
    }
}

/// Log-softmax over the last dimension (f32), used by the cross-entropy loss.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// Mean cross-entropy of `logits` [N, C] against class indices `targets` [N] (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    picked.mean_all()?.neg()
}

/// Weighted mean cross-entropy: `-sum_i w_i log p_i(y_i) / sum_i w_i`, with per-example
/// weights `weights` [N] (class weights picked by target, or 0/1 to mask unknown labels out).
/// PyTorch's `CrossEntropyLoss(weight=...)` convention. Zero total weight gives a zero loss.
pub fn weighted_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let w = weights.to_dtype(picked.dtype())?;
    let total = w.sum_all()?.to_scalar::<f32>()?;
    if total <= 0.0 {
        return picked.zeros_like()?.sum_all();
    }
    (picked * w)?.sum_all()?.neg()? / total as f64
}

/// Mean binary cross-entropy with logits over all entries of `logits` [N, C] against 0/1
/// `targets` [N, C] (multi-label), in the overflow-free form
/// `max(x, 0) - x y + log(1 + exp(-|x|))`.
pub fn binary_cross_entropy_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let y = targets.to_dtype(DType::F32)?;
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (x.relu()? - (&x * &y)? + soft)?.mean_all()
}

/// Inverted dropout with a caller-owned, seeded RNG (candle's own dropout draws from an
/// unseeded RNG, which would make training runs irreproducible). `None` = evaluation.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
    let Some(rng) = rng else { return Ok(x.clone()) };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let n = x.elem_count();
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// Matrix product of `x` [.., K] with `weight` [N, K]^T as one 2-D GEMM: flattening the
/// leading dimensions avoids candle's broadcast (stride-0) batched matmul.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k;
    let y = x.reshape((rows, k))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty dims") = weight.dim(0)?;
    y.reshape(out_dims)
}

/// Mean over residue positions: `hidden` [B, T, H], `mask` [B, T] (1.0 = residue).
pub fn masked_mean(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1.0, f64::MAX)?;
    summed.broadcast_div(&counts)
}
