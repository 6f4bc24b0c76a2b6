//! Model architectures: encoders (BERT, ESM-2), classification heads, and loading/saving
//! whole models. The CPU compute under them lives in [`crate::kernels`].
//!
//! - [`config`]: the encoder's `config.json`, typed; [`loader`]: reading checkpoints;
//!   [`params`]: the parameter store; [`layers`]: linear, LayerNorm, embedding layers;
//!   [`lora`]: low-rank adapters; [`precision`]: fp32 or bf16 compute;
//! - [`bert`], [`esm`]: the differentiable encoders; [`packed`]: their inference-only forward
//!   on packed tokens, and where the choice between the two is made; [`encoder`]: either
//!   encoder behind one type;
//! - [`base`]: a loaded base model; [`head`]: classifier heads; [`task`]: a run's task
//!   settings; [`classifier`]: encoder + heads, run directories; [`import`]: models
//!   fine-tuned elsewhere (transformers classifiers, the reference's `model.pth`);
//!   [`export`]: Hugging Face directories for transformers;
//!   [`answer`]: how outputs become answers.
//!
//! A *base model* is a pretrained encoder (a Hugging Face directory or hub id) or
//! `scratch:SIZE`; a *run directory* is what `protloc train` writes: the encoder plus a
//! classifier head, with labels and preprocessing settings in `config.json`.
//!
//! An *ensemble* run directory (`protloc train --frozen --ensemble N` or `--folds N`) holds
//! the encoder once and N heads: member k's tensors are named `ensemble.{k}.classifier.*`
//! (and `ensemble.{k}.membrane_classifier.*`) instead of `classifier.*`, and the `"protloc"`
//! section of `config.json` has `"ensemble": N` plus a `"members"` list (seed, held-out
//! partition, validation metrics and multi-label thresholds of each). Inference runs the
//! encoder once and averages the members' probabilities ([`SequenceClassifier::combine`]).
//! A single model has neither key (older run directories load as single models).

pub mod answer;
pub mod base;
pub mod bert;
pub mod classifier;
pub mod config;
pub mod encoder;
pub mod esm;
pub mod export;
pub mod head;
pub mod import;
pub mod layers;
pub mod loader;
pub mod lora;
pub mod packed;
pub mod params;
pub mod precision;
pub mod task;

pub use answer::{Answer, AnswerRule, MembraneAnswer};
pub use base::{load_base, BaseModel, Purpose};
pub use classifier::{BatchProbabilities, SequenceClassifier};
pub use config::{Arch, EncoderConfig};
pub use encoder::{scratch_config, Encoder};
pub use head::{ClassifierHead, Head, HeadKind, HeadOutput, HeadSpec, Pool};
pub use params::ParamStore;
pub use precision::Precision;
pub(crate) use task::{default_head_hidden, default_la_kernel};
pub use task::{is_head_param, is_member_param, member_prefix, MemberInfo, TaskConfig};
