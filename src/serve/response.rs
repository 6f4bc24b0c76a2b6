//! The response bodies of the server's routes, serialized by the handlers and documented in
//! the OpenAPI document from the same types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::options::Limits;
use crate::model::MembraneAnswer;
use crate::tokenize::Truncation;

/// One location and its probability.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClassProbability {
    pub label: String,
    pub probability: f32,
}

/// One location and its raw score (logit).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClassScore {
    pub label: String,
    pub score: f32,
}

/// One location's decision threshold (multi-label models).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClassThreshold {
    pub label: String,
    /// The location is predicted when its probability is at least this.
    pub threshold: f32,
}

impl ClassThreshold {
    /// `labels` paired with `thresholds`, in label order.
    pub fn list(labels: &[String], thresholds: &[f32]) -> Vec<ClassThreshold> {
        labels
            .iter()
            .zip(thresholds)
            .map(|(label, &threshold)| ClassThreshold {
                label: label.clone(),
                threshold,
            })
            .collect()
    }
}

/// Membrane-bound or soluble (`membrane_probability` at least 0.5, or below).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum MembraneLabel {
    Membrane,
    Soluble,
}

impl MembraneLabel {
    pub(super) fn of(m: &MembraneAnswer) -> Self {
        if m.bound {
            MembraneLabel::Membrane
        } else {
            MembraneLabel::Soluble
        }
    }
}

/// The prediction for one protein: the same answer `protloc predict` gives.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProteinPrediction {
    /// The id given (FASTA header word, CSV/JSON `id`), else `seqN` (1-based position).
    pub id: String,
    /// The predicted location: the most probable one, or for a multi-label model every
    /// location at or over its threshold joined by `|` in label order (`Cytoplasm|Nucleus`;
    /// the most probable when none is).
    pub prediction: String,
    /// The predicted locations as a list, in label order (one for single-label models).
    #[serde(default)]
    pub locations: Vec<String>,
    /// The probability of the most probable location.
    pub confidence: f32,
    /// Locations by decreasing probability (`top_k` of them when asked). Softmax
    /// probabilities, or independent per-location sigmoids for multi-label models.
    pub probabilities: Vec<ClassProbability>,
    /// Raw scores in the same order, with `raw_scores=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<ClassScore>>,
    /// The decision threshold of every location, in label order (multi-label models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<ClassThreshold>>,
    /// Probability of being membrane-bound (models with a membrane output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membrane_probability: Option<f32>,
    /// Membrane-bound or soluble (models with a membrane output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membrane_label: Option<MembraneLabel>,
    /// Residues in the protein.
    pub length: usize,
    /// Residues the model saw (less than `length` when truncated).
    pub residues_used: usize,
    pub truncated: bool,
}

/// Predictions in request order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PredictResponse {
    pub predictions: Vec<ProteinPrediction>,
}

/// `GET /v1/info`: the model and the server's limits.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Info {
    /// The run directory served.
    pub model: String,
    /// `bert` or `esm`.
    pub model_type: String,
    /// What the run was fine-tuned from.
    pub base_model: String,
    /// Locations, in the model's output order.
    pub labels: Vec<String>,
    /// Whether the model predicts membrane-bound/soluble: predictions then carry
    /// `membrane_probability` and `membrane_label`.
    pub membrane_head: bool,
    /// P(membrane) from which a protein is called membrane-bound, for models with the
    /// membrane output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membrane_threshold: Option<f32>,
    /// Whether the model names every location over its threshold (`"A|B"`) instead of the
    /// single most probable one.
    #[serde(default)]
    pub multi_label: bool,
    /// The per-location decision thresholds of a multi-label model, in label order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<ClassThreshold>>,
    /// Heads whose probabilities are averaged: 1 for a single model, N for an ensemble
    /// (`protloc train --frozen --ensemble N` or `--folds N`).
    pub ensemble_members: usize,
    pub max_residues: usize,
    /// `head` or `head-tail`.
    #[schema(value_type = String, example = "head-tail")]
    pub truncate: Truncation,
    /// Longer sequences are rejected (422) instead of truncated.
    pub no_truncate: bool,
    pub limits: InfoLimits,
    /// Where the model runs: `cpu` or `cuda:N` (`protloc serve --device`).
    #[schema(example = "cpu")]
    pub device: String,
    pub version: String,
}

/// The server's limits in `GET /v1/info`, and whether the prediction routes need a bearer
/// token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoLimits {
    #[serde(flatten)]
    pub limits: Limits,
    /// Whether the prediction routes require `Authorization: Bearer <api key>`.
    pub auth: bool,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the sequence (1-based index and id) and position where relevant.
    pub error: String,
    /// Stable machine-readable code, e.g. `invalid_sequence`, `queue_full`.
    pub code: String,
}
