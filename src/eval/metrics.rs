//! Multiclass classification metrics: accuracy (Q10 for DeepLoc), Matthews correlation,
//! per-class precision / recall / F1 and the confusion matrix.
//!
//! Definitions follow scikit-learn so numbers are directly comparable with published
//! DeepLoc results computed in Python:
//! - MCC is Gorodkin's R_K statistic, as in `sklearn.metrics.matthews_corrcoef`
//!   (0 when the denominator vanishes, e.g. when every prediction is the same class).
//! - Precision, recall and F1 use `zero_division=0`: an undefined ratio counts as 0.
//! - Macro-F1 averages over *all* labels passed in (like `f1_score(..., labels=range(K),
//!   average="macro")`), so a class that never occurs and is never predicted pulls the
//!   macro average down rather than being silently skipped.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a report could not be computed from the given predictions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// `y_true` and `y_pred` differ in length.
    #[error("length mismatch: {y_true} true labels but {y_pred} predictions")]
    LengthMismatch { y_true: usize, y_pred: usize },
    /// No examples at all: every metric would be 0/0.
    #[error("cannot compute metrics on an empty set of predictions")]
    Empty,
    /// A class index is not a valid index into `labels`.
    #[error(
        "{which} class index {index} at position {position} is out of range for {n_labels} labels"
    )]
    LabelOutOfRange {
        /// `"true"` or `"predicted"`.
        which: &'static str,
        index: usize,
        position: usize,
        n_labels: usize,
    },
}

/// Precision, recall and F1 of one class (one-vs-rest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Number of examples whose true class is this one.
    pub support: usize,
}

/// Everything we report about a multiclass prediction run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// Class names; index `i` names class `i` in `confusion` and `per_class`.
    pub labels: Vec<String>,
    /// Number of examples.
    pub n: usize,
    /// Fraction correct, in `[0, 1]` (DeepLoc's "Q10" for ten classes).
    pub accuracy: f64,
    /// Multiclass Matthews correlation coefficient, in `[-1, 1]`.
    pub mcc: f64,
    /// Unweighted mean of the per-class F1 scores.
    pub macro_f1: f64,
    /// Mean of the per-class F1 scores weighted by support.
    pub weighted_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true_class][predicted_class]` = count.
    pub confusion: Vec<Vec<usize>>,
}

/// `num / den`, or 0 when `den` is 0 (scikit-learn's `zero_division=0`).
fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

impl ClassificationReport {
    /// Computes all metrics from class indices into `labels`.
    pub fn compute(
        y_true: &[usize],
        y_pred: &[usize],
        labels: &[String],
    ) -> Result<Self, MetricsError> {
        if y_true.len() != y_pred.len() {
            return Err(MetricsError::LengthMismatch {
                y_true: y_true.len(),
                y_pred: y_pred.len(),
            });
        }
        if y_true.is_empty() {
            return Err(MetricsError::Empty);
        }
        let k = labels.len();
        let check = |which, ys: &[usize]| match ys.iter().position(|&y| y >= k) {
            Some(position) => Err(MetricsError::LabelOutOfRange {
                which,
                index: ys[position],
                position,
                n_labels: k,
            }),
            None => Ok(()),
        };
        check("true", y_true)?;
        check("predicted", y_pred)?;

        let n = y_true.len();
        let mut confusion = vec![vec![0usize; k]; k];
        for (&t, &p) in y_true.iter().zip(y_pred) {
            confusion[t][p] += 1;
        }

        // Row sums = how often each class is true, column sums = how often it is predicted.
        let t_sum: Vec<usize> = confusion.iter().map(|row| row.iter().sum()).collect();
        let p_sum: Vec<usize> = (0..k)
            .map(|j| confusion.iter().map(|row| row[j]).sum())
            .collect();
        let correct: usize = (0..k).map(|i| confusion[i][i]).sum();

        let per_class: Vec<ClassMetrics> = (0..k)
            .map(|i| {
                let tp = confusion[i][i] as f64;
                let fp = (p_sum[i] - confusion[i][i]) as f64;
                let fn_ = (t_sum[i] - confusion[i][i]) as f64;
                ClassMetrics {
                    label: labels[i].clone(),
                    precision: ratio(tp, tp + fp),
                    recall: ratio(tp, tp + fn_),
                    // 2TP / (2TP + FP + FN) equals the harmonic mean of precision and
                    // recall whenever that is defined, and is what scikit-learn computes.
                    f1: ratio(2.0 * tp, 2.0 * tp + fp + fn_),
                    support: t_sum[i],
                }
            })
            .collect();

        let macro_f1 = if k == 0 {
            0.0
        } else {
            per_class.iter().map(|c| c.f1).sum::<f64>() / k as f64
        };
        let weighted_f1 = per_class
            .iter()
            .map(|c| c.f1 * c.support as f64)
            .sum::<f64>()
            / n as f64;

        Ok(Self {
            labels: labels.to_vec(),
            n,
            accuracy: correct as f64 / n as f64,
            mcc: mcc_from_confusion(&t_sum, &p_sum, correct, n),
            macro_f1,
            weighted_f1,
            per_class,
            confusion,
        })
    }

    /// Name of the accuracy metric: DeepLoc calls ten-class accuracy "Q10".
    pub fn accuracy_name(&self) -> &'static str {
        if self.labels.len() == 10 {
            "Q10"
        } else {
            "accuracy"
        }
    }

    /// Confusion matrix with each row divided by its sum (recall on the diagonal).
    /// Rows of classes with no examples stay all zero instead of becoming NaN.
    pub fn confusion_normalized(&self) -> Vec<Vec<f64>> {
        self.confusion
            .iter()
            .map(|row| {
                let total = row.iter().sum::<usize>() as f64;
                row.iter().map(|&c| ratio(c as f64, total)).collect()
            })
            .collect()
    }
}

/// Gorodkin's R_K from the marginals, written exactly as scikit-learn does (covariances
/// of the one-hot indicator matrices). Computed in f64: the products reach n^4, which
/// would overflow u64 for n beyond ~65k.
fn mcc_from_confusion(t_sum: &[usize], p_sum: &[usize], correct: usize, n: usize) -> f64 {
    let n = n as f64;
    let dot = |a: &[usize], b: &[usize]| -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    };
    let cov_ytyp = correct as f64 * n - dot(t_sum, p_sum);
    let cov_ypyp = n * n - dot(p_sum, p_sum);
    let cov_ytyt = n * n - dot(t_sum, t_sum);
    if cov_ypyp * cov_ytyt == 0.0 {
        return 0.0;
    }
    // Rounding can push a perfect correlation a hair past 1; keep the documented range.
    (cov_ytyp / (cov_ytyt.sqrt() * cov_ypyp.sqrt())).clamp(-1.0, 1.0)
}

/// Multiclass MCC (as [`ClassificationReport::mcc`]) of the pairs `(y_true[i], y_pred[i])`
/// for the row indices `rows` (repeats count again: a bootstrap resample). Classes are
/// indices below `k`.
pub fn mcc_of_rows(y_true: &[usize], y_pred: &[usize], k: usize, rows: &[usize]) -> f64 {
    let (mut t_sum, mut p_sum, mut correct) = (vec![0usize; k], vec![0usize; k], 0usize);
    for &i in rows {
        t_sum[y_true[i]] += 1;
        p_sum[y_pred[i]] += 1;
        correct += usize::from(y_true[i] == y_pred[i]);
    }
    mcc_from_confusion(&t_sum, &p_sum, correct, rows.len())
}

/// Accuracy of binary predictions over the entries whose truth is known
/// (`Some`), e.g. membrane-bound vs soluble "Q2" where some proteins are unannotated.
/// Returns `None` when no entry has a known truth, or when the lengths differ.
pub fn binary_accuracy_masked(y_true: &[Option<bool>], y_pred: &[bool]) -> Option<f64> {
    if y_true.len() != y_pred.len() {
        return None;
    }
    let (known, correct) = y_true
        .iter()
        .zip(y_pred)
        .filter_map(|(t, &p)| t.map(|t| t == p))
        .fold((0usize, 0usize), |(k, c), ok| (k + 1, c + usize::from(ok)));
    (known > 0).then(|| correct as f64 / known as f64)
}

/// Column headers of the text confusion matrix are this many characters of the label.
const ABBREV_CHARS: usize = 5;
/// Row labels longer than this are truncated so the table stays about 100 columns wide.
const MAX_ROW_LABEL: usize = 22;

/// First `n` characters of `s` (by `char`, so multi-byte labels cannot be split).
fn prefix(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// `s` cut to `max` characters, marking the cut with `~`.
pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}~", prefix(s, max - 1))
    }
}

impl fmt::Display for ClassificationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} {:.2}%   MCC {:.4}   macro-F1 {:.4}   weighted-F1 {:.4}   (n = {})",
            self.accuracy_name(),
            100.0 * self.accuracy,
            self.mcc,
            self.macro_f1,
            self.weighted_f1,
            self.n
        )?;
        writeln!(f)?;

        let lw = self
            .labels
            .iter()
            .map(|l| l.chars().count().min(MAX_ROW_LABEL))
            .chain(["weighted avg".len(), "label".len()])
            .max()
            .unwrap_or(0);
        writeln!(
            f,
            "{:<lw$}  {:>9}  {:>7}  {:>7}  {:>7}",
            "label", "precision", "recall", "F1", "support"
        )?;
        for c in &self.per_class {
            writeln!(
                f,
                "{:<lw$}  {:>9.4}  {:>7.4}  {:>7.4}  {:>7}",
                truncate(&c.label, MAX_ROW_LABEL),
                c.precision,
                c.recall,
                c.f1,
                c.support
            )?;
        }
        writeln!(
            f,
            "{:<lw$}  {:>9}  {:>7}  {:>7.4}  {:>7}",
            "macro avg", "", "", self.macro_f1, self.n
        )?;
        writeln!(
            f,
            "{:<lw$}  {:>9}  {:>7}  {:>7.4}  {:>7}",
            "weighted avg", "", "", self.weighted_f1, self.n
        )?;
        writeln!(f)?;

        // Abbreviated column headers keep ten classes within ~100 columns. When the
        // abbreviations collide (or labels are short/empty) fall back to class indices,
        // and then prefix every row with its index so the columns can be decoded.
        let abbrevs: Vec<String> = self
            .labels
            .iter()
            .map(|l| prefix(l, ABBREV_CHARS))
            .collect();
        let unique = {
            let mut sorted = abbrevs.clone();
            sorted.sort();
            sorted.dedup();
            sorted.len() == abbrevs.len() && abbrevs.iter().all(|a| !a.trim().is_empty())
        };
        let headers: Vec<String> = if unique {
            abbrevs
        } else {
            (0..self.labels.len()).map(|i| i.to_string()).collect()
        };
        let max_count = self.confusion.iter().flatten().copied().max().unwrap_or(0);
        let cw = headers
            .iter()
            .map(|h| h.chars().count())
            .chain([max_count.to_string().len()])
            .max()
            .unwrap_or(1);
        let row_names: Vec<String> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let l = truncate(l, MAX_ROW_LABEL);
                if unique {
                    l
                } else {
                    format!("{i:>2} {l}")
                }
            })
            .collect();
        let rw = row_names
            .iter()
            .map(|r| r.chars().count())
            .chain(["true \\ predicted".len()])
            .max()
            .unwrap_or(0);

        writeln!(f, "confusion matrix (rows: true, columns: predicted)")?;
        write!(f, "{:<rw$}", "true \\ predicted")?;
        for h in &headers {
            write!(f, " {h:>cw$}")?;
        }
        writeln!(f)?;
        for (name, row) in row_names.iter().zip(&self.confusion) {
            write!(f, "{name:<rw$}")?;
            for c in row {
                write!(f, " {c:>cw$}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mcc_of_rows_is_the_report_mcc_and_counts_repeated_rows() {
        let y_true = [0, 1, 2, 2, 1, 0, 2, 1];
        let y_pred = [0, 2, 2, 1, 1, 0, 2, 0];
        let report =
            ClassificationReport::compute(&y_true, &y_pred, &labels(&["a", "b", "c"])).unwrap();
        let all: Vec<usize> = (0..y_true.len()).collect();
        assert_eq!(mcc_of_rows(&y_true, &y_pred, 3, &all), report.mcc);
        // Row 0 three times is the data set with two more copies of it.
        let (t, p) = ([0, 0, 0, 1, 2], [0, 0, 0, 2, 2]);
        let r = ClassificationReport::compute(&t, &p, &labels(&["a", "b", "c"])).unwrap();
        assert_eq!(mcc_of_rows(&y_true, &y_pred, 3, &[0, 0, 0, 1, 2]), r.mcc);
    }

    #[test]
    fn ratio_is_zero_on_zero_denominator() {
        assert_eq!(ratio(0.0, 0.0), 0.0);
        assert_eq!(ratio(1.0, 2.0), 0.5);
    }

    #[test]
    fn truncate_and_prefix_respect_char_boundaries() {
        assert_eq!(prefix("Endoplasmic.reticulum", 5), "Endop");
        assert_eq!(prefix("äöü", 2), "äö");
        assert_eq!(truncate("abcdef", 4), "abc~");
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn display_falls_back_to_index_headers_on_collision() {
        let l = labels(&["Golgi.a", "Golgi.b"]);
        let r = ClassificationReport::compute(&[0, 1], &[0, 0], &l).unwrap();
        let s = r.to_string();
        assert!(s.contains(" 0 Golgi.a"), "{s}");
        assert!(s.contains(" 1 Golgi.b"), "{s}");
        assert!(s.starts_with("accuracy 50.00%"), "{s}");
    }

    #[test]
    fn normalized_confusion_keeps_empty_rows_zero() {
        let l = labels(&["a", "b", "c"]);
        let r = ClassificationReport::compute(&[0, 0, 1], &[0, 1, 1], &l).unwrap();
        let m = r.confusion_normalized();
        assert_eq!(m[0], vec![0.5, 0.5, 0.0]);
        assert_eq!(m[1], vec![0.0, 1.0, 0.0]);
        assert_eq!(m[2], vec![0.0, 0.0, 0.0]);
    }
}
