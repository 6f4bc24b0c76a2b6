//! Models fine-tuned elsewhere, used as they are: what a `--model` path holds and the task
//! settings it implies.
//!
//! - a protloc run directory (`config.json` with a `"protloc"` section);
//! - a transformers `BertForSequenceClassification` or `EsmForSequenceClassification`
//!   directory: the [`HeadKind::Pooler`] head, labels from `id2label` (location names in
//!   any spelling become the DeepLoc ones, other labels stay as they are), U/Z/O/B kept as
//!   transformers' tokenizers keep them, the first residues kept when a protein is too long
//!   (transformers' `truncation=True`);
//! - the reference workflow's `model.pth` (`aws-samples/amazon-sagemaker-protein-classification`):
//!   a `state_dict` of `bert.*` (BertModel with pooler) and `classifier.1.*` (the
//!   [`HeadKind::Reference`] head) over ten classes in the order its notebook assigns them
//!   ([`REFERENCE_CLASSES`]), read together with `--base`, the encoder directory (or hub id)
//!   whose `config.json` and `vocab.txt` it was trained with. Its requests are tokenized as
//!   its `input_fn` does: residues as sent, the first 510 kept.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::config::EncoderConfig;
use super::head::{HeadKind, Pool};
use super::loader::{self, ModelFiles};
use super::task::TaskConfig;
use crate::data::canonical_label;
use crate::tokenize::Truncation;

/// The reference workflow's classes in index order: its notebook turns the location column
/// into a pandas category, whose codes follow the sorted names.
pub const REFERENCE_CLASSES: [&str; 10] = [
    "Cell.membrane",
    "Cytoplasm",
    "Endoplasmic.reticulum",
    "Extracellular",
    "Golgi.apparatus",
    "Lysosome/Vacuole",
    "Mitochondrion",
    "Nucleus",
    "Peroxisome",
    "Plastid",
];

/// The reference pads and truncates every sequence to `MAX_LEN` = 512 tokens.
const REFERENCE_MAX_RESIDUES: usize = 510;

/// Longest protein an imported model reads whole (ESM-2's 1,024-token context, special
/// tokens included); longer ones keep their first residues.
const IMPORT_MAX_RESIDUES: usize = 1022;

/// transformers architectures whose head is [`HeadKind::Pooler`].
const TRANSFORMERS_CLASSIFIERS: [&str; 2] = [
    "BertForSequenceClassification",
    "EsmForSequenceClassification",
];

/// Where a loaded model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A directory written by `protloc train` or `protloc import`.
    Run,
    /// A transformers directory of this architecture.
    Transformers(String),
    /// The reference workflow's `model.pth`.
    Reference,
}

/// A model's files and the task settings to read them with.
pub struct Resolved {
    pub files: ModelFiles,
    pub task: TaskConfig,
    pub origin: Origin,
}

/// What `model` (a run directory, a transformers classifier directory or a reference
/// `model.pth`, the last with `base`) holds.
pub fn resolve(model: &Path, base: Option<&str>) -> Result<Resolved> {
    if model.is_file() {
        let Some(base) = base else {
            bail!(
                "{}: a single file is read as the reference workflow's model.pth (a PyTorch \
                 state_dict): pass --base with the encoder it was fine-tuned from (a directory \
                 with its config.json and vocab.txt, or a hub id such as \
                 Rostlab/prot_bert_bfd_localization, the reference's model_def.py)",
                model.display()
            );
        };
        return reference(model, base);
    }
    if base.is_some() {
        bail!(
            "--base is for a reference model.pth; {} is a directory, which carries its own \
             encoder: drop --base",
            model.display()
        );
    }
    let files = loader::from_dir(model)?;
    let text = std::fs::read_to_string(&files.config)
        .with_context(|| format!("{}: cannot read", files.config.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", files.config.display()))?;
    if let Some(v) = value.get("protloc") {
        let task = serde_json::from_value(v.clone())
            .with_context(|| format!("{}: invalid \"protloc\" section", files.config.display()))?;
        return Ok(Resolved {
            files,
            task,
            origin: Origin::Run,
        });
    }
    let architectures: Vec<&str> = value
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let Some(arch) = architectures
        .iter()
        .find(|a| TRANSFORMERS_CLASSIFIERS.contains(a))
    else {
        bail!(
            "{}: not a protloc run directory (config.json has no \"protloc\" section) nor a \
             transformers {} directory (architectures: {architectures:?}); fine-tune one with \
             `protloc train`",
            model.display(),
            TRANSFORMERS_CLASSIFIERS.join(" or ")
        );
    };
    let cfg = loader::read_config(&files.config)?;
    let task = transformers_task(&value, &cfg, &model.display().to_string())
        .with_context(|| format!("{}", files.config.display()))?;
    Ok(Resolved {
        files,
        task,
        origin: Origin::Transformers(arch.to_string()),
    })
}

/// Task settings of a transformers sequence classifier with `config.json` `value`.
fn transformers_task(
    value: &serde_json::Value,
    cfg: &EncoderConfig,
    source: &str,
) -> Result<TaskConfig> {
    let labels = id2label(value)?;
    let problem = value.get("problem_type").and_then(|p| p.as_str());
    if problem == Some("regression") || labels.len() < 2 {
        bail!(
            "a regression model ({} output{}): protloc predicts classes",
            labels.len(),
            if labels.len() == 1 { "" } else { "s" }
        );
    }
    let multi_label = problem == Some("multi_label_classification");
    let mut task = imported_task(labels, source, HeadKind::Pooler, cfg, IMPORT_MAX_RESIDUES);
    task.head_dropout = value
        .get("classifier_dropout")
        .and_then(|d| d.as_f64())
        .unwrap_or(cfg.hidden_dropout_prob);
    if multi_label {
        task.multi_label = true;
        task.thresholds = Some(vec![0.5; task.labels.len()]);
    }
    Ok(task)
}

/// What an imported model was trained with, as far as its files say: `head` on the first
/// token, sequences cut at the end (as transformers' tokenizers do) to what its positions
/// allow, at most `cap` residues, and U/Z/O/B kept as their own tokens.
fn imported_task(
    labels: Vec<String>,
    source: &str,
    head: HeadKind,
    cfg: &EncoderConfig,
    cap: usize,
) -> TaskConfig {
    let mut task = TaskConfig::new(labels, source);
    task.head = head;
    task.pool = Pool::Cls;
    task.truncate = Truncation::Head;
    task.max_residues = cfg.max_position_embeddings.saturating_sub(2).clamp(1, cap);
    task.keep_rare_residues = true;
    task
}

/// Labels in index order from `id2label` (`num_labels`, else 2, generic `LABEL_i` names when
/// absent, as transformers reads such a config),
/// location names in any spelling mapped to the DeepLoc ones.
fn id2label(value: &serde_json::Value) -> Result<Vec<String>> {
    let labels: Vec<String> = match value.get("id2label").and_then(|m| m.as_object()) {
        Some(map) => {
            let mut pairs = map
                .iter()
                .map(|(k, v)| {
                    let i: usize = k
                        .parse()
                        .with_context(|| format!("id2label key {k:?} is not an index"))?;
                    let name = v
                        .as_str()
                        .with_context(|| format!("id2label[{k}] is not a string"))?;
                    Ok((i, name.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            pairs.sort();
            if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) {
                bail!("id2label keys are not 0..{}", pairs.len());
            }
            pairs.into_iter().map(|(_, name)| name).collect()
        }
        // transformers' defaults: `num_labels` generic names, 2 when not given either.
        None => {
            let n = value
                .get("num_labels")
                .and_then(|n| n.as_u64())
                .unwrap_or(2);
            (0..n).map(|i| format!("LABEL_{i}")).collect()
        }
    };
    let mapped: Vec<String> = labels
        .iter()
        .map(|l| canonical_label(l).map_or_else(|| l.clone(), str::to_string))
        .collect();
    for (i, l) in mapped.iter().enumerate() {
        if mapped[..i].contains(l) {
            bail!("two labels name the same class {l:?} (id2label: {labels:?})");
        }
    }
    Ok(mapped)
}

/// The reference workflow's `model.pth` on the encoder files of `base`.
fn reference(model: &Path, base: &str) -> Result<Resolved> {
    let files = loader::resolve_with(base, Some(model))
        .with_context(|| format!("--base {base}: cannot read the encoder's files"))?;
    let cfg = loader::read_config(&files.config)?;
    let labels = REFERENCE_CLASSES.iter().map(|s| s.to_string()).collect();
    let mut task = imported_task(
        labels,
        base,
        HeadKind::Reference,
        &cfg,
        REFERENCE_MAX_RESIDUES,
    );
    task.head_dropout = 0.2;
    Ok(Resolved {
        files,
        task,
        origin: Origin::Reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_map_to_locations_by_name_and_others_stay() {
        let v =
            serde_json::json!({"id2label": {"1": "Cell membrane", "0": "nucleus", "2": "toxic"}});
        assert_eq!(id2label(&v).unwrap(), ["Nucleus", "Cell.membrane", "toxic"]);
        let v = serde_json::json!({"num_labels": 3});
        assert_eq!(id2label(&v).unwrap(), ["LABEL_0", "LABEL_1", "LABEL_2"]);
        let v = serde_json::json!({"problem_type": "single_label_classification"});
        assert_eq!(id2label(&v).unwrap(), ["LABEL_0", "LABEL_1"]);
        let v = serde_json::json!({"id2label": {"0": "Cell.membrane", "1": "cell membrane"}});
        assert!(id2label(&v).unwrap_err().to_string().contains("same class"));
        let v = serde_json::json!({"id2label": {"0": "A", "2": "B"}});
        assert!(id2label(&v).is_err());
    }

    #[test]
    fn reference_classes_are_sorted_deeploc_locations() {
        let mut sorted = REFERENCE_CLASSES;
        sorted.sort();
        assert_eq!(sorted, REFERENCE_CLASSES);
        for c in REFERENCE_CLASSES {
            assert_eq!(canonical_label(c), Some(c));
        }
    }
}
