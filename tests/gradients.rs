//! Training correctness: loss, every gradient and an 8-step AdamW curve match PyTorch on a
//! tiny BERT (fixture from `tools/make_fixtures.py`); every trainable tensor receives a
//! gradient; gradients agree with finite differences.

mod common;

use common::{var_named, vec_of};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use protloc::kernels::ops::cross_entropy;
use protloc::model::head::{pool, ClassifierHead, Pool};
use protloc::model::{Encoder, EncoderConfig, ParamStore};
use protloc::tokenize::TokenBatch;
use protloc::train::optim::{Optimizer, OptimizerConfig};

struct Tiny {
    store: ParamStore,
    encoder: Encoder,
    head: ClassifierHead,
    batch: TokenBatch,
    labels: Tensor,
    fx: HashMap<String, Tensor>,
}

/// Our name for a fixture parameter name.
fn ours(name: &str) -> String {
    match name.strip_prefix("head.") {
        Some(rest) => format!("classifier.{rest}"),
        None => format!("bert.{name}"),
    }
}

fn fixture_params(fx: &HashMap<String, Tensor>) -> Vec<String> {
    let mut names: Vec<String> = fx
        .keys()
        .filter(|k| !k.starts_with("grad.") && !k.starts_with("final.") && (k.contains('.')))
        .cloned()
        .collect();
    names.sort();
    names
}

fn tiny() -> Tiny {
    let fx = candle_core::safetensors::load(
        common::fixture("tiny_bert_train.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("tiny_bert_train.json")).unwrap(),
    )
    .unwrap();
    let mut cfg_json = json["bert_config"].clone();
    cfg_json["model_type"] = "bert".into();
    let cfg: EncoderConfig = serde_json::from_value(cfg_json).unwrap();
    let source: HashMap<String, Tensor> = fixture_params(&fx)
        .iter()
        .map(|n| (ours(n), fx[n].clone()))
        .collect();
    let store = ParamStore::new(
        source,
        "tiny_bert_train.safetensors",
        0,
        &Device::Cpu,
        DType::F32,
    );
    let encoder = Encoder::new(&store.strict(), &cfg).unwrap();
    let head = ClassifierHead::new(&store.strict().pp("classifier"), 32, 3, 0.0).unwrap();
    assert!(
        store.unused_source_names().is_empty(),
        "unused: {:?}",
        store.unused_source_names()
    );

    let ids = fx["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = fx["attention_mask"].to_dtype(DType::F32).unwrap();
    // Residue mask is unused with CLS pooling; any [B, T] tensor will do.
    let batch = TokenBatch {
        ids,
        attention_mask: mask.clone(),
        residue_mask: mask,
        max_len: 12,
        real_tokens: 0,
    };
    let labels = fx["labels"].to_dtype(DType::U32).unwrap();
    Tiny {
        store,
        encoder,
        head,
        batch,
        labels,
        fx,
    }
}

fn loss_of(t: &Tiny) -> Tensor {
    let hidden = t
        .encoder
        .forward(&t.batch.ids, &t.batch.attention_mask, None)
        .unwrap();
    let logits = t
        .head
        .forward(
            &pool(&hidden, &t.batch.residue_mask, Pool::Cls).unwrap(),
            None,
        )
        .unwrap();
    cross_entropy(&logits, &t.labels).unwrap()
}

#[test]
fn loss_and_every_gradient_match_pytorch() {
    let t = tiny();
    let loss = loss_of(&t);
    let want = t.fx["loss"].to_scalar::<f32>().unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-5, "loss {got} vs PyTorch {want}");

    let grads = loss.backward().unwrap();
    for name in fixture_params(&t.fx) {
        let var = var_named(&t.store, &ours(&name));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let want = vec_of(&t.fx[&format!("grad.{name}")]);
        let got = vec_of(g);
        let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Tolerance relative to the tensor's largest gradient entry.
        assert!(
            max_diff <= 1e-4 * scale.max(1e-6) + 1e-9,
            "{name}: max |grad diff| {max_diff:e} (scale {scale:e})"
        );
    }
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    let t = tiny();
    let grads = loss_of(&t).backward().unwrap();
    let vars = t.store.vars();
    assert!(vars.len() > 30);
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: gradient flow stopped"));
        let norm: f32 = vec_of(g).iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        // A gradient that records how it was computed keeps those tensors (the layer's input
        // and output gradients) alive until the optimizer step: training memory, not values.
        assert!(
            !g.track_op(),
            "{name}: gradient holds part of the backward graph"
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    let t = tiny();
    let grads = loss_of(&t).backward().unwrap();
    // One entry from each kind of parameter: embedding, attention, LayerNorm, FFN, head.
    let probes = [
        ("bert.embeddings.word_embeddings.weight", 7 * 32 + 3),
        ("bert.encoder.layer.0.attention.self.query.weight", 5),
        ("bert.encoder.layer.1.attention.output.LayerNorm.weight", 11),
        ("bert.encoder.layer.1.intermediate.dense.weight", 100),
        ("classifier.weight", 40),
    ];
    let eps = 1e-2f32;
    for (name, idx) in probes {
        let var = var_named(&t.store, name);
        let analytic = vec_of(grads.get(var.as_tensor()).unwrap())[idx] as f64;
        let orig = vec_of(var.as_tensor());
        let eval_at = |delta: f32| {
            let mut v = orig.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss_of(&t)
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let numeric = (eval_at(eps) - eval_at(-eps)) / (2.0 * eps as f64);
        var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let tol = 2e-3 * analytic.abs().max(numeric.abs()) + 2e-5;
        assert!(
            (analytic - numeric).abs() <= tol,
            "{name}[{idx}]: analytic {analytic:e} vs finite difference {numeric:e}"
        );
    }
}

/// Every parameter equals PyTorch's `final.<name>` in `finals` within 1e-5. Returns whether
/// any moved by more than 1e-3 from its initial value.
fn assert_final_weights(t: &Tiny, finals: &HashMap<String, Tensor>) -> bool {
    let mut moved = false;
    for name in fixture_params(&t.fx) {
        let got = vec_of(var_named(&t.store, &ours(&name)).as_tensor());
        let want = vec_of(&finals[&format!("final.{name}")]);
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff < 1e-5,
            "{name}: final weights differ by {max_diff:e}"
        );
        let init = vec_of(&t.fx[&name]);
        moved |= got.iter().zip(&init).any(|(a, b)| (a - b).abs() > 1e-3);
    }
    moved
}

#[test]
fn adamw_training_curve_matches_pytorch() {
    let t = tiny();
    let params: Vec<_> = t
        .store
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v, 1.0, 0.01))
        .collect();
    let mut opt = Optimizer::new(OptimizerConfig::default(), params).unwrap();
    let want: Vec<f32> = vec_of(&t.fx["losses"]);
    for (k, want_loss) in want.iter().enumerate() {
        let loss = loss_of(&t);
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - want_loss).abs() < 2e-5,
            "step {k}: loss {got} vs PyTorch {want_loss}"
        );
        let grads = opt.collect_grads(&loss.backward().unwrap());
        opt.step(&grads, 1e-3, 1.0).unwrap();
    }
    assert_final_weights(&t, &t.fx);
}

/// LAMB as the reference workflow's `torch_optimizer.Lamb`: six steps with gradients clipped
/// at norm 1.0 first, on the same tiny model, match PyTorch's losses and final weights.
#[test]
fn lamb_steps_match_torch_optimizer() {
    use protloc::train::optim::{clip_scale, Rule};
    let t = tiny();
    let fx =
        candle_core::safetensors::load(common::fixture("lamb.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("lamb.json")).unwrap())
            .unwrap();
    let o = &meta["optimizer"];
    let cfg = OptimizerConfig {
        eps: o["eps"].as_f64().unwrap(),
        rule: Rule::Lamb,
        ..OptimizerConfig::default()
    };
    let wd = o["weight_decay"].as_f64().unwrap();
    let lr = o["lr"].as_f64().unwrap();
    let params: Vec<_> = t
        .store
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v, 1.0, wd))
        .collect();
    let mut opt = Optimizer::new(cfg, params).unwrap();
    let want: Vec<f32> = vec_of(&fx["losses"]);
    assert_eq!(want.len(), 6);
    for (k, want_loss) in want.iter().enumerate() {
        let loss = loss_of(&t);
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - want_loss).abs() < 2e-5,
            "step {k}: loss {got} vs torch_optimizer.Lamb {want_loss}"
        );
        let grads = opt.collect_grads(&loss.backward().unwrap());
        let scale = clip_scale(opt.grad_norm(&grads).unwrap(), 1.0);
        opt.step(&grads, lr, scale).unwrap();
    }
    assert!(
        assert_final_weights(&t, &fx),
        "LAMB left the weights where they were"
    );
}
