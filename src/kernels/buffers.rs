//! Raw f32 data of CPU tensors and the buffers the kernels compute into: read views of a
//! tensor's storage (no copy), how a linear layer's weight lies in memory, a per-thread pool
//! of reusable activation buffers, and a blocked transpose.

use candle_core::{CpuStorage, Layout, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

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

/// The contiguous f32 slice of a CPU storage (the input of a custom op's forward).
pub fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("f32 only")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("contiguous input only")
    };
    Ok(&data[start..end])
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
pub(super) fn pooled(len: usize) -> Vec<f32> {
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

/// How a linear layer's weight (`[out, in]` as a tensor) lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// Row-major `[out, in]`, as checkpoints store it and training keeps it.
    OutIn,
    /// Column-major: `[in, out]` row-major in memory (a transposed view as a tensor). Models
    /// loaded for inference keep their layers' weights this way
    /// (the model's `ParamStore::for_inference`): the `gemm` crate
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

/// Rows per rayon task for row-wise passes: about 16K elements, so tasks are worth
/// scheduling but there are still enough of them for every thread.
pub(super) fn rows_per_task(d: usize) -> usize {
    (16 * 1024 / d.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
