//! The AVX2/FMA (and AVX-512) register tiles of [`wide`](super::wide) and
//! [`narrow`](super::narrow), the in-register transpose of the packing, and the vector `exp`
//! of the score epilogues and [`exp_minus_sum`](super::exp_minus_sum).

use super::operand::{padded, Epilogue, Strided, TILE_COLS, TILE_ROWS};

use std::arch::x86_64::*;

/// [`pack_into`](super::pack_into) for `d` a multiple of 8: blocks of 8 rows x 8
/// columns are transposed in registers (8 loads, 24 shuffles, 8 stores where the scalar
/// gather took 64 loads and 64 stores); the last `rows % 8` rows go element by element.
/// Measured: the packing was 0.8% of a ProtBERT-shape 4x1024 forward.
///
/// # Safety
/// As [`pack_into`](super::pack_into); `d % 8 == 0`, AVX2 available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn pack_into(src: *const f32, rs: usize, rows: usize, d: usize, out: &mut [f32]) {
    let ld = padded(rows);
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
                    out[1] = _mm256_mul_ps(_mm256_loadu_ps(p.add(8)), _mm256_sub_ps(out[1], di));
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
    use crate::kernels::tiles::operand::TILE_COLS;

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
/// [`fast_exp`](crate::kernels::simd::fast_exp), with the same clamping. The range is
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
/// [`kernels::exp_minus_sum`](super::exp_minus_sum)).
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
        *v = crate::kernels::simd::fast_exp(*v - max);
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
    (b, b_rs): (*const f32, usize),
    (c, c_rs): (*mut f32, usize),
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
