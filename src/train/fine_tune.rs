//! The fine-tuning loop: the encoder (or its LoRA adapters) and the head train together, in
//! one process or as one rank of a data-parallel job.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, gather_word_pos, rank_dropout_rng, LoopState, RngState};
use super::metrics::{record_epoch, save_best, TrainSummary};
use super::objective::{Objective, Target};
use super::observe::{self, TrainObserver};
use super::optim::{self, LinearSchedule, Optimizer, OptimizerConfig};
use super::plan::prepare_data;
use super::setup::{
    default_labels, encode_examples, prepare_encoder, resolve_membrane, trains, Examples,
};
use super::validation::finish_epoch;
use super::TrainArgs;
use crate::dist::Collective;
use crate::infer::{effective_max_residues, BatchLimits};
use crate::model::{self, SequenceClassifier};
use crate::tokenize::{bucketed_groups, Encoded, TokenBatch};

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
    let t0 = Instant::now();

    let Prepared {
        mut model,
        train_set,
        val_set,
        objective,
        prefix,
        lora,
        max_res,
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
        write_args(args, world)?;
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
    let layers = base.cfg.num_hidden_layers;
    if args.freeze_layers > layers {
        bail!(
            "--freeze-layers {} but the model has only {layers} layers",
            args.freeze_layers
        );
    }
    let lora = prepare_encoder(&mut base, args.freeze_layers, &args.lora)?;
    // --init-head: the checkpoint's own task (labels, head, tokenization) is the run's.
    let start = if args.init_head {
        Some(checkpoint_task(args)?)
    } else {
        None
    };
    if start.as_ref().is_some_and(|t| t.keep_rare_residues) {
        base.tokenizer = base.tokenizer.keeping_rare_residues();
    }
    let (labels, max_res, truncate) = match &start {
        Some(t) => (
            t.labels.clone(),
            args.max_residues.map_or(Ok(t.max_residues), |m| {
                effective_max_residues(&base.cfg, Some(m))
            })?,
            t.truncate,
        ),
        None => (
            default_labels(),
            effective_max_residues(&base.cfg, args.max_residues)?,
            args.truncate,
        ),
    };
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
    let prefix = base.cfg.arch().prefix();
    let (model, membrane) = match start {
        Some(mut task) => {
            task.base_model = args.model.clone();
            task.protloc_version = env!("CARGO_PKG_VERSION").into();
            task.max_residues = max_res;
            task.frozen_encoder = false;
            task.members.clear();
            if let Some(d) = args.dropout {
                task.head_dropout = d;
            }
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
    })
}

/// `train --init-head`: the task of the classifier `args.model` holds, as `eval` reads it.
fn checkpoint_task(args: &TrainArgs) -> Result<model::TaskConfig> {
    let path = std::path::Path::new(&args.model);
    if !path.is_dir() {
        bail!(
            "--init-head needs --model to be a local directory with a classifier (a protloc run \
             or a transformers *ForSequenceClassification directory), not {}",
            args.model
        );
    }
    let task = model::import::resolve(path, None)
        .with_context(|| format!("--init-head: {} has no classifier head", args.model))?
        .task;
    if task.multi_label != args.multi_label {
        bail!(
            "--init-head: {} is a {} model; {} --multi-label",
            args.model,
            if task.multi_label {
                "multi-label"
            } else {
                "single-label"
            },
            if task.multi_label { "add" } else { "drop" }
        );
    }
    Ok(task)
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
    let opt = Optimizer::new(
        OptimizerConfig {
            rule: args.optimizer,
            ..OptimizerConfig::default()
        },
        params,
    )?;
    Ok((opt, trainable, total_params))
}

/// Creates the run directory and saves `training_args.json` (root rank only).
fn write_args(args: &TrainArgs, world: usize) -> Result<()> {
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let mut saved = args.clone();
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

/// The fine-tuning loop's settings, fixed for the run, and its timers.
struct Loop<'a> {
    args: &'a TrainArgs,
    comm: &'a dyn Collective,
    world: usize,
    rank: usize,
    root: bool,
    /// Time a barrier before each gradient all-reduce (PROTLOC_DIST_PROFILE).
    profile: bool,
    global_batch: usize,
    schedule: LinearSchedule,
    /// Shapes of the optimizer's parameters (for the gradient all-reduce).
    shapes: Vec<candle_core::Shape>,
    objective: Objective,
    device: Device,
    store: crate::model::params::ParamStore,
    comm_s: f64,
    comm_wait_s: f64,
    train_loop_s: f64,
}

impl Loop<'_> {
    /// Trains epochs from `st` on, validating, logging and keeping the best model after
    /// each; returns the final state.
    #[allow(clippy::too_many_arguments)]
    fn epochs(
        &mut self,
        model: &mut SequenceClassifier,
        opt: &mut Optimizer,
        train_set: &Examples,
        val_set: &Examples,
        mut st: LoopState,
        metrics_path: &std::path::Path,
        t0: &Instant,
        observer: &mut dyn TrainObserver,
    ) -> Result<LoopState> {
        let args = self.args;
        let limits = BatchLimits {
            max_batch_tokens: args.eval_batch_tokens,
            max_batch_size: 64,
        };
        let lengths: Vec<usize> = train_set.enc.iter().map(|e| e.ids.len()).collect();
        // This rank's share of the validation set, fixed for the whole run.
        let val_shard = (self.world > 1).then(|| val_set.shard(self.rank, self.world));
        let val_local = val_shard.as_ref().unwrap_or(val_set);
        let mut dropout_rng = rank_dropout_rng(&st, self.rank, self.world)?;
        while st.epoch <= args.epochs {
            let epoch = st.epoch;
            let mut shuffle_rng = st.epoch_rng.restore()?;
            let mut order: Vec<usize> = (0..train_set.len()).collect();
            order.shuffle(&mut shuffle_rng);
            // The same global batches on every rank (same seed, same data).
            let batches =
                bucketed_groups(&order, &lengths, self.global_batch, 50, &mut shuffle_rng);
            let next_epoch_rng = RngState::of(&shuffle_rng);
            let stop =
                self.epoch_batches(model, opt, train_set, &batches, &mut st, &mut dropout_rng)?;
            let m = finish_epoch(
                model,
                self.comm,
                val_local,
                val_set.len(),
                limits,
                epoch,
                st.step,
                st.loss_sum / st.loss_n.max(1) as f64,
                self.schedule.lr(st.step.saturating_sub(1)),
                t0,
            )?;
            let epoch_done = m.epoch;
            let observer = self.root.then_some(&mut *observer);
            if record_epoch(observer, metrics_path, m, &mut st.history, &mut st.best)? && self.root
            {
                save_best(model, &args.output, epoch_done)?;
            }
            st.epoch += 1;
            st.next_batch = 0;
            st.epoch_rng = next_epoch_rng;
            st.loss_sum = 0.0;
            st.loss_n = 0;
            st.dropout_rng = RngState::of(&dropout_rng);
            // Epoch ends are natural resume points; the final one records the finished run.
            self.save_checkpoint(&mut st, opt, &dropout_rng)?;
            if stop {
                break;
            }
        }
        Ok(st)
    }

    /// Runs the epoch's `batches` from `st.next_batch` on; returns whether `--max-steps`
    /// stopped it.
    fn epoch_batches(
        &mut self,
        model: &SequenceClassifier,
        opt: &mut Optimizer,
        train_set: &Examples,
        batches: &[Vec<usize>],
        st: &mut LoopState,
        dropout_rng: &mut ChaCha8Rng,
    ) -> Result<bool> {
        let pb = if self.root {
            crate::progress::bar(
                batches.len() as u64,
                &format!("epoch {}/{}", st.epoch, self.args.epochs),
                "batches",
            )
        } else {
            indicatif::ProgressBar::hidden()
        };
        let loop_start = Instant::now();
        pb.set_position(st.next_batch as u64);
        let mut acc: Vec<Option<Tensor>> = vec![None; opt.slots().len()];
        let mut stop = false;
        for bi in st.next_batch..batches.len() {
            let global = &batches[bi];
            let group = crate::dist::rank_slice(global, self.rank, self.world);
            // A rank can get no member of a ragged last global batch; it still takes part
            // in every collective below.
            let (loss, loss_value) = if group.is_empty() {
                (None, 0.0)
            } else {
                let items: Vec<&Encoded> = group.iter().map(|&i| &train_set.enc[i]).collect();
                let targets: Vec<&Target> = group.iter().map(|&i| &train_set.targets[i]).collect();
                let batch = TokenBatch::collate(&items, model.base.tokenizer.pad_id, &self.device)?;
                let out = model.forward_all(&batch, Some(&mut *dropout_rng))?;
                let (loss, value) = self.objective.loss(&out, &targets)?;
                (Some(loss), value)
            };
            let boundary = (bi + 1) % self.args.grad_accum == 0 || bi + 1 == batches.len();
            let bad = self.accumulate(
                opt,
                &mut acc,
                loss,
                loss_value,
                group.len(),
                global.len(),
                st,
            )?;
            if boundary {
                stop = self.step(opt, &mut acc, bad, st, bi, &pb, dropout_rng)?;
            }
            pb.inc(1);
            if stop {
                break;
            }
        }
        self.train_loop_s += loop_start.elapsed().as_secs_f64();
        pb.finish_and_clear();
        Ok(stop)
    }

    /// Sums the batch's loss statistics over ranks and, unless some rank's loss is not
    /// finite, adds this rank's gradient (weighted by its share of the global batch) to
    /// `acc`. Returns whether the batch is bad (a non-finite loss on some rank).
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        &mut self,
        opt: &Optimizer,
        acc: &mut [Option<Tensor>],
        loss: Option<Tensor>,
        loss_value: f64,
        local: usize,
        global: usize,
        st: &mut LoopState,
    ) -> Result<bool> {
        let args = self.args;
        // [non-finite flag, loss sum, examples], summed over ranks so that all agree on
        // skipping and log the global training loss.
        let local_bad = !loss_value.is_finite();
        let mut stats = [
            f64::from(u8::from(local_bad)),
            if local_bad {
                0.0
            } else {
                loss_value * local as f64
            },
            local as f64,
        ];
        if self.world > 1 {
            // Three numbers: the time is latency and waiting for the other ranks'
            // forward passes.
            let t = Instant::now();
            self.comm.all_reduce_sum_f64(&mut stats)?;
            let dt = t.elapsed().as_secs_f64();
            self.comm_s += dt;
            self.comm_wait_s += dt;
        }
        let bad = stats[0] > 0.0;
        if !bad {
            st.loss_sum += stats[1];
            st.loss_n += stats[2] as usize;
            if let Some(loss) = loss {
                // The global batch's mean loss is sum over ranks of (local mean x local
                // share): weight by examples, not by ranks, so a ragged last batch
                // counts each protein once.
                let scaled = if self.world == 1 {
                    (loss / args.grad_accum as f64)?
                } else {
                    let share = local as f64 / global as f64;
                    (loss * (share / args.grad_accum as f64))?
                };
                let grads = scaled.backward()?;
                for (a, g) in acc.iter_mut().zip(opt.collect_grads(&grads)) {
                    if let Some(g) = g {
                        optim::accumulate(a, &g)?;
                    }
                }
            }
        }
        Ok(bad)
    }

    /// At a gradient-accumulation boundary: sums the gradients over ranks and takes the
    /// optimizer step, or skips it when a loss or the gradient is not finite (stopping after
    /// `--max-bad-steps` in a row); saves a checkpoint when one is due. Returns whether
    /// `--max-steps` is reached.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        opt: &mut Optimizer,
        acc: &mut [Option<Tensor>],
        mut bad: bool,
        st: &mut LoopState,
        bi: usize,
        pb: &indicatif::ProgressBar,
        dropout_rng: &ChaCha8Rng,
    ) -> Result<bool> {
        let args = self.args;
        let epoch = st.epoch;
        let mut step_grads: Vec<Option<Tensor>> = acc.iter_mut().map(Option::take).collect();
        if !bad && self.world > 1 {
            if self.profile {
                // Separates waiting for the slowest backward pass from the transfer.
                let t = Instant::now();
                self.comm.barrier()?;
                let dt = t.elapsed().as_secs_f64();
                self.comm_s += dt;
                self.comm_wait_s += dt;
            }
            let t = Instant::now();
            crate::dist::all_reduce_grads(self.comm, &mut step_grads, &self.shapes)?;
            self.comm_s += t.elapsed().as_secs_f64();
        }
        // The norm of the summed gradient: the same on every rank, so every rank
        // clips (and skips) alike.
        let norm = if bad {
            f64::NAN
        } else {
            opt.grad_norm(&step_grads)?
        };
        bad |= !norm.is_finite();
        if bad {
            st.bad_steps += 1;
            tracing::warn!(
                "non-finite loss or gradient at epoch {epoch}, batch {bi}: step skipped ({} in a row)",
                st.bad_steps
            );
            if st.bad_steps >= args.max_bad_steps {
                bail!(
                    "{} consecutive steps had a non-finite loss or gradient (epoch {epoch}, batch {bi}); stopping without saving a broken model: lower --lr or check the input",
                    st.bad_steps
                );
            }
        } else {
            st.bad_steps = 0;
            let lr = self.schedule.lr(st.step);
            opt.step(&step_grads, lr, optim::clip_scale(norm, args.max_grad_norm))?;
            st.step += 1;
            pb.set_prefix(format!(
                "loss {:.4} lr {lr:.2e}",
                st.loss_sum / st.loss_n.max(1) as f64
            ));
        }
        st.next_batch = bi + 1;
        st.dropout_rng = RngState::of(dropout_rng);
        let stop = args.max_steps.is_some_and(|m| st.step >= m);
        if !bad
            && args.save_every_steps > 0
            && st.step.is_multiple_of(args.save_every_steps)
            && !stop
        {
            self.save_checkpoint(st, opt, dropout_rng)?;
        }
        Ok(stop)
    }

    /// Writes a resumable checkpoint (with `--save-every-steps`; root rank only). Collective:
    /// every rank reaches the same save points.
    fn save_checkpoint(&self, st: &mut LoopState, opt: &Optimizer, rng: &ChaCha8Rng) -> Result<()> {
        if self.args.save_every_steps == 0 {
            return Ok(());
        }
        if self.world > 1 {
            // Collective: every rank reaches the same save points.
            st.rank_dropout_pos = gather_word_pos(self.comm, rng)?;
        }
        if !self.root {
            return Ok(());
        }
        let dir = checkpoint::save(
            &self.args.output,
            st,
            opt.steps_taken(),
            &self.store.tensors(),
            &opt.export_moments()?,
            self.args.keep_last,
        )?;
        tracing::debug!("checkpoint {}", dir.display());
        Ok(())
    }
}
