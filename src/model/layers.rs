//! The layers both encoders (and the heads) are made of, with parameters from a [`Builder`]:
//! linear (with its optional LoRA adapter), layer normalisation, embedding, and the
//! feed-forward activation. Their compute is
//! [`crate::kernels`]' ops.

use candle_core::{Result, Tensor};

use super::config::{Activation, EncoderConfig};
use super::params::{Builder, Init};
use crate::kernels::{linear, ops};

/// `y = x W^T + b`, with HF names `weight` [out, in] and `bias` [out], plus an optional
/// low-rank adapter ([`Lora`]) on a frozen `W`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// One transformer layer's weights, the same for BERT and ESM-2 (Hugging Face names under
/// `encoder.layer.N.`). BERT normalises after each residual (post-LayerNorm), ESM-2 before
/// each sublayer (pre-LayerNorm): `attn_norm` and `ffn_norm` are the norms that go with the
/// attention and the feed-forward sublayer, at the names [`Self::new`] is given.
#[derive(Clone)]
pub(crate) struct TransformerLayer {
    pub(crate) query: Linear,
    pub(crate) key: Linear,
    pub(crate) value: Linear,
    pub(crate) attn_out: Linear,
    pub(crate) attn_norm: LayerNorm,
    pub(crate) intermediate: Linear,
    pub(crate) output: Linear,
    pub(crate) ffn_norm: LayerNorm,
}

impl TransformerLayer {
    /// The layer under `l` (`encoder.layer.N`), its two LayerNorms at `norms` =
    /// [attention's, feed-forward's] (relative to `l`).
    pub(crate) fn new(l: &Builder, cfg: &EncoderConfig, norms: [&str; 2]) -> Result<Self> {
        let (h, f, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        let eps = cfg.layer_norm_eps;
        let a = l.pp("attention");
        Ok(Self {
            query: Linear::projection(&a.pp("self.query"), h, h, std)?,
            key: Linear::projection(&a.pp("self.key"), h, h, std)?,
            value: Linear::projection(&a.pp("self.value"), h, h, std)?,
            attn_out: Linear::projection(&a.pp("output.dense"), h, h, std)?,
            attn_norm: LayerNorm::new(&l.pp(norms[0]), h, eps)?,
            intermediate: Linear::projection(&l.pp("intermediate.dense"), h, f, std)?,
            output: Linear::projection(&l.pp("output.dense"), f, h, std)?,
            ffn_norm: LayerNorm::new(&l.pp(norms[1]), h, eps)?,
        })
    }

    /// The same weights outside the autograd graph (LoRA adapters merged).
    pub(crate) fn detached(&self) -> Self {
        Self {
            query: self.query.detached(),
            key: self.key.detached(),
            value: self.value.detached(),
            attn_out: self.attn_out.detached(),
            attn_norm: self.attn_norm.detached(),
            intermediate: self.intermediate.detached(),
            output: self.output.detached(),
            ffn_norm: self.ffn_norm.detached(),
        }
    }

    /// The linear layers in [`super::lora::LAYER_LINEARS`] order.
    pub(crate) fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.intermediate,
            &self.output,
        ]
    }

    /// [`Self::linears`], mutable: what LoRA adapts.
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }

    /// The two LayerNorms' weights and biases.
    pub(crate) fn norm_tensors(&self) -> [&Tensor; 4] {
        let (a, f) = (&self.attn_norm, &self.ffn_norm);
        [&a.weight, &a.bias, &f.weight, &f.bias]
    }
}

/// Whether the packed inference path may run these weights: no linear carries LoRA adapters
/// (they run in the general path, merged when detached) and no tensor records a backward
/// graph, so nobody can ask for gradients.
pub fn all_detached<'a>(
    linears: impl IntoIterator<Item = &'a Linear>,
    tensors: impl IntoIterator<Item = &'a Tensor>,
) -> bool {
    let mut weights = Vec::new();
    for lin in linears {
        if lin.lora.is_some() {
            return false;
        }
        weights.push(&lin.weight);
        weights.extend(lin.bias.as_ref());
    }
    weights.into_iter().chain(tensors).all(|t| !t.track_op())
}

impl Linear {
    pub fn new(b: &Builder, in_dim: usize, out_dim: usize, init_std: f64) -> Result<Self> {
        Ok(Self {
            weight: b.get((out_dim, in_dim), "weight", Init::Normal(init_std))?,
            bias: Some(b.get(out_dim, "bias", Init::Zeros)?),
            lora: None,
        })
    }

    /// An encoder layer's projection: like [`Self::new`], but a store made for inference
    /// keeps the weight column-major and frozen ([`Builder::linear_weight`]).
    pub fn projection(b: &Builder, in_dim: usize, out_dim: usize, init_std: f64) -> Result<Self> {
        Ok(Self {
            weight: b.linear_weight(out_dim, in_dim, Init::Normal(init_std))?,
            bias: Some(b.get(out_dim, "bias", Init::Zeros)?),
            lora: None,
        })
    }

    /// Adds a LoRA adapter of `rank` (see [`Lora`]) under this layer's builder `b`; the
    /// layer's own weight and bias are cut from the autograd graph (frozen).
    pub fn with_lora(&self, b: &Builder, rank: usize, alpha: f64) -> Result<Self> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let mut frozen = self.detached();
        frozen.lora = Some(Lora::new(b, in_dim, out_dim, rank, alpha)?);
        Ok(frozen)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = linear::linear(x, &self.weight, self.bias.as_ref())?;
        match &self.lora {
            None => Ok(y),
            Some(l) => y + l.forward(x)?,
        }
    }

    /// `forward(x) * scale` in one op (attention queries).
    pub fn forward_scaled(&self, x: &Tensor, scale: f64) -> Result<Tensor> {
        let y = linear::linear_scaled(x, &self.weight, self.bias.as_ref(), scale)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => y + (l.forward(x)? * scale)?,
        }
    }

    /// A copy whose tensors are cut from the autograd graph (frozen). An adapter is merged
    /// into the copy's weight (`W + scale * B A`), so inference runs one product per layer
    /// and the packed kernels apply.
    pub fn detached(&self) -> Self {
        let weight = match &self.lora {
            None => self.weight.detach(),
            Some(l) => l
                .delta()
                .and_then(|d| self.weight.detach() + d)
                .expect("LoRA delta has the weight's shape"),
        };
        Self {
            weight,
            bias: self.bias.as_ref().map(Tensor::detach),
            lora: None,
        }
    }
}

/// Layer normalisation with HF names `weight`/`bias` (old checkpoints' `gamma`/`beta` are
/// renamed on load).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(b: &Builder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: b.get(dim, "weight", Init::Ones)?,
            bias: b.get(dim, "bias", Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }
}

/// Lookup table `weight` [num, dim].
#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(b: &Builder, num: usize, dim: usize, init_std: f64) -> Result<Self> {
        Ok(Self {
            weight: b.get((num, dim), "weight", Init::Normal(init_std))?,
        })
    }

    /// `ids` [B, T] (u32) -> [B, T, dim].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = self.weight.index_select(&ids.flatten_all()?, 0)?;
        flat.reshape((b, t, self.weight.dim(1)?))
    }

    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
        }
    }
}

/// `act(x @ W^T + b)` of an FFN's first layer; GELU (erf) is fused into the linear op.
pub(crate) fn linear_activation(l: &Linear, x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Gelu if l.lora.is_none() => {
            linear::linear_gelu_erf(x, &l.weight, l.bias.as_ref())
        }
        _ => activation(&l.forward(x)?, act),
    }
}

fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Gelu => ops::gelu_erf(x),
        Activation::Relu => x.relu(),
        Activation::GeluNew | Activation::GeluPytorchTanh => x.gelu(), // tanh approximation
    }
}

/// A LoRA adapter (Hu et al. 2021): `W x` becomes `W x + scale * B (A x)` with `A` [r, in]
/// (`lora_A.weight`) and `B` [out, r] (`lora_B.weight`), `scale = alpha / r`. `B` starts at
/// zero, so a new adapter leaves the layer unchanged. Names follow PEFT.
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Lora {
    /// A new adapter for a layer `in_dim -> out_dim`, registered with the store so that
    /// saving merges it into the layer's weight ([`ParamStore::merged_tensors`]).
    ///
    /// [`ParamStore::merged_tensors`]: super::params::ParamStore::merged_tensors
    pub fn new(
        b: &Builder,
        in_dim: usize,
        out_dim: usize,
        rank: usize,
        alpha: f64,
    ) -> Result<Self> {
        // A: PyTorch's default Linear initialisation variance (PEFT draws A kaiming-uniform,
        // which has that variance); B: zeros.
        let std = (1.0 / (3.0 * in_dim as f64)).sqrt();
        let scale = alpha / rank as f64;
        let a = b
            .pp("lora_A")
            .get((rank, in_dim), "weight", Init::Normal(std))?;
        let bm = b.pp("lora_B").get((out_dim, rank), "weight", Init::Zeros)?;
        b.register_adapter(scale);
        Ok(Self { a, b: bm, scale })
    }

    /// `scale * B (A x)` for `x` [.., in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear::linear(&linear::linear(x, &self.a, None)?, &self.b, None)? * self.scale
    }

    /// `scale * B A` [out, in]: what merging adds to the weight.
    pub fn delta(&self) -> Result<Tensor> {
        self.b.detach().matmul(&self.a.detach())? * self.scale
    }
}
