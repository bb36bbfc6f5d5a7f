//! Group-relative advantages of outcome rewards.
//!
//! Rewards come in groups of `G` consecutive completions of one prompt. With group mean `m`
//! and Bessel-corrected std `s` (`n - 1` in the denominator):
//!
//! | scale | advantage |
//! |---|---|
//! | `Group` (GRPO) | `(r - m) / (s + eps)` |
//! | `Batch` | `(r - m) / (s_batch + eps)`, `s_batch` the std of all rewards of the batch |
//! | `None` (Dr. GRPO) | `r - m` |
//!
//! With `rloo`, the baseline of completion i is the mean of the *other* completions of its group
//! (`m_{-i} = (G m - r_i) / (G - 1)`), then the same scaling. A group whose rewards are all equal
//! has advantage 0 under every option (it carries no signal); its share is
//! `frac_reward_zero_std`.

use crate::{bad, Error, Result};
use serde::{Deserialize, Serialize};

/// How advantages are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// By the group's std (GRPO).
    Group,
    /// By the batch's std.
    Batch,
    /// Not scaled (Dr. GRPO).
    None,
}

/// Advantage options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdvantageConfig {
    /// Scaling.
    pub scale: ScaleRewards,
    /// Leave-one-out baseline instead of the group mean.
    pub rloo: bool,
    /// Added to the std before dividing (TRL 1e-4, verl 1e-6).
    pub eps: f64,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        AdvantageConfig { scale: ScaleRewards::Group, rloo: false, eps: 1e-4 }
    }
}

/// Advantages and the group statistics behind them.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One per completion.
    pub values: Vec<f64>,
    /// Mean reward of each group.
    pub group_mean: Vec<f64>,
    /// Bessel-corrected std of each group (0 for a group of one).
    pub group_std: Vec<f64>,
    /// Fraction of groups whose rewards are all equal.
    pub frac_reward_zero_std: f64,
}

/// Mean and Bessel-corrected std; a group whose values are all equal has std exactly 0 (the
/// rounding of its mean would otherwise leave ~1e-17).
fn mean_std(r: &[f64]) -> (f64, f64) {
    let n = r.len() as f64;
    if r.iter().all(|&x| x == r[0]) {
        return (r[0], 0.0);
    }
    let m = r.iter().sum::<f64>() / n;
    let s = if r.len() > 1 { (r.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, s)
}

/// Advantages of `rewards` (groups of `group` consecutive completions).
pub fn advantages(rewards: &[f64], group: usize, cfg: &AdvantageConfig) -> Result<Advantages> {
    if group == 0 || rewards.is_empty() || rewards.len() % group != 0 {
        return Err(Error::InvalidInput(format!("{} rewards are not whole groups of {group}", rewards.len())));
    }
    if !(cfg.eps.is_finite() && cfg.eps >= 0.0) {
        return Err(bad("eps", cfg.eps, "a finite number >= 0"));
    }
    if cfg.rloo && group < 2 {
        return Err(bad("rloo", "true", "used with groups of at least 2 completions"));
    }
    if let Some(r) = rewards.iter().find(|r| !r.is_finite()) {
        return Err(Error::InvalidInput(format!("reward {r} is not finite")));
    }
    let (group_mean, group_std): (Vec<f64>, Vec<f64>) = rewards.chunks(group).map(mean_std).unzip();
    let batch_std = mean_std(rewards).1;
    let zero = group_std.iter().filter(|&&s| s == 0.0).count();
    let mut values = Vec::with_capacity(rewards.len());
    for (gi, r) in rewards.chunks(group).enumerate() {
        let (m, s) = (group_mean[gi], group_std[gi]);
        let g = group as f64;
        for &x in r {
            let baseline = if cfg.rloo { (g * m - x) / (g - 1.0) } else { m };
            let centred = if s == 0.0 { 0.0 } else { x - baseline };
            values.push(match cfg.scale {
                ScaleRewards::Group => centred / (s + cfg.eps),
                ScaleRewards::Batch => centred / (batch_std + cfg.eps),
                ScaleRewards::None => centred,
            });
        }
    }
    Ok(Advantages { values, group_mean, group_std, frac_reward_zero_std: zero as f64 / (rewards.len() / group) as f64 })
}
