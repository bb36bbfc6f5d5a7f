//! Log-softmax outputs of the LM head and their gradients: the per-token log-probabilities
//! and entropies GRPO needs, and cross-entropy for supervised checks.
//!
//! Rows of `logits [N, V]`; a target below 0 marks a position without a target (its log-prob
//! and gradient are 0). Sums run in f64, in index order.

/// `log softmax` of one row, written to `out`.
fn log_softmax(z: &[f32], out: &mut [f64]) {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    for (o, &v) in out.iter_mut().zip(z) {
        *o = v as f64 - lse;
    }
}

/// Per-row log-probability of the target and entropy of the distribution.
pub fn token_logprobs(logits: &[f32], v: usize, targets: &[i32]) -> (Vec<f32>, Vec<f32>) {
    let mut lp = vec![0.0f64; v];
    let mut logp = Vec::with_capacity(targets.len());
    let mut ent = Vec::with_capacity(targets.len());
    for (z, &t) in logits.chunks(v).zip(targets) {
        log_softmax(z, &mut lp);
        ent.push(-lp.iter().map(|&l| l.exp() * l).sum::<f64>() as f32);
        logp.push(if (0..v as i32).contains(&t) { lp[t as usize] as f32 } else { 0.0 });
    }
    (logp, ent)
}

/// Gradient w.r.t. the logits of `sum_r dlogp[r] logp[r] + dentropy[r] H[r]`:
/// `dlogp (onehot - p) - dentropy p (log p + H)`.
pub fn logits_grad(logits: &[f32], v: usize, targets: &[i32], dlogp: &[f32], dentropy: Option<&[f32]>) -> Vec<f32> {
    let mut g = vec![0.0f32; logits.len()];
    let mut lp = vec![0.0f64; v];
    for (r, (z, gr)) in logits.chunks(v).zip(g.chunks_mut(v)).enumerate() {
        let de = dentropy.map_or(0.0, |d| d[r] as f64);
        let dl = dlogp[r] as f64;
        let t = targets[r];
        if de == 0.0 && (dl == 0.0 || t < 0) {
            continue;
        }
        log_softmax(z, &mut lp);
        let h: f64 = -lp.iter().map(|&l| l.exp() * l).sum::<f64>();
        for (j, o) in gr.iter_mut().enumerate() {
            let p = lp[j].exp();
            let mut x = -de * p * (lp[j] + h);
            if t >= 0 {
                x += dl * (if j as i32 == t { 1.0 } else { 0.0 } - p);
            }
            *o = x as f32;
        }
    }
    g
}

/// Mean cross-entropy over rows with a target, and its logits gradient.
pub fn cross_entropy(logits: &[f32], v: usize, targets: &[i32]) -> (f32, Vec<f32>) {
    let n = targets.iter().filter(|&&t| t >= 0).count().max(1);
    let (logp, _) = token_logprobs(logits, v, targets);
    let loss = -logp.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
    let dlogp: Vec<f32> = targets.iter().map(|&t| if t >= 0 { -1.0 / n as f32 } else { 0.0 }).collect();
    (loss as f32, logits_grad(logits, v, targets, &dlogp, None))
}
