//! Models fine-tuned elsewhere, against what their own code computes (fixtures from
//! `tools/make_fixtures.py --imports-only`): a transformers BertForSequenceClassification
//! directory and the reference workflow's `model.pth`, read directly and through
//! `protloc import`, predicted and served. The ESM classifiers (which need ESM-2's vocabulary
//! from ../shared) are in `tests/real_data/imports.rs`.

mod common;
mod serve_support;

use std::path::PathBuf;

use candle_core::Device;
use common::{assert_rows_close, classifier_logits, fixture, fixture_rows, protloc, write};
use protloc::model::{HeadKind, SequenceClassifier};

fn reference_pth() -> PathBuf {
    fixture("reference_model/model.pth")
}

fn reference_base() -> String {
    fixture("reference_model/base").display().to_string()
}

fn softmax(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows.iter()
        .map(|r| {
            let m = r.iter().copied().fold(f32::MIN, f32::max);
            let e: Vec<f32> = r.iter().map(|x| (x - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        })
        .collect()
}

#[test]
fn transformers_bert_classifier_gives_transformers_logits_and_location_labels() {
    let (seqs, want) = fixture_rows("hf_bert_classifier", "logits");
    let model = SequenceClassifier::load(&fixture("hf_bert_classifier"), &Device::Cpu).unwrap();
    assert_eq!(model.task.head, HeadKind::Pooler);
    // id2label as saved, "Cell membrane" read as the DeepLoc location it names.
    assert_eq!(
        model.task.labels,
        ["Cytoplasm", "Nucleus", "Cell.membrane", "Mitochondrion"]
    );
    let (single, batched) = classifier_logits(&model, &seqs);
    // Sequences 2 and 3 hold U, X, B, Z, O: transformers' tokenizer keeps U/B/Z/O as tokens.
    assert_rows_close("each alone", &single, &want, 1e-5);
    assert_rows_close("padded batch", &batched, &want, 1e-5);
}

#[test]
fn reference_model_pth_gives_predict_fn_outputs_in_its_class_order() {
    let (seqs, outputs) = fixture_rows("reference_model", "outputs");
    let (_, probabilities) = fixture_rows("reference_model", "probabilities");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference_model.json")).unwrap())
            .unwrap();
    let model =
        SequenceClassifier::open(&reference_pth(), Some(&reference_base()), &Device::Cpu).unwrap();
    assert_eq!(model.task.head, HeadKind::Reference);
    let order: Vec<String> = serde_json::from_value(meta["class_order"].clone()).unwrap();
    assert_eq!(model.task.labels, order);
    let (single, batched) = classifier_logits(&model, &seqs);
    assert_rows_close("tanh outputs", &single, &outputs, 1e-5);
    assert_rows_close("tanh outputs, batch", &batched, &outputs, 1e-5);
    assert_rows_close("probabilities", &softmax(&single), &probabilities, 1e-5);
    // The library's own probabilities (what predict and serve report) are the same.
    let enc: Vec<_> = seqs.iter().map(|s| model.encode(s)).collect();
    let probs =
        protloc::infer::class_probabilities(&model, &enc, Default::default(), None).unwrap();
    assert_rows_close("class_probabilities", &probs, &probabilities, 1e-5);
}

#[test]
fn import_writes_a_run_directory_that_predicts_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let fasta = write(
        tmp.path(),
        "in.fa",
        ">a\nMEKFGMN\n>b\nMLNIIYVVSLUILIKFIFYKXECNNNNNNYLSN\n",
    );
    let cases: [(&str, Vec<String>); 2] = [
        (
            "hf",
            vec![fixture("hf_bert_classifier").display().to_string()],
        ),
        (
            "ref",
            vec![
                reference_pth().display().to_string(),
                "--base".into(),
                reference_base(),
            ],
        ),
    ];
    for (name, model) in cases {
        let run = tmp.path().join(name);
        let mut import = vec!["import".to_string()];
        import.extend(model.iter().cloned());
        import.extend(["--output".into(), run.display().to_string()]);
        protloc().args(&import).assert().success();
        let predict = |model_args: &[String]| -> String {
            let mut args = vec!["predict".to_string(), "--model".into()];
            args.extend(model_args.iter().cloned());
            args.extend([
                "--input".into(),
                fasta.display().to_string(),
                "--format".into(),
                "jsonl".into(),
            ]);
            let out = protloc().args(&args).output().unwrap();
            assert!(out.status.success(), "{name}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let direct = predict(&model);
        let imported = predict(&[run.display().to_string()]);
        assert_eq!(direct, imported, "{name}");
        assert_eq!(direct.lines().count(), 2, "{name}: {direct}");
    }
}

#[test]
fn import_errors_name_the_file_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let fails = |args: &[&str], needles: &[&str]| {
        let o = protloc().args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        for n in needles {
            assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
        }
    };
    let pth = reference_pth().display().to_string();
    let out_s = out.display().to_string();
    // model.pth without its encoder.
    fails(
        &["import", &pth, "--output", &out_s],
        &["model.pth", "--base"],
    );
    fails(&["predict", "--model", &pth, "--input", &pth], &["--base"]);
    // --base with a directory.
    let hf = fixture("hf_bert_classifier").display().to_string();
    fails(
        &[
            "import",
            &hf,
            "--base",
            &reference_base(),
            "--output",
            &out_s,
        ],
        &["drop --base"],
    );
    // A directory that is neither a run nor a transformers classifier (a bare BertModel).
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["vocab.txt", "model.safetensors"] {
        std::fs::copy(fixture("hf_bert_classifier").join(f), bare.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(fixture("hf_bert_classifier/config.json")).unwrap();
    write(
        &bare,
        "config.json",
        &config.replace("BertForSequenceClassification", "BertModel"),
    );
    fails(
        &["import", &bare.display().to_string(), "--output", &out_s],
        &["BertForSequenceClassification", "protloc train"],
    );
    // A file that is not the reference's state_dict (the safetensors of another model).
    let other = fixture("hf_bert_classifier/model.safetensors")
        .display()
        .to_string();
    fails(
        &[
            "import",
            &other,
            "--base",
            &reference_base(),
            "--output",
            &out_s,
        ],
        &["not the reference workflow's ProteinClassifier"],
    );
    assert!(!out.exists(), "a failed import wrote {}", out.display());
}

/// The reference's endpoint takes a JSON string of space-separated residues (its notebook
/// sends `" ".join(sequence)`): `protloc serve` on its `model.pth` answers that body with the
/// probabilities its own model gives.
#[test]
fn served_reference_model_answers_the_reference_request_body() {
    let (seqs, probabilities) = fixture_rows("reference_model", "probabilities");
    let mut o = serve_support::options();
    o.model = reference_pth();
    o.base = Some(reference_base());
    let server = serve_support::start(o);
    let agent = serve_support::agent();
    let labels: Vec<String> =
        SequenceClassifier::open(&reference_pth(), Some(&reference_base()), &Device::Cpu)
            .unwrap()
            .task
            .labels;
    for (seq, want) in seqs.iter().zip(&probabilities) {
        let spaced: String = seq
            .chars()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let r = serve_support::post(
            &agent,
            &server.url("/invocations"),
            Some("application/json"),
            &[],
            &serde_json::Value::String(spaced).to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let p = &v["predictions"][0];
        assert_eq!(p["length"], seq.len(), "{seq}: spaces are not residues");
        for entry in p["probabilities"].as_array().unwrap() {
            let i = labels
                .iter()
                .position(|l| l == entry["label"].as_str().unwrap())
                .unwrap();
            let got = entry["probability"].as_f64().unwrap() as f32;
            assert!(
                (got - want[i]).abs() < 1e-5,
                "{seq}: {entry} vs {}",
                want[i]
            );
        }
    }
}
