//! Shared by the test files: random inputs and a plain f64 softmax attention (forward and
//! backward, whole `T x T` matrices: the obvious formulas, nothing tiled).
#![allow(dead_code)]
// Index loops over (query, key, column) read clearer than iterator chains here.
#![allow(clippy::needless_range_loop)]

use moekit_attention::AttnShape;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Unit roundoff of f32.
pub const U: f64 = f32::EPSILON as f64 / 2.0;

/// Uniform values in `[-amp, amp)`, never exactly zero (a zero could hide a missed product).
pub fn random(len: usize, amp: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            let x: f32 = rng.gen_range(-amp..amp);
            if x == 0.0 {
                amp * 0.5
            } else {
                x
            }
        })
        .collect()
}

/// `qkv` with queries and keys of amplitude 2 (peaked softmax rows) and values of 1.
pub fn random_qkv(shape: &AttnShape, seed: u64) -> Vec<f32> {
    let d = shape.d();
    let mut x = random(shape.qkv_len(), 1.0, seed);
    for row in x.chunks_mut(3 * d) {
        row[..2 * d].iter_mut().for_each(|v| *v *= 2.0);
    }
    x
}

/// [`random_qkv`] with key `t` of each sequence scaled by `1 + t / 64`: the scores grow along
/// the sequence, so a query's running max moves in every key tile (each rescale is exercised).
pub fn rising_qkv(shape: &AttnShape, seed: u64) -> Vec<f32> {
    let d = shape.d();
    let mut x = random_qkv(shape, seed);
    for (r, row) in x.chunks_mut(3 * d).enumerate() {
        let f = 1.0 + (r % shape.seq) as f32 / 64.0;
        row[d..2 * d].iter_mut().for_each(|v| *v *= f);
    }
    x
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// First index where two slices differ in bits, with both values.
pub fn assert_bits(ctx: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{ctx}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{ctx}: element {i}: got {:e}, reference {:e}", got[i], want[i]);
    }
}

/// Per (b, h): `(q, k, v)` rows of head h as f64 `[S][hd]`.
fn head(qkv: &[f32], shape: &AttnShape, b: usize, h: usize) -> [Vec<Vec<f64>>; 3] {
    let (hd, s, d) = (shape.head_dim, shape.seq, shape.d());
    let col = |i: usize, part: usize| -> Vec<f64> {
        qkv[(b * s + i) * 3 * d + part * d + h * hd..][..hd].iter().map(|&x| x as f64).collect()
    };
    [0, 1, 2].map(|part| (0..s).map(|i| col(i, part)).collect())
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Naive f64 attention. Returns `(out, lse, probs [B, H, S, S], out_abs)` where `out_abs` is
/// `sum_j p_ij |v_jc|` (the magnitude the forward's error bound scales with).
pub fn forward64(qkv: &[f32], shape: &AttnShape) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (heads, hd, s, d) = (shape.heads, shape.head_dim, shape.seq, shape.d());
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0; shape.out_len()];
    let mut out_abs = vec![0.0; shape.out_len()];
    let mut lse = vec![0.0; shape.lse_len()];
    let mut probs = vec![0.0; shape.batch * heads * s * s];
    for b in 0..shape.batch {
        for h in 0..heads {
            let [q, k, v] = head(qkv, shape, b, h);
            for i in 0..s {
                let sc: Vec<f64> = (0..=i).map(|j| dot64(&q[i], &k[j]) * scale).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                lse[(b * heads + h) * s + i] = m + l.ln();
                for j in 0..=i {
                    let p = (sc[j] - m).exp() / l;
                    probs[((b * heads + h) * s + i) * s + j] = p;
                    for c in 0..hd {
                        out[(b * s + i) * d + h * hd + c] += p * v[j][c];
                        out_abs[(b * s + i) * d + h * hd + c] += p * v[j][c].abs();
                    }
                }
            }
        }
    }
    (out, lse, probs, out_abs)
}

/// The largest score error bound of the f32 reference over the shape, `max_ij delta_s`: a dot
/// product of hd terms as one fma chain is within `hd u sum_c |q_c k_c|` (each of the hd
/// roundings is at most u of the running sum, which is at most the sum of the magnitudes),
/// then the scale's product adds `u |s|`; `max |s|` comes with it.
pub fn score_error(qkv: &[f32], shape: &AttnShape) -> (f64, f64) {
    let (heads, hd, s) = (shape.heads, shape.head_dim, shape.seq);
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut ds, mut smax) = (0.0f64, 0.0f64);
    for b in 0..shape.batch {
        for h in 0..heads {
            let [q, k, _] = head(qkv, shape, b, h);
            for i in 0..s {
                for j in 0..=i {
                    let a: f64 = q[i].iter().zip(&k[j]).map(|(x, y)| (x * y).abs()).sum::<f64>() * scale;
                    let sv = dot64(&q[i], &k[j]).abs() * scale;
                    ds = ds.max((hd as f64 + 1.0) * U * a + U * sv);
                    smax = smax.max(sv);
                }
            }
        }
    }
    (ds, smax)
}

/// Naive f64 backward of `sum(out * dout)`: `(dqkv, dqkv_abs)`, the gradient and the sum of
/// the magnitudes of its terms (with `|ds|` as `p (sum |dout v| + sum_c |dout_c| out_abs_c)`),
/// the scale of each entry's rounding error.
pub fn backward64(qkv: &[f32], dout: &[f32], shape: &AttnShape) -> (Vec<f64>, Vec<f64>) {
    let (heads, hd, s, d) = (shape.heads, shape.head_dim, shape.seq, shape.d());
    let scale = 1.0 / (hd as f64).sqrt();
    let (out, _, probs, out_abs) = forward64(qkv, shape);
    let mut g = vec![0.0; qkv.len()];
    let mut ga = vec![0.0; qkv.len()];
    for b in 0..shape.batch {
        for h in 0..heads {
            let [q, k, v] = head(qkv, shape, b, h);
            let go: Vec<Vec<f64>> =
                (0..s).map(|i| dout[(b * s + i) * d + h * hd..][..hd].iter().map(|&x| x as f64).collect()).collect();
            for i in 0..s {
                let o = &out[(b * s + i) * d + h * hd..][..hd];
                let delta = dot64(&go[i], o);
                // With the f32 forward's out, whose error scales with out_abs.
                let oa = &out_abs[(b * s + i) * d + h * hd..][..hd];
                let delta_abs: f64 = go[i].iter().zip(oa).map(|(a, b)| a.abs() * b).sum();
                for j in 0..=i {
                    let p = probs[((b * heads + h) * s + i) * s + j];
                    let dp = dot64(&go[i], &v[j]);
                    let dp_abs: f64 = go[i].iter().zip(&v[j]).map(|(a, b)| (a * b).abs()).sum();
                    let ds = p * (dp - delta);
                    let ds_abs = p * (dp_abs + delta_abs);
                    for c in 0..hd {
                        let (qi, kj, vj) = (
                            (b * s + i) * 3 * d + h * hd + c,
                            (b * s + j) * 3 * d + d + h * hd + c,
                            (b * s + j) * 3 * d + 2 * d + h * hd + c,
                        );
                        g[qi] += ds * k[j][c] * scale;
                        ga[qi] += ds_abs * k[j][c].abs() * scale;
                        g[kj] += ds * q[i][c] * scale;
                        ga[kj] += ds_abs * q[i][c].abs() * scale;
                        g[vj] += p * go[i][c];
                        ga[vj] += p * go[i][c].abs();
                    }
                }
            }
        }
    }
    (g, ga)
}

/// Relative error bounds of the f32 forward (first order in u), for queries that see at most
/// `n = S` keys in `nt = ceil(n / 32)` tiles; `ds`, `smax` from [`score_error`]:
/// - each probability `p_j = exp(s_j - m) / l`: the scores are off by at most `ds` each (so a
///   ratio by `2 ds`); `s - m` rounds once (`u |s - m| <= 2 u smax`), moekit's exp is within
///   2 ulp (`4 u`), each tile's rescale `exp(m - m')` the same again (`8 u smax + 8 u` over
///   both), the tile sum of 32 by 5 butterfly levels (`5 u`), `l l * alpha + sum` 2 per tile;
///   so `eps_pi = 2 ds + u (8 smax + 24 + 16 nt)`;
/// - `out_c = sum_j pi_j v_jc` accumulated by at most `n` fma plus one rescale per tile and a
///   division: `|err| <= (eps_pi + (n + 2 nt + 2) u) sum_j pi_j |v_jc|`;
/// - `lse = m + log(l)`: `ds` (a shift of every score by at most `ds` moves it by at most
///   `ds`), `l`'s relative error `u (8 smax + 16 + 12 nt + n)`, the log within 4 ulp of
///   `log l <= ln n` plus the final add `u |lse|`.
///
/// Returns `(eps_out, lse_abs_err)`; the tests allow twice these (second-order terms).
pub fn forward_bounds(shape: &AttnShape, ds: f64, smax: f64, lse_max: f64) -> (f64, f64) {
    let n = shape.seq as f64;
    let nt = shape.seq.div_ceil(32) as f64;
    let eps_pi = 2.0 * ds + U * (8.0 * smax + 24.0 + 16.0 * nt);
    let eps_out = eps_pi + (n + 2.0 * nt + 2.0) * U;
    let lse = ds + U * (8.0 * smax + 16.0 + 12.0 * nt + n) + 8.0 * U * n.ln().max(1.0) + U * lse_max;
    (eps_out, lse)
}

/// Relative error bound of the f32 backward per entry of [`backward64`]'s magnitudes: each
/// `p = exp(s - lse)` is within `eps_p = ds + lse_err + u (2 smax + 4)` relatively (score,
/// forward lse, the subtraction, the exp); `dp` as a dot of hd within `(hd + 1) u`, `delta`
/// from the f32 forward's out within `eps_out` plus its own `hd / 32 + 6` roundings, `ds`'s
/// two roundings; the accumulation over at most `n` queries or keys `n + 1`. So
/// `eps = eps_p + eps_out + (hd + n + 12) u`; the tests allow twice this.
pub fn backward_bound(shape: &AttnShape, ds: f64, smax: f64, eps_out: f64, lse_err: f64) -> f64 {
    let eps_p = ds + lse_err + U * (2.0 * smax + 4.0);
    eps_p + eps_out + (shape.head_dim as f64 + shape.seq as f64 + 12.0) * U
}
