//! Models fine-tuned elsewhere, against what their own code computes (fixtures from
//! `tools/make_fixtures.py --imports-only`): a transformers BertForSequenceClassification
//! directory and the reference workflow's `model.pth`, read directly and through
//! `protloc import`, predicted and served. The ESM classifiers (which need ESM-2's vocabulary
//! from ../shared) are in `tests/real_data/imports.rs`.

mod common;
mod serve_support;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{
    assert_rows_close, classifier_logits, fixture, fixture_rows, hf_fixture, protloc, write,
};
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
    let hf = hf_fixture("hf_bert_classifier");
    let model = SequenceClassifier::load(hf.path(), &Device::Cpu).unwrap();
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
    let hf = hf_fixture("hf_bert_classifier");
    let cases: [(&str, Vec<String>); 2] = [
        ("hf", vec![hf.path().display().to_string()]),
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
    let hf_dir = hf_fixture("hf_bert_classifier");
    let hf = hf_dir.path().display().to_string();
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
        std::fs::copy(hf_dir.path().join(f), bare.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(hf_dir.path().join("config.json")).unwrap();
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
    let other = hf_dir
        .path()
        .join("model.safetensors")
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

/// `train --init-head` continues from the classifier a transformers directory already has:
/// with learning rates too small to move a weight, the trained run is that classifier
/// (same tensors, same logits, its labels and tokenization), and since its one epoch
/// validates no better than the start, the start is what was saved (epoch 0); without the
/// flag the head starts fresh. Labels the model does not predict are refused.
#[test]
fn init_head_continues_the_checkpoint_classifier() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = hf_fixture("hf_bert_classifier");
    let locations = ["Cytoplasm", "Nucleus", "Cell.membrane", "Mitochondrion"];
    let mut fasta = String::new();
    for i in 0..16 {
        let seq: String = (0..30 + i)
            .map(|k| b"ACDEFGHIKLMNPQRSTVWY"[(k * 7 + i) % 20] as char)
            .collect();
        fasta += &format!(">p{i} {}-S\n{seq}\n", locations[i % 4]);
    }
    let data = write(tmp.path(), "train.fa", &fasta);
    let train = |out: &str, init: bool| {
        let run = tmp.path().join(out);
        let mut cmd = protloc();
        cmd.args(["train", "--model", hf.path().to_str().unwrap(), "--data"])
            .arg(&data)
            .arg("--output")
            .arg(&run)
            .args([
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--lr",
                "1e-30",
                "--head-lr",
                "1e-30",
            ]);
        if init {
            cmd.arg("--init-head");
        }
        let out = cmd.assert().success().get_output().clone();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (run, text(&out.stdout), text(&out.stderr))
    };
    let (run, stdout, stderr) = train("init", true);
    // The checkpoint is validated first; an epoch that does not beat it (this one is the
    // same model) is not saved over it.
    assert!(
        stdout.contains("Epoch 0 (the starting model): Validation Accuracy:"),
        "{stdout}"
    );
    assert!(
        stderr.contains("no epoch beat the starting model on validation"),
        "{stderr}"
    );
    let saved = common::load(&run.join("model.safetensors"));
    let original = common::load(&hf.path().join("model.safetensors"));
    for name in [
        "classifier.weight",
        "classifier.bias",
        "bert.pooler.dense.weight",
    ] {
        // A zero bias moves by ~lr; everything else is bit-for-bit the checkpoint's.
        let d = (&saved[name] - &original[name]).unwrap().abs().unwrap();
        let d: f32 = d.max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-20, "{name} changed by {d}");
    }
    let model = SequenceClassifier::load(&run, &Device::Cpu).unwrap();
    assert_eq!(model.task.labels, locations);
    assert_eq!(model.task.head, HeadKind::Pooler);
    // Its training_args.json records that head, not the --head default it was not given.
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("training_args.json")).unwrap()).unwrap();
    assert_eq!(recorded["head"], "pooler", "{recorded}");
    assert_eq!(recorded["pool"], "cls", "{recorded}");
    let (seqs, want) = fixture_rows("hf_bert_classifier", "logits");
    let (single, _) = classifier_logits(&model, &seqs);
    assert_rows_close("continued run", &single, &want, 1e-5);

    let (fresh_run, fresh_out, fresh_err) = train("fresh", false);
    assert!(!fresh_out.contains("Epoch 0"), "{fresh_out}");
    assert!(fresh_err.contains("best epoch 1 saved"), "{fresh_err}");
    let fresh = common::load(&fresh_run.join("model.safetensors"));
    assert!(!common::same(
        &fresh["classifier.weight"],
        &original["classifier.weight"]
    ));

    let other = write(
        tmp.path(),
        "other.fa",
        &fasta.replace("Nucleus-S", "Lysosome/Vacuole-S"),
    );
    // `train --init-head` from the fixture with `extra` options on `data`.
    let init = |extra: &[&str], data: &Path, out: &str| {
        protloc()
            .args([
                "train",
                "--init-head",
                "--model",
                hf.path().to_str().unwrap(),
            ])
            .args(extra)
            .arg("--data")
            .arg(data)
            .arg("--output")
            .arg(tmp.path().join(out))
            .output()
            .unwrap()
    };
    let o = init(&[], &other, "bad");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--init-head") && err.contains("Lysosome/Vacuole"),
        "{err}"
    );

    // The head comes with the checkpoint: asking for another one is an error, not ignored.
    for flag in [["--head", "mlp"], ["--membrane", "on"], ["--pool", "mean"]] {
        let o = init(&flag, &data, "conflict");
        assert!(!o.status.success(), "{flag:?} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--init-head") && err.contains(flag[0]),
            "{flag:?}: {err}"
        );
        assert!(!tmp.path().join("conflict").exists());
    }
}
