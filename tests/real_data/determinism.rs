//! Bit-for-bit training on the real checkpoints, with the default thread count, while the
//! machine is busy: two identical seeded runs end with identical weights, and a run killed
//! with SIGKILL and resumed ends where the uninterrupted run ends. This is how the promise
//! once failed (a float sum whose pairing followed rayon's work stealing): `scratch:small`
//! at 200 residues (`tests/resume.rs`) did not take the path that broke.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common;

/// Busy threads, one per core, competing with the run under test so that rayon's tasks are
/// stolen in a different order every time. They stop when dropped, or after `limit`.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Load {
    fn start(limit: Duration) -> Self {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|k| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let mut x = k as u64 + 1;
                    while !stop.load(Ordering::Relaxed) && t0.elapsed() < limit {
                        // Busy, with short sleeps at irregular points: the run's threads get
                        // descheduled at different moments in every run.
                        for _ in 0..(20_000 + (x % 50_000)) {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                        }
                        if x % 7 == 0 {
                            std::thread::sleep(Duration::from_micros(x % 300));
                        }
                    }
                    x
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `protloc train` on the first `limit` DeepLoc records, default thread count.
fn train(model: &str, limit: usize, extra: &[&str], out: &Path) -> Command {
    let mut c = Command::new(common::bin());
    c.stdout(std::process::Stdio::null())
        .env("PROTLOC_LOG", "warn")
        .env_remove("PROTLOC_THREADS")
        .env_remove("RAYON_NUM_THREADS")
        .args(["train", "--model", model, "--data"])
        .arg(common::shared("data/deeploc_data.fasta"))
        .args([
            "--limit",
            &limit.to_string(),
            "--batch-size",
            "8",
            "--seed",
            "3",
        ])
        .args(extra)
        .arg("--output")
        .arg(out);
    c
}

fn run_ok(mut c: Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every tensor of two saved models, compared bit for bit (names the first that differs).
fn assert_same_weights(a: &Path, b: &Path, what: &str) {
    let (ta, tb) = (common::load(a), common::load(b));
    assert_eq!(ta.len(), tb.len(), "{what}: tensor counts differ");
    let mut names: Vec<_> = ta.keys().collect();
    names.sort();
    for name in names {
        assert!(
            common::same(&ta[name], &tb[name]),
            "{what}: {name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn last_train_loss(run: &Path) -> u64 {
    let m = common::metrics(run);
    let loss = m.last().expect("an epoch")["train_loss"]
        .as_f64()
        .expect("train_loss");
    loss.to_bits()
}

/// Two runs of the same seeded `train`, one after the other with the machine loaded: same
/// last train loss, same bits in every saved tensor.
fn assert_seeded_runs_identical(model: &str, limit: usize, extra: &[&str], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let _load = Load::start(Duration::from_secs(900));
    run_ok(train(model, limit, extra, &a));
    run_ok(train(model, limit, extra, &b));
    assert_eq!(
        last_train_loss(&a),
        last_train_loss(&b),
        "{what}: train losses differ"
    );
    assert_same_weights(
        &a.join("model.safetensors"),
        &b.join("model.safetensors"),
        what,
    );
}

/// The reproduction: ESM-2 8M, 160 records, one epoch, batch 8, seed 3, 510
/// residues, default threads; here with the machine loaded.
#[test]
fn esm2_seeded_runs_are_bit_identical_under_load() {
    assert_seeded_runs_identical(&common::esm_dir(), 160, &["--epochs", "1"], "ESM-2 8M");
}

/// A BERT (AntiBERTy), the same way.
#[test]
fn bert_seeded_runs_are_bit_identical_under_load() {
    let bert = common::shared("weights/antiberty");
    let extra = ["--epochs", "1", "--max-residues", "256"];
    assert_seeded_runs_identical(bert.to_str().unwrap(), 96, &extra, "AntiBERTy");
}

/// Killed with SIGKILL after three checkpoints (mid-epoch 1) and resumed, under load: the
/// final checkpoint and the best model equal the uninterrupted run's.
#[test]
fn esm2_killed_and_resumed_run_matches_the_uninterrupted_one_under_load() {
    let esm = common::esm_dir();
    let dir = tempfile::tempdir().unwrap();
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    let extra = [
        "--epochs",
        "2",
        "--max-residues",
        "256",
        "--save-every-steps",
        "4",
    ];
    let _load = Load::start(Duration::from_secs(900));
    run_ok(train(&esm, 160, &extra, &whole));
    common::start_and_kill(train(&esm, 160, &extra, &killed), &killed, 3);
    let out = common::resume(&killed);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    assert_eq!(
        common::final_weights(&whole),
        common::final_weights(&killed),
        "the resumed run's last checkpoint differs from the uninterrupted run's"
    );
    assert_same_weights(
        &whole.join("model.safetensors"),
        &killed.join("model.safetensors"),
        "best model after resume",
    );
}
