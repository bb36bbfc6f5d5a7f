//! The dense layers, each forward beside its backward: RMSNorm, RoPE, causal attention,
//! SwiGLU feed-forward. All f32 on the host; shapes are row-major `[rows, cols]` slices.

use crate::linalg::{matmul_nn, matmul_nt, matmul_tn};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * inv * g, inv = 1 / sqrt(mean(x^2) + eps).

/// Forward over rows of `d`: returns `y` and each row's `inv`.
pub fn rmsnorm(x: &[f32], g: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let mut y = vec![0.0; x.len()];
    let mut inv = vec![0.0; rows];
    for ((xr, yr), iv) in x.chunks(d).zip(y.chunks_mut(d)).zip(inv.iter_mut()) {
        let ms = xr.iter().map(|v| (v * v) as f64).sum::<f64>() / d as f64;
        *iv = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for ((o, &v), &gg) in yr.iter_mut().zip(xr).zip(g) {
            *o = v * *iv * gg;
        }
    }
    (y, inv)
}

/// Backward: returns `dx`, adds to `dg`.
pub fn rmsnorm_backward(x: &[f32], g: &[f32], inv: &[f32], dy: &[f32], d: usize, dg: &mut [f32]) -> Vec<f32> {
    let mut dx = vec![0.0; x.len()];
    for (((xr, dyr), dxr), &iv) in x.chunks(d).zip(dy.chunks(d)).zip(dx.chunks_mut(d)).zip(inv) {
        let mut dot = 0.0f64;
        for j in 0..d {
            dg[j] += dyr[j] * xr[j] * iv;
            dot += (dyr[j] * g[j]) as f64 * xr[j] as f64;
        }
        let c = (dot / d as f64) as f32 * iv * iv * iv;
        for j in 0..d {
            dxr[j] = dyr[j] * g[j] * iv - xr[j] * c;
        }
    }
    dx
}

// ---------------------------------------------------------------------------------------------
// RoPE (half-split pairs (i, i + hd/2), as Llama and Qwen).

/// Cosine and sine tables `[max_pos, hd / 2]`.
#[derive(Debug, Clone)]
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for head dimension `hd` (even), positions `0..max_pos`, base `theta`.
    pub fn new(hd: usize, max_pos: usize, theta: f32) -> Self {
        let half = hd / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let freq = (theta as f64).powf(-(2.0 * i as f64) / hd as f64);
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotates one head vector at position `pos` in place (`inverse`: the transpose, for the
    /// backward).
    pub fn rotate(&self, v: &mut [f32], pos: usize, inverse: bool) {
        let (c, s) = (&self.cos[pos * self.half..][..self.half], &self.sin[pos * self.half..][..self.half]);
        for i in 0..self.half {
            let (a, b) = (v[i], v[i + self.half]);
            let sn = if inverse { -s[i] } else { s[i] };
            v[i] = a * c[i] - b * sn;
            v[i + self.half] = b * c[i] + a * sn;
        }
    }

    /// Rotates every head of every row of `x [rows, heads * hd]`; row r is at position
    /// `pos(r)`.
    pub fn apply(&self, x: &mut [f32], d: usize, pos: impl Fn(usize) -> usize, inverse: bool) {
        let hd = 2 * self.half;
        for (r, row) in x.chunks_mut(d).enumerate() {
            for head in row.chunks_mut(hd) {
                self.rotate(head, pos(r), inverse);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Causal attention.

/// One query against `n` keys and values (`[n, hd]` contiguous): writes the softmax
/// probabilities to `probs[..n]` and the output to `out[..hd]`. The training forward and the
/// KV-cache decode both call this, so a position gets the same bits either way.
pub fn attend(q: &[f32], keys: &[f32], vals: &[f32], n: usize, scale: f32, probs: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for j in 0..n {
        let k = &keys[j * hd..(j + 1) * hd];
        let s = q.iter().zip(k).fold(0.0f32, |acc, (a, b)| acc + a * b) * scale;
        probs[j] = s;
        max = max.max(s);
    }
    let mut sum = 0.0f32;
    for p in &mut probs[..n] {
        *p = (*p - max).exp();
        sum += *p;
    }
    let inv = 1.0 / sum;
    out[..hd].fill(0.0);
    for j in 0..n {
        probs[j] *= inv;
        let v = &vals[j * hd..(j + 1) * hd];
        for (o, &x) in out.iter_mut().zip(v) {
            *o += probs[j] * x;
        }
    }
}

/// Splits `x [B * T, H * hd]` into per-(sequence, head) blocks `[B, H, T, hd]`.
pub fn to_heads(x: &[f32], b: usize, t: usize, heads: usize, hd: usize) -> Vec<f32> {
    let d = heads * hd;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for ti in 0..t {
            let row = &x[(bi * t + ti) * d..][..d];
            for h in 0..heads {
                out[((bi * heads + h) * t + ti) * hd..][..hd].copy_from_slice(&row[h * hd..(h + 1) * hd]);
            }
        }
    }
    out
}

/// Inverse of [`to_heads`].
pub fn from_heads(x: &[f32], b: usize, t: usize, heads: usize, hd: usize) -> Vec<f32> {
    let d = heads * hd;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for ti in 0..t {
            for h in 0..heads {
                out[(bi * t + ti) * d + h * hd..][..hd].copy_from_slice(&x[((bi * heads + h) * t + ti) * hd..][..hd]);
            }
        }
    }
    out
}

/// Causal attention of `s` queries per block `q [BH, s, hd]` at positions `start..start + s`
/// over the first `start + s` of `l` keys and values per block (`k, v [BH, l, hd]`: the same
/// call's keys in training, a KV cache when decoding). Returns the output `[BH, s, hd]` and
/// the probabilities `[BH, s, l]` (query i uses columns `0..=start + i`).
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (s, l, start): (usize, usize, usize),
    hd: usize,
) -> (Vec<f32>, Vec<f32>) {
    let bh = q.len() / (s * hd).max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0; bh * s * hd];
    let mut probs = vec![0.0; bh * s * l];
    out.par_chunks_mut(s * hd).zip(probs.par_chunks_mut(s * l)).enumerate().for_each(|(blk, (o, p))| {
        let (qb, kb, vb) = (&q[blk * s * hd..][..s * hd], &k[blk * l * hd..][..l * hd], &v[blk * l * hd..][..l * hd]);
        for i in 0..s {
            attend(&qb[i * hd..][..hd], kb, vb, start + i + 1, scale, &mut p[i * l..][..l], &mut o[i * hd..][..hd]);
        }
    });
    (out, probs)
}

/// Backward of [`attention`] over a whole sequence (`s = l = t`, `start = 0`): `(dq, dk, dv)`
/// in the blocks' layout.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    bh: usize,
    t: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let scale = 1.0 / (hd as f32).sqrt();
    let n = bh * t * hd;
    let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    dq.par_chunks_mut(t * hd).zip(dk.par_chunks_mut(t * hd)).zip(dv.par_chunks_mut(t * hd)).enumerate().for_each(
        |(blk, ((dqb, dkb), dvb))| {
            let off = blk * t * hd;
            let (qb, kb, vb, gb) =
                (&q[off..][..t * hd], &k[off..][..t * hd], &v[off..][..t * hd], &dout[off..][..t * hd]);
            let pb = &probs[blk * t * t..][..t * t];
            let mut ds = vec![0.0f32; t];
            for i in 0..t {
                let go = &gb[i * hd..][..hd];
                let p = &pb[i * t..][..=i];
                let mut dot = 0.0f32;
                for j in 0..=i {
                    let dp = go.iter().zip(&vb[j * hd..][..hd]).fold(0.0f32, |a, (x, y)| a + x * y);
                    ds[j] = dp;
                    dot += p[j] * dp;
                    for (dvv, &g) in dvb[j * hd..][..hd].iter_mut().zip(go) {
                        *dvv += p[j] * g;
                    }
                }
                let qi = &qb[i * hd..][..hd];
                for j in 0..=i {
                    let s = p[j] * (ds[j] - dot) * scale;
                    for c in 0..hd {
                        dqb[i * hd + c] += s * kb[j * hd + c];
                        dkb[j * hd + c] += s * qi[c];
                    }
                }
            }
        },
    );
    (dq, dk, dv)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU feed-forward: h = x W1^T ([rows, 2F]: gate | up), a = silu(gate) * up, y = a W2^T.

/// `silu(g) = g * sigmoid(g)`.
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// `a[r, j] = silu(h[r, j]) * h[r, F + j]` for `h [rows, 2F]`.
pub fn swiglu(h: &[f32], f: usize) -> Vec<f32> {
    let mut a = vec![0.0; h.len() / 2];
    for (hr, ar) in h.chunks(2 * f).zip(a.chunks_mut(f)) {
        for j in 0..f {
            ar[j] = silu(hr[j]) * hr[f + j];
        }
    }
    a
}

/// Gradient of [`swiglu`] w.r.t. `h` from `da [rows, F]`.
pub fn swiglu_backward(h: &[f32], da: &[f32], f: usize) -> Vec<f32> {
    let mut dh = vec![0.0; h.len()];
    for ((hr, dar), dhr) in h.chunks(2 * f).zip(da.chunks(f)).zip(dh.chunks_mut(2 * f)) {
        for j in 0..f {
            let (g, u) = (hr[j], hr[f + j]);
            let s = 1.0 / (1.0 + (-g).exp());
            dhr[j] = dar[j] * u * (s * (1.0 + g * (1.0 - s)));
            dhr[f + j] = dar[j] * g * s;
        }
    }
    dh
}

/// What the FFN backward needs.
#[derive(Debug, Clone)]
pub struct FfnCache {
    /// `[rows, 2F]` pre-activations.
    pub h: Vec<f32>,
    /// `[rows, F]` activations.
    pub a: Vec<f32>,
}

/// SwiGLU FFN forward of `x [rows, d]` with `w1 [2F, d]`, `w2 [d, F]`.
pub fn ffn(x: &[f32], w1: &[f32], w2: &[f32], d: usize, f: usize) -> (Vec<f32>, FfnCache) {
    let rows = x.len() / d;
    let mut h = vec![0.0; rows * 2 * f];
    matmul_nt(x, w1, rows, 2 * f, d, &mut h, false);
    let a = swiglu(&h, f);
    let mut y = vec![0.0; rows * d];
    matmul_nt(&a, w2, rows, d, f, &mut y, false);
    (y, FfnCache { h, a })
}

/// FFN backward: returns `dx`, adds to `dw1`, `dw2`.
#[allow(clippy::too_many_arguments)]
pub fn ffn_backward(
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    cache: &FfnCache,
    dy: &[f32],
    d: usize,
    f: usize,
    dw1: &mut [f32],
    dw2: &mut [f32],
) -> Vec<f32> {
    let rows = x.len() / d;
    let mut da = vec![0.0; rows * f];
    matmul_nn(dy, w2, rows, f, d, &mut da, false);
    matmul_tn(dy, &cache.a, d, f, rows, dw2, true);
    let dh = swiglu_backward(&cache.h, &da, f);
    matmul_tn(&dh, x, 2 * f, d, rows, dw1, true);
    let mut dx = vec![0.0; rows * d];
    matmul_nn(&dh, w1, rows, d, 2 * f, &mut dx, false);
    dx
}
