//! The causal MoE transformer: embedding, blocks of (RMSNorm, RoPE attention, RMSNorm, dense
//! or MoE SwiGLU FFN) with residuals, final RMSNorm, LM head (tied or not). Forward keeps what
//! the explicit backward needs; the same block code serves training (keys of the call itself)
//! and incremental decoding (keys of a [`KvCache`]).

use crate::config::ModelConfig;
use crate::layers::{self, attention, attention_backward, ffn, ffn_backward, rmsnorm, Keys, Rope};
use crate::linalg::{add_assign, matmul_nt, matmul_tn, nn, nt};
use crate::moe::{self, Experts, MoeCache, MoeGrads, MoeWeights};
use crate::params::{FfnKind, Index, LayerIdx, Params};
use crate::rng::Rng;
use crate::{Error, Result};
use moekit_gating::reference::Routing;

/// The model: configuration, parameters, router biases and where the experts run.
#[derive(Debug, Clone)]
pub struct Model {
    /// The configuration (validated).
    pub cfg: ModelConfig,
    /// Parameters in [`crate::params::layout`] order.
    pub params: Params,
    /// Selection bias `[E]` of each MoE layer (not trained by gradients; see
    /// [`Model::update_router_bias`]).
    pub router_bias: Vec<Vec<f32>>,
    idx: Index,
    rope: Rope,
    experts: Experts,
}

/// A block's cached activations.
#[derive(Debug)]
struct LayerCache {
    x: Vec<f32>,
    n1: Vec<f32>,
    inv1: Vec<f32>,
    /// `[N, 3D]` queries, keys (both after RoPE) and values.
    qkv: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    x2: Vec<f32>,
    n2: Vec<f32>,
    inv2: Vec<f32>,
    ffn: FfnCache,
}

#[derive(Debug)]
enum FfnCache {
    Dense(layers::FfnCache),
    Moe(Box<MoeCache>),
}

/// The result of [`Model::forward`]: logits and everything the backward needs.
#[derive(Debug)]
pub struct Forward {
    /// `[batch * seq, V]` logits.
    pub logits: Vec<f32>,
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
    tokens: Vec<u32>,
    layers: Vec<LayerCache>,
    final_in: Vec<f32>,
    final_out: Vec<f32>,
    final_inv: Vec<f32>,
}

impl Forward {
    /// Each MoE layer's routing (ids and weights `[batch * seq, k]`, counts `[E]`).
    pub fn routing(&self) -> Vec<&Routing> {
        self.layers
            .iter()
            .filter_map(|l| match &l.ffn {
                FfnCache::Moe(c) => Some(&c.routing),
                FfnCache::Dense(_) => None,
            })
            .collect()
    }
    /// Each MoE layer's chosen ids `[batch * seq, k]` (what router replay takes).
    pub fn routing_ids(&self) -> Vec<Vec<i32>> {
        self.routing().into_iter().map(|r| r.ids.clone()).collect()
    }
    /// Each MoE layer's router logits `[batch * seq, E]`.
    pub fn router_logits(&self) -> Vec<&[f32]> {
        self.layers
            .iter()
            .filter_map(|l| match &l.ffn {
                FfnCache::Moe(c) => Some(c.logits.as_slice()),
                FfnCache::Dense(_) => None,
            })
            .collect()
    }
    /// Sum over MoE layers of the sequence-wise balance loss (0 when disabled); the backward
    /// includes its gradient.
    pub fn aux_loss(&self) -> f32 {
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                FfnCache::Moe(c) => c.aux_loss,
                FfnCache::Dense(_) => 0.0,
            })
            .sum()
    }
}

/// Keys and values of every block for incremental decoding: `[B, H, max_len, hd]` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    batch: usize,
    max_len: usize,
    len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// Disjoint mutable views of parameters `idx` (distinct).
fn many_mut<'a>(data: &'a mut [Vec<f32>], idx: &[usize]) -> Vec<&'a mut [f32]> {
    let mut slots: Vec<Option<&'a mut Vec<f32>>> = data.iter_mut().map(Some).collect();
    idx.iter().map(|&i| slots[i].take().map(|v| v.as_mut_slice()).unwrap_or_default()).collect()
}

impl Model {
    /// A freshly initialised model (parameters from `seed`), experts on the host in f32 or on
    /// the CPU references in the configured BF16/FP8.
    pub fn new(cfg: ModelConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let params = Params::init(&cfg, &mut Rng::new(seed));
        let bias = vec![vec![0.0; cfg.moe.experts]; cfg.n_layers - cfg.first_dense_layers];
        Self::from_parts(cfg, params, bias)
    }

    /// A model from saved parts; shapes are checked against the configuration.
    pub fn from_parts(cfg: ModelConfig, params: Params, router_bias: Vec<Vec<f32>>) -> Result<Self> {
        cfg.validate()?;
        let want = Params::zeros(&cfg);
        if params.names != want.names || params.shapes != want.shapes {
            return Err(Error::InvalidInput("parameters do not match the configuration's layout".into()));
        }
        if let Some((i, d)) = params.data.iter().enumerate().find(|(i, d)| d.len() != want.data[*i].len()) {
            return Err(Error::InvalidInput(format!("parameter {} has {} values", params.names[i], d.len())));
        }
        let n_moe = cfg.n_layers - cfg.first_dense_layers;
        if router_bias.len() != n_moe || router_bias.iter().any(|b| b.len() != cfg.moe.experts) {
            return Err(Error::InvalidInput(format!("router biases: expected {n_moe} of {}", cfg.moe.experts)));
        }
        let idx = crate::params::index(&cfg);
        let rope = Rope::new(cfg.head_dim(), cfg.max_seq_len, cfg.rope_theta);
        let experts = Experts::for_precision(cfg.moe.precision, &moekit_tensor::Device::Cpu);
        Ok(Model { cfg, params, router_bias, idx, rope, experts })
    }

    /// Where the routed experts run.
    pub fn experts(&self) -> &Experts {
        &self.experts
    }

    /// Runs the routed experts on `experts` (e.g. the kernels on `Device::Emulated` or a
    /// GPU). The configuration's precision must allow it: BF16 needs `d_model` and
    /// `expert_dim` multiples of 8, FP8 of 128; the precision is updated to the backend's.
    pub fn set_experts(&mut self, experts: Experts) -> Result<()> {
        let mut cfg = self.cfg.clone();
        cfg.moe.precision = match &experts {
            Experts::Host => crate::config::Precision::F32,
            Experts::Kernels { precision, .. } => *precision,
        };
        cfg.validate()?;
        if cfg.moe.precision == crate::config::Precision::F32 && !matches!(experts, Experts::Host) {
            return Err(Error::Config {
                field: "moe.precision".into(),
                value: "f32".into(),
                allowed: "bf16 or fp8 for the kernels (f32 runs on the host)".into(),
            });
        }
        self.cfg = cfg;
        self.experts = experts;
        Ok(())
    }

    /// Parameter indices.
    pub fn index(&self) -> &Index {
        &self.idx
    }

    fn p(&self, i: usize) -> &[f32] {
        &self.params.data[i]
    }

    fn head_w(&self) -> usize {
        self.idx.lm_head.unwrap_or(self.idx.embed)
    }

    fn moe_weights(&self, idx: &crate::params::MoeIdx, moe_index: usize) -> MoeWeights<'_> {
        MoeWeights {
            router: self.p(idx.router),
            w1: self.p(idx.w1),
            w2: self.p(idx.w2),
            shared: idx.shared.map(|s| (self.p(s.w1), self.p(s.w2))),
            bias: self.cfg.uses_router_bias().then(|| self.router_bias[moe_index].as_slice()),
        }
    }

    fn check_tokens(&self, tokens: &[u32], batch: usize, seq: usize, start: usize) -> Result<()> {
        if batch == 0 || seq == 0 || tokens.len() != batch * seq {
            return Err(Error::InvalidInput(format!(
                "{} tokens are not {batch} sequences of {seq} (both must be positive)",
                tokens.len()
            )));
        }
        if start + seq > self.cfg.max_seq_len {
            return Err(Error::InvalidInput(format!(
                "positions up to {} exceed max_seq_len = {}",
                start + seq,
                self.cfg.max_seq_len
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidInput(format!("token {t} outside the vocabulary of {}", self.cfg.vocab_size)));
        }
        Ok(())
    }

    /// One block over `x [batch * s, D]` at positions `start..start + s`, attending to the
    /// call's own keys (training, `kv = None`, `start = 0`) or to a KV cache (`[B, H, l, hd]`
    /// keys and values; positions `start..start + s` are written here). `replay`:
    /// this block's ids if it is MoE. Returns the output and the cache.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        l: &LayerIdx,
        x: Vec<f32>,
        (batch, s, start): (usize, usize, usize),
        kv: Option<(&mut [f32], &mut [f32], usize)>,
        replay: Option<&[i32]>,
    ) -> Result<(Vec<f32>, LayerCache)> {
        let cfg = &self.cfg;
        let (d, heads, hd) = (cfg.d_model, cfg.n_heads, cfg.head_dim());
        let rows = batch * s;
        let (n1, inv1) = rmsnorm(&x, self.p(l.attn_norm), d, cfg.norm_eps);
        let mut qkv = nt(&n1, self.p(l.wqkv), rows, 3 * d, d);
        self.rope.apply(&mut qkv, (3 * d, 2 * d), |r| start + r % s, false);
        let (attn, probs) = match kv {
            Some((kc, vc, len)) => {
                for bi in 0..batch {
                    for i in 0..s {
                        for h in 0..heads {
                            let src = (bi * s + i) * 3 * d + h * hd;
                            let dst = ((bi * heads + h) * len + start + i) * hd;
                            kc[dst..][..hd].copy_from_slice(&qkv[src + d..][..hd]);
                            vc[dst..][..hd].copy_from_slice(&qkv[src + 2 * d..][..hd]);
                        }
                    }
                }
                attention(&qkv, Keys::Cache { k: kc, v: vc, len, start }, (heads, hd, s))
            }
            None => attention(&qkv, Keys::Own, (heads, hd, s)),
        };
        let mut x2 = x.clone();
        matmul_nt(&attn, self.p(l.wo), rows, d, d, &mut x2, true);
        let (n2, inv2) = rmsnorm(&x2, self.p(l.ffn_norm), d, cfg.norm_eps);
        let (f, ffn_cache) = match l.ffn {
            FfnKind::Dense(fi) => {
                let (y, c) = ffn(&n2, self.p(fi.w1), self.p(fi.w2), d, cfg.dense_ffn_dim);
                (y, FfnCache::Dense(c))
            }
            FfnKind::Moe { idx, moe_index } => {
                let (y, c) = moe::forward(&self.experts, cfg, &self.moe_weights(&idx, moe_index), &n2, s, replay)?;
                (y, FfnCache::Moe(Box::new(c)))
            }
        };
        let mut out = x2.clone();
        add_assign(&mut out, &f);
        let cache = LayerCache { x, n1, inv1, qkv, probs, attn, x2, n2, inv2, ffn: ffn_cache };
        Ok((out, cache))
    }

    fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.cfg.d_model;
        let e = self.p(self.idx.embed);
        let mut x = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            x.extend_from_slice(&e[t as usize * d..][..d]);
        }
        x
    }

    fn head(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (d, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let (h, inv) = rmsnorm(x, self.p(self.idx.final_norm), d, self.cfg.norm_eps);
        let rows = x.len() / d;
        (nt(&h, self.p(self.head_w()), rows, v, d), h, inv)
    }

    fn check_replay(&self, replay: Option<&[Vec<i32>]>, rows: usize) -> Result<()> {
        if let Some(r) = replay {
            let n_moe = self.router_bias.len();
            let want = rows * self.cfg.moe.top_k;
            if r.len() != n_moe || r.iter().any(|ids| ids.len() != want) {
                return Err(Error::InvalidInput(format!(
                    "router replay: expected {n_moe} MoE layers of {want} ids ([tokens, top_k])"
                )));
            }
        }
        Ok(())
    }

    /// Training forward of `tokens [batch, seq]` (positions from 0). `replay`: per MoE layer
    /// the ids `[batch * seq, k]` to route by (router replay) instead of choosing.
    pub fn forward(&self, tokens: &[u32], batch: usize, seq: usize, replay: Option<&[Vec<i32>]>) -> Result<Forward> {
        self.check_tokens(tokens, batch, seq, 0)?;
        self.check_replay(replay, batch * seq)?;
        let mut x = self.embed(tokens);
        let mut caches = Vec::with_capacity(self.cfg.n_layers);
        for l in &self.idx.layers {
            let rep = match (replay, l.ffn) {
                (Some(r), FfnKind::Moe { moe_index, .. }) => Some(r[moe_index].as_slice()),
                _ => None,
            };
            let (out, cache) = self.block(l, x, (batch, seq, 0), None, rep)?;
            x = out;
            caches.push(cache);
        }
        let (logits, final_out, final_inv) = self.head(&x);
        Ok(Forward { logits, batch, seq, tokens: tokens.to_vec(), layers: caches, final_in: x, final_out, final_inv })
    }

    /// Gradients of `sum(dlogits * logits)` w.r.t. every parameter (plus the balance loss's,
    /// when enabled), in a fresh [`Params`].
    pub fn backward(&self, fwd: &Forward, dlogits: &[f32]) -> Result<Params> {
        let mut grads = self.params.zeros_like();
        self.backward_into(fwd, dlogits, &mut grads)?;
        Ok(grads)
    }

    /// As [`Model::backward`], adding into `grads` (gradient accumulation).
    pub fn backward_into(&self, fwd: &Forward, dlogits: &[f32], grads: &mut Params) -> Result<()> {
        let cfg = &self.cfg;
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let rows = fwd.batch * fwd.seq;
        if dlogits.len() != rows * v || fwd.layers.len() != cfg.n_layers {
            return Err(Error::InvalidInput(format!("dlogits: {} values, expected {}", dlogits.len(), rows * v)));
        }
        if grads.shapes != self.params.shapes {
            return Err(Error::InvalidInput("gradient buffers do not match the parameters".into()));
        }
        let (heads, hd, s) = (cfg.n_heads, cfg.head_dim(), fwd.seq);
        // LM head and final norm.
        matmul_tn(dlogits, &fwd.final_out, v, d, rows, &mut grads.data[self.head_w()], true);
        let dh = nn(dlogits, self.p(self.head_w()), rows, d, v);
        let mut dx = layers::rmsnorm_backward(
            &fwd.final_in,
            self.p(self.idx.final_norm),
            &fwd.final_inv,
            &dh,
            d,
            &mut grads.data[self.idx.final_norm],
        );
        for (l, c) in self.idx.layers.iter().zip(&fwd.layers).rev() {
            // FFN.
            let dn2 = match (&l.ffn, &c.ffn) {
                (FfnKind::Dense(fi), FfnCache::Dense(fc)) => {
                    let g = many_mut(&mut grads.data, &[fi.w1, fi.w2]);
                    let [g1, g2]: [&mut [f32]; 2] = g.try_into().map_err(|_| Error::InvalidInput("grads".into()))?;
                    ffn_backward(&c.n2, self.p(fi.w1), self.p(fi.w2), fc, &dx, d, cfg.dense_ffn_dim, g1, g2)
                }
                (FfnKind::Moe { idx, moe_index }, FfnCache::Moe(mc)) => {
                    let mut list = vec![idx.router, idx.w1, idx.w2];
                    if let Some(sh) = idx.shared {
                        list.extend([sh.w1, sh.w2]);
                    }
                    let mut g = many_mut(&mut grads.data, &list).into_iter();
                    let (router, w1, w2) =
                        (g.next().unwrap_or_default(), g.next().unwrap_or_default(), g.next().unwrap_or_default());
                    let shared = match (g.next(), g.next()) {
                        (Some(a), Some(b2)) => Some((a, b2)),
                        _ => None,
                    };
                    let mg = MoeGrads { router, w1, w2, shared };
                    moe::backward(&self.experts, cfg, &self.moe_weights(idx, *moe_index), &c.n2, mc, &dx, mg)?.0
                }
                _ => return Err(Error::InvalidInput("forward cache does not match the model".into())),
            };
            let dx2_norm =
                layers::rmsnorm_backward(&c.x2, self.p(l.ffn_norm), &c.inv2, &dn2, d, &mut grads.data[l.ffn_norm]);
            let mut dx2 = dx;
            add_assign(&mut dx2, &dx2_norm);
            // Attention.
            matmul_tn(&dx2, &c.attn, d, d, rows, &mut grads.data[l.wo], true);
            let dattn = nn(&dx2, self.p(l.wo), rows, d, d);
            let mut dqkv = attention_backward(&c.qkv, &c.probs, &dattn, (heads, hd, s));
            self.rope.apply(&mut dqkv, (3 * d, 2 * d), |r| r % s, true);
            matmul_tn(&dqkv, &c.n1, 3 * d, d, rows, &mut grads.data[l.wqkv], true);
            let dn1 = nn(&dqkv, self.p(l.wqkv), rows, d, 3 * d);
            let dx_norm =
                layers::rmsnorm_backward(&c.x, self.p(l.attn_norm), &c.inv1, &dn1, d, &mut grads.data[l.attn_norm]);
            dx = dx2;
            add_assign(&mut dx, &dx_norm);
        }
        // Embedding (rows in token order: deterministic).
        let ge = &mut grads.data[self.idx.embed];
        for (r, &t) in fwd.tokens.iter().enumerate() {
            add_assign(&mut ge[t as usize * d..][..d], &dx[r * d..][..d]);
        }
        Ok(())
    }

    /// Auxiliary-loss-free balancing: each MoE layer's bias moves by `bias_update_rate` against
    /// its load (`counts[e]` = tokens routed to expert e in the step). A no-op without a bias.
    pub fn update_router_bias(&mut self, counts: &[Vec<i32>]) -> Result<()> {
        if !self.cfg.uses_router_bias() {
            return Ok(());
        }
        if counts.len() != self.router_bias.len() {
            return Err(Error::InvalidInput(format!(
                "{} count vectors for {} MoE layers",
                counts.len(),
                self.router_bias.len()
            )));
        }
        for (b, c) in self.router_bias.iter_mut().zip(counts) {
            moekit_gating::reference::update_bias(b, c, self.cfg.moe.bias_update_rate)?;
        }
        Ok(())
    }

    /// An empty KV cache for `batch` sequences of up to `max_len` positions (at most
    /// `max_seq_len`).
    pub fn kv_cache(&self, batch: usize, max_len: usize) -> Result<KvCache> {
        if batch == 0 || max_len == 0 || max_len > self.cfg.max_seq_len {
            return Err(Error::InvalidInput(format!(
                "KV cache of {batch} x {max_len}: both positive, length at most max_seq_len = {}",
                self.cfg.max_seq_len
            )));
        }
        let n = batch * self.cfg.n_heads * max_len * self.cfg.head_dim();
        Ok(KvCache {
            batch,
            max_len,
            len: 0,
            k: vec![vec![0.0; n]; self.cfg.n_layers],
            v: vec![vec![0.0; n]; self.cfg.n_layers],
        })
    }

    /// Incremental forward of `tokens [B, s]` at the next `s` positions of `kv`. Returns the
    /// logits `[B * s, V]` and each MoE layer's ids `[B * s, k]`.
    pub fn forward_step(&self, tokens: &[u32], kv: &mut KvCache) -> Result<(Vec<f32>, Vec<Vec<i32>>)> {
        let batch = kv.batch;
        let s = tokens.len() / batch.max(1);
        self.check_tokens(tokens, batch, s, kv.len)?;
        if kv.len + s > kv.max_len {
            return Err(Error::InvalidInput(format!("KV cache full: {} + {s} > {}", kv.len, kv.max_len)));
        }
        let mut x = self.embed(tokens);
        let mut ids = Vec::new();
        for (li, l) in self.idx.layers.iter().enumerate() {
            let (out, cache) =
                self.block(l, x, (batch, s, kv.len), Some((&mut kv.k[li], &mut kv.v[li], kv.max_len)), None)?;
            if let FfnCache::Moe(c) = cache.ffn {
                ids.push(c.routing.ids);
            }
            x = out;
        }
        kv.len += s;
        Ok((self.head(&x).0, ids))
    }
}
