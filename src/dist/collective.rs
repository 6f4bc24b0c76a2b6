//! The collective interface data-parallel training uses, the single-process [`Local`]
//! implementation, and [`init`], which joins the launch with the backend asked for.

use anyhow::{bail, Result};

use super::detect_launch;

/// The operations data-parallel training needs. All ranks call them in the same order;
/// every call is collective.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Name for messages (`local`, `mpi`, `nccl`).
    fn backend(&self) -> &'static str;
    /// Element-wise sum across ranks, in place. Every rank ends with the same values.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// The same for a few scalars that need f64 (loss sums, counts, flags).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Overwrites `buf` on every rank with rank 0's `buf` (all ranks pass the same length).
    fn broadcast(&self, buf: &mut [u8]) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Ends every process of the job with `code`. Used after an error on one rank so the
    /// others do not wait forever in a collective that rank will never join.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// A single process: every collective is the identity.
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Which transport to use for a multi-process launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// MPI when built with it, else NCCL when built with it.
    Auto,
    Mpi,
    Nccl,
}

/// Joins the job the launcher started, or returns [`Local`] when this process was started
/// alone (no launcher variables, or a world of one).
pub fn init(backend: Backend) -> Result<Box<dyn Collective>> {
    let launch = detect_launch(|k| std::env::var(k).ok())?;
    let Some(launch) = launch.filter(|l| l.world_size > 1) else {
        return Ok(Box::new(Local));
    };
    let chosen = match backend {
        Backend::Auto if cfg!(feature = "mpi") => Backend::Mpi,
        Backend::Auto if cfg!(feature = "nccl") => Backend::Nccl,
        Backend::Auto => bail!(
            "launched as rank {} of {} ({}) but this protloc was built without a \
             distributed backend: rebuild with `cargo build --release --features mpi` \
             (CPU clusters) or `--features cuda,nccl` (GPUs)",
            launch.rank,
            launch.world_size,
            launch.source
        ),
        b => b,
    };
    match chosen {
        #[cfg(feature = "mpi")]
        Backend::Mpi => Ok(Box::new(super::mpi_backend::Mpi::init(&launch)?)),
        #[cfg(feature = "nccl")]
        Backend::Nccl => Ok(Box::new(super::nccl_backend::Nccl::init(&launch)?)),
        other => bail!(
            "--dist-backend {} is not compiled in: rebuild with `--features {}`",
            format!("{other:?}").to_lowercase(),
            if other == Backend::Mpi {
                "mpi"
            } else {
                "cuda,nccl"
            }
        ),
    }
}
