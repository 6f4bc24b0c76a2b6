//! Location label names.
//!
//! The model's classes use the DeepLoc 1.0 spellings (`Cell.membrane`, ...). Other data sets
//! spell the same locations differently (DeepLoc 2.0 writes `Cell membrane`), so every label
//! read from a file goes through [`canonical_label`] before it is used as a class.

/// The ten DeepLoc 1.0 locations, in the order used for class indices by default.
pub const DEEPLOC_LOCATIONS: [&str; 10] = [
    "Nucleus",
    "Cytoplasm",
    "Extracellular",
    "Mitochondrion",
    "Cell.membrane",
    "Endoplasmic.reticulum",
    "Plastid",
    "Golgi.apparatus",
    "Lysosome/Vacuole",
    "Peroxisome",
];

/// Characters treated as interchangeable word separators in label spellings
/// (`Cell.membrane`, `Cell membrane`, `cell_membrane`, `Lysosome/Vacuole`, ...).
const SEPARATORS: [char; 5] = ['.', ' ', '_', '-', '/'];

/// Maps a user-written label to its canonical DeepLoc spelling, or `None` when unknown.
///
/// Matching ignores case, surrounding whitespace and the choice of separator between words, so
/// `Cell membrane`, `cell_membrane` and `CELL.MEMBRANE` all give `Cell.membrane`. Any other
/// character (digits, `|`, ...) makes the label unknown rather than being silently dropped.
pub fn canonical_label(raw: &str) -> Option<&'static str> {
    let key = normalize(raw.trim())?;
    if key.is_empty() {
        return None;
    }
    DEEPLOC_LOCATIONS
        .iter()
        .copied()
        .find(|name| normalize(name).as_deref() == Some(key.as_str()))
}

/// Lower-cases letters and drops separators; `None` when any other character appears.
fn normalize(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_alphabetic() {
            out.push(c.to_ascii_lowercase());
        } else if !SEPARATORS.contains(&c) {
            return None;
        }
    }
    Some(out)
}

/// The valid labels as one comma-separated string, for error messages.
pub fn valid_labels_list() -> String {
    DEEPLOC_LOCATIONS.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_map_to_themselves() {
        for name in DEEPLOC_LOCATIONS {
            assert_eq!(canonical_label(name), Some(name));
        }
    }

    #[test]
    fn deeploc2_spellings() {
        assert_eq!(canonical_label("Cell membrane"), Some("Cell.membrane"));
        assert_eq!(
            canonical_label("Endoplasmic reticulum"),
            Some("Endoplasmic.reticulum")
        );
        assert_eq!(canonical_label("Golgi apparatus"), Some("Golgi.apparatus"));
        assert_eq!(
            canonical_label("Lysosome/Vacuole"),
            Some("Lysosome/Vacuole")
        );
    }

    #[test]
    fn case_and_separator_insensitive() {
        assert_eq!(canonical_label("  nucleus "), Some("Nucleus"));
        assert_eq!(canonical_label("CELL_MEMBRANE"), Some("Cell.membrane"));
        assert_eq!(canonical_label("golgi.Apparatus"), Some("Golgi.apparatus"));
        assert_eq!(
            canonical_label("lysosome_vacuole"),
            Some("Lysosome/Vacuole")
        );
    }

    #[test]
    fn unknown_labels() {
        assert_eq!(canonical_label(""), None);
        assert_eq!(canonical_label("   "), None);
        assert_eq!(canonical_label("Nucleolus"), None);
        assert_eq!(canonical_label("Cytoplasm|Nucleus"), None);
        assert_eq!(canonical_label("Nucleus1"), None);
        assert_eq!(canonical_label("Lysosome"), None);
    }
}
