//! Reading a run's data and splitting it: the training pool (test records left out, sampled
//! with `--train-sample`) and each member's training and validation records.

use anyhow::{bail, Result};

use super::TrainArgs;
use crate::data::{self, ReadOptions};

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
        // A seeded, stratified sample of exactly n: every location keeps its proportion.
        let (_, sample) = data::split::stratified_sample(
            &dataset.records,
            &train_pool,
            n,
            args.seed ^ 0x5a_3b1e_u64,
        )
        .map_err(anyhow::Error::msg)?;
        train_pool = sample;
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
