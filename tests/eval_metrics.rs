//! Tests of `protloc::eval::metrics` and `protloc::eval::plot`.
//!
//! Expected metric values marked "scikit-learn" come from an independent implementation
//! (scikit-learn 1.9.1), produced by this Python helper with the arguments shown per test:
//!
//! ```python
//! from sklearn.metrics import (matthews_corrcoef, accuracy_score, f1_score,
//!                              precision_recall_fscore_support, confusion_matrix)
//! def rep(yt, yp, K):
//!     L = list(range(K))
//!     p, r, f, s = precision_recall_fscore_support(yt, yp, labels=L, zero_division=0)
//!     print(accuracy_score(yt, yp), matthews_corrcoef(yt, yp))
//!     print(f1_score(yt, yp, labels=L, average='macro', zero_division=0),
//!           f1_score(yt, yp, labels=L, average='weighted', zero_division=0))
//!     print(p, r, f, s, confusion_matrix(yt, yp, labels=L).tolist())
//! ```

use std::path::Path;

use proptest::prelude::*;
use protloc::eval::metrics::{binary_accuracy_masked, ClassificationReport, MetricsError};
use protloc::eval::plot::{
    plot_confusion, plot_training_curves, CurvePoint, CONFUSION_PNG_SIZE, CURVES_PNG_SIZE,
};

const TOL: f64 = 1e-12;

fn labels(k: usize) -> Vec<String> {
    (0..k).map(|i| format!("class{i}")).collect()
}

fn deeploc_labels() -> Vec<String> {
    protloc::train::default_labels()
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < TOL,
        "{what}: got {actual}, expected {expected}"
    );
}

fn assert_all_close(actual: impl IntoIterator<Item = f64>, expected: &[f64], what: &str) {
    let actual: Vec<f64> = actual.into_iter().collect();
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert_close(a, e, &format!("{what}[{i}]"));
    }
}

// ---------------------------------------------------------------------------------------
// Hand-computable cases
// ---------------------------------------------------------------------------------------

#[test]
fn perfect_prediction() {
    let y = [0, 1, 2, 2, 1, 0, 3];
    let r = ClassificationReport::compute(&y, &y, &labels(4)).unwrap();
    assert_eq!(r.n, 7);
    assert_eq!(r.accuracy, 1.0);
    assert_close(r.mcc, 1.0, "mcc");
    assert_close(r.macro_f1, 1.0, "macro_f1");
    assert_close(r.weighted_f1, 1.0, "weighted_f1");
    for c in &r.per_class {
        assert_eq!(
            (c.precision, c.recall, c.f1),
            (1.0, 1.0, 1.0),
            "{}",
            c.label
        );
    }
    assert_eq!(
        r.confusion,
        vec![
            vec![2, 0, 0, 0],
            vec![0, 2, 0, 0],
            vec![0, 0, 2, 0],
            vec![0, 0, 0, 1]
        ]
    );
}

#[test]
fn constant_prediction_has_zero_mcc() {
    // Predicting one class for everything carries no information: the MCC denominator
    // is 0 and the convention is MCC = 0, even though accuracy is the majority rate.
    let y_true = [0, 0, 0, 1, 2, 2];
    let y_pred = [0; 6];
    let r = ClassificationReport::compute(&y_true, &y_pred, &labels(3)).unwrap();
    assert_eq!(r.mcc, 0.0);
    assert_close(r.accuracy, 0.5, "accuracy");
    // Class 0: precision 3/6, recall 3/3, F1 = 2*3/(2*3+3+0) = 2/3.
    assert_close(r.per_class[0].precision, 0.5, "p0");
    assert_close(r.per_class[0].recall, 1.0, "r0");
    assert_close(r.per_class[0].f1, 2.0 / 3.0, "f0");
    // Never-predicted classes: precision undefined -> 0 (zero_division=0).
    for c in &r.per_class[1..] {
        assert_eq!(
            (c.precision, c.recall, c.f1),
            (0.0, 0.0, 0.0),
            "{}",
            c.label
        );
    }
    assert_close(r.macro_f1, 2.0 / 9.0, "macro_f1");
    assert_close(r.weighted_f1, (2.0 / 3.0) * 3.0 / 6.0, "weighted_f1");
}

#[test]
fn single_class_everywhere_is_degenerate_not_nan() {
    let r = ClassificationReport::compute(&[1, 1, 1], &[1, 1, 1], &labels(3)).unwrap();
    assert_eq!(r.accuracy, 1.0);
    assert_eq!(r.mcc, 0.0, "sklearn returns 0 when only one class occurs");
    assert!(r.macro_f1.is_finite() && r.weighted_f1.is_finite());
}

#[test]
fn three_class_by_hand() {
    // Confusion (rows true, cols pred): [[2,1,0],[0,2,1],[1,0,3]], n = 10.
    // Correct = 7; t = p = (3,3,4); cov_tp = 7*10 - (9+9+16) = 36;
    // cov_tt = cov_pp = 100 - 34 = 66; MCC = 36/66 = 6/11.
    let y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1];
    let y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1];
    let r = ClassificationReport::compute(&y_true, &y_pred, &labels(3)).unwrap();
    assert_eq!(
        r.confusion,
        vec![vec![2, 1, 0], vec![0, 2, 1], vec![1, 0, 3]]
    );
    assert_close(r.accuracy, 0.7, "accuracy");
    assert_close(r.mcc, 6.0 / 11.0, "mcc");
    // scikit-learn: rep(y_true, y_pred, 3) -> mcc 0.5454545454545454, macro 0.6944444444444443
    assert_close(r.mcc, 0.5454545454545454, "mcc (sklearn)");
    assert_close(r.macro_f1, 0.6944444444444443, "macro_f1 (sklearn)");
    assert_close(r.weighted_f1, 0.7, "weighted_f1 (sklearn)");
}

#[test]
fn perfectly_wrong_binary_is_minus_one() {
    // scikit-learn: rep([0,0,1,1], [1,1,0,0], 2) -> acc 0.0, mcc -1.0
    let r = ClassificationReport::compute(&[0, 0, 1, 1], &[1, 1, 0, 0], &labels(2)).unwrap();
    assert_eq!(r.accuracy, 0.0);
    assert_close(r.mcc, -1.0, "mcc");
    assert_eq!(r.macro_f1, 0.0);
}

// ---------------------------------------------------------------------------------------
// Fixtures from scikit-learn
// ---------------------------------------------------------------------------------------

#[test]
fn sklearn_asymmetric_three_class() {
    // scikit-learn: rep([0,0,0,0,1,1,2,2,2,2,2,1], [0,0,1,2,1,1,2,2,0,2,2,2], 3)
    let y_true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 1];
    let y_pred = [0, 0, 1, 2, 1, 1, 2, 2, 0, 2, 2, 2];
    let r = ClassificationReport::compute(&y_true, &y_pred, &labels(3)).unwrap();
    assert_close(r.accuracy, 0.6666666666666666, "accuracy");
    assert_close(r.mcc, 0.48924605479008165, "mcc");
    assert_close(r.macro_f1, 0.6551226551226551, "macro_f1");
    assert_close(r.weighted_f1, 0.6601731601731602, "weighted_f1");
    let third = 0.6666666666666666;
    assert_all_close(
        r.per_class.iter().map(|c| c.precision),
        &[third, third, third],
        "precision",
    );
    assert_all_close(
        r.per_class.iter().map(|c| c.recall),
        &[0.5, third, 0.8],
        "recall",
    );
    assert_all_close(
        r.per_class.iter().map(|c| c.f1),
        &[0.5714285714285714, third, 0.7272727272727273],
        "f1",
    );
    assert_eq!(
        r.per_class.iter().map(|c| c.support).collect::<Vec<_>>(),
        vec![4, 3, 5]
    );
    assert_eq!(
        r.confusion,
        vec![vec![2, 1, 1], vec![0, 2, 1], vec![1, 0, 4]]
    );
}

#[test]
fn sklearn_class_absent_from_data_counts_in_macro() {
    // Class 3 never occurs and is never predicted: F1 0 by zero_division=0, and it still
    // counts in the macro average because labels=range(4) is passed explicitly.
    // scikit-learn: rep([0,1,2,0,1,2,0,0], [0,2,1,0,0,2,1,0], 4)
    let y_true = [0, 1, 2, 0, 1, 2, 0, 0];
    let y_pred = [0, 2, 1, 0, 0, 2, 1, 0];
    let r = ClassificationReport::compute(&y_true, &y_pred, &labels(4)).unwrap();
    assert_close(r.accuracy, 0.5, "accuracy");
    assert_close(r.mcc, 0.2, "mcc");
    assert_close(r.macro_f1, 0.3125, "macro_f1");
    assert_close(r.weighted_f1, 0.5, "weighted_f1");
    assert_all_close(
        r.per_class.iter().map(|c| c.f1),
        &[0.75, 0.0, 0.5, 0.0],
        "f1",
    );
    assert_eq!(r.per_class[3].support, 0);
}

#[test]
fn sklearn_ten_class() {
    // scikit-learn: rep([i%10 for i in range(37)], [(i*i+3*(i//10))%10 for i in range(37)], 10)
    let y_true: Vec<usize> = (0..37).map(|i| i % 10).collect();
    let y_pred: Vec<usize> = (0..37).map(|i| (i * i + 3 * (i / 10)) % 10).collect();
    let r = ClassificationReport::compute(&y_true, &y_pred, &deeploc_labels()).unwrap();
    assert_close(r.accuracy, 0.10810810810810811, "accuracy");
    assert_close(r.mcc, 0.008979666636435122, "mcc");
    assert_close(r.macro_f1, 0.10436507936507936, "macro_f1");
    assert_close(r.weighted_f1, 0.11282711282711282, "weighted_f1");
    assert_all_close(
        r.per_class.iter().map(|c| c.precision),
        &[
            0.25,
            0.3333333333333333,
            0.0,
            0.0,
            0.0,
            0.2,
            0.3333333333333333,
            0.0,
            0.0,
            0.0,
        ],
        "precision",
    );
    assert_all_close(
        r.per_class.iter().map(|c| c.f1),
        &[
            0.25,
            0.2857142857142857,
            0.0,
            0.0,
            0.0,
            0.2222222222222222,
            0.2857142857142857,
            0.0,
            0.0,
            0.0,
        ],
        "f1",
    );
    assert_eq!(
        r.confusion[0],
        vec![1, 0, 0, 1, 0, 0, 1, 0, 0, 1],
        "first confusion row"
    );
}

// ---------------------------------------------------------------------------------------
// Errors, serialization, display
// ---------------------------------------------------------------------------------------

#[test]
fn errors() {
    let l = labels(3);
    assert_eq!(
        ClassificationReport::compute(&[0, 1], &[0], &l),
        Err(MetricsError::LengthMismatch {
            y_true: 2,
            y_pred: 1
        })
    );
    assert_eq!(
        ClassificationReport::compute(&[], &[], &l),
        Err(MetricsError::Empty)
    );
    assert!(matches!(
        ClassificationReport::compute(&[0, 3], &[0, 0], &l),
        Err(MetricsError::LabelOutOfRange {
            which: "true",
            index: 3,
            position: 1,
            n_labels: 3
        })
    ));
    assert!(matches!(
        ClassificationReport::compute(&[0, 0], &[0, 7], &l),
        Err(MetricsError::LabelOutOfRange {
            which: "predicted",
            index: 7,
            ..
        })
    ));
    assert!(matches!(
        ClassificationReport::compute(&[0], &[0], &[]),
        Err(MetricsError::LabelOutOfRange { n_labels: 0, .. })
    ));
    // Errors read well when shown to a user.
    let msg = ClassificationReport::compute(&[0, 1], &[0], &l)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("2 true labels but 1 predictions"), "{msg}");
}

#[test]
fn json_round_trip() {
    let y_true = [0, 0, 1, 2, 2, 2];
    let y_pred = [0, 1, 1, 2, 0, 2];
    let r = ClassificationReport::compute(&y_true, &y_pred, &labels(3)).unwrap();
    let json = serde_json::to_string(&r).unwrap();
    let back: ClassificationReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["confusion"][2][0], 1);
    assert_eq!(v["per_class"][0]["label"], "class0");
}

#[test]
fn display_ten_classes() {
    let y_true: Vec<usize> = (0..200).map(|i| i % 10).collect();
    let y_pred: Vec<usize> = (0..200)
        .map(|i| if i % 3 == 0 { (i + 1) % 10 } else { i % 10 })
        .collect();
    let r = ClassificationReport::compute(&y_true, &y_pred, &deeploc_labels()).unwrap();
    let s = r.to_string();
    println!("{s}");
    let first = s.lines().next().unwrap();
    assert!(first.starts_with("Q10 "), "{first}");
    assert!(
        first.contains("MCC") && first.contains("macro-F1"),
        "{first}"
    );
    assert!(s.contains("Endoplasmic.reticulum"), "full row names: {s}");
    assert!(
        s.contains("Endop") && s.contains("Perox"),
        "abbreviated headers: {s}"
    );
    for line in s.lines() {
        assert!(line.chars().count() <= 100, "line too wide: {line:?}");
    }
    // One table row per class, each with the support.
    for c in &r.per_class {
        assert!(
            s.lines()
                .any(|l| l.starts_with(&c.label) && l.trim_end().ends_with("20")),
            "row for {}",
            c.label
        );
    }
}

#[test]
fn display_other_class_counts_say_accuracy() {
    let r = ClassificationReport::compute(&[0, 1, 1], &[0, 1, 0], &labels(2)).unwrap();
    assert!(r.to_string().starts_with("accuracy 66.67%"));
}

// ---------------------------------------------------------------------------------------
// binary_accuracy_masked
// ---------------------------------------------------------------------------------------

#[test]
fn binary_accuracy_masked_skips_unknown() {
    let t = [Some(true), None, Some(false), Some(true), None];
    let p = [true, false, true, true, true];
    assert_eq!(binary_accuracy_masked(&t, &p), Some(2.0 / 3.0));
    assert_eq!(binary_accuracy_masked(&[None, None], &[true, false]), None);
    assert_eq!(binary_accuracy_masked(&[], &[]), None);
    assert_eq!(binary_accuracy_masked(&[Some(true)], &[]), None);
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

/// Up to 12 classes and 300 examples, both label vectors drawn from the same range.
fn predictions() -> impl Strategy<Value = (usize, Vec<usize>, Vec<usize>)> {
    (1usize..12).prop_flat_map(|k| {
        (1usize..300).prop_flat_map(move |n| {
            (
                Just(k),
                prop::collection::vec(0..k, n),
                prop::collection::vec(0..k, n),
            )
        })
    })
}

proptest! {
    #[test]
    fn report_invariants((k, y_true, y_pred) in predictions()) {
        let r = ClassificationReport::compute(&y_true, &y_pred, &labels(k)).unwrap();
        let n = y_true.len();
        prop_assert!((-1.0..=1.0).contains(&r.mcc), "mcc {}", r.mcc);
        let trace: usize = (0..k).map(|i| r.confusion[i][i]).sum();
        prop_assert_eq!(r.accuracy, trace as f64 / n as f64);
        prop_assert_eq!(r.confusion.iter().flatten().sum::<usize>(), n);
        prop_assert_eq!(r.per_class.iter().map(|c| c.support).sum::<usize>(), n);
        for c in &r.per_class {
            for v in [c.precision, c.recall, c.f1] {
                prop_assert!((0.0..=1.0).contains(&v));
            }
        }
        prop_assert!((0.0..=1.0).contains(&r.macro_f1));
        prop_assert!((0.0..=1.0).contains(&r.weighted_f1));
        // MCC is symmetric in its arguments (swapping transposes the confusion matrix).
        let swapped = ClassificationReport::compute(&y_pred, &y_true, &labels(k)).unwrap();
        prop_assert!((swapped.mcc - r.mcc).abs() < 1e-12);
    }

    #[test]
    fn perfect_prediction_is_perfect((k, y_true, _) in predictions()) {
        let r = ClassificationReport::compute(&y_true, &y_true, &labels(k)).unwrap();
        prop_assert_eq!(r.accuracy, 1.0);
        let classes_present = r.per_class.iter().filter(|c| c.support > 0).count();
        // With a single class present MCC is 0/0, reported as 0.
        let expected = if classes_present > 1 { 1.0 } else { 0.0 };
        prop_assert!((r.mcc - expected).abs() < 1e-12, "mcc {}", r.mcc);
    }
}

// ---------------------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------------------

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.len() > 24, "PNG too short");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk is IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

fn sample_report() -> ClassificationReport {
    // Roughly DeepLoc-like: strong diagonal, the usual Cytoplasm/Nucleus confusion.
    let labels = deeploc_labels();
    let support = [800, 500, 400, 300, 280, 170, 150, 70, 60, 30];
    let mut y_true = Vec::new();
    let mut y_pred = Vec::new();
    for (c, &s) in support.iter().enumerate() {
        for i in 0..s {
            y_true.push(c);
            let p = match i % 10 {
                0 | 1 if c != 0 => 0,
                2 => (c + 1) % 10,
                3 if c > 5 => 1,
                _ => c,
            };
            y_pred.push(p);
        }
    }
    ClassificationReport::compute(&y_true, &y_pred, &labels).unwrap()
}

/// When `PROTLOC_KEEP_PLOTS` names a directory, copies the PNG there for a human to look at.
fn keep(path: &Path) {
    if let Ok(dir) = std::env::var("PROTLOC_KEEP_PLOTS") {
        std::fs::copy(path, Path::new(&dir).join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn confusion_png_counts_and_normalized() {
    let dir = tempfile::tempdir().unwrap();
    let r = sample_report();
    for (normalize, name) in [
        (false, "confusion_counts.png"),
        (true, "confusion_norm.png"),
    ] {
        let path = dir.path().join(name);
        plot_confusion(&r, &path, normalize).unwrap();
        assert_eq!(png_size(&path), CONFUSION_PNG_SIZE);
        keep(&path);
    }
    // Only the two PNGs: the temporary files were renamed, not left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn confusion_png_small_and_degenerate() {
    let dir = tempfile::tempdir().unwrap();
    let r = ClassificationReport::compute(&[0, 0, 1], &[0, 0, 0], &labels(3)).unwrap();
    let path = dir.path().join("confusion_small.png");
    plot_confusion(&r, &path, true).unwrap();
    assert_eq!(png_size(&path), CONFUSION_PNG_SIZE);
    keep(&path);
    // Overwriting an existing plot works.
    plot_confusion(&r, &path, false).unwrap();
    assert_eq!(png_size(&path), CONFUSION_PNG_SIZE);
}

#[test]
fn curves_png() {
    let dir = tempfile::tempdir().unwrap();
    // Train loss logged 4 times per epoch, validation once per epoch.
    let mut points = Vec::new();
    for step in 1..=40 {
        let epoch = step as f64 / 4.0;
        let val = step % 4 == 0;
        points.push(CurvePoint {
            epoch,
            train_loss: Some(2.2 * (-0.35 * epoch).exp() + 0.2 + 0.05 * ((step % 3) as f64)),
            val_loss: val.then(|| 2.0 * (-0.3 * epoch).exp() + 0.45 + 0.01 * epoch),
            val_accuracy: val.then(|| 0.8 - 0.5 * (-0.45 * epoch).exp()),
        });
    }
    let path = dir.path().join("curves.png");
    plot_training_curves(&points, &path).unwrap();
    assert_eq!(png_size(&path), CURVES_PNG_SIZE);
    keep(&path);
}

#[test]
fn curves_png_sparse_data() {
    let dir = tempfile::tempdir().unwrap();
    // A single point with only train loss, and a NaN loss: still a valid (mostly empty) plot.
    let points = [
        CurvePoint {
            epoch: 0.5,
            train_loss: Some(1.3),
            val_loss: None,
            val_accuracy: None,
        },
        CurvePoint {
            epoch: 1.0,
            train_loss: Some(f64::NAN),
            val_loss: None,
            val_accuracy: None,
        },
    ];
    let path = dir.path().join("curves_sparse.png");
    plot_training_curves(&points, &path).unwrap();
    assert_eq!(png_size(&path), CURVES_PNG_SIZE);
    keep(&path);
    let empty = dir.path().join("curves_empty.png");
    plot_training_curves(&[], &empty).unwrap();
    assert_eq!(png_size(&empty), CURVES_PNG_SIZE);
    keep(&empty);
}

#[test]
fn plots_into_missing_directory_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/plot.png");
    let r = sample_report();
    let err = plot_confusion(&r, &missing, false).unwrap_err();
    assert!(format!("{err:#}").contains("no/such/dir"), "{err:#}");
    assert!(plot_training_curves(&[], &missing).is_err());
    assert!(!missing.exists());
}

#[test]
fn confusion_png_many_long_labels() {
    // Many classes, one with an absurdly long name: the grid must still fit the canvas.
    let dir = tempfile::tempdir().unwrap();
    for k in [24, 40] {
        let mut names = labels(k);
        names[5] = "a very long class name that goes on and on and on".to_string();
        let y_true: Vec<usize> = (0..20 * k).map(|i| i % k).collect();
        let y_pred: Vec<usize> = (0..20 * k)
            .map(|i| if i % 5 == 0 { (i / 5) % k } else { i % k })
            .collect();
        let r = ClassificationReport::compute(&y_true, &y_pred, &names).unwrap();
        let path = dir.path().join(format!("confusion_many_{k}.png"));
        plot_confusion(&r, &path, true).unwrap();
        assert_eq!(png_size(&path), CONFUSION_PNG_SIZE);
        keep(&path);
    }
}
