//! AdamW (decoupled weight decay) with global grad-norm clipping and a linear-warmup +
//! cosine learning-rate schedule, on f32 master weights.

use crate::params::Params;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Optimizer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f32,
    /// Final learning rate of the cosine decay.
    pub min_lr: f32,
    /// Linear warmup steps from 0 to `lr`.
    pub warmup_steps: usize,
    /// Steps of the whole schedule (cosine from `lr` at the end of warmup to `min_lr` here;
    /// `min_lr` after).
    pub total_steps: usize,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (matrices only; norm gains are not decayed).
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub clip_norm: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 1000,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            clip_norm: 1.0,
        }
    }
}

impl AdamWConfig {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, v: f32, allowed: &str| {
            Err(Error::Config { field: field.into(), value: v.to_string(), allowed: allowed.into() })
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr, "a finite number > 0");
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad("min_lr", self.min_lr, "in [0, lr]");
        }
        for (f, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(f, v, "in [0, 1)");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", self.eps, "a finite number > 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "a finite number >= 0");
        }
        if !(self.clip_norm.is_finite() && self.clip_norm >= 0.0) {
            return bad("clip_norm", self.clip_norm, "a finite number >= 0 (0 = off)");
        }
        Ok(())
    }

    /// Learning rate of (0-based) step `step`: linear warmup, then cosine to `min_lr`. One
    /// formula for the host and the device step: moekit-optim's (`OptimConfig::lr_at`, whose
    /// table the device reads).
    pub fn lr_at(&self, step: usize) -> f32 {
        moekit_optim::OptimConfig::from(self).lr_at(step)
    }
}

impl From<&AdamWConfig> for moekit_optim::OptimConfig {
    fn from(c: &AdamWConfig) -> Self {
        moekit_optim::OptimConfig {
            lr: c.lr,
            min_lr: c.min_lr,
            warmup_steps: c.warmup_steps,
            total_steps: c.total_steps,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            clip_norm: c.clip_norm,
        }
    }
}

/// Optimizer state: moments of the parameters' layout and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// Settings.
    pub cfg: AdamWConfig,
    /// First moments.
    pub m: Params,
    /// Second moments.
    pub v: Params,
    /// Updates taken.
    pub step: usize,
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f32,
}

simd_fn! {
    /// One chunk of the AdamW update (elementwise, no `mul_add`: the same bits on both paths).
    fn adamw_chunk(
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        betas: (f32, f32, f32),
        step: (f32, f32, f32, f32, f32),
    ) {
        let ((b1, b2, eps), (clip, lr, decay, bc1, bc2)) = (betas, step);
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gj = g * clip;
            *m = b1 * *m + (1.0 - b1) * gj;
            *v = b2 * *v + (1.0 - b2) * gj * gj;
            let update = (*m / bc1) / ((*v / bc2).sqrt() + eps);
            *p -= lr * (update + decay * *p);
        }
    }
}

/// Global L2 norm of `grads`, summed in f64 in parameter order.
pub fn grad_norm(grads: &Params) -> f32 {
    grads.data.iter().flatten().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt() as f32
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(cfg: AdamWConfig, params: &Params) -> Result<Self> {
        cfg.validate()?;
        Ok(AdamW { cfg, m: params.zeros_like(), v: params.zeros_like(), step: 0 })
    }

    /// One update of `params` from `grads` (clipped to the global norm first). A non-finite
    /// gradient norm skips the update and is an error, so one bad batch cannot poison the
    /// weights.
    pub fn step(&mut self, params: &mut Params, grads: &Params) -> Result<StepInfo> {
        if grads.shapes != params.shapes || self.m.shapes != params.shapes {
            return Err(Error::InvalidInput("optimizer, gradient and parameter layouts differ".into()));
        }
        let norm = grad_norm(grads);
        if !norm.is_finite() {
            return Err(Error::InvalidInput(format!("gradient norm is {norm}; update skipped")));
        }
        let c = &self.cfg;
        let clip = if c.clip_norm > 0.0 && norm > c.clip_norm { c.clip_norm / norm } else { 1.0 };
        let lr = c.lr_at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        // Elementwise, so splitting the work (tensors, then chunks) cannot change a bit.
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let decays: Vec<bool> = (0..params.data.len()).map(|i| params.decays(i)).collect();
        params
            .data
            .par_iter_mut()
            .zip(grads.data.par_iter())
            .zip(self.m.data.par_iter_mut().zip(self.v.data.par_iter_mut()))
            .zip(decays.par_iter())
            .for_each(|(((p, g), (m, v)), &dec)| {
                let decay = if dec { c.weight_decay } else { 0.0 };
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                    .for_each(|((p, g), (m, v))| {
                        adamw_chunk(p, g, m, v, (c.beta1, c.beta2, c.eps), (clip, lr, decay, bc1, bc2))
                    });
            });
        Ok(StepInfo { grad_norm: norm, lr })
    }
}
