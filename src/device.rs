//! Where tensors live: `--device auto|cpu|cuda[:N]`, resolved once per command.
//!
//! `auto` takes a GPU when the binary was built with `--features cuda` and one is present,
//! else the CPU. Under a launcher (`mpirun`, `srun`, `torchrun`) a GPU without an index is
//! the process's local rank, so each rank of a node drives its own GPU. `cuda` on a build
//! without CUDA, or on a machine without that GPU, is an error naming the fix, never a
//! silent CPU run.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

/// A device as the user names it (`auto`, `cpu`, `cuda`, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// A GPU when built with CUDA and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU: `None` is the launcher's local rank (0 without a launcher).
    Cuda(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(None)),
            other => {
                let index = other
                    .strip_prefix("cuda:")
                    .or_else(|| other.strip_prefix("gpu:"))
                    .and_then(|n| n.parse().ok());
                match index {
                    Some(n) => Ok(Self::Cuda(Some(n))),
                    None => Err(format!(
                        "unknown device {s:?}: use auto, cpu, cuda or cuda:N (N = GPU index)"
                    )),
                }
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether this binary was built with CUDA support (`--features cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// The device to run on, logged once. `local_rank` is the launcher's rank on this node
    /// (see [`crate::dist::detect_launch`]); it picks the GPU when none is named.
    pub fn resolve(self, local_rank: usize) -> Result<Device> {
        let device = match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(index) => cuda(index.unwrap_or(local_rank))?,
            Self::Auto if CUDA_BUILT && candle_core::utils::cuda_is_available() => {
                match cuda(local_rank) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!("--device auto: {e:#}; running on the CPU");
                        Device::Cpu
                    }
                }
            }
            Self::Auto => Device::Cpu,
        };
        tracing::info!(device = %describe(&device), requested = %self, "device");
        Ok(device)
    }

    /// [`Self::resolve`] with the local rank read from the launcher's variables (0 outside
    /// a launcher).
    pub fn resolve_here(self) -> Result<Device> {
        let launch = crate::dist::detect_launch(|k| std::env::var(k).ok())?;
        self.resolve(launch.map_or(0, |l| l.local_rank))
    }
}

/// `cpu` or `cuda:N`, for logs and `/v1/info`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn cuda(index: usize) -> Result<Device> {
    if !CUDA_BUILT {
        bail!(
            "--device cuda: this protloc was built without CUDA support; rebuild with \
             `cargo build --release --features cuda` (docs/gpu.md), or use --device cpu"
        );
    }
    Device::new_cuda(index).with_context(|| {
        format!(
            "--device cuda:{index}: no usable CUDA GPU {index} (is the NVIDIA driver loaded, \
             and does `nvidia-smi` list GPU {index}?); use --device cpu to run on the CPU"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for (s, want) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("CUDA", DeviceSpec::Cuda(None)),
            ("cuda:3", DeviceSpec::Cuda(Some(3))),
        ] {
            let got: DeviceSpec = s.parse().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string().parse::<DeviceSpec>().unwrap(), want);
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains(bad) && e.contains("cuda:N"), "{e}");
        }
    }

    #[test]
    fn cpu_and_auto_without_a_gpu_are_the_cpu() {
        assert!(DeviceSpec::Cpu.resolve(0).unwrap().is_cpu());
        if !CUDA_BUILT {
            assert!(DeviceSpec::Auto.resolve(1).unwrap().is_cpu());
        }
    }

    #[test]
    fn cuda_fails_with_the_fix_when_unavailable() {
        if CUDA_BUILT && candle_core::utils::cuda_is_available() {
            return;
        }
        let e = format!("{:#}", DeviceSpec::Cuda(Some(0)).resolve(0).unwrap_err());
        let fix = if CUDA_BUILT {
            "--device cpu"
        } else {
            "--features cuda"
        };
        assert!(e.contains(fix), "{e}");
    }
}
