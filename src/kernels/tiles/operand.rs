//! The operands the tile kernels share: tile sizes, strided matrices, the epilogue that
//! finishes each product. No dependency, so the portable dispatch (`mod.rs`) and the
//! register kernels (`avx2.rs`, `softmax.rs`) both use it without importing each other.

/// Columns per [`wide`](super::wide) tile: packed `Bt` rows are padded to a multiple of this.
pub const TILE_COLS: usize = 16;
/// Rows of `C` per microkernel tile.
pub(crate) const TILE_ROWS: usize = 6;
/// Widest `d` the [`narrow`](super::narrow) register tile takes; wider products go to the `gemm` crate.
pub(crate) const NARROW_MAX: usize = 24;

/// A strided matrix operand: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Strided {
    /// Row-major rows of `rs` floats.
    pub fn rows(ptr: *const f32, rs: usize) -> Self {
        Self {
            ptr,
            rs: rs as isize,
            cs: 1,
        }
    }

    #[inline(always)]
    pub(crate) unsafe fn at(self, i: usize, j: usize) -> *const f32 {
        // SAFETY: the caller keeps (i, j) inside the operand.
        unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }
}

/// `n` rounded up to a whole number of [`wide`](super::wide) tiles.
pub fn padded(n: usize) -> usize {
    n.div_ceil(TILE_COLS) * TILE_COLS
}

/// What [`wide`](super::wide) does with each product before (or while) storing it.
pub enum Epilogue<'a> {
    /// `C = A Bt`.
    Store,
    /// `C = A Bt`, and `row_max[i]` = the largest of row `i`'s first `valid` columns (the
    /// softmax's shift, without a separate pass over the scores).
    StoreMax {
        valid: usize,
        row_max: &'a mut [f32],
    },
    /// `C = exp(A Bt - lse[i])`: probabilities recomputed from their log-sum-exp.
    ExpMinus { lse: &'a [f32] },
    /// `C = P * (A Bt - di[i])` element-wise, `P` laid out like `C`: the softmax backward
    /// (`di` = rowsum(dO * O)).
    SoftmaxGrad { p: *const f32, di: &'a [f32] },
}
