//! The frozen-encoder fast path: embed every protein once into the on-disk cache, then train
//! only a head (linear, mlp or light-attention) on the cached per-residue embeddings. Each
//! epoch costs a head's forward and backward pass, not the encoder's: minutes on two cores
//! where fine-tuning takes hours.
//!
//! The saved run directory is a complete model (encoder + head), so `eval`, `predict` and
//! `serve` use it like any fine-tuned one.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::objective::{LocationTarget, Objective, Target};
use super::optim::{self, AdamW, AdamWConfig, LinearSchedule};
use super::{
    default_labels, effective_max_residues, prepare_data, record_epoch, validation_metrics,
    EpochMetrics, TrainArgs, TrainSummary,
};
use crate::cache::{CacheSpec, EmbeddingCache};
use crate::data::Record;
use crate::eval::multilabel;
use crate::infer::BatchLimits;
use crate::model::{self, SequenceClassifier, TaskConfig};
use crate::tokenize::BatchPlan;

/// Proteins per validation batch on cached rows.
const EVAL_BATCH: usize = 32;

/// Runs `protloc train --frozen`.
pub fn train(args: &TrainArgs) -> Result<TrainSummary> {
    let device = Device::Cpu;
    let t0 = Instant::now();
    let (dataset, train_idx, val_idx) = prepare_data(args)?;
    // The encoder only embeds (frozen): its weights in the inference layout.
    let base = model::load_base(&args.model, args.seed, &device, model::Purpose::Inference)?;
    let max_res = effective_max_residues(&base.cfg, args.max_residues)?;
    let labels = default_labels();
    let pick = |idx: &[usize]| idx.iter().map(|&i| &dataset.records[i]).collect::<Vec<_>>();
    let (train_recs, val_recs) = (pick(&train_idx), pick(&val_idx));
    let to_targets = |recs: &[&Record]| -> Result<Vec<Target>> {
        recs.iter()
            .map(|r| Target::of(r, &labels, args.multi_label))
            .collect()
    };
    let (train_targets, val_targets) = (to_targets(&train_recs)?, to_targets(&val_recs)?);
    let membrane = super::resolve_membrane(args.membrane, &train_targets, true);

    // Embeddings: reuse what the cache has, embed the rest.
    let cache_dir = args
        .cache
        .clone()
        .unwrap_or_else(|| args.output.join("embedding_cache"));
    let spec = CacheSpec::for_model(&base, max_res, args.truncate)?;
    let mut cache = EmbeddingCache::open(&cache_dir, spec)?;
    let all: Vec<&str> = train_recs
        .iter()
        .chain(&val_recs)
        .map(|r| r.sequence.as_str())
        .collect();
    let missing = all.iter().filter(|s| !cache.contains(s)).count();
    if missing > 0 {
        eprintln!(
            "embedding {missing} proteins into {} ({} already cached)",
            cache_dir.display(),
            all.len() - missing
        );
        let pb = crate::progress::bar(missing as u64, "embedding", "proteins");
        let limits = BatchLimits {
            max_batch_tokens: args.eval_batch_tokens,
            max_batch_size: 64,
        };
        cache.fill(&base, &all, limits, Some(&pb))?;
        pb.finish_and_clear();
    } else {
        eprintln!(
            "all {} proteins found in the embedding cache {}",
            all.len(),
            cache_dir.display()
        );
    }

    let task = TaskConfig {
        pool: args.pool,
        truncate: args.truncate,
        max_residues: max_res,
        head_dropout: args.dropout.unwrap_or(0.25),
        head: args.head,
        head_hidden: args.head_hidden,
        la_kernel: args.la_kernel,
        membrane,
        multi_label: args.multi_label,
        frozen_encoder: true,
        ..TaskConfig::new(labels.clone(), &args.model)
    };
    let mut model = SequenceClassifier::new(base, task)?;
    let objective = Objective {
        class_weights: Objective::class_weights(&train_targets, labels.len(), args.class_weighting),
        multi_label: args.multi_label,
        membrane,
    };

    let mut params = Vec::new();
    let total_params = model.base.store.num_parameters();
    for (name, var) in model.base.store.vars() {
        if !is_head(&name) {
            continue;
        }
        let wd = if optim::no_decay(&name) {
            0.0
        } else {
            args.weight_decay
        };
        params.push((name, var, args.head_lr.map_or(1.0, |h| h / args.lr), wd));
    }
    let trainable: usize = params.iter().map(|p| p.1.elem_count()).sum();
    let mut opt = AdamW::new(AdamWConfig::default(), params)?;
    let schedule = LinearSchedule::for_run(
        args.lr,
        args.warmup_ratio,
        train_recs.len().div_ceil(args.batch_size),
        args.epochs,
        args.max_steps,
    );
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    crate::artifacts::write_atomic(
        &args.output.join("training_args.json"),
        serde_json::to_string_pretty(args)?.as_bytes(),
    )?;
    let metrics_path = args.output.join("metrics.jsonl");
    let _ = std::fs::remove_file(&metrics_path);
    tracing::info!(
        train = train_recs.len(),
        val = val_recs.len(),
        trainable,
        head = ?args.head,
        membrane,
        "training a head on the frozen encoder"
    );

    let lengths: Vec<usize> = train_recs.iter().map(|r| r.sequence.len()).collect();
    let mut shuffle_rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed_d20f_u64);
    let mut history: Vec<EpochMetrics> = Vec::new();
    let mut best = None;
    let mut step = 0usize;
    'epochs: for epoch in 1..=args.epochs {
        let mut order: Vec<usize> = (0..train_recs.len()).collect();
        order.shuffle(&mut shuffle_rng);
        let batches = BatchPlan::bucketed(&order, &lengths, args.batch_size, 50, &mut shuffle_rng);
        let pb = crate::progress::bar(
            batches.len() as u64,
            &format!("epoch {epoch}/{}", args.epochs),
            "batches",
        );
        let (mut loss_sum, mut loss_n) = (0f64, 0usize);
        let mut stop = false;
        for group in &batches {
            let seqs: Vec<&str> = group
                .iter()
                .map(|&i| train_recs[i].sequence.as_str())
                .collect();
            let batch = cache.batch(&seqs, &device)?;
            let targets: Vec<&Target> = group.iter().map(|&i| &train_targets[i]).collect();
            let out = model
                .head
                .forward_residues(&batch.x, &batch.mask, Some(&mut dropout_rng))?;
            let (loss, location_loss) = objective.loss(&out, &targets)?;
            if !location_loss.is_finite() {
                bail!("non-finite loss at epoch {epoch}, step {step}: lower --lr");
            }
            loss_sum += location_loss * group.len() as f64;
            loss_n += group.len();
            let grads = opt.collect_grads(&loss.backward()?);
            let norm = opt.grad_norm(&grads)?;
            let lr = schedule.lr(step);
            opt.step(&grads, lr, optim::clip_scale(norm, args.max_grad_norm))?;
            step += 1;
            pb.set_prefix(format!("loss {:.4}", loss_sum / loss_n as f64));
            pb.inc(1);
            if args.max_steps.is_some_and(|m| step >= m) {
                stop = true;
                break;
            }
        }
        pb.finish_and_clear();
        let val = if val_recs.is_empty() {
            None
        } else {
            let seqs: Vec<&str> = val_recs.iter().map(|r| r.sequence.as_str()).collect();
            let out = cached_outputs(&model, &mut cache, &seqs, &device)?;
            let probs = out.probabilities;
            let mut metrics = validation_metrics(&probs, out.membrane.as_deref(), &val_targets);
            if args.multi_label {
                // Per-location thresholds tuned on validation; saved with the model.
                let truth = multi_label_truth(&val_targets);
                let th = multilabel::tune_thresholds(&truth, &probs, labels.len());
                let decided = multilabel::decide(&probs, &th);
                metrics.accuracy = multilabel::report(&truth, &decided, &labels, &th).accuracy;
                model.task.thresholds = Some(th);
            }
            Some(metrics)
        };
        let m = EpochMetrics::new(
            epoch,
            step,
            loss_sum / loss_n.max(1) as f64,
            val,
            schedule.lr(step.saturating_sub(1)),
            &t0,
        );
        record_epoch(
            &model,
            args,
            true,
            &metrics_path,
            m,
            &mut history,
            &mut best,
        )?;
        if stop {
            break 'epochs;
        }
    }
    let best_epoch = best.map_or(history.len(), |b| b.2);
    Ok(TrainSummary {
        epochs: history,
        best_epoch,
        steps: step,
        train_records: train_recs.len(),
        val_records: val_recs.len(),
        trainable_parameters: trainable,
        total_parameters: total_params,
        // One process; the head's epochs are not timed apart from validation here.
        world_size: 1,
        train_loop_s: t0.elapsed().as_secs_f64(),
        comm_s: 0.0,
        comm_wait_s: 0.0,
    })
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

/// Parameters of the head (the only ones trained on a frozen encoder).
fn is_head(name: &str) -> bool {
    name.starts_with("classifier.") || name.starts_with("membrane_classifier.")
}

/// Location probabilities (and membrane probabilities, when the head predicts them) of the
/// cached proteins `seqs`, in order, without gradient tracking.
pub fn cached_outputs(
    model: &SequenceClassifier,
    cache: &mut EmbeddingCache,
    seqs: &[&str],
    device: &Device,
) -> Result<crate::infer::HeadPredictions> {
    let head = model.head.detached();
    let mut probs = Vec::with_capacity(seqs.len());
    let mut membrane: Option<Vec<f32>> = model.task.membrane.then(Vec::new);
    // Length-sorted batches pad little; results go back to input order.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut rows: Vec<(usize, Vec<f32>, Option<f32>)> = Vec::with_capacity(seqs.len());
    for group in order.chunks(EVAL_BATCH) {
        let s: Vec<&str> = group.iter().map(|&i| seqs[i]).collect();
        let batch = cache.batch(&s, device)?;
        let out = head.forward_residues(&batch.x, &batch.mask, None)?;
        let p: Vec<Vec<f32>> = model.probabilities(&out.logits)?.to_vec2()?;
        let m: Option<Vec<f32>> = match &out.membrane {
            Some(t) => Some(
                crate::model::ops::softmax_last_dim(t)?
                    .narrow(1, 1, 1)?
                    .squeeze(1)?
                    .to_vec1()?,
            ),
            None => None,
        };
        for (k, (&i, row)) in group.iter().zip(p).enumerate() {
            rows.push((i, row, m.as_ref().map(|m| m[k])));
        }
    }
    rows.sort_by_key(|r| r.0);
    for (_, p, m) in rows {
        probs.push(p);
        if let (Some(v), Some(m)) = (membrane.as_mut(), m) {
            v.push(m);
        }
    }
    Ok(crate::infer::HeadPredictions {
        probabilities: probs,
        membrane,
    })
}
