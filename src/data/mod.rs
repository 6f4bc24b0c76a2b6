//! Reading protein data sets: DeepLoc-style FASTA, plain FASTA and CSV/TSV tables.
//!
//! Every record is validated on the way in (residues, labels, duplicate ids) and every
//! error names the file and line it came from. Nothing is dropped silently: with
//! `skip_invalid` bad records are counted and reported as warnings instead.

pub mod fasta;
pub mod labels;
pub mod split;
pub mod stats;
pub mod table;

use std::fmt;
use std::path::{Path, PathBuf};

pub use labels::{canonical_label, DEEPLOC_LOCATIONS};

/// Membrane-association flag of a DeepLoc record (`-M`, `-S`, `-U`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Membrane {
    Membrane,
    Soluble,
    Unknown,
}

impl Membrane {
    pub fn as_char(self) -> char {
        match self {
            Membrane::Membrane => 'M',
            Membrane::Soluble => 'S',
            Membrane::Unknown => 'U',
        }
    }
}

/// Where a record came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePos {
    pub file: PathBuf,
    /// 1-based line of the record's header (FASTA) or row (tables).
    pub line: usize,
}

impl fmt::Display for SourcePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One protein. `sequence` is upper-case and validated (see [`validate_sequence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub sequence: String,
    /// Canonical location label (one of the model's labels), `None` for unlabeled input.
    pub location: Option<String>,
    pub membrane: Membrane,
    /// Tagged `test` in a DeepLoc FASTA header (the official test set).
    pub is_test: bool,
    /// Homology partition (CSV `partition` column, e.g. DeepLoc 2.0's 0-4).
    pub partition: Option<u32>,
    pub pos: SourcePos,
}

/// A record of input to predict on, as written (see [`fasta::read_fasta_text`],
/// [`table::read_sequence_table`]): not yet validated, so that callers can bound and count the
/// records before validating them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// The id given, if any (it may be empty).
    pub id: Option<String>,
    /// The residues as written (any case, whitespace, invalid letters).
    pub sequence: String,
    /// 1-based line of the record's header (FASTA) or row (tables).
    pub line: usize,
}

/// Options for the readers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Downgrade invalid records to counted warnings instead of failing.
    pub skip_invalid: bool,
    /// Every record must carry a location label (training/evaluation input).
    pub require_labels: bool,
    /// Accept several locations per record (`Nucleus|Cytoplasm`, DeepLoc 2.0); `location`
    /// then holds the canonical names joined by `|`.
    pub multi_label: bool,
}

/// A fully read data set plus warnings for records skipped under `skip_invalid`.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub records: Vec<Record>,
    pub skipped: Vec<String>,
}

/// Errors from reading data. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}: cannot read file: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0}: file contains no records")]
    Empty(PathBuf),
    #[error("{pos}: {msg}")]
    Invalid { pos: SourcePos, msg: String },
}

/// Residue letters accepted on input (20 standard + X, U, Z, O, B; case-insensitive).
pub const ACCEPTED_RESIDUES: &str = "ACDEFGHIKLMNPQRSTVWYXUZOB";

/// Upper-cases a raw sequence, drops whitespace and a single trailing `*` (stop codon),
/// and checks every letter. Errors name the 1-based position and the offending character.
pub fn validate_sequence(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let trimmed = raw.trim_end();
    let trimmed = trimmed.strip_suffix('*').unwrap_or(trimmed);
    for c in trimmed.chars() {
        if c.is_whitespace() {
            continue;
        }
        let u = c.to_ascii_uppercase();
        if !ACCEPTED_RESIDUES.contains(u) {
            return Err(format!(
                "invalid residue {:?} at position {} (accepted: {})",
                c,
                out.len() + 1,
                ACCEPTED_RESIDUES
            ));
        }
        out.push(u);
    }
    if out.is_empty() {
        return Err("empty sequence".to_string());
    }
    Ok(out)
}

/// Reads a labeled or unlabeled data set, choosing the format from the extension:
/// `.csv`/`.tsv` are tables, everything else is FASTA (DeepLoc headers are parsed when present).
pub fn read_dataset(path: &Path, opts: ReadOptions) -> Result<Dataset, DataError> {
    match table::TableKind::from_path(path) {
        Some(kind) => table::read_table(path, kind, opts),
        None => fasta::read_fasta(path, opts),
    }
}

/// Shorthand for a [`DataError::Invalid`] at `file:line`.
pub(crate) fn invalid(file: &Path, line: usize, msg: impl Into<String>) -> DataError {
    DataError::Invalid {
        pos: SourcePos {
            file: file.to_path_buf(),
            line,
        },
        msg: msg.into(),
    }
}

/// Checks shared by every reader once a record has been parsed: duplicate ids, missing labels,
/// and the `skip_invalid` policy. Readers hand it per-record results; structural errors that
/// make the rest of the file unreadable must be returned by the reader directly instead.
pub(crate) struct Collector {
    path: PathBuf,
    opts: ReadOptions,
    records: Vec<Record>,
    skipped: Vec<String>,
    /// Kept so that a file whose records are all invalid reports the real problem, not "empty".
    first_error: Option<DataError>,
    /// id -> line of its first occurrence, so duplicate errors can point at both.
    seen: std::collections::HashMap<String, usize>,
    /// Format-specific advice appended to "missing label" errors.
    label_hint: &'static str,
}

impl Collector {
    pub(crate) fn new(path: &Path, opts: ReadOptions, label_hint: &'static str) -> Self {
        Collector {
            label_hint,
            path: path.to_path_buf(),
            opts,
            records: Vec::new(),
            skipped: Vec::new(),
            first_error: None,
            seen: std::collections::HashMap::new(),
        }
    }

    /// Accepts a record or a record-level error. Returns `Err` when reading must stop
    /// (an invalid record without `skip_invalid`).
    pub(crate) fn push(&mut self, item: Result<Record, DataError>) -> Result<(), DataError> {
        match item.and_then(|r| self.check(r)) {
            Ok(record) => {
                self.seen.insert(record.id.clone(), record.pos.line);
                self.records.push(record);
                Ok(())
            }
            Err(e) if self.opts.skip_invalid => {
                self.skipped.push(e.to_string());
                self.first_error.get_or_insert(e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn check(&self, record: Record) -> Result<Record, DataError> {
        if let Some(first) = self.seen.get(&record.id) {
            return Err(invalid(
                &self.path,
                record.pos.line,
                format!("duplicate id {:?} (first seen at line {first})", record.id),
            ));
        }
        if self.opts.require_labels && record.location.is_none() {
            return Err(invalid(
                &self.path,
                record.pos.line,
                format!(
                    "record {:?} has no location label, but labels are required ({})",
                    record.id, self.label_hint
                ),
            ));
        }
        Ok(record)
    }

    /// Ends reading: an empty result is an error (the first skipped problem if any, else `Empty`).
    pub(crate) fn finish(self) -> Result<Dataset, DataError> {
        if self.records.is_empty() {
            return Err(self.first_error.unwrap_or(DataError::Empty(self.path)));
        }
        Ok(Dataset {
            records: self.records,
            skipped: self.skipped,
        })
    }
}

/// Digest of a protein sequence (case-insensitive): FNV-1a 64 plus the length. Keys the
/// embedding cache and identifies records in a run's `split.tsv`. Collisions
/// among millions of distinct proteins are vanishingly unlikely (~n^2 / 2^65).
pub fn sequence_key(sequence: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sequence.bytes() {
        h ^= b.to_ascii_uppercase() as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}-{}", sequence.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn validate_sequence_examples() {
        assert_eq!(validate_sequence("mk vl\nA*\n").unwrap(), "MKVLA");
        assert_eq!(validate_sequence("*").unwrap_err(), "empty sequence");
        assert_eq!(validate_sequence(" \n").unwrap_err(), "empty sequence");
        let e = validate_sequence("MK*V").unwrap_err();
        assert!(e.contains("'*'") && e.contains("position 3"), "{e}");
    }

    proptest! {
        /// Accepted letters in any case, with whitespace anywhere, come back upper-cased.
        #[test]
        fn validate_accepts_residues(raw in "[ACDEFGHIKLMNPQRSTVWYXUZOBacdefghiklmnpqrstvwyxuzob \n\t]{0,80}") {
            let letters: String =
                raw.chars().filter(|c| !c.is_whitespace()).map(|c| c.to_ascii_uppercase()).collect();
            match validate_sequence(&raw) {
                Ok(seq) => prop_assert_eq!(seq, letters),
                Err(e) => {
                    prop_assert!(letters.is_empty());
                    prop_assert_eq!(e, "empty sequence");
                }
            }
        }

        /// One bad character is reported at its residue position.
        #[test]
        fn validate_reports_position(
            prefix in "[ACDEFGHIKLMNPQRSTVWY]{0,40}",
            bad in "[0-9JjBb@#.-]",
            suffix in "[ACDEFGHIKLMNPQRSTVWY]{0,40}",
        ) {
            let raw = format!("{prefix}{bad}{suffix}");
            let result = validate_sequence(&raw);
            if bad.eq_ignore_ascii_case("b") {
                // B (Asx) is accepted.
                prop_assert!(result.is_ok());
            } else {
                let e = result.unwrap_err();
                let expected = format!("position {}", prefix.len() + 1);
                prop_assert!(e.contains(&expected), "{}", e);
            }
        }
    }
}
