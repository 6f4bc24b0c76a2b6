//! `protloc import` and `protloc export`: models fine-tuned by other tools in, models for
//! other tools out.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Args;

use crate::model::SequenceClassifier;

#[derive(Args, Debug)]
pub struct ImportCmd {
    /// A transformers BertForSequenceClassification / EsmForSequenceClassification
    /// directory, or the reference workflow's model.pth (with --base).
    pub model: PathBuf,
    /// The encoder a model.pth was fine-tuned from: a directory with its config.json and
    /// vocab.txt, or a hub id (e.g. Rostlab/prot_bert_bfd_localization).
    #[arg(long, value_name = "DIR|HUB_ID")]
    pub base: Option<String>,
    /// Run directory to write (config.json, vocab.txt, model.safetensors).
    #[arg(long)]
    pub output: PathBuf,
}

pub fn import(c: ImportCmd) -> Result<()> {
    let model = SequenceClassifier::open(&c.model, c.base.as_deref(), &Device::Cpu)?;
    model.save(&c.output)?;
    eprintln!(
        "imported {} ({} head, labels: {}) into {}",
        c.model.display(),
        model.task.head.name(),
        model.task.labels.join(", "),
        c.output.display()
    );
    Ok(())
}
