//! The GPU code path on the real checkpoints, without a GPU: `protloc check-device --device
//! cpu` runs the composed ops a GPU takes (in its own process: the switch is process-wide)
//! and compares hidden states, logits, every gradient and AdamW steps with the fused CPU
//! kernels. tools/gpu-check.sh runs the same check on a GPU.

use crate::common::{esm_dir, protloc, shared};

fn check(model: &str, head: &str, precision: &str) -> serde_json::Value {
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
            "--precision",
            precision,
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
        let r = check(&model, head, "fp32");
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

/// bf16 mixed precision on ESM-2 8M's real weights tracks fp32 (per tensor, relative L2, the
/// gradients as one vector within 5e-2) and differs from it by bf16's rounding, not zero.
#[test]
fn bf16_tracks_fp32_on_esm2() {
    let r = check(&esm_dir(), "mlp", "bf16");
    assert_eq!(r["pass"], true, "{r:#}");
    assert_eq!(r["precision"], "bf16");
    let hidden = r["hidden_states"]["l2_relative"].as_f64().unwrap();
    assert!(hidden > 1e-3 && hidden < 5e-2, "{r:#}");
    assert!(r["gradient_l2_relative"].as_f64().unwrap() < 5e-2, "{r:#}");
    assert!(r["gradients_compared"].as_u64().unwrap() >= 80, "{r:#}");
}
