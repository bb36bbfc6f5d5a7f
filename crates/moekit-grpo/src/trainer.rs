//! The GRPO training loop on a `moekit-model` policy: sample G completions per prompt with the
//! KV cache, score them, compute group advantages, and take `num_iterations` clipped updates
//! against the sampling policy's log-probabilities, then the router bias update.
//!
//! Reproducible: every random draw comes from the trainer's one [`Rng`] in a fixed order, and
//! the model's CPU path is deterministic, so a seed and a config give the same run bit for bit.

use crate::advantages::{advantages, AdvantageConfig};
use crate::loss::{grpo_loss, Batch, LossConfig};
use crate::sampling::{fill_batch, mask_truncated};
use crate::task::{Task, TaskKind, EOS};
use crate::{bad, Error, Result};
use moekit_model::loss::{logits_grad, token_logprobs};
use moekit_model::{AdamW, AdamWConfig, Model, ModelConfig, Rng, SampleConfig};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Everything a run is made of (TOML: every field optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The task.
    pub task: TaskKind,
    /// Seed of the model's initialisation and of every draw.
    pub seed: u64,
    /// Optimizer steps (one per batch of rollouts times `num_iterations`).
    pub steps: usize,
    /// Prompts per step.
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    pub num_generations: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// Sampling top-k (0: off).
    pub top_k: usize,
    /// Sampling top-p (1: off).
    pub top_p: f32,
    /// Updates per batch of rollouts (mu); with more than 1 the ratio moves off 1 and clips.
    pub num_iterations: usize,
    /// Drop groups whose rewards are all equal and sample more (up to `max_sampling_rounds`).
    pub dynamic_sampling: bool,
    /// Sampling rounds per step with dynamic sampling.
    pub max_sampling_rounds: usize,
    /// Completions that never emit EOS count for nothing.
    pub mask_truncated_completions: bool,
    /// Replay the routing chosen while sampling in the update (router replay, verl's R3).
    pub router_replay: bool,
    /// Entropy bonus: subtracts `entropy_coef` x the mean entropy of the completion tokens
    /// from the loss (TRL's `entropy_coef`), against early collapse (0: off).
    pub entropy_coef: f64,
    /// Advantages.
    pub advantage: AdvantageConfig,
    /// Objective.
    pub loss: LossConfig,
    /// Optimizer.
    pub optim: AdamWConfig,
    /// Policy.
    pub model: ModelConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            task: TaskKind::Reverse { digits: 3 },
            seed: 0,
            steps: 600,
            prompts_per_step: 16,
            num_generations: 16,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            num_iterations: 1,
            dynamic_sampling: true,
            max_sampling_rounds: 3,
            mask_truncated_completions: false,
            router_replay: true,
            entropy_coef: 0.03,
            advantage: AdvantageConfig::default(),
            loss: LossConfig::default(),
            // Measured on reverse-3: lr 2e-3 and 1e-3 collapse the entropy (every group's
            // completions identical, zero advantage) at reward ~0.45; 5e-4 with dynamic sampling
            // and the 0.03 entropy bonus reaches 0.9 in 254-428 steps on seeds 0-2, where 0.01
            // let seed 1 collapse at 0.79 (kernels/NOTES.md).
            optim: AdamWConfig { lr: 5e-4, min_lr: 2e-4, warmup_steps: 10, total_steps: 600, ..AdamWConfig::default() },
            model: ModelConfig::default(),
        }
    }
}

impl TrainConfig {
    /// Checks every field and the parts' own configurations; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let pos = |f: &str, v: usize| if v == 0 { Err(bad(f, v, "at least 1")) } else { Ok(()) };
        pos("steps", self.steps)?;
        pos("prompts_per_step", self.prompts_per_step)?;
        pos("num_iterations", self.num_iterations)?;
        pos("max_sampling_rounds", self.max_sampling_rounds)?;
        if self.num_generations < 2 {
            return Err(bad("num_generations", self.num_generations, "at least 2 (advantages compare a group)"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(bad("temperature", self.temperature, "a finite number > 0"));
        }
        if !(self.entropy_coef.is_finite() && self.entropy_coef >= 0.0) {
            return Err(bad("entropy_coef", self.entropy_coef, "a finite number >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", self.top_p, "in (0, 1]"));
        }
        match self.task {
            TaskKind::Reverse { digits } | TaskKind::Sort { digits } if !(1..=12).contains(&digits) => {
                return Err(bad("task.digits", digits, "1..=12"))
            }
            _ => {}
        }
        self.loss.validate()?;
        let model_err = |e: moekit_model::Error| Error::InvalidInput(format!("model: {e}"));
        self.model.validate().map_err(model_err)?;
        self.optim.validate().map_err(model_err)?;
        let task = self.task.build();
        let need = task.prompt_len() + task.max_completion();
        if need > self.model.max_seq_len {
            return Err(bad(
                "model.max_seq_len",
                self.model.max_seq_len,
                &format!("at least {need} for {} (prompt + completion)", task.name()),
            ));
        }
        if self.model.vocab_size < 14 {
            return Err(bad("model.vocab_size", self.model.vocab_size, "at least 14 (10 digits + BOS, SEP, EOS, PAD)"));
        }
        Ok(())
    }
}

/// One step's metrics, with TRL's names where TRL has one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepMetrics {
    /// Step (1-based).
    pub step: usize,
    /// Mean total reward of every completion sampled in the step (with dynamic sampling, the
    /// dropped groups too: it describes the policy, not the filtered batch).
    pub reward: f64,
    /// Std of the total reward over the batch.
    pub reward_std: f64,
    /// Mean of each reward function: `(name, mean, std)`.
    pub rewards: Vec<(String, f64, f64)>,
    /// Fraction of groups whose rewards are all equal.
    pub frac_reward_zero_std: f64,
    /// Completion lengths (EOS included).
    pub completion_mean_length: f64,
    /// Shortest completion.
    pub completion_min_length: usize,
    /// Longest completion.
    pub completion_max_length: usize,
    /// Fraction of completions without EOS.
    pub clipped_ratio: f64,
    /// The objective of the last update.
    pub loss: f64,
    /// Mean k3 KL (0 with beta = 0).
    pub kl: f64,
    /// Mean token entropy of the sampled completions.
    pub entropy: f64,
    /// Clip fractions of the last update.
    pub clip_ratio_low: f64,
    /// Clipped above.
    pub clip_ratio_high: f64,
    /// Either.
    pub clip_ratio_region: f64,
    /// Global gradient norm before clipping (last update).
    pub grad_norm: f64,
    /// Learning rate (last update).
    pub learning_rate: f64,
    /// Seconds this step took.
    pub step_time: f64,
    /// Sampled completion tokens per second of the step.
    pub tokens_per_s: f64,
    /// Routed tokens of the busiest expert over the mean, worst MoE layer.
    pub expert_load_max_over_mean: f64,
    /// Sequence-wise balance loss (0 when disabled).
    pub aux_loss: f64,
    /// Mean absolute router bias.
    pub bias_drift: f64,
    /// Fraction of routing decisions the update's forward would choose differently from the
    /// sampler (what router replay removes).
    pub routing_replay_mismatch: f64,
    /// Groups dropped by dynamic sampling.
    pub groups_dropped: usize,
}

/// A rollout group: one prompt's G sampled sequences.
struct Group {
    tokens: Vec<u32>,
    lengths: Vec<usize>,
    truncated: Vec<bool>,
    routing: Vec<Vec<i32>>,
    rewards: Vec<Vec<crate::task::Reward>>,
}

/// The trainer's state: everything a checkpoint needs to continue bit for bit.
pub struct Trainer {
    /// The configuration.
    pub cfg: TrainConfig,
    /// The policy.
    pub model: Model,
    /// Its optimizer.
    pub opt: AdamW,
    /// The one source of randomness.
    pub rng: Rng,
    /// Steps taken.
    pub step: usize,
    task: Box<dyn Task>,
    /// The frozen reference policy for the KL term (only when `beta > 0`): the initial policy,
    /// rebuilt from the seed, so checkpoints need not store it.
    reference: Option<Model>,
}

fn reference_for(cfg: &TrainConfig) -> Result<Option<Model>> {
    if cfg.loss.beta > 0.0 {
        Ok(Some(Model::new(cfg.model.clone(), cfg.seed).map_err(|e| Error::InvalidInput(e.to_string()))?))
    } else {
        Ok(None)
    }
}

impl Trainer {
    /// A fresh run from the config's seed.
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let err = |e: moekit_model::Error| Error::InvalidInput(e.to_string());
        let model = Model::new(cfg.model.clone(), cfg.seed).map_err(err)?;
        let opt = AdamW::new(cfg.optim.clone(), &model.params).map_err(err)?;
        let rng = Rng::new(cfg.seed ^ 0x6772_706f);
        let task = cfg.task.build();
        let reference = reference_for(&cfg)?;
        Ok(Trainer { cfg, model, opt, rng, step: 0, task, reference })
    }

    /// A run from saved parts (see the CLI's checkpoints).
    pub fn from_parts(cfg: TrainConfig, model: Model, opt: AdamW, rng: Rng, step: usize) -> Result<Self> {
        cfg.validate()?;
        let task = cfg.task.build();
        let reference = reference_for(&cfg)?;
        Ok(Trainer { cfg, model, opt, rng, step, task, reference })
    }

    /// The task.
    pub fn task(&self) -> &dyn Task {
        self.task.as_ref()
    }

    fn sample_config(&self) -> SampleConfig {
        SampleConfig {
            max_new_tokens: self.task.max_completion(),
            temperature: self.cfg.temperature,
            top_k: self.cfg.top_k,
            top_p: self.cfg.top_p,
            eos: Some(EOS),
        }
    }

    /// Samples `prompts` groups of G completions.
    fn rollout(&mut self, prompts: usize) -> Result<Vec<Group>> {
        let g = self.cfg.num_generations;
        let p = self.task.prompt_len();
        let prompt_list: Vec<Vec<u32>> = (0..prompts).map(|_| self.task.prompt(&mut self.rng)).collect();
        let flat: Vec<u32> = prompt_list.iter().flat_map(|q| std::iter::repeat_n(q.clone(), g).flatten()).collect();
        let scfg = self.sample_config();
        let gen = self
            .model
            .generate(&flat, prompts * g, &scfg, &mut self.rng)
            .map_err(|e| Error::InvalidInput(format!("sampling: {e}")))?;
        let (len, k) = (gen.seq_len, self.cfg.model.moe.top_k);
        let mut groups = Vec::with_capacity(prompts);
        for (gi, prompt) in prompt_list.iter().enumerate() {
            let seqs = gi * g..(gi + 1) * g;
            let tokens = gen.tokens[seqs.start * len..seqs.end * len].to_vec();
            let rewards =
                seqs.clone().map(|s| self.task.rewards(prompt, &gen.tokens[s * len + p..(s + 1) * len])).collect();
            let routing = gen.routing.iter().map(|r| r[seqs.start * len * k..seqs.end * len * k].to_vec()).collect();
            groups.push(Group {
                tokens,
                lengths: gen.lengths[seqs.clone()].to_vec(),
                truncated: gen.truncated[seqs].to_vec(),
                routing,
                rewards,
            });
        }
        Ok(groups)
    }

    /// One step: rollouts, advantages, `num_iterations` updates, bias update. Returns its
    /// metrics.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let err = |e: moekit_model::Error| Error::InvalidInput(e.to_string());
        let (g, b) = (self.cfg.num_generations, self.cfg.prompts_per_step);
        let total = |rw: &[crate::task::Reward]| rw.iter().map(|r| r.weight * r.value).sum::<f64>();
        // Every sampled completion's rewards (kept or dropped): the reward metrics describe the
        // policy, not the filtered batch.
        let mut sampled: Vec<Vec<crate::task::Reward>> = Vec::new();
        let (groups, dropped) = if self.cfg.dynamic_sampling {
            let rounds = self.cfg.max_sampling_rounds;
            let (kept, stats) = fill_batch(b, rounds, |_| {
                Ok(self
                    .rollout(b)?
                    .into_iter()
                    .map(|gr| {
                        sampled.extend(gr.rewards.iter().cloned());
                        let r: Vec<f64> = gr.rewards.iter().map(|x| total(x)).collect();
                        (gr, r)
                    })
                    .collect())
            })?;
            (kept, stats.dropped)
        } else {
            let gs = self.rollout(b)?;
            sampled.extend(gs.iter().flat_map(|gr| gr.rewards.iter().cloned()));
            (gs, 0)
        };
        let p = self.task.prompt_len();
        let len = p + self.task.max_completion();
        let n = groups.len() * g;
        let tokens: Vec<u32> = groups.iter().flat_map(|gr| gr.tokens.iter().copied()).collect();
        let rewards: Vec<f64> = groups.iter().flat_map(|gr| gr.rewards.iter().map(|r| total(r))).collect();
        let adv = advantages(&rewards, g, &self.cfg.advantage)?;
        let lengths: Vec<usize> = groups.iter().flat_map(|gr| gr.lengths.iter().copied()).collect();
        let truncated: Vec<bool> = groups.iter().flat_map(|gr| gr.truncated.iter().copied()).collect();
        let n_moe = self.model.router_bias.len();
        let routing: Vec<Vec<i32>> =
            (0..n_moe).map(|l| groups.iter().flat_map(|gr| gr.routing[l].iter().copied()).collect()).collect();
        // Targets: position t predicts token t + 1; completion tokens are positions p-1 .. .
        let targets = moekit_model::generate::next_token_targets(&tokens, n, len);
        let mut mask = vec![0.0f32; n * len];
        for s in 0..n {
            for j in 0..lengths[s] {
                mask[s * len + p - 1 + j] = 1.0;
            }
        }
        if self.cfg.mask_truncated_completions {
            mask_truncated(&mut mask, len, &truncated)?;
        }
        let v = self.cfg.model.vocab_size;
        let replay = self.cfg.router_replay.then_some(routing.as_slice());
        // The sampling policy's log-probs (the current weights, before any update).
        let fwd_old = self.model.forward(&tokens, n, len, replay).map_err(err)?;
        let (logp_old, entropy) = token_logprobs(&fwd_old.logits, v, &targets);
        let mismatch = {
            let chosen = if self.cfg.router_replay {
                self.model.forward(&tokens, n, len, None).map_err(err)?.routing_ids()
            } else {
                fwd_old.routing_ids()
            };
            let (mut diff, mut all) = (0usize, 0usize);
            let k = self.cfg.model.moe.top_k;
            for (c, r) in chosen.iter().zip(&routing) {
                for pos in 0..n * len {
                    if mask[pos] == 1.0 {
                        diff += c[pos * k..(pos + 1) * k]
                            .iter()
                            .zip(&r[pos * k..(pos + 1) * k])
                            .filter(|(a, b)| a != b)
                            .count();
                        all += k;
                    }
                }
            }
            diff as f64 / all.max(1) as f64
        };
        let logp_ref = match &self.reference {
            Some(r) => Some(token_logprobs(&r.forward(&tokens, n, len, replay).map_err(err)?.logits, v, &targets).0),
            None => None,
        };
        let mut fwd = fwd_old;
        let (mut last, mut info) = (None, None);
        for it in 0..self.cfg.num_iterations {
            if it > 0 {
                fwd = self.model.forward(&tokens, n, len, replay).map_err(err)?;
            }
            let (logp, _) = token_logprobs(&fwd.logits, v, &targets);
            let batch = Batch {
                sequences: n,
                len,
                logp: &logp,
                logp_old: &logp_old,
                logp_ref: logp_ref.as_deref(),
                mask: &mask,
                advantages: &adv.values,
            };
            let out = grpo_loss(&self.cfg.loss, &batch, None)?;
            let dentropy: Option<Vec<f32>> = (self.cfg.entropy_coef > 0.0).then(|| {
                let per_token = -(self.cfg.entropy_coef / out.tokens.max(1) as f64) as f32;
                mask.iter().map(|&m| m * per_token).collect()
            });
            let dlogits = logits_grad(&fwd.logits, v, &targets, &out.dlogp, dentropy.as_deref());
            let grads = self.model.backward(&fwd, &dlogits).map_err(err)?;
            info = Some(self.opt.step(&mut self.model.params, &grads).map_err(err)?);
            last = Some(out);
        }
        let counts: Vec<Vec<i32>> = fwd.routing().iter().map(|r| r.counts.clone()).collect();
        self.model.update_router_bias(&counts).map_err(err)?;
        self.step += 1;
        let (out, info) = match (last, info) {
            (Some(o), Some(i)) => (o, i),
            _ => return Err(Error::InvalidInput("no update ran".into())),
        };
        let secs = start.elapsed().as_secs_f64();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let std = |v: &[f64]| {
            let m = mean(v);
            (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt()
        };
        let names: Vec<&'static str> = sampled.first().map(|r| r.iter().map(|x| x.name).collect()).unwrap_or_default();
        let per_fn = names
            .iter()
            .enumerate()
            .map(|(fi, name)| {
                let vals: Vec<f64> = sampled.iter().map(|r| r[fi].value).collect();
                (name.to_string(), mean(&vals), std(&vals))
            })
            .collect();
        let sampled_total: Vec<f64> = sampled.iter().map(|r| total(r)).collect();
        let masked_entropy: f64 = entropy.iter().zip(&mask).map(|(&h, &m)| h as f64 * m as f64).sum::<f64>()
            / mask.iter().map(|&m| m as f64).sum::<f64>().max(1.0);
        let load = counts
            .iter()
            .map(|c| {
                let m = c.iter().map(|&x| x as f64).sum::<f64>() / c.len().max(1) as f64;
                c.iter().copied().max().unwrap_or(0) as f64 / m.max(1e-9)
            })
            .fold(0.0, f64::max);
        let biases: Vec<f32> = self.model.router_bias.iter().flatten().copied().collect();
        let comp_tokens: usize = lengths.iter().sum();
        Ok(StepMetrics {
            step: self.step,
            reward: mean(&sampled_total),
            reward_std: std(&sampled_total),
            rewards: per_fn,
            frac_reward_zero_std: adv.frac_reward_zero_std,
            completion_mean_length: comp_tokens as f64 / n as f64,
            completion_min_length: lengths.iter().copied().min().unwrap_or(0),
            completion_max_length: lengths.iter().copied().max().unwrap_or(0),
            clipped_ratio: truncated.iter().filter(|&&t| t).count() as f64 / n as f64,
            loss: out.loss,
            kl: out.kl,
            entropy: masked_entropy,
            clip_ratio_low: out.clip_ratio_low,
            clip_ratio_high: out.clip_ratio_high,
            clip_ratio_region: out.clip_ratio_region,
            grad_norm: info.grad_norm as f64,
            learning_rate: info.lr as f64,
            step_time: secs,
            tokens_per_s: comp_tokens as f64 / secs.max(1e-9),
            expert_load_max_over_mean: load,
            aux_loss: fwd.aux_loss() as f64,
            bias_drift: biases.iter().map(|b| b.abs() as f64).sum::<f64>() / biases.len().max(1) as f64,
            routing_replay_mismatch: mismatch,
            groups_dropped: dropped,
        })
    }
}
