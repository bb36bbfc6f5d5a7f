//! CPU reference: the kernels' arithmetic in the kernels' order (correctly rounded f32
//! operations only, never contracted; `mul_add` is a true fma), so every kernel's output is
//! compared bit for bit.

use crate::{expect_len, rows_of, Error, IdStatus, Result, NORM_BWD_ROWS};

/// Lanes of the kernels' warp-per-row reductions.
pub const LANES: usize = 32;

/// `sum_c a[c] b[c]` in the RMSNorm kernels' order: element `c` belongs to lane
/// `(c / 4) % 32`, each lane adds its elements in increasing `c` by an fma (`acc = fma(a, b,
/// acc)`), then the warp butterfly ([`moekit_fmath::warp_sum`]: partner 16 apart first).
pub fn lane_dot(a: impl Fn(usize) -> f32, b: impl Fn(usize) -> f32, n: usize) -> f32 {
    let mut lanes = [0.0f32; LANES];
    for c in 0..n {
        let l = (c / 4) % LANES;
        lanes[l] = a(c).mul_add(b(c), lanes[l]);
    }
    moekit_fmath::warp_sum(&lanes)
}

/// Ids outside `[0, bound)`: their count and the first position.
pub fn check_ids(ids: &[i32], bound: usize) -> IdStatus {
    let bad = |v: i32| v < 0 || v as usize >= bound;
    IdStatus { bad: ids.iter().filter(|&&v| bad(v)).count(), first: ids.iter().position(|&v| bad(v)) }
}

fn valid(id: i32, vocab: usize) -> Option<usize> {
    (id >= 0 && (id as usize) < vocab).then_some(id as usize)
}

/// Embedding gather: `out [T, d]` from `table [vocab, d]` and `ids [T]`; a zero row for an id
/// outside `[0, vocab)`. Returns the id status.
pub fn embedding(table: &[f32], vocab: usize, ids: &[i32], out: &mut [f32]) -> Result<IdStatus> {
    let dim = rows_of("embedding table", table.len(), vocab)
        .map_err(|_| Error::Shape(format!("embedding table: {} values are not {vocab} rows", table.len())))?;
    expect_len("embedding output", out.len(), ids.len() * dim)?;
    for (row, &id) in out.chunks_exact_mut(dim.max(1)).zip(ids) {
        match valid(id, vocab) {
            Some(v) => row.copy_from_slice(&table[v * dim..][..dim]),
            None => row.fill(0.0),
        }
    }
    Ok(check_ids(ids, vocab))
}

/// Embedding gradient: `grad [vocab, d] = (accumulate ? grad : 0) + sum over t with ids[t] ==
/// v of dout[t, :]`, added in increasing `t` (ids out of range skipped). The kernels' bits.
pub fn embedding_backward(
    ids: &[i32],
    dout: &[f32],
    grad: &mut [f32],
    vocab: usize,
    accumulate: bool,
) -> Result<IdStatus> {
    let dim = rows_of("embedding gradient", grad.len(), vocab)?;
    expect_len("embedding output gradient", dout.len(), ids.len() * dim)?;
    if !accumulate {
        grad.fill(0.0);
    }
    for (t, &id) in ids.iter().enumerate() {
        if let Some(v) = valid(id, vocab) {
            for (g, &d) in grad[v * dim..][..dim].iter_mut().zip(&dout[t * dim..][..dim]) {
                *g += d;
            }
        }
    }
    Ok(check_ids(ids, vocab))
}

/// RMSNorm forward over rows of `d = g.len()`: `x' = x (+ residual)`, `inv = 1 / sqrt(s / d +
/// eps)` with `s` = [`lane_dot`] of `x'` with itself, `y = (x' * inv) * g`. Writes `y`, `inv`
/// (one per row) and, with a residual, `sum = x'`.
pub fn rmsnorm(
    x: &[f32],
    residual: Option<(&[f32], &mut [f32])>,
    g: &[f32],
    eps: f32,
    y: &mut [f32],
    inv: &mut [f32],
) -> Result<()> {
    let d = g.len();
    let rows = rows_of("rmsnorm input", x.len(), d)?;
    expect_len("rmsnorm output", y.len(), x.len())?;
    expect_len("rmsnorm inv_rms", inv.len(), rows)?;
    let mut res = residual;
    if let Some((r, s)) = &res {
        expect_len("rmsnorm residual", r.len(), x.len())?;
        expect_len("rmsnorm sum output", s.len(), x.len())?;
    }
    let mut row = vec![0.0f32; d];
    for i in 0..rows {
        let xr = &x[i * d..][..d];
        match &mut res {
            Some((r, s)) => {
                for c in 0..d {
                    row[c] = xr[c] + r[i * d + c];
                }
                s[i * d..][..d].copy_from_slice(&row);
            }
            None => row.copy_from_slice(xr),
        }
        let s = lane_dot(|c| row[c], |c| row[c], d);
        let iv = 1.0 / (s / d as f32 + eps).sqrt();
        inv[i] = iv;
        for c in 0..d {
            y[i * d + c] = row[c] * iv * g[c];
        }
    }
    Ok(())
}

/// RMSNorm backward: `dx = (grad_residual +) (dy g) inv - x k`, `k = ((lane_dot(dy g, x) / d)
/// inv) inv inv`; `dg = (accumulate ? dg : 0) +` the partial sums over blocks of
/// [`NORM_BWD_ROWS`] rows (each `sum (dy x) inv` in row order from 0) in block order.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    x: &[f32],
    g: &[f32],
    inv: &[f32],
    dy: &[f32],
    grad_residual: Option<&[f32]>,
    dx: &mut [f32],
    dg: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let d = g.len();
    let rows = rows_of("rmsnorm_backward input", x.len(), d)?;
    expect_len("rmsnorm_backward inv_rms", inv.len(), rows)?;
    expect_len("rmsnorm_backward grad_y", dy.len(), x.len())?;
    expect_len("rmsnorm_backward grad_x", dx.len(), x.len())?;
    expect_len("rmsnorm_backward grad_weight", dg.len(), d)?;
    if let Some(r) = grad_residual {
        expect_len("rmsnorm_backward grad_residual", r.len(), x.len())?;
    }
    let mut total: Vec<f32> = if accumulate { dg.to_vec() } else { vec![0.0; d] };
    let mut part = vec![0.0f32; d];
    for b0 in (0..rows).step_by(NORM_BWD_ROWS) {
        part.fill(0.0);
        for i in b0..rows.min(b0 + NORM_BWD_ROWS) {
            let (xr, dr) = (&x[i * d..][..d], &dy[i * d..][..d]);
            let iv = inv[i];
            let dot = lane_dot(|c| dr[c] * g[c], |c| xr[c], d);
            let k = dot / d as f32 * iv * iv * iv;
            for c in 0..d {
                let mut o = dr[c] * g[c] * iv - xr[c] * k;
                if let Some(r) = grad_residual {
                    o += r[i * d + c]; // = r + o (IEEE addition commutes)
                }
                dx[i * d + c] = o;
                part[c] += dr[c] * xr[c] * iv;
            }
        }
        for (t, p) in total.iter_mut().zip(&part) {
            *t += p;
        }
    }
    dg.copy_from_slice(&total);
    Ok(())
}

/// Residual add `out = a + b`.
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) -> Result<()> {
    expect_len("add operand", b.len(), a.len())?;
    expect_len("add output", out.len(), a.len())?;
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
    Ok(())
}

/// RoPE tables `cos, sin [max_pos, head_dim / 2]`, the model's formula (moekit-model
/// `layers::Rope::new`): `freq_i = theta^(-2i / hd)` and `cos(p freq_i)`, `sin(p freq_i)` in
/// f64, rounded to f32. Built on the host and passed to the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    /// Head dimension (even).
    pub head_dim: usize,
    /// Positions `0..max_pos`.
    pub max_pos: usize,
    /// `[max_pos, head_dim / 2]`.
    pub cos: Vec<f32>,
    /// `[max_pos, head_dim / 2]`.
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for an even `head_dim > 0`, `max_pos > 0` positions, base `theta`.
    pub fn new(head_dim: usize, max_pos: usize, theta: f32) -> Result<RopeTable> {
        if head_dim == 0 || head_dim % 2 != 0 || max_pos == 0 {
            return Err(Error::Shape(format!(
                "RoPE tables: head_dim {head_dim} must be even and positive, max_pos {max_pos} positive"
            )));
        }
        crate::fits_i32("RoPE head_dim", head_dim)?;
        crate::fits_i32("RoPE positions", max_pos)?;
        let half = head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(max_pos * half), Vec::with_capacity(max_pos * half));
        for p in 0..max_pos {
            for i in 0..half {
                let freq = (theta as f64).powf(-(2.0 * i as f64) / head_dim as f64);
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(RopeTable { head_dim, max_pos, cos, sin })
    }
}

/// Checks a RoPE call: `x [rows, row_stride]` with `heads * head_dim <= row_stride` and one
/// position per row. Returns the rows.
pub(crate) fn check_rope(
    x_len: usize,
    row_stride: usize,
    heads: usize,
    head_dim: usize,
    positions: usize,
) -> Result<usize> {
    let rows = rows_of("RoPE input", x_len, row_stride)?;
    if heads == 0 || heads.checked_mul(head_dim).is_none_or(|w| w > row_stride) {
        return Err(Error::Shape(format!(
            "RoPE: {heads} heads of {head_dim} do not fit rows of {row_stride} (at least one head)"
        )));
    }
    expect_len("RoPE positions", positions, rows)?;
    Ok(rows)
}

/// RoPE in place on the first `heads` heads of every row of `x [rows, row_stride]`, row `r` at
/// `positions[r]` (`inverse`: rotation by minus the angle, the backward). Rows at positions
/// outside the table are left as they are; returns the position status.
pub fn rope(
    x: &mut [f32],
    row_stride: usize,
    heads: usize,
    table: &RopeTable,
    positions: &[i32],
    inverse: bool,
) -> Result<IdStatus> {
    let hd = table.head_dim;
    check_rope(x.len(), row_stride, heads, hd, positions.len())?;
    let half = hd / 2;
    for (row, &p) in x.chunks_exact_mut(row_stride).zip(positions) {
        let Some(p) = valid(p, table.max_pos) else { continue };
        let (c, s) = (&table.cos[p * half..][..half], &table.sin[p * half..][..half]);
        for head in row[..heads * hd].chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                let sn = if inverse { -s[i] } else { s[i] };
                head[i] = a * c[i] - b * sn;
                head[i + half] = b * c[i] + a * sn;
            }
        }
    }
    Ok(check_ids(positions, table.max_pos))
}
