//! Tensor-level ops of the differentiable path, as custom ops with hand-written backwards.
//!
//! candle's fused `ops::layer_norm`, `softmax_last_dim` and `rms_norm` have no backward
//! pass: gradients silently stop at them. Layer normalisation, softmax, GELU and the im2col
//! windows here are fused CPU f32 kernels (`CustomOp`s) with analytic backwards, falling back
//! to compositions of candle's differentiable primitives on other devices and dtypes; the
//! losses and the masked mean are such compositions. A test (`tests/gradients.rs`) checks
//! every trainable tensor receives a gradient.

use candle_core::{DType, Result, Tensor, D};

use super::activation::{self, Act};
use super::buffers::{self, f32_slice, rows_per_task};
use super::custom_op::{apply3, F32Op3, Grads3};

/// Additive attention-mask value for padded keys. Finite on purpose: `f32::MIN` becomes
/// `-inf` in bf16 and `0 * -inf` gives NaN.
pub const MASK_NEG: f32 = -1e9;

/// Layer normalisation over the last dimension, computed in f32. When no input needs a
/// gradient (inference, frozen layers) candle's fused kernel is used; when one does, our
/// fused kernel with its own backward ([`LayerNormOp`]) on CPU, the differentiable
/// composition elsewhere.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !(x.track_op() || weight.track_op() || bias.track_op()) && x.dtype() == DType::F32 {
        return candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32);
    }
    if super::fused_on(x.device()) && x.dtype() == DType::F32 {
        let op = LayerNormOp {
            eps: eps as f32,
            stats: std::sync::Mutex::new(Vec::new()),
        };
        return apply3(x, weight, bias, op);
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// [`layer_norm`] composed from primitive differentiable ops (any device and dtype). The
/// statistics and the affine run in f32 (`x` of another dtype, e.g. bf16, is cast up and the
/// result back down), with the weights in their own dtype cast to f32.
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let x = f32(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .broadcast_mul(&f32(weight)?)?
        .broadcast_add(&f32(bias)?)?
        .to_dtype(dtype)
}

/// Fused layer normalisation over the last dimension (CPU, f32) with an analytic backward.
/// The composition above allocates about ten full-size temporaries forward and twice that
/// backward; this one allocates the output forward and the three gradients backward. The
/// forward saves each row's mean and 1/std for the backward:
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * weight`.
struct LayerNormOp {
    eps: f32,
    /// (mean, 1/std) per row, written by the forward.
    stats: std::sync::Mutex<Vec<(f32, f32)>>,
}

impl F32Op3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "protloc-layer-norm"
    }

    fn forward(
        &self,
        [x, w, b]: [&[f32]; 3],
        [l1, _, _]: [&candle_core::Layout; 3],
    ) -> Result<(Vec<f32>, candle_core::Shape)> {
        use rayon::prelude::*;
        let d = w.len();
        if b.len() != d || d == 0 || !x.len().is_multiple_of(d) {
            candle_core::bail!(
                "layer norm: {} inputs, weight {d}, bias {}",
                x.len(),
                b.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        let mut stats = vec![(0f32, 0f32); x.len() / d];
        let chunk = rows_per_task(d);
        out.par_chunks_mut(d * chunk)
            .zip(x.par_chunks(d * chunk))
            .zip(stats.par_chunks_mut(chunk))
            .for_each(|((o, xs), st)| {
                for ((o, row), st) in o.chunks_mut(d).zip(xs.chunks(d)).zip(st) {
                    let n = d as f32;
                    let mean = row.iter().sum::<f32>() / n;
                    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    for (((o, &v), &wi), &bi) in o.iter_mut().zip(row).zip(w).zip(b) {
                        *o = (v - mean) * rstd * wi + bi;
                    }
                    *st = (mean, rstd);
                }
            });
        *self.stats.lock().expect("stats lock") = stats;
        Ok((out, l1.shape().clone()))
    }

    fn backward(
        &self,
        [x, weight, _bias]: [&Tensor; 3],
        _out: &Tensor,
        grad_res: &Tensor,
    ) -> Result<Grads3> {
        use rayon::prelude::*;
        let d = weight.elem_count();
        // Read the inputs in place (only the gradient may need a contiguous copy).
        let (x, weight, grad_res) = (
            x.contiguous()?,
            weight.contiguous()?,
            grad_res.contiguous()?,
        );
        let (x_view, w_view) = (buffers::view(&x)?, buffers::view(&weight)?);
        let g_view = buffers::view(&grad_res)?;
        let (xs, w, gy) = (x_view.get(), w_view.get(), g_view.get());
        let stats = self.stats.lock().expect("stats lock");
        let mut dx = vec![0f32; xs.len()];
        let chunk = rows_per_task(d);
        // Per-block partial sums of dw/db, added in block order afterwards: the blocks
        // depend on the shape alone, so the sums are bit-for-bit the same whatever the
        // thread count or scheduling (a rayon `reduce` would pair them as work is stolen).
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(d * chunk)
            .zip(xs.par_chunks(d * chunk))
            .zip(gy.par_chunks(d * chunk))
            .zip(stats.par_chunks(chunk))
            .map(|(((dx, xs), gy), st)| {
                let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                let mut g = vec![0f32; d];
                for (((dx, row), gy), &(mean, rstd)) in
                    dx.chunks_mut(d).zip(xs.chunks(d)).zip(gy.chunks(d)).zip(st)
                {
                    let (mut mean_g, mut mean_gx) = (0f32, 0f32);
                    for i in 0..d {
                        let xhat = (row[i] - mean) * rstd;
                        dw[i] += gy[i] * xhat;
                        db[i] += gy[i];
                        g[i] = gy[i] * w[i];
                        mean_g += g[i];
                        mean_gx += g[i] * xhat;
                    }
                    mean_g /= d as f32;
                    mean_gx /= d as f32;
                    for i in 0..d {
                        let xhat = (row[i] - mean) * rstd;
                        dx[i] = rstd * (g[i] - mean_g - xhat * mean_gx);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        for (bw, bb) in &partials {
            dw.iter_mut().zip(bw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(bb).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, weight.shape(), dev)?),
            Some(Tensor::from_vec(db, weight.shape(), dev)?),
        ))
    }
}

/// Softmax over the last dimension. On CPU in f32 this is one fused pass with its own
/// backward ([`SoftmaxLastDim`]); elsewhere a differentiable composition summed in f32, with
/// the max detached (it only stabilises the exponent and cancels out of the gradient).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if super::fused_on(x.device()) && x.dtype() == DType::F32 {
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
        let res = res.detach(); // an untracked gradient (see `LinearOp::bwd`)
        let dot = (grad_res * &res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
}

/// GELU, erf form (HF "gelu"). On CPU in f32 one fused vectorised pass forward and one
/// backward ([`GeluErf`]); candle's own `gelu_erf` evaluates a scalar f64 `erf` per element
/// and builds its gradient from about ten full-size temporaries, which made the activation
/// a visible share of an ESM-2 training step.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::fused_on(x.device()) && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(GeluErf);
    }
    x.gelu_erf()
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
        activation::activation_inplace(&mut out, Act::GeluErf);
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
        activation::gelu_erf_backward_inplace(x, &mut g);
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

/// "Same" 1-D convolution windows of `x` [B, L, H] as rows [B, L, k*H] (see
/// the light-attention head's `im2col`), on CPU in f32 as one op whose backward sums the
/// windows back ([`Im2Col`]). candle's `cat` of k shifted copies did the same with a
/// single-threaded strided copy: 40% of a light-attention training step.
pub fn im2col(x: &Tensor, kernel: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Im2Col { kernel })
}

/// [`im2col`] as a custom op: row `l` of protein `b` holds `x[b, l - k/2 ..= l + k/2]`, zeros
/// beyond the ends. Proteins are independent parallel tasks, each summed in a fixed order
/// in the backward (deterministic for any thread count).
struct Im2Col {
    kernel: usize,
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "protloc-im2col"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l)?;
        let (b, len, h) = l.shape().dims3()?;
        let k = self.kernel;
        let half = k / 2;
        let mut out = vec![0f32; b * len * k * h];
        if !out.is_empty() {
            out.par_chunks_mut(len * k * h)
                .zip(x.par_chunks(len * h))
                .for_each(|(o, xs)| {
                    for (row, o) in o.chunks_mut(k * h).enumerate() {
                        for (j, dst) in o.chunks_mut(h).enumerate() {
                            if let Some(src) = (row + j).checked_sub(half).filter(|&s| s < len) {
                                dst.copy_from_slice(&xs[src * h..][..h]);
                            }
                        }
                    }
                });
        }
        Ok((candle_core::CpuStorage::F32(out), (b, len, k * h).into()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (b, len, h) = x.dims3()?;
        let k = self.kernel;
        let half = k / 2;
        let g = grad.contiguous()?;
        let view = buffers::view(&g)?;
        let gs = view.get();
        let mut dx = vec![0f32; b * len * h];
        if !dx.is_empty() {
            dx.par_chunks_mut(len * h)
                .zip(gs.par_chunks(len * k * h))
                .for_each(|(d, g)| {
                    for (row, g) in g.chunks(k * h).enumerate() {
                        for (j, src) in g.chunks(h).enumerate() {
                            if let Some(t) = (row + j).checked_sub(half).filter(|&t| t < len) {
                                for (a, &v) in d[t * h..][..h].iter_mut().zip(src) {
                                    *a += v;
                                }
                            }
                        }
                    }
                });
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Mean over residue positions: `hidden` [B, T, H], `mask` [B, T] (1.0 = residue).
pub fn masked_mean(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1.0, f64::MAX)?;
    summed.broadcast_div(&counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_abs_diff, var};

    #[test]
    fn im2col_op_matches_shifted_copies_forward_and_backward() {
        let x = var(&[3, 7, 5], 1, 0.0);
        let loss_w = var(&[3, 7, 15], 2, 0.0);
        for kernel in [1usize, 3] {
            let fused = im2col(&x, kernel).unwrap();
            let half = kernel / 2;
            let padded = x.pad_with_zeros(1, half, kernel - 1 - half).unwrap();
            let cols: Vec<Tensor> = (0..kernel)
                .map(|j| padded.narrow(1, j, 7).unwrap())
                .collect();
            let reference = Tensor::cat(&cols, 2).unwrap();
            assert_eq!(fused.dims(), reference.dims());
            assert!(max_abs_diff(&fused, &reference) == 0.0, "kernel {kernel}");
            let w = loss_w.as_tensor().narrow(2, 0, 5 * kernel).unwrap();
            let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
            let (g, gr) = (
                loss(&fused).backward().unwrap(),
                loss(&reference).backward().unwrap(),
            );
            let diff = max_abs_diff(g.get(&x).unwrap(), gr.get(&x).unwrap());
            assert!(diff < 1e-5, "kernel {kernel}: dx differs by {diff}");
        }
    }

    #[test]
    fn fused_layer_norm_matches_composition_forward_and_backward() {
        // Uneven sizes catch indexing slips; 1,900 rows of 19 span several parallel tasks
        // (862 rows each), so the weight/bias gradient reduction across tasks is exercised.
        for rows in [37usize, 1900] {
            let (x, w, b) = (
                var(&[rows, 19], 1, 0.3),
                var(&[19], 2, 1.0),
                var(&[19], 3, 0.0),
            );
            let loss_w = var(&[rows, 19], 4, 0.0);
            let fused = layer_norm(&x, &w, &b, 1e-5).unwrap();
            let composed = layer_norm_composed(&x, &w, &b, 1e-5).unwrap();
            assert!(max_abs_diff(&fused, &composed) < 1e-5);
            let loss = |y: &Tensor| (y * loss_w.as_tensor()).unwrap().sum_all().unwrap();
            let gf = loss(&fused).backward().unwrap();
            let gc = loss(&composed).backward().unwrap();
            for (name, t) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (a, c) = (gf.get(t).unwrap(), gc.get(t).unwrap());
                let scale = max_abs(c);
                let diff = max_abs_diff(a, c);
                assert!(
                    diff < 1e-5 * (1.0 + scale),
                    "{rows} rows: d{name} differs by {diff}"
                );
            }
        }
    }
}
