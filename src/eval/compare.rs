//! How sure a test score is, and whether one model beats another on the same proteins:
//! percentile-bootstrap intervals over proteins, and McNemar's exact test on the proteins
//! exactly one of two models gets right (the test for two classifiers scored on one test
//! set). A point or two of Q10 on DeepLoc's 2,768 test proteins is within the noise.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::metrics::mcc_of_rows;
use super::run::{EvalOutput, Split};

/// Resamples behind every interval. Seeded, so the same predictions give the same interval.
pub const RESAMPLES: usize = 2000;
const SEED: u64 = 0x5eed_2026;

/// 95% intervals of a model's scores: percentile bootstrap over the scored proteins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval95 {
    /// Accuracy (Q10; exact-match accuracy for multi-label models), low and high.
    pub accuracy: [f64; 2],
    /// MCC, low and high (single-label models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcc: Option<[f64; 2]>,
    pub resamples: usize,
}

impl Interval95 {
    /// One line for people, e.g. `95% interval over proteins (bootstrap, 2000 resamples):
    /// Q10 73.41-76.66%, MCC 0.6807-0.7184`; `accuracy_name` names the accuracy.
    pub fn describe(&self, accuracy_name: &str) -> String {
        let [lo, hi] = self.accuracy;
        let mut line = format!(
            "95% interval over proteins (bootstrap, {} resamples): {accuracy_name} {:.2}-{:.2}%",
            self.resamples,
            100.0 * lo,
            100.0 * hi
        );
        if let Some([lo, hi]) = self.mcc {
            line += &format!(", MCC {lo:.4}-{hi:.4}");
        }
        line
    }
}

/// One scored protein: its true and predicted location(s) (multi-label: joined by `|` in
/// the model's label order), as `eval --output` writes them for [`compare`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProteinOutcome {
    pub id: String,
    pub label: String,
    pub predicted: String,
}

impl ProteinOutcome {
    /// Right, exactly (every location of a multi-label protein).
    pub fn correct(&self) -> bool {
        self.label == self.predicted
    }
}

/// The 2.5th and 97.5th percentiles of `stat` over [`RESAMPLES`] resamples (with
/// replacement) of the row indices `0..n`. `n` must be positive.
pub fn bootstrap_ci95(n: usize, stat: impl Fn(&[usize]) -> f64) -> [f64; 2] {
    assert!(n > 0, "a bootstrap needs at least one row");
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut rows = vec![0usize; n];
    let mut values: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            for r in rows.iter_mut() {
                *r = rng.random_range(0..n);
            }
            stat(&rows)
        })
        .collect();
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[(q * (RESAMPLES - 1) as f64).round() as usize];
    [at(0.025), at(0.975)]
}

/// Fraction of `rows` that are `correct`.
fn accuracy_of_rows(correct: &[bool], rows: &[usize]) -> f64 {
    rows.iter().filter(|&&i| correct[i]).count() as f64 / rows.len() as f64
}

/// Intervals of a single-label model's accuracy and MCC (`k` classes).
pub fn single_label_ci95(y_true: &[usize], y_pred: &[usize], k: usize) -> Interval95 {
    let correct: Vec<bool> = y_true.iter().zip(y_pred).map(|(t, p)| t == p).collect();
    Interval95 {
        accuracy: bootstrap_ci95(correct.len(), |rows| accuracy_of_rows(&correct, rows)),
        mcc: Some(bootstrap_ci95(correct.len(), |rows| {
            mcc_of_rows(y_true, y_pred, k, rows)
        })),
        resamples: RESAMPLES,
    }
}

/// The interval of an accuracy alone (multi-label exact match).
pub fn accuracy_ci95(correct: &[bool]) -> Interval95 {
    Interval95 {
        accuracy: bootstrap_ci95(correct.len(), |rows| accuracy_of_rows(correct, rows)),
        mcc: None,
        resamples: RESAMPLES,
    }
}

/// McNemar's exact two-sided p-value for `only_a` and `only_b` proteins that exactly one
/// of two models gets right: the chance, if neither model were better, of a split of the
/// discordant proteins at least this uneven (Binomial(only_a + only_b, 1/2)).
pub fn mcnemar_exact(only_a: usize, only_b: usize) -> f64 {
    let n = only_a + only_b;
    let k = only_a.min(only_b);
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    // ln C(n, i), built up term by term so nothing overflows.
    let mut ln_choose = 0.0f64;
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// What a paired interval of B − A says, in words: one model is ahead only when the whole
/// 95% interval lies on its side of zero.
pub fn verdict(difference_ci95: [f64; 2]) -> &'static str {
    match difference_ci95 {
        [lo, _] if lo > 0.0 => {
            "B is ahead on accuracy (the 95% paired interval of B - A lies above 0)"
        }
        [_, hi] if hi < 0.0 => {
            "A is ahead on accuracy (the 95% paired interval of B - A lies below 0)"
        }
        _ => "A and B are level on accuracy (the 95% paired interval of B - A includes 0)",
    }
}

/// Two models scored by `eval` on the same proteins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// The models, as their `eval` reports name them.
    pub a: String,
    pub b: String,
    pub data: String,
    pub split: Split,
    pub proteins: usize,
    /// Accuracy of A and of B (exact match for multi-label models).
    pub accuracy: [f64; 2],
    /// MCC of A and of B (single-label models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcc: Option<[f64; 2]>,
    pub both_right: usize,
    pub only_a_right: usize,
    pub only_b_right: usize,
    pub both_wrong: usize,
    /// McNemar's exact two-sided p-value (see [`mcnemar_exact`]).
    pub mcnemar_p: f64,
    /// 95% paired-bootstrap interval of B's accuracy minus A's (the same proteins resampled
    /// for both).
    pub accuracy_difference_ci95: [f64; 2],
    /// The same for MCC (single-label models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcc_difference_ci95: Option<[f64; 2]>,
    pub resamples: usize,
    /// Where the two differ, by true location (each one among the scored proteins: in A's
    /// label order for single-label reports, else in order of first appearance).
    pub by_location: Vec<LocationDifference>,
}

/// The proteins of one true location (multi-label: one combination) that exactly one model
/// gets right.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationDifference {
    pub label: String,
    pub proteins: usize,
    pub only_a_right: usize,
    pub only_b_right: usize,
}

/// [`LocationDifference`]s of the paired outcomes (`ra[i]`, `rb[i]` right or not).
fn by_location(a: &EvalOutput, ra: &[bool], rb: &[bool]) -> Vec<LocationDifference> {
    let mut rows: Vec<LocationDifference> = Vec::new();
    for (i, p) in a.proteins.iter().enumerate() {
        let k = match rows.iter().position(|r| r.label == p.label) {
            Some(k) => k,
            None => {
                rows.push(LocationDifference {
                    label: p.label.clone(),
                    proteins: 0,
                    only_a_right: 0,
                    only_b_right: 0,
                });
                rows.len() - 1
            }
        };
        let row = &mut rows[k];
        row.proteins += 1;
        row.only_a_right += usize::from(ra[i] && !rb[i]);
        row.only_b_right += usize::from(rb[i] && !ra[i]);
    }
    if let Some(r) = &a.report {
        // Labels outside the report (none, for a report protloc wrote) go last.
        rows.sort_by_key(|row| {
            r.labels
                .iter()
                .position(|l| *l == row.label)
                .unwrap_or(usize::MAX)
        });
    }
    rows
}

/// Pairs the per-protein outcomes of two `eval` reports. They must score the same proteins
/// in the same order against the same labels (the same data file and split).
pub fn compare(a: &EvalOutput, b: &EvalOutput) -> Result<Comparison> {
    for (name, o) in [("A", a), ("B", b)] {
        if o.proteins.is_empty() {
            bail!(
                "{name} ({}) has no per-protein outcomes: it was written by an older protloc; \
                 run `protloc eval --output` again",
                o.model
            );
        }
    }
    if a.proteins.len() != b.proteins.len() {
        bail!(
            "A scored {} proteins ({}, {:?} split) and B {} ({}, {:?} split): compare reports \
             of the same data and split",
            a.proteins.len(),
            a.data,
            a.split,
            b.proteins.len(),
            b.data,
            b.split
        );
    }
    for (i, (pa, pb)) in a.proteins.iter().zip(&b.proteins).enumerate() {
        if pa.id != pb.id {
            bail!(
                "protein {} is {} in A's report and {} in B's: compare reports of the same \
                 data and split",
                i + 1,
                pa.id,
                pb.id
            );
        }
        if pa.label != pb.label {
            bail!(
                "{} is labelled {} in A's report and {} in B's: the two were scored against \
                 different labels",
                pa.id,
                pa.label,
                pb.label
            );
        }
    }
    let n = a.proteins.len();
    let right = |o: &EvalOutput| o.proteins.iter().map(|p| p.correct()).collect::<Vec<_>>();
    let (ra, rb) = (right(a), right(b));
    let count = |x: bool, y: bool| {
        ra.iter()
            .zip(&rb)
            .filter(|&(&p, &q)| p == x && q == y)
            .count()
    };
    let (only_a, only_b) = (count(true, false), count(false, true));
    let all: Vec<usize> = (0..n).collect();
    let accuracy_difference_ci95 = bootstrap_ci95(n, |rows| {
        accuracy_of_rows(&rb, rows) - accuracy_of_rows(&ra, rows)
    });

    // MCC needs one class per protein: single-label reports only. Class indices over every
    // label string either report uses (MCC does not depend on their order).
    let single = a.report.is_some() && b.report.is_some();
    let (mcc, mcc_difference_ci95) = if single {
        let mut index = BTreeMap::new();
        for p in a.proteins.iter().chain(&b.proteins) {
            for s in [&p.label, &p.predicted] {
                let next = index.len();
                index.entry(s.as_str()).or_insert(next);
            }
        }
        let ids = |o: &EvalOutput, pred: bool| -> Vec<usize> {
            o.proteins
                .iter()
                .map(|p| {
                    index[if pred {
                        p.predicted.as_str()
                    } else {
                        p.label.as_str()
                    }]
                })
                .collect()
        };
        let (truth, pa, pb) = (ids(a, false), ids(a, true), ids(b, true));
        let k = index.len();
        let mcc = |pred: &[usize], rows: &[usize]| mcc_of_rows(&truth, pred, k, rows);
        (
            Some([mcc(&pa, &all), mcc(&pb, &all)]),
            Some(bootstrap_ci95(n, |rows| mcc(&pb, rows) - mcc(&pa, rows))),
        )
    } else {
        (None, None)
    };
    Ok(Comparison {
        a: a.model.clone(),
        b: b.model.clone(),
        data: a.data.clone(),
        split: a.split,
        proteins: n,
        accuracy: [accuracy_of_rows(&ra, &all), accuracy_of_rows(&rb, &all)],
        mcc,
        both_right: count(true, true),
        only_a_right: only_a,
        only_b_right: only_b,
        both_wrong: count(false, false),
        mcnemar_p: mcnemar_exact(only_a, only_b),
        accuracy_difference_ci95,
        mcc_difference_ci95,
        resamples: RESAMPLES,
        by_location: by_location(a, &ra, &rb),
    })
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |x: f64| format!("{:.2}%", 100.0 * x);
        let pts = |x: f64| format!("{:+.2}", 100.0 * x);
        writeln!(
            f,
            "{} proteins of {} ({:?} split)",
            self.proteins, self.data, self.split
        )?;
        writeln!(f, "A: {}\nB: {}\n", self.a, self.b)?;
        writeln!(f, "{:<8} {:>9} {:>9}", "", "accuracy", "MCC")?;
        let mcc = |i: usize| self.mcc.map_or("-".into(), |m| format!("{:.4}", m[i]));
        writeln!(f, "{:<8} {:>9} {:>9}", "A", pct(self.accuracy[0]), mcc(0))?;
        writeln!(f, "{:<8} {:>9} {:>9}", "B", pct(self.accuracy[1]), mcc(1))?;
        let [lo, hi] = self.accuracy_difference_ci95;
        writeln!(
            f,
            "\nB - A accuracy: {} points (95% paired-bootstrap interval {} to {})",
            pts(self.accuracy[1] - self.accuracy[0]),
            pts(lo),
            pts(hi)
        )?;
        if let (Some(m), Some([lo, hi])) = (self.mcc, self.mcc_difference_ci95) {
            writeln!(
                f,
                "B - A MCC:      {:+.4} (95% interval {lo:+.4} to {hi:+.4})",
                m[1] - m[0]
            )?;
        }
        writeln!(
            f,
            "\nboth right {}, only A right {}, only B right {}, both wrong {}",
            self.both_right, self.only_a_right, self.only_b_right, self.both_wrong
        )?;
        writeln!(
            f,
            "{:<24} {:>8} {:>12} {:>12}",
            "true location", "proteins", "only A right", "only B right"
        )?;
        for r in &self.by_location {
            writeln!(
                f,
                "{:<24} {:>8} {:>12} {:>12}",
                r.label, r.proteins, r.only_a_right, r.only_b_right
            )?;
        }
        write!(
            f,
            "McNemar's exact test: p = {} (of the {} proteins exactly one model gets right, \
             A gets {})",
            if self.mcnemar_p >= 1e-3 {
                format!("{:.3}", self.mcnemar_p)
            } else {
                format!("{:.1e}", self.mcnemar_p)
            },
            self.only_a_right + self.only_b_right,
            self.only_a_right
        )?;
        write!(f, "\n{}", verdict(self.accuracy_difference_ci95))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_needs_the_whole_interval_on_one_side() {
        assert!(verdict([0.001, 0.02]).starts_with("B is ahead"));
        assert!(verdict([-0.02, -0.001]).starts_with("A is ahead"));
        for level in [[-0.0079, 0.0112], [0.0, 0.0], [0.0, 0.01], [-0.01, 0.0]] {
            assert!(verdict(level).starts_with("A and B are level"), "{level:?}");
        }
    }

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // 10 discordant proteins all one way: 2 * (1/2)^10.
        assert!((mcnemar_exact(0, 10) - 2.0 / 1024.0).abs() < 1e-15);
        assert!((mcnemar_exact(10, 0) - 2.0 / 1024.0).abs() < 1e-15);
        // 10 vs 2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096.
        assert!((mcnemar_exact(10, 2) - 158.0 / 4096.0).abs() < 1e-12);
        // An even split (and no discordant protein at all) is no evidence.
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // Large counts stay finite and ordered.
        let (near, far) = (mcnemar_exact(500, 520), mcnemar_exact(400, 620));
        assert!(near > 0.4 && near < 1.0, "{near}");
        assert!(far > 0.0 && far < 1e-9, "{far}");
    }

    #[test]
    fn bootstrap_intervals_bracket_the_estimate_and_narrow_with_more_proteins() {
        let width = |n: usize| {
            let correct: Vec<bool> = (0..n).map(|i| i % 4 != 0).collect();
            let ci = accuracy_ci95(&correct);
            assert!(ci.accuracy[0] < 0.75 && 0.75 < ci.accuracy[1], "{ci:?}");
            ci.accuracy[1] - ci.accuracy[0]
        };
        let (small, large) = (width(400), width(6400));
        // ~1.96 * 2 * sqrt(0.75 * 0.25 / n): 0.085 at 400 proteins, 0.021 at 6,400.
        assert!((small - 0.085).abs() < 0.012, "{small}");
        assert!((large - 0.021).abs() < 0.004, "{large}");
        // Seeded: the same data give the same interval; a perfect model has no spread.
        assert_eq!(
            accuracy_ci95(&[true, false, true]),
            accuracy_ci95(&[true, false, true])
        );
        assert_eq!(accuracy_ci95(&[true; 50]).accuracy, [1.0, 1.0]);
        let y: Vec<usize> = (0..60).map(|i| i % 3).collect();
        let [lo, hi] = single_label_ci95(&y, &y, 3).mcc.unwrap();
        assert!(lo > 1.0 - 1e-12 && hi <= 1.0, "{lo} {hi}");
    }
}
