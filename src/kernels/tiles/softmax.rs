//! Softmax attention over one block of query rows, built from the tiles: shared by the
//! packed inference attention and the fused training forward.

use super::{narrow, padded, wide, Epilogue, Strided};

/// Where a block of [`softmax_rows`] reads and writes: `r` query rows (at `q`) against
/// `len` keys packed by [`pack_transposed`](super::pack_transposed) (`k_t`), values as rows
/// of `d` floats at stride `v_rs`, and the output as rows at stride `out_rs`.
pub struct AttentionBlock<'a> {
    pub r: usize,
    pub len: usize,
    pub d: usize,
    pub q: Strided,
    pub k_t: &'a [f32],
    pub v: *const f32,
    pub v_rs: usize,
    pub out: *mut f32,
    pub out_rs: usize,
}

/// Queries, values and output of an attention layer: `[tokens, stride]` row-major matrices
/// (stride: the hidden size), from which [`Self::block`] cuts the blocks of one head of one
/// sequence that [`softmax_rows`] works on.
#[derive(Clone, Copy)]
pub struct HeadRows {
    pub q: *const f32,
    pub v: *const f32,
    pub out: *mut f32,
    pub stride: usize,
}

impl HeadRows {
    pub fn new(q: *const f32, v: *const f32, out: *mut f32, stride: usize) -> Self {
        HeadRows { q, v, out, stride }
    }

    /// Query rows `r0..r0 + r` of one head of a sequence of `len` tokens whose first row in
    /// that head's columns is element `start` (row offset x stride + head column), against
    /// its keys packed in `k_t`, with head dimension `d`.
    ///
    /// # Safety
    /// `q`, `v` and `out` must be valid for the sequence's `len` rows from `start`.
    pub unsafe fn block(
        self,
        k_t: &[f32],
        start: usize,
        (r0, r): (usize, usize),
        (len, d): (usize, usize),
    ) -> AttentionBlock<'_> {
        let (first, rows) = (start, start + r0 * self.stride);
        AttentionBlock {
            r,
            len,
            d,
            q: Strided::rows(self.q.add(rows), self.stride),
            k_t,
            v: self.v.add(first),
            v_rs: self.stride,
            out: self.out.add(rows),
            out_rs: self.stride,
        }
    }
}

/// Softmax attention of one block, shared by inference and the training forward: scores
/// with their row maxima from one kernel, `exp(s - max)` and its row sum in one pass, the
/// value product on the unnormalised probabilities, and `1 / sum` applied to the `d`-wide
/// output rows instead of to the `len`-wide probability rows.
///
/// `scores` holds at least `r x padded(len)` floats and `inv_sums` at least `r`; `lse`, when
/// given, receives each row's log-sum-exp; `on_probs` sees the unnormalised probabilities
/// (rows of `padded(len)` floats) before the value product (dropout).
///
/// # Safety
/// The block's pointers must be valid for their rows, and `out` must not overlap the
/// inputs.
pub unsafe fn softmax_rows(
    blk: &AttentionBlock,
    scores: &mut [f32],
    inv_sums: &mut [f32],
    mut lse: Option<&mut [f32]>,
    on_probs: impl FnOnce(&mut [f32]),
) {
    let (r, len, d) = (blk.r, blk.len, blk.d);
    let ld = padded(len);
    let s = &mut scores[..r * ld];
    let inv = &mut inv_sums[..r];
    let epi = Epilogue::StoreMax {
        valid: len,
        row_max: &mut *inv,
    };
    // SAFETY (the whole body): as the caller guarantees; `s` holds r x ld.
    unsafe {
        wide(r, d, blk.q, blk.k_t, s.as_mut_ptr(), ld, epi);
        // From here on `inv` holds 1 / sum of each row.
        for (i, (row, m)) in s.chunks_mut(ld).zip(inv.iter_mut()).enumerate() {
            let sum = super::exp_minus_sum(&mut row[..len], *m);
            if let Some(lse) = lse.as_deref_mut() {
                lse[i] = *m + sum.ln();
            }
            *m = 1.0 / sum;
        }
        on_probs(s);
        let p = Strided::rows(s.as_ptr(), ld);
        narrow(r, len, d, p, blk.v, blk.v_rs, blk.out, blk.out_rs, false);
        for (i, &f) in inv.iter().enumerate() {
            std::slice::from_raw_parts_mut(blk.out.add(i * blk.out_rs), d)
                .iter_mut()
                .for_each(|x| *x *= f);
        }
    }
}

/// [`softmax_rows`] for long sequences, one block of `key_block` keys at a time (keys packed
/// by [`pack_transposed_blocks`](super::pack_transposed_blocks) with the same block): the
/// online softmax of flash attention. Each row keeps a running maximum and sum; when a later key block raises the
/// maximum, the output and the sum so far are rescaled by `exp(old - new)`. Scores then
/// take `r x key_block` floats and the keys and values of a block stay in L1/L2 while every
/// query row of the block uses them, where [`softmax_rows`] streams all `len` keys through
/// the cache once per six query rows (measured: see `kernels::packed_attention::KEY_BLOCK`). No
/// log-sum-exp and no dropout: inference only (training sequences are at most a few hundred
/// tokens, where the two agree in speed).
///
/// `scores` holds at least `r x key_block` floats and `stats` at least `3 r`.
///
/// # Safety
/// As [`softmax_rows`].
pub unsafe fn softmax_rows_streaming(
    blk: &AttentionBlock,
    key_block: usize,
    scores: &mut [f32],
    stats: &mut [f32],
) {
    let (r, len, d) = (blk.r, blk.len, blk.d);
    let (run_max, rest) = stats[..3 * r].split_at_mut(r);
    let (run_sum, block_max) = rest.split_at_mut(r);
    run_max.fill(f32::NEG_INFINITY);
    run_sum.fill(0.0);
    // SAFETY (the whole body): as the caller guarantees; `s` holds r x ld of one block, and
    // the blocked packing puts the block of keys k0.. at offset k0 * d.
    unsafe {
        let out_row = |i: usize| std::slice::from_raw_parts_mut(blk.out.add(i * blk.out_rs), d);
        for k0 in (0..len).step_by(key_block) {
            let n = key_block.min(len - k0);
            let ld = padded(n);
            let s = &mut scores[..r * ld];
            let epi = Epilogue::StoreMax {
                valid: n,
                row_max: &mut *block_max,
            };
            wide(
                r,
                d,
                blk.q,
                &blk.k_t[k0 * d..(k0 + ld) * d],
                s.as_mut_ptr(),
                ld,
                epi,
            );
            for (i, row) in s.chunks_mut(ld).enumerate() {
                let m = run_max[i].max(block_max[i]);
                if k0 > 0 && m > run_max[i] {
                    let rescale = crate::kernels::simd::fast_exp(run_max[i] - m);
                    run_sum[i] *= rescale;
                    out_row(i).iter_mut().for_each(|x| *x *= rescale);
                }
                run_max[i] = m;
                run_sum[i] += super::exp_minus_sum(&mut row[..n], m);
            }
            let p = Strided::rows(s.as_ptr(), ld);
            let v = blk.v.add(k0 * blk.v_rs);
            narrow(r, n, d, p, v, blk.v_rs, blk.out, blk.out_rs, k0 > 0);
        }
        for (i, &sum) in run_sum.iter().enumerate() {
            let f = 1.0 / sum;
            out_row(i).iter_mut().for_each(|x| *x *= f);
        }
    }
}
