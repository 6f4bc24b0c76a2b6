//! Writing per-protein predictions as TSV, CSV or JSON Lines.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::model::Answer;

/// Output table format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Tsv,
    Csv,
    Jsonl,
}

impl Format {
    /// Guesses the format from an output file name (`.csv`, `.jsonl`/`.json`, else TSV).
    pub fn from_path(path: &Path) -> Format {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => Format::Csv,
            Some("jsonl" | "json" | "ndjson") => Format::Jsonl,
            _ => Format::Tsv,
        }
    }
}

/// One protein's prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction<'a> {
    pub id: &'a str,
    pub prediction: &'a str,
    pub confidence: f32,
    /// Residues in the input sequence.
    pub length: usize,
    /// Residues the model saw after truncation.
    pub residues_used: usize,
    #[serde(serialize_with = "ser_probs")]
    pub probabilities: (&'a [String], &'a [f32]),
    /// Probability of being membrane-bound, for models with a membrane output.
    #[serde(
        rename = "membrane_probability",
        skip_serializing_if = "Option::is_none"
    )]
    pub membrane: Option<f32>,
    /// `Membrane` or `Soluble`, for models with a membrane output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub membrane_label: Option<&'a str>,
}

impl<'a> Prediction<'a> {
    /// The row of `answer` (see [`crate::model::answer`]), for a model over `labels`.
    pub fn of(
        id: &'a str,
        labels: &'a [String],
        answer: &'a Answer,
        length: usize,
        residues_used: usize,
    ) -> Self {
        Self {
            id,
            prediction: &answer.prediction,
            confidence: answer.confidence,
            length,
            residues_used,
            probabilities: (labels, &answer.probabilities),
            membrane: answer.membrane.map(|m| m.probability),
            membrane_label: answer.membrane.map(|m| m.label()),
        }
    }
}

fn ser_probs<S: serde::Serializer>(p: &(&[String], &[f32]), s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(p.0.len()))?;
    for (l, v) in p.0.iter().zip(p.1) {
        m.serialize_entry(l, v)?;
    }
    m.end()
}

/// Streams predictions to a writer; the header is written on creation.
pub struct PredictionWriter<W: Write> {
    format: Format,
    csv: Option<csv::Writer<W>>,
    raw: Option<W>,
}

impl<W: Write> PredictionWriter<W> {
    /// `membrane`: the model predicts membrane-bound vs soluble (adds the
    /// `membrane_probability` and `membrane_label` columns).
    pub fn new(out: W, format: Format, labels: &[String], membrane: bool) -> Result<Self> {
        match format {
            Format::Jsonl => Ok(Self {
                format,
                csv: None,
                raw: Some(out),
            }),
            Format::Tsv | Format::Csv => {
                let delim = if format == Format::Tsv { b'\t' } else { b',' };
                let mut w = csv::WriterBuilder::new().delimiter(delim).from_writer(out);
                let mut header = vec!["id".to_string(), "prediction".into(), "confidence".into()];
                header.extend(labels.iter().cloned());
                header.extend(["length".to_string(), "residues_used".to_string()]);
                if membrane {
                    header.extend(["membrane_probability".into(), "membrane_label".into()]);
                }
                w.write_record(&header)?;
                Ok(Self {
                    format,
                    csv: Some(w),
                    raw: None,
                })
            }
        }
    }

    pub fn write(&mut self, p: &Prediction<'_>) -> Result<()> {
        match (self.format, &mut self.csv, &mut self.raw) {
            (Format::Jsonl, _, Some(w)) => {
                serde_json::to_writer(&mut *w, p)?;
                w.write_all(b"\n")?;
            }
            (_, Some(w), _) => {
                let mut row = vec![
                    p.id.to_string(),
                    p.prediction.to_string(),
                    format!("{:.6}", p.confidence),
                ];
                row.extend(p.probabilities.1.iter().map(|v| format!("{v:.6}")));
                row.extend([p.length.to_string(), p.residues_used.to_string()]);
                if let Some(m) = p.membrane {
                    row.push(format!("{m:.6}"));
                }
                if let Some(l) = p.membrane_label {
                    row.push(l.to_string());
                }
                w.write_record(&row)?;
            }
            _ => unreachable!("writer constructed for its format"),
        }
        Ok(())
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(self) -> Result<W> {
        match (self.csv, self.raw) {
            (Some(w), _) => Ok(w
                .into_inner()
                .map_err(|e| anyhow::anyhow!("flush failed: {}", e.error()))?),
            (_, Some(mut w)) => {
                w.flush()?;
                Ok(w)
            }
            _ => unreachable!("writer constructed for its format"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsv_and_jsonl_rows() {
        let labels = vec!["Nucleus".to_string(), "Cytoplasm".to_string()];
        let probs = [0.25f32, 0.75];
        let p = Prediction {
            id: "P1",
            prediction: "Cytoplasm",
            confidence: 0.75,
            length: 10,
            residues_used: 8,
            probabilities: (&labels, &probs),
            membrane: None,
            membrane_label: None,
        };
        let mut w = PredictionWriter::new(Vec::new(), Format::Tsv, &labels, false).unwrap();
        w.write(&p).unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        assert_eq!(text, "id\tprediction\tconfidence\tNucleus\tCytoplasm\tlength\tresidues_used\nP1\tCytoplasm\t0.750000\t0.250000\t0.750000\t10\t8\n");
        let mut w = PredictionWriter::new(Vec::new(), Format::Jsonl, &labels, false).unwrap();
        w.write(&p).unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["probabilities"]["Cytoplasm"], 0.75);
        assert_eq!(v["residues_used"], 8);
        assert_eq!(Format::from_path(Path::new("x.CSV")), Format::Csv);
    }

    #[test]
    fn membrane_columns_come_from_the_answer() {
        let labels = vec!["Nucleus".to_string(), "Cytoplasm".to_string()];
        let rule = crate::model::AnswerRule {
            labels: labels.clone(),
            thresholds: Some(vec![0.5, 0.5]),
            membrane: true,
        };
        let answer = rule.answer(vec![0.75, 0.5], Some(0.625));
        let p = Prediction::of("P1", &labels, &answer, 10, 10);
        let mut w = PredictionWriter::new(Vec::new(), Format::Csv, &labels, true).unwrap();
        w.write(&p).unwrap();
        let text = String::from_utf8(w.finish().unwrap()).unwrap();
        assert_eq!(text, "id,prediction,confidence,Nucleus,Cytoplasm,length,residues_used,membrane_probability,membrane_label\nP1,Nucleus|Cytoplasm,0.750000,0.750000,0.500000,10,10,0.625000,Membrane\n");
        let mut w = PredictionWriter::new(Vec::new(), Format::Jsonl, &labels, true).unwrap();
        w.write(&p).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&w.finish().unwrap()).unwrap();
        assert_eq!(v["prediction"], "Nucleus|Cytoplasm");
        assert_eq!(v["membrane_probability"], 0.625);
        assert_eq!(v["membrane_label"], "Membrane");
    }
}
