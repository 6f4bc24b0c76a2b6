//! Dropout: one counter-based mask for every place training drops values.
//!
//! Every element's keep/drop decision is a hash of (seed, row, column), so a backward pass
//! regenerates the mask instead of storing it, and the inner loop over a row is plain 32-bit
//! integer arithmetic that vectorises. Each application draws one `u64` seed from the
//! caller's seeded ChaCha8 stream ([`DropMask::draw`]), so training runs are reproducible.
//!
//! - [`dropout`]: `x * mask` (embeddings, the classifier heads, the composed attention);
//!   rows are fixed-size chunks of the flattened tensor.
//! - [`dropout_add`]: `dropout(y) + residual` (hidden activations), one fused op on CPU.
//! - The fused attention applies [`DropMask`] to its probability rows (rows = score rows).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::buffers::{self, f32_slice};

/// Elements per mask row of a hidden activation (the hash's column counter is 32-bit).
const CHUNK: usize = 16 * 1024;

/// A dropout mask: drop probability and seed.
#[derive(Clone, Copy, Debug)]
pub struct DropMask {
    pub p: f32,
    pub seed: u64,
}

impl DropMask {
    /// The hash key of mask row `row` (splitmix64 of seed and row).
    #[inline]
    pub fn row_key(&self, row: u64) -> u32 {
        let mut z = self.seed ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as u32
    }

    /// Multiplies `values` (the first columns of the row with key `key`) by their factors:
    /// 0 for dropped elements, `1 / (1 - p)` for kept ones.
    pub fn apply_row(&self, key: u32, values: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { self.apply_row_avx2(key, values) };
        }
        self.apply_row_portable(key, values)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_row_avx2(&self, key: u32, values: &mut [f32]) {
        self.apply_row_portable(key, values)
    }

    #[inline(always)]
    fn apply_row_portable(&self, key: u32, values: &mut [f32]) {
        // Drop when the hash's top 24 bits fall below p * 2^24.
        let threshold = (self.p * (1u32 << 24) as f32) as u32;
        let scale = 1.0 / (1.0 - self.p);
        for (j, v) in values.iter_mut().enumerate() {
            // murmur3's 32-bit finaliser of key and column.
            let mut h = key ^ (j as u32).wrapping_mul(0x9E37_79B9);
            h ^= h >> 16;
            h = h.wrapping_mul(0x85EB_CA6B);
            h ^= h >> 13;
            h = h.wrapping_mul(0xC2B2_AE35);
            h ^= h >> 16;
            *v *= if (h >> 8) < threshold { 0.0 } else { scale };
        }
    }

    /// The factors of `rows` mask rows of `cols` columns, row-major (tests compare fused
    /// kernels with composed ops under the same mask).
    pub fn factors(&self, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![1f32; rows * cols];
        for (r, row) in out.chunks_mut(cols.max(1)).enumerate() {
            self.apply_row(self.row_key(r as u64), row);
        }
        out
    }

    /// Applies the mask to a flattened activation, in rows of [`CHUNK`] elements.
    fn apply_flat(&self, x: &mut [f32]) {
        x.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(r, row)| self.apply_row(self.row_key(r as u64), row));
    }
}

impl DropMask {
    /// The mask of one training-time application: `Some` when `rng` is given (training) and
    /// `p > 0`, with a seed drawn from `rng`; `None` in evaluation.
    pub fn draw(p: f64, rng: Option<&mut ChaCha8Rng>) -> Option<Self> {
        match rng {
            Some(rng) if p > 0.0 => Some(DropMask {
                p: p as f32,
                seed: rng.random(),
            }),
            _ => None,
        }
    }

    /// The mask's factors over the flattened shape of `like`, as a tensor of its shape,
    /// dtype and device.
    fn flat_factors(&self, like: &Tensor) -> Result<Tensor> {
        let mut factors = vec![1f32; like.elem_count()];
        self.apply_flat(&mut factors);
        Tensor::from_vec(factors, like.shape(), like.device())?.to_dtype(like.dtype())
    }
}

/// Inverted dropout with a caller-owned, seeded RNG (candle's own dropout draws from an
/// unseeded RNG, which would make training runs irreproducible). `None` = evaluation.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
    match DropMask::draw(p, rng) {
        Some(mask) => x.mul(&mask.flat_factors(x)?),
        None => Ok(x.clone()),
    }
}

/// `dropout(y) + residual` in training (`rng` given, `p > 0`), `y + residual` otherwise.
/// On CPU in f32 one fused op; elsewhere the mask is built as a tensor from the same hash.
pub fn dropout_add(
    y: &Tensor,
    residual: &Tensor,
    p: f64,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<Tensor> {
    let Some(mask) = DropMask::draw(p, rng) else {
        return y + residual;
    };
    if super::fused_on(y.device()) && y.dtype() == DType::F32 && residual.dtype() == DType::F32 {
        return y
            .contiguous()?
            .apply_op2(&residual.contiguous()?, DropoutAdd { mask });
    }
    y.mul(&mask.flat_factors(y)?)? + residual
}

/// `y * mask + residual` with the mask regenerated in the backward.
struct DropoutAdd {
    mask: DropMask,
}

impl CustomOp2 for DropoutAdd {
    fn name(&self) -> &'static str {
        "protloc-dropout-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, r) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("dropout_add: {:?} vs {:?}", l1.shape(), l2.shape());
        }
        // One pass per chunk: mask, then add the residual while the chunk is in cache (the
        // chunks are `apply_flat`'s mask rows).
        let mut out = y.to_vec();
        out.par_chunks_mut(CHUNK)
            .zip(r.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(i, (o, r))| {
                self.mask.apply_row(self.mask.row_key(i as u64), o);
                o.iter_mut().zip(r).for_each(|(o, &r)| *o += r);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _residual: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.contiguous()?;
        let mut dy = buffers::view(&g)?.get().to_vec();
        self.mask.apply_flat(&mut dy);
        Ok((Some(Tensor::from_vec(dy, g.shape(), g.device())?), Some(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_abs_diff, var};
    use rand::SeedableRng;

    #[test]
    fn masks_drop_about_p_scale_the_rest_and_differ_by_row_and_seed() {
        let m = DropMask { p: 0.25, seed: 9 };
        let f = m.factors(64, 1000);
        let dropped = f.iter().filter(|&&v| v == 0.0).count() as f64 / f.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(f.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        assert_ne!(f[..1000], f[1000..2000], "rows share a mask");
        let other = DropMask { p: 0.25, seed: 10 }.factors(1, 1000);
        assert_ne!(f[..1000], other[..], "seeds share a mask");
        // Same seed, same mask (what the backward relies on).
        assert_eq!(f, m.factors(64, 1000));
    }

    #[test]
    fn dropout_and_dropout_add_draw_the_same_mask() {
        let shape = [4, 3 * 1000];
        let (y, r) = (var(&shape, 5, 0.0), var(&shape, 6, 0.0));
        let dropped = dropout(&y, 0.3, Some(&mut ChaCha8Rng::seed_from_u64(7))).unwrap();
        let summed = dropout_add(&y, &r, 0.3, Some(&mut ChaCha8Rng::seed_from_u64(7))).unwrap();
        let expected = (dropped.clone() + r.as_tensor()).unwrap();
        assert!(max_abs_diff(&summed, &expected) < 1e-6);
        // The gradient is the mask: 0 or 1 / (1 - p), about p of it 0, and the output is
        // the input times it.
        let g = dropped.sum_all().unwrap().backward().unwrap();
        let mask = g.get(&y).unwrap();
        let m: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        assert!(m.iter().all(|&f| f == 0.0 || (f - 1.0 / 0.7).abs() < 1e-5));
        let zeros = m.iter().filter(|&&f| f == 0.0).count() as f64 / m.len() as f64;
        assert!((zeros - 0.3).abs() < 0.03, "dropped {zeros}");
        assert!(max_abs_diff(&dropped, &(y.as_tensor() * mask).unwrap()) < 1e-6);
        // Evaluation and p = 0 leave the input as it is.
        let eval = dropout(&y, 0.3, None).unwrap();
        assert_eq!(max_abs_diff(&eval, y.as_tensor()), 0.0);
        let none = dropout(&y, 0.0, Some(&mut ChaCha8Rng::seed_from_u64(7))).unwrap();
        assert_eq!(max_abs_diff(&none, y.as_tensor()), 0.0);
    }

    #[test]
    fn dropout_add_matches_mask_times_y_plus_residual_with_gradients() {
        let shape = [3, 5, 7 * 1000]; // several mask chunks
        let (y, r, w) = (
            var(&shape, 1, 0.0),
            var(&shape, 2, 0.0),
            var(&shape, 3, 0.0),
        );
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let fused = dropout_add(&y, &r, 0.2, Some(&mut rng)).unwrap();
        // The same seed, drawn the same way, gives the reference mask.
        let seed: u64 = ChaCha8Rng::seed_from_u64(4).random();
        let mut f = vec![1f32; y.elem_count()];
        DropMask { p: 0.2, seed }.apply_flat(&mut f);
        let dropped = f.iter().filter(|&&v| v == 0.0).count();
        assert!(dropped > 0 && dropped < f.len() / 2);
        let mask = Tensor::from_vec(f, &shape[..], y.device()).unwrap();
        let composed = ((y.as_tensor() * &mask).unwrap() + r.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
        let loss = |o: &Tensor| (o * w.as_tensor()).unwrap().sum_all().unwrap();
        let (gf, gc) = (
            loss(&fused).backward().unwrap(),
            loss(&composed).backward().unwrap(),
        );
        for x in [&y, &r] {
            assert!(max_abs_diff(gf.get(x).unwrap(), gc.get(x).unwrap()) < 1e-6);
        }
        // Without an rng (evaluation) it is a plain sum.
        let eval = dropout_add(&y, &r, 0.2, None).unwrap();
        assert!(max_abs_diff(&eval, &(y.as_tensor() + r.as_tensor()).unwrap()) < 1e-7);
    }
}
