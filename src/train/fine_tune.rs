//! The fine-tuning loop: the encoder (or its LoRA adapters) and the head train together, in
//! one process or as one rank of a data-parallel job.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, LoopState, RngState};
use super::metrics::{record_epoch, save_best, TrainSummary};
use super::objective::{Objective, Target};
use super::observe::{self, TrainObserver};
use super::optim::{self, AdamW, AdamWConfig, LinearSchedule};
use super::plan::prepare_data;
use super::setup::{default_labels, encode_examples, prepare_encoder, resolve_membrane, trains};
use super::validation::finish_epoch;
use super::TrainArgs;
use crate::dist::Collective;
use crate::infer::{effective_max_residues, BatchLimits};
use crate::model::{self, SequenceClassifier, TaskConfig};
use crate::tokenize::{Batch, BatchPlan, Encoded};

/// Fine-tunes as [`super::train_observed`] describes (arguments already validated).
pub(super) fn run(
    args: &TrainArgs,
    comm: &dyn Collective,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    let world = comm.world_size();
    let rank = comm.rank();
    let root = comm.is_root();
    let device = Device::Cpu;
    let t0 = Instant::now();

    let (dataset, train_idx, val_idx) = prepare_data(args)?;

    // Model.
    let mut base = model::load_base(&args.model, args.seed, &device, model::Purpose::Training)?;
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
    let max_res = effective_max_residues(&base.cfg, args.max_residues)?;
    let labels = default_labels();
    let pick = |idx: &[usize]| idx.iter().map(|&i| &dataset.records[i]).collect::<Vec<_>>();
    let train_set = encode_examples(
        &base,
        &pick(&train_idx),
        &labels,
        max_res,
        args.truncate,
        args.multi_label,
    )?;
    let val_set = encode_examples(
        &base,
        &pick(&val_idx),
        &labels,
        max_res,
        args.truncate,
        args.multi_label,
    )?;
    let membrane = resolve_membrane(args.membrane, &train_set.targets, false);
    let task = TaskConfig {
        pool: args.pool,
        truncate: args.truncate,
        max_residues: max_res,
        head_dropout: args.head_dropout(),
        head: args.head,
        head_hidden: args.head_hidden,
        la_kernel: args.la_kernel,
        membrane,
        multi_label: args.multi_label,
        ..TaskConfig::new(labels.clone(), &args.model)
    };
    let prefix = base.cfg.arch().map_err(anyhow::Error::msg)?.prefix();
    let mut model = SequenceClassifier::new(base, task)?;
    let objective = Objective {
        class_weights: Objective::class_weights(
            &train_set.targets,
            labels.len(),
            args.class_weighting,
        ),
        multi_label: args.multi_label,
        membrane,
    };

    if world > 1 {
        // Before any real work is shared: a rank started with other arguments or another
        // copy of the data would otherwise train silently on a different problem.
        let fingerprint = serde_json::json!({
            "args": serde_json::to_value(args)?,
            "data_digest": crate::dist::file_digest(&args.data)?,
            "resume_step": args.resume_from.as_ref().map(|c| c.state.step),
            "world_size": world,
            "protloc_version": env!("CARGO_PKG_VERSION"),
        });
        crate::dist::check_same_config(comm, &fingerprint)?;
    }

    // Optimizer.
    let head_lr_scale = args.head_lr.map_or(1.0, |h| h / args.lr);
    let mut params = Vec::new();
    let mut total_params = 0;
    for (name, var) in model.base.store.vars() {
        total_params += var.elem_count();
        if !trains(&name, prefix, args.freeze_layers, lora.is_some()) {
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
    let mut opt = AdamW::new(AdamWConfig::default(), params)?;
    // Optimizer steps count global batches: the schedule is the same on every rank and the
    // same as a single process with the global batch size.
    let global_batch = args.batch_size * world;
    let steps_per_epoch = train_set
        .len()
        .div_ceil(global_batch)
        .div_ceil(args.grad_accum);
    let schedule = LinearSchedule::for_run(
        args.lr,
        args.warmup_ratio,
        steps_per_epoch,
        args.epochs,
        args.max_steps,
    );

    if root {
        std::fs::create_dir_all(&args.output)
            .with_context(|| format!("cannot create {}", args.output.display()))?;
        let mut saved = args.clone();
        saved.world_size = world;
        crate::artifacts::write_atomic(
            &args.output.join("training_args.json"),
            serde_json::to_string_pretty(&saved)?.as_bytes(),
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

    let limits = BatchLimits {
        max_batch_tokens: args.eval_batch_tokens,
        max_batch_size: 64,
    };
    let lengths: Vec<usize> = train_set.enc.iter().map(|e| e.ids.len()).collect();
    let mut st = match &args.resume_from {
        Some(ckpt) => {
            for (name, var) in model.base.store.vars() {
                let t = ckpt.model.get(&name).with_context(|| {
                    format!("{}: checkpoint lacks parameter {name}", ckpt.dir.display())
                })?;
                var.set(&t.to_device(&device)?)?;
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
                crate::artifacts::write_atomic(&metrics_path, text.as_bytes())?;
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
                let _ = std::fs::remove_file(&metrics_path);
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
    };
    // Rank 0's weights for everyone, whatever each rank loaded (see `broadcast_params`).
    crate::dist::broadcast_params(comm, &model.base.store.vars())?;
    let shapes: Vec<candle_core::Shape> =
        opt.slots().iter().map(|s| s.var.shape().clone()).collect();
    // This rank's share of the validation set, fixed for the whole run.
    let val_shard = (world > 1).then(|| val_set.shard(rank, world));
    let val_local = val_shard.as_ref().unwrap_or(&val_set);
    let mut comm_s = 0f64;
    let mut comm_wait_s = 0f64;
    let mut train_loop_s = 0f64;
    let profile = world > 1 && std::env::var_os("PROTLOC_DIST_PROFILE").is_some();
    let mut dropout_rng = rank_dropout_rng(&st, rank, world)?;
    // A handle on the parameters (shared, not copied): the model itself is updated between
    // checkpoints (tuned thresholds).
    let store = model.base.store.clone();
    let save_checkpoint = |st: &mut LoopState, opt: &AdamW, rng: &ChaCha8Rng| -> Result<()> {
        if args.save_every_steps == 0 {
            return Ok(());
        }
        if world > 1 {
            // Collective: every rank reaches the same save points.
            st.rank_dropout_pos = gather_word_pos(comm, rng)?;
        }
        if !root {
            return Ok(());
        }
        let dir = checkpoint::save(
            &args.output,
            st,
            opt.steps_taken(),
            &store.tensors(),
            &opt.export_moments()?,
            args.keep_last,
        )?;
        tracing::debug!("checkpoint {}", dir.display());
        Ok(())
    };
    'epochs: while st.epoch <= args.epochs {
        let epoch = st.epoch;
        let mut shuffle_rng = st.epoch_rng.restore()?;
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        order.shuffle(&mut shuffle_rng);
        // The same global batches on every rank (same seed, same data).
        let batches = BatchPlan::bucketed(&order, &lengths, global_batch, 50, &mut shuffle_rng);
        let next_epoch_rng = RngState::of(&shuffle_rng);
        let pb = if root {
            crate::progress::bar(
                batches.len() as u64,
                &format!("epoch {epoch}/{}", args.epochs),
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
            let group = crate::dist::rank_slice(global, rank, world);
            // A rank can get no member of a ragged last global batch; it still takes part
            // in every collective below.
            let (loss, loss_value) = if group.is_empty() {
                (None, 0.0)
            } else {
                let items: Vec<&Encoded> = group.iter().map(|&i| &train_set.enc[i]).collect();
                let targets: Vec<&Target> = group.iter().map(|&i| &train_set.targets[i]).collect();
                let batch = Batch::collate(&items, model.base.tokenizer.pad_id, &device)?;
                let out = model.forward_all(&batch, Some(&mut dropout_rng))?;
                let (loss, value) = objective.loss(&out, &targets)?;
                (Some(loss), value)
            };
            let boundary = (bi + 1) % args.grad_accum == 0 || bi + 1 == batches.len();
            // [non-finite flag, loss sum, examples], summed over ranks so that all agree on
            // skipping and log the global training loss.
            let local_bad = !loss_value.is_finite();
            let mut stats = [
                f64::from(u8::from(local_bad)),
                if local_bad {
                    0.0
                } else {
                    loss_value * group.len() as f64
                },
                group.len() as f64,
            ];
            if world > 1 {
                // Three numbers: the time is latency and waiting for the other ranks'
                // forward passes.
                let t = Instant::now();
                comm.all_reduce_sum_f64(&mut stats)?;
                let dt = t.elapsed().as_secs_f64();
                comm_s += dt;
                comm_wait_s += dt;
            }
            let mut bad = stats[0] > 0.0;
            if !bad {
                st.loss_sum += stats[1];
                st.loss_n += stats[2] as usize;
                if let Some(loss) = loss {
                    // The global batch's mean loss is sum over ranks of (local mean x local
                    // share): weight by examples, not by ranks, so a ragged last batch
                    // counts each protein once.
                    let scaled = if world == 1 {
                        (loss / args.grad_accum as f64)?
                    } else {
                        let share = group.len() as f64 / global.len() as f64;
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
            if boundary {
                let mut step_grads: Vec<Option<Tensor>> =
                    acc.iter_mut().map(Option::take).collect();
                if !bad && world > 1 {
                    if profile {
                        // Separates waiting for the slowest backward pass from the transfer.
                        let t = Instant::now();
                        comm.barrier()?;
                        let dt = t.elapsed().as_secs_f64();
                        comm_s += dt;
                        comm_wait_s += dt;
                    }
                    let t = Instant::now();
                    crate::dist::all_reduce_grads(comm, &mut step_grads, &shapes)?;
                    comm_s += t.elapsed().as_secs_f64();
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
                    let lr = schedule.lr(st.step);
                    opt.step(&step_grads, lr, optim::clip_scale(norm, args.max_grad_norm))?;
                    st.step += 1;
                    pb.set_prefix(format!(
                        "loss {:.4} lr {lr:.2e}",
                        st.loss_sum / st.loss_n.max(1) as f64
                    ));
                }
                st.next_batch = bi + 1;
                st.dropout_rng = RngState::of(&dropout_rng);
                stop = args.max_steps.is_some_and(|m| st.step >= m);
                if !bad
                    && args.save_every_steps > 0
                    && st.step % args.save_every_steps == 0
                    && !stop
                {
                    save_checkpoint(&mut st, &opt, &dropout_rng)?;
                }
            }
            pb.inc(1);
            if stop {
                break;
            }
        }
        train_loop_s += loop_start.elapsed().as_secs_f64();
        pb.finish_and_clear();
        let m = finish_epoch(
            &mut model,
            comm,
            val_local,
            val_set.len(),
            limits,
            epoch,
            st.step,
            st.loss_sum / st.loss_n.max(1) as f64,
            schedule.lr(st.step.saturating_sub(1)),
            &t0,
        )?;
        let epoch_done = m.epoch;
        let observer = root.then_some(&mut *observer);
        if record_epoch(observer, &metrics_path, m, &mut st.history, &mut st.best)? && root {
            save_best(&model, &args.output, epoch_done)?;
        }
        st.epoch += 1;
        st.next_batch = 0;
        st.epoch_rng = next_epoch_rng;
        st.loss_sum = 0.0;
        st.loss_n = 0;
        st.dropout_rng = RngState::of(&dropout_rng);
        // Epoch ends are natural resume points; the final one records the finished run.
        save_checkpoint(&mut st, &opt, &dropout_rng)?;
        if stop {
            break 'epochs;
        }
    }
    let history = st.history;
    let best = st.best;

    let best_epoch = best.map_or(history.len(), |b| b.2);
    if root && st.step > 0 {
        tracing::info!(
            ranks = world,
            steps = st.step,
            s_per_step = format!("{:.3}", train_loop_s / st.step as f64),
            comm_share = format!("{:.1}%", 100.0 * comm_s / train_loop_s.max(1e-9)),
            waiting_share = format!("{:.1}%", 100.0 * comm_wait_s / train_loop_s.max(1e-9)),
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
        train_loop_s,
        comm_s,
        comm_wait_s,
        members: Vec::new(),
    })
}

/// This rank's dropout RNG: rank r draws from stream r of the run's dropout seed, so ranks
/// do not drop the same units (rank 0's stream is the single-process one).
fn rank_dropout_rng(st: &LoopState, rank: usize, world: usize) -> Result<ChaCha8Rng> {
    let mut rng = st.dropout_rng.restore()?;
    if world > 1 && rank > 0 {
        rng.set_stream(rank as u64);
        let pos: u128 = match st.rank_dropout_pos.get(rank) {
            Some(p) => p.parse().context("corrupt dropout RNG position")?,
            // Fresh run: start of the stream. A checkpoint of a data-parallel run always
            // has every rank's position.
            None if st.step == 0 && st.next_batch == 0 => 0,
            None => bail!("the checkpoint lacks rank {rank}'s dropout RNG position"),
        };
        rng.set_word_pos(pos);
    }
    Ok(rng)
}

/// Every rank's RNG word position, gathered through a sum of disjoint 32-bit limbs (exact
/// in f64).
fn gather_word_pos(comm: &dyn Collective, rng: &ChaCha8Rng) -> Result<Vec<String>> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let mut buf = vec![0f64; 4 * world];
    let pos = rng.get_word_pos();
    for k in 0..4 {
        buf[4 * rank + k] = ((pos >> (32 * k)) & 0xffff_ffff) as f64;
    }
    comm.all_reduce_sum_f64(&mut buf)?;
    Ok((0..world)
        .map(|r| {
            (0..4)
                .map(|k| (buf[4 * r + k] as u128) << (32 * k))
                .sum::<u128>()
                .to_string()
        })
        .collect())
}
