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
    if let Some(b) = bias {
        expect_cpu("router bias", b)?;
        expect_dtype("router bias", b, &[DType::F32])?;
        expect_dims("router bias", b, &[cfg.experts])?;
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cuda::route(logits, bias, cfg, tokens);
    }
    let bias = match bias {
        Some(b) => Some(tensor_to_mt(&b.detach(), "router bias")?),
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
/// bit. An id outside `[0, E)` is an error (on CUDA tensors the ids are read back once to
/// check them; the weights come from moekit's replay kernel, `moekit_gating::raw::route_replay`).
pub fn route_replay(logits: &Tensor, topk_ids: &Tensor, cfg: &RouterConfig) -> Result<Tensor> {
    let tokens = check_logits(logits, cfg)?;
    expect_cpu("replayed topk_ids", topk_ids)?;
    expect_dtype("replayed topk_ids", topk_ids, &[DType::U32, DType::I32])?;
    expect_dims("replayed topk_ids", topk_ids, &[tokens, cfg.top_k])?;
    if !logits.device().same_device(topk_ids.device()) {
        return bad("replayed topk_ids and the router logits are on different devices".into());
    }
    if logits.device().is_cuda() {
        let ids = topk_ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        if let Some(bad_id) = ids.into_iter().find(|&e| e < 0 || e >= cfg.experts as i64) {
            return bad(format!("replayed expert id {bad_id} outside [0, {})", cfg.experts));
        }
    }
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::replay(&self.cfg, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let g = grad.to_dtype(DType::F32)?.contiguous()?;
            let gl = logits.contiguous()?.apply_op3_no_bwd(ids, &g, &cuda::RouteBwd { cfg: self.cfg })?;
            return Ok((Some(gl.to_dtype(logits.dtype())?), None));
        }
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

/// The CUDA path of [`route`]: moekit's routing kernel (`moekit_gating::raw::route`) writes
/// the ids, weights and counts in one launch; its backward is `raw::route_backward`.
#[cfg(feature = "cuda")]
mod cuda {
    use crate::convert::{bad, wrap};
    use crate::cuda::{cuda_of, same_device, take_side, to_tensor, Exec, Side};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::SyncOnDrop;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
    use moekit_gating::raw::{self, Logits};
    use moekit_gating::RouterConfig;
    use std::sync::{Arc, OnceLock};

    pub(super) fn route(
        logits: &Tensor,
        bias: Option<&Tensor>,
        cfg: &RouterConfig,
        tokens: usize,
    ) -> Result<super::Routing> {
        let bias = match bias {
            Some(b) => {
                same_device("router bias", b, logits)?;
                Some(b.detach().contiguous()?)
            }
            None => None,
        };
        let side = Side::default();
        let ids = Arc::new(OnceLock::new());
        let op = RouteCuda { cfg: *cfg, bias, side: side.clone(), ids: ids.clone() };
        let topk_weights = logits.contiguous()?.apply_op1(op)?;
        let mut out = take_side(&side, 2)?.into_iter();
        let (id_s, count_s) = match (out.next(), out.next()) {
            (Some(a), Some(b)) => (a, b),
            _ => return bad("internal: routing side outputs".into()),
        };
        let topk_ids = to_tensor(id_s, &[tokens, cfg.top_k]);
        let counts = to_tensor(count_s, &[cfg.experts]);
        // The backward pass reads the ids the forward chose.
        let _ = ids.set(topk_ids.clone());
        Ok(super::Routing { topk_ids, topk_weights, counts })
    }

    /// The device view of F32 or BF16 logits.
    fn logits_view<'a>(x: &'a Exec, s: &'a CudaStorage, l: &Layout) -> Result<(Logits<'a>, SyncOnDrop<'a>)> {
        match s.dtype() {
            DType::F32 => x.input::<f32>(s, l, "router logits").map(|(p, g)| (Logits::F32(p), g)),
            DType::BF16 => x.input::<moekit_dtype::bf16>(s, l, "router logits").map(|(p, g)| (Logits::BF16(p), g)),
            d => bad(format!("router logits of dtype {d:?}")),
        }
    }

    /// `logits [T, E] -> weights [T, k]` F32, with the ids `[T, k]` U32 and counts `[E]` I32
    /// as side outputs; backward to the logits only.
    struct RouteCuda {
        cfg: RouterConfig,
        bias: Option<Tensor>,
        side: Side,
        ids: Arc<OnceLock<Tensor>>,
    }

    impl CustomOp1 for RouteCuda {
        fn name(&self) -> &'static str {
            "moekit-route-cuda"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bad("internal: the CUDA routing op got a CPU tensor".into())
        }
        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let cfg = &self.cfg;
            let tokens = l.dims()[0];
            let x = Exec::new(&s.device)?;
            let (logits, _gl) = logits_view(&x, s, l)?;
            let bias_sl = self.bias.as_ref().map(|b| b.storage_and_layout());
            let bias = match &bias_sl {
                Some((st, bl)) => Some(x.input::<f32>(cuda_of(st, "router bias")?, bl, "router bias")?),
                None => None,
            };
            // raw::route writes every id and weight; it adds to the counts (zeroed here).
            let mut ids = x.uninit::<u32>(tokens * cfg.top_k)?;
            let mut weights = x.uninit::<f32>(tokens * cfg.top_k)?;
            let mut counts = x.zeros::<i32>(cfg.experts)?;
            {
                let (ip, _gi) = x.output::<u32, i32>(&mut ids)?;
                let (wp, _gw) = x.output::<f32, f32>(&mut weights)?;
                let (cp, _gc) = x.output::<i32, i32>(&mut counts)?;
                raw::route(x.on(), cfg, logits, bias.as_ref().map(|b| b.0), ip, wp, Some(cp)).map_err(wrap)?;
            }
            let mut side = self.side.lock().unwrap_or_else(|p| p.into_inner());
            *side = vec![x.storage(ids), x.storage(counts)];
            Ok((x.storage(weights), Shape::from_dims(&[tokens, cfg.top_k])))
        }
        fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let Some(ids) = self.ids.get() else {
                return bad("internal: routing backward before the forward's ids were kept".into());
            };
            let g = grad.to_dtype(DType::F32)?.contiguous()?;
            let gl = logits.contiguous()?.apply_op3_no_bwd(ids, &g, &RouteBwd { cfg: self.cfg })?;
            Ok(Some(gl.to_dtype(logits.dtype())?))
        }
    }

    /// The CUDA forward of the replay op: `(logits [T, E], topk_ids [T, k]) -> weights [T, k]`
    /// F32 by `raw::route_replay` (ids checked in range by [`super::route_replay`]).
    pub(super) fn replay(
        cfg: &RouterConfig,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let tokens = l1.dims()[0];
        let x = Exec::new(&s1.device)?;
        let (logits, _gl) = logits_view(&x, s1, l1)?;
        let (ids, _gi) = x.input::<i32>(s2, l2, "replayed topk_ids")?;
        // raw::route_replay writes every weight.
        let mut weights = x.uninit::<f32>(tokens * cfg.top_k)?;
        {
            let (wp, _gw) = x.output::<f32, f32>(&mut weights)?;
            raw::route_replay(x.on(), cfg, logits, ids, wp, None).map_err(wrap)?;
        }
        Ok((x.storage(weights), Shape::from_dims(&[tokens, cfg.top_k])))
    }

    /// `(logits [T, E], topk_ids [T, k], grad_weights [T, k] F32) -> grad_logits [T, E]` F32.
    pub(super) struct RouteBwd {
        pub(super) cfg: RouterConfig,
    }

    impl CustomOp3 for RouteBwd {
        fn name(&self) -> &'static str {
            "moekit-route-backward"
        }
        crate::cuda::cuda_only_cpu_fwd3!();
        #[allow(clippy::too_many_arguments)]
        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let x = Exec::new(&s1.device)?;
            let (logits, _gl) = logits_view(&x, s1, l1)?;
            let (ids, _gi) = x.input::<i32>(s2, l2, "topk_ids")?;
            let (gw, _gg) = x.input::<f32>(s3, l3, "grad of the routing weights")?;
            // raw::route_backward writes every element of grad_logits.
            let mut out = x.uninit::<f32>(l1.shape().elem_count())?;
            {
                let (gp, _go) = x.output::<f32, f32>(&mut out)?;
                raw::route_backward(x.on(), &self.cfg, logits, ids, gw, gp).map_err(wrap)?;
            }
            Ok((x.storage(out), l1.shape().clone()))
        }
    }
}
