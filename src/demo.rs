//! The synthetic data set of `protloc demo` (the command itself, which runs the whole
//! workflow on it, is in `cli::demo`) and of the tests: no downloads.
//!
//! The generator plants the kinds of signal real localization predictors learn: N-terminal
//! signal peptides (secretory pathway), mitochondrial and plastid transit peptides,
//! C-terminal ER retention (KDEL) and peroxisomal targeting (SKL) motifs, nuclear
//! localization signals, and transmembrane helices, over random background sequence.
//! Proteins are long enough that some are truncated, so head-tail truncation matters.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::DEEPLOC_LOCATIONS;

/// Background residues, roughly in UniProt proportions.
const BACKGROUND: &[u8] = b"LLLLLLLLLAAAAAAAAGGGGGGGVVVVVVVEEEEEEESSSSSSSIIIIIIKKKKKKRRRRRDDDDDTTTTTPPPPPNNNNQQQQFFFFYYYMMHHCW";
const HYDROPHOBIC: &[u8] = b"LLLLIIIVVVFFAAM";

/// A random string over `alphabet` with a length drawn from `len`.
fn pick(rng: &mut ChaCha8Rng, alphabet: &[u8], len: std::ops::Range<usize>) -> String {
    let n = rng.random_range(len);
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

fn signal_peptide(rng: &mut ChaCha8Rng) -> String {
    let n_region = pick(rng, b"KR", 1..3);
    let h_region = pick(rng, HYDROPHOBIC, 9..14);
    format!("M{n_region}{h_region}A{}A", pick(rng, b"SAG", 1..2))
}

fn transit_peptide(rng: &mut ChaCha8Rng, alphabet: &[u8]) -> String {
    format!("M{}", pick(rng, alphabet, 18..30))
}

fn tm_helix(rng: &mut ChaCha8Rng) -> String {
    pick(rng, HYDROPHOBIC, 19..23)
}

/// One synthetic protein of `location`.
pub fn synth_protein(rng: &mut ChaCha8Rng, location: &str) -> String {
    let len = rng.random_range(80..420);
    let bg = |rng: &mut ChaCha8Rng, n: usize| pick(rng, BACKGROUND, n..n + 1);
    let body = bg(rng, len);
    match location {
        "Nucleus" => format!(
            "M{}{}{}",
            bg(rng, 10),
            pick(rng, b"KKKRR", 2..3) + "PKKKRKV",
            body
        ),
        "Cytoplasm" => format!("M{body}"),
        "Extracellular" => format!("{}{body}", signal_peptide(rng)),
        "Mitochondrion" => format!("{}{body}", transit_peptide(rng, b"RRRLLLAASSKG")),
        "Cell.membrane" => {
            let loop_len = rng.random_range(5..15);
            format!(
                "M{}{}{}{}{}{body}",
                bg(rng, 8),
                tm_helix(rng),
                bg(rng, loop_len),
                tm_helix(rng),
                bg(rng, 6)
            )
        }
        "Endoplasmic.reticulum" => format!("{}{body}KDEL", signal_peptide(rng)),
        "Plastid" => format!("{}{body}", transit_peptide(rng, b"SSSTTTAAVPRG")),
        "Golgi.apparatus" => format!(
            "M{}{}{body}{}",
            bg(rng, 6),
            tm_helix(rng),
            "KKXX".replace('X', &pick(rng, b"ST", 1..2))
        ),
        "Lysosome/Vacuole" => format!("{}{body}GYQTI", signal_peptide(rng)),
        "Peroxisome" => format!("M{body}SKL"),
        other => unreachable!("no generator for {other}"),
    }
}

/// Writes a DeepLoc-format FASTA with `per_class` proteins per location; one in five is
/// tagged `test`.
pub fn write_dataset(path: &Path, per_class: usize, seed: u64) -> Result<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = String::new();
    let mut n = 0;
    for i in 0..per_class {
        for (c, loc) in DEEPLOC_LOCATIONS.iter().enumerate() {
            let seq = synth_protein(&mut rng, loc);
            let membrane = if matches!(*loc, "Cell.membrane" | "Golgi.apparatus") {
                'M'
            } else {
                'S'
            };
            let test = if i % 5 == 4 { " test" } else { "" };
            writeln!(out, ">DEMO{:02}{:04} {loc}-{membrane}{test}", c, i)?;
            for line in seq.as_bytes().chunks(60) {
                out.push_str(std::str::from_utf8(line).expect("ASCII"));
                out.push('\n');
            }
            n += 1;
        }
    }
    crate::artifacts::write_atomic(path, out.as_bytes())?;
    Ok(n)
}
