//! `protloc predict` and `protloc embed`: stream proteins from a file in chunks, so memory
//! stays constant however large the input.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::output::{Format, Prediction, PredictionWriter};
use super::{head_outputs, mean_embeddings, BatchLimits};
use crate::data::{self, fasta::FastaStream, DataError, ReadOptions, Record};
use crate::model::{self, SequenceClassifier};
use crate::tokenize::{Encoded, Truncation};

/// Proteins read and processed per chunk. Within a chunk, batches are length-sorted.
pub const CHUNK: usize = 2048;

/// Iterates over the records of a FASTA (streamed) or CSV/TSV (read whole) file.
pub fn record_source(
    path: &Path,
    skip_invalid: bool,
) -> Result<Box<dyn Iterator<Item = Result<Record, DataError>>>> {
    if data::table::TableKind::from_path(path).is_some() {
        let ds = data::read_dataset(
            path,
            ReadOptions {
                skip_invalid,
                require_labels: false,
                multi_label: true,
            },
        )?;
        for s in &ds.skipped {
            tracing::warn!("skipped: {s}");
        }
        return Ok(Box::new(ds.records.into_iter().map(Ok)));
    }
    let stream = FastaStream::open(path)?;
    if skip_invalid {
        Ok(Box::new(stream.filter(|r| {
            let invalid = matches!(r, Err(DataError::Invalid { .. }));
            if let (true, Err(e)) = (invalid, r) {
                tracing::warn!("skipped: {e}");
            }
            !invalid
        })))
    } else {
        Ok(Box::new(stream))
    }
}

/// Calls `f` with consecutive chunks of at most `CHUNK` records.
pub(crate) fn for_each_chunk(
    source: impl Iterator<Item = Result<Record, DataError>>,
    mut f: impl FnMut(&[Record]) -> Result<()>,
) -> Result<usize> {
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut total = 0;
    for rec in source {
        chunk.push(rec?);
        if chunk.len() == CHUNK {
            f(&chunk)?;
            total += chunk.len();
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        f(&chunk)?;
        total += chunk.len();
    }
    Ok(total)
}

pub struct PredictArgs {
    pub model: PathBuf,
    /// Where to run the model.
    pub device: crate::device::DeviceSpec,
    /// The encoder of a reference `model.pth` given as `model` (see
    /// [`crate::model::import`]); `None` for a directory.
    pub base: Option<String>,
    pub input: PathBuf,
    pub output: Option<PathBuf>,
    pub format: Option<Format>,
    pub limit: Option<usize>,
    pub limits: BatchLimits,
    pub skip_invalid: bool,
    /// Only records `k` with `k % N == I` (see [`super::shard`]).
    pub shard: Option<super::shard::Shard>,
}

/// Predicts the location of every protein in `args.input`; returns how many.
pub fn predict(args: &PredictArgs) -> Result<usize> {
    let device = args.device.resolve_here()?;
    let model = SequenceClassifier::open(&args.model, args.base.as_deref(), &device)?;
    let format = args.format.unwrap_or_else(|| {
        args.output
            .as_deref()
            .map_or(Format::Tsv, Format::from_path)
    });
    let source = record_source(&args.input, args.skip_invalid)?;
    // `--limit` applies to the input, then the shard takes its share of it.
    let limited = source.take(args.limit.unwrap_or(usize::MAX));
    let source: Box<dyn Iterator<Item = _>> = match args.shard {
        Some(shard) => Box::new(
            limited
                .enumerate()
                .filter(move |(k, _)| shard.contains(*k))
                .map(|(_, r)| r),
        ),
        None => Box::new(limited),
    };
    let labels = model.task.labels.clone();
    let rule = model.answer_rule();
    let pb = crate::progress::bar(0, "predicting", "proteins");
    let n = crate::artifacts::with_output(args.output.as_deref(), |out| {
        let mut writer = PredictionWriter::new(out, format, &labels, model.task.membrane)?;
        let n = for_each_chunk(source, |chunk| {
            pb.inc_length(chunk.len() as u64);
            let enc: Vec<Encoded> = chunk.iter().map(|r| model.encode(&r.sequence)).collect();
            let answers = head_outputs(&model, &enc, args.limits, Some(&pb))?.into_answers(&rule);
            for ((rec, e), a) in chunk.iter().zip(&enc).zip(&answers) {
                writer.write(&Prediction::of(
                    &rec.id,
                    &labels,
                    a,
                    e.total_residues,
                    e.used_residues,
                ))?;
            }
            Ok(())
        })?;
        writer.finish()?;
        Ok(n)
    })?;
    pb.finish_and_clear();
    Ok(n)
}

pub struct EmbedArgs {
    pub model: String,
    /// Where to run the encoder.
    pub device: crate::device::DeviceSpec,
    pub input: PathBuf,
    pub output: Option<PathBuf>,
    pub truncate: Truncation,
    pub max_residues: Option<usize>,
    pub limit: Option<usize>,
    pub limits: BatchLimits,
    pub skip_invalid: bool,
}

/// Writes one JSON line `{"id", "length", "residues_used", "embedding"}` per protein: the
/// mean of the final hidden states over residue tokens (the ProtTrans convention).
pub fn embed(args: &EmbedArgs) -> Result<usize> {
    let device = args.device.resolve_here()?;
    let base = model::load_base(&args.model, 0, &device, model::Purpose::Inference)
        .with_context(|| format!("cannot load model {}", args.model))?;
    let max_res = super::effective_max_residues(&base.cfg, args.max_residues)?;
    let source = record_source(&args.input, args.skip_invalid)?;
    let pb = crate::progress::bar(0, "embedding", "proteins");
    let n = crate::artifacts::with_output(args.output.as_deref(), |out| {
        let source = source.take(args.limit.unwrap_or(usize::MAX));
        for_each_chunk(source, |chunk| {
            pb.inc_length(chunk.len() as u64);
            let enc: Vec<Encoded> = chunk
                .iter()
                .map(|r| base.tokenizer.encode(&r.sequence, max_res, args.truncate))
                .collect();
            let emb = mean_embeddings(
                &base.encoder,
                base.tokenizer.pad_id,
                base.store.device(),
                &enc,
                args.limits,
                Some(&pb),
            )?;
            for ((rec, e), v) in chunk.iter().zip(&enc).zip(&emb) {
                let line = serde_json::json!({
                    "id": rec.id,
                    "length": e.total_residues,
                    "residues_used": e.used_residues,
                    "embedding": v,
                });
                writeln!(out, "{line}")?;
            }
            Ok(())
        })
    })?;
    pb.finish_and_clear();
    Ok(n)
}
