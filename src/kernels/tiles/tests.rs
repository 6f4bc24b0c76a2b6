//! Tests of the tiles against plain reference loops.

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
    let sum = super::exp_minus_sum(&mut row, max);
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
