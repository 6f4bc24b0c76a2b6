//! The one place a model's outputs become its answer: the chosen location(s), the confidence,
//! every location's probability and, for models with a membrane output, membrane-bound or
//! soluble. `predict`, `eval` and `serve` all answer through [`AnswerRule::answer`], so the
//! same model gives the same answer whichever command asks.
//!
//! - Single-label models name their most probable location.
//! - Multi-label models name every location whose probability reaches its saved threshold
//!   (`"A|B"`, in label order); a protein with none gets its most probable location (every
//!   protein is somewhere).
//! - The membrane output says membrane-bound when P(membrane) >= [`MEMBRANE_THRESHOLD`].
//!
//! Ensembles answer like single models, from their members' mean probabilities
//! ([`super::SequenceClassifier::combine`]) and the mean of their members' thresholds.

use super::{BatchProbabilities, TaskConfig};

/// Threshold of a multi-label model's location without a saved one.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// P(membrane) from which a protein is called membrane-bound.
pub const MEMBRANE_THRESHOLD: f32 = 0.5;

/// Index of the largest value (the first of equal ones; 0 for an empty or all-NaN row).
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// One protein's location set from its probabilities: every location at or over its
/// threshold, or the most probable one when none is.
pub fn decide_row(p: &[f32], thresholds: &[f32]) -> Vec<bool> {
    let mut row: Vec<bool> = p.iter().zip(thresholds).map(|(&q, &t)| q >= t).collect();
    row.resize(p.len(), false);
    if !row.iter().any(|&b| b) && !p.is_empty() {
        row[argmax(p)] = true;
    }
    row
}

/// [`decide_row`] for every protein.
pub fn decide(probs: &[Vec<f32>], thresholds: &[f32]) -> Vec<Vec<bool>> {
    probs.iter().map(|p| decide_row(p, thresholds)).collect()
}

/// The membrane part of an answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MembraneAnswer {
    /// P(membrane-bound).
    pub probability: f32,
    /// `probability >= MEMBRANE_THRESHOLD`.
    pub bound: bool,
}

impl MembraneAnswer {
    pub fn new(probability: f32) -> Self {
        Self {
            probability,
            bound: probability >= MEMBRANE_THRESHOLD,
        }
    }

    /// `Membrane` or `Soluble`.
    pub fn label(&self) -> &'static str {
        if self.bound {
            "Membrane"
        } else {
            "Soluble"
        }
    }
}

/// A model's answer for one protein.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The chosen location(s), joined by `|` in label order (one for single-label models).
    pub prediction: String,
    /// Indices of the chosen locations, in label order (never empty).
    pub locations: Vec<usize>,
    /// Index of the most probable location.
    pub best: usize,
    /// Its probability.
    pub confidence: f32,
    /// Every location's probability, in label order (softmax, or per-location sigmoids for
    /// multi-label models).
    pub probabilities: Vec<f32>,
    /// For models with a membrane output.
    pub membrane: Option<MembraneAnswer>,
}

impl Answer {
    /// The chosen locations as an indicator row over every label.
    pub fn chosen(&self) -> Vec<bool> {
        let mut row = vec![false; self.probabilities.len()];
        for &k in &self.locations {
            row[k] = true;
        }
        row
    }
}

/// How a model turns its outputs into answers: its labels, its decision thresholds
/// (multi-label models) and whether it has a membrane output.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerRule {
    /// Locations, in the model's output order.
    pub labels: Vec<String>,
    /// Per-location thresholds of a multi-label model (its saved ones, else
    /// [`DEFAULT_THRESHOLD`]); `None` for a single-label model (argmax).
    pub thresholds: Option<Vec<f32>>,
    /// The model predicts membrane-bound vs soluble.
    pub membrane: bool,
}

impl AnswerRule {
    /// The rule of a model trained with `task`.
    pub fn for_task(task: &TaskConfig) -> Self {
        let thresholds = task.multi_label.then(|| {
            task.thresholds
                .clone()
                .unwrap_or_else(|| vec![DEFAULT_THRESHOLD; task.labels.len()])
        });
        Self {
            labels: task.labels.clone(),
            thresholds,
            membrane: task.membrane,
        }
    }

    pub fn multi_label(&self) -> bool {
        self.thresholds.is_some()
    }

    /// The answer for one protein from its location probabilities (label order) and, for
    /// models with a membrane output, P(membrane).
    pub fn answer(&self, probabilities: Vec<f32>, membrane: Option<f32>) -> Answer {
        let best = argmax(&probabilities);
        let locations: Vec<usize> = match &self.thresholds {
            Some(th) => decide_row(&probabilities, th)
                .iter()
                .enumerate()
                .filter_map(|(k, &on)| on.then_some(k))
                .collect(),
            None if probabilities.is_empty() => Vec::new(),
            None => vec![best],
        };
        let prediction = locations
            .iter()
            .filter_map(|&k| self.labels.get(k).map(String::as_str))
            .collect::<Vec<_>>()
            .join("|");
        Answer {
            prediction,
            locations,
            best,
            confidence: probabilities.get(best).copied().unwrap_or(f32::NAN),
            probabilities,
            membrane: membrane.map(MembraneAnswer::new),
        }
    }

    /// Answers for rows of location probabilities and the matching P(membrane) values
    /// (`membrane` is `None` for models without that output).
    pub fn answers(&self, probabilities: Vec<Vec<f32>>, membrane: Option<Vec<f32>>) -> Vec<Answer> {
        let mut membrane = membrane.map(Vec::into_iter);
        probabilities
            .into_iter()
            .map(|p| {
                let m = membrane.as_mut().and_then(Iterator::next);
                self.answer(p, m)
            })
            .collect()
    }

    /// Answers for one batch of a model's outputs.
    pub fn batch_answers(&self, p: &BatchProbabilities) -> candle_core::Result<Vec<Answer>> {
        let membrane = p.membrane.as_ref().map(|m| m.to_vec1()).transpose()?;
        Ok(self.answers(p.location.to_vec2()?, membrane))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(thresholds: Option<Vec<f32>>, membrane: bool) -> AnswerRule {
        AnswerRule {
            labels: ["A", "B", "C"].iter().map(|s| s.to_string()).collect(),
            thresholds,
            membrane,
        }
    }

    #[test]
    fn single_label_answers_name_the_most_probable_location() {
        let a = rule(None, false).answer(vec![0.2, 0.5, 0.3], None);
        assert_eq!(a.prediction, "B");
        assert_eq!(
            (a.locations.clone(), a.best, a.confidence),
            (vec![1], 1, 0.5)
        );
        assert_eq!(a.chosen(), vec![false, true, false]);
        assert!(a.membrane.is_none());
    }

    #[test]
    fn multi_label_answers_use_the_thresholds_and_fall_back_to_the_best() {
        let r = rule(Some(vec![0.5, 0.8, 0.05]), true);
        let a = r.answer(vec![0.9, 0.7, 0.1], Some(0.5));
        assert_eq!(a.prediction, "A|C");
        assert_eq!((a.best, a.confidence), (0, 0.9));
        assert_eq!(a.membrane, Some(MembraneAnswer::new(0.5)));
        assert_eq!(a.membrane.unwrap().label(), "Membrane");
        // Nothing over its threshold: the most probable location.
        let a = r.answer(vec![0.2, 0.4, 0.01], Some(0.49));
        assert_eq!(
            (a.prediction.as_str(), a.locations.as_slice()),
            ("B", &[1][..])
        );
        assert_eq!(a.membrane.unwrap().label(), "Soluble");
        // A threshold is reached by equality.
        assert_eq!(r.answer(vec![0.5, 0.8, 0.0], None).prediction, "A|B");
    }

    #[test]
    fn answers_pair_rows_with_membrane_probabilities() {
        let r = rule(None, true);
        let a = r.answers(
            vec![vec![0.1, 0.2, 0.7], vec![0.6, 0.3, 0.1]],
            Some(vec![0.9, 0.1]),
        );
        assert_eq!(a[0].prediction, "C");
        assert_eq!(a[1].prediction, "A");
        assert_eq!(a[0].membrane.unwrap().probability, 0.9);
        assert!(!a[1].membrane.unwrap().bound);
    }

    #[test]
    fn rule_follows_the_task() {
        let mut task = TaskConfig::new(vec!["A".into(), "B".into()], "scratch:tiny");
        assert_eq!(AnswerRule::for_task(&task).thresholds, None);
        task.multi_label = true;
        assert_eq!(
            AnswerRule::for_task(&task).thresholds,
            Some(vec![DEFAULT_THRESHOLD; 2])
        );
        task.thresholds = Some(vec![0.3, 0.6]);
        task.membrane = true;
        let r = AnswerRule::for_task(&task);
        assert_eq!(r.thresholds, Some(vec![0.3, 0.6]));
        assert!(r.membrane && r.multi_label());
    }

    #[test]
    fn decide_falls_back_to_the_most_probable_location() {
        let probs = vec![vec![0.2, 0.4, 0.1], vec![0.9, 0.7, 0.1]];
        let on = |v: &[u8]| v.iter().map(|&b| b == 1).collect::<Vec<_>>();
        assert_eq!(
            decide(&probs, &[0.5, 0.5, 0.5]),
            vec![on(&[0, 1, 0]), on(&[1, 1, 0])]
        );
        assert_eq!(
            decide(&probs, &[0.5, 0.8, 0.05]),
            vec![on(&[0, 0, 1]), on(&[1, 0, 1])]
        );
    }
}
