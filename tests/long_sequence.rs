//! Inference memory is bounded for very long proteins: the packed attention processes query
//! rows in blocks (src/kernels/packed_attention.rs), so a 35,000-residue protein never materialises a
//! 35,000 x 35,000 score matrix (4.9 GB per head in f32). This file holds one test so the
//! process's peak RSS belongs to it alone.

use candle_core::{DType, Device, Tensor};
use protloc::model::{scratch_config, Encoder, ParamStore};

/// Peak resident set size of this process so far (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

#[test]
fn esm_35000_residues_runs_in_bounded_memory() {
    // A tiny random ESM-2 (1 layer, hidden 16, 1 head): attention dominates the cost and the
    // memory, which is what is under test; rotary positions allow any length.
    let mut cfg = scratch_config("tiny").unwrap();
    cfg.model_type = protloc::model::Arch::Esm;
    cfg.vocab_size = 33;
    cfg.hidden_size = 16;
    cfg.intermediate_size = 32;
    cfg.num_attention_heads = 1;
    cfg.num_hidden_layers = 1;
    cfg.layer_norm_eps = 1e-5;
    cfg.position_embedding_type = protloc::model::config::PositionEmbedding::Rotary;
    cfg.mask_token_id = Some(32);
    let store = ParamStore::new(Default::default(), "test", 3, &Device::Cpu, DType::F32);
    let encoder = Encoder::new(&store.initialising(), &cfg)
        .unwrap()
        .detached();

    let t = 35_002; // <cls> + 35,000 residues + <eos>
    let ids: Vec<u32> = (0..t as u32).map(|i| 4 + i % 20).collect();
    let ids = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, t), DType::F32, &Device::Cpu).unwrap();
    let before = peak_rss();
    let hidden = encoder.forward(&ids, &mask, None).unwrap();
    assert_eq!(hidden.dims(), &[1, t, 16]);
    let sum = hidden.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(sum.is_finite());
    if let (Some(before), Some(after)) = (before, peak_rss()) {
        let grown = after.saturating_sub(before);
        // One head's full score matrix alone would be 4.9 GB; blocked attention needs a few
        // MB of scores per thread plus O(T x hidden) activations.
        assert!(grown < 512 << 20, "peak memory grew by {} MiB", grown >> 20);
    }
}
