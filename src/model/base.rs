//! Base models: a pretrained encoder (or `scratch:SIZE`) with its tokenizer and parameter
//! store, loaded for fine-tuning or for inference ([`Purpose`]).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::config::EncoderConfig;
use super::encoder::{scratch_config, Encoder};
use super::loader;
use super::params::ParamStore;
use crate::tokenize::Tokenizer;

/// An encoder ready to use or fine-tune, with its tokenizer and parameters.
pub struct BaseModel {
    pub cfg: EncoderConfig,
    pub tokenizer: Tokenizer,
    pub store: ParamStore,
    pub encoder: Encoder,
    /// Where it came from (path, hub id or `scratch:SIZE`), for provenance.
    pub source: String,
}

/// What a loaded model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Fine-tuning: every parameter is a trainable variable.
    Training,
    /// Inference only (embed, predict, eval, serve): the encoder layers' weights are frozen
    /// and column-major, which the inference GEMM reads fastest
    /// ([`ParamStore::for_inference`]). Such a model can still be saved, not trained.
    Inference,
}

fn new_store(
    source: HashMap<String, Tensor>,
    source_name: String,
    seed: u64,
    device: &Device,
    purpose: Purpose,
) -> ParamStore {
    let store = ParamStore::new(source, source_name, seed, device, DType::F32);
    match purpose {
        Purpose::Training => store,
        Purpose::Inference => store.for_inference(),
    }
}

/// Loads a base model (`scratch:SIZE`, a local HF directory or a hub id). Parameters the
/// encoder needs must all be in the checkpoint; extra tensors (pretraining heads) are ignored.
pub fn load_base(spec: &str, seed: u64, device: &Device, purpose: Purpose) -> Result<BaseModel> {
    if let Some(size) = spec.strip_prefix("scratch:") {
        // scratch:DIR: the architecture and vocabulary of a model directory, random weights.
        let dir = Path::new(size);
        let (cfg, tokenizer) = if dir.join("config.json").is_file() {
            let cfg = loader::read_config(&dir.join("config.json"))?;
            let tokenizer = Tokenizer::from_file(&dir.join("vocab.txt"))?;
            check_vocab(&cfg, &tokenizer, &dir.join("vocab.txt"))?;
            (cfg, tokenizer)
        } else {
            (scratch_config(size)?, Tokenizer::protbert_default())
        };
        let store = new_store(Default::default(), spec.into(), seed, device, purpose);
        let encoder = Encoder::new(&store.initialising(), &cfg)?;
        return Ok(BaseModel {
            cfg,
            tokenizer,
            store,
            encoder,
            source: spec.into(),
        });
    }
    let files = loader::resolve(spec)?;
    let (cfg, tokenizer, store, encoder) = load_encoder(&files, seed, device, purpose)?;
    tracing::debug!(unused = ?store.unused_source_names(), "tensors not used by the encoder");
    Ok(BaseModel {
        cfg,
        tokenizer,
        store,
        encoder,
        source: spec.into(),
    })
}

/// Reads config, vocabulary and weights of a model directory and builds its encoder; every
/// encoder tensor must be in the checkpoint. The store keeps the remaining checkpoint tensors
/// (e.g. a classifier) until `release_source`.
pub(super) fn load_encoder(
    files: &loader::ModelFiles,
    seed: u64,
    device: &Device,
    purpose: Purpose,
) -> Result<(EncoderConfig, Tokenizer, ParamStore, Encoder)> {
    let cfg = loader::read_config(&files.config)?;
    let tokenizer = Tokenizer::from_file(&files.vocab)?;
    check_vocab(&cfg, &tokenizer, &files.vocab)?;
    let arch = cfg.arch();
    let tensors = loader::read_weights(&files.weights, arch, device)?;
    let source = files.weights.display().to_string();
    let store = new_store(tensors, source, seed, device, purpose);
    let encoder = Encoder::new(&store.strict(), &cfg)?;
    Ok((cfg, tokenizer, store, encoder))
}

fn check_vocab(cfg: &EncoderConfig, tok: &Tokenizer, path: &Path) -> Result<()> {
    if tok.vocab_size() > cfg.vocab_size {
        bail!(
            "{}: {} tokens but config.json says vocab_size {}",
            path.display(),
            tok.vocab_size(),
            cfg.vocab_size
        );
    }
    Ok(())
}
