//! Batched sampling with a KV cache (temperature, top-k, top-p, stop at EOS), and the
//! per-token log-probabilities and entropies of given sequences.

use crate::loss::token_logprobs;
use crate::model::Model;
use crate::rng::Rng;
use crate::{Error, Result};

/// How to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleConfig {
    /// Tokens to generate per sequence at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy (ties to the lower token id).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// A sequence stops after emitting this token; later positions hold it too.
    pub eos: Option<u32>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig { max_new_tokens: 8, temperature: 1.0, top_k: 0, top_p: 1.0, eos: None }
    }
}

/// Sampled sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// `[batch, prompt_len + max_new_tokens]`: prompt, completion, then EOS padding.
    pub tokens: Vec<u32>,
    /// Sequences.
    pub batch: usize,
    /// Prompt length.
    pub prompt_len: usize,
    /// Row length (`prompt_len + max_new_tokens`).
    pub seq_len: usize,
    /// Completion length of each sequence, EOS included.
    pub lengths: Vec<usize>,
    /// Whether the sequence ended without EOS (truncated).
    pub truncated: Vec<bool>,
    /// `[batch, max_new_tokens]` log-probability of each sampled token under the model
    /// (temperature 1, no filtering); 0 past the end.
    pub logprobs: Vec<f32>,
    /// Per MoE layer, the routing ids `[batch * seq_len, k]` of every position as the
    /// sampler computed them (for router replay in training).
    pub routing: Vec<Vec<i32>>,
}

/// Draws one token from `logits [V]`.
pub fn sample_token(logits: &[f32], cfg: &SampleConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        let mut best = 0;
        for (i, &z) in logits.iter().enumerate() {
            if z > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let t = cfg.temperature as f64;
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
    let mut p: Vec<(f64, usize)> = logits.iter().enumerate().map(|(i, &z)| (((z as f64 - max) / t).exp(), i)).collect();
    // Most likely first, ties to the lower id.
    p.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if cfg.top_k > 0 {
        p.truncate(cfg.top_k);
    }
    let total: f64 = p.iter().map(|x| x.0).sum();
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (i, x) in p.iter().enumerate() {
            acc += x.0 / total;
            if acc >= cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        p.truncate(keep.max(1));
    }
    let total: f64 = p.iter().map(|x| x.0).sum();
    let u = rng.uniform() as f64 * total;
    let mut acc = 0.0;
    for &(w, i) in &p {
        acc += w;
        if u < acc {
            return i as u32;
        }
    }
    p.last().map_or(0, |x| x.1 as u32)
}

fn check_sample_config(cfg: &SampleConfig) -> Result<()> {
    let bad = |field: &str, value: String, allowed: &str| {
        Err(Error::Config { field: field.into(), value, allowed: allowed.into() })
    };
    if !cfg.temperature.is_finite() || cfg.temperature < 0.0 {
        return bad("temperature", cfg.temperature.to_string(), "a finite number >= 0 (0 = greedy)");
    }
    if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
        return bad("top_p", cfg.top_p.to_string(), "in (0, 1]");
    }
    if cfg.max_new_tokens == 0 {
        return bad("max_new_tokens", "0".into(), "at least 1");
    }
    Ok(())
}

impl Model {
    /// Samples `cfg.max_new_tokens` tokens after each of the `batch` prompts
    /// (`prompts [batch, prompt_len]`, all the same length), decoding with a KV cache. The
    /// random draws come from `rng` in sequence order, so a seed gives the same tokens every run.
    pub fn generate(&self, prompts: &[u32], batch: usize, cfg: &SampleConfig, rng: &mut Rng) -> Result<Generation> {
        check_sample_config(cfg)?;
        if batch == 0 || prompts.is_empty() || prompts.len() % batch != 0 {
            return Err(Error::InvalidInput(format!("{} prompt tokens are not {batch} equal prompts", prompts.len())));
        }
        let p = prompts.len() / batch;
        let total = p + cfg.max_new_tokens;
        if total > self.cfg.max_seq_len {
            return Err(Error::InvalidInput(format!(
                "prompt {p} + max_new_tokens {} exceeds max_seq_len = {}",
                cfg.max_new_tokens, self.cfg.max_seq_len
            )));
        }
        if let Some(eos) = cfg.eos.filter(|&e| e as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidInput(format!("eos {eos} outside the vocabulary")));
        }
        let (v, k) = (self.cfg.vocab_size, self.cfg.moe.top_k);
        let mut kv = self.kv_cache(batch, total)?;
        let mut tokens = vec![0u32; batch * total];
        for b in 0..batch {
            tokens[b * total..][..p].copy_from_slice(&prompts[b * p..][..p]);
        }
        let n_moe = self.router_bias.len();
        let mut routing = vec![vec![0i32; batch * total * k]; n_moe];
        let mut record = |ids: &[Vec<i32>], pos: usize, s: usize| {
            for (layer, r) in routing.iter_mut().enumerate() {
                for b in 0..batch {
                    r[(b * total + pos) * k..][..s * k].copy_from_slice(&ids[layer][b * s * k..][..s * k]);
                }
            }
        };
        let (logits, ids) = self.forward_step(prompts, &mut kv)?;
        record(&ids, 0, p);
        let mut last: Vec<f32> = (0..batch).flat_map(|b| logits[(b * p + p - 1) * v..][..v].to_vec()).collect();
        let mut done = vec![false; batch];
        let mut lengths = vec![0usize; batch];
        let mut logprobs = vec![0.0f32; batch * cfg.max_new_tokens];
        for step in 0..cfg.max_new_tokens {
            let mut next = vec![0u32; batch];
            for b in 0..batch {
                let row = &last[b * v..][..v];
                next[b] = if done[b] {
                    cfg.eos.unwrap_or(0)
                } else {
                    let t = sample_token(row, cfg, rng);
                    logprobs[b * cfg.max_new_tokens + step] = token_logprobs(row, v, &[t as i32]).0[0];
                    lengths[b] += 1;
                    if Some(t) == cfg.eos {
                        done[b] = true;
                    }
                    t
                };
                tokens[b * total + p + step] = next[b];
            }
            // Feed the new tokens (also the last ones, so every position has its routing).
            let (lg, ids) = self.forward_step(&next, &mut kv)?;
            record(&ids, p + step, 1);
            last = lg;
            if done.iter().all(|&x| x) {
                // Fill the rest with EOS and record its routing position by position.
                for rest in step + 1..cfg.max_new_tokens {
                    let fill = vec![cfg.eos.unwrap_or(0); batch];
                    for b in 0..batch {
                        tokens[b * total + p + rest] = fill[b];
                    }
                    let (_, ids) = self.forward_step(&fill, &mut kv)?;
                    record(&ids, p + rest, 1);
                }
                break;
            }
        }
        let truncated = done.iter().map(|&d| !d).collect();
        Ok(Generation { tokens, batch, prompt_len: p, seq_len: total, lengths, truncated, logprobs, routing })
    }

    /// Log-probabilities and entropies `[batch, seq - 1]` of each next token of
    /// `tokens [batch, seq]` (position t predicts token t + 1), from one forward pass.
    pub fn sequence_logprobs(&self, tokens: &[u32], batch: usize, seq: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let fwd = self.forward(tokens, batch, seq, None)?;
        let v = self.cfg.vocab_size;
        let targets = next_token_targets(tokens, batch, seq);
        let (lp, ent) = token_logprobs(&fwd.logits, v, &targets);
        let keep = |x: Vec<f32>| -> Vec<f32> { (0..batch).flat_map(|b| x[b * seq..][..seq - 1].to_vec()).collect() };
        Ok((keep(lp), keep(ent)))
    }
}

/// Targets `[batch * seq]` for next-token prediction: `tokens[t + 1]`, -1 at each row's last
/// position.
pub fn next_token_targets(tokens: &[u32], batch: usize, seq: usize) -> Vec<i32> {
    (0..batch * seq).map(|r| if r % seq + 1 < seq { tokens[r + 1] as i32 } else { -1 }).collect()
}
