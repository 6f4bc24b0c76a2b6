//! Helpers for the unit tests of the kernels and the model: deterministic inputs and tensor
//! comparisons.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};

/// `n` uniform values in [-1, 1) from a seeded ChaCha8 stream.
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A variable of `shape` filled with a deterministic pseudo-random pattern in about
/// [-1 + offset, 1 + offset], different for each `seed`.
pub fn var(shape: &[usize], seed: u64, offset: f32) -> Var {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + seed * 131) % 997) as f32 / 500.0 - 1.0 + offset)
        .collect();
    Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
}

/// Largest absolute element-wise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Largest absolute element.
pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
