//! Crash-safe training: a run killed with SIGKILL and resumed ends bit-identical to an
//! uninterrupted run; a damaged latest checkpoint is detected and the previous one used.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_protloc"))
}

fn train_cmd(data: &Path, out: &Path) -> Command {
    let mut c = Command::new(bin());
    c.stdout(std::process::Stdio::null())
        .env("PROTLOC_LOG", "warn")
        .args([
            "train",
            "--model",
            "scratch:small",
            "--epochs",
            "3",
            "--batch-size",
            "4",
        ])
        .args([
            "--lr",
            "1e-3",
            "--dropout",
            "0.1",
            "--max-residues",
            "200",
            "--seed",
            "11",
        ])
        .args(["--save-every-steps", "2", "--keep-last", "3", "--data"])
        .arg(data)
        .arg("--output")
        .arg(out);
    c
}

fn resume(run: &Path) -> std::process::Output {
    Command::new(bin())
        .env("PROTLOC_LOG", "warn")
        .arg("train")
        .arg("--resume")
        .arg(run)
        .output()
        .unwrap()
}

/// Starts a run and SIGKILLs it once `min_checkpoints` checkpoints exist (mid-epoch 1).
fn start_and_kill(data: &Path, run: &Path, min_checkpoints: usize) {
    let mut child = train_cmd(data, run).spawn().unwrap();
    let t0 = Instant::now();
    while common::checkpoints(run).len() < min_checkpoints {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoints appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was not killed");
}

fn final_weights(run: &Path) -> Vec<u8> {
    let last = common::checkpoints(run).pop().expect("a final checkpoint");
    std::fs::read(last.join("model.safetensors")).unwrap()
}

#[test]
fn killed_and_resumed_runs_match_uninterrupted_ones_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 4, 2).unwrap(); // 40 proteins, ~9 batches per epoch

    let reference = dir.path().join("ref");
    assert!(train_cmd(&data, &reference).status().unwrap().success());

    // Killed mid-epoch, then resumed.
    let killed = dir.path().join("killed");
    start_and_kill(&data, &killed, 2);
    let out = resume(&killed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    assert_eq!(
        final_weights(&reference),
        final_weights(&killed),
        "resumed run differs from the uninterrupted one"
    );
    assert_eq!(
        std::fs::read(reference.join("model.safetensors")).unwrap(),
        std::fs::read(killed.join("model.safetensors")).unwrap(),
        "best models differ"
    );
    let lines = |p: &Path| {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines(&killed), 3, "metrics.jsonl must hold each epoch once");

    // Killed again; the newest checkpoint is then truncated (a half-written file).
    let damaged = dir.path().join("damaged");
    start_and_kill(&data, &damaged, 3);
    let cps = common::checkpoints(&damaged);
    let latest = cps.last().unwrap().join("model.safetensors");
    let bytes = std::fs::read(&latest).unwrap();
    std::fs::write(&latest, &bytes[..bytes.len() / 2]).unwrap();
    let out = resume(&damaged);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("corrupt") && err.contains("falling back"),
        "{err}"
    );
    let used = cps[cps.len() - 2]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(err.contains(&used), "expected to resume from {used}: {err}");
    assert_eq!(
        final_weights(&reference),
        final_weights(&damaged),
        "fallback resume differs"
    );
}

#[test]
fn resume_without_checkpoints_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = resume(dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("training_args.json"));
}
