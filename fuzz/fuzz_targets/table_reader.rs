//! Arbitrary bytes as a CSV and a TSV file: parsed records are valid, errors are errors;
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protloc::data::{table, validate_sequence, ReadOptions};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    for (name, kind) in [("in.csv", table::TableKind::Csv), ("in.tsv", table::TableKind::Tsv)] {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        for skip_invalid in [false, true] {
            let opts = ReadOptions { skip_invalid, require_labels: false, multi_label: false };
            if let Ok(ds) = table::read_table(&path, kind, opts) {
                for rec in ds.records {
                    assert_eq!(validate_sequence(&rec.sequence).as_deref(), Ok(rec.sequence.as_str()));
                }
            }
        }
    }
});
