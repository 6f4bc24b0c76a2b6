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

/// `train --frozen --ensemble 3` on the demo data (scratch:tiny), writing `out`.
fn ensemble_cmd(data: &Path, out: &Path, members: usize) -> Command {
    let mut c = Command::new(common::bin());
    c.env("PROTLOC_LOG", "warn")
        .args(["train", "--model", "scratch:tiny", "--frozen", "--ensemble"])
        .arg(members.to_string())
        .args(["--epochs", "2", "--batch-size", "8", "--lr", "1e-2"])
        .args(["--max-residues", "48", "--seed", "5", "--data"])
        .arg(data)
        .arg("--output")
        .arg(out);
    c
}

/// A copy of run `from` as a crash while member 1 trained leaves it: the arguments, the
/// split, member 0's files and the metrics lines up to member 1's first epoch; no model.
fn crashed_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("members")).unwrap();
    for f in [
        "training_args.json",
        "split.tsv",
        "members/member-0.json",
        "members/member-0.safetensors",
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let metrics = std::fs::read_to_string(from.join("metrics.jsonl")).unwrap();
    let partial: String = metrics.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(to.join("metrics.jsonl"), partial).unwrap();
}

/// (member, epoch, train loss, validation accuracy) of each line of a run's metrics.
fn member_epochs(run: &Path) -> Vec<(i64, i64, f64, f64)> {
    common::metrics(run)
        .iter()
        .map(|m| {
            (
                m["member"].as_i64().unwrap(),
                m["epoch"].as_i64().unwrap(),
                m["train_loss"].as_f64().unwrap(),
                m["val_accuracy"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_resumed_ensemble_restores_its_finished_members_and_saves_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 3, 3).unwrap(); // 30 proteins
    let reference = dir.path().join("ref");
    let out = ensemble_cmd(&data, &reference, 3).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for k in 0..3 {
        assert!(reference.join(format!("members/member-{k}.json")).exists());
    }

    // Crashed while member 1 trained: member 0 is restored, members 1 and 2 train.
    let crashed = dir.path().join("crashed");
    crashed_copy(&reference, &crashed);
    let out = common::resume(&crashed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Member 0 of 3 restored from"), "{stdout}");
    assert!(
        !stdout.contains("Member 0 of 3 (seed"),
        "member 0 trained again: {stdout}"
    );
    assert!(stdout.contains("Member 1 of 3 (seed"), "{stdout}");
    assert_eq!(
        std::fs::read(reference.join("model.safetensors")).unwrap(),
        std::fs::read(crashed.join("model.safetensors")).unwrap(),
        "the resumed ensemble differs from the uninterrupted one"
    );
    assert_eq!(member_epochs(&reference), member_epochs(&crashed));
    assert_eq!(member_epochs(&crashed).len(), 6, "each epoch once");

    // Restored, not retrained: member 0's weights, altered on disk, are what the model holds.
    let altered = dir.path().join("altered");
    crashed_copy(&reference, &altered);
    let member0 = altered.join("members/member-0.safetensors");
    let doubled: std::collections::HashMap<String, candle_core::Tensor> = common::load(&member0)
        .into_iter()
        .map(|(name, t)| (name, (t * 2.0).unwrap()))
        .collect();
    assert!(!doubled.is_empty());
    candle_core::safetensors::save(&doubled, &member0).unwrap();
    assert!(common::resume(&altered).status.success());
    let model = common::load(&altered.join("model.safetensors"));
    for (name, t) in &doubled {
        let saved = model
            .get(name)
            .unwrap_or_else(|| panic!("model lacks {name}"));
        assert!(common::same(saved, t), "{name} was not restored");
    }

    // Different data no longer gives the split the members were trained on.
    let moved = dir.path().join("moved");
    crashed_copy(&reference, &moved);
    protloc::demo::write_dataset(&data, 3, 4).unwrap();
    let out = common::resume(&moved);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no longer splits"), "{err}");
}

#[test]
fn a_single_head_on_cached_states_is_not_resumable_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 3, 3).unwrap();
    let run = dir.path().join("one");
    let out = ensemble_cmd(&data, &run, 1).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !run.join("members").exists(),
        "a single head keeps no members"
    );
    let out = common::resume(&run);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keeps no checkpoints") && err.contains("run `protloc train` again"),
        "{err}"
    );
}
