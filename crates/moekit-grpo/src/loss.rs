//! The GRPO objective over a batch of completions and its gradient with respect to the
//! policy's per-token log-probabilities.
//!
//! Per completion token t of sequence i (mask 1), with `ratio = exp(logp - logp_old)`:
//!
//! ```text
//! l = -min(ratio A_i, clip(ratio, 1 - eps_low, 1 + eps_high) A_i) + beta k3
//! k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1
//! ```
//!
//! With [`Importance::Sequence`] (GSPO) the ratio is one per sequence,
//! `exp(mean_t(logp - logp_old))`, clipped per sequence. The batch loss is `sum w l` with the
//! weights of [`LossType`]. `d l / d logp` is `-A ratio` where the unclipped term is the minimum
//! (the clipped one is constant there), plus `beta (1 - exp(logp_ref - logp))`.

use crate::{bad, Error, Result};
use serde::{Deserialize, Serialize};

/// How token losses are averaged into the batch loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over sequences of each sequence's token mean (the GRPO paper).
    Grpo,
    /// Sum over the batch's completion tokens divided by their count (token mean).
    Bnpo,
    /// Sum divided by `sequences x max_completion_length` (a constant: Dr. GRPO).
    DrGrpo,
    /// Sum divided by the completion-token count of the whole generation batch (DAPO), which
    /// may span several update batches.
    Dapo,
}

/// Token- or sequence-level importance ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Importance {
    /// One ratio per token (GRPO, DAPO).
    Token,
    /// One ratio per sequence, the exponentiated mean log-ratio (GSPO).
    Sequence,
}

/// Objective options (TRL's names).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Lower clip range: the ratio is clipped below at `1 - epsilon`.
    pub epsilon: f64,
    /// Upper clip range (clip-higher; DAPO 0.28): clipped above at `1 + epsilon_high`.
    pub epsilon_high: f64,
    /// KL coefficient (0: no reference policy is needed).
    pub beta: f64,
    /// Aggregation.
    pub loss_type: LossType,
    /// Ratio level.
    pub importance: Importance,
    /// Completion length bound (the `dr_grpo` normaliser).
    pub max_completion_length: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            epsilon: 0.2,
            epsilon_high: 0.28,
            beta: 0.0,
            loss_type: LossType::Dapo,
            importance: Importance::Token,
            max_completion_length: 8,
        }
    }
}

impl LossConfig {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<()> {
        if !(self.epsilon.is_finite() && (0.0..1.0).contains(&self.epsilon)) {
            return Err(bad("epsilon", self.epsilon, "in [0, 1)"));
        }
        if !(self.epsilon_high.is_finite() && self.epsilon_high >= 0.0) {
            return Err(bad("epsilon_high", self.epsilon_high, "a finite number >= 0"));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(bad("beta", self.beta, "a finite number >= 0 (0 = no reference model)"));
        }
        if self.max_completion_length == 0 {
            return Err(bad("max_completion_length", 0, "at least 1"));
        }
        Ok(())
    }
}

/// A batch of `sequences` completions of `len` token slots each (row-major `[sequences, len]`).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Sequences.
    pub sequences: usize,
    /// Token slots per sequence.
    pub len: usize,
    /// Current policy log-probabilities of the completion tokens.
    pub logp: &'a [f32],
    /// Log-probabilities under the policy that sampled them (kept across `num_iterations`).
    pub logp_old: &'a [f32],
    /// Reference policy log-probabilities (needed when `beta > 0`).
    pub logp_ref: Option<&'a [f32]>,
    /// 1 for completion tokens that count, 0 for prompt, padding, masked truncations.
    pub mask: &'a [f32],
    /// One advantage per sequence.
    pub advantages: &'a [f64],
}

/// The objective, its gradient and the metrics users know from TRL.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// The batch loss.
    pub loss: f64,
    /// `d loss / d logp`, `[sequences, len]` (0 where the mask is 0).
    pub dlogp: Vec<f32>,
    /// Mean k3 over counted tokens (0 without a reference).
    pub kl: f64,
    /// Fraction of counted tokens clipped below (ratio < 1 - eps with A < 0).
    pub clip_ratio_low: f64,
    /// Fraction clipped above (ratio > 1 + eps_high with A > 0).
    pub clip_ratio_high: f64,
    /// Either.
    pub clip_ratio_region: f64,
    /// Counted tokens.
    pub tokens: usize,
}

/// `k3(d) = exp(d) - d - 1` with `d = logp_ref - logp`: an unbiased, non-negative estimator of
/// `KL(pi || pi_ref)` from samples of pi.
pub fn k3(d: f64) -> f64 {
    d.exp() - d - 1.0
}

/// The objective on `batch`. `dapo_tokens`: the completion-token count of the generation batch
/// for [`LossType::Dapo`] (None: this batch's).
pub fn grpo_loss(cfg: &LossConfig, batch: &Batch<'_>, dapo_tokens: Option<usize>) -> Result<LossOutput> {
    cfg.validate()?;
    let (b, t) = (batch.sequences, batch.len);
    let n = b * t;
    let lens_ok = [batch.logp.len(), batch.logp_old.len(), batch.mask.len()].iter().all(|&l| l == n);
    if !lens_ok || batch.advantages.len() != b || batch.logp_ref.is_some_and(|r| r.len() != n) {
        return Err(Error::InvalidInput(format!(
            "GRPO batch of {b} x {t}: logp {}, logp_old {}, mask {}, advantages {}, logp_ref {:?}",
            batch.logp.len(),
            batch.logp_old.len(),
            batch.mask.len(),
            batch.advantages.len(),
            batch.logp_ref.map(<[f32]>::len)
        )));
    }
    if cfg.beta > 0.0 && batch.logp_ref.is_none() {
        return Err(Error::InvalidInput("beta > 0 needs the reference log-probabilities".into()));
    }
    if batch.mask.iter().any(|&m| m != 0.0 && m != 1.0) {
        return Err(Error::InvalidInput("mask values must be 0 or 1".into()));
    }
    let seq_tokens: Vec<usize> = batch.mask.chunks(t.max(1)).map(|m| m.iter().filter(|&&x| x == 1.0).count()).collect();
    let tokens: usize = seq_tokens.iter().sum();
    let weight = |i: usize| -> f64 {
        let w = match cfg.loss_type {
            LossType::Grpo => 1.0 / (b as f64 * seq_tokens[i].max(1) as f64),
            LossType::Bnpo => 1.0 / tokens.max(1) as f64,
            LossType::DrGrpo => 1.0 / (b as f64 * cfg.max_completion_length as f64),
            LossType::Dapo => 1.0 / dapo_tokens.unwrap_or(tokens).max(1) as f64,
        };
        if seq_tokens[i] == 0 {
            0.0
        } else {
            w
        }
    };
    let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high);
    let mut out = LossOutput {
        loss: 0.0,
        dlogp: vec![0.0; n],
        kl: 0.0,
        clip_ratio_low: 0.0,
        clip_ratio_high: 0.0,
        clip_ratio_region: 0.0,
        tokens,
    };
    let (mut low, mut high) = (0usize, 0usize);
    for i in 0..b {
        let a = batch.advantages[i];
        let w = weight(i);
        let row = i * t..(i + 1) * t;
        let counted: Vec<usize> = row.clone().filter(|&j| batch.mask[j] == 1.0).collect();
        // GSPO: one ratio per sequence from the mean log-ratio.
        let seq_ratio = match cfg.importance {
            Importance::Sequence if !counted.is_empty() => {
                let mean = counted.iter().map(|&j| batch.logp[j] as f64 - batch.logp_old[j] as f64).sum::<f64>()
                    / counted.len() as f64;
                Some(mean.exp())
            }
            _ => None,
        };
        let mut seq_grad = 0.0; // GSPO: d(sum_t w l_t) / d ratio_i
        for &j in &counted {
            let ratio = seq_ratio.unwrap_or_else(|| (batch.logp[j] as f64 - batch.logp_old[j] as f64).exp());
            let clipped = ratio.clamp(lo, hi);
            let (unclipped_term, clipped_term) = (ratio * a, clipped * a);
            let surrogate = -unclipped_term.min(clipped_term);
            // The unclipped term is the minimum (ties included): its gradient flows.
            let active = unclipped_term <= clipped_term;
            let is_low = ratio < lo && a < 0.0;
            let is_high = ratio > hi && a > 0.0;
            low += is_low as usize;
            high += is_high as usize;
            let (mut l, mut g) = (surrogate, 0.0);
            if active {
                if seq_ratio.is_some() {
                    seq_grad += w * -a;
                } else {
                    g = -a * ratio;
                }
            }
            if let Some(r) = batch.logp_ref {
                let d = r[j] as f64 - batch.logp[j] as f64;
                let kl = k3(d);
                out.kl += kl;
                l += cfg.beta * kl;
                g += cfg.beta * (1.0 - d.exp());
            }
            out.loss += w * l;
            out.dlogp[j] = (w * g) as f32;
        }
        if let Some(s) = seq_ratio {
            // d ratio_i / d logp_t = ratio_i / |counted| for every counted token.
            let per_token = seq_grad * s / counted.len() as f64;
            for &j in &counted {
                out.dlogp[j] = (out.dlogp[j] as f64 + per_token) as f32;
            }
        }
    }
    let denom = tokens.max(1) as f64;
    out.kl /= denom;
    out.clip_ratio_low = low as f64 / denom;
    out.clip_ratio_high = high as f64 / denom;
    out.clip_ratio_region = (low + high) as f64 / denom;
    Ok(out)
}
