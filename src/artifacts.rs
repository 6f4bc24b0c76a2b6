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
    let dir = parent_dir(path);
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

/// Like [`write_atomic`], for writers that need a path rather than a file (image encoders
/// pick the format from the extension): `render` writes the temporary file at the path it is
/// given, whose name ends in `suffix`. The result gets the usual 0644 permissions (temporary
/// files are created private), as images are for sharing.
pub fn write_atomic_path(
    path: &Path,
    suffix: &str,
    render: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".protloc-tmp-").suffix(suffix);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let tmp = builder
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    render(tmp.path())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot move the new file into place at {}", path.display()))?;
    Ok(())
}

/// Creates the directory `path` atomically: `fill` writes its files into a temporary
/// directory beside it (fsync each one, e.g. with [`write_synced`]), which is then renamed
/// to `path`, replacing an older one, and the rename made durable. A crash leaves either the
/// whole directory or none of it.
pub fn write_atomic_dir(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_dir(path);
    let tmp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempdir_in(parent)
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;
    fill(tmp.path())?;
    if path.exists() {
        std::fs::remove_dir_all(path)?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to a new file at `path` and fsyncs it (for files inside a directory that
/// [`write_atomic_dir`] moves into place).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The directory a file at `path` goes into (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
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
