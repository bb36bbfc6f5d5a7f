//! The MoE feed-forward layer as DeepSeek-V3 builds it, forward beside backward:
//!
//! ```text
//! logits = x Wr^T                          [N, E]   host f32
//! ids, w = route(logits, bias) | replay    [N, k]   moekit-gating (reference or kernel: same bits)
//! routed = combine_w(W2 . swiglu(W1 . dispatch(x)))   the expert backend
//! out    = routed + shared_ffn(x)          [N, D]
//! ```
//!
//! The layer is written once; the routed experts run on an [`Experts`] backend:
//! - [`Experts::Host`]: f32 on the CPU, the dispatch layout of `moekit-dispatch`'s reference
//!   (stable, by token then slot), one `matrixmultiply` product per expert segment, experts in
//!   parallel;
//! - [`Experts::Kernels`]: moekit's tensor ops on a [`Device`] (`Cpu`: their references,
//!   `Emulated`: the kernels in the host emulation, `Cuda`: the kernels), BF16 or FP8
//!   (1x128 activations, 128x128 weight blocks) forward GEMMs, BF16 backward, f32 weight
//!   gradients from the k-grouped GEMM.
//!
//! Backward gives the input gradient and adds to the router, expert and shared-expert
//! gradients; the router gradient flows through the routing weights (the choice itself has
//! none), plus the sequence-wise balance loss when enabled.

use crate::config::{ModelConfig, Precision};
use crate::layers::{ffn, ffn_backward, par_new, swiglu, swiglu_backward, FfnCache};
use crate::linalg::{add_assign, matmul_nn, matmul_nt, matmul_tn, nn, nt};
use crate::{Error, Result};
use moekit_dispatch::{reference as dref, ActFormat, DispatchConfig, DispatchLayout, Padding};
use moekit_dtype::bf16;
use moekit_gating::reference::{self as gref, Routing};
use moekit_gating::RouterConfig;
use moekit_gemm::GemmInput;
use moekit_tensor::{DType, Device, Tensor};
use rayon::prelude::*;

/// Where the routed experts run.
#[derive(Debug, Clone)]
pub enum Experts {
    /// f32 on the host (fast CPU path).
    Host,
    /// moekit's kernels (or their references on `Device::Cpu`) in BF16 or FP8.
    Kernels {
        /// Where the tensors live.
        device: Device,
        /// BF16 or FP8 forward GEMMs.
        precision: Precision,
    },
}

impl Experts {
    /// The backend for `precision`: [`Experts::Host`] for F32, else the kernels on `device`.
    pub fn for_precision(precision: Precision, device: &Device) -> Self {
        match precision {
            Precision::F32 => Experts::Host,
            p => Experts::Kernels { device: device.clone(), precision: p },
        }
    }
}

/// One MoE layer's weights (shapes in [`crate::params`]).
#[derive(Debug, Clone, Copy)]
pub struct MoeWeights<'a> {
    /// `[E, D]`.
    pub router: &'a [f32],
    /// `[E, 2I, D]`.
    pub w1: &'a [f32],
    /// `[E, D, I]`.
    pub w2: &'a [f32],
    /// Shared experts `([2S, D], [D, S])`, `S = shared_experts * I`.
    pub shared: Option<(&'a [f32], &'a [f32])>,
    /// Selection bias `[E]` (sigmoid routers).
    pub bias: Option<&'a [f32]>,
}

/// Gradient buffers of one MoE layer, added to.
#[derive(Debug)]
pub struct MoeGrads<'a> {
    /// `[E, D]`.
    pub router: &'a mut [f32],
    /// `[E, 2I, D]`.
    pub w1: &'a mut [f32],
    /// `[E, D, I]`.
    pub w2: &'a mut [f32],
    /// Shared experts.
    pub shared: Option<(&'a mut [f32], &'a mut [f32])>,
}

/// What the backward needs, plus the routing (for replay and metrics).
#[derive(Debug)]
pub struct MoeCache {
    /// Router logits `[N, E]`.
    pub logits: Vec<f32>,
    /// Ids `[N, k]`, weights `[N, k]`, counts `[E]`.
    pub routing: Routing,
    /// Sequence-wise balance loss (mean over sequences), 0 when disabled.
    pub aux_loss: f32,
    seq_len: usize,
    experts: ExpertCache,
    shared: Option<FfnCache>,
}

#[derive(Debug)]
enum ExpertCache {
    Host(Box<HostCache>),
    Kernels(Box<KernelCache>),
}

#[derive(Debug)]
struct HostCache {
    layout: dref::Layout,
    /// The (token, slot) pair `t * k + j` of each dispatched row, -1 for padding.
    pairs: Vec<i32>,
    xp: Vec<f32>,
    h: Vec<f32>,
    a: Vec<f32>,
    y: Vec<f32>,
}

#[derive(Debug)]
struct KernelCache {
    layout: DispatchLayout,
    weights: Tensor,
    xp: Tensor,
    h: Tensor,
    act: Tensor,
    y: Tensor,
    w1: Tensor,
    w2: Tensor,
}

/// Sizes of a layer call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    d: usize,
    e: usize,
    k: usize,
    i: usize,
}

fn dims(cfg: &ModelConfig, x: &[f32]) -> Dims {
    let d = cfg.d_model;
    Dims { n: x.len() / d, d, e: cfg.moe.experts, k: cfg.moe.top_k, i: cfg.moe.expert_dim }
}

fn dispatch_config(cfg: &ModelConfig) -> DispatchConfig {
    DispatchConfig::new(cfg.moe.experts, cfg.moe.top_k).with_align(cfg.moe.align).with_padding(Padding::Zero)
}

/// Forward of `x [N, D]` (N = sequences x `seq_len`). `replay`: ids `[N, k]` to use instead of
/// choosing (router replay); the weights are still computed from the logits.
pub fn forward(
    experts: &Experts,
    cfg: &ModelConfig,
    w: &MoeWeights<'_>,
    x: &[f32],
    seq_len: usize,
    replay: Option<&[i32]>,
) -> Result<(Vec<f32>, MoeCache)> {
    let dm = dims(cfg, x);
    let logits = nt(x, w.router, dm.n, dm.e, dm.d);
    forward_from_logits(experts, cfg, w, x, logits, seq_len, replay)
}

/// [`forward`] after the router projection: `logits [N, E]` given (`w.router` is not used).
/// With [`backward`]'s second result this exposes the gradient w.r.t. the router logits.
pub fn forward_from_logits(
    experts: &Experts,
    cfg: &ModelConfig,
    w: &MoeWeights<'_>,
    x: &[f32],
    logits: Vec<f32>,
    seq_len: usize,
    replay: Option<&[i32]>,
) -> Result<(Vec<f32>, MoeCache)> {
    let dm = dims(cfg, x);
    let rcfg = cfg.router();
    if logits.len() != dm.n * dm.e || x.len() != dm.n * dm.d || seq_len == 0 || dm.n % seq_len != 0 {
        return Err(Error::InvalidInput(format!(
            "MoE layer: x of {} values, logits of {}, seq_len {seq_len}: expected [N, {}], [N, {}], N a multiple of seq_len",
            x.len(),
            logits.len(),
            dm.d,
            dm.e
        )));
    }
    let routing = match replay {
        Some(ids) => gref::route_replay(&logits, ids, &rcfg)?,
        None => route(experts, &logits, w.bias, &rcfg)?,
    };
    let aux_loss = if cfg.moe.balance_loss_alpha > 0.0 {
        let per_seq = gref::balance_loss(&logits, &routing.ids, &rcfg, seq_len, cfg.moe.balance_loss_alpha)?;
        per_seq.iter().sum::<f32>() / per_seq.len().max(1) as f32
    } else {
        0.0
    };
    let (mut out, experts_cache) = match experts {
        Experts::Host => host_forward(cfg, dm, w, x, &routing)?,
        Experts::Kernels { device, precision } => kernel_forward(cfg, dm, w, x, &routing, device, *precision)?,
    };
    let shared = match w.shared {
        Some((w1, w2)) => {
            let (ys, c) = ffn(x, w1, w2, dm.d, cfg.moe.shared_experts * dm.i);
            add_assign(&mut out, &ys);
            Some(c)
        }
        None => None,
    };
    Ok((out, MoeCache { logits, routing, aux_loss, seq_len, experts: experts_cache, shared }))
}

fn route(experts: &Experts, logits: &[f32], bias: Option<&[f32]>, rcfg: &RouterConfig) -> Result<Routing> {
    match experts {
        Experts::Kernels { device, .. } if !device.is_cpu() => {
            let n = logits.len() / rcfg.experts;
            let lt = Tensor::from_slice(logits, &[n, rcfg.experts], device)?;
            let bt = bias.map(|b| Tensor::from_slice(b, &[rcfg.experts], device)).transpose()?;
            let r = moekit_gating::route(&lt, bt.as_ref(), rcfg)?;
            Ok(Routing { ids: r.topk_ids.to_vec()?, weights: r.topk_weights.to_vec()?, counts: r.counts.to_vec()? })
        }
        _ => route_host(logits, bias, rcfg),
    }
}

/// Tokens per parallel routing task.
const ROUTE_CHUNK: usize = 256;

/// The gating reference over blocks of tokens in parallel (each token is routed alone, so the
/// blocks change nothing), merged in order; counts are integer sums.
fn route_host(logits: &[f32], bias: Option<&[f32]>, rcfg: &RouterConfig) -> Result<Routing> {
    let parts: Vec<Routing> = logits
        .par_chunks(ROUTE_CHUNK * rcfg.experts)
        .map(|chunk| gref::route(chunk, bias, rcfg))
        .collect::<std::result::Result<_, _>>()?;
    let mut out = Routing { ids: Vec::new(), weights: Vec::new(), counts: vec![0; rcfg.experts] };
    for p in parts {
        out.ids.extend(p.ids);
        out.weights.extend(p.weights);
        for (c, v) in out.counts.iter_mut().zip(p.counts) {
            *c += v;
        }
    }
    Ok(out)
}

/// Backward from `dy [N, D]`: returns `dx [N, D]` and adds to `grads`. The router logits'
/// gradient is returned too (for tests and metrics).
pub fn backward(
    experts: &Experts,
    cfg: &ModelConfig,
    w: &MoeWeights<'_>,
    x: &[f32],
    cache: &MoeCache,
    dy: &[f32],
    grads: MoeGrads<'_>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let dm = dims(cfg, x);
    let rcfg = cfg.router();
    let (mut dx, dweights) = match (&cache.experts, experts) {
        (ExpertCache::Host(c), _) => host_backward(dm, w, c, &cache.routing, dy, grads.w1, grads.w2),
        (ExpertCache::Kernels(c), Experts::Kernels { .. }) => kernel_backward(dm, c, dy, grads.w1, grads.w2)?,
        _ => return Err(Error::InvalidInput("MoE backward on another backend than its forward".into())),
    };
    if let (Some((w1, w2)), Some(c), Some((g1, g2))) = (w.shared, &cache.shared, grads.shared) {
        let f = cfg.moe.shared_experts * dm.i;
        add_assign(&mut dx, &ffn_backward(x, w1, w2, c, dy, dm.d, f, g1, g2));
    }
    let mut dlogits = match experts {
        Experts::Kernels { device, .. } if !device.is_cpu() => {
            let lt = Tensor::from_slice(&cache.logits, &[dm.n, dm.e], device)?;
            let it = Tensor::from_slice(&cache.routing.ids, &[dm.n, dm.k], device)?;
            let gt = Tensor::from_slice(&dweights, &[dm.n, dm.k], device)?;
            moekit_gating::route_backward(&lt, &it, &gt, &rcfg)?.to_vec()?
        }
        _ => gref::route_backward(&cache.logits, &cache.routing.ids, &dweights, &rcfg)?,
    };
    if cfg.moe.balance_loss_alpha > 0.0 {
        let n_seq = dm.n / cache.seq_len.max(1);
        let g = vec![1.0 / n_seq.max(1) as f32; n_seq];
        let db = gref::balance_loss_backward(
            &cache.logits,
            &cache.routing.ids,
            &g,
            &rcfg,
            cache.seq_len,
            cfg.moe.balance_loss_alpha,
        )?;
        add_assign(&mut dlogits, &db);
    }
    matmul_tn(&dlogits, x, dm.e, dm.d, dm.n, grads.router, true);
    matmul_nn(&dlogits, w.router, dm.n, dm.d, dm.e, &mut dx, true);
    Ok((dx, dlogits))
}

// ---------------------------------------------------------------------------------------------
// Host experts (f32).

/// The inverse of a row map: the pair of each of `rows` rows (-1: padding).
fn row_pairs(row_map: &[i32], rows: usize) -> Vec<i32> {
    let mut pairs = vec![-1i32; rows];
    for (p, &row) in row_map.iter().enumerate() {
        if row >= 0 {
            pairs[row as usize] = p as i32;
        }
    }
    pairs
}

/// Splits `buf` (rows of `cols`) into one mutable block per expert segment
/// `[offsets[e], offsets[e + 1])`.
fn segments<'a>(mut buf: &'a mut [f32], offsets: &[i32], cols: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    let mut at = 0usize;
    for &end in &offsets[1..] {
        let (seg, rest) = std::mem::take(&mut buf).split_at_mut((end as usize - at) * cols);
        out.push(seg);
        buf = rest;
        at = end as usize;
    }
    out
}

fn host_forward(
    cfg: &ModelConfig,
    dm: Dims,
    w: &MoeWeights<'_>,
    x: &[f32],
    routing: &Routing,
) -> Result<(Vec<f32>, ExpertCache)> {
    let Dims { n, d, e, k, i } = dm;
    let dcfg = dispatch_config(cfg);
    let layout = dref::layout(&routing.ids, &dcfg, moekit_dispatch::max_rows(n, k, e, dcfg.align))?;
    let rows = layout.offsets[e] as usize;
    let pairs = row_pairs(&layout.row_map, rows);
    let xp = par_new(rows * d, d, |row, xr| {
        let p = pairs[row];
        for (c, o) in xr.iter_mut().enumerate() {
            o.write(if p >= 0 { x[(p as usize / k) * d + c] } else { 0.0 });
        }
    });
    let (mut h, mut a, mut y) = (vec![0.0; rows * 2 * i], vec![0.0; rows * i], vec![0.0; rows * d]);
    segments(&mut h, &layout.offsets, 2 * i)
        .into_par_iter()
        .zip(segments(&mut a, &layout.offsets, i))
        .zip(segments(&mut y, &layout.offsets, d))
        .enumerate()
        .for_each(|(ex, ((hs, as_), ys))| {
            let (r0, cnt) = (layout.offsets[ex] as usize, layout.counts[ex] as usize);
            if cnt == 0 {
                return;
            }
            let xs = &xp[r0 * d..(r0 + cnt) * d];
            matmul_nt(xs, &w.w1[ex * 2 * i * d..][..2 * i * d], cnt, 2 * i, d, hs, false);
            as_[..cnt * i].copy_from_slice(&swiglu(&hs[..cnt * 2 * i], i));
            matmul_nt(&as_[..cnt * i], &w.w2[ex * d * i..][..d * i], cnt, d, i, ys, false);
        });
    // Combine: each token's slots in order (f32), tokens in parallel.
    let out = par_new(n * d, d, |t, o| {
        let mut acc = vec![0.0f32; d];
        for j in 0..k {
            let row = layout.row_map[t * k + j];
            if row >= 0 {
                let wt = routing.weights[t * k + j];
                for (a, &yv) in acc.iter_mut().zip(&y[row as usize * d..][..d]) {
                    *a += wt * yv;
                }
            }
        }
        for (ov, a) in o.iter_mut().zip(acc) {
            ov.write(a);
        }
    });
    Ok((out, ExpertCache::Host(Box::new(HostCache { layout, pairs, xp, h, a, y }))))
}

fn host_backward(
    dm: Dims,
    w: &MoeWeights<'_>,
    c: &HostCache,
    routing: &Routing,
    dout: &[f32],
    gw1: &mut [f32],
    gw2: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let Dims { n, d, e, k, i } = dm;
    let rows = c.layout.offsets[e] as usize;
    // dy[row] = w * dout[t] (rows in parallel); dw[t, j] = <dout[t], y[row]> (tokens in parallel).
    let dy = par_new(rows * d, d, |row, o| {
        let p = c.pairs[row];
        for (col, ov) in o.iter_mut().enumerate() {
            ov.write(if p >= 0 { routing.weights[p as usize] * dout[(p as usize / k) * d + col] } else { 0.0 });
        }
    });
    let mut dweights = vec![0.0; n * k];
    dweights.par_chunks_mut(k).enumerate().for_each(|(t, dw)| {
        let g = &dout[t * d..][..d];
        for (j, o) in dw.iter_mut().enumerate() {
            let row = c.layout.row_map[t * k + j];
            if row >= 0 {
                *o = crate::layers::dot(g, &c.y[row as usize * d..][..d]);
            }
        }
    });
    let mut dxp = vec![0.0; rows * d];
    let offsets = &c.layout.offsets;
    segments(&mut dxp, offsets, d)
        .into_par_iter()
        .zip(gw1.par_chunks_mut(2 * i * d))
        .zip(gw2.par_chunks_mut(d * i))
        .enumerate()
        .for_each(|(ex, ((dxs, g1), g2))| {
            let (r0, cnt) = (offsets[ex] as usize, c.layout.counts[ex] as usize);
            if cnt == 0 {
                return;
            }
            let (w1, w2) = (&w.w1[ex * 2 * i * d..][..2 * i * d], &w.w2[ex * d * i..][..d * i]);
            let dys = &dy[r0 * d..(r0 + cnt) * d];
            let da = nn(dys, w2, cnt, i, d);
            matmul_tn(dys, &c.a[r0 * i..(r0 + cnt) * i], d, i, cnt, g2, true);
            let dh = swiglu_backward(&c.h[r0 * 2 * i..(r0 + cnt) * 2 * i], &da, i);
            matmul_tn(&dh, &c.xp[r0 * d..(r0 + cnt) * d], 2 * i, d, cnt, g1, true);
            matmul_nn(&dh, w1, cnt, d, 2 * i, dxs, false);
        });
    let mut dx = vec![0.0; n * d];
    dx.par_chunks_mut(d).enumerate().for_each(|(t, o)| {
        for j in 0..k {
            let row = c.layout.row_map[t * k + j];
            if row >= 0 {
                add_assign(o, &dxp[row as usize * d..][..d]);
            }
        }
    });
    (dx, dweights)
}

// ---------------------------------------------------------------------------------------------
// Kernel experts (moekit's tensor ops).

fn bf16_tensor(v: &[f32], dims: &[usize], dev: &Device) -> Result<Tensor> {
    let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    Ok(Tensor::from_slice(&b, dims, dev)?)
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(match t.dtype() {
        DType::BF16 => t.to_vec::<bf16>()?.iter().map(|v| v.to_f32()).collect(),
        _ => t.to_vec::<f32>()?,
    })
}

/// The GEMM operand of FP8 weights (the layout field is ignored for block scales).
fn fp8_input((q, s): &(Tensor, Tensor)) -> GemmInput<'_> {
    GemmInput::Fp8 { data: q, scales: s, layout: moekit_gemm::ScaleLayout::RowMajor }
}

/// FP8 128x128 block-quantised weights `[G, n, k]`: codes and scales on `dev`.
fn fp8_weights(w: &[f32], g: usize, n: usize, k: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let (codes, scales) = moekit_gemm::reference::quantize_blocks(w, g, n, k);
    let codes: Vec<moekit_dtype::F8E4M3> = codes.into_iter().map(moekit_dtype::F8E4M3::from_bits).collect();
    Ok((
        Tensor::from_slice(&codes, &[g, n, k], dev)?,
        Tensor::from_slice(&scales, &[g, n / moekit_gemm::SCALE_BLOCK, k / moekit_gemm::SCALE_BLOCK], dev)?,
    ))
}

#[allow(clippy::too_many_arguments)]
fn kernel_forward(
    cfg: &ModelConfig,
    dm: Dims,
    w: &MoeWeights<'_>,
    x: &[f32],
    routing: &Routing,
    dev: &Device,
    precision: Precision,
) -> Result<(Vec<f32>, ExpertCache)> {
    use moekit_dispatch::{combine, dispatch_layout, permute, swiglu as swiglu_op};
    use moekit_gemm::m_grouped_contiguous;
    let Dims { n, d, e, k, i } = dm;
    let xb = bf16_tensor(x, &[n, d], dev)?;
    let ids = Tensor::from_slice(&routing.ids, &[n, k], dev)?;
    let weights = Tensor::from_slice(&routing.weights, &[n, k], dev)?;
    let layout = dispatch_layout(&ids, &dispatch_config(cfg), None)?;
    layout.check()?;
    let w1 = bf16_tensor(w.w1, &[e, 2 * i, d], dev)?;
    let w2 = bf16_tensor(w.w2, &[e, d, i], dev)?;
    let xp = permute(&xb, &layout, ActFormat::Bf16)?;
    let fp8 = match precision {
        Precision::Fp8 => Some((fp8_weights(w.w1, e, 2 * i, d, dev)?, fp8_weights(w.w2, e, d, i, dev)?)),
        _ => None,
    };
    let h = match &fp8 {
        Some((w1q, _)) => {
            let xq = permute(&xb, &layout, ActFormat::FP8)?;
            m_grouped_contiguous((&xq).into(), fp8_input(w1q), &layout.m_indices)?
        }
        None => m_grouped_contiguous(GemmInput::Bf16(&xp.data), GemmInput::Bf16(&w1), &layout.m_indices)?,
    };
    // The BF16 activation: the BF16 down GEMM's input and, in every precision, the input of
    // the down weights' gradient.
    let act = swiglu_op(&h, ActFormat::Bf16)?.data;
    let y = match &fp8 {
        Some((_, w2q)) => {
            let aq = swiglu_op(&h, ActFormat::FP8)?;
            m_grouped_contiguous((&aq).into(), fp8_input(w2q), &layout.m_indices)?
        }
        None => m_grouped_contiguous(GemmInput::Bf16(&act), GemmInput::Bf16(&w2), &layout.m_indices)?,
    };
    let out = to_f32(&combine(&y, &layout, Some(&weights))?)?;
    let cache = KernelCache { layout, weights, xp: xp.data, h, act, y, w1, w2 };
    Ok((out, ExpertCache::Kernels(Box::new(cache))))
}

fn kernel_backward(
    dm: Dims,
    c: &KernelCache,
    dout: &[f32],
    gw1: &mut [f32],
    gw2: &mut [f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    use moekit_dispatch::{combine, combine_backward, swiglu_backward as swiglu_bwd_op};
    use moekit_gemm::{dgrad, k_grouped};
    let dev = c.y.device().clone();
    let g = bf16_tensor(dout, &[dm.n, dm.d], &dev)?;
    let (gy, gw) = combine_backward(&c.y, &g, &c.layout, Some(&c.weights))?;
    let gw = gw.ok_or_else(|| Error::InvalidInput("combine backward gave no weight gradient".into()))?;
    let dw2 = k_grouped(GemmInput::Bf16(&gy), GemmInput::Bf16(&c.act), &c.layout.offsets)?;
    let dact = dgrad(GemmInput::Bf16(&gy), GemmInput::Bf16(&c.w2), &c.layout.m_indices)?;
    let dh = swiglu_bwd_op(&c.h, &dact)?;
    let dw1 = k_grouped(GemmInput::Bf16(&dh), GemmInput::Bf16(&c.xp), &c.layout.offsets)?;
    let dxp = dgrad(GemmInput::Bf16(&dh), GemmInput::Bf16(&c.w1), &c.layout.m_indices)?;
    let dx = to_f32(&combine(&dxp, &c.layout, None)?)?;
    add_assign(gw1, &dw1.to_vec::<f32>()?);
    add_assign(gw2, &dw2.to_vec::<f32>()?);
    Ok((dx, gw.to_vec::<f32>()?))
}
