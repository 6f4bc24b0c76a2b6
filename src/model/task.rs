//! A run's task settings (`"protloc"` in its `config.json`) and the naming of head
//! parameters of single models and ensembles (see the [module docs](super)).

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::config::EncoderConfig;
use super::head::{HeadKind, HeadSpec, Pool};
use crate::tokenize::Truncation;

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
    /// U/Z/O/B are tokenized as themselves where the vocabulary has them instead of as X
    /// (models imported from transformers, whose tokenizers keep them). Not written when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_rare_residues: bool,
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
            encoder_prefix: cfg.arch().prefix(),
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
            keep_rare_residues: false,
        }
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
