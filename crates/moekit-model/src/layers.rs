//! The dense layers, each forward beside its backward: RMSNorm, RoPE, causal attention,
//! SwiGLU feed-forward. All f32 on the host; shapes are row-major `[rows, cols]` slices.

use crate::linalg::{matmul_tn, nn, nt};
use rayon::prelude::*;
use std::mem::MaybeUninit;

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * inv * g, inv = 1 / sqrt(mean(x^2) + eps).

/// `exp` as moekit's kernels compute it (under 2 ulp, the same bits everywhere).
#[inline(always)]
fn exp(x: f32) -> f32 {
    moekit_gating::fmath::exp(x)
}

/// `sum_c a[c] b[c]` in 8 interleaved partial sums added in a fixed order (vectorisable, and
/// the same order wherever it is called, so training and decoding agree).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[l] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `sum_c x[c]^2` in f64, 8 interleaved partial sums in a fixed order.
#[inline(always)]
fn sum_sq_f64(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let xc = x.chunks_exact(8);
    let xr = xc.remainder();
    for c in xc {
        for l in 0..8 {
            acc[l] += (c[l] * c[l]) as f64;
        }
    }
    for (l, v) in xr.iter().enumerate() {
        acc[l] += (v * v) as f64;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// A new vector of `len` values written in parallel chunks of `chunk` by `fill(i, slots)`,
/// which must write every slot of chunk `i` (all the layers' kernels below write each output
/// element exactly once), and each chunk's side result `R`, in chunk order. Saves the
/// zero-fill pass of `vec![0.0; len]`.
fn par_new_with<R: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) -> R + Sync,
) -> (Vec<f32>, Vec<R>) {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let side: Vec<R> =
        v.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().map(|(i, c)| fill(i, c)).collect();
    // SAFETY: the chunks cover 0..len and `fill` initialises every slot of its chunk (its
    // contract, kept by each caller in this module: loops that write each element once).
    unsafe { v.set_len(len) };
    (v, side)
}

/// [`par_new_with`] without a side result.
pub(crate) fn par_new(len: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    par_new_with(len, chunk, fill).0
}

/// Rows per parallel task of the elementwise layers (fixed: results never depend on the
/// thread count).
const ROWS: usize = 64;

simd_fn! {
    /// One block of rows of [`rmsnorm`].
    fn rmsnorm_block(xb: &[f32], g: &[f32], d: usize, eps: f32, yb: &mut [MaybeUninit<f32>], ib: &mut [f32]) {
        for ((xr, yr), iv) in xb.chunks(d).zip(yb.chunks_mut(d)).zip(ib.iter_mut()) {
            let ms = sum_sq_f64(xr) / d as f64;
            *iv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &v), &gg) in yr.iter_mut().zip(xr).zip(g) {
                o.write(v * *iv * gg);
            }
        }
    }
}

/// Forward over rows of `d`: returns `y` and each row's `inv`.
pub fn rmsnorm(x: &[f32], g: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let (y, inv) = par_new_with(x.len(), ROWS * d, |i, yb| {
        let mut ib = vec![0.0f32; yb.len() / d];
        rmsnorm_block(&x[i * ROWS * d..][..yb.len()], g, d, eps, yb, &mut ib);
        ib
    });
    (y, inv.concat())
}

simd_fn! {
    /// One block of rows of [`rmsnorm_backward`]: writes `dxb`, adds the block's `dg` to `dgb`.
    fn rmsnorm_backward_block(
        xb: &[f32],
        g: &[f32],
        ib: &[f32],
        dyb: &[f32],
        d: usize,
        dxb: &mut [MaybeUninit<f32>],
        dgb: &mut [f32],
    ) {
        for (((xr, dyr), dxr), &iv) in xb.chunks(d).zip(dyb.chunks(d)).zip(dxb.chunks_mut(d)).zip(ib) {
            for j in 0..d {
                dgb[j] += dyr[j] * xr[j] * iv;
            }
            let mut lanes = [0.0f64; 8];
            let (xc, dc, gc) = (xr.chunks_exact(8), dyr.chunks_exact(8), g.chunks_exact(8));
            let tail = xc.remainder().len();
            for ((xs, ds), gs) in xc.zip(dc).zip(gc) {
                for l in 0..8 {
                    lanes[l] += (ds[l] * gs[l]) as f64 * xs[l] as f64;
                }
            }
            for (l, lane) in lanes.iter_mut().enumerate().take(tail) {
                let j = d - tail + l;
                *lane += (dyr[j] * g[j]) as f64 * xr[j] as f64;
            }
            let total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            let c = (total / d as f64) as f32 * iv * iv * iv;
            for j in 0..d {
                dxr[j].write(dyr[j] * g[j] * iv - xr[j] * c);
            }
        }
    }
}

/// Backward: returns `dx`, adds to `dg` (summed over fixed blocks of rows, then the blocks in
/// order).
pub fn rmsnorm_backward(x: &[f32], g: &[f32], inv: &[f32], dy: &[f32], d: usize, dg: &mut [f32]) -> Vec<f32> {
    let (dx, partial) = par_new_with(x.len(), ROWS * d, |i, dxb| {
        let n = dxb.len();
        let (xb, dyb, ib) = (&x[i * ROWS * d..][..n], &dy[i * ROWS * d..][..n], &inv[i * ROWS..][..n / d]);
        let mut dgb = vec![0.0f32; d];
        rmsnorm_backward_block(xb, g, ib, dyb, d, dxb, &mut dgb);
        dgb
    });
    for p in &partial {
        for (a, b) in dg.iter_mut().zip(p) {
            *a += b;
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
    #[inline(always)]
    pub fn rotate(&self, v: &mut [f32], pos: usize, inverse: bool) {
        let (c, s) = (&self.cos[pos * self.half..][..self.half], &self.sin[pos * self.half..][..self.half]);
        for i in 0..self.half {
            let (a, b) = (v[i], v[i + self.half]);
            let sn = if inverse { -s[i] } else { s[i] };
            v[i] = a * c[i] - b * sn;
            v[i + self.half] = b * c[i] + a * sn;
        }
    }

    /// Rotates the heads in the first `rotated` columns of every row of `x [rows, width]`
    /// (the query and key columns of a `qkv` row); row r is at position `pos(r)`.
    pub fn apply(
        &self,
        x: &mut [f32],
        (width, rotated): (usize, usize),
        pos: impl Fn(usize) -> usize + Sync,
        inverse: bool,
    ) {
        let hd = 2 * self.half;
        x.par_chunks_mut(ROWS * width).enumerate().for_each(|(blk, xb)| {
            for (r, row) in xb.chunks_mut(width).enumerate() {
                for head in row[..rotated].chunks_mut(hd) {
                    self.rotate(head, pos(blk * ROWS + r), inverse);
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Causal attention.

/// Keys or values of one head: element `c` of position `j` at `data[j * stride + c]`.
#[derive(Clone, Copy)]
pub struct HeadView<'a> {
    /// The backing rows.
    pub data: &'a [f32],
    /// Distance between positions.
    pub stride: usize,
}

impl HeadView<'_> {
    fn row(&self, j: usize, hd: usize) -> &[f32] {
        &self.data[j * self.stride..][..hd]
    }
}

/// One query against the first `n` keys and values of a head: writes the softmax
/// probabilities to `probs[..n]` and the output to `out[..hd]`. The training forward and the
/// KV-cache decode both call this, with the same arithmetic per position.
#[inline(always)]
pub fn attend(
    q: &[f32],
    keys: HeadView<'_>,
    vals: HeadView<'_>,
    n: usize,
    scale: f32,
    probs: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let probs = &mut probs[..n];
    let mut max = f32::NEG_INFINITY;
    for (j, p) in probs.iter_mut().enumerate() {
        *p = dot(q, keys.row(j, hd)) * scale;
        max = max.max(*p);
    }
    let mut sum = 0.0f32;
    for p in probs.iter_mut() {
        *p = exp(*p - max);
        sum += *p;
    }
    let inv = 1.0 / sum;
    out[..hd].fill(0.0);
    for (j, p) in probs.iter_mut().enumerate() {
        *p *= inv;
        for (o, &x) in out.iter_mut().zip(vals.row(j, hd)) {
            *o += *p * x;
        }
    }
}

/// Where an attention call's keys and values are.
#[derive(Clone, Copy)]
pub enum Keys<'a> {
    /// The call's own keys and values, in its `qkv [B * s, 3 H hd]` rows (training: positions
    /// from 0).
    Own,
    /// A KV cache `[B, H, len, hd]`, the call's positions `start..start + s` already written.
    Cache {
        /// Keys.
        k: &'a [f32],
        /// Values.
        v: &'a [f32],
        /// Positions per (sequence, head).
        len: usize,
        /// First position of the call.
        start: usize,
    },
}

simd_fn! {
    /// One sequence of [`attention`]: all heads, all of its `s` queries.
    fn attention_sequence(
        qkv: &[f32],
        keys: Keys<'_>,
        b: usize,
        dims: (usize, usize, usize, usize),
        ob: &mut [f32],
        pb: &mut [f32],
    ) {
        let (heads, hd, s, l) = dims;
        let d = heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let rows = &qkv[b * s * 3 * d..][..s * 3 * d];
        for h in 0..heads {
            let (kv, vv, start) = match keys {
                Keys::Own => (
                    HeadView { data: &rows[d + h * hd..], stride: 3 * d },
                    HeadView { data: &rows[2 * d + h * hd..], stride: 3 * d },
                    0,
                ),
                Keys::Cache { k, v, len, start } => (
                    HeadView { data: &k[(b * heads + h) * len * hd..], stride: hd },
                    HeadView { data: &v[(b * heads + h) * len * hd..], stride: hd },
                    start,
                ),
            };
            for i in 0..s {
                let qi = &rows[i * 3 * d + h * hd..][..hd];
                let p = &mut pb[(h * s + i) * l..][..l];
                attend(qi, kv, vv, start + i + 1, scale, p, &mut ob[i * d + h * hd..][..hd]);
            }
        }
    }
}

/// Causal attention of the queries in `qkv [B * s, 3 H hd]` (query, key, value columns; query
/// i of a sequence at position `start + i` sees keys `0..=start + i`). Returns the output
/// `[B * s, H * hd]` and the probabilities `[B, H, s, start + s]`.
pub fn attention(qkv: &[f32], keys: Keys<'_>, (heads, hd, s): (usize, usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let d = heads * hd;
    let batch = qkv.len() / (3 * s * d).max(1);
    let l = match keys {
        Keys::Own => s,
        Keys::Cache { start, .. } => start + s,
    };
    let mut out = vec![0.0; batch * s * d];
    let mut probs = vec![0.0; batch * heads * s * l];
    out.par_chunks_mut(s * d)
        .zip(probs.par_chunks_mut(heads * s * l))
        .enumerate()
        .for_each(|(b, (ob, pb))| attention_sequence(qkv, keys, b, (heads, hd, s, l), ob, pb));
    (out, probs)
}

simd_fn! {
    /// One sequence of [`attention_backward`].
    fn attention_backward_sequence(qkv: &[f32], probs: &[f32], dout: &[f32], b: usize, dims: (usize, usize, usize), g: &mut [f32]) {
        let (heads, hd, t) = dims;
        let d = heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let rows = &qkv[b * t * 3 * d..][..t * 3 * d];
        let gb = &dout[b * t * d..][..t * d];
        let mut ds = vec![0.0f32; t];
        for h in 0..heads {
            let pb = &probs[(b * heads + h) * t * t..][..t * t];
            // Columns of query, key, value of head h in a 3D-wide row.
            let (qc, kc, vc) = (h * hd, d + h * hd, 2 * d + h * hd);
            for i in 0..t {
                let go = &gb[i * d + h * hd..][..hd];
                let p = &pb[i * t..][..=i];
                let mut pdp = 0.0f32;
                for j in 0..=i {
                    let dp = dot(go, &rows[j * 3 * d + vc..][..hd]);
                    ds[j] = dp;
                    pdp += p[j] * dp;
                    for (dvv, &gv) in g[j * 3 * d + vc..][..hd].iter_mut().zip(go) {
                        *dvv += p[j] * gv;
                    }
                }
                for j in 0..=i {
                    let sc = p[j] * (ds[j] - pdp) * scale;
                    // dq_i += sc k_j and dk_j += sc q_i: disjoint columns of the 3D-wide rows.
                    for c in 0..hd {
                        let kj = rows[j * 3 * d + kc + c];
                        g[i * 3 * d + qc + c] += sc * kj;
                    }
                    let qi = &rows[i * 3 * d + qc..][..hd];
                    for (dkv, &qv) in g[j * 3 * d + kc..][..hd].iter_mut().zip(qi) {
                        *dkv += sc * qv;
                    }
                }
            }
        }
    }
}

/// Backward of [`attention`] over whole sequences (own keys): the gradient w.r.t. `qkv`,
/// `[B * t, 3 H hd]`.
pub fn attention_backward(qkv: &[f32], probs: &[f32], dout: &[f32], (heads, hd, t): (usize, usize, usize)) -> Vec<f32> {
    let d = heads * hd;
    let mut g = vec![0.0; qkv.len()];
    g.par_chunks_mut(t * 3 * d)
        .enumerate()
        .for_each(|(b, gb)| attention_backward_sequence(qkv, probs, dout, b, (heads, hd, t), gb));
    g
}

// ---------------------------------------------------------------------------------------------
// SwiGLU feed-forward: h = x W1^T ([rows, 2F]: gate | up), a = silu(gate) * up, y = a W2^T.

/// `silu(g) = g * sigmoid(g)` with moekit's `exp`.
#[inline(always)]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + exp(-g))
}

simd_fn! {
    /// One block of rows of [`swiglu`].
    fn swiglu_block(hb: &[f32], ab: &mut [MaybeUninit<f32>], f: usize) {
        for (hr, ar) in hb.chunks(2 * f).zip(ab.chunks_mut(f)) {
            for j in 0..f {
                ar[j].write(silu(hr[j]) * hr[f + j]);
            }
        }
    }
}

simd_fn! {
    /// One block of rows of [`swiglu_backward`].
    fn swiglu_backward_block(hb: &[f32], dab: &[f32], dhb: &mut [MaybeUninit<f32>], f: usize) {
        for ((hr, dar), dhr) in hb.chunks(2 * f).zip(dab.chunks(f)).zip(dhb.chunks_mut(2 * f)) {
            for j in 0..f {
                let (g, u) = (hr[j], hr[f + j]);
                let s = 1.0 / (1.0 + exp(-g));
                dhr[j].write(dar[j] * u * (s * (1.0 + g * (1.0 - s))));
                dhr[f + j].write(dar[j] * g * s);
            }
        }
    }
}

/// `a[r, j] = silu(h[r, j]) * h[r, F + j]` for `h [rows, 2F]`.
pub fn swiglu(h: &[f32], f: usize) -> Vec<f32> {
    par_new(h.len() / 2, ROWS * f, |i, ab| swiglu_block(&h[i * ROWS * 2 * f..][..2 * ab.len()], ab, f))
}

/// Gradient of [`swiglu`] w.r.t. `h` from `da [rows, F]`.
pub fn swiglu_backward(h: &[f32], da: &[f32], f: usize) -> Vec<f32> {
    par_new(h.len(), ROWS * 2 * f, |i, dhb| {
        let n = dhb.len();
        swiglu_backward_block(&h[i * ROWS * 2 * f..][..n], &da[i * ROWS * f..][..n / 2], dhb, f)
    })
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
    let h = nt(x, w1, rows, 2 * f, d);
    let a = swiglu(&h, f);
    let y = nt(&a, w2, rows, d, f);
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
    let da = nn(dy, w2, rows, f, d);
    matmul_tn(dy, &cache.a, d, f, rows, dw2, true);
    let dh = swiglu_backward(&cache.h, &da, f);
    matmul_tn(&dh, x, 2 * f, d, rows, dw1, true);
    nn(&dh, w1, rows, d, 2 * f)
}
