//! TODO (stub until the data branch lands)
use super::*;
pub fn read_fasta(_path: &Path, _opts: ReadOptions) -> Result<Dataset, DataError> { unimplemented!() }
