//! Matrix products with one dimension equal to an attention head's width (`d`: 16 for ESM-2
//! 8M, 64 for ProtBERT), the building blocks of the attention kernels.
//!
//! Why not only the `gemm` crate: called per (sequence, head, block of query rows) it packs
//! both operands on every call, so blocks had to be large (256 query rows: 1 MB of scores,
//! past L2, at 1,024 keys) to amortise that. And the softmax around it took separate passes
//! over the scores: row maximum, exp and sum, normalisation forward; exp and the softmax
//! gradient backward. Here the keys (and values, for the backward) of one (sequence, head)
//! are packed once, transposed, so blocks stay L2-sized at any length, and the score kernel
//! does the softmax's per-element work in its epilogue on the registers. Measured on ESM-2
//! 8M at 4x1024 (inference), that plus the vector exp made the forward 11% faster; the
//! training attention runs at about the `gemm` crate's speed with fewer passes. Two
//! register-blocked AVX2/FMA microkernels:
//!
//! - [`wide`]: `C[m, n] = A[m, d] @ Bt[d, n]` (scores `Q K^T`, and `dO V^T`), a 6 x 16 tile of
//!   `C` in registers per step over `d`;
//! - [`narrow`]: `C[m, d] (+)= A[m, k] @ B[k, d]` (`P V`, `dS K`, `P^T dO`, `dS^T Q`), 6 rows
//!   of `C` in registers while `k` runs over the keys (or query rows), for `d` up to 24;
//!   wider heads (64 for ProtBERT) go to the `gemm` crate, whose blocking suits them.
//!
//! Both take arbitrary row and column strides for `A`, so transposed probability blocks need
//! no copy. Without AVX2+FMA, or for a width that is not a multiple of 8, portable loops
//! compute the same sums.

#[cfg(target_arch = "x86_64")]
use super::kernels::has_avx2_fma;

/// Columns per [`wide`] tile: packed `Bt` rows are padded to a multiple of this.
pub const TILE_COLS: usize = 16;
/// Rows of `C` per microkernel tile.
const TILE_ROWS: usize = 6;
/// Widest `d` the [`narrow`] register tile takes; wider products go to the `gemm` crate.
const NARROW_MAX: usize = 24;

/// A strided matrix operand: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Strided {
    /// Row-major rows of `rs` floats.
    pub fn rows(ptr: *const f32, rs: usize) -> Self {
        Self {
            ptr,
            rs: rs as isize,
            cs: 1,
        }
    }

    #[inline(always)]
    unsafe fn at(self, i: usize, j: usize) -> *const f32 {
        // SAFETY: the caller keeps (i, j) inside the operand.
        unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }
}

/// `n` rounded up to a whole number of [`wide`] tiles.
pub fn padded(n: usize) -> usize {
    n.div_ceil(TILE_COLS) * TILE_COLS
}

/// Packs `rows` rows of width `d` (row `j` at `src + j * rs`) transposed into `dst` as
/// `[d, padded(rows)]`, zeros in the padding columns.
///
/// # Safety
/// `src` must be valid for `rows` rows of `d` floats at stride `rs`.
pub unsafe fn pack_transposed(
    src: *const f32,
    rs: usize,
    rows: usize,
    d: usize,
    dst: &mut Vec<f32>,
) {
    dst.clear();
    dst.resize(d * padded(rows), 0.0);
    // SAFETY: as the caller guarantees; `dst` holds d x padded(rows).
    unsafe { pack_into(src, rs, rows, d, dst) };
}

/// [`pack_transposed`] in consecutive blocks of `block` rows (a multiple of [`TILE_COLS`]):
/// the block of rows `b * block ..` is `[d, padded(its rows)]` starting at offset
/// `b * block * d`, so [`wide`] can take one block of keys at a time. With `rows <= block`
/// the layout is [`pack_transposed`]'s.
///
/// # Safety
/// As [`pack_transposed`].
pub unsafe fn pack_transposed_blocks(
    src: *const f32,
    rs: usize,
    rows: usize,
    d: usize,
    block: usize,
    dst: &mut Vec<f32>,
) {
    assert!(block > 0 && block.is_multiple_of(TILE_COLS));
    dst.clear();
    dst.resize(d * (rows / block * block + padded(rows % block)), 0.0);
    for j0 in (0..rows).step_by(block) {
        let n = block.min(rows - j0);
        let out = &mut dst[j0 * d..(j0 + padded(n)) * d];
        // SAFETY: rows j0..j0+n of the source, as the caller guarantees.
        unsafe { pack_into(src.add(j0 * rs), rs, n, d, out) };
    }
}

/// The packing itself, into `out` of exactly `d x padded(rows)` zeroed floats.
unsafe fn pack_into(src: *const f32, rs: usize, rows: usize, d: usize, out: &mut [f32]) {
    let ld = padded(rows);
    debug_assert_eq!(out.len(), d * ld);
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && has_avx2_fma() {
        // SAFETY: CPU features checked; bounds as the caller guarantees.
        return unsafe { avx2::pack_into(src, rs, rows, d, out) };
    }
    // In blocks of 16 source rows: the block (16 x d floats) stays in L1 while each of its
    // columns is written out contiguously.
    for j0 in (0..rows).step_by(TILE_COLS) {
        let n = TILE_COLS.min(rows - j0);
        for (k, out) in out.chunks_exact_mut(ld).enumerate() {
            for (j, o) in out[j0..j0 + n].iter_mut().enumerate() {
                // SAFETY: element k of source row j0 + j, as the caller guarantees.
                *o = unsafe { *src.add((j0 + j) * rs + k) };
            }
        }
    }
}

/// What [`wide`] does with each product before (or while) storing it.
pub enum Epilogue<'a> {
    /// `C = A Bt`.
    Store,
    /// `C = A Bt`, and `row_max[i]` = the largest of row `i`'s first `valid` columns (the
    /// softmax's shift, without a separate pass over the scores).
    StoreMax {
        valid: usize,
        row_max: &'a mut [f32],
    },
    /// `C = exp(A Bt - lse[i])`: probabilities recomputed from their log-sum-exp.
    ExpMinus { lse: &'a [f32] },
    /// `C = P * (A Bt - di[i])` element-wise, `P` laid out like `C`: the softmax backward
    /// (`di` = rowsum(dO * O)).
    SoftmaxGrad { p: *const f32, di: &'a [f32] },
}

/// `C[m, ld] = A[m, d] @ Bt[d, ld]` with `Bt` packed by [`pack_transposed`] (`ld` =
/// `bt.len() / d`, a multiple of [`TILE_COLS`]); `C` rows at stride `c_rs >= ld`, finished
/// by `epi`. Runs the best [`WideKernel`] this CPU has.
///
/// # Safety
/// `a` must be valid for `m x d`, `c` (and an epilogue's `P`) for `m` rows of `ld` floats at
/// stride `c_rs`, `c` must not overlap `a`, `bt` or `P`, and the epilogue's slices must
/// hold `m` entries.
pub unsafe fn wide(
    m: usize,
    d: usize,
    a: Strided,
    bt: &[f32],
    c: *mut f32,
    c_rs: usize,
    epi: Epilogue,
) {
    // SAFETY: as the caller guarantees.
    unsafe { wide_with(WideKernel::best(), m, d, a, bt, c, c_rs, epi) }
}

/// The implementations of [`wide`]: all compute the same sums (tests compare each with a
/// reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WideKernel {
    Portable,
    /// 6 rows x 16 columns of `C` in 12 ymm registers.
    Avx2,
    /// 6 rows x 32 columns in 12 zmm registers: the same arithmetic per cycle on Zen 4
    /// (which splits a zmm FMA in two) from half the instructions, so the loop is no longer
    /// limited by instruction issue (measured: see the `avx2::avx512` module).
    Avx512,
}

impl WideKernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        [Self::Avx512, Self::Avx2]
            .into_iter()
            .find(|k| k.runs_here())
            .unwrap_or(Self::Portable)
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Self> {
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// Whether this CPU has the instructions the kernel needs (checked once per process).
    pub fn runs_here(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => has_avx2_fma(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => has_avx2_fma() && avx2::has_avx512f(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// [`wide`] with a chosen kernel, which must be one of [`WideKernel::available`].
///
/// # Safety
/// As [`wide`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn wide_with(
    kernel: WideKernel,
    m: usize,
    d: usize,
    a: Strided,
    bt: &[f32],
    c: *mut f32,
    c_rs: usize,
    mut epi: Epilogue,
) {
    let ld = bt.len() / d.max(1);
    debug_assert!(ld.is_multiple_of(TILE_COLS) && c_rs >= ld);
    if let Epilogue::StoreMax { row_max, .. } = &mut epi {
        row_max[..m].fill(f32::NEG_INFINITY);
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != WideKernel::Portable {
        assert!(kernel.runs_here(), "{kernel:?} not on this CPU");
        let zmm = kernel == WideKernel::Avx512;
        // SAFETY: CPU features checked; bounds as the caller guarantees.
        return unsafe { avx2::wide(m, d, a, bt, ld, c, c_rs, &mut epi, zmm) };
    }
    for i in 0..m {
        for j in 0..ld {
            let mut s = 0f32;
            for k in 0..d {
                // SAFETY: inside A and Bt.
                s += unsafe { *a.at(i, k) } * bt[k * ld + j];
            }
            // SAFETY: inside C (and P).
            unsafe { *c.add(i * c_rs + j) = finish(&mut epi, i, j, i * c_rs + j, s) };
        }
    }
}

/// The epilogue of one product `s` at row `i`, column `j` (offset `at` in `C` and `P`).
#[inline(always)]
fn finish(epi: &mut Epilogue, i: usize, j: usize, at: usize, s: f32) -> f32 {
    match epi {
        Epilogue::Store => s,
        Epilogue::StoreMax { valid, row_max } => {
            if j < *valid {
                row_max[i] = row_max[i].max(s);
            }
            s
        }
        Epilogue::ExpMinus { lse } => super::kernels::fast_exp(s - lse[i]),
        // SAFETY: P has C's layout, as `wide`'s caller guarantees.
        Epilogue::SoftmaxGrad { p, di } => (unsafe { *p.add(at) }) * (s - di[i]),
    }
}

/// Where a block of [`softmax_rows`] reads and writes: `r` query rows (at `q`) against
/// `len` keys packed by [`pack_transposed`] (`k_t`), values as rows of `d` floats at stride
/// `v_rs`, and the output as rows at stride `out_rs`.
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
            let sum = crate::model::kernels::exp_minus_sum(&mut row[..len], *m);
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
/// by [`pack_transposed_blocks`] with the same block): the online softmax of flash
/// attention. Each row keeps a running maximum and sum; when a later key block raises the
/// maximum, the output and the sum so far are rescaled by `exp(old - new)`. Scores then
/// take `r x key_block` floats and the keys and values of a block stay in L1/L2 while every
/// query row of the block uses them, where [`softmax_rows`] streams all `len` keys through
/// the cache once per six query rows (measured: see `kernels::KEY_BLOCK`). No
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
                    let rescale = crate::model::kernels::fast_exp(run_max[i] - m);
                    run_sum[i] *= rescale;
                    out_row(i).iter_mut().for_each(|x| *x *= rescale);
                }
                run_max[i] = m;
                run_sum[i] += crate::model::kernels::exp_minus_sum(&mut row[..n], m);
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

/// `C[m, d] (+)= A[m, k] @ B[k, d]`: `B` rows of `d` floats at stride `b_rs`, `C` rows at
/// stride `c_rs`; `accumulate` adds to `C` instead of overwriting it.
///
/// # Safety
/// `a` must be valid for `m x k`, `b` for `k` rows and `c` for `m` rows of `d` floats at their
/// strides, and `c` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn narrow(
    m: usize,
    k: usize,
    d: usize,
    a: Strided,
    b: *const f32,
    b_rs: usize,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && d <= NARROW_MAX && has_avx2_fma() {
        // SAFETY: CPU features checked; bounds as the caller guarantees.
        return unsafe { avx2::narrow(m, k, d, a, b, b_rs, c, c_rs, accumulate) };
    }
    if d > NARROW_MAX {
        // Wide enough for the `gemm` crate's own blocking (measured at d = 64: 105 GFLOP/s
        // against 61 for the register tile, which re-reads A once per 16 columns).
        // SAFETY: as the caller guarantees.
        unsafe {
            gemm::gemm(
                m,
                d,
                k,
                c,
                1,
                c_rs as isize,
                accumulate,
                a.ptr,
                a.cs,
                a.rs,
                b,
                1,
                b_rs as isize,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        return;
    }
    for i in 0..m {
        // SAFETY: row i of C, as the caller guarantees.
        let crow = unsafe { std::slice::from_raw_parts_mut(c.add(i * c_rs), d) };
        if !accumulate {
            crow.fill(0.0);
        }
        for kk in 0..k {
            // SAFETY: inside A and B.
            let (av, brow) = unsafe {
                (
                    *a.at(i, kk),
                    std::slice::from_raw_parts(b.add(kk * b_rs), d),
                )
            };
            for (cv, &bv) in crow.iter_mut().zip(brow) {
                *cv += av * bv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{Epilogue, Strided, TILE_COLS, TILE_ROWS};

    use std::arch::x86_64::*;

    /// [`pack_into`](super::pack_into) for `d` a multiple of 8: blocks of 8 rows x 8
    /// columns are transposed in registers (8 loads, 24 shuffles, 8 stores where the scalar
    /// gather took 64 loads and 64 stores); the last `rows % 8` rows go element by element.
    /// Measured: the packing was 0.8% of a ProtBERT-shape 4x1024 forward.
    ///
    /// # Safety
    /// As [`pack_into`](super::pack_into); `d % 8 == 0`, AVX2 available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pack_into(
        src: *const f32,
        rs: usize,
        rows: usize,
        d: usize,
        out: &mut [f32],
    ) {
        let ld = super::padded(rows);
        debug_assert!(d.is_multiple_of(8) && out.len() == d * ld);
        let dst = out.as_mut_ptr();
        let whole = rows / 8 * 8;
        for j0 in (0..whole).step_by(8) {
            for k0 in (0..d).step_by(8) {
                // SAFETY: rows j0..j0+8, columns k0..k0+8 of the source (caller's bounds);
                // output rows k0..k0+8, columns j0..j0+8 < ld of `out`.
                unsafe {
                    let r: [__m256; 8] =
                        std::array::from_fn(|i| _mm256_loadu_ps(src.add((j0 + i) * rs + k0)));
                    for (i, col) in transpose8(r).into_iter().enumerate() {
                        _mm256_storeu_ps(dst.add((k0 + i) * ld + j0), col);
                    }
                }
            }
        }
        for j in whole..rows {
            for k in 0..d {
                // SAFETY: element k of source row j; out[k * ld + j] with j < ld.
                unsafe { *dst.add(k * ld + j) = *src.add(j * rs + k) };
            }
        }
    }

    /// The 8 x 8 transpose of 8 rows held in registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// Epilogue kinds, as const parameters so each compiles to its own loop.
    const STORE: u8 = 0;
    const MAX: u8 = 1;
    const EXP: u8 = 2;
    const GRAD: u8 = 3;

    /// An epilogue's operands as raw parts.
    #[derive(Clone, Copy)]
    struct Extra {
        valid: usize,
        row_max: *mut f32,
        /// lse (EXP) or di (GRAD), one per row.
        per_row: *const f32,
        /// P (GRAD), laid out like C.
        p: *const f32,
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn wide(
        m: usize,
        d: usize,
        a: Strided,
        bt: &[f32],
        ld: usize,
        c: *mut f32,
        c_rs: usize,
        epi: &mut Epilogue,
        zmm: bool,
    ) {
        let mut x = Extra {
            valid: ld,
            row_max: std::ptr::null_mut(),
            per_row: std::ptr::null(),
            p: std::ptr::null(),
        };
        let kind = match epi {
            Epilogue::Store => STORE,
            Epilogue::StoreMax { valid, row_max } => {
                x.valid = *valid;
                x.row_max = row_max.as_mut_ptr();
                MAX
            }
            Epilogue::ExpMinus { lse } => {
                x.per_row = lse.as_ptr();
                EXP
            }
            Epilogue::SoftmaxGrad { p, di } => {
                x.per_row = di.as_ptr();
                x.p = *p;
                GRAD
            }
        };
        let bt = bt.as_ptr();
        // SAFETY: as the caller guarantees.
        unsafe {
            match kind {
                STORE => wide_kind::<STORE>(m, d, a, bt, ld, c, c_rs, x, zmm),
                MAX => wide_kind::<MAX>(m, d, a, bt, ld, c, c_rs, x, zmm),
                EXP => wide_kind::<EXP>(m, d, a, bt, ld, c, c_rs, x, zmm),
                _ => wide_kind::<GRAD>(m, d, a, bt, ld, c, c_rs, x, zmm),
            }
        }
    }

    /// All rows of a [`wide`] product with epilogue `K`, [`TILE_ROWS`] at a time.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn wide_kind<const K: u8>(
        m: usize,
        d: usize,
        a: Strided,
        bt: *const f32,
        ld: usize,
        c: *mut f32,
        c_rs: usize,
        x: Extra,
        zmm: bool,
    ) {
        let mut i0 = 0;
        while i0 < m {
            let rows = TILE_ROWS.min(m - i0);
            // SAFETY: rows i0..i0+rows of A, C (and P), all of Bt, as the caller guarantees.
            unsafe {
                let r = Rows {
                    d,
                    a0: a.at(i0, 0),
                    a,
                    bt,
                    ld,
                    c0: c.add(i0 * c_rs),
                    c_rs,
                    i0,
                };
                match (zmm, rows) {
                    (true, 6) => avx512::wide_rows::<6, K>(&r, x),
                    (true, 5) => avx512::wide_rows::<5, K>(&r, x),
                    (true, 4) => avx512::wide_rows::<4, K>(&r, x),
                    (true, 3) => avx512::wide_rows::<3, K>(&r, x),
                    (true, 2) => avx512::wide_rows::<2, K>(&r, x),
                    (true, _) => avx512::wide_rows::<1, K>(&r, x),
                    (false, 6) => wide_rows::<6, K>(&r, x),
                    (false, 5) => wide_rows::<5, K>(&r, x),
                    (false, 4) => wide_rows::<4, K>(&r, x),
                    (false, 3) => wide_rows::<3, K>(&r, x),
                    (false, 2) => wide_rows::<2, K>(&r, x),
                    (false, _) => wide_rows::<1, K>(&r, x),
                }
            }
            i0 += rows;
        }
    }

    /// Where `R` rows of a [`wide`] product read and write.
    struct Rows {
        d: usize,
        a0: *const f32,
        a: Strided,
        bt: *const f32,
        ld: usize,
        c0: *mut f32,
        c_rs: usize,
        /// Index of the first row (into the epilogue's per-row slices and P).
        i0: usize,
    }

    /// `R` rows x all columns, 16 at a time: 2R accumulators, two `Bt` loads and R
    /// broadcasts per step over `d`, then the epilogue `K` on the registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn wide_rows<const R: usize, const K: u8>(t: &Rows, x: Extra) {
        // Columns whose tiles lie wholly inside the valid range (for the row maxima).
        let full = x.valid / TILE_COLS * TILE_COLS;
        let mut maxv = [_mm256_set1_ps(f32::NEG_INFINITY); R];
        for j0 in (0..t.ld).step_by(TILE_COLS) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            // SAFETY (whole body): offsets inside the rows and columns the caller checked.
            unsafe {
                let b0 = t.bt.add(j0);
                for k in 0..t.d {
                    let bl = _mm256_loadu_ps(b0.add(k * t.ld));
                    let bh = _mm256_loadu_ps(b0.add(k * t.ld + 8));
                    for (i, row) in acc.iter_mut().enumerate() {
                        let at = i as isize * t.a.rs + k as isize * t.a.cs;
                        let av = _mm256_set1_ps(*t.a0.offset(at));
                        row[0] = _mm256_fmadd_ps(av, bl, row[0]);
                        row[1] = _mm256_fmadd_ps(av, bh, row[1]);
                    }
                }
                for (i, row) in acc.iter().enumerate() {
                    let at = i * t.c_rs + j0;
                    let mut out = *row;
                    if K == EXP {
                        let l = _mm256_set1_ps(*x.per_row.add(t.i0 + i));
                        out = out.map(|v| exp(_mm256_sub_ps(v, l)));
                    } else if K == GRAD {
                        let di = _mm256_set1_ps(*x.per_row.add(t.i0 + i));
                        let p = x.p.add(t.i0 * t.c_rs + at);
                        out[0] = _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_sub_ps(out[0], di));
                        out[1] =
                            _mm256_mul_ps(_mm256_loadu_ps(p.add(8)), _mm256_sub_ps(out[1], di));
                    } else if K == MAX && j0 < full {
                        maxv[i] = _mm256_max_ps(maxv[i], _mm256_max_ps(out[0], out[1]));
                    }
                    _mm256_storeu_ps(t.c0.add(at), out[0]);
                    _mm256_storeu_ps(t.c0.add(at + 8), out[1]);
                }
            }
        }
        if K == MAX {
            for (i, &v) in maxv.iter().enumerate() {
                // SAFETY: row i of C (columns full..valid were stored above) and of row_max.
                unsafe {
                    let row = std::slice::from_raw_parts(t.c0.add(i * t.c_rs), x.valid);
                    let m = row[full..].iter().fold(hmax(v), |a, &b| a.max(b));
                    *x.row_max.add(t.i0 + i) = m;
                }
            }
        }
    }

    /// Whether the CPU has AVX-512F (checked once).
    pub(crate) fn has_avx512f() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }

    /// [`wide_rows`] on zmm registers: 32 columns per tile (16 in a last odd one), so a step
    /// over `d` is 12 FMAs, 2 loads and 6 broadcasts for 192 products where the ymm tile
    /// needs the same count of instructions for 96. Measured on Zen 4: in the ProtBERT-shape
    /// forward at 4 x 1,024 (`perf`) the ymm loop issued ~26 instructions per 6-cycle step
    /// and ran at ~75% of the FMA peak; the zmm tile took the kernel from 8.2% to 6.3% of
    /// that forward's samples, and single-threaded from 104 to 114 GFLOP/s at `d` = 64 and
    /// from 101 to 105 at 16 (`cargo bench --bench encoder -- scores --threads 1`).
    mod avx512 {
        use super::{exp, Extra, Rows, EXP, GRAD, MAX};
        use crate::model::head_gemm::TILE_COLS;

        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f")]
        #[inline]
        pub(super) unsafe fn wide_rows<const R: usize, const K: u8>(t: &Rows, x: Extra) {
            let full = x.valid / TILE_COLS * TILE_COLS;
            let mut maxv = [_mm512_set1_ps(f32::NEG_INFINITY); R];
            let mut j0 = 0;
            while j0 < t.ld {
                // SAFETY: columns j0.. of the tile lie inside `ld`.
                unsafe {
                    if t.ld - j0 >= 2 * TILE_COLS {
                        tile::<R, K, 2>(t, x, j0, full, &mut maxv);
                        j0 += 2 * TILE_COLS;
                    } else {
                        tile::<R, K, 1>(t, x, j0, full, &mut maxv);
                        j0 += TILE_COLS;
                    }
                }
            }
            if K == MAX {
                for (i, &v) in maxv.iter().enumerate() {
                    // SAFETY: row i of C (columns full..valid were stored) and of row_max.
                    unsafe {
                        let row = std::slice::from_raw_parts(t.c0.add(i * t.c_rs), x.valid);
                        let m = row[full..]
                            .iter()
                            .fold(_mm512_reduce_max_ps(v), |a, &b| a.max(b));
                        *x.row_max.add(t.i0 + i) = m;
                    }
                }
            }
        }

        /// `R` rows x `16V` columns from column `j0`, then the epilogue `K`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn tile<const R: usize, const K: u8, const V: usize>(
            t: &Rows,
            x: Extra,
            j0: usize,
            full: usize,
            maxv: &mut [__m512; R],
        ) {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            // SAFETY (whole body): offsets inside the rows and columns the caller checked.
            unsafe {
                let b0 = t.bt.add(j0);
                for k in 0..t.d {
                    let mut bv = [_mm512_setzero_ps(); V];
                    for (v, b) in bv.iter_mut().enumerate() {
                        *b = _mm512_loadu_ps(b0.add(k * t.ld + 16 * v));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let at = i as isize * t.a.rs + k as isize * t.a.cs;
                        let av = _mm512_set1_ps(*t.a0.offset(at));
                        for (r, &b) in row.iter_mut().zip(&bv) {
                            *r = _mm512_fmadd_ps(av, b, *r);
                        }
                    }
                }
                for (i, row) in acc.iter().enumerate() {
                    for (v, &sum) in row.iter().enumerate() {
                        let col = j0 + 16 * v;
                        let at = i * t.c_rs + col;
                        let mut out = sum;
                        if K == EXP {
                            let l = _mm512_set1_ps(*x.per_row.add(t.i0 + i));
                            out = exp16(_mm512_sub_ps(out, l));
                        } else if K == GRAD {
                            let di = _mm512_set1_ps(*x.per_row.add(t.i0 + i));
                            let p = _mm512_loadu_ps(x.p.add(t.i0 * t.c_rs + at));
                            out = _mm512_mul_ps(p, _mm512_sub_ps(out, di));
                        } else if K == MAX && col < full {
                            maxv[i] = _mm512_max_ps(maxv[i], out);
                        }
                        _mm512_storeu_ps(t.c0.add(at), out);
                    }
                }
            }
        }

        /// [`exp`] on both halves (the same results lane for lane).
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn exp16(v: __m512) -> __m512 {
            let lo = exp(_mm512_castps512_ps256(v));
            let hi = exp(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            )));
            let out = _mm512_castps256_ps512(lo);
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castps_pd(out),
                _mm256_castps_pd(hi),
            ))
        }
    }

    /// Largest of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        _mm_cvtss_f32(m)
    }

    /// `exp` on 8 lanes, accurate to about 2 ulp like
    /// [`fast_exp`](crate::model::kernels::fast_exp), with the same clamping. The range is
    /// reduced by ln 2 / 8 instead of ln 2: `x = (8m + j) ln2/8 + r`, `|r| <= ln2/16`, so
    /// `exp(x) = 2^m * 2^(j/8) * exp(r)`, with `2^(j/8)` from an 8-entry table in one
    /// register (`vpermps` uses the low 3 bits of the index) and `exp(r)` a degree-4
    /// polynomial (truncation error `r^5/120` < 2e-9); `2^m` goes straight into the exponent
    /// bits. That is 8 multiply-adds per 8 lanes where the degree-6 Cephes form took 11, and
    /// the exponentials bound the attention of narrow heads: a score costs `head_dim`
    /// multiply-adds but one exp.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn exp(x: __m256) -> __m256 {
        let c = _mm256_set1_ps;
        // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
        const ROUND: f32 = 12_582_912.0;
        // ln2/8 in two parts; the high one has 9 significant bits, so n * HI is exact for
        // every |n| < 2^15 (here |n| <= 1019).
        const LN2_8_HI: f32 = 0.693_359_4 / 8.0;
        const LN2_8_LO: f32 = -2.121_944_4e-4 / 8.0;
        // 2^(j/8), j = 0..8, rounded to f32.
        let table = _mm256_setr_ps(
            1.0,
            1.090_507_7,
            1.189_207_1,
            1.296_839_6,
            std::f32::consts::SQRT_2,
            1.542_210_8,
            1.681_792_9,
            1.834_008_1,
        );
        let x = _mm256_max_ps(_mm256_min_ps(x, c(88.3)), c(-87.3));
        let t = _mm256_fmadd_ps(x, c(8.0 * std::f32::consts::LOG2_E), c(ROUND));
        let n = _mm256_sub_ps(t, c(ROUND));
        let k = _mm256_sub_epi32(
            _mm256_castps_si256(t),
            _mm256_set1_epi32(ROUND.to_bits() as i32),
        );
        let r = _mm256_fnmadd_ps(n, c(LN2_8_HI), x);
        let r = _mm256_fnmadd_ps(n, c(LN2_8_LO), r);
        let mut p = c(1.0 / 24.0);
        for coef in [1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, c(coef));
        }
        let y = _mm256_mul_ps(p, _mm256_permutevar8x32_ps(table, k));
        // 2^m with m = k >> 3 (arithmetic: floor for negative k), added to y's exponent.
        let m = _mm256_slli_epi32::<23>(_mm256_srai_epi32::<3>(k));
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), m))
    }

    /// `exp(x - max)` over `row` in place, returning the sum (see
    /// [`kernels::exp_minus_sum`](crate::model::kernels::exp_minus_sum)).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp_minus_sum(row: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut chunks = row.chunks_exact_mut(16);
        for ch in &mut chunks {
            // SAFETY: the chunk holds 16 floats.
            unsafe {
                let p = ch.as_mut_ptr();
                let e0 = exp(_mm256_sub_ps(_mm256_loadu_ps(p), m));
                let e1 = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(8)), m));
                _mm256_storeu_ps(p, e0);
                _mm256_storeu_ps(p.add(8), e1);
                s0 = _mm256_add_ps(s0, e0);
                s1 = _mm256_add_ps(s1, e1);
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0, s1)) };
        let mut sum: f32 = lanes.iter().sum();
        for v in chunks.into_remainder() {
            *v = crate::model::kernels::fast_exp(*v - max);
            sum += *v;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn narrow(
        m: usize,
        k: usize,
        d: usize,
        a: Strided,
        b: *const f32,
        b_rs: usize,
        c: *mut f32,
        c_rs: usize,
        accumulate: bool,
    ) {
        let mut i0 = 0;
        while i0 < m {
            let rows = TILE_ROWS.min(m - i0);
            let mut col = 0;
            while col < d {
                // SAFETY: rows i0..i0+rows, columns col..col+8|16 inside A, B and C.
                unsafe {
                    let a0 = a.at(i0, 0);
                    let (b0, c0) = (b.add(col), c.add(i0 * c_rs + col));
                    if d - col >= 16 {
                        narrow_rows::<2>(rows, k, a0, a, b0, b_rs, c0, c_rs, accumulate);
                        col += 16;
                    } else {
                        narrow_rows::<1>(rows, k, a0, a, b0, b_rs, c0, c_rs, accumulate);
                        col += 8;
                    }
                }
            }
            i0 += rows;
        }
    }

    /// One tile of `rows` (1 to [`TILE_ROWS`]) rows x `8V` columns.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn narrow_rows<const V: usize>(
        rows: usize,
        k: usize,
        a0: *const f32,
        a: Strided,
        b0: *const f32,
        b_rs: usize,
        c0: *mut f32,
        c_rs: usize,
        acc: bool,
    ) {
        // SAFETY: as the caller guarantees.
        unsafe {
            match rows {
                6 => narrow_tile::<6, V>(k, a0, a, b0, b_rs, c0, c_rs, acc),
                5 => narrow_tile::<5, V>(k, a0, a, b0, b_rs, c0, c_rs, acc),
                4 => narrow_tile::<4, V>(k, a0, a, b0, b_rs, c0, c_rs, acc),
                3 => narrow_tile::<3, V>(k, a0, a, b0, b_rs, c0, c_rs, acc),
                2 => narrow_tile::<2, V>(k, a0, a, b0, b_rs, c0, c_rs, acc),
                _ => narrow_tile::<1, V>(k, a0, a, b0, b_rs, c0, c_rs, acc),
            }
        }
    }

    /// `R` rows x `8V` columns of `C` in registers while `k` runs: V loads of `B` and R
    /// broadcasts of `A` per step.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn narrow_tile<const R: usize, const V: usize>(
        k: usize,
        a0: *const f32,
        a: Strided,
        b0: *const f32,
        b_rs: usize,
        c0: *mut f32,
        c_rs: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    // SAFETY: inside the tile.
                    *x = unsafe { _mm256_loadu_ps(c0.add(i * c_rs + 8 * v)) };
                }
            }
        }
        for kk in 0..k {
            // SAFETY (whole body): offsets inside the tile the caller checked.
            unsafe {
                let mut bv = [_mm256_setzero_ps(); V];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(b0.add(kk * b_rs + 8 * v));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_ps(*a0.offset(i as isize * a.rs + kk as isize * a.cs));
                    for (x, &b) in row.iter_mut().zip(&bv) {
                        *x = _mm256_fmadd_ps(av, b, *x);
                    }
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                // SAFETY: inside the tile.
                unsafe { _mm256_storeu_ps(c0.add(i * c_rs + 8 * v), x) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| ((i * 2_654_435_761 + seed * 977) % 1009) as f32 / 504.5 - 1.0)
            .collect()
    }

    /// Reference product with explicit strides, in f64.
    fn reference(
        m: usize,
        k: usize,
        n: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|kk| a(i, kk) as f64 * b(kk, j) as f64).sum();
            }
        }
        c
    }

    #[test]
    fn wide_and_its_epilogues_match_reference_for_ragged_rows_and_columns() {
        // Column counts cover whole 32-wide zmm tiles, a 16-wide tail and ragged padding.
        for (m, n, d) in [
            (8, 64, 16),
            (7, 80, 20),
            (13, 37, 16),
            (6, 16, 8),
            (1, 5, 24),
            (7, 33, 64),
            (4, 20, 5),
        ] {
            let a_rs = d + 3; // strided rows, as Q inside a [T, hidden] projection
            let a = data(m * a_rs, 1);
            let b_rs = d + 7;
            let b = data(n * b_rs, 2);
            let mut bt = Vec::new();
            // SAFETY: b holds n rows of d at stride b_rs.
            unsafe { pack_transposed(b.as_ptr(), b_rs, n, d, &mut bt) };
            let ld = padded(n);
            assert_eq!(bt.len(), d * ld);
            let c_rs = ld + 2;
            let want = reference(m, d, n, |i, k| a[i * a_rs + k], |k, j| b[j * b_rs + k]);
            for kernel in WideKernel::available() {
                let run = |epi: Epilogue| {
                    let mut c = vec![f32::NAN; m * c_rs];
                    // SAFETY: sizes as allocated above; the epilogue's slices hold m rows.
                    unsafe {
                        wide_with(
                            kernel,
                            m,
                            d,
                            Strided::rows(a.as_ptr(), a_rs),
                            &bt,
                            c.as_mut_ptr(),
                            c_rs,
                            epi,
                        )
                    };
                    c
                };
                let close = |got: f32, want: f64, what: &str, i: usize, j: usize| {
                    assert!(
                        (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{kernel:?} {what} ({m},{n},{d}) at {i},{j}: {got} vs {want}"
                    )
                };
                // Store, and the row maxima over the first `valid` columns.
                let valid = n - n / 3;
                let mut row_max = vec![0f32; m];
                let c = run(Epilogue::StoreMax {
                    valid,
                    row_max: &mut row_max,
                });
                for i in 0..m {
                    for j in 0..n {
                        close(c[i * c_rs + j], want[i * n + j], "store", i, j);
                    }
                    // Padding columns see zero keys.
                    assert!(c[i * c_rs + n..i * c_rs + ld].iter().all(|&v| v == 0.0));
                    let m_want = want[i * n..][..valid]
                        .iter()
                        .cloned()
                        .fold(f64::MIN, f64::max);
                    close(row_max[i], m_want, "row max", i, 0);
                }
                // Probabilities from a log-sum-exp.
                let lse: Vec<f32> = (0..m).map(|i| 0.5 + i as f32 * 0.1).collect();
                let c = run(Epilogue::ExpMinus { lse: &lse });
                for i in 0..m {
                    for j in 0..n {
                        let e = (want[i * n + j] - lse[i] as f64).exp();
                        close(c[i * c_rs + j], e, "exp", i, j);
                    }
                }
                // Softmax backward: P * (A Bt - di).
                let p = data(m * c_rs, 9);
                let di: Vec<f32> = (0..m).map(|i| 0.3 - i as f32 * 0.05).collect();
                let c = run(Epilogue::SoftmaxGrad {
                    p: p.as_ptr(),
                    di: &di,
                });
                for i in 0..m {
                    for j in 0..n {
                        let g = p[i * c_rs + j] as f64 * (want[i * n + j] - di[i] as f64);
                        close(c[i * c_rs + j], g, "softmax grad", i, j);
                    }
                }
            }
        }
    }

    #[test]
    fn packing_transposes_strided_rows_with_zero_padding() {
        // Widths on the 8-wide register path (8, 16, 64) and off it (12); row counts on and
        // off the 8 x 8 blocks and the 16-column padding; rows strided wider than `d`.
        for d in [8, 12, 16, 64] {
            for rows in [1, 7, 8, 9, 16, 17, 33, 70] {
                let rs = d + 5;
                let src: Vec<f32> = (0..rows * rs).map(|v| v as f32 + 0.5).collect();
                let mut out = vec![f32::NAN; 3];
                // SAFETY: `src` holds `rows` rows of `rs >= d` floats.
                unsafe { pack_transposed(src.as_ptr(), rs, rows, d, &mut out) };
                let ld = padded(rows);
                assert_eq!(out.len(), d * ld);
                for k in 0..d {
                    for j in 0..ld {
                        let want = if j < rows { src[j * rs + k] } else { 0.0 };
                        assert_eq!(out[k * ld + j], want, "d={d} rows={rows} k={k} j={j}");
                    }
                }
                // In blocks of 32 keys: block b holds rows 32b.. as its own [d, padded(n)].
                let mut blocks = Vec::new();
                // SAFETY: as above.
                unsafe { pack_transposed_blocks(src.as_ptr(), rs, rows, d, 32, &mut blocks) };
                for j0 in (0..rows).step_by(32) {
                    let n = 32.min(rows - j0);
                    let blk = &blocks[j0 * d..][..d * padded(n)];
                    for k in 0..d {
                        for j in 0..n {
                            assert_eq!(blk[k * padded(n) + j], src[(j0 + j) * rs + k]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn exp_minus_sum_matches_std_exp() {
        // 16-wide vector chunks and a scalar tail; a wide range of exponents.
        let orig: Vec<f32> = (0..37).map(|i| i as f32 * 2.7 - 60.0).collect();
        let max = 30.0;
        let mut row = orig.clone();
        let sum = crate::model::kernels::exp_minus_sum(&mut row, max);
        let mut want_sum = 0f64;
        for (&x, &e) in orig.iter().zip(&row) {
            let want = ((x - max) as f64).exp();
            want_sum += want;
            if x - max < -87.3 {
                // Clamped (documented): about 1e-38 instead of a denormal.
                assert!(e < 2e-38);
                continue;
            }
            assert!(
                (e as f64 - want).abs() <= 3e-7 * want,
                "exp({}) = {e}, want {want}",
                x - max
            );
        }
        assert!((sum as f64 - want_sum).abs() <= 1e-6 * want_sum);
    }

    #[test]
    fn narrow_matches_reference_with_transposed_a_and_accumulation() {
        for (m, k, d) in [(13, 37, 16), (6, 1, 8), (5, 40, 24), (7, 9, 64), (3, 4, 12)] {
            // A given transposed: element (i, kk) at a[kk * m_pad + i].
            let m_pad = m + 2;
            let at = data(k * m_pad, 3);
            let a = Strided {
                ptr: at.as_ptr(),
                rs: 1,
                cs: m_pad as isize,
            };
            let b_rs = d + 5;
            let b = data(k * b_rs, 4);
            let c_rs = d + 1;
            let start = data(m * c_rs, 5);
            for accumulate in [false, true] {
                let mut c = start.clone();
                // SAFETY: sizes as allocated above.
                unsafe {
                    narrow(
                        m,
                        k,
                        d,
                        a,
                        b.as_ptr(),
                        b_rs,
                        c.as_mut_ptr(),
                        c_rs,
                        accumulate,
                    )
                };
                let want = reference(
                    m,
                    k,
                    d,
                    |i, kk| at[kk * m_pad + i],
                    |kk, j| b[kk * b_rs + j],
                );
                for i in 0..m {
                    for j in 0..d {
                        let base = if accumulate {
                            start[i * c_rs + j] as f64
                        } else {
                            0.0
                        };
                        let got = c[i * c_rs + j] as f64;
                        assert!(
                            (got - base - want[i * d + j]).abs() < 1e-4,
                            "({m},{k},{d}, acc {accumulate}) at {i},{j}"
                        );
                    }
                    // The column past d (row padding) is untouched.
                    assert_eq!(c[i * c_rs + d], start[i * c_rs + d]);
                }
            }
        }
    }
}
