//! Inference-only CPU kernels on raw f32 slices (no autograd).
//!
//! The encoders' differentiable path (`ops`, `nn`) pads every sequence of a batch to the
//! longest, materialises `[B, heads, T, T]` scores, and copies activations between layouts
//! (`split_heads`, `transpose`). For inference none of that is needed, so the fast path
//! here works on **packed** tokens: the real tokens of every sequence stacked into one
//! `[N, hidden]` matrix (`N` = real tokens of the batch, no padding rows at all), with
//! [`Segment`]s saying where each sequence starts. Linear layers are single GEMMs over all
//! `N` rows (the `gemm` crate, the same kernels candle uses, split over rayon threads);
//! attention runs per (sequence, head): that head's keys are packed once, then blocks of
//! query rows are computed straight from the strided `[N, hidden]` Q/V with the
//! [`head_gemm`](super::head_gemm) microkernels, over that sequence's keys only, and the
//! output is written in place.
//!
//! Memory is bounded for any length: a block holds at most `SCORE_BLOCK` scores (sequences
//! longer than `KEY_BLOCK` take their keys a block at a time, with an online softmax), so a
//! 35,000-residue protein needs 256 KB of scores per thread instead of the 4.9 GB a full
//! `T x T` matrix per head would take.

use candle_core::{CpuStorage, Layout, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::head_gemm::{self, Strided};

/// Scores per attention block (query rows x keys): 64K f32 = 256 KB, which stays in L2
/// while the softmax and the PV product read it back.
pub const SCORE_BLOCK: usize = 64 * 1024;
/// Keys per block of the streaming (online-softmax) attention, used once a sequence has
/// more keys than this ([`head_gemm::softmax_rows_streaming`]). Measured on ESM-2 8M, one
/// sequence (`benches/encoder.rs scale`): 8,192 tokens took 5.4-5.6 s with blocks of 256
/// keys, 5.8-5.9 s with 128, 6.0 s with 512, 7.2 s with 1,024 and 7.9-9.3 s unblocked;
/// 1,024 tokens 0.17-0.19 s against 0.21; at 512 tokens and below, no difference.
pub const KEY_BLOCK: usize = 256;

static PACKED_INFERENCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the packed inference path on (the default) or off for the whole process. Off,
/// detached encoders run the general differentiable ops instead: for before/after
/// benchmarks (`benches/encoder.rs --path general`) and for diagnosing a suspected kernel bug.
pub fn set_packed_inference(on: bool) {
    PACKED_INFERENCE.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn packed_inference_enabled() -> bool {
    PACKED_INFERENCE.load(std::sync::atomic::Ordering::Relaxed)
}

/// One sequence inside a packed `[N, hidden]` activation: rows `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
}

/// Segments from per-sequence lengths, packed back to back.
pub fn segments(lengths: &[usize]) -> Vec<Segment> {
    let mut start = 0;
    lengths
        .iter()
        .map(|&len| {
            let s = Segment { start, len };
            start += len;
            s
        })
        .collect()
}

/// A read view of a contiguous CPU f32 tensor's data (holds the storage read lock).
pub struct View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl View<'_> {
    pub fn get(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => unreachable!("checked in view()"),
        }
    }
}

/// Borrows the data of a contiguous f32 CPU tensor without copying.
pub fn view(t: &Tensor) -> Result<View<'_>> {
    let (guard, layout) = f32_cpu_storage(t)?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(View { guard, start, end })
}

/// The storage (read-locked) and layout of `t`, which must hold f32 on the CPU.
fn f32_cpu_storage(t: &Tensor) -> Result<(StorageRef<'_>, &Layout)> {
    let (guard, layout) = t.storage_and_layout();
    if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!(
            "expected an f32 CPU tensor, got {:?} on {:?}",
            t.dtype(),
            t.device()
        );
    }
    Ok((guard, layout))
}

/// Most floats the buffer pool keeps per thread (256 MB): enough for the working set of an
/// 8192-token batch of ProtBERT-sized layers, and a cap so one huge protein does not pin its
/// buffers for the rest of the run.
const POOL_MAX_FLOATS: usize = 64 << 20;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A zeroed buffer of `len` floats, reusing one returned by [`recycle`] when possible.
/// Activations are tens of MB: fresh allocations of that size are `mmap`ed by the allocator
/// and page-faulted in on every layer of every batch (measured: ~3% of a ProtBERT-width
/// forward in the kernel's page-clearing code).
pub fn take(len: usize) -> Vec<f32> {
    let mut v = pooled(len);
    v.resize(len, 0.0);
    v
}

/// A buffer of `rows` rows, each `row * scale`, reusing a pooled buffer: one parallel write
/// pass where [`take`] and [`add_bias_rows`] took a zeroing pass and a read-modify-write pass
/// (the bias a linear layer's GEMM then accumulates onto).
pub fn take_rows(rows: usize, row: &[f32], scale: f32) -> Vec<f32> {
    let (d, len) = (row.len(), rows * row.len());
    let mut v = pooled(len);
    if len == 0 {
        return v;
    }
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(d * rows_per_task(d))
        .for_each(|chunk| {
            for out in chunk.chunks_mut(d) {
                for (o, &b) in out.iter_mut().zip(row) {
                    o.write(b * scale);
                }
            }
        });
    // SAFETY: the loop above initialised all `len` elements (every chunk is whole rows).
    unsafe { v.set_len(len) };
    v
}

/// An empty buffer with room for `len` floats: the smallest pooled one that fits, or new.
fn pooled(len: usize) -> Vec<f32> {
    let reused = POOL.with(|p| {
        let mut p = p.borrow_mut();
        let best = p
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        best.map(|i| p.swap_remove(i))
    });
    let mut v = reused.unwrap_or_default();
    v.clear();
    v.reserve(len);
    v
}

/// Gives a buffer back to this thread's pool (dropped instead when the pool is full).
pub fn recycle(v: Vec<f32>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let held: usize = p.iter().map(Vec::capacity).sum();
        if held + v.capacity() <= POOL_MAX_FLOATS {
            p.push(v);
        }
    });
}

/// Threads for a GEMM of this size: small products are faster on one thread than split.
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// How a linear layer's weight (`[out, in]` as a tensor) lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// Row-major `[out, in]`, as checkpoints store it and training keeps it.
    OutIn,
    /// Column-major: `[in, out]` row-major in memory (a transposed view as a tensor). Models
    /// loaded for inference keep their layers' weights this way
    /// ([`ParamStore::for_inference`](super::ParamStore::for_inference)): the `gemm` crate
    /// then packs them with vector copies, where for `OutIn` it transposes them with a scalar
    /// loop on every call. Measured (`cargo bench --bench encoder -- gemm --layout ...`,
    /// 2 threads): 4096x1024x4096 202 -> 210 GFLOP/s, 512 rows x 1024 x 1024 153 -> 207,
    /// 128 rows 78 -> 205; transposing on the fly instead gained nothing.
    InOut,
}

/// A read view of a linear layer's weight and how it lies in memory (see [`WeightLayout`]).
pub fn weight_view(t: &Tensor) -> Result<(View<'_>, WeightLayout)> {
    let (guard, layout) = f32_cpu_storage(t)?;
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Ok((View { guard, start, end }, WeightLayout::OutIn));
    }
    let (out_dim, in_dim) = layout.shape().dims2()?;
    if layout.stride() != [1, out_dim] {
        candle_core::bail!(
            "expected a row- or column-major weight, got strides {:?}",
            layout.stride()
        );
    }
    let start = layout.start_offset();
    let end = start + out_dim * in_dim;
    Ok((View { guard, start, end }, WeightLayout::InOut))
}

/// `src` [rows, cols] row-major, transposed: [cols, rows] row-major. Blocks of 32 x 32 keep
/// both sides' cache lines in use; split over rayon threads by output rows.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 32;
    assert_eq!(src.len(), rows * cols);
    let mut dst = vec![0f32; src.len()];
    if src.is_empty() {
        return dst;
    }
    dst.par_chunks_mut(BLOCK * rows)
        .enumerate()
        .for_each(|(bi, out)| {
            let c0 = bi * BLOCK;
            let cb = out.len() / rows;
            for r0 in (0..rows).step_by(BLOCK) {
                for r in r0..(r0 + BLOCK).min(rows) {
                    for (j, &v) in src[r * cols + c0..][..cb].iter().enumerate() {
                        out[j * rows + r] = v;
                    }
                }
            }
        });
    dst
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
pub fn linear(
    x: &[f32],
    w: &[f32],
    layout: WeightLayout,
    b: Option<&[f32]>,
    in_dim: usize,
    out_dim: usize,
) -> Vec<f32> {
    linear_scaled(x, w, layout, b, in_dim, out_dim, 1.0)
}

/// `(x @ W^T + b) * scale` (attention queries), computed as `b * scale + scale * (x @ W^T)`:
/// the scale rides on the bias fill and the GEMM's own multiplier instead of another pass.
pub fn linear_scaled(
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

/// Rows per rayon task for row-wise passes: about 16K elements, so tasks are worth
/// scheduling but there are still enough of them for every thread.
fn rows_per_task(d: usize) -> usize {
    (16 * 1024 / d.max(1)).max(1)
}

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
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
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

/// Activation functions of the encoders' feed-forward blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `0.5 x (1 + erf(x / sqrt 2))` (HF "gelu").
    GeluErf,
    /// The tanh approximation (HF "gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
}

impl Act {
    /// Same mapping as `bert::activation`.
    pub fn from_name(name: &str) -> Self {
        match name {
            "gelu" => Act::GeluErf,
            "relu" => Act::Relu,
            _ => Act::GeluTanh,
        }
    }
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

/// `exp(x - max)` over `row` in place; returns the sum (an unnormalised softmax row whose
/// normalisation the caller folds into what it computes next).
pub fn exp_minus_sum(row: &mut [f32], max: f32) -> f32 {
    simd::exp_minus_sum(row, max)
}

#[inline(always)]
fn exp_minus_sum_scalar(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = fast_exp(c[i] - max);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = fast_exp(*v - max);
        sum += *v;
    }
    sum
}

/// Element-wise kernels compiled twice: with AVX2+FMA (chosen at run time when the CPU has
/// them; the default x86-64 target only allows SSE2, and the integer bit tricks of
/// [`fast_exp`] need AVX2 to run 8 lanes wide) and portable.
#[cfg(target_arch = "x86_64")]
pub(crate) use simd::has_avx2_fma;

mod simd {
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

    pub fn exp_minus_sum(row: &mut [f32], max: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: as above (the intrinsics version lives with the attention kernels).
            return unsafe { super::super::head_gemm::avx2::exp_minus_sum(row, max) };
        }
        super::exp_minus_sum_scalar(row, max)
    }

    #[cfg(target_arch = "x86_64")]
    pub(crate) fn has_avx2_fma() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn activation_avx2(c: &mut [f32], act: Act) {
        super::activation_scalar(c, act)
    }
}

/// Raw output pointer shared by attention blocks that write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every block writes only its own (rows, head columns) region of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method so closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Multi-head self-attention over packed sequences.
///
/// `q`, `k`, `v`: `[N, heads * head_dim]` row-major (q already scaled), as the projections
/// produce them: head `h` of token `i` is `x[i * hidden + h * head_dim ..][..head_dim]`, so no
/// head-splitting copy is needed. Each sequence attends to its own keys only (no padding,
/// no mask). Returns the context `[N, heads * head_dim]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segs: &[Segment],
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let limits = BlockLimits {
        scores: SCORE_BLOCK,
        key_block: KEY_BLOCK,
    };
    attention_with_block(q, k, v, segs, heads, head_dim, limits)
}

/// Size of an attention block: query rows x keys at most `scores` (but at least one row);
/// sequences longer than `key_block` (a multiple of 16) take their keys in blocks of that
/// many, so a block is never wider than `key_block` (see [`SCORE_BLOCK`], [`KEY_BLOCK`]).
#[derive(Debug, Clone, Copy)]
pub struct BlockLimits {
    pub scores: usize,
    pub key_block: usize,
}

/// [`attention`] with chosen block limits (tests use small blocks to exercise the row
/// chunking on short sequences).
pub fn attention_with_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segs: &[Segment],
    heads: usize,
    head_dim: usize,
    limits: BlockLimits,
) -> Vec<f32> {
    let hidden = heads * head_dim;
    let n = q.len() / hidden.max(1);
    assert!(q.len() == n * hidden && k.len() == q.len() && v.len() == q.len());
    assert!(segs.iter().all(|s| s.start + s.len <= n));
    let mut out = take(n * hidden);
    let tasks: Vec<(Segment, usize)> = segs
        .iter()
        .filter(|s| s.len > 0)
        .flat_map(|s| (0..heads).map(move |h| (*s, h)))
        .collect();
    let out_ptr = OutPtr(out.as_mut_ptr());
    let d = head_dim;
    tasks.into_par_iter().for_each_init(
        <[Vec<f32>; 3]>::default,
        |[scores, k_t, inv_sums]: &mut [Vec<f32>; 3], (s, h)| {
            let len = s.len;
            let streaming = len > limits.key_block;
            let width = if streaming {
                limits.key_block
            } else {
                head_gemm::padded(len)
            };
            let rows = (limits.scores / width).clamp(1, len);
            scores.resize(rows * width, 0.0);
            inv_sums.resize(3 * rows, 0.0);
            let kv0 = s.start * hidden + h * d;
            // SAFETY (the whole task): pointers and strides stay inside q/k/v (rows of this
            // segment, columns of head h); `scores` holds rows x width; the output rows of this
            // segment in head h's columns belong to this task alone, and `out` outlives the
            // parallel loop.
            unsafe {
                let k0 = k.as_ptr().add(kv0);
                head_gemm::pack_transposed_blocks(k0, hidden, len, d, limits.key_block, k_t);
                let mut r0 = 0;
                while r0 < len {
                    let r = rows.min(len - r0);
                    let q0 = kv0 + r0 * hidden;
                    let blk = head_gemm::AttentionBlock {
                        r,
                        len,
                        d,
                        q: Strided::rows(q.as_ptr().add(q0), hidden),
                        k_t,
                        v: v.as_ptr().add(kv0),
                        v_rs: hidden,
                        out: out_ptr.get().add(q0),
                        out_rs: hidden,
                    };
                    if streaming {
                        head_gemm::softmax_rows_streaming(&blk, width, scores, inv_sums);
                    } else {
                        head_gemm::softmax_rows(&blk, scores, inv_sums, None, |_| {});
                    }
                    r0 += r;
                }
            }
        },
    );
    out
}

/// Rotary position embedding in place on packed `[N, heads * head_dim]` rows, positions
/// counted from each segment's start; `cos`/`sin` are `[max_len, head_dim / 2]` tables.
/// Also multiplies by `scale` (the query's 1/sqrt(d), or 1 for keys).
pub fn rotary_inplace(
    x: &mut [f32],
    segs: &[Segment],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    scale: f32,
) {
    let hidden = heads * head_dim;
    let half = head_dim / 2;
    // Position of every packed row.
    let mut pos = Vec::with_capacity(x.len() / hidden);
    for s in segs {
        pos.extend(0..s.len);
    }
    x.par_chunks_mut(hidden)
        .zip(pos.par_iter())
        .with_min_len(64)
        .for_each(|(row, &p)| {
            let (c, sn) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            for head in row.chunks_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j] * scale, x2[j] * scale);
                    x1[j] = a * c[j] - b * sn[j];
                    x2[j] = b * c[j] + a * sn[j];
                }
            }
        });
}

/// Lengths of the real tokens of each row of an attention mask `[B, T]` (1 = token), or
/// `None` when some row is not "ones then zeros" (the packed path needs prefix masks; any
/// other mask takes the general path).
pub fn prefix_lengths(mask: &[Vec<f32>]) -> Option<Vec<usize>> {
    mask.iter()
        .map(|row| {
            let n = row.iter().take_while(|&&m| m != 0.0).count();
            row[n..].iter().all(|&m| m == 0.0).then_some(n)
        })
        .collect()
}

/// Packed `[N, hidden]` rows back into a zero-padded `[B, T, hidden]` tensor.
pub fn unpack(x: &[f32], segs: &[Segment], t: usize, hidden: usize) -> Result<Tensor> {
    let b = segs.len();
    let mut out = vec![0f32; b * t * hidden];
    for (i, s) in segs.iter().enumerate() {
        out[i * t * hidden..(i * t + s.len) * hidden]
            .copy_from_slice(&x[s.start * hidden..(s.start + s.len) * hidden]);
    }
    Tensor::from_vec(out, (b, t, hidden), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

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

    /// Straightforward attention over one segment, in f64.
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: Segment,
        heads: usize,
        d: usize,
    ) -> Vec<f64> {
        let hd = heads * d;
        let mut out = vec![0f64; s.len * hd];
        for h in 0..heads {
            for i in 0..s.len {
                let qi = &q[(s.start + i) * hd + h * d..][..d];
                let scores: Vec<f64> = (0..s.len)
                    .map(|j| {
                        let kj = &k[(s.start + j) * hd + h * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for c in 0..d {
                        out[i * hd + h * d + c] +=
                            ej / z * v[(s.start + j) * hd + h * d + c] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive_with_and_without_row_chunks() {
        let (heads, d) = (3, 8);
        let hd = heads * d;
        let lengths = [5, 37, 1, 70];
        let segs = segments(&lengths);
        let n: usize = lengths.iter().sum();
        let (q, k, v) = (
            rand_vec(n * hd, 2),
            rand_vec(n * hd, 3),
            rand_vec(n * hd, 4),
        );
        // Large scores so the softmax is peaked and max subtraction matters.
        let q: Vec<f32> = q.iter().map(|x| x * 8.0).collect();
        // Whole rows, row chunks down to one row, and key blocks of 16 and 32 (the 70- and
        // 37-token sequences stream their keys, with a last block that is not full).
        for (block, key_block) in [
            (SCORE_BLOCK, KEY_BLOCK),
            (100, KEY_BLOCK),
            (1, 16),
            (100, 32),
        ] {
            let limits = BlockLimits {
                scores: block,
                key_block,
            };
            let ours = attention_with_block(&q, &k, &v, &segs, heads, d, limits);
            for s in &segs {
                let want = naive_attention(&q, &k, &v, *s, heads, d);
                let got = &ours[s.start * hd..(s.start + s.len) * hd];
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5,
                        "block {block}, key block {key_block}: {a} vs {b}"
                    );
                }
            }
        }
    }

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
        let ours = layer_norm(&x, &w, &b, 1e-5);
        assert_eq!(ours.len(), rows * d);
        for (a, b) in ours.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let mut in_place = x.clone();
        layer_norm_inplace(&mut in_place, &w, &b, 1e-5);
        assert_eq!(in_place, ours);
    }

    #[test]
    fn linear_matches_candle_matmul() {
        let (rows, i, o) = (67, 48, 40);
        let x = rand_vec(rows * i, 8);
        let w = rand_vec(o * i, 9);
        let b = rand_vec(o, 10);
        let dev = candle_core::Device::Cpu;
        let want = crate::model::ops::linear(
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
            let ours = linear(&x, w, layout, Some(&b), i, o);
            for (a, b) in ours.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{layout:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn take_rows_overwrites_a_recycled_buffer() {
        // A pooled buffer full of garbage, larger than needed: every element of the result
        // must be the scaled row, whatever the buffer held.
        recycle(vec![f32::NAN; 5000]);
        let row = [1.0f32, -2.0, 0.5];
        let v = take_rows(1001, &row, 0.25);
        assert_eq!(v.len(), 3003);
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, row[i % 3] * 0.25, "element {i}");
        }
        recycle(v);
        assert!(take_rows(0, &row, 1.0).is_empty());
        assert!(take_rows(7, &[], 1.0).is_empty());
    }

    #[test]
    fn transpose_moves_every_element() {
        // Sizes around the 32 x 32 block: whole blocks, ragged edges, a single row/column.
        for (rows, cols) in [(1, 1), (1, 70), (70, 1), (32, 32), (33, 65), (100, 37)] {
            let src: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let dst = transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }

    #[test]
    fn weight_view_reads_both_layouts_and_refuses_others() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let (v, layout) = weight_view(&w).unwrap();
        assert_eq!((v.get().len(), layout), (12, WeightLayout::OutIn));
        // [4, 3] contiguous, viewed as its transpose [3, 4]: column-major.
        let col = w.t().unwrap().contiguous().unwrap().t().unwrap();
        let (v, layout) = weight_view(&col).unwrap();
        assert_eq!(layout, WeightLayout::InOut);
        assert_eq!(
            v.get(),
            transpose(&w.flatten_all().unwrap().to_vec1().unwrap(), 3, 4)
        );
        // A column slice is neither.
        let narrow = w.narrow(1, 0, 2).unwrap();
        assert!(weight_view(&narrow).is_err());
    }

    /// A tiny random encoder (trainable weights) of either architecture.
    fn tiny_encoder(esm: bool, act: &str) -> (crate::model::Encoder, crate::model::ParamStore) {
        let mut cfg = crate::model::scratch_config("tiny").unwrap();
        cfg.hidden_act = act.into();
        if esm {
            cfg.model_type = "esm".into();
            cfg.vocab_size = 33;
            cfg.layer_norm_eps = 1e-5;
            cfg.position_embedding_type = "rotary".into();
            cfg.token_dropout = true;
            cfg.mask_token_id = Some(32);
            cfg.emb_layer_norm_before = Some(true);
        }
        // Larger weights than the 0.02 default so attention is far from uniform.
        cfg.initializer_range = 0.3;
        let store = crate::model::ParamStore::new(
            Default::default(),
            "test",
            7,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        );
        let enc = crate::model::Encoder::new(&store.initialising(), &cfg).unwrap();
        (enc, store)
    }

    /// The packed path (detached weights) against the general differentiable path on a
    /// padded batch of different lengths, on real tokens (padding outputs are unspecified).
    fn packed_matches_general(esm: bool, act: &str) {
        let (enc, _store) = tiny_encoder(esm, act);
        let lengths = [9usize, 40, 2, 23];
        let t = 40;
        let mut ids = vec![0u32; lengths.len() * t];
        let mut mask = vec![0f32; lengths.len() * t];
        for (r, &len) in lengths.iter().enumerate() {
            for j in 0..len {
                // Token 32 is ESM's <mask>: exercises the token-dropout rescaling.
                ids[r * t + j] = if esm && j % 7 == 3 {
                    32
                } else {
                    2 + ((r * 5 + j * 3) % 25) as u32
                };
                mask[r * t + j] = 1.0;
            }
        }
        let dev = candle_core::Device::Cpu;
        let ids = Tensor::from_vec(ids, (lengths.len(), t), &dev).unwrap();
        let mask = Tensor::from_vec(mask, (lengths.len(), t), &dev).unwrap();
        let general = enc.forward(&ids, &mask, None).unwrap();
        let packed = enc.detached().forward(&ids, &mask, None).unwrap();
        assert_eq!(general.dims(), packed.dims());
        let g: Vec<Vec<Vec<f32>>> = general.to_vec3().unwrap();
        let p: Vec<Vec<Vec<f32>>> = packed.to_vec3().unwrap();
        for (r, &len) in lengths.iter().enumerate() {
            let a: Vec<f32> = g[r][..len].concat();
            let b: Vec<f32> = p[r][..len].concat();
            let num: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum();
            let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
            let err = (num / den).sqrt();
            assert!(
                err < 1e-5,
                "esm={esm} act={act} row {r}: relative error {err:e}"
            );
        }
    }

    #[test]
    fn packed_esm_matches_general_path() {
        packed_matches_general(true, "gelu");
    }

    #[test]
    fn packed_bert_matches_general_path() {
        packed_matches_general(false, "gelu");
        packed_matches_general(false, "gelu_new");
        packed_matches_general(false, "relu");
    }

    #[test]
    fn general_path_when_mask_not_prefix() {
        // A mask with a hole cannot be packed: the general path must handle it (and give
        // the trainable-weight path's result; detached LayerNorm uses candle's fused kernel,
        // hence a rounding-level tolerance rather than equality).
        let (enc, _store) = tiny_encoder(true, "gelu");
        let dev = candle_core::Device::Cpu;
        let ids = Tensor::new(&[[2u32, 5, 6, 7, 3]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 0., 1., 1.]], &dev).unwrap();
        let a = enc.forward(&ids, &mask, None).unwrap();
        let b = enc.detached().forward(&ids, &mask, None).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }

    #[test]
    fn prefix_lengths_accepts_only_prefix_masks() {
        assert_eq!(
            prefix_lengths(&[vec![1., 1., 0.], vec![1., 1., 1.]]),
            Some(vec![2, 3])
        );
        assert_eq!(prefix_lengths(&[vec![1., 0., 1.]]), None);
    }
}
