//! Who this process is in a multi-process launch: rank, world size and local rank, read from
//! the environment of the launcher the user already has (`mpirun`, `srun`, `torchrun`-style).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

/// Where this process sits in a multi-process launch, as the launcher told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes on this node (picks the GPU for NCCL).
    pub local_rank: usize,
    /// The variables it came from, for messages (e.g. `OMPI_COMM_WORLD_RANK/SIZE`).
    pub source: &'static str,
}

/// Launcher conventions, most specific first. `mpirun` sets its own variables per process;
/// inside a Slurm allocation the processes also inherit `SLURM_PROCID` (of the batch step
/// or of the node's daemon), and under `torchrun` inside Slurm `RANK` is the right one, so
/// Slurm's variables come last.
const CONVENTIONS: &[(&str, &str, &str, Option<&str>)] = &[
    (
        "OMPI_COMM_WORLD_RANK/SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        Some("OMPI_COMM_WORLD_LOCAL_RANK"),
    ),
    (
        "PMI_RANK/PMI_SIZE",
        "PMI_RANK",
        "PMI_SIZE",
        Some("MPI_LOCALRANKID"),
    ),
    ("RANK/WORLD_SIZE", "RANK", "WORLD_SIZE", Some("LOCAL_RANK")),
    (
        "SLURM_PROCID/SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        Some("SLURM_LOCALID"),
    ),
];

/// Reads rank and world size from launcher variables (`env` looks one up). `None` when no
/// launcher variables are set. A half-set or malformed pair is an error naming the variable,
/// never a silent single-process run.
pub fn detect_launch(env: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    let parse = |name: &str, value: String| -> Result<usize> {
        value.trim().parse::<usize>().with_context(|| {
            format!("environment variable {name}={value:?} is not a non-negative integer")
        })
    };
    for &(source, rank_var, size_var, local_var) in CONVENTIONS {
        let (rank, size) = match (env(rank_var), env(size_var)) {
            (None, None) => continue,
            (Some(r), Some(s)) => (parse(rank_var, r)?, parse(size_var, s)?),
            (Some(_), None) => bail!("{rank_var} is set but {size_var} is not"),
            (None, Some(_)) => bail!("{size_var} is set but {rank_var} is not"),
        };
        if size == 0 || rank >= size {
            bail!("{rank_var}={rank} is not a rank of {size_var}={size}");
        }
        let local_rank = match local_var.and_then(|v| env(v).map(|x| (v, x))) {
            Some((v, x)) => parse(v, x)?,
            None => 0,
        };
        return Ok(Some(Launch {
            rank,
            world_size: size,
            local_rank,
            source,
        }));
    }
    Ok(None)
}

/// How many ranks the launcher put on this node (`None` when it does not say). Slurm writes
/// `SLURM_NTASKS_PER_NODE` as e.g. `4(x2)`: the leading number is ours.
pub fn local_ranks(env: impl Fn(&str) -> Option<String>) -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "LOCAL_WORLD_SIZE",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|k| {
        let v = env(k)?;
        let digits: String = v.trim().chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// Environment for tests and tools: a variable map as [`detect_launch`] reads it.
pub fn env_from_map(map: &HashMap<String, String>) -> impl Fn(&str) -> Option<String> + '_ {
    move |k| map.get(k).cloned()
}
