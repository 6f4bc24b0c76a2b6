//! The encoders' feed-forward activations on raw f32 slices (forward, and GELU's backward),
//! split over rayon threads and compiled for AVX2+FMA when the CPU has it
//! ([`simd`](super::simd)).

use rayon::prelude::*;

use super::simd::fast_erf;
use super::simd::fast_exp;
#[cfg(target_arch = "x86_64")]
use super::simd::has_avx2_fma;

/// Activation functions of the encoders' feed-forward blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `0.5 x (1 + erf(x / sqrt 2))` (HF "gelu").
    GeluErf,
    /// The tanh approximation (HF "gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
}

/// Applies `act` to every element in place, split over rayon threads.
pub fn activation_inplace(x: &mut [f32], act: Act) {
    x.par_chunks_mut(16 * 1024)
        .for_each(|c| simd::activation(c, act));
}

#[inline(always)]
fn activation_scalar(c: &mut [f32], act: Act) {
    match act {
        Act::GeluErf => {
            for v in c.iter_mut() {
                *v = 0.5 * *v * (1.0 + fast_erf(*v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
        Act::GeluTanh => {
            for v in c.iter_mut() {
                let x = *v;
                let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
                // tanh(y) = 1 - 2 / (exp(2y) + 1), finite for every y after fast_exp's clamp.
                let tanh = 1.0 - 2.0 / (fast_exp(2.0 * y) + 1.0);
                *v = 0.5 * x * (1.0 + tanh);
            }
        }
        Act::Relu => {
            for v in c.iter_mut() {
                *v = v.max(0.0);
            }
        }
    }
}

/// `g[i] *= gelu_erf'(x[i])` in place, split over rayon threads: the backward pass of
/// [`Act::GeluErf`], `d/dx = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)`.
pub fn gelu_erf_backward_inplace(x: &[f32], g: &mut [f32]) {
    assert_eq!(x.len(), g.len());
    g.par_chunks_mut(16 * 1024)
        .zip(x.par_chunks(16 * 1024))
        .for_each(|(g, x)| simd::gelu_erf_backward(x, g));
}

#[inline(always)]
fn gelu_erf_backward_scalar(x: &[f32], g: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for (gi, &xi) in g.iter_mut().zip(x) {
        let cdf = 0.5 * (1.0 + fast_erf(xi * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * fast_exp(-0.5 * xi * xi);
        *gi *= cdf + xi * pdf;
    }
}

/// The element-wise kernels above, compiled with AVX2+FMA when the CPU has them.
mod simd {
    #[cfg(target_arch = "x86_64")]
    use super::has_avx2_fma;
    use super::Act;

    pub fn activation(c: &mut [f32], act: Act) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { activation_avx2(c, act) };
        }
        super::activation_scalar(c, act)
    }

    pub fn gelu_erf_backward(x: &[f32], g: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { gelu_erf_backward_avx2(x, g) };
        }
        super::gelu_erf_backward_scalar(x, g)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gelu_erf_backward_avx2(x: &[f32], g: &mut [f32]) {
        super::gelu_erf_backward_scalar(x, g)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn activation_avx2(c: &mut [f32], act: Act) {
        super::activation_scalar(c, act)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::rand_vec;
    use candle_core::Tensor;

    #[test]
    fn activations_match_candle() {
        let x = Tensor::from_vec(
            rand_vec(4096, 1)
                .iter()
                .map(|v| v * 6.0)
                .collect::<Vec<_>>(),
            4096,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for (act, want) in [
            (Act::GeluErf, x.gelu_erf().unwrap()),
            (Act::GeluTanh, x.gelu().unwrap()),
            (Act::Relu, x.relu().unwrap()),
        ] {
            let mut ours = x.to_vec1::<f32>().unwrap();
            activation_inplace(&mut ours, act);
            let want = want.to_vec1::<f32>().unwrap();
            let worst = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-6, "{act:?}: {worst:e}");
        }
    }

    #[test]
    fn gelu_erf_backward_matches_finite_differences() {
        let x: Vec<f32> = (0..2001).map(|i| -8.0 + i as f32 * 0.008).collect();
        let mut g = vec![1f32; x.len()];
        gelu_erf_backward_inplace(&x, &mut g);
        let gelu = |v: f64| 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f64(v / 2f64.sqrt()));
        for (&xi, &gi) in x.iter().zip(&g) {
            let h = 1e-4;
            let want = (gelu(xi as f64 + h) - gelu(xi as f64 - h)) / (2.0 * h);
            assert!((gi as f64 - want).abs() < 1e-5, "x={xi}: {gi} vs {want}");
        }
    }
}
