//! Run-time SIMD dispatch and the branch-free math it vectorises: element-wise kernels are
//! compiled twice, with AVX2+FMA (chosen at run time when the CPU has them; the default
//! x86-64 target only allows SSE2, and the integer bit tricks of [`fast_exp`] need AVX2 to
//! run 8 lanes wide) and portable. [`has_avx2_fma`] is the one CPU check they all use.

/// `exp(x)` for f32, vectorisable (Cephes `expf`: range reduction by ln 2 and a degree-6
/// polynomial; relative error below 2e-7 on the range softmax uses). Inputs below -87.3
/// return about 1e-38 instead of a denormal, which is zero for every purpose here.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let bits = t.to_bits() as i32 - ROUND.to_bits() as i32; // = n as an integer
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((bits + 127) << 23) as u32)
}

/// `erf(x)` for f32, vectorisable: the rational approximation used by Eigen/XLA (odd
/// degree-13 numerator over even degree-8 denominator on [-4, 4], where f32 erf saturates),
/// evaluated in f64: in f32 its rounding alone reaches 4.5e-7, enough to triple the ESM-2
/// parity error; in f64 the error is the approximation's own 8e-8, about one f32 ulp.
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    let x = (x as f64).clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_252_130_6e-10f64;
    p = p * x2 + 2.770_681_424_959_02e-8;
    p = p * x2 - 2.101_024_020_825_08e-6;
    p = p * x2 - 5.692_506_394_623_46e-5;
    p = p * x2 - 7.349_906_303_268_55e-4;
    p = p * x2 - 2.954_599_808_540_25e-3;
    p = p * x2 - 1.609_603_332_624_15e-2;
    let mut q = -1.456_607_184_649_96e-5f64;
    q = q * x2 - 2.133_740_552_789_05e-4;
    q = q * x2 - 1.682_826_974_382_03e-3;
    q = q * x2 - 7.373_329_167_204_68e-3;
    q = q * x2 - 1.426_473_905_141_89e-2;
    (x * p / q) as f32
}

/// Whether this CPU has AVX2 and FMA (checked once per process).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * (87.0 + 80.0) / 200_000.0;
            let (a, b) = (fast_exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1e9) >= 0.0 && fast_exp(-1e9) < 1e-37);
        assert!(fast_exp(1e9).is_finite());
    }

    #[test]
    fn fast_erf_matches_reference() {
        let mut worst = 0f64;
        for i in 0..100_000 {
            let x = -6.0 + i as f64 * 12.0 / 100_000.0;
            let want = candle_core::cpu::erf::erf_f64(x);
            worst = worst.max((fast_erf(x as f32) as f64 - want).abs());
        }
        eprintln!("fast_erf worst absolute error {worst:e}");
        assert!(worst < 2e-7, "worst absolute error {worst:e}");
    }
}
