//! CPU ops of three f32 tensors (linear, LayerNorm, fused attention): [`F32Op3`] is what
//! such an op implements (a forward on the three inputs' data, a backward on tensors), and
//! [`apply3`] runs it as a candle `CustomOp3`, so each op writes neither candle's storage
//! plumbing nor its signature again.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::buffers::f32_slice;

/// The gradients of an op's three inputs (`None` for an input that needs none).
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// A CPU op of three f32 tensors with a hand-written backward.
pub(crate) trait F32Op3: Send + Sync {
    fn name(&self) -> &'static str;

    /// The output and its shape from the inputs' data (contiguous, in their layouts).
    fn forward(&self, inputs: [&[f32]; 3], layouts: [&Layout; 3]) -> Result<(Vec<f32>, Shape)>;

    /// The inputs' gradients from the inputs, the forward's output and its gradient.
    fn backward(&self, inputs: [&Tensor; 3], output: &Tensor, grad: &Tensor) -> Result<Grads3>;
}

/// `op` on (`a`, `b`, `c`), made contiguous, as one node of the autograd graph.
pub(crate) fn apply3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: impl F32Op3 + 'static,
) -> Result<Tensor> {
    a.contiguous()?
        .apply_op3(&b.contiguous()?, &c.contiguous()?, Adapter(op))
}

struct Adapter<T>(T);

impl<T: F32Op3> CustomOp3 for Adapter<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inputs = [f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?];
        let (out, shape) = self.0.forward(inputs, [l1, l2, l3])?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        self.0.backward([a, b, c], out, grad)
    }
}
