//! The routed experts of an MoE layer, with the call shape of mistral.rs's `MoeExperts`:
//! `forward(xs, topk_weights, topk_ids)`.

use crate::convert::{bad, expect_cpu, expect_dtype, expect_rank};
use crate::{combine, dispatch_layout, grouped_gemm_contiguous, permute, swiglu};
use candle_core::{DType, Result, Tensor, D};
use moekit_dispatch::DispatchConfig;

/// SwiGLU experts `y = down(silu(gate(x)) * up(x))` on moekit's kernels: dispatch, grouped
/// GEMM (gate and up fused), SwiGLU, grouped GEMM (down), weighted combine. Differentiable
/// w.r.t. the input, both weight tensors and the routing weights.
///
/// Weights are candle's (and mistral.rs's) `[E, out, in]`, BF16:
/// - `gate_up [E, 2 I, H]`: rows `0..I` the gate projection, rows `I..2 I` the up projection
///   (see [`MoeExperts::from_gate_up`] for separate tensors);
/// - `down [E, H, I]`.
///
/// `H` and `I` must be multiples of 8.
#[derive(Debug, Clone)]
pub struct MoeExperts {
    gate_up: Tensor,
    down: Tensor,
    config: DispatchConfig,
}

impl MoeExperts {
    /// Experts from the fused `gate_up [E, 2 I, H]` and `down [E, H, I]` (BF16), routing
    /// `top_k` experts per token; segments aligned to 128 rows (DeepGEMM's layout; see
    /// [`MoeExperts::with_align`]).
    pub fn new(gate_up: Tensor, down: Tensor, top_k: usize) -> Result<Self> {
        for (what, t) in [("gate_up", &gate_up), ("down", &down)] {
            expect_cpu(what, t)?;
            expect_dtype(what, t, &[DType::BF16])?;
            expect_rank(what, t, 3)?;
        }
        let (e, two_i, h) = gate_up.dims3()?;
        if two_i % 2 != 0 || down.dims() != [e, h, two_i / 2] {
            return bad(format!(
                "gate_up {:?} and down {:?}: expected [E, 2 I, H] and [E, H, I]",
                gate_up.dims(),
                down.dims()
            ));
        }
        let config = DispatchConfig::new(e, top_k);
        config.validate().map_err(crate::convert::wrap)?;
        Ok(MoeExperts { gate_up, down, config })
    }

    /// Experts from separate `gate [E, I, H]`, `up [E, I, H]` and `down [E, H, I]` (BF16); the
    /// gate and up weights are concatenated (gate first) into one tensor, so gradients reach
    /// `gate` and `up` through candle's `cat`.
    pub fn from_gate_up(gate: &Tensor, up: &Tensor, down: Tensor, top_k: usize) -> Result<Self> {
        if gate.dims() != up.dims() {
            return bad(format!("gate {:?} and up {:?} differ", gate.dims(), up.dims()));
        }
        Self::new(Tensor::cat(&[gate, up], 1)?, down, top_k)
    }

    /// Segment alignment of the dispatch layout (1, 16, 32, 64 or 128 rows).
    pub fn with_align(mut self, align: usize) -> Result<Self> {
        self.config = self.config.with_align(align);
        self.config.validate().map_err(crate::convert::wrap)?;
        Ok(self)
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.config.experts
    }

    /// `xs [..., H]` (BF16, or F32/F16 computed in BF16), `topk_weights [T, k]` (any float
    /// dtype, used as F32), `topk_ids [T, k]` U32 or I32 (`u32::MAX` / `-1`: slot not
    /// routed), `T` the product of `xs`'s leading dims. Returns `sum_j w[t, j] expert_j(x[t])`
    /// with `xs`'s shape and dtype.
    pub fn forward(&self, xs: &Tensor, topk_weights: &Tensor, topk_ids: &Tensor) -> Result<Tensor> {
        let h = xs.dim(D::Minus1)?;
        if h != self.gate_up.dims()[2] {
            return bad(format!("xs {:?}: hidden size {h}, the experts take {}", xs.dims(), self.gate_up.dims()[2]));
        }
        let x = xs.reshape(((), h))?.to_dtype(DType::BF16)?;
        let layout = dispatch_layout(topk_ids, &self.config)?;
        let rows = permute(&x, &layout)?;
        let gate_up = grouped_gemm_contiguous(&rows, &self.gate_up, &layout.m_indices)?;
        let act = swiglu(&gate_up)?;
        let y = grouped_gemm_contiguous(&act, &self.down, &layout.m_indices)?;
        let out = combine(&y, &topk_weights.to_dtype(DType::F32)?, &layout)?;
        out.to_dtype(xs.dtype())?.reshape(xs.dims())
    }
}
