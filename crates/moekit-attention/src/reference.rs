//! The CPU reference, written in the kernels' operation order so that it computes their bits.
//!
//! Every operation is an IEEE-754 correctly rounded add, sub, mul, div or fma (`mul_add`;
//! Rust never contracts), `exp` is moekit's ([`moekit_fmath::exp`]) and [`log`] the mirror of
//! `kernels/include/moekit/attention/lse.cuh`. The orders (the kernels' too):
//! - [`dot`]: one fma chain from `+0` over the columns in order;
//! - forward, per query: keys in tiles of [`KEY_TILE`] at absolute positions; per tile the
//!   online-softmax update of [`attend`];
//! - backward ([`backward`]): `delta` by [`delta`]; per (query i, key j <= i) `p` and `ds` by
//!   [`score_grad`]; `dv_j`, `dk_j` fma chains over `i = j, j + 1, ...`, `dq_i` over
//!   `j = 0 ..= i`; `dk` and `dq` times the scale at the end.

use crate::{AttnShape, Error, Result, KEY_TILE};
use moekit_fmath::{exp, warp_sum};

/// `sum_c a[c] b[c]`: one fma chain from `+0`, `c` in order (the kernels' order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |acc, (&x, &y)| x.mul_add(y, acc))
}

/// Natural logarithm of a positive normal float, the same bits as the kernels' `log_pos`
/// (`kernels/include/moekit/attention/lse.cuh`, which documents the method; a change there
/// must change this). Other inputs give an unspecified value.
pub fn log(x: f32) -> f32 {
    let b = x.to_bits();
    let mut e = (b >> 23) as i32 - 127;
    let mut mb = (b & 0x007f_ffff) | 0x3f80_0000;
    if mb > 0x3fb5_04f3 {
        mb -= 0x0080_0000;
        e += 1;
    }
    let f = f32::from_bits(mb) - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut p = z.mul_add(f32::from_bits(0x3de3_8e39), f32::from_bits(0x3e12_4925));
    p = p.mul_add(z, f32::from_bits(0x3e4c_cccd));
    p = p.mul_add(z, f32::from_bits(0x3eaa_aaab));
    p *= z;
    let t = s + s;
    let lm = t.mul_add(p, t);
    let ef = e as f32;
    ef.mul_add(f32::from_bits(0x3f31_7200), ef.mul_add(f32::from_bits(0x35bf_be8e), lm))
}

/// One query `q` against keys `0..n` (`key(j)`, `val(j)`: rows of `q.len()` values), the
/// kernels' online softmax: writes `out [hd]` and returns the log-sum-exp. Per tile `t` of
/// [`KEY_TILE`] keys (the visible ones `valid`): `s_j = dot(q, k_j) * scale`, `m' = max(m,
/// max_j s_j)`, `p_j = exp(s_j - m')` (invisible keys `+0`), `l = l exp(m - m') + warp_sum(p)`,
/// `acc = acc exp(m - m')`, then `acc = fma(p_j, v_j, acc)` for the visible `j` in order.
/// Finally `out = acc / l`, `lse = m + log(l)`.
pub fn attend<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    val: impl Fn(usize) -> &'a [f32],
    n: usize,
    scale: f32,
    out: &mut [f32],
) -> f32 {
    let hd = q.len();
    let mut m = f32::NEG_INFINITY;
    let mut l = 0.0f32;
    let mut acc = vec![0.0f32; hd];
    let mut s = [0.0f32; KEY_TILE];
    for t0 in (0..n).step_by(KEY_TILE) {
        let valid = KEY_TILE.min(n - t0);
        for (j, sj) in s.iter_mut().enumerate() {
            *sj = if j < valid { dot(q, key(t0 + j)) * scale } else { f32::NEG_INFINITY };
        }
        let mnew = s.iter().fold(m, |a, &x| a.max(x));
        let p: Vec<f32> = s.iter().map(|&x| exp(x - mnew)).collect();
        let tsum = warp_sum(&p);
        let alpha = exp(m - mnew);
        l = l * alpha + tsum;
        m = mnew;
        for (c, a) in acc.iter_mut().enumerate() {
            let mut x = *a * alpha;
            for (j, &pj) in p.iter().enumerate().take(valid) {
                x = pj.mul_add(val(t0 + j)[c], x);
            }
            *a = x;
        }
    }
    for (o, a) in out[..hd].iter_mut().zip(&acc) {
        *o = a / l;
    }
    m + log(l)
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Shape(format!("{what}: {got} values, expected {want}")));
    }
    Ok(())
}

/// Causal attention over the call's own keys (training): `qkv [B * S, 3 H hd]` ->
/// `(out [B * S, H hd], lse [B, H, S])`.
pub fn forward(qkv: &[f32], shape: &AttnShape) -> Result<(Vec<f32>, Vec<f32>)> {
    shape.validate(0)?;
    check_len("qkv", qkv.len(), shape.qkv_len())?;
    let (heads, hd, s, d) = (shape.heads, shape.head_dim, shape.seq, shape.d());
    let scale = shape.scale();
    let mut out = vec![0.0f32; shape.out_len()];
    let mut lse = vec![0.0f32; shape.lse_len()];
    for b in 0..shape.batch {
        let rows = &qkv[b * s * 3 * d..][..s * 3 * d];
        for h in 0..heads {
            let key = |j: usize| &rows[j * 3 * d + d + h * hd..][..hd];
            let val = |j: usize| &rows[j * 3 * d + 2 * d + h * hd..][..hd];
            for i in 0..s {
                let q = &rows[i * 3 * d + h * hd..][..hd];
                let o = &mut out[(b * s + i) * d + h * hd..][..hd];
                lse[(b * heads + h) * s + i] = attend(q, key, val, i + 1, scale, o);
            }
        }
    }
    Ok((out, lse))
}

/// Causal attention through KV caches `k_cache`, `v_cache [B, H, max_len, hd]`: the queries
/// of `qkv [B * S, 3 H hd]` are at positions `start .. start + S`; their keys and values are
/// first written into the caches at those positions, then query `i` attends to the cached
/// positions `0 ..= start + i`. Returns `(out [B * S, H hd], lse [B, H, S])`.
pub fn forward_cached(
    qkv: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    shape: &AttnShape,
    start: usize,
    max_len: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    shape.validate_cache(start, max_len)?;
    check_len("qkv", qkv.len(), shape.qkv_len())?;
    check_len("k_cache", k_cache.len(), shape.cache_len(max_len))?;
    check_len("v_cache", v_cache.len(), shape.cache_len(max_len))?;
    let (heads, hd, s, d) = (shape.heads, shape.head_dim, shape.seq, shape.d());
    let scale = shape.scale();
    for b in 0..shape.batch {
        for i in 0..s {
            for h in 0..heads {
                let src = (b * s + i) * 3 * d + h * hd;
                let dst = ((b * heads + h) * max_len + start + i) * hd;
                k_cache[dst..][..hd].copy_from_slice(&qkv[src + d..][..hd]);
                v_cache[dst..][..hd].copy_from_slice(&qkv[src + 2 * d..][..hd]);
            }
        }
    }
    let (kc, vc) = (&*k_cache, &*v_cache);
    let mut out = vec![0.0f32; shape.out_len()];
    let mut lse = vec![0.0f32; shape.lse_len()];
    for b in 0..shape.batch {
        for h in 0..heads {
            let base = (b * heads + h) * max_len * hd;
            let key = |j: usize| &kc[base + j * hd..][..hd];
            let val = |j: usize| &vc[base + j * hd..][..hd];
            for i in 0..s {
                let q = &qkv[(b * s + i) * 3 * d + h * hd..][..hd];
                let o = &mut out[(b * s + i) * d + h * hd..][..hd];
                lse[(b * heads + h) * s + i] = attend(q, key, val, start + i + 1, scale, o);
            }
        }
    }
    Ok((out, lse))
}

/// `delta [B, H, S]`, `rowsum(dout * out)` per head in the kernels' order: 32 lane partials
/// (lane `l`: fma chain over the columns `l, l + 32, ...`), then [`warp_sum`].
pub fn delta(out: &[f32], dout: &[f32], shape: &AttnShape) -> Vec<f32> {
    let (heads, hd, s, d) = (shape.heads, shape.head_dim, shape.seq, shape.d());
    let mut delta = vec![0.0f32; shape.lse_len()];
    for b in 0..shape.batch {
        for i in 0..s {
            for h in 0..heads {
                let at = (b * s + i) * d + h * hd;
                let (go, o) = (&dout[at..][..hd], &out[at..][..hd]);
                let mut part = [0.0f32; 32];
                for (c, (&g, &x)) in go.iter().zip(o).enumerate() {
                    part[c % 32] = g.mul_add(x, part[c % 32]);
                }
                delta[(b * heads + h) * s + i] = warp_sum(&part);
            }
        }
    }
    delta
}

/// `(p, ds)` of query `q` (its gradient `go`, `lse`, `delta`) and key `k` (value `v`):
/// `s = dot(q, k) * scale`, `p = exp(s - lse)`, `ds = p * (dot(go, v) - delta)`.
pub fn score_grad(q: &[f32], go: &[f32], k: &[f32], v: &[f32], lse: f32, delta: f32, scale: f32) -> (f32, f32) {
    let s = dot(q, k) * scale;
    let p = exp(s - lse);
    (p, p * (dot(go, v) - delta))
}

/// Backward of [`forward`]: the gradient w.r.t. `qkv [B * S, 3 H hd]` from the forward's
/// `out`, `lse` and the upstream `dout [B * S, H hd]`, recomputing the probabilities as
/// `exp(s - lse)`.
pub fn backward(qkv: &[f32], out: &[f32], lse: &[f32], dout: &[f32], shape: &AttnShape) -> Result<Vec<f32>> {
    shape.validate(0)?;
    check_len("qkv", qkv.len(), shape.qkv_len())?;
    check_len("out", out.len(), shape.out_len())?;
    check_len("lse", lse.len(), shape.lse_len())?;
    check_len("dout", dout.len(), shape.out_len())?;
    let (heads, hd, s, d) = (shape.heads, shape.head_dim, shape.seq, shape.d());
    let scale = shape.scale();
    let delta = delta(out, dout, shape);
    let mut g = vec![0.0f32; qkv.len()];
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; hd], vec![0.0f32; s * hd], vec![0.0f32; s * hd]);
    for b in 0..shape.batch {
        let rows = &qkv[b * s * 3 * d..][..s * 3 * d];
        for h in 0..heads {
            dk.fill(0.0);
            dv.fill(0.0);
            let row = (b * heads + h) * s;
            for i in 0..s {
                let q = &rows[i * 3 * d + h * hd..][..hd];
                let go = &dout[(b * s + i) * d + h * hd..][..hd];
                dq.fill(0.0);
                for j in 0..=i {
                    let k = &rows[j * 3 * d + d + h * hd..][..hd];
                    let v = &rows[j * 3 * d + 2 * d + h * hd..][..hd];
                    let (p, ds) = score_grad(q, go, k, v, lse[row + i], delta[row + i], scale);
                    for c in 0..hd {
                        dq[c] = ds.mul_add(k[c], dq[c]);
                        dv[j * hd + c] = p.mul_add(go[c], dv[j * hd + c]);
                        dk[j * hd + c] = ds.mul_add(q[c], dk[j * hd + c]);
                    }
                }
                let gi = &mut g[(b * s + i) * 3 * d + h * hd..][..hd];
                for (x, &a) in gi.iter_mut().zip(&dq) {
                    *x = a * scale;
                }
            }
            for j in 0..s {
                let gj = &mut g[(b * s + j) * 3 * d..][..3 * d];
                for c in 0..hd {
                    gj[d + h * hd + c] = dk[j * hd + c] * scale;
                    gj[2 * d + h * hd + c] = dv[j * hd + c];
                }
            }
        }
    }
    Ok(g)
}
