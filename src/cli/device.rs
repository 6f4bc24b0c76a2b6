//! `protloc check-device`: a GPU build checked against the CPU on one model (see
//! [`crate::train::device_check`]).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::device::DeviceSpec;
use crate::model::{HeadKind, Precision};
use crate::train::device_check::{check, CheckOptions};

#[derive(Args, Debug)]
pub struct CheckDeviceCmd {
    /// Encoder: a model directory, a hub id, or scratch:SIZE / scratch:DIR (random weights).
    #[arg(long)]
    pub model: String,
    /// The device compared with the CPU; `cpu` checks the GPU code path (the composed ops)
    /// against the fused CPU kernels on a machine without a GPU.
    #[arg(long, value_name = "cpu|cuda[:N]", default_value = "cuda")]
    pub device: DeviceSpec,
    /// Head on the encoder (the gradients of every encoder layer flow through it).
    #[arg(long, value_enum, default_value_t = HeadKind::LightAttention)]
    pub head: HeadKind,
    /// Proteins in the batch (the longest has --residues residues, the others fewer).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Residues of the batch's longest protein.
    #[arg(long, default_value_t = 128)]
    pub residues: usize,
    /// AdamW steps compared (and timed).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// The device side's compute precision (the CPU side is always fp32): bf16 checks the
    /// mixed-precision path against fp32. Use it with --head mlp: light attention's max
    /// pooling sends each gradient to one position, which bf16 rounding can move.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Largest difference that passes, relative to the largest magnitude compared (default
    /// 1e-4 in fp32, 5e-2 in bf16).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Only run and time the device (for models too big to run on the CPU).
    #[arg(long)]
    pub skip_cpu: bool,
    /// Random seed of the batch's proteins and of newly initialized weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the report as JSON (atomically).
    #[arg(long, value_name = "JSON")]
    pub output: Option<PathBuf>,
}

pub fn run(c: CheckDeviceCmd) -> Result<()> {
    if c.batch_size == 0 || c.residues == 0 {
        bail!("--batch-size and --residues must be at least 1");
    }
    let r = check(&CheckOptions {
        model: c.model,
        device: c.device,
        head: c.head,
        batch_size: c.batch_size,
        residues: c.residues,
        steps: c.steps,
        precision: c.precision,
        tolerance: c.tolerance.unwrap_or(match c.precision {
            Precision::Fp32 => 1e-4,
            Precision::Bf16 => 5e-2,
        }),
        skip_cpu: c.skip_cpu,
        seed: c.seed,
    })?;
    let json = serde_json::to_string_pretty(&r)?;
    match &c.output {
        Some(p) => crate::artifacts::write_atomic(p, json.as_bytes())?,
        None => println!("{json}"),
    }
    // Relative differences as the check judges them: element-wise in fp32, per tensor (L2)
    // in bf16.
    let judged = |d: &crate::train::device_check::Diff| match r.precision {
        Precision::Fp32 => d.relative,
        Precision::Bf16 => d.l2_relative,
    };
    let rel = |d: &Option<crate::train::device_check::Diff>| {
        d.as_ref()
            .map_or("-".into(), |d| format!("{:.1e}", judged(d)))
    };
    eprintln!(
        "{} ({}) vs cpu (fp32), {} ({} parameters): hidden {}, logits {}, worst gradient {} ({}), all gradients {}, losses {}; {:.1} ms/step on the device (forward {:.1}, backward {:.1}, update {:.1}){}",
        r.device,
        r.precision,
        r.model,
        r.parameters,
        rel(&r.hidden_states),
        rel(&r.logits),
        r.worst_gradient.as_ref().map_or("-".into(), |(_, d)| format!("{:.1e}", judged(d))),
        r.worst_gradient.as_ref().map_or("-", |(n, _)| n.as_str()),
        r.gradient_l2_relative.map_or("-".into(), |d| format!("{d:.1e} (L2)")),
        r.loss_relative_diff.map_or("-".into(), |d| format!("{d:.1e}")),
        r.device_step_ms,
        r.device_phases_ms[0],
        r.device_phases_ms[1],
        r.device_phases_ms[2],
        r.cpu_step_ms.map_or(String::new(), |c| format!(", {c:.1} on the cpu")),
    );
    if !r.pass {
        bail!(
            "{} differs from the cpu by more than {} (relative); see the report above",
            r.device,
            r.tolerance
        );
    }
    Ok(())
}
