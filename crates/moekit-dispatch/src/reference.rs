//! CPU reference of every dispatch kernel, written for clarity. Same arithmetic in the same
//! order as the kernels (explicitly rounded f32, `moekit_fmath`), so results agree bit for bit;
//! the kernels' lane structure appears only where it fixes a summation order.

use crate::{ActFormat, DispatchConfig, Error, Padding, Result, ScaleKind, AMAX_FLOOR, QUANT_GROUP};
use moekit_dtype::{bf16, F8E4M3};
use moekit_fmath as fm;

/// The dispatch layout (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `[E + 1]` aligned segment starts; `offsets[E]` = rows used.
    pub offsets: Vec<i32>,
    /// `[E]` pairs routed to each expert.
    pub counts: Vec<i32>,
    /// `[T * k]` row of each (token, slot), -1 when not routed (or past `max_rows`).
    pub row_map: Vec<i32>,
    /// `[max_rows]` expert of each row, -1 for padding.
    pub m_indices: Vec<i32>,
    /// Ids outside `[-1, E)` (treated as not routed).
    pub invalid_ids: usize,
}

/// Computes the layout of `ids [T * k]` with `max_rows` output rows. Rows inside an expert
/// follow the pair index `t * k + j`; rows needed beyond `max_rows` are dropped (map -1).
pub fn layout(ids: &[i32], cfg: &DispatchConfig, max_rows: usize) -> Result<Layout> {
    cfg.validate()?;
    if ids.len() % cfg.top_k != 0 {
        return Err(Error::Shape(format!("{} ids are not rows of top_k = {}", ids.len(), cfg.top_k)));
    }
    let e_n = cfg.experts;
    let valid = |id: i32| (0..e_n as i32).contains(&id);
    let mut counts = vec![0i32; e_n];
    for &id in ids.iter().filter(|&&id| valid(id)) {
        counts[id as usize] += 1;
    }
    let mut offsets = vec![0i32; e_n + 1];
    for e in 0..e_n {
        offsets[e + 1] = offsets[e] + (counts[e] as usize).div_ceil(cfg.align) as i32 * cfg.align as i32;
    }
    let mut next: Vec<i32> = offsets[..e_n].to_vec();
    let mut m_indices = vec![-1i32; max_rows];
    let row_map = ids
        .iter()
        .map(|&id| {
            if !valid(id) {
                return -1;
            }
            let row = next[id as usize];
            next[id as usize] += 1;
            if (row as usize) < max_rows {
                m_indices[row as usize] = id;
                row
            } else {
                -1
            }
        })
        .collect();
    let invalid_ids = ids.iter().filter(|&&id| id != -1 && !valid(id)).count();
    Ok(Layout { offsets, counts, row_map, m_indices, invalid_ids })
}

/// Scale and multiplier of a 1x128 tile with maximum magnitude `amax` (NaN ignored).
pub fn tile_scale(amax: f32, kind: ScaleKind) -> (f32, f32) {
    let a = if amax > AMAX_FLOOR { amax } else { AMAX_FLOOR };
    match kind {
        ScaleKind::F32 => (a / 448.0, 448.0 / a),
        ScaleKind::Ue8m0 => {
            let b = (a / 448.0).to_bits();
            let e = ((b >> 23) & 0xff) as i32 - 127 + i32::from(b & 0x7f_ffff != 0);
            (f32::from_bits(((e + 127) as u32) << 23), f32::from_bits(((127 - e) as u32) << 23))
        }
    }
}

/// Writes one row of f32 values in `format` to `out` (`cols * elem_bytes` bytes) and its scales
/// via `put_scale(g, scale)`.
fn emit_row(v: &[f32], format: ActFormat, out: &mut [u8], mut put_scale: impl FnMut(usize, f32)) {
    match format {
        ActFormat::Bf16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes());
            }
        }
        ActFormat::Fp8(kind, _) => {
            for (g, (tile, o)) in v.chunks(QUANT_GROUP).zip(out.chunks_mut(QUANT_GROUP)).enumerate() {
                let amax = tile.iter().fold(0.0f32, |m, &x| if x.abs() > m { x.abs() } else { m });
                let (scale, inv) = tile_scale(amax, kind);
                for (q, &x) in o.iter_mut().zip(tile) {
                    *q = F8E4M3::from_f32(x * inv).to_bits();
                }
                put_scale(g, scale);
            }
        }
    }
}

fn check_out(format: ActFormat, rows: usize, cols: usize, out: &[u8], scales: &[f32]) -> Result<()> {
    format.check_cols(cols)?;
    if out.len() != rows * cols * format.elem_bytes() {
        return Err(Error::Shape(format!("output of {} bytes, expected {rows} x {cols} {format:?}", out.len())));
    }
    if let ActFormat::Fp8(_, l) = format {
        if scales.len() != l.len(rows, cols) {
            return Err(Error::Shape(format!("{} scales, expected {}", scales.len(), l.len(rows, cols))));
        }
    }
    Ok(())
}

/// Permutes `x [T, hidden]` to the layout's rows (`out`: `[rows, hidden]` in `format`, as
/// bytes; `scales` per the format's layout), padding rows inside segments (below `offsets[E]`)
/// per `padding`; rows at and past `offsets[E]`, and map entries outside `[0, rows)`, are left
/// untouched. BF16 rows are the input bits.
#[allow(clippy::too_many_arguments)]
pub fn permute(
    x: &[bf16],
    hidden: usize,
    layout: &Layout,
    top_k: usize,
    format: ActFormat,
    padding: Padding,
    out: &mut [u8],
    scales: &mut [f32],
) -> Result<()> {
    let rows = layout.m_indices.len();
    check_out(format, rows, hidden, out, scales)?;
    if x.len() != layout.row_map.len() / top_k * hidden {
        return Err(Error::Shape(format!(
            "x has {} values, expected {} tokens x {hidden}",
            x.len(),
            layout.row_map.len() / top_k
        )));
    }
    let row_bytes = hidden * format.elem_bytes();
    let layout_s = format.scale_layout();
    let mut write = |r: usize, v: &[f32], out: &mut [u8]| {
        emit_row(v, format, &mut out[r * row_bytes..(r + 1) * row_bytes], |g, s| {
            scales[layout_s.index(rows, hidden, r, g)] = s;
        })
    };
    for (t, tok) in x.chunks(hidden).enumerate() {
        let v: Vec<f32> = tok.iter().map(|b| b.to_f32()).collect();
        for &r in &layout.row_map[t * top_k..(t + 1) * top_k] {
            if r < 0 || r as usize >= rows {
                continue;
            }
            let r = r as usize;
            if format == ActFormat::Bf16 {
                for (o, b) in out[r * row_bytes..(r + 1) * row_bytes].chunks_exact_mut(2).zip(tok) {
                    o.copy_from_slice(&b.to_bits().to_le_bytes());
                }
            } else {
                write(r, &v, out);
            }
        }
    }
    if padding == Padding::Zero {
        // Every padding row is the same: quantize a zero row once, then copy it.
        let mut zero_row = vec![0u8; row_bytes];
        let mut zero_scales = vec![0f32; hidden / QUANT_GROUP];
        emit_row(&vec![0.0f32; hidden], format, &mut zero_row, |g, s| zero_scales[g] = s);
        let used = (layout.offsets.last().map_or(0, |&o| o.max(0)) as usize).min(rows);
        for r in (0..used).filter(|&r| layout.m_indices[r] < 0) {
            out[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&zero_row);
            if format != ActFormat::Bf16 {
                for (g, &s) in zero_scales.iter().enumerate() {
                    scales[layout_s.index(rows, hidden, r, g)] = s;
                }
            }
        }
    }
    Ok(())
}

/// 1x128 FP8 quantization (or BF16 rounding) of `x [rows, cols]`.
pub fn quantize(x: &[bf16], cols: usize, format: ActFormat, out: &mut [u8], scales: &mut [f32]) -> Result<()> {
    format.check_cols(cols)?;
    let rows = x.len() / cols;
    check_out(format, rows, cols, out, scales)?;
    let l = format.scale_layout();
    let row_bytes = cols * format.elem_bytes();
    for (r, row) in x.chunks(cols).enumerate() {
        let v: Vec<f32> = row.iter().map(|b| b.to_f32()).collect();
        emit_row(&v, format, &mut out[r * row_bytes..(r + 1) * row_bytes], |g, s| {
            scales[l.index(rows, cols, r, g)] = s
        });
    }
    Ok(())
}

/// `silu(g) * u = (g * sigmoid(g)) * u` (moekit's sigmoid, each product rounded).
pub fn swiglu_value(g: f32, u: f32) -> f32 {
    (g * fm::sigmoid(g)) * u
}

/// SwiGLU of `x [rows, 2 * cols]` (gate = first `cols` columns, up = the rest) into `out
/// [rows, cols]` in `format`.
pub fn swiglu(x: &[bf16], cols: usize, format: ActFormat, out: &mut [u8], scales: &mut [f32]) -> Result<()> {
    format.check_cols(cols)?;
    if x.len() % (2 * cols) != 0 {
        return Err(Error::Shape(format!("SwiGLU input of {} values is not rows of 2 x {cols}", x.len())));
    }
    let rows = x.len() / (2 * cols);
    check_out(format, rows, cols, out, scales)?;
    let l = format.scale_layout();
    let row_bytes = cols * format.elem_bytes();
    for (r, row) in x.chunks(2 * cols).enumerate() {
        let v: Vec<f32> = (0..cols).map(|c| swiglu_value(row[c].to_f32(), row[cols + c].to_f32())).collect();
        emit_row(&v, format, &mut out[r * row_bytes..(r + 1) * row_bytes], |g, s| {
            scales[l.index(rows, cols, r, g)] = s
        });
    }
    Ok(())
}

/// Gradient of SwiGLU: from `x [rows, 2 cols]` and `grad_out [rows, cols]`, `[rows, 2 cols]`
/// BF16: `d gate = (dh * u) * silu'(g)`, `d up = dh * silu(g)`, `silu'(g) = s (1 + g (1 - s))`.
pub fn swiglu_backward(x: &[bf16], grad_out: &[bf16], cols: usize) -> Result<Vec<bf16>> {
    ActFormat::Bf16.check_cols(cols)?;
    if x.len() % (2 * cols) != 0 || grad_out.len() * 2 != x.len() {
        return Err(Error::Shape(format!(
            "SwiGLU backward: x {} and grad {} values for {cols} columns",
            x.len(),
            grad_out.len()
        )));
    }
    let mut out = vec![bf16::ZERO; x.len()];
    for (r, (row, dh)) in x.chunks(2 * cols).zip(grad_out.chunks(cols)).enumerate() {
        for c in 0..cols {
            let (g, u, d) = (row[c].to_f32(), row[cols + c].to_f32(), dh[c].to_f32());
            let s = fm::sigmoid(g);
            let silu = g * s;
            let dsilu = s * (1.0 + g * (1.0 - s));
            out[r * 2 * cols + c] = bf16::from_f32((d * u) * dsilu);
            out[r * 2 * cols + cols + c] = bf16::from_f32(d * silu);
        }
    }
    Ok(out)
}

fn check_combine(hidden: usize, row_map: &[i32], top_k: usize, weights: Option<&[f32]>) -> Result<usize> {
    ActFormat::Bf16.check_cols(hidden)?;
    if top_k == 0 || row_map.len() % top_k != 0 {
        return Err(Error::Shape(format!("row map of {} entries for top_k = {top_k}", row_map.len())));
    }
    if let Some(w) = weights {
        if w.len() != row_map.len() {
            return Err(Error::Shape(format!("{} weights for {} slots", w.len(), row_map.len())));
        }
    }
    Ok(row_map.len() / top_k)
}

/// `out[t] = sum_j w[t, j] * y[row(t, j)]` (`w = 1` when `weights` is None): f32, slot order,
/// rows outside `[0, rows)` skipped, BF16 out (RNE).
pub fn combine(y: &[bf16], hidden: usize, row_map: &[i32], top_k: usize, weights: Option<&[f32]>) -> Result<Vec<bf16>> {
    let rows = y.len() / hidden.max(1);
    let tokens = check_combine(hidden, row_map, top_k, weights)?;
    let mut out = vec![bf16::ZERO; tokens * hidden];
    for t in 0..tokens {
        let mut acc = vec![0.0f32; hidden];
        for j in 0..top_k {
            let r = row_map[t * top_k + j];
            if r < 0 || r as usize >= rows {
                continue;
            }
            let w = weights.map_or(1.0, |w| w[t * top_k + j]);
            for (a, v) in acc.iter_mut().zip(&y[r as usize * hidden..(r as usize + 1) * hidden]) {
                *a += w * v.to_f32();
            }
        }
        for (o, a) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(&acc) {
            *o = bf16::from_f32(*a);
        }
    }
    Ok(out)
}

/// Backward of [`combine`]: `grad_y [rows, hidden]` with `grad_y[row(t, j)] = w[t, j] *
/// grad_out[t]` (BF16) and every row no (token, slot) maps to that is padding in the layout
/// (`offsets`, `counts`) zeroed (other rows untouched), and `grad_w[t, j] = <grad_out[t],
/// y[row(t, j)]>` in f32 (lane `l` sums chunks `l, l + 32, ...` of 8 columns in order, then the
/// warp butterfly; 0 for unrouted slots) when weights are given.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward(
    y: &[bf16],
    grad_out: &[bf16],
    hidden: usize,
    row_map: &[i32],
    top_k: usize,
    weights: Option<&[f32]>,
    offsets: &[i32],
    counts: &[i32],
    grad_y: &mut [bf16],
) -> Result<Option<Vec<f32>>> {
    let rows = y.len() / hidden.max(1);
    let tokens = check_combine(hidden, row_map, top_k, weights)?;
    if grad_out.len() != tokens * hidden || grad_y.len() != y.len() || offsets.len() != counts.len() + 1 {
        return Err(Error::Shape("combine backward: mismatched lengths".into()));
    }
    let experts = counts.len();
    for r in 0..rows {
        let routed = (r as i32) < offsets[experts] && {
            let e = offsets.partition_point(|&o| o <= r as i32) - 1;
            (r as i32 - offsets[e]) < counts[e]
        };
        if !routed {
            grad_y[r * hidden..(r + 1) * hidden].fill(bf16::ZERO);
        }
    }
    let mut grad_w = weights.map(|_| vec![0.0f32; tokens * top_k]);
    for t in 0..tokens {
        let d: Vec<f32> = grad_out[t * hidden..(t + 1) * hidden].iter().map(|v| v.to_f32()).collect();
        for j in 0..top_k {
            let r = row_map[t * top_k + j];
            if r < 0 || r as usize >= rows {
                continue;
            }
            let r = r as usize;
            let w = weights.map_or(1.0, |w| w[t * top_k + j]);
            for (o, &dv) in grad_y[r * hidden..(r + 1) * hidden].iter_mut().zip(&d) {
                *o = bf16::from_f32(w * dv);
            }
            if let Some(gw) = grad_w.as_mut() {
                let mut lanes = [0.0f32; 32];
                for (c, chunk) in y[r * hidden..(r + 1) * hidden].chunks(8).enumerate() {
                    for (i, v) in chunk.iter().enumerate() {
                        lanes[c % 32] += d[c * 8 + i] * v.to_f32();
                    }
                }
                gw[t * top_k + j] = fm::warp_sum(&lanes);
            }
        }
    }
    Ok(grad_w)
}
