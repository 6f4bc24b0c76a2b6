//! Finding and reading checkpoints: local Hugging Face model directories, hub model ids
//! (through the `hf-hub` cache), `model.safetensors` or PyTorch `pytorch_model.bin`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use super::config::{Arch, EncoderConfig, RawEncoderConfig};

/// A resolved model directory (local, or a hub snapshot in the HF cache).
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub vocab: PathBuf,
    pub weights: PathBuf,
}

/// Files a model directory may hold, in order of preference.
const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// Resolves `spec` to model files: an existing directory is used as is; otherwise a hub id
/// like `Rostlab/prot_bert_bfd` is looked up in the HF cache and downloaded when online.
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    resolve_with(spec, None)
}

/// Like [`resolve`]; with `weights` given, those are the model's weights and only the
/// config and vocabulary are taken from `spec` (a reference `model.pth` on its base encoder).
pub fn resolve_with(spec: &str, weights: Option<&Path>) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_dir() {
        return from_dir_with(path, weights);
    }
    if path.exists() {
        bail!("{spec}: expected a model directory (config.json, vocab.txt, model.safetensors or pytorch_model.bin), found a file");
    }
    if !looks_like_hub_id(spec) {
        bail!("{spec}: no such model directory (and not a Hugging Face model id like 'Rostlab/prot_bert_bfd')");
    }
    from_hub(spec, weights)
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != ".."
                && *p != "."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// A local model directory. Symlinked files are allowed only if they stay inside the
/// directory tree the user pointed at (HF cache snapshots link into `../../blobs`, so the
/// cache root is accepted as well).
pub fn from_dir(dir: &Path) -> Result<ModelFiles> {
    from_dir_with(dir, None)
}

/// [`from_dir`], with the weights taken from `weights` when given.
fn from_dir_with(dir: &Path, weights: Option<&Path>) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    let vocab = dir.join("vocab.txt");
    for f in [&config, &vocab] {
        if !f.is_file() {
            bail!(
                "{}: missing {} (a model directory needs config.json, vocab.txt and weights)",
                dir.display(),
                f.file_name().unwrap_or_default().to_string_lossy()
            );
        }
    }
    for f in [&config, &vocab] {
        check_inside(dir, f)?;
    }
    let weights = match weights {
        Some(w) => w.to_path_buf(),
        None => {
            let w = WEIGHT_FILES
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{}: no weights found (looked for {})",
                        dir.display(),
                        WEIGHT_FILES.join(", ")
                    )
                })?;
            check_inside(dir, &w)?;
            w
        }
    };
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config,
        vocab,
        weights,
    })
}

/// Refuses model files that are symlinks resolving outside the model directory, except into
/// the Hugging Face cache (whose snapshots link to `../../blobs`).
fn check_inside(dir: &Path, file: &Path) -> Result<()> {
    let is_link = std::fs::symlink_metadata(file)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false);
    if !is_link {
        return Ok(());
    }
    let target = file
        .canonicalize()
        .with_context(|| format!("{}: dangling symlink", file.display()))?;
    let dir = dir.canonicalize()?;
    let cache = hf_hub::Cache::from_env().path().canonicalize().ok();
    let allowed = target.starts_with(&dir) || cache.is_some_and(|c| target.starts_with(c));
    if !allowed {
        bail!(
            "{}: symlink points outside the model directory (to {}); refusing to load it",
            file.display(),
            target.display()
        );
    }
    Ok(())
}

fn from_hub(id: &str, given_weights: Option<&Path>) -> Result<ModelFiles> {
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1")
        .unwrap_or(false);
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    let cached = |f: &str| repo.get(f);
    // Fully cached: no network needed.
    if let (Some(config), Some(vocab)) = (cached("config.json"), cached("vocab.txt")) {
        let weights = match given_weights {
            Some(w) => Some(w.to_path_buf()),
            None => WEIGHT_FILES.iter().find_map(|f| cached(f)),
        };
        if let Some(weights) = weights {
            let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
            return Ok(ModelFiles {
                dir,
                config,
                vocab,
                weights,
            });
        }
    }
    if offline {
        bail!("{id}: not in the Hugging Face cache ({}) and HF_HUB_OFFLINE=1; download it on a machine with internet access or pass a local model directory", cache.path().display());
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("cannot start the Hugging Face hub client")?;
    let api_repo = api.model(id.to_string());
    let fetch = |f: &str| {
        api_repo.get(f).with_context(|| {
            format!("{id}: could not download {f} from the Hugging Face hub (offline? wrong id?); alternatively pass a local model directory")
        })
    };
    let config = fetch("config.json")?;
    let vocab = fetch("vocab.txt")?;
    let weights = match (given_weights, api_repo.get("model.safetensors")) {
        (Some(w), _) => w.to_path_buf(),
        (None, Ok(p)) => p,
        (None, Err(_)) => fetch("pytorch_model.bin")?,
    };
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(ModelFiles {
        dir,
        config,
        vocab,
        weights,
    })
}

/// Reads and validates `config.json`.
pub fn read_config(path: &Path) -> Result<EncoderConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let raw: RawEncoderConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid BERT/ESM config.json", path.display()))?;
    EncoderConfig::try_from(raw).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Reads all tensors of a weight file (f32 on `device`), with names normalised to the
/// `<arch prefix>.<HF BertModel/EsmModel name>` form: the `bert.`/`esm.` prefix is added
/// when the file lacks it, and old `gamma`/`beta` LayerNorm names become `weight`/`bias`.
pub fn read_weights(path: &Path, arch: Arch, device: &Device) -> Result<HashMap<String, Tensor>> {
    let raw: Vec<(String, Tensor)> = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => read_safetensors_mmap(path, device)
            .with_context(|| format!("{}: not a readable safetensors file", path.display()))?,
        _ => candle_core::pickle::read_all(path)
            .with_context(|| format!("{}: not a readable PyTorch checkpoint", path.display()))?,
    };
    if raw.is_empty() {
        bail!("{}: contains no tensors", path.display());
    }
    let prefix = format!("{}.", arch.prefix());
    let has_prefix = raw.iter().any(|(k, _)| k.starts_with(&prefix));
    let mut out = HashMap::with_capacity(raw.len());
    for (name, t) in raw {
        let name = rename_legacy(&name);
        let name = if has_prefix || is_head_tensor(&name) {
            name
        } else {
            format!("{prefix}{name}")
        };
        let t = t.to_device(device)?.to_dtype(candle_core::DType::F32)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// All tensors of a safetensors file, read through a memory map: each tensor is copied
/// once from the mapped file into its own buffer, so peak memory is the weights plus one
/// tensor in flight, not the whole file read into memory plus the weights (half the peak of
/// `safetensors::load` for a ProtBERT-sized checkpoint). The page cache keeps a second
/// load of the same file fast.
fn read_safetensors_mmap(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    // SAFETY: the file is mapped read-only for the duration of this function; a concurrent
    // writer truncating it could fault, the usual caveat of mmap that every safetensors
    // loader accepts (model files are written atomically by this tool).
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path)? };
    let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let t = st.load(&name, device)?;
            Ok((name, t))
        })
        .collect()
}

/// Task-head tensors stored at the top level of HF task models and run directories (not
/// part of the encoder).
fn is_head_tensor(name: &str) -> bool {
    super::task::is_head_param(name) || ["cls.", "lm_head."].iter().any(|p| name.starts_with(p))
}

fn rename_legacy(name: &str) -> String {
    if let Some(stem) = name.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = name.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised_and_path_tricks_are_not() {
        assert!(looks_like_hub_id("Rostlab/prot_bert_bfd"));
        assert!(looks_like_hub_id("facebook/esm2_t6_8M_UR50D"));
        assert!(!looks_like_hub_id("../etc"));
        assert!(!looks_like_hub_id("a/../b"));
        assert!(!looks_like_hub_id("single"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn legacy_names_are_renamed() {
        assert_eq!(
            rename_legacy("bert.embeddings.LayerNorm.gamma"),
            "bert.embeddings.LayerNorm.weight"
        );
        assert_eq!(rename_legacy("x.beta"), "x.bias");
        assert_eq!(rename_legacy("x.weight"), "x.weight");
    }
}
