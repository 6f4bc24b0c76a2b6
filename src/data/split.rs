//! Train/test/validation splits as index lists into a record slice.
//!
//! Indices (not copies) keep the records in one place and make splits cheap to save and
//! compare. All outputs are sorted ascending so downstream order does not depend on shuffling.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::Record;

/// Splits by the `is_test` tag: `(train, test)` indices, ascending.
pub fn train_test(records: &[Record]) -> (Vec<usize>, Vec<usize>) {
    (0..records.len()).partition(|&i| !records[i].is_test)
}

/// Holds out a stratified validation set from `indices` (indices into `records`).
///
/// Each location label (unlabeled records form one more group) is shuffled with a
/// ChaCha8 generator seeded from `seed`, and `round(val_fraction * n)` of its members go to
/// validation, but at least 1 when the group has two or more members and the fraction is
/// positive, and never the whole group, so every class with two or more members stays in
/// both sides. Returns `(train, val)`, each sorted ascending; together they hold every entry of
/// `indices` exactly once (duplicates in `indices` are kept as given).
///
/// Errors when `val_fraction` is not in `[0, 1)` or an index is out of range.
pub fn stratified_validation(
    records: &[Record],
    indices: &[usize],
    val_fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    // `contains` is false for NaN, so NaN is rejected too.
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(format!(
            "validation fraction must be in [0, 1), got {val_fraction}"
        ));
    }
    check_indices(records, indices)?;
    Ok(stratified(records, indices, seed, |size| {
        validation_count(size, val_fraction)
    }))
}

/// A seeded, stratified sample of exactly `n` of `indices` (all of them when `n` is not
/// smaller): `(rest, sample)`, each sorted ascending.
///
/// Each location group (as in [`stratified_validation`], shuffled by the same generator in
/// the same order) gives the first few of its shuffled members. How many: Balinski and
/// Young's quota method, which adds one protein at a time, so the shares add up to `n`
/// exactly, each stays within one of `n / len` of its group, and a smaller sample with the
/// same seed is a subset of a larger one. Per-group rounding alone drifts (one protein in
/// 1,000 of DeepLoc 1.0's ten locations, 44% too many for a 200-protein sample of DeepLoc
/// 2.0, whose label sets form hundreds of small groups); largest-remainder rounding is exact
/// but can give a group fewer proteins in a larger sample.
///
/// Errors when an index is out of range.
pub fn stratified_sample(
    records: &[Record],
    indices: &[usize],
    n: usize,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    check_indices(records, indices)?;
    let sizes: Vec<usize> = groups(records, indices).values().map(Vec::len).collect();
    let mut counts = quota_shares(&sizes, n.min(indices.len())).into_iter();
    Ok(stratified(records, indices, seed, |_| {
        counts.next().expect("one count per group")
    }))
}

/// Shares of `n` for groups of `sizes` (n <= their sum) by the quota method: each of the
/// n steps gives one more to the group with the largest size / (share + 1) among those
/// still below their upper quota ceil(step * size / total) (ties to the earlier group).
fn quota_shares(sizes: &[usize], n: usize) -> Vec<usize> {
    let total = sizes.iter().sum::<usize>() as u128;
    let mut shares = vec![0usize; sizes.len()];
    for step in 1..=n as u128 {
        let mut best: Option<usize> = None;
        for (g, (&size, &share)) in sizes.iter().zip(&shares).enumerate() {
            let (size, share) = (size as u128, share as u128);
            if share * total >= size * step {
                continue; // at its upper quota
            }
            let better = best.is_none_or(|b| {
                let (bs, bc) = (sizes[b] as u128, shares[b] as u128);
                size * (bc + 1) > bs * (share + 1)
            });
            if better {
                best = Some(g);
            }
        }
        shares[best.expect("a group below its quota while step <= total")] += 1;
    }
    shares
}

fn check_indices(records: &[Record], indices: &[usize]) -> Result<(), String> {
    match indices.iter().find(|&&i| i >= records.len()) {
        Some(&bad) => Err(format!(
            "record index {bad} out of range ({} records)",
            records.len()
        )),
        None => Ok(()),
    }
}

/// `indices` grouped by location label (unlabeled records form one group). A BTreeMap (not
/// a HashMap) so groups are visited in the same order on every run: the single generator's
/// stream is consumed group by group.
fn groups<'a>(records: &'a [Record], indices: &[usize]) -> BTreeMap<Option<&'a str>, Vec<usize>> {
    let mut groups: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for &i in indices {
        groups
            .entry(records[i].location.as_deref())
            .or_default()
            .push(i);
    }
    groups
}

/// Shuffles each location group with one generator seeded from `seed` and takes the first
/// `take(group size)` of it: `(rest, taken)`, each sorted ascending.
fn stratified(
    records: &[Record],
    indices: &[usize],
    seed: u64,
    mut take: impl FnMut(usize) -> usize,
) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rest = Vec::with_capacity(indices.len());
    let mut taken = Vec::new();
    for (_, mut members) in groups(records, indices) {
        // Sort first so the result depends only on the set of indices, not their order.
        members.sort_unstable();
        members.shuffle(&mut rng);
        let k = take(members.len());
        taken.extend_from_slice(&members[..k]);
        rest.extend_from_slice(&members[k..]);
    }
    rest.sort_unstable();
    taken.sort_unstable();
    (rest, taken)
}

/// How many of a group of `n` go to validation (see [`stratified_validation`]).
fn validation_count(n: usize, fraction: f64) -> usize {
    if n < 2 || fraction <= 0.0 {
        return 0;
    }
    let k = (fraction * n as f64).round() as usize;
    k.clamp(1, n - 1)
}

/// A record as [`SPLIT_FILE`] names it: its id, line and sequence digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordKey {
    pub id: String,
    pub line: usize,
    pub sequence: String,
}

impl RecordKey {
    pub fn of(r: &Record) -> Self {
        Self {
            id: r.id.clone(),
            line: r.pos.line,
            sequence: super::sequence_key(&r.sequence),
        }
    }
}

/// The file in a run directory that lists the records each model trained and validated on.
pub const SPLIT_FILE: &str = "split.tsv";

/// The text of [`SPLIT_FILE`]: a header, then one row per record a member trained or
/// validated on: `member` (0 for a single model), `split` (`train` or `validation`), `id`,
/// `line` (the record's line in the data file) and `sequence` (a digest of its residues,
/// [`super::sequence_key`]), members in order, each one's training rows then its validation
/// rows, in the order given. It answers "was this protein in my model's
/// training data?", and `eval --split validation` scores the validation rows.
pub fn split_table(records: &[Record], members: &[(&[usize], &[usize])]) -> Result<Vec<u8>> {
    let mut out = csv::WriterBuilder::new()
        .delimiter(b'\t')
        .from_writer(Vec::new());
    out.write_record(["member", "split", "id", "line", "sequence"])?;
    for (k, (train, val)) in members.iter().enumerate() {
        for (split, idx) in [("train", train), ("validation", val)] {
            for &i in idx.iter() {
                let key = RecordKey::of(&records[i]);
                let line = key.line.to_string();
                out.write_record([&k.to_string(), split, &key.id, &line, &key.sequence])?;
            }
        }
    }
    Ok(out.into_inner().map_err(|e| e.into_error())?)
}

/// The records a run directory's model validated on, as [`RecordKey`]s, from its
/// [`SPLIT_FILE`]. An ensemble qualifies only when its members share one validation set
/// (`--partition`): otherwise each member's validation records trained the others.
pub fn validation_records(run_dir: &Path) -> Result<BTreeSet<RecordKey>> {
    let path = run_dir.join(SPLIT_FILE);
    if !path.is_file() {
        bail!(
            "{} has no {SPLIT_FILE}, so which records it validated on is unknown (`protloc \
             train` writes one; runs from before 2026-12-05 and imported models have none)",
            run_dir.display()
        );
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .from_path(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut members: BTreeMap<usize, BTreeSet<RecordKey>> = BTreeMap::new();
    for (n, row) in reader.records().enumerate() {
        // The header is line 1.
        let at = format!("{}:{}", path.display(), n + 2);
        let row = row.with_context(|| at.clone())?;
        let field = |i: usize| row.get(i).unwrap_or_default();
        let number = |i: usize| {
            field(i)
                .parse::<usize>()
                .with_context(|| format!("{at}: not a number: {:?}", field(i)))
        };
        let member = members.entry(number(0)?).or_default();
        match field(1) {
            "validation" => {
                member.insert(RecordKey {
                    id: field(2).to_string(),
                    line: number(3)?,
                    sequence: field(4).to_string(),
                });
            }
            "train" => {}
            other => bail!("{at}: split {other:?}, expected train or validation"),
        }
    }
    let mut sets = members.into_values();
    let Some(first) = sets.next() else {
        bail!("{} lists no records", path.display());
    };
    if sets.any(|s| s != first) {
        bail!(
            "{} is an ensemble whose members validated on different records (each trained on \
             the others' validation records): there is no validation set to score; its members' \
             own validation scores are in its config.json (`protloc.members`)",
            run_dir.display()
        );
    }
    if first.is_empty() {
        bail!("{} trained without a validation split", run_dir.display());
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Membrane, SourcePos};
    use proptest::prelude::*;

    fn rec(i: usize, location: Option<&str>, is_test: bool) -> Record {
        Record {
            id: format!("r{i}"),
            sequence: "MK".into(),
            location: location.map(str::to_string),
            membrane: Membrane::Unknown,
            is_test,
            partition: None,
            pos: SourcePos {
                file: "x".into(),
                line: i + 1,
            },
        }
    }

    const LABELS: [Option<&str>; 4] = [Some("Nucleus"), Some("Cytoplasm"), Some("Plastid"), None];

    fn sample(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| rec(i, LABELS[(i * 7 + i / 3) % 4], i % 5 == 0))
            .collect()
    }

    #[test]
    fn train_test_by_tag() {
        let recs = sample(12);
        let (train, test) = train_test(&recs);
        assert_eq!(test, vec![0, 5, 10]);
        assert_eq!(train.len(), 9);
    }

    #[test]
    fn counts() {
        assert_eq!(validation_count(0, 0.1), 0);
        assert_eq!(validation_count(1, 0.9), 0);
        assert_eq!(validation_count(2, 0.01), 1);
        assert_eq!(validation_count(2, 0.9), 1);
        assert_eq!(validation_count(100, 0.1), 10);
        assert_eq!(validation_count(100, 0.0), 0);
        assert_eq!(validation_count(25, 0.1), 3); // 2.5 rounds away from zero
    }

    #[test]
    fn rejects_bad_fraction_and_index() {
        let recs = sample(4);
        for f in [-0.1, 1.0, 1.5, f64::NAN] {
            assert!(stratified_validation(&recs, &[0, 1], f, 0).is_err());
        }
        assert!(stratified_validation(&recs, &[0, 9], 0.5, 0).is_err());
    }

    #[test]
    fn seeds_matter() {
        let recs = sample(200);
        let idx: Vec<usize> = (0..200).collect();
        let a = stratified_validation(&recs, &idx, 0.2, 1).unwrap();
        let b = stratified_validation(&recs, &idx, 0.2, 1).unwrap();
        let c = stratified_validation(&recs, &idx, 0.2, 2).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.1, c.1);
        assert_eq!(a.1.len(), c.1.len());
    }

    proptest! {
        #[test]
        fn split_invariants(
            labels in proptest::collection::vec(0usize..4, 0..120),
            fraction in 0.0f64..0.95,
            seed in any::<u64>(),
        ) {
            let recs: Vec<Record> =
                labels.iter().enumerate().map(|(i, &l)| rec(i, LABELS[l], false)).collect();
            let idx: Vec<usize> = (0..recs.len()).rev().collect();
            let (train, val) = stratified_validation(&recs, &idx, fraction, seed).unwrap();
            // Sorted, disjoint, complete.
            prop_assert!(train.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(val.windows(2).all(|w| w[0] < w[1]));
            let mut all: Vec<usize> = train.iter().chain(&val).copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..recs.len()).collect::<Vec<_>>());
            // Per-class proportion within one record of the target.
            for l in LABELS {
                let n = recs.iter().filter(|r| r.location.as_deref() == l).count();
                let v = val.iter().filter(|&&i| recs[i].location.as_deref() == l).count();
                prop_assert!((v as f64 - fraction * n as f64).abs() <= 1.0, "{l:?}: {v} of {n}");
                if n >= 2 {
                    prop_assert!(v < n);
                }
            }
            // Deterministic.
            let again = stratified_validation(&recs, &idx, fraction, seed).unwrap();
            prop_assert_eq!((train, val), again);
        }
    }

    proptest! {
        #[test]
        fn sample_is_exactly_n_and_stratified(
            labels in proptest::collection::vec(0usize..4, 1..120),
            want in 0usize..130,
            seed in any::<u64>(),
        ) {
            let recs: Vec<Record> =
                labels.iter().enumerate().map(|(i, &l)| rec(i, LABELS[l], false)).collect();
            let idx: Vec<usize> = (0..recs.len()).rev().collect();
            let (rest, sample) = stratified_sample(&recs, &idx, want, seed).unwrap();
            prop_assert_eq!(sample.len(), want.min(recs.len()));
            prop_assert!(sample.windows(2).all(|w| w[0] < w[1]));
            let mut all: Vec<usize> = rest.iter().chain(&sample).copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..recs.len()).collect::<Vec<_>>());
            // Each location within one record of its share.
            let share = want.min(recs.len()) as f64 / recs.len() as f64;
            for l in LABELS {
                let n = recs.iter().filter(|r| r.location.as_deref() == l).count();
                let s = sample.iter().filter(|&&i| recs[i].location.as_deref() == l).count();
                prop_assert!((s as f64 - share * n as f64).abs() < 1.0, "{l:?}: {s} of {n}");
            }
            // Nested: one more protein adds to the sample, drops nothing from it.
            let (_, bigger) = stratified_sample(&recs, &idx, want + 1, seed).unwrap();
            prop_assert!(sample.iter().all(|i| bigger.binary_search(i).is_ok()));
            prop_assert_eq!(stratified_sample(&recs, &idx, want, seed).unwrap(), (rest, sample));
        }
    }

    /// Many small label groups (DeepLoc 2.0's label sets): per-group rounding with at least
    /// one per group gave 288 proteins for `--train-sample 200`.
    #[test]
    fn sample_of_many_small_groups_is_exact() {
        let names: Vec<String> = (0..150).map(|g| format!("set{g}")).collect();
        let recs: Vec<Record> = (0..600)
            .map(|i| rec(i, Some(names[i % 150].as_str()), false))
            .collect();
        let idx: Vec<usize> = (0..600).collect();
        let (_, sample) = stratified_sample(&recs, &idx, 100, 7).unwrap();
        assert_eq!(sample.len(), 100);
        assert!(stratified_sample(&recs, &[0, 600], 1, 7).is_err());
        // The validation split keeps its rule: one of every group of two or more.
        let (_, val) = stratified_validation(&recs, &idx, 100.0 / 600.0, 7).unwrap();
        assert_eq!(val.len(), 150);
    }

    #[test]
    fn split_table_lists_each_members_records_and_reads_back_their_validation_set() {
        let records: Vec<Record> = (0..4)
            .map(|i| Record {
                pos: SourcePos {
                    file: "d.fasta".into(),
                    line: 1 + 2 * i,
                },
                ..rec(i, Some("Nucleus"), false)
            })
            .collect();
        let text = split_table(&records, &[(&[0, 2, 3], &[1]), (&[1, 2], &[0, 3])]).unwrap();
        assert_eq!(
            String::from_utf8(text.clone()).unwrap(),
            format!(
                "member\tsplit\tid\tline\tsequence\n\
                 0\ttrain\tr0\t1\t{mk}\n0\ttrain\tr2\t5\t{mk}\n0\ttrain\tr3\t7\t{mk}\n\
                 0\tvalidation\tr1\t3\t{mk}\n1\ttrain\tr1\t3\t{mk}\n1\ttrain\tr2\t5\t{mk}\n\
                 1\tvalidation\tr0\t1\t{mk}\n1\tvalidation\tr3\t7\t{mk}\n",
                mk = crate::data::sequence_key("MK")
            )
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPLIT_FILE);
        std::fs::write(&path, &text).unwrap();
        // Members validated on different records: no validation set.
        let err = validation_records(dir.path()).unwrap_err().to_string();
        assert!(err.contains("different records"), "{err}");
        // One model (or members sharing a partition): its validation records.
        let single = split_table(&records, &[(&[0, 2], &[1, 3]), (&[0, 2], &[3, 1])]).unwrap();
        std::fs::write(&path, single).unwrap();
        let got = validation_records(dir.path()).unwrap();
        let want: BTreeSet<RecordKey> =
            [RecordKey::of(&records[1]), RecordKey::of(&records[3])].into();
        assert_eq!(got, want);
        std::fs::write(
            &path,
            "member\tsplit\tid\tline\tsequence\n0\ttest\tr1\t3\tx\n",
        )
        .unwrap();
        let err = validation_records(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("split.tsv:2") && err.contains("\"test\""),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let err = validation_records(dir.path()).unwrap_err().to_string();
        assert!(err.contains("has no split.tsv"), "{err}");
    }
}
