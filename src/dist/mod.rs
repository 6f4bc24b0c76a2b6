//! Data-parallel training across processes: who we are (rank, world size, from the
//! launcher's environment), a small collective interface with one backend per transport,
//! and the pieces the training loop needs on top of it (gradient buckets, the per-rank
//! slice of a global batch, the run-config check, the initial-weights broadcast).
//!
//! We do not run our own cluster engine: processes are started by the launcher the user
//! already has (`mpirun`, `srun`, `torchrun`-style environments on Kubernetes), and the
//! bytes move over MPI (feature `mpi`) or NCCL (feature `nccl`, with `cuda`).

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "nccl")]
mod nccl_backend;

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};

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
        Backend::Mpi => Ok(Box::new(mpi_backend::Mpi::init(&launch)?)),
        #[cfg(feature = "nccl")]
        Backend::Nccl => Ok(Box::new(nccl_backend::Nccl::init(&launch)?)),
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

/// Elements per gradient bucket (16 MiB of f32): large enough that per-call latency is
/// negligible, small enough that the staging copies stay modest for a 420M model.
pub const BUCKET_ELEMS: usize = 1 << 22;

/// Sums `grads` (aligned with the optimizer's parameters, `None` = no gradient) across
/// ranks, in place, in a few large flat buckets instead of one call per tensor. A tensor
/// that got a gradient on any rank gets one everywhere (zeros where a rank had none), so
/// all ranks update the same parameters; one that none had stays `None`.
pub fn all_reduce_grads(
    comm: &dyn Collective,
    grads: &mut [Option<Tensor>],
    shapes: &[candle_core::Shape],
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    if grads.len() != shapes.len() {
        bail!("{} gradients for {} parameters", grads.len(), shapes.len());
    }
    // Which tensors have a gradient anywhere: one flag per tensor, summed.
    let mut present: Vec<f32> = grads.iter().map(|g| f32::from(g.is_some())).collect();
    comm.all_reduce_sum(&mut present)?;

    let mut bucket: Vec<f32> = Vec::with_capacity(BUCKET_ELEMS);
    let mut members: Vec<usize> = Vec::new();
    let flush = |bucket: &mut Vec<f32>,
                 members: &mut Vec<usize>,
                 grads: &mut [Option<Tensor>]|
     -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        comm.all_reduce_sum(bucket)?;
        let mut offset = 0;
        for &i in members.iter() {
            let n = shapes[i].elem_count();
            let dev = grads[i]
                .as_ref()
                .map_or(candle_core::Device::Cpu, |g| g.device().clone());
            grads[i] = Some(Tensor::from_slice(
                &bucket[offset..offset + n],
                shapes[i].clone(),
                &dev,
            )?);
            offset += n;
        }
        bucket.clear();
        members.clear();
        Ok(())
    };
    for i in 0..grads.len() {
        if present[i] == 0.0 {
            continue;
        }
        let n = shapes[i].elem_count();
        if !bucket.is_empty() && bucket.len() + n > BUCKET_ELEMS {
            flush(&mut bucket, &mut members, grads)?;
        }
        match &grads[i] {
            Some(g) => bucket.extend(g.flatten_all()?.to_vec1::<f32>()?),
            None => bucket.resize(bucket.len() + n, 0.0),
        }
        members.push(i);
    }
    flush(&mut bucket, &mut members, grads)
}

/// The members of a global batch that `rank` computes: every `world`-th one starting at
/// `rank`. Global batches are length-sorted, so striding (rather than contiguous halves)
/// gives every rank a similar mix of lengths and so a similar step time. Ranks differ by at
/// most one member; a rank may get none in a ragged last batch.
pub fn rank_slice(global: &[usize], rank: usize, world: usize) -> Vec<usize> {
    global
        .iter()
        .skip(rank)
        .step_by(world.max(1))
        .copied()
        .collect()
}

/// Broadcasts a byte string of any length from rank 0 (length first, then the bytes).
pub fn broadcast_bytes(comm: &dyn Collective, root_bytes: Vec<u8>) -> Result<Vec<u8>> {
    let mut len = (root_bytes.len() as u64).to_le_bytes();
    comm.broadcast(&mut len)?;
    let mut buf = if comm.is_root() {
        root_bytes
    } else {
        vec![0u8; u64::from_le_bytes(len) as usize]
    };
    comm.broadcast(&mut buf)?;
    Ok(buf)
}

/// Makes every rank start from rank 0's parameters (`vars` sorted by name on every rank),
/// a bucket at a time. Ranks build the same initial weights from the same seed anyway;
/// this makes it a guarantee rather than an assumption (e.g. a checkpoint file that
/// differs between nodes).
pub fn broadcast_params(comm: &dyn Collective, vars: &[(String, Var)]) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    for (name, var) in vars {
        let t = var.as_tensor();
        let values: Vec<f32> = t
            .flatten_all()?
            .to_vec1()
            .with_context(|| format!("{name}: only f32 parameters can be broadcast"))?;
        for chunk in values.chunks(BUCKET_ELEMS).enumerate() {
            let (k, chunk) = chunk;
            let mut bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            comm.broadcast(&mut bytes)
                .with_context(|| format!("broadcasting {name} (part {k})"))?;
            if !comm.is_root() {
                let received: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                if received.as_slice() != chunk {
                    // Only write when it differs: the common case costs no tensor rebuild.
                    let mut all = values.clone();
                    let start = k * BUCKET_ELEMS;
                    all[start..start + received.len()].copy_from_slice(&received);
                    var.set(&Tensor::from_vec(all, t.shape(), t.device())?)?;
                }
            }
        }
    }
    Ok(())
}

/// Checks that every rank runs the same job: rank 0 broadcasts its fingerprint (a JSON
/// object: training arguments, data digest, world size, version), each rank compares it with
/// its own, and the verdicts are summed so that every rank fails together, naming the
/// ranks that differ. The differing rank also says which fields differ.
pub fn check_same_config(comm: &dyn Collective, fingerprint: &serde_json::Value) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mine = serde_json::to_vec(fingerprint)?;
    let root_bytes = broadcast_bytes(comm, mine.clone())?;
    let root: serde_json::Value =
        serde_json::from_slice(&root_bytes).context("rank 0 sent an unreadable run config")?;
    let differs = root != *fingerprint;
    let mut verdict = vec![0f64; comm.world_size()];
    verdict[comm.rank()] = f64::from(u8::from(differs));
    comm.all_reduce_sum_f64(&mut verdict)?;
    let bad: Vec<usize> = (0..verdict.len()).filter(|&r| verdict[r] > 0.0).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let list = bad
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if differs {
        bail!(
            "rank {}'s run configuration differs from rank 0's: {}; every rank must be \
             started with the same arguments and the same data file",
            comm.rank(),
            config_diff(&root, fingerprint)
        );
    }
    bail!(
        "the run configuration of rank(s) {list} differs from rank 0's (their error names \
         the fields); every rank must be started with the same arguments and data file"
    )
}

/// `field: rank 0 has X, this rank has Y` for each differing leaf (nested objects are
/// followed, as in `args.batch_size`).
fn config_diff(root: &serde_json::Value, mine: &serde_json::Value) -> String {
    fn walk(
        path: &str,
        a: Option<&serde_json::Value>,
        b: Option<&serde_json::Value>,
        out: &mut Vec<String>,
    ) {
        if a == b {
            return;
        }
        if let (Some(serde_json::Value::Object(x)), Some(serde_json::Value::Object(y))) = (a, b) {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(&p, x.get(k), y.get(k), out);
            }
            return;
        }
        let show = |v: Option<&serde_json::Value>| v.map_or("nothing".into(), |v| v.to_string());
        out.push(format!(
            "{path}: rank 0 has {}, this rank has {}",
            show(a),
            show(b)
        ));
    }
    let mut parts = Vec::new();
    walk("", Some(root), Some(mine), &mut parts);
    if parts.is_empty() {
        "(no field differs?)".into()
    } else {
        parts.join("; ")
    }
}

/// Ends this process when it has been stuck in one collective for longer than
/// `PROTLOC_DIST_TIMEOUT` seconds (default 1800: longer than any honest wait, such as rank 0
/// writing a large checkpoint while the others wait in the next collective). For transports
/// that block forever on a dead peer (NCCL); MPI launchers end the job themselves.
#[cfg(feature = "nccl")]
pub(crate) struct Watchdog {
    /// Milliseconds since `t0` when the current collective began; 0 when in none.
    since_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    what: std::sync::Arc<std::sync::Mutex<&'static str>>,
    t0: std::time::Instant,
}

#[cfg(feature = "nccl")]
impl Watchdog {
    pub(crate) fn start(rank: usize) -> Self {
        use std::sync::atomic::Ordering;
        let timeout_s: u64 = std::env::var("PROTLOC_DIST_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800);
        let t0 = std::time::Instant::now();
        let since_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let what = std::sync::Arc::new(std::sync::Mutex::new(""));
        let (s, w) = (since_ms.clone(), what.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let began = s.load(Ordering::Relaxed);
            let now = t0.elapsed().as_millis() as u64;
            if began > 0 && now.saturating_sub(began) > timeout_s * 1000 {
                let op = *w.lock().unwrap_or_else(|e| e.into_inner());
                tracing::error!(
                    "rank {rank}: stuck in {op} for over {timeout_s} s \
                     (PROTLOC_DIST_TIMEOUT): another rank probably died or hangs; exiting"
                );
                std::process::exit(3);
            }
        });
        Self { since_ms, what, t0 }
    }

    pub(crate) fn enter(&self, op: &'static str) -> WatchdogGuard<'_> {
        *self.what.lock().unwrap_or_else(|e| e.into_inner()) = op;
        let now = (self.t0.elapsed().as_millis() as u64).max(1);
        self.since_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
        WatchdogGuard(self)
    }
}

#[cfg(feature = "nccl")]
pub(crate) struct WatchdogGuard<'a>(&'a Watchdog);

#[cfg(feature = "nccl")]
impl Drop for WatchdogGuard<'_> {
    fn drop(&mut self) {
        self.0
            .since_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Streams a file through CRC-32 (with its length): cheap enough to run at every start, and
/// catches ranks on different nodes reading different copies of "the same" data file.
pub fn file_digest(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok(format!("crc32:{:08x}/{len}", h.finalize()))
}

/// Environment for tests and tools: a variable map as [`detect_launch`] reads it.
pub fn env_from_map(map: &HashMap<String, String>) -> impl Fn(&str) -> Option<String> + '_ {
    move |k| map.get(k).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn detect(pairs: &[(&str, &str)]) -> Result<Option<Launch>> {
        let m = env(pairs);
        detect_launch(env_from_map(&m))
    }

    #[test]
    fn no_launcher_means_single_process() {
        assert_eq!(detect(&[("HOME", "/root")]).unwrap(), None);
    }

    #[test]
    fn each_launcher_convention_is_read() {
        let l = detect(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")])
            .unwrap()
            .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (3, 8, 1));
        assert_eq!(l.source, "RANK/WORLD_SIZE");
        let l = detect(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (1, 2, 1));
        let l = detect(&[("PMI_RANK", "0"), ("PMI_SIZE", "4")])
            .unwrap()
            .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (0, 4, 0));
        let l = detect(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (5, 16, 1));
        assert_eq!(l.source, "SLURM_PROCID/SLURM_NTASKS");
    }

    #[test]
    fn launcher_variables_win_over_inherited_slurm_ones() {
        // mpirun inside an sbatch script: every process inherits the batch step's
        // SLURM_PROCID=0, but its own rank is in OMPI_COMM_WORLD_RANK.
        let l = detect(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(l.rank, 2);
        // torchrun inside srun: one srun task per node, torchrun's RANK per process.
        let l = detect(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size), (5, 8));
    }

    #[test]
    fn ranks_per_node() {
        let m = env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]);
        assert_eq!(local_ranks(env_from_map(&m)), Some(2));
        let m = env(&[("SLURM_NTASKS_PER_NODE", "4(x2)")]);
        assert_eq!(local_ranks(env_from_map(&m)), Some(4));
        let m = env(&[("HOME", "/")]);
        assert_eq!(local_ranks(env_from_map(&m)), None);
    }

    #[test]
    fn malformed_or_half_set_variables_are_errors() {
        let e = detect(&[("RANK", "1")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE"), "{e}");
        let e = detect(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = detect(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a rank"), "{e}");
        assert!(detect(&[("PMI_RANK", "0"), ("PMI_SIZE", "0")]).is_err());
        let e = detect(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "-1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOCAL_RANK"), "{e}");
    }

    #[test]
    fn rank_slices_partition_a_global_batch() {
        let global: Vec<usize> = (100..108).collect();
        assert_eq!(rank_slice(&global, 0, 2), vec![100, 102, 104, 106]);
        assert_eq!(rank_slice(&global, 1, 2), vec![101, 103, 105, 107]);
        for world in 1..6 {
            for n in 0..12 {
                let g: Vec<usize> = (0..n).collect();
                let mut all: Vec<usize> =
                    (0..world).flat_map(|r| rank_slice(&g, r, world)).collect();
                all.sort();
                assert_eq!(all, g, "world {world}, batch {n}");
                let sizes: Vec<usize> =
                    (0..world).map(|r| rank_slice(&g, r, world).len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
    }

    /// Pretends to be one of `world` identical ranks: a sum is `world` times the value.
    struct Mirror {
        world: usize,
        calls: std::cell::Cell<usize>,
    }

    impl Collective for Mirror {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn backend(&self) -> &'static str {
            "mirror"
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            self.calls.set(self.calls.get() + 1);
            buf.iter_mut().for_each(|x| *x *= self.world as f32);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= self.world as f64);
            Ok(())
        }
        fn broadcast(&self, _: &mut [u8]) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn gradients_travel_in_buckets_and_come_back_in_place() {
        let dev = candle_core::Device::Cpu;
        // Two tensors larger than half a bucket force a second bucket; a `None` stays.
        let big = BUCKET_ELEMS / 2 + 10;
        let shapes: Vec<candle_core::Shape> =
            vec![(big,).into(), (3, 2).into(), (4,).into(), (big,).into()];
        let mut grads: Vec<Option<Tensor>> = vec![
            Some(Tensor::ones(big, candle_core::DType::F32, &dev).unwrap()),
            Some(
                Tensor::arange(0f32, 6., &dev)
                    .unwrap()
                    .reshape((3, 2))
                    .unwrap(),
            ),
            None,
            Some(Tensor::full(2f32, big, &dev).unwrap()),
        ];
        let comm = Mirror {
            world: 3,
            calls: Default::default(),
        };
        all_reduce_grads(&comm, &mut grads, &shapes).unwrap();
        // One call for the presence flags, two buckets.
        assert_eq!(comm.calls.get(), 3);
        assert!(grads[2].is_none());
        assert_eq!(grads[1].as_ref().unwrap().dims(), &[3, 2]);
        let v: Vec<f32> = grads[1]
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, vec![0., 3., 6., 9., 12., 15.]);
        let s0: f32 = grads[0]
            .as_ref()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let s3: f32 = grads[3]
            .as_ref()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!((s0, s3), (3.0 * big as f32, 6.0 * big as f32));
    }

    #[test]
    fn config_diff_names_fields() {
        let a = serde_json::json!({"args": {"batch_size": 4, "seed": 1}, "data": "x"});
        let b = serde_json::json!({"args": {"batch_size": 8, "seed": 1}, "data": "y"});
        assert_eq!(
            config_diff(&a, &b),
            "args.batch_size: rank 0 has 4, this rank has 8; data: rank 0 has \"x\", this rank has \"y\""
        );
    }
}
