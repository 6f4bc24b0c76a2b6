//! Classification heads on top of an encoder's hidden states.
//!
//! Five kinds, all with an optional membrane/soluble output trained jointly:
//! - `linear`: dropout + linear on a pooled vector;
//! - `pooler`: transformers' sequence-classification head: dense + tanh on the first token,
//!   dropout, linear. Under BERT its tensors are BertForSequenceClassification's
//!   (`bert.pooler.dense.*`, pretrained when the checkpoint has them, and `classifier.*`),
//!   under ESM EsmForSequenceClassification's (`classifier.dense.*`,
//!   `classifier.out_proj.*`), so such checkpoints load and export name for name;
//! - `reference`: the reference workflow's head, faithfully: BERT's pooler (dense + tanh on
//!   the first token, pretrained weights `<bert|esm>.pooler.dense.*` when the checkpoint has
//!   them), dropout, linear, tanh. The tanh outputs are the logits (the reference trains
//!   cross-entropy on them and takes their argmax), so they lie in [-1, 1];
//! - `mlp`: a small feed-forward network on the pooled vector (the frozen-embedding baseline
//!   of Stärk et al. 2021: Linear -> Dropout -> ReLU -> Linear);
//! - `light-attention`: Stärk et al. 2021. Two 1-D convolutions over the residues produce
//!   values and attention logits per channel; the values are pooled by a softmax over residues
//!   and by a max, and the two vectors go through the feed-forward network. It sees every
//!   residue, not just an average, which is why it beats mean pooling on localization.
//!
//! Heads read either an encoder's output (`[B, T, H]` with special tokens, see
//! [`Head::forward`]) or cached per-residue rows (`[B, L, H]`, residues only, see
//! [`Head::forward_residues`]); both give the same result for the same protein.

use candle_core::{Result, Tensor, D};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::layers::Linear;
use super::params::{Builder, ParamStore};
use crate::kernels::dropout::dropout;
use crate::kernels::ops;

/// Initial standard deviation of a pooler the checkpoint lacks (BERT's `initializer_range`).
const POOLER_STD: f64 = 0.02;

/// How per-token hidden states become one vector per protein.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The first (`[CLS]`/`<cls>`) token, as the reference workflow does.
    Cls,
    /// Mean over residue tokens (special tokens and padding excluded): the ProtTrans
    /// convention, usually better for frozen or lightly tuned encoders.
    Mean,
}

/// Which head architecture sits on the encoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HeadKind {
    /// Dropout + linear on the pooled vector.
    #[default]
    Linear,
    /// Linear -> dropout -> ReLU -> linear on the pooled vector.
    Mlp,
    /// Light Attention (convolutional attention pooling over residues + max pooling + MLP).
    LightAttention,
    /// The reference workflow's head: pooler (dense + tanh on the first token, pretrained
    /// when the checkpoint has one) -> dropout -> linear -> tanh; ignores `pool`.
    Reference,
    /// transformers' *ForSequenceClassification head: dense + tanh on the first token ->
    /// dropout -> linear (BERT's pretrained pooler when the checkpoint has one); ignores
    /// `pool`. Loads and exports as BertForSequenceClassification / EsmForSequenceClassification.
    Pooler,
}

impl HeadKind {
    /// The name `--head` takes (`light-attention`, ...).
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// Feed-forward width `--head-hidden` defaults to: 512 for the mlp head (on all of
    /// DeepLoc 1.0's training data, frozen ESM-2 8M, it scored 67.9% on validation against
    /// 64.4% at width 32; bench/ACCURACY.md rows M1, M2), the Light Attention paper's 32 for
    /// light attention; the other heads have no hidden layer.
    pub fn default_hidden(self) -> usize {
        match self {
            HeadKind::Mlp => 512,
            _ => 32,
        }
    }

    /// Whether the head reads only the first token, through a pooler (dense + tanh), whatever
    /// `pool` says.
    pub fn uses_pooler(self) -> bool {
        matches!(self, HeadKind::Reference | HeadKind::Pooler)
    }

    /// Why this head cannot read cached per-residue embeddings (`--frozen`, `eval --cache`)
    /// with `pool`, if it cannot: the cache holds residues only, no first-token vector.
    pub fn cached_rows_unsupported(self, pool: Pool) -> Option<&'static str> {
        match (self, pool) {
            (HeadKind::Reference, _) => Some(
                "the reference head reads BERT's pooler on the first ([CLS]) token, which cached \
                 residue embeddings do not have: train it by fine-tuning (without --frozen), or \
                 use --frozen with --head linear, mlp or light-attention",
            ),
            (HeadKind::Pooler, _) => Some(
                "the pooler head reads a pooler on the first ([CLS]) token, which cached \
                 residue embeddings do not have: train it by fine-tuning (without --frozen), or \
                 use --frozen with --head linear, mlp or light-attention",
            ),
            (HeadKind::LightAttention, _) | (_, Pool::Mean) => None,
            (_, Pool::Cls) => Some(
                "cached residue embeddings have no [CLS] vector: use --pool mean (or --head \
                 light-attention) with --frozen",
            ),
        }
    }
}

/// Shape of a head.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSpec {
    pub kind: HeadKind,
    pub pool: Pool,
    /// Encoder hidden size (input width).
    pub input_dim: usize,
    /// Name prefix of the encoder's parameters (`bert`, `esm`): the `reference` head's pooler
    /// is `<prefix>.pooler.dense`, its name in Hugging Face `BertModel`/`EsmModel`.
    pub encoder_prefix: &'static str,
    pub num_labels: usize,
    /// Width of the feed-forward layer of `mlp` and `light-attention`.
    pub hidden: usize,
    /// Convolution width (residues) of `light-attention`; odd.
    pub kernel: usize,
    pub dropout: f64,
    /// Also predict membrane-bound vs soluble.
    pub membrane: bool,
}

/// What a head produces.
pub struct HeadOutput {
    /// [B, C] location logits.
    pub logits: Tensor,
    /// [B, 2] soluble/membrane logits, when the head has that output.
    pub membrane: Option<Tensor>,
}

enum Body {
    /// Pooled vector, dropout.
    Pooled,
    Mlp {
        dense: Linear,
    },
    LightAttention {
        values: Linear,
        attention: Linear,
        kernel: usize,
        dense: Linear,
    },
    /// Pooler (dense + tanh on the first token), dropout; with `tanh` (the reference head)
    /// `out` is followed by a tanh.
    Pooler {
        pooler: Linear,
        tanh: bool,
    },
}

/// A classification head (see the module docs). Parameters live under `classifier.` and
/// `membrane_classifier.`; the `linear` kind keeps the Hugging Face names
/// `classifier.weight`/`classifier.bias`. The `reference` kind's linear layer is
/// `classifier.1` (the reference's `Sequential(Dropout, Linear, Tanh)` saves it under that
/// name) and its pooler is the encoder's (`bert.pooler.dense`, see [`Head::pooler_name`]), so
/// a reference `state_dict` maps onto it name for name.
pub struct Head {
    pub spec: HeadSpec,
    body: Body,
    out: Linear,
    membrane: Option<Linear>,
}

/// PyTorch's default `nn.Linear` initialisation has variance 1/(3 fan_in); a normal with the
/// same variance keeps small heads trainable at the same learning rates.
fn torch_std(fan_in: usize) -> f64 {
    (1.0 / (3.0 * fan_in as f64)).sqrt()
}

impl Head {
    /// Builds (or loads, with a strict builder) a head under `root` (the model's root
    /// builder).
    pub fn new(root: &Builder, spec: HeadSpec) -> Result<Self> {
        let b = root.pp("classifier");
        let h = spec.input_dim;
        // Mlp and light attention end in the same hidden layer -> `out` projection.
        let hidden_out = || {
            Linear::new(
                &b.pp("out"),
                spec.hidden,
                spec.num_labels,
                torch_std(spec.hidden),
            )
        };
        let (body, out, features) = match spec.kind {
            HeadKind::Linear => (Body::Pooled, Linear::new(&b, h, spec.num_labels, 0.02)?, h),
            HeadKind::Reference | HeadKind::Pooler => {
                let (pooler, out) = Self::pooler_layout(root, &spec);
                let reference = spec.kind == HeadKind::Reference;
                // The reference uses PyTorch's default `nn.Linear` initialisation;
                // transformers initialises its classifiers with Normal(0, 0.02).
                let std = if reference { torch_std(h) } else { 0.02 };
                (
                    Body::Pooler {
                        pooler: Linear::new(&pooler, h, h, POOLER_STD)?,
                        tanh: reference,
                    },
                    Linear::new(&out, h, spec.num_labels, std)?,
                    h,
                )
            }
            HeadKind::Mlp => (
                Body::Mlp {
                    dense: Linear::new(&b.pp("dense"), h, spec.hidden, torch_std(h))?,
                },
                hidden_out()?,
                spec.hidden,
            ),
            HeadKind::LightAttention => {
                if spec.kernel.is_multiple_of(2) {
                    candle_core::bail!("light-attention kernel must be odd, got {}", spec.kernel);
                }
                let k = spec.kernel * h;
                (
                    Body::LightAttention {
                        values: Linear::new(&b.pp("feature_conv"), k, h, torch_std(k))?,
                        attention: Linear::new(&b.pp("attention_conv"), k, h, torch_std(k))?,
                        kernel: spec.kernel,
                        dense: Linear::new(&b.pp("dense"), 2 * h, spec.hidden, torch_std(2 * h))?,
                    },
                    hidden_out()?,
                    spec.hidden,
                )
            }
        };
        let membrane = if spec.membrane {
            Some(Linear::new(
                &root.pp("membrane_classifier"),
                features,
                2,
                torch_std(features),
            )?)
        } else {
            None
        };
        Ok(Self {
            spec,
            body,
            out,
            membrane,
        })
    }

    /// Where a pooler head's two layers live: the reference's `<prefix>.pooler.dense` and
    /// `classifier.1`; BertForSequenceClassification's `bert.pooler.dense` and `classifier`;
    /// EsmForSequenceClassification's `classifier.dense` and `classifier.out_proj`.
    fn pooler_layout(root: &Builder, spec: &HeadSpec) -> (Builder, Builder) {
        let b = root.pp("classifier");
        let encoder_pooler = || root.pp(spec.encoder_prefix).pp("pooler").pp("dense");
        match (spec.kind, spec.encoder_prefix) {
            (HeadKind::Pooler, "esm") => (b.pp("dense"), b.pp("out_proj")),
            (HeadKind::Pooler, _) => (encoder_pooler(), b),
            _ => (encoder_pooler(), b.pp("1")),
        }
    }

    /// Whether the head's pooler is the encoder's own (`<prefix>.pooler.dense`, part of a
    /// pretrained BertModel/EsmModel checkpoint) rather than a head tensor.
    fn pooler_is_pretrained(spec: &HeadSpec) -> bool {
        spec.kind == HeadKind::Reference
            || (spec.kind == HeadKind::Pooler && spec.encoder_prefix != "esm")
    }

    /// Reads the pooler of a `reference` or (BERT) `pooler` head from the checkpoint in
    /// `store` (or initialises it, with a warning naming the missing tensors) and registers
    /// it as a variable, so that a head built afterwards on a store whose checkpoint was
    /// released finds the pretrained weights. Does nothing for the other kinds, which never
    /// reuse checkpoint tensors.
    pub fn load_pretrained_pooler(store: &ParamStore, spec: &HeadSpec) -> Result<()> {
        if !Self::pooler_is_pretrained(spec) {
            return Ok(());
        }
        let b = Self::pooler_layout(&store.initialising(), spec).0;
        let missing: Vec<String> = ["weight", "bias"]
            .into_iter()
            .filter(|short| !b.contains(short))
            .map(|short| format!("{}.pooler.dense.{short}", spec.encoder_prefix))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                missing = ?missing,
                "the checkpoint has no pretrained pooler for the {} head: initialising it \
                 from scratch (Normal(0, {POOLER_STD}) weight, zero bias)",
                spec.kind.name()
            );
        }
        let h = spec.input_dim;
        Linear::new(&b, h, h, POOLER_STD)?;
        Ok(())
    }

    /// A copy outside the autograd graph, for inference.
    pub fn detached(&self) -> Self {
        let body = match &self.body {
            Body::Pooled => Body::Pooled,
            Body::Pooler { pooler, tanh } => Body::Pooler {
                pooler: pooler.detached(),
                tanh: *tanh,
            },
            Body::Mlp { dense } => Body::Mlp {
                dense: dense.detached(),
            },
            Body::LightAttention {
                values,
                attention,
                kernel,
                dense,
            } => Body::LightAttention {
                values: values.detached(),
                attention: attention.detached(),
                kernel: *kernel,
                dense: dense.detached(),
            },
        };
        Self {
            spec: self.spec.clone(),
            body,
            out: self.out.detached(),
            membrane: self.membrane.as_ref().map(Linear::detached),
        }
    }

    /// On an encoder's output: `hidden` [B, T, H] (leading special token, residues, trailing
    /// special, padding) and `residue_mask` [B, T].
    pub fn forward(
        &self,
        hidden: &Tensor,
        residue_mask: &Tensor,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<HeadOutput> {
        match self.body {
            Body::LightAttention { .. } => {
                // Residues start after the leading special token; zero everything else so the
                // convolutions see the same zero padding as on cached rows.
                let t = hidden.dim(1)?;
                let m = residue_mask.to_dtype(hidden.dtype())?;
                let x = hidden
                    .broadcast_mul(&m.unsqueeze(2)?)?
                    .narrow(1, 1, t - 1)?;
                self.forward_residues(&x, &m.narrow(1, 1, t - 1)?, rng)
            }
            Body::Pooler { ref pooler, tanh } => {
                // BertPooler: dense + tanh on the first token's state, whatever `pool` says.
                let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
                let pooled = pooler.forward(&first)?.tanh()?;
                let features = dropout(&pooled, self.spec.dropout, rng)?;
                let out = self.outputs(&features)?;
                Ok(HeadOutput {
                    logits: if tanh { out.logits.tanh()? } else { out.logits },
                    membrane: out.membrane,
                })
            }
            _ => {
                let pooled = pool(hidden, residue_mask, self.spec.pool)?;
                self.pooled_outputs(&pooled, rng)
            }
        }
    }

    /// On per-residue rows: `x` [B, L, H] (residues first, zeros after) and `mask` [B, L].
    pub fn forward_residues(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<HeadOutput> {
        match &self.body {
            Body::LightAttention {
                values,
                attention,
                kernel,
                dense,
            } => {
                let p = self.spec.dropout;
                let cols = im2col(x, *kernel)?;
                let v = dropout(&values.forward(&cols)?, p, rng.as_deref_mut())?; // [B, L, H]
                let a = attention.forward(&cols)?;
                // Padding gets a large finite negative (not -inf: 0 x -inf is NaN).
                let neg = ((mask - 1.0)? * 1e4)?.unsqueeze(2)?;
                let a = a.broadcast_add(&neg)?.transpose(1, 2)?.contiguous()?; // [B, H, L]
                let weights = ops::softmax_last_dim(&a)?;
                let vt = v.transpose(1, 2)?.contiguous()?; // [B, H, L]
                let attended = (vt * weights)?.sum(D::Minus1)?; // [B, H]
                let maxed = v.broadcast_add(&neg)?.max(1)?; // [B, H]
                let pooled = Tensor::cat(&[attended, maxed], 1)?;
                let h = dense.forward(&pooled)?;
                let h = dropout(&h, p, rng)?.relu()?;
                self.outputs(&h)
            }
            _ => {
                if let Some(why) = self.spec.kind.cached_rows_unsupported(self.spec.pool) {
                    candle_core::bail!("{why}");
                }
                let pooled = ops::masked_mean(x, mask)?;
                self.pooled_outputs(&pooled, rng)
            }
        }
    }

    fn pooled_outputs(&self, pooled: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<HeadOutput> {
        let p = self.spec.dropout;
        match &self.body {
            Body::Mlp { dense } => {
                let h = dropout(&dense.forward(pooled)?, p, rng)?.relu()?;
                self.outputs(&h)
            }
            _ => self.outputs(&dropout(pooled, p, rng)?),
        }
    }

    fn outputs(&self, features: &Tensor) -> Result<HeadOutput> {
        Ok(HeadOutput {
            logits: self.out.forward(features)?,
            membrane: self
                .membrane
                .as_ref()
                .map(|m| m.forward(features))
                .transpose()?,
        })
    }
}

/// "Same" 1-D convolution input as a matrix: [B, L, H] -> [B, L, k*H], row l holding
/// residues l-k/2 ..= l+k/2 (zeros beyond the ends). A linear layer on it is a convolution
/// whose weight is stored as [C_out, k*H] (offset-major); one large GEMM is both faster on a
/// CPU and simpler to differentiate than a direct convolution.
pub fn im2col(x: &Tensor, kernel: usize) -> Result<Tensor> {
    if crate::kernels::fused_on(x.device()) && x.dtype() == candle_core::DType::F32 {
        return ops::im2col(x, kernel);
    }
    let l = x.dim(1)?;
    let half = kernel / 2;
    let padded = x.pad_with_zeros(1, half, kernel - 1 - half)?;
    let cols = (0..kernel)
        .map(|j| padded.narrow(1, j, l))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&cols, 2)
}

/// Pools `hidden` [B, T, H] with `residue_mask` [B, T] (1.0 on residues).
pub fn pool(hidden: &Tensor, residue_mask: &Tensor, pool: Pool) -> Result<Tensor> {
    match pool {
        Pool::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
        Pool::Mean => ops::masked_mean(hidden, residue_mask),
    }
}

/// Dropout + linear layer (`classifier.weight` [C, H], `classifier.bias` [C]): the `linear`
/// head's classifier, kept as a building block for tests and tools (the reference workflow's
/// own head, with pooler and tanh, is [`HeadKind::Reference`]).
pub struct ClassifierHead {
    pub dropout: f64,
    pub linear: Linear,
}

impl ClassifierHead {
    pub fn new(b: &Builder, hidden: usize, num_labels: usize, dropout: f64) -> Result<Self> {
        Ok(Self {
            dropout,
            linear: Linear::new(b, hidden, num_labels, 0.02)?,
        })
    }

    /// `pooled` [B, H] -> logits [B, C]; `rng` enables dropout (training).
    pub fn forward(&self, pooled: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        self.linear.forward(&dropout(pooled, self.dropout, rng)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn im2col_shifts_rows_with_zero_padding() {
        // One protein, 3 residues, width 1: values 1, 2, 3.
        let x = Tensor::new(&[[[1f32], [2.], [3.]]], &Device::Cpu).unwrap();
        let cols = im2col(&x, 3).unwrap().squeeze(0).unwrap();
        let got: Vec<Vec<f32>> = cols.to_vec2().unwrap();
        assert_eq!(
            got,
            vec![vec![0., 1., 2.], vec![1., 2., 3.], vec![2., 3., 0.]]
        );
    }

    fn spec(kind: HeadKind) -> HeadSpec {
        HeadSpec {
            kind,
            pool: Pool::Mean,
            input_dim: 6,
            encoder_prefix: "bert",
            num_labels: 3,
            hidden: 5,
            kernel: 3,
            dropout: 0.0,
            membrane: true,
        }
    }

    /// The encoder-output path and the cached-rows path agree: the head sees the same
    /// residues whether or not special tokens and extra padding surround them.
    #[test]
    fn encoder_and_residue_paths_agree() {
        let dev = Device::Cpu;
        for kind in [HeadKind::Mlp, HeadKind::LightAttention, HeadKind::Linear] {
            let store = crate::model::params::ParamStore::new(
                Default::default(),
                "test",
                7,
                &dev,
                DType::F32,
            );
            let head = Head::new(&store.initialising(), spec(kind)).unwrap();
            // Residues r (2 proteins: 3 and 2 residues) at [B, L=3, H=6].
            let r = Tensor::randn(0f32, 1.0, (2, 3, 6), &dev).unwrap();
            let mask = Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], &dev).unwrap();
            let r = r.broadcast_mul(&mask.unsqueeze(2).unwrap()).unwrap();
            // Encoder layout: [CLS] residues [EOS] pad, with junk in the special positions.
            let junk = Tensor::ones((2, 1, 6), DType::F32, &dev).unwrap();
            let hidden = Tensor::cat(&[&junk, &r, &junk], 1).unwrap();
            let residue_mask =
                Tensor::new(&[[0f32, 1., 1., 1., 0.], [0., 1., 1., 0., 0.]], &dev).unwrap();
            let a = head.forward(&hidden, &residue_mask, None).unwrap();
            let b = head.forward_residues(&r, &mask, None).unwrap();
            let diff = (a.logits - b.logits)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{kind:?}");
            let diff = (a.membrane.unwrap() - b.membrane.unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{kind:?}");
        }
    }

    /// The reference head: tanh(linear(tanh(pooler(first token)))) whatever `pool` says, its
    /// parameters under the reference's names; cached residue rows are refused.
    #[test]
    fn reference_head_is_pooler_linear_tanh_on_the_first_token() {
        let dev = Device::Cpu;
        let store =
            crate::model::params::ParamStore::new(Default::default(), "test", 3, &dev, DType::F32);
        let head = Head::new(&store.initialising(), spec(HeadKind::Reference)).unwrap();
        let names: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
        for want in [
            "bert.pooler.dense.weight",
            "bert.pooler.dense.bias",
            "classifier.1.weight",
            "classifier.1.bias",
            "membrane_classifier.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        let hidden = (Tensor::randn(0f32, 1.0, (2, 4, 6), &dev).unwrap() * 3.0).unwrap();
        let residue_mask = Tensor::new(&[[0f32, 1., 1., 0.], [0., 1., 0., 0.]], &dev).unwrap();
        let got = head.forward(&hidden, &residue_mask, None).unwrap();
        let Body::Pooler { pooler, .. } = &head.body else {
            panic!("not a reference body")
        };
        let first = hidden.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let pooled = pooler.forward(&first).unwrap().tanh().unwrap();
        let want = head.out.forward(&pooled).unwrap().tanh().unwrap();
        let diff = (&got.logits - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "logits differ by {diff}");
        let logits: Vec<Vec<f32>> = got.logits.to_vec2().unwrap();
        assert!(logits.iter().flatten().all(|x| x.abs() <= 1.0));
        // Residues other than the first token do not matter.
        let other = Tensor::cat(
            &[
                hidden.narrow(1, 0, 1).unwrap(),
                Tensor::zeros((2, 3, 6), DType::F32, &dev).unwrap(),
            ],
            1,
        )
        .unwrap();
        let again = head.forward(&other, &residue_mask, None).unwrap();
        let again: Vec<Vec<f32>> = again.logits.to_vec2().unwrap();
        assert_eq!(again, logits);
        let err = head
            .forward_residues(&hidden, &residue_mask, None)
            .err()
            .expect("cached rows must be refused")
            .to_string();
        assert!(err.contains("pooler"), "{err}");
    }
}
