//! Differentiable multi-head self-attention for training on CPU, fused in the style of
//! FlashAttention: scores, masked softmax and the value product are computed per
//! (sequence, head, block of query rows) in a cache-sized scratch buffer and never stored;
//! the backward pass recomputes them from the saved per-row log-sum-exp.
//!
//! Why: the composed version (`q @ k^T`, additive mask, softmax, `@ v`, plus the head split
//! and merge copies) materialises several `[B, heads, T, T]` tensors forward and more
//! backward. For ESM-2 8M at batch 8 x 256 each is 42 MB per layer; allocating and
//! page-faulting them dominated a training step more than the matrix products did.
//!
//! Layout: `q`, `k`, `v` and the output are `[B, T, heads * head_dim]`, as the projections
//! produce them (no head-split copies). Key padding is given as per-sequence lengths (the
//! mask must be "ones then zeros"); padded query rows still attend to the real keys, exactly
//! as the composed version computes them. Dropout on the attention probabilities draws its
//! keep/drop decisions from a counter-based hash of (seed, sequence, head, row, key), so the
//! backward regenerates the same mask without storing it.

use std::sync::Mutex;

use candle_core::{Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::buffers;
use super::custom_op::{apply3, F32Op3, Grads3};
use super::dropout::DropMask;
use super::tiles::{self, Epilogue, Strided};

/// Scores kept per block (query rows x keys): 64 K floats = 256 KB, an L2-sized working set.
const SCORE_BLOCK: usize = 64 * 1024;

/// Fused attention over `q`, `k`, `v` [B, T, heads*head_dim] (q already scaled) with key
/// lengths `lengths[b]` (keys `>= lengths[b]` are padding) and optional dropout on the
/// probabilities. Returns [B, T, heads*head_dim].
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &[usize],
    heads: usize,
    dropout: Option<DropMask>,
) -> Result<Tensor> {
    let (b, t, hidden) = q.dims3()?;
    if lengths.len() != b || lengths.iter().any(|&l| l > t) || !hidden.is_multiple_of(heads) {
        candle_core::bail!(
            "fused attention: {b} sequences of {t} tokens, lengths {lengths:?}, {heads} heads"
        );
    }
    let op = FusedAttention {
        geometry: Geometry {
            batch: b,
            tokens: t,
            heads,
            head_dim: hidden / heads,
            lengths: lengths.to_vec(),
            dropout: dropout.filter(|d| d.p > 0.0),
        },
        lse: Mutex::new(Vec::new()),
    };
    apply3(q, k, v, op)
}

#[derive(Clone, Debug)]
struct Geometry {
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    lengths: Vec<usize>,
    dropout: Option<DropMask>,
}

impl Geometry {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    fn elems(&self) -> usize {
        self.batch * self.tokens * self.hidden()
    }

    /// Query rows per block for rows of `len` scores.
    fn rows_per_block(&self, len: usize) -> usize {
        (SCORE_BLOCK / len.max(1)).clamp(1, self.tokens.max(1))
    }

    /// Offset of (sequence `b`, token 0, head `h`) in a [B, T, hidden] buffer.
    fn base(&self, b: usize, h: usize) -> usize {
        b * self.tokens * self.hidden() + h * self.head_dim
    }

    /// Multiplies probability rows `r0..r0+r` of (b, h) (rows of `ld` floats, the first `len`
    /// real keys) by their dropout factors (no-op without dropout). Mask row
    /// `(b * heads + h) * T + i` holds query `i`'s factors over the keys.
    fn apply_dropout(&self, p: &mut [f32], ld: usize, b: usize, h: usize, r0: usize, len: usize) {
        let Some(drop) = self.dropout else { return };
        let first = ((b * self.heads + h) * self.tokens + r0) as u64;
        for (i, row) in p.chunks_mut(ld).enumerate() {
            drop.apply_row(drop.row_key(first + i as u64), &mut row[..len]);
        }
    }

    /// (sequence, head) tasks with at least one key.
    fn tasks(&self) -> Vec<(usize, usize)> {
        (0..self.batch)
            .filter(|&b| self.lengths[b] > 0)
            .flat_map(|b| (0..self.heads).map(move |h| (b, h)))
            .collect()
    }
}

struct FusedAttention {
    geometry: Geometry,
    /// Log-sum-exp of every score row, [B, heads, T], saved by the forward for the backward.
    lse: Mutex<Vec<f32>>,
}

/// Raw pointer to a buffer that parallel tasks write in disjoint regions.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes only its own (sequence, head) columns of the buffers.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl F32Op3 for FusedAttention {
    fn name(&self) -> &'static str {
        "protloc-fused-attention"
    }

    fn forward(
        &self,
        [q, k, v]: [&[f32]; 3],
        [l1, _, _]: [&Layout; 3],
    ) -> Result<(Vec<f32>, Shape)> {
        let g = &self.geometry;
        if q.len() != g.elems() || k.len() != g.elems() || v.len() != g.elems() {
            candle_core::bail!("fused attention: q/k/v sizes do not match {g:?}");
        }
        let (out, lse) = forward(g, q, k, v);
        *self.lse.lock().expect("lse lock") = lse;
        Ok((out, l1.shape().clone()))
    }

    fn backward(&self, [q, k, v]: [&Tensor; 3], out: &Tensor, grad_out: &Tensor) -> Result<Grads3> {
        let g = &self.geometry;
        // Read the inputs in place (q/k/v/out are contiguous already; the gradient may not be).
        let c = Tensor::contiguous;
        let (q, k, v, out, grad_out) = (c(q)?, c(k)?, c(v)?, c(out)?, c(grad_out)?);
        let lse = self.lse.lock().expect("lse lock");
        let view = buffers::view;
        let (dq, dk, dv) = backward(
            g,
            view(&q)?.get(),
            view(&k)?.get(),
            view(&v)?.get(),
            view(&out)?.get(),
            view(&grad_out)?.get(),
            &lse,
        );
        let shape = q.shape();
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, shape, dev)?),
            Some(Tensor::from_vec(dk, shape, dev)?),
            Some(Tensor::from_vec(dv, shape, dev)?),
        ))
    }
}

/// Forward pass: the context [B, T, hidden] and the score rows' log-sum-exp [B, heads, T],
/// block by block with [`tiles::softmax_rows`].
fn forward(g: &Geometry, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (t, d, hidden) = (g.tokens, g.head_dim, g.hidden());
    let mut out = vec![0f32; g.elems()];
    let mut lse = vec![0f32; g.batch * g.heads * t];
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    g.tasks().into_par_iter().for_each_init(
        <[Vec<f32>; 3]>::default,
        |[scores, k_t, inv_sums]: &mut [Vec<f32>; 3], (b, h)| {
            let len = g.lengths[b];
            let base = g.base(b, h);
            let ld = tiles::padded(len);
            let rows = g.rows_per_block(ld);
            scores.resize(rows * ld, 0.0);
            inv_sums.resize(rows, 0.0);
            // SAFETY (the whole task): q/k/v reads stay inside sequence b, head h's columns;
            // `scores` holds r x ld; the output rows r0..r0+r and the lse entries of (b, h)
            // belong to this task alone.
            unsafe {
                tiles::pack_transposed(k.as_ptr().add(base), hidden, len, d, k_t);
                let head = tiles::HeadRows::new(q.as_ptr(), v.as_ptr(), out_ptr.get(), hidden);
                let mut r0 = 0;
                while r0 < t {
                    let r = rows.min(t - r0);
                    let blk = head.block(k_t, base, (r0, r), (len, d));
                    let lse_rows = std::slice::from_raw_parts_mut(
                        lse_ptr.get().add((b * g.heads + h) * t + r0),
                        r,
                    );
                    let dropout = |p: &mut [f32]| g.apply_dropout(p, ld, b, h, r0, len);
                    tiles::softmax_rows(&blk, scores, inv_sums, Some(lse_rows), dropout);
                    r0 += r;
                }
            }
        },
    );
    (out, lse)
}

/// Backward pass: gradients of q, k and v, each [B, T, hidden].
fn backward(
    g: &Geometry,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    grad_out: &[f32],
    lse: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, d, hidden) = (g.tokens, g.head_dim, g.hidden());
    let mut dq = vec![0f32; g.elems()];
    let mut dk = vec![0f32; g.elems()];
    let mut dv = vec![0f32; g.elems()];
    let ptrs = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    g.tasks().into_par_iter().for_each_init(
        <[Vec<f32>; 5]>::default,
        |[p_buf, dp_buf, k_t, v_t, dots]: &mut [Vec<f32>; 5], (b, h)| {
            let (dq_ptr, dk_ptr, dv_ptr) = ptrs;
            let len = g.lengths[b];
            let base = g.base(b, h);
            let ld = tiles::padded(len);
            let rows = g.rows_per_block(ld);
            p_buf.resize(rows * ld, 0.0);
            dp_buf.resize(rows * ld, 0.0);
            dots.resize(rows, 0.0);
            // Element (key j, query row i) of a block stored row-major by query: transposed.
            let by_key = |m: &[f32]| Strided {
                ptr: m.as_ptr(),
                rs: 1,
                cs: ld as isize,
            };
            // SAFETY (the whole task): reads stay inside sequence b, head h's columns of
            // q/k/v/out/grad; dq rows r0..r0+r and dk/dv rows 0..len of (b, h) are written by
            // this task alone; p/dp hold r x ld.
            unsafe {
                tiles::pack_transposed(k.as_ptr().add(base), hidden, len, d, k_t);
                tiles::pack_transposed(v.as_ptr().add(base), hidden, len, d, v_t);
                let mut r0 = 0;
                while r0 < t {
                    let r = rows.min(t - r0);
                    let off = base + r0 * hidden;
                    let p = &mut p_buf[..r * ld];
                    let dp = &mut dp_buf[..r * ld];
                    let (q_blk, g_blk) = (q.as_ptr().add(off), grad_out.as_ptr().add(off));
                    // P = exp(Q K^T - lse), recomputed.
                    let lse_rows = &lse[(b * g.heads + h) * t + r0..][..r];
                    let epi = Epilogue::ExpMinus { lse: lse_rows };
                    tiles::wide(
                        r,
                        d,
                        Strided::rows(q_blk, hidden),
                        k_t,
                        p.as_mut_ptr(),
                        ld,
                        epi,
                    );
                    // dV += Pd^T dO, Pd = P with dropout applied (in dp's buffer for now).
                    let pd: &[f32] = if g.dropout.is_some() {
                        dp.copy_from_slice(p);
                        g.apply_dropout(dp, ld, b, h, r0, len);
                        dp
                    } else {
                        p
                    };
                    let dv_rows = dv_ptr.get().add(base);
                    tiles::narrow(len, r, d, by_key(pd), g_blk, hidden, dv_rows, hidden, true);
                    // dS = P * (dP - rowsum(dO * O)), dP = dO V^T (times the dropout factors).
                    for (i, di) in dots[..r].iter_mut().enumerate() {
                        let go = &grad_out[off + i * hidden..][..d];
                        let o = &out[off + i * hidden..][..d];
                        *di = go.iter().zip(o).map(|(a, b)| a * b).sum();
                    }
                    let dp_ptr = dp.as_mut_ptr();
                    let g_rows = Strided::rows(g_blk, hidden);
                    if g.dropout.is_some() {
                        tiles::wide(r, d, g_rows, v_t, dp_ptr, ld, Epilogue::Store);
                        g.apply_dropout(dp, ld, b, h, r0, len);
                        for (i, &di) in dots[..r].iter().enumerate() {
                            let prow = &p[i * ld..][..len];
                            for (s, &pi) in dp[i * ld..][..len].iter_mut().zip(prow) {
                                *s = pi * (*s - di);
                            }
                        }
                    } else {
                        let epi = Epilogue::SoftmaxGrad {
                            p: p.as_ptr(),
                            di: &dots[..r],
                        };
                        tiles::wide(r, d, g_rows, v_t, dp_ptr, ld, epi);
                    }
                    // dQ = dS K, dK += dS^T Q
                    let (k_rows, dq_rows) = (k.as_ptr().add(base), dq_ptr.get().add(off));
                    tiles::narrow(
                        r,
                        len,
                        d,
                        Strided::rows(dp.as_ptr(), ld),
                        k_rows,
                        hidden,
                        dq_rows,
                        hidden,
                        false,
                    );
                    let dk_rows = dk_ptr.get().add(base);
                    tiles::narrow(len, r, d, by_key(dp), q_blk, hidden, dk_rows, hidden, true);
                    r0 += r;
                }
            }
        },
    );
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::{mask_bias, split_heads};
    use crate::kernels::ops;
    use crate::kernels::test_util::{max_abs, max_abs_diff, var};
    use candle_core::Device;

    /// The dropout factor of every probability as a [B, heads, T, T] tensor.
    fn mask_tensor(d: &DropMask, b: usize, heads: usize, t: usize) -> Tensor {
        let f = d.factors(b * heads * t, t);
        Tensor::from_vec(f, (b, heads, t, t), &Device::Cpu).unwrap()
    }

    /// The composed reference: split heads, masked softmax, the given dropout factors,
    /// value product, merge heads.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lengths: &[usize],
        heads: usize,
        dropout: Option<DropMask>,
    ) -> Tensor {
        let (b, t, hidden) = q.dims3().unwrap();
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&l| (0..t).map(move |i| if i < l { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
        let bias = mask_bias(&mask).unwrap();
        let split = |x: &Tensor| split_heads(x, heads).unwrap();
        let scores = split(q)
            .matmul(&split(k).t().unwrap().contiguous().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let mut probs = ops::softmax_last_dim(&scores).unwrap();
        if let Some(d) = dropout {
            probs = (probs * mask_tensor(&d, b, heads, t)).unwrap();
        }
        let ctx = probs.matmul(&split(v)).unwrap();
        ctx.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, t, hidden))
            .unwrap()
    }

    fn check(
        b: usize,
        t: usize,
        heads: usize,
        d: usize,
        lengths: &[usize],
        dropout: Option<DropMask>,
    ) {
        let shape = [b, t, heads * d];
        let var = |seed: u64| var(&shape, seed, 0.0);
        let (q, k, v) = (var(1), var(2), var(3));
        let weights = var(4); // a loss weight per output element
        let fused = fused_attention(&q, &k, &v, lengths, heads, dropout).unwrap();
        let composed = reference(&q, &k, &v, lengths, heads, dropout);
        let diff = max_abs_diff(&fused, &composed);
        assert!(
            diff < 1e-5,
            "{b}x{t}, {dropout:?}: forward differs by {diff}"
        );
        let loss_of = |o: &Tensor| (o * weights.as_tensor()).unwrap().sum_all().unwrap();
        let gf = loss_of(&fused).backward().unwrap();
        let gc = loss_of(&composed).backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, c) = (gf.get(x).unwrap(), gc.get(x).unwrap());
            let tol = 1e-5 * (1.0 + max_abs(c));
            let diff = max_abs_diff(a, c);
            assert!(
                diff < tol,
                "{b}x{t}, {dropout:?}: d{name} differs by {diff} (tolerance {tol})"
            );
        }
        // Padded keys get no gradient.
        for (i, &len) in lengths.iter().enumerate() {
            if len < t {
                let dk = gf
                    .get(&k)
                    .unwrap()
                    .get(i)
                    .unwrap()
                    .narrow(0, len, t - len)
                    .unwrap();
                let total: f32 = dk.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
                assert_eq!(total, 0.0, "padded keys of sequence {i} got a gradient");
            }
        }
    }

    #[test]
    fn forward_and_gradients_match_composed_attention() {
        // Odd sizes and a ragged batch; the 300-token sequence needs two row blocks.
        check(3, 7, 3, 5, &[7, 4, 1], None);
        check(1, 300, 2, 4, &[300], None);
        // Head widths the vector microkernels take (16 as ESM-2 8M, 24 = 16 + 8 columns).
        check(2, 40, 2, 16, &[40, 17], None);
        check(1, 300, 1, 24, &[300], None);
    }

    #[test]
    fn dropout_matches_composed_attention_under_the_same_mask() {
        let drop = DropMask { p: 0.3, seed: 7 };
        let mask = mask_tensor(&drop, 2, 3, 9);
        let dropped: f32 = mask
            .eq(0f32)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((0.2..0.4).contains(&dropped), "dropped fraction {dropped}");
        check(2, 9, 3, 4, &[9, 5], Some(drop));
        check(1, 300, 2, 4, &[280], Some(DropMask { p: 0.1, seed: 3 }));
    }
}
