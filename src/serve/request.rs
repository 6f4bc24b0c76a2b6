//! The JSON request bodies and query options of the prediction routes: one set of types that
//! the handlers parse requests into and the OpenAPI document describes.
//!
//! `Serialize` and the schema are derived (untagged: each form is its plain JSON shape);
//! `Deserialize` is written out so that a request of the wrong shape is told exactly what is
//! wrong and where (`input 2: "id" must be a string or a number`) instead of serde's
//! "data did not match any variant".

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Query options of the prediction routes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PredictParams {
    /// Report only the `top_k` most probable locations per protein (default: all).
    pub top_k: Option<usize>,
    /// Also report the raw classifier scores (logits) of those locations (an ensemble's: the
    /// mean of its members' logits).
    pub raw_scores: Option<bool>,
}

/// The JSON request forms of `/invocations` and `/v1/predict`. Also accepted:
/// `text/x-fasta` or `text/plain` FASTA (or one bare sequence), and `text/csv` with an
/// `id,sequence` header. Whitespace and lower case are tolerated.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PredictRequest {
    /// `"MKTAYIAK..."`
    Sequence(String),
    /// `{"sequence": "MKT...", "id": "P1"}`
    Protein(Protein),
    /// `{"inputs": ["MKT...", {"id": "P2", "sequence": "..."}]}`; `instances` is accepted
    /// for `inputs`, and `inputs` may be a single string or object.
    Inputs { inputs: Inputs },
    /// `["MKT...", {"id": "P2", "sequence": "..."}]`
    List(Vec<InputItem>),
}

/// The `inputs` of a request: a list, or a single protein.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Inputs {
    Many(Vec<InputItem>),
    One(InputItem),
}

/// One protein: a bare sequence or an object with an optional id.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum InputItem {
    Sequence(String),
    Protein(Protein),
}

/// A protein and its optional id (a number is read as its decimal text). Other fields are
/// ignored.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Protein {
    pub id: Option<String>,
    pub sequence: String,
}

impl From<InputItem> for Protein {
    fn from(item: InputItem) -> Self {
        match item {
            InputItem::Sequence(sequence) => Protein { id: None, sequence },
            InputItem::Protein(p) => p,
        }
    }
}

impl PredictRequest {
    /// The proteins in request order (ids as given; unvalidated sequences).
    pub fn into_proteins(self) -> Vec<Protein> {
        match self {
            PredictRequest::Sequence(sequence) => vec![Protein { id: None, sequence }],
            PredictRequest::Protein(p) => vec![p],
            PredictRequest::Inputs {
                inputs: Inputs::One(item),
            } => vec![item.into()],
            PredictRequest::Inputs {
                inputs: Inputs::Many(items),
            }
            | PredictRequest::List(items) => items.into_iter().map(Protein::from).collect(),
        }
    }
}

/// The message for a body that is valid JSON of none of the request forms.
const REQUEST_SHAPE: &str = "expected a sequence string, {\"sequence\": \"...\"}, or {\"inputs\": [...]} with strings or {\"id\", \"sequence\"} objects";

/// The message for an input that is neither a string nor a protein object.
const ITEM_SHAPE: &str = "expected a string or an {\"id\", \"sequence\"} object";

/// Prefixes an error about one input with its 1-based position.
fn at_input<E: de::Error>(index: usize, e: impl fmt::Display) -> E {
    E::custom(format_args!("input {}: {e}", index + 1))
}

/// Answers every JSON type a visitor does not take with the same message.
macro_rules! reject_other_types {
    ($msg:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(E::custom($msg))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(E::custom($msg))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(E::custom($msg))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(E::custom($msg))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(E::custom($msg))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(E::custom($msg))
        }
    };
}

/// A field value kept whatever its type, so that the checks (and their messages) can run
/// once the whole object is read.
enum Scalar {
    Str(String),
    /// A number, as its JSON text.
    Num(String),
    Null,
    Other,
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(s.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scalar, E> {
                Ok(Scalar::Num(n.to_string()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar, E> {
                Ok(Scalar::Num(n.to_string()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Scalar, E> {
                // As serde_json writes it (`1e3` is "1000.0").
                Ok(Scalar::Num(
                    serde_json::Number::from_f64(n)
                        .map_or_else(|| n.to_string(), |n| n.to_string()),
                ))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// The `sequence` and `id` fields of a protein object, checked.
fn protein<E: de::Error>(sequence: Option<Scalar>, id: Option<Scalar>) -> Result<Protein, E> {
    let sequence = match sequence {
        Some(Scalar::Str(s)) => s,
        Some(_) => return Err(E::custom("\"sequence\" must be a string")),
        None => return Err(E::custom("object without a \"sequence\" field")),
    };
    let id = match id {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Str(s)) | Some(Scalar::Num(s)) => Some(s),
        Some(Scalar::Other) => return Err(E::custom("\"id\" must be a string or a number")),
    };
    Ok(Protein { id, sequence })
}

/// Reads the `sequence` and `id` of a protein object, skipping other fields.
fn protein_fields<'de, A: MapAccess<'de>>(
    mut map: A,
) -> Result<(Option<Scalar>, Option<Scalar>), A::Error> {
    let (mut sequence, mut id) = (None, None);
    while let Some(key) = map.next_key::<String>()? {
        match key.as_str() {
            "sequence" => sequence = Some(map.next_value()?),
            "id" => id = Some(map.next_value()?),
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
    Ok((sequence, id))
}

/// The items of a list, each error naming its input.
fn items<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<InputItem>, A::Error> {
    let mut out = Vec::new();
    loop {
        let index = out.len();
        match seq.next_element::<InputItem>() {
            Ok(Some(item)) => out.push(item),
            Ok(None) => return Ok(out),
            Err(e) => return Err(at_input(index, e)),
        }
    }
}

impl<'de> Deserialize<'de> for InputItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(ITEM_SHAPE)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<InputItem, E> {
                Ok(InputItem::Sequence(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<InputItem, A::Error> {
                let (sequence, id) = protein_fields(map)?;
                protein(sequence, id).map(InputItem::Protein)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<InputItem, A::Error> {
                Err(de::Error::custom(ITEM_SHAPE))
            }
            reject_other_types!(ITEM_SHAPE);
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Inputs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(REQUEST_SHAPE)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Inputs, E> {
                Ok(Inputs::One(InputItem::Sequence(s.to_string())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Inputs, A::Error> {
                items(seq).map(Inputs::Many)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Inputs, A::Error> {
                let (sequence, id) = protein_fields(map)?;
                let p = protein(sequence, id).map_err(|e: A::Error| at_input(0, e))?;
                Ok(Inputs::One(InputItem::Protein(p)))
            }
            reject_other_types!(REQUEST_SHAPE);
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for PredictRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PredictRequest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(REQUEST_SHAPE)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PredictRequest, E> {
                Ok(PredictRequest::Sequence(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PredictRequest, A::Error> {
                items(seq).map(PredictRequest::List)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PredictRequest, A::Error> {
                let (mut inputs, mut instances, mut sequence, mut id) = (None, None, None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "inputs" => inputs = Some(map.next_value::<Inputs>()?),
                        // `inputs` wins when both are given.
                        "instances" if inputs.is_none() => {
                            instances = Some(map.next_value::<Inputs>()?)
                        }
                        "sequence" => sequence = Some(map.next_value::<Scalar>()?),
                        "id" => id = Some(map.next_value::<Scalar>()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if let Some(inputs) = inputs.or(instances) {
                    Ok(PredictRequest::Inputs { inputs })
                } else if sequence.is_some() {
                    let p = protein(sequence, id).map_err(|e: A::Error| at_input(0, e))?;
                    Ok(PredictRequest::Protein(p))
                } else {
                    Err(de::Error::custom(REQUEST_SHAPE))
                }
            }
            reject_other_types!(REQUEST_SHAPE);
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<PredictRequest, String> {
        PredictRequest::deserialize(v).map_err(|e| e.to_string())
    }

    #[test]
    fn every_form_round_trips() {
        let forms = [
            json!("MKT"),
            json!({"id": "P1", "sequence": "MKT"}),
            json!({"inputs": ["MKT", {"id": "P2", "sequence": "W"}]}),
            json!({"inputs": "MKT"}),
            json!({"inputs": {"id": null, "sequence": "W"}}),
            json!(["MKT", {"id": "P2", "sequence": "W"}]),
        ];
        for v in forms {
            let r = parse(v.clone()).unwrap();
            let back = serde_json::to_value(&r).unwrap();
            assert_eq!(parse(back).unwrap(), r, "{v}");
        }
    }

    #[test]
    fn aliases_numbers_and_extra_fields() {
        let r = parse(json!({"instances": [{"id": 7, "sequence": "W", "x": [1]}]})).unwrap();
        let p = r.into_proteins();
        assert_eq!(p[0].id.as_deref(), Some("7"));
        let r = parse(json!({"inputs": ["A"], "instances": 5, "sequence": 1})).unwrap();
        assert_eq!(r.into_proteins().len(), 1);
        let r = parse(json!({"id": 1.5, "sequence": "A"})).unwrap();
        assert_eq!(r.into_proteins()[0].id.as_deref(), Some("1.5"));
    }

    #[test]
    fn shape_errors_name_the_input() {
        assert_eq!(parse(json!({"foo": 1})).unwrap_err(), REQUEST_SHAPE);
        assert_eq!(parse(json!(5)).unwrap_err(), REQUEST_SHAPE);
        assert_eq!(parse(json!({"inputs": null})).unwrap_err(), REQUEST_SHAPE);
        assert_eq!(
            parse(json!({"inputs": ["A", 1]})).unwrap_err(),
            format!("input 2: {ITEM_SHAPE}")
        );
        assert_eq!(
            parse(json!([{"id": "a"}])).unwrap_err(),
            "input 1: object without a \"sequence\" field"
        );
        assert_eq!(
            parse(json!({"sequence": 5})).unwrap_err(),
            "input 1: \"sequence\" must be a string"
        );
        assert_eq!(
            parse(json!({"inputs": [{"sequence": "A", "id": [1]}]})).unwrap_err(),
            "input 1: \"id\" must be a string or a number"
        );
    }
}
