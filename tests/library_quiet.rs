//! The library never prints: it reports training through `TrainObserver` and logs through
//! `tracing`; only the command line (`src/cli/`, `src/main.rs`) writes to stdout/stderr.

use std::path::Path;

#[path = "common/source.rs"]
mod source;
use source::{cfg_test_ranges, code_only, rust_files};

use protloc::dist::Local;
use protloc::train::observe::{Embedding, MemberStart, Resumed};
use protloc::train::{EpochMetrics, TrainArgs, TrainObserver};

/// Print macros the library may not call outside `#[cfg(test)]` items.
const PRINTS: [&str; 5] = ["println", "eprintln", "print", "eprint", "dbg"];

/// Files that may print: the command line.
fn may_print(rel: &Path) -> bool {
    rel.starts_with("src/cli") || rel == Path::new("src/main.rs")
}

/// (line, macro) of every print macro in `text` outside `#[cfg(test)]` items, comments and
/// string literals.
fn prints_in(text: &str) -> Vec<(usize, String)> {
    let code: Vec<char> = code_only(text).chars().collect();
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let skip = cfg_test_ranges(&code);
    let mut found = Vec::new();
    for (pos, _) in code.iter().enumerate() {
        if pos > 0 && ident(code[pos - 1]) {
            continue;
        }
        for name in PRINTS {
            let n: Vec<char> = name.chars().collect();
            let end = pos + n.len();
            if end < code.len()
                && code[pos..end] == n[..]
                && code[end] == '!'
                && !skip.iter().any(|&(a, b)| (a..=b).contains(&pos))
            {
                let line = code[..pos].iter().filter(|&&ch| ch == '\n').count() + 1;
                found.push((line, format!("{name}!")));
            }
        }
    }
    found
}

#[test]
fn the_scanner_finds_prints_outside_tests_only() {
    let text = r##"
fn a() {
    println!("x");
    // eprintln!("in a comment");
    let s = "dbg!(in a string) { '";
    let r = r#"print!("raw")"#;
    let c = '{';
    let l: &'static str = s;
    if true { eprint!("{}", 1) }
    my_println!();
}
#[cfg(test)]
mod tests {
    fn t() { let b = '}'; eprintln!("test-only {}", "}"); }
}
#[cfg(test)]
use std::io::Write;
fn b<'a>(x: &'a str) { dbg!(x); }
"##;
    assert_eq!(
        prints_in(text),
        [
            (3, "println!".to_string()),
            (9, "eprint!".to_string()),
            (18, "dbg!".to_string())
        ]
    );
}

#[test]
fn the_library_does_not_print() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {files:?}");
    let mut offenders = Vec::new();
    for path in files {
        let rel = path.strip_prefix(root).unwrap();
        if may_print(rel) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, name) in prints_in(&text) {
            offenders.push(format!("{}:{line}: {name}", rel.display()));
        }
    }
    assert!(
        offenders.is_empty(),
        "library code prints (report through TrainObserver or log with tracing; only src/cli/ \
         and src/main.rs may print):\n{}",
        offenders.join("\n")
    );
}

/// Every event, in order.
#[derive(Default)]
struct Recorder {
    epochs: Vec<EpochMetrics>,
    members: Vec<MemberStart>,
    embeddings: Vec<(usize, usize)>,
    resumed: usize,
}

impl TrainObserver for Recorder {
    fn on_epoch(&mut self, m: &EpochMetrics) {
        self.epochs.push(m.clone());
    }
    fn on_member(&mut self, m: &MemberStart) {
        self.members.push(*m);
    }
    fn on_embedding(&mut self, e: &Embedding<'_>) {
        self.embeddings.push((e.missing, e.cached));
    }
    fn on_resume(&mut self, _: &Resumed<'_>) {
        self.resumed += 1;
    }
}

/// The observed epochs are the lines of `metrics.jsonl`, exactly and in order.
fn assert_matches_log(run: &Path, epochs: &[EpochMetrics]) {
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let observed: Vec<String> = epochs
        .iter()
        .map(|m| serde_json::to_value(m).unwrap().to_string())
        .collect();
    assert_eq!(observed, lines);
}

fn args(dir: &Path, name: &str) -> TrainArgs {
    let data = dir.join("d.fasta");
    if !data.exists() {
        protloc::demo::write_dataset(&data, 3, 3).unwrap(); // 30 proteins
    }
    let mut a = TrainArgs::new("scratch:tiny", data, dir.join(name));
    a.epochs = 3;
    a.batch_size = 8;
    a.max_residues = Some(48);
    a.seed = 5;
    a
}

#[test]
fn the_observer_sees_each_fine_tuning_epoch_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(dir.path(), "run");
    let mut rec = Recorder::default();
    let summary = protloc::train::train_observed(&a, &Local, &mut rec).unwrap();
    assert_eq!(
        rec.epochs.iter().map(|m| m.epoch).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(rec.epochs.iter().all(|m| m.val_accuracy.is_some()));
    assert_matches_log(&a.output, &rec.epochs);
    assert_eq!(summary.epochs.len(), 3);
    assert!(rec.members.is_empty() && rec.embeddings.is_empty() && rec.resumed == 0);

    // A closure is an observer too.
    let mut seen = Vec::new();
    let b = args(dir.path(), "closure");
    protloc::train::train_observed(&b, &Local, &mut |m: &EpochMetrics| seen.push(m.step)).unwrap();
    assert_eq!(seen, rec.epochs.iter().map(|m| m.step).collect::<Vec<_>>());
}

#[test]
fn the_observer_sees_an_ensembles_members_and_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), "ensemble");
    a.frozen = true;
    a.ensemble = 2;
    a.epochs = 2;
    a.lr = 1e-2;
    a.pool = protloc::model::Pool::Mean;
    let mut rec = Recorder::default();
    protloc::train::train_observed(&a, &Local, &mut rec).unwrap();
    assert_eq!(
        rec.epochs
            .iter()
            .map(|m| (m.member, m.epoch))
            .collect::<Vec<_>>(),
        [(Some(0), 1), (Some(0), 2), (Some(1), 1), (Some(1), 2)]
    );
    assert_matches_log(&a.output, &rec.epochs);
    assert_eq!(
        rec.members
            .iter()
            .map(|m| (m.member, m.members, m.seed))
            .collect::<Vec<_>>(),
        [(0, 2, 5), (1, 2, 6)]
    );
    assert_eq!(rec.embeddings.len(), 1);
    assert_eq!(rec.embeddings[0].1, 0, "a new cache starts empty");
    assert!(rec.embeddings[0].0 > 0);
}
