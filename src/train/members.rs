//! Finished ensemble members on disk. An ensemble trains its members one after another (an
//! hour or more each on a CPU for all of DeepLoc); each member's best weights and record are
//! written to `RUN/members/` as soon as it finishes, so `protloc train --resume RUN` after a
//! crash restores the finished members and trains only the rest, ending with the same model
//! an uninterrupted run saves.
//!
//! A member is finished when its record (`member-K.json`) exists: it is written after its
//! weights (`member-K.safetensors`), both atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Var;
use serde::{Deserialize, Serialize};

use super::metrics::EpochMetrics;
use super::plan::MemberPlan;
use crate::model::MemberInfo;

/// The folder of a run directory that holds its finished members.
pub const MEMBERS_DIR: &str = "members";

/// What training a member produced, and what a finished member leaves besides its weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct MemberRecord {
    pub info: MemberInfo,
    /// Its lines of `metrics.jsonl`, in order.
    pub history: Vec<EpochMetrics>,
    /// Optimizer steps it took.
    pub steps: usize,
    /// Parameters it trained.
    pub trainable: usize,
}

/// (weights, record) paths of member `k` in `run_dir`.
fn paths(run_dir: &Path, k: usize) -> (PathBuf, PathBuf) {
    let dir = run_dir.join(MEMBERS_DIR);
    (
        dir.join(format!("member-{k}.safetensors")),
        dir.join(format!("member-{k}.json")),
    )
}

/// Where member `k`'s record is (it finished when this file exists).
pub(super) fn record_path(run_dir: &Path, k: usize) -> PathBuf {
    paths(run_dir, k).1
}

/// Removes the members a previous run left in `run_dir` (a fresh run starts over).
pub(super) fn clear(run_dir: &Path) -> Result<()> {
    let dir = run_dir.join(MEMBERS_DIR);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Writes member `k`'s trained variables (by name: its head and whatever else it trained)
/// and then its record.
pub(super) fn save(
    run_dir: &Path,
    k: usize,
    vars: &[(String, Var)],
    record: &MemberRecord,
) -> Result<()> {
    let (weights, json) = paths(run_dir, k);
    let dir = run_dir.join(MEMBERS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: HashMap<String, candle_core::Tensor> = vars
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    crate::artifacts::save_safetensors_atomic(&weights, &tensors)?;
    crate::artifacts::write_atomic(&json, serde_json::to_string_pretty(record)?.as_bytes())?;
    Ok(())
}

/// Member `k`'s record, with its weights set into `vars`, if the member finished in
/// `run_dir`; `None` when it did not. The member must have been trained on `plan`'s split,
/// and its file must hold exactly `vars`, with their shapes.
pub(super) fn restore(
    run_dir: &Path,
    k: usize,
    plan: &MemberPlan,
    vars: &[(String, Var)],
) -> Result<Option<MemberRecord>> {
    let (weights, json) = paths(run_dir, k);
    let text = match std::fs::read_to_string(&json) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", json.display())),
    };
    let record: MemberRecord = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a member record", json.display()))?;
    let info = &record.info;
    if (
        info.seed,
        info.holdout_partition,
        info.train_records,
        info.val_records,
    ) != (
        plan.seed,
        plan.holdout_partition,
        plan.train.len(),
        plan.val.len(),
    ) {
        bail!(
            "{}: member {k} was trained with seed {} on {} proteins (validation {}), but the \
             run now gives it seed {} and {} ({}): the data changed since the run started",
            json.display(),
            info.seed,
            info.train_records,
            info.val_records,
            plan.seed,
            plan.train.len(),
            plan.val.len()
        );
    }
    let bytes =
        std::fs::read(&weights).with_context(|| format!("cannot read {}", weights.display()))?;
    let device = vars
        .first()
        .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &device)
        .with_context(|| format!("{}: not a safetensors file", weights.display()))?;
    for (name, var) in vars {
        let Some(t) = tensors.remove(name) else {
            bail!("{}: no tensor {name}", weights.display());
        };
        if t.dims() != var.dims() || t.dtype() != var.dtype() {
            bail!(
                "{}: {name} is {:?} {:?}, the model's is {:?} {:?}",
                weights.display(),
                t.dtype(),
                t.dims(),
                var.dtype(),
                var.dims()
            );
        }
        var.set(&t)?;
    }
    if let Some(extra) = tensors.keys().next() {
        bail!(
            "{}: holds {extra}, which member {k} does not train",
            weights.display()
        );
    }
    Ok(Some(record))
}
