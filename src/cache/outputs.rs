//! A model's outputs on cached rows (heads on a frozen encoder, or on the states entering
//! its top layers): for evaluation, and validation while training.

use anyhow::Result;
use candle_core::Device;

use super::EmbeddingCache;
use crate::infer::HeadPredictions;
use crate::model::SequenceClassifier;

/// Proteins per validation batch on cached rows.
const EVAL_BATCH: usize = 32;

/// Location probabilities (and membrane probabilities, when the head predicts them) of the
/// cached proteins `seqs`, in order, without gradient tracking; an ensemble's are the mean
/// of its members'. The cache is a frozen encoder's output, or the states entering a layer
/// ([`super::CacheSpec::at_layer`]) that the model's upper layers then run on.
pub fn cached_outputs(
    model: &SequenceClassifier,
    cache: &mut EmbeddingCache,
    seqs: &[&str],
    device: &Device,
) -> Result<HeadPredictions> {
    cached_member_outputs(model, 0..model.members(), cache, seqs, device)
}

/// [`cached_outputs`] of the heads `members` only (one member's, during its training).
pub(crate) fn cached_member_outputs(
    model: &SequenceClassifier,
    members: std::ops::Range<usize>,
    cache: &mut EmbeddingCache,
    seqs: &[&str],
    device: &Device,
) -> Result<HeadPredictions> {
    let from_layer = cache.spec().layer;
    let encoder = from_layer.map(|_| model.base.encoder.detached());
    // Length-sorted batches pad little; results go back to input order.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    // One row per protein: the C location probabilities, then P(membrane) if present.
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    for group in order.chunks(EVAL_BATCH) {
        let s: Vec<&str> = group.iter().map(|&i| seqs[i]).collect();
        let batch = cache.batch(&s, device)?;
        let p = match (from_layer, &encoder) {
            (Some(n), Some(encoder)) => {
                let hidden = encoder.forward_from(&batch.x, &batch.mask, n, None)?;
                let residues = super::residues_of_tokens(&batch.mask)?;
                model.hidden_probabilities(&hidden, &residues, members.clone())?
            }
            _ => model.residue_probabilities(&batch.x, &batch.mask, members.clone())?,
        };
        let t = match &p.membrane {
            Some(m) => candle_core::Tensor::cat(&[&p.location, &m.unsqueeze(1)?], 1)?,
            None => p.location,
        };
        for (&i, row) in group.iter().zip(t.to_vec2::<f32>()?) {
            rows[i] = row;
        }
    }
    Ok(HeadPredictions::from_rows(rows, model.task.membrane))
}
