//! Request bodies, by content type, turned into validated `(id, sequence)` pairs: JSON into
//! [`PredictRequest`], FASTA and CSV by `crate::data`'s text readers. Every error says which
//! sequence (1-based index and id) or line, and what is wrong.

use serde::Deserialize;

use super::error::ApiError;
use super::request::PredictRequest;
use crate::data::fasta::read_fasta_text;
use crate::data::table::{read_sequence_table, TableKind};
use crate::data::{validate_sequence, DataError, RawRecord};

/// One protein of a request, validated (upper-case, whitespace removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub id: String,
    pub sequence: String,
}

/// How a request body is to be read, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Fasta,
    /// `text/plain`: FASTA when it starts with `>`, else one bare sequence.
    Text,
    Csv,
}

impl BodyKind {
    /// Maps a `Content-Type` header value (parameters such as `charset` ignored). A missing
    /// header means JSON (what the managed-endpoint clients send).
    pub fn from_content_type(value: Option<&str>) -> Result<Self, ApiError> {
        let Some(raw) = value else {
            return Ok(BodyKind::Json);
        };
        let mime = raw
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "" | "application/json" => Ok(BodyKind::Json),
            m if m.ends_with("+json") => Ok(BodyKind::Json),
            "text/x-fasta" | "text/fasta" | "application/x-fasta" | "chemical/seq-aa-fasta" => {
                Ok(BodyKind::Fasta)
            }
            "text/plain" => Ok(BodyKind::Text),
            "text/csv" | "application/csv" => Ok(BodyKind::Csv),
            _ => Err(ApiError::unsupported_media_type(format!(
                "unsupported content type {raw:?}: send application/json, text/x-fasta, text/plain or text/csv"
            ))),
        }
    }
}

/// Parses and validates a body; `max_sequences` bounds how many proteins one request may
/// carry (413 beyond it, checked before validating anything).
pub fn parse_body(
    kind: BodyKind,
    body: &[u8],
    max_sequences: usize,
) -> Result<Vec<Input>, ApiError> {
    let raw = match kind {
        BodyKind::Json => parse_json(body)?,
        BodyKind::Fasta => parse_fasta(utf8(body)?)?,
        BodyKind::Text => {
            let text = utf8(body)?;
            if text
                .trim_start_matches('\u{feff}')
                .trim_start()
                .starts_with('>')
            {
                parse_fasta(text)?
            } else {
                vec![(None, text.to_string())]
            }
        }
        BodyKind::Csv => parse_csv(utf8(body)?)?,
    };
    if raw.is_empty() {
        return Err(ApiError::unprocessable(
            "empty_input",
            "the request contains no sequences",
        ));
    }
    if raw.len() > max_sequences {
        return Err(ApiError::payload_too_large(
            "too_many_sequences",
            format!(
                "{} sequences in one request; at most {max_sequences} allowed (--max-sequences)",
                raw.len()
            ),
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, (id, seq))| {
            let id = id
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("seq{}", i + 1));
            match validate_sequence(&seq) {
                Ok(sequence) => Ok(Input { id, sequence }),
                Err(msg) => Err(ApiError::unprocessable(
                    "invalid_sequence",
                    format!("sequence {} (id {id:?}): {msg}", i + 1),
                )),
            }
        })
        .collect()
}

fn utf8(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request("invalid_encoding", format!("body is not UTF-8: {e}")))
}

type RawInput = (Option<String>, String);

/// The JSON forms of [`PredictRequest`]. The body is first read as JSON whatever its shape, so
/// that malformed JSON (`invalid_json`) is told apart from JSON of the wrong shape
/// (`invalid_request`) wherever each occurs.
fn parse_json(body: &[u8]) -> Result<Vec<RawInput>, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("malformed JSON: {e}")))?;
    let request = PredictRequest::deserialize(value)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))?;
    Ok(request
        .into_proteins()
        .into_iter()
        .map(|p| (p.id, p.sequence))
        .collect())
}

/// FASTA, read by [`crate::data::fasta::read_fasta_text`]: the id is the header's first
/// word, descriptions are not interpreted, blank lines and `;` comments are ignored. Text
/// before the first header is an error naming its line.
fn parse_fasta(text: &str) -> Result<Vec<RawInput>, ApiError> {
    let records = read_fasta_text("request", text)
        .map_err(|e| structure_error("invalid_fasta", "FASTA", e))?;
    Ok(raw_inputs(records))
}

/// CSV, read by [`crate::data::table::read_sequence_table`]: a header naming a `sequence`
/// column and optionally `id`/`accession`/`entry`/`name`; without such a header, one column
/// is `sequence` and two columns are `id,sequence`.
fn parse_csv(text: &str) -> Result<Vec<RawInput>, ApiError> {
    let records = read_sequence_table("request", text, TableKind::Csv)
        .map_err(|e| structure_error("invalid_csv", "CSV", e))?;
    Ok(raw_inputs(records))
}

fn raw_inputs(records: Vec<RawRecord>) -> Vec<RawInput> {
    records.into_iter().map(|r| (r.id, r.sequence)).collect()
}

/// A body that is not the FASTA/CSV it claims to be: 400, naming the line.
fn structure_error(code: &'static str, format: &str, e: DataError) -> ApiError {
    let message = match e {
        DataError::Invalid { pos, msg } => format!("{format} line {}: {msg}", pos.line),
        other => format!("{format}: {other}"),
    };
    ApiError::bad_request(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(kind: BodyKind, body: &str) -> Vec<(String, String)> {
        parse_body(kind, body.as_bytes(), 100)
            .unwrap()
            .into_iter()
            .map(|i| (i.id, i.sequence))
            .collect()
    }

    fn err(kind: BodyKind, body: &str, max: usize) -> ApiError {
        parse_body(kind, body.as_bytes(), max).unwrap_err()
    }

    fn pair(id: &str, s: &str) -> (String, String) {
        (id.to_string(), s.to_string())
    }

    #[test]
    fn json_forms() {
        assert_eq!(ok(BodyKind::Json, r#""mk t""#), vec![pair("seq1", "MKT")]);
        assert_eq!(
            ok(BodyKind::Json, r#"{"sequence": "MKT", "id": "P1"}"#),
            vec![pair("P1", "MKT")]
        );
        assert_eq!(
            ok(
                BodyKind::Json,
                r#"{"inputs": ["MKT", {"id": 7, "sequence": "ac\nd"}, {"sequence": "W"}]}"#
            ),
            vec![pair("seq1", "MKT"), pair("7", "ACD"), pair("seq3", "W")]
        );
        assert_eq!(ok(BodyKind::Json, r#"["A", "C"]"#).len(), 2);
        assert_eq!(
            ok(BodyKind::Json, r#"{"inputs": "mkt"}"#),
            vec![pair("seq1", "MKT")]
        );
    }

    #[test]
    fn json_errors_have_codes() {
        let e = err(BodyKind::Json, "{\"inputs\": [", 10);
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_json"));
        let e = err(BodyKind::Json, r#"{"foo": 1}"#, 10);
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_request"));
        let e = err(BodyKind::Json, r#"{"inputs": [1]}"#, 10);
        assert_eq!(e.code, "invalid_request");
        let e = err(BodyKind::Json, r#"{"inputs": []}"#, 10);
        assert_eq!((e.status.as_u16(), e.code), (422, "empty_input"));
        let e = err(BodyKind::Json, r#"{"inputs": ["A", "C", "D"]}"#, 2);
        assert_eq!((e.status.as_u16(), e.code), (413, "too_many_sequences"));
        let e = err(
            BodyKind::Json,
            r#"{"inputs": ["MKT", {"id": "bad", "sequence": "MKJT"}]}"#,
            10,
        );
        assert_eq!((e.status.as_u16(), e.code), (422, "invalid_sequence"));
        assert!(e.message.contains("sequence 2"), "{}", e.message);
        assert!(e.message.contains("\"bad\""), "{}", e.message);
        assert!(e.message.contains("position 3"), "{}", e.message);
        let e = err(BodyKind::Json, r#"{"sequence": "  "}"#, 10);
        assert!(e.message.contains("empty sequence"), "{}", e.message);
    }

    #[test]
    fn fasta_text_and_csv() {
        let fasta = ">P1 desc\nmkt\nACD\n\n>P2\nWW\n";
        assert_eq!(
            ok(BodyKind::Fasta, fasta),
            vec![pair("P1", "MKTACD"), pair("P2", "WW")]
        );
        assert_eq!(ok(BodyKind::Text, fasta).len(), 2);
        assert_eq!(
            ok(BodyKind::Text, "mk t\nacd\n"),
            vec![pair("seq1", "MKTACD")]
        );
        let e = err(BodyKind::Fasta, "MKT\n>P1\nA\n", 10);
        assert_eq!(e.code, "invalid_fasta");
        assert_eq!(
            ok(BodyKind::Csv, "id,sequence\nP1,MKT\nP2,acd\n"),
            vec![pair("P1", "MKT"), pair("P2", "ACD")]
        );
        assert_eq!(
            ok(BodyKind::Csv, "Sequence,Entry\nMKT,P1\n"),
            vec![pair("P1", "MKT")]
        );
        assert_eq!(ok(BodyKind::Csv, "P1,MKT\nP2,W\n").len(), 2);
        assert_eq!(
            ok(BodyKind::Csv, "MKT\nW\n"),
            vec![pair("seq1", "MKT"), pair("seq2", "W")]
        );
        assert_eq!(err(BodyKind::Csv, "a,b,c\n1,2,3\n", 10).code, "invalid_csv");
    }

    #[test]
    fn content_types() {
        use BodyKind::*;
        let k = |s: &str| BodyKind::from_content_type(Some(s));
        assert_eq!(BodyKind::from_content_type(None).unwrap(), Json);
        assert_eq!(k("application/json; charset=utf-8").unwrap(), Json);
        assert_eq!(k("text/x-fasta").unwrap(), Fasta);
        assert_eq!(k("text/plain").unwrap(), Text);
        assert_eq!(k("text/csv").unwrap(), Csv);
        assert_eq!(k("application/xml").unwrap_err().status.as_u16(), 415);
    }
}
