//! The classifier: an encoder plus one head (or an ensemble's heads), how their outputs
//! become probabilities, and loading/saving run directories.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use super::answer::AnswerRule;
use super::base::{load_encoder, BaseModel, Purpose};
use super::head::{Head, HeadOutput};
use super::import::{self, Resolved};
use super::params;
use super::task::{is_head_param, member_prefix, TaskConfig};
use crate::kernels::ops;
use crate::tokenize::TokenBatch;

/// Probabilities of one batch (see [`SequenceClassifier::combine`]).
pub struct BatchProbabilities {
    /// [B, C] location probabilities: softmax, or per-location sigmoids for a multi-label
    /// model; an ensemble's are the mean of its members'.
    pub location: Tensor,
    /// [B] probability of being membrane-bound (members' mean), for heads with that output.
    pub membrane: Option<Tensor>,
    /// [B, C] location logits; an ensemble's are the mean of its members' (reported as raw
    /// scores only: the probabilities are not their softmax).
    pub logits: Tensor,
}

/// Encoder + classifier head(s) + everything needed to preprocess input the same way as in
/// training.
pub struct SequenceClassifier {
    pub base: BaseModel,
    /// One head, or the `task.ensemble` members of an ensemble, in member order.
    pub heads: Vec<Head>,
    pub task: TaskConfig,
}

impl SequenceClassifier {
    /// Puts `task.ensemble` freshly initialised heads on `base`, drawn one after another
    /// from the store's RNG (see [`Self::new_ensemble`] for one seed per member).
    pub fn new(base: BaseModel, task: TaskConfig) -> Result<Self> {
        Self::build(base, task, None)
    }

    /// An ensemble of `seeds.len()` (= `task.ensemble`) fresh heads on `base`; member k is
    /// initialised from `seeds[k]`, as a single model's head would be in a fresh store with
    /// that seed.
    pub fn new_ensemble(base: BaseModel, task: TaskConfig, seeds: &[u64]) -> Result<Self> {
        if seeds.len() != task.ensemble {
            bail!(
                "{} member seeds for an ensemble of {}",
                seeds.len(),
                task.ensemble
            );
        }
        Self::build(base, task, Some(seeds))
    }

    fn build(base: BaseModel, task: TaskConfig, seeds: Option<&[u64]>) -> Result<Self> {
        if task.ensemble == 0 {
            bail!("an ensemble needs at least one member");
        }
        // The new head starts from scratch: drop the checkpoint's remaining tensors first, or
        // a pretrained classifier that happens to share a name and shape (e.g. the
        // `classifier.dense` of an *ForSequenceClassification checkpoint) would be reused.
        // The one deliberate exception: the reference head's pooler is part of the pretrained
        // BERT (`bert.pooler.dense`), so it is read before the checkpoint goes.
        let spec = task.head_spec(&base.cfg)?;
        Head::load_pretrained_pooler(&base.store, &spec)?;
        base.store.release_source();
        let heads = (0..task.ensemble)
            .map(|k| {
                if let Some(seeds) = seeds {
                    base.store.reseed(seeds[k]);
                }
                Head::new(
                    &member_builder(base.store.initialising(), k, task.ensemble),
                    spec.clone(),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { base, heads, task })
    }

    /// `base`, loaded for training from a model directory that also holds a classifier
    /// (a run directory or a transformers `*ForSequenceClassification` directory; `task` as
    /// [`import::resolve`] read it), with that classifier as its trainable head:
    /// `train --init-head`.
    pub fn with_checkpoint_head(mut base: BaseModel, task: TaskConfig) -> Result<Self> {
        if task.ensemble != 1 {
            bail!(
                "{}: an ensemble of {} heads; --init-head continues a single model",
                base.source,
                task.ensemble
            );
        }
        let spec = task.head_spec(&base.cfg)?;
        let head = Head::new(&base.store.strict(), spec)
            .with_context(|| format!("{}: its classifier head is incomplete", base.source))?;
        base.store.release_source();
        if task.keep_rare_residues {
            base.tokenizer = base.tokenizer.keeping_rare_residues();
        }
        Ok(Self {
            base,
            heads: vec![head],
            task,
        })
    }

    /// Heads averaged at inference (1 for a single model).
    pub fn members(&self) -> usize {
        self.heads.len()
    }

    /// How this model's outputs become its answers (see [`answer`]).
    pub fn answer_rule(&self) -> AnswerRule {
        AnswerRule::for_task(&self.task)
    }

    /// Tokenizes `sequence` with the truncation this model was trained with.
    pub fn encode(&self, sequence: &str) -> crate::tokenize::Encoded {
        self.base
            .tokenizer
            .encode(sequence, self.task.max_residues, self.task.truncate)
    }

    /// Location logits [B, C]; `rng` enables dropout (training).
    pub fn forward(
        &self,
        batch: &TokenBatch,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        Ok(self.forward_all(batch, rng)?.logits)
    }

    /// The head of a single model (fine-tuning trains one).
    pub fn head(&self) -> candle_core::Result<&Head> {
        match self.heads.as_slice() {
            [head] => Ok(head),
            heads => candle_core::bail!(
                "this is an ensemble of {} heads, not a single model",
                heads.len()
            ),
        }
    }

    /// Every output of the head (location logits and, if present, membrane logits) of a
    /// single model, for training.
    pub fn forward_all(
        &self,
        batch: &TokenBatch,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<HeadOutput> {
        let head = self.head()?;
        let hidden =
            self.base
                .encoder
                .forward(&batch.ids, &batch.attention_mask, rng.as_deref_mut())?;
        head.forward(&hidden, &batch.residue_mask, rng)
    }

    /// Class probabilities [B, C] (inference): softmax, or per-location sigmoids for a
    /// multi-label model (an ensemble's: its members' mean).
    pub fn predict_proba(&self, batch: &TokenBatch) -> candle_core::Result<Tensor> {
        Ok(self.inference_probabilities(batch)?.location)
    }

    /// Location probabilities of one head from its logits, as this model's task defines them.
    pub fn probabilities(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        if self.task.multi_label {
            candle_nn::ops::sigmoid(logits)
        } else {
            ops::softmax_last_dim(logits)
        }
    }

    /// Probabilities of a tokenized batch (inference): the encoder runs once, then every head.
    /// Runs on detached views of the weights: ops on trainable variables record their
    /// inputs, which would keep every activation of the forward pass alive until its end
    /// (gigabytes for long proteins).
    pub fn inference_probabilities(
        &self,
        batch: &TokenBatch,
    ) -> candle_core::Result<BatchProbabilities> {
        let encoder = self.base.encoder.detached();
        let hidden = encoder.forward(&batch.ids, &batch.attention_mask, None)?;
        self.hidden_probabilities(&hidden, &batch.residue_mask, 0..self.members())
    }

    /// Probabilities from the encoder's output (`hidden` [B, T, H] with special tokens,
    /// `residue_mask` [B, T]; see [`Head::forward`]) for the heads `members`.
    pub fn hidden_probabilities(
        &self,
        hidden: &Tensor,
        residue_mask: &Tensor,
        members: std::ops::Range<usize>,
    ) -> candle_core::Result<BatchProbabilities> {
        self.members_combined(members, |h| h.forward(hidden, residue_mask, None))
    }

    /// Probabilities from cached per-residue rows (`x` [B, L, H], `mask` [B, L]; see
    /// [`Head::forward_residues`]) for the heads `members` (all of them: `0..self.members()`).
    pub fn residue_probabilities(
        &self,
        x: &Tensor,
        mask: &Tensor,
        members: std::ops::Range<usize>,
    ) -> candle_core::Result<BatchProbabilities> {
        self.members_combined(members, |h| h.forward_residues(x, mask, None))
    }

    /// `forward` of each head in `members` (detached: inference), combined.
    fn members_combined(
        &self,
        members: std::ops::Range<usize>,
        forward: impl Fn(&Head) -> candle_core::Result<HeadOutput>,
    ) -> candle_core::Result<BatchProbabilities> {
        let outputs = self.heads[members]
            .iter()
            .map(|h| forward(&h.detached()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.combine(&outputs)
    }

    /// The one place head outputs become probabilities: each head's location probabilities
    /// ([`Self::probabilities`]) and P(membrane) (softmax of its membrane logits), averaged
    /// over the heads (an ensemble's members; a single head's are returned as they are).
    pub fn combine(&self, outputs: &[HeadOutput]) -> candle_core::Result<BatchProbabilities> {
        let mean = |ts: Vec<Tensor>| -> candle_core::Result<Tensor> {
            match ts.len() {
                0 => candle_core::bail!("no head outputs to combine"),
                1 => Ok(ts.into_iter().next().expect("one")),
                _ => Tensor::stack(&ts, 0)?.mean(0),
            }
        };
        let location = outputs
            .iter()
            .map(|o| self.probabilities(&o.logits))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let membrane = outputs
            .iter()
            .map(|o| {
                o.membrane
                    .as_ref()
                    .map(|m| ops::softmax_last_dim(m)?.narrow(1, 1, 1)?.squeeze(1))
                    .transpose()
            })
            .collect::<candle_core::Result<Option<Vec<_>>>>()?;
        Ok(BatchProbabilities {
            location: mean(location)?,
            membrane: membrane.map(mean).transpose()?,
            logits: mean(outputs.iter().map(|o| o.logits.clone()).collect())?,
        })
    }

    /// Loads a run directory written by `protloc train`, for inference ([`Purpose::Inference`]:
    /// it can be saved again, not trained further). Same as [`Self::open`] without a base.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::open(dir, None, device)
    }

    /// Loads any model `protloc` reads (see [`import`](super::import)) for inference: a run
    /// directory, a transformers `*ForSequenceClassification` directory, or the reference
    /// workflow's `model.pth` on the encoder `base`.
    pub fn open(model: &Path, base: Option<&str>, device: &Device) -> Result<Self> {
        let Resolved {
            files,
            task,
            origin,
        } = import::resolve(model, base)?;
        let n = task.ensemble;
        if n == 0 || !(task.members.is_empty() || task.members.len() == n) {
            bail!(
                "{}: invalid ensemble ({n} heads, {} member records)",
                files.config.display(),
                task.members.len()
            );
        }
        if let Some(th) = task
            .thresholds
            .as_ref()
            .filter(|t| t.len() != task.labels.len())
        {
            bail!(
                "{}: {} multi-label thresholds for {} labels",
                files.config.display(),
                th.len(),
                task.labels.len()
            );
        }
        let (cfg, tokenizer, store, encoder) = load_encoder(&files, 0, device, Purpose::Inference)?;
        let tokenizer = if task.keep_rare_residues {
            tokenizer.keeping_rare_residues()
        } else {
            tokenizer
        };
        let spec = task.head_spec(&cfg)?;
        let heads = (0..n)
            .map(|k| Head::new(&member_builder(store.strict(), k, n), spec.clone()))
            .collect::<candle_core::Result<Vec<_>>>()
            .with_context(|| match &origin {
                import::Origin::Run => format!("{}: incomplete head", files.weights.display()),
                import::Origin::Transformers(arch) => format!(
                    "{}: not the classifier of a transformers {arch}",
                    files.weights.display()
                ),
                import::Origin::Reference => format!(
                    "{}: not the reference workflow's ProteinClassifier state_dict (bert.* and \
                     classifier.1.* over {} classes)",
                    files.weights.display(),
                    task.labels.len()
                ),
            })?;
        store.release_source();
        let base = BaseModel {
            cfg,
            tokenizer,
            store,
            encoder,
            source: model.display().to_string(),
        };
        Ok(Self { base, heads, task })
    }

    /// With LoRA adapters, also writes them alone (`adapter_model.safetensors`: the
    /// `*.lora_A.weight` / `*.lora_B.weight` tensors, plus the head's) and
    /// `adapter_config.json` (PEFT's field names: `r`, `lora_alpha`, `target_modules`, ...):
    /// a few MB that rebuild this model on top of its base encoder. `model.safetensors`
    /// already holds the adapters merged in.
    fn save_adapters(&self, dir: &Path) -> Result<()> {
        let (mut tensors, scales) = self.base.store.adapter_tensors();
        if tensors.is_empty() {
            return Ok(());
        }
        let all = self.base.store.tensors();
        tensors.extend(all.into_iter().filter(|(n, _)| is_head_param(n)));
        let mut modules: Vec<&str> = scales
            .keys()
            .filter_map(|p| p.split(".encoder.layer.").nth(1))
            .filter_map(|rest| rest.split_once('.').map(|(_, path)| path))
            .collect();
        modules.sort();
        modules.dedup();
        let rank = tensors
            .iter()
            .find(|(n, _)| n.ends_with(".lora_A.weight"))
            .map(|(_, t)| t.dim(0))
            .transpose()?
            .unwrap_or(0);
        let scale = scales.values().next().copied().unwrap_or(1.0);
        let config = serde_json::json!({
            "peft_type": "LORA",
            "base_model_name_or_path": self.task.base_model,
            "r": rank,
            "lora_alpha": scale * rank as f64,
            "target_modules": modules,
            "adapted_layers": scales.keys().collect::<Vec<_>>(),
            "bias": "none",
            "merged_into": "model.safetensors",
        });
        crate::artifacts::write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        crate::artifacts::save_safetensors_atomic(&dir.join("adapter_model.safetensors"), &tensors)
    }

    /// Writes `config.json`, `vocab.txt` and `model.safetensors` into `dir` atomically (every
    /// head of an ensemble; see the module docs).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut config = serde_json::to_value(&self.base.cfg)?;
        let obj = config.as_object_mut().context("config is an object")?;
        let id2label: serde_json::Map<String, serde_json::Value> = self
            .task
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.clone().into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = self
            .task
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i.into()))
            .collect();
        obj.insert(
            "architectures".into(),
            serde_json::json!(["ProtlocForSequenceClassification"]),
        );
        obj.insert("num_labels".into(), self.task.labels.len().into());
        obj.insert("id2label".into(), id2label.into());
        obj.insert("label2id".into(), label2id.into());
        obj.insert("protloc".into(), serde_json::to_value(&self.task)?);
        crate::artifacts::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        crate::artifacts::write_atomic(
            &dir.join("vocab.txt"),
            self.base.tokenizer.to_vocab_txt().as_bytes(),
        )?;
        crate::artifacts::save_safetensors_atomic(
            &dir.join("model.safetensors"),
            &self.base.store.merged_tensors()?,
        )?;
        self.save_adapters(dir)?;
        // A stale .bin from an earlier run would be ignored (safetensors wins), but remove it
        // so the directory is unambiguous.
        let _ = std::fs::remove_file(dir.join("pytorch_model.bin"));
        Ok(())
    }
}

/// The builder of member `k`'s head (of `n`) under `root`.
fn member_builder(root: params::Builder, k: usize, n: usize) -> params::Builder {
    match member_prefix(k, n) {
        Some(p) => root.pp(p),
        None => root,
    }
}
