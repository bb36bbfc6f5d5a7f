//! The CPU reference: the kernels' arithmetic, spelled out. Every sum follows the kernels'
//! fixed tree ([`block_tree`]), every operation is a correctly rounded f32 operation in the
//! kernels' order (Rust never contracts `a * b + c`; `mul_add` is a true fma), `exp` is
//! moekit's ([`moekit_fmath::exp`]) and `log` is [`log_f32`], so the results are the kernels'
//! bits. Tests compare these with f64 loops (`moekit-model`'s `loss` semantics).

use crate::philox;
use crate::{check_rows, Error, Result, SampleConfig, BLOCK};
use moekit_fmath::{canon, exp, warp_sum};

/// The kernels' block sum of per-thread partials (`parts[t]`, thread `t` of [`BLOCK`]): the warp
/// butterfly of each group of 32 ([`warp_sum`]), then the butterfly of the 8 warp partials.
pub fn block_tree(parts: &[f32; BLOCK]) -> f32 {
    let mut warps = [0.0f32; BLOCK / 32];
    for (w, c) in warps.iter_mut().zip(parts.chunks(32)) {
        // A warp of +0 partials sums to +0 exactly: skipping it changes no bit (and keeps the
        // reference fast for short rows).
        if c.iter().any(|x| x.to_bits() != 0) {
            *w = warp_sum(c);
        }
    }
    warp_sum(&warps)
}

/// Per-thread partials of a row of `n` elements: thread `t` folds `step` over its elements
/// `t, t + 256, ...` in index order, from `+0`.
fn partials(n: usize, mut step: impl FnMut(f32, usize) -> f32) -> [f32; BLOCK] {
    let mut parts = [0.0f32; BLOCK];
    for j in 0..n {
        parts[j % BLOCK] = step(parts[j % BLOCK], j);
    }
    parts
}

/// Natural log as the kernels compute it (within 3 ulp for positive finite `x`):
/// `x = 2^e m`, `m` in `[sqrt(1/2), sqrt(2))`, `log m = 2 atanh(s)`, `s = (m - 1) / (m + 1)`,
/// by the odd series to `s^11`, plus `e ln2` in two parts. `0 -> -inf`, `+inf -> +inf`,
/// negative or NaN -> NaN.
pub fn log_f32(x: f32) -> f32 {
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x.is_nan() || x < 0.0 {
        return f32::from_bits(0x7fc0_0000);
    }
    if x == f32::INFINITY {
        return x;
    }
    let mut bits = x.to_bits();
    let mut e = 0i32;
    if bits < 0x0080_0000 {
        bits = (x * 8_388_608.0).to_bits();
        e = -23;
    }
    e += (bits >> 23) as i32 - 127;
    let mut mb = (bits & 0x007f_ffff) | 0x3f80_0000;
    if mb > 0x3fb5_04f3 {
        mb -= 0x0080_0000;
        e += 1;
    }
    let f = f32::from_bits(mb) - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut p = f32::from_bits(0x3dba_2e8c); // 1/11
    p = p.mul_add(z, f32::from_bits(0x3de3_8e39)); // 1/9
    p = p.mul_add(z, f32::from_bits(0x3e12_4925)); // 1/7
    p = p.mul_add(z, f32::from_bits(0x3e4c_cccd)); // 1/5
    p = p.mul_add(z, f32::from_bits(0x3eaa_aaab)); // 1/3
    let logm = 2.0 * (s * z).mul_add(p, s);
    let ef = e as f32;
    ef.mul_add(f32::from_bits(0x35bf_be8e), logm) + ef * f32::from_bits(0x3f31_7200)
}

/// Row statistics of [`log_softmax_forward`], `[rows]` each.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStats {
    /// `z[y] - lse` for a target `y` in `[0, V)`, else 0.
    pub logp: Vec<f32>,
    /// `-sum_j p_j log p_j`.
    pub entropy: Vec<f32>,
    /// `max_j z` (NaN ignored; `-0` as `+0`).
    pub row_max: Vec<f32>,
    /// `max + log(sum_j e^(z_j - max))`.
    pub row_lse: Vec<f32>,
    /// Targets `>= V` (invalid; their rows are treated as without a target).
    pub invalid: usize,
}

/// Log-softmax statistics of `logits [rows, vocab]` with `targets [rows]` (`< 0`: none).
pub fn log_softmax_forward(logits: &[f32], vocab: usize, targets: &[i32]) -> Result<RowStats> {
    let rows = check_rows(logits.len(), vocab, targets.len())?;
    let mut out = RowStats {
        logp: Vec::with_capacity(rows),
        entropy: Vec::with_capacity(rows),
        row_max: Vec::with_capacity(rows),
        row_lse: Vec::with_capacity(rows),
        invalid: 0,
    };
    for (z, &y) in logits.chunks(vocab.max(1)).zip(targets) {
        let m = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let s = block_tree(&partials(vocab, |acc, j| acc + exp(z[j] - m)));
        let t = block_tree(&partials(vocab, |acc, j| {
            let d = z[j] - m;
            let e = exp(d);
            if e > 0.0 {
                e.mul_add(d, acc)
            } else {
                acc
            }
        }));
        let log_s = log_f32(s);
        let lse = m + log_s;
        let h = log_s - t / s;
        let lp = if y as i64 >= vocab as i64 {
            out.invalid += 1;
            0.0
        } else if y >= 0 {
            z[y as usize] - lse
        } else {
            0.0
        };
        out.row_max.push(canon(m + 0.0));
        out.row_lse.push(canon(lse));
        out.entropy.push(canon(h));
        out.logp.push(canon(lp));
    }
    Ok(out)
}

/// Gradient w.r.t. `logits [rows, vocab]` of `sum_r dlogp[r] logp[r] + dentropy[r] H[r]`, from
/// the forward's `row_lse` and `entropy`: `dl (1[j == y] - p_j) - de p_j (log p_j + H)` (the
/// entropy term 0 where `p_j == 0`; `dl = 0` without a valid target; rows with `dl == de == 0`
/// all zeros).
#[allow(clippy::too_many_arguments)]
pub fn log_softmax_backward(
    logits: &[f32],
    vocab: usize,
    targets: &[i32],
    row_lse: &[f32],
    entropy: &[f32],
    dlogp: Option<&[f32]>,
    dentropy: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let rows = check_rows(logits.len(), vocab, targets.len())?;
    for (what, len) in [
        ("row_lse", Some(row_lse.len())),
        ("entropy", Some(entropy.len())),
        ("dlogp", dlogp.map(<[f32]>::len)),
        ("dentropy", dentropy.map(<[f32]>::len)),
    ] {
        if let Some(len) = len.filter(|&l| l != rows) {
            return Err(Error::Shape(format!("{what}: {len} values, expected {rows} rows")));
        }
    }
    let mut g = vec![0.0f32; logits.len()];
    for r in 0..rows {
        let y = targets[r];
        let valid = y >= 0 && (y as i64) < vocab as i64;
        let dl = if valid { dlogp.map_or(0.0, |d| d[r]) } else { 0.0 };
        let de = dentropy.map_or(0.0, |d| d[r]);
        if dl == 0.0 && de == 0.0 {
            continue;
        }
        let lse = row_lse[r];
        let h = if de != 0.0 { entropy[r] } else { 0.0 };
        for j in 0..vocab {
            let lp = logits[r * vocab + j] - lse;
            let p = exp(lp);
            let ent = if p > 0.0 { de * p * (lp + h) } else { 0.0 };
            let oh = if j as i64 == y as i64 { 1.0 } else { 0.0 };
            g[r * vocab + j] = canon(dl * (oh - p) - ent);
        }
    }
    Ok(g)
}

/// Mean cross-entropy from the forward's `logp`: `(loss, count, dlogp)` with `count` the rows
/// whose target is in `[0, vocab)`, `loss = -(sum of their logp) / max(count, 1)` (the sum in
/// the kernel's tree over rows) and `dlogp = -1 / max(count, 1)` at those rows, 0 elsewhere.
pub fn cross_entropy_reduce(logp: &[f32], targets: &[i32], vocab: usize) -> Result<(f32, i32, Vec<f32>)> {
    if logp.len() != targets.len() {
        return Err(Error::Shape(format!("logp: {} values, targets: {}", logp.len(), targets.len())));
    }
    let valid = |y: i32| y >= 0 && (y as i64) < vocab as i64;
    let s = block_tree(&partials(logp.len(), |acc, r| if valid(targets[r]) { acc + logp[r] } else { acc }));
    let n = targets.iter().filter(|&&y| valid(y)).count() as i32;
    let count = n.max(1) as f32;
    let g = -1.0 / count;
    let dlogp = targets.iter().map(|&y| if valid(y) { g } else { 0.0 }).collect();
    Ok((canon(-s / count), n, dlogp))
}

/// Cross-entropy of `logits [rows, vocab]` in one call: the forward, the reduction and the
/// backward, as the tensor op runs them. `(loss, count, grad, invalid targets)`.
pub fn cross_entropy(logits: &[f32], vocab: usize, targets: &[i32]) -> Result<(f32, i32, Vec<f32>, usize)> {
    let st = log_softmax_forward(logits, vocab, targets)?;
    let (loss, count, dlogp) = cross_entropy_reduce(&st.logp, targets, vocab)?;
    let g = log_softmax_backward(logits, vocab, targets, &st.row_lse, &st.entropy, Some(&dlogp), None)?;
    Ok((loss, count, g, st.invalid))
}

// ---- sampling ------------------------------------------------------------------------------

const FLT_MAX: f32 = f32::MAX;

/// Greedy: the largest logit, ties to the lowest id, NaN ignored; 0 when all are NaN.
pub fn argmax(z: &[f32]) -> usize {
    let (mut bv, mut bi) = (f32::NEG_INFINITY, z.len());
    for (j, &x) in z.iter().enumerate() {
        if x > bv || (x == bv && j < bi) {
            (bv, bi) = (x, j);
        }
    }
    if bi < z.len() {
        bi
    } else {
        0
    }
}

/// The sampling weights of a row at temperature `t > 0`: `w_j = e^((z_j - m) / t)` with
/// `z` clamped to `FLT_MAX` (so `+inf` counts as the largest finite logit), `m` its max (at
/// least `-FLT_MAX`), `w = 1` where `z_j == m`, `+0` for NaN logits (and NaN weights).
pub fn sample_weights(z: &[f32], t: f32) -> Vec<f32> {
    let clamp = |x: f32| if x > FLT_MAX { FLT_MAX } else { x };
    let m = z.iter().fold(-FLT_MAX, |m, &x| m.max(clamp(x)));
    let inv_t = 1.0 / t;
    z.iter()
        .map(|&x| {
            let x = clamp(x);
            if x.is_nan() {
                return 0.0;
            }
            let d = x - m;
            let w = if d == 0.0 { 1.0 } else { exp(d * inv_t) };
            if w.is_nan() {
                0.0
            } else {
                w
            }
        })
        .collect()
}

/// The threshold set `A(a, c)`: weights with bits above `a`, or equal to `a` at ids `<= c`;
/// the first candidates in the order (weight descending, id ascending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    /// Weight bits.
    pub a: u32,
    /// Last id among the weights with bits `a`.
    pub c: usize,
}

impl Threshold {
    fn contains(&self, wb: u32, j: usize) -> bool {
        wb > self.a || (wb == self.a && j <= self.c)
    }
}

/// `(sum, count)` of the weights in `A(a, c)` within `f`, the sum in the kernels' tree.
fn reduce_set(w: &[f32], set: Threshold, f: Threshold) -> (f32, i32) {
    let member = |j: usize| {
        let wb = w[j].to_bits();
        set.contains(wb, j) && f.contains(wb, j)
    };
    let s = block_tree(&partials(w.len(), |acc, j| if member(j) { acc + w[j] } else { acc }));
    let n = (0..w.len()).filter(|&j| member(j)).count() as i32;
    (s, n)
}

/// The largest threshold whose set within `f` satisfies `pred` (monotone; true for all of
/// `f`): 31 bits of `a` from the top, then a binary search for the smallest `c`.
fn search(w: &[f32], f: Threshold, pred: impl Fn((f32, i32)) -> bool) -> Threshold {
    let v = w.len();
    let mut a = 0u32;
    for b in (0..=30).rev() {
        let cand = a | (1 << b);
        if pred(reduce_set(w, Threshold { a: cand, c: v - 1 }, f)) {
            a = cand;
        }
    }
    let (mut lo, mut hi) = (0usize, v - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(reduce_set(w, Threshold { a, c: mid }, f)) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Threshold { a, c: lo }
}

/// One row's token given its uniform `u` in `[0, 1)`: greedy at temperature 0; else the
/// [`sample_weights`], the top-k set (`0 < k < V`), the top-p prefix (`p < 1`: the shortest
/// with mass `>= p S`, `S` the top-k mass), and the first candidate whose prefix mass exceeds
/// `u M` (`M` the kept mass; the first candidate when every weight is 0).
pub fn sample_row(z: &[f32], cfg: &SampleConfig, u: f32) -> usize {
    if cfg.temperature == 0.0 {
        return argmax(z);
    }
    let v = z.len();
    let w = sample_weights(z, cfg.temperature);
    let mut f = Threshold { a: 0, c: v - 1 };
    let all = f;
    if cfg.top_k > 0 && cfg.top_k < v {
        let k = cfg.top_k as i32;
        f = search(&w, f, |(_, n)| n >= k);
    }
    if cfg.top_p < 1.0 {
        let target = cfg.top_p * reduce_set(&w, all, f).0;
        f = search(&w, f, |(s, n)| n >= 1 && s >= target);
    }
    let mass = reduce_set(&w, all, f).0;
    let r = u * mass;
    let positive = mass > r;
    search(&w, f, |(s, n)| n >= 1 && (s > r || !positive)).c
}

/// Samples one token per row of `logits [rows, vocab]`: row `r` draws
/// [`philox::sample_uniform`]`(seed, r, step)`.
pub fn sample(logits: &[f32], vocab: usize, cfg: &SampleConfig, seed: u64, step: u64) -> Result<Vec<i32>> {
    cfg.validate(vocab)?;
    let rows = check_rows(logits.len(), vocab, logits.len() / vocab.max(1))?;
    Ok((0..rows)
        .map(|r| sample_row(&logits[r * vocab..][..vocab], cfg, philox::sample_uniform(seed, r as u64, step)) as i32)
        .collect())
}
