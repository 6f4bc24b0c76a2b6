//! `protloc::data` on the real shared data sets: DeepLoc 1.0 FASTA, the DeepLoc 2.0
//! SwissProt and HPA CSVs.

use crate::common::{LABELED, LENIENT, STRICT};
use protloc::data::fasta::{read_fasta, FastaStream};
use protloc::data::split::{stratified_validation, train_test};
use protloc::data::stats::{plot_length_histogram, DatasetStats};
use protloc::data::{read_dataset, Membrane, DEEPLOC_LOCATIONS};

#[test]
fn real_deeploc_fasta() {
    let path = crate::common::shared("data/deeploc_data.fasta");
    let data = read_dataset(&path, LABELED).unwrap();
    assert!(data.skipped.is_empty());
    assert_eq!(data.records.len(), 17_878);
    let (train, test) = train_test(&data.records);
    assert_eq!((train.len(), test.len()), (15_110, 2_768));
    let mut labels: Vec<&str> = data
        .records
        .iter()
        .map(|r| r.location.as_deref().unwrap())
        .collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), 10);
    assert!(labels.iter().all(|l| DEEPLOC_LOCATIONS.contains(l)));
    let first = &data.records[0];
    assert_eq!(first.id, "Q96CN9");
    assert_eq!(first.location.as_deref(), Some("Cytoplasm"));
    assert_eq!(first.membrane, Membrane::Soluble);
    assert_eq!(first.pos.line, 1);
    // 60-column wrapping: the first record spans 13 sequence lines (12 full + 55 residues).
    assert_eq!(first.sequence.len(), 775);
    assert_eq!(data.records[1].pos.line, 15);

    let stats = DatasetStats::compute(&data.records);
    assert_eq!(
        (stats.total, stats.train, stats.test),
        (17_878, 15_110, 2_768)
    );
    assert_eq!(stats.locations.len(), 10);
    let u = stats.membrane.iter().find(|m| m.flag == 'U').unwrap();
    assert_eq!(u.count, 1022); // from `grep` of the -U headers
}

#[test]
fn real_fasta_streams_the_same_records() {
    let path = crate::common::shared("data/deeploc_data.fasta");
    let all = read_fasta(&path, STRICT).unwrap().records;
    let mut n = 0;
    for (streamed, read) in FastaStream::open(&path).unwrap().zip(&all) {
        assert_eq!(&streamed.unwrap(), read);
        n += 1;
    }
    assert_eq!(n, all.len());
}

#[test]
fn real_hpa_csv_has_multilabel_rows() {
    let path = crate::common::shared("data/deeploc2_hpa_test.csv");
    let msg = read_dataset(&path, STRICT).unwrap_err().to_string();
    assert!(msg.contains("deeploc2_hpa_test.csv:10:"), "{msg}");
    assert!(msg.contains("multi-label"), "{msg}");

    let data = read_dataset(&path, LENIENT).unwrap();
    assert_eq!(data.records.len(), 1_367);
    assert_eq!(data.skipped.len(), 350);
    assert!(data.skipped.iter().all(|s| s.contains("multi-label")));
    // DeepLoc 2.0 spellings are mapped to the canonical names.
    assert!(data
        .records
        .iter()
        .any(|r| r.location.as_deref() == Some("Cell.membrane")));
    assert!(data.records.iter().all(|r| !r.is_test));
}

#[test]
fn real_swissprot_csv_membrane_column() {
    let data = read_dataset(
        &crate::common::shared("data/deeploc2_swissprot.csv"),
        LENIENT,
    )
    .unwrap();
    assert_eq!(data.records.len(), 21_619);
    assert_eq!(data.skipped.len(), 6_684);
    let membrane = data
        .records
        .iter()
        .filter(|r| r.membrane == Membrane::Membrane)
        .count();
    assert_eq!(membrane, 6_358);
    assert!(data.records.iter().all(|r| r.membrane != Membrane::Unknown));
}

#[test]
fn real_data_stratified_validation() {
    let data = read_dataset(&crate::common::shared("data/deeploc_data.fasta"), STRICT).unwrap();
    let recs = &data.records;
    let (train, _) = train_test(recs);
    let (tr, val) = stratified_validation(recs, &train, 0.1, 42).unwrap();
    assert_eq!(tr.len() + val.len(), train.len());
    for label in DEEPLOC_LOCATIONS {
        let count = |ix: &[usize]| {
            ix.iter()
                .filter(|&&i| recs[i].location.as_deref() == Some(label))
                .count()
        };
        let n = count(&train) as f64;
        let v = count(&val) as f64;
        assert!((v - 0.1 * n).abs() <= 1.0, "{label}: {v} of {n}");
    }
    let (_, val2) = stratified_validation(recs, &train, 0.1, 43).unwrap();
    assert_ne!(val, val2);
}

#[test]
fn histogram_png_is_written_atomically() {
    let data = read_dataset(&crate::common::shared("data/deeploc_data.fasta"), STRICT).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lengths.png");
    plot_length_histogram(&data.records, &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes.len() > 1000, "suspiciously small PNG");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // Only the final file remains: the temporary one was renamed, not copied.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
    // Set PROTLOC_KEEP_PLOT=/some/file.png to look at the image.
    if let Some(keep) = std::env::var_os("PROTLOC_KEEP_PLOT") {
        std::fs::copy(&out, keep).unwrap();
    }
    assert!(plot_length_histogram(&[], &dir.path().join("empty.png")).is_err());
}
