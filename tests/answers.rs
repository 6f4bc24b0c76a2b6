//! One answer everywhere: for every head kind x {single-label, multi-label} x {membrane
//! output on, off} (plus an ensemble and a fine-tuned encoder), `serve` answers exactly as
//! `predict` does, field by field (JSON and CSV), `/v1/info` describes the model's real
//! outputs, and `eval`'s scores are those of `predict`'s answers.
//!
//! Tiny models trained here on a generated data set; needs nothing outside the repository.

mod serve_support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use protloc::data::{self, Membrane, ReadOptions, Record};
use protloc::eval::run::{evaluate, EvalArgs, EvalOutput, Split};
use protloc::eval::{binary_accuracy_masked, multilabel, ClassificationReport};
use protloc::infer::output::Format;
use protloc::infer::predict::{predict, PredictArgs};
use protloc::infer::BatchLimits;
use protloc::model::{HeadKind, Pool};
use protloc::serve::ServeOptions;
use protloc::train::objective::MembraneMode;
use protloc::train::TrainArgs;
use serde_json::{json, Value};
use serve_support::{agent, get, post, post_json};

/// Residues per protein: the generated proteins are 80-420 residues (some are cut to
/// 20-60 below), so most are truncated.
const MAX_RESIDUES: usize = 64;
const TOL: f64 = 1e-6;

/// The generated data: the same proteins with single locations and with location sets.
struct Data {
    _dir: tempfile::TempDir,
    single: PathBuf,
    multi: PathBuf,
}

fn data() -> &'static Data {
    static D: OnceLock<Data> = OnceLock::new();
    D.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let fasta = dir.path().join("demo.fasta");
        protloc::demo::write_dataset(&fasta, 3, 5).unwrap();
        let records = data::fasta::read_fasta(&fasta, Default::default())
            .unwrap()
            .records;
        let locations = protloc::data::DEEPLOC_LOCATIONS;
        let mut single = String::from("id,sequence,label,membrane,split\n");
        let mut multi = single.clone();
        for (i, r) in records.iter().enumerate() {
            // A third of the proteins shorter than the budget, so batches are padded.
            let seq = if i % 3 == 0 {
                &r.sequence[..20 + i % 41]
            } else {
                &r.sequence
            };
            let m = r.membrane.as_char();
            let split = if r.is_test { "test" } else { "train" };
            let loc = r.location.as_deref().unwrap();
            single.push_str(&format!("{},{seq},{loc},{m},{split}\n", r.id));
            // Every other protein is also somewhere else.
            let set = if i % 2 == 0 {
                let k = locations.iter().position(|l| *l == loc).unwrap();
                let other = locations[(k + 3) % locations.len()];
                let mut both = [loc, other];
                both.sort_by_key(|l| locations.iter().position(|x| x == l));
                both.join("|")
            } else {
                loc.to_string()
            };
            multi.push_str(&format!("{},{seq},{set},{m},{split}\n", r.id));
        }
        let single_path = dir.path().join("single.csv");
        let multi_path = dir.path().join("multi.csv");
        std::fs::write(&single_path, single).unwrap();
        std::fs::write(&multi_path, multi).unwrap();
        Data {
            _dir: dir,
            single: single_path,
            multi: multi_path,
        }
    })
}

#[derive(Clone, Copy, Debug)]
struct Case {
    head: HeadKind,
    multi_label: bool,
    membrane: bool,
    /// Train a head on the frozen encoder (else fine-tune the encoder for a few steps).
    frozen: bool,
    ensemble: usize,
}

impl Case {
    fn frozen(head: HeadKind, multi_label: bool, membrane: bool) -> Self {
        Case {
            head,
            multi_label,
            membrane,
            frozen: true,
            ensemble: 1,
        }
    }

    fn data(&self) -> &'static Path {
        if self.multi_label {
            &data().multi
        } else {
            &data().single
        }
    }
}

fn train(case: Case, run: &Path) {
    let mut a = TrainArgs::new("scratch:tiny", case.data().to_path_buf(), run.to_path_buf());
    a.epochs = 1;
    a.batch_size = 8;
    a.max_residues = Some(MAX_RESIDUES);
    a.head = case.head;
    a.multi_label = case.multi_label;
    a.membrane = MembraneMode::fixed(case.membrane);
    a.seed = 7;
    a.val_fraction = 0.2;
    if case.frozen {
        a.frozen = true;
        a.lr = 1e-2;
        a.pool = Pool::Mean;
        a.ensemble = case.ensemble;
    } else {
        a.max_steps = Some(2);
        a.lr = 1e-3;
    }
    protloc::train::train(&a).unwrap_or_else(|e| panic!("{case:?}: training failed: {e:#}"));
}

fn predict_jsonl(run: &Path, input: &Path, out: &Path) -> Vec<Value> {
    let n = predict(&PredictArgs {
        device: Default::default(),
        model: run.to_path_buf(),
        base: None,
        input: input.to_path_buf(),
        output: Some(out.to_path_buf()),
        format: Some(Format::Jsonl),
        limit: None,
        limits: BatchLimits::default(),
        skip_invalid: false,
        shard: None,
    })
    .unwrap();
    let rows: Vec<Value> = std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), n);
    rows
}

fn protloc_section(run: &Path) -> Value {
    let text = std::fs::read_to_string(run.join("config.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["protloc"].clone()
}

/// Replaces a multi-label model's saved thresholds with ones that split this data: for each
/// location, midway across the widest gap between neighbouring probabilities in its upper
/// part, so proteins get one, several or (falling back to the best) no location over
/// threshold and no probability lies close to a threshold. Returns them.
fn spread_thresholds(run: &Path, rows: &[Value], labels: &[String]) -> Vec<f32> {
    let thresholds: Vec<f32> = labels
        .iter()
        .map(|l| {
            let mut p: Vec<f32> = rows
                .iter()
                .map(|r| r["probabilities"][l].as_f64().unwrap() as f32)
                .collect();
            p.sort_by(f32::total_cmp);
            // The widest gap between the 40th percentile and the second largest.
            let j = (p.len() * 2 / 5..p.len() - 2)
                .max_by(|&a, &b| (p[a + 1] - p[a]).total_cmp(&(p[b + 1] - p[b])))
                .unwrap();
            assert!(
                p[j + 1] - p[j] > 1e-5,
                "{l}: probabilities too close: {p:?}"
            );
            (p[j] + p[j + 1]) / 2.0
        })
        .collect();
    let path = run.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["protloc"]["thresholds"] = json!(thresholds);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    thresholds
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= TOL, "{what}: {a} vs {b}");
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The served JSON prediction equals `predict`'s row, field by field.
fn check_json(
    served: &Value,
    want: &Value,
    labels: &[String],
    thresholds: Option<&[f32]>,
    membrane: bool,
) {
    let id = want["id"].as_str().unwrap();
    assert_eq!(served["id"], want["id"]);
    assert_eq!(served["prediction"], want["prediction"], "{id}");
    let locations: Vec<&str> = served["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(
        locations.join("|"),
        want["prediction"].as_str().unwrap(),
        "{id}"
    );
    close(f(&served["confidence"]), f(&want["confidence"]), id);
    let probs = served["probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), labels.len(), "{id}");
    for entry in probs {
        let label = entry["label"].as_str().unwrap();
        close(
            f(&entry["probability"]),
            f(&want["probabilities"][label]),
            &format!("{id} {label}"),
        );
    }
    assert_eq!(served["length"], want["length"], "{id}");
    assert_eq!(served["residues_used"], want["residues_used"], "{id}");
    if membrane {
        close(
            f(&served["membrane_probability"]),
            f(&want["membrane_probability"]),
            &format!("{id} membrane"),
        );
        assert_eq!(served["membrane_label"], want["membrane_label"], "{id}");
        let p = f(&want["membrane_probability"]);
        let label = if p >= 0.5 { "Membrane" } else { "Soluble" };
        assert_eq!(want["membrane_label"], label, "{id}");
    } else {
        for field in ["membrane_probability", "membrane_label"] {
            assert!(
                served.get(field).is_none(),
                "{id}: {field} without a membrane output"
            );
            assert!(
                want.get(field).is_none(),
                "{id}: {field} without a membrane output"
            );
        }
    }
    match thresholds {
        Some(th) => {
            let got: Vec<(String, f32)> = served["thresholds"]
                .as_array()
                .unwrap_or_else(|| panic!("{id}: no thresholds in {served}"))
                .iter()
                .map(|t| {
                    (
                        t["label"].as_str().unwrap().to_string(),
                        f(&t["threshold"]) as f32,
                    )
                })
                .collect();
            let want: Vec<(String, f32)> = labels.iter().cloned().zip(th.iter().copied()).collect();
            assert_eq!(got, want, "{id}");
        }
        None => assert!(served.get("thresholds").is_none(), "{id}"),
    }
}

/// The served CSV row equals `predict`'s row, field by field.
fn check_csv(
    head: &[String],
    rec: &csv::StringRecord,
    want: &Value,
    labels: &[String],
    thresholds: Option<&[f32]>,
    membrane: bool,
) {
    let col = |name: &str| {
        let i = head
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {head:?}"));
        rec[i].to_string()
    };
    let num = |name: &str| col(name).parse::<f64>().unwrap();
    let id = want["id"].as_str().unwrap();
    assert_eq!(col("id"), id);
    assert_eq!(
        col("prediction"),
        want["prediction"].as_str().unwrap(),
        "{id}"
    );
    close(num("confidence"), f(&want["confidence"]), id);
    for l in labels {
        close(num(l), f(&want["probabilities"][l]), &format!("{id} {l}"));
    }
    assert_eq!(col("length"), want["length"].to_string());
    assert_eq!(col("residues_used"), want["residues_used"].to_string());
    if membrane {
        close(
            num("membrane_probability"),
            f(&want["membrane_probability"]),
            id,
        );
        assert_eq!(
            col("membrane_label"),
            want["membrane_label"].as_str().unwrap()
        );
    } else {
        assert!(!head.iter().any(|h| h.starts_with("membrane_")), "{head:?}");
    }
    match thresholds {
        Some(th) => {
            for (l, t) in labels.iter().zip(th) {
                assert_eq!(col(&format!("threshold_{l}")).parse::<f32>().unwrap(), *t);
            }
        }
        None => assert!(
            !head.iter().any(|h| h.starts_with("threshold_")),
            "{head:?}"
        ),
    }
}

/// `eval` scores exactly `predict`'s answers: its report equals one computed from them.
fn check_eval(
    case: Case,
    eval: &EvalOutput,
    rows: &[Value],
    labels: &[String],
    th: Option<&[f32]>,
) {
    let records: Vec<Record> = data::read_dataset(
        case.data(),
        ReadOptions {
            skip_invalid: false,
            require_labels: true,
            multi_label: case.multi_label,
        },
    )
    .unwrap()
    .records;
    assert_eq!(eval.records, rows.len());
    assert_eq!(records.len(), rows.len());
    let index = |l: &str| labels.iter().position(|x| x == l).unwrap();
    let set = |s: &str| {
        let mut row = vec![false; labels.len()];
        for l in s.split('|') {
            row[index(l)] = true;
        }
        row
    };
    let predicted: Vec<&str> = rows
        .iter()
        .map(|r| r["prediction"].as_str().unwrap())
        .collect();
    for (r, row) in records.iter().zip(rows) {
        assert_eq!(row["id"], r.id.as_str());
    }
    match th {
        Some(th) => {
            let truth: Vec<Vec<bool>> = records
                .iter()
                .map(|r| set(r.location.as_deref().unwrap()))
                .collect();
            let pred: Vec<Vec<bool>> = predicted.iter().map(|p| set(p)).collect();
            let want = multilabel::report(&truth, &pred, labels, th);
            assert_eq!(eval.multi_label.as_ref(), Some(&want), "{case:?}");
            assert!(eval.report.is_none());
        }
        None => {
            let truth: Vec<usize> = records
                .iter()
                .map(|r| index(r.location.as_deref().unwrap()))
                .collect();
            let pred: Vec<usize> = predicted.iter().map(|p| index(p)).collect();
            let want = ClassificationReport::compute(&truth, &pred, labels).unwrap();
            assert_eq!(eval.report.as_ref(), Some(&want), "{case:?}");
            assert!(eval.multi_label.is_none());
        }
    }
    if case.membrane {
        let truth: Vec<Option<bool>> = records
            .iter()
            .map(|r| match r.membrane {
                Membrane::Membrane => Some(true),
                Membrane::Soluble => Some(false),
                Membrane::Unknown => None,
            })
            .collect();
        let pred: Vec<bool> = rows
            .iter()
            .map(|r| r["membrane_label"] == "Membrane")
            .collect();
        assert_eq!(
            eval.membrane_accuracy,
            binary_accuracy_masked(&truth, &pred),
            "{case:?}"
        );
        assert!(eval.membrane_accuracy.is_some());
    } else {
        assert_eq!(eval.membrane_accuracy, None);
    }
}

/// Trains `case`, then compares `predict`, `serve` (JSON and CSV, `/v1/info`) and `eval`.
fn same_answers(case: Case) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train(case, &run);
    let task = protloc_section(&run);
    let labels: Vec<String> = serde_json::from_value(task["labels"].clone()).unwrap();
    assert_eq!(task["membrane"], case.membrane, "{case:?}");
    assert_eq!(task["multi_label"], case.multi_label, "{case:?}");
    let input = case.data();
    let out = dir.path().join("predictions.jsonl");
    let mut rows = predict_jsonl(&run, input, &out);
    let thresholds = case.multi_label.then(|| {
        let th = spread_thresholds(&run, &rows, &labels);
        rows = predict_jsonl(&run, input, &out);
        // The saved thresholds are used: some protein is in several places.
        assert!(
            rows.iter()
                .any(|r| r["prediction"].as_str().unwrap().contains('|')),
            "{case:?}: no multi-location answer"
        );
        th
    });
    let saved: Option<Vec<f32>> =
        serde_json::from_value(protloc_section(&run)["thresholds"].clone()).unwrap();
    match &thresholds {
        Some(th) => assert_eq!(saved.as_ref(), Some(th)),
        None => assert_eq!(saved, None),
    }

    // Large enough batches that the server scores all proteins together, as `predict` does.
    let mut o = ServeOptions::new(&run);
    o.port = 0;
    o.limits.max_batch_tokens = 8192;
    let server = protloc::serve::spawn(o).unwrap();
    let a = agent();

    let info = get(&a, &server.url("/v1/info")).json();
    assert_eq!(info["membrane_head"], case.membrane, "{info}");
    assert_eq!(info["multi_label"], case.multi_label, "{info}");
    assert_eq!(info["ensemble_members"], case.ensemble, "{info}");
    match &thresholds {
        Some(th) => {
            let got: Vec<f32> = info["thresholds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| f(&t["threshold"]) as f32)
                .collect();
            assert_eq!(&got, th);
            assert_eq!(info["thresholds"][0]["label"], labels[0].as_str());
        }
        None => assert!(info.get("thresholds").is_none(), "{info}"),
    }
    assert_eq!(
        info.get("membrane_threshold").is_some(),
        case.membrane,
        "{info}"
    );

    let records = data::read_dataset(
        input,
        ReadOptions {
            multi_label: true,
            ..Default::default()
        },
    )
    .unwrap()
    .records;
    let inputs: Vec<Value> = records
        .iter()
        .map(|r| json!({"id": r.id, "sequence": r.sequence}))
        .collect();
    let r = post_json(&a, &server.url("/v1/predict"), &json!({ "inputs": inputs }));
    assert_eq!(r.status, 200, "{}", r.body);
    let served = r.json()["predictions"].as_array().unwrap().clone();
    assert_eq!(served.len(), rows.len());
    for (s, want) in served.iter().zip(&rows) {
        check_json(s, want, &labels, thresholds.as_deref(), case.membrane);
    }

    let csv_in: String = std::iter::once("id,sequence\n".to_string())
        .chain(records.iter().map(|r| format!("{},{}\n", r.id, r.sequence)))
        .collect();
    let r = post(
        &a,
        &server.url("/invocations"),
        Some("text/csv"),
        &[("Accept", "text/csv")],
        &csv_in,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let mut reader = csv::Reader::from_reader(r.body.as_bytes());
    let head: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        &head[..5],
        ["id", "prediction", "confidence", "length", "residues_used"]
    );
    let recs: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(recs.len(), rows.len());
    for (rec, want) in recs.iter().zip(&rows) {
        check_csv(
            &head,
            rec,
            want,
            &labels,
            thresholds.as_deref(),
            case.membrane,
        );
    }
    server.shutdown().unwrap();

    let eval = evaluate(&EvalArgs {
        device: Default::default(),
        model: run.clone(),
        base: None,
        data: input.to_path_buf(),
        split: Split::All,
        limit: None,
        limits: BatchLimits::default(),
        skip_invalid: false,
        cache: None,
    })
    .unwrap();
    check_eval(case, &eval, &rows, &labels, thresholds.as_deref());
}

macro_rules! cases {
    ($($name:ident: $head:expr, $multi:expr, $membrane:expr;)*) => {$(
        #[test]
        fn $name() {
            same_answers(Case::frozen($head, $multi, $membrane));
        }
    )*};
}

cases! {
    linear_single_label: HeadKind::Linear, false, false;
    linear_single_label_membrane: HeadKind::Linear, false, true;
    linear_multi_label: HeadKind::Linear, true, false;
    linear_multi_label_membrane: HeadKind::Linear, true, true;
    mlp_single_label: HeadKind::Mlp, false, false;
    mlp_single_label_membrane: HeadKind::Mlp, false, true;
    mlp_multi_label: HeadKind::Mlp, true, false;
    mlp_multi_label_membrane: HeadKind::Mlp, true, true;
    light_attention_single_label: HeadKind::LightAttention, false, false;
    light_attention_single_label_membrane: HeadKind::LightAttention, false, true;
    light_attention_multi_label: HeadKind::LightAttention, true, false;
    light_attention_multi_label_membrane: HeadKind::LightAttention, true, true;
}

/// An ensemble answers from its members' mean probabilities, through the same rule.
#[test]
fn ensemble_multi_label_membrane() {
    same_answers(Case {
        ensemble: 2,
        ..Case::frozen(HeadKind::LightAttention, true, true)
    });
}

/// A fine-tuned encoder (not the frozen fast path) answers the same way too.
#[test]
fn fine_tuned_multi_label_membrane() {
    same_answers(Case {
        frozen: false,
        ..Case::frozen(HeadKind::Mlp, true, true)
    });
}
