//! `protloc check-device`: the same model, batch and updates on a GPU and on the CPU.
//!
//! Both copies start from the same weights (a checkpoint, or the seeded host-side
//! initialisation, which does not depend on the device). Compared: the encoder's last hidden
//! states and the logits of one padded batch, the gradient of every parameter, and the
//! losses of a few AdamW steps (dropout off, so both devices see the same function). Each
//! difference is taken relative to the largest magnitude of what it compares (for a
//! gradient: its own, but at least a thousandth of the largest gradient's, since some are
//! zero up to rounding, e.g. an attention key bias), and the check passes when all are
//! within the tolerance. The weights after the last step are reported relative to the
//! largest weight: Adam turns rounding-level gradients into full-size steps, so tensors
//! whose exact gradient is zero drift apart by design. The device's time per training step is
//! reported too (the CPU side can be skipped to time big models).
//!
//! `--precision bf16` runs the device side in mixed precision ([`Precision::Bf16`]) against the
//! fp32 CPU run; its differences are then judged per tensor (relative L2 error,
//! [`Diff::l2_relative`]; the gradients as one vector) instead of per element, with a looser
//! tolerance.
//!
//! `--device cpu` checks the GPU code path without a GPU: the "device" side then runs on
//! the CPU with the composed ops a GPU takes ([`crate::kernels::set_composed_only`]), and
//! is compared with the fused CPU kernels.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::optim::{Optimizer, OptimizerConfig};
use crate::device::{describe, DeviceSpec};
use crate::kernels::ops;
use crate::model::{self, HeadKind, Precision, SequenceClassifier, TaskConfig};
use crate::tokenize::TokenBatch;

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Encoder: model directory, hub id or `scratch:...`.
    pub model: String,
    /// The device compared with the CPU.
    pub device: DeviceSpec,
    pub head: HeadKind,
    /// The device side's compute precision (the CPU side is fp32).
    pub precision: Precision,
    /// Proteins per batch and the longest one's residues (the others are shorter, so the
    /// batch is padded).
    pub batch_size: usize,
    pub residues: usize,
    /// Optimizer steps compared (and timed).
    pub steps: usize,
    /// Largest relative difference that passes.
    pub tolerance: f64,
    /// Only run (and time) the device, comparing nothing.
    pub skip_cpu: bool,
    pub seed: u64,
}

/// The largest difference between two tensors, and the scale it is relative to.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub max_abs_diff: f64,
    /// Largest magnitude on the CPU side.
    pub scale: f64,
    /// `max_abs_diff / max(scale, floor)` (see the module's documentation for the floor).
    pub relative: f64,
    /// `|dev - cpu| / |cpu|` in the L2 norm: the error of the tensor as a whole, what
    /// mixed precision is judged by (its rounding is relative to each element, so one
    /// element near zero can be off by its own size).
    pub l2_relative: f64,
}

impl Diff {
    /// `floors`: the scales below which the element-wise and the L2 differences are not
    /// divided (for tensors whose exact value is zero, see the module documentation).
    fn of(cpu: &[f32], dev: &[f32], floors: (f64, f64)) -> Self {
        let max_abs_diff = cpu
            .iter()
            .zip(dev)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0f64, f64::max);
        let scale = cpu.iter().map(|a| a.abs() as f64).fold(0f64, f64::max);
        let diff: Vec<f32> = cpu.iter().zip(dev).map(|(a, b)| a - b).collect();
        Self {
            max_abs_diff,
            scale,
            relative: max_abs_diff / scale.max(floors.0).max(1e-30),
            l2_relative: l2(&diff) / l2(cpu).max(floors.1).max(1e-30),
        }
    }
}

/// One device's run: outputs, gradients, losses and timings.
struct Run {
    hidden: Vec<f32>,
    logits: Vec<f32>,
    grads: BTreeMap<String, Vec<f32>>,
    losses: Vec<f64>,
    weights: BTreeMap<String, Vec<f32>>,
    step_ms: Vec<f64>,
    /// Per step: forward (with the loss), backward, optimizer update, in ms.
    phases_ms: Vec<[f64; 3]>,
}

/// The comparison, written as JSON by the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub model: String,
    pub device: String,
    /// The device side's precision.
    pub precision: Precision,
    pub head: String,
    pub parameters: usize,
    pub batch: [usize; 2],
    pub tolerance: f64,
    /// `None` with `skip_cpu`.
    pub hidden_states: Option<Diff>,
    pub logits: Option<Diff>,
    /// Gradients compared, and the worst one.
    pub gradients_compared: usize,
    pub worst_gradient: Option<(String, Diff)>,
    /// All gradients as one vector (the parameters' order): `|dev - cpu| / |cpu|`.
    pub gradient_l2_relative: Option<f64>,
    pub device_losses: Vec<f64>,
    pub cpu_losses: Vec<f64>,
    /// Largest `|loss_dev - loss_cpu| / |loss_cpu|` over the steps.
    pub loss_relative_diff: Option<f64>,
    /// Weights after the last step, worst tensor.
    pub worst_final_weight: Option<(String, Diff)>,
    /// Median time of a training step (forward, backward, update) on each side, in ms,
    /// the first step left out.
    pub device_step_ms: f64,
    /// The device's step split into forward (with the loss), backward and optimizer update
    /// (medians, ms; the device is synchronised between them).
    pub device_phases_ms: [f64; 3],
    pub cpu_step_ms: Option<f64>,
    pub pass: bool,
}

/// Runs the check. Fails when the device cannot be opened; a mismatch is reported in
/// [`CheckReport::pass`].
pub fn check(o: &CheckOptions) -> Result<CheckReport> {
    let device = o.device.resolve_here()?;
    let composed = device.is_cpu();
    let seqs = sample_sequences(o.batch_size, o.residues, o.seed);
    crate::kernels::set_composed_only(composed);
    let dev_run = run(o, &seqs, &device, o.precision);
    crate::kernels::set_composed_only(false);
    let dev_run = dev_run?;
    let parameters = dev_run.weights.values().map(Vec::len).sum();
    let mut report = CheckReport {
        model: o.model.clone(),
        device: if composed {
            "cpu (composed ops, as on a GPU)".into()
        } else {
            describe(&device)
        },
        precision: o.precision,
        head: o.head.name(),
        parameters,
        batch: [o.batch_size, o.residues],
        tolerance: o.tolerance,
        hidden_states: None,
        logits: None,
        gradients_compared: 0,
        worst_gradient: None,
        gradient_l2_relative: None,
        device_losses: dev_run.losses.clone(),
        cpu_losses: Vec::new(),
        loss_relative_diff: None,
        worst_final_weight: None,
        device_step_ms: median(&dev_run.step_ms),
        device_phases_ms: [0, 1, 2]
            .map(|i| median(&dev_run.phases_ms.iter().map(|p| p[i]).collect::<Vec<_>>())),
        cpu_step_ms: None,
        pass: dev_run.losses.iter().all(|l| l.is_finite()),
    };
    if o.skip_cpu {
        return Ok(report);
    }
    let cpu_run = run(o, &seqs, &Device::Cpu, Precision::Fp32)?;
    // fp32 is held to every element; bf16 to each tensor as a whole (see `Diff::l2_relative`).
    let measure = |d: &Diff| match o.precision {
        Precision::Fp32 => d.relative,
        Precision::Bf16 => d.l2_relative,
    };
    let worst = |a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>, share: f64| {
        let largest = a
            .values()
            .flatten()
            .map(|x| x.abs() as f64)
            .fold(0f64, f64::max);
        let largest_norm = a.values().map(|v| l2(v)).fold(0f64, f64::max);
        let floors = (largest * share, largest_norm * share);
        a.iter()
            .filter_map(|(k, v)| b.get(k).map(|w| (k.clone(), Diff::of(v, w, floors))))
            .max_by(|x, y| measure(&x.1).total_cmp(&measure(&y.1)))
    };
    let missing: Vec<&String> = cpu_run
        .grads
        .keys()
        .filter(|k| !dev_run.grads.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        bail!("no gradient on {} for {missing:?}", report.device);
    }
    report.hidden_states = Some(Diff::of(&cpu_run.hidden, &dev_run.hidden, (0.0, 0.0)));
    report.logits = Some(Diff::of(&cpu_run.logits, &dev_run.logits, (0.0, 0.0)));
    report.gradients_compared = cpu_run.grads.len();
    report.worst_gradient = worst(&cpu_run.grads, &dev_run.grads, 1e-3);
    let (cpu_all, dev_all): (Vec<f32>, Vec<f32>) = cpu_run
        .grads
        .iter()
        .flat_map(|(k, v)| v.iter().copied().zip(dev_run.grads[k].iter().copied()))
        .unzip();
    report.gradient_l2_relative = Some(Diff::of(&cpu_all, &dev_all, (0.0, 0.0)).l2_relative);
    report.worst_final_weight = worst(&cpu_run.weights, &dev_run.weights, 1.0);
    report.loss_relative_diff = cpu_run
        .losses
        .iter()
        .zip(&dev_run.losses)
        .map(|(c, d)| (c - d).abs() / c.abs().max(1e-12))
        .reduce(f64::max);
    report.cpu_losses = cpu_run.losses;
    report.cpu_step_ms = Some(median(&cpu_run.step_ms));
    let within = |d: Option<&Diff>| d.is_some_and(|d| measure(d) <= o.tolerance);
    report.pass = report.pass
        && within(report.hidden_states.as_ref())
        && within(report.logits.as_ref())
        && match o.precision {
            Precision::Fp32 => within(report.worst_gradient.as_ref().map(|(_, d)| d)),
            // Mixed precision rounds each tensor's gradient sum differently; the gradient
            // as a whole is what the optimizer follows.
            Precision::Bf16 => report
                .gradient_l2_relative
                .is_some_and(|d| d <= o.tolerance),
        }
        && report.loss_relative_diff.is_some_and(|d| d <= o.tolerance);
    Ok(report)
}

/// The L2 norm.
fn l2(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().skip(1).copied().collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `n` seeded random proteins, the longest `residues` long, the others down to a quarter of
/// that (so the batch is padded).
fn sample_sequences(n: usize, residues: usize, seed: u64) -> Vec<String> {
    const AA: &[u8] = b"ACDEFGHIKLMNPQRSTVWY";
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = residues - (residues * 3 / 4) * i / n.max(1);
            (0..len.max(1))
                .map(|_| AA[rng.random_range(0..AA.len())] as char)
                .collect()
        })
        .collect()
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1()?)
}

fn run(o: &CheckOptions, seqs: &[String], device: &Device, precision: Precision) -> Result<Run> {
    let mut base = model::load_base(&o.model, o.seed, device, model::Purpose::Training)?;
    base.encoder.set_precision(precision);
    let labels = super::default_labels();
    let mut task = TaskConfig::new(labels.clone(), &o.model);
    task.head = o.head;
    task.pool = model::Pool::Mean;
    task.max_residues = o.residues;
    let model = SequenceClassifier::new(base, task)?;
    let encoded: Vec<_> = seqs.iter().map(|s| model.encode(s)).collect();
    let items: Vec<_> = encoded.iter().collect();
    let batch = TokenBatch::collate(&items, model.base.tokenizer.pad_id, device)?;
    let targets: Vec<u32> = (0..seqs.len()).map(|i| (i % labels.len()) as u32).collect();
    let targets = Tensor::new(targets, device)?;

    let hidden = model
        .base
        .encoder
        .forward(&batch.ids, &batch.attention_mask, None)?;
    let vars = model.base.store.vars();
    let mut opt = Optimizer::new(
        OptimizerConfig::default(),
        vars.iter()
            .map(|(n, v)| (n.clone(), v.clone(), 1.0, 0.01))
            .collect(),
    )?;
    let (mut losses, mut step_ms, mut grads) = (Vec::new(), Vec::new(), BTreeMap::new());
    let (mut logits, mut phases_ms) = (Vec::new(), Vec::new());
    let lap = |t: &mut Instant| -> Result<f64> {
        device.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        *t = Instant::now();
        Ok(ms)
    };
    for step in 0..o.steps.max(1) {
        let (start, mut t) = (Instant::now(), Instant::now());
        let out = model.forward(&batch, None)?;
        let loss = ops::cross_entropy(&out, &targets)?;
        let forward = lap(&mut t)?;
        let store = loss.backward()?;
        let g = opt.collect_grads(&store);
        let backward = lap(&mut t)?;
        opt.step(&g, 1e-4, 1.0)?;
        let update = lap(&mut t)?;
        let value = loss.to_scalar::<f32>()? as f64;
        step_ms.push(start.elapsed().as_secs_f64() * 1e3);
        phases_ms.push([forward, backward, update]);
        losses.push(value);
        if step == 0 {
            logits = host(&out)?;
            for ((name, _), g) in vars.iter().zip(&g) {
                if let Some(g) = g {
                    grads.insert(name.clone(), host(g)?);
                }
            }
        }
    }
    let weights = vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), host(v.as_tensor())?)))
        .collect::<Result<_>>()?;
    Ok(Run {
        hidden: host(&hidden)?,
        logits,
        grads,
        losses,
        weights,
        step_ms,
        phases_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_seeded_and_padded() {
        let a = sample_sequences(4, 100, 7);
        assert_eq!(a, sample_sequences(4, 100, 7));
        assert_eq!(a[0].len(), 100);
        assert!(a[3].len() < 50 && a[3].len() >= 25, "{}", a[3].len());
    }

    #[test]
    fn diff_is_relative_to_the_cpu_scale() {
        let d = Diff::of(&[2.0, -4.0], &[2.0, -3.9], (0.0, 0.0));
        assert!((d.max_abs_diff - 0.1).abs() < 1e-6 && d.scale == 4.0);
        assert!((d.relative - 0.025).abs() < 1e-6);
        // A floor above the tensor's own scale.
        let d = Diff::of(&[1e-9], &[2e-9], (1e-3, 0.0));
        assert!(d.relative < 1e-5, "{d:?}");
    }
}
