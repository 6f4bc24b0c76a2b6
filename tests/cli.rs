//! End-to-end tests of the `protloc` binary.

mod common;

use std::path::Path;

use common::{fails_with, load, metrics, protloc, same, write};

use predicates::prelude::*;

#[test]
fn scratch_training_learns_is_reproducible_and_writes_a_hf_style_run_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.fasta");
    protloc::demo::write_dataset(&data, 3, 1).unwrap(); // 30 proteins
    let train = |out: &Path| {
        protloc()
            .args(["train", "--model", "scratch:tiny", "--epochs", "10"])
            .args([
                "--batch-size",
                "4",
                "--lr",
                "3e-3",
                "--pool",
                "mean",
                "--dropout",
                "0",
            ])
            .args([
                "--max-residues",
                "64",
                "--val-fraction",
                "0.2",
                "--seed",
                "3",
                "--data",
            ])
            .arg(&data)
            .arg("--output")
            .arg(out)
            .assert()
            .success()
            .stdout(predicate::str::contains("Training Loss: "))
            .stdout(predicate::str::contains("Validation Accuracy: "))
            .stdout(predicate::str::contains("Validation loss: "));
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    train(&a);
    train(&b);

    // The loss falls.
    let m = metrics(&a);
    assert_eq!(m.len(), 10);
    let first = m[0]["train_loss"].as_f64().unwrap();
    let last = m[9]["train_loss"].as_f64().unwrap();
    assert!(
        last < first * 0.9,
        "training loss did not fall: {first} -> {last}"
    );

    // Same seed, same machine: bit-identical weights.
    let (wa, wb) = (
        load(&a.join("model.safetensors")),
        load(&b.join("model.safetensors")),
    );
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        assert!(
            same(t, &wb[name]),
            "{name} differs between two runs with the same seed"
        );
    }

    // Hugging Face-style directory.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "bert");
    assert_eq!(cfg["id2label"]["0"], "Nucleus");
    assert_eq!(cfg["label2id"]["Peroxisome"], 9);
    assert_eq!(cfg["protloc"]["truncate"], "head-tail");
    assert_eq!(cfg["protloc"]["max_residues"], 64);
    for f in ["vocab.txt", "training_args.json", "training_curves.png"] {
        assert!(a.join(f).is_file(), "missing {f}");
    }
    // split.tsv: every training record once, 2 per location trained on and 1 validated on
    // (20% of 3), each row pointing at its record's header line. (The sequence digest is
    // checked through `eval --split validation` below.)
    let split = std::fs::read_to_string(a.join("split.tsv")).unwrap();
    let fasta: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut rows = split.lines();
    assert_eq!(rows.next(), Some("member\tsplit\tid\tline\tsequence"));
    let (mut trained, mut validated) = (0, 0);
    for row in rows {
        let f: Vec<&str> = row.split('\t').collect();
        assert_eq!((f.len(), f[0]), (5, "0"), "{row}");
        match f[1] {
            "train" => trained += 1,
            "validation" => validated += 1,
            other => panic!("split {other} in {row}"),
        }
        let line: usize = f[3].parse().unwrap();
        assert!(fasta[line - 1].starts_with(&format!(">{} ", f[2])), "{row}");
    }
    assert_eq!((trained, validated), (20, 10));

    // `eval --split validation` scores exactly those 10 records: the saved (best) epoch's
    // validation accuracy again. Another file's records (same ids and lines, other
    // sequences) are refused, not silently scored.
    let out = dir.path().join("val.json");
    protloc()
        .args(["eval", "--split", "validation", "--model"])
        .arg(&a)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .assert()
        .success();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let best = m
        .iter()
        .map(|e| e["val_accuracy"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(report["records"], 10);
    assert_eq!(report["split"], "validation");
    assert!((report["report"]["accuracy"].as_f64().unwrap() - best).abs() < 1e-9);
    let other = dir.path().join("other.fasta");
    protloc::demo::write_dataset(&other, 3, 2).unwrap();
    let mut args: Vec<std::ffi::OsString> = ["eval", "--split", "validation", "--model"]
        .map(Into::into)
        .to_vec();
    args.extend([a.clone().into(), "--data".into(), other.into()]);
    fails_with(&args, &["other.fasta holds 0 of the 10 records"]);
    assert!(
        wa.contains_key("classifier.weight")
            && wa.contains_key("bert.encoder.layer.1.output.dense.weight")
    );
    // No temporary files left behind.
    assert!(std::fs::read_dir(&a).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".protloc-tmp")));
}

#[test]
fn predict_is_independent_of_batching_and_embed_writes_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 3, 9).unwrap();
    let run = dir.path().join("run");
    protloc()
        .args([
            "train",
            "--model",
            "scratch:tiny",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--data",
        ])
        .arg(&data)
        .arg("--output")
        .arg(&run)
        .assert()
        .success();
    let predict = |extra: &[&str]| {
        let out = protloc()
            .args(["predict", "--format", "jsonl", "--model"])
            .arg(&run)
            .arg("--input")
            .arg(&data)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let one_by_one = predict(&["--max-batch-size", "1"]);
    let batched = predict(&["--max-batch-tokens", "100000", "--max-batch-size", "64"]);
    let parse = |s: &str| {
        s.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let (a, b) = (parse(&one_by_one), parse(&batched));
    assert_eq!(a.len(), 30);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["id"], y["id"], "output order must follow input order");
        assert_eq!(x["prediction"], y["prediction"]);
        for (l, p) in x["probabilities"].as_object().unwrap() {
            let q = y["probabilities"][l].as_f64().unwrap();
            assert!(
                (p.as_f64().unwrap() - q).abs() < 1e-5,
                "{l}: batching changed a probability"
            );
        }
    }

    let out = protloc()
        .args(["embed", "--model"])
        .arg(&run)
        .arg("--input")
        .arg(&data)
        .args(["--limit", "4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = parse(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["embedding"].as_array().unwrap().len(), 64);
}

#[test]
fn bad_input_gives_clear_errors_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let os = |s: &str| std::ffi::OsString::from(s);
    let stats = |p: &Path| vec![os("data"), os("stats"), p.as_os_str().to_owned()];

    let empty = write(d, "empty.fasta", "");
    fails_with(&stats(&empty), &["empty.fasta", "no records"]);
    let garbage = write(d, "garbage.fasta", "this is not fasta\n");
    fails_with(&stats(&garbage), &["garbage.fasta:1"]);
    let bad_residue = write(
        d,
        "bad.fasta",
        ">P1 Nucleus-S\nMKV\n>P2 Cytoplasm-S\nMK1V\n",
    );
    fails_with(&stats(&bad_residue), &["bad.fasta:3", "P2", "'1'"]);
    let bad_label = write(d, "label.fasta", ">P1 Nucleus-S\nMKV\n>P2 Moon-S\nMKV\n");
    fails_with(&stats(&bad_label), &["label.fasta:3", "Moon"]);
}

#[test]
fn diverging_training_stops_with_a_clear_error_and_saves_no_broken_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 4, 5).unwrap();
    let run = dir.path().join("run");
    let out = protloc()
        .args([
            "train",
            "--model",
            "scratch:tiny",
            "--epochs",
            "1",
            "--batch-size",
            "2",
        ])
        .args([
            "--lr",
            "1e30",
            "--max-grad-norm",
            "0",
            "--max-residues",
            "48",
            "--data",
        ])
        .arg(&data)
        .arg("--output")
        .arg(&run)
        .output()
        .unwrap();
    assert!(!out.status.success(), "training with lr 1e30 should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("consecutive steps had a non-finite loss or gradient"),
        "{err}"
    );
    assert!(
        !run.join("model.safetensors").exists(),
        "a broken model was written"
    );
}

#[test]
fn sharded_predictions_merge_into_exactly_the_unsharded_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("d.fasta");
    protloc::demo::write_dataset(&data, 3, 4).unwrap(); // 30 proteins
    let run = d.join("run");
    protloc()
        .args([
            "train",
            "--model",
            "scratch:tiny",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--data",
        ])
        .arg(&data)
        .arg("--output")
        .arg(&run)
        .assert()
        .success();
    for ext in ["tsv", "jsonl"] {
        let predict = |out: &Path, extra: &[&str]| {
            protloc()
                .args(["predict", "--limit", "29", "--model"])
                .arg(&run)
                .arg("--input")
                .arg(&data)
                .arg("--output")
                .arg(out)
                .args(extra)
                .assert()
                .success();
        };
        let whole = d.join(format!("whole.{ext}"));
        predict(&whole, &[]);
        for n in 1..=3 {
            let shards: Vec<std::path::PathBuf> =
                (0..n).map(|i| d.join(format!("s{i}of{n}.{ext}"))).collect();
            for (i, s) in shards.iter().enumerate() {
                predict(s, &["--shard", &format!("{i}/{n}")]);
            }
            // Re-running a shard is idempotent.
            let before = std::fs::read(&shards[0]).unwrap();
            predict(&shards[0], &["--shard", &format!("0/{n}")]);
            assert_eq!(before, std::fs::read(&shards[0]).unwrap());
            let merged = d.join(format!("merged{n}.{ext}"));
            protloc()
                .arg("merge")
                .args(&shards)
                .arg("--output")
                .arg(&merged)
                .assert()
                .success();
            assert_eq!(
                std::fs::read(&whole).unwrap(),
                std::fs::read(&merged).unwrap(),
                "{ext}: {n} shards merged differ from the unsharded output"
            );
        }
    }
    // Shards from different runs (wrong order/sizes) are refused.
    let a = d.join("s0of3.tsv");
    let c = d.join("s2of3.tsv");
    let out = protloc().arg("merge").arg(&c).arg(&a).output().unwrap();
    assert!(!out.status.success());
    let bad = protloc()
        .args(["predict", "--shard", "3/3", "--model"])
        .arg(&run)
        .arg("--input")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("0 <= I < N"));
}

/// Asserts `protloc train --help` shows every one of `needles`.
fn train_help_has(needles: &[&str]) {
    let help = protloc().args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in needles {
        assert!(
            help.contains(needle),
            "train --help lacks {needle:?}:\n{help}"
        );
    }
}

/// `train --model scratch:tiny --data DATA --output OUT` followed by `extra`.
fn tiny_train_args(
    data: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = ["train", "--model", "scratch:tiny", "--data"]
        .iter()
        .map(Into::into)
        .collect();
    v.push(data.into());
    v.push("--output".into());
    v.push(out.into());
    v.extend(extra.iter().map(Into::into));
    v
}

/// `train --help` documents the ensemble flags, and the CLI passes them on: bad combinations
/// fail with the library's messages before any model is loaded.
#[test]
fn ensemble_flags_are_documented_and_checked() {
    train_help_has(&["--ensemble <N>", "--folds <N>", "SEED+k", "partition k"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.fasta");
    protloc::demo::write_dataset(&data, 2, 1).unwrap();
    let out = dir.path().join("run");
    let base = |extra: &[&str]| tiny_train_args(&data, &out, extra);
    fails_with(&base(&["--ensemble", "2"]), &["add --frozen"]);
    fails_with(
        &base(&["--frozen", "--ensemble", "0"]),
        &["--ensemble must be at least 1"],
    );
    fails_with(
        &base(&["--frozen", "--folds", "5", "--partition", "1"]),
        &["cannot be combined with --partition"],
    );
    fails_with(
        &base(&["--frozen", "--folds", "5"]),
        &["no `partition` column"],
    );
    assert!(!out.join("config.json").exists());
}

/// `--probe-epochs` (linear probing, then fine-tuning in one run) is documented and refused
/// where it means nothing: without `--train-top-layers`, beside `--init-head`, and
/// `--probe-cache` without it.
#[test]
fn probe_epochs_are_documented_and_checked() {
    train_help_has(&["--probe-epochs <N>", "--probe-cache <DIR>", "RUN_DIR/probe"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.fasta");
    protloc::demo::write_dataset(&data, 2, 1).unwrap();
    let out = dir.path().join("run");
    let args = |extra: &[&str]| tiny_train_args(&data, &out, extra);
    fails_with(
        &args(&["--probe-epochs", "2"]),
        &["add --train-top-layers K"],
    );
    fails_with(
        &args(&[
            "--train-top-layers",
            "1",
            "--probe-epochs",
            "2",
            "--init-head",
        ]),
        &["--init-head", "drop one of them"],
    );
    fails_with(&args(&["--probe-cache", "c"]), &["add --probe-epochs N"]);
    assert!(!out.exists());
}

/// `--optimizer lamb` trains with LAMB end to end: recorded in training_args.json, resumable
/// settings included, and it moves the weights elsewhere than AdamW from the same start.
#[test]
fn lamb_trains_from_the_command_line_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 3, 3).unwrap();
    let run_with = |optimizer: &str| {
        let run = dir.path().join(optimizer);
        let out = protloc()
            .args(["train", "--model", "scratch:tiny", "--epochs", "1"])
            .args(["--batch-size", "8", "--max-residues", "48", "--lr", "1e-3"])
            .args(["--optimizer", optimizer, "--data"])
            .arg(&data)
            .arg("--output")
            .arg(&run)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("training_args.json")).unwrap())
                .unwrap();
        assert_eq!(saved["optimizer"], optimizer);
        assert_eq!(saved["scale_lr_by_world"], false);
        load(&run.join("model.safetensors"))
    };
    let lamb = run_with("lamb");
    let adamw = run_with("adamw");
    let differ = lamb
        .iter()
        .filter(|(name, t)| !same(t, &adamw[name.as_str()]))
        .count();
    assert!(differ > 0, "LAMB and AdamW trained identical weights");
    fails_with(
        &["train", "--optimizer", "sgd"].map(std::ffi::OsString::from),
        &["sgd", "adamw", "lamb"],
    );
}

/// `--precision bf16` is a GPU setting: on the CPU `train` refuses it, naming the measured
/// reason and the CPU check of the bf16 path, before reading any data; with `--frozen` it is
/// refused as meaningless; fp32 is recorded in training_args.json.
#[test]
fn bf16_is_refused_on_the_cpu_and_with_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 3, 2).unwrap();
    let args = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = ["train", "--model", "scratch:tiny", "--epochs", "1"]
            .iter()
            .chain(extra)
            .map(Into::into)
            .collect();
        a.extend(["--data".into(), data.clone().into_os_string()]);
        a.extend(["--output".into(), dir.path().join("run").into_os_string()]);
        a
    };
    fails_with(
        &args(&["--precision", "bf16", "--device", "cpu"]),
        &[
            "--precision bf16 runs on GPUs",
            "check-device --device cpu --precision bf16",
        ],
    );
    fails_with(
        &args(&["--precision", "bf16", "--frozen"]),
        &["--precision bf16", "--frozen"],
    );
    fails_with(&args(&["--precision", "fp16"]), &["fp16", "fp32", "bf16"]);
    assert!(
        !dir.path().join("run").exists(),
        "a refused run wrote its directory"
    );
    let out = protloc()
        .args(args(&["--max-residues", "32", "--precision", "fp32"]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/training_args.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["precision"], "fp32");
}

/// `eval --output` keeps every protein's outcome and 95% bootstrap intervals; `compare`
/// pairs two such reports: a model against itself differs on no protein (p = 1, a zero
/// interval), two models' counts add up to their accuracies and MCCs, and reports of other
/// proteins (or from before per-protein outcomes) are refused.
#[test]
fn compare_pairs_two_eval_reports_on_the_same_proteins() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.fasta");
    protloc::demo::write_dataset(&data, 3, 4).unwrap(); // 30 proteins
    let eval = |seed: &str, extra: &[&str]| {
        let run = dir.path().join(format!("run{seed}"));
        if !run.exists() {
            protloc()
                .args(["train", "--model", "scratch:tiny", "--epochs", "1"])
                .args(["--max-steps", "3", "--seed", seed, "--data"])
                .arg(&data)
                .arg("--output")
                .arg(&run)
                .assert()
                .success();
        }
        let out = dir.path().join(format!("eval{seed}{}.json", extra.len()));
        protloc()
            .args(["eval", "--split", "all", "--model"])
            .arg(&run)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .assert()
            .success()
            .stdout(predicate::str::contains("95% interval over proteins"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        (out, json)
    };
    let (a, ja) = eval("1", &[]);
    let (b, jb) = eval("2", &[]);
    let proteins = ja["proteins"].as_array().unwrap();
    assert_eq!(proteins.len(), 30);
    let fasta = std::fs::read_to_string(&data).unwrap();
    let ids: Vec<&str> = fasta
        .lines()
        .filter_map(|l| l.strip_prefix('>'))
        .map(|h| h.split_whitespace().next().unwrap())
        .collect();
    let right = proteins
        .iter()
        .zip(&ids)
        .filter(|(p, id)| {
            assert_eq!(p["id"], **id);
            p["label"] == p["predicted"]
        })
        .count();
    let acc = ja["report"]["accuracy"].as_f64().unwrap();
    assert_eq!(right as f64 / 30.0, acc);
    let ci = &ja["ci95"]["accuracy"];
    let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
    assert!(lo <= acc && acc <= hi && lo < hi, "{ci} around {acc}");

    let compare = |x: &Path, y: &Path| {
        let out = dir.path().join("cmp.json");
        let run = protloc()
            .arg("compare")
            .args([x, y])
            .arg("--output")
            .arg(&out)
            .assert()
            .success()
            .stdout(predicate::str::contains("McNemar's exact test"))
            .stdout(predicate::str::contains(
                " on accuracy (the 95% paired interval",
            ));
        let stdout = String::from_utf8(run.get_output().stdout.clone()).unwrap();
        let json = std::fs::read_to_string(out).unwrap();
        (
            serde_json::from_str::<serde_json::Value>(&json).unwrap(),
            stdout,
        )
    };
    let (same, printed) = compare(&a, &a);
    assert!(
        printed.contains("A and B are level on accuracy"),
        "{printed}"
    );
    assert_eq!(
        (same["only_a_right"].as_u64(), same["only_b_right"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(same["mcnemar_p"], 1.0);
    assert_eq!(
        same["accuracy_difference_ci95"],
        serde_json::json!([0.0, 0.0])
    );

    let (c, _) = compare(&a, &b);
    let n = |k: &str| c[k].as_u64().unwrap() as f64;
    assert_eq!(
        n("both_right") + n("only_a_right") + n("only_b_right") + n("both_wrong"),
        30.0
    );
    assert_eq!((n("both_right") + n("only_a_right")) / 30.0, acc);
    assert_eq!(c["accuracy"][1], jb["report"]["accuracy"]);
    // Per true location: every protein once, the discordant ones adding up to the totals.
    let rows = c["by_location"].as_array().unwrap();
    let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>() as f64;
    assert_eq!(sum("proteins"), 30.0);
    assert_eq!(
        (sum("only_a_right"), sum("only_b_right")),
        (n("only_a_right"), n("only_b_right"))
    );
    for (i, j) in [&ja, &jb].into_iter().enumerate() {
        let (got, want) = (
            c["mcc"][i].as_f64().unwrap(),
            j["report"]["mcc"].as_f64().unwrap(),
        );
        assert!(
            (got - want).abs() < 1e-12,
            "MCC {got} vs the report's {want}"
        );
    }

    let (short, _) = eval("1", &["--limit", "10"]);
    let args = |x: &Path, y: &Path| -> Vec<std::ffi::OsString> {
        vec!["compare".into(), x.into(), y.into()]
    };
    fails_with(&args(&a, &short), &["A scored 30 proteins", "B 10"]);
    let mut old = ja.clone();
    old.as_object_mut().unwrap().remove("proteins");
    let old_path = dir.path().join("old.json");
    std::fs::write(&old_path, old.to_string()).unwrap();
    fails_with(&args(&old_path, &b), &["has no per-protein outcomes"]);
}
