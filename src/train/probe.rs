//! `train --train-top-layers K --probe-epochs N`: linear probing, then fine-tuning (LP-FT),
//! in one run. A fresh head first trains for N epochs on the frozen encoder's output (the
//! probe, a complete model in `RUN/probe`); the top K layers then fine-tune together with
//! that head, exactly as `train --train-top-layers K --init-head --model RUN/probe` would.
//!
//! The two steps are two ordinary cached-state runs: this module only derives their
//! arguments, so the one-command run and the two commands train the same model.

use anyhow::Result;

use super::observe::{Phase, TrainObserver};
use super::{frozen, TrainArgs, TrainSummary};

/// The probe's directory inside the run directory.
pub const PROBE_DIR: &str = "probe";

/// Runs both steps; returns the fine-tuning step's summary (the run directory's model).
pub(crate) fn train_observed(
    args: &TrainArgs,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    let probe = probe_args(args);
    observer.on_phase(&Phase::Probe {
        epochs: probe.epochs,
        output: &probe.output,
    });
    frozen::train_observed(&probe, observer)?;
    let tune = fine_tune_args(args);
    observer.on_phase(&Phase::FineTune {
        layers: tune.train_top_layers,
        epochs: tune.epochs,
        output: &tune.output,
    });
    frozen::train_observed(&tune, observer)
}

/// Step 1: `--frozen` with the run's head, data, split and seed, for `probe_epochs` epochs
/// at the head's learning rate, into `RUN/probe`, on the probe cache.
pub(crate) fn probe_args(args: &TrainArgs) -> TrainArgs {
    let mut probe = args.clone();
    probe.frozen = true;
    probe.train_top_layers = 0;
    probe.lora.rank = 0;
    probe.epochs = args.probe_epochs;
    probe.lr = args.head_lr.unwrap_or(args.lr);
    probe.head_lr = None;
    probe.output = args.output.join(PROBE_DIR);
    probe.cache = Some(
        args.probe_cache
            .clone()
            .unwrap_or_else(|| args.cache_dir().join("encoder-output")),
    );
    probe.probe_epochs = 0;
    probe.probe_cache = None;
    probe
}

/// Step 2: the run as given, continuing the probe's head (`--init-head --model RUN/probe`);
/// its `training_args.json` records it so.
pub(crate) fn fine_tune_args(args: &TrainArgs) -> TrainArgs {
    let mut tune = args.clone();
    tune.model = args.output.join(PROBE_DIR).to_string_lossy().into_owned();
    tune.init_head = true;
    tune.cache = Some(args.cache_dir());
    tune.probe_epochs = 0;
    tune.probe_cache = None;
    tune
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::TrainOptions;

    fn lpft(cache: Option<&str>, probe_cache: Option<&str>) -> TrainArgs {
        TrainOptions {
            train_top_layers: 1,
            probe_epochs: Some(3),
            epochs: Some(2),
            cache: cache.map(Into::into),
            probe_cache: probe_cache.map(Into::into),
            ..TrainOptions::default()
        }
        .resolve("esm", "data.fasta".into(), "run".into())
    }

    #[test]
    fn the_probe_is_a_frozen_run_at_the_head_rate() {
        let args = lpft(Some("c"), None);
        args.validate().unwrap();
        let p = probe_args(&args);
        p.validate().unwrap();
        assert!(p.frozen && p.train_top_layers == 0 && p.probe_epochs == 0);
        assert_eq!((p.epochs, p.lr, p.head_lr), (3, 1e-3, None));
        assert_eq!(p.output, std::path::Path::new("run/probe"));
        assert_eq!(
            p.cache.as_deref(),
            Some(std::path::Path::new("c/encoder-output"))
        );
        // What decides the split and the head is the run's.
        assert_eq!(
            (
                p.seed,
                p.val_fraction,
                p.batch_size,
                p.head_dropout(),
                p.pool
            ),
            (
                args.seed,
                args.val_fraction,
                args.batch_size,
                args.head_dropout(),
                args.pool
            )
        );
        let given = probe_args(&lpft(None, Some("out-cache")));
        assert_eq!(
            given.cache.as_deref(),
            Some(std::path::Path::new("out-cache"))
        );
        let default = probe_args(&lpft(None, None));
        assert_eq!(
            default.cache.as_deref(),
            Some(std::path::Path::new("run/embedding_cache/encoder-output"))
        );
    }

    #[test]
    fn fine_tuning_continues_the_probe() {
        let args = lpft(None, None);
        let t = fine_tune_args(&args);
        t.validate().unwrap();
        assert_eq!(t.model, "run/probe");
        assert!(t.init_head && t.probe_epochs == 0 && t.probe_cache.is_none());
        assert_eq!((t.epochs, t.lr, t.head_lr), (2, 1e-4, Some(1e-3)));
        assert_eq!(t.train_top_layers, 1);
        assert_eq!(
            t.cache.as_deref(),
            Some(std::path::Path::new("run/embedding_cache"))
        );
    }

    #[test]
    fn probe_epochs_need_top_layers_and_no_init_head() {
        let mut args = lpft(None, None);
        args.train_top_layers = 0;
        let err = args.validate().unwrap_err().to_string();
        assert!(err.contains("--train-top-layers"), "{err}");
        let mut args = lpft(None, None);
        args.init_head = true;
        let err = args.validate().unwrap_err().to_string();
        assert!(err.contains("--init-head"), "{err}");
        let mut args = lpft(None, Some("x"));
        args.probe_epochs = 0;
        let err = args.validate().unwrap_err().to_string();
        assert!(err.contains("--probe-cache"), "{err}");
    }
}
