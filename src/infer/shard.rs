//! Sharded prediction for proteome-scale jobs: `predict --shard I/N` handles records
//! `k` with `k % N == I` (by position in the input, after `--limit`), so a Slurm array or a
//! Kubernetes Indexed Job covers a whole input; `protloc merge` interleaves the shard
//! outputs back into the unsharded order. Re-running a shard rewrites its output
//! atomically, so it is idempotent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};

/// Shard `index` of `count` (written `I/N`, 0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn contains(&self, record: usize) -> bool {
        record % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("shard {s:?} must look like I/N, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("shard index {i:?} is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("shard count {n:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {s:?}: need 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }
}

/// Interleaves shard outputs (given in shard order 0..N-1) into `output`: line `j` of shard
/// `i` is record `j * N + i`. TSV/CSV headers must agree and are written once (`header`).
pub fn merge(shards: &[PathBuf], output: Option<&Path>, header: bool) -> Result<usize> {
    if shards.is_empty() {
        bail!("merge needs the shard files, in shard order");
    }
    let mut readers = Vec::with_capacity(shards.len());
    let mut first_header: Option<String> = None;
    for path in shards {
        let mut r = BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        );
        if header {
            let mut h = String::new();
            r.read_line(&mut h)?;
            match &first_header {
                None => first_header = Some(h),
                Some(f) if *f != h => bail!(
                    "{}: header differs from {}'s",
                    path.display(),
                    shards[0].display()
                ),
                Some(_) => {}
            }
        }
        readers.push(r.lines());
    }
    crate::artifacts::with_output(output, |out| {
        if let Some(h) = &first_header {
            out.write_all(h.as_bytes())?;
        }
        let mut n = 0;
        let mut finished = vec![false; readers.len()];
        loop {
            for (i, r) in readers.iter_mut().enumerate() {
                match r.next() {
                    Some(line) => {
                        // Shard sizes differ by at most one, largest first: once a shard has
                        // ended, no later one may still have records.
                        if finished[..i].iter().any(|&f| f) {
                            bail!("{} has more records than an earlier shard: not outputs of one sharded run", shards[i].display());
                        }
                        writeln!(out, "{}", line?)?;
                        n += 1;
                    }
                    None => finished[i] = true,
                }
            }
            if finished.iter().all(|&f| f) {
                return Ok(n);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_and_partition() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert!(s.contains(4) && !s.contains(3));
        assert!("3/3".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
