//! CPU reference: f64 accumulation on f32 (dequantized) inputs, plus the FP8 helpers and the
//! accuracy metric. Written for clarity, not speed: tests use small shapes.
//!
//! The grouped functions return a `Shape` error for slices of the wrong length and never
//! panic. On ids they are as lenient as the raw kernels (they skip `m_indices` ids outside
//! `[0, groups)`, clamp `masked_m` and k-grouped ranges to the rows there are), so they model
//! the kernels on any input; the tensor ops reject out-of-range `masked_m` and offsets before
//! either runs.

use crate::{Error, Result, ScaleLayout, SCALE_BLOCK};
use moekit_dtype::F8E4M3;

/// `C [m, n] = A [m, k] . B [n, k]^T`, accumulated in f64 (a test helper: panics when `a` or
/// `b` is shorter than `m k` or `n k`).
pub fn gemm_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|l| a[i * k + l] as f64 * b[j * k + l] as f64).sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

fn check(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape(format!("{what}: {got} values, expected {want}")))
    }
}

/// m-grouped contiguous: for every row `r` with `0 <= m_indices[r] < groups`,
/// `d[r] = a[r] . b[m_indices[r]]^T`; other rows of `d [m, n]` are left as they are.
pub fn m_grouped_contiguous(
    a: &[f32],
    b: &[f32],
    m_indices: &[i32],
    groups: usize,
    n: usize,
    k: usize,
    d: &mut [f32],
) -> Result<()> {
    let m = m_indices.len();
    check("a", a.len(), m * k)?;
    check("b", b.len(), groups * n * k)?;
    check("d", d.len(), m * n)?;
    for (r, &g) in m_indices.iter().enumerate() {
        if g < 0 || g as usize >= groups {
            continue;
        }
        let row = gemm_nt(&a[r * k..(r + 1) * k], &b[g as usize * n * k..(g as usize + 1) * n * k], 1, n, k);
        d[r * n..(r + 1) * n].copy_from_slice(&row);
    }
    Ok(())
}

/// m-grouped masked: `d[g, r] = a[g, r] . b[g]^T` for `r < masked_m[g]` (clamped to
/// `[0, m_max]`, as the kernel does); other rows untouched.
pub fn m_grouped_masked(
    a: &[f32],
    b: &[f32],
    masked_m: &[i32],
    m_max: usize,
    n: usize,
    k: usize,
    d: &mut [f32],
) -> Result<()> {
    let groups = masked_m.len();
    check("a", a.len(), groups * m_max * k)?;
    check("b", b.len(), groups * n * k)?;
    check("d", d.len(), groups * m_max * n)?;
    for (g, &valid) in masked_m.iter().enumerate() {
        let rows = (valid.max(0) as usize).min(m_max);
        let c = gemm_nt(&a[g * m_max * k..(g * m_max + rows) * k], &b[g * n * k..(g + 1) * n * k], rows, n, k);
        d[g * m_max * n..(g * m_max + rows) * n].copy_from_slice(&c);
    }
    Ok(())
}

/// k-grouped weight gradient: `dw[g] [n, k] = sum_{t in [offsets[g], offsets[g+1])} dy[t]^T x[t]`
/// from `dy [m, n]` and `x [m, k]` (natural layouts), added to `dw` when `accumulate`. Each range
/// is clamped to `[0, m]` (empty when `offsets[g + 1] < offsets[g]`), as the kernel does.
pub fn k_grouped(
    dy: &[f32],
    x: &[f32],
    offsets: &[i32],
    n: usize,
    k: usize,
    accumulate: bool,
    dw: &mut [f32],
) -> Result<()> {
    let groups = offsets.len().saturating_sub(1);
    if n == 0 {
        return Err(Error::Shape("k-grouped reference with n = 0".into()));
    }
    let m = dy.len() / n;
    check("dy", dy.len(), m * n)?;
    check("x", x.len(), m * k)?;
    check("dw", dw.len(), groups * n * k)?;
    for g in 0..groups {
        let lo = (offsets[g].max(0) as usize).min(m);
        let hi = (offsets[g + 1].max(0) as usize).clamp(lo, m);
        for i in 0..n {
            for j in 0..k {
                let s: f64 = (lo..hi).map(|t| dy[t * n + i] as f64 * x[t * k + j] as f64).sum();
                let o = &mut dw[g * n * k + i * k + j];
                *o = if accumulate { (*o as f64 + s) as f32 } else { s as f32 };
            }
        }
    }
    Ok(())
}

/// Activation gradient: `dx[r] [k] = dy[r] [n] . w[m_indices[r]] [n, k]` for rows with a valid
/// group; other rows of `dx [m, k]` untouched.
pub fn dgrad(
    dy: &[f32],
    w: &[f32],
    m_indices: &[i32],
    groups: usize,
    n: usize,
    k: usize,
    dx: &mut [f32],
) -> Result<()> {
    let m = m_indices.len();
    check("dy", dy.len(), m * n)?;
    check("w", w.len(), groups * n * k)?;
    check("dx", dx.len(), m * k)?;
    for (r, &g) in m_indices.iter().enumerate() {
        if g < 0 || g as usize >= groups {
            continue;
        }
        let wg = &w[g as usize * n * k..(g as usize + 1) * n * k];
        for j in 0..k {
            dx[r * k + j] = (0..n).map(|i| dy[r * n + i] as f64 * wg[i * k + j] as f64).sum::<f64>() as f32;
        }
    }
    Ok(())
}

/// DeepGEMM's accuracy metric, in f64: `1 - 2 sum(x y) / sum(x^2 + y^2)` (0 when equal).
pub fn diff(x: &[f32], y: &[f32]) -> f64 {
    let (mut xy, mut sq) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        xy += a as f64 * b as f64;
        sq += a as f64 * a as f64 + b as f64 * b as f64;
    }
    if sq == 0.0 {
        0.0
    } else {
        1.0 - 2.0 * xy / sq
    }
}

/// Quantizes `w [groups, n, k]` to E4M3 with one f32 scale per 128x128 block
/// (`[groups, n/128, k/128]`, `scale = max(amax, 1e-4) / 448`). A test and model helper:
/// `n` and `k` are multiples of 128 (codes past the last whole block stay 0); panics when `w`
/// holds fewer than `groups n k` values.
pub fn quantize_blocks(w: &[f32], groups: usize, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let (nb, kb) = (n / SCALE_BLOCK, k / SCALE_BLOCK);
    let mut codes = vec![0u8; w.len()];
    let mut scales = vec![0f32; groups * nb * kb];
    for g in 0..groups {
        for bi in 0..nb {
            for bj in 0..kb {
                let idx = |i: usize, j: usize| g * n * k + (bi * SCALE_BLOCK + i) * k + bj * SCALE_BLOCK + j;
                let mut amax = 0.0f32;
                for i in 0..SCALE_BLOCK {
                    for j in 0..SCALE_BLOCK {
                        amax = amax.max(w[idx(i, j)].abs());
                    }
                }
                let amax = amax.max(moekit_dispatch::AMAX_FLOOR);
                let (scale, inv) = (amax / 448.0, 448.0 / amax);
                for i in 0..SCALE_BLOCK {
                    for j in 0..SCALE_BLOCK {
                        codes[idx(i, j)] = F8E4M3::from_f32(w[idx(i, j)] * inv).to_bits();
                    }
                }
                scales[(g * nb + bi) * kb + bj] = scale;
            }
        }
    }
    (codes, scales)
}

/// Dequantizes `[groups, n, k]` E4M3 codes with 128x128 block scales
/// (`[groups, n/128, k/128]`). Errors unless `n` and `k` are multiples of 128 (`Alignment`)
/// and the lengths match (`Shape`).
pub fn dequantize_blocks(codes: &[u8], scales: &[f32], groups: usize, n: usize, k: usize) -> Result<Vec<f32>> {
    block_multiple("weight rows", n)?;
    block_multiple("weight columns", k)?;
    let (nb, kb) = (n / SCALE_BLOCK, k / SCALE_BLOCK);
    check("codes", codes.len(), groups * n * k)?;
    check("block scales", scales.len(), groups * nb * kb)?;
    Ok((0..groups * n * k)
        .map(|i| {
            let (g, r, c) = (i / (n * k), (i / k) % n, i % k);
            F8E4M3::from_bits(codes[i]).to_f32() * scales[(g * nb + r / SCALE_BLOCK) * kb + c / SCALE_BLOCK]
        })
        .collect())
}

/// Dequantizes `[rows, cols]` E4M3 codes with 1x128 scales in `layout`. Errors unless `cols`
/// is a multiple of 128 (`Alignment`) and the lengths match (`Shape`).
pub fn dequantize_tokens(
    codes: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    layout: ScaleLayout,
) -> Result<Vec<f32>> {
    block_multiple("1x128-scaled columns", cols)?;
    check("codes", codes.len(), rows * cols)?;
    check("1x128 scales", scales.len(), layout.len(rows, cols))?;
    Ok((0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            F8E4M3::from_bits(codes[i]).to_f32() * scales[layout.index(rows, cols, r, c / SCALE_BLOCK)]
        })
        .collect())
}

fn block_multiple(what: &str, v: usize) -> Result<()> {
    if v % SCALE_BLOCK == 0 {
        Ok(())
    } else {
        Err(Error::Alignment { what: what.into(), required: SCALE_BLOCK, got: v })
    }
}
