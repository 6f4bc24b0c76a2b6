//! Validation of a fine-tuning run, its starting model and each epoch (on one rank or
//! shared across ranks).

use anyhow::Result;

use super::metrics::{validation_metrics, ValidationMetrics};
use super::setup::Examples;
use crate::dist::Collective;
use crate::infer::BatchLimits;
use crate::model::SequenceClassifier;

/// Validation metrics over the whole validation set (`val_total` proteins; `None` without
/// one) from this rank's share `val` of it: sums of loss, hits and count are added up across
/// ranks.
pub(super) fn validate(
    model: &mut SequenceClassifier,
    comm: &dyn Collective,
    val: &Examples,
    val_total: usize,
    limits: BatchLimits,
) -> Result<Option<ValidationMetrics>> {
    let metrics = if val_total == 0 {
        None
    } else {
        let local = if val.is_empty() {
            None
        } else {
            let out = crate::infer::head_outputs(model, &val.enc, limits, None)?;
            let mut m =
                validation_metrics(&out.probabilities, out.membrane.as_deref(), &val.targets);
            if model.task.multi_label && comm.world_size() == 1 {
                // Per-location thresholds tuned on validation, saved with the model (as for
                // heads on a frozen encoder).
                let (accuracy, th) = super::frozen::tune_thresholds(
                    &out.probabilities,
                    &val.targets,
                    &model.task.labels,
                );
                m.accuracy = accuracy;
                model.task.thresholds = Some(th);
            }
            Some(m)
        };
        if comm.world_size() == 1 {
            local
        } else {
            // Back from this shard's means to sums (hits are whole numbers), added up over
            // ranks: [loss, hits, proteins, membrane hits, proteins with a membrane flag].
            let n = val.len() as f64;
            let known = val.targets.iter().filter(|t| t.membrane.is_some()).count() as f64;
            let mut sums = match local {
                Some(m) => [
                    m.loss * n,
                    (m.accuracy * n).round(),
                    n,
                    m.membrane_accuracy.map_or(0.0, |a| (a * known).round()),
                    if m.membrane_accuracy.is_some() {
                        known
                    } else {
                        0.0
                    },
                ],
                None => [0.0; 5],
            };
            comm.all_reduce_sum_f64(&mut sums)?;
            Some(ValidationMetrics {
                loss: sums[0] / sums[2],
                accuracy: sums[1] / sums[2],
                membrane_accuracy: (sums[4] > 0.0).then(|| sums[3] / sums[4]),
            })
        }
    };
    Ok(metrics)
}
