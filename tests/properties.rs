//! Property tests: tokenization, truncation and batching invariants, and that a protein's
//! prediction does not depend on what it is batched with.

use candle_core::Device;
use proptest::prelude::*;
use protloc::infer::{class_probabilities, BatchLimits};
use protloc::model::{load_base, Pool, Purpose, SequenceClassifier, TaskConfig};
use protloc::tokenize::{token_budget_groups, Tokenizer, Truncation};

fn residues() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[ACDEFGHIKLMNPQRSTVWYXUZOBacdefgh]{1,300}").unwrap()
}

fn policy() -> impl Strategy<Value = Truncation> {
    prop_oneof![Just(Truncation::Head), Just(Truncation::HeadTail)]
}

proptest! {
    #[test]
    fn encoding_keeps_the_right_residues(seq in residues(), max in 1usize..400, policy in policy()) {
        let tok = Tokenizer::protbert_default();
        let e = tok.encode(&seq, max, policy);
        let n = seq.len();
        let kept = n.min(max);
        prop_assert_eq!(e.total_residues, n);
        prop_assert_eq!(e.used_residues, kept);
        prop_assert_eq!(e.ids.len(), kept + 2);
        prop_assert_eq!(e.ids[0], tok.cls_id);
        prop_assert_eq!(*e.ids.last().unwrap(), tok.end_id);
        let ids = |s: &[u8]| s.iter().map(|&c| tok.residue_id(c)).collect::<Vec<_>>();
        let bytes = seq.as_bytes();
        let want = match policy {
            Truncation::Head => ids(&bytes[..kept]),
            Truncation::HeadTail => {
                let head = kept.div_ceil(2);
                let mut v = ids(&bytes[..head]);
                v.extend(ids(&bytes[n - (kept - head)..]));
                v
            }
        };
        prop_assert_eq!(&e.ids[1..e.ids.len() - 1], &want[..]);
        // No special or padding token among the residues.
        prop_assert!(e.ids[1..e.ids.len() - 1].iter().all(|&i| i != tok.pad_id && i != tok.cls_id && i != tok.end_id));
    }

    #[test]
    fn token_budget_plans_cover_each_item_once_within_limits(
        lengths in proptest::collection::vec(1usize..2000, 0..200),
        max_tokens in 1usize..20000,
        max_batch in 1usize..80,
    ) {
        let plan = token_budget_groups(&lengths, max_tokens, max_batch);
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        seen.sort();
        prop_assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for g in &plan {
            prop_assert!(!g.is_empty() && g.len() <= max_batch);
            let longest = g.iter().map(|&i| lengths[i]).max().unwrap();
            prop_assert!(g.len() == 1 || g.len() * longest <= max_tokens);
        }
    }
}

fn model() -> SequenceClassifier {
    let base = load_base("scratch:tiny", 3, &Device::Cpu, Purpose::Training).unwrap();
    let task = TaskConfig {
        pool: Pool::Mean,
        max_residues: 100,
        head_dropout: 0.0,
        ..TaskConfig::new((0..10).map(|i| format!("L{i}")).collect(), "scratch:tiny")
    };
    SequenceClassifier::new(base, task).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn predictions_do_not_depend_on_batch_neighbours_or_splitting(
        seqs in proptest::collection::vec(residues(), 1..12),
        max_tokens in 1usize..3000,
        max_batch in 1usize..8,
        split in 0usize..12,
    ) {
        let m = model();
        let enc: Vec<_> = seqs.iter().map(|s| m.base.tokenizer.encode(&s.to_ascii_uppercase(), 100, Truncation::HeadTail)).collect();
        let alone: Vec<Vec<f32>> = enc
            .iter()
            .map(|e| class_probabilities(&m, std::slice::from_ref(e), BatchLimits::default(), None).unwrap().remove(0))
            .collect();
        let limits = BatchLimits { max_batch_tokens: max_tokens, max_batch_size: max_batch };
        // The same proteins, batched together, and split into two requests.
        let together = class_probabilities(&m, &enc, limits, None).unwrap();
        let cut = split.min(enc.len());
        let mut halves = class_probabilities(&m, &enc[..cut], limits, None).unwrap();
        halves.extend(class_probabilities(&m, &enc[cut..], limits, None).unwrap());
        for (i, a) in alone.iter().enumerate() {
            for (j, p) in a.iter().enumerate() {
                prop_assert!((p - together[i][j]).abs() < 1e-5, "protein {} class {}: {} alone vs {} batched", i, j, p, together[i][j]);
                prop_assert!((p - halves[i][j]).abs() < 1e-5);
            }
        }
    }
}
