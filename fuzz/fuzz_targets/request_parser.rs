//! Arbitrary request bodies under every content type: the parser returns validated
//! sequences or a 4xx error, never a panic or a 5xx.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protloc::serve::parse::{parse_body, BodyKind};

fuzz_target!(|data: &[u8]| {
    for kind in [BodyKind::Json, BodyKind::Fasta, BodyKind::Text, BodyKind::Csv] {
        match parse_body(kind, data, 64) {
            Ok(inputs) => {
                assert!(inputs.len() <= 64);
                for input in inputs {
                    let valid = protloc::data::validate_sequence(&input.sequence);
                    assert_eq!(valid.as_deref(), Ok(input.sequence.as_str()));
                }
            }
            Err(e) => assert!(e.status.is_client_error(), "{:?}", e.status),
        }
    }
});
