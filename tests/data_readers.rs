//! Integration tests for `protloc::data` on handmade files, every error path included (the
//! real DeepLoc files are read by the real-data suite, `tests/real_data/data_readers.rs`).

mod common;

use std::io::Write;
use std::path::Path;

use protloc::data::stats::DatasetStats;
use protloc::data::table::{read_table, TableKind};
use protloc::data::{
    canonical_label, read_dataset, DataError, Dataset, Membrane, ReadOptions, DEEPLOC_LOCATIONS,
};

use common::{LABELED, LENIENT, STRICT};

/// A temp file with the given extension; kept alive by the returned handle.
fn file(ext: &str, content: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .prefix("protloc-test-")
        .suffix(ext)
        .tempfile()
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f
}

/// Reads `content` (format by extension) and returns the error message, checking that it
/// names the file and `file:line`.
fn error_at(ext: &str, content: &str, opts: ReadOptions, line: usize) -> String {
    let f = file(ext, content);
    let err = read_dataset(f.path(), opts).expect_err("expected an error");
    let msg = err.to_string();
    let name = f.path().file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(name), "message does not name the file: {msg}");
    assert!(
        msg.contains(&format!("{name}:{line}:")),
        "message does not point at line {line}: {msg}"
    );
    msg
}

// ---------------------------------------------------------------- FASTA

#[test]
fn fasta_wrapped_mixed_and_plain() {
    let f = file(
        ".fa",
        ">P1 Nucleus-S\nMKVL\nLAAG\nW\n>P2 Golgi_apparatus-M test\nmkv\n>sp|P3|X_HUMAN Some protein OS=Homo sapiens\nACDE\nFGH*\n",
    );
    let d = read_dataset(f.path(), STRICT).unwrap();
    let r: Vec<_> = d
        .records
        .iter()
        .map(|r| {
            (
                r.id.as_str(),
                r.sequence.as_str(),
                r.location.as_deref(),
                r.membrane,
                r.is_test,
                r.pos.line,
            )
        })
        .collect();
    assert_eq!(
        r,
        vec![
            (
                "P1",
                "MKVLLAAGW",
                Some("Nucleus"),
                Membrane::Soluble,
                false,
                1
            ),
            (
                "P2",
                "MKV",
                Some("Golgi.apparatus"),
                Membrane::Membrane,
                true,
                5
            ),
            (
                "sp|P3|X_HUMAN",
                "ACDEFGH",
                None,
                Membrane::Unknown,
                false,
                7
            ),
        ]
    );
}

#[test]
fn fasta_errors_name_file_and_line() {
    let msg = error_at(
        ".fasta",
        ">a Nucleus-S\nMK\n>b Nucleus-S\n\n>c Nucleus-S\nMK\n",
        STRICT,
        3,
    );
    assert!(
        msg.contains("empty sequence") && msg.contains("\"b\""),
        "{msg}"
    );

    let msg = error_at(".fasta", ">a\nMKV\nMKV\nMKV\n>b\nMKVMK\nMKB3K\n", STRICT, 5);
    assert!(
        msg.contains("\"b\"") && msg.contains("'3'") && msg.contains("position 9"),
        "{msg}"
    );

    let msg = error_at(
        ".fasta",
        ">a Nucleus-S\nMK\n>b Nucleoplasm-M\nMK\n",
        STRICT,
        3,
    );
    assert!(msg.contains("unknown label \"Nucleoplasm\""), "{msg}");
    assert!(
        msg.contains("Golgi.apparatus"),
        "valid labels listed: {msg}"
    );

    let msg = error_at(".fasta", ">a\nMK\n>b\nMK\n>a\nMK\n", STRICT, 5);
    assert!(
        msg.contains("duplicate id \"a\"") && msg.contains("line 1"),
        "{msg}"
    );

    let msg = error_at(".fasta", ">a Nucleus-S\nMK\n>b free text\nMK\n", LABELED, 3);
    assert!(msg.contains("no location label"), "{msg}");

    let msg = error_at(".fasta", "id,sequence\nP1,MK\n", STRICT, 1);
    assert!(msg.contains("not a FASTA file"), "{msg}");

    let msg = error_at(".fasta", ">a Nucleus-S trian\nMK\n", STRICT, 1);
    assert!(msg.contains("trian"), "{msg}");
}

#[test]
fn fasta_empty_file() {
    let f = file(".fasta", "");
    assert!(matches!(
        read_dataset(f.path(), STRICT),
        Err(DataError::Empty(_))
    ));
}

#[test]
fn fasta_skip_invalid_counts() {
    let f = file(
        ".fasta",
        ">a Nucleus-S\nMK\n>b Nucleus-S\nM1K\n>a Nucleus-S\nMK\n>c Bogus-S\nMK\n>d\nMK\n>e Plastid-U\nMK\n",
    );
    let opts = ReadOptions {
        skip_invalid: true,
        require_labels: true,
        multi_label: false,
    };
    let Dataset { records, skipped } = read_dataset(f.path(), opts).unwrap();
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "e"]);
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    for (msg, line) in skipped.iter().zip([3, 5, 7, 9]) {
        assert!(msg.contains(&format!(":{line}:")), "{msg}");
    }
}

#[test]
fn fasta_all_invalid_reports_first_error() {
    let f = file(".fasta", ">a\nM1\n>b\nM2\n");
    let err = read_dataset(f.path(), LENIENT).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Invalid { .. }), "{msg}");
    assert!(msg.contains(":1:") && msg.contains("'1'"), "{msg}");
}

#[test]
fn fasta_garbage_is_fatal_even_when_skipping() {
    let f = file(".fasta", "\u{0}\u{1}binary junk\n>a\nMK\n");
    let msg = read_dataset(f.path(), LENIENT).unwrap_err().to_string();
    assert!(
        msg.contains(":1:") && msg.contains("not a FASTA file"),
        "{msg}"
    );
}

#[test]
fn missing_file_is_io_error() {
    let err = read_dataset(Path::new("/nonexistent/x.fasta"), STRICT).unwrap_err();
    assert!(matches!(err, DataError::Io(..)));
    assert!(err.to_string().contains("/nonexistent/x.fasta"));
}

// ---------------------------------------------------------------- tables

#[test]
fn csv_and_tsv_read_the_same() {
    let csv = "accession,sequence,label,membrane,set\nP1,MKV,Cell membrane,1.0,train\nP2,ACD,Lysosome/Vacuole,0,test\nP3,WY,,,\n";
    let tsv = csv.replace(',', "\t");
    let a = read_dataset(file(".csv", csv).path(), STRICT)
        .unwrap()
        .records;
    let b = read_dataset(file(".TSV", &tsv).path(), STRICT)
        .unwrap()
        .records;
    assert_eq!(a.len(), 3);
    let strip = |r: &protloc::data::Record| {
        (
            r.id.clone(),
            r.sequence.clone(),
            r.location.clone(),
            r.membrane,
            r.is_test,
            r.pos.line,
        )
    };
    assert_eq!(
        a.iter().map(strip).collect::<Vec<_>>(),
        b.iter().map(strip).collect::<Vec<_>>()
    );
    assert_eq!(a[0].location.as_deref(), Some("Cell.membrane"));
    assert_eq!(a[1].membrane, Membrane::Soluble);
    assert!(a[1].is_test && !a[0].is_test);
    assert_eq!((a[2].location.as_deref(), a[2].pos.line), (None, 4));
    // .tab is a TSV too.
    let c = read_table(file(".tab", &tsv).path(), TableKind::Tsv, STRICT).unwrap();
    assert_eq!(c.records.len(), 3);
}

#[test]
fn table_errors_name_file_and_line() {
    let head = "id,sequence,location\n";
    let msg = error_at(
        ".csv",
        &format!("{head}P1,MK,Nucleus\nP2,,Nucleus\n"),
        STRICT,
        3,
    );
    assert!(msg.contains("empty sequence"), "{msg}");
    let msg = error_at(
        ".csv",
        &format!("{head}P1,MK,Nucleus\nP2,MKJ,Nucleus\n"),
        STRICT,
        3,
    );
    assert!(
        msg.contains("\"P2\"") && msg.contains("position 3"),
        "{msg}"
    );
    let msg = error_at(".csv", &format!("{head}P1,MK,Nucleolus\n"), STRICT, 2);
    assert!(msg.contains("unknown label \"Nucleolus\""), "{msg}");
    let msg = error_at(
        ".csv",
        &format!("{head}P1,MK,Nucleus\nP2,MK,Nucleus\nP1,MK,Nucleus\n"),
        STRICT,
        4,
    );
    assert!(
        msg.contains("duplicate id \"P1\"") && msg.contains("line 2"),
        "{msg}"
    );
    let msg = error_at(
        ".csv",
        &format!("{head}P1,MK,Nucleus\nP2,MK,\n"),
        LABELED,
        3,
    );
    assert!(msg.contains("no location label"), "{msg}");
    let msg = error_at(
        ".csv",
        &format!("{head}P1,MK,Cytoplasm|Nucleus\n"),
        STRICT,
        2,
    );
    assert!(
        msg.contains("multi-label rows are not supported in single-label mode"),
        "{msg}"
    );
    let msg = error_at(".csv", "id,sequence\nP1,MK\nP2\n", STRICT, 3);
    assert!(msg.contains("fields"), "{msg}");
    // A quoted field spanning lines: the row's line is where it starts.
    let msg = error_at(".csv", "id,sequence\n\"P1\",\"MK\nMK\"\nP2,M@\n", STRICT, 4);
    assert!(msg.contains("'@'"), "{msg}");
    let msg = error_at(".tsv", "id\tsequence\tmembrane\nP1\tMK\tmaybe\n", STRICT, 2);
    assert!(msg.contains("membrane"), "{msg}");
}

#[test]
fn table_without_labels_needs_label_column_only_when_required() {
    let f = file(".csv", "id,sequence\nP1,MK\n");
    assert_eq!(read_dataset(f.path(), STRICT).unwrap().records.len(), 1);
    let msg = read_dataset(f.path(), LABELED).unwrap_err().to_string();
    assert!(
        msg.contains(":2:") && msg.contains("no location label"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- labels, stats, plot

#[test]
fn canonical_labels() {
    assert_eq!(canonical_label("Cell membrane"), Some("Cell.membrane"));
    assert_eq!(
        canonical_label("endoplasmic_reticulum"),
        Some("Endoplasmic.reticulum")
    );
    assert_eq!(canonical_label("PEROXISOME"), Some("Peroxisome"));
    assert_eq!(canonical_label("Centrosome"), None);
}

#[test]
fn stats_on_handmade_file() {
    let f = file(
        ".fasta",
        ">a Nucleus-S\nMKVLA\n>b Nucleus-M test\nMKV\n>c Cytoplasm-U\nMKVLAMKVLA\n>d\nMK\n",
    );
    let d = read_dataset(f.path(), STRICT).unwrap();
    let s = DatasetStats::compute(&d.records);
    assert_eq!((s.total, s.train, s.test), (4, 3, 1));
    let rows: Vec<(&str, usize, usize, usize)> = s
        .locations
        .iter()
        .map(|l| (l.location.as_str(), l.total, l.train, l.test))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("Nucleus", 2, 1, 1),
            ("(none)", 1, 1, 0),
            ("Cytoplasm", 1, 1, 0)
        ]
    );
    let flags: Vec<usize> = s.membrane.iter().map(|m| m.count).collect();
    assert_eq!(flags, vec![1, 1, 2]);
    let l = &s.lengths;
    assert_eq!((l.min, l.max, l.p90, l.p99), (2, 10, 10, 10));
    assert_eq!((l.mean, l.median), (5.0, 4.0));
    assert_eq!((l.over_512, l.over_1022), (0, 0));
    let text = s.to_string();
    assert!(text.contains("Nucleus"), "{text}");
    // JSON form for `--json` style output.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["lengths"]["median"], 4.0);
    assert_eq!(json["membrane"][0]["flag"], "M");
}

// ---------------------------------------------------------------- round trip

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any set of records written as FASTA with any wrapping width reads back unchanged,
    /// with each record's header line number.
    #[test]
    fn fasta_round_trip(
        seqs in proptest::collection::vec(("[ACDEFGHIKLMNPQRSTVWY]{1,150}", 0usize..11, proptest::bool::ANY), 1..20),
        width in 1usize..80,
    ) {
        let mut text = String::new();
        let mut expected = Vec::new();
        let mut line = 1;
        for (i, (seq, label, test)) in seqs.iter().enumerate() {
            let location = DEEPLOC_LOCATIONS.get(*label).copied();
            match location {
                Some(l) => text.push_str(&format!(">id{i} {l}-S{}\n", if *test { " test" } else { "" })),
                None => text.push_str(&format!(">id{i} some free text\n")),
            }
            expected.push((format!("id{i}"), seq.clone(), location.map(str::to_string), *test && location.is_some(), line));
            let bytes = seq.as_bytes();
            for chunk in bytes.chunks(width) {
                text.push_str(std::str::from_utf8(chunk).unwrap());
                text.push('\n');
            }
            line += 1 + bytes.len().div_ceil(width);
        }
        let f = file(".fasta", &text);
        let got: Vec<_> = read_dataset(f.path(), STRICT)
            .unwrap()
            .records
            .into_iter()
            .map(|r| (r.id, r.sequence, r.location, r.is_test, r.pos.line))
            .collect();
        proptest::prop_assert_eq!(got, expected);
    }
}

/// DeepLoc 2.0's CSV: `|`-separated labels (canonicalised one by one) and the homology
/// partition; single-label mode refuses such rows with a hint.
#[test]
fn multi_label_csv_with_partitions() {
    let f = file(
        ".csv",
        "accession,sequence,label,partition,kingdom,membrane\nP1,MKV,Cytoplasm|Nucleus,3,Metazoa,0\nP2,MKA,Cell membrane,0,Fungi,1.0\n",
    );
    let multi = ReadOptions {
        multi_label: true,
        ..LABELED
    };
    let ds = read_dataset(f.path(), multi).unwrap();
    assert_eq!(ds.records[0].location.as_deref(), Some("Cytoplasm|Nucleus"));
    assert_eq!(ds.records[0].partition, Some(3));
    assert_eq!(ds.records[1].location.as_deref(), Some("Cell.membrane"));
    assert_eq!(ds.records[1].partition, Some(0));
    let err = read_dataset(f.path(), LABELED).unwrap_err().to_string();
    assert!(
        err.contains(":2:") && err.contains("--multi-label"),
        "{err}"
    );
    let bad = file(".csv", "id,sequence,label\nP1,MKV,Cytoplasm|Moon\n");
    let err = read_dataset(bad.path(), multi).unwrap_err().to_string();
    assert!(err.contains("Moon") && err.contains(":2:"), "{err}");
}
