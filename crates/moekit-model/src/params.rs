//! The parameters: named f32 tensors in one fixed order (the order of [`layout`]), so the
//! optimizer, the gradient norm and checkpoints all walk them the same way.
//!
//! Linear weights are `[out, in]` (`y = x W^T`). A SwiGLU FFN's first matrix stacks the gate
//! rows over the up rows (`[2F, D]`), attention stacks query, key and value rows
//! (`wqkv [3D, D]`); an MoE layer's experts are `w1 [E, 2I, D]` and
//! `w2 [E, D, I]`, the layout of moekit's grouped GEMM.

use crate::config::ModelConfig;
use crate::rng::Rng;

/// Indices of one SwiGLU FFN's matrices in [`Params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FfnIdx {
    /// `[2F, D]`: gate rows, then up rows.
    pub w1: usize,
    /// `[D, F]`.
    pub w2: usize,
}

/// Indices of an MoE layer's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeIdx {
    /// Router `[E, D]`.
    pub router: usize,
    /// Experts' first matrices `[E, 2I, D]`.
    pub w1: usize,
    /// Experts' second matrices `[E, D, I]`.
    pub w2: usize,
    /// Shared experts as one SwiGLU of width `shared * I`.
    pub shared: Option<FfnIdx>,
}

/// A block's feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    /// Dense SwiGLU.
    Dense(FfnIdx),
    /// Mixture of experts; `moe_index` counts MoE layers from 0.
    Moe {
        /// Parameter indices.
        idx: MoeIdx,
        /// Which MoE layer this is.
        moe_index: usize,
    },
}

/// Indices of one block's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerIdx {
    /// RMSNorm gain before attention `[D]`.
    pub attn_norm: usize,
    /// Query, key and value projections stacked, `[3D, D]` (one product for all three).
    pub wqkv: usize,
    /// Output projection.
    pub wo: usize,
    /// RMSNorm gain before the FFN `[D]`.
    pub ffn_norm: usize,
    /// The FFN.
    pub ffn: FfnKind,
}

/// Indices of every parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// Token embedding `[V, D]`.
    pub embed: usize,
    /// Blocks.
    pub layers: Vec<LayerIdx>,
    /// Final RMSNorm gain `[D]`.
    pub final_norm: usize,
    /// Untied LM head `[V, D]` (None: the embedding is used).
    pub lm_head: Option<usize>,
}

/// Names and shapes of every parameter, in order.
pub fn layout(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    build(cfg).0
}

/// The index of [`layout`].
pub fn index(cfg: &ModelConfig) -> Index {
    build(cfg).1
}

fn build(cfg: &ModelConfig) -> (Vec<(String, Vec<usize>)>, Index) {
    let (v, d) = (cfg.vocab_size, cfg.d_model);
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>| {
        out.push((name, shape));
        out.len() - 1
    };
    let embed = push("embed".into(), vec![v, d]);
    let mut layers = Vec::new();
    let mut moe_index = 0;
    for l in 0..cfg.n_layers {
        let p = format!("layers.{l}");
        let attn_norm = push(format!("{p}.attn_norm"), vec![d]);
        let wqkv = push(format!("{p}.attn.wqkv"), vec![3 * d, d]);
        let wo = push(format!("{p}.attn.wo"), vec![d, d]);
        let ffn_norm = push(format!("{p}.ffn_norm"), vec![d]);
        let ffn = if cfg.is_moe(l) {
            let m = &cfg.moe;
            let router = push(format!("{p}.moe.router"), vec![m.experts, d]);
            let w1 = push(format!("{p}.moe.w1"), vec![m.experts, 2 * m.expert_dim, d]);
            let w2 = push(format!("{p}.moe.w2"), vec![m.experts, d, m.expert_dim]);
            let shared = (m.shared_experts > 0).then(|| {
                let f = m.shared_experts * m.expert_dim;
                FfnIdx {
                    w1: push(format!("{p}.moe.shared.w1"), vec![2 * f, d]),
                    w2: push(format!("{p}.moe.shared.w2"), vec![d, f]),
                }
            });
            moe_index += 1;
            FfnKind::Moe { idx: MoeIdx { router, w1, w2, shared }, moe_index: moe_index - 1 }
        } else {
            let f = cfg.dense_ffn_dim;
            FfnKind::Dense(FfnIdx {
                w1: push(format!("{p}.ffn.w1"), vec![2 * f, d]),
                w2: push(format!("{p}.ffn.w2"), vec![d, f]),
            })
        };
        layers.push(LayerIdx { attn_norm, wqkv, wo, ffn_norm, ffn });
    }
    let final_norm = push("final_norm".into(), vec![d]);
    let lm_head = (!cfg.tie_embeddings).then(|| push("lm_head".into(), vec![v, d]));
    (out, Index { embed, layers, final_norm, lm_head })
}

/// Named f32 tensors (parameters, or gradients / optimizer moments of the same layout).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Names, as in [`layout`].
    pub names: Vec<String>,
    /// Shapes.
    pub shapes: Vec<Vec<usize>>,
    /// Values, row-major.
    pub data: Vec<Vec<f32>>,
}

impl Params {
    /// Zeros in the model's layout.
    pub fn zeros(cfg: &ModelConfig) -> Self {
        let (names, shapes): (Vec<_>, Vec<_>) = layout(cfg).into_iter().unzip();
        let data = shapes.iter().map(|s| vec![0.0; s.iter().product()]).collect();
        Params { names, shapes, data }
    }

    /// Zeros of the same layout as `self`.
    pub fn zeros_like(&self) -> Self {
        Params {
            names: self.names.clone(),
            shapes: self.shapes.clone(),
            data: self.data.iter().map(|d| vec![0.0; d.len()]).collect(),
        }
    }

    /// The initial parameters: norm gains 1, matrices normal with `init_std`, output
    /// projections (attention `wo`, every FFN's second matrix) scaled by `1 / sqrt(2 L)`.
    pub fn init(cfg: &ModelConfig, rng: &mut Rng) -> Self {
        let mut p = Params::zeros(cfg);
        let out_scale = 1.0 / (2.0 * cfg.n_layers as f32).sqrt();
        for (name, data) in p.names.iter().zip(p.data.iter_mut()) {
            if name.ends_with("norm") {
                data.fill(1.0);
                continue;
            }
            let is_out = name.ends_with(".wo") || name.ends_with(".w2");
            let std = cfg.init_std * if is_out { out_scale } else { 1.0 };
            for x in data.iter_mut() {
                *x = rng.normal() * std;
            }
        }
        p
    }

    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.data.iter().map(Vec::len).sum()
    }

    /// Sets every value to zero.
    pub fn fill_zero(&mut self) {
        for d in &mut self.data {
            d.fill(0.0);
        }
    }

    /// Whether parameter `i` gets weight decay (matrices; not norm gains).
    pub fn decays(&self, i: usize) -> bool {
        self.shapes[i].len() >= 2
    }
}
