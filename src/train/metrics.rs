//! What a run reports and keeps: per-epoch metrics (`metrics.jsonl`), validation scores, the
//! best epoch's model, the run's summary and its training curves.

use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::objective::Target;
use super::observe::TrainObserver;
use crate::model::{self, SequenceClassifier};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// Membrane/soluble accuracy (Q2) on validation proteins with a known flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_membrane_accuracy: Option<f64>,
    pub lr: f64,
    pub elapsed_s: f64,
    /// The ensemble member this epoch trained (ensembles only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<usize>,
    /// Proteins in that member's validation split (ensembles only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_records: Option<usize>,
}

/// Validation results of one epoch.
#[derive(Debug, Clone, Copy)]
pub struct ValidationMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub membrane_accuracy: Option<f64>,
}

impl EpochMetrics {
    pub fn new(
        epoch: usize,
        step: usize,
        train_loss: f64,
        val: Option<ValidationMetrics>,
        lr: f64,
        t0: &Instant,
    ) -> Self {
        Self {
            epoch,
            step,
            train_loss,
            val_loss: val.map(|v| v.loss),
            val_accuracy: val.map(|v| v.accuracy),
            val_membrane_accuracy: val.and_then(|v| v.membrane_accuracy),
            lr,
            elapsed_s: t0.elapsed().as_secs_f64(),
            member: None,
            val_records: None,
        }
    }
}

/// Validation loss and accuracy from predicted probabilities. Single-label: mean negative log
/// likelihood and top-1 accuracy. Multi-label: mean binary cross-entropy and exact-match
/// accuracy at 0.5. Q2 over the proteins with a known membrane flag.
pub fn validation_metrics(
    probs: &[Vec<f32>],
    membrane: Option<&[f32]>,
    targets: &[Target],
) -> ValidationMetrics {
    use super::objective::LocationTarget;
    let mut loss = 0f64;
    let mut correct = 0usize;
    for (p, t) in probs.iter().zip(targets) {
        match &t.location {
            LocationTarget::Single(c) => {
                loss -= (p[*c as usize].max(1e-12) as f64).ln();
                correct += usize::from(crate::infer::argmax(p) == *c as usize);
            }
            LocationTarget::Multi(y) => {
                let mut l = 0f64;
                for (&q, &y) in p.iter().zip(y) {
                    let q = (q as f64).clamp(1e-12, 1.0 - 1e-12);
                    l -= if y > 0.5 { q.ln() } else { (1.0 - q).ln() };
                }
                loss += l / y.len() as f64;
                correct += usize::from(p.iter().zip(y).all(|(&q, &y)| (q >= 0.5) == (y > 0.5)));
            }
        }
    }
    let n = probs.len().max(1) as f64;
    let membrane_accuracy = membrane.and_then(|m| {
        let truth: Vec<Option<bool>> = targets.iter().map(|t| t.membrane).collect();
        let pred: Vec<bool> = m.iter().map(|&p| p >= 0.5).collect();
        crate::eval::metrics::binary_accuracy_masked(&truth, &pred)
    });
    ValidationMetrics {
        loss: loss / n,
        accuracy: correct as f64 / n,
        membrane_accuracy,
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub epochs: Vec<EpochMetrics>,
    pub best_epoch: usize,
    pub steps: usize,
    pub train_records: usize,
    pub val_records: usize,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    /// Data-parallel ranks the run used.
    pub world_size: usize,
    /// Seconds spent in the batch loops (forward, backward, communication, update).
    pub train_loop_s: f64,
    /// Of those, seconds in (or waiting for) collectives with the other ranks.
    pub comm_s: f64,
    /// Of `comm_s`, seconds spent waiting for slower ranks rather than moving gradients
    /// (measured with a barrier before each gradient all-reduce when PROTLOC_DIST_PROFILE is
    /// set; otherwise only the small per-batch reductions count here).
    pub comm_wait_s: f64,
    /// An ensemble's members (empty for a single model). The fields above then describe the
    /// first member, except `epochs` (every member's, tagged `member`), `steps` and
    /// `total_parameters` (all members').
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<model::MemberInfo>,
}

/// Appends the epoch to `metrics.jsonl`, hands it to the observer, keeps the best
/// checkpoint (highest validation accuracy, ties broken by lower validation loss; without a
/// validation set the latest epoch is kept).
///
/// Every rank keeps the same bookkeeping (it goes into checkpoints); only the root rank,
/// which passes its `observer` (the others pass `None`), reports and writes. Returns whether
/// this epoch is the new best (the caller keeps its weights).
pub(super) fn record_epoch(
    observer: Option<&mut (dyn TrainObserver + '_)>,
    metrics_path: &std::path::Path,
    m: EpochMetrics,
    history: &mut Vec<EpochMetrics>,
    best: &mut Option<(f64, f64, usize)>,
) -> Result<bool> {
    let root = observer.is_some();
    if let Some(observer) = observer {
        crate::artifacts::append_json_line(metrics_path, &serde_json::to_value(&m)?)?;
        observer.on_epoch(&m);
    }
    let key = (
        m.val_accuracy.unwrap_or(0.0),
        -m.val_loss.unwrap_or(0.0),
        m.epoch,
    );
    let finite = m.train_loss.is_finite() && m.val_loss.is_none_or(f64::is_finite);
    let improved = finite
        && match best {
            None => true,
            Some(b) => m.val_accuracy.is_none() || (key.0, key.1) > (b.0, b.1),
        };
    if !finite && root {
        tracing::warn!(
            epoch = m.epoch,
            "non-finite losses: this epoch's model is not saved"
        );
    }
    if improved {
        *best = Some(key);
    }
    history.push(m);
    Ok(improved)
}

/// `--init-head`: the starting model, validated before any step, is the first candidate for
/// the best model (epoch 0), so a run whose epochs all validate worse keeps it unchanged
/// rather than the least bad epoch. The root rank (the one passing `observer`) reports it and
/// saves it to `dir`; every rank records it in `best`.
pub(super) fn record_start(
    observer: Option<&mut (dyn TrainObserver + '_)>,
    model: &SequenceClassifier,
    dir: &std::path::Path,
    validation: ValidationMetrics,
    best: &mut Option<(f64, f64, usize)>,
) -> Result<()> {
    if !validation.loss.is_finite() {
        // A start that already gives non-finite losses is nobody's best.
        return Ok(());
    }
    *best = Some((validation.accuracy, -validation.loss, 0));
    if let Some(observer) = observer {
        observer.on_start(&super::observe::StartingPoint { validation });
        save_best(model, dir, 0)?;
    }
    Ok(())
}

/// Writes the best model so far into the run directory.
pub(super) fn save_best(
    model: &SequenceClassifier,
    dir: &std::path::Path,
    epoch: usize,
) -> Result<()> {
    model.save(dir)?;
    tracing::info!(epoch, "saved best model to {}", dir.display());
    Ok(())
}

/// Writes `training_curves.png` into the run directory.
pub fn plot_curves(run_dir: &std::path::Path, summary: &TrainSummary) -> Result<()> {
    crate::eval::plot::plot_training_curves(
        &curve_points(&summary.epochs),
        &run_dir.join("training_curves.png"),
    )
}

/// The points of the training curves: every epoch of a single model; of an ensemble, those of
/// its first member (the others' are in `metrics.jsonl`, tagged `member`).
pub fn curve_points(epochs: &[EpochMetrics]) -> Vec<crate::eval::plot::CurvePoint> {
    epochs
        .iter()
        .filter(|m| m.member.unwrap_or(0) == 0)
        .map(|m| crate::eval::plot::CurvePoint {
            epoch: m.epoch as f64,
            train_loss: Some(m.train_loss),
            val_loss: m.val_loss,
            val_accuracy: m.val_accuracy,
        })
        .collect()
}
