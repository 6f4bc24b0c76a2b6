//! Linear layers on raw row-major f32 slices: `x @ W^T (+ b)` as one GEMM over all rows (the
//! `gemm` crate, the same kernels candle uses, split over rayon threads), with the bias or a
//! residual already in the output buffer, and the column sums a bias gradient needs.

use rayon::prelude::*;

use super::buffers::{rows_per_task, take, take_rows, WeightLayout};

/// Threads for a GEMM of this size: small products are faster on one thread than split.
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `out[rows, out_dim] += x[rows, in_dim] @ W^T`, `W` [out_dim, in_dim] lying in memory as
/// `layout` says (`x`, `out` row-major, contiguous); `out` already holds whatever should be
/// added (bias, residual).
pub fn gemm_acc_wt(
    x: &[f32],
    w: &[f32],
    layout: WeightLayout,
    out: &mut [f32],
    in_dim: usize,
    out_dim: usize,
) {
    gemm_acc_wt_scaled(x, w, layout, out, in_dim, out_dim, 1.0)
}

/// [`gemm_acc_wt`] with the product scaled: `out += scale * (x @ W^T)`.
fn gemm_acc_wt_scaled(
    x: &[f32],
    w: &[f32],
    layout: WeightLayout,
    out: &mut [f32],
    in_dim: usize,
    out_dim: usize,
    scale: f32,
) {
    let rows = x.len() / in_dim;
    assert_eq!(x.len(), rows * in_dim);
    assert_eq!(w.len(), out_dim * in_dim);
    assert_eq!(out.len(), rows * out_dim);
    if rows == 0 {
        return;
    }
    // W^T as the right operand [in_dim, out_dim]: (column stride, row stride).
    let (w_cs, w_rs) = match layout {
        WeightLayout::OutIn => (in_dim as isize, 1),
        WeightLayout::InOut => (1, out_dim as isize),
    };
    // SAFETY: the three buffers have the asserted sizes; the strides describe x as
    // [rows, in_dim] row-major, W^T as [in_dim, out_dim] with the strides of its layout, and
    // out as [rows, out_dim] row-major; out does not alias the inputs (it is a &mut).
    unsafe {
        gemm::gemm(
            rows,
            out_dim,
            in_dim,
            out.as_mut_ptr(),
            1,
            out_dim as isize,
            true,
            x.as_ptr(),
            1,
            in_dim as isize,
            w.as_ptr(),
            w_cs,
            w_rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism(rows, out_dim, in_dim),
        )
    }
}

/// `x @ W^T + b` for `x` [rows, in_dim], `W` [out_dim, in_dim] lying as `layout` says.
pub fn linear_rows(
    x: &[f32],
    w: &[f32],
    layout: WeightLayout,
    b: Option<&[f32]>,
    in_dim: usize,
    out_dim: usize,
) -> Vec<f32> {
    linear_rows_scaled(x, w, layout, b, in_dim, out_dim, 1.0)
}

/// `(x @ W^T + b) * scale` (attention queries), computed as `b * scale + scale * (x @ W^T)`:
/// the scale rides on the bias fill and the GEMM's own multiplier instead of another pass.
pub fn linear_rows_scaled(
    x: &[f32],
    w: &[f32],
    layout: WeightLayout,
    b: Option<&[f32]>,
    in_dim: usize,
    out_dim: usize,
    scale: f32,
) -> Vec<f32> {
    let rows = x.len() / in_dim;
    let mut out = match b {
        Some(b) => take_rows(rows, b, scale),
        None => take(rows * out_dim),
    };
    gemm_acc_wt_scaled(x, w, layout, &mut out, in_dim, out_dim, scale);
    out
}

/// Adds `b` to every row of `x` (rows of `b.len()`).
pub fn add_bias_rows(x: &mut [f32], b: &[f32]) {
    let d = b.len();
    x.par_chunks_mut(d * rows_per_task(d)).for_each(|chunk| {
        for row in chunk.chunks_mut(d) {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    });
}

/// Sum of the rows of `x` [rows, cols] (a linear layer's bias gradient), split over threads
/// by fixed blocks of rows whose partial sums are added in order, so the result does not
/// depend on scheduling (resumed training runs are compared bit for bit). candle's `sum(0)`
/// walks the columns with a scalar loop on one thread, and took 6% of an ESM-2 training
/// step.
pub fn column_sums(x: &[f32], cols: usize) -> Vec<f32> {
    let add = |mut acc: Vec<f32>, row: &[f32]| {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
        acc
    };
    let partial: Vec<Vec<f32>> = x
        .par_chunks(cols * rows_per_task(cols))
        .map(|block| block.chunks(cols).fold(vec![0f32; cols], add))
        .collect();
    partial.iter().fold(vec![0f32; cols], |acc, p| add(acc, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::buffers::transpose;
    use crate::kernels::test_util::rand_vec;
    use candle_core::Tensor;

    #[test]
    fn column_sums_match_a_sequential_sum_across_many_row_blocks() {
        let (rows, cols) = (20_000, 3); // several thousand rows per task: many tasks
        let x = rand_vec(rows * cols, 5);
        let got = column_sums(&x, cols);
        for (c, &g) in got.iter().enumerate() {
            let want: f64 = (0..rows).map(|r| x[r * cols + c] as f64).sum();
            assert!((g as f64 - want).abs() < 1e-2, "column {c}: {g} vs {want}");
        }
        assert!(column_sums(&[], 4).iter().all(|&v| v == 0.0));
        // The same bits whatever the threads.
        let with = |n: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap();
            pool.install(|| column_sums(&x, cols))
        };
        assert_eq!(with(1), with(3));
    }

    #[test]
    fn linear_matches_candle_matmul() {
        let (rows, i, o) = (67, 48, 40);
        let x = rand_vec(rows * i, 8);
        let w = rand_vec(o * i, 9);
        let b = rand_vec(o, 10);
        let dev = candle_core::Device::Cpu;
        let want = crate::kernels::linear::linear(
            &Tensor::from_vec(x.clone(), (rows, i), &dev).unwrap(),
            &Tensor::from_vec(w.clone(), (o, i), &dev).unwrap(),
            Some(&Tensor::from_vec(b.clone(), o, &dev).unwrap()),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        // Both weight layouts: W [o, i] as stored, and its transpose [i, o] read column-major.
        let w_in_out = transpose(&w, o, i);
        for (layout, w) in [(WeightLayout::OutIn, &w), (WeightLayout::InOut, &w_in_out)] {
            let ours = linear_rows(&x, w, layout, Some(&b), i, o);
            for (a, b) in ours.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{layout:?}: {a} vs {b}");
            }
        }
    }
}
