//! Crash-safe training checkpoints.
//!
//! `RUN_DIR/checkpoints/step-00000042/` holds everything needed to continue a run as if it
//! had never stopped: `model.safetensors` (all parameters), `optimizer.safetensors` (AdamW
//! moments), and `state.json` (optimizer step, loop position, RNG states, running losses,
//! history, and a CRC32 of each file). A checkpoint is written into a temporary directory,
//! every file fsynced, and renamed into place, so a crash leaves either the whole
//! checkpoint or none of it; loading verifies the checksums and falls back to the previous
//! checkpoint when the latest is damaged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::EpochMetrics;
use crate::artifacts::write_synced;
use crate::dist::Collective;

/// A ChaCha8 generator's exact position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RngState {
    seed: [u8; 32],
    stream: u64,
    /// `u128` as a string: JSON numbers cannot hold it exactly everywhere.
    word_pos: String,
}

impl RngState {
    pub fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().context("corrupt RNG position")?);
        Ok(rng)
    }
}

/// Where the training loop is, and what it has accumulated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoopState {
    /// Current epoch (1-based).
    pub epoch: usize,
    /// Batches of the current epoch already consumed.
    pub next_batch: usize,
    /// Optimizer steps taken.
    pub step: usize,
    /// The shuffling RNG as it was at the start of the current epoch (the epoch's batch
    /// order is recomputed from it on resume).
    pub epoch_rng: RngState,
    pub dropout_rng: RngState,
    /// Data-parallel runs: each rank's dropout-RNG word position (rank r draws from stream
    /// r of `dropout_rng`'s seed), so a resumed run continues every rank's stream.
    #[serde(default)]
    pub rank_dropout_pos: Vec<String>,
    pub loss_sum: f64,
    pub loss_n: usize,
    /// Consecutive optimizer steps skipped for non-finite loss or gradients.
    pub bad_steps: usize,
    pub history: Vec<EpochMetrics>,
    /// (validation accuracy, -validation loss, epoch) of the best epoch so far.
    pub best: Option<(f64, f64, usize)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    adam_step: u64,
    state: LoopState,
    /// CRC32 of each data file in the checkpoint.
    checksums: HashMap<String, u32>,
}

const FORMAT: u32 = 1;
const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub adam_step: u64,
    pub state: LoopState,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("step", &self.state.step)
            .finish()
    }
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint atomically and keeps only the newest `keep_last`.
pub fn save(
    run_dir: &Path,
    state: &LoopState,
    adam_step: u64,
    model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let final_dir = root.join(step_dir_name(state.step));
    crate::artifacts::write_atomic_dir(&final_dir, |tmp| {
        let mut checksums = HashMap::new();
        for (name, tensors) in [(MODEL, model), (OPTIMIZER, optimizer)] {
            let bytes = crate::artifacts::safetensors_bytes(tensors)?;
            checksums.insert(name.to_string(), crc32fast::hash(&bytes));
            write_synced(&tmp.join(name), &bytes)?;
        }
        let file = StateFile {
            format: FORMAT,
            adam_step,
            state: state.clone(),
            checksums,
        };
        write_synced(
            &tmp.join(STATE),
            serde_json::to_string_pretty(&file)?.as_bytes(),
        )
    })?;
    prune(&root, keep_last)?;
    Ok(final_dir)
}

/// Checkpoint directories, newest first.
fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    if !root.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    Ok(out)
}

fn prune(root: &Path, keep_last: usize) -> Result<()> {
    for (_, dir) in list(root)?.into_iter().skip(keep_last.max(1)) {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

fn load_one(dir: &Path) -> Result<Checkpoint> {
    let text = std::fs::read_to_string(dir.join(STATE)).context("state.json unreadable")?;
    let file: StateFile = serde_json::from_str(&text).context("state.json is not valid")?;
    if file.format != FORMAT {
        bail!("unsupported checkpoint format {}", file.format);
    }
    let mut tensors = Vec::new();
    for name in [MODEL, OPTIMIZER] {
        let bytes = std::fs::read(dir.join(name)).with_context(|| format!("{name} unreadable"))?;
        let want = file
            .checksums
            .get(name)
            .with_context(|| format!("no checksum for {name}"))?;
        let got = crc32fast::hash(&bytes);
        if got != *want {
            bail!("{name} is damaged (CRC32 {got:08x}, expected {want:08x})");
        }
        tensors.push(candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?);
    }
    let optimizer = tensors.pop().expect("two files");
    let model = tensors.pop().expect("two files");
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        adam_step: file.adam_step,
        state: file.state,
        model,
        optimizer,
    })
}

/// The newest intact checkpoint of a run, warning about each damaged one skipped.
pub fn load_latest(run_dir: &Path) -> Result<Checkpoint> {
    let root = checkpoints_dir(run_dir);
    let all = list(&root)?;
    if all.is_empty() {
        bail!(
            "{}: no checkpoints to resume from (train with --save-every-steps N)",
            root.display()
        );
    }
    for (_, dir) in &all {
        match load_one(dir) {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(
                    "checkpoint {} is corrupt ({e:#}); falling back to the previous one",
                    dir.display()
                );
            }
        }
    }
    bail!(
        "{}: every checkpoint is damaged; cannot resume",
        root.display()
    )
}

/// This rank's dropout RNG: rank r draws from stream r of the run's dropout seed, so ranks
/// do not drop the same units (rank 0's stream is the single-process one).
pub(super) fn rank_dropout_rng(st: &LoopState, rank: usize, world: usize) -> Result<ChaCha8Rng> {
    let mut rng = st.dropout_rng.restore()?;
    if world > 1 && rank > 0 {
        rng.set_stream(rank as u64);
        let pos: u128 = match st.rank_dropout_pos.get(rank) {
            Some(p) => p.parse().context("corrupt dropout RNG position")?,
            // Fresh run: start of the stream. A checkpoint of a data-parallel run always
            // has every rank's position.
            None if st.step == 0 && st.next_batch == 0 => 0,
            None => bail!("the checkpoint lacks rank {rank}'s dropout RNG position"),
        };
        rng.set_word_pos(pos);
    }
    Ok(rng)
}

/// Every rank's RNG word position, gathered through a sum of disjoint 32-bit limbs (exact
/// in f64).
pub(super) fn gather_word_pos(comm: &dyn Collective, rng: &ChaCha8Rng) -> Result<Vec<String>> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let mut buf = vec![0f64; 4 * world];
    let pos = rng.get_word_pos();
    for k in 0..4 {
        buf[4 * rank + k] = ((pos >> (32 * k)) & 0xffff_ffff) as f64;
    }
    comm.all_reduce_sum_f64(&mut buf)?;
    Ok((0..world)
        .map(|r| {
            (0..4)
                .map(|k| (buf[4 * r + k] as u128) << (32 * k))
                .sum::<u128>()
                .to_string()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rng_state_round_trips_mid_stream() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..37 {
            rng.random::<u32>();
        }
        let mut restored = RngState::of(&rng).restore().unwrap();
        let a: Vec<u64> = (0..10).map(|_| rng.random()).collect();
        let b: Vec<u64> = (0..10).map(|_| restored.random()).collect();
        assert_eq!(a, b);
    }
}
