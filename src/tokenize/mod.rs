//! Tokenization driven by a model's own `vocab.txt`, truncation policies, and batching
//! with dynamic padding.

pub mod batch;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use batch::{bucketed_groups, fixed_groups, token_budget_groups, TokenBatch};

/// Special-token convention of a vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `[CLS] residues [SEP]`, `[PAD]`, `[UNK]`; rare residues U/Z/O/B mapped to X.
    ProtBert,
    /// `<cls> residues <eos>`, `<pad>`, `<unk>`; rare residues kept (ESM-2 has tokens for them).
    Esm,
}

/// Which residues to keep when a protein is longer than the model's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Truncation {
    /// The first N residues.
    Head,
    /// The N-terminal and C-terminal ends (half each): targeting signals sit at both ends
    /// (signal/transit peptides at the N-terminus, KDEL/SKL-type motifs at the C-terminus).
    HeadTail,
}

/// ProtBERT's vocabulary, used by models trained from scratch.
pub const PROTBERT_VOCAB: [&str; 30] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "L", "A", "G", "V", "E", "S", "I", "K", "R", "D",
    "T", "P", "N", "Q", "F", "Y", "M", "H", "C", "W", "X", "U", "B", "Z", "O",
];

/// A vocabulary plus the special-token ids of its style.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    pub style: Style,
    pub cls_id: u32,
    pub end_id: u32,
    pub pad_id: u32,
    pub unk_id: u32,
    /// Direct residue-letter -> id lookup (after rare-residue mapping).
    residue_ids: [u32; 26],
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read vocabulary", path.display()))?;
        let tokens: Vec<String> = text
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        Self::from_tokens(tokens)
            .with_context(|| format!("{}: unusable vocabulary", path.display()))
    }

    pub fn protbert_default() -> Self {
        Self::from_tokens(PROTBERT_VOCAB.iter().map(|s| s.to_string()).collect())
            .expect("built-in vocabulary is valid")
    }

    pub fn from_tokens(tokens: Vec<String>) -> Result<Self> {
        let mut ids = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let get = |t: &str| ids.get(t).copied();
        let (style, cls, end, pad, unk) = if let Some(cls) = get("[CLS]") {
            let need = |t: &str| get(t).with_context(|| format!("vocabulary has [CLS] but no {t}"));
            (
                Style::ProtBert,
                cls,
                need("[SEP]")?,
                need("[PAD]")?,
                need("[UNK]")?,
            )
        } else if let Some(cls) = get("<cls>") {
            let need = |t: &str| get(t).with_context(|| format!("vocabulary has <cls> but no {t}"));
            (
                Style::Esm,
                cls,
                need("<eos>")?,
                need("<pad>")?,
                need("<unk>")?,
            )
        } else {
            bail!("vocabulary has neither [CLS] (ProtBERT style) nor <cls> (ESM style)");
        };
        let mut tok = Self {
            tokens,
            ids,
            style,
            cls_id: cls,
            end_id: end,
            pad_id: pad,
            unk_id: unk,
            residue_ids: [unk; 26],
        };
        tok.residue_ids = tok.residue_table(style == Style::ProtBert);
        Ok(tok)
    }

    /// Residue letter -> id; with `rare_to_x`, U/Z/O/B read as X (ProtBERT's preprocessing).
    fn residue_table(&self, rare_to_x: bool) -> [u32; 26] {
        let mut table = [self.unk_id; 26];
        for (i, slot) in table.iter_mut().enumerate() {
            let letter = (b'A' + i as u8) as char;
            let mapped = match letter {
                'U' | 'Z' | 'O' | 'B' if rare_to_x => 'X',
                _ => letter,
            };
            *slot = self.token_id(&mapped.to_string()).unwrap_or(self.unk_id);
        }
        table
    }

    /// This vocabulary with U/Z/O/B kept as their own tokens where it has them, as
    /// transformers' tokenizers do (ProtBERT-style vocabularies otherwise read them as X, the
    /// preprocessing ProtBERT was trained with): for models fine-tuned by other tools on
    /// unprocessed sequences.
    pub fn keeping_rare_residues(mut self) -> Self {
        self.residue_ids = self.residue_table(false);
        self
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Id of one residue letter (any case; anything unknown becomes the unknown token).
    pub fn residue_id(&self, c: u8) -> u32 {
        let u = c.to_ascii_uppercase();
        if u.is_ascii_uppercase() {
            self.residue_ids[(u - b'A') as usize]
        } else {
            self.unk_id
        }
    }

    /// Token ids `[CLS] kept residues [SEP]` for `sequence`, keeping at most `max_residues`.
    pub fn encode(&self, sequence: &str, max_residues: usize, policy: Truncation) -> Encoded {
        let bytes = sequence.as_bytes();
        let kept = truncate(bytes.len(), max_residues, policy);
        let mut ids = Vec::with_capacity(kept.len() + 2);
        ids.push(self.cls_id);
        for range in [kept.head.clone(), kept.tail.clone()] {
            ids.extend(bytes[range].iter().map(|&c| self.residue_id(c)));
        }
        ids.push(self.end_id);
        Encoded {
            ids,
            total_residues: bytes.len(),
            used_residues: kept.len(),
        }
    }

    /// Writes the vocabulary as `vocab.txt` content.
    pub fn to_vocab_txt(&self) -> String {
        let mut s = self.tokens.join("\n");
        s.push('\n');
        s
    }
}

/// A tokenized protein.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub total_residues: usize,
    pub used_residues: usize,
}

/// Residue index ranges kept by a truncation policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub head: std::ops::Range<usize>,
    pub tail: std::ops::Range<usize>,
}

impl Kept {
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which residues of a protein of length `len` survive truncation to `max` residues.
/// head-tail keeps `ceil(max/2)` N-terminal and `floor(max/2)` C-terminal residues.
pub fn truncate(len: usize, max: usize, policy: Truncation) -> Kept {
    if len <= max {
        return Kept {
            head: 0..len,
            tail: len..len,
        };
    }
    match policy {
        Truncation::Head => Kept {
            head: 0..max,
            tail: len..len,
        },
        Truncation::HeadTail => {
            let n_head = max.div_ceil(2);
            let n_tail = max - n_head;
            Kept {
                head: 0..n_head,
                tail: len - n_tail..len,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protbert_maps_rare_residues_to_x_and_wraps_with_specials() {
        let tok = Tokenizer::protbert_default();
        let e = tok.encode("MKUZOBXa", 100, Truncation::HeadTail);
        let x = tok.token_id("X").unwrap();
        let m = tok.token_id("M").unwrap();
        let k = tok.token_id("K").unwrap();
        let a = tok.token_id("A").unwrap();
        assert_eq!(e.ids, vec![2, m, k, x, x, x, x, x, a, 3]);
        assert_eq!((e.used_residues, e.total_residues), (8, 8));
    }

    #[test]
    fn esm_keeps_rare_residues_and_uses_its_specials() {
        let vocab = "<cls>\n<pad>\n<eos>\n<unk>\nL\nA\nG\nV\nS\nE\nR\nT\nI\nD\nP\nK\nQ\nN\nF\nY\nM\nH\nW\nC\nX\nB\nU\nZ\nO\n.\n-\n<null_1>\n<mask>";
        let tok = Tokenizer::from_tokens(vocab.lines().map(String::from).collect()).unwrap();
        assert_eq!(tok.style, Style::Esm);
        let e = tok.encode("LUJ", 10, Truncation::Head);
        assert_eq!(e.ids, vec![0, 4, 26, 3, 2]); // J is unknown
        assert_eq!(tok.pad_id, 1);
    }

    #[test]
    fn head_tail_keeps_both_ends() {
        let k = truncate(10, 5, Truncation::HeadTail);
        assert_eq!((k.head, k.tail), (0..3, 8..10));
        let k = truncate(10, 4, Truncation::Head);
        assert_eq!((k.head, k.tail), (0..4, 10..10));
        let k = truncate(3, 4, Truncation::HeadTail);
        assert_eq!(k.len(), 3);
        let tok = Tokenizer::protbert_default();
        let e = tok.encode("MAAAAAAAKDEL", 6, Truncation::HeadTail);
        let ids = |s: &str| s.bytes().map(|c| tok.residue_id(c)).collect::<Vec<_>>();
        let mut want = vec![tok.cls_id];
        want.extend(ids("MAA"));
        want.extend(ids("DEL"));
        want.push(tok.end_id);
        assert_eq!(e.ids, want);
        assert_eq!((e.used_residues, e.total_residues), (6, 12));
    }

    #[test]
    fn vocab_without_specials_is_rejected() {
        let err = Tokenizer::from_tokens(vec!["A".into(), "B".into()]).unwrap_err();
        assert!(err.to_string().contains("neither"));
    }
}
