//! Top-k routing: softmax or DeepSeek-V3 group-limited sigmoid + bias ([`RouterConfig`]), and
//! router replay of given ids. The ids are not differentiable; the weights are, w.r.t. the
//! logits (through [`moekit_gating::route_backward`]); the bias never gets a gradient.

use crate::convert::{
    bad, expect_cpu, expect_dims, expect_dtype, expect_rank, ids_to_mt, mt_to_storage, mt_to_tensor, storage_to_mt,
    tensor_to_mt, wrap,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use moekit_gating::{reference, RouterConfig};

/// What [`route`] returns.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[T, k]` U32 expert ids, by descending selection score (not differentiable).
    pub topk_ids: Tensor,
    /// `[T, k]` F32 routing weights, differentiable w.r.t. the logits.
    pub topk_weights: Tensor,
    /// `[E]` I32 tokens routed to each expert (for [`moekit_gating::update_bias`]'s balancing).
    pub counts: Tensor,
}

fn check_logits(logits: &Tensor, cfg: &RouterConfig) -> Result<usize> {
    cfg.validate().map_err(wrap)?;
    expect_cpu("router logits", logits)?;
    expect_dtype("router logits", logits, &[DType::F32, DType::BF16])?;
    let d = expect_rank("router logits", logits, 2)?;
    if d[1] != cfg.experts {
        return bad(format!("router logits {d:?}, expected [T, {}]", cfg.experts));
    }
    Ok(d[0])
}

/// Routes the tokens of `logits [T, E]` (F32 or BF16, any layout) with an optional F32
/// selection `bias [E]` (it moves the choice, never the weights, and gets no gradient).
///
/// The ids, weights and counts are moekit's ([`moekit_gating::route`] on the CPU), bit for
/// bit. The weights come from a [`CustomOp2`] on `(logits, topk_ids)` that recomputes them
/// for the chosen ids ([`moekit_gating::reference::route_replay`], equal to the routing's
/// weights bit for bit by moekit's contract) and whose backward is
/// [`moekit_gating::route_backward`]: the gradient w.r.t. the logits is F32.
pub fn route(logits: &Tensor, bias: Option<&Tensor>, cfg: &RouterConfig) -> Result<Routing> {
    let tokens = check_logits(logits, cfg)?;
    let bias = match bias {
        Some(b) => {
            expect_cpu("router bias", b)?;
            expect_dtype("router bias", b, &[DType::F32])?;
            expect_dims("router bias", b, &[cfg.experts])?;
            Some(tensor_to_mt(&b.detach(), "router bias")?)
        }
        None => None,
    };
    let r =
        moekit_gating::route(&tensor_to_mt(&logits.detach(), "router logits")?, bias.as_ref(), cfg).map_err(wrap)?;
    let ids: Vec<u32> = r.topk_ids.to_vec::<i32>().map_err(wrap)?.iter().map(|&e| e as u32).collect();
    let topk_ids = Tensor::from_vec(ids, (tokens, cfg.top_k), logits.device())?;
    let topk_weights = replay_op(logits, &topk_ids, cfg)?;
    Ok(Routing { topk_ids, topk_weights, counts: mt_to_tensor(&r.counts)? })
}

/// Router replay: the weights `[T, k]` F32 of given `topk_ids [T, k]` (U32 or I32, in
/// `[0, E)`; recorded while sampling) instead of choosing them, differentiable w.r.t.
/// `logits [T, E]` (F32 or BF16). With the ids [`route`] chose, equal to its weights bit for
/// bit. An id outside `[0, E)` is an error.
pub fn route_replay(logits: &Tensor, topk_ids: &Tensor, cfg: &RouterConfig) -> Result<Tensor> {
    let tokens = check_logits(logits, cfg)?;
    expect_cpu("replayed topk_ids", topk_ids)?;
    expect_dtype("replayed topk_ids", topk_ids, &[DType::U32, DType::I32])?;
    expect_dims("replayed topk_ids", topk_ids, &[tokens, cfg.top_k])?;
    replay_op(logits, topk_ids, cfg)
}

fn replay_op(logits: &Tensor, ids: &Tensor, cfg: &RouterConfig) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(&ids.detach().contiguous()?, RouteWeights { cfg: *cfg })
}

/// `(logits [T, E], topk_ids [T, k]) -> weights [T, k]` F32; backward to the logits only.
struct RouteWeights {
    cfg: RouterConfig,
}

impl CustomOp2 for RouteWeights {
    fn name(&self) -> &'static str {
        "moekit-route-weights"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = storage_to_mt(s1, l1, "router logits")?;
        let ids = storage_to_mt(s2, l2, "topk_ids")?;
        let lf = logits_f32(&logits)?;
        let r = reference::route_replay(&lf, &ids.to_vec::<i32>().map_err(wrap)?, &self.cfg).map_err(wrap)?;
        Ok((CpuStorage::F32(r.weights), Shape::from_dims(ids.dims())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = moekit_gating::route_backward(
            &tensor_to_mt(logits, "router logits")?,
            &ids_to_mt(ids, "topk_ids")?,
            &tensor_to_mt(&grad.to_dtype(DType::F32)?, "grad of the routing weights")?,
            &self.cfg,
        )
        .map_err(wrap)?;
        // The gradient has the logits' dtype, as candle's backprop expects.
        Ok((Some(mt_to_tensor(&g)?.to_dtype(logits.dtype())?), None))
    }
}

/// The logits as f32 (BF16 widened exactly, as moekit's ops do).
fn logits_f32(t: &moekit_tensor::Tensor) -> Result<Vec<f32>> {
    let (s, _) = mt_to_storage(t)?;
    match s {
        CpuStorage::F32(v) => Ok(v),
        CpuStorage::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
        other => bad(format!("router logits of dtype {:?}", other.dtype())),
    }
}
