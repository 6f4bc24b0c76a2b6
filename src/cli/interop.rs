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

/// What `protloc export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face directory for transformers' AutoModelForSequenceClassification.
    Hf,
    /// ONNX: made from the Hugging Face directory by optimum (see --help of --format).
    Onnx,
}

#[derive(Args, Debug)]
pub struct ExportCmd {
    /// Run directory (`protloc train`, `protloc import`), or any model `predict` reads.
    pub model: PathBuf,
    /// The encoder of a reference model.pth given as MODEL.
    #[arg(long, value_name = "DIR|HUB_ID")]
    pub base: Option<String>,
    /// hf: config.json, model.safetensors, vocab.txt, tokenizer_config.json and
    /// protloc_export.json (protloc's own outputs for sample proteins); heads without a
    /// transformers class add modeling_protloc.py (load with trust_remote_code=True).
    /// onnx: not written by protloc; export hf, then run
    /// `optimum-cli export onnx --model DIR --task text-classification OUT`.
    #[arg(long, value_enum, default_value_t = ExportFormat::Hf)]
    pub format: ExportFormat,
    /// Directory to write (replaced atomically).
    #[arg(long)]
    pub output: PathBuf,
}

pub fn export(c: ExportCmd) -> Result<()> {
    if c.format == ExportFormat::Onnx {
        anyhow::bail!(
            "protloc does not write ONNX itself: export a Hugging Face directory with \
             `protloc export {} --format hf --output DIR`, then convert it with optimum: \
             `optimum-cli export onnx --model DIR --task text-classification OUT` (add \
             --trust-remote-code when DIR has modeling_protloc.py)",
            c.model.display()
        );
    }
    let model = SequenceClassifier::open(&c.model, c.base.as_deref(), &Device::Cpu)?;
    let out = crate::model::export::export_hf(&model, &c.output)?;
    eprintln!(
        "wrote {} ({}{}): {}",
        c.output.display(),
        out.architecture,
        if out.custom_code {
            ", custom code: load with trust_remote_code=True"
        } else {
            ", transformers' own class"
        },
        out.files.join(", ")
    );
    Ok(())
}
