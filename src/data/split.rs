//! TODO stub until the data branch lands
use super::Record;
pub fn train_test(records: &[Record]) -> (Vec<usize>, Vec<usize>) { let _ = records; unimplemented!() }
pub fn stratified_validation(records: &[Record], indices: &[usize], val_fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>), String> { let _ = (records, indices, val_fraction, seed); unimplemented!() }
