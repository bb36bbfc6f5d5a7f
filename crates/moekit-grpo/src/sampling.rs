//! Dynamic sampling (DAPO's filter: drop groups whose rewards are all equal, which carry no
//! advantage, and sample more until the batch is full) and truncation masking.

use crate::{Error, Result};

/// Whether each group of `group` consecutive rewards has any spread (not all equal).
pub fn informative_groups(rewards: &[f64], group: usize) -> Result<Vec<bool>> {
    if group == 0 || rewards.len() % group != 0 {
        return Err(Error::InvalidInput(format!("{} rewards are not whole groups of {group}", rewards.len())));
    }
    Ok(rewards.chunks(group).map(|g| g.iter().any(|&r| r != g[0])).collect())
}

/// What [`fill_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillStats {
    /// Sampling rounds run.
    pub rounds: usize,
    /// Groups sampled in all.
    pub sampled: usize,
    /// Groups dropped for all-equal rewards.
    pub dropped: usize,
    /// Groups of all-equal rewards kept to complete the batch after `max_rounds`.
    pub padded: usize,
}

/// Collects `target` groups, preferring informative ones: calls `round(i)` (which samples and
/// scores some groups and returns each with its rewards) until `target` informative groups
/// are kept or `max_rounds` rounds have run; then completes the batch with dropped groups, in
/// the order they came, so the batch is always full when enough groups were sampled. Groups
/// keep their sampling order.
pub fn fill_batch<G>(
    target: usize,
    max_rounds: usize,
    mut round: impl FnMut(usize) -> Result<Vec<(G, Vec<f64>)>>,
) -> Result<(Vec<G>, FillStats)> {
    let mut kept = Vec::with_capacity(target);
    let mut spare = Vec::new();
    let mut stats = FillStats { rounds: 0, sampled: 0, dropped: 0, padded: 0 };
    while kept.len() < target && stats.rounds < max_rounds.max(1) {
        let groups = round(stats.rounds)?;
        stats.rounds += 1;
        if groups.is_empty() {
            return Err(Error::InvalidInput("a sampling round returned no groups".into()));
        }
        for (g, rewards) in groups {
            stats.sampled += 1;
            if kept.len() < target && rewards.iter().any(|&r| r != rewards[0]) {
                kept.push(g);
            } else {
                stats.dropped += 1;
                spare.push(g);
            }
        }
    }
    for g in spare {
        if kept.len() >= target {
            break;
        }
        kept.push(g);
        stats.padded += 1;
    }
    Ok((kept, stats))
}

/// Zeroes the mask rows of truncated completions (`mask [sequences, len]`), so a completion
/// that never reached EOS teaches nothing (`mask_truncated_completions`).
pub fn mask_truncated(mask: &mut [f32], len: usize, truncated: &[bool]) -> Result<()> {
    if len == 0 || mask.len() != truncated.len() * len {
        return Err(Error::InvalidInput(format!(
            "mask of {} values is not {} rows of {len}",
            mask.len(),
            truncated.len()
        )));
    }
    for (row, &t) in mask.chunks_mut(len).zip(truncated) {
        if t {
            row.fill(0.0);
        }
    }
    Ok(())
}
