//! Crash-safe training: a run killed with SIGKILL and resumed ends bit-identical to an
//! uninterrupted run; a damaged latest checkpoint is detected and the previous one used.

mod common;

use std::path::Path;
use std::process::Command;

fn train_cmd(data: &Path, out: &Path) -> Command {
    let mut c = Command::new(common::bin());
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

#[test]
fn killed_and_resumed_runs_match_uninterrupted_ones_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 4, 2).unwrap(); // 40 proteins, ~9 batches per epoch

    let reference = dir.path().join("ref");
    assert!(train_cmd(&data, &reference).status().unwrap().success());

    // Killed mid-epoch, then resumed.
    let killed = dir.path().join("killed");
    common::start_and_kill(train_cmd(&data, &killed), &killed, 2);
    let out = common::resume(&killed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    assert_eq!(
        common::final_weights(&reference),
        common::final_weights(&killed),
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
    common::start_and_kill(train_cmd(&data, &damaged), &damaged, 3);
    let cps = common::checkpoints(&damaged);
    let latest = cps.last().unwrap().join("model.safetensors");
    let bytes = std::fs::read(&latest).unwrap();
    std::fs::write(&latest, &bytes[..bytes.len() / 2]).unwrap();
    let out = common::resume(&damaged);
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
        common::final_weights(&reference),
        common::final_weights(&damaged),
        "fallback resume differs"
    );
}

#[test]
fn resume_without_checkpoints_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::resume(dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("training_args.json"));
}
