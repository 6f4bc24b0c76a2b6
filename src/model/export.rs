//! Writing a model as a Hugging Face directory that `transformers` loads with
//! `AutoModelForSequenceClassification.from_pretrained(DIR)`.
//!
//! - The `pooler` head (single model, no membrane output) *is* transformers' own head:
//!   the directory says `BertForSequenceClassification` / `EsmForSequenceClassification` and
//!   loads with no custom code.
//! - Every other head (linear, mlp, light-attention, reference), the membrane output and
//!   ensembles have no transformers class: the directory carries `modeling_protloc.py`,
//!   written for the purpose, and loads with `trust_remote_code=True`. Its modules have this
//!   tool's tensor names, so the weights load as they are; its outputs are `logits` (an
//!   ensemble's: the mean of its members', as protloc reports them), `probabilities`
//!   (protloc's: softmax, or sigmoid per location for multi-label, averaged over members) and
//!   `membrane_probability` when the model has that output.
//!
//! BERT models that read U, Z, O and B as X (ProtBERT's preprocessing, protloc's default)
//! export with those letters' embedding rows set to X's (rows protloc never reads), so
//! transformers' tokenizer, which keeps the letters, gives protloc's outputs on raw sequences.
//!
//! `protloc_export.json` beside the weights says how protloc tokenizes (residues spaced for
//! BERT vocabularies, truncation of long proteins) and holds
//! protloc's own logits and probabilities for a few sample proteins, so anyone can check the
//! export in transformers: `tools/check_export.py DIR` does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::Serialize;

use super::classifier::SequenceClassifier;
use super::config::Arch;
use super::head::HeadKind;
use super::task::is_head_param;
use crate::tokenize::{Style, TokenBatch};

/// The custom modelling code of heads without a transformers class.
const MODELING_PY: &str = include_str!("modeling_protloc.py");

/// Proteins whose outputs `protloc_export.json` records (short, one with U and X).
const CHECK_SEQUENCES: [&str; 3] = [
    "MKVLAAGIVGLLLAAPAAQA",
    "MSDNEKLRQALEELLKRHPEIAEKLSKLLUGEPVDLSKLX",
    "MAAPRVLLLAVLLLTGSARAQEESKWQEKLRQAVEEAMKNPSKLTEEERKKLEEL",
];

/// What [`export_hf`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    /// The `architectures` entry of `config.json`.
    pub architecture: String,
    /// Whether loading needs `trust_remote_code=True` (custom modelling code).
    pub custom_code: bool,
    /// Files of the directory, by name.
    pub files: Vec<String>,
}

/// How protloc turns a protein into token ids, for tools that tokenize it themselves.
#[derive(Debug, Clone, Serialize)]
struct Preprocessing {
    /// transformers' BERT tokenizers split on spaces: join residues with " " first.
    spaced: bool,
    /// protloc reads U, Z, O and B as X; the exported word embeddings give their rows X's
    /// values, so raw sequences give protloc's outputs in transformers too.
    rare_residue_rows_as_x: bool,
    /// `head-tail` (half from each end) or `head`.
    truncation: String,
    max_residues: usize,
}

#[derive(Debug, Clone, Serialize)]
struct Check {
    sequences: Vec<String>,
    /// Location logits of each protein run alone.
    logits: Vec<Vec<f32>>,
    probabilities: Vec<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    membrane_probability: Option<Vec<f32>>,
}

/// Which transformers class a model is, and whether that class is transformers' own.
fn architecture(model: &SequenceClassifier) -> (String, bool) {
    let task = &model.task;
    let standard = task.head == HeadKind::Pooler && !task.membrane && task.ensemble == 1;
    let arch = match model.base.cfg.model_type {
        Arch::Bert => "Bert",
        Arch::Esm => "Esm",
    };
    if standard {
        (format!("{arch}ForSequenceClassification"), false)
    } else {
        (format!("Protloc{arch}ForSequenceClassification"), true)
    }
}

/// Writes `model` to `dir` (replacing it atomically) as a Hugging Face directory; see the
/// module docs.
pub fn export_hf(model: &SequenceClassifier, dir: &Path) -> Result<Exported> {
    let (architecture, custom_code) = architecture(model);
    let config = hf_config(model, &architecture, custom_code)?;
    let tensors = hf_tensors(model, custom_code)?;
    let export = serde_json::json!({
        "protloc_version": env!("CARGO_PKG_VERSION"),
        "source": model.base.source,
        "head": model.task.head.name(),
        "architecture": architecture,
        "trust_remote_code": custom_code,
        "preprocessing": preprocessing(model),
        "check": check(model)?,
    });
    let tokenizer_config = tokenizer_config(model);
    let mut files: Vec<(PathBuf, Vec<u8>)> = vec![
        (
            "config.json".into(),
            serde_json::to_string_pretty(&config)?.into_bytes(),
        ),
        (
            "model.safetensors".into(),
            crate::artifacts::safetensors_bytes(&tensors)?,
        ),
        (
            "vocab.txt".into(),
            model.base.tokenizer.to_vocab_txt().into_bytes(),
        ),
        (
            "tokenizer_config.json".into(),
            serde_json::to_string_pretty(&tokenizer_config)?.into_bytes(),
        ),
        (
            "protloc_export.json".into(),
            serde_json::to_string_pretty(&export)?.into_bytes(),
        ),
    ];
    if custom_code {
        files.push((
            "modeling_protloc.py".into(),
            MODELING_PY.as_bytes().to_vec(),
        ));
    }
    crate::artifacts::write_atomic_dir(dir, |tmp| {
        for (name, bytes) in &files {
            crate::artifacts::write_synced(&tmp.join(name), bytes)?;
        }
        Ok(())
    })?;
    Ok(Exported {
        architecture,
        custom_code,
        files: files.iter().map(|(n, _)| n.display().to_string()).collect(),
    })
}

/// The encoder's config plus what transformers reads for a sequence classifier: the
/// architecture, labels, problem type, and (custom code) the `auto_map` entry, protloc's task
/// settings and the special-token ids the heads mask out.
fn hf_config(
    model: &SequenceClassifier,
    architecture: &str,
    custom_code: bool,
) -> Result<serde_json::Value> {
    let task = &model.task;
    let mut config = serde_json::to_value(&model.base.cfg)?;
    let obj = config.as_object_mut().context("config is an object")?;
    obj.insert("architectures".into(), serde_json::json!([architecture]));
    obj.insert("num_labels".into(), task.labels.len().into());
    let id2label: serde_json::Map<String, serde_json::Value> = task
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = task
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i.into()))
        .collect();
    obj.insert("id2label".into(), id2label.into());
    obj.insert("label2id".into(), label2id.into());
    obj.insert(
        "problem_type".into(),
        if task.multi_label {
            "multi_label_classification"
        } else {
            "single_label_classification"
        }
        .into(),
    );
    // transformers' classifiers read their dropout from here; inference ignores it.
    obj.insert("classifier_dropout".into(), task.head_dropout.into());
    if custom_code {
        obj.insert(
            "auto_map".into(),
            serde_json::json!({
                "AutoModelForSequenceClassification": format!("modeling_protloc.{architecture}")
            }),
        );
        obj.insert("protloc".into(), serde_json::to_value(task)?);
        let t = &model.base.tokenizer;
        obj.insert(
            "protloc_special_token_ids".into(),
            serde_json::json!([t.cls_id, t.end_id, t.pad_id]),
        );
    }
    Ok(config)
}

/// The weights under transformers' names (protloc's are the same); transformers' own
/// classes get the encoder and their head only.
fn hf_tensors(model: &SequenceClassifier, custom_code: bool) -> Result<HashMap<String, Tensor>> {
    let mut tensors = model.base.store.merged_tensors()?;
    let prefix = model.base.cfg.model_type.prefix();
    if !custom_code {
        tensors.retain(|n, _| n.starts_with(&format!("{prefix}.")) || is_head_param(n));
    }
    if model.base.cfg.model_type == Arch::Esm {
        add_contact_head(model, &mut tensors)?;
    }
    if rare_residues_read_as_x(model) {
        let name = format!("{prefix}.embeddings.word_embeddings.weight");
        let table = tensors
            .get(&name)
            .with_context(|| format!("no {name} to export"))?;
        tensors.insert(name, alias_rare_rows(model, table)?);
    }
    Ok(tensors)
}

/// transformers' EsmModel always has a contact-prediction head (`esm.contact_head`), which a
/// localization model does not use and protloc does not keep: written as zeros, so the
/// directory loads with no weight left to initialise.
fn add_contact_head(
    model: &SequenceClassifier,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let cfg = &model.base.cfg;
    let dev = model.base.store.device();
    let n = cfg.num_hidden_layers * cfg.num_attention_heads;
    let f32 = candle_core::DType::F32;
    tensors
        .entry("esm.contact_head.regression.weight".into())
        .or_insert(Tensor::zeros((1, n), f32, dev)?);
    tensors
        .entry("esm.contact_head.regression.bias".into())
        .or_insert(Tensor::zeros(1, f32, dev)?);
    Ok(())
}

/// Whether protloc reads U/Z/O/B as X for this model (ProtBERT vocabularies, unless the model
/// was imported from a tool that keeps them).
fn rare_residues_read_as_x(model: &SequenceClassifier) -> bool {
    model.base.tokenizer.style == Style::ProtBert && !model.task.keep_rare_residues
}

/// The word embeddings with the rows of U, Z, O and B replaced by X's. protloc never looks
/// those rows up (it reads the letters as X), so protloc's outputs do not change, while
/// transformers' tokenizer, which keeps the letters, now gives the same outputs as protloc
/// on raw sequences.
fn alias_rare_rows(model: &SequenceClassifier, table: &Tensor) -> Result<Tensor> {
    let tok = &model.base.tokenizer;
    let Some(x) = tok.token_id("X") else {
        return Ok(table.clone());
    };
    let mut rows: Vec<Vec<f32>> = table.to_vec2()?;
    for letter in ["U", "Z", "O", "B"] {
        if let Some(id) = tok.token_id(letter) {
            rows[id as usize] = rows[x as usize].clone();
        }
    }
    let (n, h) = table.dims2()?;
    Ok(Tensor::from_vec(rows.concat(), (n, h), table.device())?)
}

fn preprocessing(model: &SequenceClassifier) -> Preprocessing {
    Preprocessing {
        spaced: model.base.tokenizer.style == Style::ProtBert,
        rare_residue_rows_as_x: rare_residues_read_as_x(model),
        truncation: match model.task.truncate {
            crate::tokenize::Truncation::Head => "head",
            crate::tokenize::Truncation::HeadTail => "head-tail",
        }
        .into(),
        max_residues: model.task.max_residues,
    }
}

/// transformers' tokenizer for the vocabulary (BertTokenizer keeps case; EsmTokenizer).
fn tokenizer_config(model: &SequenceClassifier) -> serde_json::Value {
    let max_len = model.task.max_residues + 2;
    match model.base.tokenizer.style {
        Style::ProtBert => serde_json::json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": false,
            "model_max_length": max_len,
        }),
        Style::Esm => serde_json::json!({
            "tokenizer_class": "EsmTokenizer",
            "model_max_length": max_len,
        }),
    }
}

/// protloc's outputs for [`CHECK_SEQUENCES`], each run alone.
fn check(model: &SequenceClassifier) -> Result<Check> {
    let mut out = Check {
        sequences: CHECK_SEQUENCES.iter().map(|s| s.to_string()).collect(),
        logits: Vec::new(),
        probabilities: Vec::new(),
        membrane_probability: None,
    };
    let mut membrane = Vec::new();
    for s in CHECK_SEQUENCES {
        let enc = model.encode(s);
        let batch = TokenBatch::collate(
            &[&enc],
            model.base.tokenizer.pad_id,
            model.base.store.device(),
        )?;
        let p = model.inference_probabilities(&batch)?;
        out.logits.push(p.logits.squeeze(0)?.to_vec1()?);
        out.probabilities.push(p.location.squeeze(0)?.to_vec1()?);
        if let Some(m) = p.membrane {
            membrane.push(m.squeeze(0)?.to_scalar()?);
        }
    }
    out.membrane_probability = (!membrane.is_empty()).then_some(membrane);
    Ok(out)
}
