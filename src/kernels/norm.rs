//! Layer normalisation of the rows of raw f32 slices (the packed inference path), two-pass
//! mean and variance in f32 as PyTorch computes them.

use rayon::prelude::*;

use super::buffers::{pooled, rows_per_task};

/// Layer normalisation of every row of `x` in place (two-pass mean/variance in f32, as
/// PyTorch computes it).
pub fn layer_norm_inplace(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let d = w.len();
    x.par_chunks_mut(d * rows_per_task(d)).for_each(|chunk| {
        for row in chunk.chunks_mut(d) {
            layer_norm_row(row, w, b, eps);
        }
    });
}

/// Layer normalisation of every row of `x` into a new buffer.
pub fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = pooled(x.len());
    if x.is_empty() {
        return out;
    }
    // Read x, write the output once (no zeroing pass, no copy then normalise in place).
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(d * rows_per_task(d))
        .zip(x.par_chunks(d * rows_per_task(d)))
        .for_each(|(dst, src)| {
            for (dst, row) in dst.chunks_mut(d).zip(src.chunks(d)) {
                let (mean, inv) = row_stats(row, eps);
                for (((o, &v), &ww), &bb) in dst.iter_mut().zip(row).zip(w).zip(b) {
                    o.write((v - mean) * inv * ww + bb);
                }
            }
        });
    // SAFETY: every element was written above (the chunks cover x, row by row).
    unsafe { out.set_len(x.len()) };
    out
}

#[inline]
fn layer_norm_row(row: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let (mean, inv) = row_stats(row, eps);
    for ((v, &ww), &bb) in row.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * ww + bb;
    }
}

/// Mean and `1 / sqrt(variance + eps)` of a row (two passes, as PyTorch computes them).
#[inline]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum8(row) / n;
    let mut var_acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            let d = c[i] - mean;
            var_acc[i] += d * d;
        }
    }
    let mut var: f32 = var_acc.iter().sum();
    for &v in chunks.remainder() {
        var += (v - mean) * (v - mean);
    }
    (mean, 1.0 / (var / n + eps).sqrt())
}

/// Sum with eight independent accumulators (vectorises; also slightly more accurate than a
/// single running sum).
#[inline]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::buffers::recycle;
    use crate::kernels::test_util::rand_vec;
    use candle_core::Tensor;

    #[test]
    fn layer_norm_matches_candle() {
        let (rows, d) = (7, 33);
        let x = rand_vec(rows * d, 5);
        let w = rand_vec(d, 6);
        let b = rand_vec(d, 7);
        let dev = candle_core::Device::Cpu;
        let want = candle_nn::ops::layer_norm(
            &Tensor::from_vec(x.clone(), (rows, d), &dev).unwrap(),
            &Tensor::from_vec(w.clone(), d, &dev).unwrap(),
            &Tensor::from_vec(b.clone(), d, &dev).unwrap(),
            1e-5,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        // Into a recycled buffer of garbage (every element must be written), and in place:
        // the same arithmetic, so the same bits.
        recycle(vec![f32::NAN; rows * d + 5]);
        let ours = layer_norm_rows(&x, &w, &b, 1e-5);
        assert_eq!(ours.len(), rows * d);
        for (a, b) in ours.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let mut in_place = x.clone();
        layer_norm_inplace(&mut in_place, &w, &b, 1e-5);
        assert_eq!(in_place, ours);
    }
}
