//! Model configuration: TOML (serde) with defaults for a ~1M-parameter toy model, presets
//! that mirror real models' MoE shapes scaled down, and a validation whose every error names
//! the field, the value and what is allowed.

use crate::{Error, Result};
use moekit_gating::{RouterConfig, ScoreFunc};
use serde::{Deserialize, Serialize};

/// Router score function (TOML: `"sigmoid"` or `"softmax"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// `sigmoid(u)` + selection bias (DeepSeek-V3).
    Sigmoid,
    /// `softmax(u)` over all experts (Mixtral, Qwen3-MoE, DeepSeek-V2).
    Softmax,
}

/// Arithmetic of the routed experts' GEMMs (TOML: `"f32"`, `"bf16"`, `"fp8"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 on the host (the fast CPU path).
    F32,
    /// BF16 operands, f32 accumulation: moekit's grouped GEMM kernels (or their CPU reference).
    Bf16,
    /// FP8 E4M3 forward GEMMs (1x128 activation scales, 128x128 weight blocks, as
    /// DeepSeek-V3), BF16 backward.
    Fp8,
}

/// The MoE feed-forward layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Routed experts E.
    pub experts: usize,
    /// Experts per token k.
    pub top_k: usize,
    /// Shared experts, each `expert_dim` wide, always applied (0 = none).
    pub shared_experts: usize,
    /// Hidden width of one expert's SwiGLU (I).
    pub expert_dim: usize,
    /// Router scores.
    pub score: Score,
    /// Expert groups for group-limited routing (1 = none).
    pub n_groups: usize,
    /// Groups kept per token.
    pub topk_groups: usize,
    /// Renormalise the chosen weights to sum to 1.
    pub renormalize: bool,
    /// Multiplier of the routing weights.
    pub route_scale: f32,
    /// Auxiliary-loss-free bias update rate gamma (0 = no bias update; sigmoid routers only
    /// use a bias).
    pub bias_update_rate: f32,
    /// Sequence-wise balance loss coefficient alpha (0 = off).
    pub balance_loss_alpha: f32,
    /// Routed experts' GEMM arithmetic.
    pub precision: Precision,
    /// Row alignment of each expert's segment in the dispatched layout (1, 16, 32, 64, 128).
    pub align: usize,
}

impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            experts: 8,
            top_k: 2,
            shared_experts: 1,
            expert_dim: 64,
            score: Score::Sigmoid,
            n_groups: 2,
            topk_groups: 1,
            renormalize: true,
            route_scale: 1.0,
            bias_update_rate: 1e-3,
            balance_loss_alpha: 0.0,
            precision: Precision::F32,
            align: 1,
        }
    }
}

/// The transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Model width D.
    pub d_model: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Attention heads (head dim = D / heads, even for RoPE).
    pub n_heads: usize,
    /// Longest sequence (positions of RoPE and the KV cache).
    pub max_seq_len: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// LM head shares the token embedding.
    pub tie_embeddings: bool,
    /// The first blocks use a dense SwiGLU FFN instead of MoE (DeepSeek-V3: 3).
    pub first_dense_layers: usize,
    /// Hidden width of the dense FFN.
    pub dense_ffn_dim: usize,
    /// Standard deviation of the normal initialisation of matrices.
    pub init_std: f32,
    /// The MoE layers.
    pub moe: MoeConfig,
}

impl Default for ModelConfig {
    /// About 1.03M parameters: vocabulary of 10 digits + 6 specials, D = 128, 4 blocks (the
    /// first dense), 4 heads, 8 routed experts top-2 of width 64 in 2 groups, 1 shared expert.
    fn default() -> Self {
        ModelConfig {
            vocab_size: 16,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            max_seq_len: 32,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            first_dense_layers: 1,
            dense_ffn_dim: 256,
            init_std: 0.02,
            moe: MoeConfig::default(),
        }
    }
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &["default", "deepseek-v3-mini", "qwen3-moe-mini", "mixtral-mini"];

fn bad(field: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> Error {
    Error::Config { field: field.into(), value: value.to_string(), allowed: allowed.into() }
}

impl ModelConfig {
    /// A preset by name (see [`PRESETS`]): the default toy model, or a real model's MoE shape
    /// scaled down (same routing rule, same ratios of experts, top-k, groups and shared experts).
    pub fn preset(name: &str) -> Result<Self> {
        let base = ModelConfig::default();
        let cfg = match name {
            "default" => base,
            // DeepSeek-V3: 256 experts top-8 in 8 groups keep 4, 1 shared, sigmoid + bias,
            // route scale 2.5, first 3 of 61 blocks dense. Here: 32 top-4, 8 groups keep 4.
            "deepseek-v3-mini" => ModelConfig {
                n_layers: 4,
                first_dense_layers: 1,
                moe: MoeConfig {
                    experts: 32,
                    top_k: 4,
                    shared_experts: 1,
                    expert_dim: 32,
                    score: Score::Sigmoid,
                    n_groups: 8,
                    topk_groups: 4,
                    renormalize: true,
                    route_scale: 2.5,
                    ..MoeConfig::default()
                },
                ..base
            },
            // Qwen3-30B-A3B: 128 experts top-8, softmax renormalised, no shared expert, no dense
            // block. Here: 16 top-4.
            "qwen3-moe-mini" => ModelConfig {
                first_dense_layers: 0,
                tie_embeddings: false,
                moe: MoeConfig {
                    experts: 16,
                    top_k: 4,
                    shared_experts: 0,
                    expert_dim: 32,
                    score: Score::Softmax,
                    n_groups: 1,
                    topk_groups: 1,
                    renormalize: true,
                    route_scale: 1.0,
                    bias_update_rate: 0.0,
                    ..MoeConfig::default()
                },
                ..base
            },
            // Mixtral 8x7B: 8 experts top-2, softmax over the chosen two, no shared expert.
            "mixtral-mini" => ModelConfig {
                first_dense_layers: 0,
                tie_embeddings: false,
                moe: MoeConfig {
                    experts: 8,
                    top_k: 2,
                    shared_experts: 0,
                    expert_dim: 128,
                    score: Score::Softmax,
                    n_groups: 1,
                    topk_groups: 1,
                    renormalize: true,
                    route_scale: 1.0,
                    bias_update_rate: 0.0,
                    ..MoeConfig::default()
                },
                ..base
            },
            other => return Err(bad("preset", other, format!("one of {}", PRESETS.join(", ")))),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML (every field optional; unknown fields are errors) and validates it.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: ModelConfig = toml::from_str(text).map_err(|e| Error::ConfigParse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Head dimension D / heads.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Whether block `layer` has an MoE feed-forward.
    pub fn is_moe(&self, layer: usize) -> bool {
        layer >= self.first_dense_layers
    }

    /// The router configuration of the MoE layers.
    pub fn router(&self) -> RouterConfig {
        let m = &self.moe;
        let score = match m.score {
            Score::Sigmoid => ScoreFunc::Sigmoid,
            Score::Softmax => ScoreFunc::Softmax,
        };
        RouterConfig::new(m.experts, m.top_k, score)
            .with_groups(m.n_groups, m.topk_groups)
            .with_renormalize(m.renormalize)
            .with_route_scale(m.route_scale)
    }

    /// Whether the routers keep a selection bias (sigmoid scores with a bias update rate).
    pub fn uses_router_bias(&self) -> bool {
        self.moe.score == Score::Sigmoid && self.moe.bias_update_rate > 0.0
    }

    /// Checks every constraint; the error names the first field broken, its value and what
    /// is allowed.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &str, v: usize| if v == 0 { Err(bad(field, v, "at least 1")) } else { Ok(()) };
        positive("vocab_size", self.vocab_size)?;
        if self.vocab_size > i32::MAX as usize {
            return Err(bad("vocab_size", self.vocab_size, "at most 2^31 - 1"));
        }
        positive("d_model", self.d_model)?;
        positive("n_layers", self.n_layers)?;
        positive("n_heads", self.n_heads)?;
        positive("max_seq_len", self.max_seq_len)?;
        if self.d_model % self.n_heads != 0 {
            return Err(bad("n_heads", self.n_heads, format!("a divisor of d_model = {}", self.d_model)));
        }
        if self.head_dim() % 2 != 0 {
            return Err(bad("n_heads", self.n_heads, "one giving an even head dimension d_model / n_heads (RoPE)"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(bad("rope_theta", self.rope_theta, "a finite number > 1"));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(bad("norm_eps", self.norm_eps, "a finite number > 0"));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(bad("init_std", self.init_std, "a finite number > 0"));
        }
        if self.first_dense_layers > self.n_layers {
            return Err(bad("first_dense_layers", self.first_dense_layers, format!("0..={}", self.n_layers)));
        }
        if self.first_dense_layers > 0 {
            positive("dense_ffn_dim", self.dense_ffn_dim)?;
        }
        if self.first_dense_layers < self.n_layers {
            self.validate_moe()?;
        }
        Ok(())
    }

    fn validate_moe(&self) -> Result<()> {
        let m = &self.moe;
        let positive = |field: &str, v: usize| if v == 0 { Err(bad(field, v, "at least 1")) } else { Ok(()) };
        positive("moe.experts", m.experts)?;
        if m.experts > moekit_gating::MAX_EXPERTS {
            return Err(bad("moe.experts", m.experts, format!("1..={}", moekit_gating::MAX_EXPERTS)));
        }
        positive("moe.expert_dim", m.expert_dim)?;
        if m.top_k == 0 || m.top_k > m.experts || m.top_k > moekit_gating::MAX_TOP_K {
            return Err(bad(
                "moe.top_k",
                m.top_k,
                format!("1..={} (at most moe.experts = {})", moekit_gating::MAX_TOP_K.min(m.experts), m.experts),
            ));
        }
        if m.n_groups == 0 || m.experts % m.n_groups != 0 {
            return Err(bad("moe.n_groups", m.n_groups, format!("a divisor of moe.experts = {}", m.experts)));
        }
        if m.topk_groups == 0 || m.topk_groups > m.n_groups {
            return Err(bad("moe.topk_groups", m.topk_groups, format!("1..=moe.n_groups = {}", m.n_groups)));
        }
        let reachable = m.topk_groups * (m.experts / m.n_groups);
        if m.top_k > reachable {
            return Err(bad(
                "moe.top_k",
                m.top_k,
                format!("at most the {reachable} experts of the moe.topk_groups = {} kept groups", m.topk_groups),
            ));
        }
        if !m.route_scale.is_finite() || m.route_scale <= 0.0 {
            return Err(bad("moe.route_scale", m.route_scale, "a finite number > 0"));
        }
        if !m.bias_update_rate.is_finite() || m.bias_update_rate < 0.0 {
            return Err(bad("moe.bias_update_rate", m.bias_update_rate, "a finite number >= 0"));
        }
        if !m.balance_loss_alpha.is_finite() || m.balance_loss_alpha < 0.0 {
            return Err(bad("moe.balance_loss_alpha", m.balance_loss_alpha, "a finite number >= 0"));
        }
        if !moekit_dispatch::ALIGNMENTS.contains(&m.align) {
            return Err(bad("moe.align", m.align, "one of 1, 16, 32, 64, 128"));
        }
        let (need, why) = match m.precision {
            Precision::F32 => (1, ""),
            Precision::Bf16 => (8, "with precision = \"bf16\" (16-byte rows for the kernels)"),
            Precision::Fp8 => (128, "with precision = \"fp8\" (1x128 and 128x128 scale blocks)"),
        };
        if self.d_model % need != 0 {
            return Err(bad("d_model", self.d_model, format!("a multiple of {need} {why}")));
        }
        if m.expert_dim % need != 0 {
            return Err(bad("moe.expert_dim", m.expert_dim, format!("a multiple of {need} {why}")));
        }
        Ok(())
    }

    /// Parameter count (weights only; router biases are buffers).
    pub fn num_params(&self) -> usize {
        crate::params::layout(self).iter().map(|(_, shape)| shape.iter().product::<usize>()).sum()
    }
}
