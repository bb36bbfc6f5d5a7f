//! CPU reference: the kernels' arithmetic in the kernels' order, so the emulation and the GPU
//! give these bits exactly (tests compare bit patterns).

use crate::{check_chunk, Error, OptimConfig, Result, StepInfo, BLOCK};
use moekit_dtype::bf16;

const WARPS: usize = BLOCK / 32;

/// One parameter tensor and its optimizer state (all of one length).
#[derive(Debug)]
pub struct Slot<'a> {
    /// f32 master weights, updated in place.
    pub p: &'a mut [f32],
    /// Gradient.
    pub g: &'a [f32],
    /// First moment, updated in place.
    pub m: &'a mut [f32],
    /// Second moment, updated in place.
    pub v: &'a mut [f32],
    /// Optional BF16 copy of the updated weights (round to nearest even).
    pub p_bf16: Option<&'a mut [bf16]>,
    /// Whether decoupled weight decay applies.
    pub decay: bool,
}

/// `Shape` unless every buffer of the slot has `p`'s length.
pub fn check_slot(i: usize, p: usize, g: usize, m: usize, v: usize, b: Option<usize>) -> Result<()> {
    if g != p || m != p || v != p || b.is_some_and(|b| b != p) {
        return Err(Error::Shape(format!(
            "optimizer tensor {i}: p {p}, g {g}, m {m}, v {v}, bf16 {b:?} elements (must all be equal)"
        )));
    }
    Ok(())
}

/// The xor butterfly of `__shfl_xor_sync` (offsets len/2, ..., 1): lane `l` adds lane `l ^ off`;
/// lane 0's final value.
fn butterfly(a: &mut [f64]) -> f64 {
    let mut off = a.len() / 2;
    while off > 0 {
        let b = a.to_vec();
        for (l, x) in a.iter_mut().enumerate() {
            *x = b[l] + b[l ^ off];
        }
        off /= 2;
    }
    a[0]
}

/// The kernels' block sum of one value per thread: a butterfly in each warp, then one over
/// the warp sums.
pub fn block_sum(per_thread: &[f64; BLOCK]) -> f64 {
    let mut warps = [0.0f64; WARPS];
    for (w, s) in warps.iter_mut().enumerate() {
        *s = butterfly(&mut per_thread[w * 32..(w + 1) * 32].to_vec());
    }
    butterfly(&mut warps)
}

/// Sum of `f64(g)^2` over one chunk (`g.len() <= chunk`), in `moekit_optim_sumsq`'s order:
/// thread `t` adds the elements of the 4-element vectors `t, t + 256, ...` (each vector's
/// elements in order; the last vector may be partial), then [`block_sum`]. Each square is
/// exact in f64; only the additions round.
pub fn chunk_sum_squares(g: &[f32]) -> f64 {
    let mut acc = [0.0f64; BLOCK];
    for (v, four) in g.chunks(4).enumerate() {
        let a = &mut acc[v % BLOCK];
        for &x in four {
            *a += x as f64 * x as f64;
        }
    }
    block_sum(&acc)
}

/// Per-chunk sums of squares of every tensor, chunks numbered in tensor order (the kernels'
/// `partials` buffer).
pub fn partials(grads: &[&[f32]], chunk: usize) -> Result<Vec<f64>> {
    check_chunk(chunk)?;
    Ok(grads.iter().flat_map(|g| g.chunks(chunk).map(chunk_sum_squares)).collect())
}

/// `moekit_optim_norm_finalize`'s sum of the partials: thread `t` adds partials `t, t + 256,
/// ...` in order, then [`block_sum`].
pub fn reduce_partials(partials: &[f64]) -> f64 {
    let mut acc = [0.0f64; BLOCK];
    for (c, &x) in partials.iter().enumerate() {
        acc[c % BLOCK] += x;
    }
    block_sum(&acc)
}

/// The global L2 norm of `grads`, f32 of the f64 root (the kernels' bits).
pub fn grad_norm(grads: &[&[f32]], chunk: usize) -> Result<f32> {
    Ok(reduce_partials(&partials(grads, chunk)?).sqrt() as f32)
}

/// `a^b` by square-and-multiply, Rust's `f32::powi` (compiler-builtins' `__powisf2`)
/// operation for operation; the kernels' `powi`.
pub fn powi(mut a: f32, b: i32) -> f32 {
    let recip = b < 0;
    let mut n = b.unsigned_abs();
    let mut r = 1.0f32;
    loop {
        if n & 1 != 0 {
            r *= a;
        }
        n >>= 1;
        if n == 0 {
            break;
        }
        a *= a;
    }
    if recip {
        1.0 / r
    } else {
        r
    }
}

/// f32 -> BF16, round to nearest even, every NaN as 0x7fc0 (the kernels' conversion).
pub fn bf16_rne(x: f32) -> bf16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return bf16::from_bits(0x7fc0);
    }
    bf16::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16)
}

/// What the finalize kernel does with the total sum of squares: fills `state` (norm, clip, skip;
/// with `advance` and a finite norm also lr, bias corrections, and the step increment). `lr`:
/// `Some` = this value (the kernel argument), `None` = `cfg.lr_at(state.step)` (the device
/// table, equal by [`OptimConfig::lr_table`]'s construction).
pub fn finalize(total: f64, cfg: &OptimConfig, lr: Option<f32>, advance: bool, state: &mut StepInfo) {
    let norm = total.sqrt() as f32;
    state.grad_norm = norm;
    state.skipped = !norm.is_finite();
    state.clip = if cfg.clip_norm > 0.0 && norm > cfg.clip_norm { cfg.clip_norm / norm } else { 1.0 };
    if advance && norm.is_finite() {
        state.lr = lr.unwrap_or_else(|| cfg.lr_at(state.step.min(usize::MAX as u64) as usize));
        // The model's `self.step as i32` after the increment: the low 32 bits.
        let t = state.step.wrapping_add(1) as u32 as i32;
        state.bc1 = 1.0 - powi(cfg.beta1, t);
        state.bc2 = 1.0 - powi(cfg.beta2, t);
        state.step += 1;
    }
}

/// The AdamW update of one tensor with the step's scalars (the kernels' element function,
/// the model's `adamw_chunk`: no `mul_add`, IEEE division and square root).
pub fn update(slot: &mut Slot<'_>, cfg: &OptimConfig, state: &StepInfo) {
    let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
    let (clip, lr, bc1, bc2) = (state.clip, state.lr, state.bc1, state.bc2);
    let decay = if slot.decay { cfg.weight_decay } else { 0.0 };
    for i in 0..slot.p.len() {
        let gj = slot.g[i] * clip;
        let m = b1 * slot.m[i] + (1.0 - b1) * gj;
        let v = b2 * slot.v[i] + (1.0 - b2) * gj * gj;
        let u = (m / bc1) / ((v / bc2).sqrt() + eps);
        let p = slot.p[i] - lr * (u + decay * slot.p[i]);
        (slot.m[i], slot.v[i], slot.p[i]) = (m, v, p);
        if let Some(b) = slot.p_bf16.as_deref_mut() {
            b[i] = bf16_rne(p);
        }
    }
}

/// One optimizer step over `slots`: norm, clip, skip on a non-finite norm, AdamW. `state`
/// holds the step count and receives the step's scalars. `lr`: as in [`finalize`].
/// `Shape` for unequal lengths within a slot, `InvalidArgument` for a bad config or chunk.
pub fn step(
    slots: &mut [Slot<'_>],
    cfg: &OptimConfig,
    chunk: usize,
    lr: Option<f32>,
    state: &mut StepInfo,
) -> Result<()> {
    cfg.validate()?;
    check_chunk(chunk)?;
    for (i, s) in slots.iter().enumerate() {
        check_slot(i, s.p.len(), s.g.len(), s.m.len(), s.v.len(), s.p_bf16.as_ref().map(|b| b.len()))?;
    }
    let grads: Vec<&[f32]> = slots.iter().map(|s| s.g).collect();
    let total = reduce_partials(&partials(&grads, chunk)?);
    finalize(total, cfg, lr, true, state);
    if !state.skipped {
        for s in slots.iter_mut() {
            update(s, cfg, state);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powi_is_rusts() {
        for &b in &[0.9f32, 0.95, 0.999, 0.5, 0.123_456_7] {
            for t in (1..3000).chain([65_535, 1 << 20, i32::MAX, -1, -7]) {
                assert_eq!(powi(b, t).to_bits(), b.powi(t).to_bits(), "{b}^{t}");
            }
        }
    }

    #[test]
    fn bf16_rne_matches_moekit_dtype() {
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let f = f32::from_bits(x);
            if !f.is_nan() {
                assert_eq!(bf16_rne(f).to_bits(), bf16::from_f32(f).to_bits(), "{x:#x}");
            }
        }
        for f in [f32::MAX, f32::INFINITY, -0.0, 1.0 + f32::EPSILON * 64.0, f32::MIN_POSITIVE / 3.0] {
            assert_eq!(bf16_rne(f).to_bits(), bf16::from_f32(f).to_bits(), "{f}");
        }
        assert_eq!(bf16_rne(f32::from_bits(0xffc0_0001)).to_bits(), 0x7fc0);
    }

    #[test]
    fn chunk_sum_is_exact_on_small_integers() {
        // Integers: every partial sum is exact, so any order gives the same value.
        let g: Vec<f32> = (0..1003).map(|i| (i % 17) as f32 - 8.0).collect();
        let want: f64 = g.iter().map(|&x| (x * x) as f64).sum();
        assert_eq!(chunk_sum_squares(&g), want);
        assert_eq!(reduce_partials(&partials(&[&g], 64).unwrap()), want);
    }
}
