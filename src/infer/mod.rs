//! Batched inference: class probabilities and embeddings for many proteins, grouped by a
//! token budget and sorted by length so padding stays small.

pub mod output;
pub mod predict;
pub mod shard;

use anyhow::{bail, Result};
use candle_core::Device;
use indicatif::ProgressBar;

use crate::model::{Answer, AnswerRule, Encoder, SequenceClassifier};
use crate::tokenize::{token_budget_groups, Encoded, TokenBatch};

/// Batch sizing for inference: proteins are sorted by length and grouped under a token
/// budget. Also the `--max-batch-tokens` / `--max-batch-size` options of `predict`, `embed`,
/// `eval` and `report`.
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Padded tokens per inference batch (proteins are sorted by length and grouped). On
    /// CPU, 2048 keeps a batch's activations in cache (measured fastest:
    /// docs/performance.md); raise it on a GPU.
    #[arg(long, default_value_t = 2048, value_parser = at_least_one())]
    pub max_batch_tokens: usize,
    /// Proteins per inference batch at most.
    #[arg(long, default_value_t = 64, value_parser = at_least_one())]
    pub max_batch_size: usize,
}

/// A count option's parser: 1 or more (0 is refused, naming the option).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
            max_batch_size: 64,
        }
    }
}

/// Runs `f` on token-budget batches of `encoded` and returns its per-protein rows in input
/// order.
pub(crate) fn batched_rows(
    encoded: &[Encoded],
    pad_id: u32,
    limits: BatchLimits,
    device: &Device,
    progress: Option<&ProgressBar>,
    mut f: impl FnMut(&TokenBatch) -> candle_core::Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
    let plan = token_budget_groups(&lengths, limits.max_batch_tokens, limits.max_batch_size);
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); encoded.len()];
    for group in plan {
        let items: Vec<&Encoded> = group.iter().map(|&i| &encoded[i]).collect();
        let batch = TokenBatch::collate(&items, pad_id, device)?;
        let rows = f(&batch)?;
        for (i, row) in group.iter().zip(rows) {
            out[*i] = row;
        }
        if let Some(pb) = progress {
            pb.inc(group.len() as u64);
        }
    }
    Ok(out)
}

/// Class probabilities per protein, in input order.
pub fn class_probabilities(
    model: &SequenceClassifier,
    encoded: &[Encoded],
    limits: BatchLimits,
    progress: Option<&ProgressBar>,
) -> Result<Vec<Vec<f32>>> {
    let device = model.base.store.device().clone();
    batched_rows(
        encoded,
        model.base.tokenizer.pad_id,
        limits,
        &device,
        progress,
        |b| model.predict_proba(b)?.to_vec2(),
    )
}

/// Everything a model predicts per protein, in input order.
pub struct HeadPredictions {
    /// Location probabilities [N][C] (softmax, or sigmoids for multi-label models).
    pub probabilities: Vec<Vec<f32>>,
    /// Probability of being membrane-bound [N], for models with a membrane output.
    pub membrane: Option<Vec<f32>>,
}

/// Location (and membrane) probabilities per protein, in input order (an ensemble's: the
/// mean of its members', see [`SequenceClassifier::combine`]).
pub fn head_outputs(
    model: &SequenceClassifier,
    encoded: &[Encoded],
    limits: BatchLimits,
    progress: Option<&ProgressBar>,
) -> Result<HeadPredictions> {
    let device = model.base.store.device().clone();
    let has_membrane = model.task.membrane;
    // One row per protein: the C location probabilities, then P(membrane) if present.
    let rows = batched_rows(
        encoded,
        model.base.tokenizer.pad_id,
        limits,
        &device,
        progress,
        |b| {
            let p = model.inference_probabilities(b)?;
            let probs = match &p.membrane {
                Some(m) => candle_core::Tensor::cat(&[&p.location, &m.unsqueeze(1)?], 1)?,
                None => p.location,
            };
            probs.to_vec2()
        },
    )?;
    Ok(HeadPredictions::from_rows(rows, has_membrane))
}

impl HeadPredictions {
    /// Every protein's answer under `rule` (see [`crate::model::answer`]).
    pub fn into_answers(self, rule: &AnswerRule) -> Vec<Answer> {
        rule.answers(self.probabilities, self.membrane)
    }

    /// From rows of the C location probabilities followed, when `has_membrane`, by
    /// P(membrane).
    pub(crate) fn from_rows(rows: Vec<Vec<f32>>, has_membrane: bool) -> Self {
        let mut probabilities = Vec::with_capacity(rows.len());
        let mut membrane = has_membrane.then(|| Vec::with_capacity(rows.len()));
        for mut r in rows {
            if let Some(m) = membrane.as_mut() {
                m.push(r.pop().expect("membrane column"));
            }
            probabilities.push(r);
        }
        Self {
            probabilities,
            membrane,
        }
    }
}

/// Mean-pooled residue embeddings per protein, in input order.
pub fn mean_embeddings(
    encoder: &Encoder,
    pad_id: u32,
    device: &Device,
    encoded: &[Encoded],
    limits: BatchLimits,
    progress: Option<&ProgressBar>,
) -> Result<Vec<Vec<f32>>> {
    batched_rows(encoded, pad_id, limits, device, progress, |b| {
        encoder.embed(b)?.to_vec2()
    })
}

/// Residues per protein: explicit, or the model's positions minus the two special tokens,
/// capped at 510 (the reference workflow's 512 tokens; attention memory grows with the
/// square of the length, and 1,022 residues at batch 4 needs many GB to train on a CPU).
pub fn effective_max_residues(
    cfg: &crate::model::EncoderConfig,
    requested: Option<usize>,
) -> Result<usize> {
    let limit = cfg.max_tokens().saturating_sub(2);
    match requested {
        Some(n) if cfg.arch() == crate::model::Arch::Bert && n > limit => bail!(
            "--max-residues {n} exceeds what this BERT's {} position embeddings allow ({limit})",
            cfg.max_tokens()
        ),
        Some(n) => Ok(n),
        None => Ok(limit.min(DEFAULT_MAX_RESIDUES)),
    }
}

/// Default residues per protein for training (see [`effective_max_residues`]).
pub const DEFAULT_MAX_RESIDUES: usize = 510;

pub use crate::model::answer::argmax;
