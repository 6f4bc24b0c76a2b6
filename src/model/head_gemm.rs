//! Matrix products with one dimension equal to an attention head's width (`d`: 16 for ESM-2
//! 8M, 64 for ProtBERT), the building blocks of the attention kernels.
//!
//! Why not the `gemm` crate: called once per (sequence, head, block of query rows) it packs
//! both operands every time, and with `d` as the inner or the output dimension the packing
//! costs as much as the arithmetic. Measured on ESM-2 8M (batch 8 x 256, 6 layers), the
//! fused attention ran at 63 GFLOP/s forward and 40 backward against a 180 GFLOP/s machine
//! peak: a third of a training step. Here the keys (and values, for the backward) of one
//! (sequence, head) are packed once, transposed, and two register-blocked AVX2/FMA
//! microkernels do the rest:
//!
//! - [`wide`]: `C[m, n] = A[m, d] @ Bt[d, n]` (scores `Q K^T`, and `dO V^T`), a 6 x 16 tile of
//!   `C` in registers per step over `d`;
//! - [`narrow`]: `C[m, d] (+)= A[m, k] @ B[k, d]` (`P V`, `dS K`, `P^T dO`, `dS^T Q`), 6 rows
//!   of `C` in registers while `k` runs over the keys (or query rows).
//!
//! Both take arbitrary row and column strides for `A`, so transposed probability blocks need
//! no copy. Without AVX2+FMA, or for a width that is not a multiple of 8, portable loops
//! compute the same sums.

/// Columns per [`wide`] tile: packed `Bt` rows are padded to a multiple of this.
pub const TILE_COLS: usize = 16;
/// Rows of `C` per microkernel tile.
const TILE_ROWS: usize = 6;

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
    let ld = padded(rows);
    dst.clear();
    dst.resize(d * ld, 0.0);
    for j in 0..rows {
        // SAFETY: row j of the source, as the caller guarantees.
        let row = unsafe { std::slice::from_raw_parts(src.add(j * rs), d) };
        for (k, &v) in row.iter().enumerate() {
            dst[k * ld + j] = v;
        }
    }
}

/// `C[m, ld] = A[m, d] @ Bt[d, ld]` with `Bt` packed by [`pack_transposed`] (`ld` =
/// `bt.len() / d`, a multiple of [`TILE_COLS`]); `C` rows at stride `c_rs >= ld`.
///
/// # Safety
/// `a` must be valid for `m x d`, `c` for `m` rows of `ld` floats at stride `c_rs`, and `c`
/// must not overlap `a` or `bt`.
pub unsafe fn wide(m: usize, d: usize, a: Strided, bt: &[f32], c: *mut f32, c_rs: usize) {
    let ld = bt.len() / d.max(1);
    debug_assert!(ld.is_multiple_of(TILE_COLS) && c_rs >= ld);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: CPU features checked; bounds as the caller guarantees.
        return unsafe { avx2::wide(m, d, a, bt, ld, c, c_rs) };
    }
    for i in 0..m {
        for j in 0..ld {
            let mut s = 0f32;
            for k in 0..d {
                // SAFETY: inside A and Bt.
                s += unsafe { *a.at(i, k) } * bt[k * ld + j];
            }
            // SAFETY: inside C.
            unsafe { *c.add(i * c_rs + j) = s };
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
    if d.is_multiple_of(8) && has_avx2_fma() {
        // SAFETY: CPU features checked; bounds as the caller guarantees.
        return unsafe { avx2::narrow(m, k, d, a, b, b_rs, c, c_rs, accumulate) };
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
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Strided, TILE_COLS, TILE_ROWS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn wide(
        m: usize,
        d: usize,
        a: Strided,
        bt: &[f32],
        ld: usize,
        c: *mut f32,
        c_rs: usize,
    ) {
        let mut i0 = 0;
        while i0 < m {
            let rows = TILE_ROWS.min(m - i0);
            for j0 in (0..ld).step_by(TILE_COLS) {
                // SAFETY: rows i0..i0+rows and columns j0..j0+16 are inside A, Bt and C.
                unsafe {
                    let a0 = a.at(i0, 0);
                    let b0 = bt.as_ptr().add(j0);
                    let c0 = c.add(i0 * c_rs + j0);
                    match rows {
                        6 => wide_tile::<6>(d, a0, a, b0, ld, c0, c_rs),
                        5 => wide_tile::<5>(d, a0, a, b0, ld, c0, c_rs),
                        4 => wide_tile::<4>(d, a0, a, b0, ld, c0, c_rs),
                        3 => wide_tile::<3>(d, a0, a, b0, ld, c0, c_rs),
                        2 => wide_tile::<2>(d, a0, a, b0, ld, c0, c_rs),
                        _ => wide_tile::<1>(d, a0, a, b0, ld, c0, c_rs),
                    }
                }
            }
            i0 += rows;
        }
    }

    /// One `R x 16` tile of `C`: 2R accumulators, two `Bt` loads and R broadcasts per step.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn wide_tile<const R: usize>(
        d: usize,
        a0: *const f32,
        a: Strided,
        b0: *const f32,
        ld: usize,
        c0: *mut f32,
        c_rs: usize,
    ) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        for k in 0..d {
            // SAFETY (whole body): offsets inside the tile the caller checked.
            unsafe {
                let bl = _mm256_loadu_ps(b0.add(k * ld));
                let bh = _mm256_loadu_ps(b0.add(k * ld + 8));
                for i in 0..R {
                    let av = _mm256_set1_ps(*a0.offset(i as isize * a.rs + k as isize * a.cs));
                    lo[i] = _mm256_fmadd_ps(av, bl, lo[i]);
                    hi[i] = _mm256_fmadd_ps(av, bh, hi[i]);
                }
            }
        }
        for i in 0..R {
            // SAFETY: row i of the tile.
            unsafe {
                _mm256_storeu_ps(c0.add(i * c_rs), lo[i]);
                _mm256_storeu_ps(c0.add(i * c_rs + 8), hi[i]);
            }
        }
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
                        match rows {
                            6 => narrow_tile::<6, 2>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            5 => narrow_tile::<5, 2>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            4 => narrow_tile::<4, 2>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            3 => narrow_tile::<3, 2>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            2 => narrow_tile::<2, 2>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            _ => narrow_tile::<1, 2>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                        }
                        col += 16;
                    } else {
                        match rows {
                            6 => narrow_tile::<6, 1>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            5 => narrow_tile::<5, 1>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            4 => narrow_tile::<4, 1>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            3 => narrow_tile::<3, 1>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            2 => narrow_tile::<2, 1>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                            _ => narrow_tile::<1, 1>(k, a0, a, b0, b_rs, c0, c_rs, accumulate),
                        }
                        col += 8;
                    }
                }
            }
            i0 += rows;
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
    fn wide_matches_reference_for_ragged_rows_and_columns() {
        for (m, n, d) in [
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
            let mut c = vec![f32::NAN; m * c_rs];
            // SAFETY: sizes as allocated above.
            unsafe {
                wide(
                    m,
                    d,
                    Strided::rows(a.as_ptr(), a_rs),
                    &bt,
                    c.as_mut_ptr(),
                    c_rs,
                )
            };
            let want = reference(m, d, n, |i, k| a[i * a_rs + k], |k, j| b[j * b_rs + k]);
            for i in 0..m {
                for j in 0..n {
                    let got = c[i * c_rs + j] as f64;
                    assert!(
                        (got - want[i * n + j]).abs() < 1e-4,
                        "({m},{n},{d}) at {i},{j}"
                    );
                }
                // Padding columns see zero keys.
                assert!(c[i * c_rs + n..i * c_rs + ld].iter().all(|&v| v == 0.0));
            }
        }
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
