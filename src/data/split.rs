//! Train/test/validation splits as index lists into a record slice.
//!
//! Indices (not copies) keep the records in one place and make splits cheap to save and
//! compare. All outputs are sorted ascending so downstream order does not depend on shuffling.

use std::collections::BTreeMap;

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
    if let Some(&bad) = indices.iter().find(|&&i| i >= records.len()) {
        return Err(format!(
            "record index {bad} out of range ({} records)",
            records.len()
        ));
    }
    // BTreeMap (not HashMap) so groups are visited in the same order on every run:
    // the single generator's stream is consumed group by group.
    let mut groups: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for &i in indices {
        groups
            .entry(records[i].location.as_deref())
            .or_default()
            .push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train = Vec::with_capacity(indices.len());
    let mut val = Vec::new();
    for (_, mut members) in groups {
        // Sort first so the result depends only on the set of indices, not their order.
        members.sort_unstable();
        members.shuffle(&mut rng);
        let n_val = validation_count(members.len(), val_fraction);
        val.extend_from_slice(&members[..n_val]);
        train.extend_from_slice(&members[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok((train, val))
}

/// How many of a group of `n` go to validation (see [`stratified_validation`]).
fn validation_count(n: usize, fraction: f64) -> usize {
    if n < 2 || fraction <= 0.0 {
        return 0;
    }
    let k = (fraction * n as f64).round() as usize;
    k.clamp(1, n - 1)
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
}
