//! Launches on device buffers: what other runtimes embed.
//!
//! Every function checks lengths, the configuration, the alignment of every buffer the kernels
//! access in 16-byte words ([`VECTOR_ALIGN`]: activations, expert outputs, gradients; an
//! [`Error::Alignment`] otherwise, since a misaligned vector access on a GPU is a sticky error
//! that ends the whole context) and where each buffer lives before it launches (a typed error
//! and nothing written otherwise), enqueues on `on` (a GPU stream, or the host emulator, where
//! it completes before returning) and does not synchronise. Row indices read from device memory
//! (`row_map`, ids) are bounds-checked by the kernels: a bad value is skipped, never used as an
//! address.

use crate::kernels::DISPATCH;
use crate::{ActFormat, DispatchConfig, Error, Padding, Result, ScaleLayout};
use moekit_cuda::{DevPtr, DevPtrMut, LaunchConfig, Launcher, MemSpace};
use moekit_dtype::bf16;

/// Threads per block (8 warps).
pub const BLOCK: u32 = 256;
const WARPS: usize = BLOCK as usize / 32;
/// Pairs per chunk of the layout kernels.
pub const CHUNK_PAIRS: usize = 1024;
/// Threads per block of the layout's chunk scan (32 warps).
const SCAN_BLOCK: u32 = 1024;

/// Byte alignment of every buffer the kernels access in 16-byte words (`uint4`).
pub const VECTOR_ALIGN: usize = 16;

/// `Error::Alignment` unless `addr` is a multiple of [`VECTOR_ALIGN`] or the buffer is empty
/// (`len = 0` elements: nothing is accessed, and an empty buffer's address means nothing).
pub(crate) fn expect_aligned(what: &str, addr: u64, len: usize) -> Result<()> {
    moekit_cuda::check_aligned(what, addr, len, VECTOR_ALIGN)
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!("{what}: {got} elements, expected {want}")));
    }
    Ok(())
}

/// The persistent (grid-stride) grid of `kernel` for `items` warp-sized work items: one block
/// per `WARPS` items, at most what the device keeps resident (the driver's occupancy for this
/// kernel, cached per function).
fn grid(on: &dyn Launcher, kernel: &str, items: usize) -> Result<LaunchConfig> {
    let blocks = moekit_cuda::persistent_grid(on, &DISPATCH, kernel, BLOCK, 0, items.div_ceil(WARPS))?;
    Ok(LaunchConfig { grid: (blocks, 1, 1), block: (BLOCK, 1, 1), shared_mem_bytes: 0 })
}

/// Length of the layout's scratch buffer (i32) for `pairs = T * k` pairs and `experts`.
pub fn layout_scratch_len(pairs: usize, experts: usize) -> usize {
    pairs.div_ceil(CHUNK_PAIRS).max(1) * (experts + 1)
}

/// Outputs of [`layout`].
#[derive(Debug)]
pub struct LayoutOut<'a> {
    /// `[E + 1]` aligned segment starts; `offsets[E]` = rows used.
    pub offsets: DevPtrMut<'a, i32>,
    /// `[E]` pairs per expert.
    pub counts: DevPtrMut<'a, i32>,
    /// `[T, k]` row of each pair (-1: not routed, or dropped past `max_rows`).
    pub row_map: DevPtrMut<'a, i32>,
    /// `[max_rows]` expert of each row, -1 for padding; its length is `max_rows`.
    pub m_indices: DevPtrMut<'a, i32>,
    /// `[2]`: ids outside `[-1, E)` (skipped), rows needed (> `max_rows`: rows were dropped).
    pub status: DevPtrMut<'a, i32>,
}

/// Computes the dispatch layout of `topk_ids [T, k]` (three small launches). `scratch` has
/// [`layout_scratch_len`] elements. Output rows: `out.m_indices.len()` (at most `i32::MAX`).
pub fn layout(
    on: &dyn Launcher,
    cfg: &DispatchConfig,
    topk_ids: DevPtr<'_, i32>,
    scratch: DevPtrMut<'_, i32>,
    out: LayoutOut<'_>,
) -> Result<()> {
    cfg.validate()?;
    let (e_n, k) = (cfg.experts, cfg.top_k);
    if topk_ids.len() % k != 0 {
        return Err(Error::Shape(format!("topk_ids: {} ids are not rows of top_k = {k}", topk_ids.len())));
    }
    let pairs = topk_ids.len();
    let max_rows = out.m_indices.len();
    if pairs > i32::MAX as usize / 2 || max_rows > i32::MAX as usize / 2 {
        return Err(Error::Shape(format!("{pairs} pairs / {max_rows} rows exceed the i32 row index")));
    }
    expect_len("layout scratch", scratch.len(), layout_scratch_len(pairs, e_n))?;
    expect_len("offsets", out.offsets.len(), e_n + 1)?;
    expect_len("counts", out.counts.len(), e_n)?;
    expect_len("row_map", out.row_map.len(), pairs)?;
    expect_len("status", out.status.len(), 2)?;
    moekit_cuda::ensure_addressable(
        on,
        &[
            topk_ids.space(),
            scratch.space(),
            out.offsets.space(),
            out.counts.space(),
            out.row_map.space(),
            out.m_indices.space(),
            out.status.space(),
        ],
    )?;
    let chunks = pairs.div_ceil(CHUNK_PAIRS).max(1);
    let params = moekit_abi::MoekitDispatchLayoutParams {
        topk_ids: topk_ids.addr(),
        chunk_counts: scratch.addr(),
        offsets: out.offsets.addr(),
        counts: out.counts.addr(),
        row_map: out.row_map.addr(),
        m_indices: out.m_indices.addr(),
        status: out.status.addr(),
        tokens: (pairs / k) as u64,
        top_k: k as i32,
        experts: e_n as i32,
        align: cfg.align as i32,
        max_rows: max_rows as i32,
        chunk_pairs: CHUNK_PAIRS as i32,
        chunks: chunks as i32,
    };
    let per_chunk = LaunchConfig { grid: (chunks as u32, 1, 1), block: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // The chunk scan: one block of SCAN_BLOCK threads per 32 columns of the scratch.
    let columns =
        LaunchConfig { grid: ((e_n + 1).div_ceil(32) as u32, 1, 1), block: (SCAN_BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY (all three): one MoekitDispatchLayoutParams by value (layout checked by
    // moekit-abi's tests). Every length was checked above against the sizes the kernels use:
    // ids [pairs], scratch [chunks, E + 1], offsets [E + 1], counts [E], row_map [pairs],
    // m_indices [max_rows], status [2]; rows are written only below max_rows and ids outside
    // [0, E) are never used as indices; all buffers live where `on` runs. Every access is a
    // 4-byte scalar (element alignment suffices).
    unsafe {
        moekit_cuda::launch(on, &DISPATCH, "moekit_dispatch_count", per_chunk, (params,))?;
        moekit_cuda::launch(on, &DISPATCH, "moekit_dispatch_offsets", columns, (params,))?;
        moekit_cuda::launch(on, &DISPATCH, "moekit_dispatch_rows", per_chunk, (params,))
    }
}

/// A `[rows, cols]` activation a kernel writes: bytes in `format`, and its f32 scales (FP8).
#[derive(Debug)]
pub struct ActOut<'a> {
    /// `rows * cols * format.elem_bytes()` bytes.
    pub data: DevPtrMut<'a, u8>,
    /// FP8: `format`'s scale layout length; BF16: None.
    pub scales: Option<DevPtrMut<'a, f32>>,
    /// BF16, or FP8 with its scale kind and layout.
    pub format: ActFormat,
}

impl ActOut<'_> {
    /// Checks sizes for `rows x cols`; returns (scales address, spaces).
    fn check(&self, rows: usize, cols: usize) -> Result<(u64, Vec<MemSpace>)> {
        self.format.check_cols(cols)?;
        expect_len("activation bytes", self.data.len(), rows * cols * self.format.elem_bytes())?;
        expect_aligned("the output activation", self.data.addr(), self.data.len())?;
        let mut spaces = vec![self.data.space()];
        let scales = match (self.format, &self.scales) {
            (ActFormat::Bf16, None) => 0,
            (ActFormat::Fp8(_, l), Some(s)) => {
                expect_len("scales", s.len(), l.len(rows, cols))?;
                spaces.push(s.space());
                s.addr()
            }
            (ActFormat::Bf16, Some(_)) => return Err(Error::InvalidArgument("scales given for a BF16 output".into())),
            (ActFormat::Fp8(..), None) => return Err(Error::InvalidArgument("FP8 output without scales".into())),
        };
        Ok((scales, spaces))
    }
    fn stride(&self, rows: usize) -> i32 {
        ScaleLayout::mn_stride(rows) as i32
    }
}

/// Permutes `x [T, hidden]` BF16 to the rows of a layout (`row_map [T, k]`, `offsets`,
/// `counts`): `out` has `max_rows` rows; padding rows inside segments per `cfg.padding`; rows at
/// and past `offsets[E]` are never written. Each token is read once and written to each of its
/// rows. `x` and `out.data` must be 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub fn permute(
    on: &dyn Launcher,
    cfg: &DispatchConfig,
    x: DevPtr<'_, bf16>,
    hidden: usize,
    row_map: DevPtr<'_, i32>,
    offsets: DevPtr<'_, i32>,
    counts: DevPtr<'_, i32>,
    max_rows: usize,
    out: ActOut<'_>,
) -> Result<()> {
    cfg.validate()?;
    let (scales, mut spaces) = out.check(max_rows, hidden)?;
    let tokens = row_map.len() / cfg.top_k;
    expect_len("row_map", row_map.len(), tokens * cfg.top_k)?;
    expect_len("x", x.len(), tokens * hidden)?;
    expect_len("offsets", offsets.len(), cfg.experts + 1)?;
    expect_len("counts", counts.len(), cfg.experts)?;
    if max_rows > i32::MAX as usize / 2 {
        return Err(Error::Shape(format!("{max_rows} rows")));
    }
    expect_aligned("x", x.addr(), x.len())?;
    spaces.extend([x.space(), row_map.space(), offsets.space(), counts.space()]);
    moekit_cuda::ensure_addressable(on, &spaces)?;
    let zero = cfg.padding == Padding::Zero;
    // Tokens, then (zeroed padding) groups of 32 rows.
    let items = tokens + if zero { max_rows.div_ceil(32) } else { 0 };
    if items == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitPermuteParams {
        x: x.addr(),
        row_map: row_map.addr(),
        offsets: offsets.addr(),
        counts: counts.addr(),
        out: out.data.addr(),
        scales,
        tokens: tokens as u64,
        hidden: hidden as i32,
        top_k: cfg.top_k as i32,
        experts: cfg.experts as i32,
        max_rows: max_rows as i32,
        quant: out.format.abi(),
        scale_layout: out.format.scale_layout().abi(),
        scale_stride: out.stride(max_rows),
        zero_padding: zero as i32,
    };
    // SAFETY: lengths checked above (x [T, hidden], row_map [T, k], offsets [E + 1], counts
    // [E], out [max_rows, hidden], scales per layout); x and out 16-byte aligned (the 16-byte
    // loads and stores); the kernel writes only rows below max_rows; every buffer lives where
    // `on` runs.
    unsafe {
        moekit_cuda::launch(
            on,
            &DISPATCH,
            "moekit_dispatch_permute",
            grid(on, "moekit_dispatch_permute", items)?,
            (params,),
        )
    }
}

fn act_launch(on: &dyn Launcher, kernel: &str, params: moekit_abi::MoekitActParams, rows: usize) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    // SAFETY: the callers checked every length against rows x cols (x, out, scales, grads),
    // the 16-byte alignment of x, out, grad_out and grad_x, and where each buffer lives; the
    // kernels touch exactly those elements.
    unsafe { moekit_cuda::launch(on, &DISPATCH, kernel, grid(on, kernel, rows)?, (params,)) }
}

fn act_params(x: u64, rows: usize, cols: usize, out: &ActOut<'_>, scales: u64) -> moekit_abi::MoekitActParams {
    moekit_abi::MoekitActParams {
        x,
        out: out.data.addr(),
        scales,
        grad_out: 0,
        grad_x: 0,
        rows: rows as u64,
        cols: cols as i32,
        quant: out.format.abi(),
        scale_layout: out.format.scale_layout().abi(),
        scale_stride: out.stride(rows),
    }
}

/// 1x128 FP8 quantization (or BF16 copy) of `x [rows, cols]` into `out`.
pub fn quantize(on: &dyn Launcher, x: DevPtr<'_, bf16>, cols: usize, out: ActOut<'_>) -> Result<()> {
    out.format.check_cols(cols)?;
    let rows = x.len() / cols;
    expect_len("x", x.len(), rows * cols)?;
    let (scales, mut spaces) = out.check(rows, cols)?;
    expect_aligned("x", x.addr(), x.len())?;
    spaces.push(x.space());
    moekit_cuda::ensure_addressable(on, &spaces)?;
    act_launch(on, "moekit_act_quant", act_params(x.addr(), rows, cols, &out, scales), rows)
}

/// SwiGLU of `x [rows, 2 cols]` (gate columns first) into `out [rows, cols]`.
pub fn swiglu(on: &dyn Launcher, x: DevPtr<'_, bf16>, cols: usize, out: ActOut<'_>) -> Result<()> {
    out.format.check_cols(cols)?;
    let rows = x.len() / (2 * cols);
    expect_len("x", x.len(), rows * 2 * cols)?;
    let (scales, mut spaces) = out.check(rows, cols)?;
    expect_aligned("x", x.addr(), x.len())?;
    spaces.push(x.space());
    moekit_cuda::ensure_addressable(on, &spaces)?;
    act_launch(on, "moekit_act_swiglu", act_params(x.addr(), rows, cols, &out, scales), rows)
}

/// Gradient of SwiGLU: `grad_x [rows, 2 cols]` from `x [rows, 2 cols]` and `grad_out [rows, cols]`.
pub fn swiglu_backward(
    on: &dyn Launcher,
    x: DevPtr<'_, bf16>,
    grad_out: DevPtr<'_, bf16>,
    grad_x: DevPtrMut<'_, bf16>,
    cols: usize,
) -> Result<()> {
    ActFormat::Bf16.check_cols(cols)?;
    let rows = x.len() / (2 * cols);
    expect_len("x", x.len(), rows * 2 * cols)?;
    expect_len("grad_out", grad_out.len(), rows * cols)?;
    expect_len("grad_x", grad_x.len(), rows * 2 * cols)?;
    expect_aligned("x", x.addr(), x.len())?;
    expect_aligned("grad_out", grad_out.addr(), grad_out.len())?;
    expect_aligned("grad_x", grad_x.addr(), grad_x.len())?;
    moekit_cuda::ensure_addressable(on, &[x.space(), grad_out.space(), grad_x.space()])?;
    let params = moekit_abi::MoekitActParams {
        x: x.addr(),
        out: 0,
        scales: 0,
        grad_out: grad_out.addr(),
        grad_x: grad_x.addr(),
        rows: rows as u64,
        cols: cols as i32,
        quant: 0,
        scale_layout: 0,
        scale_stride: 0,
    };
    act_launch(on, "moekit_act_swiglu_backward", params, rows)
}

fn combine_check(
    y: &DevPtr<'_, bf16>,
    hidden: usize,
    row_map: &DevPtr<'_, i32>,
    top_k: usize,
    weights: &Option<DevPtr<'_, f32>>,
) -> Result<(usize, usize)> {
    ActFormat::Bf16.check_cols(hidden)?;
    if top_k == 0 || top_k > crate::MAX_TOP_K || row_map.len() % top_k != 0 {
        return Err(Error::Shape(format!("row_map of {} for top_k = {top_k}", row_map.len())));
    }
    let rows = y.len() / hidden;
    expect_len("y", y.len(), rows * hidden)?;
    expect_aligned("y", y.addr(), y.len())?;
    if rows > i32::MAX as usize {
        return Err(Error::Shape(format!("{rows} rows")));
    }
    if let Some(w) = weights {
        expect_len("weights", w.len(), row_map.len())?;
    }
    Ok((row_map.len() / top_k, rows))
}

/// The combine kernel for `top_k` slots: the compile-time variant with the smallest slot count
/// `K >= top_k` of 1, 2, 4, 6, 8, 16 (the kernel masks slots `top_k..K`).
pub fn combine_kernel(top_k: usize) -> &'static str {
    match top_k {
        0 | 1 => "moekit_combine_k1",
        2 => "moekit_combine_k2",
        3 | 4 => "moekit_combine_k4",
        5 | 6 => "moekit_combine_k6",
        7 | 8 => "moekit_combine_k8",
        _ => "moekit_combine_k16",
    }
}

/// `out [T, hidden] = sum_j w[t, j] * y[row_map[t, j]]` (unweighted when `weights` is None):
/// f32 in slot order, BF16 out (the same bits as [`crate::reference::combine`]).
pub fn combine(
    on: &dyn Launcher,
    y: DevPtr<'_, bf16>,
    hidden: usize,
    row_map: DevPtr<'_, i32>,
    top_k: usize,
    weights: Option<DevPtr<'_, f32>>,
    out: DevPtrMut<'_, bf16>,
) -> Result<()> {
    let (tokens, rows) = combine_check(&y, hidden, &row_map, top_k, &weights)?;
    expect_len("out", out.len(), tokens * hidden)?;
    expect_aligned("out", out.addr(), out.len())?;
    let mut spaces = vec![y.space(), row_map.space(), out.space()];
    spaces.extend(weights.as_ref().map(|w| w.space()));
    moekit_cuda::ensure_addressable(on, &spaces)?;
    if tokens == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitCombineParams {
        y: y.addr(),
        row_map: row_map.addr(),
        weights: weights.map_or(0, |w| w.addr()),
        out: out.addr(),
        grad_out: 0,
        grad_y: 0,
        grad_weights: 0,
        offsets: 0,
        counts: 0,
        tokens: tokens as u64,
        hidden: hidden as i32,
        top_k: top_k as i32,
        rows: rows as i32,
        experts: 0,
    };
    // SAFETY: lengths checked (y [rows, hidden], row_map / weights [T, k], out [T, hidden]);
    // y and out 16-byte aligned; the variant handles top_k slots (slots past top_k masked); rows
    // outside [0, rows) are skipped by the kernel; buffers live where `on` runs.
    unsafe {
        moekit_cuda::launch(on, &DISPATCH, combine_kernel(top_k), grid(on, combine_kernel(top_k), tokens)?, (params,))
    }
}

/// Gradients of [`combine`]: `grad_y [rows, hidden]` (`w * grad_out[t]` at each pair's row;
/// padding rows of the layout zeroed) and, with weights, `grad_weights [T, k] =
/// <grad_out[t], y[row]>`.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward(
    on: &dyn Launcher,
    y: DevPtr<'_, bf16>,
    hidden: usize,
    row_map: DevPtr<'_, i32>,
    top_k: usize,
    weights: Option<DevPtr<'_, f32>>,
    offsets: DevPtr<'_, i32>,
    counts: DevPtr<'_, i32>,
    grad_out: DevPtr<'_, bf16>,
    grad_y: DevPtrMut<'_, bf16>,
    grad_weights: Option<DevPtrMut<'_, f32>>,
) -> Result<()> {
    let (tokens, rows) = combine_check(&y, hidden, &row_map, top_k, &weights)?;
    let experts = counts.len();
    if experts == 0 || experts > crate::MAX_EXPERTS {
        return Err(Error::Shape(format!("{experts} expert counts")));
    }
    expect_len("offsets", offsets.len(), experts + 1)?;
    expect_len("grad_out", grad_out.len(), tokens * hidden)?;
    expect_len("grad_y", grad_y.len(), rows * hidden)?;
    expect_aligned("grad_out", grad_out.addr(), grad_out.len())?;
    expect_aligned("grad_y", grad_y.addr(), grad_y.len())?;
    let mut spaces =
        vec![y.space(), row_map.space(), offsets.space(), counts.space(), grad_out.space(), grad_y.space()];
    match (&weights, &grad_weights) {
        (Some(w), Some(gw)) => {
            expect_len("grad_weights", gw.len(), tokens * top_k)?;
            spaces.extend([w.space(), gw.space()]);
        }
        (None, None) => {}
        _ => return Err(Error::InvalidArgument("grad_weights is needed exactly when weights are given".into())),
    }
    moekit_cuda::ensure_addressable(on, &spaces)?;
    if tokens + rows == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitCombineParams {
        y: y.addr(),
        row_map: row_map.addr(),
        weights: weights.map_or(0, |w| w.addr()),
        out: 0,
        grad_out: grad_out.addr(),
        grad_y: grad_y.addr(),
        grad_weights: grad_weights.map_or(0, |g| g.addr()),
        offsets: offsets.addr(),
        counts: counts.addr(),
        tokens: tokens as u64,
        hidden: hidden as i32,
        top_k: top_k as i32,
        rows: rows as i32,
        experts: experts as i32,
    };
    // SAFETY: lengths checked above; y, grad_out and grad_y 16-byte aligned (the kernel's
    // 16-byte accesses); the kernel writes grad_y rows in [0, rows) only (map
    // values outside are skipped) and grad_weights [T, k]; buffers live where `on` runs.
    unsafe {
        moekit_cuda::launch(
            on,
            &DISPATCH,
            "moekit_combine_backward",
            grid(on, "moekit_combine_backward", tokens + rows)?,
            (params,),
        )
    }
}
