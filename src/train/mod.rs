//! Training: `TrainOptions` -> `TrainArgs` (args), data reading and splitting (plan), model
//! and example setup (setup), the fine-tuning loop (fine_tune) with its optimizer (optim),
//! loss (objective), validation (validation), checkpoints (checkpoint) and metrics
//! (metrics); heads on cached encoder states take the faster path in `frozen`, and `probe`
//! chains two such runs (a head on the frozen encoder, then its top layers fine-tuned).

pub mod args;
pub mod checkpoint;
pub mod device_check;
mod fine_tune;
pub mod frozen;
pub mod members;
pub mod metrics;
pub mod objective;
pub mod observe;
pub mod optim;
mod plan;
pub mod probe;
mod setup;
mod validation;

use anyhow::{bail, Context, Result};

use crate::dist::{Collective, Local};

pub use crate::infer::{effective_max_residues, DEFAULT_MAX_RESIDUES};
pub use args::{default_head_dropout, TrainArgs, TrainOptions};
pub use metrics::{
    curve_points, plot_curves, validation_metrics, EpochMetrics, TrainSummary, ValidationMetrics,
};
pub use observe::{LogObserver, TrainObserver};
pub use setup::default_labels;

/// Continues the run in `run_dir` from its newest intact checkpoint, with the arguments
/// it was started with (`training_args.json`); an ensemble on cached states (`--frozen
/// --ensemble N`, `--folds N`) continues after its last finished member (see [`members`]).
pub fn resume(run_dir: &std::path::Path) -> Result<TrainSummary> {
    resume_with(run_dir, &Local)
}

/// [`resume`] as one rank of a data-parallel job: every rank reads the run directory (it
/// must be on a file system they share) and must be started with the same world size.
pub fn resume_with(run_dir: &std::path::Path, comm: &dyn Collective) -> Result<TrainSummary> {
    resume_observed(run_dir, Default::default(), comm, &mut LogObserver)
}

/// [`resume_with`], reporting epochs and the checkpoint it resumes from to `observer` (on
/// the root rank only).
pub fn resume_observed(
    run_dir: &std::path::Path,
    device: crate::device::DeviceSpec,
    comm: &dyn Collective,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    let path = run_dir.join("training_args.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read; is this a run directory?", path.display()))?;
    let mut args: TrainArgs = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid training arguments", path.display()))?;
    args.output = run_dir.to_path_buf();
    args.device = device;
    if args.frozen || args.train_top_layers > 0 {
        // Cached-state runs keep no step checkpoints: an ensemble keeps its finished members.
        if args.members() == 1 {
            bail!(
                "{}: a single head on cached states saves its best epoch as it trains and \
                 keeps no checkpoints to resume from; run `protloc train` again (the \
                 embedding cache makes it start at once)",
                run_dir.display()
            );
        }
        args.resume_members = true;
        return train_observed(&args, comm, observer);
    }
    args.resume_from = Some(std::sync::Arc::new(checkpoint::load_latest(run_dir)?));
    if args.save_every_steps == 0 {
        bail!(
            "{}: the run was started without checkpoints (--save-every-steps)",
            run_dir.display()
        );
    }
    if args.world_size != comm.world_size() {
        bail!(
            "{}: the run was trained on {} process(es); resume it with the same number (now {})",
            run_dir.display(),
            args.world_size,
            comm.world_size()
        );
    }
    train_observed(&args, comm, observer)
}

/// Runs `protloc train` in this process alone, logging each epoch through `tracing` (see
/// [`train_observed`] to receive them).
pub fn train(args: &TrainArgs) -> Result<TrainSummary> {
    train_with(args, &Local)
}

/// Runs `protloc train` as one rank of a data-parallel job (or alone, with [`Local`]).
///
/// Every rank holds the whole model and walks the same seeded epoch order of *global*
/// batches of `batch_size x world_size` proteins; rank r computes every world-th member of
/// each. Gradients are summed across ranks, each rank having weighted its own by its share
/// of the global batch, so the update is the one a single process would take with the
/// global batch (up to floating-point summation order), and every rank takes it. Only
/// rank 0 writes files.
pub fn train_with(args: &TrainArgs, comm: &dyn Collective) -> Result<TrainSummary> {
    train_observed(args, comm, &mut LogObserver)
}

/// [`train_with`], reporting each epoch's metrics (the lines of `metrics.jsonl`, in order)
/// and the run's other events to `observer`. Only the root rank calls it.
pub fn train_observed(
    args: &TrainArgs,
    comm: &dyn Collective,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    args.validate()?;
    let world = comm.world_size();
    if args.frozen || args.train_top_layers > 0 {
        if world > 1 {
            bail!(
                "--frozen and --train-top-layers train on cached embeddings (minutes per epoch): \
                 run them as one process, not under a launcher ({world} ranks here)"
            );
        }
        if args.probe_epochs > 0 {
            return probe::train_observed(args, observer);
        }
        return frozen::train_observed(args, observer);
    }
    fine_tune::run(args, comm, observer)
}
