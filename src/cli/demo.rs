//! `protloc demo`: the whole workflow on the built-in synthetic data set ([`crate::demo`]),
//! no downloads. A command, so it prints: the steps on stderr, the reports on stdout.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::commands::PrintObserver;
use crate::dist::Local;
use crate::eval::run::{EvalArgs, Split};
use crate::infer::predict::PredictArgs;
use crate::infer::BatchLimits;
use crate::model::Pool;
use crate::train::TrainArgs;

pub struct DemoArgs {
    pub output: PathBuf,
    pub epochs: usize,
    pub per_class: usize,
    pub seed: u64,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let out = &args.output;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let data = out.join("demo.fasta");
    let n = crate::demo::write_dataset(&data, args.per_class, args.seed)?;
    eprintln!(
        "1/4  wrote {n} synthetic proteins (DeepLoc format) to {}",
        data.display()
    );

    let ds = crate::data::read_dataset(&data, Default::default())?;
    println!("{}", crate::data::stats::DatasetStats::compute(&ds.records));
    crate::data::stats::plot_length_histogram(&ds.records, &out.join("lengths.png"))?;

    let run_dir = out.join("run");
    eprintln!(
        "2/4  fine-tuning a small BERT from scratch (scratch:tiny) for {} epochs ...",
        args.epochs
    );
    let mut t = TrainArgs::new("scratch:tiny", data.clone(), run_dir.clone());
    t.epochs = args.epochs;
    t.batch_size = 16;
    t.lr = 2e-3;
    t.warmup_ratio = 0.05;
    // Short inputs keep the demo fast; head-tail truncation keeps both the N-terminal
    // signals and the C-terminal motifs (KDEL, SKL, ...) of the longer proteins.
    t.max_residues = Some(96);
    t.pool = Pool::Cls;
    t.dropout = Some(0.0);
    t.seed = args.seed;
    let summary = crate::train::train_observed(&t, &Local, &mut PrintObserver)?;
    crate::train::plot_curves(&run_dir, &summary)?;

    eprintln!("3/4  evaluating on the held-out test proteins ...");
    let eval = crate::eval::run::evaluate(&EvalArgs {
        device: Default::default(),
        model: run_dir.clone(),
        base: None,
        data: data.clone(),
        split: Split::Test,
        limit: None,
        limits: BatchLimits::default(),
        skip_invalid: false,
        cache: None,
    })?;
    let report = eval
        .report
        .as_ref()
        .context("the demo model is single-label")?;
    println!("{report}");
    if let Some(q2) = eval.membrane_accuracy {
        println!("membrane/soluble accuracy (Q2): {q2:.4}");
    }
    crate::artifacts::write_atomic(
        &out.join("eval.json"),
        serde_json::to_string_pretty(&eval)?.as_bytes(),
    )?;
    crate::eval::plot::plot_confusion(report, &out.join("confusion.png"), true)?;

    eprintln!("4/4  predicting ...");
    let preds = out.join("predictions.tsv");
    crate::infer::predict::predict(&PredictArgs {
        device: Default::default(),
        model: run_dir.clone(),
        base: None,
        input: data,
        output: Some(preds.clone()),
        format: None,
        limit: None,
        limits: BatchLimits::default(),
        skip_invalid: false,
        shard: None,
    })?;
    println!(
        "\nDone. Test accuracy {:.1}% (MCC {:.3}). Files in {}:\n  demo.fasta  lengths.png  run/ (model, metrics.jsonl, training_curves.png)\n  eval.json  confusion.png  predictions.tsv",
        report.accuracy * 100.0,
        report.mcc,
        out.display()
    );
    Ok(())
}
