//! Inference on **packed** tokens: the real tokens of every sequence of a batch stacked into
//! one `[N, hidden]` matrix (no padding rows), [`Segment`]s saying where each sequence
//! starts, and multi-head attention over that layout.
//!
//! The encoders' differentiable path pads every sequence of a batch to the longest,
//! materialises `[B, heads, T, T]` scores, and copies activations between layouts
//! (`split_heads`, `transpose`). For inference none of that is needed: linear layers are
//! single GEMMs over all `N` rows ([`gemm`](super::gemm)); attention runs per (sequence,
//! head): that head's keys are packed once, then blocks of query rows are computed straight
//! from the strided `[N, hidden]` Q/V with the [`tiles`](super::tiles) microkernels, over
//! that sequence's keys only, and the output is written in place.
//!
//! Memory is bounded for any length: a block holds at most `SCORE_BLOCK` scores (sequences
//! longer than `KEY_BLOCK` take their keys a block at a time, with an online softmax), so a
//! 35,000-residue protein needs 256 KB of scores per thread instead of the 4.9 GB a full
//! `T x T` matrix per head would take.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::buffers::take;
use super::tiles;

/// Scores per attention block (query rows x keys): 64K f32 = 256 KB, which stays in L2
/// while the softmax and the PV product read it back.
pub const SCORE_BLOCK: usize = 64 * 1024;
/// Keys per block of the streaming (online-softmax) attention, used once a sequence has
/// more keys than this ([`tiles::softmax_rows_streaming`]). Measured on ESM-2 8M, one
/// sequence (`bench/rust/encoder.rs scale`): 8,192 tokens took 5.4-5.6 s with blocks of 256
/// keys, 5.8-5.9 s with 128, 6.0 s with 512, 7.2 s with 1,024 and 7.9-9.3 s unblocked;
/// 1,024 tokens 0.17-0.19 s against 0.21; at 512 tokens and below, no difference.
pub const KEY_BLOCK: usize = 256;

/// One sequence inside a packed `[N, hidden]` activation: rows `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
}

/// Segments from per-sequence lengths, packed back to back.
pub fn segments(lengths: &[usize]) -> Vec<Segment> {
    let mut start = 0;
    lengths
        .iter()
        .map(|&len| {
            let s = Segment { start, len };
            start += len;
            s
        })
        .collect()
}

/// Raw output pointer shared by attention blocks that write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every block writes only its own (rows, head columns) region of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method so closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Multi-head self-attention over packed sequences.
///
/// `q`, `k`, `v`: `[N, heads * head_dim]` row-major (q already scaled), as the projections
/// produce them: head `h` of token `i` is `x[i * hidden + h * head_dim ..][..head_dim]`, so no
/// head-splitting copy is needed. Each sequence attends to its own keys only (no padding,
/// no mask). Returns the context `[N, heads * head_dim]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segs: &[Segment],
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let limits = BlockLimits {
        scores: SCORE_BLOCK,
        key_block: KEY_BLOCK,
    };
    attention_with_block(q, k, v, segs, heads, head_dim, limits)
}

/// Size of an attention block: query rows x keys at most `scores` (but at least one row);
/// sequences longer than `key_block` (a multiple of 16) take their keys in blocks of that
/// many, so a block is never wider than `key_block` (see [`SCORE_BLOCK`], [`KEY_BLOCK`]).
#[derive(Debug, Clone, Copy)]
pub struct BlockLimits {
    pub scores: usize,
    pub key_block: usize,
}

/// [`attention`] with chosen block limits (tests use small blocks to exercise the row
/// chunking on short sequences).
pub fn attention_with_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segs: &[Segment],
    heads: usize,
    head_dim: usize,
    limits: BlockLimits,
) -> Vec<f32> {
    let hidden = heads * head_dim;
    let n = q.len() / hidden.max(1);
    assert!(q.len() == n * hidden && k.len() == q.len() && v.len() == q.len());
    assert!(segs.iter().all(|s| s.start + s.len <= n));
    let mut out = take(n * hidden);
    let tasks: Vec<(Segment, usize)> = segs
        .iter()
        .filter(|s| s.len > 0)
        .flat_map(|s| (0..heads).map(move |h| (*s, h)))
        .collect();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let d = head_dim;
    tasks.into_par_iter().for_each_init(
        <[Vec<f32>; 3]>::default,
        |[scores, k_t, inv_sums]: &mut [Vec<f32>; 3], (s, h)| {
            let len = s.len;
            let streaming = len > limits.key_block;
            let width = if streaming {
                limits.key_block
            } else {
                tiles::padded(len)
            };
            let rows = (limits.scores / width).clamp(1, len);
            scores.resize(rows * width, 0.0);
            inv_sums.resize(3 * rows, 0.0);
            let kv0 = s.start * hidden + h * d;
            // SAFETY (the whole task): pointers and strides stay inside q/k/v (rows of this
            // segment, columns of head h); `scores` holds rows x width; the output rows of this
            // segment in head h's columns belong to this task alone, and `out` outlives the
            // parallel loop.
            unsafe {
                let k0 = k.as_ptr().add(kv0);
                tiles::pack_transposed_blocks(k0, hidden, len, d, limits.key_block, k_t);
                let head = tiles::HeadRows::new(q.as_ptr(), v.as_ptr(), out_ptr.get(), hidden);
                let mut r0 = 0;
                while r0 < len {
                    let r = rows.min(len - r0);
                    let blk = head.block(k_t, kv0, (r0, r), (len, d));
                    if streaming {
                        tiles::softmax_rows_streaming(&blk, width, scores, inv_sums);
                    } else {
                        tiles::softmax_rows(&blk, scores, inv_sums, None, |_| {});
                    }
                    r0 += r;
                }
            }
        },
    );
    out
}

/// Lengths of the real tokens of each row of an attention mask `[B, T]` (1 = token), or
/// `None` when some row is not "ones then zeros" (the packed path needs prefix masks; any
/// other mask takes the general path).
pub fn prefix_lengths(mask: &[Vec<f32>]) -> Option<Vec<usize>> {
    mask.iter()
        .map(|row| {
            let n = row.iter().take_while(|&&m| m != 0.0).count();
            row[n..].iter().all(|&m| m == 0.0).then_some(n)
        })
        .collect()
}

/// Packed `[N, hidden]` rows back into a zero-padded `[B, T, hidden]` tensor.
pub fn unpack(x: &[f32], segs: &[Segment], t: usize, hidden: usize) -> Result<Tensor> {
    let b = segs.len();
    let mut out = vec![0f32; b * t * hidden];
    for (i, s) in segs.iter().enumerate() {
        out[i * t * hidden..(i * t + s.len) * hidden]
            .copy_from_slice(&x[s.start * hidden..(s.start + s.len) * hidden]);
    }
    Tensor::from_vec(out, (b, t, hidden), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::rand_vec;

    /// Straightforward attention over one segment, in f64.
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: Segment,
        heads: usize,
        d: usize,
    ) -> Vec<f64> {
        let hd = heads * d;
        let mut out = vec![0f64; s.len * hd];
        for h in 0..heads {
            for i in 0..s.len {
                let qi = &q[(s.start + i) * hd + h * d..][..d];
                let scores: Vec<f64> = (0..s.len)
                    .map(|j| {
                        let kj = &k[(s.start + j) * hd + h * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for c in 0..d {
                        out[i * hd + h * d + c] +=
                            ej / z * v[(s.start + j) * hd + h * d + c] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive_with_and_without_row_chunks() {
        let (heads, d) = (3, 8);
        let hd = heads * d;
        let lengths = [5, 37, 1, 70];
        let segs = segments(&lengths);
        let n: usize = lengths.iter().sum();
        let (q, k, v) = (
            rand_vec(n * hd, 2),
            rand_vec(n * hd, 3),
            rand_vec(n * hd, 4),
        );
        // Large scores so the softmax is peaked and max subtraction matters.
        let q: Vec<f32> = q.iter().map(|x| x * 8.0).collect();
        // Whole rows, row chunks down to one row, and key blocks of 16 and 32 (the 70- and
        // 37-token sequences stream their keys, with a last block that is not full).
        for (block, key_block) in [
            (SCORE_BLOCK, KEY_BLOCK),
            (100, KEY_BLOCK),
            (1, 16),
            (100, 32),
        ] {
            let limits = BlockLimits {
                scores: block,
                key_block,
            };
            let ours = attention_with_block(&q, &k, &v, &segs, heads, d, limits);
            for s in &segs {
                let want = naive_attention(&q, &k, &v, *s, heads, d);
                let got = &ours[s.start * hd..(s.start + s.len) * hd];
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5,
                        "block {block}, key block {key_block}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn prefix_lengths_accepts_only_prefix_masks() {
        assert_eq!(
            prefix_lengths(&[vec![1., 1., 0.], vec![1., 1., 1.]]),
            Some(vec![2, 3])
        );
        assert_eq!(prefix_lengths(&[vec![1., 0., 1.]]), None);
    }
}
