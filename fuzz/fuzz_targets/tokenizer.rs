//! Arbitrary text through sequence validation and both tokenizer styles with every
//! truncation policy: lengths and special tokens always come out right.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protloc::tokenize::{Tokenizer, Truncation};

const ESM_VOCAB: &str = "<cls>\n<pad>\n<eos>\n<unk>\nL\nA\nG\nV\nS\nE\nR\nT\nI\nD\nP\nK\nQ\nN\nF\nY\nM\nH\nW\nC\nX\nB\nU\nZ\nO\n.\n-\n<null_1>\n<mask>";

fuzz_target!(|data: &[u8]| {
    let Some((&max, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let Ok(seq) = protloc::data::validate_sequence(&text) else { return };
    let esm = Tokenizer::from_tokens(ESM_VOCAB.lines().map(String::from).collect()).unwrap();
    for tok in [Tokenizer::protbert_default(), esm] {
        for policy in [Truncation::Head, Truncation::HeadTail] {
            let max = max as usize + 1;
            let e = tok.encode(&seq, max, policy);
            assert_eq!(e.ids.len(), seq.len().min(max) + 2);
            assert_eq!(e.ids[0], tok.cls_id);
            assert_eq!(*e.ids.last().unwrap(), tok.end_id);
            assert!(e.ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
        }
    }
});
