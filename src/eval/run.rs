//! `protloc eval`: score a trained model on labelled data.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;

use super::metrics::ClassificationReport;
use crate::data::{self, ReadOptions, Record};
use crate::infer::{self, BatchLimits};
use crate::model::SequenceClassifier;
use crate::tokenize::Encoded;

/// Which records of the file to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// `test`-tagged records when the file has any, else all.
    Auto,
    Test,
    Train,
    All,
}

pub struct EvalArgs {
    pub model: PathBuf,
    pub data: PathBuf,
    pub split: Split,
    pub limit: Option<usize>,
    pub limits: BatchLimits,
    pub skip_invalid: bool,
}

/// The JSON written by `--output`.
#[derive(Debug, Serialize)]
pub struct EvalOutput {
    pub model: String,
    pub data: String,
    pub split: Split,
    pub records: usize,
    pub report: ClassificationReport,
}

/// Picks the records of `split` (then applies `limit`).
pub fn select(records: &[Record], split: Split, limit: Option<usize>) -> Vec<&Record> {
    let has_test = records.iter().any(|r| r.is_test);
    let keep = |r: &Record| match split {
        Split::Auto => !has_test || r.is_test,
        Split::Test => r.is_test,
        Split::Train => !r.is_test,
        Split::All => true,
    };
    records
        .iter()
        .filter(|r| keep(r))
        .take(limit.unwrap_or(usize::MAX))
        .collect()
}

pub fn evaluate(args: &EvalArgs) -> Result<EvalOutput> {
    let model = SequenceClassifier::load(&args.model, &Device::Cpu)?;
    let ds = data::read_dataset(
        &args.data,
        ReadOptions {
            skip_invalid: args.skip_invalid,
            require_labels: true,
        },
    )?;
    for s in &ds.skipped {
        tracing::warn!("skipped: {s}");
    }
    let chosen = select(&ds.records, args.split, args.limit);
    if chosen.is_empty() {
        bail!(
            "{}: no records in split {:?}",
            args.data.display(),
            args.split
        );
    }
    let labels = &model.task.labels;
    let y_true: Vec<usize> = chosen
        .iter()
        .map(|r| {
            let loc = r.location.as_deref().unwrap_or_default();
            labels.iter().position(|l| l == loc).with_context(|| {
                format!(
                    "{}: label {loc:?} of {} is not one of the model's labels ({})",
                    r.pos,
                    r.id,
                    labels.join(", ")
                )
            })
        })
        .collect::<Result<_>>()?;
    let enc: Vec<Encoded> = chosen
        .iter()
        .map(|r| {
            model
                .base
                .tokenizer
                .encode(&r.sequence, model.task.max_residues, model.task.truncate)
        })
        .collect();
    let pb = crate::progress::bar(enc.len() as u64, "evaluating", "proteins");
    let probs = infer::class_probabilities(&model, &enc, args.limits, Some(&pb))?;
    pb.finish_and_clear();
    let y_pred: Vec<usize> = probs.iter().map(|p| infer::argmax(p)).collect();
    let report = ClassificationReport::compute(&y_true, &y_pred, labels)?;
    Ok(EvalOutput {
        model: args.model.display().to_string(),
        data: args.data.display().to_string(),
        split: args.split,
        records: chosen.len(),
        report,
    })
}
