//! Launches on device buffers: what other runtimes embed.
//!
//! Every function checks the shape, every length and where each buffer lives before it
//! launches (a typed error, nothing written, otherwise), enqueues on `on` (a GPU
//! [`Stream`](moekit_cuda::Stream) or the host [`Emulator`](moekit_cuda::Emulator), where it
//! completes before returning) and returns without synchronising.

use crate::kernels::ATTENTION;
use crate::{AttnShape, Error, Result, KEY_TILE};
use moekit_cuda::{DevPtr, DevPtrMut, LaunchConfig, Launcher, MemSpace};
use moekit_dtype::bf16;

/// `qkv [B * S, 3 H hd]` on a device: f32, or BF16 (widened exactly when loaded; every
/// operation after the load is f32, so BF16 input gives the bits of its f32 widening).
#[derive(Debug, Clone, Copy)]
pub enum Qkv<'a> {
    /// F32 values.
    F32(DevPtr<'a, f32>),
    /// BF16 values.
    BF16(DevPtr<'a, bf16>),
}

impl Qkv<'_> {
    fn len(&self) -> usize {
        match self {
            Qkv::F32(p) => p.len(),
            Qkv::BF16(p) => p.len(),
        }
    }
    fn addr(&self) -> u64 {
        match self {
            Qkv::F32(p) => p.addr(),
            Qkv::BF16(p) => p.addr(),
        }
    }
    fn space(&self) -> MemSpace {
        match self {
            Qkv::F32(p) => p.space(),
            Qkv::BF16(p) => p.space(),
        }
    }
    fn abi_dtype(&self) -> i32 {
        (match self {
            Qkv::F32(_) => moekit_abi::MOEKIT_ATTN_F32,
            Qkv::BF16(_) => moekit_abi::MOEKIT_ATTN_BF16,
        }) as i32
    }
}

impl<'a> From<DevPtr<'a, f32>> for Qkv<'a> {
    fn from(p: DevPtr<'a, f32>) -> Self {
        Qkv::F32(p)
    }
}

/// Threads per block of every attention kernel (4 warps).
pub const BLOCK: u32 = 128;
/// Queries per block of the forward kernels.
pub const FWD_ROWS: usize = 16;

/// Queries per tile of the backward kernels for `chunks = ceil(hd / 32)` (the kernels'
/// `BwdRows`): what keeps their static shared memory within 48 KiB.
pub fn bwd_rows(chunks: usize) -> usize {
    match chunks {
        0..=2 => 32,
        3 => 16,
        _ => 8,
    }
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!("{what}: {got} values, expected {want}")));
    }
    Ok(())
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds i32")))
}

fn grid(tiles: usize, shape: &AttnShape) -> Result<LaunchConfig> {
    let x = u32::try_from(tiles).map_err(|_| Error::Shape(format!("{tiles} tiles")))?;
    Ok(LaunchConfig { grid: (x, (shape.batch * shape.heads) as u32, 1), block: (BLOCK, 1, 1), shared_mem_bytes: 0 })
}

#[allow(clippy::too_many_arguments)]
fn fwd_params(
    shape: &AttnShape,
    qkv: &Qkv<'_>,
    out: u64,
    lse: u64,
    caches: (u64, u64),
    start: usize,
    max_len: usize,
) -> Result<moekit_abi::MoekitAttnParams> {
    Ok(moekit_abi::MoekitAttnParams {
        qkv: qkv.addr(),
        out,
        lse,
        k_cache: caches.0,
        v_cache: caches.1,
        batch: i32_of("batch", shape.batch)?,
        heads: i32_of("heads", shape.heads)?,
        head_dim: i32_of("head_dim", shape.head_dim)?,
        seq: i32_of("seq", shape.seq)?,
        start: i32_of("start", start)?,
        max_len: i32_of("max_len", max_len)?,
        scale: shape.scale(),
        qkv_dtype: qkv.abi_dtype(),
    })
}

/// Causal attention over the call's own keys: reads `qkv [B * S, 3 H hd]` (F32 or BF16), writes
/// `out [B * S, H hd]` and `lse [B, H, S]` (see [`crate::reference::forward`]).
pub fn forward(
    on: &dyn Launcher,
    shape: &AttnShape,
    qkv: Qkv<'_>,
    out: DevPtrMut<'_, f32>,
    lse: DevPtrMut<'_, f32>,
) -> Result<()> {
    shape.validate(0)?;
    expect_len("qkv", qkv.len(), shape.qkv_len())?;
    expect_len("out", out.len(), shape.out_len())?;
    expect_len("lse", lse.len(), shape.lse_len())?;
    moekit_cuda::ensure_addressable(on, &[qkv.space(), out.space(), lse.space()])?;
    let params = fwd_params(shape, &qkv, out.addr(), lse.addr(), (0, 0), 0, 0)?;
    let cfg = grid(shape.seq.div_ceil(FWD_ROWS), shape)?;
    let name = format!("moekit_attn_fwd_c{}", shape.chunks());
    // SAFETY: the kernel takes one MoekitAttnParams by value (layout checked by moekit-abi's
    // tests). Block (x, b * H + h) reads rows b * S .. (b + 1) * S of qkv (head h's columns)
    // and writes its 16 queries' rows of out and lse; every length was checked against the
    // valid shape above, and every pointer lives where `on` runs.
    unsafe { moekit_cuda::launch(on, &ATTENTION, &name, cfg, (params,)) }
}

/// Causal attention through KV caches `[B, H, max_len, hd]` (the decode step when `S = 1`):
/// writes the keys and values of `qkv [B * S, 3 H hd]` into the caches at positions
/// `start .. start + S`, and `out [B * S, H hd]`, `lse [B, H, S]` of those queries attending
/// to the positions `0 ..= start + i` (see [`crate::reference::forward_cached`]). Positions
/// `< start` of the caches must hold the earlier keys and values.
#[allow(clippy::too_many_arguments)]
pub fn forward_cached(
    on: &dyn Launcher,
    shape: &AttnShape,
    start: usize,
    max_len: usize,
    qkv: Qkv<'_>,
    k_cache: DevPtrMut<'_, f32>,
    v_cache: DevPtrMut<'_, f32>,
    out: DevPtrMut<'_, f32>,
    lse: DevPtrMut<'_, f32>,
) -> Result<()> {
    shape.validate_cache(start, max_len)?;
    expect_len("qkv", qkv.len(), shape.qkv_len())?;
    expect_len("k_cache", k_cache.len(), shape.cache_len(max_len))?;
    expect_len("v_cache", v_cache.len(), shape.cache_len(max_len))?;
    expect_len("out", out.len(), shape.out_len())?;
    expect_len("lse", lse.len(), shape.lse_len())?;
    moekit_cuda::ensure_addressable(on, &[qkv.space(), k_cache.space(), v_cache.space(), out.space(), lse.space()])?;
    let params = fwd_params(shape, &qkv, out.addr(), lse.addr(), (k_cache.addr(), v_cache.addr()), start, max_len)?;
    let cfg = grid(shape.seq.div_ceil(FWD_ROWS), shape)?;
    let name = format!("moekit_attn_fwd_c{}", shape.chunks());
    // SAFETY: as in `forward`; in addition block (x, b * H + h) reads cache positions
    // < start of (b, h) and writes its own queries' positions start + i (< max_len, checked),
    // so no two blocks write the same element and none reads what another writes.
    unsafe { moekit_cuda::launch(on, &ATTENTION, &name, cfg, (params,)) }
}

/// Backward of [`forward`]: writes every element of `dqkv [B * S, 3 H hd]` from the forward's
/// `qkv`, `out`, `lse` and `dout [B * S, H hd]`; `delta [B, H, S]` is scratch (it ends
/// holding `rowsum(dout * out)`). Three launches, no atomics: the same bits on every run.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    on: &dyn Launcher,
    shape: &AttnShape,
    qkv: Qkv<'_>,
    out: DevPtr<'_, f32>,
    lse: DevPtr<'_, f32>,
    dout: DevPtr<'_, f32>,
    delta: DevPtrMut<'_, f32>,
    dqkv: DevPtrMut<'_, f32>,
) -> Result<()> {
    shape.validate(0)?;
    expect_len("qkv", qkv.len(), shape.qkv_len())?;
    expect_len("out", out.len(), shape.out_len())?;
    expect_len("lse", lse.len(), shape.lse_len())?;
    expect_len("dout", dout.len(), shape.out_len())?;
    expect_len("delta", delta.len(), shape.lse_len())?;
    expect_len("dqkv", dqkv.len(), shape.qkv_len())?;
    moekit_cuda::ensure_addressable(
        on,
        &[qkv.space(), out.space(), lse.space(), dout.space(), delta.space(), dqkv.space()],
    )?;
    let params = moekit_abi::MoekitAttnBwdParams {
        qkv: qkv.addr(),
        out: out.addr(),
        lse: lse.addr(),
        dout: dout.addr(),
        delta: delta.addr(),
        dqkv: dqkv.addr(),
        batch: i32_of("batch", shape.batch)?,
        heads: i32_of("heads", shape.heads)?,
        head_dim: i32_of("head_dim", shape.head_dim)?,
        seq: i32_of("seq", shape.seq)?,
        scale: shape.scale(),
        qkv_dtype: qkv.abi_dtype(),
    };
    let warps = BLOCK as usize / 32;
    let pairs = shape.batch * shape.seq * shape.heads;
    let prep_blocks = u32::try_from(pairs.div_ceil(warps)).map_err(|_| Error::Shape(format!("{shape:?}")))?;
    let prep = LaunchConfig { grid: (prep_blocks, 1, 1), block: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let nc = shape.chunks();
    // SAFETY: one warp per (row, head) reads hd values of dout and out and writes one delta;
    // lengths checked above, pointers addressable from `on`.
    unsafe { moekit_cuda::launch(on, &ATTENTION, "moekit_attn_bwd_prep", prep, (params,))? };
    // SAFETY: block (x, b * H + h) reads sequence b's rows of qkv, dout, lse and delta (head
    // h) and writes the key and value columns of head h of its 32 keys' dqkv rows: disjoint
    // across blocks. It runs after the prep launch on the same launcher (stream order).
    unsafe {
        moekit_cuda::launch(
            on,
            &ATTENTION,
            &format!("moekit_attn_bwd_dkdv_c{nc}"),
            grid(shape.seq.div_ceil(KEY_TILE), shape)?,
            (params,),
        )?
    };
    // SAFETY: as above; block (x, b * H + h) writes the query columns of head h of its
    // bwd_rows(nc) queries' dqkv rows, which no other launch or block writes.
    unsafe {
        moekit_cuda::launch(
            on,
            &ATTENTION,
            &format!("moekit_attn_bwd_dq_c{nc}"),
            grid(shape.seq.div_ceil(bwd_rows(nc)), shape)?,
            (params,),
        )
    }
}
