//! FASTA input: DeepLoc-style headers (`>ACCESSION Location-Flag [test]`) and plain FASTA.
//!
//! Record structure (header / wrapped sequence lines) is parsed by `noodles-fasta`; this module
//! adds line tracking for error messages, header interpretation and validation.
//!
//! Each record is classified on its own: a description whose first word is `<label>-<S|M|U>`
//! is a DeepLoc header, anything else is plain FASTA and gives an unlabeled record. A first word
//! shaped like a DeepLoc tag whose label is unknown (`Nucleolus-S`) is an error rather than an
//! unlabeled record, because it is almost certainly a typo that would otherwise lose the label.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use noodles_fasta as nfasta;
use noodles_fasta::record::definition::ParseError;
use noodles_fasta::record::Definition;

use super::labels::{canonical_label, valid_labels_list};
use super::{invalid, validate_sequence, Collector, DataError, Membrane, ReadOptions, Record};
use super::{Dataset, RawRecord, SourcePos};

/// Appended to "missing label" errors so users know what a labeled header looks like.
const LABEL_HINT: &str =
    "expected a DeepLoc header like '>P12345 Nucleus-S' or '>P12345 Nucleus-S test'";

/// Reads a whole FASTA file, validating every record and rejecting duplicate ids.
///
/// Errors name the file and the 1-based line of the offending record's header. With
/// `opts.skip_invalid`, invalid records are listed in [`Dataset::skipped`] instead; a file that
/// is structurally not FASTA still fails, as does one in which no record is valid.
pub fn read_fasta(path: &Path, opts: ReadOptions) -> Result<Dataset, DataError> {
    let mut stream = FastaStream::open(path)?;
    let mut collector = Collector::new(path, opts, LABEL_HINT);
    loop {
        match stream.next_item() {
            Item::Eof => break,
            Item::Record(r) => collector.push(Ok(r))?,
            Item::Invalid(e) => collector.push(Err(e))?,
            Item::Fatal(e) => return Err(e),
        }
    }
    collector.finish()
}

/// A constant-memory iterator over the records of a FASTA file, for prediction on files too
/// large to hold in memory.
///
/// Each record is validated like in [`read_fasta`]; an invalid record yields `Err` and the
/// iterator moves on to the next record, so callers can choose to skip or stop. An error that
/// makes the rest of the file unreadable (I/O failure, not FASTA at all) is yielded once and
/// then the iterator ends. A file without any record yields a single [`DataError::Empty`].
///
/// Unlike [`read_fasta`], duplicate ids are **not** detected: that would need memory
/// proportional to the file. Labels are parsed when present but not required unless
/// [`FastaStream::require_labels`] is set.
pub struct FastaStream {
    path: PathBuf,
    reader: nfasta::Reader<LineCounter<Box<dyn Read + Send>>>,
    /// Newlines consumed so far, shared with the [`LineCounter`] inside `reader` (noodles does
    /// not give access to its inner reader).
    lines: Arc<AtomicUsize>,
    require_labels: bool,
    /// Set after EOF or a fatal error so the iterator is fused.
    done: bool,
    /// Whether anything (record or error) was yielded, to report empty files.
    yielded: bool,
    header: String,
    sequence: Vec<u8>,
}

/// A header and its sequence as read, before interpretation; `Fatal` ends reading.
enum Raw {
    Record { line: usize },
    Fatal(DataError),
    Eof,
}

/// One step of the stream; `Invalid` is about one record, `Fatal` ends reading.
enum Item {
    Record(Record),
    Invalid(DataError),
    Fatal(DataError),
    Eof,
}

impl FastaStream {
    /// Opens `path` for streaming. Fails only if the file cannot be opened.
    pub fn open(path: &Path) -> Result<FastaStream, DataError> {
        let file = File::open(path).map_err(|e| DataError::Io(path.to_path_buf(), e))?;
        Ok(Self::from_reader(path, file))
    }

    /// Streams FASTA from any reader (request bodies, stdin, fuzzers); `name` stands in for
    /// the file name in error messages.
    pub fn from_reader(
        name: impl Into<PathBuf>,
        reader: impl Read + Send + 'static,
    ) -> FastaStream {
        let lines = Arc::new(AtomicUsize::new(0));
        let boxed: Box<dyn Read + Send> = Box::new(reader);
        let counter = LineCounter {
            // Large buffer: noodles tests for '>' at the start of each buffered chunk, so a '>'
            // inside a sequence line longer than the buffer could land on a chunk boundary and
            // be taken for a header. With 64 KiB chunks that needs absurdly long lines.
            inner: BufReader::with_capacity(1 << 16, boxed),
            lines: Arc::clone(&lines),
        };
        FastaStream {
            path: name.into(),
            reader: nfasta::Reader::new(counter),
            lines,
            require_labels: false,
            done: false,
            yielded: false,
            header: String::new(),
            sequence: Vec::new(),
        }
    }

    /// Makes records without a location label errors (for labeled training/evaluation input).
    pub fn require_labels(mut self, yes: bool) -> Self {
        self.require_labels = yes;
        self
    }

    fn next_item(&mut self) -> Item {
        if self.done {
            return Item::Eof;
        }
        let item = self.read_item();
        match item {
            Item::Fatal(_) | Item::Eof => self.done = true,
            _ => self.yielded = true,
        }
        item
    }

    fn read_item(&mut self) -> Item {
        let line = match self.read_raw() {
            Raw::Record { line } => line,
            Raw::Fatal(e) => return Item::Fatal(e),
            Raw::Eof => return Item::Eof,
        };
        let header = self.header.strip_prefix('\u{feff}').unwrap_or(&self.header);
        let definition = match header.parse::<Definition>() {
            Ok(d) => d,
            Err(ParseError::MissingPrefix) | Err(ParseError::Empty) => {
                return Item::Fatal(self.not_fasta(line))
            }
            Err(ParseError::MissingReferenceSequenceName) => {
                return Item::Invalid(invalid(
                    &self.path,
                    line,
                    "header has no sequence id (nothing directly after '>')",
                ))
            }
        };
        match self.build_record(&definition, line) {
            Ok(r) => Item::Record(r),
            Err(e) => Item::Invalid(e),
        }
    }

    /// Reads the next header line into `self.header` (blank lines before it skipped) and its
    /// sequence lines, joined, into `self.sequence`; always consumes the sequence, so that a
    /// bad header costs only its own record.
    fn read_raw(&mut self) -> Raw {
        loop {
            let line = self.lines.load(Ordering::Relaxed) + 1;
            self.header.clear();
            match self.reader.read_definition(&mut self.header) {
                Ok(0) => return Raw::Eof,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Raw::Fatal(invalid(&self.path, line, "line is not valid UTF-8 text"))
                }
                Err(e) => return Raw::Fatal(DataError::Io(self.path.clone(), e)),
            }
            // Editors on Windows may prepend a UTF-8 byte-order mark; it is not part of the data.
            let header = self.header.strip_prefix('\u{feff}').unwrap_or(&self.header);
            // Blank lines can only reach here before the first header (noodles folds later
            // ones into the preceding sequence, where they are harmless).
            if header.trim().is_empty() {
                continue;
            }
            self.sequence.clear();
            if let Err(e) = self.reader.read_sequence(&mut self.sequence) {
                return Raw::Fatal(DataError::Io(self.path.clone(), e));
            }
            return Raw::Record { line };
        }
    }

    fn not_fasta(&self, line: usize) -> DataError {
        invalid(
            &self.path,
            line,
            format!(
                "not a FASTA file: expected a header line starting with '>', found {:?}",
                preview(&self.header)
            ),
        )
    }

    fn build_record(&self, definition: &Definition, line: usize) -> Result<Record, DataError> {
        let id = definition.name();
        let err = |msg: String| invalid(&self.path, line, format!("record {id:?}: {msg}"));
        let header = parse_description(definition.description()).map_err(&err)?;
        let raw = String::from_utf8_lossy(&self.sequence);
        let sequence = validate_sequence(&raw).map_err(&err)?;
        if self.require_labels && header.location.is_none() {
            return Err(err(format!(
                "no location label, but labels are required ({LABEL_HINT})"
            )));
        }
        Ok(Record {
            id: id.to_string(),
            sequence,
            location: header.location.map(str::to_string),
            membrane: header.membrane,
            is_test: header.is_test,
            partition: None,
            pos: SourcePos {
                file: self.path.clone(),
                line,
            },
        })
    }
}

impl Iterator for FastaStream {
    type Item = Result<Record, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let was_yielded = self.yielded;
        match self.next_item() {
            Item::Record(r) => Some(Ok(r)),
            Item::Invalid(e) | Item::Fatal(e) => {
                self.yielded = true;
                Some(Err(e))
            }
            Item::Eof if !was_yielded => {
                // Report an empty file once; `yielded` stops it repeating.
                self.yielded = true;
                Some(Err(DataError::Empty(self.path.clone())))
            }
            Item::Eof => None,
        }
    }
}

/// Reads FASTA text to be predicted on (a request body) as written: each record's id is the
/// first word of its header (empty when there is none), its description is not interpreted
/// (no DeepLoc tag is required or checked), and its sequence lines are joined but not
/// validated, so that callers can count the records before validating them and name each by
/// its position. Blank lines and `;` comment lines are ignored; duplicate ids are allowed.
///
/// Fails only when the text is not FASTA (sequence data before the first header), naming the
/// line; `name` stands in for the file name. Text without any record gives no records.
pub fn read_fasta_text(name: &str, text: &str) -> Result<Vec<RawRecord>, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // Comment lines are emptied rather than removed, so that line numbers stay right.
    let bytes = if text.lines().any(|l| l.starts_with(';')) {
        text.split_inclusive('\n')
            .map(|l| match l.starts_with(';') {
                true if l.ends_with('\n') => "\n",
                true => "",
                false => l,
            })
            .collect::<String>()
            .into_bytes()
    } else {
        text.as_bytes().to_vec()
    };
    let mut stream = FastaStream::from_reader(name, io::Cursor::new(bytes));
    let mut out = Vec::new();
    loop {
        let line = match stream.read_raw() {
            Raw::Record { line } => line,
            Raw::Fatal(e) => return Err(e),
            Raw::Eof => return Ok(out),
        };
        let header = stream
            .header
            .strip_prefix('\u{feff}')
            .unwrap_or(&stream.header);
        let Some(header) = header.strip_prefix('>') else {
            return Err(stream.not_fasta(line));
        };
        out.push(RawRecord {
            id: Some(header.split_whitespace().next().unwrap_or("").to_string()),
            sequence: String::from_utf8_lossy(&stream.sequence).into_owned(),
            line,
        });
    }
}

/// What a FASTA description says about a record.
#[derive(Debug, PartialEq)]
struct HeaderInfo {
    location: Option<&'static str>,
    membrane: Membrane,
    is_test: bool,
}

/// Interprets a header description (the text after the id).
///
/// `Location-Flag [test]` is DeepLoc; anything whose first word is not shaped like
/// `Word-S`/`Word-M`/`Word-U` is free text and gives an unlabeled record.
fn parse_description(description: Option<&str>) -> Result<HeaderInfo, String> {
    let unlabeled = HeaderInfo {
        location: None,
        membrane: Membrane::Unknown,
        is_test: false,
    };
    let mut words = description.unwrap_or("").split_whitespace();
    let Some(first) = words.next() else {
        return Ok(unlabeled);
    };
    let Some((label, flag)) = first.rsplit_once('-') else {
        return Ok(unlabeled);
    };
    let membrane = match flag {
        "M" => Membrane::Membrane,
        "S" => Membrane::Soluble,
        "U" => Membrane::Unknown,
        _ => return Ok(unlabeled),
    };
    if label.is_empty() {
        return Ok(unlabeled);
    }
    let location = canonical_label(label).ok_or_else(|| {
        format!(
            "unknown label {label:?} in DeepLoc header (valid labels: {})",
            valid_labels_list()
        )
    })?;
    // Only `test` may follow the tag: a stray word could be a misspelt test marker, and
    // silently training on test records would be worse than an error.
    let mut is_test = false;
    for word in words {
        if word.eq_ignore_ascii_case("test") && !is_test {
            is_test = true;
        } else {
            return Err(format!(
                "unexpected {word:?} after {first:?} in DeepLoc header (only 'test' may follow)"
            ));
        }
    }
    Ok(HeaderInfo {
        location: Some(location),
        membrane,
        is_test,
    })
}

/// The start of a line, for error messages about garbage input.
fn preview(line: &str) -> String {
    const MAX: usize = 40;
    match line.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_string(),
    }
}

/// A buffered reader that counts the newlines consumed through it, so the stream knows the
/// line number of each header without re-scanning the input.
struct LineCounter<R> {
    inner: BufReader<R>,
    lines: Arc<AtomicUsize>,
}

impl<R: Read> Read for LineCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Route through fill_buf/consume so every byte is counted exactly once.
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for LineCounter<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        let buffered = self.inner.buffer();
        let amt = amt.min(buffered.len());
        let newlines = buffered[..amt].iter().filter(|&&b| b == b'\n').count();
        self.lines.fetch_add(newlines, Ordering::Relaxed);
        self.inner.consume(amt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_tmp(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".fasta")
            .tempfile()
            .unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    fn err_of(content: &str, opts: ReadOptions) -> String {
        let f = write_tmp(content);
        read_fasta(f.path(), opts).unwrap_err().to_string()
    }

    #[test]
    fn deeploc_headers() {
        let h = parse_description(Some("Cell.membrane-M test")).unwrap();
        assert_eq!(
            h,
            HeaderInfo {
                location: Some("Cell.membrane"),
                membrane: Membrane::Membrane,
                is_test: true
            }
        );
        let h = parse_description(Some("Lysosome/Vacuole-U")).unwrap();
        assert_eq!(h.location, Some("Lysosome/Vacuole"));
        assert_eq!(h.membrane, Membrane::Unknown);
        assert!(!h.is_test);
        let h = parse_description(Some("cell_membrane-S TEST")).unwrap();
        assert_eq!(h.location, Some("Cell.membrane"));
        assert!(h.is_test);
    }

    #[test]
    fn plain_descriptions_are_unlabeled() {
        for d in [
            None,
            Some(""),
            Some("Serine/threonine-protein kinase OS=Homo sapiens"),
            Some("HLA-A protein"),
            Some("-S"),
            Some("Nucleus"),
        ] {
            let h = parse_description(d).unwrap();
            assert_eq!(h.location, None, "{d:?}");
            assert_eq!(h.membrane, Membrane::Unknown);
        }
    }

    #[test]
    fn bad_deeploc_headers() {
        let e = parse_description(Some("Nucleolus-S")).unwrap_err();
        assert!(
            e.contains("\"Nucleolus\"") && e.contains("Cell.membrane"),
            "{e}"
        );
        let e = parse_description(Some("Nucleus-S train")).unwrap_err();
        assert!(e.contains("train"), "{e}");
        assert!(parse_description(Some("Nucleus-S test test")).is_err());
    }

    #[test]
    fn reads_wrapped_and_crlf() {
        let f = write_tmp("\u{feff}\n>a Nucleus-S\r\nMKV\r\nlla\r\n\r\n>b desc\nAC\nDE*\n");
        let d = read_fasta(f.path(), ReadOptions::default()).unwrap();
        assert_eq!(d.records.len(), 2);
        assert_eq!(d.records[0].sequence, "MKVLLA");
        assert_eq!(d.records[0].pos.line, 2);
        assert_eq!(d.records[1].sequence, "ACDE");
        assert_eq!(d.records[1].location, None);
        assert_eq!(d.records[1].pos.line, 6);
    }

    #[test]
    fn error_lines() {
        let o = ReadOptions::default();
        let e = err_of(">a\nMK\n>b\nMJK\n", o);
        assert!(
            e.contains(":3:") && e.contains("\"b\"") && e.contains("position 2"),
            "{e}"
        );
        let e = err_of(">a\nMK\n>b\n>c\nMK\n", o);
        assert!(e.contains(":3:") && e.contains("empty sequence"), "{e}");
        let e = err_of(">a\nMK\nMK\n>a\nMK\n", o);
        assert!(
            e.contains(":4:") && e.contains("first seen at line 1"),
            "{e}"
        );
        let e = err_of("MKV\n>a\nMK\n", o);
        assert!(e.contains(":1:") && e.contains("not a FASTA file"), "{e}");
        let e = err_of(">\nMK\n", o);
        assert!(e.contains(":1:") && e.contains("no sequence id"), "{e}");
    }

    #[test]
    fn empty_and_blank_files() {
        for content in ["", "\n\n  \n"] {
            let f = write_tmp(content);
            let e = read_fasta(f.path(), ReadOptions::default()).unwrap_err();
            assert!(matches!(e, DataError::Empty(_)), "{e}");
        }
    }

    #[test]
    fn stream_yields_errors_and_continues() {
        let f = write_tmp(">a\nMK\n>b\nM1\n>c\nMK\n>c\nMK\n");
        let items: Vec<_> = FastaStream::open(f.path()).unwrap().collect();
        assert_eq!(items.len(), 4);
        assert!(items[1].is_err());
        // No duplicate detection in streaming mode.
        assert!(items[2].is_ok() && items[3].is_ok());
    }

    #[test]
    fn stream_stops_after_fatal_error_and_reports_empty() {
        let f = write_tmp("garbage\n");
        let mut s = FastaStream::open(f.path()).unwrap();
        assert!(s.next().unwrap().is_err());
        assert!(s.next().is_none());
        let f = write_tmp("");
        let mut s = FastaStream::open(f.path()).unwrap();
        assert!(matches!(s.next(), Some(Err(DataError::Empty(_)))));
        assert!(s.next().is_none());
    }

    #[test]
    fn text_for_prediction_keeps_records_as_written() {
        let text = "\u{feff};c\n>P1 Nucleolus-S\r\nmk t\n;x\nACD\n\n>\nWW\n> P3 d\nM1\n>P1\n";
        let r = read_fasta_text("body", text).unwrap();
        let got: Vec<_> = r
            .iter()
            .map(|r| (r.id.as_deref().unwrap(), r.sequence.trim(), r.line))
            .collect();
        assert_eq!(got[0].0, "P1");
        assert_eq!(got[0].2, 2);
        assert!(!r[0].sequence.contains(';'), "{:?}", r[0].sequence);
        assert_eq!(
            crate::data::validate_sequence(&r[0].sequence).unwrap(),
            "MKTACD"
        );
        assert_eq!((got[1].0, got[1].1, got[1].2), ("", "WW", 7));
        assert_eq!((got[2].0, got[2].1, got[2].2), ("P3", "M1", 9));
        assert_eq!((got[3].0, got[3].1, got[3].2), ("P1", "", 11));
        assert!(read_fasta_text("body", "\n \n").unwrap().is_empty());
        let e = read_fasta_text("body", "\nMKT\n>A\nW\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("body:2: not a FASTA file"), "{e}");
    }

    #[test]
    fn line_counter_counts_consumed_newlines() {
        let lines = Arc::new(AtomicUsize::new(0));
        let mut c = LineCounter {
            inner: BufReader::with_capacity(4, &b"ab\ncd\n\nef"[..]),
            lines: Arc::clone(&lines),
        };
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert_eq!(lines.load(Ordering::Relaxed), 3);
    }
}
