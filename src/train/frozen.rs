//! The frozen-encoder fast path: embed every protein once into the on-disk cache, then train
//! only a head (linear, mlp or light-attention) on the cached per-residue embeddings. Each
//! epoch costs a head's forward and backward pass, not the encoder's: minutes on two cores
//! where fine-tuning takes hours.
//!
//! The saved run directory is a complete model (encoder + head), so `eval`, `predict` and
//! `serve` use it like any fine-tuned one.
//!
//! The same loop fine-tunes the top K encoder layers (`--train-top-layers K`): the cache then
//! holds the states entering layer L-K (every token), computed once, and each step runs
//! those K layers and the head forward and backward.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::members::{self, MemberRecord};
use super::metrics::{
    record_epoch, record_start, save_best, validation_metrics, EpochMetrics, TrainSummary,
    ValidationMetrics,
};
use super::objective::{LocationTarget, Objective, Target};
use super::observe::{Embedding, LogObserver, MemberRestored, MemberStart, TrainObserver};
use super::optim::{self, LinearSchedule, Optimizer};
use super::plan::{plan_members, MemberPlan};
use super::setup;
use super::TrainArgs;
pub use crate::cache::cached_outputs;
use crate::cache::{CacheSpec, EmbeddingCache};
use crate::data::Record;
use crate::eval::multilabel;
use crate::infer::BatchLimits;
use crate::model::{self, MemberInfo, SequenceClassifier, TaskConfig};
use crate::tokenize::bucketed_groups;

/// Runs `protloc train --frozen`: one head, or an ensemble of `args.members()` heads trained
/// one after another on the same cached embeddings (see [`plan_members`] for their
/// seeds and splits). Epochs are logged through `tracing`.
pub fn train(args: &TrainArgs) -> Result<TrainSummary> {
    train_observed(args, &mut LogObserver)
}

/// [`train`], reporting the embedding cache, each member's start and every epoch to
/// `observer`.
pub fn train_observed(args: &TrainArgs, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
    let device = args.device.resolve_here()?;
    let mut t0 = Instant::now();
    let (dataset, plans) = plan_members(args)?;
    let n = plans.len();
    let top = args.train_top_layers;
    // A frozen encoder only embeds: its weights in the inference layout. Top layers train,
    // and --init-head reads its head from the training layout's store.
    let purpose = if top > 0 || args.init_head {
        model::Purpose::Training
    } else {
        model::Purpose::Inference
    };
    let mut base = model::load_base(&args.model, args.seed, &device, purpose)?;
    // --init-head: the checkpoint's head, labels, tokenization and membrane output.
    let start = args
        .init_head
        .then(|| setup::checkpoint_task(args))
        .transpose()?;
    let (labels, max_res, truncate) = setup::run_tokenization(&mut base, start.as_ref(), args)?;
    let layers = base.cfg.num_hidden_layers;
    if top > layers {
        bail!("--train-top-layers {top} but the model has only {layers} layers");
    }
    // The cache holds the states entering the first trained layer (every token), or with a
    // frozen encoder its output (residues only).
    let from_layer = (top > 0).then_some(layers - top);
    let (used, targets, membrane) = member_targets(args, &dataset.records, &plans, &labels)?;
    let membrane = start.as_ref().map_or(membrane, |t| t.membrane);

    let all: Vec<&str> = used
        .iter()
        .map(|&i| dataset.records[i].sequence.as_str())
        .collect();
    // Embeddings: reuse what the cache has, embed the rest; once for all members.
    let mut cache = fill_cache(args, &base, (max_res, truncate), from_layer, &all, observer)?;

    let top = match from_layer {
        Some(from) => Some(TopLayers {
            from,
            prefix: base.cfg.arch().prefix(),
            lora: setup::prepare_encoder(&mut base, from, &args.lora)?.is_some(),
        }),
        None => None,
    };
    let frozen_encoder = from_layer.is_none();
    let mut model = match start {
        Some(task) => SequenceClassifier::with_checkpoint_head(
            base,
            setup::continued_task(task, args, max_res, frozen_encoder),
        )?,
        None => {
            let task = TaskConfig {
                frozen_encoder,
                ensemble: n,
                ..args.task_config(labels.clone(), max_res, membrane)
            };
            if n == 1 {
                // Exactly the single-model run: the head draws from the store seeded with
                // `seed`.
                SequenceClassifier::new(base, task)?
            } else {
                let seeds: Vec<u64> = plans.iter().map(|p| p.seed).collect();
                SequenceClassifier::new_ensemble(base, task, &seeds)?
            }
        }
    };
    let total_params = model.base.store.num_parameters();
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    // --init-head: recorded with the checkpoint's head (a single model).
    let recorded = args.as_run(args.init_head.then_some(&model.task));
    crate::artifacts::write_atomic(
        &args.output.join("training_args.json"),
        serde_json::to_string_pretty(&recorded)?.as_bytes(),
    )?;
    let splits: Vec<(&[usize], &[usize])> = plans
        .iter()
        .map(|p| (p.train.as_slice(), p.val.as_slice()))
        .collect();
    let split_path = args.output.join(crate::data::split::SPLIT_FILE);
    let split = crate::data::split::split_table(&dataset.records, &splits)?;
    if args.resume_members {
        if std::fs::read(&split_path).ok().as_deref() != Some(split.as_slice()) {
            bail!(
                "{}: the data no longer splits as it did when the run started ({} differs); \
                 start a new run",
                args.output.display(),
                split_path.display()
            );
        }
    } else {
        crate::artifacts::write_atomic(&split_path, &split)?;
        members::clear(&args.output)?;
    }
    let metrics_path = args.output.join("metrics.jsonl");
    let _ = std::fs::remove_file(&metrics_path);

    let mut epochs = Vec::new();
    let mut members = Vec::with_capacity(n);
    let mut first: Option<MemberRecord> = None;
    let mut steps = 0;
    for (k, plan) in plans.iter().enumerate() {
        let restored = if args.resume_members {
            restore_member(&model, k, plan, top.as_ref(), &args.output, observer)?
        } else {
            None
        };
        let run = match restored {
            Some(run) => {
                // Later members' times continue from the restored one's.
                let done = run.history.last().map_or(0.0, |m| m.elapsed_s);
                t0 = Instant::now()
                    .checked_sub(std::time::Duration::from_secs_f64(done))
                    .unwrap_or(t0);
                run
            }
            None => train_member(
                &mut model,
                k,
                plan,
                &dataset.records,
                &targets,
                &mut cache,
                args,
                &metrics_path,
                &t0,
                top.as_ref(),
                observer,
            )?,
        };
        steps += run.steps;
        epochs.extend(run.history.iter().cloned());
        members.push(run.info.clone());
        if first.is_none() {
            first = Some(run);
        }
    }
    let first = first.expect("at least one member");
    if n > 1 {
        save_ensemble(&mut model, &members, labels.len(), &args.output)?;
    }
    Ok(TrainSummary {
        epochs,
        best_epoch: first.info.best_epoch,
        steps,
        train_records: first.info.train_records,
        val_records: first.info.val_records,
        trainable_parameters: first.trainable,
        total_parameters: total_params,
        // One process; the head's epochs are not timed apart from validation here.
        world_size: 1,
        train_loop_s: t0.elapsed().as_secs_f64(),
        comm_s: 0.0,
        comm_wait_s: 0.0,
        members: if n > 1 { members } else { Vec::new() },
    })
}

/// The records some member trains or validates on (in first-use order), the targets of
/// those records (indexed like `records`), and whether to train the membrane output (auto:
/// when any member's training data has membrane flags).
fn member_targets(
    args: &TrainArgs,
    records: &[Record],
    plans: &[MemberPlan],
    labels: &[String],
) -> Result<(Vec<usize>, Vec<Option<Target>>, bool)> {
    // Every record some member trains or validates on, in first-use order.
    let mut used: Vec<usize> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in plans {
        used.extend(p.train.iter().chain(&p.val).filter(|&&i| seen.insert(i)));
    }
    let mut targets: Vec<Option<Target>> = vec![None; records.len()];
    for &i in &used {
        targets[i] = Some(Target::of(&records[i], labels, args.multi_label)?);
    }
    // Trained when any member's training data has membrane flags (auto).
    let mut in_train = vec![false; records.len()];
    for p in plans {
        for &i in &p.train {
            in_train[i] = true;
        }
    }
    let train_union: Vec<Target> = used
        .iter()
        .filter(|&&i| in_train[i])
        .map(|&i| member_target(&targets, i).clone())
        .collect();
    let membrane = setup::resolve_membrane(args.membrane, &train_union, true);
    Ok((used, targets, membrane))
}

/// Opens the embedding cache for `base` (`--cache`, default RUN_DIR/embedding_cache; at
/// `from_layer` for top layers) with `tokenization` (residues kept, truncation) and embeds
/// the proteins of `all` it lacks.
fn fill_cache(
    args: &TrainArgs,
    base: &model::BaseModel,
    tokenization: (usize, crate::tokenize::Truncation),
    from_layer: Option<usize>,
    all: &[&str],
    observer: &mut dyn TrainObserver,
) -> Result<EmbeddingCache> {
    let cache_dir = args.cache_dir();
    let (max_res, truncate) = tokenization;
    let mut spec = CacheSpec::for_model(base, max_res, truncate)?;
    if let Some(n) = from_layer {
        spec = spec.at_layer(n);
    }
    let mut cache = EmbeddingCache::open(&cache_dir, spec)?;
    let missing = all.iter().filter(|s| !cache.contains(s)).count();
    observer.on_embedding(&Embedding {
        cache: &cache_dir,
        missing,
        cached: all.len() - missing,
    });
    if missing > 0 {
        let pb = crate::progress::bar(missing as u64, "embedding", "proteins");
        let limits = BatchLimits {
            max_batch_tokens: args.eval_batch_tokens,
            max_batch_size: 64,
        };
        cache.fill(base, all, limits, Some(&pb))?;
        pb.finish_and_clear();
    }
    Ok(cache)
}

/// Saves an ensemble once every member has its best weights (restored by `train_member`):
/// with the members' information and, multi-label, their mean thresholds.
fn save_ensemble(
    model: &mut SequenceClassifier,
    members: &[MemberInfo],
    num_labels: usize,
    output: &std::path::Path,
) -> Result<()> {
    let n = members.len();
    if model.task.multi_label {
        // The ensemble decides on its mean probabilities with the mean thresholds.
        let th: Vec<&Vec<f32>> = members
            .iter()
            .filter_map(|m| m.thresholds.as_ref())
            .collect();
        model.task.thresholds = (th.len() == n).then(|| {
            (0..num_labels)
                .map(|c| th.iter().map(|t| t[c]).sum::<f32>() / n as f32)
                .collect()
        });
    }
    model.task.members = members.to_vec();
    // Written once every member has its best weights (restored by `train_member`).
    model.save(output)?;
    tracing::info!(members = n, "saved the ensemble to {}", output.display());
    Ok(())
}

/// The encoder layers a `--train-top-layers` run trains.
struct TopLayers {
    /// First trained layer (the cache holds the states entering it).
    from: usize,
    /// The encoder's parameter prefix (`bert`, `esm`).
    prefix: &'static str,
    /// LoRA adapters train instead of the layers' weights.
    lora: bool,
}

/// Variables by name: what a member trains.
type NamedVars = Vec<(String, candle_core::Var)>;

/// Member `k` as an earlier run of this ensemble finished it (`--resume`): its weights set
/// into `model`, its epochs appended to `metrics_path` again; `None` if it did not finish.
fn restore_member(
    model: &SequenceClassifier,
    k: usize,
    plan: &MemberPlan,
    top: Option<&TopLayers>,
    run_dir: &std::path::Path,
    observer: &mut dyn TrainObserver,
) -> Result<Option<MemberRecord>> {
    let vars: NamedVars = member_params(model, k, top)
        .into_iter()
        .map(|(name, var, _)| (name, var))
        .collect();
    let Some(record) = members::restore(run_dir, k, plan, &vars)? else {
        return Ok(None);
    };
    let metrics_path = run_dir.join("metrics.jsonl");
    for m in &record.history {
        crate::artifacts::append_json_line(&metrics_path, &serde_json::to_value(m)?)?;
    }
    observer.on_member_restored(&MemberRestored {
        member: k,
        members: model.members(),
        record: &members::record_path(run_dir, k),
        best_epoch: record.info.best_epoch,
        val_accuracy: record.info.val_accuracy,
    });
    Ok(Some(record))
}

/// Trains head `k` of `model` on `plan`'s split and leaves its best epoch's weights in place.
/// A single model (`model.members() == 1`) is saved whenever it improves, as it always was;
/// an ensemble member's best weights are kept in memory for the caller to save with the
/// whole ensemble, and written to `members/` (see [`members`]) once it finishes.
#[allow(clippy::too_many_arguments)]
fn train_member(
    model: &mut SequenceClassifier,
    k: usize,
    plan: &MemberPlan,
    records: &[Record],
    targets: &[Option<Target>],
    cache: &mut EmbeddingCache,
    args: &TrainArgs,
    metrics_path: &std::path::Path,
    t0: &Instant,
    top: Option<&TopLayers>,
    observer: &mut dyn TrainObserver,
) -> Result<MemberRecord> {
    let n = model.members();
    let ensemble = n > 1;
    let labels = model.task.labels.clone();
    let pick = |idx: &[usize]| idx.iter().map(|&i| &records[i]).collect::<Vec<_>>();
    let (train_recs, val_recs) = (pick(&plan.train), pick(&plan.val));
    let of = |idx: &[usize]| -> Vec<Target> {
        idx.iter()
            .map(|&i| member_target(targets, i).clone())
            .collect()
    };
    let (train_targets, val_targets) = (of(&plan.train), of(&plan.val));
    let objective = Objective {
        class_weights: Objective::class_weights(&train_targets, labels.len(), args.class_weighting),
        multi_label: args.multi_label,
        membrane: model.task.membrane,
    };

    let (mut opt, member_vars, trainable) = member_optimizer(model, k, top, args)?;
    let schedule = LinearSchedule::for_run(
        args.lr,
        args.warmup_ratio,
        train_recs.len().div_ceil(args.batch_size),
        args.epochs,
        args.max_steps,
    );
    let sizes = (train_recs.len(), val_recs.len());
    announce_member(observer, model, k, plan, sizes, trainable, top);

    let lengths: Vec<usize> = train_recs.iter().map(|r| r.sequence.len()).collect();
    let mut shuffle_rng = ChaCha8Rng::seed_from_u64(plan.seed);
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(plan.seed ^ 0x5eed_d20f_u64);
    let mut history: Vec<EpochMetrics> = Vec::new();
    let mut best = None;
    // The best epoch's multi-label thresholds, and an ensemble member's best weights.
    let mut best_thresholds = None;
    let mut best_weights: Option<Vec<candle_core::Tensor>> = None;
    let mut step = 0usize;
    // Member k's validation metrics (and tuned multi-label thresholds) as the model stands.
    let validate = |model: &SequenceClassifier, cache: &mut EmbeddingCache| {
        validate_member(
            model,
            k,
            cache,
            &val_recs,
            &val_targets,
            &labels,
            args.multi_label,
        )
    };
    if args.init_head {
        // The checkpoint's head (a single model: --init-head refuses ensembles) is the
        // first candidate; an epoch is saved only if it validates better.
        let (val, thresholds) = validate(model, cache)?;
        if let Some(v) = val {
            if thresholds.is_some() {
                model.task.thresholds = thresholds.clone();
            }
            record_start(Some(&mut *observer), model, &args.output, v, &mut best)?;
            best_thresholds = thresholds;
        }
    }
    'epochs: for epoch in 1..=args.epochs {
        let mut order: Vec<usize> = (0..train_recs.len()).collect();
        order.shuffle(&mut shuffle_rng);
        let batches = bucketed_groups(&order, &lengths, args.batch_size, 50, &mut shuffle_rng);
        let pb = crate::progress::bar(
            batches.len() as u64,
            &format!("epoch {epoch}/{}", args.epochs),
            "batches",
        );
        let (loss_sum, loss_n, stop) = member_epoch(
            model,
            k,
            &objective,
            &mut opt,
            &schedule,
            &mut step,
            &batches,
            &train_recs,
            &train_targets,
            cache,
            top,
            &mut dropout_rng,
            &pb,
            args,
            epoch,
        )?;
        pb.finish_and_clear();
        let (val, thresholds) = validate(model, cache)?;
        let mut m = EpochMetrics::new(
            epoch,
            step,
            loss_sum / loss_n.max(1) as f64,
            val,
            schedule.lr(step.saturating_sub(1)),
            t0,
        );
        if ensemble {
            m.member = Some(k);
            m.val_records = Some(val_recs.len());
        } else if thresholds.is_some() {
            model.task.thresholds = thresholds.clone();
        }
        if record_epoch(
            Some(&mut *observer),
            metrics_path,
            m,
            &mut history,
            &mut best,
        )? {
            best_thresholds = thresholds;
            if ensemble {
                let weights = member_vars
                    .iter()
                    .map(|(_, v)| v.as_tensor().copy())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                best_weights = Some(weights);
            } else {
                save_best(model, &args.output, epoch)?;
            }
        }
        if stop {
            break 'epochs;
        }
    }
    let best_epoch = best.map_or(history.len(), |b| b.2);
    if ensemble {
        let Some(weights) = best_weights else {
            bail!("ensemble member {k} had no epoch with finite losses: nothing to save");
        };
        for ((_, var), w) in member_vars.iter().zip(&weights) {
            var.set(w)?;
        }
    }
    let info = member_info(
        plan,
        &history,
        best_epoch,
        train_recs.len(),
        val_recs.len(),
        best_thresholds,
    );
    let run = MemberRecord {
        history,
        steps: step,
        trainable,
        info,
    };
    if ensemble {
        // Kept as soon as it finishes, for `--resume` after a crash.
        members::save(&args.output, k, &member_vars, &run)?;
    }
    Ok(run)
}

/// Reports the start of member `k` (ensembles only) and logs what it trains;
/// `sizes` = (training, validation) proteins.
#[allow(clippy::too_many_arguments)]
fn announce_member(
    observer: &mut dyn TrainObserver,
    model: &SequenceClassifier,
    k: usize,
    plan: &MemberPlan,
    sizes: (usize, usize),
    trainable: usize,
    top: Option<&TopLayers>,
) {
    let n = model.members();
    if n > 1 {
        observer.on_member(&MemberStart {
            member: k,
            members: n,
            seed: plan.seed,
            train_records: sizes.0,
            val_records: sizes.1,
            holdout_partition: plan.holdout_partition,
        });
    }
    tracing::info!(
        member = k,
        train = sizes.0,
        val = sizes.1,
        trainable,
        head = ?model.task.head,
        membrane = model.task.membrane,
        top_layers = top.map_or(0, |t| model.base.cfg.num_hidden_layers - t.from),
        "training on cached encoder states"
    );
}

/// What the ensemble records of a trained member: its split and its best epoch's metrics.
fn member_info(
    plan: &MemberPlan,
    history: &[EpochMetrics],
    best_epoch: usize,
    train_records: usize,
    val_records: usize,
    thresholds: Option<Vec<f32>>,
) -> MemberInfo {
    let best_metrics = history.iter().find(|m| m.epoch == best_epoch);
    MemberInfo {
        seed: plan.seed,
        holdout_partition: plan.holdout_partition,
        train_records,
        val_records,
        best_epoch,
        val_accuracy: best_metrics.and_then(|m| m.val_accuracy),
        val_loss: best_metrics.and_then(|m| m.val_loss),
        val_membrane_accuracy: best_metrics.and_then(|m| m.val_membrane_accuracy),
        thresholds,
    }
}

/// What member `k` trains, by name, and whether each is its head's: its head and, with top
/// layers, their weights or adapters.
fn member_params(
    model: &SequenceClassifier,
    k: usize,
    top: Option<&TopLayers>,
) -> Vec<(String, candle_core::Var, bool)> {
    let n = model.members();
    let mut params = Vec::new();
    for (name, var) in model.base.store.vars() {
        let head = model::is_member_param(&name, k, n);
        let trains = match top {
            None => head,
            Some(t) => head || setup::trains(&name, t.prefix, t.from, t.lora),
        };
        if trains {
            params.push((name, var, head));
        }
    }
    params
}

/// AdamW over what member `k` trains ([`member_params`]; its head at `--head-lr`); also
/// returns those variables by name and their parameter count.
fn member_optimizer(
    model: &SequenceClassifier,
    k: usize,
    top: Option<&TopLayers>,
    args: &TrainArgs,
) -> Result<(Optimizer, NamedVars, usize)> {
    let head_lr_scale = args.head_lr.map_or(1.0, |h| h / args.lr);
    let mut params = Vec::new();
    for (name, var, head) in member_params(model, k, top) {
        let wd = if optim::no_decay(&name) {
            0.0
        } else {
            args.weight_decay
        };
        let scale = if head { head_lr_scale } else { 1.0 };
        params.push((name, var, scale, wd));
    }
    let member_vars: NamedVars = params.iter().map(|p| (p.0.clone(), p.1.clone())).collect();
    let trainable: usize = params.iter().map(|p| p.1.elem_count()).sum();
    let opt = Optimizer::with_rule(args.optimizer, params)?;
    Ok((opt, member_vars, trainable))
}

/// Member `k`'s pass over one epoch's `batches` of cached rows; returns (summed location
/// loss, proteins, whether `--max-steps` stopped it).
#[allow(clippy::too_many_arguments)]
fn member_epoch(
    model: &SequenceClassifier,
    k: usize,
    objective: &Objective,
    opt: &mut Optimizer,
    schedule: &LinearSchedule,
    step: &mut usize,
    batches: &[Vec<usize>],
    train_recs: &[&Record],
    train_targets: &[Target],
    cache: &mut EmbeddingCache,
    top: Option<&TopLayers>,
    dropout_rng: &mut ChaCha8Rng,
    pb: &indicatif::ProgressBar,
    args: &TrainArgs,
    epoch: usize,
) -> Result<(f64, usize, bool)> {
    let device = model.base.store.device().clone();
    let (mut loss_sum, mut loss_n) = (0f64, 0usize);
    let mut stop = false;
    for group in batches {
        let seqs: Vec<&str> = group
            .iter()
            .map(|&i| train_recs[i].sequence.as_str())
            .collect();
        let batch = cache.batch(&seqs, &device)?;
        let targets: Vec<&Target> = group.iter().map(|&i| &train_targets[i]).collect();
        let out = cached_forward(model, k, &batch, top, Some(&mut *dropout_rng))?;
        let (loss, location_loss) = objective.loss(&out, &targets)?;
        if !location_loss.is_finite() {
            bail!("non-finite loss at epoch {epoch}, step {step}: lower --lr");
        }
        loss_sum += location_loss * group.len() as f64;
        loss_n += group.len();
        let grads = opt.collect_grads(&loss.backward()?);
        let norm = opt.grad_norm(&grads)?;
        let lr = schedule.lr(*step);
        opt.step(&grads, lr, optim::clip_scale(norm, args.max_grad_norm))?;
        *step += 1;
        pb.set_prefix(format!("loss {:.4}", loss_sum / loss_n as f64));
        pb.inc(1);
        if args.max_steps.is_some_and(|m| *step >= m) {
            stop = true;
            break;
        }
    }
    Ok((loss_sum, loss_n, stop))
}

/// Member `k`'s validation metrics on `val_recs` (none without validation proteins) and,
/// multi-label, the thresholds tuned there (which also decide its accuracy).
fn validate_member(
    model: &SequenceClassifier,
    k: usize,
    cache: &mut EmbeddingCache,
    val_recs: &[&Record],
    val_targets: &[Target],
    labels: &[String],
    multi_label: bool,
) -> Result<(Option<ValidationMetrics>, Option<Vec<f32>>)> {
    let mut thresholds = None;
    let val = if val_recs.is_empty() {
        None
    } else {
        let seqs: Vec<&str> = val_recs.iter().map(|r| r.sequence.as_str()).collect();
        let device = model.base.store.device();
        let out = crate::cache::cached_member_outputs(model, k..k + 1, cache, &seqs, device)?;
        let probs = out.probabilities;
        let mut metrics = validation_metrics(&probs, out.membrane.as_deref(), val_targets);
        if multi_label {
            // Per-location thresholds tuned on validation; saved with the model.
            let (accuracy, th) = tune_thresholds(&probs, val_targets, labels);
            metrics.accuracy = accuracy;
            thresholds = Some(th);
        }
        Some(metrics)
    };
    Ok((val, thresholds))
}

/// Head `k`'s outputs on a batch of cached rows: a frozen encoder's residue rows, or the
/// states entering the top layers, which then run before the head.
fn cached_forward(
    model: &SequenceClassifier,
    k: usize,
    batch: &crate::cache::ResidueBatch,
    top: Option<&TopLayers>,
    mut rng: Option<&mut ChaCha8Rng>,
) -> Result<model::HeadOutput> {
    let head = &model.heads[k];
    Ok(match top {
        None => head.forward_residues(&batch.x, &batch.mask, rng)?,
        Some(t) => {
            let encoder = &model.base.encoder;
            let hidden = encoder.forward_from(&batch.x, &batch.mask, t.from, rng.as_deref_mut())?;
            let residues = crate::cache::residues_of_tokens(&batch.mask)?;
            head.forward(&hidden, &residues, rng)?
        }
    })
}

/// Per-location decision thresholds tuned on validation probabilities (best MCC each), and
/// the exact-match accuracy they give there.
pub(crate) fn tune_thresholds(
    probs: &[Vec<f32>],
    targets: &[Target],
    labels: &[String],
) -> (f64, Vec<f32>) {
    let truth = multi_label_truth(targets);
    let th = multilabel::tune_thresholds(&truth, probs, labels.len());
    let decided = multilabel::decide(probs, &th);
    let accuracy = multilabel::report(&truth, &decided, labels, &th).accuracy;
    (accuracy, th)
}

/// The target of record `i`, computed for every record a member uses.
fn member_target(targets: &[Option<Target>], i: usize) -> &Target {
    targets[i].as_ref().expect("target of a used record")
}

/// 0/1 location sets of multi-label targets.
fn multi_label_truth(targets: &[Target]) -> Vec<Vec<bool>> {
    targets
        .iter()
        .map(|t| match &t.location {
            LocationTarget::Multi(v) => v.iter().map(|&y| y > 0.5).collect(),
            LocationTarget::Single(c) => (0..DEFAULT_CLASSES).map(|k| k == *c as usize).collect(),
        })
        .collect()
}

const DEFAULT_CLASSES: usize = crate::data::DEEPLOC_LOCATIONS.len();
