//! Rotary position embeddings (ESM-2): the cos/sin tables, the composed differentiable
//! version, a fused CPU op for training, and the in-place rotation of rows both that op and
//! the packed inference path run ([`rotary_inplace`]).
//!
//! Why a fused op: composed from candle ops, rotating one projection takes about ten graph
//! nodes (scale, reshape, two narrows, neg, cat, two broadcast products, add, reshape).
//! Each writes a full `[B, T, hidden]` activation forward, and backward candle zero-fills
//! and accumulates a gradient for every one of them; for q and k in every layer that was a
//! visible share of an ESM-2 training step. The fused op is one pass forward and one
//! backward (the transpose of a rotation is the rotation by the opposite angle).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, D};

use rayon::prelude::*;

use super::buffers::{self, f32_slice};
use super::packed_attention::{segments, Segment};

/// cos/sin tables for `t` positions, in the two forms the paths use.
pub struct RotaryTables {
    /// [T, head_dim]: frequencies duplicated across the two halves, as HF
    /// `RotaryEmbedding` builds them (the composed path).
    pub cos: Tensor,
    pub sin: Tensor,
    /// [T, head_dim / 2] (the fused op and the packed inference kernels).
    cos_half: Arc<Vec<f32>>,
    sin_half: Arc<Vec<f32>>,
}

impl RotaryTables {
    pub fn new(t: usize, inv_freq: &[f32], dev: &Device) -> Result<Self> {
        let (cos_half, sin_half) = half_tables(t, inv_freq);
        let dim = 2 * inv_freq.len();
        let full = |half: &[f32]| {
            let data: Vec<f32> = (0..t * dim)
                .map(|i| half[(i / dim) * inv_freq.len() + (i % dim) % inv_freq.len()])
                .collect();
            Tensor::from_vec(data, (t, dim), dev)
        };
        Ok(Self {
            cos: full(&cos_half)?,
            sin: full(&sin_half)?,
            cos_half: Arc::new(cos_half),
            sin_half: Arc::new(sin_half),
        })
    }
}

/// cos/sin tables [T, head_dim / 2] for inverse frequencies `inv_freq` [head_dim / 2].
pub fn half_tables(t: usize, inv_freq: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(t * inv_freq.len());
    let mut sin = Vec::with_capacity(t * inv_freq.len());
    for pos in 0..t {
        for &f in inv_freq {
            let a = pos as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// `rotary(x * scale)` per head of the unsplit projection `x` [B, T, heads * D]: the fused
/// op on CPU in f32, the composed ops elsewhere.
pub fn apply(x: &Tensor, heads: usize, tables: &RotaryTables, scale: f64) -> Result<Tensor> {
    let (_, t, hidden) = x.dims3()?;
    if super::fused_on(x.device())
        && x.dtype() == DType::F32
        && hidden.is_multiple_of(2 * heads)
        && tables.cos_half.len() >= t * hidden / heads / 2
    {
        let op = RotaryOp {
            heads,
            scale: scale as f32,
            cos: tables.cos_half.clone(),
            sin: tables.sin_half.clone(),
        };
        return x.contiguous()?.apply_op1(op);
    }
    let x = if scale == 1.0 {
        x.clone()
    } else {
        (x * scale)?
    };
    apply_composed(&x, heads, &tables.cos, &tables.sin)
}

/// x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1], per head of the unsplit
/// projection `x` [B, T, heads * D]; `cos`/`sin` are [T, D].
pub fn apply_composed(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    let d = hd / heads;
    let x = x.reshape((b, t, heads, d))?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos
        .narrow(0, 0, t)?
        .to_dtype(x.dtype())?
        .reshape((t, 1, d))?;
    let sin = sin
        .narrow(0, 0, t)?
        .to_dtype(x.dtype())?
        .reshape((t, 1, d))?;
    x.broadcast_mul(&cos)?
        .broadcast_add(&rotated.broadcast_mul(&sin)?)?
        .reshape((b, t, hd))
}

/// Rotary position embedding in place on packed `[N, heads * head_dim]` rows, positions
/// counted from each segment's start; `cos`/`sin` are `[max_len, head_dim / 2]` tables.
/// Also multiplies by `scale` (the query's 1/sqrt(d), or 1 for keys).
pub fn rotary_inplace(
    x: &mut [f32],
    segs: &[Segment],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    scale: f32,
) {
    let hidden = heads * head_dim;
    let half = head_dim / 2;
    // Position of every packed row.
    let mut pos = Vec::with_capacity(x.len() / hidden);
    for s in segs {
        pos.extend(0..s.len);
    }
    x.par_chunks_mut(hidden)
        .zip(pos.par_iter())
        .with_min_len(64)
        .for_each(|(row, &p)| {
            let (c, sn) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            for head in row.chunks_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j] * scale, x2[j] * scale);
                    x1[j] = a * c[j] - b * sn[j];
                    x2[j] = b * c[j] + a * sn[j];
                }
            }
        });
}

/// Fused `rotary(x * scale)` on [B, T, heads * D] (CPU, f32, contiguous); positions count
/// from 0 in every row of the batch.
struct RotaryOp {
    heads: usize,
    scale: f32,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
}

impl RotaryOp {
    /// Rotates `x` in place by the table angles, or by their opposites (`inverse`: the
    /// transpose, for the gradient).
    fn rotate(&self, x: &mut [f32], shape: &candle_core::Shape, inverse: bool) -> Result<()> {
        let (b, t, hidden) = shape.dims3()?;
        let head_dim = hidden / self.heads;
        let segs = segments(&vec![t; b]);
        let sin: std::borrow::Cow<[f32]> = if inverse {
            self.sin.iter().map(|v| -v).collect::<Vec<_>>().into()
        } else {
            self.sin.as_slice().into()
        };
        let cos = &self.cos[..];
        rotary_inplace(x, &segs, self.heads, head_dim, cos, &sin, self.scale);
        Ok(())
    }
}

impl candle_core::CustomOp1 for RotaryOp {
    fn name(&self) -> &'static str {
        "protloc-rotary"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let mut out = f32_slice(storage, layout)?.to_vec();
        self.rotate(&mut out, layout.shape(), false)?;
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let mut dx = buffers::view(&g)?.get().to_vec();
        self.rotate(&mut dx, g.shape(), true)?;
        Ok(Some(Tensor::from_vec(dx, g.shape(), g.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs, max_abs_diff, var};

    fn tables(t: usize, d: usize) -> RotaryTables {
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32))
            .collect();
        RotaryTables::new(t, &inv_freq, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_matches_composed_forward_and_gradient() {
        let (b, t, heads, d) = (2, 7, 3, 8);
        let tab = tables(t, d);
        let x = var(&[b, t, heads * d], 11, 0.0);
        // A loss with distinct weights per element, so every gradient entry differs.
        let w = var(&[b, t, heads * d], 12, 0.0).as_tensor().detach();
        let scale = 0.35;
        let fused = apply(x.as_tensor(), heads, &tab, scale).unwrap();
        let composed =
            apply_composed(&(x.as_tensor() * scale).unwrap(), heads, &tab.cos, &tab.sin).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
        // Position 0 is not rotated, later ones are.
        assert!(max_abs_diff(&fused, &(x.as_tensor() * scale).unwrap()) > 1e-2);
        let grad = |y: &Tensor| {
            let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(x.as_tensor()).unwrap().clone()
        };
        let (gf, gc) = (grad(&fused), grad(&composed));
        assert!(max_abs(&gc) > 1e-2);
        assert!(max_abs_diff(&gf, &gc) < 1e-6, "{}", max_abs_diff(&gf, &gc));
    }
}
