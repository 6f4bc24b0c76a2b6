//! Arbitrary bytes through the streaming FASTA reader: every record is either parsed and
//! valid, or an error naming a line; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protloc::data::{fasta::FastaStream, validate_sequence, DataError};

fuzz_target!(|data: &[u8]| {
    let stream = FastaStream::from_reader("fuzz.fasta", std::io::Cursor::new(data.to_vec()));
    for item in stream.take(10_000) {
        match item {
            Ok(rec) => {
                assert!(!rec.id.is_empty());
                assert_eq!(validate_sequence(&rec.sequence).as_deref(), Ok(rec.sequence.as_str()));
                assert!(rec.pos.line >= 1);
            }
            Err(DataError::Invalid { pos, .. }) => assert!(pos.line >= 1),
            Err(_) => {}
        }
    }
});
