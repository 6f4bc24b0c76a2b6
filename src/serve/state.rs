//! The state shared by all handlers, and how it is built: the model loaded on the inference
//! threads behind the micro-batcher, and the `GET /v1/info` answer.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;

use super::metrics::Metrics;
use super::options::{Limits, ServeOptions};
use super::queue::{Engine, MicroBatcher, Scored};
use super::response::{ClassThreshold, Info, InfoLimits};
use crate::model::{answer, AnswerRule, SequenceClassifier};
use crate::tokenize::{Encoded, TokenBatch, Tokenizer};

/// Shared by all handlers.
pub struct AppState {
    pub opts: ServeOptions,
    /// `opts.limits` as the server applies them ([`Limits::normalized`]).
    pub limits: Limits,
    pub info: Info,
    /// How the model's outputs become answers (labels, thresholds, membrane output).
    pub rule: AnswerRule,
    pub tokenizer: Tokenizer,
    pub batcher: MicroBatcher,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    pub started: Instant,
}

/// Runs the classifier on the inference threads and turns its outputs into answers with the
/// rule `predict` and `eval` use.
struct ModelEngine {
    model: SequenceClassifier,
    rule: AnswerRule,
    device: Device,
}

impl Engine for ModelEngine {
    fn score(&mut self, items: &[&Encoded]) -> Result<Vec<Scored>> {
        let batch = TokenBatch::collate(items, self.model.base.tokenizer.pad_id, &self.device)?;
        let p = self.model.inference_probabilities(&batch)?;
        let answers = self.rule.batch_answers(&p)?;
        let logits: Vec<Vec<f32>> = p.logits.to_vec2()?;
        Ok(answers
            .into_iter()
            .zip(logits)
            .map(|(answer, logits)| Scored { answer, logits })
            .collect())
    }
}

/// Loads the model on the worker threads, starts the micro-batcher and builds the shared
/// state.
pub fn build_state(opts: ServeOptions) -> Result<Arc<AppState>> {
    let metrics = Arc::new(Metrics::default());
    let limits = opts.limits.normalized();
    let dir = opts.model.clone();
    let base = opts.base.clone();
    let device_spec = opts.device;
    let (batcher, (task, model_type, tokenizer, device)) =
        MicroBatcher::start(limits, Arc::clone(&metrics), move || {
            let device = device_spec.resolve_here()?;
            let model = SequenceClassifier::open(&dir, base.as_deref(), &device)
                .with_context(|| format!("cannot load model {}", dir.display()))?;
            let info = (
                model.task.clone(),
                model.base.cfg.model_type.to_string(),
                model.base.tokenizer.clone(),
                crate::device::describe(&device),
            );
            let rule = model.answer_rule();
            Ok((
                ModelEngine {
                    model,
                    rule,
                    device,
                },
                info,
            ))
        })?;
    let rule = AnswerRule::for_task(&task);
    let info = Info {
        model: opts.model.display().to_string(),
        model_type,
        base_model: task.base_model.clone(),
        labels: task.labels.clone(),
        membrane_head: rule.membrane,
        membrane_threshold: rule.membrane.then_some(answer::MEMBRANE_THRESHOLD),
        multi_label: rule.multi_label(),
        thresholds: rule
            .thresholds
            .as_deref()
            .map(|th| ClassThreshold::list(&rule.labels, th)),
        ensemble_members: task.ensemble,
        max_residues: task.max_residues,
        truncate: opts.truncate.unwrap_or(task.truncate),
        no_truncate: opts.no_truncate,
        limits: InfoLimits {
            limits,
            auth: opts.api_key.is_some(),
        },
        device,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    Ok(Arc::new(AppState {
        opts,
        limits,
        info,
        rule,
        tokenizer,
        batcher,
        metrics,
        draining: AtomicBool::new(false),
        started: Instant::now(),
    }))
}
