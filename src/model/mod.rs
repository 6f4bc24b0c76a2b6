//! Encoders (BERT, ESM-2), classification heads, and loading/saving whole models.
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
pub mod bert;
pub mod config;
pub mod dropout;
pub mod esm;
pub mod fused_attention;
pub mod head;
pub mod head_gemm;
pub mod kernels;
pub mod loader;
pub mod lora;
pub mod nn;
pub mod ops;
pub mod params;
pub mod rotary;
#[cfg(test)]
pub(crate) mod test_util;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use answer::{Answer, AnswerRule, MembraneAnswer};
pub use config::{Arch, EncoderConfig};
pub use head::{ClassifierHead, Head, HeadKind, HeadOutput, HeadSpec, Pool};
pub use params::ParamStore;

use crate::tokenize::{Batch, Tokenizer, Truncation};

/// A BERT or ESM-2 encoder.
pub enum Encoder {
    Bert(bert::Bert),
    Esm(esm::Esm),
}

impl Encoder {
    pub fn new(b: &params::Builder, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let arch = cfg.arch().map_err(candle_core::Error::msg)?;
        let b = b.pp(arch.prefix());
        Ok(match arch {
            Arch::Bert => Encoder::Bert(bert::Bert::new(&b, cfg)?),
            Arch::Esm => Encoder::Esm(esm::Esm::new(&b, cfg)?),
        })
    }

    /// Last hidden states [B, T, H]. `rng` enables dropout (training).
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Encoder::Bert(m) => m.forward(ids, attention_mask, rng),
            Encoder::Esm(m) => m.forward(ids, attention_mask, rng),
        }
    }

    /// Adds LoRA adapters (see [`lora`]) with parameters from `b` (the model's root builder).
    pub fn attach_lora(&mut self, b: &params::Builder, cfg: &lora::LoraConfig) -> Result<()> {
        let arch = self.config().arch().map_err(anyhow::Error::msg)?;
        let b = b.pp(arch.prefix());
        let layers = match self {
            Encoder::Bert(m) => m.layer_linears(),
            Encoder::Esm(m) => m.layer_linears(),
        };
        Ok(cfg.attach(&b, layers)?)
    }

    /// Hidden states [B, T, H] after the embeddings and the first `until` layers (before
    /// ESM-2's final LayerNorm, which [`Self::forward_from`] applies). What
    /// `train --train-top-layers` caches.
    pub fn forward_until(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        until: usize,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Encoder::Bert(m) => m.forward_until(ids, attention_mask, until, rng),
            Encoder::Esm(m) => m.forward_until(ids, attention_mask, until, rng),
        }
    }

    /// The rest of the encoder from layer `from` on, applied to the states that
    /// [`Self::forward_until`] gave for `from`: the last hidden states [B, T, H].
    pub fn forward_from(
        &self,
        x: &Tensor,
        attention_mask: &Tensor,
        from: usize,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Encoder::Bert(m) => m.forward_from(x, attention_mask, from, rng),
            Encoder::Esm(m) => m.forward_from(x, attention_mask, from, rng),
        }
    }

    /// Freezes the embeddings and the first `n` layers (they get no gradient).
    pub fn freeze(&mut self, n: usize) {
        match self {
            Encoder::Bert(m) => m.freeze(n),
            Encoder::Esm(m) => m.freeze(n),
        }
    }

    pub fn config(&self) -> &EncoderConfig {
        match self {
            Encoder::Bert(m) => m.config(),
            Encoder::Esm(m) => m.config(),
        }
    }

    /// The same encoder outside the autograd graph (shared weights), for inference.
    pub fn detached(&self) -> Self {
        match self {
            Encoder::Bert(m) => Encoder::Bert(m.detached()),
            Encoder::Esm(m) => Encoder::Esm(m.detached()),
        }
    }

    /// Mean of the last hidden states over residue tokens: [B, H] (inference).
    pub fn embed(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let hidden = self
            .detached()
            .forward(&batch.ids, &batch.attention_mask, None)?;
        ops::masked_mean(&hidden, &batch.residue_mask)
    }
}

/// Encoder sizes for `scratch:SIZE` (ProtBERT-style BERT from random initialisation).
pub fn scratch_config(size: &str) -> Result<EncoderConfig> {
    let (hidden, layers, heads) = match size {
        "tiny" => (64, 2, 4),
        "small" => (128, 4, 4),
        "base" => (256, 6, 8),
        other => bail!(
            "unknown scratch size {other:?} (choose scratch:tiny, scratch:small or scratch:base)"
        ),
    };
    Ok(EncoderConfig {
        model_type: "bert".into(),
        vocab_size: crate::tokenize::PROTBERT_VOCAB.len(),
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: hidden * 4,
        max_position_embeddings: 1026,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.0,
        pad_token_id: Some(0),
        type_vocab_size: 2,
        hidden_act: "gelu".into(),
        position_embedding_type: "absolute".into(),
        initializer_range: 0.02,
        token_dropout: false,
        mask_token_id: None,
        emb_layer_norm_before: None,
    })
}

/// An encoder ready to use or fine-tune, with its tokenizer and parameters.
pub struct BaseModel {
    pub cfg: EncoderConfig,
    pub tokenizer: Tokenizer,
    pub store: ParamStore,
    pub encoder: Encoder,
    /// Where it came from (path, hub id or `scratch:SIZE`), for provenance.
    pub source: String,
}

/// What a loaded model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Fine-tuning: every parameter is a trainable variable.
    Training,
    /// Inference only (embed, predict, eval, serve): the encoder layers' weights are frozen
    /// and column-major, which the inference GEMM reads fastest
    /// ([`ParamStore::for_inference`]). Such a model can still be saved, not trained.
    Inference,
}

fn new_store(
    source: HashMap<String, Tensor>,
    source_name: String,
    seed: u64,
    device: &Device,
    purpose: Purpose,
) -> ParamStore {
    let store = ParamStore::new(source, source_name, seed, device, DType::F32);
    match purpose {
        Purpose::Training => store,
        Purpose::Inference => store.for_inference(),
    }
}

/// Loads a base model (`scratch:SIZE`, a local HF directory or a hub id). Parameters the
/// encoder needs must all be in the checkpoint; extra tensors (pretraining heads) are ignored.
pub fn load_base(spec: &str, seed: u64, device: &Device, purpose: Purpose) -> Result<BaseModel> {
    if let Some(size) = spec.strip_prefix("scratch:") {
        let cfg = scratch_config(size)?;
        let store = new_store(Default::default(), spec.into(), seed, device, purpose);
        let encoder = Encoder::new(&store.initialising(), &cfg)?;
        return Ok(BaseModel {
            cfg,
            tokenizer: Tokenizer::protbert_default(),
            store,
            encoder,
            source: spec.into(),
        });
    }
    let files = loader::resolve(spec)?;
    let (cfg, tokenizer, store, encoder) = load_encoder(&files, seed, device, purpose)?;
    tracing::debug!(unused = ?store.unused_source_names(), "tensors not used by the encoder");
    Ok(BaseModel {
        cfg,
        tokenizer,
        store,
        encoder,
        source: spec.into(),
    })
}

/// Reads config, vocabulary and weights of a model directory and builds its encoder; every
/// encoder tensor must be in the checkpoint. The store keeps the remaining checkpoint tensors
/// (e.g. a classifier) until `release_source`.
fn load_encoder(
    files: &loader::ModelFiles,
    seed: u64,
    device: &Device,
    purpose: Purpose,
) -> Result<(EncoderConfig, Tokenizer, ParamStore, Encoder)> {
    let cfg = loader::read_config(&files.config)?;
    let tokenizer = Tokenizer::from_file(&files.vocab)?;
    check_vocab(&cfg, &tokenizer, &files.vocab)?;
    let arch = cfg.arch().map_err(anyhow::Error::msg)?;
    let tensors = loader::read_weights(&files.weights, arch, device)?;
    let source = files.weights.display().to_string();
    let store = new_store(tensors, source, seed, device, purpose);
    let encoder = Encoder::new(&store.strict(), &cfg)?;
    Ok((cfg, tokenizer, store, encoder))
}

fn check_vocab(cfg: &EncoderConfig, tok: &Tokenizer, path: &Path) -> Result<()> {
    if tok.vocab_size() > cfg.vocab_size {
        bail!(
            "{}: {} tokens but config.json says vocab_size {}",
            path.display(),
            tok.vocab_size(),
            cfg.vocab_size
        );
    }
    Ok(())
}

/// Fine-tuning settings stored in a run directory's `config.json` under `"protloc"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskConfig {
    pub labels: Vec<String>,
    pub pool: Pool,
    pub truncate: Truncation,
    pub max_residues: usize,
    pub head_dropout: f64,
    /// The base model the run started from.
    pub base_model: String,
    pub protloc_version: String,
    /// Head architecture (older run directories have the linear head).
    #[serde(default)]
    pub head: HeadKind,
    /// Feed-forward width of the mlp and light-attention heads.
    #[serde(default = "default_head_hidden")]
    pub head_hidden: usize,
    /// Convolution width of the light-attention head.
    #[serde(default = "default_la_kernel")]
    pub la_kernel: usize,
    /// The head also predicts membrane-bound vs soluble.
    #[serde(default)]
    pub membrane: bool,
    /// Multi-label (sigmoid per location) instead of one location per protein.
    #[serde(default)]
    pub multi_label: bool,
    /// Per-location decision thresholds of a multi-label model (tuned on validation).
    #[serde(default)]
    pub thresholds: Option<Vec<f32>>,
    /// The encoder was kept frozen (trained on cached embeddings).
    #[serde(default)]
    pub frozen_encoder: bool,
    /// Heads averaged at inference: 1 for a single model, N for an ensemble (member k's
    /// tensors under `ensemble.{k}.`). Not written for a single model; absent means 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub ensemble: usize,
    /// How each member of an ensemble was trained and validated, in member order (empty for
    /// a single model). A multi-label ensemble decides with `thresholds`, the mean of the
    /// members' own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberInfo>,
}

/// One member of an ensemble: how it was trained and how it did on its own validation split
/// (at its best epoch, the one kept).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberInfo {
    /// Seed of its initialisation, shuffling and dropout, and (without `--folds`) of its
    /// stratified validation split.
    pub seed: u64,
    /// The homology partition it held out for validation (`--folds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout_partition: Option<u32>,
    pub train_records: usize,
    pub val_records: usize,
    /// The epoch whose weights were kept (best validation accuracy; the last without a
    /// validation split).
    pub best_epoch: usize,
    pub val_accuracy: Option<f64>,
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_membrane_accuracy: Option<f64>,
    /// Its multi-label thresholds, tuned on its validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<f32>>,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// Name prefix of member `k`'s head tensors in a model with `n` heads: none for a single
/// model (`classifier.*`, the Hugging Face names), `ensemble.{k}` for an ensemble.
pub fn member_prefix(k: usize, n: usize) -> Option<String> {
    (n > 1).then(|| format!("ensemble.{k}"))
}

/// Whether `name` is a head parameter (of a single model or of any ensemble member), not an
/// encoder one.
pub fn is_head_param(name: &str) -> bool {
    name.starts_with("classifier.")
        || name.starts_with("membrane_classifier.")
        || name.starts_with("ensemble.")
}

/// Whether `name` is a parameter of member `k`'s head in a model with `n` heads.
pub fn is_member_param(name: &str, k: usize, n: usize) -> bool {
    match member_prefix(k, n) {
        None => is_head_param(name),
        Some(p) => name
            .strip_prefix(p.as_str())
            .is_some_and(|rest| rest.starts_with('.')),
    }
}

pub(crate) fn default_head_hidden() -> usize {
    32
}

pub(crate) fn default_la_kernel() -> usize {
    9
}

impl TaskConfig {
    /// The head's shape for the encoder `cfg`.
    pub fn head_spec(&self, cfg: &EncoderConfig) -> Result<HeadSpec> {
        Ok(HeadSpec {
            kind: self.head,
            pool: self.pool,
            input_dim: cfg.hidden_size,
            encoder_prefix: cfg.arch().map_err(anyhow::Error::msg)?.prefix(),
            num_labels: self.labels.len(),
            hidden: self.head_hidden,
            kernel: self.la_kernel,
            dropout: self.head_dropout,
            membrane: self.membrane,
        })
    }

    /// Defaults for a task over `labels` with the reference head.
    pub fn new(labels: Vec<String>, base_model: &str) -> Self {
        Self {
            labels,
            pool: Pool::Cls,
            truncate: Truncation::HeadTail,
            max_residues: 510,
            head_dropout: 0.1,
            base_model: base_model.into(),
            protloc_version: env!("CARGO_PKG_VERSION").into(),
            head: HeadKind::Linear,
            head_hidden: default_head_hidden(),
            la_kernel: default_la_kernel(),
            membrane: false,
            multi_label: false,
            thresholds: None,
            frozen_encoder: false,
            ensemble: 1,
            members: Vec::new(),
        }
    }
}

/// Probabilities of one batch (see [`SequenceClassifier::combine`]).
pub struct BatchProbabilities {
    /// [B, C] location probabilities: softmax, or per-location sigmoids for a multi-label
    /// model; an ensemble's are the mean of its members'.
    pub location: Tensor,
    /// [B] probability of being membrane-bound (members' mean), for heads with that output.
    pub membrane: Option<Tensor>,
    /// [B, C] location logits; an ensemble's are the mean of its members' (reported as raw
    /// scores only: the probabilities are not their softmax).
    pub logits: Tensor,
}

/// Encoder + classifier head(s) + everything needed to preprocess input the same way as in
/// training.
pub struct SequenceClassifier {
    pub base: BaseModel,
    /// One head, or the `task.ensemble` members of an ensemble, in member order.
    pub heads: Vec<Head>,
    pub task: TaskConfig,
}

impl SequenceClassifier {
    /// Puts `task.ensemble` freshly initialised heads on `base`, drawn one after another
    /// from the store's RNG (see [`Self::new_ensemble`] for one seed per member).
    pub fn new(base: BaseModel, task: TaskConfig) -> Result<Self> {
        Self::build(base, task, None)
    }

    /// An ensemble of `seeds.len()` (= `task.ensemble`) fresh heads on `base`; member k is
    /// initialised from `seeds[k]`, as a single model's head would be in a fresh store with
    /// that seed.
    pub fn new_ensemble(base: BaseModel, task: TaskConfig, seeds: &[u64]) -> Result<Self> {
        if seeds.len() != task.ensemble {
            bail!(
                "{} member seeds for an ensemble of {}",
                seeds.len(),
                task.ensemble
            );
        }
        Self::build(base, task, Some(seeds))
    }

    fn build(base: BaseModel, task: TaskConfig, seeds: Option<&[u64]>) -> Result<Self> {
        if task.ensemble == 0 {
            bail!("an ensemble needs at least one member");
        }
        // The new head starts from scratch: drop the checkpoint's remaining tensors first, or
        // a pretrained classifier that happens to share a name and shape (e.g. the
        // `classifier.dense` of an *ForSequenceClassification checkpoint) would be reused.
        // The one deliberate exception: the reference head's pooler is part of the pretrained
        // BERT (`bert.pooler.dense`), so it is read before the checkpoint goes.
        let spec = task.head_spec(&base.cfg)?;
        Head::load_pretrained_pooler(&base.store, &spec)?;
        base.store.release_source();
        let heads = (0..task.ensemble)
            .map(|k| {
                if let Some(seeds) = seeds {
                    base.store.reseed(seeds[k]);
                }
                Head::new(
                    &member_builder(base.store.initialising(), k, task.ensemble),
                    spec.clone(),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { base, heads, task })
    }

    /// Heads averaged at inference (1 for a single model).
    pub fn members(&self) -> usize {
        self.heads.len()
    }

    /// How this model's outputs become its answers (see [`answer`]).
    pub fn answer_rule(&self) -> AnswerRule {
        AnswerRule::for_task(&self.task)
    }

    /// Tokenizes `sequence` with the truncation this model was trained with.
    pub fn encode(&self, sequence: &str) -> crate::tokenize::Encoded {
        self.base
            .tokenizer
            .encode(sequence, self.task.max_residues, self.task.truncate)
    }

    /// Location logits [B, C]; `rng` enables dropout (training).
    pub fn forward(
        &self,
        batch: &Batch,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        Ok(self.forward_all(batch, rng)?.logits)
    }

    /// The head of a single model (fine-tuning trains one).
    pub fn head(&self) -> candle_core::Result<&Head> {
        match self.heads.as_slice() {
            [head] => Ok(head),
            heads => candle_core::bail!(
                "this is an ensemble of {} heads, not a single model",
                heads.len()
            ),
        }
    }

    /// Every output of the head (location logits and, if present, membrane logits) of a
    /// single model, for training.
    pub fn forward_all(
        &self,
        batch: &Batch,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<HeadOutput> {
        let head = self.head()?;
        let hidden =
            self.base
                .encoder
                .forward(&batch.ids, &batch.attention_mask, rng.as_deref_mut())?;
        head.forward(&hidden, &batch.residue_mask, rng)
    }

    /// Class probabilities [B, C] (inference): softmax, or per-location sigmoids for a
    /// multi-label model (an ensemble's: its members' mean).
    pub fn predict_proba(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        Ok(self.inference_probabilities(batch)?.location)
    }

    /// Location probabilities of one head from its logits, as this model's task defines them.
    pub fn probabilities(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        if self.task.multi_label {
            candle_nn::ops::sigmoid(logits)
        } else {
            ops::softmax_last_dim(logits)
        }
    }

    /// Probabilities of a tokenized batch (inference): the encoder runs once, then every head.
    /// Runs on detached views of the weights: ops on trainable variables record their
    /// inputs, which would keep every activation of the forward pass alive until its end
    /// (gigabytes for long proteins).
    pub fn inference_probabilities(
        &self,
        batch: &Batch,
    ) -> candle_core::Result<BatchProbabilities> {
        let encoder = self.base.encoder.detached();
        let hidden = encoder.forward(&batch.ids, &batch.attention_mask, None)?;
        self.hidden_probabilities(&hidden, &batch.residue_mask, 0..self.members())
    }

    /// Probabilities from the encoder's output (`hidden` [B, T, H] with special tokens,
    /// `residue_mask` [B, T]; see [`Head::forward`]) for the heads `members`.
    pub fn hidden_probabilities(
        &self,
        hidden: &Tensor,
        residue_mask: &Tensor,
        members: std::ops::Range<usize>,
    ) -> candle_core::Result<BatchProbabilities> {
        let outputs = self.heads[members]
            .iter()
            .map(|h| h.detached().forward(hidden, residue_mask, None))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.combine(&outputs)
    }

    /// Probabilities from cached per-residue rows (`x` [B, L, H], `mask` [B, L]; see
    /// [`Head::forward_residues`]) for the heads `members` (all of them: `0..self.members()`).
    pub fn residue_probabilities(
        &self,
        x: &Tensor,
        mask: &Tensor,
        members: std::ops::Range<usize>,
    ) -> candle_core::Result<BatchProbabilities> {
        let outputs = self.heads[members]
            .iter()
            .map(|h| h.detached().forward_residues(x, mask, None))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.combine(&outputs)
    }

    /// The one place head outputs become probabilities: each head's location probabilities
    /// ([`Self::probabilities`]) and P(membrane) (softmax of its membrane logits), averaged
    /// over the heads (an ensemble's members; a single head's are returned as they are).
    pub fn combine(&self, outputs: &[HeadOutput]) -> candle_core::Result<BatchProbabilities> {
        let mean = |ts: Vec<Tensor>| -> candle_core::Result<Tensor> {
            match ts.len() {
                0 => candle_core::bail!("no head outputs to combine"),
                1 => Ok(ts.into_iter().next().expect("one")),
                _ => Tensor::stack(&ts, 0)?.mean(0),
            }
        };
        let location = outputs
            .iter()
            .map(|o| self.probabilities(&o.logits))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let membrane = outputs
            .iter()
            .map(|o| {
                o.membrane
                    .as_ref()
                    .map(|m| ops::softmax_last_dim(m)?.narrow(1, 1, 1)?.squeeze(1))
                    .transpose()
            })
            .collect::<candle_core::Result<Option<Vec<_>>>>()?;
        Ok(BatchProbabilities {
            location: mean(location)?,
            membrane: membrane.map(mean).transpose()?,
            logits: mean(outputs.iter().map(|o| o.logits.clone()).collect())?,
        })
    }

    /// Loads a run directory written by `protloc train`, for inference ([`Purpose::Inference`]:
    /// it can be saved again, not trained further).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let files = loader::from_dir(dir)?;
        let text = std::fs::read_to_string(&files.config)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", files.config.display()))?;
        let task: TaskConfig = match value.get("protloc") {
            Some(v) => serde_json::from_value(v.clone())
                .with_context(|| format!("{}: invalid \"protloc\" section", files.config.display()))?,
            None => bail!(
                "{}: not a protloc run directory (config.json has no \"protloc\" section); fine-tune one with `protloc train`",
                dir.display()
            ),
        };
        let n = task.ensemble;
        if n == 0 || !(task.members.is_empty() || task.members.len() == n) {
            bail!(
                "{}: invalid ensemble ({n} heads, {} member records)",
                files.config.display(),
                task.members.len()
            );
        }
        if let Some(th) = task
            .thresholds
            .as_ref()
            .filter(|t| t.len() != task.labels.len())
        {
            bail!(
                "{}: {} multi-label thresholds for {} labels",
                files.config.display(),
                th.len(),
                task.labels.len()
            );
        }
        let (cfg, tokenizer, store, encoder) = load_encoder(&files, 0, device, Purpose::Inference)?;
        let spec = task.head_spec(&cfg)?;
        let heads = (0..n)
            .map(|k| Head::new(&member_builder(store.strict(), k, n), spec.clone()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        store.release_source();
        let base = BaseModel {
            cfg,
            tokenizer,
            store,
            encoder,
            source: dir.display().to_string(),
        };
        Ok(Self { base, heads, task })
    }

    /// With LoRA adapters, also writes them alone (`adapter_model.safetensors`: the
    /// `*.lora_A.weight` / `*.lora_B.weight` tensors, plus the head's) and
    /// `adapter_config.json` (PEFT's field names: `r`, `lora_alpha`, `target_modules`, ...):
    /// a few MB that rebuild this model on top of its base encoder. `model.safetensors`
    /// already holds the adapters merged in.
    fn save_adapters(&self, dir: &Path) -> Result<()> {
        let (mut tensors, scales) = self.base.store.adapter_tensors();
        if tensors.is_empty() {
            return Ok(());
        }
        let all = self.base.store.tensors();
        tensors.extend(all.into_iter().filter(|(n, _)| is_head_param(n)));
        let mut modules: Vec<&str> = scales
            .keys()
            .filter_map(|p| p.split(".encoder.layer.").nth(1))
            .filter_map(|rest| rest.split_once('.').map(|(_, path)| path))
            .collect();
        modules.sort();
        modules.dedup();
        let rank = tensors
            .iter()
            .find(|(n, _)| n.ends_with(".lora_A.weight"))
            .map(|(_, t)| t.dim(0))
            .transpose()?
            .unwrap_or(0);
        let scale = scales.values().next().copied().unwrap_or(1.0);
        let config = serde_json::json!({
            "peft_type": "LORA",
            "base_model_name_or_path": self.task.base_model,
            "r": rank,
            "lora_alpha": scale * rank as f64,
            "target_modules": modules,
            "adapted_layers": scales.keys().collect::<Vec<_>>(),
            "bias": "none",
            "merged_into": "model.safetensors",
        });
        crate::artifacts::write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        crate::artifacts::save_safetensors_atomic(&dir.join("adapter_model.safetensors"), &tensors)
    }

    /// Writes `config.json`, `vocab.txt` and `model.safetensors` into `dir` atomically (every
    /// head of an ensemble; see the module docs).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut config = serde_json::to_value(&self.base.cfg)?;
        let obj = config.as_object_mut().context("config is an object")?;
        let id2label: serde_json::Map<String, serde_json::Value> = self
            .task
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.clone().into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = self
            .task
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i.into()))
            .collect();
        obj.insert(
            "architectures".into(),
            serde_json::json!(["ProtlocForSequenceClassification"]),
        );
        obj.insert("num_labels".into(), self.task.labels.len().into());
        obj.insert("id2label".into(), id2label.into());
        obj.insert("label2id".into(), label2id.into());
        obj.insert("protloc".into(), serde_json::to_value(&self.task)?);
        crate::artifacts::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        crate::artifacts::write_atomic(
            &dir.join("vocab.txt"),
            self.base.tokenizer.to_vocab_txt().as_bytes(),
        )?;
        crate::artifacts::save_safetensors_atomic(
            &dir.join("model.safetensors"),
            &self.base.store.merged_tensors()?,
        )?;
        self.save_adapters(dir)?;
        // A stale .bin from an earlier run would be ignored (safetensors wins), but remove it
        // so the directory is unambiguous.
        let _ = std::fs::remove_file(dir.join("pytorch_model.bin"));
        Ok(())
    }
}

/// The builder of member `k`'s head (of `n`) under `root`.
fn member_builder(root: params::Builder, k: usize, n: usize) -> params::Builder {
    match member_prefix(k, n) {
        Some(p) => root.pp(p),
        None => root,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_parameter_names() {
        assert_eq!(member_prefix(0, 1), None);
        assert_eq!(member_prefix(2, 3).as_deref(), Some("ensemble.2"));
        assert!(is_member_param("classifier.weight", 0, 1));
        assert!(is_member_param("membrane_classifier.bias", 0, 1));
        assert!(!is_member_param(
            "esm.encoder.layer.0.attention.self.query.weight",
            0,
            1
        ));
        assert!(is_member_param("ensemble.1.classifier.out.weight", 1, 12));
        assert!(!is_member_param("ensemble.11.classifier.out.weight", 1, 12));
        assert!(!is_member_param("ensemble.0.classifier.out.weight", 1, 12));
        assert!(is_head_param("ensemble.3.membrane_classifier.weight"));
        assert!(!is_head_param("bert.embeddings.word_embeddings.weight"));
    }

    #[test]
    fn old_task_configs_are_single_models() {
        let task = TaskConfig::new(vec!["A".into(), "B".into()], "scratch:tiny");
        let mut v = serde_json::to_value(&task).unwrap();
        let obj = v.as_object_mut().unwrap();
        // A single model writes neither key, so its config.json is unchanged.
        assert!(!obj.contains_key("ensemble") && !obj.contains_key("members"));
        obj.remove("frozen_encoder");
        let back: TaskConfig = serde_json::from_value(v).unwrap();
        assert_eq!((back.ensemble, back.members.len()), (1, 0));
    }
}
