//! `protloc export --format hf`: the directory's files, names, shapes and config, for every
//! head. Loading the exports in transformers is `tools/check_export.sh` (needs PyTorch; run
//! by hand, documented in docs/interop.md); here: what can be checked without it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use common::{assert_rows_close, classifier_logits, hf_fixture, protloc};
use protloc::model::export::export_hf;
use protloc::model::{load_base, HeadKind, Pool, Purpose, SequenceClassifier, TaskConfig};

fn shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    common::load(path)
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The pooler head on BERT is transformers' BertForSequenceClassification: the export has
/// exactly the tensors (names and shapes) and encoder settings transformers itself saved.
#[test]
fn pooler_head_exports_as_transformers_own_class() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    let hf = hf_fixture("hf_bert_classifier");
    protloc()
        .args(["export", hf.path().to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()])
        .assert()
        .success();
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "model.safetensors",
            "protloc_export.json",
            "tokenizer_config.json",
            "vocab.txt"
        ]
    );
    assert_eq!(
        shapes(&out.join("model.safetensors")),
        shapes(&hf.path().join("model.safetensors"))
    );
    let (got, want) = (
        json(&out.join("config.json")),
        json(&hf.path().join("config.json")),
    );
    assert_eq!(
        got["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert!(got.get("auto_map").is_none() && got.get("protloc").is_none());
    for key in [
        "model_type",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "layer_norm_eps",
        "hidden_act",
        "type_vocab_size",
        "pad_token_id",
    ] {
        assert_eq!(got[key], want[key], "{key}");
    }
    // Labels as protloc reads them (the location spelled the DeepLoc way).
    assert_eq!(got["id2label"]["2"], "Cell.membrane");
    assert_eq!(
        json(&out.join("tokenizer_config.json"))["tokenizer_class"],
        "BertTokenizer"
    );
    assert_eq!(
        std::fs::read(out.join("vocab.txt")).unwrap(),
        std::fs::read(hf.path().join("vocab.txt")).unwrap()
    );
}

fn tiny_model(
    head: HeadKind,
    pool: Pool,
    membrane: bool,
    multi_label: bool,
    members: usize,
) -> SequenceClassifier {
    let base = load_base("scratch:tiny", 5, &Device::Cpu, Purpose::Training).unwrap();
    let labels = ["Nucleus", "Cytoplasm", "Extracellular"]
        .map(String::from)
        .to_vec();
    let mut task = TaskConfig::new(labels, "scratch:tiny");
    task.head = head;
    task.pool = pool;
    task.membrane = membrane;
    task.multi_label = multi_label;
    task.thresholds = multi_label.then(|| vec![0.4, 0.5, 0.6]);
    task.ensemble = members;
    if members > 1 {
        SequenceClassifier::new_ensemble(base, task, &(0..members as u64).collect::<Vec<_>>())
            .unwrap()
    } else {
        SequenceClassifier::new(base, task).unwrap()
    }
}

/// Every head exports; the ones without a transformers class carry modeling_protloc.py and
/// an auto_map entry naming a class defined in it; the export reads back into protloc with
/// the same outputs, which `protloc_export.json` records for the transformers-side check.
#[test]
fn every_head_exports_and_reads_back_with_the_same_outputs() {
    let cases = [
        (
            "pooler",
            HeadKind::Pooler,
            Pool::Cls,
            false,
            false,
            1,
            false,
        ),
        (
            "linear-cls",
            HeadKind::Linear,
            Pool::Cls,
            false,
            false,
            1,
            true,
        ),
        (
            "linear-mean",
            HeadKind::Linear,
            Pool::Mean,
            true,
            false,
            1,
            true,
        ),
        ("mlp", HeadKind::Mlp, Pool::Mean, false, false, 1, true),
        (
            "la",
            HeadKind::LightAttention,
            Pool::Mean,
            true,
            false,
            1,
            true,
        ),
        (
            "la-multi",
            HeadKind::LightAttention,
            Pool::Mean,
            false,
            true,
            1,
            true,
        ),
        (
            "reference",
            HeadKind::Reference,
            Pool::Cls,
            false,
            false,
            1,
            true,
        ),
        (
            "pooler-membrane",
            HeadKind::Pooler,
            Pool::Cls,
            true,
            false,
            1,
            true,
        ),
        (
            "ensemble",
            HeadKind::LightAttention,
            Pool::Mean,
            true,
            false,
            3,
            true,
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let modeling = include_str!("../src/model/modeling_protloc.py");
    for (name, head, pool, membrane, multi, members, custom) in cases {
        let model = tiny_model(head, pool, membrane, multi, members);
        let dir = tmp.path().join(name);
        let out = export_hf(&model, &dir).unwrap();
        assert_eq!(out.custom_code, custom, "{name}");
        assert_eq!(dir.join("modeling_protloc.py").is_file(), custom, "{name}");
        let config = json(&dir.join("config.json"));
        let arch = config["architectures"][0].as_str().unwrap().to_string();
        assert_eq!(arch, out.architecture, "{name}");
        if custom {
            let entry = config["auto_map"]["AutoModelForSequenceClassification"]
                .as_str()
                .unwrap();
            assert_eq!(entry, format!("modeling_protloc.{arch}"), "{name}");
            assert!(
                modeling.contains(&format!("class {arch}(")),
                "{name}: {arch}"
            );
            assert_eq!(config["protloc"]["head"], head.name(), "{name}");
        } else {
            assert_eq!(arch, "BertForSequenceClassification", "{name}");
        }
        assert_eq!(
            config["problem_type"],
            if multi {
                "multi_label_classification"
            } else {
                "single_label_classification"
            },
            "{name}"
        );
        // Read back: a standard export as a transformers directory, a custom one through
        // its "protloc" section.
        let back = SequenceClassifier::load(&dir, &Device::Cpu).unwrap();
        let export = json(&dir.join("protloc_export.json"));
        let seqs: Vec<String> =
            serde_json::from_value(export["check"]["sequences"].clone()).unwrap();
        let want: Vec<Vec<f32>> =
            serde_json::from_value(export["check"]["logits"].clone()).unwrap();
        let (orig, _) = classifier_logits(&model, &seqs);
        let (again, _) = classifier_logits(&back, &seqs);
        assert_rows_close(&format!("{name}: recorded"), &orig, &want, 1e-6);
        assert_rows_close(&format!("{name}: read back"), &again, &orig, 1e-6);
        assert_eq!(
            export["check"]["membrane_probability"].is_array(),
            membrane,
            "{name}"
        );
    }
}

#[test]
fn onnx_is_refused_with_the_command_that_makes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = hf_fixture("hf_bert_classifier");
    let o = protloc()
        .args(["export", hf.path().to_str().unwrap()])
        .args(["--format", "onnx", "--output"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("optimum-cli export onnx") && err.contains("--format hf"),
        "{err}"
    );
    assert!(!tmp.path().join("x").exists());
}
