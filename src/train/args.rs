//! What `protloc train` takes: [`TrainOptions`], the options as given (clap parses them
//! straight into it), resolve into [`TrainArgs`], every setting decided, with the defaults
//! that depend on the mode (`--frozen`, `--train-top-layers`, `--lora-rank`) filled in here,
//! so library callers get the same defaults as the command line.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::objective::{ClassWeighting, MembraneMode};
use super::optim::Rule;
use crate::model::lora::{LoraConfig, LoraTarget};
use crate::model::{self, HeadKind, Pool, Precision};
use crate::tokenize::Truncation;

/// Everything `protloc train` takes. Saved as `training_args.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainArgs {
    pub model: String,
    pub data: PathBuf,
    pub output: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Learning rate of the new classifier head (defaults to `lr`).
    pub head_lr: Option<f64>,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    /// Residues kept per protein (default: what the model's positions allow).
    pub max_residues: Option<usize>,
    pub truncate: Truncation,
    pub freeze_layers: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    /// The update rule: AdamW, or LAMB as the reference workflow trains.
    #[serde(default)]
    pub optimizer: Rule,
    /// Multiply the learning rates by the number of ranks (the reference's `lr * world size`).
    #[serde(default)]
    pub scale_lr_by_world: bool,
    /// The encoder's compute precision (bf16: on a GPU, f32 master weights).
    #[serde(default)]
    pub precision: Precision,
    /// Dropout for the head; when given explicitly also overrides the encoder's dropout.
    pub dropout: Option<f64>,
    pub val_fraction: f64,
    pub seed: u64,
    pub limit: Option<usize>,
    pub max_steps: Option<usize>,
    pub pool: Pool,
    pub skip_invalid: bool,
    /// Token budget of validation batches.
    pub eval_batch_tokens: usize,
    /// Write a resumable checkpoint every N optimizer steps and at every epoch end (0 = off).
    #[serde(default)]
    pub save_every_steps: usize,
    /// Checkpoints kept (oldest are deleted).
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Stop after this many consecutive steps with a non-finite loss or gradient.
    #[serde(default = "default_max_bad_steps")]
    pub max_bad_steps: usize,
    /// Train only a head on cached embeddings of the frozen encoder (see `cache`).
    #[serde(default)]
    pub frozen: bool,
    /// Embedding cache directory for `frozen` (default: RUN_DIR/embedding_cache).
    #[serde(default)]
    pub cache: Option<PathBuf>,
    #[serde(default)]
    pub head: HeadKind,
    #[serde(default = "model::default_head_hidden")]
    pub head_hidden: usize,
    #[serde(default = "model::default_la_kernel")]
    pub la_kernel: usize,
    #[serde(default)]
    pub membrane: MembraneMode,
    #[serde(default)]
    pub class_weighting: ClassWeighting,
    /// Multi-label locations (`A|B` labels), sigmoid outputs with tuned thresholds.
    #[serde(default)]
    pub multi_label: bool,
    /// Hold out this homology partition (CSV `partition` column) as the validation set
    /// instead of a random stratified split.
    #[serde(default)]
    pub partition: Option<u32>,
    /// Train on a seeded stratified sample of this many training records (the test records
    /// are not touched; the validation split is taken from the sample).
    #[serde(default)]
    pub train_sample: Option<usize>,
    /// Heads trained on the frozen encoder and averaged at inference; member k uses seed
    /// `seed + k` for its initialisation, shuffling, dropout and validation split.
    #[serde(
        default = "default_ensemble",
        skip_serializing_if = "is_default_ensemble"
    )]
    pub ensemble: usize,
    /// An ensemble over homology partitions instead: member k validates on partition k (and
    /// trains on the others); excludes `partition` and `ensemble`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folds: Option<usize>,
    /// Processes the run was trained on (data-parallel ranks); `batch_size` is per rank.
    /// Filled in when the run starts; a resumed run must use the same number.
    #[serde(default = "default_world_size")]
    pub world_size: usize,
    /// LoRA adapters on the encoder (rank 0: none). With adapters only they and the head
    /// train; the encoder's own weights stay frozen.
    #[serde(default = "default_lora")]
    pub lora: LoraConfig,
    /// Fine-tune only the top K encoder layers (and the head) on cached states of the layers
    /// below, computed once (0 = off). See `frozen`.
    #[serde(default)]
    pub train_top_layers: usize,
    /// Continue training the classifier head `model` already has (a protloc run directory
    /// or a transformers *ForSequenceClassification directory) instead of a fresh one; its
    /// labels, head and tokenization come with it (the fields here that would choose them
    /// are ignored; `training_args.json` records the checkpoint's, see `as_run`). The
    /// starting model is validated first and is the saved model (best epoch 0) unless an
    /// epoch validates better.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init_head: bool,
    /// With `train_top_layers`: first train a fresh head for this many epochs on the frozen
    /// encoder's output (the probe, saved in `RUN/probe`), then fine-tune the top layers
    /// from it as `init_head` would (linear probing, then fine-tuning; see [`super::probe`]).
    /// 0 = off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub probe_epochs: usize,
    /// Embedding cache of the probe (the frozen encoder's output); default: `encoder-output`
    /// inside the top layers' cache directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_cache: Option<PathBuf>,
    /// Where to train (not saved: a resumed run picks its own).
    #[serde(skip)]
    pub device: crate::device::DeviceSpec,
    /// Set by [`resume`]: the checkpoint to continue from.
    #[serde(skip)]
    pub resume_from: Option<std::sync::Arc<checkpoint::Checkpoint>>,
    /// Set by [`resume`] for an ensemble on cached states: restore the members it finished
    /// (`RUN/members/`) and train the rest.
    #[serde(skip)]
    pub resume_members: bool,
}

fn default_keep_last() -> usize {
    2
}

fn default_max_bad_steps() -> usize {
    5
}

fn default_world_size() -> usize {
    1
}

fn default_lora() -> LoraConfig {
    LoraConfig {
        rank: 0,
        alpha: 1.0,
        targets: LoraTarget::ALL.to_vec(),
        from_layer: 0,
    }
}

fn default_ensemble() -> usize {
    1
}

fn is_default_ensemble(n: &usize) -> bool {
    *n == 1
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl TrainArgs {
    /// The run directory's task settings these arguments decide; the caller passes what the
    /// data decides (labels, residue limit, membrane output).
    pub fn task_config(
        &self,
        labels: Vec<String>,
        max_residues: usize,
        membrane: bool,
    ) -> model::TaskConfig {
        model::TaskConfig {
            pool: self.pool,
            truncate: self.truncate,
            max_residues,
            head_dropout: self.head_dropout(),
            head: self.head,
            head_hidden: self.head_hidden,
            la_kernel: self.la_kernel,
            membrane,
            multi_label: self.multi_label,
            ..model::TaskConfig::new(labels, &self.model)
        }
    }

    /// These arguments as the run applies them, for its `training_args.json`: with
    /// `--init-head` (`start`, the checkpoint's task) the head, its sizes, pooling,
    /// truncation and membrane output are the checkpoint's, not the defaults the run was
    /// given.
    pub(crate) fn as_run(&self, start: Option<&model::TaskConfig>) -> TrainArgs {
        let mut run = self.clone();
        if let Some(t) = start {
            run.head = t.head;
            run.head_hidden = t.head_hidden;
            run.la_kernel = t.la_kernel;
            run.pool = t.pool;
            run.truncate = t.truncate;
            run.membrane = MembraneMode::fixed(t.membrane);
        }
        run
    }

    /// Defaults that match the reference workflow where it makes sense on a CPU.
    pub fn new(model: &str, data: PathBuf, output: PathBuf) -> Self {
        Self {
            model: model.into(),
            data,
            output,
            epochs: 3,
            batch_size: 4,
            lr: 2e-5,
            head_lr: None,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            max_residues: None,
            truncate: Truncation::HeadTail,
            freeze_layers: 0,
            grad_accum: 1,
            max_grad_norm: 1.0,
            optimizer: Rule::AdamW,
            scale_lr_by_world: false,
            precision: Precision::Fp32,
            dropout: None,
            val_fraction: 0.1,
            seed: 42,
            limit: None,
            max_steps: None,
            pool: Pool::Cls,
            skip_invalid: false,
            eval_batch_tokens: 2048,
            save_every_steps: 0,
            keep_last: default_keep_last(),
            max_bad_steps: default_max_bad_steps(),
            frozen: false,
            cache: None,
            head: HeadKind::Linear,
            head_hidden: model::default_head_hidden(),
            la_kernel: model::default_la_kernel(),
            membrane: MembraneMode::Auto,
            class_weighting: ClassWeighting::None,
            multi_label: false,
            partition: None,
            train_sample: None,
            ensemble: default_ensemble(),
            folds: None,
            world_size: 1,
            lora: default_lora(),
            train_top_layers: 0,
            init_head: false,
            probe_epochs: 0,
            probe_cache: None,
            device: Default::default(),
            resume_from: None,
            resume_members: false,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            bail!("--epochs, --batch-size and --grad-accum must be at least 1");
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.lr) || self.head_lr.is_some_and(|l| !positive(l)) {
            bail!("learning rates must be positive");
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            bail!(
                "--val-fraction must be in [0, 1), got {}",
                self.val_fraction
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!(
                "--warmup-ratio must be in [0, 1], got {}",
                self.warmup_ratio
            );
        }
        if self.dropout.is_some_and(|p| !(0.0..1.0).contains(&p)) {
            bail!("--dropout must be in [0, 1)");
        }
        if self.max_residues == Some(0) {
            bail!("--max-residues must be at least 1");
        }
        if self.init_head && self.members() > 1 {
            bail!("--init-head continues one model's head: it does not combine with --ensemble or --folds");
        }
        if self.frozen && self.precision != Precision::Fp32 {
            bail!("--precision {} applies to fine-tuning the encoder; --frozen trains a head on cached fp32 embeddings: drop --precision", self.precision);
        }
        if self.frozen && self.train_top_layers > 0 {
            bail!("--frozen keeps every encoder layer fixed and --train-top-layers trains some: drop one of them");
        }
        if self.probe_epochs > 0 {
            if self.train_top_layers == 0 {
                bail!("--probe-epochs trains a head on the frozen encoder before fine-tuning the top layers: add --train-top-layers K (for a head alone use --frozen --epochs N)");
            }
            if self.init_head {
                bail!("--probe-epochs trains the head the top layers start from, and --init-head takes it from --model: drop one of them");
            }
        } else if self.probe_cache.is_some() {
            bail!("--probe-cache is the cache of --probe-epochs' head: add --probe-epochs N or drop it");
        }
        if self.lora.rank > 0 {
            if self.frozen {
                bail!("--lora-rank trains adapters inside the encoder, which --frozen keeps fixed: drop one of them");
            }
            if !positive(self.lora.alpha) {
                bail!("--lora-alpha must be positive, got {}", self.lora.alpha);
            }
            if self.lora.targets.is_empty() {
                bail!("--lora-targets needs at least one of q, k, v, o, ffn");
            }
        }
        if self.ensemble == 0 {
            bail!("--ensemble must be at least 1 (the number of heads to train and average)");
        }
        if let Some(n) = self.folds {
            if n < 2 {
                bail!("--folds must be at least 2 (one member per held-out partition; for a single model validated on partition K use --partition K)");
            }
            if self.partition.is_some() {
                bail!("--folds {n} holds out partition k for member k: it cannot be combined with --partition");
            }
            if self.ensemble > 1 {
                bail!("--folds {n} already trains {n} members (one per held-out partition): drop --ensemble");
            }
        }
        if self.members() > 1 && !self.frozen {
            bail!("--ensemble and --folds train several heads on one frozen encoder's cached embeddings: add --frozen (ensembles of fine-tuned encoders are not supported)");
        }
        if self.frozen {
            if let Some(why) = self.head.cached_rows_unsupported(self.pool) {
                bail!("--frozen: {why}");
            }
        }
        if self.head.uses_pooler() && self.pool != Pool::Cls {
            bail!(
                "--head {} always pools with a pooler on the first ([CLS]) token, as BERT \
                 does: drop --pool mean (or use --head linear with it)",
                self.head.name()
            );
        }
        Ok(())
    }

    /// Dropout of the head: `dropout` when given, else 0.25 on cached states (`--frozen`,
    /// `--train-top-layers`), else [`default_head_dropout`].
    pub fn head_dropout(&self) -> f64 {
        if self.frozen || self.train_top_layers > 0 {
            self.dropout.unwrap_or(0.25)
        } else {
            self.dropout.unwrap_or(default_head_dropout(self.head))
        }
    }

    /// The embedding cache directory: `cache`, else RUN_DIR/embedding_cache.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .clone()
            .unwrap_or_else(|| self.output.join("embedding_cache"))
    }

    /// Models the run trains: `folds`, else `ensemble`.
    pub fn members(&self) -> usize {
        self.folds.unwrap_or(self.ensemble)
    }
}

/// Head dropout when fine-tuning without `--dropout`: the reference workflow's 0.2 for its
/// head, 0.1 (BERT's own) otherwise.
pub fn default_head_dropout(head: HeadKind) -> f64 {
    match head {
        HeadKind::Reference => 0.2,
        _ => 0.1,
    }
}

/// `protloc train`'s options as given, before the defaults that depend on the mode are
/// decided (see [`TrainOptions::resolve`]). [`TrainOptions::default`] is what the command line
/// gives when no option is passed.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainOptions {
    /// Write a resumable checkpoint (weights, optimizer, RNG and data position) every N
    /// optimizer steps and at each epoch end, under RUN_DIR/checkpoints/ (0 = off).
    #[arg(long, default_value_t = 0)]
    pub save_every_steps: usize,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (each is
    /// skipped with a warning).
    #[arg(long, default_value_t = 5)]
    pub max_bad_steps: usize,
    /// Epochs (default 3; 10 with --frozen).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Proteins per batch (default 4; 32 with --frozen).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate, linear warm-up then linear decay (default 2e-5; 1e-3 with
    /// --frozen or --lora-rank).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of the new classifier head (default: --lr).
    #[arg(long)]
    pub head_lr: Option<f64>,
    /// Decoupled weight decay of the optimizer (AdamW or LAMB).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Fraction of the optimizer steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    /// Residues kept per protein (default: 510, or less when the model's positions allow
    /// fewer). ESM-2 allows 1022: frozen heads are more accurate with it, at about twice
    /// the cache (docs/usage.md).
    #[arg(long)]
    pub max_residues: Option<usize>,
    /// Which residues of longer proteins to keep.
    #[arg(long, value_enum, default_value_t = Truncation::HeadTail)]
    pub truncate: Truncation,
    /// Freeze the embeddings and the first N encoder layers.
    #[arg(long, default_value_t = 0)]
    pub freeze_layers: usize,
    /// Batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Update rule. lamb: the reference workflow's LAMB (torch_optimizer.Lamb: Adam moments
    /// without bias correction, each tensor's step scaled by its trust ratio |w| / |step|),
    /// for large global batches.
    #[arg(long, value_enum, default_value_t = Rule::AdamW)]
    pub optimizer: Rule,
    /// Multiply --lr and --head-lr by the number of processes under a launcher (the
    /// reference scales LAMB's rate by its world size).
    #[arg(long)]
    pub scale_lr_by_world: bool,
    /// Encoder compute precision. bf16: bf16 activations and matrix products on fp32 master
    /// weights, with LayerNorm, softmax and the loss in fp32 (GPUs; refused on the CPU,
    /// where it is slower).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Dropout of the head (default 0.1; 0.2 for --head reference, 0.25 with --frozen); when
    /// given, also the encoder's dropout.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Fraction of the training records held out for validation (stratified, seeded).
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Random seed: validation split, shuffling, head initialization and dropout. The same
    /// seed, data and settings train the same model, bit for bit, on the same machine and
    /// thread count.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Use only the first N records of the file (smoke tests).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Stop after N optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Pooling of token states into one vector per protein (default cls; mean with
    /// --frozen, whose cached embeddings hold residues only). --head reference always uses
    /// BERT's pooler on the first token and refuses mean.
    #[arg(long, value_enum)]
    pub pool: Option<Pool>,
    /// Skip (and log) invalid records instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Token budget of validation batches.
    #[arg(long, default_value_t = 2048)]
    pub eval_batch_tokens: usize,
    /// Keep the encoder frozen: embed every protein once into a per-residue cache (--cache)
    /// and train only the head on it. Minutes per epoch on a CPU instead of hours.
    #[arg(long)]
    pub frozen: bool,
    /// Embedding cache directory for --frozen (default RUN_DIR/embedding_cache). Reused
    /// across runs while the encoder, truncation and residue limit are unchanged.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Head architecture (reference: the reference workflow's pooler -> dropout -> linear ->
    /// tanh; not with --frozen).
    #[arg(long, value_enum, default_value_t = HeadKind::Linear)]
    pub head: HeadKind,
    /// Feed-forward width of the mlp and light-attention heads [default: 512 for mlp, 32
    /// for light-attention]
    #[arg(long, value_name = "N")]
    pub head_hidden: Option<usize>,
    /// Convolution width (residues) of the light-attention head.
    #[arg(long, default_value_t = 9)]
    pub la_kernel: usize,
    /// Train a membrane/soluble output jointly; U flags are masked out of that loss.
    /// Reported as Q2. auto: on with --frozen when the data has M/S flags, off when
    /// fine-tuning (a second task cost small fine-tuned models location accuracy).
    #[arg(long, value_enum, default_value_t = MembraneMode::Auto)]
    pub membrane: MembraneMode,
    /// Counter class imbalance in the location loss.
    #[arg(long, value_enum, default_value_t = ClassWeighting::None)]
    pub class_weighting: ClassWeighting,
    /// Multi-label locations (DeepLoc 2.0: `A|B` labels): sigmoid outputs, per-location
    /// thresholds tuned on validation.
    #[arg(long)]
    pub multi_label: bool,
    /// Validate on this homology partition (CSV `partition` column, e.g. DeepLoc 2.0's 0-4)
    /// instead of a random stratified split.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Train on a seeded, stratified sample of exactly N training records (test records untouched).
    #[arg(long, value_name = "N")]
    pub train_sample: Option<usize>,
    /// Fine-tune the top K encoder layers (and the head) on cached states of the layers below:
    /// they are computed once into the --cache (keyed by layer too), so a step costs K/L of
    /// the encoder's forward and backward. Uses the --frozen defaults (batch, epochs,
    /// dropout, pooling); --lr 1e-4 for the layers and --head-lr 1e-3 unless given. With
    /// --lora-rank, adapters on those layers train instead of their weights.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub train_top_layers: usize,
    /// Start from the classifier head --model already has (a protloc run directory, or a
    /// transformers BertForSequenceClassification / EsmForSequenceClassification directory)
    /// instead of a fresh one. Its labels (every training label must be one of them), head
    /// architecture, membrane output and tokenization come with it, so --head,
    /// --head-hidden, --la-kernel, --membrane, --pool and --truncate are refused with it
    /// (--max-residues still applies). With --train-top-layers (or --frozen) the head a
    /// --frozen run trained continues on cached states: fine-tune the top layers from the
    /// frozen optimum. The starting model is validated first (epoch 0) and saved unless an
    /// epoch beats it.
    #[arg(
        long,
        conflicts_with_all = ["head", "head_hidden", "la_kernel", "membrane", "pool", "truncate"]
    )]
    pub init_head: bool,
    /// With --train-top-layers: linear probing, then fine-tuning, in one run. First train a
    /// fresh head for N epochs on the frozen encoder's output (with --head-lr; saved as a
    /// complete model in RUN_DIR/probe), then fine-tune the top layers and that head for
    /// --epochs, as `--init-head --model RUN_DIR/probe` would. A briefly trained head is the
    /// better start: one fitted to convergence overfits once its layers train.
    #[arg(long, value_name = "N")]
    pub probe_epochs: Option<usize>,
    /// Embedding cache of the --probe-epochs head (the frozen encoder's output; e.g. the
    /// --cache of earlier --frozen runs) [default: encoder-output inside the --cache
    /// directory].
    #[arg(long, value_name = "DIR")]
    pub probe_cache: Option<PathBuf>,
    /// LoRA: train rank-R adapters on the encoder's linear layers (and the head) while its
    /// own weights stay frozen; saving merges them into the weights, so the run directory
    /// is an ordinary model. 0 = off. Adapters skip the first --freeze-layers layers.
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub lora_rank: usize,
    /// LoRA scaling: adapter outputs are multiplied by alpha / R (default: R, scale 1).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Which linear layers get adapters: q, k, v (attention projections), o (attention
    /// output), ffn (both feed-forward layers).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "q,k,v,o,ffn")]
    pub lora_targets: Vec<LoraTarget>,
    /// With --frozen: train N heads on the same embedding cache and average their
    /// probabilities in eval, predict and serve (the encoder still runs once per protein).
    /// Member k uses seed SEED+k for its initialisation, shuffling, dropout and stratified
    /// validation split, and keeps its own best epoch. One run directory holds them all.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub ensemble: usize,
    /// With --frozen: an ensemble of N heads over homology partitions (DeepLoc 2.0 trains
    /// five): member k validates (and tunes multi-label thresholds) on partition k of the
    /// CSV `partition` column and trains on all other records. Excludes --partition and
    /// --ensemble.
    #[arg(long, value_name = "N")]
    pub folds: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        /// The command line's parser with no options: one source for the defaults.
        #[derive(clap::Parser)]
        struct Parse {
            #[command(flatten)]
            options: TrainOptions,
        }
        <Parse as clap::Parser>::try_parse_from(["protloc-train"])
            .expect("every option has a default")
            .options
    }
}

/// `$to.f = $from.f;` for each field `f` listed.
macro_rules! copy_fields {
    ($to:ident <- $from:ident: $($field:ident),* $(,)?) => {
        $($to.$field = $from.$field;)*
    };
}

impl TrainOptions {
    /// Every setting of a run on `model` and `data` into `output`, with the defaults of the
    /// mode these options ask for.
    pub fn resolve(self, model: &str, data: PathBuf, output: PathBuf) -> TrainArgs {
        let c = self;
        let mut args = TrainArgs::new(model, data, output);
        args.max_bad_steps = c.max_bad_steps.max(1);
        let top = c.train_top_layers;
        // Defaults of the cached paths (--frozen, --train-top-layers) apply to both.
        let cached = c.frozen || top > 0;
        args.epochs = c.epochs.unwrap_or(if cached { 10 } else { 3 });
        args.batch_size = c.batch_size.unwrap_or(if cached { 32 } else { 4 });
        let lora = c.lora_rank > 0;
        // Adapters start at zero and hold few parameters: they need a head-like learning rate;
        // pretrained top layers a gentler one than the new head.
        args.lr = c.lr.unwrap_or(if top > 0 && !lora {
            1e-4
        } else if cached || lora {
            1e-3
        } else {
            2e-5
        });
        args.train_top_layers = top;
        args.lora = crate::model::lora::LoraConfig {
            rank: c.lora_rank,
            alpha: c.lora_alpha.unwrap_or(c.lora_rank as f64),
            targets: c.lora_targets,
            from_layer: 0,
        };
        args.head_lr = c.head_lr.or((top > 0 && !lora).then_some(1e-3));
        args.probe_epochs = c.probe_epochs.unwrap_or(0);
        args.head_hidden = c.head_hidden.unwrap_or(c.head.default_hidden());
        args.pool = c
            .pool
            .unwrap_or(if cached { Pool::Mean } else { Pool::Cls });
        // The options that are the setting as they are.
        copy_fields!(args <- c:
            save_every_steps, keep_last, init_head, weight_decay, warmup_ratio,
            max_residues, truncate, freeze_layers, grad_accum, max_grad_norm, optimizer, precision,
            scale_lr_by_world, dropout, val_fraction, seed, limit, max_steps,
            skip_invalid, eval_batch_tokens, frozen, cache, head,
            la_kernel, membrane, class_weighting, multi_label, partition, train_sample,
            ensemble, folds, probe_cache
        );
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(options: TrainOptions) -> TrainArgs {
        options.resolve("scratch:tiny", "data.fasta".into(), "run".into())
    }

    #[test]
    fn fine_tuning_defaults_match_train_args_new() {
        let a = resolve(TrainOptions::default());
        let b = TrainArgs::new("scratch:tiny", "data.fasta".into(), "run".into());
        // Everything but LoRA's alpha, which the options set to the rank (0 when off).
        let json = |mut args: TrainArgs| {
            args.lora.alpha = 0.0;
            serde_json::to_value(args).unwrap()
        };
        assert_eq!(json(a.clone()), json(b));
        assert_eq!(a.lora.alpha, 0.0);
        assert_eq!(a.head_dropout(), 0.1);
    }

    #[test]
    fn cached_and_lora_defaults() {
        let frozen = resolve(TrainOptions {
            frozen: true,
            ..TrainOptions::default()
        });
        assert_eq!(
            (frozen.epochs, frozen.batch_size, frozen.lr, frozen.pool),
            (10, 32, 1e-3, Pool::Mean)
        );
        assert_eq!(frozen.head_dropout(), 0.25);
        let top = resolve(TrainOptions {
            train_top_layers: 1,
            ..TrainOptions::default()
        });
        assert_eq!((top.lr, top.head_lr), (1e-4, Some(1e-3)));
        assert_eq!((top.epochs, top.batch_size, top.pool), (10, 32, Pool::Mean));
        let lora = resolve(TrainOptions {
            lora_rank: 8,
            ..TrainOptions::default()
        });
        assert_eq!((lora.lr, lora.head_lr, lora.lora.alpha), (1e-3, None, 8.0));
        let reference = resolve(TrainOptions {
            head: HeadKind::Reference,
            ..TrainOptions::default()
        });
        assert_eq!(reference.head_dropout(), 0.2);
    }

    #[test]
    fn head_width_defaults_by_head_and_yields_to_the_option() {
        let width = |head, head_hidden| {
            resolve(TrainOptions {
                frozen: true,
                head,
                head_hidden,
                ..TrainOptions::default()
            })
            .head_hidden
        };
        assert_eq!(width(HeadKind::Mlp, None), 512);
        assert_eq!(width(HeadKind::LightAttention, None), 32);
        assert_eq!(width(HeadKind::Mlp, Some(64)), 64);
        assert_eq!(width(HeadKind::LightAttention, Some(128)), 128);
    }
}
