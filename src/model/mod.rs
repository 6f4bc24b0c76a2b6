//! Encoders (BERT, ESM-2), classification heads, and loading/saving whole models.
//!
//! A *base model* is a pretrained encoder (a Hugging Face directory or hub id) or
//! `scratch:SIZE`; a *run directory* is what `protloc train` writes: the encoder plus a
//! classifier head, with labels and preprocessing settings in `config.json`.

pub mod bert;
pub mod config;
pub mod dropout;
pub mod esm;
pub mod fused_attention;
pub mod head;
pub mod head_gemm;
pub mod kernels;
pub mod loader;
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
        }
    }
}

/// Encoder + classifier head + everything needed to preprocess input the same way as in
/// training.
pub struct SequenceClassifier {
    pub base: BaseModel,
    pub head: Head,
    pub task: TaskConfig,
}

impl SequenceClassifier {
    /// Puts a freshly initialised head on `base`.
    pub fn new(base: BaseModel, task: TaskConfig) -> Result<Self> {
        // The new head starts from scratch: drop the checkpoint's remaining tensors first, or
        // a pretrained classifier that happens to share a name and shape (e.g. the
        // `classifier.dense` of an *ForSequenceClassification checkpoint) would be reused.
        // The one deliberate exception: the reference head's pooler is part of the pretrained
        // BERT (`bert.pooler.dense`), so it is read before the checkpoint goes.
        let spec = task.head_spec(&base.cfg)?;
        Head::load_pretrained_pooler(&base.store, &spec)?;
        base.store.release_source();
        let head = Head::new(&base.store.initialising(), spec)?;
        Ok(Self { base, head, task })
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

    /// Every output of the head (location logits and, if present, membrane logits).
    pub fn forward_all(
        &self,
        batch: &Batch,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<HeadOutput> {
        let hidden =
            self.base
                .encoder
                .forward(&batch.ids, &batch.attention_mask, rng.as_deref_mut())?;
        self.head.forward(&hidden, &batch.residue_mask, rng)
    }

    /// Class probabilities [B, C] (inference): softmax, or per-location sigmoids for a
    /// multi-label model. Runs on detached views of the weights so activations are freed as
    /// soon as they are used.
    pub fn predict_proba(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let out = self.inference_outputs(batch)?;
        self.probabilities(&out.logits)
    }

    /// Location probabilities from logits, as this model's task defines them.
    pub fn probabilities(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        if self.task.multi_label {
            candle_nn::ops::sigmoid(logits)
        } else {
            ops::softmax_last_dim(logits)
        }
    }

    /// Logits [B, C] for inference (see [`Self::inference_outputs`]).
    pub fn inference_logits(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        Ok(self.inference_outputs(batch)?.logits)
    }

    /// All head outputs for inference, on detached views of the weights: ops on trainable
    /// variables record their inputs, which would keep every activation of the forward pass
    /// alive until its end (gigabytes for long proteins).
    pub fn inference_outputs(&self, batch: &Batch) -> candle_core::Result<HeadOutput> {
        let encoder = self.base.encoder.detached();
        let hidden = encoder.forward(&batch.ids, &batch.attention_mask, None)?;
        self.head
            .detached()
            .forward(&hidden, &batch.residue_mask, None)
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
        let (cfg, tokenizer, store, encoder) = load_encoder(&files, 0, device, Purpose::Inference)?;
        let head = Head::new(&store.strict(), task.head_spec(&cfg)?)?;
        store.release_source();
        let base = BaseModel {
            cfg,
            tokenizer,
            store,
            encoder,
            source: dir.display().to_string(),
        };
        Ok(Self { base, head, task })
    }

    /// Writes `config.json`, `vocab.txt` and `model.safetensors` into `dir` atomically.
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
            &self.base.store.tensors(),
        )?;
        // A stale .bin from an earlier run would be ignored (safetensors wins), but remove it
        // so the directory is unambiguous.
        let _ = std::fs::remove_file(dir.join("pytorch_model.bin"));
        Ok(())
    }
}
