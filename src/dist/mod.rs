//! Data-parallel training across processes: who we are (rank, world size, from the
//! launcher's environment), a small collective interface with one backend per transport,
//! and the pieces the training loop needs on top of it (gradient buckets, the per-rank
//! slice of a global batch, the run-config check, the initial-weights broadcast).
//!
//! We do not run our own cluster engine: processes are started by the launcher the user
//! already has (`mpirun`, `srun`, `torchrun`-style environments on Kubernetes), and the
//! bytes move over MPI (feature `mpi`) or NCCL (feature `nccl`, with `cuda`).

mod collective;
mod launch;
#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "nccl")]
mod nccl_backend;
mod sync;
#[cfg(feature = "nccl")]
mod watchdog;

pub use collective::{init, Backend, Collective, Local};
pub use launch::{detect_launch, env_from_map, local_ranks, Launch};
pub use sync::{
    all_reduce_grads, broadcast_bytes, broadcast_params, check_same_config, file_digest,
    rank_slice, BUCKET_ELEMS,
};
#[cfg(feature = "nccl")]
pub(crate) use watchdog::Watchdog;

#[cfg(test)]
mod tests;
