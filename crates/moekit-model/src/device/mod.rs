//! The whole training step on moekit's kernels, device-resident: [`DeviceTrainer`].
//!
//! ```text
//! tokens --embedding (moekit-norm)--> x  F32 residual stream                    [N, D]
//! per block:  n1 = rmsnorm(x) BF16 -> qkv = n1 Wqkv^T (grouped GEMM, 1 group) -> widen F32
//!             -> RoPE (moekit-norm) -> flash attention (moekit-attention) -> narrow BF16
//!             -> o = att Wo^T -> x2 = x + o -> n2 = rmsnorm(x2) BF16
//!             -> dense SwiGLU | MoE (router GEMM, moekit-gating route, moekit-dispatch
//!                layout/permute/swiglu/combine, expert grouped GEMMs, shared experts)
//!             -> x = x2 + ffn
//! head:       rmsnorm -> logits = h E^T (or the untied head) -> widen F32
//!             -> moekit-logits cross-entropy (loss on the device, dlogits)
//! backward:   the same ops' backward in reverse (dgrad for dX, k-grouped for dW in F32,
//!             flash-attention backward, RMSNorm backward with the residual fused, the
//!             routing backward, the deterministic embedding gradient)
//! update:     moekit-optim AdamW over every parameter (global norm, clipping, schedule on the
//!             device) writing the BF16 copies; router biases from the device counts
//!             (moekit-gating update_bias)
//! metrics:    loss and the optimizer's scalars read back at the end (the step's only host
//!             synchronisation points)
//! ```
//!
//! Precision: f32 master weights, moments, norms statistics, attention, softmax and weight
//! gradients; BF16 operands (weights and activations) for every matmul, f32 accumulation; the
//! residual stream and every gradient entering a norm or the attention in f32. With
//! `moe.precision = "fp8"` the routed experts' two forward GEMMs take FP8 E4M3 operands
//! (tokens and SwiGLU output 1x128-quantized by moekit-dispatch, weights 128x128-quantized on
//! the device from the f32 masters after every update), as the host model's kernel backend;
//! their backward stays BF16.
//!
//! Contract: the same model as [`crate::Model`] (parameter layout, formulas, optimizer), with
//! BF16 matmuls instead of the host's f32 ones. Requirements (typed [`Error::Config`]
//! otherwise): `d_model`, `vocab_size`, `dense_ffn_dim`, `moe.expert_dim` and `moe.experts`
//! multiples of 8 (BF16 GEMM rows of 16 bytes), head dimension at most 128; precision F32 or BF16
//! run BF16 matmuls here, FP8 as above; the sequence-wise balance loss enters the router's
//! gradient as on the host (its value is not in the step's metrics). A step
//! takes any number of tokens.

mod ffn;
mod generate;
mod linear;

pub use generate::{DeviceGeneration, DeviceGenerator};

use crate::params::{FfnKind, Index, Params};
use crate::{AdamWConfig, Error, Model, ModelConfig, Result};
use ffn::{MoeCache, MoeWeights};
use linear::Consts;
use moekit_attention::{AttnOutput, AttnShape};
use moekit_norm::RmsNormOutput;
use moekit_tensor::{DType, Device, Tensor};

/// What one [`DeviceTrainer::step`] did (the one read of the step's results).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMetrics {
    /// Mean cross-entropy over the targets (`>= 0`) of the batch, before the update.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Learning rate of the update.
    pub lr: f32,
    /// Updates taken so far.
    pub step: u64,
}

/// Parameters (F32 masters and BF16 copies), AdamW moments and router biases on a
/// [`Device`], and the training step over them.
///
/// ```no_run
/// use moekit_model::{device::DeviceTrainer, AdamWConfig, Model, ModelConfig};
/// use moekit_tensor::Device;
/// let model = Model::new(ModelConfig::default(), 0)?;
/// let mut t = DeviceTrainer::new(&model, AdamWConfig::default(), &Device::cuda_if_available(0))?;
/// let tokens: Vec<u32> = (0..64).map(|i| i % 10).collect(); // 2 sequences of 32
/// let targets = moekit_model::generate::next_token_targets(&tokens, 2, 32);
/// let m = t.step(&tokens, &targets, 2, 32)?;
/// assert!(m.loss.is_finite());
/// let trained: Model = t.download()?;
/// # Ok::<(), moekit_model::Error>(())
/// ```
#[derive(Debug)]
pub struct DeviceTrainer {
    cfg: ModelConfig,
    device: Device,
    idx: Index,
    names: Vec<String>,
    params: Vec<Tensor>,
    bf16: Vec<Tensor>,
    router_bias: Vec<Tensor>,
    /// `precision = "fp8"`: each MoE layer's expert weights (w1, w2) as 128 x 128-block FP8,
    /// quantized on the device from the F32 masters after every update; empty otherwise.
    fp8: Vec<(moekit_gemm::BlockFp8, moekit_gemm::BlockFp8)>,
    opt: moekit_optim::ops::AdamW,
    rope: moekit_norm::Rope,
    consts: Option<Consts>,
}

fn config_error(field: &str, value: impl ToString, allowed: &str) -> Error {
    Error::Config { field: field.into(), value: value.to_string(), allowed: allowed.into() }
}

fn check_config(cfg: &ModelConfig) -> Result<()> {
    let m8 = |field: &str, v: usize| {
        if v % 8 == 0 {
            Ok(())
        } else {
            Err(config_error(field, v, "a multiple of 8 on the device (BF16 GEMM rows of 16 bytes)"))
        }
    };
    m8("d_model", cfg.d_model)?;
    m8("vocab_size", cfg.vocab_size)?;
    if cfg.first_dense_layers > 0 {
        m8("dense_ffn_dim", cfg.dense_ffn_dim)?;
    }
    if cfg.first_dense_layers < cfg.n_layers {
        m8("moe.expert_dim", cfg.moe.expert_dim)?;
        m8("moe.experts", cfg.moe.experts)?;
    }
    if cfg.head_dim() > moekit_attention::MAX_HEAD_DIM {
        return Err(config_error("n_heads", cfg.n_heads, "one giving a head dimension of at most 128"));
    }
    Ok(())
}

/// Turns the grouped GEMM's readback validation off for its lifetime (the step's offsets come
/// from the dispatch layout or are constants: valid by construction), restoring it after.
struct NoReadbackValidation(bool);

impl NoReadbackValidation {
    fn new() -> Self {
        let was = moekit_gemm::raw::readback_validation();
        moekit_gemm::raw::set_readback_validation(false);
        NoReadbackValidation(was)
    }
}

impl Drop for NoReadbackValidation {
    fn drop(&mut self) {
        moekit_gemm::raw::set_readback_validation(self.0);
    }
}

/// A block's activations for the backward.
struct BlockCache {
    x: Tensor,
    ln1: RmsNormOutput,
    qkv: Tensor,
    att: AttnOutput,
    att_bf: Tensor,
    x2: Tensor,
    ln2: RmsNormOutput,
    ffn: FfnCache,
}

enum FfnCache {
    Dense(ffn::DenseCache),
    Moe(Box<MoeCache>),
}

impl DeviceTrainer {
    /// Uploads `model`'s parameters (F32 and BF16 copies) and router biases to `device` with
    /// zero AdamW moments at step 0.
    pub fn new(model: &Model, opt: AdamWConfig, device: &Device) -> Result<Self> {
        let cfg = model.cfg.clone();
        cfg.validate()?;
        check_config(&cfg)?;
        opt.validate()?;
        let p = &model.params;
        let mut params = Vec::with_capacity(p.data.len());
        let mut bf16 = Vec::with_capacity(p.data.len());
        for (d, s) in p.data.iter().zip(&p.shapes) {
            params.push(Tensor::from_slice(d, s, device)?);
            let b: Vec<moekit_dtype::bf16> = d.iter().map(|&x| moekit_norm::to_bf16(x)).collect();
            bf16.push(Tensor::from_slice(&b, s, device)?);
        }
        let decays: Vec<bool> = (0..p.data.len()).map(|i| p.decays(i)).collect();
        let optimizer = moekit_optim::ops::AdamW::new(moekit_optim::OptimConfig::from(&opt), &params, &decays)?;
        let router_bias = model
            .router_bias
            .iter()
            .map(|b| Tensor::from_slice(b, &[b.len()], device))
            .collect::<std::result::Result<_, _>>()?;
        let rope = moekit_norm::Rope::new(cfg.head_dim(), cfg.max_seq_len, cfg.rope_theta, device)?;
        let mut t = DeviceTrainer {
            idx: crate::params::index(&cfg),
            names: p.names.clone(),
            cfg,
            device: device.clone(),
            params,
            bf16,
            router_bias,
            fp8: Vec::new(),
            opt: optimizer,
            rope,
            consts: None,
        };
        t.refresh_fp8()?;
        Ok(t)
    }

    /// `precision = "fp8"`: re-quantizes every MoE layer's expert weights from the F32 masters
    /// (`moekit_gemm::quantize_weights`, on the device: two launches per layer, no readback).
    fn refresh_fp8(&mut self) -> Result<()> {
        if self.cfg.moe.precision != crate::Precision::Fp8 {
            return Ok(());
        }
        let mut fp8 = Vec::new();
        for l in &self.idx.layers {
            if let FfnKind::Moe { idx, .. } = l.ffn {
                let w1 = moekit_gemm::quantize_weights(&self.params[idx.w1], false)?.0;
                let w2 = moekit_gemm::quantize_weights(&self.params[idx.w2], false)?.0;
                fp8.push((w1, w2));
            }
        }
        self.fp8 = fp8;
        Ok(())
    }

    /// The FP8 expert weights of MoE layer `moe_index` (`precision = "fp8"`).
    pub(crate) fn fp8_experts(&self, moe_index: usize) -> Option<&(moekit_gemm::BlockFp8, moekit_gemm::BlockFp8)> {
        self.fp8.get(moe_index)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters back on the host, as a [`Model`] (checkpoints, evaluation). Reads back.
    pub fn download(&self) -> Result<Model> {
        let mut params = Params::zeros(&self.cfg);
        for (d, t) in params.data.iter_mut().zip(&self.params) {
            *d = t.to_vec::<f32>()?;
        }
        let bias = self.router_bias.iter().map(|b| b.to_vec::<f32>()).collect::<std::result::Result<_, _>>()?;
        Model::from_parts(self.cfg.clone(), params, bias)
    }

    /// The optimizer state on the host (moments and step count; `cfg` as given). Reads back.
    pub fn download_optimizer(&self, cfg: AdamWConfig) -> Result<crate::AdamW> {
        let (m, v) = self.opt.moments();
        let mut host = crate::AdamW::new(cfg, &Params::zeros(&self.cfg))?;
        for (d, t) in host.m.data.iter_mut().zip(m) {
            *d = t.to_vec::<f32>()?;
        }
        for (d, t) in host.v.data.iter_mut().zip(v) {
            *d = t.to_vec::<f32>()?;
        }
        host.step = self.opt.info()?.step as usize;
        Ok(host)
    }

    fn check_batch(&self, tokens: &[u32], targets: &[i32], batch: usize, seq: usize) -> Result<()> {
        let n = batch * seq;
        if batch == 0 || seq == 0 || tokens.len() != n || targets.len() != n {
            return Err(Error::InvalidInput(format!(
                "{} tokens / {} targets are not {batch} sequences of {seq} (both positive)",
                tokens.len(),
                targets.len()
            )));
        }
        if seq > self.cfg.max_seq_len {
            return Err(Error::InvalidInput(format!("seq = {seq} exceeds max_seq_len = {}", self.cfg.max_seq_len)));
        }
        let v = self.cfg.vocab_size;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::InvalidInput(format!("token {t} outside the vocabulary of {v}")));
        }
        if let Some(t) = targets.iter().find(|&&t| t >= v as i32) {
            return Err(Error::InvalidInput(format!("target {t} outside the vocabulary of {v} (< 0: no target)")));
        }
        Ok(())
    }

    /// One training step on `tokens [batch, seq]` with `targets [batch, seq]` (`< 0`: no
    /// target; e.g. [`crate::generate::next_token_targets`]): forward, mean cross-entropy,
    /// backward, global-norm clipping and AdamW on every parameter (BF16 copies refreshed),
    /// router-bias update from the step's expert counts. Inputs are validated on the host; the
    /// step enqueues its work without a host synchronisation and reads the metrics back once
    /// at the end (one readback: the loss and the optimizer's scalars packed on the device). A non-finite gradient
    /// norm skips the update (as [`crate::AdamW::step`]) and is `Error::InvalidInput`.
    pub fn step(&mut self, tokens: &[u32], targets: &[i32], batch: usize, seq: usize) -> Result<StepMetrics> {
        self.check_batch(tokens, targets, batch, seq)?;
        if self.consts.as_ref().is_none_or(|c| (c.batch, c.seq) != (batch, seq)) {
            self.consts = Some(Consts::new(batch, seq, &self.device)?);
        }
        let _guard = NoReadbackValidation::new();
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let ids = Tensor::from_slice(&ids, &[ids.len()], &self.device)?;
        let targets = Tensor::from_slice(targets, &[targets.len()], &self.device)?;
        let (loss, grads, counts) = self.forward_backward(&ids, &targets)?;
        self.opt.step(&mut self.params, &grads, Some(&mut self.bf16), None)?;
        drop(grads);
        self.refresh_fp8()?;
        if self.cfg.uses_router_bias() {
            for (b, c) in self.router_bias.iter_mut().zip(&counts) {
                moekit_gating::update_bias(b, c, self.cfg.moe.bias_update_rate)?;
            }
        }
        drop(counts);
        // One readback: the loss's 4 bytes, then the optimizer's scalars.
        let metrics = Tensor::concat_bytes(&[&loss, self.opt.scalars()], &self.device)?.to_vec::<u8>()?;
        let loss = f32::from_le_bytes([metrics[0], metrics[1], metrics[2], metrics[3]]);
        let info = moekit_optim::StepInfo::from_bytes(&metrics[4..])?;
        if info.skipped {
            return Err(Error::InvalidInput(format!("gradient norm is {}; update skipped", info.grad_norm)));
        }
        Ok(StepMetrics { loss, grad_norm: info.grad_norm, lr: info.lr, step: info.step })
    }

    /// The loss and every parameter's gradient of a batch (as [`DeviceTrainer::step`] computes
    /// them, before clipping), read back to the host; nothing is updated. For tests and
    /// debugging: it reads back every gradient.
    pub fn gradients(&mut self, tokens: &[u32], targets: &[i32], batch: usize, seq: usize) -> Result<(f32, Params)> {
        self.check_batch(tokens, targets, batch, seq)?;
        if self.consts.as_ref().is_none_or(|c| (c.batch, c.seq) != (batch, seq)) {
            self.consts = Some(Consts::new(batch, seq, &self.device)?);
        }
        let _guard = NoReadbackValidation::new();
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let ids = Tensor::from_slice(&ids, &[ids.len()], &self.device)?;
        let targets = Tensor::from_slice(targets, &[targets.len()], &self.device)?;
        let (loss, grads, _) = self.forward_backward(&ids, &targets)?;
        let mut out = Params::zeros(&self.cfg);
        for (d, g) in out.data.iter_mut().zip(&grads) {
            *d = g.to_vec::<f32>()?;
        }
        Ok((loss.to_vec::<f32>()?[0], out))
    }

    /// Forward and backward: the loss `[1]`, every parameter's gradient (F32, parameter order)
    /// and each MoE layer's expert counts.
    fn forward_backward(&self, ids: &Tensor, targets: &Tensor) -> Result<(Tensor, Vec<Tensor>, Vec<Tensor>)> {
        let c = self.consts.as_ref().ok_or_else(|| Error::InvalidInput("no step constants".into()))?;
        let cfg = &self.cfg;
        let (d, v, eps) = (cfg.d_model, cfg.vocab_size, cfg.norm_eps);
        let shape = AttnShape { batch: c.batch, heads: cfg.n_heads, head_dim: cfg.head_dim(), seq: c.seq };
        let rcfg = cfg.router();
        let dcfg = ffn::dispatch_config(cfg);
        let p = &self.params;
        let b = &self.bf16;
        let moe_w = |idx: &crate::params::MoeIdx, moe_index: usize| MoeWeights {
            router: &b[idx.router],
            w1: &b[idx.w1],
            w2: &b[idx.w2],
            fp8: self.fp8_experts(moe_index),
            shared: idx.shared.map(|s| (&b[s.w1], &b[s.w2])),
            bias: cfg.uses_router_bias().then(|| &self.router_bias[moe_index]),
        };
        // ---- forward
        let mut x = moekit_norm::embedding_deferred(&p[self.idx.embed], ids, DType::F32)?.0;
        let mut caches = Vec::with_capacity(cfg.n_layers);
        for l in &self.idx.layers {
            let ln1 = moekit_norm::rmsnorm(&x, &p[l.attn_norm], eps, DType::BF16)?;
            let mut qkv = c.widen(&c.linear(&ln1.y, &b[l.wqkv])?)?;
            drop(self.rope.apply_deferred(&mut qkv, 2 * cfg.n_heads, &c.pos, false)?);
            let att = moekit_attention::attention(&qkv, &shape)?;
            let att_bf = c.narrow(&att.out)?;
            let o = c.widen(&c.linear(&att_bf, &b[l.wo])?)?;
            let x2 = moekit_norm::add(&x, &o)?;
            let ln2 = moekit_norm::rmsnorm(&x2, &p[l.ffn_norm], eps, DType::BF16)?;
            let (out, ffn) = match l.ffn {
                FfnKind::Dense(fi) => {
                    let (y, fc) = ffn::dense_forward(c, &ln2.y, &b[fi.w1], &b[fi.w2])?;
                    (moekit_norm::add(&x2, &c.widen(&y)?)?, FfnCache::Dense(fc))
                }
                FfnKind::Moe { idx, moe_index } => {
                    let (routed, shared, mc) =
                        ffn::moe_forward(c, &rcfg, &dcfg, &moe_w(&idx, moe_index), &ln2.y, true)?;
                    let mc = mc.ok_or_else(|| Error::InvalidInput("MoE forward kept no cache".into()))?;
                    let mut out = moekit_norm::add(&x2, &c.widen(&routed)?)?;
                    if let Some(s) = shared {
                        out = moekit_norm::add(&out, &c.widen(&s)?)?;
                    }
                    (out, FfnCache::Moe(Box::new(mc)))
                }
            };
            caches.push(BlockCache { x, ln1, qkv, att, att_bf, x2, ln2, ffn });
            x = out;
        }
        let head_w = self.idx.lm_head.unwrap_or(self.idx.embed);
        let fin = moekit_norm::rmsnorm(&x, &p[self.idx.final_norm], eps, DType::BF16)?;
        let logits = c.widen(&c.linear(&fin.y, &b[head_w])?)?;
        let ce = moekit_logits::cross_entropy(&logits, targets)?;
        drop(logits);
        // ---- backward
        let mut grads: Vec<Option<Tensor>> = (0..p.len()).map(|_| None).collect();
        let dl = c.narrow(&ce.grad)?;
        let dhead = c.linear_dw(&dl, &fin.y)?.reshape(&[v, d])?;
        let dh = c.widen(&c.linear_dx(&dl, &b[head_w])?)?;
        drop(dl);
        let r = moekit_norm::rmsnorm_backward(&x, &p[self.idx.final_norm], &fin.inv_rms, &dh, None)?;
        grads[self.idx.final_norm] = Some(r.grad_weight);
        let mut dx = r.grad_x;
        let mut counts = Vec::new();
        for (l, cc) in self.idx.layers.iter().zip(caches).rev() {
            let dy = c.narrow(&dx)?;
            let dn2 = match (l.ffn, &cc.ffn) {
                (FfnKind::Dense(fi), FfnCache::Dense(fc)) => {
                    let (dxf, g1, g2) = ffn::dense_backward(c, &cc.ln2.y, &b[fi.w1], &b[fi.w2], fc, &dy)?;
                    grads[fi.w1] = Some(g1);
                    grads[fi.w2] = Some(g2);
                    c.widen(&dxf)?
                }
                (FfnKind::Moe { idx, moe_index }, FfnCache::Moe(mc)) => {
                    let alpha = cfg.moe.balance_loss_alpha;
                    let (dxm, g) = ffn::moe_backward(c, &rcfg, alpha, &moe_w(&idx, moe_index), &cc.ln2.y, mc, &dy)?;
                    grads[idx.router] = Some(g.router);
                    grads[idx.w1] = Some(g.w1);
                    grads[idx.w2] = Some(g.w2);
                    if let (Some(s), Some((g1, g2))) = (idx.shared, g.shared) {
                        grads[s.w1] = Some(g1);
                        grads[s.w2] = Some(g2);
                    }
                    dxm
                }
                _ => return Err(Error::InvalidInput("block cache does not match the model".into())),
            };
            drop(dy);
            let r2 = moekit_norm::rmsnorm_backward(&cc.x2, &p[l.ffn_norm], &cc.ln2.inv_rms, &dn2, Some(&dx))?;
            grads[l.ffn_norm] = Some(r2.grad_weight);
            let dx2 = r2.grad_x;
            let dob = c.narrow(&dx2)?;
            grads[l.wo] = Some(c.linear_dw(&dob, &cc.att_bf)?);
            let datt = c.widen(&c.linear_dx(&dob, &b[l.wo])?)?;
            let mut dqkv = moekit_attention::attention_backward(&cc.qkv, &cc.att.out, &cc.att.lse, &datt, &shape)?;
            drop(self.rope.apply_deferred(&mut dqkv, 2 * cfg.n_heads, &c.pos, true)?);
            let dqb = c.narrow(&dqkv)?;
            grads[l.wqkv] = Some(c.linear_dw(&dqb, &cc.ln1.y)?);
            let dn1 = c.widen(&c.linear_dx(&dqb, &b[l.wqkv])?)?;
            let r1 = moekit_norm::rmsnorm_backward(&cc.x, &p[l.attn_norm], &cc.ln1.inv_rms, &dn1, Some(&dx2))?;
            grads[l.attn_norm] = Some(r1.grad_weight);
            dx = r1.grad_x;
            if let FfnCache::Moe(mc) = cc.ffn {
                counts.push(mc.counts);
            }
        }
        counts.reverse();
        // Embedding: rows added in token order (deterministic); tied: onto the head's gradient
        // (the host model's order: head first, then the rows).
        let mut dembed = match self.idx.lm_head {
            Some(h) => {
                grads[h] = Some(dhead);
                Tensor::zeros(&[v, d], DType::F32, &self.device)?
            }
            None => dhead,
        };
        drop(moekit_norm::embedding_backward_into(ids, &dx, &mut dembed)?);
        grads[self.idx.embed] = Some(dembed);
        let grads = grads
            .into_iter()
            .enumerate()
            .map(|(i, g)| g.ok_or_else(|| Error::InvalidInput(format!("no gradient for {}", self.names[i]))))
            .collect::<Result<Vec<_>>>()?;
        Ok((ce.loss, grads, counts))
    }
}
