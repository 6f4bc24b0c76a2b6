//! `embed --per-residue`: filling the cache from a sequence file.

use std::path::Path;

use anyhow::{Context, Result};

use super::{CacheSpec, EmbeddingCache};
use crate::infer::predict;

/// `embed --per-residue`: adds every protein of the input to the per-residue embedding cache
/// in `dir` (see [`super`]). Returns (proteins in the cache, newly embedded).
pub fn embed_to_cache(args: &predict::EmbedArgs, dir: &Path) -> Result<(usize, usize)> {
    let base = crate::model::load_base(
        &args.model,
        0,
        &args.device.resolve_here()?,
        crate::model::Purpose::Inference,
    )
    .with_context(|| format!("cannot load model {}", args.model))?;
    let max_res = crate::infer::effective_max_residues(&base.cfg, args.max_residues)?;
    let spec = CacheSpec::for_model(&base, max_res, args.truncate)?;
    let mut cache = EmbeddingCache::open(dir, spec)?;
    let source = predict::record_source(&args.input, args.skip_invalid)?;
    let pb = crate::progress::bar(0, "embedding", "proteins");
    let mut new = 0;
    let source = source.take(args.limit.unwrap_or(usize::MAX));
    predict::for_each_chunk(source, |chunk| {
        let seqs: Vec<&str> = chunk.iter().map(|r| r.sequence.as_str()).collect();
        let todo = seqs.iter().filter(|s| !cache.contains(s)).count() as u64;
        pb.inc_length(todo);
        new += cache.fill(&base, &seqs, args.limits, Some(&pb))?;
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok((cache.len(), new))
}
