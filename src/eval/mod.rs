//! Evaluation: classification metrics (accuracy / Q10, MCC, per-class F1, confusion
//! matrix; numbers match scikit-learn), their PNG plots, and the `eval` command.

pub mod compare;
pub mod metrics;
pub mod multilabel;
pub mod plot;
pub mod run;
pub mod target;

pub use metrics::{binary_accuracy_masked, ClassMetrics, ClassificationReport, MetricsError};
pub use plot::{plot_confusion, plot_training_curves, CurvePoint};
