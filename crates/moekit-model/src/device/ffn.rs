//! The feed-forward layers on the device: the dense SwiGLU FFN (also the shared experts) and
//! the MoE layer (router GEMM, `moekit-gating` routing, `moekit-dispatch` layout / permute /
//! SwiGLU / combine, the experts' grouped GEMMs), forward beside backward, every tensor on
//! the device and nothing read back (the layout is made with the host-known row bound
//! `moekit_dispatch::max_rows`, so its check is never needed).

use super::linear::Consts;
use crate::Result;
use moekit_dispatch::{ActFormat, DispatchConfig, DispatchLayout, Padding};
use moekit_gating::RouterConfig;
use moekit_gemm::{BlockFp8, GemmInput};
use moekit_tensor::Tensor;

/// What the dense FFN's backward needs: `h [N, 2F]` and `a [N, F]`, BF16.
#[derive(Debug)]
pub(crate) struct DenseCache {
    h: Tensor,
    a: Tensor,
}

/// Dense SwiGLU: `x [N, D]` BF16, `w1 [2F, D]`, `w2 [D, F]` BF16 -> `[N, D]` BF16.
pub(crate) fn dense_forward(c: &Consts, x: &Tensor, w1: &Tensor, w2: &Tensor) -> Result<(Tensor, DenseCache)> {
    let h = c.linear(x, w1)?;
    let a = moekit_dispatch::swiglu(&h, ActFormat::Bf16)?.data;
    let y = c.linear(&a, w2)?;
    Ok((y, DenseCache { h, a }))
}

/// Backward of [`dense_forward`] from `dy [N, D]` BF16: `(dx [N, D] BF16, dw1, dw2 F32)`.
pub(crate) fn dense_backward(
    c: &Consts,
    x: &Tensor,
    w1: &Tensor,
    w2: &Tensor,
    cache: &DenseCache,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dw2 = c.linear_dw(dy, &cache.a)?;
    let da = c.linear_dx(dy, w2)?;
    let dh = moekit_dispatch::swiglu_backward(&cache.h, &da)?;
    let dw1 = c.linear_dw(&dh, x)?;
    let dx = c.linear_dx(&dh, w1)?;
    Ok((dx, dw1, dw2))
}

/// One MoE layer's weights on the device (BF16 copies) and its router bias (F32); with
/// `precision = "fp8"` also the experts' FP8 weights (128 x 128 blocks, quantized from the F32
/// masters after every update), which the forward's expert GEMMs take.
pub(crate) struct MoeWeights<'a> {
    pub router: &'a Tensor,
    pub w1: &'a Tensor,
    pub w2: &'a Tensor,
    pub fp8: Option<&'a (BlockFp8, BlockFp8)>,
    pub shared: Option<(&'a Tensor, &'a Tensor)>,
    pub bias: Option<&'a Tensor>,
}

/// What the MoE backward needs.
#[derive(Debug)]
pub(crate) struct MoeCache {
    /// Router logits `[N, E]` BF16.
    logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    /// Tokens per expert `[E]` I32 (the bias update's input).
    pub counts: Tensor,
    layout: DispatchLayout,
    xp: Tensor,
    h: Tensor,
    act: Tensor,
    y: Tensor,
    shared: Option<DenseCache>,
}

/// Gradients of one MoE layer, F32 in the parameters' shapes.
pub(crate) struct MoeGrads {
    pub router: Tensor,
    pub w1: Tensor,
    pub w2: Tensor,
    pub shared: Option<(Tensor, Tensor)>,
}

/// The GEMM operand of FP8 weights (block scales: the layout field is not read).
fn fp8_weights(q: &BlockFp8) -> GemmInput<'_> {
    GemmInput::Fp8 { data: &q.codes, scales: &q.scales, layout: moekit_gemm::ScaleLayout::RowMajor }
}

/// MoE forward of `x [N, D]` BF16: `(routed [N, D] BF16, shared [N, D] BF16 or None, cache)`,
/// the cache only with `train`. FP8 (as the host model's kernel backend): the gate/up GEMM takes
/// the tokens permuted with the fused 1x128 quantization, the down GEMM the SwiGLU output
/// quantized the same way; the BF16 permuted tokens and activation, which only the BF16
/// backward reads, are made only with `train` (not when sampling).
pub(crate) fn moe_forward(
    c: &Consts,
    rcfg: &RouterConfig,
    dcfg: &DispatchConfig,
    w: &MoeWeights<'_>,
    x: &Tensor,
    train: bool,
) -> Result<(Tensor, Option<Tensor>, Option<MoeCache>)> {
    use moekit_gemm::m_grouped_contiguous;
    let logits = c.linear(x, w.router)?;
    let r = moekit_gating::route(&logits, w.bias, rcfg)?;
    let layout = moekit_dispatch::dispatch_layout(&r.topk_ids, dcfg, None)?;
    let bf16_xp = || Ok::<_, crate::Error>(moekit_dispatch::permute(x, &layout, ActFormat::Bf16)?.data);
    let (h, xp) = match w.fp8 {
        Some((w1q, _)) => {
            let xq = moekit_dispatch::permute(x, &layout, ActFormat::FP8)?;
            let h = m_grouped_contiguous((&xq).into(), fp8_weights(w1q), &layout.m_indices)?;
            (h, if train { Some(bf16_xp()?) } else { None })
        }
        None => {
            let xp = bf16_xp()?;
            (m_grouped_contiguous(GemmInput::Bf16(&xp), GemmInput::Bf16(w.w1), &layout.m_indices)?, Some(xp))
        }
    };
    let bf16_act = || Ok::<_, crate::Error>(moekit_dispatch::swiglu(&h, ActFormat::Bf16)?.data);
    let (y, act) = match w.fp8 {
        Some((_, w2q)) => {
            let aq = moekit_dispatch::swiglu(&h, ActFormat::FP8)?;
            let y = m_grouped_contiguous((&aq).into(), fp8_weights(w2q), &layout.m_indices)?;
            (y, if train { Some(bf16_act()?) } else { None })
        }
        None => {
            let act = bf16_act()?;
            (m_grouped_contiguous(GemmInput::Bf16(&act), GemmInput::Bf16(w.w2), &layout.m_indices)?, Some(act))
        }
    };
    let routed = moekit_dispatch::combine(&y, &layout, Some(&r.topk_weights))?;
    let (shared_out, shared) = match w.shared {
        Some((s1, s2)) => {
            let (o, sc) = dense_forward(c, x, s1, s2)?;
            (Some(o), Some(sc))
        }
        None => (None, None),
    };
    let cache = match (train, xp, act) {
        (true, Some(xp), Some(act)) => Some(MoeCache {
            logits,
            ids: r.topk_ids,
            weights: r.topk_weights,
            counts: r.counts,
            layout,
            xp,
            h,
            act,
            y,
            shared,
        }),
        _ => None,
    };
    Ok((routed, shared_out, cache))
}

/// MoE backward from `dy [N, D]` BF16: the input gradient as F32 `[N, D]` (routed experts +
/// shared experts + router, each widened and added in that order) and the gradients. With
/// `balance_alpha > 0` the router's logit gradient also takes the sequence-wise balance loss's
/// (its mean over the batch's sequences, added after the routing weights' part, as the host
/// model does); the loss value itself is not computed (the step reports the cross-entropy).
pub(crate) fn moe_backward(
    c: &Consts,
    rcfg: &RouterConfig,
    balance_alpha: f32,
    w: &MoeWeights<'_>,
    x: &Tensor,
    cache: &MoeCache,
    dy: &Tensor,
) -> Result<(Tensor, MoeGrads)> {
    use moekit_gemm::{dgrad, k_grouped};
    let l = &cache.layout;
    let (gy, gw) = moekit_dispatch::combine_backward(&cache.y, dy, l, Some(&cache.weights))?;
    let gw = gw.ok_or_else(|| crate::Error::InvalidInput("combine backward gave no weight gradient".into()))?;
    let dw2 = k_grouped(GemmInput::Bf16(&gy), GemmInput::Bf16(&cache.act), &l.offsets)?;
    let dact = dgrad(GemmInput::Bf16(&gy), GemmInput::Bf16(w.w2), &l.m_indices)?;
    let dh = moekit_dispatch::swiglu_backward(&cache.h, &dact)?;
    let dw1 = k_grouped(GemmInput::Bf16(&dh), GemmInput::Bf16(&cache.xp), &l.offsets)?;
    let dxp = dgrad(GemmInput::Bf16(&dh), GemmInput::Bf16(w.w1), &l.m_indices)?;
    let mut dx = c.widen(&moekit_dispatch::combine(&dxp, l, None)?)?;
    let shared = match (w.shared, &cache.shared) {
        (Some((s1, s2)), Some(sc)) => {
            let (dxs, g1, g2) = dense_backward(c, x, s1, s2, sc, dy)?;
            dx = moekit_norm::add(&dx, &c.widen(&dxs)?)?;
            Some((g1, g2))
        }
        _ => None,
    };
    // The router: through the routing weights (the choice has no gradient).
    let mut dlogits = moekit_gating::route_backward(&cache.logits, &cache.ids, &gw, rcfg)?;
    if balance_alpha > 0.0 {
        let db =
            moekit_gating::balance_loss_backward(&cache.logits, &cache.ids, &c.seq_mean, rcfg, c.seq, balance_alpha)?;
        dlogits = moekit_norm::add(&dlogits, &db)?;
    }
    let dl = c.narrow(&dlogits)?;
    let router = c.linear_dw(&dl, x)?;
    dx = moekit_norm::add(&dx, &c.widen(&c.linear_dx(&dl, w.router)?)?)?;
    Ok((dx, MoeGrads { router, w1: dw1, w2: dw2, shared }))
}

/// The dispatch configuration of the model's MoE layers (as `moe.rs`).
pub(crate) fn dispatch_config(cfg: &crate::ModelConfig) -> DispatchConfig {
    DispatchConfig::new(cfg.moe.experts, cfg.moe.top_k).with_align(cfg.moe.align).with_padding(Padding::Zero)
}
