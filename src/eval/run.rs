//! `protloc eval`: score a trained model on labelled data.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::compare::{self, Interval95, ProteinOutcome};
use super::metrics::ClassificationReport;
use super::multilabel::{self, MultiLabelReport};
use super::target::{LocationTarget, Target};
use crate::data::split::RecordKey;
use crate::data::{self, ReadOptions, Record};
use crate::infer::{self, BatchLimits};
use crate::model::SequenceClassifier;
use crate::tokenize::Encoded;

/// Which records of the file to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// `test`-tagged records when the file has any, else all.
    Auto,
    Test,
    Train,
    All,
    /// The records the model was validated on while training (listed in its run directory's
    /// `split.tsv`): compare runs and recipes without touching the test set.
    Validation,
}

pub struct EvalArgs {
    pub model: PathBuf,
    /// Where to run the model.
    pub device: crate::device::DeviceSpec,
    /// The encoder of a reference `model.pth` given as `model` (see
    /// [`crate::model::import`]); `None` for a directory.
    pub base: Option<String>,
    pub data: PathBuf,
    pub split: Split,
    pub limit: Option<usize>,
    pub limits: BatchLimits,
    pub skip_invalid: bool,
    /// Per-residue embedding cache to read (and fill) instead of running the encoder; only
    /// valid for a model whose encoder the cache was built with (checked by fingerprint).
    pub cache: Option<PathBuf>,
}

/// The JSON written by `--output`.
#[derive(Debug, Serialize, Deserialize)]
pub struct EvalOutput {
    pub model: String,
    pub data: String,
    pub split: Split,
    pub records: usize,
    /// Single-label report (Q10, MCC, per-class scores, confusion matrix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<ClassificationReport>,
    /// Multi-label report (DeepLoc 2.0 metrics), for multi-label models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_label: Option<MultiLabelReport>,
    /// Membrane/soluble accuracy (Q2) over the records with a known flag, for models with a
    /// membrane output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub membrane_accuracy: Option<f64>,
    /// Records with a known membrane flag (the Q2 denominator).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub membrane_records: Option<usize>,
    /// 95% bootstrap intervals of the accuracy (and MCC) over the scored proteins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci95: Option<Interval95>,
    /// Every scored protein's true and predicted location(s), in file order: what
    /// `protloc compare` pairs with another model's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proteins: Vec<ProteinOutcome>,
}

impl EvalOutput {
    /// What its accuracy is called: Q10 for ten locations, exact-match accuracy for a
    /// multi-label model.
    pub fn accuracy_name(&self) -> String {
        self.report
            .as_ref()
            .map_or("exact-match accuracy".into(), |r| r.accuracy_name().into())
    }
}

/// Picks the records of `split`. `validated`: the model's validation records (id, line and
/// sequence), which [`Split::Validation`] keeps.
pub fn select<'a>(
    records: &'a [Record],
    split: Split,
    validated: &BTreeSet<RecordKey>,
) -> Vec<&'a Record> {
    let has_test = records.iter().any(|r| r.is_test);
    let keep = |r: &Record| match split {
        Split::Auto => !has_test || r.is_test,
        Split::Test => r.is_test,
        Split::Train => !r.is_test,
        Split::All => true,
        Split::Validation => validated.contains(&RecordKey::of(r)),
    };
    records.iter().filter(|r| keep(r)).collect()
}

/// The validation records of the run directory `model` for [`Split::Validation`] (empty for
/// the other splits).
fn validated_records(model: &Path, split: Split) -> Result<BTreeSet<RecordKey>> {
    match split {
        Split::Validation => crate::data::split::validation_records(model),
        _ => Ok(BTreeSet::new()),
    }
}

pub fn evaluate(args: &EvalArgs) -> Result<EvalOutput> {
    let device = args.device.resolve_here()?;
    let model = SequenceClassifier::open(&args.model, args.base.as_deref(), &device)?;
    let ds = data::read_dataset(
        &args.data,
        ReadOptions {
            skip_invalid: args.skip_invalid,
            require_labels: true,
            multi_label: model.task.multi_label,
        },
    )?;
    for s in &ds.skipped {
        tracing::warn!("skipped: {s}");
    }
    let validated = validated_records(&args.model, args.split)?;
    let mut chosen = select(&ds.records, args.split, &validated);
    if args.split == Split::Validation && chosen.len() != validated.len() {
        bail!(
            "{} holds {} of the {} records {} validated on (matched by id, line and sequence): pass the \
             data file it was trained on (see its training_args.json)",
            args.data.display(),
            chosen.len(),
            validated.len(),
            args.model.display()
        );
    }
    chosen.truncate(args.limit.unwrap_or(usize::MAX));
    if chosen.is_empty() {
        bail!(
            "{}: no records in split {:?}",
            args.data.display(),
            args.split
        );
    }
    let labels = &model.task.labels;
    let targets: Vec<Target> = chosen
        .iter()
        .map(|r| Target::of(r, labels, model.task.multi_label))
        .collect::<Result<_>>()?;
    let preds = match &args.cache {
        Some(dir) => cached_predictions(&model, dir, &chosen, args.limits)?,
        None => {
            let enc: Vec<Encoded> = chosen.iter().map(|r| model.encode(&r.sequence)).collect();
            let pb = crate::progress::bar(enc.len() as u64, "evaluating", "proteins");
            let p = infer::head_outputs(&model, &enc, args.limits, Some(&pb))?;
            pb.finish_and_clear();
            p
        }
    };
    // The same answers `predict` and `serve` give (see `crate::model::answer`).
    let rule = model.answer_rule();
    let answers = preds.into_answers(&rule);
    let proteins: Vec<ProteinOutcome> = chosen
        .iter()
        .zip(&targets)
        .zip(&answers)
        .map(|((r, t), a)| ProteinOutcome {
            id: r.id.clone(),
            label: t.location.names(labels),
            predicted: a.prediction.clone(),
        })
        .collect();
    let (report, multi_label, ci95) = match &rule.thresholds {
        Some(thresholds) => {
            let y_true: Vec<Vec<bool>> = targets
                .iter()
                .map(|t| match &t.location {
                    LocationTarget::Multi(v) => v.iter().map(|&y| y > 0.5).collect(),
                    LocationTarget::Single(_) => unreachable!("multi-label targets"),
                })
                .collect();
            let y_pred: Vec<Vec<bool>> = answers.iter().map(|a| a.chosen()).collect();
            let exact: Vec<bool> = proteins.iter().map(|p| p.correct()).collect();
            (
                None,
                Some(multilabel::report(&y_true, &y_pred, labels, thresholds)),
                compare::accuracy_ci95(&exact),
            )
        }
        None => {
            let y_true: Vec<usize> = targets
                .iter()
                .map(|t| match t.location {
                    LocationTarget::Single(c) => c as usize,
                    LocationTarget::Multi(_) => unreachable!("single-label targets"),
                })
                .collect();
            let y_pred: Vec<usize> = answers.iter().map(|a| a.best).collect();
            (
                Some(ClassificationReport::compute(&y_true, &y_pred, labels)?),
                None,
                compare::single_label_ci95(&y_true, &y_pred, labels.len()),
            )
        }
    };
    let truth: Vec<Option<bool>> = targets.iter().map(|t| t.membrane).collect();
    let membrane_accuracy = rule
        .membrane
        .then(|| {
            let pred: Vec<bool> = answers
                .iter()
                .map(|a| a.membrane.is_some_and(|m| m.bound))
                .collect();
            super::metrics::binary_accuracy_masked(&truth, &pred)
        })
        .flatten();
    Ok(EvalOutput {
        model: args.model.display().to_string(),
        data: args.data.display().to_string(),
        split: args.split,
        records: chosen.len(),
        report,
        multi_label,
        membrane_records: membrane_accuracy.map(|_| truth.iter().filter(|t| t.is_some()).count()),
        membrane_accuracy,
        ci95: Some(ci95),
        proteins,
    })
}

/// Predictions through the embedding cache in `dir` (filled with any missing protein).
fn cached_predictions(
    model: &SequenceClassifier,
    dir: &std::path::Path,
    chosen: &[&Record],
    limits: BatchLimits,
) -> Result<infer::HeadPredictions> {
    // Before the cache is opened (and possibly rebuilt for this encoder).
    if let Some(why) = model.task.head.cached_rows_unsupported(model.task.pool) {
        bail!("--cache cannot serve this model (evaluate it without --cache): {why}");
    }
    let spec = crate::cache::CacheSpec::for_model(
        &model.base,
        model.task.max_residues,
        model.task.truncate,
    )?;
    let mut cache = crate::cache::EmbeddingCache::open(dir, spec)?;
    let seqs: Vec<&str> = chosen.iter().map(|r| r.sequence.as_str()).collect();
    let missing = seqs.iter().filter(|s| !cache.contains(s)).count();
    let pb = crate::progress::bar(missing as u64, "embedding", "proteins");
    cache.fill(&model.base, &seqs, limits, Some(&pb))?;
    pb.finish_and_clear();
    let device = model.base.store.device().clone();
    crate::cache::cached_outputs(model, &mut cache, &seqs, &device)
}
