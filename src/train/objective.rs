//! What a training step minimises: the location loss (single-label cross-entropy, optionally
//! class-weighted, or multi-label binary cross-entropy) plus, when the head has one, the
//! membrane/soluble loss over the proteins whose flag is known.

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use crate::eval::target::{LocationTarget, Target};
use crate::kernels::ops;
use crate::model::HeadOutput;

/// How to counter class imbalance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClassWeighting {
    /// Every protein counts the same.
    #[default]
    None,
    /// Weight each class by n / (classes x count): rare locations (Golgi, Lysosome/Vacuole,
    /// Peroxisome) count as much in total as common ones (scikit-learn's "balanced").
    Balanced,
}

/// Whether to train a membrane/soluble output next to the location.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MembraneMode {
    /// With --frozen: on when any training protein has a known flag (M or S). When
    /// fine-tuning: off (see `resolve_membrane`).
    #[default]
    Auto,
    On,
    Off,
}

impl MembraneMode {
    /// `On` or `Off`: the output decided (e.g. by a checkpoint that has it or not).
    pub fn fixed(on: bool) -> Self {
        if on {
            MembraneMode::On
        } else {
            MembraneMode::Off
        }
    }
}

/// The training loss.
#[derive(Debug, Clone)]
pub struct Objective {
    /// Per-class weights of the single-label loss.
    pub class_weights: Option<Vec<f32>>,
    pub multi_label: bool,
    pub membrane: bool,
}

impl Objective {
    /// Class weights for `targets` under `weighting` (classes absent from the data get 0).
    pub fn class_weights(
        targets: &[Target],
        num_labels: usize,
        weighting: ClassWeighting,
    ) -> Option<Vec<f32>> {
        if weighting == ClassWeighting::None {
            return None;
        }
        let mut counts = vec![0usize; num_labels];
        for t in targets {
            match &t.location {
                LocationTarget::Single(c) => counts[*c as usize] += 1,
                LocationTarget::Multi(v) => {
                    for (c, &y) in v.iter().enumerate() {
                        counts[c] += usize::from(y > 0.5);
                    }
                }
            }
        }
        let present = counts.iter().filter(|&&c| c > 0).count().max(1);
        let n: usize = counts.iter().sum();
        Some(
            counts
                .iter()
                .map(|&c| {
                    if c == 0 {
                        0.0
                    } else {
                        n as f32 / (present as f32 * c as f32)
                    }
                })
                .collect(),
        )
    }

    /// Loss of `out` against `targets` (one per row); also returns the location part alone
    /// (what the reference's "Training Loss" means).
    pub fn loss(&self, out: &HeadOutput, targets: &[&Target]) -> Result<(Tensor, f64)> {
        let device = out.logits.device();
        let location = if self.multi_label {
            let rows: Vec<f32> = targets
                .iter()
                .flat_map(|t| match &t.location {
                    LocationTarget::Multi(v) => v.clone(),
                    LocationTarget::Single(_) => unreachable!("multi-label targets"),
                })
                .collect();
            let y = Tensor::from_vec(rows, out.logits.shape(), device)?;
            ops::binary_cross_entropy_with_logits(&out.logits, &y)?
        } else {
            let labels: Vec<u32> = targets
                .iter()
                .map(|t| match t.location {
                    LocationTarget::Single(c) => c,
                    LocationTarget::Multi(_) => unreachable!("single-label targets"),
                })
                .collect();
            let weights = self
                .class_weights
                .as_ref()
                .map(|w| labels.iter().map(|&c| w[c as usize]).collect::<Vec<f32>>());
            let y = Tensor::new(labels, device)?;
            match weights {
                Some(w) => ops::weighted_cross_entropy(&out.logits, &y, &Tensor::new(w, device)?)?,
                None => ops::cross_entropy(&out.logits, &y)?,
            }
        };
        let location_value = location.to_scalar::<f32>()? as f64;
        let total = match (&out.membrane, self.membrane) {
            (Some(m), true) => location.add(&membrane_loss(m, targets, device)?)?,
            _ => location,
        };
        Ok((total, location_value))
    }
}

/// Cross-entropy of the membrane logits [B, 2] over the proteins with a known flag; unknown
/// ones (U) contribute nothing. Zero when no flag in the batch is known.
pub fn membrane_loss(logits: &Tensor, targets: &[&Target], device: &Device) -> Result<Tensor> {
    let y: Vec<u32> = targets
        .iter()
        .map(|t| u32::from(t.membrane == Some(true)))
        .collect();
    let known: Vec<f32> = targets
        .iter()
        .map(|t| if t.membrane.is_some() { 1.0 } else { 0.0 })
        .collect();
    Ok(ops::weighted_cross_entropy(
        logits,
        &Tensor::new(y, device)?,
        &Tensor::new(known, device)?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(membrane: Option<bool>) -> Target {
        Target {
            location: LocationTarget::Single(0),
            membrane,
        }
    }

    #[test]
    fn membrane_loss_ignores_unknown_flags() {
        let dev = Device::Cpu;
        // Row 0: confident "membrane" (correct for a M protein); row 1: confidently wrong,
        // but its flag is unknown, so it must not count.
        let logits = Tensor::new(&[[-5f32, 5.], [5., -5.]], &dev).unwrap();
        let (a, b) = (t(Some(true)), t(None));
        let loss = membrane_loss(&logits, &[&a, &b], &dev).unwrap();
        let only_known = membrane_loss(&logits.narrow(0, 0, 1).unwrap(), &[&a], &dev).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        assert!((l - only_known.to_scalar::<f32>().unwrap()).abs() < 1e-7);
        assert!(l < 1e-3, "{l}");
        // With the unknown flag set to soluble, the wrong row now counts.
        let c = t(Some(true));
        let wrong = membrane_loss(&logits, &[&a, &c], &dev).unwrap();
        assert!(wrong.to_scalar::<f32>().unwrap() > 4.0);
        // Nothing known: zero loss, not NaN.
        let none = membrane_loss(&logits, &[&b, &b], &dev).unwrap();
        assert_eq!(none.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn membrane_loss_has_gradient_only_from_known_rows() {
        let dev = Device::Cpu;
        let v = candle_core::Var::new(&[[0.3f32, -0.2], [1.0, 2.0]], &dev).unwrap();
        let (a, b) = (t(Some(false)), t(None));
        let loss = membrane_loss(v.as_tensor(), &[&a, &b], &dev).unwrap();
        let g = loss.backward().unwrap();
        let g: Vec<Vec<f32>> = g.get(v.as_tensor()).unwrap().to_vec2().unwrap();
        assert!(g[0][0].abs() > 1e-3 && g[0][1].abs() > 1e-3);
        assert_eq!(g[1], vec![0.0, 0.0]);
    }

    #[test]
    fn balanced_weights_equalise_class_totals() {
        let targets: Vec<Target> = [0u32, 0, 0, 1]
            .iter()
            .map(|&c| Target {
                location: LocationTarget::Single(c),
                membrane: None,
            })
            .collect();
        let w = Objective::class_weights(&targets, 3, ClassWeighting::Balanced).unwrap();
        // 4 proteins, 2 classes present: 4/(2*3) and 4/(2*1); absent class 0.
        assert!((w[0] - 4.0 / 6.0).abs() < 1e-6 && (w[1] - 2.0).abs() < 1e-6);
        assert_eq!(w[2], 0.0);
        assert!((w[0] * 3.0 - w[1] * 1.0).abs() < 1e-6);
        assert!(Objective::class_weights(&targets, 3, ClassWeighting::None).is_none());
    }
}
