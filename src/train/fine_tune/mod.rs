//! The fine-tuning loop: the encoder (or its LoRA adapters) and the head train together, in
//! one process or as one rank of a data-parallel job. This file sets a run up (model, data,
//! optimizer, the state to start from); [`epoch_loop`] trains it.

mod epoch_loop;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dist::Collective;
use crate::model::{self, Precision, SequenceClassifier, TaskConfig};
use crate::train::checkpoint::{self, LoopState, RngState};
use crate::train::metrics::TrainSummary;
use crate::train::objective::Objective;
use crate::train::observe::{self, TrainObserver};
use crate::train::optim::{self, LinearSchedule, Optimizer};
use crate::train::plan::prepare_data;
use crate::train::setup::{
    checkpoint_task, continued_task, encode_examples, prepare_encoder, resolve_membrane,
    run_tokenization, trains, Examples,
};
use crate::train::TrainArgs;

use epoch_loop::Loop;

/// Why `--precision bf16` is refused on the CPU (measured with `protloc check-device`).
pub(crate) const BF16_ON_CPU: &str = "--precision bf16 runs on GPUs (--device cuda): on the CPU, \
     candle's bf16 matrix products convert to f32, and a bf16 ESM-2 8M training step measured \
     3-4x the time of the fused fp32 step (batch 4 x 128 residues); `protloc check-device --device cpu --precision bf16` \
     checks the bf16 code path on the CPU";

/// A fine-tuning run's model, ready to train, and its encoded data.
struct Prepared {
    model: SequenceClassifier,
    train_set: Examples,
    val_set: Examples,
    objective: Objective,
    /// The encoder's parameter prefix (`bert`, `esm`).
    prefix: &'static str,
    /// LoRA adapters train instead of the encoder's weights.
    lora: bool,
    max_res: usize,
    /// The run's [`crate::data::split::SPLIT_FILE`].
    split_table: Vec<u8>,
}

/// Fine-tunes as [`super::train_observed`] describes (arguments already validated).
pub(super) fn run(
    args: &TrainArgs,
    comm: &dyn Collective,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    let world = comm.world_size();
    let root = comm.is_root();
    let device = args.device.resolve_here()?;
    if args.precision == Precision::Bf16 && device.is_cpu() {
        bail!("{BF16_ON_CPU}");
    }
    let t0 = Instant::now();

    let Prepared {
        mut model,
        train_set,
        val_set,
        objective,
        prefix,
        lora,
        max_res,
        split_table,
    } = prepare(args, &device)?;
    if world > 1 {
        check_same_run(args, comm)?;
    }
    let (mut opt, trainable, total_params) = build_optimizer(&model, args, prefix, lora)?;
    // Optimizer steps count global batches: the schedule is the same on every rank and the
    // same as a single process with the global batch size.
    let global_batch = args.batch_size * world;
    let steps_per_epoch = train_set
        .len()
        .div_ceil(global_batch)
        .div_ceil(args.grad_accum);
    // --scale-lr-by-world: the reference multiplies LAMB's rate by its number of ranks; the
    // head's rate follows (it is a multiple of --lr, see `build_optimizer`).
    let peak_lr = if args.scale_lr_by_world {
        args.lr * world as f64
    } else {
        args.lr
    };
    let schedule = LinearSchedule::for_run(
        peak_lr,
        args.warmup_ratio,
        steps_per_epoch,
        args.epochs,
        args.max_steps,
    );

    if root {
        write_args(args, args.init_head.then_some(&model.task), world)?;
        crate::artifacts::write_atomic(
            &args.output.join(crate::data::split::SPLIT_FILE),
            &split_table,
        )?;
    }
    let metrics_path = args.output.join("metrics.jsonl");
    if world > 1 && root {
        tracing::info!(
            ranks = world,
            backend = comm.backend(),
            per_rank_batch = args.batch_size,
            global_batch,
            "data-parallel training"
        );
    }
    tracing::info!(
        train = train_set.len(),
        val = val_set.len(),
        trainable,
        total = total_params,
        steps = schedule.total_steps,
        max_residues = max_res,
        "starting training"
    );

    let st = start_state(
        args,
        &model,
        &mut opt,
        &metrics_path,
        root,
        observer,
        &device,
    )?;
    // Rank 0's weights for everyone, whatever each rank loaded (see `broadcast_params`).
    crate::dist::broadcast_params(comm, &model.base.store.vars())?;
    let shapes: Vec<candle_core::Shape> =
        opt.slots().iter().map(|s| s.var.shape().clone()).collect();
    let mut run = Loop {
        args,
        comm,
        world,
        rank: comm.rank(),
        root,
        profile: world > 1 && std::env::var_os("PROTLOC_DIST_PROFILE").is_some(),
        global_batch,
        schedule,
        shapes,
        objective,
        device,
        // A handle on the parameters (shared, not copied): the model itself is updated
        // between checkpoints (tuned thresholds).
        store: model.base.store.clone(),
        comm_s: 0.0,
        comm_wait_s: 0.0,
        train_loop_s: 0.0,
    };
    let st = run.epochs(
        &mut model,
        &mut opt,
        &train_set,
        &val_set,
        st,
        &metrics_path,
        &t0,
        observer,
    )?;
    let history = st.history;
    let best = st.best;

    let best_epoch = best.map_or(history.len(), |b| b.2);
    if root && st.step > 0 {
        tracing::info!(
            ranks = world,
            steps = st.step,
            s_per_step = format!("{:.3}", run.train_loop_s / st.step as f64),
            comm_share = format!("{:.1}%", 100.0 * run.comm_s / run.train_loop_s.max(1e-9)),
            waiting_share = format!(
                "{:.1}%",
                100.0 * run.comm_wait_s / run.train_loop_s.max(1e-9)
            ),
            "training loop"
        );
    }
    Ok(TrainSummary {
        epochs: history,
        best_epoch,
        steps: st.step,
        train_records: train_set.len(),
        val_records: val_set.len(),
        trainable_parameters: trainable,
        total_parameters: total_params,
        world_size: world,
        train_loop_s: run.train_loop_s,
        comm_s: run.comm_s,
        comm_wait_s: run.comm_wait_s,
        members: Vec::new(),
    })
}

/// Reads and splits the data, loads the model (with `--dropout`, frozen layers and LoRA
/// applied) and encodes the training and validation proteins.
fn prepare(args: &TrainArgs, device: &Device) -> Result<Prepared> {
    let (dataset, train_idx, val_idx) = prepare_data(args)?;

    // Model.
    let mut base = model::load_base(&args.model, args.seed, device, model::Purpose::Training)?;
    if let Some(p) = args.dropout {
        base.cfg.hidden_dropout_prob = p;
        base.cfg.attention_probs_dropout_prob = p;
        // The encoder copied its config at construction; rebuild it from the same store
        // (parameters are shared, nothing is re-read).
        base.encoder = model::Encoder::new(&base.store.initialising(), &base.cfg)?;
    }
    base.encoder.set_precision(args.precision);
    let layers = base.cfg.num_hidden_layers;
    if args.freeze_layers > layers {
        bail!(
            "--freeze-layers {} but the model has only {layers} layers",
            args.freeze_layers
        );
    }
    let lora = prepare_encoder(&mut base, args.freeze_layers, &args.lora)?;
    // --init-head: the checkpoint's own task (labels, head, tokenization) is the run's.
    let start = args.init_head.then(|| checkpoint_task(args)).transpose()?;
    let (labels, max_res, truncate) = run_tokenization(&mut base, start.as_ref(), args)?;
    let pick = |idx: &[usize]| idx.iter().map(|&i| &dataset.records[i]).collect::<Vec<_>>();
    let multi_label = args.multi_label; // the checkpoint's too (checkpoint_task)
    let encode = |idx: &[usize]| {
        encode_examples(&base, &pick(idx), &labels, max_res, truncate, multi_label).with_context(
            || match &start {
                Some(_) => format!(
                    "--init-head: {} predicts {labels:?}; every training label must be one of them",
                    args.model
                ),
                None => "cannot read the training labels".into(),
            },
        )
    };
    let (train_set, val_set) = (encode(&train_idx)?, encode(&val_idx)?);
    let split_table = crate::data::split::split_table(&dataset.records, &[(&train_idx, &val_idx)])?;
    let prefix = base.cfg.arch().prefix();
    let (model, membrane) = match start {
        Some(task) => {
            let task = continued_task(task, args, max_res, false);
            let membrane = task.membrane;
            (
                SequenceClassifier::with_checkpoint_head(base, task)?,
                membrane,
            )
        }
        None => {
            let membrane = resolve_membrane(args.membrane, &train_set.targets, false);
            let task = args.task_config(labels.clone(), max_res, membrane);
            (SequenceClassifier::new(base, task)?, membrane)
        }
    };
    let objective = Objective {
        class_weights: Objective::class_weights(
            &train_set.targets,
            labels.len(),
            args.class_weighting,
        ),
        multi_label,
        membrane,
    };
    Ok(Prepared {
        model,
        train_set,
        val_set,
        objective,
        prefix,
        lora: lora.is_some(),
        max_res,
        split_table,
    })
}

/// Before any real work is shared: a rank started with other arguments or another copy of
/// the data would otherwise train silently on a different problem.
fn check_same_run(args: &TrainArgs, comm: &dyn Collective) -> Result<()> {
    let fingerprint = serde_json::json!({
        "args": serde_json::to_value(args)?,
        "data_digest": crate::dist::file_digest(&args.data)?,
        "resume_step": args.resume_from.as_ref().map(|c| c.state.step),
        "world_size": comm.world_size(),
        "protloc_version": env!("CARGO_PKG_VERSION"),
    });
    crate::dist::check_same_config(comm, &fingerprint)
}

/// AdamW over the parameters that train (the head at `--head-lr`, no weight decay on
/// biases and norms); also returns (trainable, total) parameter counts.
fn build_optimizer(
    model: &SequenceClassifier,
    args: &TrainArgs,
    prefix: &str,
    lora: bool,
) -> Result<(Optimizer, usize, usize)> {
    let head_lr_scale = args.head_lr.map_or(1.0, |h| h / args.lr);
    let mut params = Vec::new();
    let mut total_params = 0;
    for (name, var) in model.base.store.vars() {
        total_params += var.elem_count();
        if !trains(&name, prefix, args.freeze_layers, lora) {
            continue;
        }
        let scale = if model::is_head_param(&name) {
            head_lr_scale
        } else {
            1.0
        };
        let wd = if optim::no_decay(&name) {
            0.0
        } else {
            args.weight_decay
        };
        params.push((name, var, scale, wd));
    }
    let trainable: usize = params.iter().map(|p| p.1.elem_count()).sum();
    let opt = Optimizer::with_rule(args.optimizer, params)?;
    Ok((opt, trainable, total_params))
}

/// Creates the run directory and saves `training_args.json` (root rank only), with the
/// checkpoint's head settings when `--init-head` continued `start`.
fn write_args(args: &TrainArgs, start: Option<&TaskConfig>, world: usize) -> Result<()> {
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let mut saved = args.as_run(start);
    saved.world_size = world;
    crate::artifacts::write_atomic(
        &args.output.join("training_args.json"),
        serde_json::to_string_pretty(&saved)?.as_bytes(),
    )
}

/// Where the loop starts: a resumed run's checkpoint (weights, optimizer moments and the
/// metrics log restored), or a fresh state (the old log and checkpoints removed).
#[allow(clippy::too_many_arguments)]
fn start_state(
    args: &TrainArgs,
    model: &SequenceClassifier,
    opt: &mut Optimizer,
    metrics_path: &std::path::Path,
    root: bool,
    observer: &mut dyn TrainObserver,
    device: &Device,
) -> Result<LoopState> {
    Ok(match &args.resume_from {
        Some(ckpt) => {
            for (name, var) in model.base.store.vars() {
                let t = ckpt.model.get(&name).with_context(|| {
                    format!("{}: checkpoint lacks parameter {name}", ckpt.dir.display())
                })?;
                var.set(&t.to_device(device)?)?;
            }
            opt.import_moments(&ckpt.optimizer, ckpt.adam_step)?;
            // The log on disk may hold epochs finished after this checkpoint was taken.
            let lines: Vec<String> = ckpt
                .state
                .history
                .iter()
                .map(|m| serde_json::to_string(m).map_err(Into::into))
                .collect::<Result<_>>()?;
            let mut text = lines.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            if root {
                crate::artifacts::write_atomic(metrics_path, text.as_bytes())?;
                observer.on_resume(&observe::Resumed {
                    checkpoint: &ckpt.dir,
                    epoch: ckpt.state.epoch,
                    step: ckpt.state.step,
                });
            }
            ckpt.state.clone()
        }
        None => {
            // A new run starts a new log and no checkpoints.
            if root {
                let _ = std::fs::remove_file(metrics_path);
                let _ = std::fs::remove_dir_all(checkpoint::checkpoints_dir(&args.output));
            }
            LoopState {
                epoch: 1,
                next_batch: 0,
                step: 0,
                epoch_rng: RngState::of(&ChaCha8Rng::seed_from_u64(args.seed)),
                dropout_rng: RngState::of(&ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed_d20f_u64)),
                rank_dropout_pos: Vec::new(),
                loss_sum: 0.0,
                loss_n: 0,
                bad_steps: 0,
                history: Vec::new(),
                best: None,
            }
        }
    })
}
