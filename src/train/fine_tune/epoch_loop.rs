//! The fine-tuning epochs: batches, gradient accumulation across ranks, optimizer steps,
//! validation and checkpoints.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::dist::Collective;
use crate::infer::BatchLimits;
use crate::model::SequenceClassifier;
use crate::tokenize::{bucketed_groups, Encoded, TokenBatch};
use crate::train::checkpoint::{self, gather_word_pos, rank_dropout_rng, LoopState, RngState};
use crate::train::metrics::{record_epoch, record_start, save_best, EpochMetrics};
use crate::train::objective::{Objective, Target};
use crate::train::observe::TrainObserver;
use crate::train::optim::{self, LinearSchedule, Optimizer};
use crate::train::setup::Examples;
use crate::train::validation::validate;
use crate::train::TrainArgs;

/// The fine-tuning loop's settings, fixed for the run, and its timers.
pub(super) struct Loop<'a> {
    pub(super) args: &'a TrainArgs,
    pub(super) comm: &'a dyn Collective,
    pub(super) world: usize,
    pub(super) rank: usize,
    pub(super) root: bool,
    /// Time a barrier before each gradient all-reduce (PROTLOC_DIST_PROFILE).
    pub(super) profile: bool,
    pub(super) global_batch: usize,
    pub(super) schedule: LinearSchedule,
    /// Shapes of the optimizer's parameters (for the gradient all-reduce).
    pub(super) shapes: Vec<candle_core::Shape>,
    pub(super) objective: Objective,
    pub(super) device: Device,
    pub(super) store: crate::model::params::ParamStore,
    pub(super) comm_s: f64,
    pub(super) comm_wait_s: f64,
    pub(super) train_loop_s: f64,
}

impl Loop<'_> {
    /// Trains epochs from `st` on, validating, logging and keeping the best model after
    /// each; returns the final state.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn epochs(
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
        let comm = self.comm;
        // The whole validation set's metrics (from this rank's share of it).
        let val_metrics = |model: &mut SequenceClassifier| {
            validate(model, comm, val_local, val_set.len(), limits)
        };
        let fresh = st.epoch == 1 && st.next_batch == 0 && st.step == 0 && st.best.is_none();
        if args.init_head && fresh {
            // The checkpoint's classifier is the first candidate; an epoch is saved only if
            // it validates better.
            if let Some(validation) = val_metrics(model)? {
                let observer = self.root.then_some(&mut *observer);
                record_start(observer, model, &args.output, validation, &mut st.best)?;
            }
        }
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
            let m = EpochMetrics::new(
                epoch,
                st.step,
                st.loss_sum / st.loss_n.max(1) as f64,
                val_metrics(model)?,
                self.schedule.lr(st.step.saturating_sub(1)),
                t0,
            );
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
