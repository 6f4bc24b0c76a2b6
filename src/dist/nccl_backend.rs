//! [`Collective`] over NCCL (through cudarc), for GPU nodes: one process per GPU, the GPU
//! picked by the local rank. Buffers live on the host in the training loop, so each call
//! stages them through one device buffer; that is the cost of keeping a single loop for
//! both backends, and small next to the transfer itself on multi-node links.
//!
//! NCCL needs a shared unique id before the ranks can talk. As under `torchrun`, rank 0
//! publishes it on `MASTER_ADDR:MASTER_PORT` over TCP and the other ranks fetch it there.
//! NCCL collectives block forever when a peer dies, so [`super::Watchdog`] ends a rank
//! stuck in one for longer than `PROTLOC_DIST_TIMEOUT` seconds.
//!
//! Built with `--features cuda,nccl`; NCCL itself is loaded at run time.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{Collective, Launch, Watchdog};

pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
}

/// How long the ranks wait for each other at start-up (images pulling, nodes booting).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

fn rendezvous_address() -> Result<(String, u16)> {
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p
            .parse()
            .with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
        Err(_) => 29500,
    };
    Ok((addr, port))
}

/// Rank 0 creates the NCCL id and hands it to every other rank over TCP.
fn share_id(launch: &Launch) -> Result<Id> {
    let (addr, port) = rendezvous_address()?;
    if launch.rank == 0 {
        let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let listener = TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("rank 0 cannot listen on port {port} (MASTER_PORT)"))?;
        for _ in 1..launch.world_size {
            let (mut s, _) = listener.accept().context("rendezvous: accept")?;
            s.write_all(&bytes).context("rendezvous: send")?;
        }
        return Ok(id);
    }
    let t0 = Instant::now();
    let mut stream = loop {
        match TcpStream::connect((addr.as_str(), port)) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > RENDEZVOUS_TIMEOUT => {
                bail!("rank {} cannot reach rank 0 at {addr}:{port} (MASTER_ADDR/MASTER_PORT) after {:?}: {e}", launch.rank, RENDEZVOUS_TIMEOUT)
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let mut bytes = [0u8; 128];
    stream
        .read_exact(&mut bytes)
        .context("rendezvous: reading the NCCL id from rank 0")?;
    Ok(Id::uninit(bytes.map(|b| b as std::ffi::c_char)))
}

impl Nccl {
    pub fn init(launch: &Launch) -> Result<Self> {
        let ctx = CudaContext::new(launch.local_rank).with_context(|| {
            format!(
                "rank {}: cannot open CUDA device {} (the local rank)",
                launch.rank, launch.local_rank
            )
        })?;
        let stream = ctx.default_stream();
        let id = share_id(launch)?;
        let comm = Comm::from_rank(stream.clone(), launch.rank, launch.world_size, id)
            .map_err(|e| anyhow::anyhow!("ncclCommInitRank (rank {}): {e:?}", launch.rank))?;
        Ok(Self {
            comm,
            stream,
            rank: launch.rank,
            size: launch.world_size,
            watchdog: Watchdog::start(launch.rank),
        })
    }

    fn reduce<T>(&self, buf: &mut [T]) -> Result<()>
    where
        T: cudarc::driver::DeviceRepr + cudarc::nccl::safe::NcclType + Copy,
    {
        let _guard = self.watchdog.enter("all-reduce");
        let mut dev = self.stream.clone_htod(buf)?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| anyhow::anyhow!("ncclAllReduce: {e:?}"))?;
        self.stream.memcpy_dtoh(&dev, buf)?;
        self.stream.synchronize()?;
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.reduce(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce(buf)
    }
    fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let _guard = self.watchdog.enter("broadcast");
        let mut dev = self.stream.clone_htod(buf)?;
        self.comm
            .broadcast_in_place(&mut dev, 0)
            .map_err(|e| anyhow::anyhow!("ncclBroadcast: {e:?}"))?;
        self.stream.memcpy_dtoh(&dev, buf)?;
        self.stream.synchronize()?;
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.reduce(&mut [0f32])
    }
    fn abort(&self, code: i32) -> ! {
        // NCCL has no job-wide abort: this rank leaves, and the others' watchdogs (or the
        // launcher: torchrun and Kubernetes Jobs end the group when a member fails) follow.
        std::process::exit(code)
    }
}
