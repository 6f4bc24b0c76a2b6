//! Location label names.

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

/// Maps a user-written label to its canonical DeepLoc spelling, or `None` when unknown.
pub fn canonical_label(raw: &str) -> Option<&'static str> {
    let _ = raw;
    todo!()
}
