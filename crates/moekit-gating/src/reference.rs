//! CPU reference of every gating kernel, written for clarity.
//!
//! Routing and its backward are the kernels' arithmetic spelled out one token at a time:
//! the same f32 operations in the same order (the kernels' lane structure appears only in
//! [`row_sum`]), so they agree with the kernels bit for bit. Every NaN they output is the
//! canonical `0x7fc00000` ([`canon`]) on every device. The balance loss, a training
//! scalar, is computed here in f64 and the kernels are held to it with a tolerance.
//!
//! Shapes: logits `[T, E]` row-major as f32 (BF16 logits are widened exactly first), bias
//! `[E]`, ids and weights `[T, k]`, counts `[E]`.

use crate::fmath;
use crate::{Error, Result, RouterConfig, ScoreFunc};

pub use moekit_fmath::{butterfly_sum, canon, warp_sum};

/// Sums one row of per-expert values as the kernels do, in their team layout
/// ([`crate::team_layout`]`(E) = (C, L)`): lane `r` adds experts `r C .. r C + C - 1` in order
/// (starting from `+0`), then the butterfly over the `L` lanes ([`butterfly_sum`]).
pub fn row_sum(row: &[f32]) -> f32 {
    let (chunk, lanes) = crate::team_layout(row.len());
    let mut part = [0.0f32; 32];
    for (e, &v) in row.iter().enumerate() {
        part[e / chunk] += v;
    }
    butterfly_sum(&mut part[..lanes])
}

/// Scores of one token's logits: `sigmoid(u)`, or `softmax(u)` as `exp(u - max) / sum`
/// (max ignoring NaN, sum by [`row_sum`]).
pub fn scores(logits: &[f32], score: ScoreFunc) -> Vec<f32> {
    match score {
        ScoreFunc::Sigmoid => fmath::map(logits, fmath::sigmoid),
        ScoreFunc::Softmax => {
            let m = logits.iter().fold(f32::NEG_INFINITY, |m, &u| if u > m { u } else { m });
            let e = fmath::map(logits, |u| fmath::exp(u - m));
            let total = row_sum(&e);
            e.iter().map(|&x| x / total).collect()
        }
    }
}

/// Order-preserving key of a selection score: larger score, larger key; `-0 == +0`; NaN is 1
/// (below every number); 0 means "not a candidate".
pub fn order_key(v: f32) -> u32 {
    if v.is_nan() {
        return 1;
    }
    let b = if v.to_bits() == 0x8000_0000 { 0 } else { v.to_bits() };
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Total order of candidates: by key, ties to the lower index.
fn rank_key(key: u32, index: usize) -> u64 {
    if key == 0 {
        0
    } else {
        ((key as u64) << 32) | (!(index as u32)) as u64
    }
}

/// Which groups a token keeps, from its selection scores.
fn kept_groups(sel: &[f32], cfg: &RouterConfig, biased: bool) -> Vec<bool> {
    let g = cfg.group_size();
    let group_keys: Vec<u32> = sel
        .chunks(g)
        .map(|group| {
            // The two largest by key, ties to the lower index.
            let (mut k1, mut k2, mut v1, mut v2) = (0u32, 0u32, 0.0f32, 0.0f32);
            for &v in group {
                let kv = order_key(v);
                if kv > k1 {
                    (k2, v2, k1, v1) = (k1, v1, kv, v);
                } else if kv > k2 {
                    (k2, v2) = (kv, v);
                }
            }
            order_key(if biased && g >= 2 { v1 + v2 } else { v1 })
        })
        .collect();
    (0..cfg.n_groups)
        .map(|gi| {
            let mine = rank_key(group_keys[gi], gi);
            let better = (0..cfg.n_groups).filter(|&h| rank_key(group_keys[h], h) > mine).count();
            better < cfg.topk_groups
        })
        .collect()
}

/// Routes one token: its `top_k` ids and weights.
pub fn route_token(logits: &[f32], bias: Option<&[f32]>, cfg: &RouterConfig) -> (Vec<i32>, Vec<f32>) {
    let s = scores(logits, cfg.score);
    let sel: Vec<f32> = match bias {
        Some(b) => s.iter().zip(b).map(|(&x, &y)| x + y).collect(),
        None => s.clone(),
    };
    let keep = if cfg.n_groups > 1 { kept_groups(&sel, cfg, bias.is_some()) } else { vec![true] };
    let g = cfg.group_size();
    let mut candidates: Vec<(u64, usize)> =
        (0..cfg.experts).filter(|&e| keep[e / g]).map(|e| (rank_key(order_key(sel[e]), e), e)).collect();
    // The k largest keys (keys are distinct: they contain the index), in descending order.
    let k = cfg.top_k.min(candidates.len());
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, |a, b| b.0.cmp(&a.0));
    }
    candidates[..k].sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
    let ids: Vec<i32> = candidates[..k].iter().map(|&(_, e)| e as i32).collect();
    let w = weights_for_ids(&s, &ids, cfg);
    (ids, w)
}

/// The routing weights of one token's chosen `ids` from its (unbiased) `scores`: `s[id]`,
/// renormalised to sum 1 when configured (and the sum is positive), times `route_scale`.
/// The arithmetic of [`route_token`] (and of the kernels), so that weights recomputed for
/// replayed ids equal the chosen ones bit for bit. Ids outside `[0, E)` get weight 0.
pub fn weights_for_ids(scores: &[f32], ids: &[i32], cfg: &RouterConfig) -> Vec<f32> {
    let mut w: Vec<f32> =
        ids.iter().map(|&e| if (0..scores.len() as i32).contains(&e) { scores[e as usize] } else { 0.0 }).collect();
    let sum = w.iter().fold(0.0f32, |acc, &x| acc + x);
    for x in &mut w {
        if cfg.renormalize && sum > 0.0 {
            *x /= sum;
        }
        *x = canon(*x * cfg.route_scale);
    }
    w
}

/// Router replay: the weights (and counts) of given `ids [T, k]` (recorded while sampling)
/// instead of choosing them, so that training sees the routing the sampler used. Ids must be
/// in `[0, E)`. With the ids [`route`] chose, the result equals [`route`]'s bit for bit.
pub fn route_replay(logits: &[f32], ids: &[i32], cfg: &RouterConfig) -> Result<Routing> {
    cfg.validate()?;
    let tokens = check_rows("logits", logits.len(), cfg.experts)?;
    check_len("replayed topk_ids", ids.len(), tokens * cfg.top_k)?;
    if let Some(&bad) = ids.iter().find(|&&e| e < 0 || e as usize >= cfg.experts) {
        return Err(Error::InvalidArgument(format!("replayed expert id {bad} outside [0, {})", cfg.experts)));
    }
    let mut out = Routing { ids: ids.to_vec(), weights: Vec::with_capacity(ids.len()), counts: vec![0; cfg.experts] };
    for (row, ids) in logits.chunks(cfg.experts).zip(ids.chunks(cfg.top_k)) {
        out.weights.extend(weights_for_ids(&scores(row, cfg.score), ids, cfg));
        for &e in ids {
            out.counts[e as usize] += 1;
        }
    }
    Ok(out)
}

/// Result of [`route`].
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// `[T, k]` expert ids, by descending selection score.
    pub ids: Vec<i32>,
    /// `[T, k]` weights.
    pub weights: Vec<f32>,
    /// `[E]` tokens routed to each expert.
    pub counts: Vec<i32>,
}

fn check_rows(what: &str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || len % cols != 0 {
        return Err(Error::Shape(format!("{what}: {len} values are not rows of {cols}")));
    }
    Ok(len / cols)
}

fn check_len(what: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(Error::Shape(format!("{what}: {len} values, expected {want}")));
    }
    Ok(())
}

/// Routes `T = logits.len() / E` tokens.
pub fn route(logits: &[f32], bias: Option<&[f32]>, cfg: &RouterConfig) -> Result<Routing> {
    cfg.validate()?;
    let tokens = check_rows("logits", logits.len(), cfg.experts)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), cfg.experts)?;
    }
    let mut out = Routing {
        ids: Vec::with_capacity(tokens * cfg.top_k),
        weights: Vec::with_capacity(tokens * cfg.top_k),
        counts: vec![0; cfg.experts],
    };
    for row in logits.chunks(cfg.experts) {
        let (ids, w) = route_token(row, bias, cfg);
        for &e in &ids {
            out.counts[e as usize] += 1;
        }
        out.ids.extend(ids);
        out.weights.extend(w);
    }
    Ok(out)
}

/// Gradient of a loss w.r.t. the logits `[T, E]` from its gradient w.r.t. the routing
/// weights `[T, k]`, for the ids the forward pass chose. The choice itself is piecewise
/// constant (no gradient); the bias gets none. Ids outside `[0, E)` contribute nothing.
///
/// With `a_j = s[id_j]`, `S = sum_j a_j`: `dL/da_j = route_scale / S * (g_j - sum_m g_m a_m / S)`
/// when renormalised (and `S > 0`), else `route_scale * g_j`; then through the sigmoid
/// (`s (1 - s)`) or the softmax (`s_e (ds_e - sum_f ds_f s_f)`).
pub fn route_backward(logits: &[f32], ids: &[i32], grad_weights: &[f32], cfg: &RouterConfig) -> Result<Vec<f32>> {
    cfg.validate()?;
    let (e_n, k) = (cfg.experts, cfg.top_k);
    let tokens = check_rows("logits", logits.len(), e_n)?;
    check_len("topk_ids", ids.len(), tokens * k)?;
    check_len("grad_weights", grad_weights.len(), tokens * k)?;
    let mut grad = vec![0.0f32; logits.len()];
    for t in 0..tokens {
        let s = scores(&logits[t * e_n..(t + 1) * e_n], cfg.score);
        let valid = |j: usize| (0..e_n as i32).contains(&ids[t * k + j]);
        let (mut total, mut dot) = (0.0f32, 0.0f32);
        for j in (0..k).filter(|&j| valid(j)) {
            let a = s[ids[t * k + j] as usize];
            total += a;
            dot += grad_weights[t * k + j] * a;
        }
        let renorm = cfg.renormalize && total > 0.0;
        let (scale_over_total, dot_over_total) =
            if renorm { (cfg.route_scale / total, dot / total) } else { (0.0, 0.0) };
        let mut gs = vec![0.0f32; e_n];
        let mut big_d = 0.0f32;
        for j in (0..k).filter(|&j| valid(j)) {
            let e = ids[t * k + j] as usize;
            let g = grad_weights[t * k + j];
            let da = if renorm { scale_over_total * (g - dot_over_total) } else { cfg.route_scale * g };
            big_d += da * s[e];
            gs[e] += da;
        }
        for e in 0..e_n {
            grad[t * e_n + e] = canon(match cfg.score {
                ScoreFunc::Sigmoid => gs[e] * (s[e] * (1.0 - s[e])),
                ScoreFunc::Softmax => s[e] * (gs[e] - big_d),
            });
        }
    }
    Ok(grad)
}

/// Auxiliary-loss-free balancing (DeepSeek-V3), in place:
/// `bias[e] += gamma * sign(mean - counts[e])`, `mean = sum(counts) / E`, compared exactly
/// (as `sum(counts)` against `E * counts[e]` in integers). Overloaded experts go down.
pub fn update_bias(bias: &mut [f32], counts: &[i32], gamma: f32) -> Result<()> {
    check_len("counts", counts.len(), bias.len())?;
    let total: i64 = counts.iter().map(|&c| c as i64).sum();
    let experts = bias.len() as i64;
    for (b, &c) in bias.iter_mut().zip(counts) {
        match (total - experts * c as i64).signum() {
            1 => *b += gamma,
            -1 => *b -= gamma,
            _ => {}
        }
    }
    Ok(())
}

/// Per-sequence statistics of the balance loss, in f64.
struct SeqStats {
    /// `f_e = E / (k T) * #{(t, j) : ids[t, j] == e}`.
    f: Vec<f64>,
    /// Normalised scores `s'[t, e]` of the sequence's tokens.
    sn: Vec<Vec<f64>>,
    /// Sums `Z_t` the sigmoid scores were divided by (1 for softmax).
    z: Vec<f64>,
    /// Raw scores `s[t, e]`.
    s: Vec<Vec<f64>>,
}

fn seq_stats(logits: &[f32], ids: &[i32], cfg: &RouterConfig) -> SeqStats {
    let (e_n, k) = (cfg.experts, cfg.top_k);
    let tokens = logits.len() / e_n;
    let mut f = vec![0.0f64; e_n];
    for &id in ids {
        if (0..e_n as i32).contains(&id) {
            f[id as usize] += 1.0;
        }
    }
    let scale = e_n as f64 / (k as f64 * tokens as f64);
    f.iter_mut().for_each(|x| *x *= scale);
    let (mut sn, mut z, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for row in logits.chunks(e_n) {
        let u: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let st: Vec<f64> = match cfg.score {
            ScoreFunc::Sigmoid => u.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
            ScoreFunc::Softmax => {
                let m = u.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = u.iter().map(|&x| (x - m).exp()).collect();
                let total: f64 = e.iter().sum();
                e.iter().map(|&x| x / total).collect()
            }
        };
        let zt = if cfg.score == ScoreFunc::Sigmoid { st.iter().sum() } else { 1.0 };
        sn.push(st.iter().map(|&x| x / zt).collect());
        z.push(zt);
        s.push(st);
    }
    SeqStats { f, sn, z, s }
}

fn check_balance(logits: &[f32], ids: &[i32], cfg: &RouterConfig, seq_len: usize) -> Result<usize> {
    cfg.validate()?;
    let tokens = check_rows("logits", logits.len(), cfg.experts)?;
    check_len("topk_ids", ids.len(), tokens * cfg.top_k)?;
    if seq_len == 0 || tokens % seq_len != 0 {
        return Err(Error::Shape(format!("{tokens} tokens are not whole sequences of {seq_len}")));
    }
    Ok(tokens / seq_len)
}

/// Sequence-wise balance loss (DeepSeek-V3), one value per sequence of `seq_len` tokens:
/// `L = alpha * sum_e f_e P_e`, `f_e = E / (k T) * #{(t, j) : ids[t, j] == e}` (pass the
/// ids of an unbiased routing, as V3 does), `P_e = (1/T) sum_t s'[t, e]`, `s' = s / sum_e s`
/// (sigmoid) or `s` (softmax). Computed in f64.
pub fn balance_loss(logits: &[f32], ids: &[i32], cfg: &RouterConfig, seq_len: usize, alpha: f32) -> Result<Vec<f32>> {
    let n_seq = check_balance(logits, ids, cfg, seq_len)?;
    let (e_n, k) = (cfg.experts, cfg.top_k);
    Ok((0..n_seq)
        .map(|q| {
            let st = seq_stats(
                &logits[q * seq_len * e_n..(q + 1) * seq_len * e_n],
                &ids[q * seq_len * k..(q + 1) * seq_len * k],
                cfg,
            );
            let loss: f64 =
                (0..e_n).map(|e| st.f[e] * st.sn.iter().map(|row| row[e]).sum::<f64>() / seq_len as f64).sum();
            (alpha as f64 * loss) as f32
        })
        .collect())
}

/// Gradient of `sum_q grad_loss[q] * balance_loss[q]` w.r.t. the logits (through `P` only).
pub fn balance_loss_backward(
    logits: &[f32],
    ids: &[i32],
    grad_loss: &[f32],
    cfg: &RouterConfig,
    seq_len: usize,
    alpha: f32,
) -> Result<Vec<f32>> {
    let n_seq = check_balance(logits, ids, cfg, seq_len)?;
    check_len("grad_loss", grad_loss.len(), n_seq)?;
    let (e_n, k) = (cfg.experts, cfg.top_k);
    let mut grad = vec![0.0f32; logits.len()];
    for q in 0..n_seq {
        let st = seq_stats(
            &logits[q * seq_len * e_n..(q + 1) * seq_len * e_n],
            &ids[q * seq_len * k..(q + 1) * seq_len * k],
            cfg,
        );
        let c: Vec<f64> = st.f.iter().map(|&f| grad_loss[q] as f64 * alpha as f64 * f / seq_len as f64).collect();
        for t in 0..seq_len {
            let out = &mut grad[(q * seq_len + t) * e_n..(q * seq_len + t + 1) * e_n];
            let (s, sn) = (&st.s[t], &st.sn[t]);
            let dot: f64 = (0..e_n).map(|e| c[e] * sn[e]).sum();
            for e in 0..e_n {
                out[e] = match cfg.score {
                    ScoreFunc::Sigmoid => (c[e] - dot) / st.z[t] * s[e] * (1.0 - s[e]),
                    ScoreFunc::Softmax => s[e] * (c[e] - dot),
                } as f32;
            }
        }
    }
    Ok(grad)
}
