//! What the training loop needs on top of the collectives: gradient buckets, the per-rank
//! slice of a global batch, byte and weight broadcasts, the run-config check across ranks and
//! the data file digest that feeds it.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};

use super::Collective;

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
pub(super) fn config_diff(root: &serde_json::Value, mine: &serde_json::Value) -> String {
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
