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
    pub pos: SourcePos,
}

/// Options for the readers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Downgrade invalid records to counted warnings instead of failing.
    pub skip_invalid: bool,
    /// Every record must carry a location label (training/evaluation input).
    pub require_labels: bool,
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
