//! Router: top-k routing forward and backward (`moekit-gating`).

use crate::*;
use moekit_dtype::bf16;
use moekit_gating::{raw, reference, RouterConfig, ScoreFunc};

/// `softmax(u)` scores over all experts.
pub const MOEKIT_ROUTE_SOFTMAX: i32 = 0;
/// `sigmoid(u)` scores per expert (DeepSeek-V3).
pub const MOEKIT_ROUTE_SIGMOID: i32 = 1;

/// A router's configuration (see `moekit_gating::RouterConfig` for every rule: ties go to the
/// lower expert, NaN ranks last, groups by the sum of their two best biased scores).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MoekitRouterConfig {
    /// Experts E, 1..=512.
    pub experts: u32,
    /// Experts per token k, 1..=16.
    pub top_k: u32,
    /// `MOEKIT_ROUTE_SOFTMAX` or `MOEKIT_ROUTE_SIGMOID`.
    pub score_func: i32,
    /// Expert groups (dividing E); 1 = no group limit.
    pub n_groups: u32,
    /// Groups kept per token, 1..=n_groups.
    pub topk_groups: u32,
    /// 1: divide the chosen weights by their sum; 0: do not.
    pub renormalize: i32,
    /// Multiplies the final weights (finite).
    pub route_scale: f32,
}

fn router(cfg: *const MoekitRouterConfig) -> R<RouterConfig> {
    let c = by_ref("config", cfg)?;
    let score = match c.score_func {
        MOEKIT_ROUTE_SOFTMAX => ScoreFunc::Softmax,
        MOEKIT_ROUTE_SIGMOID => ScoreFunc::Sigmoid,
        s => return invalid(format!("score_func = {s} (0 = softmax, 1 = sigmoid)")),
    };
    let cfg = RouterConfig::new(c.experts as usize, c.top_k as usize, score)
        .with_groups(c.n_groups as usize, c.topk_groups as usize)
        .with_renormalize(flag("renormalize", c.renormalize)?)
        .with_route_scale(c.route_scale);
    cfg.validate()?;
    Ok(cfg)
}

/// Logits `[T, E]` in f32 or BF16.
enum Logits {
    F32(Buf<f32>),
    Bf16(Buf<bf16>),
}

impl Logits {
    fn new(dtype: i32, p: *const c_void, len: usize) -> R<Logits> {
        match dtype {
            MOEKIT_DTYPE_F32 => Ok(Logits::F32(input("logits", p.cast(), len)?)),
            MOEKIT_DTYPE_BF16 => Ok(Logits::Bf16(input("logits", p.cast(), len)?)),
            d => Err(Error::Dtype {
                what: "logits".into(),
                expected: "MOEKIT_DTYPE_F32 or MOEKIT_DTYPE_BF16".into(),
                got: format!("dtype {d}"),
            }
            .into()),
        }
    }
    fn dev<'a>(&self, x: &Exec) -> raw::Logits<'a> {
        match self {
            Logits::F32(b) => raw::Logits::F32(b.dev(x)),
            Logits::Bf16(b) => raw::Logits::BF16(b.dev(x)),
        }
    }
    /// f32 values on the host (as the tensor op's CPU path converts them).
    fn host(&self) -> Vec<f32> {
        match self {
            Logits::F32(b) => b.host().to_vec(),
            Logits::Bf16(b) => b.host().iter().map(|v| v.to_f32()).collect(),
        }
    }
    fn span(&self) -> Span {
        match self {
            Logits::F32(b) => b.span(),
            Logits::Bf16(b) => b.span(),
        }
    }
}

/// Routes `tokens` tokens: writes `topk_ids [T, k]` (int32, by descending selection score) and
/// `topk_weights [T, k]` (f32) from `logits [T, E]` (`logits_dtype`: `MOEKIT_DTYPE_F32` or
/// `MOEKIT_DTYPE_BF16`, row-major) and the optional selection `bias [E]` (f32, NULL: none), and
/// **adds** each token's choices to `counts [E]` (int32, NULL: not counted). Same ids and
/// bit-identical weights on every device.
///
/// # Safety
/// The C contract of this library (see the header): every pointer addresses the elements its
/// shape says, valid for the call (CUDA: until the stream has run it).
#[no_mangle]
pub unsafe extern "C" fn moekit_route(
    device: MoekitDevice,
    config: *const MoekitRouterConfig,
    logits_dtype: i32,
    logits: *const c_void,
    tokens: u64,
    bias: *const f32,
    topk_ids: *mut i32,
    topk_weights: *mut f32,
    counts: *mut i32,
) -> i32 {
    run(device, |x| {
        let cfg = router(config)?;
        let (e, k) = (cfg.experts as u64, cfg.top_k as u64);
        let logits = Logits::new(logits_dtype, logits, elems("logits", &[tokens, e])?)?;
        let bias = opt_input("bias", bias, e as usize)?;
        let ids = output("topk_ids", topk_ids, elems("topk_ids", &[tokens, k])?)?;
        let weights = output("topk_weights", topk_weights, elems("topk_weights", &[tokens, k])?)?;
        let counts = opt_output("counts", counts, e as usize)?;
        let mut spans = vec![logits.span(), ids.span(), weights.span()];
        spans.extend(bias.iter().map(Buf::span).chain(counts.iter().map(Buf::span)));
        disjoint(&spans)?;
        raw::route(
            x.launcher(),
            &cfg,
            logits.dev(x),
            bias.as_ref().map(|b| b.dev(x)),
            ids.dev_mut(x),
            weights.dev_mut(x),
            counts.as_ref().map(|c| c.dev_mut(x)),
        )?;
        if x.is_cpu() {
            let r = reference::route(&logits.host(), bias.as_ref().map(|b| b.host()), &cfg)?;
            ids.host_mut().copy_from_slice(&r.ids);
            weights.host_mut().copy_from_slice(&r.weights);
            if let Some(c) = &counts {
                for (c, n) in c.host_mut().iter_mut().zip(&r.counts) {
                    *c = c.wrapping_add(*n);
                }
            }
        }
        Ok(())
    })
}

/// Gradient w.r.t. the logits: writes every element of `grad_logits [T, E]` (f32) from the
/// forward's `logits [T, E]` (`logits_dtype`), `topk_ids [T, k]` (int32; ids outside `[0, E)`
/// contribute nothing) and `grad_weights [T, k]` (f32).
///
/// # Safety
/// As for [`moekit_route`].
#[no_mangle]
pub unsafe extern "C" fn moekit_route_backward(
    device: MoekitDevice,
    config: *const MoekitRouterConfig,
    logits_dtype: i32,
    logits: *const c_void,
    tokens: u64,
    topk_ids: *const i32,
    grad_weights: *const f32,
    grad_logits: *mut f32,
) -> i32 {
    run(device, |x| {
        let cfg = router(config)?;
        let (e, k) = (cfg.experts as u64, cfg.top_k as u64);
        let logits = Logits::new(logits_dtype, logits, elems("logits", &[tokens, e])?)?;
        let ids = input("topk_ids", topk_ids, elems("topk_ids", &[tokens, k])?)?;
        let gw = input("grad_weights", grad_weights, elems("grad_weights", &[tokens, k])?)?;
        let gl = output("grad_logits", grad_logits, elems("grad_logits", &[tokens, e])?)?;
        disjoint(&[logits.span(), ids.span(), gw.span(), gl.span()])?;
        raw::route_backward(x.launcher(), &cfg, logits.dev(x), ids.dev(x), gw.dev(x), gl.dev_mut(x))?;
        if x.is_cpu() {
            let g = reference::route_backward(&logits.host(), ids.host(), gw.host(), &cfg)?;
            gl.host_mut().copy_from_slice(&g);
        }
        Ok(())
    })
}
