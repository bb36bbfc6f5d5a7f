//! Launches on device buffers: what other runtimes embed.
//!
//! Every function checks lengths, ranges and where each buffer lives before it launches (a
//! typed error, nothing written, otherwise), enqueues on `on` (a GPU stream or the host
//! emulator, where it completes before returning) and returns without synchronising. Every
//! pointer needs only its element's alignment: the kernels take 16-byte accesses when the
//! addresses (and the row lengths) allow and scalar ones otherwise, with the same bits.

use crate::kernels::NORM;
use crate::{expect_len, fits_i32, rows_of, Error, Result, EMBED_CHUNK, NORM_BWD_ROWS};
use moekit_cuda::{DevPtr, DevPtrMut, LaunchConfig, Launcher, MemSpace};
use moekit_dtype::bf16;

/// An output of F32 or BF16 elements.
#[derive(Debug)]
pub enum Out<'a> {
    /// f32.
    F32(DevPtrMut<'a, f32>),
    /// BF16 (round to nearest even, NaN -> 0x7fc0).
    BF16(DevPtrMut<'a, bf16>),
}

impl Out<'_> {
    fn len(&self) -> usize {
        match self {
            Out::F32(p) => p.len(),
            Out::BF16(p) => p.len(),
        }
    }
    fn addr(&self) -> u64 {
        match self {
            Out::F32(p) => p.addr(),
            Out::BF16(p) => p.addr(),
        }
    }
    fn space(&self) -> MemSpace {
        match self {
            Out::F32(p) => p.space(),
            Out::BF16(p) => p.space(),
        }
    }
    fn align(&self) -> usize {
        match self {
            Out::F32(_) => 4,
            Out::BF16(_) => 2,
        }
    }
    fn abi(&self) -> i32 {
        (match self {
            Out::F32(_) => moekit_abi::MOEKIT_NORM_F32,
            Out::BF16(_) => moekit_abi::MOEKIT_NORM_BF16,
        }) as i32
    }
}

/// Element alignment of every f32 / i32 pointer (only `from_raw` pointers can break it).
fn aligned4(what: &str, addr: u64, len: usize) -> Result<()> {
    moekit_cuda::check_aligned(what, addr, len, 4)
}

fn grid(on: &dyn Launcher, kernel: &str, block: u32, work_blocks: usize) -> Result<LaunchConfig> {
    let blocks = moekit_cuda::persistent_grid(on, &NORM, kernel, block, 0, work_blocks)?;
    Ok(LaunchConfig { grid: (blocks, 1, 1), block: (block, 1, 1), shared_mem_bytes: 0 })
}

/// Writes the status `[bad, first or -1]` of `ids` against `[0, bound)` into `status [2]`
/// (one block; see [`crate::IdStatus`]).
pub fn check_ids(on: &dyn Launcher, ids: DevPtr<'_, i32>, bound: usize, status: DevPtrMut<'_, i32>) -> Result<()> {
    expect_len("id status", status.len(), 2)?;
    let bound = fits_i32("id bound", bound)?;
    fits_i32("ids", ids.len())?;
    aligned4("ids", ids.addr(), ids.len())?;
    aligned4("id status", status.addr(), 2)?;
    moekit_cuda::ensure_addressable(on, &[ids.space(), status.space()])?;
    let params = moekit_abi::MoekitIdsCheckParams {
        ids: ids.addr(),
        status: status.addr(),
        n: ids.len() as u64,
        bound,
        _pad: 0,
    };
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one MoekitIdsCheckParams by value (layout checked by moekit-abi's tests); the
    // kernel reads n = ids.len() ids and writes status[0..2], lengths checked above; both live
    // where `on` runs.
    unsafe { moekit_cuda::launch(on, &NORM, "moekit_norm_check_ids", cfg, (params,)) }
}

/// Embedding gather: `out [T, d]` (F32 or BF16) from `table [vocab, d]` and `ids [T]`; a zero
/// row for an id outside `[0, vocab)` (see [`check_ids`] for the error).
pub fn embedding(
    on: &dyn Launcher,
    table: DevPtr<'_, f32>,
    vocab: usize,
    ids: DevPtr<'_, i32>,
    out: Out<'_>,
) -> Result<()> {
    let dim = embed_dim(table.len(), vocab)?;
    expect_len("embedding output", out.len(), ids.len() * dim)?;
    aligned4("embedding table", table.addr(), table.len())?;
    aligned4("ids", ids.addr(), ids.len())?;
    moekit_cuda::check_aligned("embedding output", out.addr(), out.len(), out.align())?;
    moekit_cuda::ensure_addressable(on, &[table.space(), ids.space(), out.space()])?;
    if ids.is_empty() || dim == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitEmbedParams {
        table: table.addr(),
        ids: ids.addr(),
        out: out.addr(),
        tokens: ids.len() as u64,
        vocab: fits_i32("vocab", vocab)?,
        dim: fits_i32("embedding dim", dim)?,
        out_dtype: out.abi(),
        _pad: 0,
    };
    let cfg = grid(on, "moekit_embed_fwd", 256, ids.len().div_ceil(8))?;
    // SAFETY: one MoekitEmbedParams by value; the kernel reads ids[0..T], table rows only at
    // ids in [0, vocab) (table has vocab * dim values), writes out[0..T * dim] (checked); 16-byte
    // accesses only where it finds the addresses aligned; every buffer lives where `on` runs.
    unsafe { moekit_cuda::launch(on, &NORM, "moekit_embed_fwd", cfg, (params,)) }
}

fn embed_dim(table_len: usize, vocab: usize) -> Result<usize> {
    if vocab == 0 {
        return Err(Error::Shape("embedding: vocab must be positive".into()));
    }
    fits_i32("vocab", vocab)?;
    rows_of("embedding table", table_len, vocab)
        .map_err(|_| Error::Shape(format!("embedding table: {table_len} values are not {vocab} rows")))
}

/// I32 scratch elements of [`embedding_backward`]: `chunks * vocab` chunk counts, `vocab + 1`
/// offsets, `tokens` positions (`chunks = ceil(tokens / 256)`).
pub fn embedding_backward_scratch_len(tokens: usize, vocab: usize) -> usize {
    tokens.div_ceil(EMBED_CHUNK) * vocab + vocab + 1 + tokens
}

/// Embedding gradient: `grad_table [vocab, d] = (accumulate ? grad_table : 0) + sum over t
/// with ids[t] == v of grad_out[t, :]` in increasing `t`; ids out of range are skipped.
/// Deterministic without float atomics: a stable counting sort of the positions by id, then
/// one block per id (see kernels/norm.cu). `scratch` holds
/// [`embedding_backward_scratch_len`] I32 values (contents irrelevant).
pub fn embedding_backward(
    on: &dyn Launcher,
    ids: DevPtr<'_, i32>,
    grad_out: DevPtr<'_, f32>,
    grad_table: DevPtrMut<'_, f32>,
    vocab: usize,
    scratch: DevPtrMut<'_, i32>,
    accumulate: bool,
) -> Result<()> {
    let dim = embed_dim(grad_table.len(), vocab)?;
    let tokens = ids.len();
    expect_len("embedding output gradient", grad_out.len(), tokens * dim)?;
    expect_len("embedding gradient scratch", scratch.len(), embedding_backward_scratch_len(tokens, vocab))?;
    fits_i32("tokens", tokens)?;
    let chunks = tokens.div_ceil(EMBED_CHUNK);
    fits_i32("embedding gradient scratch", scratch.len())?;
    aligned4("ids", ids.addr(), ids.len())?;
    aligned4("embedding output gradient", grad_out.addr(), grad_out.len())?;
    aligned4("embedding gradient", grad_table.addr(), grad_table.len())?;
    aligned4("embedding gradient scratch", scratch.addr(), scratch.len())?;
    moekit_cuda::ensure_addressable(on, &[ids.space(), grad_out.space(), grad_table.space(), scratch.space()])?;
    if dim == 0 {
        return Ok(());
    }
    let base = scratch.addr();
    let params = moekit_abi::MoekitEmbedBackwardParams {
        ids: ids.addr(),
        grad_out: grad_out.addr(),
        grad_table: grad_table.addr(),
        chunk_counts: base,
        offsets: base + 4 * (chunks * vocab) as u64,
        order: base + 4 * (chunks * vocab + vocab + 1) as u64,
        tokens: tokens as u64,
        vocab: vocab as i32,
        dim: fits_i32("embedding dim", dim)?,
        chunks: chunks as i32,
        accumulate: accumulate as i32,
    };
    let one = |block: u32| LaunchConfig { grid: (1, 1, 1), block: (block, 1, 1), shared_mem_bytes: 0 };
    let per_chunk =
        LaunchConfig { grid: (chunks.max(1) as u32, 1, 1), block: (EMBED_CHUNK as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY (all five launches): one MoekitEmbedBackwardParams by value (layout checked by
    // moekit-abi's tests). The scratch has chunks * vocab + vocab + 1 + tokens i32 (checked),
    // split into chunk counts, offsets and positions as above; count and scatter run one block
    // per chunk and read ids[0..tokens]; every id is range-checked before it indexes anything;
    // the scatter writes order[0..valid tokens) (offsets are an exclusive scan of the counts);
    // the sum reads grad_out rows at the scattered positions (< tokens) and writes grad_table
    // [vocab, dim]. 16-byte accesses only where the kernel finds them aligned. Every buffer
    // lives where `on` runs; the launches run in order on `on`.
    unsafe {
        if chunks > 0 {
            moekit_cuda::launch(on, &NORM, "moekit_embed_bwd_count", per_chunk, (params,))?;
        }
        let cols = grid(on, "moekit_embed_bwd_columns", 256, vocab.div_ceil(256))?;
        moekit_cuda::launch(on, &NORM, "moekit_embed_bwd_columns", cols, (params,))?;
        moekit_cuda::launch(on, &NORM, "moekit_embed_bwd_offsets", one(256), (params,))?;
        if chunks > 0 {
            moekit_cuda::launch(on, &NORM, "moekit_embed_bwd_scatter", per_chunk, (params,))?;
        }
        let sum = grid(on, "moekit_embed_bwd_sum", 128, vocab)?;
        moekit_cuda::launch(on, &NORM, "moekit_embed_bwd_sum", sum, (params,))
    }
}

/// The fused residual of [`rmsnorm`]: `x' = x + residual`, written to `sum`.
#[derive(Debug)]
pub struct Residual<'a> {
    /// `[rows, d]` added to `x`.
    pub residual: DevPtr<'a, f32>,
    /// `[rows, d]` out: `x + residual`.
    pub sum: DevPtrMut<'a, f32>,
}

/// RMSNorm forward over rows of `d = weight.len()`: `y = (x' inv) g` (F32 or BF16) and
/// `inv_rms [rows]`, `x' = x` or `x + residual` (then also written to `residual.sum`).
pub fn rmsnorm(
    on: &dyn Launcher,
    x: DevPtr<'_, f32>,
    residual: Option<Residual<'_>>,
    weight: DevPtr<'_, f32>,
    eps: f32,
    y: Out<'_>,
    inv_rms: DevPtrMut<'_, f32>,
) -> Result<()> {
    let dim = weight.len();
    let rows = rows_of("rmsnorm input", x.len(), dim)?;
    fits_i32("rmsnorm dim", dim)?;
    expect_len("rmsnorm output", y.len(), x.len())?;
    expect_len("rmsnorm inv_rms", inv_rms.len(), rows)?;
    aligned4("rmsnorm input", x.addr(), x.len())?;
    aligned4("rmsnorm weight", weight.addr(), weight.len())?;
    aligned4("rmsnorm inv_rms", inv_rms.addr(), rows)?;
    moekit_cuda::check_aligned("rmsnorm output", y.addr(), y.len(), y.align())?;
    let mut spaces = vec![x.space(), weight.space(), y.space(), inv_rms.space()];
    let (res, sum) = match &residual {
        Some(r) => {
            expect_len("rmsnorm residual", r.residual.len(), x.len())?;
            expect_len("rmsnorm sum output", r.sum.len(), x.len())?;
            aligned4("rmsnorm residual", r.residual.addr(), x.len())?;
            aligned4("rmsnorm sum output", r.sum.addr(), x.len())?;
            spaces.extend([r.residual.space(), r.sum.space()]);
            (r.residual.addr(), r.sum.addr())
        }
        None => (0, 0),
    };
    moekit_cuda::ensure_addressable(on, &spaces)?;
    if rows == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitRmsNormParams {
        x: x.addr(),
        residual: res,
        sum_out: sum,
        weight: weight.addr(),
        y: y.addr(),
        inv_rms: inv_rms.addr(),
        rows: rows as u64,
        dim: dim as i32,
        eps,
        y_dtype: y.abi(),
        _pad: 0,
    };
    let cfg = grid(on, "moekit_rmsnorm_fwd", 256, rows.div_ceil(8))?;
    // SAFETY: one MoekitRmsNormParams by value; the kernel reads rows * dim values of x (and of
    // the residual), dim weights, writes rows * dim of y (and sum) and rows inv_rms, all lengths
    // checked; 16-byte accesses only where it finds them aligned; all buffers live where `on` runs.
    unsafe { moekit_cuda::launch(on, &NORM, "moekit_rmsnorm_fwd", cfg, (params,)) }
}

/// F32 scratch elements of [`rmsnorm_backward`]: `ceil(rows / 64) * d`.
pub fn rmsnorm_backward_scratch_len(rows: usize, dim: usize) -> usize {
    rows.div_ceil(NORM_BWD_ROWS) * dim
}

/// RMSNorm backward (two launches): `grad_x [rows, d]` (plus `grad_residual` when given: the
/// residual branch's gradient, added in the same pass) and `grad_weight [d]` (`accumulate`:
/// added to; else overwritten) from the forward's `x'`, `inv_rms` and `grad_y`. `scratch`
/// holds [`rmsnorm_backward_scratch_len`] f32 (contents irrelevant).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    on: &dyn Launcher,
    x: DevPtr<'_, f32>,
    weight: DevPtr<'_, f32>,
    inv_rms: DevPtr<'_, f32>,
    grad_y: DevPtr<'_, f32>,
    grad_residual: Option<DevPtr<'_, f32>>,
    grad_x: DevPtrMut<'_, f32>,
    grad_weight: DevPtrMut<'_, f32>,
    scratch: DevPtrMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    let dim = weight.len();
    let rows = rows_of("rmsnorm_backward input", x.len(), dim)?;
    fits_i32("rmsnorm dim", dim)?;
    let blocks = rows.div_ceil(NORM_BWD_ROWS);
    fits_i32("rmsnorm_backward row blocks", blocks)?;
    expect_len("rmsnorm_backward inv_rms", inv_rms.len(), rows)?;
    expect_len("rmsnorm_backward grad_y", grad_y.len(), x.len())?;
    expect_len("rmsnorm_backward grad_x", grad_x.len(), x.len())?;
    expect_len("rmsnorm_backward grad_weight", grad_weight.len(), dim)?;
    expect_len("rmsnorm_backward scratch", scratch.len(), rmsnorm_backward_scratch_len(rows, dim))?;
    let mut spaces = vec![x.space(), weight.space(), inv_rms.space(), grad_y.space(), grad_x.space()];
    spaces.extend([grad_weight.space(), scratch.space()]);
    for (what, addr, len) in [
        ("rmsnorm_backward input", x.addr(), x.len()),
        ("rmsnorm weight", weight.addr(), dim),
        ("rmsnorm inv_rms", inv_rms.addr(), rows),
        ("rmsnorm_backward grad_y", grad_y.addr(), x.len()),
        ("rmsnorm_backward grad_x", grad_x.addr(), x.len()),
        ("rmsnorm_backward grad_weight", grad_weight.addr(), dim),
        ("rmsnorm_backward scratch", scratch.addr(), scratch.len()),
    ] {
        aligned4(what, addr, len)?;
    }
    if let Some(r) = &grad_residual {
        expect_len("rmsnorm_backward grad_residual", r.len(), x.len())?;
        aligned4("rmsnorm_backward grad_residual", r.addr(), r.len())?;
        spaces.push(r.space());
    }
    moekit_cuda::ensure_addressable(on, &spaces)?;
    let params = moekit_abi::MoekitRmsNormBackwardParams {
        x: x.addr(),
        weight: weight.addr(),
        inv_rms: inv_rms.addr(),
        grad_y: grad_y.addr(),
        grad_residual: grad_residual.map_or(0, |r| r.addr()),
        grad_x: grad_x.addr(),
        grad_weight: grad_weight.addr(),
        partial: scratch.addr(),
        rows: rows as u64,
        dim: dim as i32,
        blocks: blocks as i32,
        accumulate: accumulate as i32,
        _pad: 0,
    };
    // SAFETY (both launches): one MoekitRmsNormBackwardParams by value; the rows kernel reads
    // rows * dim of x, grad_y (and grad_residual), rows inv_rms, dim weights and writes rows * dim
    // of grad_x and blocks * dim partial sums (the scratch, length checked); the dg kernel reads
    // the partials and writes (or updates) dim values of grad_weight. 16-byte accesses only
    // where the kernel finds them aligned; all buffers live where `on` runs; in order on `on`.
    unsafe {
        if rows > 0 {
            let cfg = grid(on, "moekit_rmsnorm_bwd", 256, blocks)?;
            moekit_cuda::launch(on, &NORM, "moekit_rmsnorm_bwd", cfg, (params,))?;
        }
        if dim > 0 {
            let cfg = grid(on, "moekit_rmsnorm_bwd_dg", 256, dim.div_ceil(256))?;
            moekit_cuda::launch(on, &NORM, "moekit_rmsnorm_bwd_dg", cfg, (params,))?;
        }
    }
    Ok(())
}

/// Residual add `out = a + b` (equal lengths).
pub fn add(on: &dyn Launcher, a: DevPtr<'_, f32>, b: DevPtr<'_, f32>, out: DevPtrMut<'_, f32>) -> Result<()> {
    expect_len("add operand", b.len(), a.len())?;
    expect_len("add output", out.len(), a.len())?;
    aligned4("add operand", a.addr(), a.len())?;
    aligned4("add operand", b.addr(), b.len())?;
    aligned4("add output", out.addr(), out.len())?;
    moekit_cuda::ensure_addressable(on, &[a.space(), b.space(), out.space()])?;
    if a.is_empty() {
        return Ok(());
    }
    let params = moekit_abi::MoekitAddParams { a: a.addr(), b: b.addr(), out: out.addr(), n: a.len() as u64 };
    let cfg = grid(on, "moekit_add", 256, a.len().div_ceil(4 * 256))?;
    // SAFETY: one MoekitAddParams by value; n elements of each buffer (lengths equal, checked);
    // 16-byte accesses only when all three are aligned (checked by the kernel); all live where
    // `on` runs.
    unsafe { moekit_cuda::launch(on, &NORM, "moekit_add", cfg, (params,)) }
}

/// The tables of [`rope`] on the device: `cos`, `sin [max_pos, head_dim / 2]`.
#[derive(Debug, Clone, Copy)]
pub struct RopeTables<'a> {
    /// Head dimension (even).
    pub head_dim: usize,
    /// `[max_pos, head_dim / 2]`.
    pub cos: DevPtr<'a, f32>,
    /// `[max_pos, head_dim / 2]`.
    pub sin: DevPtr<'a, f32>,
}

/// RoPE in place on the first `heads` heads of every row of `x [rows, row_stride]` (a packed
/// `qkv` row: q heads then k heads), row `r` at `positions[r]`; `inverse` rotates by minus the
/// angle (the backward). Rows at positions outside `[0, max_pos)` are left unrotated (see
/// [`check_ids`] for the error).
pub fn rope(
    on: &dyn Launcher,
    x: DevPtrMut<'_, f32>,
    row_stride: usize,
    heads: usize,
    positions: DevPtr<'_, i32>,
    tables: RopeTables<'_>,
    inverse: bool,
) -> Result<()> {
    let hd = tables.head_dim;
    if hd == 0 || hd % 2 != 0 {
        return Err(Error::Shape(format!("RoPE: head_dim {hd} must be even and positive")));
    }
    let max_pos = rows_of("RoPE cos table", tables.cos.len(), hd / 2)?;
    expect_len("RoPE sin table", tables.sin.len(), tables.cos.len())?;
    let rows = crate::reference::check_rope(x.len(), row_stride, heads, hd, positions.len())?;
    for (what, addr, len) in [
        ("RoPE input", x.addr(), x.len()),
        ("RoPE positions", positions.addr(), rows),
        ("RoPE cos table", tables.cos.addr(), tables.cos.len()),
        ("RoPE sin table", tables.sin.addr(), tables.sin.len()),
    ] {
        aligned4(what, addr, len)?;
    }
    moekit_cuda::ensure_addressable(on, &[x.space(), positions.space(), tables.cos.space(), tables.sin.space()])?;
    if rows == 0 {
        return Ok(());
    }
    let params = moekit_abi::MoekitRopeParams {
        x: x.addr(),
        positions: positions.addr(),
        cos: tables.cos.addr(),
        sin: tables.sin.addr(),
        rows: rows as u64,
        row_stride: fits_i32("RoPE row stride", row_stride)?,
        heads: heads as i32,
        head_dim: hd as i32,
        max_pos: fits_i32("RoPE positions", max_pos)?,
        inverse: inverse as i32,
        _pad: 0,
    };
    let cfg = grid(on, "moekit_rope", 256, (rows * heads * hd / 2).div_ceil(256))?;
    // SAFETY: one MoekitRopeParams by value; the kernel reads rows positions, and for rows whose
    // position is in [0, max_pos) reads and writes the first heads * head_dim <= row_stride
    // values of the row (x has rows * row_stride) and one table row of head_dim / 2 values of
    // cos and sin (max_pos rows each); 16-byte accesses only where it finds them aligned; all
    // buffers live where `on` runs.
    unsafe { moekit_cuda::launch(on, &NORM, "moekit_rope", cfg, (params,)) }
}
