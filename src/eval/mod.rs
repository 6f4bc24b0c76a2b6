//! Evaluation: classification metrics and their plots.

pub mod metrics;
pub mod plot;
pub mod run;
