//! CSV/TSV input with a header row.
//!
//! Columns are found by header name (case-insensitive, surrounding spaces ignored), so column
//! order and extra columns (DeepLoc 2.0's `partition`, `kingdom`, ...) do not matter:
//!
//! | meaning  | accepted header names (first present wins) | required |
//! | -------- | ------------------------------------------ | -------- |
//! | id       | `id`, `accession`, `name`, `entry`          | yes |
//! | sequence | `sequence`                                  | yes |
//! | label    | `label`, `location`                         | only with `require_labels` |
//! | membrane | `membrane`: `M`/`S`/`U`, `1`/`1.0`/`0`/`0.0`, empty = unknown | no |
//! | split    | `split`, `set`: `test` marks the record as test data | no |

use std::path::Path;

use super::labels::{canonical_label, valid_labels_list};
use super::{
    invalid, validate_sequence, Collector, DataError, Dataset, Membrane, RawRecord, ReadOptions,
    Record, SourcePos,
};

const ID_COLUMNS: [&str; 4] = ["id", "accession", "name", "entry"];
const SEQUENCE_COLUMNS: [&str; 1] = ["sequence"];
const LABEL_COLUMNS: [&str; 2] = ["label", "location"];
const MEMBRANE_COLUMNS: [&str; 1] = ["membrane"];
const SPLIT_COLUMNS: [&str; 2] = ["split", "set"];
const PARTITION_COLUMNS: [&str; 2] = ["partition", "fold"];

const LABEL_HINT: &str = "fill the 'label' column";

/// Field delimiter of a table file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Csv,
    Tsv,
}

impl TableKind {
    /// Guesses the kind from the extension (`.csv`; `.tsv` or `.tab`; case-insensitive).
    /// `None` means "not a table" (callers then treat the file as FASTA).
    pub fn from_path(path: &Path) -> Option<TableKind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(TableKind::Csv),
            "tsv" | "tab" => Some(TableKind::Tsv),
            _ => None,
        }
    }

    fn delimiter(self) -> u8 {
        match self {
            TableKind::Csv => b',',
            TableKind::Tsv => b'\t',
        }
    }
}

/// Column positions resolved from the header row.
struct Columns {
    id: usize,
    sequence: usize,
    label: Option<usize>,
    membrane: Option<usize>,
    split: Option<usize>,
    partition: Option<usize>,
}

impl Columns {
    fn resolve(headers: &csv::StringRecord, path: &Path) -> Result<Columns, DataError> {
        let find = |names: &[&str]| {
            names.iter().find_map(|want| {
                headers
                    .iter()
                    .position(|h| h.trim().eq_ignore_ascii_case(want))
            })
        };
        let require = |names: &[&str]| {
            find(names).ok_or_else(|| {
                let found: Vec<&str> = headers.iter().collect();
                invalid(
                    path,
                    1,
                    format!(
                        "header row has no {} column (found: {})",
                        names
                            .iter()
                            .map(|n| format!("'{n}'"))
                            .collect::<Vec<_>>()
                            .join(" or "),
                        found.join(", ")
                    ),
                )
            })
        };
        Ok(Columns {
            id: require(&ID_COLUMNS)?,
            sequence: require(&SEQUENCE_COLUMNS)?,
            label: find(&LABEL_COLUMNS),
            membrane: find(&MEMBRANE_COLUMNS),
            split: find(&SPLIT_COLUMNS),
            partition: find(&PARTITION_COLUMNS),
        })
    }
}

/// Reads a CSV/TSV table with a header row (see the module docs for the columns).
///
/// Errors name the file and the 1-based line of the row (the header is line 1). Malformed
/// rows (wrong number of fields, invalid UTF-8) end reading even with `skip_invalid`, since
/// the table structure can no longer be trusted; invalid contents only skip their row.
pub fn read_table(path: &Path, kind: TableKind, opts: ReadOptions) -> Result<Dataset, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(kind.delimiter())
        .has_headers(true)
        .from_path(path)
        .map_err(|e| csv_error(path, e))?;
    let headers = reader.headers().map_err(|e| csv_error(path, e))?.clone();
    if headers.iter().all(|h| h.trim().is_empty()) {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    let columns = Columns::resolve(&headers, path)?;
    let mut collector = Collector::new(path, opts, LABEL_HINT);
    let mut row = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut row) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(path, e)),
        }
        let line = row.position().map_or(0, |p| p.line() as usize);
        collector.push(parse_row(&row, &columns, path, line, opts.multi_label))?;
    }
    collector.finish()
}

/// Reads a table of proteins to predict on (a request body) as written. With a header row
/// naming a `sequence` (or `seq`) column, the id is the first column named `id`,
/// `accession`, `name` or `entry` (none is needed); without one, a single column is the sequence and two
/// columns are `id,sequence`. Rows may be ragged, blank rows are skipped, and sequences are
/// not validated (see [`RawRecord`]).
///
/// Errors name the line; `name` stands in for the file name. Text without rows gives no
/// records.
pub fn read_sequence_table(
    name: &str,
    text: &str,
    kind: TableKind,
) -> Result<Vec<RawRecord>, DataError> {
    let path = Path::new(name);
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(kind.delimiter())
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut rows = reader.records();
    let first = match rows.next() {
        None => return Ok(Vec::new()),
        Some(r) => r.map_err(|e| csv_error(path, e))?,
    };
    let line_of = |row: &csv::StringRecord| row.position().map_or(0, |p| p.line() as usize);
    let names: Vec<String> = first
        .iter()
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let sequence = names
        .iter()
        .position(|n| SEQUENCE_COLUMNS.contains(&n.as_str()) || n == "seq");
    let (id_col, seq_col, header) = match sequence {
        Some(s) => {
            let id = names.iter().position(|n| ID_COLUMNS.contains(&n.as_str()));
            (id, s, true)
        }
        None => match first.len() {
            1 => (None, 0, false),
            2 => (Some(0), 1, false),
            n => {
                return Err(invalid(
                    path,
                    line_of(&first),
                    format!("{n} columns but no header naming a \"sequence\" column"),
                ))
            }
        },
    };
    let mut out = Vec::new();
    let mut take = |row: &csv::StringRecord| -> Result<(), DataError> {
        if row.iter().all(|f| f.trim().is_empty()) {
            return Ok(());
        }
        let line = line_of(row);
        let sequence = row
            .get(seq_col)
            .ok_or_else(|| invalid(path, line, format!("no column {}", seq_col + 1)))?;
        out.push(RawRecord {
            id: id_col.and_then(|c| row.get(c)).map(str::to_string),
            sequence: sequence.to_string(),
            line,
        });
        Ok(())
    };
    if !header {
        take(&first)?;
    }
    for row in rows {
        take(&row.map_err(|e| csv_error(path, e))?)?;
    }
    Ok(out)
}

fn parse_row(
    row: &csv::StringRecord,
    columns: &Columns,
    path: &Path,
    line: usize,
    multi_label: bool,
) -> Result<Record, DataError> {
    // Every row has all columns (the csv reader rejects ragged rows), so `get` cannot miss.
    let field = |i: usize| row.get(i).unwrap_or("").trim();
    let id = field(columns.id);
    if id.is_empty() {
        return Err(invalid(path, line, "empty id"));
    }
    let err = |msg: String| invalid(path, line, format!("record {id:?}: {msg}"));
    let sequence = validate_sequence(field(columns.sequence)).map_err(err)?;
    let location = match columns.label.map(field).filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) if raw.contains('|') && !multi_label => {
            return Err(err(format!(
                "multi-label rows are not supported in single-label mode (label {raw:?}); use --multi-label"
            )))
        }
        Some(raw) if raw.contains('|') => {
            let parts = raw
                .split('|')
                .map(|p| {
                    canonical_label(p).ok_or_else(|| {
                        err(format!(
                            "unknown label {p:?} in {raw:?} (valid labels: {})",
                            valid_labels_list()
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(parts.join("|"))
        }
        Some(raw) => Some(
            canonical_label(raw)
                .ok_or_else(|| {
                    err(format!(
                        "unknown label {raw:?} (valid labels: {})",
                        valid_labels_list()
                    ))
                })?
                .to_string(),
        ),
    };
    let partition = match columns.partition.map(field).filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => Some(
            raw.parse::<f64>()
                .ok()
                .filter(|p| p.fract() == 0.0 && *p >= 0.0)
                .map(|p| p as u32)
                .ok_or_else(|| err(format!("invalid partition {raw:?} (expected 0, 1, 2, ...)")))?,
        ),
    };
    let membrane = match columns.membrane.map(field) {
        None => Membrane::Unknown,
        Some(raw) => parse_membrane(raw).ok_or_else(|| {
            err(format!(
                "invalid membrane value {raw:?} (expected M, S, U, 1, 0 or empty)"
            ))
        })?,
    };
    let is_test = columns
        .split
        .map(field)
        .is_some_and(|s| s.eq_ignore_ascii_case("test"));
    Ok(Record {
        id: id.to_string(),
        sequence,
        location,
        membrane,
        is_test,
        partition,
        pos: SourcePos {
            file: path.to_path_buf(),
            line,
        },
    })
}

/// Membrane flag as written by DeepLoc 1.0 (`M`/`S`/`U`) or DeepLoc 2.0 (`1.0`/`0.0`).
fn parse_membrane(raw: &str) -> Option<Membrane> {
    match raw.to_ascii_lowercase().as_str() {
        "m" | "1" | "1.0" | "membrane" => Some(Membrane::Membrane),
        "s" | "0" | "0.0" | "soluble" => Some(Membrane::Soluble),
        "u" | "" | "unknown" => Some(Membrane::Unknown),
        _ => None,
    }
}

/// Converts a csv error into a [`DataError`] that names the line when csv knows it.
fn csv_error(path: &Path, e: csv::Error) -> DataError {
    let line = e.position().map(|p| p.line() as usize);
    match e.into_kind() {
        csv::ErrorKind::Io(io) => DataError::Io(path.to_path_buf(), io),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => invalid(
            path,
            line.unwrap_or(0),
            format!("row has {len} fields but the header has {expected_len}"),
        ),
        csv::ErrorKind::Utf8 { .. } => {
            invalid(path, line.unwrap_or(0), "row is not valid UTF-8 text")
        }
        other => invalid(path, line.unwrap_or(0), format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_tmp(suffix: &str, content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(suffix).tempfile().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    #[test]
    fn kind_from_extension() {
        assert_eq!(
            TableKind::from_path(Path::new("a.CSV")),
            Some(TableKind::Csv)
        );
        assert_eq!(
            TableKind::from_path(Path::new("a.tsv")),
            Some(TableKind::Tsv)
        );
        assert_eq!(
            TableKind::from_path(Path::new("a.Tab")),
            Some(TableKind::Tsv)
        );
        assert_eq!(TableKind::from_path(Path::new("a.fasta")), None);
        assert_eq!(TableKind::from_path(Path::new("csv")), None);
    }

    #[test]
    fn membrane_values() {
        assert_eq!(parse_membrane("1.0"), Some(Membrane::Membrane));
        assert_eq!(parse_membrane("m"), Some(Membrane::Membrane));
        assert_eq!(parse_membrane("0"), Some(Membrane::Soluble));
        assert_eq!(parse_membrane(""), Some(Membrane::Unknown));
        assert_eq!(parse_membrane("0.5"), None);
    }

    #[test]
    fn reads_csv_with_any_column_order() {
        let f = write_tmp(
            ".csv",
            "\u{feff}Sequence,Label,Accession,membrane,split\nmkv,Cell membrane,P1,1.0,test\nAC,,P2,,train\n",
        );
        let d = read_table(f.path(), TableKind::Csv, ReadOptions::default()).unwrap();
        let r = &d.records[0];
        assert_eq!(
            (r.id.as_str(), r.sequence.as_str(), r.location.as_deref()),
            ("P1", "MKV", Some("Cell.membrane"))
        );
        assert_eq!(
            (r.membrane, r.is_test, r.pos.line),
            (Membrane::Membrane, true, 2)
        );
        let r = &d.records[1];
        assert_eq!((r.location.as_deref(), r.is_test), (None, false));
    }

    #[test]
    fn ragged_row_is_fatal_with_line() {
        let f = write_tmp(".tsv", "id\tsequence\nP1\tMK\nP2\tMK\textra\n");
        let opts = ReadOptions {
            skip_invalid: true,
            ..Default::default()
        };
        let e = read_table(f.path(), TableKind::Tsv, opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(":3:") && e.contains("3 fields"), "{e}");
    }

    #[test]
    fn missing_columns() {
        let f = write_tmp(".csv", "id,seq\nP1,MK\n");
        let e = read_table(f.path(), TableKind::Csv, ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":1:") && e.contains("'sequence'") && e.contains("seq"),
            "{e}"
        );
    }

    #[test]
    fn sequence_tables_for_prediction() {
        let read = |t: &str| {
            read_sequence_table("body", t, TableKind::Csv).map(|r| {
                r.into_iter()
                    .map(|r| (r.id, r.sequence, r.line))
                    .collect::<Vec<_>>()
            })
        };
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            read("\u{feff}Seq,Entry,Name\nmkt,P1,N\n , \nW\n").unwrap(),
            vec![(s("P1"), "mkt".to_string(), 2), (None, "W".to_string(), 4)]
        );
        assert_eq!(read("seq\nA\n\nC\n").unwrap().len(), 2);
        assert_eq!(read("P1,MKT\nP2,W\n").unwrap().len(), 2);
        let e = read("P1,MKT\nW\n").unwrap_err().to_string();
        assert_eq!(e, "body:2: no column 2");
        assert_eq!(read("MKT\n").unwrap(), vec![(None, "MKT".to_string(), 1)]);
        assert!(read("").unwrap().is_empty());
        let e = read("a,b,c\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "body:1: 3 columns but no header naming a \"sequence\" column"
        );
        let e = read("id,x,sequence\nP1,1\n").unwrap_err().to_string();
        assert_eq!(e, "body:2: no column 3");
    }

    #[test]
    fn empty_tables() {
        for content in ["", "id,sequence\n"] {
            let f = write_tmp(".csv", content);
            let e = read_table(f.path(), TableKind::Csv, ReadOptions::default()).unwrap_err();
            assert!(matches!(e, DataError::Empty(_)), "{content:?}: {e}");
        }
    }
}
