//! Writing run artifacts atomically: a reader (or a crash) never sees a half-written file.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;

/// Writes `bytes` to `path` via a temporary file in the same directory, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Like [`write_atomic`], with the content produced by `fill`.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".protloc-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    fill(tmp.as_file_mut()).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot move the new file into place at {}", path.display()))?;
    Ok(())
}

/// Saves tensors as safetensors, atomically.
pub fn save_safetensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let bytes = safetensors_bytes(tensors)?;
    write_atomic(path, &bytes)
}

/// Serialises tensors (sorted by name) in the safetensors format.
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let data: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|n| Ok((n.clone(), tensors[n].contiguous()?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::tensor::serialize(data, None)?)
}

/// Appends one JSON line to `path` (metrics logs), flushing it to disk.
pub fn append_json_line(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{value}")?;
    f.sync_data()?;
    Ok(())
}

/// Runs `f` on the command's output: `path` written atomically at the end, or stdout.
pub fn with_output<T>(
    output: Option<&Path>,
    f: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<T> {
    match output {
        None => {
            let stdout = std::io::stdout();
            let mut lock = std::io::BufWriter::new(stdout.lock());
            let r = f(&mut lock)?;
            lock.flush()?;
            Ok(r)
        }
        Some(path) => {
            let mut result = None;
            crate::artifacts::write_atomic_with(path, |file| {
                let mut w = std::io::BufWriter::new(file);
                result = Some(f(&mut w)?);
                w.flush()?;
                Ok(())
            })?;
            Ok(result.expect("set by the closure"))
        }
    }
}
