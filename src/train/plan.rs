//! Reading a run's data and splitting it: the training pool (test records left out, sampled
//! with `--train-sample`) and each member's training and validation records.

use anyhow::{bail, Result};

use super::TrainArgs;
use crate::data::{self, ReadOptions, Record};

/// The run directory's list of the records each model trained and validated on.
pub(crate) const SPLIT_FILE: &str = "split.tsv";

/// The text of [`SPLIT_FILE`]: a header, then one row per record a member trained or
/// validated on: `member` (0 for a single model), `split` (`train` or `validation`), `id` and
/// `line` (the record's line in the data file), members in order, each one's training rows
/// then its validation rows, in file order. It answers "was this protein in my model's
/// training data?" and lets a run's validation set be scored or rebuilt elsewhere.
pub(crate) fn split_table(records: &[Record], members: &[(&[usize], &[usize])]) -> Result<Vec<u8>> {
    let mut out = csv::WriterBuilder::new()
        .delimiter(b'\t')
        .from_writer(Vec::new());
    out.write_record(["member", "split", "id", "line"])?;
    for (k, (train, val)) in members.iter().enumerate() {
        for (split, idx) in [("train", train), ("validation", val)] {
            for &i in idx.iter() {
                let r = &records[i];
                out.write_record([&k.to_string(), split, &r.id, &r.pos.line.to_string()])?;
            }
        }
    }
    Ok(out.into_inner().map_err(|e| e.into_error())?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Membrane, SourcePos};

    #[test]
    fn split_table_lists_each_members_records_in_file_order() {
        let records: Vec<Record> = (0..4)
            .map(|i| Record {
                id: format!("P{i}"),
                sequence: "MK".into(),
                location: Some("Nucleus".into()),
                membrane: Membrane::Unknown,
                is_test: false,
                partition: None,
                pos: SourcePos {
                    file: "d.fasta".into(),
                    line: 1 + 2 * i,
                },
            })
            .collect();
        let text = split_table(&records, &[(&[0, 2, 3], &[1]), (&[1, 2], &[0, 3])]).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "member\tsplit\tid\tline\n\
             0\ttrain\tP0\t1\n0\ttrain\tP2\t5\n0\ttrain\tP3\t7\n0\tvalidation\tP1\t3\n\
             1\ttrain\tP1\t3\n1\ttrain\tP2\t5\n1\tvalidation\tP0\t1\n1\tvalidation\tP3\t7\n"
        );
    }
}
