//! How a training run reports progress to its caller. The library never prints: it calls a
//! [`TrainObserver`], whose default methods log through `tracing`. The `protloc` command line
//! passes one that prints the reference workflow's metric lines on stdout.
//!
//! Under data-parallel training only the root rank (rank 0) calls the observer.

use std::fmt;
use std::path::Path;

use super::metrics::ValidationMetrics;
use super::EpochMetrics;

/// Receives a training run's events. Every method has a default that logs the event through
/// `tracing` (at `info`), so an observer overrides only what it shows itself.
///
/// A closure `FnMut(&EpochMetrics)` is an observer that sees every epoch (the other events
/// are logged).
pub trait TrainObserver {
    /// An epoch finished; `metrics` is the line just appended to `metrics.jsonl` (each
    /// ensemble member's epochs in turn, tagged with the member).
    fn on_epoch(&mut self, metrics: &EpochMetrics) {
        tracing::info!(
            epoch = metrics.epoch,
            step = metrics.step,
            member = metrics.member,
            "{}",
            metrics.reference_lines().join("; ")
        );
    }

    /// `--init-head`: the starting model's validation metrics, before any step. It is the
    /// first candidate for the saved model: an epoch replaces it only by beating it.
    fn on_start(&mut self, start: &StartingPoint) {
        tracing::info!("{start}");
    }

    /// The run continues from a checkpoint (`protloc train --resume`).
    fn on_resume(&mut self, resumed: &Resumed<'_>) {
        tracing::info!("{resumed}");
    }

    /// The frozen-encoder paths are about to fill the embedding cache (or found every
    /// protein in it).
    fn on_embedding(&mut self, embedding: &Embedding<'_>) {
        tracing::info!("{embedding}");
    }

    /// A step of a two-step run starts (`--probe-epochs`: the probe, then fine-tuning).
    fn on_phase(&mut self, phase: &Phase<'_>) {
        tracing::info!("{phase}");
    }

    /// An ensemble member starts training (ensembles only).
    fn on_member(&mut self, member: &MemberStart) {
        tracing::info!("{member}");
    }

    /// A resumed ensemble restored a member an earlier run finished (`protloc train
    /// --resume`); it is not trained again.
    fn on_member_restored(&mut self, restored: &MemberRestored<'_>) {
        tracing::info!("{restored}");
    }
}

/// Logs every event through `tracing`: what [`super::train`] and [`super::resume`] use.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogObserver;

impl TrainObserver for LogObserver {}

impl<F: FnMut(&EpochMetrics)> TrainObserver for F {
    fn on_epoch(&mut self, metrics: &EpochMetrics) {
        self(metrics)
    }
}

impl EpochMetrics {
    /// The reference workflow's metric lines for this epoch, in its exact wording:
    /// `Epoch N (step S):`, `Training Loss: ...`, and with a validation set
    /// `Validation Accuracy: ...`, `Validation loss: ...` (and
    /// `Validation membrane accuracy (Q2): ...` when membrane flags are known).
    pub fn reference_lines(&self) -> Vec<String> {
        let mut lines = vec![
            format!("Epoch {} (step {}):", self.epoch, self.step),
            format!("Training Loss: {}", self.train_loss),
        ];
        if let (Some(acc), Some(loss)) = (self.val_accuracy, self.val_loss) {
            lines.push(format!("Validation Accuracy: {acc}"));
            lines.push(format!("Validation loss: {loss}"));
        }
        if let Some(q2) = self.val_membrane_accuracy {
            lines.push(format!("Validation membrane accuracy (Q2): {q2}"));
        }
        lines
    }
}

/// The model a `--init-head` run starts from, on the validation set (epoch 0).
#[derive(Debug, Clone, Copy)]
pub struct StartingPoint {
    pub validation: ValidationMetrics,
}

impl fmt::Display for StartingPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.validation;
        write!(
            f,
            "Epoch 0 (the starting model): Validation Accuracy: {}, Validation loss: {}",
            v.accuracy, v.loss
        )?;
        if let Some(q2) = v.membrane_accuracy {
            write!(f, ", Validation membrane accuracy (Q2): {q2}")?;
        }
        write!(f, "; an epoch is saved only if it beats this")
    }
}

/// Where a resumed run continues from.
#[derive(Debug, Clone, Copy)]
pub struct Resumed<'a> {
    pub checkpoint: &'a Path,
    pub epoch: usize,
    pub step: usize,
}

impl fmt::Display for Resumed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "resuming from {} (epoch {}, step {})",
            self.checkpoint.display(),
            self.epoch,
            self.step
        )
    }
}

/// The embedding cache before a frozen-encoder run trains: `missing` proteins to embed,
/// `cached` already there.
#[derive(Debug, Clone, Copy)]
pub struct Embedding<'a> {
    pub cache: &'a Path,
    pub missing: usize,
    pub cached: usize,
}

impl fmt::Display for Embedding<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.missing > 0 {
            write!(
                f,
                "embedding {} proteins into {} ({} already cached)",
                self.missing,
                self.cache.display(),
                self.cached
            )
        } else {
            write!(
                f,
                "all {} proteins found in the embedding cache {}",
                self.cached,
                self.cache.display()
            )
        }
    }
}

/// A step of `train --train-top-layers K --probe-epochs N` about to start.
#[derive(Debug, Clone, Copy)]
pub enum Phase<'a> {
    /// Step 1: a fresh head on the frozen encoder's output, saved in `output`.
    Probe { epochs: usize, output: &'a Path },
    /// Step 2: the top `layers` layers and the probe's head, saved in `output`.
    FineTune {
        layers: usize,
        epochs: usize,
        output: &'a Path,
    },
}

impl fmt::Display for Phase<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Probe { epochs, output } => write!(
                f,
                "Step 1 of 2 (probe): a head on the frozen encoder for {epochs} epoch(s), saved in {}",
                output.display()
            ),
            Phase::FineTune {
                layers,
                epochs,
                output,
            } => write!(
                f,
                "Step 2 of 2 (fine-tuning): the top {layers} layer(s) and the probe's head for \
                 {epochs} epoch(s), saved in {}",
                output.display()
            ),
        }
    }
}

/// An ensemble member about to train: member `member` (from 0) of `members`.
#[derive(Debug, Clone, Copy)]
pub struct MemberStart {
    pub member: usize,
    pub members: usize,
    pub seed: u64,
    pub train_records: usize,
    pub val_records: usize,
    /// The partition it validates on, or `None` for a stratified split.
    pub holdout_partition: Option<u32>,
}

impl fmt::Display for MemberStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held_out = match self.holdout_partition {
            Some(p) => format!("partition {p}"),
            None => "stratified split".into(),
        };
        write!(
            f,
            "Member {} of {} (seed {}): {} training proteins, {} validation ({held_out})",
            self.member, self.members, self.seed, self.train_records, self.val_records
        )
    }
}

/// A finished ensemble member restored from the run directory: member `member` (from 0) of
/// `members`, read from `record`.
#[derive(Debug, Clone, Copy)]
pub struct MemberRestored<'a> {
    pub member: usize,
    pub members: usize,
    pub record: &'a Path,
    pub best_epoch: usize,
    pub val_accuracy: Option<f64>,
}

impl fmt::Display for MemberRestored<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Member {} of {} restored from {} (best epoch {}",
            self.member,
            self.members,
            self.record.display(),
            self.best_epoch
        )?;
        match self.val_accuracy {
            Some(acc) => write!(f, ", validation accuracy {acc:.4})"),
            None => write!(f, ")"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(val: bool, q2: bool) -> EpochMetrics {
        EpochMetrics {
            epoch: 2,
            step: 14,
            train_loss: 1.25,
            val_loss: val.then_some(0.5),
            val_accuracy: val.then_some(0.75),
            val_membrane_accuracy: q2.then_some(0.875),
            lr: 1e-3,
            elapsed_s: 1.0,
            member: None,
            val_records: None,
        }
    }

    #[test]
    fn reference_lines_keep_the_reference_wording() {
        assert_eq!(
            metrics(true, true).reference_lines(),
            [
                "Epoch 2 (step 14):",
                "Training Loss: 1.25",
                "Validation Accuracy: 0.75",
                "Validation loss: 0.5",
                "Validation membrane accuracy (Q2): 0.875",
            ]
        );
        assert_eq!(
            metrics(false, false).reference_lines(),
            ["Epoch 2 (step 14):", "Training Loss: 1.25"]
        );
    }

    #[test]
    fn a_closure_observes_epochs() {
        let mut seen = Vec::new();
        {
            let mut f = |m: &EpochMetrics| seen.push(m.epoch);
            let obs: &mut dyn TrainObserver = &mut f;
            obs.on_epoch(&metrics(true, false));
            obs.on_member(&MemberStart {
                member: 0,
                members: 2,
                seed: 1,
                train_records: 3,
                val_records: 1,
                holdout_partition: None,
            });
        }
        assert_eq!(seen, [2]);
    }
}
