//! Tests of the launch detection, the collectives on one process and the run-config check.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;

use super::sync::config_diff;
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
            let mut all: Vec<usize> = (0..world).flat_map(|r| rank_slice(&g, r, world)).collect();
            all.sort();
            assert_eq!(all, g, "world {world}, batch {n}");
            let sizes: Vec<usize> = (0..world).map(|r| rank_slice(&g, r, world).len()).collect();
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
