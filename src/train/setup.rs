//! Setting up a run's model and examples: which encoder weights train (frozen layers, LoRA
//! adapters), the encoded proteins and their targets, the label set, the membrane output.

use anyhow::{bail, Context, Result};

use super::objective::{MembraneMode, Target};
use super::{effective_max_residues, TrainArgs};
use crate::data::{self, Record};
use crate::model::{self, lora::LoraConfig};
use crate::tokenize::{Encoded, Truncation};

/// Whether to train the membrane output: as asked, or (auto) for a frozen encoder when any
/// target has a flag. Auto leaves it off when fine-tuning: sharing a small encoder's
/// gradient (and its clipping budget) with a second task cost location accuracy there (the
/// demo's tiny BERT fell from 73.8% to 60.0% with it on), while heads on frozen embeddings
/// lose nothing.
pub(crate) fn resolve_membrane(mode: MembraneMode, targets: &[Target], frozen: bool) -> bool {
    match mode {
        MembraneMode::On => true,
        MembraneMode::Off => false,
        MembraneMode::Auto => frozen && targets.iter().any(|t| t.membrane.is_some()),
    }
}

/// Encoded proteins and their class indices, kept apart so the encodings can be handed to
/// batched inference as they are.
pub(super) struct Examples {
    pub(super) enc: Vec<Encoded>,
    pub(super) targets: Vec<Target>,
}

impl Examples {
    pub(super) fn len(&self) -> usize {
        self.enc.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.enc.is_empty()
    }

    /// Every `world`-th example starting at `rank` (a rank's share of validation).
    pub(super) fn shard(&self, rank: usize, world: usize) -> Examples {
        let keep = |i: &usize| i % world == rank;
        Examples {
            enc: (0..self.len())
                .filter(keep)
                .map(|i| self.enc[i].clone())
                .collect(),
            targets: (0..self.len())
                .filter(keep)
                .map(|i| self.targets[i].clone())
                .collect(),
        }
    }
}

/// Labels used for class indices: the ten DeepLoc locations, in their canonical order.
pub fn default_labels() -> Vec<String> {
    data::DEEPLOC_LOCATIONS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

pub(super) fn encode_examples(
    model: &model::BaseModel,
    records: &[&Record],
    labels: &[String],
    max_res: usize,
    policy: Truncation,
    multi_label: bool,
) -> Result<Examples> {
    let (enc, targets) = records
        .iter()
        .map(|r| {
            let target = Target::of(r, labels, multi_label)?;
            Ok((model.tokenizer.encode(&r.sequence, max_res, policy), target))
        })
        .collect::<Result<(Vec<_>, Vec<_>)>>()?;
    Ok(Examples { enc, targets })
}

/// `train --init-head`: the task of the classifier `args.model` holds, as `eval` reads it.
pub(super) fn checkpoint_task(args: &TrainArgs) -> Result<model::TaskConfig> {
    let path = std::path::Path::new(&args.model);
    if !path.is_dir() {
        bail!(
            "--init-head needs --model to be a local directory with a classifier (a protloc run \
             or a transformers *ForSequenceClassification directory), not {}",
            args.model
        );
    }
    let task = model::import::resolve(path, None)
        .with_context(|| format!("--init-head: {} has no classifier head", args.model))?
        .task;
    if task.multi_label != args.multi_label {
        bail!(
            "--init-head: {} is a {} model; {} --multi-label",
            args.model,
            if task.multi_label {
                "multi-label"
            } else {
                "single-label"
            },
            if task.multi_label { "add" } else { "drop" }
        );
    }
    if let Some(why) = split_differences(args, path) {
        tracing::warn!("--init-head: {why}");
    }
    Ok(task)
}

/// With `--init-head` from a protloc run directory `dir`: the settings that choose the
/// validation split where this run's differ from those of the run that trained the head
/// (its `training_args.json`), as one sentence. Validating on proteins the head trained on
/// would make model selection meaningless. `None` when they agree or `dir` has no
/// training arguments (a transformers directory).
pub(super) fn split_differences(args: &TrainArgs, dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("training_args.json")).ok()?;
    let before: serde_json::Value = serde_json::from_str(&text).ok()?;
    let now = serde_json::to_value(args).ok()?;
    let same_data = |a: &serde_json::Value, b: &serde_json::Value| {
        let canon = |v: &serde_json::Value| {
            v.as_str()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.into()))
        };
        canon(a) == canon(b)
    };
    let differ: Vec<String> = [
        "data",
        "seed",
        "val_fraction",
        "train_sample",
        "partition",
        "limit",
    ]
    .into_iter()
    .filter_map(|key| {
        let (a, b) = (&before[key], &now[key]);
        let same = if key == "data" {
            same_data(a, b)
        } else {
            a == b
        };
        (!same).then(|| format!("{key} {a} there, {b} here"))
    })
    .collect();
    (!differ.is_empty()).then(|| {
        format!(
            "{} trained its head with another split ({}): validation may hold proteins the \
             head trained on; pass the same --data, --seed, --val-fraction, --train-sample, \
             --partition and --limit",
            dir.display(),
            differ.join(", ")
        )
    })
}

/// The task of a run that continues `task` (the classifier `--model` holds, see
/// [`checkpoint_task`]): a single model of `max_res` residues on this build, with the
/// run's `--dropout`; `frozen_encoder` when only the head trains on cached outputs.
pub(super) fn continued_task(
    mut task: model::TaskConfig,
    args: &TrainArgs,
    max_res: usize,
    frozen_encoder: bool,
) -> model::TaskConfig {
    task.base_model = args.model.clone();
    task.protloc_version = env!("CARGO_PKG_VERSION").into();
    task.max_residues = max_res;
    task.frozen_encoder = frozen_encoder;
    task.members.clear();
    if let Some(d) = args.dropout {
        task.head_dropout = d;
    }
    task
}

/// The run's labels, residue limit and truncation: the checkpoint's with `--init-head`
/// (`start`; `--max-residues` still applies, and `base` then tokenizes as it did), else the
/// DeepLoc labels and the run's options.
pub(super) fn run_tokenization(
    base: &mut model::BaseModel,
    start: Option<&model::TaskConfig>,
    args: &TrainArgs,
) -> Result<(Vec<String>, usize, Truncation)> {
    Ok(match start {
        Some(t) => {
            if t.keep_rare_residues {
                base.tokenizer = base.tokenizer.clone().keeping_rare_residues();
            }
            let max_res = match args.max_residues {
                Some(m) => effective_max_residues(&base.cfg, Some(m))?,
                None => t.max_residues,
            };
            (t.labels.clone(), max_res, t.truncate)
        }
        None => (
            default_labels(),
            effective_max_residues(&base.cfg, args.max_residues)?,
            args.truncate,
        ),
    })
}

/// Freezes the embeddings and the first `frozen_layers` encoder layers. With LoRA
/// (`lora.rank > 0`) every encoder weight is frozen instead and adapters go on the layers
/// from `frozen_layers` on; returns their configuration.
pub(crate) fn prepare_encoder(
    base: &mut model::BaseModel,
    frozen_layers: usize,
    lora: &LoraConfig,
) -> Result<Option<LoraConfig>> {
    let layers = base.cfg.num_hidden_layers;
    if frozen_layers > layers {
        bail!("{frozen_layers} layers to freeze but the model has only {layers}");
    }
    base.encoder.freeze(frozen_layers);
    if lora.rank == 0 {
        return Ok(None);
    }
    let cfg = LoraConfig {
        from_layer: frozen_layers,
        ..lora.clone()
    };
    // Adapters only: every encoder weight leaves the graph, then the adapters join it.
    base.encoder = base.encoder.detached();
    base.encoder.attach_lora(&base.store.initialising(), &cfg)?;
    tracing::info!(
        rank = cfg.rank,
        alpha = cfg.alpha,
        targets = ?cfg.targets,
        from_layer = cfg.from_layer,
        "LoRA adapters"
    );
    Ok(Some(cfg))
}

/// Whether parameter `name` trains: the head always; with LoRA the adapters; otherwise
/// every encoder parameter outside the embeddings and the first `frozen_layers` layers.
pub(crate) fn trains(name: &str, prefix: &str, frozen_layers: usize, lora: bool) -> bool {
    if model::is_head_param(name) {
        return true;
    }
    if lora {
        model::params::is_adapter(name)
    } else {
        !is_frozen(name, prefix, frozen_layers)
    }
}

/// Which parameters are frozen: embeddings and the first `n` layers.
fn is_frozen(name: &str, prefix: &str, n: usize) -> bool {
    if n == 0 {
        return false;
    }
    if name.starts_with(&format!("{prefix}.embeddings.")) {
        return true;
    }
    let layer_prefix = format!("{prefix}.encoder.layer.");
    name.strip_prefix(&layer_prefix)
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i < n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_head_names_the_split_settings_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.fasta");
        std::fs::write(&data, ">a Nucleus-S\nMKT\n").unwrap();
        let trained = super::TrainArgs::new("m", data.clone(), dir.path().join("run"));
        std::fs::write(
            dir.path().join("training_args.json"),
            serde_json::to_string(&trained).unwrap(),
        )
        .unwrap();
        let mut args = super::TrainArgs::new(
            dir.path().to_str().unwrap(),
            dir.path().join(".").join("d.fasta"),
            dir.path().join("next"),
        );
        // The same file by another path, other epochs and rates: the same split.
        args.epochs = 2;
        args.lr = 1e-4;
        assert_eq!(super::split_differences(&args, dir.path()), None);
        args.seed = 7;
        args.val_fraction = 0.2;
        let why = super::split_differences(&args, dir.path()).unwrap();
        assert!(
            why.contains("seed 42 there, 7 here") && why.contains("val_fraction"),
            "{why}"
        );
        assert!(!why.contains("data \""), "{why}");
        assert_eq!(
            super::split_differences(&args, &dir.path().join("missing")),
            None
        );
    }

    use super::*;

    #[test]
    fn frozen_parameter_names() {
        assert!(is_frozen(
            "bert.embeddings.word_embeddings.weight",
            "bert",
            2
        ));
        assert!(is_frozen(
            "bert.encoder.layer.1.output.dense.weight",
            "bert",
            2
        ));
        assert!(!is_frozen(
            "bert.encoder.layer.2.output.dense.weight",
            "bert",
            2
        ));
        assert!(!is_frozen(
            "bert.encoder.layer.10.output.dense.weight",
            "bert",
            2
        ));
        assert!(!is_frozen("classifier.weight", "bert", 2));
        assert!(!is_frozen(
            "bert.embeddings.word_embeddings.weight",
            "bert",
            0
        ));
        assert!(!is_frozen(
            "esm.encoder.emb_layer_norm_after.weight",
            "esm",
            6
        ));
    }
}
