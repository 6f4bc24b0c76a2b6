//! The frozen-encoder cache's key on committed models only (the cache and heads on the real
//! ESM-2 8M are in `tests/real_data/frozen.rs`).

use candle_core::Device;
use protloc::model::{self, Purpose};

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
