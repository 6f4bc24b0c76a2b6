//! The GPU code path on the real checkpoints, without a GPU: `protloc check-device --device
//! cpu` runs the composed ops a GPU takes (in its own process: the switch is process-wide)
//! and compares hidden states, logits, every gradient and AdamW steps with the fused CPU
//! kernels. tools/gpu-check.sh runs the same check on a GPU.

use crate::common::{esm_dir, protloc, shared};

fn check(model: &str, head: &str) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("check.json");
    protloc()
        .args([
            "check-device",
            "--model",
            model,
            "--device",
            "cpu",
            "--head",
            head,
        ])
        .args([
            "--batch-size",
            "3",
            "--residues",
            "96",
            "--steps",
            "3",
            "--output",
        ])
        .arg(&out)
        .assert()
        .success();
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

#[test]
fn composed_ops_match_fused_kernels_on_esm2_and_antiberty() {
    let antiberty = shared("weights/antiberty").display().to_string();
    for (model, head, min_grads) in [
        (esm_dir(), "light-attention", 80),
        (antiberty, "reference", 100),
    ] {
        let r = check(&model, head);
        assert_eq!(r["pass"], true, "{r:#}");
        assert!(
            r["gradients_compared"].as_u64().unwrap() >= min_grads,
            "{r:#}"
        );
        for key in ["hidden_states", "logits"] {
            assert!(r[key]["relative"].as_f64().unwrap() <= 1e-4, "{key}: {r:#}");
        }
        assert!(r["cpu_losses"].as_array().unwrap().len() == 3, "{r:#}");
    }
}
