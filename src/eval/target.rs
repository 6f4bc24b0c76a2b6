//! What a labelled protein should be predicted as: its location(s) over a label set and its
//! membrane flag. Training's loss and evaluation's scores both read them.

use anyhow::{bail, Result};

use crate::data::{Membrane, Record};

/// Targets of one protein.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Location index (single-label) or the 0/1 indicator of every location (multi-label).
    pub location: LocationTarget,
    /// `Some(true)` membrane-bound, `Some(false)` soluble, `None` unknown (masked out).
    pub membrane: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LocationTarget {
    Single(u32),
    Multi(Vec<f32>),
}

impl LocationTarget {
    /// The location name(s) over `labels`, joined by `|` in label order: how
    /// [`crate::model::Answer::prediction`] names a prediction.
    pub fn names(&self, labels: &[String]) -> String {
        match self {
            LocationTarget::Single(k) => labels[*k as usize].clone(),
            LocationTarget::Multi(v) => v
                .iter()
                .zip(labels)
                .filter(|(&y, _)| y > 0.5)
                .map(|(_, l)| l.as_str())
                .collect::<Vec<_>>()
                .join("|"),
        }
    }
}

impl Target {
    /// Reads the targets of `record` over `labels`. Multi-label records list locations
    /// separated by `|`; in single-label mode such a record is an error.
    pub fn of(record: &Record, labels: &[String], multi_label: bool) -> Result<Self> {
        let Some(loc) = record.location.as_deref() else {
            bail!("{}: record {} has no label", record.pos, record.id);
        };
        let index = |name: &str| -> Result<usize> {
            labels.iter().position(|l| l == name).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: record {}: unknown label {name:?} (known: {})",
                    record.pos,
                    record.id,
                    labels.join(", ")
                )
            })
        };
        let location = if multi_label {
            let mut v = vec![0f32; labels.len()];
            for part in loc.split('|') {
                v[index(part)?] = 1.0;
            }
            LocationTarget::Multi(v)
        } else {
            if loc.contains('|') {
                bail!(
                    "{}: record {} has several locations ({loc}); train with --multi-label",
                    record.pos,
                    record.id
                );
            }
            LocationTarget::Single(index(loc)? as u32)
        };
        let membrane = match record.membrane {
            Membrane::Membrane => Some(true),
            Membrane::Soluble => Some(false),
            Membrane::Unknown => None,
        };
        Ok(Self { location, membrane })
    }
}
