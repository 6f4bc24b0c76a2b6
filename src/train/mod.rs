//! Fine-tuning: data preparation, the training loop, per-epoch validation, checkpoints.

pub mod args;
pub mod checkpoint;
pub mod frozen;
pub mod objective;
pub mod observe;
pub mod optim;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{self, ReadOptions, Record};
use crate::dist::{Collective, Local};
use crate::infer::{self, BatchLimits};
pub use crate::infer::{effective_max_residues, DEFAULT_MAX_RESIDUES};
use crate::model::lora::LoraConfig;
use crate::model::{self, SequenceClassifier, TaskConfig};
use crate::tokenize::{Batch, BatchPlan, Encoded, Truncation};
use checkpoint::{LoopState, RngState};
use objective::{MembraneMode, Objective, Target};
use optim::{AdamW, AdamWConfig, LinearSchedule};

pub use args::{default_head_dropout, TrainArgs, TrainOptions};
pub use observe::{LogObserver, TrainObserver};

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
    use objective::LocationTarget;
    let mut loss = 0f64;
    let mut correct = 0usize;
    for (p, t) in probs.iter().zip(targets) {
        match &t.location {
            LocationTarget::Single(c) => {
                loss -= (p[*c as usize].max(1e-12) as f64).ln();
                correct += usize::from(infer::argmax(p) == *c as usize);
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

/// Whether to train the membrane output: as asked, or (auto) for a frozen encoder when any
/// target has a flag. Auto leaves it off when fine-tuning: sharing a small encoder's
/// gradient (and its clipping budget) with a second task cost location accuracy there (the
/// demo's tiny BERT fell from 73.8% to 60.0% with it on), while heads on frozen embeddings
/// lose nothing.
pub(crate) fn resolve_membrane(mode: MembraneMode, targets: &[Target], frozen: bool) -> bool {
    match mode {
        MembraneMode::On => true,
        MembraneMode::Off => false,
        MembraneMode::Auto => frozen && targets.iter().any(|t| t.membrane.is_some()),
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

/// Encoded proteins and their class indices, kept apart so the encodings can be handed to
/// batched inference as they are.
struct Examples {
    enc: Vec<Encoded>,
    targets: Vec<Target>,
}

impl Examples {
    fn len(&self) -> usize {
        self.enc.len()
    }

    fn is_empty(&self) -> bool {
        self.enc.is_empty()
    }

    /// Every `world`-th example starting at `rank` (a rank's share of validation).
    fn shard(&self, rank: usize, world: usize) -> Examples {
        let keep = |i: &usize| i % world == rank;
        Examples {
            enc: (0..self.len())
                .filter(keep)
                .map(|i| self.enc[i].clone())
                .collect(),
            targets: (0..self.len())
                .filter(keep)
                .map(|i| self.targets[i].clone())
                .collect(),
        }
    }
}

/// Labels used for class indices: the ten DeepLoc locations, in their canonical order.
pub fn default_labels() -> Vec<String> {
    data::DEEPLOC_LOCATIONS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn encode_examples(
    model: &model::BaseModel,
    records: &[&Record],
    labels: &[String],
    max_res: usize,
    policy: Truncation,
    multi_label: bool,
) -> Result<Examples> {
    let (enc, targets) = records
        .iter()
        .map(|r| {
            let target = Target::of(r, labels, multi_label)?;
            Ok((model.tokenizer.encode(&r.sequence, max_res, policy), target))
        })
        .collect::<Result<(Vec<_>, Vec<_>)>>()?;
    Ok(Examples { enc, targets })
}

/// Freezes the embeddings and the first `frozen_layers` encoder layers. With LoRA
/// (`lora.rank > 0`) every encoder weight is frozen instead and adapters go on the layers
/// from `frozen_layers` on; returns their configuration.
pub(crate) fn prepare_encoder(
    base: &mut model::BaseModel,
    frozen_layers: usize,
    lora: &LoraConfig,
) -> Result<Option<LoraConfig>> {
    let layers = base.cfg.num_hidden_layers;
    if frozen_layers > layers {
        bail!("{frozen_layers} layers to freeze but the model has only {layers}");
    }
    base.encoder.freeze(frozen_layers);
    if lora.rank == 0 {
        return Ok(None);
    }
    let cfg = LoraConfig {
        from_layer: frozen_layers,
        ..lora.clone()
    };
    // Adapters only: every encoder weight leaves the graph, then the adapters join it.
    base.encoder = base.encoder.detached();
    base.encoder.attach_lora(&base.store.initialising(), &cfg)?;
    tracing::info!(
        rank = cfg.rank,
        alpha = cfg.alpha,
        targets = ?cfg.targets,
        from_layer = cfg.from_layer,
        "LoRA adapters"
    );
    Ok(Some(cfg))
}

/// Whether parameter `name` trains: the head always; with LoRA the adapters; otherwise
/// every encoder parameter outside the embeddings and the first `frozen_layers` layers.
pub(crate) fn trains(name: &str, prefix: &str, frozen_layers: usize, lora: bool) -> bool {
    if model::is_head_param(name) {
        return true;
    }
    if lora {
        model::params::is_adapter(name)
    } else {
        !is_frozen(name, prefix, frozen_layers)
    }
}

/// Which parameters are frozen: embeddings and the first `n` layers.
fn is_frozen(name: &str, prefix: &str, n: usize) -> bool {
    if n == 0 {
        return false;
    }
    if name.starts_with(&format!("{prefix}.embeddings.")) {
        return true;
    }
    let layer_prefix = format!("{prefix}.encoder.layer.");
    name.strip_prefix(&layer_prefix)
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i < n)
}

/// Continues the run in `run_dir` from its newest intact checkpoint, with the arguments
/// it was started with (`training_args.json`).
pub fn resume(run_dir: &std::path::Path) -> Result<TrainSummary> {
    resume_with(run_dir, &Local)
}

/// [`resume`] as one rank of a data-parallel job: every rank reads the run directory (it
/// must be on a file system they share) and must be started with the same world size.
pub fn resume_with(run_dir: &std::path::Path, comm: &dyn Collective) -> Result<TrainSummary> {
    resume_observed(run_dir, comm, &mut LogObserver)
}

/// [`resume_with`], reporting epochs and the checkpoint it resumes from to `observer` (on
/// the root rank only).
pub fn resume_observed(
    run_dir: &std::path::Path,
    comm: &dyn Collective,
    observer: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    let path = run_dir.join("training_args.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read; is this a run directory?", path.display()))?;
    let mut args: TrainArgs = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid training arguments", path.display()))?;
    args.output = run_dir.to_path_buf();
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

/// Reads the data and splits it: (all records, training indices, validation indices). Test
/// records are never in either list.
pub(crate) fn prepare_data(args: &TrainArgs) -> Result<(data::Dataset, Vec<usize>, Vec<usize>)> {
    let (dataset, pool) = training_pool(args)?;
    let (train, val) = split_pool(args, &dataset, &pool, args.seed, args.partition)?;
    Ok((dataset, train, val))
}

/// One model of a run (an ensemble member, or the only one): its seed and its split.
pub(crate) struct MemberPlan {
    pub seed: u64,
    /// The partition it validates on (`--partition`, or partition k for member k of
    /// `--folds`).
    pub holdout_partition: Option<u32>,
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

/// Reads the data and splits it once per member ([`TrainArgs::members`]): member k with seed
/// `seed + k`, validating on a stratified split drawn with that seed (or on `--partition`),
/// or with `--folds` on partition k. One member is exactly [`prepare_data`]'s split.
pub(crate) fn plan_members(args: &TrainArgs) -> Result<(data::Dataset, Vec<MemberPlan>)> {
    let (dataset, pool) = training_pool(args)?;
    if let Some(n) = args.folds {
        let mut present: Vec<u32> = pool
            .iter()
            .filter_map(|&i| dataset.records[i].partition)
            .collect();
        present.sort_unstable();
        present.dedup();
        if present.is_empty() {
            bail!(
                "--folds {n} holds out partition k for member k, but {} has no `partition` column (DeepLoc 2.0's CSV has one, 0-4)",
                args.data.display()
            );
        }
        if let Some(k) = (0..n as u32).find(|k| present.binary_search(k).is_err()) {
            bail!(
                "--folds {n}: no training record of {} is in partition {k} (partitions present: {present:?})",
                args.data.display()
            );
        }
        let unassigned = pool
            .iter()
            .filter(|&&i| dataset.records[i].partition.is_none())
            .count();
        if unassigned > 0 {
            tracing::warn!(
                "{unassigned} training records have no partition: every member trains on them"
            );
        }
    }
    let plans = (0..args.members())
        .map(|k| {
            let seed = args.seed.wrapping_add(k as u64);
            let holdout = match args.folds {
                Some(_) => Some(k as u32),
                None => args.partition,
            };
            let (train, val) = split_pool(args, &dataset, &pool, seed, holdout)?;
            Ok(MemberPlan {
                seed,
                holdout_partition: holdout,
                train,
                val,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((dataset, plans))
}

/// Reads the data: (all records, the training pool: not test-tagged, sampled with
/// `--train-sample`).
fn training_pool(args: &TrainArgs) -> Result<(data::Dataset, Vec<usize>)> {
    let opts = ReadOptions {
        skip_invalid: args.skip_invalid,
        require_labels: true,
        multi_label: args.multi_label,
    };
    let mut dataset = data::read_dataset(&args.data, opts)?;
    for w in &dataset.skipped {
        tracing::warn!("skipped: {w}");
    }
    if let Some(n) = args.limit {
        dataset.records.truncate(n);
    }
    let (mut train_pool, _test) = data::split::train_test(&dataset.records);
    if train_pool.is_empty() {
        bail!(
            "{}: no training records (all records are tagged test?)",
            args.data.display()
        );
    }
    if let Some(n) = args.train_sample {
        if n == 0 {
            bail!("--train-sample must be at least 1");
        }
        if n < train_pool.len() {
            // The stratified splitter draws a seeded, per-location share: keep its "held out"
            // side as the sample, so every location keeps its proportion.
            let fraction = n as f64 / train_pool.len() as f64;
            let (_, sample) = data::split::stratified_validation(
                &dataset.records,
                &train_pool,
                fraction,
                args.seed ^ 0x5a_3b1e_u64,
            )
            .map_err(anyhow::Error::msg)?;
            train_pool = sample;
        }
    }
    Ok((dataset, train_pool))
}

/// (training, validation) indices of `pool`: the records of `partition` against the rest,
/// or a stratified split drawn with `seed`.
fn split_pool(
    args: &TrainArgs,
    dataset: &data::Dataset,
    pool: &[usize],
    seed: u64,
    partition: Option<u32>,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if let Some(p) = partition {
        let (val, train): (Vec<usize>, Vec<usize>) = pool
            .iter()
            .partition(|&&i| dataset.records[i].partition == Some(p));
        if val.is_empty() {
            bail!(
                "{}: no training record is in partition {p} (is there a `partition` column?)",
                args.data.display()
            );
        }
        return Ok((train, val));
    }
    data::split::stratified_validation(&dataset.records, pool, args.val_fraction, seed)
        .map_err(anyhow::Error::msg)
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
    let rank = comm.rank();
    let root = comm.is_root();
    if args.frozen || args.train_top_layers > 0 {
        if world > 1 {
            bail!(
                "--frozen and --train-top-layers train on cached embeddings (minutes per epoch): \
                 run them as one process, not under a launcher ({world} ranks here)"
            );
        }
        return frozen::train_observed(args, observer);
    }
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

/// Validation metrics over the whole validation set (`val_total` proteins) from this rank's
/// share `val` of it: sums of loss, hits and count are added up across ranks.
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

#[allow(clippy::too_many_arguments)]
fn finish_epoch(
    model: &mut SequenceClassifier,
    comm: &dyn Collective,
    val: &Examples,
    val_total: usize,
    limits: BatchLimits,
    epoch: usize,
    step: usize,
    train_loss: f64,
    lr: f64,
    t0: &Instant,
) -> Result<EpochMetrics> {
    let metrics = if val_total == 0 {
        None
    } else {
        let local = if val.is_empty() {
            None
        } else {
            let out = infer::head_outputs(model, &val.enc, limits, None)?;
            let mut m =
                validation_metrics(&out.probabilities, out.membrane.as_deref(), &val.targets);
            if model.task.multi_label && comm.world_size() == 1 {
                // Per-location thresholds tuned on validation, saved with the model (as for
                // heads on a frozen encoder).
                let (accuracy, th) =
                    frozen::tune_thresholds(&out.probabilities, &val.targets, &model.task.labels);
                m.accuracy = accuracy;
                model.task.thresholds = Some(th);
            }
            Some(m)
        };
        if comm.world_size() == 1 {
            local
        } else {
            // Back from this shard's means to sums (hits are whole numbers), added up over
            // ranks: [loss, hits, proteins, membrane hits, proteins with a membrane flag].
            let n = val.len() as f64;
            let known = val.targets.iter().filter(|t| t.membrane.is_some()).count() as f64;
            let mut sums = match local {
                Some(m) => [
                    m.loss * n,
                    (m.accuracy * n).round(),
                    n,
                    m.membrane_accuracy.map_or(0.0, |a| (a * known).round()),
                    if m.membrane_accuracy.is_some() {
                        known
                    } else {
                        0.0
                    },
                ],
                None => [0.0; 5],
            };
            comm.all_reduce_sum_f64(&mut sums)?;
            Some(ValidationMetrics {
                loss: sums[0] / sums[2],
                accuracy: sums[1] / sums[2],
                membrane_accuracy: (sums[4] > 0.0).then(|| sums[3] / sums[4]),
            })
        }
    };
    Ok(EpochMetrics::new(epoch, step, train_loss, metrics, lr, t0))
}

/// Appends the epoch to `metrics.jsonl`, hands it to the observer, keeps the best
/// checkpoint (highest validation accuracy, ties broken by lower validation loss; without a
/// validation set the latest epoch is kept).
///
/// Every rank keeps the same bookkeeping (it goes into checkpoints); only the root rank,
/// which passes its `observer` (the others pass `None`), reports and writes. Returns whether
/// this epoch is the new best (the caller keeps its weights).
fn record_epoch(
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

/// Writes the best model so far into the run directory.
fn save_best(model: &SequenceClassifier, dir: &std::path::Path, epoch: usize) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_parameter_names() {
        assert!(is_frozen(
            "bert.embeddings.word_embeddings.weight",
            "bert",
            2
        ));
        assert!(is_frozen(
            "bert.encoder.layer.1.output.dense.weight",
            "bert",
            2
        ));
        assert!(!is_frozen(
            "bert.encoder.layer.2.output.dense.weight",
            "bert",
            2
        ));
        assert!(!is_frozen(
            "bert.encoder.layer.10.output.dense.weight",
            "bert",
            2
        ));
        assert!(!is_frozen("classifier.weight", "bert", 2));
        assert!(!is_frozen(
            "bert.embeddings.word_embeddings.weight",
            "bert",
            0
        ));
        assert!(!is_frozen(
            "esm.encoder.emb_layer_norm_after.weight",
            "esm",
            6
        ));
    }
}
