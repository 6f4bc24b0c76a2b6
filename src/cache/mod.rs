//! On-disk cache of per-residue embeddings from a frozen encoder.
//!
//! The frozen-encoder fast path (train a light head on embeddings that never change) spends
//! almost all of its time running the encoder; doing that once per protein and reusing the
//! result across head architectures, hyper-parameters and evaluation is what makes it
//! practical on a CPU.
//!
//! Layout of a cache directory:
//! - `shard-NNNNNN.safetensors`: one f16 tensor `embeddings` [rows, hidden], the residue rows
//!   of many proteins one after another (no special tokens, no padding). Memory-mapped on
//!   read.
//! - `manifest.json`: what produced the cache ([`CacheSpec`]), the shard list, and for every
//!   protein (keyed by a digest of its sequence) where its rows are.
//!
//! A shard is written (atomically) before the manifest that refers to it, and the manifest is
//! rewritten atomically after every shard, so an interrupted fill loses at most one shard of
//! work and the next fill resumes. A cache built with another encoder (by a fingerprint of its
//! weights), truncation policy or residue limit is stale: opening it with a different spec
//! discards it and starts over, so a head is never trained on embeddings it would not see at
//! inference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;
use serde::{Deserialize, Serialize};

mod embed;
mod outputs;

pub use embed::embed_to_cache;
pub(crate) use outputs::cached_member_outputs;
pub use outputs::cached_outputs;

use crate::infer::{self, BatchLimits};
use crate::model::BaseModel;
use crate::tokenize::{Encoded, Truncation};

const MANIFEST: &str = "manifest.json";
const FORMAT_VERSION: u32 = 1;
/// Proteins per shard: small enough that an interruption loses little work, large enough
/// that the manifest (rewritten after each shard) stays a small part of the I/O.
pub const SHARD_PROTEINS: usize = 512;

/// What the cached embeddings depend on. Two caches are interchangeable iff their specs are
/// equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// Digest of the encoder's parameters (names, shapes and values).
    pub encoder_fingerprint: String,
    pub hidden_size: usize,
    pub max_residues: usize,
    pub truncate: Truncation,
    /// `None`: the encoder's output, residue rows only (what frozen heads train on).
    /// `Some(n)`: the hidden states after the first `n` encoder layers, every token's row
    /// (special tokens included), which `train --train-top-layers` runs the remaining layers
    /// on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
}

impl CacheSpec {
    /// The spec for `model` with the given preprocessing.
    pub fn for_model(model: &BaseModel, max_residues: usize, truncate: Truncation) -> Result<Self> {
        Ok(Self {
            encoder_fingerprint: encoder_fingerprint(model)?,
            hidden_size: model.cfg.hidden_size,
            max_residues,
            truncate,
            layer: None,
        })
    }

    /// The same spec for the states after the first `layer` encoder layers (see
    /// [`Self::layer`]).
    pub fn at_layer(self, layer: usize) -> Self {
        Self {
            layer: Some(layer),
            ..self
        }
    }
}

/// CRC32 over every encoder parameter's name, shape and f32 values, in name order.
pub fn encoder_fingerprint(model: &BaseModel) -> Result<String> {
    let tensors = model.store.tensors();
    let mut names: Vec<&String> = tensors
        .keys()
        .filter(|n| !crate::model::is_head_param(n))
        .collect();
    names.sort();
    let mut h = crc32fast::Hasher::new();
    let mut count = 0usize;
    for name in names {
        let t = &tensors[name];
        h.update(name.as_bytes());
        for d in t.dims() {
            h.update(&(*d as u64).to_le_bytes());
        }
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        count += values.len();
        for v in values {
            h.update(&v.to_le_bytes());
        }
    }
    Ok(format!("crc32:{:08x}:{count}", h.finalize()))
}

pub use crate::data::sequence_key;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Entry {
    shard: usize,
    row: usize,
    len: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    spec: CacheSpec,
    shards: Vec<String>,
    entries: BTreeMap<String, Entry>,
}

/// Per-residue rows of a batch of proteins, padded: `x` [B, L, H] f32 (zeros past each
/// protein's end) and `mask` [B, L] f32 (1 on residues).
pub struct ResidueBatch {
    pub x: Tensor,
    pub mask: Tensor,
}

/// An open cache directory.
pub struct EmbeddingCache {
    dir: PathBuf,
    manifest: Manifest,
    /// Memory maps of the shards with the byte offset of their data, opened on first use.
    maps: Vec<Option<(memmap2::Mmap, usize)>>,
}

impl EmbeddingCache {
    /// Opens (or creates) the cache in `dir` for `spec`. A cache built for another spec is
    /// discarded with a warning.
    pub fn open(dir: &Path, spec: CacheSpec) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
        let path = dir.join(MANIFEST);
        let fresh = || Manifest {
            format: FORMAT_VERSION,
            spec: spec.clone(),
            shards: Vec::new(),
            entries: BTreeMap::new(),
        };
        let manifest = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let old: Manifest = serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{}: damaged cache manifest; delete the directory to rebuild",
                        path.display()
                    )
                })?;
                if old.format == FORMAT_VERSION && old.spec == spec {
                    old
                } else {
                    tracing::warn!(
                        "{}: built for another encoder or preprocessing ({:?}); discarding it",
                        dir.display(),
                        old.spec
                    );
                    for shard in &old.shards {
                        let _ = std::fs::remove_file(dir.join(shard));
                    }
                    let m = fresh();
                    write_manifest(dir, &m)?;
                    m
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let m = fresh();
                write_manifest(dir, &m)?;
                m
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let maps = (0..manifest.shards.len()).map(|_| None).collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            maps,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spec(&self) -> &CacheSpec {
        &self.manifest.spec
    }

    /// Number of proteins cached.
    pub fn len(&self) -> usize {
        self.manifest.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.entries.is_empty()
    }

    pub fn contains(&self, sequence: &str) -> bool {
        self.manifest.entries.contains_key(&sequence_key(sequence))
    }

    /// Embeds every sequence not yet cached with `model` (which must match the spec) and
    /// stores the result; returns how many were embedded. Duplicates are embedded once.
    pub fn fill(
        &mut self,
        model: &BaseModel,
        sequences: &[&str],
        limits: BatchLimits,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<usize> {
        let spec = self.manifest.spec.clone();
        if model.cfg.hidden_size != spec.hidden_size {
            bail!(
                "cache {} holds {}-dim embeddings but the model's hidden size is {}",
                self.dir.display(),
                spec.hidden_size,
                model.cfg.hidden_size
            );
        }
        let mut missing: BTreeMap<String, &str> = BTreeMap::new();
        for s in sequences {
            let key = sequence_key(s);
            if !self.manifest.entries.contains_key(&key) {
                missing.insert(key, s);
            }
        }
        let mut todo: Vec<(String, &str)> = missing.into_iter().collect();
        // Similar lengths together: token-budget batches inside a shard then pad little.
        todo.sort_by_key(|(_, s)| s.len());
        let hidden = spec.hidden_size;
        for chunk in todo.chunks(SHARD_PROTEINS) {
            let encoded: Vec<Encoded> = chunk
                .iter()
                .map(|(_, s)| model.tokenizer.encode(s, spec.max_residues, spec.truncate))
                .collect();
            let (rows, row_count): (Vec<Vec<f32>>, Vec<usize>) = match spec.layer {
                None => (
                    residue_rows(model, &encoded, limits, progress)?,
                    encoded.iter().map(|e| e.used_residues).collect(),
                ),
                Some(layer) => (
                    token_rows(model, &encoded, layer, limits, progress)?,
                    encoded.iter().map(|e| e.ids.len()).collect(),
                ),
            };
            let total_rows: usize = row_count.iter().sum();
            let mut data: Vec<f16> = Vec::with_capacity(total_rows * hidden);
            let shard_index = self.manifest.shards.len();
            let mut entries = Vec::with_capacity(chunk.len());
            for ((key, _), (&len, r)) in chunk.iter().zip(row_count.iter().zip(rows)) {
                debug_assert_eq!(r.len(), len * hidden);
                entries.push((
                    key.clone(),
                    Entry {
                        shard: shard_index,
                        row: data.len() / hidden,
                        len,
                    },
                ));
                data.extend(r.into_iter().map(f16::from_f32));
            }
            let name = format!("shard-{shard_index:06}.safetensors");
            let tensor = Tensor::from_vec(data, (total_rows, hidden), &Device::Cpu)?;
            let tensors = std::collections::HashMap::from([("embeddings".to_string(), tensor)]);
            crate::artifacts::save_safetensors_atomic(&self.dir.join(&name), &tensors)?;
            self.manifest.shards.push(name);
            self.maps.push(None);
            self.manifest.entries.extend(entries);
            write_manifest(&self.dir, &self.manifest)?;
        }
        Ok(todo.len())
    }

    /// The cached rows of one protein as f32 [len, H].
    pub fn get(&mut self, sequence: &str) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.read_into(sequence, &mut out)?;
        Ok(out)
    }

    /// Residues cached for `sequence`, if it is cached.
    fn cached_len(&self, sequence: &str) -> Option<usize> {
        self.manifest
            .entries
            .get(&sequence_key(sequence))
            .map(|e| e.len)
    }

    /// Appends the cached rows of one protein (f32, [len, H] row-major) to `out`.
    fn read_into(&mut self, sequence: &str, out: &mut Vec<f32>) -> Result<()> {
        let key = sequence_key(sequence);
        let entry = *self.manifest.entries.get(&key).with_context(|| {
            format!(
                "protein of length {} is not in the embedding cache {}",
                sequence.len(),
                self.dir.display()
            )
        })?;
        let hidden = self.manifest.spec.hidden_size;
        let dir = self.dir.display().to_string();
        let bytes = self.shard_bytes(entry.shard)?;
        let start = entry.row * hidden * 2;
        let end = start + entry.len * hidden * 2;
        let slice = bytes.get(start..end).with_context(|| {
            format!(
                "{dir}: shard {} is shorter than its manifest says; delete the cache to rebuild",
                entry.shard
            )
        })?;
        out.extend(
            slice
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        );
        Ok(())
    }

    /// A padded batch of the cached rows of `sequences` (residues, or for a cache
    /// [`at_layer`](CacheSpec::at_layer) every token, the mask then being the attention mask).
    pub fn batch(&mut self, sequences: &[&str], device: &Device) -> Result<ResidueBatch> {
        let hidden = self.manifest.spec.hidden_size;
        // Decode each protein's f16 rows straight into its slot of the padded buffer.
        let lens: Vec<usize> = sequences
            .iter()
            .map(|s| self.cached_len(s).unwrap_or(0))
            .collect();
        let lmax = lens.iter().copied().max().unwrap_or(0).max(1);
        let b = sequences.len();
        let mut x = Vec::with_capacity(b * lmax * hidden);
        let mut mask = vec![0f32; b * lmax];
        for (i, (s, &n)) in sequences.iter().zip(&lens).enumerate() {
            // Errors (naming the cache) when the protein is not cached.
            self.read_into(s, &mut x)?;
            x.resize((i + 1) * lmax * hidden, 0.0);
            mask[i * lmax..i * lmax + n].fill(1.0);
        }
        Ok(ResidueBatch {
            x: Tensor::from_vec(x, (b, lmax, hidden), device)?,
            mask: Tensor::from_vec(mask, (b, lmax), device)?,
        })
    }

    fn shard_bytes(&mut self, shard: usize) -> Result<&[u8]> {
        if self.maps[shard].is_none() {
            let path = self.dir.join(&self.manifest.shards[shard]);
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: shards are written once (atomically, by rename) and never modified in
            // place; a concurrent writer would replace the file, not change these pages.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .with_context(|| format!("{}: not a valid safetensors shard", path.display()))?;
            let view = st
                .tensor("embeddings")
                .with_context(|| format!("{}: no `embeddings` tensor", path.display()))?;
            if view.dtype() != safetensors::Dtype::F16 {
                bail!("{}: embeddings are not f16", path.display());
            }
            let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
            self.maps[shard] = Some((map, offset));
        }
        let (map, offset) = self.maps[shard].as_ref().expect("mapped above");
        Ok(&map[*offset..])
    }
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    crate::artifacts::write_atomic(&dir.join(MANIFEST), serde_json::to_string(m)?.as_bytes())
}

/// Hidden states after the first `layer` encoder layers, every token of each protein
/// (specials included), flattened [tokens * H], in input order.
pub fn token_rows(
    model: &BaseModel,
    encoded: &[Encoded],
    layer: usize,
    limits: BatchLimits,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<Vec<f32>>> {
    encoder_rows(model, encoded, Some(layer), limits, progress)
}

/// The residue mask [B, T] of a token mask [B, T] ("ones then zeros" per row): every real
/// token but the first and the last (the special tokens around the residues).
pub fn residues_of_tokens(mask: &Tensor) -> Result<Tensor> {
    let mut rows: Vec<Vec<f32>> = mask.to_vec2()?;
    for row in &mut rows {
        let n = row.iter().filter(|&&m| m > 0.0).count();
        if n > 0 {
            row[0] = 0.0;
            row[n - 1] = 0.0;
        }
    }
    let (b, t) = mask.dims2()?;
    Ok(Tensor::from_vec(rows.concat(), (b, t), mask.device())?)
}

/// Final hidden states of the residue tokens of each protein, flattened [used_residues * H],
/// in input order.
pub fn residue_rows(
    model: &BaseModel,
    encoded: &[Encoded],
    limits: BatchLimits,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<Vec<f32>>> {
    encoder_rows(model, encoded, None, limits, progress)
}

/// What a cache stores per protein: with `layer`, every token's state after that many
/// layers; without, the residue tokens' final states.
fn encoder_rows(
    model: &BaseModel,
    encoded: &[Encoded],
    layer: Option<usize>,
    limits: BatchLimits,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<Vec<f32>>> {
    let encoder = model.encoder.detached();
    let device = model.store.device().clone();
    infer::batched_rows(
        encoded,
        model.tokenizer.pad_id,
        limits,
        &device,
        progress,
        |batch| {
            let (hidden, rows, skip) = match layer {
                Some(n) => (
                    encoder.forward_until(&batch.ids, &batch.attention_mask, n, None)?,
                    &batch.attention_mask,
                    0,
                ),
                // Residues are the contiguous run of 1s after the leading special token.
                None => (
                    encoder.forward(&batch.ids, &batch.attention_mask, None)?,
                    &batch.residue_mask,
                    1,
                ),
            };
            let (b, t, h) = hidden.dims3()?;
            let flat = hidden.flatten_all()?.to_vec1::<f32>()?;
            let mask = rows.to_vec2::<f32>()?;
            Ok((0..b)
                .map(|i| {
                    let n = mask[i].iter().filter(|&&m| m > 0.0).count();
                    let start = (i * t + skip) * h;
                    flat[start..start + n * h].to_vec()
                })
                .collect())
        },
    )
}
