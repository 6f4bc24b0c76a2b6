//! The reference workflow's head (`--head reference`: BERT pooler -> dropout -> linear ->
//! tanh): outputs, loss and every gradient match PyTorch on a tiny BERT with pooler (fixture
//! `reference_head.*` from `tools/make_fixtures.py`), the pooler comes from the checkpoint,
//! run directories reload with the same outputs, and `--frozen` / `--pool mean` are refused.

mod common;

use common::{var_named, vec_of};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use protloc::infer::BatchLimits;
use protloc::kernels::ops::cross_entropy;
use protloc::model::{
    self, BaseModel, Encoder, EncoderConfig, HeadKind, ParamStore, Pool, Purpose,
    SequenceClassifier, TaskConfig,
};
use protloc::tokenize::{TokenBatch, Tokenizer};
use protloc::train::{train, TrainArgs};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("L{i}")).collect()
}

struct Fixture {
    fx: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Fixture {
    fn load() -> Self {
        let fx = candle_core::safetensors::load(
            common::fixture("reference_head.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(common::fixture("reference_head.json")).unwrap(),
        )
        .unwrap();
        Self { fx, json }
    }

    /// Parameter names as the reference's `state_dict` has them (and as protloc names them).
    fn param_names(&self) -> Vec<String> {
        self.json["param_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }
}

/// Loads the fixture's BERT as a base model whose checkpoint holds every tensor of the
/// reference's `state_dict`, then puts a reference head on it the way `protloc train` does.
fn reference_model(f: &Fixture) -> SequenceClassifier {
    let mut cfg_json = f.json["bert_config"].clone();
    cfg_json["model_type"] = "bert".into();
    let cfg: EncoderConfig = serde_json::from_value(cfg_json).unwrap();
    let source: HashMap<String, Tensor> = f
        .param_names()
        .into_iter()
        .map(|n| {
            let t = f.fx[&n].clone();
            (n, t)
        })
        .collect();
    let store = ParamStore::new(
        source,
        "reference_head.safetensors",
        0,
        &Device::Cpu,
        DType::F32,
    );
    let encoder = Encoder::new(&store.strict(), &cfg).unwrap();
    let base = BaseModel {
        cfg,
        tokenizer: Tokenizer::protbert_default(),
        store,
        encoder,
        source: "reference_head fixture".into(),
    };
    let n = f.json["num_labels"].as_u64().unwrap() as usize;
    let task = TaskConfig {
        head: HeadKind::Reference,
        head_dropout: 0.2,
        ..TaskConfig::new(labels(n), "fixture")
    };
    SequenceClassifier::new(base, task).unwrap()
}

fn fixture_batch(f: &Fixture) -> TokenBatch {
    let ids = f.fx["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = f.fx["attention_mask"].to_dtype(DType::F32).unwrap();
    let max_len = ids.dim(1).unwrap();
    // The reference head ignores the residue mask (it reads the first token only); give it
    // the attention mask so that a head that used it would see something wrong.
    TokenBatch {
        ids,
        attention_mask: mask.clone(),
        residue_mask: mask,
        max_len,
        real_tokens: 0,
    }
}

#[test]
fn reference_head_matches_pytorch_outputs_loss_and_gradients() {
    let f = Fixture::load();
    let model = reference_model(&f);
    let store = &model.base.store;

    // The pooler is the checkpoint's (bit for bit), not a fresh initialisation; the linear
    // layer is new (a checkpoint tensor of the same name is never reused), so give it the
    // fixture's values to compare outputs.
    for name in ["bert.pooler.dense.weight", "bert.pooler.dense.bias"] {
        let got = vec_of(var_named(store, name).as_tensor());
        assert_eq!(got, vec_of(&f.fx[name]), "{name} is not the checkpoint's");
    }
    for name in ["classifier.1.weight", "classifier.1.bias"] {
        let var = var_named(store, name);
        if name.ends_with("weight") {
            assert_ne!(
                vec_of(var.as_tensor()),
                vec_of(&f.fx[name]),
                "{name}: the checkpoint's classifier was reused"
            );
        }
        var.set(&f.fx[name]).unwrap();
    }
    // Every parameter of the reference model, and nothing else.
    let mut ours: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
    let mut theirs = f.param_names();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);

    let batch = fixture_batch(&f);
    let target = f.fx["labels"].to_dtype(DType::U32).unwrap();
    let want_logits = vec_of(&f.fx["logits"]);
    // Training path (trainable variables; no rng: dropout off, as in PyTorch's eval mode).
    let logits = model.forward(&batch, None).unwrap();
    let d = max_abs_diff(&vec_of(&logits), &want_logits);
    assert!(d < 1e-5, "logits differ from PyTorch by {d:e}");
    // Inference path (detached weights, packed kernels).
    let d = max_abs_diff(
        &vec_of(&model.inference_probabilities(&batch).unwrap().logits),
        &want_logits,
    );
    assert!(d < 1e-5, "inference logits differ from PyTorch by {d:e}");

    let loss = cross_entropy(&logits, &target).unwrap();
    let (got, want) = (
        loss.to_scalar::<f32>().unwrap(),
        f.fx["loss"].to_scalar::<f32>().unwrap(),
    );
    assert!((got - want).abs() < 1e-5, "loss {got} vs PyTorch {want}");

    let grads = loss.backward().unwrap();
    // The attention key biases' gradient is zero in exact arithmetic (softmax ignores a
    // shift shared by all keys): both sides hold rounding noise (~1e-9) there, so the
    // tolerance has a floor relative to the largest gradient of the whole model.
    let global = f
        .param_names()
        .iter()
        .flat_map(|n| vec_of(&f.fx[&format!("grad.{n}")]))
        .fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        global > 1e-2,
        "degenerate fixture: largest gradient {global:e}"
    );
    for name in f.param_names() {
        let var = var_named(store, &name);
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let want = vec_of(&f.fx[&format!("grad.{name}")]);
        let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let d = max_abs_diff(&vec_of(g), &want);
        // Tolerance relative to the tensor's largest gradient entry.
        assert!(
            d <= 1e-4 * scale + 1e-6 * global,
            "{name}: max |grad diff| {d:e} (scale {scale:e})"
        );
    }
}

fn tiny_args(data: &std::path::Path, out: &std::path::Path) -> TrainArgs {
    let mut a = TrainArgs::new("scratch:tiny", data.to_path_buf(), out.to_path_buf());
    a.head = HeadKind::Reference;
    a.epochs = 1;
    a.max_steps = Some(2);
    a.batch_size = 4;
    a.max_residues = Some(48);
    a.val_fraction = 0.2;
    a
}

/// `protloc train --head reference` writes a run directory that names the head in
/// config.json with the reference's default dropout, stores the pooler and `classifier.1`
/// under the reference's names, and reloads (strictly) with the same weights and outputs.
#[test]
fn reference_run_directory_saves_and_reloads_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&data, 3, 2).unwrap();
    let run = dir.path().join("run");
    train(&tiny_args(&data, &run)).unwrap();

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["protloc"]["head"], "reference");
    assert_eq!(config["protloc"]["pool"], "cls");
    assert_eq!(config["protloc"]["head_dropout"], 0.2);
    let saved =
        candle_core::safetensors::load(run.join("model.safetensors"), &Device::Cpu).unwrap();
    for name in [
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.1.weight",
        "classifier.1.bias",
    ] {
        assert!(saved.contains_key(name), "{name} not saved");
    }
    assert!(!saved.contains_key("classifier.weight"));

    let model = SequenceClassifier::load(&run, &Device::Cpu).unwrap();
    assert_eq!(model.task.head, HeadKind::Reference);
    let reloaded = model.base.store.tensors();
    assert_eq!(reloaded.len(), saved.len());
    for (name, t) in &saved {
        assert_eq!(
            vec_of(&reloaded[name]),
            vec_of(t),
            "{name} changed on reload"
        );
    }

    // Saved again and reloaded: the same tensors and the same outputs, bit for bit.
    let again_dir = dir.path().join("again");
    model.save(&again_dir).unwrap();
    let again = SequenceClassifier::load(&again_dir, &Device::Cpu).unwrap();
    let seqs = [
        "MKTAYIAKQRQISFVKSHFSRQ",
        "MSKLVLVGAGGVGKSALTIQLIQNHFVDEYDPT",
    ];
    let enc: Vec<_> = seqs.iter().map(|s| model.encode(s)).collect();
    let batch = TokenBatch::collate(
        &enc.iter().collect::<Vec<_>>(),
        model.base.tokenizer.pad_id,
        &Device::Cpu,
    )
    .unwrap();
    let a = vec_of(&model.inference_probabilities(&batch).unwrap().logits);
    let b = vec_of(&again.inference_probabilities(&batch).unwrap().logits);
    assert_eq!(a, b);
    assert!(a.iter().all(|x| x.abs() <= 1.0), "tanh logits: {a:?}");

    // `predict`/`eval`/`serve` go through `infer::head_outputs`: softmax of those tanh logits.
    let limits = BatchLimits {
        max_batch_tokens: 256,
        max_batch_size: 1,
    };
    let probs = protloc::infer::head_outputs(&again, &enc, limits, None)
        .unwrap()
        .probabilities;
    let want: Vec<Vec<f32>> = model
        .predict_proba(&batch)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (p, w) in probs.iter().zip(&want) {
        assert!(max_abs_diff(p, w) < 1e-5, "{p:?} vs {w:?}");
    }

    // A model as training holds it (trainable row-major weights) and its saved run directory
    // (loaded for inference: frozen column-major weights) agree to float rounding.
    let base = model::load_base("scratch:tiny", 7, &Device::Cpu, Purpose::Training).unwrap();
    let task = TaskConfig {
        head: HeadKind::Reference,
        ..TaskConfig::new(labels(10), "scratch:tiny")
    };
    let fresh = SequenceClassifier::new(base, task).unwrap();
    let fresh_dir = dir.path().join("fresh");
    fresh.save(&fresh_dir).unwrap();
    let loaded = SequenceClassifier::load(&fresh_dir, &Device::Cpu).unwrap();
    let d = max_abs_diff(
        &vec_of(&fresh.inference_probabilities(&batch).unwrap().logits),
        &vec_of(&loaded.inference_probabilities(&batch).unwrap().logits),
    );
    assert!(d < 1e-5, "reloaded outputs differ by {d:e}");
}

#[test]
fn frozen_reference_head_and_mean_pooling_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&data, 2, 2).unwrap();
    let run = dir.path().join("run");

    let mut frozen = tiny_args(&data, &run);
    frozen.frozen = true;
    for pool in [Pool::Mean, Pool::Cls] {
        frozen.pool = pool;
        let err = train(&frozen).expect_err("--frozen --head reference must fail");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--frozen") && msg.contains("reference head") && msg.contains("[CLS]"),
            "{msg}"
        );
    }
    assert!(!run.exists(), "a refused run wrote {}", run.display());

    let mut mean = tiny_args(&data, &run);
    mean.pool = Pool::Mean;
    let msg = format!("{:#}", train(&mean).expect_err("--pool mean must fail"));
    assert!(
        msg.contains("--head reference") && msg.contains("--pool mean"),
        "{msg}"
    );
    assert!(!run.exists());
}
