//! Subcommand definitions (clap derive) and their handlers.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::data::{self, stats::DatasetStats, ReadOptions};
use crate::device::DeviceSpec;
use crate::eval::run::{EvalArgs, Split};
use crate::infer::output::Format;
use crate::infer::predict::{EmbedArgs, PredictArgs};
use crate::infer::BatchLimits;
use crate::tokenize::Truncation;
use crate::train::observe::{
    Embedding, MemberRestored, MemberStart, Phase, Resumed, StartingPoint,
};
use crate::train::{EpochMetrics, TrainObserver, TrainOptions};

/// Fine-tune protein language models (ProtBERT, ESM-2) to predict where in the cell a
/// protein lives, evaluate them, and predict from FASTA.
#[derive(Parser, Debug)]
#[command(
    name = "protloc",
    version,
    propagate_version = true,
    after_help = "Start with `protloc demo` (no downloads); see README.md for real ProtBERT/ESM-2 weights and DeepLoc data."
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). PROTLOC_LOG overrides (tracing filter syntax).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Compute threads (default: all cores).
    #[arg(long, global = true, env = "PROTLOC_THREADS")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Inspect data sets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Fine-tune a model on labelled proteins (DeepLoc FASTA or id,sequence,label CSV/TSV).
    Train(Box<TrainCmd>),
    /// Score a trained model: accuracy (Q10), MCC, per-class P/R/F1, confusion matrix.
    Eval(EvalCmd),
    /// Compare two models scored by `eval --output` on the same proteins: the difference in
    /// accuracy and MCC with a 95% paired-bootstrap interval, and McNemar's exact test.
    Compare(CompareCmd),
    /// Predict the location of every protein in a FASTA/CSV/TSV file (streams; any size).
    Predict(PredictCmd),
    /// Write per-protein mean embeddings of an encoder as JSON Lines.
    Embed(EmbedCmd),
    /// Write a self-contained HTML report (training curves, confusion matrix, per-class F1,
    /// metric tables) and its PNG plots for a run directory.
    Report(ReportCmd),
    /// Join the outputs of `predict --shard I/N` (given in shard order) into the unsharded
    /// output.
    Merge(MergeCmd),
    /// Serve predictions over HTTP (/invocations, /v1/predict, /ping, /metrics, ...), with
    /// dynamic batching. Stops gracefully on SIGTERM or Ctrl-C.
    Serve(ServeCmd),
    /// Turn a model fine-tuned elsewhere (a transformers *ForSequenceClassification
    /// directory, or the reference workflow's model.pth with --base) into a run directory.
    /// `eval`, `predict` and `serve` also read such models directly.
    Import(super::interop::ImportCmd),
    /// Write a model as a Hugging Face directory that transformers loads
    /// (AutoModelForSequenceClassification), with protloc's outputs for checking it.
    Export(super::interop::ExportCmd),
    /// Train, evaluate and predict on a built-in synthetic data set in a few minutes, with no
    /// downloads: a tour of the whole workflow.
    Demo(DemoCmd),
    /// Check a GPU against the CPU on one model: hidden states, logits, every gradient and a
    /// few training steps must agree (and time a training step on the device).
    CheckDevice(super::device::CheckDeviceCmd),
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Counts per split, location and membrane flag, and a length summary.
    Stats(StatsCmd),
}

#[derive(Args, Debug)]
pub struct StatsCmd {
    /// DeepLoc FASTA, plain FASTA, or CSV/TSV with id,sequence[,label] columns.
    pub file: PathBuf,
    /// Also write a sequence-length histogram (PNG).
    #[arg(long, value_name = "PNG")]
    pub plot: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Count and report invalid records instead of failing on the first.
    #[arg(long)]
    pub skip_invalid: bool,
}

#[derive(Args, Debug)]
pub struct TrainCmd {
    /// Base model: a Hugging Face model directory, a hub id (e.g. Rostlab/prot_bert_bfd), or
    /// scratch:tiny|small|base|protbert for a ProtBERT-style BERT from random initialisation
    /// (protbert: ProtBERT's own shape), or scratch:DIR for the architecture of the model
    /// directory DIR with random weights.
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<String>,
    /// Labelled data: DeepLoc FASTA (`>ID Location-M [test]`) or CSV/TSV (id,sequence,label).
    #[arg(long, required_unless_present = "resume")]
    pub data: Option<PathBuf>,
    /// Run directory to write (config.json, vocab.txt, model.safetensors, metrics.jsonl).
    #[arg(long, required_unless_present = "resume")]
    pub output: Option<PathBuf>,
    /// Continue an interrupted run from its newest intact checkpoint, with the settings it
    /// was started with (all other options are ignored). An ensemble on cached embeddings
    /// (--frozen --ensemble N, --folds N) keeps its finished members instead and trains the
    /// rest.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["model", "data", "output"])]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub options: TrainOptions,
    /// Transport between processes when started by a launcher (mpirun, srun, torchrun-style
    /// RANK/WORLD_SIZE); --batch-size is then per process. Ignored in a single process.
    #[arg(long, value_enum, default_value_t = crate::dist::Backend::Auto, env = "PROTLOC_DIST_BACKEND")]
    pub dist_backend: crate::dist::Backend,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Args, Debug)]
pub struct EvalCmd {
    /// Model: a run directory (`protloc train`, `protloc import`), a transformers
    /// BertForSequenceClassification / EsmForSequenceClassification directory, or the
    /// reference workflow's model.pth (with --base).
    #[arg(long)]
    pub model: PathBuf,
    /// The encoder a reference model.pth was fine-tuned from: a directory with its
    /// config.json and vocab.txt, or a hub id (e.g. Rostlab/prot_bert_bfd_localization).
    #[arg(long, value_name = "DIR|HUB_ID")]
    pub base: Option<String>,
    /// Labelled data (DeepLoc FASTA or CSV/TSV).
    #[arg(long)]
    pub data: PathBuf,
    /// Records to score: auto = the `test`-tagged ones when the file has any, else all;
    /// validation = those the model validated on while training (its split.tsv).
    #[arg(long, value_enum, default_value_t = Split::Auto)]
    pub split: Split,
    /// Write the full report as JSON.
    #[arg(long, value_name = "JSON")]
    pub output: Option<PathBuf>,
    /// Write the confusion matrix as a PNG heat map.
    #[arg(long, value_name = "PNG")]
    pub plot: Option<PathBuf>,
    /// Score only the first N records of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub limits: BatchLimits,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Skip (and log) invalid records instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Per-residue embedding cache (see `embed --per-residue`) to read, and fill with
    /// missing proteins, instead of running the encoder: for models trained with --frozen.
    /// A cache built with another encoder is refused (rebuilt) by its fingerprint.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CompareCmd {
    /// The `eval --output` report of model A (the baseline).
    #[arg(value_name = "A_JSON")]
    pub a: PathBuf,
    /// The `eval --output` report of model B, scored on the same data and split.
    #[arg(value_name = "B_JSON")]
    pub b: PathBuf,
    /// Also write the comparison as JSON.
    #[arg(long, value_name = "JSON")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ReportCmd {
    /// Run directory written by `protloc train`.
    pub run_dir: PathBuf,
    /// Evaluate the model on this labelled file first (else a previous `report --data`
    /// evaluation, RUN_DIR/report/eval.json, is reused when present).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Records to score with --data.
    #[arg(long, value_enum, default_value_t = Split::Auto)]
    pub split: Split,
    /// Embedding cache for --frozen models (see `eval --cache`).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Output directory (default RUN_DIR/report).
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub limits: BatchLimits,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// `--device`, shared by every command that runs a model.
#[derive(Args, Debug, Clone, Copy)]
pub struct DeviceArg {
    /// Where the model runs: auto (a GPU when this binary was built with `--features cuda`
    /// and one is present, else the CPU), cpu, cuda (under a launcher: the GPU of the local
    /// rank) or cuda:N.
    #[arg(long, value_name = "auto|cpu|cuda[:N]", default_value_t = DeviceSpec::Auto, env = "PROTLOC_DEVICE")]
    pub device: DeviceSpec,
}

#[derive(Args, Debug)]
pub struct PredictCmd {
    /// Model: a run directory (`protloc train`, `protloc import`), a transformers
    /// BertForSequenceClassification / EsmForSequenceClassification directory, or the
    /// reference workflow's model.pth (with --base).
    #[arg(long)]
    pub model: PathBuf,
    /// The encoder a reference model.pth was fine-tuned from: a directory with its
    /// config.json and vocab.txt, or a hub id (e.g. Rostlab/prot_bert_bfd_localization).
    #[arg(long, value_name = "DIR|HUB_ID")]
    pub base: Option<String>,
    /// FASTA (any headers) or CSV/TSV with id,sequence columns.
    #[arg(long)]
    pub input: PathBuf,
    /// Output file (written atomically); default stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Output format (default: from the output's extension, else TSV).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Predict only the first N proteins.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub limits: BatchLimits,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Process only shard I of N (0-based): records k with k % N == I, counted after
    /// --limit. Join shard outputs with `protloc merge`.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::infer::shard::Shard>,
    /// Skip (and log) invalid records instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,
}

#[derive(Args, Debug)]
pub struct EmbedCmd {
    /// Encoder: model directory, hub id, or a run directory.
    #[arg(long)]
    pub model: String,
    /// FASTA or CSV/TSV with id,sequence columns.
    #[arg(long)]
    pub input: PathBuf,
    /// JSON Lines output of mean embeddings (written atomically); default stdout.
    #[arg(long, conflicts_with = "per_residue")]
    pub output: Option<PathBuf>,
    /// Store per-residue embeddings (f16, memory-mapped shards) in the cache directory
    /// --cache instead of writing mean embeddings. Resumable: proteins already cached for
    /// this encoder and truncation are skipped. `protloc train --frozen --cache DIR` trains
    /// heads on the cache.
    #[arg(long, requires = "cache")]
    pub per_residue: bool,
    /// Embedding cache directory (see --per-residue).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Which residues of longer proteins to keep.
    #[arg(long, value_enum, default_value_t = Truncation::HeadTail)]
    pub truncate: Truncation,
    /// Residues kept per protein (default: 510, or less when the model's positions allow
    /// fewer). ESM-2 allows 1022: frozen heads are more accurate with it, at about twice
    /// the cache (docs/usage.md). `train --cache` must be given the same limit.
    #[arg(long)]
    pub max_residues: Option<usize>,
    /// Embed only the first N proteins.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub limits: BatchLimits,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Skip (and log) invalid records instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,
}

#[derive(Args, Debug)]
pub struct ServeCmd {
    /// Model: a run directory (`protloc train`, `protloc import`), a transformers
    /// BertForSequenceClassification / EsmForSequenceClassification directory, or the
    /// reference workflow's model.pth (with --base).
    #[arg(long, env = "PROTLOC_MODEL")]
    pub model: PathBuf,
    /// The encoder a reference model.pth was fine-tuned from: a directory with its
    /// config.json and vocab.txt, or a hub id (e.g. Rostlab/prot_bert_bfd_localization).
    #[arg(long, value_name = "DIR|HUB_ID", env = "PROTLOC_BASE")]
    pub base: Option<String>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1", env = "PROTLOC_HOST")]
    pub host: String,
    /// Port (0 picks a free one).
    #[arg(long, default_value_t = 8080, env = "PROTLOC_PORT")]
    pub port: u16,
    // Batching, queue, request-size and time limits (defaults in `serve::Limits`).
    #[command(flatten)]
    pub limits: crate::serve::Limits,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Truncation of long proteins (default: the policy the model was trained with).
    #[arg(long, value_enum)]
    pub truncate: Option<Truncation>,
    /// Reject proteins longer than the model's budget (422) instead of truncating them.
    #[arg(long, conflicts_with = "truncate")]
    pub no_truncate: bool,
    /// Require `Authorization: Bearer KEY` on the prediction routes.
    #[arg(long, env = "PROTLOC_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Threads of the async HTTP runtime.
    #[arg(long, default_value_t = 2)]
    pub http_threads: usize,
}

#[derive(Args, Debug)]
pub struct MergeCmd {
    /// Shard outputs, in shard order 0..N-1.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
    /// Output file (written atomically); default stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Format of the shard files (default: from the first shard's extension). TSV/CSV
    /// headers are checked and written once.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

#[derive(Args, Debug)]
pub struct DemoCmd {
    /// Where to write the demo's data, model and reports.
    #[arg(long, default_value = "protloc-demo")]
    pub output: PathBuf,
    /// Training epochs.
    #[arg(long, default_value_t = 15)]
    pub epochs: usize,
    /// Synthetic proteins per location.
    #[arg(long, default_value_t = 80)]
    pub per_class: usize,
    /// Random seed of the synthetic data and of training.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        // Read by candle's GEMM and by rayon when their pools start.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Several ranks on one node: share the cores instead of each taking all of them.
        let local = crate::dist::local_ranks(|k| std::env::var(k).ok()).filter(|&n| n > 1);
        if let Some(n) = local {
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            std::env::set_var("RAYON_NUM_THREADS", (cores / n).max(1).to_string());
        }
    }
    match cli.command {
        Command::Data(DataCommand::Stats(c)) => data_stats(c),
        Command::Train(c) => train(*c),
        Command::Eval(c) => eval(c),
        Command::Compare(c) => compare(c),
        Command::Report(c) => report(c),
        Command::Predict(c) => predict(c),
        Command::Embed(c) => embed(c),
        Command::Merge(c) => {
            let format = c.format.unwrap_or_else(|| Format::from_path(&c.shards[0]));
            let n = crate::infer::shard::merge(
                &c.shards,
                c.output.as_deref(),
                format != Format::Jsonl,
            )?;
            if let Some(p) = &c.output {
                eprintln!("merged {n} records into {}", p.display());
            }
            Ok(())
        }
        Command::Serve(c) => serve(c),
        Command::Import(c) => super::interop::import(c),
        Command::Export(c) => super::interop::export(c),
        Command::CheckDevice(c) => super::device::run(c),
        Command::Demo(c) => super::demo::run(&super::demo::DemoArgs {
            output: c.output,
            epochs: c.epochs,
            per_class: c.per_class,
            seed: c.seed,
        }),
    }
}

fn data_stats(c: StatsCmd) -> Result<()> {
    let ds = data::read_dataset(
        &c.file,
        ReadOptions {
            skip_invalid: c.skip_invalid,
            require_labels: false,
            multi_label: true,
        },
    )?;
    let stats = DatasetStats::compute(&ds.records);
    if c.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        println!("{stats}");
    }
    if !ds.skipped.is_empty() {
        eprintln!("skipped {} invalid records:", ds.skipped.len());
        for s in ds.skipped.iter().take(20) {
            eprintln!("  {s}");
        }
    }
    if let Some(png) = c.plot {
        data::stats::plot_length_histogram(&ds.records, &png)?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}

/// What `protloc train` shows while it runs: the reference workflow's metric lines and each
/// ensemble member's start on stdout, the resume point and the embedding cache on stderr.
/// The library calls it on the root rank only, so under MPI one copy is printed.
pub(super) struct PrintObserver;

impl TrainObserver for PrintObserver {
    fn on_epoch(&mut self, metrics: &EpochMetrics) {
        for line in metrics.reference_lines() {
            println!("{line}");
        }
    }

    fn on_start(&mut self, start: &StartingPoint) {
        println!("{start}");
    }

    fn on_resume(&mut self, resumed: &Resumed<'_>) {
        eprintln!("{resumed}");
    }

    fn on_embedding(&mut self, embedding: &Embedding<'_>) {
        eprintln!("{embedding}");
    }

    fn on_phase(&mut self, phase: &Phase<'_>) {
        println!("{phase}");
    }

    fn on_member(&mut self, member: &MemberStart) {
        println!("{member}");
    }

    fn on_member_restored(&mut self, restored: &MemberRestored<'_>) {
        println!("{restored}");
    }
}

fn train(c: TrainCmd) -> Result<()> {
    let comm = crate::dist::init(c.dist_backend)?;
    match train_on(c, comm.as_ref()) {
        Err(e) if comm.world_size() > 1 => {
            // Returning would finalize this rank while the others wait for it in the next
            // collective: end the whole job instead, after saying why.
            eprintln!("error (rank {} of {}): {e}", comm.rank(), comm.world_size());
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            comm.abort(1)
        }
        r => r,
    }
}

fn train_on(c: TrainCmd, comm: &dyn crate::dist::Collective) -> Result<()> {
    if let Some(run_dir) = c.resume {
        let summary =
            crate::train::resume_observed(&run_dir, c.device.device, comm, &mut PrintObserver)?;
        if !comm.is_root() {
            return Ok(());
        }
        crate::train::plot_curves(&run_dir, &summary)?;
        eprintln!(
            "finished {} steps; {} saved in {}",
            summary.steps,
            saved_epoch(summary.best_epoch),
            run_dir.display()
        );
        return Ok(());
    }
    let (Some(model), Some(data), Some(output)) = (c.model, c.data, c.output) else {
        anyhow::bail!("--model, --data and --output are required (or --resume RUN_DIR)");
    };
    let mut args = c.options.resolve(&model, data, output);
    args.device = c.device.device;
    let summary = crate::train::train_observed(&args, comm, &mut PrintObserver)?;
    if !comm.is_root() {
        return Ok(());
    }
    crate::train::plot_curves(&args.output, &summary)?;
    if !summary.members.is_empty() {
        print_members(&summary, &args.output);
        return Ok(());
    }
    eprintln!(
        "trained {} of {} parameters for {} steps on {} proteins ({} validation); {} saved to {}",
        summary.trainable_parameters,
        summary.total_parameters,
        summary.steps,
        summary.train_records,
        summary.val_records,
        saved_epoch(summary.best_epoch),
        args.output.display()
    );
    Ok(())
}

/// What a finished run saved: its best epoch, or the starting model (`--init-head`, epoch 0)
/// when no epoch validated better.
fn saved_epoch(best_epoch: usize) -> String {
    if best_epoch == 0 {
        "no epoch beat the starting model on validation, so it was".into()
    } else {
        format!("best epoch {best_epoch}")
    }
}

/// One line per ensemble member (its own validation split, never the test set), then the
/// ensemble's.
fn print_members(summary: &crate::train::TrainSummary, output: &std::path::Path) {
    let n = summary.members.len();
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for (k, m) in summary.members.iter().enumerate() {
        let held_out = match m.holdout_partition {
            Some(p) => format!("partition {p}"),
            None => format!("seed {}", m.seed),
        };
        eprintln!(
            "member {k}: best epoch {}, validation accuracy {} (loss {}) on {} proteins ({held_out}), trained on {}",
            m.best_epoch,
            opt(m.val_accuracy),
            opt(m.val_loss),
            m.val_records,
            m.train_records
        );
    }
    let accs: Vec<f64> = summary
        .members
        .iter()
        .filter_map(|m| m.val_accuracy)
        .collect();
    let mean = (!accs.is_empty()).then(|| accs.iter().sum::<f64>() / accs.len() as f64);
    eprintln!(
        "trained an ensemble of {n} heads ({} parameters each, {} in all with the encoder) for {} steps; mean member validation accuracy {} (each on its own split); saved to {}",
        summary.trainable_parameters,
        summary.total_parameters,
        summary.steps,
        opt(mean),
        output.display()
    );
}

fn report(c: ReportCmd) -> Result<()> {
    let out_dir = c.output.unwrap_or_else(|| c.run_dir.join("report"));
    let eval_path = out_dir.join("eval.json");
    let eval = match &c.data {
        Some(data) => {
            let e = crate::eval::run::evaluate(&EvalArgs {
                model: c.run_dir.clone(),
                device: c.device.device,
                base: None,
                data: data.clone(),
                split: c.split,
                limit: None,
                limits: c.limits,
                skip_invalid: false,
                cache: c.cache.clone(),
            })?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("cannot create {}", out_dir.display()))?;
            crate::artifacts::write_atomic(
                &eval_path,
                serde_json::to_string_pretty(&e)?.as_bytes(),
            )?;
            Some(e)
        }
        None if eval_path.is_file() => {
            let text = std::fs::read_to_string(&eval_path)?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: not an evaluation", eval_path.display()))?,
            )
        }
        None => None,
    };
    let files = crate::report::write(&c.run_dir, eval.as_ref(), &out_dir)?;
    eprintln!(
        "wrote {} ({} plots beside it)",
        files.html.display(),
        files.images.len()
    );
    Ok(())
}

fn eval(c: EvalCmd) -> Result<()> {
    let out = crate::eval::run::evaluate(&EvalArgs {
        model: c.model,
        device: c.device.device,
        base: c.base,
        data: c.data,
        split: c.split,
        limit: c.limit,
        limits: c.limits,
        skip_invalid: c.skip_invalid,
        cache: c.cache,
    })?;
    println!(
        "{} proteins from {} ({:?} split)\n",
        out.records, out.data, out.split
    );
    if let Some(r) = &out.report {
        println!("{r}");
    }
    if let Some(m) = &out.multi_label {
        println!(
            "accuracy {:.4}  Jaccard {:.4}  micro-F1 {:.4}  macro-F1 {:.4}",
            m.accuracy, m.jaccard, m.micro_f1, m.macro_f1
        );
        println!(
            "{:<24} {:>7} {:>7} {:>8} {:>9}",
            "location", "MCC", "F1", "support", "threshold"
        );
        for l in &m.per_label {
            println!(
                "{:<24} {:>7.3} {:>7.3} {:>8} {:>9.2}",
                l.label, l.mcc, l.f1, l.support, l.threshold
            );
        }
    }
    if let Some(ci) = &out.ci95 {
        println!("{}", ci.describe(&out.accuracy_name()));
    }
    if let (Some(q2), Some(n)) = (out.membrane_accuracy, out.membrane_records) {
        println!("membrane/soluble accuracy (Q2): {q2:.4} on {n} proteins with a known flag");
    }
    if let Some(path) = &c.output {
        crate::artifacts::write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    if let (Some(png), Some(report)) = (&c.plot, &out.report) {
        crate::eval::plot::plot_confusion(report, png, true)
            .with_context(|| format!("cannot write {}", png.display()))?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}

fn compare(c: CompareCmd) -> Result<()> {
    let read = |path: &PathBuf| -> Result<crate::eval::run::EvalOutput> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a report of `protloc eval --output`",
                path.display()
            )
        })
    };
    let cmp = crate::eval::compare::compare(&read(&c.a)?, &read(&c.b)?)?;
    println!("{cmp}");
    if let Some(path) = &c.output {
        crate::artifacts::write_atomic(path, serde_json::to_string_pretty(&cmp)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn predict(c: PredictCmd) -> Result<()> {
    let n = crate::infer::predict::predict(&PredictArgs {
        model: c.model,
        device: c.device.device,
        base: c.base,
        input: c.input,
        output: c.output.clone(),
        format: c.format,
        limit: c.limit,
        limits: c.limits,
        skip_invalid: c.skip_invalid,
        shard: c.shard,
    })?;
    if let Some(p) = c.output {
        eprintln!("wrote {n} predictions to {}", p.display());
    }
    Ok(())
}

fn embed(c: EmbedCmd) -> Result<()> {
    let args = EmbedArgs {
        model: c.model,
        device: c.device.device,
        input: c.input,
        output: c.output.clone(),
        truncate: c.truncate,
        max_residues: c.max_residues,
        limit: c.limit,
        limits: c.limits,
        skip_invalid: c.skip_invalid,
    };
    if let (true, Some(dir)) = (c.per_residue, &c.cache) {
        let (total, new) = crate::cache::embed_to_cache(&args, dir)?;
        eprintln!(
            "{total} proteins in the cache {} ({new} newly embedded)",
            dir.display()
        );
        return Ok(());
    }
    let n = crate::infer::predict::embed(&args)?;
    if let Some(p) = c.output {
        eprintln!("wrote {n} embeddings to {}", p.display());
    }
    Ok(())
}

fn serve(c: ServeCmd) -> Result<()> {
    let mut o = crate::serve::ServeOptions::new(c.model);
    o.base = c.base;
    o.host = c.host;
    o.port = c.port;
    o.limits = c.limits;
    o.truncate = c.truncate;
    o.no_truncate = c.no_truncate;
    o.api_key = c.api_key.filter(|k| !k.is_empty());
    o.http_threads = c.http_threads.max(1);
    o.device = c.device.device;
    crate::serve::run(o)
}
