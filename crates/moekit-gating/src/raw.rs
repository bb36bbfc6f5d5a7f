//! Launches on device buffers: what other runtimes embed.
//!
//! Every function checks lengths, the config and where each buffer lives before it launches
//! (a typed error, nothing written, otherwise), enqueues on `on` (a GPU [`Stream`] or the host
//! [`Emulator`], where it completes before returning) and returns without synchronising.
//! Shapes follow from the config: `T = logits.len() / E`.
//!
//! [`Stream`]: moekit_cuda::Stream
//! [`Emulator`]: moekit_cuda::Emulator

use crate::kernels::GATING;
use crate::{experts_per_lane, team_layout, Error, Result, RouterConfig};
use moekit_cuda::{DevPtr, DevPtrMut, LaunchConfig, Launcher, MemSpace};
use moekit_dtype::bf16;

/// Threads per block of the routing kernels (8 warps; a warp routes 32 / L tokens at a time in
/// the team layout, one in the warp layout).
pub const BLOCK: u32 = 256;
const WARPS: usize = BLOCK as usize / 32;
/// Tokens per block of the balance-loss backward (its grid is chunks x sequences).
pub const BALANCE_BWD_TOKENS_PER_BLOCK: usize = 256;

/// Router logits on a device: f32 or BF16 (scores are computed in f32 either way).
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    /// `[T, E]` f32.
    F32(DevPtr<'a, f32>),
    /// `[T, E]` BF16.
    BF16(DevPtr<'a, bf16>),
}

impl Logits<'_> {
    fn len(&self) -> usize {
        match self {
            Logits::F32(p) => p.len(),
            Logits::BF16(p) => p.len(),
        }
    }
    fn addr(&self) -> u64 {
        match self {
            Logits::F32(p) => p.addr(),
            Logits::BF16(p) => p.addr(),
        }
    }
    fn space(&self) -> MemSpace {
        match self {
            Logits::F32(p) => p.space(),
            Logits::BF16(p) => p.space(),
        }
    }
    fn abi_dtype(&self) -> i32 {
        (match self {
            Logits::F32(_) => moekit_abi::MOEKIT_LOGITS_F32,
            Logits::BF16(_) => moekit_abi::MOEKIT_LOGITS_BF16,
        }) as i32
    }
}

fn tokens_of(logits: &Logits<'_>, experts: usize) -> Result<usize> {
    if logits.len() % experts != 0 {
        return Err(Error::Shape(format!("logits: {} values are not rows of {experts} experts", logits.len())));
    }
    Ok(logits.len() / experts)
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!("{what}: {got} values, expected {want}")));
    }
    Ok(())
}

/// Threads per block of the team-layout forward (4 warps: its two shared rows per team fit the
/// static shared memory).
pub const TEAM_BLOCK: u32 = 128;

/// A launch of a routing kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKernel {
    /// Kernel name.
    pub name: String,
    /// Threads per block.
    pub block: u32,
    /// Tokens one block routes at a time.
    pub tokens_per_block: usize,
}

/// A persistent routing grid: one block per `tokens_per_block` tokens, at most what the
/// device keeps resident (its occupancy for this kernel, asked once and cached).
fn routing_grid(on: &dyn Launcher, k: &RoutingKernel, tokens: usize) -> Result<LaunchConfig> {
    let blocks = moekit_cuda::persistent_grid(on, &GATING, &k.name, k.block, 0, tokens.div_ceil(k.tokens_per_block))?;
    Ok(LaunchConfig { grid: (blocks, 1, 1), block: (k.block, 1, 1), shared_mem_bytes: 0 })
}

/// The forward kernel for `cfg`: the team layout when the groups fit it (no groups, or one
/// group per lane), else the warp layout.
pub fn forward_kernel(cfg: &RouterConfig) -> RoutingKernel {
    let (chunk, lanes) = team_layout(cfg.experts);
    if cfg.n_groups == 1 || cfg.group_size() == chunk {
        RoutingKernel {
            name: format!("moekit_route_fwd_team_e{}", chunk * lanes),
            block: TEAM_BLOCK,
            tokens_per_block: TEAM_BLOCK as usize / lanes,
        }
    } else {
        RoutingKernel {
            name: format!("moekit_route_fwd_e{}", experts_per_lane(cfg.experts)),
            block: BLOCK,
            tokens_per_block: WARPS,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn route_params(
    cfg: &RouterConfig,
    logits: &Logits<'_>,
    tokens: usize,
    bias: u64,
    topk_ids: u64,
    topk_weights: u64,
    counts: u64,
    grad_weights: u64,
    grad_logits: u64,
) -> moekit_abi::MoekitRouteParams {
    moekit_abi::MoekitRouteParams {
        logits: logits.addr(),
        bias,
        topk_ids,
        topk_weights,
        counts,
        grad_weights,
        grad_logits,
        tokens: tokens as u64,
        experts: cfg.experts as i32,
        top_k: cfg.top_k as i32,
        n_groups: cfg.n_groups as i32,
        topk_groups: cfg.topk_groups as i32,
        score_func: cfg.score.abi(),
        logits_dtype: logits.abi_dtype(),
        renormalize: cfg.renormalize as i32,
        route_scale: cfg.route_scale,
    }
}

/// Routes `T` tokens: writes `topk_ids [T, k]` and `topk_weights [T, k]`, and **adds** each
/// token's choices to `counts [E]` when given (zero it first for a fresh count; leaving it
/// accumulating sums over several calls). `bias [E]` is the selection bias.
#[allow(clippy::too_many_arguments)]
pub fn route(
    on: &dyn Launcher,
    cfg: &RouterConfig,
    logits: Logits<'_>,
    bias: Option<DevPtr<'_, f32>>,
    topk_ids: DevPtrMut<'_, i32>,
    topk_weights: DevPtrMut<'_, f32>,
    counts: Option<DevPtrMut<'_, i32>>,
) -> Result<()> {
    cfg.validate()?;
    let tokens = tokens_of(&logits, cfg.experts)?;
    expect_len("topk_ids", topk_ids.len(), tokens * cfg.top_k)?;
    expect_len("topk_weights", topk_weights.len(), tokens * cfg.top_k)?;
    let mut spaces = vec![logits.space(), topk_ids.space(), topk_weights.space()];
    if let Some(b) = &bias {
        expect_len("bias", b.len(), cfg.experts)?;
        spaces.push(b.space());
    }
    if let Some(c) = &counts {
        expect_len("counts", c.len(), cfg.experts)?;
        spaces.push(c.space());
    }
    moekit_cuda::ensure_addressable(on, &spaces)?;
    if tokens == 0 {
        return Ok(());
    }
    let params = route_params(
        cfg,
        &logits,
        tokens,
        bias.map_or(0, |b| b.addr()),
        topk_ids.addr(),
        topk_weights.addr(),
        counts.map_or(0, |c| c.addr()),
        0,
        0,
    );
    let kernel = forward_kernel(cfg);
    let grid = routing_grid(on, &kernel, tokens)?;
    // SAFETY: the kernel takes one MoekitRouteParams by value (layout checked by moekit-abi's
    // tests); it reads T * E logits (16-byte loads only at 16-byte-aligned addresses, which it
    // checks) and E bias values, writes T * k ids and weights and counts only at ids in
    // [0, E). All lengths were checked above, the config is valid, and every pointer lives
    // where `on` runs (ensure_addressable).
    unsafe { moekit_cuda::launch(on, &GATING, &kernel.name, grid, (params,)) }
}

/// Router replay: writes `topk_weights [T, k]` for given `topk_ids [T, k]` (recorded while
/// sampling) with the forward's arithmetic, so the ids [`route`] chose give its weights bit
/// for bit, and **adds** the ids to `counts [E]` when given. Ids outside `[0, E)` get weight 0
/// and are not counted (this layer does not reject them: it reads nothing back; the tensor op
/// [`crate::route_replay`] does).
pub fn route_replay(
    on: &dyn Launcher,
    cfg: &RouterConfig,
    logits: Logits<'_>,
    topk_ids: DevPtr<'_, i32>,
    topk_weights: DevPtrMut<'_, f32>,
    counts: Option<DevPtrMut<'_, i32>>,
) -> Result<()> {
    cfg.validate()?;
    let tokens = tokens_of(&logits, cfg.experts)?;
    expect_len("topk_ids", topk_ids.len(), tokens * cfg.top_k)?;
    expect_len("topk_weights", topk_weights.len(), tokens * cfg.top_k)?;
    let mut spaces = vec![logits.space(), topk_ids.space(), topk_weights.space()];
    if let Some(c) = &counts {
        expect_len("counts", c.len(), cfg.experts)?;
        spaces.push(c.space());
    }
    moekit_cuda::ensure_addressable(on, &spaces)?;
    if tokens == 0 {
        return Ok(());
    }
    let params = route_params(
        cfg,
        &logits,
        tokens,
        0,
        topk_ids.addr(),
        topk_weights.addr(),
        counts.map_or(0, |c| c.addr()),
        0,
        0,
    );
    let kernel = RoutingKernel {
        name: format!("moekit_route_replay_e{}", experts_per_lane(cfg.experts)),
        block: BLOCK,
        tokens_per_block: WARPS,
    };
    let grid = routing_grid(on, &kernel, tokens)?;
    // SAFETY: the kernel takes one MoekitRouteParams by value; it reads T * E logits and T * k
    // ids (bounds-checked before use as indices), writes T * k weights and counts only at ids
    // in [0, E). Lengths were checked above and every pointer lives where `on` runs.
    unsafe { moekit_cuda::launch(on, &GATING, &kernel.name, grid, (params,)) }
}

/// Gradient w.r.t. the logits: writes `grad_logits [T, E]` (every element) from
/// `grad_weights [T, k]` and the forward pass's `topk_ids [T, k]`. Ids outside `[0, E)`
/// contribute nothing.
pub fn route_backward(
    on: &dyn Launcher,
    cfg: &RouterConfig,
    logits: Logits<'_>,
    topk_ids: DevPtr<'_, i32>,
    grad_weights: DevPtr<'_, f32>,
    grad_logits: DevPtrMut<'_, f32>,
) -> Result<()> {
    cfg.validate()?;
    let tokens = tokens_of(&logits, cfg.experts)?;
    expect_len("topk_ids", topk_ids.len(), tokens * cfg.top_k)?;
    expect_len("grad_weights", grad_weights.len(), tokens * cfg.top_k)?;
    expect_len("grad_logits", grad_logits.len(), tokens * cfg.experts)?;
    moekit_cuda::ensure_addressable(
        on,
        &[logits.space(), topk_ids.space(), grad_weights.space(), grad_logits.space()],
    )?;
    if tokens == 0 {
        return Ok(());
    }
    let params = route_params(cfg, &logits, tokens, 0, topk_ids.addr(), 0, 0, grad_weights.addr(), grad_logits.addr());
    let kernel = RoutingKernel {
        name: format!("moekit_route_bwd_e{}", experts_per_lane(cfg.experts)),
        block: BLOCK,
        tokens_per_block: WARPS,
    };
    let grid = routing_grid(on, &kernel, tokens)?;
    // SAFETY: as in `route`: lengths checked, ids are bounds-checked by the kernel before use
    // as indices, writes go to the T * E elements of grad_logits.
    unsafe { moekit_cuda::launch(on, &GATING, &kernel.name, grid, (params,)) }
}

/// Auxiliary-loss-free bias update in place: `bias[e] += gamma * sign(mean - counts[e])`.
pub fn update_bias(on: &dyn Launcher, counts: DevPtr<'_, i32>, bias: DevPtrMut<'_, f32>, gamma: f32) -> Result<()> {
    expect_len("counts", counts.len(), bias.len())?;
    if bias.len() > i32::MAX as usize {
        return Err(Error::Shape(format!("{} experts", bias.len())));
    }
    if !gamma.is_finite() {
        return Err(Error::InvalidArgument(format!("gamma = {gamma} is not finite")));
    }
    moekit_cuda::ensure_addressable(on, &[counts.space(), bias.space()])?;
    if bias.is_empty() {
        return Ok(());
    }
    let params = moekit_abi::MoekitBiasUpdateParams {
        counts: counts.addr(),
        bias: bias.addr(),
        experts: bias.len() as i32,
        gamma,
    };
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one block reads `experts` counts and updates `experts` bias values; both lengths
    // equal `experts` (checked above).
    unsafe { moekit_cuda::launch(on, &GATING, "moekit_bias_update", cfg, (params,)) }
}

#[allow(clippy::too_many_arguments)]
fn balance_params(
    cfg: &RouterConfig,
    logits: &Logits<'_>,
    topk_ids: u64,
    n_seq: usize,
    seq_len: usize,
    alpha: f32,
    loss: u64,
    grad_loss: u64,
    grad_logits: u64,
) -> moekit_abi::MoekitBalanceLossParams {
    moekit_abi::MoekitBalanceLossParams {
        logits: logits.addr(),
        topk_ids,
        loss,
        grad_loss,
        grad_logits,
        n_seq: n_seq as u64,
        seq_len: seq_len as u64,
        experts: cfg.experts as i32,
        top_k: cfg.top_k as i32,
        score_func: cfg.score.abi(),
        logits_dtype: logits.abi_dtype(),
        alpha,
        _pad: 0,
    }
}

fn balance_shape(cfg: &RouterConfig, logits: &Logits<'_>, ids_len: usize, seq_len: usize) -> Result<usize> {
    cfg.validate()?;
    let tokens = tokens_of(logits, cfg.experts)?;
    expect_len("topk_ids", ids_len, tokens * cfg.top_k)?;
    if seq_len == 0 || tokens % seq_len != 0 {
        return Err(Error::Shape(format!("{tokens} tokens are not whole sequences of {seq_len}")));
    }
    if tokens / seq_len > u32::MAX as usize / 2 {
        return Err(Error::Shape(format!("{} sequences", tokens / seq_len)));
    }
    Ok(tokens / seq_len)
}

/// Sequence-wise balance loss: writes `loss [n_seq]` for the `n_seq = T / seq_len`
/// sequences (see [`crate::reference::balance_loss`]). One block per sequence.
#[allow(clippy::too_many_arguments)]
pub fn balance_loss(
    on: &dyn Launcher,
    cfg: &RouterConfig,
    seq_len: usize,
    alpha: f32,
    logits: Logits<'_>,
    topk_ids: DevPtr<'_, i32>,
    loss: DevPtrMut<'_, f32>,
) -> Result<()> {
    let n_seq = balance_shape(cfg, &logits, topk_ids.len(), seq_len)?;
    expect_len("loss", loss.len(), n_seq)?;
    moekit_cuda::ensure_addressable(on, &[logits.space(), topk_ids.space(), loss.space()])?;
    if n_seq == 0 {
        return Ok(());
    }
    let params = balance_params(cfg, &logits, topk_ids.addr(), n_seq, seq_len, alpha, loss.addr(), 0, 0);
    let launch = LaunchConfig { grid: (n_seq as u32, 1, 1), block: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let name = format!("moekit_balance_fwd_e{}", experts_per_lane(cfg.experts));
    // SAFETY: block q reads sequence q's seq_len * E logits and seq_len * k ids (lengths
    // checked) and writes loss[q]; ids are bounds-checked before use as indices.
    unsafe { moekit_cuda::launch(on, &GATING, &name, launch, (params,)) }
}

/// Gradient of `sum_q grad_loss[q] * loss[q]` w.r.t. the logits: writes `grad_logits [T, E]`.
#[allow(clippy::too_many_arguments)]
pub fn balance_loss_backward(
    on: &dyn Launcher,
    cfg: &RouterConfig,
    seq_len: usize,
    alpha: f32,
    logits: Logits<'_>,
    topk_ids: DevPtr<'_, i32>,
    grad_loss: DevPtr<'_, f32>,
    grad_logits: DevPtrMut<'_, f32>,
) -> Result<()> {
    let n_seq = balance_shape(cfg, &logits, topk_ids.len(), seq_len)?;
    expect_len("grad_loss", grad_loss.len(), n_seq)?;
    expect_len("grad_logits", grad_logits.len(), logits.len())?;
    moekit_cuda::ensure_addressable(on, &[logits.space(), topk_ids.space(), grad_loss.space(), grad_logits.space()])?;
    if n_seq == 0 {
        return Ok(());
    }
    if n_seq > 65535 {
        return Err(Error::Shape(format!("{n_seq} sequences (at most 65535 per launch)")));
    }
    let chunks = seq_len.div_ceil(BALANCE_BWD_TOKENS_PER_BLOCK).min(u32::MAX as usize);
    let params =
        balance_params(cfg, &logits, topk_ids.addr(), n_seq, seq_len, alpha, 0, grad_loss.addr(), grad_logits.addr());
    let launch = LaunchConfig { grid: (chunks as u32, n_seq as u32, 1), block: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let name = format!("moekit_balance_bwd_e{}", experts_per_lane(cfg.experts));
    // SAFETY: block (c, q) reads sequence q's logits and ids and grad_loss[q] and writes the
    // grad_logits rows of its chunk of sequence q; all lengths were checked above.
    unsafe { moekit_cuda::launch(on, &GATING, &name, launch, (params,)) }
}
