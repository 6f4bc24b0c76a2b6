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
use super::simd::has_avx2_fma;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
mod operand;
mod softmax;
#[cfg(test)]
mod tests;

use operand::NARROW_MAX;
pub use operand::{padded, Epilogue, Strided, TILE_COLS};
pub use softmax::{softmax_rows, softmax_rows_streaming, AttentionBlock, HeadRows};

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
        Epilogue::ExpMinus { lse } => super::simd::fast_exp(s - lse[i]),
        // SAFETY: P has C's layout, as `wide`'s caller guarantees.
        Epilogue::SoftmaxGrad { p, di } => (unsafe { *p.add(at) }) * (s - di[i]),
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
        return unsafe { avx2::narrow(m, k, d, a, (b, b_rs), (c, c_rs), accumulate) };
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

/// `exp(x - max)` over `row` in place; returns the sum (an unnormalised softmax row whose
/// normalisation the caller folds into what it computes next).
pub fn exp_minus_sum(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { avx2::exp_minus_sum(row, max) };
    }
    exp_minus_sum_scalar(row, max)
}

#[inline(always)]
fn exp_minus_sum_scalar(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = super::simd::fast_exp(c[i] - max);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = super::simd::fast_exp(*v - max);
        sum += *v;
    }
    sum
}
