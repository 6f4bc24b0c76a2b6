//! The GPU code path, checked on the CPU: with the fused CPU kernels switched off
//! (`kernels::set_composed_only`), every op takes the composed form a GPU runs, the
//! optimizer keeps its moments as tensors and updates them with tensor ops, and the packed
//! inference path is off. `check-device --device cpu` compares that with the fused kernels:
//! hidden states, logits, the gradient of every parameter and the losses of several AdamW
//! steps must agree. One test per binary: the switch is process-wide.

use protloc::device::DeviceSpec;
use protloc::model::{HeadKind, Precision};
use protloc::train::device_check::{check, CheckOptions};

#[test]
fn composed_ops_match_the_fused_kernels_for_every_head() {
    for (model, head) in [
        ("scratch:tiny", HeadKind::LightAttention),
        ("scratch:tiny", HeadKind::Reference),
        ("scratch:small", HeadKind::Mlp),
    ] {
        let r = check(&CheckOptions {
            model: model.into(),
            device: DeviceSpec::Cpu,
            head,
            precision: Precision::Fp32,
            batch_size: 3,
            residues: 40,
            steps: 4,
            tolerance: 1e-4,
            skip_cpu: false,
            seed: 3,
        })
        .unwrap();
        assert!(r.device.contains("composed"), "{}", r.device);
        assert!(r.pass, "{model} {head:?}: {r:#?}");
        // Every trainable tensor got a gradient on both paths, and the training moved.
        assert!(r.gradients_compared > 10, "{}", r.gradients_compared);
        assert_eq!(r.cpu_losses.len(), 4);
        assert!(r.cpu_losses[3] < r.cpu_losses[0], "{:?}", r.cpu_losses);
        let w = r.worst_final_weight.as_ref().unwrap();
        assert!(w.1.relative < 1e-4, "{w:?}");
    }
    // Mixed precision on the same path: bf16 activations and products on f32 weights track
    // the fp32 fused kernels (per tensor, L2), every parameter still gets an f32 gradient,
    // and the differences are bf16's, not zero (the precision really changed).
    for model in ["scratch:tiny", "scratch:small"] {
        let r = check(&CheckOptions {
            model: model.into(),
            device: DeviceSpec::Cpu,
            head: HeadKind::Mlp,
            precision: Precision::Bf16,
            batch_size: 3,
            residues: 40,
            steps: 4,
            tolerance: 5e-2,
            skip_cpu: false,
            seed: 3,
        })
        .unwrap();
        assert!(r.pass, "{model} bf16: {r:#?}");
        assert!(r.gradients_compared > 10, "{}", r.gradients_compared);
        let hidden = r.hidden_states.as_ref().unwrap().l2_relative;
        assert!(hidden > 1e-4 && hidden < 2e-2, "{hidden}");
        assert!(r.gradient_l2_relative.unwrap() < 2e-2, "{r:#?}");
        assert!(r.device_losses.iter().all(|l| l.is_finite()));
        assert!(
            r.device_losses[3] < r.device_losses[0],
            "{:?}",
            r.device_losses
        );
    }
}
