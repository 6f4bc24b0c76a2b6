//! [`Collective`] over MPI (rsmpi, the system's Open MPI or MPICH), for CPU clusters.
//!
//! MPI's default error handler (`MPI_ERRORS_ARE_FATAL`) ends the whole job on a
//! communication failure, and `mpirun`/`srun` end the job when one process dies, so no
//! rank waits forever on a dead peer; [`Collective::abort`] covers a rank that fails with
//! an ordinary error (it calls `MPI_Abort` instead of returning and finalizing, which would
//! leave the others blocked in the next collective).

use anyhow::{bail, Result};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::{Collective, Launch};

pub struct Mpi {
    // Dropping the universe finalizes MPI; it lives as long as the communicator.
    _universe: Universe,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
}

/// MPI counts are C ints: larger buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

impl Mpi {
    pub fn init(launch: &Launch) -> Result<Self> {
        // Only the main thread calls MPI; rayon's workers never do.
        let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
            bail!("MPI was already initialized in this process");
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world_size) {
            // Typically: the variables were inherited (a Slurm batch step, a copied
            // environment) but the process was not started by an MPI launcher.
            bail!(
                "the environment says rank {} of {} ({}), but MPI sees rank {rank} of {size}: \
                 start every process with `mpirun -np N` or `srun --mpi=pmix`, or unset those \
                 variables to train in one process",
                launch.rank,
                launch.world_size,
                launch.source
            );
        }
        Ok(Self {
            _universe: universe,
            world,
            rank,
            size,
        })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        for part in buf.chunks_mut(MAX_COUNT) {
            // rsmpi has no MPI_IN_PLACE: reduce from a copy (a memcpy next to the transfer).
            let send = part.to_vec();
            self.world
                .all_reduce_into(&send[..], part, SystemOperation::sum());
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        for part in buf.chunks_mut(MAX_COUNT) {
            let send = part.to_vec();
            self.world
                .all_reduce_into(&send[..], part, SystemOperation::sum());
        }
        Ok(())
    }
    fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        let root = self.world.process_at_rank(0);
        for part in buf.chunks_mut(MAX_COUNT) {
            root.broadcast_into(part);
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
