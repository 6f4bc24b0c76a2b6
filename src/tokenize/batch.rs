//! Collating tokenized proteins into padded batches, and planning which proteins go
//! together (fixed size for training, token budget sorted by length for inference).

use candle_core::{Device, Result, Tensor};

use super::Encoded;

/// A padded batch of token ids with its masks. Padding goes only to the batch's longest member (dynamic padding).
pub struct TokenBatch {
    /// [B, T] u32 token ids.
    pub ids: Tensor,
    /// [B, T] f32: 1 for real tokens (specials included), 0 for padding.
    pub attention_mask: Tensor,
    /// [B, T] f32: 1 for residue tokens only (no specials, no padding), for mean pooling.
    pub residue_mask: Tensor,
    /// Padded length T.
    pub max_len: usize,
    /// Number of real (non-padding) tokens.
    pub real_tokens: usize,
}

impl TokenBatch {
    pub fn collate(items: &[&Encoded], pad_id: u32, device: &Device) -> Result<Self> {
        let b = items.len();
        let t = items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = vec![pad_id; b * t];
        let mut attn = vec![0f32; b * t];
        let mut res = vec![0f32; b * t];
        let mut real_tokens = 0;
        for (row, e) in items.iter().enumerate() {
            let n = e.ids.len();
            real_tokens += n;
            ids[row * t..row * t + n].copy_from_slice(&e.ids);
            attn[row * t..row * t + n].fill(1.0);
            // Residues sit between the leading special and the trailing one.
            if n >= 2 {
                res[row * t + 1..row * t + n - 1].fill(1.0);
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            attention_mask: Tensor::from_vec(attn, (b, t), device)?,
            residue_mask: Tensor::from_vec(res, (b, t), device)?,
            max_len: t,
            real_tokens,
        })
    }

    pub fn size(&self) -> usize {
        self.ids.dims()[0]
    }
}

/// Consecutive groups of `batch_size` from `order` (the last may be smaller).
pub fn fixed_groups(order: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// Training batches with little padding that are still random: `order` (already
/// shuffled) is cut into pools of `pool_batches` batches, each pool is sorted by length
/// and cut into batches, and the batch order is shuffled.
pub fn bucketed_groups(
    order: &[usize],
    lengths: &[usize],
    batch_size: usize,
    pool_batches: usize,
    rng: &mut impl rand::Rng,
) -> Vec<Vec<usize>> {
    use rand::seq::SliceRandom;
    let batch_size = batch_size.max(1);
    let mut batches = Vec::new();
    for pool in order.chunks(batch_size * pool_batches.max(1)) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// Length-sorted groups whose padded size (members x longest) stays within
/// `max_tokens` and whose member count stays within `max_batch`. A single item longer
/// than the budget gets a batch of its own. Every index appears exactly once.
pub fn token_budget_groups(
    lengths: &[usize],
    max_tokens: usize,
    max_batch: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Longest first, ties by index so the plan is deterministic.
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut plan = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let len = lengths[i];
        let new_longest = longest.max(len);
        let fits =
            (current.len() + 1) * new_longest <= max_tokens && current.len() < max_batch.max(1);
        if !current.is_empty() && !fits {
            plan.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(len);
        current.push(i);
    }
    if !current.is_empty() {
        plan.push(current);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(n: usize) -> Encoded {
        Encoded {
            ids: (0..n as u32).map(|i| i + 5).collect(),
            total_residues: n - 2,
            used_residues: n - 2,
        }
    }

    #[test]
    fn collate_pads_to_longest_and_masks_specials() {
        let (a, b) = (enc(4), enc(6));
        let batch = TokenBatch::collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(batch.ids.dims(), &[2, 6]);
        let attn: Vec<Vec<f32>> = batch.attention_mask.to_vec2().unwrap();
        assert_eq!(attn[0], vec![1., 1., 1., 1., 0., 0.]);
        let res: Vec<Vec<f32>> = batch.residue_mask.to_vec2().unwrap();
        assert_eq!(res[0], vec![0., 1., 1., 0., 0., 0.]);
        assert_eq!(res[1], vec![0., 1., 1., 1., 1., 0.]);
        let ids: Vec<Vec<u32>> = batch.ids.to_vec2().unwrap();
        assert_eq!(ids[0][4..], [0, 0]);
        assert_eq!(batch.real_tokens, 10);
    }

    #[test]
    fn bucketed_batches_cover_everything_once_with_less_padding() {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let lengths: Vec<usize> = (0..200).map(|i| 50 + (i * 37) % 900).collect();
        let mut order: Vec<usize> = (0..200).collect();
        order.shuffle(&mut rng);
        let plan = bucketed_groups(&order, &lengths, 4, 10, &mut rng);
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        assert!(plan.iter().all(|b| b.len() <= 4));
        let padded = |plan: &[Vec<usize>]| -> usize {
            plan.iter()
                .map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap())
                .sum()
        };
        assert!(padded(&plan) < padded(&fixed_groups(&order, 4)));
    }

    #[test]
    fn token_budget_respects_limits_and_covers_everything() {
        let lengths = vec![10, 300, 50, 52, 49, 1000, 11, 12];
        let plan = token_budget_groups(&lengths, 200, 3);
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for group in &plan {
            let longest = group.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(group.len() <= 3);
            assert!(
                group.len() == 1 || group.len() * longest <= 200,
                "{group:?}"
            );
        }
        // The over-long protein is alone.
        assert!(plan.iter().any(|g| g == &vec![5]));
    }
}
