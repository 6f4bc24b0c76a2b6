//! Multi-label metrics as DeepLoc 2.0 reports them: exact-match accuracy, sample-averaged
//! Jaccard, micro- and macro-F1, and per-location MCC; plus per-location decision thresholds
//! tuned on validation data.
//!
//! Conventions (scikit-learn's, so numbers compare with the paper's Python):
//! - accuracy is subset accuracy (every location right);
//! - Jaccard is `|T ∩ P| / |T ∪ P|` averaged over proteins, 0 when both sets are empty
//!   (`jaccard_score(average="samples", zero_division=0)`);
//! - F1 and MCC per location are one-vs-rest, 0 when undefined.

use serde::{Deserialize, Serialize};

/// One location's scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelScores {
    pub label: String,
    pub mcc: f64,
    pub f1: f64,
    pub support: usize,
    /// Decision threshold used for this location.
    pub threshold: f32,
}

/// The whole multi-label report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelReport {
    pub n: usize,
    pub accuracy: f64,
    pub jaccard: f64,
    pub micro_f1: f64,
    pub macro_f1: f64,
    pub per_label: Vec<LabelScores>,
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Binary MCC from counts (0 when undefined).
pub fn binary_mcc(tp: usize, fp: usize, tn: usize, fn_: usize) -> f64 {
    let (tp, fp, tn, fn_) = (tp as f64, fp as f64, tn as f64, fn_ as f64);
    let den = ((tp + fp) * (tp + fn_) * (tn + fp) * (tn + fn_)).sqrt();
    ratio(tp * tn - fp * fn_, den)
}

/// Turns probabilities into location sets with `thresholds`; a protein with no location
/// above its threshold gets its most probable one (every protein is somewhere). The rule
/// every command answers with lives in [`crate::model::answer`].
pub use crate::model::answer::decide;

/// Computes the report. `y_true` and `y_pred` are [N][C] indicator rows.
pub fn report(
    y_true: &[Vec<bool>],
    y_pred: &[Vec<bool>],
    labels: &[String],
    thresholds: &[f32],
) -> MultiLabelReport {
    let n = y_true.len();
    let c = labels.len();
    let mut exact = 0usize;
    let mut jaccard = 0f64;
    for (t, p) in y_true.iter().zip(y_pred) {
        exact += usize::from(t == p);
        let inter = t.iter().zip(p).filter(|(a, b)| **a && **b).count();
        let union = t.iter().zip(p).filter(|(a, b)| **a || **b).count();
        jaccard += ratio(inter as f64, union as f64);
    }
    let (mut tp_all, mut fp_all, mut fn_all) = (0usize, 0usize, 0usize);
    let mut per_label = Vec::with_capacity(c);
    for k in 0..c {
        let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
        for (t, p) in y_true.iter().zip(y_pred) {
            match (t[k], p[k]) {
                (true, true) => tp += 1,
                (false, true) => fp += 1,
                (false, false) => tn += 1,
                (true, false) => fn_ += 1,
            }
        }
        tp_all += tp;
        fp_all += fp;
        fn_all += fn_;
        per_label.push(LabelScores {
            label: labels[k].clone(),
            mcc: binary_mcc(tp, fp, tn, fn_),
            f1: ratio(2.0 * tp as f64, (2 * tp + fp + fn_) as f64),
            support: tp + fn_,
            threshold: thresholds.get(k).copied().unwrap_or(0.5),
        });
    }
    MultiLabelReport {
        n,
        accuracy: ratio(exact as f64, n as f64),
        jaccard: ratio(jaccard, n as f64),
        micro_f1: ratio(2.0 * tp_all as f64, (2 * tp_all + fp_all + fn_all) as f64),
        macro_f1: ratio(per_label.iter().map(|l| l.f1).sum(), c as f64),
        per_label,
    }
}

/// Per-location thresholds that maximise that location's MCC on validation data, searched
/// on a grid of 0.05 .. 0.95 (ties keep the threshold nearest 0.5; a location without
/// positives keeps 0.5).
pub fn tune_thresholds(y_true: &[Vec<bool>], probs: &[Vec<f32>], num_labels: usize) -> Vec<f32> {
    (0..num_labels)
        .map(|k| {
            if !y_true.iter().any(|t| t[k]) {
                return 0.5;
            }
            let mut best = (f64::NEG_INFINITY, 0.5f32);
            for step in 1..20 {
                let th = step as f32 * 0.05;
                let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
                for (t, p) in y_true.iter().zip(probs) {
                    match (t[k], p[k] >= th) {
                        (true, true) => tp += 1,
                        (false, true) => fp += 1,
                        (false, false) => tn += 1,
                        (true, false) => fn_ += 1,
                    }
                }
                let m = binary_mcc(tp, fp, tn, fn_);
                let closer = (th - 0.5).abs() < (best.1 - 0.5).abs();
                if m > best.0 + 1e-12 || ((m - best.0).abs() <= 1e-12 && closer) {
                    best = (m, th);
                }
            }
            best.1
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[&[u8]]) -> Vec<Vec<bool>> {
        v.iter()
            .map(|r| r.iter().map(|&b| b == 1).collect())
            .collect()
    }

    /// Worked by hand:
    /// truth  {A}, {A,B}, {C}, {B,C}
    /// pred   {A}, {A},   {B}, {B,C}
    /// exact matches 2/4; Jaccard 1, 1/2, 0, 1 -> 2.5/4;
    /// A: tp2 fp0 tn2 fn0 -> F1 1, MCC 1;
    /// B: tp1 fp1 tn1 fn1 -> F1 1/2, MCC 0;
    /// C: tp1 fp0 tn2 fn1 -> F1 2/3, MCC (2-0)/sqrt(1*2*2*3) = 2/sqrt(12);
    /// micro: tp4 fp1 fn2 -> 8/11; macro (1 + 1/2 + 2/3)/3.
    #[test]
    fn hand_computed_example() {
        let t = rows(&[&[1, 0, 0], &[1, 1, 0], &[0, 0, 1], &[0, 1, 1]]);
        let p = rows(&[&[1, 0, 0], &[1, 0, 0], &[0, 1, 0], &[0, 1, 1]]);
        let labels: Vec<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
        let r = report(&t, &p, &labels, &[0.5; 3]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(r.accuracy, 0.5));
        assert!(close(r.jaccard, 2.5 / 4.0));
        assert!(close(r.per_label[0].f1, 1.0) && close(r.per_label[0].mcc, 1.0));
        assert!(close(r.per_label[1].f1, 0.5) && close(r.per_label[1].mcc, 0.0));
        assert!(close(r.per_label[2].f1, 2.0 / 3.0));
        assert!(close(r.per_label[2].mcc, 2.0 / 12f64.sqrt()));
        assert!(close(r.micro_f1, 8.0 / 11.0));
        assert!(close(r.macro_f1, (1.0 + 0.5 + 2.0 / 3.0) / 3.0));
        assert_eq!(
            r.per_label.iter().map(|l| l.support).collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
    }

    #[test]
    fn thresholds_separate_when_possible() {
        // Location 0 is positive exactly when its probability is >= 0.3.
        let probs = vec![vec![0.1], vec![0.25], vec![0.35], vec![0.6]];
        let truth = rows(&[&[0], &[0], &[1], &[1]]);
        let th = tune_thresholds(&truth, &probs, 1);
        assert!(th[0] > 0.25 && th[0] <= 0.35 + 1e-6, "{th:?}");
        // Thresholded directly (decide() would force a location onto the negatives).
        let pred: Vec<Vec<bool>> = probs.iter().map(|p| vec![p[0] >= th[0]]).collect();
        let r = report(&truth, &pred, &["x".into()], &th);
        assert_eq!((r.accuracy, r.per_label[0].mcc), (1.0, 1.0));
        // No positives at all: the default stays.
        assert_eq!(
            tune_thresholds(&rows(&[&[0], &[0]]), &probs[..2], 1),
            vec![0.5]
        );
    }
}
